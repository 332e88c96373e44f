// CUDA GELU times up (ops.h `gelu_mul`): h = gelu(g) * u in fp32, tanh approximation.
#pragma once

#include "kernels/ops.h"

namespace grokit::kernels::cuda {

int gelu_mul(const float* g, const float* u, int64_t n, float* h, GrokitStream stream);

}  // namespace grokit::kernels::cuda
