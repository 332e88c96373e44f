// The CUDA RMSNorm's kernel and row reduction (rmsnorm.cu launches it), the reduction
// shared with residual_norm so that the fused op gives the bits of the separate ones.
// Internal to kernels/cuda; also compiles as plain C++ (emulable.cuh) for the host
// emulation in tests.
//
// One block of kThreads per row. Each thread sums the squares of its elements in fp32
// (float4 groups i = tid, tid + kThreads, ... when kVec; single elements otherwise), then
// the warps' sums, then the warp totals: not the CPU twin's index order. After that:
//   inv = 1 / sqrt(ss / D + eps),  out = bf16((x * inv) * scale).
#pragma once

#include <cstdint>

#include "kernels/cuda/emulable.cuh"
#if defined(__CUDACC__)
#include "kernels/cuda/cuda_util.cuh"
#else
#include <vector_functions.h>

#include "common/common.h"
#endif

namespace grokit::kernels::cuda::norm {

constexpr int kThreads = 512;  // Grok-1 rows (6144) in 3 float4 per thread, all in flight
constexpr int kWarps = kThreads / 32;

struct Shared {
  float partial[kWarps];
  float total;
};

// Element v as the norm reads it: bf16(v) when kRound (a round_bf16 op before it).
template <bool kRound>
GK_D float input(float v) {
  if constexpr (kRound) return round_bf16(v);
  else return v;
}

// A row as the norm reads it, element i (get) or float4 group i (get4).
template <bool kRound>
struct Plain {
  const float* r;
  GK_D float get(int64_t i) const { return input<kRound>(r[i]); }
  GK_D float4 get4(int64_t i) const {
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
  GK_D float get(int64_t i) const {
    float acc = 0.0f;
    for (int64_t c = 0; c < top; ++c) acc = add_rn(acc, mul_rn(round_bf16(g[c]), y[c * D + i]));
    return round_bf16(acc);
  }
  GK_D float4 get4(int64_t i) const {
    float4 acc = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    for (int64_t c = 0; c < top; ++c) {
      const float gc = round_bf16(g[c]);
      const float4 v = reinterpret_cast<const float4*>(y + c * D)[i];
      acc.x = add_rn(acc.x, mul_rn(gc, v.x));
      acc.y = add_rn(acc.y, mul_rn(gc, v.y));
      acc.z = add_rn(acc.z, mul_rn(gc, v.z));
      acc.w = add_rn(acc.w, mul_rn(gc, v.w));
    }
    return make_float4(round_bf16(acc.x), round_bf16(acc.y), round_bf16(acc.z), round_bf16(acc.w));
  }
};

// The warp's sum by xor butterfly, each add rounded (cuda_util.cuh warp_sum).
GK_D float warp_sum_rn(float v) {
  for (int o = 16; o >= 1; o /= 2) v = add_rn(v, shfl_xor(v, o));
  return v;
}

// inv of the row `src` reads, on every thread of the block. Block-wide (two barriers);
// called once per row by every thread. Reusing `sh` for the next call is safe: its writes
// to `partial` come after every warp passed this call's second barrier, and `total` is
// rewritten only after the next call's first barrier.
template <bool kVec, class Src>
GK_D float inv_rms(const Src& src, int64_t D, float eps, Shared& sh) {
  const int tid = threadIdx.x;
  float ss = 0.0f;
  if constexpr (kVec) {
GK_UNROLL_BY(4)
    for (int64_t i = tid; i < D / 4; i += kThreads) {
      const float4 v = src.get4(i);
      ss = add_rn(ss, mul_rn(v.x, v.x));
      ss = add_rn(ss, mul_rn(v.y, v.y));
      ss = add_rn(ss, mul_rn(v.z, v.z));
      ss = add_rn(ss, mul_rn(v.w, v.w));
    }
  } else {
GK_UNROLL_BY(4)
    for (int64_t i = tid; i < D; i += kThreads) {
      const float v = src.get(i);
      ss = add_rn(ss, mul_rn(v, v));
    }
  }
  ss = warp_sum_rn(ss);
  if ((tid & 31) == 0) sh.partial[tid >> 5] = ss;
  GK_SYNC();
  if (tid < 32) {
    float v = tid < kWarps ? sh.partial[tid] : 0.0f;
    v = warp_sum_rn(v);
    if (tid == 0) sh.total = div_rn(1.0f, sqrt_rn(add_rn(div_rn(v, static_cast<float>(D)), eps)));
  }
  GK_SYNC();
  return sh.total;
}

// One normalized element: bf16((v * inv) * s).
GK_D float scaled(float v, float inv, float s) { return round_bf16(mul_rn(mul_rn(v, inv), s)); }

// out = bf16((xr * inv) * scale) for the row, each element by the thread that summed it.
template <bool kVec>
GK_D void write_scaled(const float* xr, float inv, const float* scale, float* out, int64_t D) {
  const int tid = threadIdx.x;
  if constexpr (kVec) {
    const float4* x4 = reinterpret_cast<const float4*>(xr);
    const float4* s4 = reinterpret_cast<const float4*>(scale);
    float4* o4 = reinterpret_cast<float4*>(out);
GK_UNROLL_BY(4)
    for (int64_t i = tid; i < D / 4; i += kThreads) {
      const float4 a = x4[i], s = s4[i];
      o4[i] = make_float4(scaled(a.x, inv, s.x), scaled(a.y, inv, s.y), scaled(a.z, inv, s.z), scaled(a.w, inv, s.w));
    }
  } else {
    for (int64_t i = tid; i < D; i += kThreads) out[i] = scaled(xr[i], inv, scale[i]);
  }
}

// x and out may alias: every element is read by the thread that writes it, and the
// block's reduction (with its barriers) separates the reads of pass 1 from the writes.
// kVec: D % 4 == 0 and x, scale, out 16-byte aligned (float4 access).
template <bool kVec>
GK_KERNEL_T(kThreads, 1) rmsnorm_kernel(const float* x, int64_t M, int64_t D, const float* scale, float eps, float* out) {
  GK_SHARED Shared sh;
  for (int64_t m = blockIdx.x; m < M; m += gridDim.x) {
    const float* xr = x + m * D;
    const float inv = inv_rms<kVec>(Plain<false>{xr}, D, eps, sh);
    write_scaled<kVec>(xr, inv, scale, out + m * D, D);
  }
}

}  // namespace grokit::kernels::cuda::norm
