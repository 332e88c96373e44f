// CUDA weight products (ops.h `matmul`, `prepare_weight`): weight-only decode kernels
// that stream int8, int4, fp8 and bf16 weights (batch 1 to 16, experts chosen on the
// device), and a tensor-core path for prefill.
#pragma once

#include "kernels/ops.h"

namespace grokit::kernels::cuda {

uint64_t prepare_scratch_bytes(const GrokitWeight* w);
int prepare_weight(GrokitWeight* w, void* scratch, GrokitStream stream);
int matmul(const GrokitWeight* w, const float* x, int64_t M, int64_t ldx, int32_t x_fp32, const GrokitRouting* routing,
           float* y, int64_t ldy, GrokitStream stream);

}  // namespace grokit::kernels::cuda
