// Attention for few query rows (decode): the plan and the launches of
// attention_decode_device.cuh's kernels.
#include "kernels/cuda/attention_decode_device.cuh"

namespace grokit::kernels::cuda::attn {

int decode_plan(const Args& a, int sms, DecodePlan* p) {
  if (!plan_decode(a, sms, p))
    return set_error(GROKIT_ERR_UNSUPPORTED, "attention: decode grid too large (M * kv_heads * ceil(group / 8) = %lld)",
                     static_cast<long long>(a.M * a.kv_heads * p->hsub));
  return GROKIT_OK;
}

int decode_run(const Args& a, const DecodePlan& p, void* scratch, cudaStream_t stream) {
  auto* base = static_cast<unsigned char*>(scratch);
  float* S = reinterpret_cast<float*>(base + p.off_s);
  float* PM = reinterpret_cast<float*>(base + p.off_pm);
  double* PL = reinterpret_cast<double*>(base + p.off_pl);
  double* P = reinterpret_cast<double*>(base + p.off_p);
  uint32_t* cnt = p.nsplit > 1 ? reinterpret_cast<uint32_t*>(base + p.off_cnt) : nullptr;
  const dim3 grid(static_cast<unsigned>(p.nsplit), static_cast<unsigned>(a.M * a.kv_heads * p.hsub));
  if (int rc = check_cuda(launch_pdl(decode_scores, grid, kThreads, 0, stream, a, p, S, PM, PL, cnt),
                          "attention: decode scores kernel"))
    return rc;
  const cudaError_t e = p.nsplit == 1
                            ? launch_pdl(decode_pv<true>, grid, kThreads, 0, stream, a, p, S, PM, PL, nullptr, nullptr)
                            : launch_pdl(decode_pv<false>, grid, kThreads, 0, stream, a, p, S, PM, PL, P, cnt);
  return check_cuda(e, "attention: decode weighted-sum kernel");
}

}  // namespace grokit::kernels::cuda::attn
