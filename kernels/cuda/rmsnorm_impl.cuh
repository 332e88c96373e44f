// The row reduction of the CUDA RMSNorm (rmsnorm.cu), shared with residual_norm.cu so
// that the fused op gives the bits of the separate ones. Internal to kernels/cuda.
//
// One block of kThreads per row. Each thread sums the squares of its elements in fp32
// (float4 groups i = tid, tid + kThreads, ... when kVec; single elements otherwise), then
// the warps' sums, then the warp totals: not the CPU twin's index order. After that:
//   inv = 1 / sqrt(ss / D + eps),  out = bf16((x * inv) * scale).
#pragma once

#include "kernels/cuda/cuda_util.cuh"

namespace grokit::kernels::cuda::norm {

constexpr int kThreads = 512;  // Grok-1 rows (6144) in 3 float4 per thread, all in flight
constexpr int kWarps = kThreads / 32;

struct Shared {
  float partial[kWarps];
  float total;
};

// Element v as the norm reads it: bf16(v) when kRound (a round_bf16 op before it).
template <bool kRound>
__device__ __forceinline__ float input(float v) {
  if constexpr (kRound) return round_bf16(v);
  else return v;
}

// inv of row xr, on every thread of the block. Block-wide (two barriers); called once per
// row by every thread. Reusing `sh` for the next call is safe: its writes to `partial`
// come after every warp passed this call's second barrier, and `total` is rewritten only
// after the next call's first barrier.
template <bool kVec, bool kRound>
__device__ __forceinline__ float inv_rms(const float* xr, int64_t D, float eps, Shared& sh) {
  const int tid = threadIdx.x;
  float ss = 0.0f;
  if constexpr (kVec) {
    const float4* x4 = reinterpret_cast<const float4*>(xr);
#pragma unroll 4
    for (int64_t i = tid; i < D / 4; i += kThreads) {
      const float4 a = x4[i];
      const float v0 = input<kRound>(a.x), v1 = input<kRound>(a.y), v2 = input<kRound>(a.z), v3 = input<kRound>(a.w);
      ss = __fadd_rn(ss, __fmul_rn(v0, v0));
      ss = __fadd_rn(ss, __fmul_rn(v1, v1));
      ss = __fadd_rn(ss, __fmul_rn(v2, v2));
      ss = __fadd_rn(ss, __fmul_rn(v3, v3));
    }
  } else {
#pragma unroll 4
    for (int64_t i = tid; i < D; i += kThreads) {
      const float v = input<kRound>(xr[i]);
      ss = __fadd_rn(ss, __fmul_rn(v, v));
    }
  }
  ss = warp_sum(ss);
  if ((tid & 31) == 0) sh.partial[tid >> 5] = ss;
  __syncthreads();
  if (tid < 32) {
    float v = tid < kWarps ? sh.partial[tid] : 0.0f;
    v = warp_sum(v);
    if (tid == 0) sh.total = __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(__fdiv_rn(v, static_cast<float>(D)), eps)));
  }
  __syncthreads();
  return sh.total;
}

// One normalized element: bf16((v * inv) * s).
__device__ __forceinline__ float scaled(float v, float inv, float s) { return round_bf16(__fmul_rn(__fmul_rn(v, inv), s)); }

}  // namespace grokit::kernels::cuda::norm
