// The rotation of kernels::rope on the device, shared by rope.cu and rope_store.cu so that
// both give the same bits. Internal to kernels/cuda.
//   inv_freq[j] = fp32(1 / base^(2j/dh)) in double, phase = fp32(position) * inv_freq[j] in
//   fp32, cos and sin of the phase in double rounded to fp32, then
//   x' = bf16(x * cos + rotate_half(x) * sin) with separate fp32 products and sum.
// Also compiles as plain C++ (emulable.cuh) for the host emulation in tests.
#pragma once

#include <cmath>
#include <cstdint>

#include "kernels/cuda/emulable.cuh"
#if defined(__CUDACC__)
#include "kernels/cuda/cuda_util.cuh"
#else
#include "common/common.h"
#endif

namespace grokit::kernels::cuda::rot {

constexpr int kThreads = 256;          // one block per row
constexpr int64_t kMaxHeadDim = 8192;  // cos/sin of a row in dynamic shared memory: 4 * dh bytes

#if defined(__CUDACC__)
// The launchers' common checks of head_dim and base (op names the caller): GROKIT_OK or
// the error, its message set.
inline int check_rotation(const char* op, int64_t dh, double base) {
  if (dh <= 0 || dh % 2 != 0)
    return set_error(GROKIT_ERR_INVALID, "%s: head_dim = %lld (must be even and > 0)", op, static_cast<long long>(dh));
  if (dh > kMaxHeadDim)
    return set_error(GROKIT_ERR_UNSUPPORTED, "%s: head_dim = %lld (at most %lld)", op, static_cast<long long>(dh),
                     static_cast<long long>(kMaxHeadDim));
  if (!(base > 0.0)) return set_error(GROKIT_ERR_INVALID, "%s: base = %g", op, base);
  return GROKIT_OK;
}
#endif

// The row's table: cos in c[0, dh/2), sin in s[0, dh/2), by the block's threads (stride
// `threads`); the caller synchronizes before reading it.
GK_D void table(int32_t position, int64_t dh, double base, float* c, float* s, int threads) {
  const float pos = static_cast<float>(position);
  for (int64_t j = static_cast<int64_t>(threadIdx.x); j < dh / 2; j += threads) {
    const float inv_freq = static_cast<float>(1.0 / pow(base, static_cast<double>(2 * j) / static_cast<double>(dh)));
    const double phase = static_cast<double>(mul_rn(pos, inv_freq));
    c[j] = static_cast<float>(cos(phase));
    s[j] = static_cast<float>(sin(phase));
  }
}

// The pair (x[j], x[j + dh/2]) rotated by table entry j.
GK_D void rotate(float a, float b, float c, float s, float& ra, float& rb) {
  ra = round_bf16(add_rn(mul_rn(a, c), mul_rn(-b, s)));
  rb = round_bf16(add_rn(mul_rn(b, c), mul_rn(a, s)));
}

// Rotates the heads of one row [heads, dh] in place, by the block's threads.
GK_D void rotate_row(float* row, int64_t heads, int64_t dh, const float* c, const float* s,
                                           int threads) {
  const int64_t half = dh / 2;
  for (int64_t i = static_cast<int64_t>(threadIdx.x); i < heads * half; i += threads) {
    const int64_t h = i / half, j = i - h * half;
    float* v = row + h * dh;
    rotate(v[j], v[j + half], c[j], s[j], v[j], v[j + half]);
  }
}

}  // namespace grokit::kernels::cuda::rot
