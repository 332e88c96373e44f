// CUDA residual_norm (ops.h): the end of a sublayer and the start of the next in one
// launch: x = bf16(x + rmsnorm(y', post_scale)), then a = rmsnorm(x, next_scale), y' being
// y, bf16(y), or the token's routed rows combined as moe_combine does.
#pragma once

#include "kernels/ops.h"

namespace grokit::kernels::cuda {

int residual_norm(const float* y, const float* gates, int64_t top, int32_t round_y, int64_t M, int64_t D,
                  const float* post_scale, float eps, float* x, const float* next_scale, float* a, GrokitStream stream);

}  // namespace grokit::kernels::cuda
