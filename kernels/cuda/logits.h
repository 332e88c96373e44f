// CUDA output projection of a vocabulary part (ops.h `logits`):
// y[m, n] = bf16(bf16(x[m] . E[n]) * multiplier), E bf16 bits [N, D].
#pragma once

#include "kernels/ops.h"

namespace grokit::kernels::cuda {

int logits(const float* x, int64_t M, int64_t D, const uint16_t* table, int64_t N, float multiplier, float* y,
           int64_t ldy, GrokitStream stream);

}  // namespace grokit::kernels::cuda
