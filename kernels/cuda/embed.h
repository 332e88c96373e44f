// CUDA embedding lookup (ops.h `embed`): rows of a vocabulary-split bf16 table, scaled
// and rounded to bf16; tokens outside this part give zero rows.
#pragma once

#include "kernels/ops.h"

namespace grokit::kernels::cuda {

int embed(const int32_t* tokens, int64_t M, const uint16_t* table, int64_t row_start, int64_t rows, int64_t D,
          float multiplier, float* out, GrokitStream stream);

}  // namespace grokit::kernels::cuda
