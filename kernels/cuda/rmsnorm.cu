// RMSNorm: one block per row (the reduction and its order: rmsnorm_impl.cuh); the rest
// follows kernels::rmsnorm's rounding points exactly.
#include "kernels/cuda/rmsnorm.h"
#include "kernels/cuda/rmsnorm_impl.cuh"

namespace grokit::kernels::cuda {

using norm::kThreads;

// x and out may alias: every element is read by the thread that writes it, and the
// block's reduction (with its barriers) separates the reads of pass 1 from the writes.
// kVec: D % 4 == 0 and x, scale, out 16-byte aligned (float4 access).
template <bool kVec>
static __global__ void __launch_bounds__(kThreads, 1)
    rmsnorm_kernel(const float* x, int64_t M, int64_t D, const float* scale, float eps, float* out) {
  __shared__ norm::Shared sh;
  const int tid = threadIdx.x;
  for (int64_t m = blockIdx.x; m < M; m += gridDim.x) {
    const float* xr = x + m * D;
    float* orow = out + m * D;
    const float inv = norm::inv_rms<kVec>(norm::Plain<false>{xr}, D, eps, sh);
    if constexpr (kVec) {
      const float4* x4 = reinterpret_cast<const float4*>(xr);
      const float4* s4 = reinterpret_cast<const float4*>(scale);
      float4* o4 = reinterpret_cast<float4*>(orow);
#pragma unroll 4
      for (int64_t i = tid; i < D / 4; i += kThreads) {
        const float4 a = x4[i], s = s4[i];
        o4[i] = make_float4(norm::scaled(a.x, inv, s.x), norm::scaled(a.y, inv, s.y), norm::scaled(a.z, inv, s.z),
                            norm::scaled(a.w, inv, s.w));
      }
    } else {
      for (int64_t i = tid; i < D; i += kThreads) orow[i] = norm::scaled(xr[i], inv, scale[i]);
    }
  }
}

int rmsnorm(const float* x, int64_t M, int64_t D, const float* scale, float eps, float* out, GrokitStream stream) {
  if (M < 0) return set_error(GROKIT_ERR_INVALID, "rmsnorm: M = %lld", static_cast<long long>(M));
  if (D <= 0) return set_error(GROKIT_ERR_INVALID, "rmsnorm: D = %lld", static_cast<long long>(D));
  if (M == 0) return GROKIT_OK;
  if (x == nullptr || scale == nullptr || out == nullptr)
    return set_error(GROKIT_ERR_INVALID, "rmsnorm: null x, scale or out");
  const unsigned grid = static_cast<unsigned>(M < (1 << 20) ? M : (1 << 20));
  const bool vec = D % 4 == 0 && aligned16(x) && aligned16(scale) && aligned16(out);
  if (vec) rmsnorm_kernel<true><<<grid, kThreads, 0, as_stream(stream)>>>(x, M, D, scale, eps, out);
  else rmsnorm_kernel<false><<<grid, kThreads, 0, as_stream(stream)>>>(x, M, D, scale, eps, out);
  return check_launch("rmsnorm");
}

}  // namespace grokit::kernels::cuda
