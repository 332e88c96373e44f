// out[t, d] = bf16(acc), acc = 0; acc = acc + bf16(gates[t, c]) * y[t * k + c, d] for c in
// order, each product and sum rounded on its own: the CPU engine's loop to the bit.
#include "kernels/cuda/cuda_util.cuh"
#include "kernels/cuda/moe_combine.h"

namespace grokit::kernels::cuda {

namespace {
constexpr int kThreads = 256;
}

// grid.y strides over the M tokens, grid.x * blockDim.x over D (coalesced rows of y); a
// thread's columns are the same for every token.
static __global__ void __launch_bounds__(kThreads)
    moe_combine_kernel(const float* y, const float* gates, int64_t M, int64_t k, int64_t D, float* out) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t t = blockIdx.y; t < M; t += gridDim.y) {
    const float* g = gates + t * k;
    const float* yt = y + t * k * D;
    float* o = out + t * D;
    for (int64_t d = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; d < D; d += stride) {
      float acc = 0.0f;
      for (int64_t c = 0; c < k; ++c) acc = __fadd_rn(acc, __fmul_rn(round_bf16(g[c]), yt[c * D + d]));
      o[d] = round_bf16(acc);
    }
  }
}

int moe_combine(const float* y, const float* gates, int64_t M, int64_t k, int64_t D, float* out, GrokitStream stream) {
  if (M < 0) return set_error(GROKIT_ERR_INVALID, "moe_combine: M = %lld", static_cast<long long>(M));
  if (k <= 0) return set_error(GROKIT_ERR_INVALID, "moe_combine: k = %lld", static_cast<long long>(k));
  if (D < 1) return set_error(GROKIT_ERR_INVALID, "moe_combine: D = %lld", static_cast<long long>(D));
  if (M == 0) return GROKIT_OK;
  if (y == nullptr || gates == nullptr || out == nullptr)
    return set_error(GROKIT_ERR_INVALID, "moe_combine: null y, gates or out");
  // out may be y itself (as the host twin allows): out row t then overwrites y row t,
  // which only tokens up to t read. With grid.y = 1 every column is walked by one thread
  // in token order, so each y value is read before it is overwritten.
  const auto ob = reinterpret_cast<uintptr_t>(out), yb = reinterpret_cast<uintptr_t>(y);
  const bool apart = ob + sizeof(float) * static_cast<uint64_t>(M * D) <= yb ||
                     yb + sizeof(float) * static_cast<uint64_t>(M * k * D) <= ob;
  if (!apart && out != y) return set_error(GROKIT_ERR_INVALID, "moe_combine: out overlaps y without being y");
  const int64_t bx = (D + kThreads - 1) / kThreads;
  const int64_t by = apart ? (M < 65535 ? M : 65535) : 1;
  dim3 grid(static_cast<unsigned>(bx < 1024 ? bx : 1024), static_cast<unsigned>(by));
  moe_combine_kernel<<<grid, kThreads, 0, as_stream(stream)>>>(y, gates, M, k, D, out);
  return check_launch("moe_combine");
}

}  // namespace grokit::kernels::cuda
