// CUDA expert combine (ops.h `moe_combine`): out[t] = bf16(sum over the k choices, in
// order, of fp32(bf16(gate)) * y), no fused multiply-add.
#pragma once

#include "kernels/ops.h"

namespace grokit::kernels::cuda {

int moe_combine(const float* y, const float* gates, int64_t M, int64_t k, int64_t D, float* out, GrokitStream stream);

}  // namespace grokit::kernels::cuda
