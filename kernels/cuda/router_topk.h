// CUDA MoE router (ops.h `router_topk`): softmax(x @ w) over the experts, top k by
// probability (ties to the lower index), gates not renormalized.
#pragma once

#include "kernels/ops.h"

namespace grokit::kernels::cuda {

int router_topk(const float* x, int64_t M, int64_t D, const float* w, int64_t E, int64_t k, int32_t* experts,
                float* gates, GrokitStream stream);

}  // namespace grokit::kernels::cuda
