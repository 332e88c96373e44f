// CUDA MoE router: the launcher of router_device.cuh's kernel, in its decode shape (one
// row per block, x in shared memory up to kMaxXsRow) or its prefill shape (row tiles),
// which give the same bits.
#include "kernels/cuda/cuda_util.cuh"
#include "kernels/cuda/router_device.cuh"
#include "kernels/cuda/router_topk.h"

namespace grokit::kernels::cuda {

int router_topk(const float* x, int64_t M, int64_t D, const float* w, int64_t E, int64_t k, int32_t* experts,
                float* gates, GrokitStream stream) {
  using namespace router;
  if (M < 0) return set_error(GROKIT_ERR_INVALID, "router_topk: M = %lld", static_cast<long long>(M));
  if (D <= 0) return set_error(GROKIT_ERR_INVALID, "router_topk: D = %lld", static_cast<long long>(D));
  if (E <= 0) return set_error(GROKIT_ERR_INVALID, "router_topk: E = %lld", static_cast<long long>(E));
  if (E > kMaxExperts)
    return set_error(GROKIT_ERR_UNSUPPORTED, "router_topk: E = %lld (at most %d)", static_cast<long long>(E),
                     kMaxExperts);
  if (k <= 0 || k > E)
    return set_error(GROKIT_ERR_INVALID, "router_topk: k = %lld (E = %lld)", static_cast<long long>(k),
                     static_cast<long long>(E));
  if (M == 0) return GROKIT_OK;
  if (x == nullptr || w == nullptr || experts == nullptr || gates == nullptr)
    return set_error(GROKIT_ERR_INVALID, "router_topk: null x, w, experts or gates");
  const cudaStream_t st = as_stream(stream);
  constexpr int64_t kMaxGrid = int64_t{1} << 20;  // grid-stride beyond
  const int e32 = static_cast<int>(E), k32 = static_cast<int>(k);
  cudaError_t launched;
  if (M < kTileFrom && D <= kMaxXsRow) {
    const size_t xs = static_cast<size_t>(D) * sizeof(double);
    // Above 48 KiB of dynamic shared memory needs the opt-in (allowed during capture).
    if (int rc = check_cuda(cudaFuncSetAttribute(router_kernel<kRowThreads, 1, true>,
                                                 cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(xs)),
                            "router_topk: shared memory");
        rc != GROKIT_OK)
      return rc;
    launched = launch_pdl(router_kernel<kRowThreads, 1, true>, static_cast<unsigned>(M), kRowThreads, xs, st, x, M, D, w,
                          e32, k32, experts, gates);
  } else if (M < kTileFrom) {
    launched = launch_pdl(router_kernel<kRowThreads, 1>, static_cast<unsigned>(M), kRowThreads, 0, st, x, M, D, w, e32,
                          k32, experts, gates);
  } else {
    const int64_t tiles = (M + kTileRows - 1) / kTileRows;
    launched = launch_pdl(router_kernel<kTileThreads, kTileRows>, static_cast<unsigned>(tiles < kMaxGrid ? tiles : kMaxGrid),
                          kTileThreads, 0, st, x, M, D, w, e32, k32, experts, gates);
  }
  return check_cuda(launched, "router_topk");
}

}  // namespace grokit::kernels::cuda
