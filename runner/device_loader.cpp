#include "runner/device_loader.h"

#include <fcntl.h>
#include <unistd.h>
#include <xxhash.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstring>
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

// The reader threads' side: chunk i goes into buffer i % slots once the calling thread
// has seen the copy out of that buffer (chunk i - slots) finish.
class Readers {
 public:
  Readers(int fd, const std::string& path, uint64_t file_offset, uint64_t bytes, size_t chunk,
          const std::vector<void*>& bufs)
      : fd_(fd), path_(path), file_offset_(file_offset), bytes_(bytes), chunk_(chunk), bufs_(bufs),
        read_(bufs.size(), UINT64_MAX) {}
  ~Readers() { stop(); }

  void start(unsigned n) {
    for (unsigned t = 0; t < n; ++t) threads_.emplace_back([this] { run(); });
  }
  void stop() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stopping_ = true;
    }
    cv_.notify_all();
    for (auto& t : threads_) t.join();
    threads_.clear();
  }
  // Waits until chunk i is in its buffer; an error if a read failed.
  Status wait_read(uint64_t i) {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [&] { return read_[i % bufs_.size()] == i || error_.has_value(); });
    if (error_) return *error_;
    return {};
  }
  // The copy out of chunk i's buffer is done: the buffer may take chunk i + slots.
  void release(uint64_t i) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      released_ = i + 1;
    }
    cv_.notify_all();
  }
  double read_seconds() const { return read_ns_.load() * 1e-9; }

 private:
  void run() {
    const uint64_t slots = bufs_.size(), chunks = (bytes_ + chunk_ - 1) / chunk_;
    for (uint64_t i = next_.fetch_add(1); i < chunks; i = next_.fetch_add(1)) {
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [&] { return stopping_ || i < released_ + slots; });
        if (stopping_) return;
      }
      const uint64_t done = i * chunk_;
      const size_t len = static_cast<size_t>(std::min<uint64_t>(chunk_, bytes_ - done));
      auto* buf = static_cast<uint8_t*>(bufs_[i % slots]);
      const auto t0 = std::chrono::steady_clock::now();
      std::optional<Error> err;
      for (size_t got = 0; got < len;) {
        ssize_t r = ::pread(fd_, buf + got, len - got, static_cast<off_t>(file_offset_ + done + got));
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) {
          err = Error{str_cat(path_, ": read failed at byte ", file_offset_ + done + got, ": ", std::strerror(errno))};
          break;
        }
        if (r == 0) {
          err = Error{str_cat(path_, ": the file ends at byte ", file_offset_ + done + got, ", before byte ",
                              file_offset_ + bytes_, " that was to be loaded")};
          break;
        }
        got += static_cast<size_t>(r);
      }
      read_ns_.fetch_add(static_cast<uint64_t>(
          std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - t0).count()));
      {
        std::lock_guard<std::mutex> lock(mu_);
        if (err && !error_) error_ = std::move(err);
        if (!err) read_[i % slots] = i;
      }
      cv_.notify_all();
      if (err) return;
    }
  }

  const int fd_;
  const std::string& path_;
  const uint64_t file_offset_, bytes_;
  const size_t chunk_;
  const std::vector<void*>& bufs_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<uint64_t> read_;  // per buffer: the chunk it holds, once read
  uint64_t released_ = 0;       // chunks whose copies are done
  bool stopping_ = false;
  std::optional<Error> error_;
  std::atomic<uint64_t> next_{0}, read_ns_{0};
  std::vector<std::thread> threads_;
};

}  // namespace

Status load_file_to_device(const GrokitOps* ops, GrokitStream stream, const std::string& path, uint64_t file_offset,
                           uint64_t bytes, void* dst, const std::vector<HashedRange>& ranges, Progress* progress,
                           LoadStats* stats, size_t staging_bytes, unsigned readers) {
  GROKIT_CHECK(staging_bytes > 0);
  readers = std::max(1u, readers);
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return make_error("cannot open ", path, ": ", std::strerror(errno));
  struct Closer {
    int fd;
    ~Closer() { ::close(fd); }
  } closer{fd};
  (void)posix_fadvise(fd, static_cast<off_t>(file_offset), static_cast<off_t>(bytes), POSIX_FADV_SEQUENTIAL);

  const size_t chunk = static_cast<size_t>(std::min<uint64_t>(staging_bytes, std::max<uint64_t>(bytes, 1)));
  const uint64_t chunks = (bytes + chunk - 1) / chunk;
  readers = static_cast<unsigned>(std::min<uint64_t>(readers, std::max<uint64_t>(chunks, 1)));
  const size_t slots = static_cast<size_t>(std::min<uint64_t>(readers + 2, std::max<uint64_t>(chunks, 1)));
  Staging st{ops, stream, std::vector<void*>(slots, nullptr), std::vector<void*>(slots, nullptr)};
  for (size_t b = 0; b < slots; ++b) {
    if (ops->alloc_pinned(&st.buf[b], chunk) != GROKIT_OK)
      return make_error("cannot allocate ", human_bytes(static_cast<double>(chunk)), " of pinned staging memory: ",
                        ops->error_message());
    GROKIT_TRY(op_status(ops, ops->event_create(&st.ev[b]), "event_create"));
  }

  std::vector<const HashedRange*> order;
  for (const auto& r : ranges) order.push_back(&r);
  std::sort(order.begin(), order.end(), [](auto* a, auto* b) { return a->offset < b->offset; });
  size_t next = 0;
  XXH3_state_t* state = XXH3_createState();
  GROKIT_CHECK(state != nullptr);
  struct StateGuard {
    XXH3_state_t* s;
    ~StateGuard() { XXH3_freeState(s); }
  } state_guard{state};
  bool hashing = false;

  const auto t0 = std::chrono::steady_clock::now();
  // Declared after the staging: stopped (joined) before its buffers are freed.
  Readers rd(fd, path, file_offset, bytes, chunk, st.buf);
  rd.start(readers);
  for (uint64_t i = 0; i < chunks; ++i) {
    const size_t b = i % slots;
    const uint64_t done = i * chunk;
    const size_t len = static_cast<size_t>(std::min<uint64_t>(chunk, bytes - done));
    GROKIT_TRY(rd.wait_read(i));
    const uint8_t* buf = static_cast<const uint8_t*>(st.buf[b]);
    GROKIT_TRY(op_status(ops, ops->copy(static_cast<uint8_t*>(dst) + done, buf, len, GROKIT_COPY_H2D, stream), "copy"));
    GROKIT_TRY(op_status(ops, ops->event_record(st.ev[b], stream), "event_record"));
    // Hash [done, done + len) into the ranges it overlaps while the device copies it.
    const uint64_t lo = done, hi = done + len;
    while (next < order.size()) {
      const HashedRange& e = *order[next];
      const uint64_t e_end = e.offset + e.size;
      if (e.offset >= hi) break;
      if (!hashing) {
        XXH3_64bits_reset(state);
        hashing = true;
      }
      const uint64_t a = std::max(lo, e.offset), z = std::min(hi, e_end);
      if (z > a) XXH3_64bits_update(state, buf + (a - lo), static_cast<size_t>(z - a));
      if (e_end > hi) break;
      const uint64_t got = XXH3_64bits_digest(state);
      hashing = false;
      ++next;
      if (got != e.xxh3)
        return make_error(path, ": tensor '", e.name, "' (bytes ", file_offset + e.offset, "..", file_offset + e_end,
                          " of the file) has checksum ", hex64(got), ", the index records ", hex64(e.xxh3),
                          ": the file is corrupt");
    }
    // The buffer goes back to the readers once its copy is done (by now, usually).
    GROKIT_TRY(op_status(ops, ops->event_sync(st.ev[b]), "event_sync"));
    rd.release(i);
    if (progress != nullptr) progress->add(len);
  }
  GROKIT_TRY(op_status(ops, ops->stream_sync(stream), "stream_sync"));
  rd.stop();
  if (next < order.size())
    return make_error(path, ": tensor '", order[next]->name, "' lies outside the ", bytes, " bytes loaded");
  if (stats != nullptr) {
    stats->seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    stats->read_seconds = rd.read_seconds();
    stats->bytes = bytes;
    stats->readers = readers;
  }
  return {};
}

}  // namespace grokit::runner
