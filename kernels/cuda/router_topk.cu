// Router, as kernels::router_topk:
//   logits[e] = fp32(sum_d double(x[d]) * double(w[d, e]))  (products exact in double)
//   p = exp(logit - max) in double rounded to fp32, summed in fp32 in expert order,
//   p[e] / sum in fp32; top k by repeated argmax (strictly greater wins).
// The double sum runs as a tree here and in d order on the CPU; the two differ by double
// rounding only (relative ~D * 2^-53), so the fp32 logits agree except when the exact sum
// lies within that of an fp32 rounding boundary (then by 1 ulp). Everything after the
// logits repeats the CPU's operations in its order.
#include "kernels/cuda/cuda_util.cuh"
#include "kernels/cuda/router_topk.h"
#include "kernels/cuda/widen.h"

namespace grokit::kernels::cuda {

namespace {
constexpr int kMaxThreads = 1024;
constexpr int kMaxExperts = 256;
constexpr int kBatch = 16;
}  // namespace

// One block per row (grid-stride over M) of S * E threads, S = 1024 / E: thread t owns
// expert e = t % E and rows d = t / E, t / E + S, ... of w, so each pass of the block
// reads E * S consecutive floats of w [D, E]. The S partial sums of each expert meet in
// a shared-memory tree; thread 0 then does the softmax and the selection.
static __global__ void __launch_bounds__(kMaxThreads)
    router_kernel(const float* x, int64_t M, int64_t D, const float* w, int E, int k, int32_t* experts,
                  float* gates) {
  __shared__ double red[kMaxThreads];
  __shared__ float p[kMaxExperts];
  __shared__ unsigned char taken[kMaxExperts];
  const int t = threadIdx.x;
  const int S = static_cast<int>(blockDim.x) / E;
  const int e = t % E, s = t / E;
  for (int64_t m = blockIdx.x; m < M; m += gridDim.x) {
    const float* xr = x + m * D;
    // kBatch rows of w in flight per thread (one row in flight made a decode step's
    // router about 26 us of memory latency); any order of the double sum will do.
    double acc[4] = {0.0, 0.0, 0.0, 0.0};
    int64_t d = s;
    for (; d + (kBatch - 1) * static_cast<int64_t>(S) < D; d += kBatch * static_cast<int64_t>(S)) {
      float xv[kBatch], wv[kBatch];
#pragma unroll
      for (int j = 0; j < kBatch; ++j) {
        xv[j] = __ldg(xr + d + j * S);
        wv[j] = __ldg(w + (d + j * S) * E + e);
      }
#pragma unroll
      for (int j = 0; j < kBatch; ++j) acc[j & 3] = fma(widen_f32(xv[j]), widen_f32(wv[j]), acc[j & 3]);
    }
    for (; d < D; d += S) acc[0] = fma(widen_f32(xr[d]), widen_f32(w[d * E + e]), acc[0]);
    red[t] = (acc[0] + acc[1]) + (acc[2] + acc[3]);
    __syncthreads();
    // Fold the upper slots of each expert's S partials onto the lower ones.
    for (int width = S; width > 1;) {
      const int half = (width + 1) / 2;
      if (s < width - half) red[t] = red[t] + red[t + half * E];
      __syncthreads();
      width = half;
    }
    // The exponentials one expert per thread (each a long double-precision chain), then
    // thread 0 sums them in expert order and selects.
    if (t < E) {
      float mx = static_cast<float>(red[0]);
      for (int i = 1; i < E; ++i) {
        const float v = static_cast<float>(red[i]);
        mx = mx < v ? v : mx;
      }
      p[t] = static_cast<float>(exp(static_cast<double>(__fsub_rn(static_cast<float>(red[t]), mx))));
      taken[t] = 0;
    }
    __syncthreads();
    if (t == 0) {
      float sum = 0.0f;
      for (int i = 0; i < E; ++i) sum = __fadd_rn(sum, p[i]);
      for (int i = 0; i < E; ++i) p[i] = __fdiv_rn(p[i], sum);
      for (int c = 0; c < k; ++c) {
        int best = -1;
        for (int i = 0; i < E; ++i) {
          if (!taken[i] && (best < 0 || p[i] > p[best])) best = i;
        }
        taken[best] = 1;
        experts[m * k + c] = best;
        gates[m * k + c] = p[best];
      }
    }
    __syncthreads();  // red, p and taken are reused by the next row
  }
}

int router_topk(const float* x, int64_t M, int64_t D, const float* w, int64_t E, int64_t k, int32_t* experts,
                float* gates, GrokitStream stream) {
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
  const int threads = static_cast<int>(kMaxThreads / E * E);
  const unsigned grid = static_cast<unsigned>(M < (1 << 20) ? M : (1 << 20));
  router_kernel<<<grid, threads, 0, as_stream(stream)>>>(x, M, D, w, static_cast<int>(E), static_cast<int>(k), experts,
                                                         gates);
  return check_launch("router_topk");
}

}  // namespace grokit::kernels::cuda
