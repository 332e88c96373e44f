// KV-cache store. `rows` is a device array (ops.h: only GrokitWeight, GrokitRouting and
// GrokitAttnShape descriptors are host memory), read by the kernel, so a captured decode
// graph stores at the positions the engine writes into it before each replay.
// A row whose position is outside [0, cap) or whose caches are null is skipped and
// raises GROKIT_DEVERR_KV_ROW (ops.h take_device_errors: the op cannot report it without
// waiting for the device).
#include "kernels/cuda/cuda_util.cuh"
#include "kernels/cuda/kv_store.h"

namespace grokit::kernels::cuda {

namespace {
constexpr int kThreads = 128;
}

// One block per row (grid-stride over M); threads walk the row's kv_heads * dh values
// (adjacent threads, adjacent d of one head: contiguous in source and cache).
static __global__ void __launch_bounds__(kThreads)
    kv_store_kernel(const float* k, const float* v, int64_t M, const GrokitAttnRow* rows, int64_t kv_heads,
                    int64_t dh, unsigned int* errors) {
  const int64_t width = kv_heads * dh;
  for (int64_t m = blockIdx.x; m < M; m += gridDim.x) {
    const GrokitAttnRow r = rows[m];
    if (r.k == nullptr || r.v == nullptr || r.valid == nullptr || r.pos < 0 || static_cast<int64_t>(r.pos) >= r.cap) {
      if (threadIdx.x == 0) raise_device_error(errors, GROKIT_DEVERR_KV_ROW);
      continue;
    }
    const float* ks = k + m * width;
    const float* vs = v + m * width;
    for (int64_t i = threadIdx.x; i < width; i += kThreads) {
      const int64_t h = i / dh, d = i - h * dh;
      const int64_t at = (h * r.cap + r.pos) * dh + d;
      r.k[at] = f32_to_bf16_bits(ks[i]);
      r.v[at] = f32_to_bf16_bits(vs[i]);
    }
    if (threadIdx.x == 0) r.valid[r.pos] = r.token > 0 ? 1 : 0;
  }
}

int kv_store(const float* k, const float* v, int64_t M, const GrokitAttnRow* rows, const GrokitAttnShape* shape,
             GrokitStream stream) {
  if (M < 0) return set_error(GROKIT_ERR_INVALID, "kv_store: M = %lld", static_cast<long long>(M));
  if (shape == nullptr) return set_error(GROKIT_ERR_INVALID, "kv_store: null shape");
  if (shape->q_heads < 1 || shape->kv_heads < 1 || shape->q_heads % shape->kv_heads != 0 || shape->head_dim < 1)
    return set_error(GROKIT_ERR_INVALID,
                     "kv_store: q_heads = %lld, kv_heads = %lld, head_dim = %lld (q_heads must be a positive multiple of "
                     "kv_heads)",
                     static_cast<long long>(shape->q_heads), static_cast<long long>(shape->kv_heads),
                     static_cast<long long>(shape->head_dim));
  if (M == 0) return GROKIT_OK;
  if (k == nullptr || v == nullptr || rows == nullptr) return set_error(GROKIT_ERR_INVALID, "kv_store: null k, v or rows");
  const unsigned grid = static_cast<unsigned>(M < (1 << 20) ? M : (1 << 20));
  kv_store_kernel<<<grid, kThreads, 0, as_stream(stream)>>>(k, v, M, rows, shape->kv_heads, shape->head_dim,
                                                                     device_errors_word(as_stream(stream)));
  return check_launch("kv_store");
}

}  // namespace grokit::kernels::cuda
