// rope_store's launcher (the kernel: rope_store_device.cuh).
#include "kernels/cuda/rope_store.h"
#include "kernels/cuda/rope_store_device.cuh"

namespace grokit::kernels::cuda {

using rot::kThreads;

int rope_store(float* q, float* k, const float* v, int64_t M, const int32_t* positions, const GrokitAttnRow* rows,
               const GrokitAttnShape* shape, double base, GrokitStream stream) {
  if (M < 0) return set_error(GROKIT_ERR_INVALID, "rope_store: M = %lld", static_cast<long long>(M));
  if (shape == nullptr) return set_error(GROKIT_ERR_INVALID, "rope_store: null shape");
  const int64_t dh = shape->head_dim;
  if (shape->q_heads < 1 || shape->kv_heads < 1 || shape->q_heads % shape->kv_heads != 0)
    return set_error(GROKIT_ERR_INVALID, "rope_store: q_heads = %lld, kv_heads = %lld (q_heads a positive multiple of kv_heads)",
                     static_cast<long long>(shape->q_heads), static_cast<long long>(shape->kv_heads));
  if (int rc = rot::check_rotation("rope_store", dh, base); rc != GROKIT_OK) return rc;
  if (M == 0) return GROKIT_OK;
  if (q == nullptr || k == nullptr || v == nullptr || positions == nullptr || rows == nullptr)
    return set_error(GROKIT_ERR_INVALID, "rope_store: null q, k, v, positions or rows");
  const unsigned grid = static_cast<unsigned>(M < (1 << 20) ? M : (1 << 20));
  const size_t smem = sizeof(float) * static_cast<size_t>(dh);
  const cudaStream_t st = as_stream(stream);
  return check_cuda(launch_pdl(rope_store_kernel<>, grid, kThreads, smem, st, q, k, v, M, positions, rows, shape->q_heads,
                                shape->kv_heads, dh, base, device_errors_word(st)),
                     "rope_store");
}

}  // namespace grokit::kernels::cuda
