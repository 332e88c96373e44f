// RMSNorm: one block per row. The mean of squares is summed in fp32 by a block-wide tree
// (per-thread partials, then warps, then the warp totals), not in the CPU twin's index
// order; the rest follows kernels::rmsnorm's rounding points exactly:
//   inv = 1 / sqrt(ss / D + eps),  out = bf16((x * inv) * scale).
#include "kernels/cuda/cuda_util.cuh"
#include "kernels/cuda/rmsnorm.h"

namespace grokit::kernels::cuda {

namespace {
constexpr int kThreads = 512;  // Grok-1 rows (6144) in 3 float4 per thread, all in flight
constexpr int kWarps = kThreads / 32;
}  // namespace

// x and out may alias: every element is read by the thread that writes it, and the
// block's reduction (with its barriers) separates the reads of pass 1 from the writes.
// kVec: D % 4 == 0 and x, scale, out 16-byte aligned (float4 access).
template <bool kVec>
static __global__ void __launch_bounds__(kThreads, 1)
    rmsnorm_kernel(const float* x, int64_t M, int64_t D, const float* scale, float eps, float* out) {
  __shared__ float partial[kWarps];
  __shared__ float total;
  const int tid = threadIdx.x;
  for (int64_t m = blockIdx.x; m < M; m += gridDim.x) {
    const float* xr = x + m * D;
    float* orow = out + m * D;
    float ss = 0.0f;
    if constexpr (kVec) {
      const float4* x4 = reinterpret_cast<const float4*>(xr);
#pragma unroll 4
      for (int64_t i = tid; i < D / 4; i += kThreads) {
        float4 a = x4[i];
        ss = __fadd_rn(ss, __fmul_rn(a.x, a.x));
        ss = __fadd_rn(ss, __fmul_rn(a.y, a.y));
        ss = __fadd_rn(ss, __fmul_rn(a.z, a.z));
        ss = __fadd_rn(ss, __fmul_rn(a.w, a.w));
      }
    } else {
#pragma unroll 4
      for (int64_t i = tid; i < D; i += kThreads) ss = __fadd_rn(ss, __fmul_rn(xr[i], xr[i]));
    }
    ss = warp_sum(ss);
    if ((tid & 31) == 0) partial[tid >> 5] = ss;
    __syncthreads();
    if (tid < 32) {
      float v = tid < kWarps ? partial[tid] : 0.0f;
      v = warp_sum(v);
      if (tid == 0) total = __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(__fdiv_rn(v, static_cast<float>(D)), eps)));
    }
    __syncthreads();
    const float inv = total;
    if constexpr (kVec) {
      const float4* x4 = reinterpret_cast<const float4*>(xr);
      const float4* s4 = reinterpret_cast<const float4*>(scale);
      float4* o4 = reinterpret_cast<float4*>(orow);
#pragma unroll 4
      for (int64_t i = tid; i < D / 4; i += kThreads) {
        float4 a = x4[i], s = s4[i];
        float4 r;
        r.x = round_bf16(__fmul_rn(__fmul_rn(a.x, inv), s.x));
        r.y = round_bf16(__fmul_rn(__fmul_rn(a.y, inv), s.y));
        r.z = round_bf16(__fmul_rn(__fmul_rn(a.z, inv), s.z));
        r.w = round_bf16(__fmul_rn(__fmul_rn(a.w, inv), s.w));
        o4[i] = r;
      }
    } else {
      for (int64_t i = tid; i < D; i += kThreads) orow[i] = round_bf16(__fmul_rn(__fmul_rn(xr[i], inv), scale[i]));
    }
    // The next row's pass-1 writes to `partial` come after every warp passed the second
    // barrier above, and `total` is rewritten only after the next row's first barrier.
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
