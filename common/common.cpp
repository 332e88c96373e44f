#include "common/common.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>
#include <xxhash.h>

#include <cerrno>
#include <condition_variable>
#include <cinttypes>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <mutex>
#include <thread>

namespace grokit {

void check_failed(const char* file, int line, const char* expr, const std::string& msg) {
  std::fprintf(stderr, "grokit: internal error at %s:%d: check failed: %s%s%s\n", file, line, expr,
               msg.empty() ? "" : ": ", msg.c_str());
  std::fflush(stderr);
  std::abort();
}

static std::string errno_text(int err) { return std::strerror(err); }

// ---------------------------------------------------------------------------------
uint64_t xxh3_64(const void* data, size_t size) { return XXH3_64bits(data, size); }

Xxh3Stream::Xxh3Stream() : state_(XXH3_createState()) {
  GROKIT_CHECK(state_ != nullptr);
  XXH3_64bits_reset(static_cast<XXH3_state_t*>(state_));
}
Xxh3Stream::~Xxh3Stream() {
  if (state_ != nullptr) XXH3_freeState(static_cast<XXH3_state_t*>(state_));
}
void Xxh3Stream::update(const void* data, size_t size) {
  XXH3_64bits_update(static_cast<XXH3_state_t*>(state_), data, size);
}
uint64_t Xxh3Stream::digest() const { return XXH3_64bits_digest(static_cast<XXH3_state_t*>(state_)); }

std::string hex64(uint64_t v) {
  char buf[17];
  std::snprintf(buf, sizeof buf, "%016" PRIx64, v);
  return buf;
}

std::optional<uint64_t> parse_hex64(std::string_view s) {
  if (s.size() != 16) return std::nullopt;
  uint64_t v = 0;
  for (char c : s) {
    int d;
    if (c >= '0' && c <= '9') d = c - '0';
    else if (c >= 'a' && c <= 'f') d = c - 'a' + 10;
    else return std::nullopt;
    v = v << 4 | static_cast<uint64_t>(d);
  }
  return v;
}

// ---------------------------------------------------------------------------------
MappedFile::~MappedFile() {
  if (data_ != nullptr) munmap(const_cast<uint8_t*>(data_), size_);
}
MappedFile::MappedFile(MappedFile&& o) noexcept
    : path_(std::move(o.path_)), data_(std::exchange(o.data_, nullptr)), size_(std::exchange(o.size_, 0)) {}
MappedFile& MappedFile::operator=(MappedFile&& o) noexcept {
  if (this != &o) {
    if (data_ != nullptr) munmap(const_cast<uint8_t*>(data_), size_);
    path_ = std::move(o.path_);
    data_ = std::exchange(o.data_, nullptr);
    size_ = std::exchange(o.size_, 0);
  }
  return *this;
}

Result<MappedFile> MappedFile::open(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return make_error(path, ": cannot open: ", errno_text(errno));
  struct stat st {};
  if (fstat(fd, &st) != 0) {
    int e = errno;
    ::close(fd);
    return make_error(path, ": cannot stat: ", errno_text(e));
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    return make_error(path, ": not a regular file");
  }
  MappedFile m;
  m.path_ = path;
  m.size_ = static_cast<uint64_t>(st.st_size);
  if (m.size_ > 0) {
    void* p = mmap(nullptr, m.size_, PROT_READ, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED) {
      int e = errno;
      ::close(fd);
      return make_error(path, ": cannot map ", m.size_, " bytes: ", errno_text(e));
    }
    m.data_ = static_cast<const uint8_t*>(p);
  }
  ::close(fd);
  return m;
}

static void advise(const uint8_t* base, uint64_t size, uint64_t offset, uint64_t length, int advice) {
  if (base == nullptr || offset >= size) return;
  length = std::min(length, size - offset);
  const uint64_t page = 4096;
  uint64_t start = offset / page * page;
  madvise(const_cast<uint8_t*>(base) + start, length + (offset - start), advice);
}
void MappedFile::advise_sequential() const { advise(data_, size_, 0, size_, MADV_SEQUENTIAL); }
void MappedFile::advise_willneed(uint64_t offset, uint64_t length) const {
  advise(data_, size_, offset, length, MADV_WILLNEED);
}
void MappedFile::advise_dontneed(uint64_t offset, uint64_t length) const {
  advise(data_, size_, offset, length, MADV_DONTNEED);
}

// ---------------------------------------------------------------------------------
AlignedBuffer::AlignedBuffer(size_t size, size_t alignment) : size_(size) {
  GROKIT_CHECK(alignment != 0 && (alignment & (alignment - 1)) == 0);
  p_.reset(static_cast<uint8_t*>(std::aligned_alloc(alignment, align_up(std::max<size_t>(size, 1), alignment))));
  GROKIT_CHECK_MSG(p_ != nullptr, str_cat("out of memory allocating ", size, " bytes"));
}

static Error write_error(const std::string& path, uint64_t offset, size_t size, int err) {
  std::string hint;
  if (err == ENOSPC) hint = " (the disk is full)";
  if (err == EFBIG) hint = " (file size limit reached)";
  if (err == EDQUOT) hint = " (disk quota exceeded)";
  return make_error(path, ": write of ", size, " bytes at offset ", offset, " failed: ", errno_text(err), hint);
}

OutputFile::~OutputFile() {
  if (fd_ >= 0) ::close(fd_);
  if (direct_fd_ >= 0) ::close(direct_fd_);
}
OutputFile::OutputFile(OutputFile&& o) noexcept
    : path_(std::move(o.path_)), fd_(std::exchange(o.fd_, -1)), direct_fd_(std::exchange(o.direct_fd_, -1)) {
  direct_ok_.store(o.direct_ok_.exchange(false));
}
OutputFile& OutputFile::operator=(OutputFile&& o) noexcept {
  if (this != &o) {
    if (fd_ >= 0) ::close(fd_);
    if (direct_fd_ >= 0) ::close(direct_fd_);
    path_ = std::move(o.path_);
    fd_ = std::exchange(o.fd_, -1);
    direct_fd_ = std::exchange(o.direct_fd_, -1);
    direct_ok_.store(o.direct_ok_.exchange(false));
  }
  return *this;
}

bool OutputFile::enable_direct_io() {
  if (direct_fd_ >= 0) return direct_io();
  if (fd_ < 0) return false;
  // The same open file, not the path: a rename between the two opens cannot split them.
  std::string self = "/proc/self/fd/" + std::to_string(fd_);
  int fd = ::open(self.c_str(), O_WRONLY | O_CLOEXEC | O_DIRECT);
  if (fd < 0) return false;
  direct_fd_ = fd;
  direct_ok_.store(true);
  return true;
}

Status OutputFile::pwrite_direct(uint64_t offset, const void* data, size_t size) const {
  const auto* p = static_cast<const uint8_t*>(data);
  const bool aligned = offset % kDirectIoAlign == 0 && size % kDirectIoAlign == 0 &&
                       reinterpret_cast<uintptr_t>(p) % kDirectIoAlign == 0;
  if (!aligned || !direct_io()) return pwrite_all(offset, data, size);
  size_t done = 0;
  while (done < size) {
    // Chunks of 1 GiB keep every piece aligned.
    ssize_t n = ::pwrite(direct_fd_, p + done, std::min<size_t>(size - done, size_t{1} << 30),
                         static_cast<off_t>(offset + done));
    if (n < 0) {
      if (errno == EINTR) continue;
      if (errno == EINVAL) {  // alignment the device does not take: page cache from now on
        direct_ok_.store(false);
        return pwrite_all(offset + done, p + done, size - done);
      }
      return write_error(path_, offset + done, size - done, errno);
    }
    if (n == 0) return write_error(path_, offset + done, size - done, ENOSPC);
    done += static_cast<size_t>(n);
    if (done % kDirectIoAlign != 0) return pwrite_all(offset + done, p + done, size - done);  // short write
  }
  return {};
}

Result<OutputFile> OutputFile::open(const std::string& path, Mode mode) {
  int flags = O_RDWR | O_CLOEXEC;
  switch (mode) {
    case Mode::kCreateExclusive: flags |= O_CREAT | O_EXCL; break;
    case Mode::kCreateOrTruncate: flags |= O_CREAT | O_TRUNC; break;
    case Mode::kOpenExisting: break;
  }
  int fd = ::open(path.c_str(), flags, 0644);
  if (fd < 0) return make_error(path, ": cannot open for writing: ", errno_text(errno));
  OutputFile f;
  f.path_ = path;
  f.fd_ = fd;
  return f;
}

Status OutputFile::pwrite_all(uint64_t offset, const void* data, size_t size) const {
  const auto* p = static_cast<const uint8_t*>(data);
  size_t done = 0;
  while (done < size) {
    ssize_t n = ::pwrite(fd_, p + done, std::min<size_t>(size - done, size_t{1} << 30),
                         static_cast<off_t>(offset + done));
    if (n < 0) {
      if (errno == EINTR) continue;
      return write_error(path_, offset + done, size - done, errno);
    }
    if (n == 0) return write_error(path_, offset + done, size - done, ENOSPC);
    done += static_cast<size_t>(n);
  }
  return {};
}

Status OutputFile::pread_all(uint64_t offset, void* data, size_t size) const {
  auto* p = static_cast<uint8_t*>(data);
  size_t done = 0;
  while (done < size) {
    ssize_t n = ::pread(fd_, p + done, size - done, static_cast<off_t>(offset + done));
    if (n < 0) {
      if (errno == EINTR) continue;
      return make_error(path_, ": read at offset ", offset + done, " failed: ", errno_text(errno));
    }
    if (n == 0) return make_error(path_, ": unexpected end of file at offset ", offset + done);
    done += static_cast<size_t>(n);
  }
  return {};
}

Status OutputFile::sync() const {
  if (::fsync(fd_) != 0) return make_error(path_, ": fsync failed: ", errno_text(errno));
  return {};
}

Status OutputFile::truncate(uint64_t size) const {
  if (::ftruncate(fd_, static_cast<off_t>(size)) != 0) {
    int e = errno;
    return make_error(path_, ": cannot set size to ", size, " bytes: ", errno_text(e),
                      e == EFBIG ? " (file size limit reached)" : "");
  }
  return {};
}

Status OutputFile::reserve(uint64_t size) const {
  const int rc = ::posix_fallocate(fd_, 0, static_cast<off_t>(size));
  if (rc == ENOSPC || rc == EFBIG || rc == EDQUOT) {
    return make_error(path_, ": cannot reserve ", size, " bytes: ", errno_text(rc),
                      rc == ENOSPC ? " (the disk is full)" : rc == EFBIG ? " (file size limit reached)" : " (disk quota exceeded)");
  }
  return rc == 0 ? Status{} : truncate(size);
}

Result<uint64_t> OutputFile::size() const {
  struct stat st {};
  if (fstat(fd_, &st) != 0) return make_error(path_, ": cannot stat: ", errno_text(errno));
  return static_cast<uint64_t>(st.st_size);
}

Status OutputFile::close() {
  if (fd_ < 0) return {};
  int r = ::close(fd_);
  fd_ = -1;
  if (r != 0) return make_error(path_, ": close failed: ", errno_text(errno));
  return {};
}

bool path_exists(const std::string& path) {
  struct stat st {};
  return ::lstat(path.c_str(), &st) == 0;
}
bool is_directory(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}
bool same_file(const std::string& a, const std::string& b) {
  struct stat sa {}, sb {};
  return ::stat(a.c_str(), &sa) == 0 && ::stat(b.c_str(), &sb) == 0 && sa.st_dev == sb.st_dev && sa.st_ino == sb.st_ino;
}
Result<uint64_t> file_size(const std::string& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) return make_error(path, ": cannot stat: ", errno_text(errno));
  if (!S_ISREG(st.st_mode)) return make_error(path, ": not a regular file");
  return static_cast<uint64_t>(st.st_size);
}
Status make_directory(const std::string& path) {
  if (::mkdir(path.c_str(), 0755) == 0) return {};
  int e = errno;
  if (e == EEXIST && is_directory(path)) return {};
  return make_error(path, ": cannot create directory: ", errno_text(e));
}
Status fsync_directory(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return make_error(path, ": cannot open directory: ", errno_text(errno));
  int r = ::fsync(fd);
  int e = errno;
  ::close(fd);
  if (r != 0) return make_error(path, ": fsync of directory failed: ", errno_text(e));
  return {};
}
Status rename_file(const std::string& from, const std::string& to) {
  if (::rename(from.c_str(), to.c_str()) != 0)
    return make_error("cannot rename ", from, " to ", to, ": ", errno_text(errno));
  return {};
}
Status remove_file(const std::string& path) {
  if (::unlink(path.c_str()) != 0 && errno != ENOENT)
    return make_error(path, ": cannot remove: ", errno_text(errno));
  return {};
}
std::vector<std::string> list_directory(const std::string& dir) {
  std::vector<std::string> names;
  if (DIR* d = opendir(dir.c_str())) {
    while (dirent* e = readdir(d)) {
      std::string n = e->d_name;
      if (n != "." && n != "..") names.push_back(std::move(n));
    }
    closedir(d);
  }
  return names;
}
Status remove_directory_files(const std::string& dir) {
  if (!path_exists(dir)) return {};
  for (const auto& n : list_directory(dir)) GROKIT_TRY(remove_file(path_join(dir, n)));
  if (::rmdir(dir.c_str()) != 0) return make_error(dir, ": cannot remove: ", errno_text(errno));
  return {};
}
Result<std::string> read_small_file(const std::string& path, uint64_t max_bytes) {
  GROKIT_ASSIGN_OR_RETURN(uint64_t size, file_size(path));
  if (size > max_bytes) return make_error(path, ": ", size, " bytes, more than the limit of ", max_bytes);
  std::ifstream in(path, std::ios::binary);
  if (!in) return make_error(path, ": cannot open: ", errno_text(errno));
  // To the end, whatever stat said: /proc and cgroup files report a size of 0.
  std::string s;
  s.reserve(static_cast<size_t>(size));
  char buf[4096];
  while (in.read(buf, sizeof buf) || in.gcount() > 0) {
    s.append(buf, static_cast<size_t>(in.gcount()));
    if (s.size() > max_bytes) return make_error(path, ": more than the limit of ", max_bytes, " bytes");
  }
  if (in.bad()) return make_error(path, ": read failed: ", errno_text(errno));
  return s;
}
uint64_t meminfo_available_bytes() {
  auto meminfo = read_small_file("/proc/meminfo", 1 << 16);
  if (!meminfo.ok()) return 0;
  const size_t at = meminfo->find("MemAvailable:");
  if (at == std::string::npos) return 0;
  return std::strtoull(meminfo->c_str() + at + 13, nullptr, 10) * 1024ull;
}
Status write_file_atomic(const std::string& path, std::string_view contents) {
  std::string tmp = path + ".tmp";
  GROKIT_ASSIGN_OR_RETURN(OutputFile f, OutputFile::open(tmp, OutputFile::Mode::kCreateOrTruncate));
  GROKIT_TRY(f.pwrite_all(0, contents.data(), contents.size()));
  GROKIT_TRY(f.sync());
  GROKIT_TRY(f.close());
  GROKIT_TRY(rename_file(tmp, path));
  return fsync_directory(path_dirname(path));
}
Result<uint64_t> free_disk_bytes(const std::string& dir) {
  struct statvfs s {};
  if (::statvfs(dir.c_str(), &s) != 0) return make_error(dir, ": statvfs failed: ", errno_text(errno));
  return static_cast<uint64_t>(s.f_bavail) * s.f_frsize;
}
std::string path_join(const std::string& a, const std::string& b) {
  if (a.empty()) return b;
  if (a.back() == '/') return a + b;
  return a + "/" + b;
}
std::string path_dirname(const std::string& path) {
  std::string p = path;
  while (p.size() > 1 && p.back() == '/') p.pop_back();  // "a/b/" is "a/b"
  auto pos = p.find_last_of('/');
  if (pos == std::string::npos) return ".";
  if (pos == 0) return "/";
  return p.substr(0, pos);
}
std::string path_basename(const std::string& p) {
  std::string s = p;
  while (s.size() > 1 && s.back() == '/') s.pop_back();
  auto pos = s.find_last_of('/');
  return pos == std::string::npos ? s : s.substr(pos + 1);
}

// ---------------------------------------------------------------------------------
unsigned hardware_threads() {
  unsigned n = std::thread::hardware_concurrency();
  return n == 0 ? 1 : n;
}

void parallel_for(size_t n, unsigned threads, const std::function<void(size_t)>& fn) {
  if (n == 0) return;
  threads = std::max(1u, std::min<unsigned>(threads, static_cast<unsigned>(std::min<size_t>(n, 1024))));
  std::atomic<size_t> next{0};
  auto worker = [&] {
    for (size_t i = next.fetch_add(1); i < n; i = next.fetch_add(1)) fn(i);
  };
  std::vector<std::thread> pool;
  pool.reserve(threads - 1);
  for (unsigned t = 1; t < threads; ++t) pool.emplace_back(worker);
  worker();
  for (auto& t : pool) t.join();
}

// ---------------------------------------------------------------------------------
// Workers spin for a short while before sleeping: a forward pass issues thousands of
// short parallel loops, and waking a sleeping thread costs tens of microseconds (more in
// a VM), as much as a small loop itself.
struct ThreadPool::State {
  std::mutex mu;
  std::condition_variable wake, done;
  std::vector<std::thread> workers;
  const std::function<void(size_t)>* fn = nullptr;
  size_t n = 0;
  std::atomic<size_t> next{0};
  std::atomic<uint64_t> generation{0};
  std::atomic<unsigned> busy{0};
  std::atomic<bool> stop{false};
};

static inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

static constexpr int kSpinIterations = 2000;  // some tens of microseconds of pause instructions

ThreadPool::ThreadPool(unsigned threads) : threads_(std::max(1u, threads)), state_(new State) {
  for (unsigned t = 1; t < threads_; ++t) {
    state_->workers.emplace_back([s = state_] {
      uint64_t seen = 0;
      while (true) {
        bool ready = false;
        for (int i = 0; i < kSpinIterations && !ready; ++i) {
          ready = s->stop.load(std::memory_order_acquire) || s->generation.load(std::memory_order_acquire) != seen;
          if (!ready) cpu_relax();
        }
        if (!ready) {
          std::unique_lock<std::mutex> lock(s->mu);
          s->wake.wait(lock, [&] { return s->stop.load() || s->generation.load() != seen; });
        }
        if (s->stop.load()) return;
        seen = s->generation.load(std::memory_order_acquire);
        const auto* fn = s->fn;
        size_t n = s->n;
        for (size_t i = s->next.fetch_add(1); i < n; i = s->next.fetch_add(1)) (*fn)(i);
        if (s->busy.fetch_sub(1, std::memory_order_acq_rel) == 1) {
          std::lock_guard<std::mutex> lock(s->mu);
          s->done.notify_one();
        }
      }
    });
  }
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lock(state_->mu);
    state_->stop.store(true);
  }
  state_->wake.notify_all();
  for (auto& t : state_->workers) t.join();
  delete state_;
}

void ThreadPool::run(size_t n, const std::function<void(size_t)>& fn) {
  if (n == 0) return;
  if (threads_ == 1 || n == 1) {
    for (size_t i = 0; i < n; ++i) fn(i);
    return;
  }
  State* s = state_;
  s->fn = &fn;
  s->n = n;
  s->next.store(0);
  s->busy.store(threads_ - 1);
  {
    std::lock_guard<std::mutex> lock(s->mu);  // pairs with the sleepers' predicate check
    s->generation.fetch_add(1, std::memory_order_release);
  }
  s->wake.notify_all();
  for (size_t i = s->next.fetch_add(1); i < n; i = s->next.fetch_add(1)) fn(i);
  for (int i = 0; i < kSpinIterations && s->busy.load(std::memory_order_acquire) != 0; ++i) cpu_relax();
  if (s->busy.load(std::memory_order_acquire) != 0) {
    std::unique_lock<std::mutex> lock(s->mu);
    s->done.wait(lock, [&] { return s->busy.load() == 0; });
  }
  s->fn = nullptr;
}

Status run_in_order(ThreadPool& pool, size_t n, size_t slots, const std::function<void(size_t, size_t)>& produce,
                    const std::function<Status(size_t, size_t)>& consume) {
  GROKIT_CHECK(slots >= 1);
  std::mutex m;
  std::condition_variable slot_freed;
  std::vector<char> ready(slots, 0);
  size_t next = 0, consumed = 0;
  bool consuming = false;
  Status status;  // the first failed consume; all of these guarded by m
  pool.run(pool.size(), [&](size_t) {
    std::unique_lock lk(m);
    while (status.ok()) {
      if (!consuming && consumed < n && ready[consumed % slots]) {
        consuming = true;
        while (consumed < n && ready[consumed % slots] && status.ok()) {
          const size_t i = consumed;
          lk.unlock();
          Status s = consume(i, i % slots);
          lk.lock();
          if (!s.ok()) status = std::move(s);
          ready[i % slots] = 0;
          ++consumed;
          slot_freed.notify_all();
        }
        consuming = false;
        continue;
      }
      if (next >= n) break;  // items still in flight are consumed by whoever finishes them
      if (next >= consumed + slots) {
        slot_freed.wait(lk);
        continue;
      }
      const size_t i = next++;
      lk.unlock();
      produce(i, i % slots);
      lk.lock();
      ready[i % slots] = 1;
    }
  });
  GROKIT_TRY(status);
  GROKIT_CHECK(consumed == n);
  return {};
}

// ---------------------------------------------------------------------------------
std::string human_bytes(double bytes) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  int u = 0;
  while (bytes >= 1024.0 && u < 4) {
    bytes /= 1024.0;
    ++u;
  }
  char buf[32];
  std::snprintf(buf, sizeof buf, u == 0 ? "%.0f %s" : "%.2f %s", bytes, units[u]);
  return buf;
}

static uint64_t proc_status_kb(const char* key) {
  std::ifstream in("/proc/self/status");
  std::string line;
  size_t klen = std::strlen(key);
  while (std::getline(in, line)) {
    if (line.compare(0, klen, key) == 0 && line.size() > klen && line[klen] == ':')
      return std::strtoull(line.c_str() + klen + 1, nullptr, 10) * 1024;
  }
  return 0;
}
uint64_t rss_anon_bytes() { return proc_status_kb("RssAnon"); }
uint64_t peak_rss_bytes() { return proc_status_kb("VmHWM"); }

Progress::Progress(std::string label, uint64_t total_bytes, bool enabled)
    : label_(std::move(label)), total_(total_bytes), enabled_(enabled), tty_(isatty(STDERR_FILENO) != 0),
      start_(std::chrono::steady_clock::now()) {}
Progress::~Progress() { finish(); }

double Progress::elapsed_seconds() const {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
}

void Progress::add(uint64_t bytes) {
  done_.fetch_add(bytes);
  if (!enabled_) return;
  int64_t now = std::chrono::duration_cast<std::chrono::nanoseconds>(
                    std::chrono::steady_clock::now() - start_).count();
  int64_t interval = tty_ ? 100'000'000 : 5'000'000'000;
  int64_t last = last_draw_ns_.load();
  if (now - last < interval) return;
  if (!last_draw_ns_.compare_exchange_strong(last, now)) return;
  draw(false);
}

void Progress::draw(bool final) {
  static std::mutex mu;
  std::lock_guard<std::mutex> lock(mu);
  double secs = std::max(elapsed_seconds(), 1e-9);
  uint64_t done = std::min(done_.load(), total_);
  double frac = total_ ? static_cast<double>(done) / static_cast<double>(total_) : 1.0;
  char line[256];
  if (tty_) {
    int width = 30, filled = static_cast<int>(frac * width);
    std::string bar(static_cast<size_t>(filled), '#');
    bar.resize(static_cast<size_t>(width), '.');
    std::snprintf(line, sizeof line, "\r%s [%s] %5.1f%% %s / %s  %.2f GB/s%s", label_.c_str(), bar.c_str(),
                  100 * frac, human_bytes(static_cast<double>(done)).c_str(),
                  human_bytes(static_cast<double>(total_)).c_str(), static_cast<double>(done) / secs / 1e9,
                  final ? "\n" : "");
  } else {
    std::snprintf(line, sizeof line, "%s: %5.1f%% %s / %s  %.2f GB/s\n", label_.c_str(), 100 * frac,
                  human_bytes(static_cast<double>(done)).c_str(), human_bytes(static_cast<double>(total_)).c_str(),
                  static_cast<double>(done) / secs / 1e9);
  }
  std::fputs(line, stderr);
  std::fflush(stderr);
}

void Progress::finish() {
  if (finished_) return;
  finished_ = true;
  if (enabled_ && tty_) draw(true);
}

}  // namespace grokit
