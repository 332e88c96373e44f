// CUDA bf16 rounding (ops.h `round_bf16`): out = bf16(x), round to nearest even.
#pragma once

#include "kernels/ops.h"

namespace grokit::kernels::cuda {

int round_bf16(const float* x, int64_t n, float* out, GrokitStream stream);

}  // namespace grokit::kernels::cuda
