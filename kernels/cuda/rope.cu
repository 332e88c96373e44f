// RoPE on split halves, as kernels::rope (the rotation: rope_impl.cuh), so the result is
// the CPU twin's to the bit (up to the last double ulp of the library's pow/sin/cos deciding
// an fp32 rounding, ~2^-28 per value).
#include "kernels/cuda/rope.h"
#include "kernels/cuda/rope_impl.cuh"

namespace grokit::kernels::cuda {

using rot::kThreads;

// One block per row (grid-stride over M): the row's half-dim cos/sin table goes to shared
// memory once, then the block rotates all heads of the row (adjacent threads, adjacent j).
static __global__ void __launch_bounds__(kThreads)
    rope_kernel(float* x, int64_t M, int64_t heads, int64_t dh, const int32_t* positions, double base) {
  extern __shared__ float cs[];  // cos [half], then sin [half]
  float* c = cs;
  float* s = cs + dh / 2;
  for (int64_t m = blockIdx.x; m < M; m += gridDim.x) {
    rot::table(positions[m], dh, base, c, s, kThreads);
    __syncthreads();
    rot::rotate_row(x + m * heads * dh, heads, dh, c, s, kThreads);
    __syncthreads();  // the table is rewritten for the next row
  }
}

int rope(float* x, int64_t M, int64_t heads, int64_t dh, const int32_t* positions, double base, GrokitStream stream) {
  if (M < 0) return set_error(GROKIT_ERR_INVALID, "rope: M = %lld", static_cast<long long>(M));
  if (heads <= 0) return set_error(GROKIT_ERR_INVALID, "rope: heads = %lld", static_cast<long long>(heads));
  if (int rc = rot::check_rotation("rope", dh, base); rc != GROKIT_OK) return rc;
  if (M == 0) return GROKIT_OK;
  if (x == nullptr || positions == nullptr) return set_error(GROKIT_ERR_INVALID, "rope: null x or positions");
  const unsigned grid = static_cast<unsigned>(M < (1 << 20) ? M : (1 << 20));
  const size_t smem = sizeof(float) * static_cast<size_t>(dh);
  rope_kernel<<<grid, kThreads, smem, as_stream(stream)>>>(x, M, heads, dh, positions, base);
  return check_launch("rope");
}

}  // namespace grokit::kernels::cuda
