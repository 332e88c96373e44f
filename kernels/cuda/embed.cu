// Embedding lookup: out[m, d] = bf16(E[tok - row_start, d] * multiplier), or 0.
#include "kernels/cuda/cuda_util.cuh"
#include "kernels/cuda/embed.h"

namespace grokit::kernels::cuda {

namespace {
constexpr int kThreads = 256;
}

// grid.y strides over the M rows (the token is read once per row), grid.x * blockDim.x
// over the D columns (adjacent threads, adjacent columns).
static __global__ void __launch_bounds__(kThreads)
    embed_kernel(const int32_t* tokens, int64_t M, const uint16_t* table, int64_t row_start, int64_t rows, int64_t D,
                 float multiplier, float* out) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t m = blockIdx.y; m < M; m += gridDim.y) {
    const int64_t t = static_cast<int64_t>(tokens[m]) - row_start;
    const bool here = t >= 0 && t < rows;
    const uint16_t* e = table + (here ? t : 0) * D;
    float* o = out + m * D;
    for (int64_t d = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; d < D; d += stride)
      o[d] = here ? round_bf16(__fmul_rn(bf16_bits_to_f32(e[d]), multiplier)) : 0.0f;
  }
}

int embed(const int32_t* tokens, int64_t M, const uint16_t* table, int64_t row_start, int64_t rows, int64_t D,
          float multiplier, float* out, GrokitStream stream) {
  if (M < 0) return set_error(GROKIT_ERR_INVALID, "embed: M = %lld", static_cast<long long>(M));
  if (D < 1) return set_error(GROKIT_ERR_INVALID, "embed: D = %lld", static_cast<long long>(D));
  if (rows < 0) return set_error(GROKIT_ERR_INVALID, "embed: rows = %lld", static_cast<long long>(rows));
  if (M == 0) return GROKIT_OK;
  if (tokens == nullptr || out == nullptr) return set_error(GROKIT_ERR_INVALID, "embed: null tokens or out");
  if (rows > 0 && table == nullptr) return set_error(GROKIT_ERR_INVALID, "embed: null table with %lld rows",
                                                     static_cast<long long>(rows));
  const int64_t bx = (D + kThreads - 1) / kThreads;
  dim3 grid(static_cast<unsigned>(bx < 1024 ? bx : 1024), static_cast<unsigned>(M < 65535 ? M : 65535));
  embed_kernel<<<grid, kThreads, 0, as_stream(stream)>>>(tokens, M, table, row_start, rows, D, multiplier, out);
  return check_launch("embed");
}

}  // namespace grokit::kernels::cuda
