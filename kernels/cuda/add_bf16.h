// CUDA residual add (ops.h `add_bf16`): out = bf16(a + b).
#pragma once

#include "kernels/ops.h"

namespace grokit::kernels::cuda {

int add_bf16(const float* a, const float* b, int64_t n, float* out, GrokitStream stream);

}  // namespace grokit::kernels::cuda
