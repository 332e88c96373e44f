// CUDA weight products: argument checks, the per-stream scratch, the decode launch and
// the choice of path (kernels/cuda/matmul.h). The prefill path is in matmul_prefill.cu.
#include <algorithm>
#include <climits>
#include <cstdio>
#include <cstdlib>

#include "kernels/cuda/matmul_internal.cuh"

namespace grokit::kernels::cuda {
namespace mm {

int describe(const char* op, const GrokitWeight* w, WDesc* d) {
  char msg[512];
  const int rc = describe_weight(op, w, d, msg, sizeof msg);
  return rc == GROKIT_OK ? rc : set_error(rc, "%s", msg);
}

// ---- per-stream scratch ---------------------------------------------------------

namespace {

std::mutex g_ctx_mu;
std::map<std::pair<int, uintptr_t>, std::unique_ptr<Ctx>> g_ctx;

std::mutex g_sm_mu;
std::map<int, int> g_sms;

void free_buf(const DevBuf& b, cudaStream_t s) {
  if (b.p == nullptr) return;
  if (b.async)
    cudaFreeAsync(b.p, s);
  else
    cudaFree(b.p);
}

}  // namespace

int context(cudaStream_t stream, Ctx** ctx) {
  int dev = 0;
  if (int rc = check_cuda(cudaGetDevice(&dev), "matmul: cudaGetDevice"); rc != GROKIT_OK) return rc;
  std::lock_guard<std::mutex> lk(g_ctx_mu);
  auto& p = g_ctx[{dev, reinterpret_cast<uintptr_t>(stream)}];
  if (!p) {
    p = std::make_unique<Ctx>();
    p->device = dev;
    p->stream = stream;
  }
  *ctx = p.get();
  return GROKIT_OK;
}

int stream_capturing(cudaStream_t stream, bool* cap) {
  cudaStreamCaptureStatus st = cudaStreamCaptureStatusNone;
  const cudaError_t e = cudaStreamIsCapturing(stream, &st);
  if (e == cudaErrorStreamCaptureImplicit) {
    // The legacy stream while another stream captures: behave as capturing.
    cudaGetLastError();
    *cap = true;
    return GROKIT_OK;
  }
  if (e != cudaSuccess) {
    cudaGetLastError();
    return check_cuda(e, "matmul: cudaStreamIsCapturing");
  }
  *cap = st != cudaStreamCaptureStatusNone;
  return GROKIT_OK;
}

int sm_count(int device) {
  std::lock_guard<std::mutex> lk(g_sm_mu);
  auto it = g_sms.find(device);
  if (it != g_sms.end()) return it->second;
  int v = 0;
  if (cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || v < 1) {
    cudaGetLastError();
    v = 108;
  }
  g_sms[device] = v;
  return v;
}

int ensure_host(HostBuf& b, size_t count) {
  if (b.p != nullptr && b.count >= count) return GROKIT_OK;
  const size_t n = std::max<size_t>({count, b.count * 2, 4096});
  void* p = nullptr;
  if (int rc = check_cuda(cudaHostAlloc(&p, n * sizeof(int32_t), cudaHostAllocDefault), "matmul: pinned host scratch");
      rc != GROKIT_OK)
    return rc;
  free_host(b);
  b.p = static_cast<int32_t*>(p);
  b.count = n;
  return GROKIT_OK;
}

void free_host(HostBuf& b) {
  if (b.p != nullptr) cudaFreeHost(b.p);
  b.p = nullptr;
  b.count = 0;
}

int ensure(Ctx& c, DevBuf& b, size_t bytes, bool capturing, bool zero, bool* ok) {
  *ok = false;
  if (b.p != nullptr && b.bytes >= bytes) {
    if (capturing) b.in_graph = true;
    *ok = true;
    return GROKIT_OK;
  }
  if (capturing) return GROKIT_OK;
  size_t n = std::max(bytes, b.bytes + b.bytes / 2);
  n = (n + (size_t{1} << 16) - 1) >> 16 << 16;
  void* p = nullptr;
  bool async = true;
  // Relaxed: another thread may be capturing in global mode.
  cudaStreamCaptureMode mode = cudaStreamCaptureModeRelaxed;
  cudaThreadExchangeStreamCaptureMode(&mode);
  cudaError_t e = cudaMallocAsync(&p, n, c.stream);
  if (e == cudaErrorNotSupported) {
    cudaGetLastError();
    async = false;
    e = cudaMalloc(&p, n);
  }
  cudaThreadExchangeStreamCaptureMode(&mode);
  if (e != cudaSuccess) {
    cudaGetLastError();
    return set_error(e == cudaErrorMemoryAllocation ? GROKIT_ERR_MEMORY : GROKIT_ERR_DEVICE,
                     "matmul: %zu bytes of scratch on device %d: %s", n, c.device, cudaGetErrorString(e));
  }
  if (zero) {
    if (int rc = check_cuda(cudaMemsetAsync(p, 0, n, c.stream), "matmul: clearing scratch"); rc != GROKIT_OK) {
      if (async) cudaFreeAsync(p, c.stream); else cudaFree(p);
      return rc;
    }
  }
  if (b.p != nullptr) {
    if (b.in_graph) {
      c.retired.push_back(b);
    } else if (b.async) {
      cudaFreeAsync(b.p, c.stream);
    } else {
      // Queued work may still use it.
      cudaStreamSynchronize(c.stream);
      cudaFree(b.p);
    }
  }
  b = DevBuf{p, n, false, async};
  *ok = true;
  return GROKIT_OK;
}

// ---- decode ---------------------------------------------------------------------

namespace {

// y's rows [M, N] (row stride ldy) rounded to bf16 in place: the prefill path's
// GROKIT_MATMUL_ROUND_BF16 (the decode kernel rounds in its own stores).
__global__ void round_rows_kernel(float* y, int64_t M, int64_t N, int64_t ldy) {
  for (int64_t m = blockIdx.y; m < M; m += gridDim.y)
    for (int64_t n = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; n < N;
         n += static_cast<int64_t>(gridDim.x) * blockDim.x)
      y[m * ldy + n] = round_bf16(y[m * ldy + n]);
}

int round_rows(float* y, int64_t M, int64_t N, int64_t ldy, cudaStream_t st) {
  const dim3 grid(std::min<unsigned>(blocks_for(N, kThreads), 1024u), static_cast<unsigned>(std::min<int64_t>(M, 65535)));
  round_rows_kernel<<<grid, kThreads, 0, st>>>(y, M, N, ldy);
  return check_launch("matmul: rounding kernel");
}

// GROKIT_CUDA_DECODE_PLAN="KS,WL[,DEEP]" (k splits, log2 of the warps across columns; 0
// or -1 for the plan's own choice; DEEP 1: twice the bytes in flight at one row per pass):
// an override for benchmarks that sweep the decode plan (grokit bench-device --sweep).
// Read at each call, so a sweep can change it between calls.
DecodeForce decode_force() {
  DecodeForce f;
  const char* v = std::getenv("GROKIT_CUDA_DECODE_PLAN");
  if (v == nullptr || std::sscanf(v, "%d,%d,%d", &f.ks, &f.wl, &f.deep) < 2 || f.ks < 0 || f.wl < -1 || f.wl > 3)
    return {};
  return f;
}

// y = gelu(y) * bf16(t) for rows [M, N] (y row stride ldy, t dense); rows routed to no
// expert (expert < 0, when routed) get 0: the prefill path's GROKIT_MATMUL_GELU_MUL.
__global__ void gelu_rows_kernel(float* y, int64_t M, int64_t N, int64_t ldy, const float* t, const int32_t* expert) {
  for (int64_t m = blockIdx.y; m < M; m += gridDim.y) {
    const bool none = expert != nullptr && expert[m] < 0;
    for (int64_t n = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; n < N;
         n += static_cast<int64_t>(gridDim.x) * blockDim.x)
      y[m * ldy + n] = none ? 0.0f : gelu_times(y[m * ldy + n], round_bf16(t[m * N + n]));
  }
}

int gelu_rows(float* y, int64_t M, int64_t N, int64_t ldy, const float* t, const int32_t* expert, cudaStream_t st) {
  const dim3 grid(std::min<unsigned>(blocks_for(N, kThreads), 1024u), static_cast<unsigned>(std::min<int64_t>(M, 65535)));
  gelu_rows_kernel<<<grid, kThreads, 0, st>>>(y, M, N, ldy, t, expert);
  return check_launch("matmul: gelu kernel");
}

int run_decode(Ctx& c, const WDesc& d, const float* x, int64_t M, int64_t ldx, const GrokitRouting* routing, float* y,
               int64_t ldy, bool round_y, bool gelu, bool capturing) {
  const bool routed = routing != nullptr;
  const int64_t div = routed ? std::min<int64_t>(routing->x_row_div, M) : 1;  // m / div is the same for m < M
  const int64_t per = routed ? (M + div - 1) / div : M;
  const int64_t active = routed ? std::min<int64_t>(d.E, 2) : 1;
  bool slots = false;
  const int64_t egrid = expert_grid(d.E, M, routed, &slots);
  const int sms = sm_count(c.device);
  // Split-k workspace: [ks, M, N] floats and a counter per (expert, tile).
  const uint64_t mn = static_cast<uint64_t>(M) * static_cast<uint64_t>(d.N);
  int max_ks = static_cast<int>(std::min<uint64_t>(kMaxSplits, kPartialCap / (mn * 4)));
  const DecodeForce force = decode_force();
  DecodePlan P = first_plan(d, M, per, active, sms, force);
  auto partial_bytes = [&](const DecodePlan& q) { return static_cast<size_t>(q.ks) * mn * 4; };
  auto counter_bytes = [&](const DecodePlan& q) { return static_cast<size_t>(egrid * q.tiles) * 4; };
  if (P.ks > 1) {
    bool ok1 = false, ok2 = false;
    if (int rc = ensure(c, c.partial, partial_bytes(P), capturing, false, &ok1); rc != GROKIT_OK) return rc;
    if (int rc = ensure(c, c.counters, counter_bytes(P), capturing, true, &ok2); rc != GROKIT_OK) return rc;
    if (!ok1 || !ok2) {
      // Capturing with too small a workspace: fewer splits (the eager call of this shape,
      // run before capturing, would have sized it).
      max_ks = static_cast<int>(std::min<uint64_t>(kMaxSplits, c.partial.bytes / std::max<uint64_t>(1, mn * 4)));
      P = plan_decode(d.fmt, d.K, d.N, per, active, sms, std::max(1, max_ks), force);
      if (P.ks > 1 && (c.partial.bytes < partial_bytes(P) || c.counters.bytes < counter_bytes(P)))
        P = plan_decode(d.fmt, d.K, d.N, per, active, sms, 1, force);
      if (P.ks > 1) c.partial.in_graph = c.counters.in_graph = true;
    }
  }
  if (P.tiles > INT_MAX) return set_error(GROKIT_ERR_UNSUPPORTED, "matmul: N = %lld needs too many blocks", (long long)d.N);

  DecodeParams p =
      make_decode_params(d, P, x, M, ldx, routed ? routing->expert : nullptr, div, y, ldy,
                         static_cast<float*>(c.partial.p), static_cast<uint32_t*>(c.counters.p),
                         device_errors_word(c.stream));
  p.round_y = round_y ? 1 : 0;
  p.gelu = gelu ? 1 : 0;
  p.slots = slots ? 1 : 0;
  const dim3 grid(static_cast<unsigned>(P.tiles), static_cast<unsigned>(P.ks), static_cast<unsigned>(egrid));
  const bool deep = force.deep != 0 && P.kmt == 1;
  cudaError_t launched = cudaSuccess;
  with_decode_kernel(d.fmt, P.kmt, deep, [&](auto f, auto k, auto u) {
    launched = launch_pdl(decode_kernel<decltype(f)::value, decltype(k)::value, decltype(u)::value>, grid, kThreads,
                          P.smem, c.stream, p);
  });
  return check_cuda(launched, "matmul: decode kernel");
}

// Products of one x (unrouted, M decode rows, one format and K) in one launch, each with
// the plan it has alone. *done = false when the workspace cannot be had (a capture that
// did not run eagerly first): the caller then runs them one by one.
int run_decode_multi(Ctx& c, const WDesc* d, int count, const float* x, int64_t M, int64_t ldx, float* const* y,
                     const int64_t* ldy, bool round_y, bool gelu, bool capturing, bool* done) {
  *done = false;
  const DecodeForce force = decode_force();
  const MultiPlan mp = plan_multi(d, count, M, sm_count(c.device), force);
  for (int i = 1; i < count; ++i)
    if (mp.P[i].kmt != mp.P[0].kmt) return GROKIT_OK;  // not one kernel (cannot happen: one M)
  if (mp.max_tiles > INT_MAX) return GROKIT_OK;
  bool ok1 = true, ok2 = true;
  if (mp.partial_floats > 0) {
    if (int rc = ensure(c, c.partial, mp.partial_floats * 4, capturing, false, &ok1); rc != GROKIT_OK) return rc;
    if (int rc = ensure(c, c.counters, mp.counter_words * 4, capturing, true, &ok2); rc != GROKIT_OK) return rc;
  }
  if (!ok1 || !ok2) return GROKIT_OK;
  const DecodeMulti m = make_decode_multi(mp, d, x, M, ldx, y, ldy, static_cast<float*>(c.partial.p),
                                          static_cast<uint32_t*>(c.counters.p), device_errors_word(c.stream), round_y, gelu);
  const dim3 grid(static_cast<unsigned>(mp.max_tiles), static_cast<unsigned>(mp.max_ks), static_cast<unsigned>(count));
  const bool deep = force.deep != 0 && mp.P[0].kmt == 1;
  cudaError_t launched = cudaSuccess;
  with_decode_kernel(d[0].fmt, mp.P[0].kmt, deep, [&](auto f, auto k, auto u) {
    launched = launch_pdl(decode_multi_kernel<decltype(f)::value, decltype(k)::value, decltype(u)::value>, grid,
                          kThreads, mp.smem, c.stream, m);
  });
  if (mp.partial_floats > 0 && capturing) c.partial.in_graph = c.counters.in_graph = true;
  *done = true;
  return check_cuda(launched, "matmul_multi: decode kernel");
}

}  // namespace
}  // namespace mm

namespace mm {
namespace {
// matmul's argument checks (GROKIT_OK: go on; d filled).
int check_product(const GrokitWeight* w, const float* x, int64_t M, int64_t ldx, int32_t flags,
                  const GrokitRouting* routing, const float* y, int64_t ldy, WDesc* out) {
  WDesc& d = *out;
  if (int rc = describe("matmul", w, &d); rc != GROKIT_OK) return rc;
  const char* dt = dtype_label(d.dtype);
  if ((flags & ~(GROKIT_MATMUL_X_FP32 | GROKIT_MATMUL_ROUND_BF16 | GROKIT_MATMUL_GELU_MUL)) != 0)
    return set_error(GROKIT_ERR_INVALID, "matmul: flags = %d (%s weight)", static_cast<int>(flags), dt);
  if (M < 0) return set_error(GROKIT_ERR_INVALID, "matmul: M = %lld (%s weight)", static_cast<long long>(M), dt);
  if (ldx < d.K)
    return set_error(GROKIT_ERR_INVALID, "matmul: ldx = %lld < K = %lld (%s weight)", static_cast<long long>(ldx),
                     static_cast<long long>(d.K), dt);
  if (ldy < d.N)
    return set_error(GROKIT_ERR_INVALID, "matmul: ldy = %lld < N = %lld (%s weight)", static_cast<long long>(ldy),
                     static_cast<long long>(d.N), dt);
  if (routing == nullptr && d.E != 1)
    return set_error(GROKIT_ERR_INVALID, "matmul: a stack of %lld experts needs routing", static_cast<long long>(d.E));
  if (routing != nullptr && routing->x_row_div < 1)
    return set_error(GROKIT_ERR_INVALID, "matmul: routing x_row_div = %lld < 1", static_cast<long long>(routing->x_row_div));
  if (M == 0) return GROKIT_OK;
  if (x == nullptr || y == nullptr) return set_error(GROKIT_ERR_INVALID, "matmul: %s is NULL", x == nullptr ? "x" : "y");
  if (routing != nullptr && routing->expert == nullptr) return set_error(GROKIT_ERR_INVALID, "matmul: routing expert is NULL");
  if (M > INT_MAX) return set_error(GROKIT_ERR_UNSUPPORTED, "matmul: M = %lld rows", static_cast<long long>(M));
  if (routing != nullptr && d.E > 65535)
    return set_error(GROKIT_ERR_UNSUPPORTED, "matmul: %lld experts (at most 65535)", static_cast<long long>(d.E));
  return GROKIT_OK;
}
}  // namespace
}  // namespace mm

int matmul(const GrokitWeight* w, const float* x, int64_t M, int64_t ldx, int32_t flags, const GrokitRouting* routing,
           float* y, int64_t ldy, GrokitStream stream) {
  using namespace mm;
  WDesc d;
  if (int rc = check_product(w, x, M, ldx, flags, routing, y, ldy, &d); rc != GROKIT_OK || M == 0) return rc;
  const bool x_fp32 = (flags & GROKIT_MATMUL_X_FP32) != 0, round_y = (flags & GROKIT_MATMUL_ROUND_BF16) != 0;
  const bool gelu = (flags & GROKIT_MATMUL_GELU_MUL) != 0;
  const cudaStream_t st = as_stream(stream);
  Ctx* c = nullptr;
  if (int rc = context(st, &c); rc != GROKIT_OK) return rc;
  std::lock_guard<std::mutex> lk(c->mu);
  bool cap = false;
  if (int rc = stream_capturing(st, &cap); rc != GROKIT_OK) return rc;
  const bool prefill = routing == nullptr ? M > kDecodeRows : M > kDecodeRoutedRows;
  if (prefill) {
    bool done = false;
    if (gelu) {
      // The product into scratch, then y = gelu(y) * bf16(it).
      bool ok = false;
      const size_t bytes = static_cast<size_t>(M) * static_cast<size_t>(d.N) * 4;
      if (int rc = ensure(*c, c->gt, bytes, cap, false, &ok); rc != GROKIT_OK) return rc;
      if (ok) {
        float* t = static_cast<float*>(c->gt.p);
        if (int rc = run_prefill(*c, d, x, M, ldx, x_fp32, routing, t, d.N, cap, &done); rc != GROKIT_OK) return rc;
        if (done) return gelu_rows(y, M, d.N, ldy, t, routing != nullptr ? routing->expert : nullptr, st);
      }
    } else {
      if (int rc = run_prefill(*c, d, x, M, ldx, x_fp32, routing, y, ldy, cap, &done); rc != GROKIT_OK) return rc;
      if (done) return round_y ? round_rows(y, M, d.N, ldy, st) : GROKIT_OK;
    }
  }
  return run_decode(*c, d, x, M, ldx, routing, y, ldy, round_y, gelu, cap);
}

int matmul_multi(const GrokitWeight* const* w, int count, const float* x, int64_t M, int64_t ldx, int32_t flags,
                 float* const* y, const int64_t* ldy, GrokitStream stream) {
  using namespace mm;
  if (count < 1 || count > kMaxMulti || w == nullptr || y == nullptr || ldy == nullptr)
    return set_error(GROKIT_ERR_INVALID, "matmul_multi: count = %d (1 to %d) or a NULL array", count, kMaxMulti);
  WDesc d[kMaxMulti];
  for (int i = 0; i < count; ++i) {
    if (int rc = check_product(w[i], x, M, ldx, flags, nullptr, y[i], ldy[i], &d[i]); rc != GROKIT_OK) return rc;
  }
  if (M == 0) return GROKIT_OK;
  bool together = count > 1 && M <= kDecodeRows;
  for (int i = 1; i < count; ++i) together = together && d[i].fmt == d[0].fmt && d[i].K == d[0].K;
  if (together) {
    const cudaStream_t st = as_stream(stream);
    Ctx* c = nullptr;
    if (int rc = context(st, &c); rc != GROKIT_OK) return rc;
    std::lock_guard<std::mutex> lk(c->mu);
    bool cap = false, done = false;
    if (int rc = stream_capturing(st, &cap); rc != GROKIT_OK) return rc;
    if (int rc = run_decode_multi(*c, d, count, x, M, ldx, y, ldy, (flags & GROKIT_MATMUL_ROUND_BF16) != 0,
                                  (flags & GROKIT_MATMUL_GELU_MUL) != 0, cap, &done);
        rc != GROKIT_OK || done)
      return rc;
  }
  for (int i = 0; i < count; ++i)
    if (int rc = matmul(w[i], x, M, ldx, flags, nullptr, y[i], ldy[i], stream); rc != GROKIT_OK) return rc;
  return GROKIT_OK;
}

int matmul_release_stream(GrokitStream stream) {
  using namespace mm;
  const cudaStream_t st = as_stream(stream);
  int dev = 0;
  if (int rc = check_cuda(cudaGetDevice(&dev), "matmul_release_stream: cudaGetDevice"); rc != GROKIT_OK) return rc;
  std::unique_ptr<Ctx> c;
  {
    std::lock_guard<std::mutex> lk(g_ctx_mu);
    auto it = g_ctx.find({dev, reinterpret_cast<uintptr_t>(st)});
    if (it == g_ctx.end()) return GROKIT_OK;
    c = std::move(it->second);
    g_ctx.erase(it);
  }
  std::lock_guard<std::mutex> lk(c->mu);
  int rc = check_cuda(cudaStreamSynchronize(st), "matmul_release_stream: cudaStreamSynchronize");
  for (DevBuf* b : {&c->partial, &c->counters, &c->wb, &c->xb, &c->yt, &c->rows, &c->ws, &c->gt}) free_buf(*b, st);
  for (const DevBuf& b : c->retired) free_buf(b, st);
  free_host(c->host_ids);
  free_host(c->host_rows);
  if (c->lt != nullptr) cublasLtDestroy(c->lt);
  if (rc == GROKIT_OK) rc = check_cuda(cudaStreamSynchronize(st), "matmul_release_stream: freeing scratch");
  return rc;
}

}  // namespace grokit::kernels::cuda
