// The residual_norm kernel (residual_norm.h; launched by residual_norm.cu): one block per
// row, the rmsnorm kernel's reduction (rmsnorm_impl.cuh) run twice, so that the bits are
// those of round_bf16, rmsnorm, add_bf16 and rmsnorm launched in turn, in one launch
// instead of four. Also compiles as plain C++ (emulable.cuh) for the host emulation in
// tests.
#pragma once

#include <cstdint>

#include "kernels/cuda/emulable.cuh"
#include "kernels/cuda/rmsnorm_impl.cuh"

namespace grokit::kernels::cuda {

// Every element of x is read and written by one thread, in both passes, with the same
// assignment as the reduction's (float4 groups when kVec): the second reduction reads
// only what its own thread wrote. y may be x (each y element is read before its thread
// writes it, and after the first reduction's barriers). kMode: 0 y as it is, 1 rounded,
// 2 the token's routed rows combined (Combined).
template <bool kVec, int kMode>
GK_KERNEL_T(norm::kThreads, 1)
residual_norm_kernel(const float* y, const float* gates, int64_t top, int64_t M, int64_t D, const float* post, float eps,
                     float* x, const float* next, float* a) {
  GK_SHARED norm::Shared sh;
  const int tid = static_cast<int>(threadIdx.x);
  pdl_trigger();
  pdl_wait();  // y, gates and x are earlier kernels'
  for (int64_t m = blockIdx.x; m < M; m += gridDim.x) {
    float* xr = x + m * D;
    auto body = [&](const auto& src) {
      const float inv = norm::inv_rms<kVec>(src, D, eps, sh);
      auto step = [&](float v, float xv, float s) { return round_bf16(add_rn(xv, norm::scaled(v, inv, s))); };
      if constexpr (kVec) {
        const float4* s4 = reinterpret_cast<const float4*>(post);
        float4* x4 = reinterpret_cast<float4*>(xr);
GK_UNROLL_BY(4)
        for (int64_t i = tid; i < D / 4; i += norm::kThreads) {
          const float4 v = src.get4(i), s = s4[i], o = x4[i];
          x4[i] = make_float4(step(v.x, o.x, s.x), step(v.y, o.y, s.y), step(v.z, o.z, s.z), step(v.w, o.w, s.w));
        }
      } else {
        for (int64_t i = tid; i < D; i += norm::kThreads) xr[i] = step(src.get(i), xr[i], post[i]);
      }
    };
    if constexpr (kMode == 2) body(norm::Combined{y + m * top * D, gates + m * top, top, D});
    else body(norm::Plain<kMode == 1>{y + m * D});
    if (next == nullptr) continue;  // uniform over the block: no barrier is skipped by some threads only
    const float inv2 = norm::inv_rms<kVec>(norm::Plain<false>{xr}, D, eps, sh);
    norm::write_scaled<kVec>(xr, inv2, next, a + m * D, D);
  }
}

}  // namespace grokit::kernels::cuda
