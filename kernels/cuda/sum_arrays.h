// CUDA sum of device arrays (ops.h `sum_arrays`): the pairwise tree of kernels::tree_sum,
// elementwise over up to 64 arrays (the in-process communicator's reduction).
#pragma once

#include "kernels/ops.h"

namespace grokit::kernels::cuda {

int sum_arrays(const float* const* parts, int count, int64_t n, float* out, GrokitStream stream);

}  // namespace grokit::kernels::cuda
