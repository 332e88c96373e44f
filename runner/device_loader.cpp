#include "runner/device_loader.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#include <xxhash.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <mutex>
#include <optional>
#include <thread>

namespace grokit::runner {

namespace {

Status op_status(const GrokitOps* ops, int rc, const char* what) {
  if (rc == GROKIT_OK) return {};
  return make_error(what, " failed on ", ops->backend, ": ", ops->error_message());
}

// Pinned buffers and events that give themselves back. On an early return (a failed
// read, a checksum mismatch) copies out of the buffers may still be queued on the
// stream: wait for them before the buffers are freed.
struct Staging {
  const GrokitOps* ops;
  GrokitStream stream;
  std::vector<void*> buf, ev;
  ~Staging() {
    bool any = false;
    for (void* b : buf) any = any || b != nullptr;
    if (any) (void)ops->stream_sync(stream);
    for (void* e : ev)
      if (e != nullptr) ops->event_destroy(e);
    for (void* b : buf)
      if (b != nullptr) ops->free_pinned(b);
  }
};

// A piece of the load that one reader takes whole: whole checksummed ranges (several
// small ones together, up to a chunk; a large one alone, read chunk by chunk) or a
// stretch between them. Checksums are computed by the reader that reads the bytes, range
// by range in order, so verification runs on every reader thread at once (one thread
// hashing everything capped a load at its XXH3 rate, well under a host-to-device copy).
struct Job {
  uint64_t begin = 0, end = 0;
  size_t first = 0, last = 0;  // ranges [first, last) of the sorted order, inside [begin, end)
};

std::vector<Job> make_jobs(const std::vector<const HashedRange*>& order, uint64_t bytes, uint64_t chunk) {
  std::vector<Job> jobs;
  Job cur;
  auto close = [&](uint64_t at, size_t next_range) {
    cur.end = at;
    cur.last = next_range;
    if (cur.end > cur.begin) jobs.push_back(cur);
    cur = Job{at, at, next_range, next_range};
  };
  uint64_t pos = 0;
  auto gap_to = [&](uint64_t to, size_t next_range) {  // bytes no range covers, up to `to`
    while (pos < to) {
      const uint64_t take = std::min(to - pos, chunk - (pos - cur.begin));
      pos += take;
      if (pos - cur.begin == chunk) close(pos, next_range);
    }
  };
  for (size_t i = 0; i < order.size(); ++i) {
    const HashedRange& r = *order[i];
    gap_to(r.offset, i);
    if (pos - cur.begin + r.size > chunk && pos > cur.begin) close(pos, i);
    pos += r.size;
    if (pos - cur.begin >= chunk) close(pos, i + 1);
  }
  gap_to(bytes, order.size());
  close(bytes, order.size());
  return jobs;
}

// A chunk that a reader has in a staging buffer: load bytes [at, at + len).
struct Staged {
  size_t buffer = 0;
  uint64_t at = 0;
  size_t len = 0;
};

// The reader threads: each takes the next job, and for each of its chunks a free staging
// buffer, reads the chunk into it, hashes it into its ranges and hands it to the calling
// thread, which copies it to the device and gives the buffer back once the copy is done.
class Readers {
 public:
  static constexpr uint64_t kPiece = uint64_t{1} << 20;  // read, then hashed from cache

  // mapped: the load's bytes in a mapping of the file; the readers then only hash them
  // (no buffers, nothing staged).
  Readers(int fd, const std::string& path, uint64_t file_offset, uint64_t bytes, size_t chunk,
          const std::vector<void*>& bufs, const std::vector<Job>& jobs, const std::vector<const HashedRange*>& order,
          const uint8_t* mapped = nullptr)
      : fd_(fd), path_(path), file_offset_(file_offset), bytes_(bytes), chunk_(chunk), bufs_(bufs), jobs_(jobs),
        order_(order), mapped_(mapped) {
    for (size_t b = 0; b < bufs.size(); ++b) free_.push_back(b);
  }
  ~Readers() { stop(); }

  void start(unsigned n) {
    for (unsigned t = 0; t < n; ++t) threads_.emplace_back([this] { run(); });
  }
  void stop() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stopping_ = true;
    }
    halt_.store(true);
    cv_.notify_all();
    for (auto& t : threads_) t.join();
    threads_.clear();
  }
  // Mapped: waits for every job to be hashed; the first mismatch, if any.
  Status finish() {
    for (auto& t : threads_) t.join();
    threads_.clear();
    std::lock_guard<std::mutex> lock(mu_);
    if (error_) return *error_;
    return {};
  }
  bool failed() {
    std::lock_guard<std::mutex> lock(mu_);
    return error_.has_value();
  }
  // The next staged chunk, in any order; nothing when `wait` is false and none is ready.
  // An error if a read or a checksum failed.
  Result<std::optional<Staged>> next_staged(bool wait) {
    std::unique_lock<std::mutex> lock(mu_);
    if (wait) cv_.wait(lock, [&] { return !ready_.empty() || error_.has_value(); });
    if (error_) return *error_;
    if (ready_.empty()) return std::optional<Staged>{};
    Staged c = ready_.front();
    ready_.pop_front();
    return std::optional<Staged>{c};
  }
  // The copy out of buffer b is done: a reader may fill it again.
  void release(size_t b) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      free_.push_back(b);
    }
    cv_.notify_all();
  }
  double read_seconds() const { return read_ns_.load() * 1e-9; }
  double hash_seconds() const { return hash_ns_.load() * 1e-9; }

 private:
  static uint64_t ns_since(std::chrono::steady_clock::time_point t0) {
    return static_cast<uint64_t>(
        std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - t0).count());
  }
  void fail(Error e) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (!error_) error_ = std::move(e);
    }
    halt_.store(true);
    cv_.notify_all();
  }
  std::optional<Error> read_into(uint8_t* buf, uint64_t at, size_t len) {
    for (size_t got = 0; got < len;) {
      ssize_t r = ::pread(fd_, buf + got, len - got, static_cast<off_t>(file_offset_ + at + got));
      if (r < 0 && errno == EINTR) continue;
      if (r < 0) return Error{str_cat(path_, ": read failed at byte ", file_offset_ + at + got, ": ", std::strerror(errno))};
      if (r == 0)
        return Error{str_cat(path_, ": the file ended at or before byte ", file_offset_ + at + got,
                             " while it was loaded (up to byte ", file_offset_ + bytes_, "): it shrank")};
      got += static_cast<size_t>(r);
    }
    return std::nullopt;
  }
  void run() {
    XXH3_state_t* state = XXH3_createState();
    GROKIT_CHECK(state != nullptr);
    struct StateGuard {
      XXH3_state_t* s;
      ~StateGuard() { XXH3_freeState(s); }
    } guard{state};
    for (size_t j = next_job_.fetch_add(1); j < jobs_.size(); j = next_job_.fetch_add(1)) {
      const Job& job = jobs_[j];
      size_t next = job.first;  // the range being hashed or next to be
      bool hashing = false;
      // Load bytes [plo, phi), at p, into the ranges they overlap; false on a mismatch.
      auto hash = [&](const uint8_t* p, uint64_t plo, uint64_t phi) {
        const auto t0 = std::chrono::steady_clock::now();
        while (next < job.last) {
          const HashedRange& e = *order_[next];
          const uint64_t e_end = e.offset + e.size;
          if (e.offset >= phi) break;
          if (!hashing) {
            XXH3_64bits_reset(state);
            hashing = true;
          }
          const uint64_t a = std::max(plo, e.offset), z = std::min(phi, e_end);
          if (z > a) XXH3_64bits_update(state, p + (a - plo), static_cast<size_t>(z - a));
          if (e_end > phi) break;
          const uint64_t got = XXH3_64bits_digest(state);
          hashing = false;
          ++next;
          if (got != e.xxh3) {
            fail(Error{str_cat(path_, ": tensor '", e.name, "' (bytes ", file_offset_ + e.offset, "..",
                               file_offset_ + e_end, " of the file) has checksum ", hex64(got), ", the index records ",
                               hex64(e.xxh3), ": the file is corrupt")});
            return false;
          }
        }
        hash_ns_.fetch_add(ns_since(t0));
        return true;
      };
      if (mapped_ != nullptr) {
        for (uint64_t plo = job.begin; plo < job.end && !halt_.load(std::memory_order_relaxed);) {
          const uint64_t phi = std::min(job.end, plo + kPiece);
          if (!hash(mapped_ + plo, plo, phi)) return;
          plo = phi;
        }
        continue;
      }
      for (uint64_t lo = job.begin; lo < job.end;) {
        const size_t len = static_cast<size_t>(std::min<uint64_t>(chunk_, job.end - lo));
        const uint64_t hi = lo + len;
        size_t b = 0;
        {
          std::unique_lock<std::mutex> lock(mu_);
          cv_.wait(lock, [&] { return stopping_ || error_.has_value() || !free_.empty(); });
          if (stopping_ || error_) return;
          b = free_.front();
          free_.pop_front();
        }
        auto* buf = static_cast<uint8_t*>(bufs_[b]);
        // Read and hash a piece at a time: each piece is hashed while it is still in the
        // core's cache, so the staged bytes cross the memory bus once less.
        for (uint64_t plo = lo; plo < hi;) {
          const uint64_t phi = std::min(hi, plo + kPiece);
          const auto t0 = std::chrono::steady_clock::now();
          if (auto err = read_into(buf + (plo - lo), plo, static_cast<size_t>(phi - plo))) return fail(std::move(*err));
          read_ns_.fetch_add(ns_since(t0));
          if (!hash(buf + (plo - lo), plo, phi)) return;
          plo = phi;
        }
        {
          std::lock_guard<std::mutex> lock(mu_);
          ready_.push_back({b, lo, len});
        }
        cv_.notify_all();
        lo = hi;
      }
    }
  }

  const int fd_;
  const std::string& path_;
  const uint64_t file_offset_, bytes_;
  const size_t chunk_;
  const std::vector<void*>& bufs_;
  const std::vector<Job>& jobs_;
  const std::vector<const HashedRange*>& order_;
  const uint8_t* const mapped_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<size_t> free_;    // staging buffers no chunk holds
  std::deque<Staged> ready_;   // chunks read and hashed, not yet copied
  bool stopping_ = false;
  std::optional<Error> error_;
  std::atomic<size_t> next_job_{0};
  std::atomic<bool> halt_{false};  // mapped readers stop between pieces (stopped, or one failed)
  std::atomic<uint64_t> read_ns_{0}, hash_ns_{0};
  std::vector<std::thread> threads_;
};

// The mapped load: windows of the mapping registered with the device in turn (at most
// kWindows at once, each unregistered once its copy is done), copied straight from the
// page cache, while the readers hash the jobs from the same mapping.
Status load_mapped(const GrokitOps* ops, GrokitStream stream, int fd, const std::string& path, uint64_t file_offset,
                   uint64_t bytes, void* dst, const std::vector<Job>& jobs, const std::vector<const HashedRange*>& order,
                   Progress* progress, LoadStats* stats, size_t window_bytes, unsigned readers) {
  constexpr size_t kWindows = 3;
  if (ops->host_register == nullptr || ops->host_unregister == nullptr)
    return make_error("the ", ops->backend, " backend cannot register host memory for a mapped load");
  const long page_size = ::sysconf(_SC_PAGESIZE);
  GROKIT_CHECK(page_size > 0);
  const uint64_t page = static_cast<uint64_t>(page_size);
  const auto t0 = std::chrono::steady_clock::now();
  if (bytes == 0) {
    if (stats != nullptr) *stats = LoadStats{};
    return {};
  }
  // The mapping starts at the page holding file_offset; `lead` bytes of it come before.
  const uint64_t lead = file_offset % page, map_len = lead + bytes;
  if (map_len > SIZE_MAX) return make_error(path, ": ", bytes, " bytes cannot be mapped on this host");
  void* m = ::mmap(nullptr, static_cast<size_t>(map_len), PROT_READ, MAP_SHARED, fd,
                   static_cast<off_t>(file_offset - lead));
  if (m == MAP_FAILED)
    return make_error("cannot map ", human_bytes(static_cast<double>(bytes)), " of ", path, " at byte ", file_offset,
                      ": ", std::strerror(errno));
  struct Unmap {
    void* p;
    size_t n;
    ~Unmap() { ::munmap(p, n); }
  } unmap{m, static_cast<size_t>(map_len)};
  auto* map = static_cast<uint8_t*>(m);
  const uint64_t window = align_up(std::max<uint64_t>(window_bytes, page), page);
  const uint64_t windows = (map_len + window - 1) / window;

  // Registered windows and their copies' events; on an early return the copies still
  // queued are waited for before the windows are unregistered and the file unmapped.
  struct Registered {
    const GrokitOps* ops;
    GrokitStream stream;
    std::vector<void*> ev;
    std::deque<std::pair<void*, size_t>> live;  // window start, its event
    ~Registered() {
      if (!live.empty()) (void)ops->stream_sync(stream);
      for (auto& w : live) (void)ops->host_unregister(w.first);
      for (void* e : ev)
        if (e != nullptr) ops->event_destroy(e);
    }
  } reg{ops, stream, std::vector<void*>(kWindows, nullptr), {}};
  for (void*& e : reg.ev) GROKIT_TRY(op_status(ops, ops->event_create(&e), "event_create"));
  double register_seconds = 0;
  auto timed = [&](auto&& fn) {
    const auto r0 = std::chrono::steady_clock::now();
    const int rc = fn();
    register_seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - r0).count();
    return rc;
  };
  auto retire_oldest = [&]() -> Status {
    void* const at = reg.live.front().first;  // not a structured binding: clang 14 cannot capture one
    GROKIT_TRY(op_status(ops, ops->event_sync(reg.ev[reg.live.front().second]), "event_sync"));
    reg.live.pop_front();
    return op_status(ops, timed([&] { return ops->host_unregister(at); }), "host_unregister");
  };

  // Declared after the mapping and the windows: joined before either goes away.
  static const std::vector<void*> kNoBuffers;
  Readers rd(fd, path, file_offset, bytes, window, kNoBuffers, jobs, order, map + lead);
  rd.start(readers);
  for (uint64_t w = 0; w < windows; ++w) {
    const uint64_t lo = w * window, hi = std::min(map_len, lo + window);  // in the mapping
    if (w + 1 < windows) {  // the next window's pages, read ahead while this one copies
      const uint64_t nlo = hi, nhi = std::min(map_len, nlo + window);
      (void)::madvise(map + nlo, static_cast<size_t>(nhi - nlo), MADV_WILLNEED);
    }
    if (reg.live.size() == kWindows) GROKIT_TRY(retire_oldest());
    if (rd.failed()) break;  // a checksum failed: no point copying on
    const size_t e = static_cast<size_t>(w % kWindows);
    const size_t extent = static_cast<size_t>(align_up(hi, page) - lo);
    const int rc = timed([&] { return ops->host_register(map + lo, extent); });
    if (rc != GROKIT_OK)
      return make_error(path, ": cannot register ", human_bytes(static_cast<double>(extent)), " of its mapping at byte ",
                        file_offset - lead + lo, " with the ", ops->backend, " backend",
                        rc == GROKIT_ERR_UNSUPPORTED ? " (unsupported here)" : "", ": ", ops->error_message());
    reg.live.emplace_back(map + lo, e);
    // Load bytes [a, z) of this window (the lead is not loaded).
    const uint64_t a = std::max(lo, lead) - lead, z = hi - lead;
    GROKIT_TRY(op_status(
        ops, ops->copy(static_cast<uint8_t*>(dst) + a, map + lead + a, static_cast<size_t>(z - a), GROKIT_COPY_H2D, stream),
        "copy"));
    GROKIT_TRY(op_status(ops, ops->event_record(reg.ev[e], stream), "event_record"));
    if (progress != nullptr) progress->add(z - a);
  }
  while (!reg.live.empty()) GROKIT_TRY(retire_oldest());
  GROKIT_TRY(rd.finish());
  GROKIT_TRY(op_status(ops, ops->stream_sync(stream), "stream_sync"));
  if (stats != nullptr) {
    stats->seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    stats->read_seconds = 0;
    stats->hash_seconds = rd.hash_seconds();
    stats->register_seconds = register_seconds;
    stats->bytes = bytes;
    stats->readers = readers;
  }
  return {};
}

}  // namespace

Status load_file_to_device(const GrokitOps* ops, GrokitStream stream, const std::string& path, uint64_t file_offset,
                           uint64_t bytes, void* dst, const std::vector<HashedRange>& ranges, Progress* progress,
                           LoadStats* stats, size_t staging_bytes, unsigned readers, LoadSource source) {
  GROKIT_CHECK(staging_bytes > 0);
  readers = std::max(1u, readers);
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return make_error("cannot open ", path, ": ", std::strerror(errno));
  struct Closer {
    int fd;
    ~Closer() { ::close(fd); }
  } closer{fd};
  struct stat sb {};
  if (::fstat(fd, &sb) != 0) return make_error("cannot stat ", path, ": ", std::strerror(errno));
  const uint64_t file_size = static_cast<uint64_t>(sb.st_size);
  if (file_offset > file_size || bytes > file_size - file_offset)
    return make_error(path, ": the file ends at byte ", file_size, ", before byte ", file_offset + bytes,
                      " that was to be loaded");
  (void)posix_fadvise(fd, static_cast<off_t>(file_offset), static_cast<off_t>(bytes), POSIX_FADV_SEQUENTIAL);

  const size_t chunk = static_cast<size_t>(std::min<uint64_t>(staging_bytes, std::max<uint64_t>(bytes, 1)));
  const uint64_t chunks = (bytes + chunk - 1) / chunk;
  std::vector<const HashedRange*> order;
  for (const auto& r : ranges) order.push_back(&r);
  std::sort(order.begin(), order.end(),
            [](auto* a, auto* b) { return a->offset != b->offset ? a->offset < b->offset : a->size < b->size; });
  const HashedRange* last_nonempty = nullptr;
  for (const HashedRange* r : order) {
    if (r->offset > bytes || r->size > bytes - r->offset)
      return make_error(path, ": tensor '", r->name, "' lies outside the ", bytes, " bytes loaded");
    if (r->size == 0) continue;
    if (last_nonempty != nullptr && r->offset < last_nonempty->offset + last_nonempty->size)
      return make_error(path, ": tensor '", r->name, "' overlaps tensor '", last_nonempty->name, "'");
    last_nonempty = r;
  }
  for (const HashedRange* r : order) {
    if (r->size == 0 && XXH3_64bits(nullptr, 0) != r->xxh3)
      return make_error(path, ": tensor '", r->name, "' is empty but the index records checksum ", hex64(r->xxh3),
                        ": the file is corrupt");
  }
  const std::vector<Job> jobs = make_jobs(order, bytes, chunk);
  GROKIT_CHECK(!jobs.empty() || bytes == 0);
  for (size_t j = 0; j < jobs.size(); ++j) GROKIT_CHECK(jobs[j].begin == (j == 0 ? 0 : jobs[j - 1].end));
  GROKIT_CHECK(jobs.empty() || jobs.back().end == bytes);
  readers = static_cast<unsigned>(std::min<uint64_t>(readers, std::max<size_t>(jobs.size(), 1)));
  if (source == LoadSource::kMapped)
    return load_mapped(ops, stream, fd, path, file_offset, bytes, dst, jobs, order, progress, stats, staging_bytes,
                       order.empty() ? 0 : readers);
  const size_t slots = static_cast<size_t>(std::min<uint64_t>(readers + 2, std::max<uint64_t>(chunks, 1)));
  Staging st{ops, stream, std::vector<void*>(slots, nullptr), std::vector<void*>(slots, nullptr)};
  for (size_t b = 0; b < slots; ++b) {
    if (ops->alloc_pinned(&st.buf[b], chunk) != GROKIT_OK)
      return make_error("cannot allocate ", human_bytes(static_cast<double>(chunk)), " of pinned staging memory: ",
                        ops->error_message());
    GROKIT_TRY(op_status(ops, ops->event_create(&st.ev[b]), "event_create"));
  }


  const auto t0 = std::chrono::steady_clock::now();
  // Declared after the staging: stopped (joined) before its buffers are freed.
  Readers rd(fd, path, file_offset, bytes, chunk, st.buf, jobs, order);
  rd.start(readers);
  // Copies are issued as chunks arrive (in any order: each has its own destination); the
  // stream runs them in order, so the oldest is the one to wait for when nothing is ready.
  std::deque<size_t> in_flight;
  uint64_t copied = 0;
  while (copied < bytes || !in_flight.empty()) {
    GROKIT_ASSIGN_OR_RETURN(std::optional<Staged> c, rd.next_staged(copied < bytes && in_flight.empty()));
    if (c) {
      const uint8_t* buf = static_cast<const uint8_t*>(st.buf[c->buffer]);
      GROKIT_TRY(op_status(ops, ops->copy(static_cast<uint8_t*>(dst) + c->at, buf, c->len, GROKIT_COPY_H2D, stream),
                           "copy"));
      GROKIT_TRY(op_status(ops, ops->event_record(st.ev[c->buffer], stream), "event_record"));
      in_flight.push_back(c->buffer);
      copied += c->len;
      if (progress != nullptr) progress->add(c->len);
      continue;
    }
    GROKIT_TRY(op_status(ops, ops->event_sync(st.ev[in_flight.front()]), "event_sync"));
    rd.release(in_flight.front());
    in_flight.pop_front();
  }
  GROKIT_TRY(op_status(ops, ops->stream_sync(stream), "stream_sync"));
  rd.stop();
  if (stats != nullptr) {
    stats->seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    stats->read_seconds = rd.read_seconds();
    stats->hash_seconds = rd.hash_seconds();
    stats->bytes = bytes;
    stats->readers = readers;
  }
  return {};
}

}  // namespace grokit::runner
