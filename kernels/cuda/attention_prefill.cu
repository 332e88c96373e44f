// The prefill attention's launches (the kernels and their plan: attention_prefill_device.cuh).
#include "kernels/cuda/attention_prefill_device.cuh"

namespace grokit::kernels::cuda::attn {

namespace {

template <int DHP>
int launch(const Args& a, const PrefillPlan& p, float4* stats, float* part, cudaStream_t stream) {
  using pf::Cfg;
  const dim3 grid(static_cast<unsigned>(a.q_heads), static_cast<unsigned>(p.tiles), static_cast<unsigned>(p.nsplit));
  const size_t sm1 = Cfg<DHP>::smem(false), sm2 = Cfg<DHP>::smem(true);
  // Above 48 KiB needs the opt-in (allowed during stream capture).
  auto opt_in = [](auto kernel, size_t bytes) -> int {
    if (bytes <= 48 * 1024) return GROKIT_OK;
    return check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)),
                      "attention: prefill shared memory");
  };
  if (int rc = opt_in(pf::prefill_kernel<DHP, 0>, sm1)) return rc;
  if (int rc = opt_in(pf::prefill_kernel<DHP, 1>, sm1)) return rc;
  if (int rc = opt_in(pf::prefill_kernel<DHP, 2>, sm2)) return rc;
  pf::prefill_kernel<DHP, 0><<<grid, pf::kThreads, sm1, stream>>>(a, p, stats, part);
  if (int rc = check_launch("attention: prefill max kernel")) return rc;
  pf::prefill_kernel<DHP, 1><<<grid, pf::kThreads, sm1, stream>>>(a, p, stats, part);
  if (int rc = check_launch("attention: prefill sum kernel")) return rc;
  pf::prefill_kernel<DHP, 2><<<grid, pf::kThreads, sm2, stream>>>(a, p, stats, part);
  if (int rc = check_launch("attention: prefill weights kernel")) return rc;
  if (p.nsplit == 1) return GROKIT_OK;
  const int64_t total = a.M * a.q_heads * a.head_dim;
  pf::combine_splits<<<blocks_for(total, pf::kCombineThreads), pf::kCombineThreads, 0, stream>>>(part, total, a.head_dim,
                                                                                               p.nsplit, a.o);
  return check_launch("attention: prefill combine kernel");
}

}  // namespace

int prefill_plan(const Args& a, int sms, PrefillPlan* p) {
  if (!pf::plan(a, sms, p))
    return set_error(GROKIT_ERR_UNSUPPORTED, "attention: prefill grid too large (M = %lld, q_heads = %d)",
                     static_cast<long long>(a.M), a.q_heads);
  return GROKIT_OK;
}

int prefill_run(const Args& a, const PrefillPlan& p, void* scratch, cudaStream_t stream) {
  auto* base = static_cast<unsigned char*>(scratch);
  float4* stats = reinterpret_cast<float4*>(base + p.off_stats);
  float* part = reinterpret_cast<float*>(base + p.off_part);
  switch (p.dhp) {
    case 64: return launch<64>(a, p, stats, part, stream);
    case 128: return launch<128>(a, p, stats, part, stream);
    default: return launch<256>(a, p, stats, part, stream);
  }
}

}  // namespace grokit::kernels::cuda::attn
