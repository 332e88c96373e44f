// out = bf16(x) elementwise, exactly kernels::round_to_bf16 (NaN stays a quiet NaN).
#include "kernels/cuda/cuda_util.cuh"
#include "kernels/cuda/round_bf16.h"

namespace grokit::kernels::cuda {

namespace {
constexpr int kThreads = 256;
}

// Grid-stride over n (float4 groups when kVec, then the last n % 4 singly); out may be x.
template <bool kVec>
static __global__ void __launch_bounds__(kThreads) round_bf16_kernel(const float* x, int64_t n, float* out) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  int64_t done = 0;
  if constexpr (kVec) {
    const int64_t n4 = n / 4;
    const float4* x4 = reinterpret_cast<const float4*>(x);
    float4* o4 = reinterpret_cast<float4*>(out);
    for (int64_t i = first; i < n4; i += stride) {
      const float4 a = x4[i];
      o4[i] = make_float4(round_bf16(a.x), round_bf16(a.y), round_bf16(a.z), round_bf16(a.w));
    }
    done = n4 * 4;
  }
  for (int64_t i = done + first; i < n; i += stride) out[i] = round_bf16(x[i]);
}

int round_bf16(const float* x, int64_t n, float* out, GrokitStream stream) {
  if (n < 0) return set_error(GROKIT_ERR_INVALID, "round_bf16: n = %lld", static_cast<long long>(n));
  if (n == 0) return GROKIT_OK;
  if (x == nullptr || out == nullptr) return set_error(GROKIT_ERR_INVALID, "round_bf16: null x or out");
  if (aligned16(x) && aligned16(out))
    round_bf16_kernel<true><<<blocks_for((n + 3) / 4, kThreads), kThreads, 0, as_stream(stream)>>>(x, n, out);
  else
    round_bf16_kernel<false><<<blocks_for(n, kThreads), kThreads, 0, as_stream(stream)>>>(x, n, out);
  return check_launch("round_bf16");
}

}  // namespace grokit::kernels::cuda
