// grokit common: error values, checked arithmetic, files, checksums, bf16, progress.
//
// Errors come in two tiers. Bad input (a file, a flag, a config) is reported with an
// Error value carried by Result<T>; its message names what and where (file, tensor,
// byte offset). A broken invariant of our own code aborts with file:line through
// GROKIT_CHECK. No exception crosses a library boundary.
#pragma once

#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <cstdlib>
#include <functional>
#include <memory>
#include <new>
#include <type_traits>
#include <optional>
#include <sstream>
#include <string>
#include <string_view>
#include <utility>
#include <variant>
#include <vector>

namespace grokit {

// ---------------------------------------------------------------------------------
// Invariants: abort with location and statement.
[[noreturn]] void check_failed(const char* file, int line, const char* expr, const std::string& msg);

#define GROKIT_CHECK(cond)                                                    \
  do {                                                                        \
    if (!(cond)) ::grokit::check_failed(__FILE__, __LINE__, #cond, {});       \
  } while (0)
#define GROKIT_CHECK_MSG(cond, msg)                                           \
  do {                                                                        \
    if (!(cond)) ::grokit::check_failed(__FILE__, __LINE__, #cond, (msg));    \
  } while (0)

// ---------------------------------------------------------------------------------
// Error values.
template <class... Args>
std::string str_cat(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}

struct Error {
  std::string message;
};

template <class... Args>
Error make_error(const Args&... args) {
  return Error{str_cat(args...)};
}

template <class T>
class [[nodiscard]] Result {
 public:
  Result(T value) : v_(std::move(value)) {}          // NOLINT: implicit by design
  Result(Error error) : v_(std::move(error)) {}      // NOLINT
  bool ok() const { return v_.index() == 0; }
  explicit operator bool() const { return ok(); }
  T& value() & { GROKIT_CHECK_MSG(ok(), error().message); return std::get<0>(v_); }
  T&& value() && { GROKIT_CHECK_MSG(ok(), error().message); return std::get<0>(std::move(v_)); }
  const T& value() const& { GROKIT_CHECK_MSG(ok(), error().message); return std::get<0>(v_); }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }
  T& operator*() & { return value(); }
  const T& operator*() const& { return value(); }
  T&& operator*() && { return std::move(*this).value(); }
  const Error& error() const { return std::get<1>(v_); }
  Error take_error() { return std::get<1>(std::move(v_)); }

 private:
  std::variant<T, Error> v_;
};

template <>
class [[nodiscard]] Result<void> {
 public:
  Result() = default;
  Result(Error error) : err_(std::move(error)) {}  // NOLINT
  bool ok() const { return !err_.has_value(); }
  explicit operator bool() const { return ok(); }
  const Error& error() const { return *err_; }
  Error take_error() { return std::move(*err_); }

 private:
  std::optional<Error> err_;
};
using Status = Result<void>;

inline Status ok_status() { return {}; }

// Prepends context ("while reading X: ") to an error.
inline Error with_context(Error e, std::string_view context) {
  e.message = std::string(context) + ": " + e.message;
  return e;
}

#define GROKIT_CONCAT_INNER(a, b) a##b
#define GROKIT_CONCAT(a, b) GROKIT_CONCAT_INNER(a, b)
#define GROKIT_TRY(expr)                                                   \
  do {                                                                     \
    auto&& grokit_try_status_ = (expr);                                    \
    if (!grokit_try_status_.ok()) return grokit_try_status_.take_error();  \
  } while (0)
#define GROKIT_ASSIGN_OR_RETURN_IMPL(tmp, lhs, expr) \
  auto tmp = (expr);                                 \
  if (!tmp.ok()) return tmp.take_error();            \
  lhs = std::move(tmp).value()
#define GROKIT_ASSIGN_OR_RETURN(lhs, expr) \
  GROKIT_ASSIGN_OR_RETURN_IMPL(GROKIT_CONCAT(grokit_result_, __LINE__), lhs, expr)

// ---------------------------------------------------------------------------------
// Checked arithmetic for sizes read from hostile files. Return false on overflow.
inline bool checked_add(uint64_t a, uint64_t b, uint64_t* out) { return !__builtin_add_overflow(a, b, out); }
inline bool checked_mul(uint64_t a, uint64_t b, uint64_t* out) { return !__builtin_mul_overflow(a, b, out); }
inline uint64_t align_up(uint64_t v, uint64_t a) { return (v + a - 1) / a * a; }

// Little-endian loads and stores (the formats we read and write are little-endian).
template <class T>
T load_le(const void* p) {
  static_assert(std::is_trivially_copyable_v<T>);
  T v;
  std::memcpy(&v, p, sizeof(T));
  return v;  // hosts are little-endian; CMake refuses big-endian targets
}
template <class T>
void store_le(void* p, T v) {
  std::memcpy(p, &v, sizeof(T));
}

// ---------------------------------------------------------------------------------
// bfloat16: round-to-nearest-even from fp32, as numpy/ml_dtypes and XLA convert.
inline uint16_t f32_to_bf16_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}
inline float bf16_bits_to_f32(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline float round_bf16(float f) { return bf16_bits_to_f32(f32_to_bf16_bits(f)); }

// ---------------------------------------------------------------------------------
// Checksums: XXH3-64 of stored bytes, printed as 16 lowercase hex digits.
uint64_t xxh3_64(const void* data, size_t size);
class Xxh3Stream {
 public:
  Xxh3Stream();
  ~Xxh3Stream();
  Xxh3Stream(const Xxh3Stream&) = delete;
  Xxh3Stream& operator=(const Xxh3Stream&) = delete;
  Xxh3Stream(Xxh3Stream&& o) noexcept : state_(std::exchange(o.state_, nullptr)) {}
  Xxh3Stream& operator=(Xxh3Stream&&) = delete;
  void update(const void* data, size_t size);
  uint64_t digest() const;

 private:
  void* state_;
};
std::string hex64(uint64_t v);
std::optional<uint64_t> parse_hex64(std::string_view s);

// ---------------------------------------------------------------------------------
// Files. Every function names the path in its error.

// A read-only memory map of a whole file. Pages are file-backed (they count as
// RssFile, not RssAnon) and shared with the page cache.
class MappedFile {
 public:
  MappedFile() = default;
  ~MappedFile();
  MappedFile(MappedFile&& o) noexcept;
  MappedFile& operator=(MappedFile&& o) noexcept;
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;

  static Result<MappedFile> open(const std::string& path);
  const uint8_t* data() const { return data_; }
  uint64_t size() const { return size_; }
  const std::string& path() const { return path_; }
  // Hints for streaming reads; both are advisory and never fail.
  void advise_sequential() const;
  void advise_willneed(uint64_t offset, uint64_t length) const;
  void advise_dontneed(uint64_t offset, uint64_t length) const;

 private:
  std::string path_;
  const uint8_t* data_ = nullptr;
  uint64_t size_ = 0;
};

// A heap buffer of `size` bytes whose address is a multiple of `alignment` (a power of
// two), for direct I/O staging.
class AlignedBuffer {
 public:
  AlignedBuffer() = default;
  AlignedBuffer(size_t size, size_t alignment);
  uint8_t* data() const { return p_.get(); }
  size_t size() const { return size_; }

 private:
  struct Free {
    void operator()(uint8_t* p) const { std::free(p); }
  };
  std::unique_ptr<uint8_t, Free> p_;
  size_t size_ = 0;
};

// An allocator whose blocks start at multiples of A (a power of two), for containers that
// direct I/O writes from. Elements are default-initialized: a vector's resize() leaves new
// bytes as they were (no zero fill, which cost 2 % of an int4 quantize), so its users
// write every byte they hand on.
template <class T, size_t A>
struct AlignedAllocator {
  using value_type = T;
  template <class U>
  struct rebind {
    using other = AlignedAllocator<U, A>;
  };
  AlignedAllocator() = default;
  template <class U>
  AlignedAllocator(const AlignedAllocator<U, A>&) noexcept {}
  T* allocate(size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(A))); }
  void deallocate(T* p, size_t) noexcept { ::operator delete(p, std::align_val_t(A)); }
  template <class U>
  void construct(U* p) noexcept(std::is_nothrow_default_constructible_v<U>) {
    ::new (static_cast<void*>(p)) U;
  }
  template <class U, class... Args>
  void construct(U* p, Args&&... args) {
    ::new (static_cast<void*>(p)) U(std::forward<Args>(args)...);
  }
  friend bool operator==(const AlignedAllocator&, const AlignedAllocator&) { return true; }
};

// An owned file descriptor for writing, with positional writes that retry short
// writes and report ENOSPC/EFBIG with the path and offset.
//
// Direct I/O. Outputs of hundreds of GB gain nothing from the page cache: copying them
// into it costs a core, and they evict what the reader needs. enable_direct_io() opens a
// second descriptor with O_DIRECT (false where the file system refuses it);
// pwrite_direct() writes through it when offset, size and address are multiples of
// kDirectIoAlign, through the page cache otherwise, and for good after the kernel
// refuses a direct write (EINVAL: a device with larger blocks), so callers need no
// fallback of their own.
class OutputFile {
 public:
  static constexpr size_t kDirectIoAlign = 4096;
  OutputFile() = default;
  ~OutputFile();
  OutputFile(OutputFile&& o) noexcept;
  OutputFile& operator=(OutputFile&& o) noexcept;
  OutputFile(const OutputFile&) = delete;
  OutputFile& operator=(const OutputFile&) = delete;

  enum class Mode { kCreateExclusive, kCreateOrTruncate, kOpenExisting };
  static Result<OutputFile> open(const std::string& path, Mode mode);
  Status pwrite_all(uint64_t offset, const void* data, size_t size) const;
  bool enable_direct_io();
  bool direct_io() const { return direct_fd_ >= 0 && direct_ok_.load(std::memory_order_relaxed); }
  Status pwrite_direct(uint64_t offset, const void* data, size_t size) const;
  Status pread_all(uint64_t offset, void* data, size_t size) const;
  Status sync() const;            // fsync
  Status truncate(uint64_t size) const;
  // Allocates the file's first `size` bytes now, so that a full disk or a file size limit
  // fails here, before any data is written (where the file system cannot allocate ahead,
  // only the size is set).
  Status reserve(uint64_t size) const;
  Result<uint64_t> size() const;
  Status close();
  int fd() const { return fd_; }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
  int fd_ = -1;
  int direct_fd_ = -1;                        // O_DIRECT, or -1
  mutable std::atomic<bool> direct_ok_{false};  // cleared by a refused direct write
};

bool path_exists(const std::string& path);
bool is_directory(const std::string& path);
// Both paths exist and name the same file or directory (same device and inode, through
// symbolic and hard links): how a command tells that an output would overwrite an input.
bool same_file(const std::string& a, const std::string& b);
Result<uint64_t> file_size(const std::string& path);
Status make_directory(const std::string& path);      // one level; ok if it exists as a directory
Status fsync_directory(const std::string& path);
Status rename_file(const std::string& from, const std::string& to);
Status remove_file(const std::string& path);         // ok if absent
// The names in a directory, "." and ".." left out (empty where it cannot be read).
std::vector<std::string> list_directory(const std::string& dir);
// Removes a directory of plain files: its files, then itself; ok if absent.
Status remove_directory_files(const std::string& dir);
Result<std::string> read_small_file(const std::string& path, uint64_t max_bytes);
// What the kernel calls available memory (MemAvailable of /proc/meminfo: free pages and
// the cache it can drop), in bytes; 0 where it cannot be read.
uint64_t meminfo_available_bytes();
// Writes path.tmp, fsyncs it, renames it over path, fsyncs the directory.
Status write_file_atomic(const std::string& path, std::string_view contents);
Result<uint64_t> free_disk_bytes(const std::string& dir);
std::string path_join(const std::string& a, const std::string& b);
std::string path_dirname(const std::string& p);
std::string path_basename(const std::string& p);

// ---------------------------------------------------------------------------------
// Threads.
// Runs fn(i) for i in [0, n) on up to `threads` threads (the caller's included),
// handing out indices in order. fn must not throw.
void parallel_for(size_t n, unsigned threads, const std::function<void(size_t)>& fn);
unsigned hardware_threads();

// A persistent pool for the many short parallel loops of a forward pass (creating
// threads per loop would cost more than a small matrix product). run() hands indices
// [0, n) out to the workers and the calling thread, and returns when all are done.
// One run() at a time per pool; fn must not throw.
class ThreadPool {
 public:
  explicit ThreadPool(unsigned threads);  // threads in all, the caller included
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;
  unsigned size() const { return threads_; }
  void run(size_t n, const std::function<void(size_t)>& fn);

 private:
  struct State;
  unsigned threads_;
  State* state_;
};

// Items [0, n) produced on the pool's threads and consumed in order, without barriers:
// produce(i, slot) fills slot i % slots once item i - slots has been consumed;
// consume(i, slot) runs in order of i, one call at a time, on whichever thread finishes
// the next item in order, while the others go on producing. So a pipeline's output order
// (and anything summed in it) does not depend on the thread count, and memory is `slots`
// items. Stops at the first failed consume and returns its error; items produced after
// it are dropped. slots >= 1.
Status run_in_order(ThreadPool& pool, size_t n, size_t slots, const std::function<void(size_t i, size_t slot)>& produce,
                    const std::function<Status(size_t i, size_t slot)>& consume);

// ---------------------------------------------------------------------------------
// Progress on stderr: a bar when stderr is a terminal, a line every few seconds
// otherwise (logs stay readable). Thread-safe add().
class Progress {
 public:
  Progress(std::string label, uint64_t total_bytes, bool enabled = true);
  ~Progress();
  void add(uint64_t bytes);
  void finish();
  double elapsed_seconds() const;

 private:
  void draw(bool final);
  std::string label_;
  uint64_t total_;
  std::atomic<uint64_t> done_{0};
  std::atomic<int64_t> last_draw_ns_{0};
  bool enabled_;
  bool tty_;
  bool finished_ = false;
  std::chrono::steady_clock::time_point start_;
};

std::string human_bytes(double bytes);
// Anonymous resident memory of this process (RssAnon from /proc/self/status), bytes.
uint64_t rss_anon_bytes();
uint64_t peak_rss_bytes();  // VmHWM

}  // namespace grokit
