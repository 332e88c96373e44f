// The "host" device ops (kernels/ops.h): every op on the CPU through the CPU kernels.
// Streams are grokit::ThreadPool* (NULL: the calling thread), "device memory" is host
// memory, and every op has finished when it returns. Arguments are checked here, before
// the kernels (which abort on broken invariants) see them.
#include <unistd.h>

#include <algorithm>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <vector>

#include "kernels/kernels.h"
#include "kernels/ops.h"

namespace grokit::kernels {
namespace {

thread_local char g_error[1024] = "no error";

int fail(int code, const std::string& msg) {
  std::snprintf(g_error, sizeof g_error, "%s", msg.c_str());
  return code;
}
template <class... Args>
int invalid(const char* op, const Args&... args) {
  return fail(GROKIT_ERR_INVALID, str_cat("host ", op, ": ", args...));
}

ThreadPool* pool_of(GrokitStream s) { return static_cast<ThreadPool*>(s); }

int status_code(const char* op, const Status& s) {
  return s.ok() ? GROKIT_OK : fail(GROKIT_ERR_DEVICE, str_cat("host ", op, ": ", s.error().message));
}

// Runs fn(a, b) over [0, n) in chunks on the pool (elementwise ops).
template <class Fn>
void chunked(ThreadPool* pool, int64_t n, Fn&& fn) {
  constexpr int64_t kChunk = 1 << 15;
  if (pool == nullptr || n <= kChunk) return fn(int64_t{0}, n);
  const int64_t tasks = (n + kChunk - 1) / kChunk;
  pool->run(static_cast<size_t>(tasks), [&](size_t t) {
    int64_t a = static_cast<int64_t>(t) * kChunk;
    fn(a, std::min(n, a + kChunk));
  });
}

// ---- devices, memory, streams, events -------------------------------------------

const char* error_message() { return g_error; }

int device_count(int* count) {
  if (count == nullptr) return invalid("device_count", "count is NULL");
  *count = 1;
  return GROKIT_OK;
}

int set_device(int device) {
  if (device != 0) return invalid("set_device", "device ", device, " does not exist (the host has device 0 only)");
  return GROKIT_OK;
}

int device_name(int device, char* name, size_t len, uint64_t* memory_bytes) {
  if (device != 0) return invalid("device_name", "device ", device, " does not exist (the host has device 0 only)");
  if (name != nullptr && len > 0) std::snprintf(name, len, "host CPU (%s kernels)", cpu_kernel_path());
  if (memory_bytes != nullptr) {
    long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
    *memory_bytes = pages > 0 && page > 0 ? static_cast<uint64_t>(pages) * static_cast<uint64_t>(page) : 0;
  }
  return GROKIT_OK;
}

// The host's "device memory" is its memory: in all, the physical pages; free, what the
// kernel calls available (MemAvailable: free pages and the cache it can drop).
int memory_info(int device, uint64_t* free_bytes, uint64_t* total_bytes) {
  if (device != 0) return invalid("memory_info", "device ", device, " does not exist (the host has device 0 only)");
  if (free_bytes == nullptr || total_bytes == nullptr) return invalid("memory_info", "a result pointer is NULL");
  const long pages = sysconf(_SC_PHYS_PAGES), avail = sysconf(_SC_AVPHYS_PAGES), page = sysconf(_SC_PAGESIZE);
  *total_bytes = pages > 0 && page > 0 ? static_cast<uint64_t>(pages) * static_cast<uint64_t>(page) : 0;
  *free_bytes = avail > 0 && page > 0 ? static_cast<uint64_t>(avail) * static_cast<uint64_t>(page) : 0;
  if (const uint64_t available = grokit::meminfo_available_bytes(); available > 0)
    *free_bytes = std::min(available, *total_bytes);
  return GROKIT_OK;
}

int alloc_impl(const char* op, void** ptr, size_t bytes) {
  if (ptr == nullptr) return invalid(op, "ptr is NULL");
  *ptr = nullptr;
  if (bytes > SIZE_MAX - 256) return fail(GROKIT_ERR_MEMORY, str_cat("host ", op, ": ", bytes, " bytes is too many"));
  void* p = std::aligned_alloc(256, align_up(std::max<size_t>(bytes, 1), 256));
  if (p == nullptr) return fail(GROKIT_ERR_MEMORY, str_cat("host ", op, ": out of memory for ", bytes, " bytes"));
  *ptr = p;
  return GROKIT_OK;
}
int alloc(void** ptr, size_t bytes) { return alloc_impl("alloc", ptr, bytes); }
int alloc_pinned(void** ptr, size_t bytes) { return alloc_impl("alloc_pinned", ptr, bytes); }
int free_memory(void* ptr) {
  std::free(ptr);
  return GROKIT_OK;
}

// Host memory is the host backend's device memory, so registering changes nothing; the
// ranges are still kept and checked as CUDA checks them (page alignment, no overlap, no
// unregistering what is not registered), so that the callers' bookkeeping is tested here.
struct Registrations {
  std::mutex mu;
  std::map<uintptr_t, size_t> ranges;  // start -> bytes
};
Registrations& registrations() {
  static Registrations r;
  return r;
}
int host_register(void* ptr, size_t bytes) {
  const auto page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  const auto at = reinterpret_cast<uintptr_t>(ptr);
  if (ptr == nullptr || bytes == 0) return invalid("host_register", "ptr is NULL or bytes is 0");
  if (at % page != 0 || bytes % page != 0)
    return invalid("host_register", "ptr ", ptr, " or bytes ", bytes, " is not a multiple of the page size ", page);
  if (bytes > UINTPTR_MAX - at) return invalid("host_register", bytes, " bytes at ", ptr, " wrap around");
  Registrations& r = registrations();
  std::lock_guard<std::mutex> lock(r.mu);
  auto next = r.ranges.lower_bound(at);
  const bool overlaps = (next != r.ranges.end() && next->first < at + bytes) ||
                        (next != r.ranges.begin() && std::prev(next)->first + std::prev(next)->second > at);
  if (overlaps) return invalid("host_register", bytes, " bytes at ", ptr, " overlap a registered range");
  r.ranges.emplace(at, bytes);
  return GROKIT_OK;
}
int host_unregister(void* ptr) {
  Registrations& r = registrations();
  std::lock_guard<std::mutex> lock(r.mu);
  if (r.ranges.erase(reinterpret_cast<uintptr_t>(ptr)) == 0)
    return invalid("host_unregister", ptr, " is not the start of a registered range");
  return GROKIT_OK;
}

int copy(void* dst, const void* src, size_t bytes, int kind, GrokitStream) {
  if (kind != GROKIT_COPY_H2D && kind != GROKIT_COPY_D2H && kind != GROKIT_COPY_D2D)
    return invalid("copy", "kind ", kind, " is not H2D (1), D2H (2) or D2D (3)");
  if (bytes == 0) return GROKIT_OK;
  if (dst == nullptr || src == nullptr)
    return invalid("copy", dst == nullptr ? "dst" : "src", " is NULL for ", bytes, " bytes");
  std::memmove(dst, src, bytes);
  return GROKIT_OK;
}

int fill(void* dst, int byte, size_t bytes, GrokitStream) {
  if (bytes == 0) return GROKIT_OK;
  if (dst == nullptr) return invalid("fill", "dst is NULL for ", bytes, " bytes");
  std::memset(dst, byte, bytes);
  return GROKIT_OK;
}

int stream_create(GrokitStream* stream) {
  if (stream == nullptr) return invalid("stream_create", "stream is NULL");
  *stream = nullptr;
  return GROKIT_OK;
}
int stream_noop(GrokitStream) { return GROKIT_OK; }

struct Event {
  uint64_t recorded = 0;
};
int event_create(void** event) {
  if (event == nullptr) return invalid("event_create", "event is NULL");
  *event = new Event;
  return GROKIT_OK;
}
int event_destroy(void* event) {
  delete static_cast<Event*>(event);
  return GROKIT_OK;
}
int event_record(void* event, GrokitStream) {
  if (event == nullptr) return invalid("event_record", "event is NULL");
  ++static_cast<Event*>(event)->recorded;
  return GROKIT_OK;
}
int event_sync(void* event) {
  if (event == nullptr) return invalid("event_sync", "event is NULL");
  return GROKIT_OK;
}
int stream_wait_event(GrokitStream, void* event) {
  if (event == nullptr) return invalid("stream_wait_event", "event is NULL");
  return GROKIT_OK;
}

// ---- weights --------------------------------------------------------------------

constexpr int32_t kBF16 = 1, kQ8 = 16, kQ4 = 17, kF8 = 18;

const char* dtype_label(int32_t d) {
  switch (d) {
    case kBF16: return "bf16";
    case kQ8: return "q8rb";
    case kQ4: return "q4g";
    case kF8: return "f8col";
    default: return "?";
  }
}

// Chains as the CPU engine runs them at TP 1 (format::ModelConfig::split_sum_rows and
// chunked_sum_rows of the matrix's own K).
int64_t split_sum_rows(int64_t K) {
  int64_t nb = 16;
  while (nb > 1 && K % (2 * nb) != 0) nb /= 2;
  return K / nb;
}
int64_t chunked_sum_rows(int64_t K, int64_t G) {
  const int64_t unit = std::max<int64_t>(32, G);
  int64_t nb = 16;
  while (nb > 1 && K % (nb * unit) != 0) nb /= 2;
  return K / nb;
}

// Bytes of one matrix as ops.h says matrix_bytes (q8rb: its codes only).
uint64_t expected_matrix_bytes(const GrokitWeight& w) {
  const auto K = static_cast<uint64_t>(w.rows), N = static_cast<uint64_t>(w.cols);
  switch (w.dtype) {
    case kQ8: return K * N;
    case kQ4:
      return K / static_cast<uint64_t>(w.param) *
             (16 * (static_cast<uint64_t>(w.param) / 32) * N + align_up(2 * N, 16));
    case kF8: return 32 * (K / 32) * N + align_up(2 * N, 16);
    default: return 2 * K * N;
  }
}

int check_weight(const char* op, const GrokitWeight* w) {
  if (w == nullptr) return invalid(op, "w is NULL");
  if (w->dtype != kQ8 && w->dtype != kQ4 && w->dtype != kF8 && w->dtype != kBF16)
    return invalid(op, "weight dtype ", w->dtype, " is not a weight scheme (16 q8rb, 17 q4g, 18 f8col, 1 bf16)");
  const char* d = dtype_label(w->dtype);
  if (w->layout != 0) return invalid(op, d, " weight has layout ", w->layout, "; the host reads layout 0 (as stored)");
  if (w->experts < 1) return invalid(op, d, " weight has ", w->experts, " experts");
  const int64_t lim = int64_t{1} << 31;
  if (w->rows < 1 || w->cols < 1 || w->rows > lim || w->cols > lim || w->experts > lim)
    return invalid(op, d, " weight of ", w->experts, " x ", w->rows, " x ", w->cols, " is not a valid shape");
  switch (w->dtype) {
    case kQ8:
      if (w->param < 1 || w->rows % w->param != 0)
        return invalid(op, "q8rb weight: ", w->rows, " rows do not split into ", w->param, " scale blocks");
      break;
    case kQ4:
      if (w->param != 32 && w->param != 64 && w->param != 128)
        return invalid(op, "q4g weight: group ", w->param, " is not 32, 64 or 128");
      if (w->rows % w->param != 0)
        return invalid(op, "q4g weight: ", w->rows, " rows are not a multiple of the group ", w->param);
      break;
    case kF8:
      if (w->rows % 32 != 0) return invalid(op, "f8col weight: ", w->rows, " rows are not a multiple of 32");
      break;
    default: break;
  }
  if (w->matrix_bytes != expected_matrix_bytes(*w))
    return invalid(op, d, " weight ", w->rows, " x ", w->cols, ": matrix_bytes ", w->matrix_bytes, " (expected ",
                   expected_matrix_bytes(*w), ")");
  if (w->data == nullptr) return invalid(op, d, " weight data is NULL");
  return GROKIT_OK;
}

uint64_t prepare_scratch_bytes(const GrokitWeight*) { return 0; }

int prepare_weight(GrokitWeight* w, void*, GrokitStream) { return check_weight("prepare_weight", w); }

// y [M, N] (stride ldy) = x [M, K] (stride ldx) @ expert e of w, the engine's way.
Status matmul_one(const GrokitWeight& w, int64_t e, const float* x, int64_t M, int64_t ldx, bool fp32, float* y,
                  int64_t ldy, ThreadPool* pool) {
  const int64_t K = w.rows, N = w.cols;
  const auto* base = static_cast<const uint8_t*>(w.data);
  switch (w.dtype) {
    case kQ8: {
      const auto* codes = reinterpret_cast<const int8_t*>(base) + e * K * N;
      const uint64_t scales_at = align_up(static_cast<uint64_t>(w.experts * K * N), 64);
      const auto* scales = reinterpret_cast<const uint16_t*>(base + scales_at) + e * w.param * N;
      const int64_t sr = split_sum_rows(K);
      return fp32 ? matmul_q8_f32(x, M, K, ldx, codes, scales, N, w.param, y, ldy, pool, sr)
                  : matmul_q8(x, M, K, ldx, codes, scales, N, w.param, y, ldy, pool, sr);
    }
    case kBF16: {
      const auto* wb = reinterpret_cast<const uint16_t*>(base + static_cast<uint64_t>(e) * w.matrix_bytes);
      const int64_t sr = split_sum_rows(K);
      return fp32 ? matmul_bf16_f32(x, M, K, ldx, wb, N, y, ldy, pool, sr)
                  : matmul_bf16(x, M, K, ldx, wb, N, y, ldy, pool, sr);
    }
    case kQ4: {
      const uint8_t* p = base + static_cast<uint64_t>(e) * w.matrix_bytes;
      const int64_t sr = chunked_sum_rows(K, w.param);
      return fp32 ? matmul_q4_f32(x, M, K, ldx, p, w.param, N, y, ldy, pool, sr)
                  : matmul_q4(x, M, K, ldx, p, w.param, N, y, ldy, pool, sr);
    }
    default: {
      const uint8_t* p = base + static_cast<uint64_t>(e) * w.matrix_bytes;
      const int64_t sr = chunked_sum_rows(K, 32);
      return fp32 ? matmul_f8_f32(x, M, K, ldx, p, N, y, ldy, pool, sr)
                  : matmul_f8(x, M, K, ldx, p, N, y, ldy, pool, sr);
    }
  }
}

Status matmul_sums(const GrokitWeight* w, const float* x, int64_t M, int64_t ldx, bool fp32, const GrokitRouting* routing,
                   float* y, int64_t ldy, ThreadPool* pool);

int matmul(const GrokitWeight* w, const float* x, int64_t M, int64_t ldx, int32_t flags, const GrokitRouting* routing,
           float* y, int64_t ldy, GrokitStream stream) {
  if (int rc = check_weight("matmul", w); rc != GROKIT_OK) return rc;
  if ((flags & ~(GROKIT_MATMUL_X_FP32 | GROKIT_MATMUL_ROUND_BF16 | GROKIT_MATMUL_GELU_MUL)) != 0)
    return invalid("matmul", "flags = ", flags);
  const int64_t K = w->rows, N = w->cols;
  if (M < 0) return invalid("matmul", "M = ", M);
  if (ldx < K) return invalid("matmul", "ldx ", ldx, " < K ", K);
  if (ldy < N) return invalid("matmul", "ldy ", ldy, " < N ", N);
  if (routing == nullptr && w->experts != 1)
    return invalid("matmul", "a stack of ", w->experts, " experts needs routing");
  if (routing != nullptr && routing->x_row_div < 1)
    return invalid("matmul", "routing x_row_div ", routing->x_row_div, " < 1");
  if (M == 0) return GROKIT_OK;
  if (x == nullptr || y == nullptr) return invalid("matmul", x == nullptr ? "x" : "y", " is NULL");
  if (routing != nullptr && routing->expert == nullptr) return invalid("matmul", "routing expert is NULL");
  for (int64_t m = 0; routing != nullptr && m < M; ++m) {
    const int32_t e = routing->expert[m];
    if (e >= w->experts) return invalid("matmul", "row ", m, " routes to expert ", e, " of ", w->experts);
  }
  ThreadPool* pool = pool_of(stream);
  const bool fp32 = (flags & GROKIT_MATMUL_X_FP32) != 0;
  if ((flags & GROKIT_MATMUL_GELU_MUL) != 0) {
    // The sums apart, rounded, then gelu_mul(y, them) row by row into y.
    std::vector<float> u(static_cast<size_t>(M * N));
    if (Status s = matmul_sums(w, x, M, ldx, fp32, routing, u.data(), N, pool); !s.ok()) return status_code("matmul", s);
    round_to_bf16(u.data(), M * N, u.data());
    for (int64_t m = 0; m < M; ++m) {
      float* yr = y + m * ldy;
      if (routing != nullptr && routing->expert[m] < 0) std::fill(yr, yr + N, 0.0f);
      else if (Status s = kernels::gelu_mul(yr, u.data() + m * N, N, yr, pool); !s.ok()) return status_code("matmul", s);
    }
    return GROKIT_OK;
  }
  if (Status s = matmul_sums(w, x, M, ldx, fp32, routing, y, ldy, pool); !s.ok())
    return status_code("matmul", s);
  if ((flags & GROKIT_MATMUL_ROUND_BF16) != 0)
    chunked(pool, M, [&](int64_t a, int64_t b) {
      for (int64_t m = a; m < b; ++m) round_to_bf16(y + m * ldy, N, y + m * ldy);
    });
  return GROKIT_OK;
}

// The fp32 sums of a checked matmul.
Status matmul_sums(const GrokitWeight* w, const float* x, int64_t M, int64_t ldx, bool fp32, const GrokitRouting* routing,
                   float* y, int64_t ldy, ThreadPool* pool) {
  const int64_t K = w->rows, N = w->cols;
  if (routing == nullptr) return matmul_one(*w, 0, x, M, ldx, fp32, y, ldy, pool);
  const int32_t* ex = routing->expert;
  // Rows grouped by expert (stable), x rows gathered, y rows scattered.
  std::vector<int64_t> rows;
  std::vector<float> xg, yg;
  for (int64_t e = 0; e < w->experts; ++e) {
    rows.clear();
    for (int64_t m = 0; m < M; ++m)
      if (ex[m] == e) rows.push_back(m);
    if (rows.empty()) continue;
    const auto n = static_cast<int64_t>(rows.size());
    xg.resize(static_cast<size_t>(n * K));
    yg.resize(static_cast<size_t>(n * N));
    for (int64_t i = 0; i < n; ++i)
      std::memcpy(xg.data() + i * K, x + rows[static_cast<size_t>(i)] / routing->x_row_div * ldx,
                  sizeof(float) * static_cast<size_t>(K));
    GROKIT_TRY(matmul_one(*w, e, xg.data(), n, K, fp32, yg.data(), N, pool));
    for (int64_t i = 0; i < n; ++i)
      std::memcpy(y + rows[static_cast<size_t>(i)] * ldy, yg.data() + i * N, sizeof(float) * static_cast<size_t>(N));
  }
  for (int64_t m = 0; m < M; ++m)
    if (ex[m] < 0) std::fill(y + m * ldy, y + m * ldy + N, 0.0f);
  return {};
}

int matmul_multi(const GrokitWeight* const* w, int count, const float* x, int64_t M, int64_t ldx, int32_t flags,
                 float* const* y, const int64_t* ldy, GrokitStream stream) {
  if (count < 1 || count > 4 || w == nullptr || y == nullptr || ldy == nullptr)
    return invalid("matmul_multi", "count = ", count, " (1 to 4) or a NULL array");
  for (int i = 0; i < count; ++i)
    if (int rc = matmul(w[i], x, M, ldx, flags, nullptr, y[i], ldy[i], stream); rc != GROKIT_OK) return rc;
  return GROKIT_OK;
}

// ---- the forward pass -----------------------------------------------------------

int embed(const int32_t* tokens, int64_t M, const uint16_t* table, int64_t row_start, int64_t rows, int64_t D,
          float multiplier, float* out, GrokitStream stream) {
  if (M < 0 || D < 1 || rows < 0) return invalid("embed", "M = ", M, ", D = ", D, ", rows = ", rows);
  if (M == 0) return GROKIT_OK;
  if (tokens == nullptr || out == nullptr || (table == nullptr && rows > 0))
    return invalid("embed", tokens == nullptr ? "tokens" : out == nullptr ? "out" : "table", " is NULL");
  chunked(pool_of(stream), M, [&](int64_t a, int64_t b) {
    kernels::embed(tokens + a, b - a, table, row_start, rows, D, multiplier, out + a * D);
  });
  return GROKIT_OK;
}

int rmsnorm(const float* x, int64_t M, int64_t D, const float* scale, float eps, float* out, GrokitStream stream) {
  if (M < 0 || D < 1) return invalid("rmsnorm", "M = ", M, ", D = ", D);
  if (M == 0) return GROKIT_OK;
  if (x == nullptr || scale == nullptr || out == nullptr)
    return invalid("rmsnorm", x == nullptr ? "x" : scale == nullptr ? "scale" : "out", " is NULL");
  return status_code("rmsnorm", kernels::rmsnorm(x, M, D, scale, eps, out, pool_of(stream)));
}

int rope(float* x, int64_t M, int64_t heads, int64_t dh, const int32_t* positions, double base, GrokitStream stream) {
  if (M < 0 || heads < 1 || dh < 2 || dh % 2 != 0)
    return invalid("rope", "M = ", M, ", heads = ", heads, ", dh = ", dh, " (dh must be even and positive)");
  if (M == 0) return GROKIT_OK;
  if (x == nullptr || positions == nullptr) return invalid("rope", x == nullptr ? "x" : "positions", " is NULL");
  return status_code("rope", kernels::rope(x, M, heads, dh, positions, base, pool_of(stream)));
}

int check_shape(const char* op, const GrokitAttnShape* s) {
  if (s == nullptr) return invalid(op, "shape is NULL");
  if (s->q_heads < 1 || s->kv_heads < 1 || s->q_heads % s->kv_heads != 0 || s->head_dim < 1)
    return invalid(op, "q_heads ", s->q_heads, ", kv_heads ", s->kv_heads, ", head_dim ", s->head_dim,
                   " (q_heads must be a positive multiple of kv_heads)");
  return GROKIT_OK;
}

int kv_store(const float* k, const float* v, int64_t M, const GrokitAttnRow* rows, const GrokitAttnShape* shape,
             GrokitStream stream) {
  if (int rc = check_shape("kv_store", shape); rc != GROKIT_OK) return rc;
  if (M < 0) return invalid("kv_store", "M = ", M);
  if (M == 0) return GROKIT_OK;
  if (k == nullptr || v == nullptr || rows == nullptr)
    return invalid("kv_store", k == nullptr ? "k" : v == nullptr ? "v" : "rows", " is NULL");
  const int64_t KV = shape->kv_heads, dh = shape->head_dim;
  for (int64_t m = 0; m < M; ++m) {
    const GrokitAttnRow& r = rows[m];
    if (r.k == nullptr || r.v == nullptr || r.valid == nullptr)
      return invalid("kv_store", "row ", m, ": a cache pointer is NULL");
    if (r.pos < 0 || r.pos >= r.cap)
      return invalid("kv_store", "row ", m, ": position ", r.pos, " outside the cache's ", r.cap);
  }
  for (int64_t m = 0; m < M; ++m) {
    const GrokitAttnRow& r = rows[m];
    for (int64_t h = 0; h < KV; ++h) {
      const float* ks = k + (m * KV + h) * dh;
      const float* vs = v + (m * KV + h) * dh;
      uint16_t* kd = r.k + (h * r.cap + r.pos) * dh;
      uint16_t* vd = r.v + (h * r.cap + r.pos) * dh;
      for (int64_t d = 0; d < dh; ++d) {
        kd[d] = f32_to_bf16_bits(ks[d]);
        vd[d] = f32_to_bf16_bits(vs[d]);
      }
    }
    r.valid[r.pos] = r.token > 0 ? 1 : 0;
  }
  return GROKIT_OK;
}

int attention(const float* q, int64_t M, const GrokitAttnRow* rows, int64_t max_keys, const GrokitAttnShape* shape,
              float* o, GrokitStream stream) {
  if (int rc = check_shape("attention", shape); rc != GROKIT_OK) return rc;
  if (M < 0) return invalid("attention", "M = ", M);
  if (M == 0) return GROKIT_OK;
  if (q == nullptr || o == nullptr || rows == nullptr)
    return invalid("attention", q == nullptr ? "q" : o == nullptr ? "o" : "rows", " is NULL");
  if (max_keys < 1) return invalid("attention", "max_keys = ", max_keys);
  for (int64_t m = 0; m < M; ++m) {
    const GrokitAttnRow& r = rows[m];
    if (r.k == nullptr || r.v == nullptr || r.valid == nullptr)
      return invalid("attention", "row ", m, ": a cache pointer is NULL");
    if (r.n_keys < 1 || r.n_keys > r.cap || r.n_keys > max_keys)
      return invalid("attention", "row ", m, ": n_keys ", r.n_keys, " outside [1, min(cap ", r.cap, ", max_keys ",
                     max_keys, ")]");
    if (r.pos < 0) return invalid("attention", "row ", m, ": position ", r.pos);
  }
  const int64_t QD = shape->q_heads * shape->head_dim;
  // Consecutive rows over the same cache and keys in one call (batched equals alone).
  for (int64_t m0 = 0; m0 < M;) {
    const GrokitAttnRow& r = rows[m0];
    int64_t m1 = m0 + 1;
    while (m1 < M && rows[m1].k == r.k && rows[m1].v == r.v && rows[m1].valid == r.valid && rows[m1].cap == r.cap &&
           rows[m1].n_keys == r.n_keys)
      ++m1;
    std::vector<int32_t> pos(static_cast<size_t>(m1 - m0));
    for (int64_t i = m0; i < m1; ++i) pos[static_cast<size_t>(i - m0)] = rows[i].pos;
    const AttentionShape sh{shape->q_heads, shape->kv_heads,   shape->head_dim,
                            r.cap,          shape->multiplier, shape->logit_cap};
    Status s = kernels::attention(q + m0 * QD, m1 - m0, pos.data(), r.k, r.v, r.valid, r.n_keys, sh, o + m0 * QD,
                                  pool_of(stream));
    if (!s.ok()) return status_code("attention", s);
    m0 = m1;
  }
  return GROKIT_OK;
}

int router_topk(const float* x, int64_t M, int64_t D, const float* w, int64_t E, int64_t k, int32_t* experts,
                float* gates, GrokitStream stream) {
  if (M < 0 || D < 1 || E < 1 || k < 1 || k > E)
    return invalid("router_topk", "M = ", M, ", D = ", D, ", E = ", E, ", k = ", k, " (need 1 <= k <= E)");
  if (M == 0) return GROKIT_OK;
  if (x == nullptr || w == nullptr || experts == nullptr || gates == nullptr)
    return invalid("router_topk", "a pointer is NULL");
  return status_code("router_topk", kernels::router_topk(x, M, D, w, E, k, experts, gates, pool_of(stream)));
}

int gelu_mul(const float* g, const float* u, int64_t n, float* h, GrokitStream stream) {
  if (n < 0) return invalid("gelu_mul", "n = ", n);
  if (n == 0) return GROKIT_OK;
  if (g == nullptr || u == nullptr || h == nullptr) return invalid("gelu_mul", "a pointer is NULL");
  return status_code("gelu_mul", kernels::gelu_mul(g, u, n, h, pool_of(stream)));
}

int round_bf16(const float* x, int64_t n, float* out, GrokitStream stream) {
  if (n < 0) return invalid("round_bf16", "n = ", n);
  if (n == 0) return GROKIT_OK;
  if (x == nullptr || out == nullptr) return invalid("round_bf16", x == nullptr ? "x" : "out", " is NULL");
  chunked(pool_of(stream), n, [&](int64_t a, int64_t b) { round_to_bf16(x + a, b - a, out + a); });
  return GROKIT_OK;
}

int add_bf16(const float* a, const float* b, int64_t n, float* out, GrokitStream stream) {
  if (n < 0) return invalid("add_bf16", "n = ", n);
  if (n == 0) return GROKIT_OK;
  if (a == nullptr || b == nullptr || out == nullptr) return invalid("add_bf16", "a pointer is NULL");
  chunked(pool_of(stream), n, [&](int64_t i0, int64_t i1) { kernels::add_bf16(a + i0, b + i0, i1 - i0, out + i0); });
  return GROKIT_OK;
}

int rope_store(float* q, float* k, const float* v, int64_t M, const int32_t* positions, const GrokitAttnRow* rows,
               const GrokitAttnShape* shape, double base, GrokitStream stream) {
  if (int rc = check_shape("rope_store", shape); rc != GROKIT_OK) return rc;
  const int64_t dh = shape->head_dim;
  if (M < 0 || dh < 2 || dh % 2 != 0) return invalid("rope_store", "M = ", M, ", head_dim = ", dh, " (must be even)");
  if (M == 0) return GROKIT_OK;
  if (q == nullptr || k == nullptr || v == nullptr || positions == nullptr || rows == nullptr)
    return invalid("rope_store", "a pointer is NULL (q, k, v, positions or rows)");
  for (int64_t m = 0; m < M; ++m) {  // as kv_store checks them, before anything changes
    const GrokitAttnRow& r = rows[m];
    if (r.k == nullptr || r.v == nullptr || r.valid == nullptr)
      return invalid("rope_store", "row ", m, ": a cache pointer is NULL");
    if (r.pos < 0 || r.pos >= r.cap)
      return invalid("rope_store", "row ", m, ": position ", r.pos, " outside the cache's ", r.cap);
  }
  if (int rc = rope(q, M, shape->q_heads, dh, positions, base, stream); rc != GROKIT_OK) return rc;
  if (int rc = rope(k, M, shape->kv_heads, dh, positions, base, stream); rc != GROKIT_OK) return rc;
  return kv_store(k, v, M, rows, shape, stream);
}

// The CPU engine's combine of token t: acc = acc + fp32(bf16(gate)) * y, choice by choice,
// then bf16, into out_row [D].
void combine_row(const float* y, const float* gates, int64_t t, int64_t k, int64_t D, float* acc, float* out_row) {
  std::fill(acc, acc + D, 0.0f);
  for (int64_t c = 0; c < k; ++c) {
    const float gb = grokit::round_bf16(gates[t * k + c]);
    const float* yr = y + (t * k + c) * D;
    for (int64_t d = 0; d < D; ++d) acc[d] = acc[d] + gb * yr[d];
  }
  for (int64_t d = 0; d < D; ++d) out_row[d] = grokit::round_bf16(acc[d]);
}

// Whether [p, p + np) and [q, q + nq) share an element.
bool overlaps(const float* p, int64_t np, const float* q, int64_t nq) {
  const auto a = reinterpret_cast<uintptr_t>(p), b = reinterpret_cast<uintptr_t>(q);
  return a < b + static_cast<uintptr_t>(nq) * sizeof(float) && b < a + static_cast<uintptr_t>(np) * sizeof(float);
}

int residual_norm(const float* y, const float* gates, int64_t top, int32_t round_y, int64_t M, int64_t D,
                  const float* post_scale, float eps, float* x, const float* next_scale, float* a, GrokitStream stream) {
  if (M < 0 || D < 1 || (gates != nullptr && top < 1))
    return invalid("residual_norm", "M = ", M, ", D = ", D, ", top = ", top);
  if (M == 0) return GROKIT_OK;
  if (y == nullptr || post_scale == nullptr || x == nullptr || (next_scale != nullptr && a == nullptr))
    return invalid("residual_norm", "a pointer is NULL (y, post_scale, x, or a with next_scale)");
  const int64_t per = gates != nullptr ? top : 1;  // y rows per token
  if (M > INT64_MAX / D / per) return invalid("residual_norm", "M * D overflows (M = ", M, ", D = ", D, ")");
  if (next_scale != nullptr && (overlaps(a, M * D, y, M * per * D) || overlaps(a, M * D, x, M * D)))
    return invalid("residual_norm", "a overlaps y or x");
  if (gates != nullptr && overlaps(x, M * D, y, M * per * D)) return invalid("residual_norm", "x overlaps the routed rows y");
  // Row by row, each the twins' sequence (round_bf16 or moe_combine, rmsnorm, add_bf16,
  // rmsnorm).
  auto rows = [&](int64_t m0, int64_t m1) {
    std::vector<float> t(static_cast<size_t>(D)), acc(gates != nullptr ? static_cast<size_t>(D) : 0);
    for (int64_t m = m0; m < m1; ++m) {
      const float* yr = y + m * D;
      float* xr = x + m * D;
      if (gates != nullptr) combine_row(y, gates, m, top, D, acc.data(), t.data());
      else if (round_y != 0) round_to_bf16(yr, D, t.data());
      else std::copy(yr, yr + D, t.begin());
      GROKIT_CHECK(kernels::rmsnorm(t.data(), 1, D, post_scale, eps, t.data(), nullptr).ok());
      kernels::add_bf16(xr, t.data(), D, xr);
      if (next_scale != nullptr) GROKIT_CHECK(kernels::rmsnorm(xr, 1, D, next_scale, eps, a + m * D, nullptr).ok());
    }
  };
  ThreadPool* pool = pool_of(stream);
  if (pool == nullptr || M == 1) {
    rows(0, M);
  } else {
    const int64_t per = std::max<int64_t>(1, M / (4 * static_cast<int64_t>(pool->size())));
    pool->run(static_cast<size_t>((M + per - 1) / per), [&](size_t i) {
      const int64_t m0 = static_cast<int64_t>(i) * per;
      rows(m0, std::min(M, m0 + per));
    });
  }
  return GROKIT_OK;
}

int moe_combine(const float* y, const float* gates, int64_t M, int64_t k, int64_t D, float* out, GrokitStream stream) {
  if (M < 0 || k < 1 || D < 1) return invalid("moe_combine", "M = ", M, ", k = ", k, ", D = ", D);
  if (M == 0) return GROKIT_OK;
  if (y == nullptr || gates == nullptr || out == nullptr) return invalid("moe_combine", "a pointer is NULL");
  // Rows in order through a private accumulator, so out may overlap y (row t of out is
  // row t of y, which only tokens up to t read); on a pool only when they are apart.
  const auto ob = reinterpret_cast<uintptr_t>(out), yb = reinterpret_cast<uintptr_t>(y);
  const bool apart = ob + sizeof(float) * static_cast<size_t>(M * D) <= yb ||
                     yb + sizeof(float) * static_cast<size_t>(M * k * D) <= ob;
  ThreadPool* pool = pool_of(stream);
  if (pool != nullptr && apart && M > 1) {
    pool->run(static_cast<size_t>(M), [&](size_t t) {
      thread_local std::vector<float> acc;
      acc.resize(static_cast<size_t>(D));
      combine_row(y, gates, static_cast<int64_t>(t), k, D, acc.data(), out + static_cast<int64_t>(t) * D);
    });
  } else {
    std::vector<float> acc(static_cast<size_t>(D));
    for (int64_t t = 0; t < M; ++t) combine_row(y, gates, t, k, D, acc.data(), out + t * D);
  }
  return GROKIT_OK;
}

int logits(const float* x, int64_t M, int64_t D, const uint16_t* table, int64_t N, float multiplier, float* y,
           int64_t ldy, GrokitStream stream) {
  if (M < 0 || D < 1 || N < 1 || ldy < N)
    return invalid("logits", "M = ", M, ", D = ", D, ", N = ", N, ", ldy = ", ldy, " (need ldy >= N)");
  if (M == 0) return GROKIT_OK;
  if (x == nullptr || table == nullptr || y == nullptr) return invalid("logits", "a pointer is NULL");
  ThreadPool* pool = pool_of(stream);
  Status s = matmul_bf16_nt(x, M, D, table, N, y, ldy, pool);
  if (!s.ok()) return status_code("logits", s);
  for (int64_t m = 0; m < M; ++m) {
    float* row = y + m * ldy;
    for (int64_t n = 0; n < N; ++n) row[n] = grokit::round_bf16(grokit::round_bf16(row[n]) * multiplier);
  }
  return GROKIT_OK;
}

int sum_arrays(const float* const* parts, int count, int64_t n, float* out, GrokitStream stream) {
  if (count < 1 || n < 0) return invalid("sum_arrays", "count = ", count, ", n = ", n);
  if (n == 0) return GROKIT_OK;
  if (parts == nullptr || out == nullptr) return invalid("sum_arrays", parts == nullptr ? "parts" : "out", " is NULL");
  for (int i = 0; i < count; ++i)
    if (parts[i] == nullptr) return invalid("sum_arrays", "part ", i, " is NULL");
  chunked(pool_of(stream), n, [&](int64_t a, int64_t b) {
    std::vector<float> v(static_cast<size_t>(count));
    for (int64_t i = a; i < b; ++i) {
      for (int c = 0; c < count; ++c) v[static_cast<size_t>(c)] = parts[c][i];
      out[i] = tree_sum(v.data(), count);
    }
  });
  return GROKIT_OK;
}

// Every value was checked when its op ran (an error there): nothing is left to report.
int take_device_errors(GrokitStream, uint32_t* flags) {
  if (flags == nullptr) return invalid("take_device_errors", "flags", " is NULL");
  *flags = 0;
  return GROKIT_OK;
}

const GrokitOps kHostOps = [] {
  GrokitOps t{};
  t.abi_version = GROKIT_OPS_ABI_VERSION;
  t.backend = "host";
  t.error_message = error_message;
  t.device_count = device_count;
  t.set_device = set_device;
  t.device_name = device_name;
  t.memory_info = memory_info;
  t.alloc = alloc;
  t.free = free_memory;
  t.alloc_pinned = alloc_pinned;
  t.free_pinned = free_memory;
  t.host_register = host_register;
  t.host_unregister = host_unregister;
  t.copy = copy;
  t.fill = fill;
  t.stream_create = stream_create;
  t.stream_destroy = stream_noop;
  t.stream_sync = stream_noop;
  t.event_create = event_create;
  t.event_destroy = event_destroy;
  t.event_record = event_record;
  t.event_sync = event_sync;
  t.stream_wait_event = stream_wait_event;
  t.graph_begin = nullptr;
  t.graph_end = nullptr;
  t.graph_launch = nullptr;
  t.graph_destroy = nullptr;
  t.prepare_scratch_bytes = prepare_scratch_bytes;
  t.prepare_weight = prepare_weight;
  t.embed = embed;
  t.rmsnorm = rmsnorm;
  t.rope = rope;
  t.kv_store = kv_store;
  t.rope_store = rope_store;
  t.attention = attention;
  t.router_topk = router_topk;
  t.matmul = matmul;
  t.matmul_multi = matmul_multi;
  t.gelu_mul = gelu_mul;
  t.round_bf16 = round_bf16;
  t.add_bf16 = add_bf16;
  t.residual_norm = residual_norm;
  t.moe_combine = moe_combine;
  t.logits = logits;
  t.sum_arrays = sum_arrays;
  t.take_device_errors = take_device_errors;
  return t;
}();

}  // namespace
}  // namespace grokit::kernels

extern "C" const GrokitOps* grokit_host_ops(void) { return &grokit::kernels::kHostOps; }
extern "C" void grokit_host_set_error(const char* message) {
  grokit::kernels::fail(GROKIT_ERR_DEVICE, message != nullptr ? message : "(no message)");
}
