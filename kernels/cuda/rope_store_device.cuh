// The rope_store kernel (rope_store.h; launched by rope_store.cu): one block per row
// computes the row's rotation table once (rope_impl.cuh), rotates the query heads, then
// the key heads, storing each rotated key with its value in the row's cache as kv_store
// does: the bits of rope, rope and kv_store in turn. A row whose position is outside
// [0, cap) or whose caches are null is rotated but not stored, and raises
// GROKIT_DEVERR_KV_ROW (as kv_store). Also compiles as plain C++ (emulable.cuh) for the
// host emulation in tests.
#pragma once

#include <cstdint>

#include "kernels/cuda/emulable.cuh"
#include "kernels/cuda/rope_impl.cuh"
#include "kernels/ops.h"

namespace grokit::kernels::cuda {

template <int kUnused = 0>
GK_KERNEL_T(rot::kThreads, 1)
rope_store_kernel(float* q, float* k, const float* v, int64_t M, const int32_t* positions, const GrokitAttnRow* rows,
                  int64_t q_heads, int64_t kv_heads, int64_t dh, double base, unsigned int* errors) {
  float* cs = dyn_smem();  // cos [half], then sin [half]
  const int64_t half = dh / 2;
  pdl_trigger();
  pdl_wait();  // q, k and v are earlier kernels'
  float* c = cs;
  float* s = cs + half;
  for (int64_t m = blockIdx.x; m < M; m += gridDim.x) {
    rot::table(positions[m], dh, base, c, s, rot::kThreads);
    GK_SYNC();
    rot::rotate_row(q + m * q_heads * dh, q_heads, dh, c, s, rot::kThreads);
    const GrokitAttnRow r = rows[m];
    const bool store =
        r.k != nullptr && r.v != nullptr && r.valid != nullptr && r.pos >= 0 && static_cast<int64_t>(r.pos) < r.cap;
    if (!store && threadIdx.x == 0) raise_device_error(errors, GROKIT_DEVERR_KV_ROW);
    float* krow = k + m * kv_heads * dh;
    const float* vrow = v + m * kv_heads * dh;
    for (int64_t i = static_cast<int64_t>(threadIdx.x); i < kv_heads * half; i += rot::kThreads) {
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
    GK_SYNC();  // the table is rewritten for the next row
  }
}

}  // namespace grokit::kernels::cuda
