// h = gelu(g) * u, as kernels::gelu_mul (gelu_impl.cuh), so the result is the CPU twin's
// to the bit (up to the last double ulp of tanh deciding an fp32 rounding).
#include "kernels/cuda/cuda_util.cuh"
#include "kernels/cuda/gelu_impl.cuh"
#include "kernels/cuda/gelu_mul.h"

namespace grokit::kernels::cuda {

namespace {
constexpr int kThreads = 256;
}

// Grid-stride over n (float4 groups when kVec, then the last n % 4 singly). h may alias
// g or u: each element is read and written by the same thread.
template <bool kVec>
static __global__ void __launch_bounds__(kThreads) gelu_mul_kernel(const float* g, const float* u, int64_t n, float* h) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  int64_t done = 0;
  if constexpr (kVec) {
    const int64_t n4 = n / 4;
    const float4* g4 = reinterpret_cast<const float4*>(g);
    const float4* u4 = reinterpret_cast<const float4*>(u);
    float4* h4 = reinterpret_cast<float4*>(h);
    for (int64_t i = first; i < n4; i += stride) {
      const float4 a = g4[i], b = u4[i];
      h4[i] = make_float4(gelu_times(a.x, b.x), gelu_times(a.y, b.y), gelu_times(a.z, b.z), gelu_times(a.w, b.w));
    }
    done = n4 * 4;
  }
  for (int64_t i = done + first; i < n; i += stride) h[i] = gelu_times(g[i], u[i]);
}

int gelu_mul(const float* g, const float* u, int64_t n, float* h, GrokitStream stream) {
  if (n < 0) return set_error(GROKIT_ERR_INVALID, "gelu_mul: n = %lld", static_cast<long long>(n));
  if (n == 0) return GROKIT_OK;
  if (g == nullptr || u == nullptr || h == nullptr) return set_error(GROKIT_ERR_INVALID, "gelu_mul: null g, u or h");
  if (aligned16(g) && aligned16(u) && aligned16(h))
    gelu_mul_kernel<true><<<blocks_for((n + 3) / 4, kThreads), kThreads, 0, as_stream(stream)>>>(g, u, n, h);
  else
    gelu_mul_kernel<false><<<blocks_for(n, kThreads), kThreads, 0, as_stream(stream)>>>(g, u, n, h);
  return check_launch("gelu_mul");
}

}  // namespace grokit::kernels::cuda
