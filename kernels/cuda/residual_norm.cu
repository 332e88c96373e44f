// residual_norm: one block per row, the rmsnorm kernel's reduction (rmsnorm_impl.cuh) run
// twice, so that the bits are those of round_bf16, rmsnorm, add_bf16 and rmsnorm launched
// in turn, in one launch instead of four.
#include <type_traits>

#include "kernels/cuda/residual_norm.h"
#include "kernels/cuda/rmsnorm_impl.cuh"

namespace grokit::kernels::cuda {

using norm::kThreads;

// Every element of x is read and written by one thread, in both passes, with the same
// assignment as the reduction's (float4 groups when kVec): the second reduction reads
// only what its own thread wrote. y may be x (each y element is read before its thread
// writes it, and after the first reduction's barriers). kMode: 0 y as it is, 1 rounded,
// 2 the token's routed rows combined (Combined).
template <bool kVec, int kMode>
static __global__ void __launch_bounds__(kThreads, 1)
    residual_norm_kernel(const float* y, const float* gates, int64_t top, int64_t M, int64_t D, const float* post,
                         float eps, float* x, const float* next, float* a) {
  __shared__ norm::Shared sh;
  const int tid = threadIdx.x;
  pdl_trigger();
  pdl_wait();  // y, gates and x are earlier kernels'
  for (int64_t m = blockIdx.x; m < M; m += gridDim.x) {
    float* xr = x + m * D;
    auto body = [&](const auto& src) {
      const float inv = norm::inv_rms<kVec>(src, D, eps, sh);
      auto step = [&](float v, float xv, float s) { return round_bf16(__fadd_rn(xv, norm::scaled(v, inv, s))); };
      if constexpr (kVec) {
        const float4* s4 = reinterpret_cast<const float4*>(post);
        float4* x4 = reinterpret_cast<float4*>(xr);
#pragma unroll 4
        for (int64_t i = tid; i < D / 4; i += kThreads) {
          const float4 v = src.get4(i), s = s4[i], o = x4[i];
          x4[i] = make_float4(step(v.x, o.x, s.x), step(v.y, o.y, s.y), step(v.z, o.z, s.z), step(v.w, o.w, s.w));
        }
      } else {
        for (int64_t i = tid; i < D; i += kThreads) xr[i] = step(src.get(i), xr[i], post[i]);
      }
    };
    if constexpr (kMode == 2) body(norm::Combined{y + m * top * D, gates + m * top, top, D});
    else body(norm::Plain<kMode == 1>{y + m * D});
    if (next == nullptr) continue;  // uniform over the block: no barrier is skipped by some threads only
    const float inv2 = norm::inv_rms<kVec>(norm::Plain<false>{xr}, D, eps, sh);
    norm::write_scaled<kVec>(xr, inv2, next, a + m * D, D);
  }
}

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
