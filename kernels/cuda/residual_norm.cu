// residual_norm's launcher (the kernel: residual_norm_device.cuh).
#include <type_traits>

#include "kernels/cuda/residual_norm.h"
#include "kernels/cuda/residual_norm_device.cuh"

namespace grokit::kernels::cuda {

using norm::kThreads;

namespace {
bool overlaps(const float* p, int64_t np, const float* q, int64_t nq) {
  const auto a = reinterpret_cast<uintptr_t>(p), b = reinterpret_cast<uintptr_t>(q);
  return a < b + static_cast<uintptr_t>(nq) * sizeof(float) && b < a + static_cast<uintptr_t>(np) * sizeof(float);
}
}  // namespace

int residual_norm(const float* y, const float* gates, int64_t top, int32_t round_y, int64_t M, int64_t D,
                  const float* post_scale, float eps, float* x, const float* next_scale, float* a, GrokitStream stream) {
  if (M < 0 || D <= 0 || (gates != nullptr && top < 1))
    return set_error(GROKIT_ERR_INVALID, "residual_norm: M = %lld, D = %lld, top = %lld", static_cast<long long>(M),
                     static_cast<long long>(D), static_cast<long long>(top));
  if (M == 0) return GROKIT_OK;
  if (y == nullptr || post_scale == nullptr || x == nullptr || (next_scale != nullptr && a == nullptr))
    return set_error(GROKIT_ERR_INVALID, "residual_norm: a pointer is NULL (y, post_scale, x, or a with next_scale)");
  const int64_t rows = gates != nullptr ? top : 1;  // y rows per token
  if (M > INT64_MAX / D / rows)
    return set_error(GROKIT_ERR_INVALID, "residual_norm: M * D overflows (M = %lld, D = %lld)", static_cast<long long>(M),
                     static_cast<long long>(D));
  if (next_scale != nullptr && (overlaps(a, M * D, y, M * rows * D) || overlaps(a, M * D, x, M * D)))
    return set_error(GROKIT_ERR_INVALID, "residual_norm: a overlaps y or x");
  if (gates != nullptr && overlaps(x, M * D, y, M * rows * D))
    return set_error(GROKIT_ERR_INVALID, "residual_norm: x overlaps the routed rows y");
  const unsigned grid = static_cast<unsigned>(M < (1 << 20) ? M : (1 << 20));
  // The separate ops take float4 access under the same condition (their arrays: y,
  // post_scale; x, next_scale, a), so the per-thread sums match theirs.
  const bool vec = D % 4 == 0 && aligned16(y) && aligned16(post_scale) && aligned16(x) &&
                   (next_scale == nullptr || (aligned16(next_scale) && aligned16(a)));
  const cudaStream_t st = as_stream(stream);
  const int mode = gates != nullptr ? 2 : round_y != 0 ? 1 : 0;
  cudaError_t launched = cudaSuccess;
  auto go = [&](auto kvec, auto kmode) {
    launched = launch_pdl(residual_norm_kernel<decltype(kvec)::value, decltype(kmode)::value>, grid, kThreads, 0, st, y,
                          gates, top, M, D, post_scale, eps, x, next_scale, a);
  };
  using T = std::true_type;
  using F = std::false_type;
  using M0 = std::integral_constant<int, 0>;
  using M1 = std::integral_constant<int, 1>;
  using M2 = std::integral_constant<int, 2>;
  if (vec) {
    if (mode == 2) go(T{}, M2{});
    else if (mode == 1) go(T{}, M1{});
    else go(T{}, M0{});
  } else {
    if (mode == 2) go(F{}, M2{});
    else if (mode == 1) go(F{}, M1{});
    else go(F{}, M0{});
  }
  return check_cuda(launched, "residual_norm");
}

}  // namespace grokit::kernels::cuda
