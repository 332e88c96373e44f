// CUDA RMSNorm (ops.h `rmsnorm`): out = bf16(x * rsqrt(mean(x^2) + eps) * scale), fp32.
#pragma once

#include "kernels/ops.h"

namespace grokit::kernels::cuda {

int rmsnorm(const float* x, int64_t M, int64_t D, const float* scale, float eps, float* out, GrokitStream stream);

}  // namespace grokit::kernels::cuda
