// rope_store: one block per row computes the row's rotation table once (rope_impl.cuh),
// rotates the query heads, then the key heads, storing each rotated key with its value in
// the row's cache as kv_store does: the bits of rope, rope and kv_store in turn. A row
// whose position is outside [0, cap) or whose caches are null is rotated but not stored,
// and raises GROKIT_DEVERR_KV_ROW (as kv_store).
#include "kernels/cuda/rope_impl.cuh"
#include "kernels/cuda/rope_store.h"

namespace grokit::kernels::cuda {

using rot::kThreads;

static __global__ void __launch_bounds__(kThreads)
    rope_store_kernel(float* q, float* k, const float* v, int64_t M, const int32_t* positions, const GrokitAttnRow* rows,
                      int64_t q_heads, int64_t kv_heads, int64_t dh, double base, unsigned int* errors) {
  extern __shared__ float cs[];  // cos [half], then sin [half]
  const int64_t half = dh / 2;
  pdl_trigger();
  pdl_wait();  // q, k and v are earlier kernels'
  float* c = cs;
  float* s = cs + half;
  for (int64_t m = blockIdx.x; m < M; m += gridDim.x) {
    rot::table(positions[m], dh, base, c, s, kThreads);
    __syncthreads();
    rot::rotate_row(q + m * q_heads * dh, q_heads, dh, c, s, kThreads);
    const GrokitAttnRow r = rows[m];
    const bool store =
        r.k != nullptr && r.v != nullptr && r.valid != nullptr && r.pos >= 0 && static_cast<int64_t>(r.pos) < r.cap;
    if (!store && threadIdx.x == 0) raise_device_error(errors, GROKIT_DEVERR_KV_ROW);
    float* krow = k + m * kv_heads * dh;
    const float* vrow = v + m * kv_heads * dh;
    for (int64_t i = threadIdx.x; i < kv_heads * half; i += kThreads) {
      const int64_t h = i / half, j = i - h * half;
      float* kv = krow + h * dh;
      float a, b;
      rot::rotate(kv[j], kv[j + half], c[j], s[j], a, b);
      kv[j] = a;
      kv[j + half] = b;
      if (store) {
        const int64_t at = (h * r.cap + r.pos) * dh;
        r.k[at + j] = f32_to_bf16_bits(a);
        r.k[at + j + half] = f32_to_bf16_bits(b);
        r.v[at + j] = f32_to_bf16_bits(vrow[h * dh + j]);
        r.v[at + j + half] = f32_to_bf16_bits(vrow[h * dh + j + half]);
      }
    }
    if (store && threadIdx.x == 0) r.valid[r.pos] = r.token > 0 ? 1 : 0;
    __syncthreads();  // the table is rewritten for the next row
  }
}

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
  return check_cuda(launch_pdl(rope_store_kernel, grid, kThreads, smem, st, q, k, v, M, positions, rows, shape->q_heads,
                                shape->kv_heads, dh, base, device_errors_word(st)),
                     "rope_store");
}

}  // namespace grokit::kernels::cuda
