// CUDA rope_store (ops.h): rope(q), rope(k) and kv_store(k, v) in one launch.
#pragma once

#include "kernels/ops.h"

namespace grokit::kernels::cuda {

int rope_store(float* q, float* k, const float* v, int64_t M, const int32_t* positions, const GrokitAttnRow* rows,
               const GrokitAttnShape* shape, double base, GrokitStream stream);

}  // namespace grokit::kernels::cuda
