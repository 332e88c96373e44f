#include "runner/device_loader.h"

#include <fcntl.h>
#include <unistd.h>
#include <xxhash.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>

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
  void* buf[2] = {nullptr, nullptr};
  void* ev[2] = {nullptr, nullptr};
  ~Staging() {
    if (buf[0] != nullptr || buf[1] != nullptr) (void)ops->stream_sync(stream);
    for (int b = 0; b < 2; ++b) {
      if (ev[b] != nullptr) ops->event_destroy(ev[b]);
      if (buf[b] != nullptr) ops->free_pinned(buf[b]);
    }
  }
};

}  // namespace

Status load_file_to_device(const GrokitOps* ops, GrokitStream stream, const std::string& path, uint64_t file_offset,
                           uint64_t bytes, void* dst, const std::vector<HashedRange>& ranges, Progress* progress,
                           LoadStats* stats, size_t staging_bytes) {
  GROKIT_CHECK(staging_bytes > 0);
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return make_error("cannot open ", path, ": ", std::strerror(errno));
  struct Closer {
    int fd;
    ~Closer() { ::close(fd); }
  } closer{fd};
  (void)posix_fadvise(fd, static_cast<off_t>(file_offset), static_cast<off_t>(bytes), POSIX_FADV_SEQUENTIAL);

  const size_t chunk = static_cast<size_t>(std::min<uint64_t>(staging_bytes, std::max<uint64_t>(bytes, 1)));
  Staging st{ops, stream};
  for (int b = 0; b < 2; ++b) {
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
  double read_s = 0;
  uint64_t done = 0;
  for (int i = 0; done < bytes; ++i) {
    const int b = i % 2;
    // The copy out of this buffer (two chunks ago) must be done before it is refilled.
    if (i >= 2) GROKIT_TRY(op_status(ops, ops->event_sync(st.ev[b]), "event_sync"));
    const size_t len = static_cast<size_t>(std::min<uint64_t>(chunk, bytes - done));
    uint8_t* buf = static_cast<uint8_t*>(st.buf[b]);
    const auto r0 = std::chrono::steady_clock::now();
    for (size_t got = 0; got < len;) {
      ssize_t r = ::pread(fd, buf + got, len - got, static_cast<off_t>(file_offset + done + got));
      if (r < 0 && errno == EINTR) continue;
      if (r < 0) return make_error(path, ": read failed at byte ", file_offset + done + got, ": ", std::strerror(errno));
      if (r == 0) return make_error(path, ": the file ends at byte ", file_offset + done + got, ", before byte ",
                                    file_offset + bytes, " that was to be loaded");
      got += static_cast<size_t>(r);
    }
    read_s += std::chrono::duration<double>(std::chrono::steady_clock::now() - r0).count();
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
    done += len;
    if (progress != nullptr) progress->add(len);
  }
  GROKIT_TRY(op_status(ops, ops->stream_sync(stream), "stream_sync"));
  if (next < order.size())
    return make_error(path, ": tensor '", order[next]->name, "' lies outside the ", bytes, " bytes loaded");
  if (stats != nullptr) {
    stats->seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    stats->read_seconds = read_s;
    stats->bytes = bytes;
  }
  return {};
}

}  // namespace grokit::runner
