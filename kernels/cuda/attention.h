// CUDA attention over the KV cache (ops.h `attention`): grouped-query, 30*tanh logit
// cap, fp32 softmax; decode kernels for M <= 64 (each row over its own cache, keys split
// across blocks) and prefill kernels otherwise (tiles of query rows sharing their
// sequence's keys, on tensor cores).
//
// The decode kernels sum in double as the CPU twin does. The prefill kernels take Q.K
// exactly (fp64 tensor cores) and the softmax terms as the twin does, but W.V on bf16
// tensor cores with fp32 accumulation. Both stay within the parity harness's budget of
// the twin, but a row's bits can depend on M (which kernels run, and how the keys are
// split): on CUDA, batched equals alone within that budget, not to the bit.
//
// Launch sizes depend on M, the shape, max_keys and the device only. The op keeps a
// scratch buffer per (device, stream) and grows it outside graph capture; if it would
// have to grow while the stream is being captured, it returns GROKIT_ERR_UNSUPPORTED
// (call it once with the same M, shape and max_keys before capturing).
#pragma once

#include "kernels/ops.h"

namespace grokit::kernels::cuda {

int attention(const float* q, int64_t M, const GrokitAttnRow* rows, int64_t max_keys, const GrokitAttnShape* shape,
              float* o, GrokitStream stream);
// Frees the scratch kept for `stream` on the current device (stream_destroy calls it;
// destroy the graphs captured on the stream first).
int attention_release_stream(GrokitStream stream);

}  // namespace grokit::kernels::cuda
