// CUDA rotary position embedding (ops.h `rope`), in place on x [M, heads, dh].
#pragma once

#include "kernels/ops.h"

namespace grokit::kernels::cuda {

int rope(float* x, int64_t M, int64_t heads, int64_t dh, const int32_t* positions, double base, GrokitStream stream);

}  // namespace grokit::kernels::cuda
