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

// A row as the norm reads it, element i (get) or float4 group i (get4).
template <bool kRound>
struct Plain {
  const float* r;
  __device__ __forceinline__ float get(int64_t i) const { return input<kRound>(r[i]); }
  __device__ __forceinline__ float4 get4(int64_t i) const {
    const float4 a = reinterpret_cast<const float4*>(r)[i];
    return make_float4(input<kRound>(a.x), input<kRound>(a.y), input<kRound>(a.z), input<kRound>(a.w));
  }
};
// A token's routed rows combined as moe_combine does: bf16(acc), acc = 0; acc = acc +
// bf16(g_c) * y_c in c order, each product and sum rounded on its own.
struct Combined {
  const float* y;  // the token's first routed row; the others D apart
  const float* g;  // the token's gates [top]
  int64_t top, D;
  __device__ __forceinline__ float get(int64_t i) const {
    float acc = 0.0f;
    for (int64_t c = 0; c < top; ++c) acc = __fadd_rn(acc, __fmul_rn(round_bf16(g[c]), y[c * D + i]));
    return round_bf16(acc);
  }
  __device__ __forceinline__ float4 get4(int64_t i) const {
    float4 acc = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    for (int64_t c = 0; c < top; ++c) {
      const float gc = round_bf16(g[c]);
      const float4 v = reinterpret_cast<const float4*>(y + c * D)[i];
      acc.x = __fadd_rn(acc.x, __fmul_rn(gc, v.x));
      acc.y = __fadd_rn(acc.y, __fmul_rn(gc, v.y));
      acc.z = __fadd_rn(acc.z, __fmul_rn(gc, v.z));
      acc.w = __fadd_rn(acc.w, __fmul_rn(gc, v.w));
    }
    return make_float4(round_bf16(acc.x), round_bf16(acc.y), round_bf16(acc.z), round_bf16(acc.w));
  }
};

// inv of the row `src` reads, on every thread of the block. Block-wide (two barriers);
// called once per row by every thread. Reusing `sh` for the next call is safe: its writes
// to `partial` come after every warp passed this call's second barrier, and `total` is
// rewritten only after the next call's first barrier.
template <bool kVec, class Src>
__device__ __forceinline__ float inv_rms(const Src& src, int64_t D, float eps, Shared& sh) {
  const int tid = threadIdx.x;
  float ss = 0.0f;
  if constexpr (kVec) {
#pragma unroll 4
    for (int64_t i = tid; i < D / 4; i += kThreads) {
      const float4 v = src.get4(i);
      ss = __fadd_rn(ss, __fmul_rn(v.x, v.x));
      ss = __fadd_rn(ss, __fmul_rn(v.y, v.y));
      ss = __fadd_rn(ss, __fmul_rn(v.z, v.z));
      ss = __fadd_rn(ss, __fmul_rn(v.w, v.w));
    }
  } else {
#pragma unroll 4
    for (int64_t i = tid; i < D; i += kThreads) {
      const float v = src.get(i);
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

// out = bf16((xr * inv) * scale) for the row, each element by the thread that summed it.
template <bool kVec>
__device__ __forceinline__ void write_scaled(const float* xr, float inv, const float* scale, float* out, int64_t D) {
  const int tid = threadIdx.x;
  if constexpr (kVec) {
    const float4* x4 = reinterpret_cast<const float4*>(xr);
    const float4* s4 = reinterpret_cast<const float4*>(scale);
    float4* o4 = reinterpret_cast<float4*>(out);
#pragma unroll 4
    for (int64_t i = tid; i < D / 4; i += kThreads) {
      const float4 a = x4[i], s = s4[i];
      o4[i] = make_float4(scaled(a.x, inv, s.x), scaled(a.y, inv, s.y), scaled(a.z, inv, s.z), scaled(a.w, inv, s.w));
    }
  } else {
    for (int64_t i = tid; i < D; i += kThreads) out[i] = scaled(xr[i], inv, scale[i]);
  }
}

}  // namespace grokit::kernels::cuda::norm
