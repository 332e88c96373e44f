// RMSNorm's launcher: one block per row (the kernel, its reduction and its order:
// rmsnorm_impl.cuh); the rest follows kernels::rmsnorm's rounding points exactly.
#include "kernels/cuda/rmsnorm.h"
#include "kernels/cuda/rmsnorm_impl.cuh"

namespace grokit::kernels::cuda {

using norm::kThreads;

int rmsnorm(const float* x, int64_t M, int64_t D, const float* scale, float eps, float* out, GrokitStream stream) {
  if (M < 0) return set_error(GROKIT_ERR_INVALID, "rmsnorm: M = %lld", static_cast<long long>(M));
  if (D <= 0) return set_error(GROKIT_ERR_INVALID, "rmsnorm: D = %lld", static_cast<long long>(D));
  if (M == 0) return GROKIT_OK;
  if (x == nullptr || scale == nullptr || out == nullptr)
    return set_error(GROKIT_ERR_INVALID, "rmsnorm: null x, scale or out");
  const unsigned grid = static_cast<unsigned>(M < (1 << 20) ? M : (1 << 20));
  const bool vec = D % 4 == 0 && aligned16(x) && aligned16(scale) && aligned16(out);
  if (vec) norm::rmsnorm_kernel<true><<<grid, kThreads, 0, as_stream(stream)>>>(x, M, D, scale, eps, out);
  else norm::rmsnorm_kernel<false><<<grid, kThreads, 0, as_stream(stream)>>>(x, M, D, scale, eps, out);
  return check_launch("rmsnorm");
}

}  // namespace grokit::kernels::cuda
