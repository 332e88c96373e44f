// out = bf16(a + b) elementwise: one fp32 add, then round to nearest even (exactly
// kernels::add_bf16).
#include "kernels/cuda/add_bf16.h"
#include "kernels/cuda/cuda_util.cuh"

namespace grokit::kernels::cuda {

namespace {
constexpr int kThreads = 256;
}

// Grid-stride over n (float4 groups when kVec, then the last n % 4 singly); out may be a
// or b.
template <bool kVec>
static __global__ void __launch_bounds__(kThreads) add_bf16_kernel(const float* a, const float* b, int64_t n, float* out) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  int64_t done = 0;
  if constexpr (kVec) {
    const int64_t n4 = n / 4;
    const float4* a4 = reinterpret_cast<const float4*>(a);
    const float4* b4 = reinterpret_cast<const float4*>(b);
    float4* o4 = reinterpret_cast<float4*>(out);
    for (int64_t i = first; i < n4; i += stride) {
      const float4 x = a4[i], y = b4[i];
      o4[i] = make_float4(round_bf16(__fadd_rn(x.x, y.x)), round_bf16(__fadd_rn(x.y, y.y)),
                          round_bf16(__fadd_rn(x.z, y.z)), round_bf16(__fadd_rn(x.w, y.w)));
    }
    done = n4 * 4;
  }
  for (int64_t i = done + first; i < n; i += stride) out[i] = round_bf16(__fadd_rn(a[i], b[i]));
}

int add_bf16(const float* a, const float* b, int64_t n, float* out, GrokitStream stream) {
  if (n < 0) return set_error(GROKIT_ERR_INVALID, "add_bf16: n = %lld", static_cast<long long>(n));
  if (n == 0) return GROKIT_OK;
  if (a == nullptr || b == nullptr || out == nullptr) return set_error(GROKIT_ERR_INVALID, "add_bf16: null a, b or out");
  if (aligned16(a) && aligned16(b) && aligned16(out))
    add_bf16_kernel<true><<<blocks_for((n + 3) / 4, kThreads), kThreads, 0, as_stream(stream)>>>(a, b, n, out);
  else
    add_bf16_kernel<false><<<blocks_for(n, kThreads), kThreads, 0, as_stream(stream)>>>(a, b, n, out);
  return check_launch("add_bf16");
}

}  // namespace grokit::kernels::cuda
