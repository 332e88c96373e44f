// The attention launcher: argument checks, decode or prefill, and the scratch memory
// both need (split partials; decode's scores).
//
// Scratch: one buffer per (device, stream), grown on demand with cudaMallocAsync on that
// stream (stream-ordered, so no synchronisation). Nothing is allocated while the stream
// is being captured: if the buffer is too small then, the call fails with
// GROKIT_ERR_UNSUPPORTED, and the engine calls attention once with the same M, shape
// and max_keys before capturing. A buffer that a capture has used is never freed (the
// graph keeps its address); other outgrown buffers are freed in stream order.
// Graphs captured on the same stream share its buffer: replay them in stream order.
#include <algorithm>
#include <atomic>
#include <climits>
#include <cmath>
#include <map>
#include <memory>
#include <mutex>
#include <utility>
#include <vector>

#include "kernels/cuda/attention.h"
#include "kernels/cuda/attention_impl.cuh"

namespace grokit::kernels::cuda {

namespace {

struct Scratch {
  std::mutex mu;  // held from reserve to the last launch that uses ptr
  void* ptr = nullptr;
  size_t bytes = 0;
  bool captured = false;  // a graph may hold ptr
  bool pooled = false;    // from cudaMallocAsync
  // Outgrown buffers a graph may still use (or whose cudaFree would synchronise): freed
  // by attention_release_stream, once the stream's graphs are gone.
  std::vector<std::pair<void*, bool>> retired;  // (ptr, pooled)
};

using ScratchMap = std::map<std::pair<int, cudaStream_t>, std::unique_ptr<Scratch>>;
std::mutex g_scratch_mu;
// Never destroyed: the device memory outlives static destruction order.
ScratchMap* const g_scratch = new ScratchMap();

Scratch& scratch_for(int device, cudaStream_t stream) {
  std::lock_guard<std::mutex> lock(g_scratch_mu);
  auto& s = (*g_scratch)[{device, stream}];
  if (!s) s = std::make_unique<Scratch>();
  return *s;
}

// With sc.mu held: sc.ptr holds at least `bytes`.
int reserve(Scratch& sc, size_t bytes, cudaStream_t stream) {
  cudaStreamCaptureStatus cs = cudaStreamCaptureStatusNone;
  if (int rc = check_cuda(cudaStreamIsCapturing(stream, &cs), "attention: cudaStreamIsCapturing")) return rc;
  const bool capturing = cs != cudaStreamCaptureStatusNone;
  if (bytes <= sc.bytes) {
    if (capturing) sc.captured = true;
    return GROKIT_OK;
  }
  if (capturing)
    return set_error(GROKIT_ERR_UNSUPPORTED,
                     "attention: needs %zu bytes of scratch on this stream (has %zu) while the stream is being "
                     "captured; call attention once with this M, shape and max_keys before capturing",
                     bytes, sc.bytes);
  size_t want = std::max(bytes, sc.bytes + sc.bytes / 2);
  want = (want + (1u << 20) - 1) & ~static_cast<size_t>((1u << 20) - 1);
  void* p = nullptr;
  bool pooled = true;
  cudaError_t e = cudaMallocAsync(&p, want, stream);
  if (e == cudaErrorNotSupported) {  // no stream-ordered allocator: plain cudaMalloc
    (void)cudaGetLastError();
    pooled = false;
    e = cudaMalloc(&p, want);
  }
  if (e != cudaSuccess) {
    (void)cudaGetLastError();
    return check_cuda(e, "attention: scratch allocation");
  }
  // Outgrown: freed after the work already queued on this stream, unless a captured
  // graph may use it or freeing it would synchronise (cudaFree); then it is kept until
  // the stream is released.
  if (sc.ptr != nullptr && !sc.captured && sc.pooled) {
    if (int rc = check_cuda(cudaFreeAsync(sc.ptr, stream), "attention: scratch free")) return rc;
  } else if (sc.ptr != nullptr) {
    sc.retired.emplace_back(sc.ptr, sc.pooled);
  }
  sc.ptr = p;
  sc.bytes = want;
  sc.pooled = pooled;
  sc.captured = false;
  return GROKIT_OK;
}

int sm_count(int device) {
  static std::atomic<int> cache[64];
  if (device >= 0 && device < 64) {
    const int c = cache[device].load(std::memory_order_relaxed);
    if (c > 0) return c;
  }
  int sms = 0;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || sms <= 0) {
    (void)cudaGetLastError();
    return 108;  // only the split heuristic depends on it
  }
  if (device >= 0 && device < 64) cache[device].store(sms, std::memory_order_relaxed);
  return sms;
}

}  // namespace

int attention(const float* q, int64_t M, const GrokitAttnRow* rows, int64_t max_keys, const GrokitAttnShape* shape,
              float* o, GrokitStream stream) {
  if (M < 0) return set_error(GROKIT_ERR_INVALID, "attention: M = %lld is negative", static_cast<long long>(M));
  if (M == 0) return GROKIT_OK;
  if (q == nullptr || rows == nullptr || o == nullptr || shape == nullptr)
    return set_error(GROKIT_ERR_INVALID, "attention: null q, rows, o or shape");
  const GrokitAttnShape& sh = *shape;
  if (sh.q_heads <= 0 || sh.kv_heads <= 0 || sh.q_heads % sh.kv_heads != 0 || sh.q_heads > 65535)
    return set_error(GROKIT_ERR_INVALID,
                     "attention: q_heads %lld, kv_heads %lld (need 0 < kv_heads, q_heads a multiple of kv_heads, "
                     "q_heads <= 65535)",
                     static_cast<long long>(sh.q_heads), static_cast<long long>(sh.kv_heads));
  if (sh.head_dim < 2 || sh.head_dim > 256 || sh.head_dim % 2 != 0)
    return set_error(GROKIT_ERR_UNSUPPORTED, "attention: head_dim %lld unsupported (even, 2 to 256)",
                     static_cast<long long>(sh.head_dim));
  if (!std::isfinite(sh.multiplier) || !std::isfinite(sh.logit_cap) || !(sh.logit_cap > 0.0f))
    return set_error(GROKIT_ERR_INVALID, "attention: multiplier %g and logit_cap %g (need finite, cap > 0)",
                     static_cast<double>(sh.multiplier), static_cast<double>(sh.logit_cap));
  if (max_keys < 1 || max_keys > INT32_MAX)
    return set_error(GROKIT_ERR_INVALID, "attention: max_keys %lld out of range (1 to 2^31 - 1)",
                     static_cast<long long>(max_keys));
  if ((reinterpret_cast<uintptr_t>(q) | reinterpret_cast<uintptr_t>(o) | reinterpret_cast<uintptr_t>(rows)) % 8 != 0)
    return set_error(GROKIT_ERR_INVALID, "attention: q, o and rows must be 8-byte aligned");

  attn::Args a;
  a.q = q;
  a.o = o;
  a.rows = rows;
  a.M = M;
  a.max_keys = max_keys;
  a.q_heads = static_cast<int>(sh.q_heads);
  a.kv_heads = static_cast<int>(sh.kv_heads);
  a.group = static_cast<int>(sh.q_heads / sh.kv_heads);
  a.head_dim = static_cast<int>(sh.head_dim);
  a.multiplier = sh.multiplier;
  a.cap = sh.logit_cap;
  a.errors = device_errors_word(as_stream(stream));

  int device = 0;
  if (int rc = check_cuda(cudaGetDevice(&device), "attention: cudaGetDevice")) return rc;
  const int sms = sm_count(device);
  const cudaStream_t st = as_stream(stream);
  const bool decode = M <= attn::kDecodeMaxRows;
  attn::DecodePlan dp{};
  attn::PrefillPlan pp{};
  if (int rc = decode ? attn::decode_plan(a, sms, &dp) : attn::prefill_plan(a, sms, &pp)) return rc;

  Scratch& sc = scratch_for(device, st);
  std::lock_guard<std::mutex> lock(sc.mu);
  if (int rc = reserve(sc, decode ? dp.bytes : pp.bytes, st)) return rc;
  return decode ? attn::decode_run(a, dp, sc.ptr, st) : attn::prefill_run(a, pp, sc.ptr, st);
}

int attention_release_stream(GrokitStream stream) {
  const cudaStream_t st = as_stream(stream);
  int dev = 0;
  if (int rc = check_cuda(cudaGetDevice(&dev), "attention_release_stream: cudaGetDevice"); rc != GROKIT_OK) return rc;
  std::unique_ptr<Scratch> sc;
  {
    std::lock_guard<std::mutex> lock(g_scratch_mu);
    auto it = g_scratch->find({dev, st});
    if (it == g_scratch->end()) return GROKIT_OK;
    sc = std::move(it->second);
    g_scratch->erase(it);
  }
  std::lock_guard<std::mutex> lock(sc->mu);
  int rc = check_cuda(cudaStreamSynchronize(st), "attention_release_stream: cudaStreamSynchronize");
  if (sc->ptr != nullptr) sc->retired.emplace_back(sc->ptr, sc->pooled);
  bool any_pooled = false;
  for (const auto& [p, pooled] : sc->retired) {
    if (rc != GROKIT_OK) break;
    rc = check_cuda(pooled ? cudaFreeAsync(p, st) : cudaFree(p), "attention_release_stream: free");
    any_pooled = any_pooled || pooled;
  }
  if (rc == GROKIT_OK && any_pooled) rc = check_cuda(cudaStreamSynchronize(st), "attention_release_stream: freeing");
  return rc;
}

}  // namespace grokit::kernels::cuda
