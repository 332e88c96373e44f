// CUDA attention over the KV cache (ops.h `attention`): grouped-query, 30*tanh logit
// cap, fp32 softmax; one kernel for decode (few rows, keys split across blocks) and one
// for prefill (tiles of query rows sharing their sequence's keys).
#pragma once

#include "kernels/ops.h"

namespace grokit::kernels::cuda {

int attention(const float* q, int64_t M, const GrokitAttnRow* rows, int64_t max_keys, const GrokitAttnShape* shape,
              float* o, GrokitStream stream);

}  // namespace grokit::kernels::cuda
