// CUDA KV-cache store (ops.h `kv_store`): each row's keys and values as bf16 bits at its
// position of its own caches, and the position's valid flag.
#pragma once

#include "kernels/ops.h"

namespace grokit::kernels::cuda {

int kv_store(const float* k, const float* v, int64_t M, const GrokitAttnRow* rows, const GrokitAttnShape* shape,
             GrokitStream stream);

}  // namespace grokit::kernels::cuda
