// Internal to kernels/cuda/attention*.cu: the arguments, plans and the device helpers
// that spell out the CPU twin's numerics (kernels/attention.cpp).
#pragma once

#include "kernels/cuda/cuda_util.cuh"

namespace grokit::kernels::cuda::attn {

constexpr float kMasked = -1e30f;      // the CPU twin's score of a masked key
constexpr int kDecodeMaxRows = 64;     // M at or below this takes the decode path

struct Args {
  const float* q;
  float* o;
  const GrokitAttnRow* rows;
  int64_t M, max_keys;
  int q_heads, kv_heads, group, head_dim;  // group = q_heads / kv_heads
  float multiplier, cap;
  unsigned int* errors;  // device_errors_word(stream)
};

// Decode: grid (nsplit, M * kv_heads * hsub); split s takes keys [s * chunk, (s+1) * chunk).
struct DecodePlan {
  int nsplit, hsub;
  int64_t chunk;
  size_t off_s, off_pm, off_pl, off_p, bytes;  // scratch layout
};
int decode_plan(const Args& a, int sms, DecodePlan* p);
int decode_run(const Args& a, const DecodePlan& p, void* scratch, cudaStream_t stream);

// Prefill: grid (q_heads, ceil(M / 64), nsplit); split s takes keys [s * chunk, (s+1) * chunk).
struct PrefillPlan {
  int nsplit, dhp;
  int64_t chunk, tiles;
  size_t off_stats, off_part, bytes;
};
int prefill_plan(const Args& a, int sms, PrefillPlan* p);
int prefill_run(const Args& a, const PrefillPlan& p, void* scratch, cudaStream_t stream);

// ---- device helpers -----------------------------------------------------------------
__device__ __forceinline__ float neg_inf_f() { return __int_as_float(0xff800000); }
__device__ __forceinline__ double neg_inf_d() { return __longlong_as_double(static_cast<long long>(0xfff0000000000000ULL)); }

// A descriptor the CPU twin refuses: the kernels read nothing outside its cache (none
// with a NULL pointer) and its first block raises GROKIT_DEVERR_ATTN_ROW.
__device__ __forceinline__ bool row_out_of_contract(const GrokitAttnRow& r, int64_t max_keys) {
  return r.k == nullptr || r.v == nullptr || r.valid == nullptr || r.n_keys < 1 || r.n_keys > r.cap ||
         r.n_keys > max_keys || r.pos < 0;
}
// Keys [0, n) of a row, clamped to its cache and to max_keys (the CPU twin requires
// 0 < n_keys <= cap; out-of-range descriptors read nothing outside the cache).
__device__ __forceinline__ int64_t row_keys(const GrokitAttnRow& r, int64_t max_keys) {
  if (r.k == nullptr || r.v == nullptr || r.valid == nullptr) return 0;
  int64_t n = r.n_keys;
  if (n > r.cap) n = r.cap;
  if (n > max_keys) n = max_keys;
  return n < 0 ? 0 : n;
}
// Keys before this are not after the query (may be <= 0).
__device__ __forceinline__ int64_t row_visible_end(const GrokitAttnRow& r, int64_t n) {
  const int64_t e = static_cast<int64_t>(r.pos) + 1;
  return e < n ? e : n;
}

// x = fp32(bf16(dot)) * multiplier.
__device__ __forceinline__ float logit_x(float dot, float mult) { return __fmul_rn(round_bf16(dot), mult); }
// s = cap * fp32(tanh(double(x / cap))): the CPU twin's bits.
__device__ __forceinline__ float cap_logit(float x, float cap) {
  return __fmul_rn(cap, static_cast<float>(::tanh(static_cast<double>(__fdiv_rn(x, cap)))));
}
// e = fp32(exp(double(fp32(s - mx)))).
__device__ __forceinline__ float softmax_num(float s, float mx) {
  return static_cast<float>(::exp(static_cast<double>(__fsub_rn(s, mx))));
}
// w = bf16(e / sum); 0 stays 0 (also when sum is 0: a row without keys).
__device__ __forceinline__ float softmax_weight(float e, float sum) {
  return e == 0.0f ? 0.0f : round_bf16(__fdiv_rn(e, sum));
}
// The fp32 softmax denominator from an (accurate) double sum; a row with no visible key
// sums n ones in fp32 on the CPU, which stops at 2^24.
__device__ __forceinline__ float final_sum(double sum, float mx) {
  const float s = static_cast<float>(sum);
  return mx == kMasked ? fminf(s, 16777216.0f) : s;
}

// o[i] = bf16(fp32(sum over splits of part)), the split partials summed in double.
// part: [rows * heads, nsplit, dh]; o: [rows * heads, dh] (total elements). Grid-stride.
template <class T>
static __global__ void combine_splits(const T* __restrict__ part, int64_t total, int dh, int nsplit,
                                      float* __restrict__ o) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t rh = i / dh;
    const T* p = part + rh * nsplit * dh + (i - rh * dh);
    double t = 0.0;
    for (int s = 0; s < nsplit; ++s) t += static_cast<double>(p[static_cast<int64_t>(s) * dh]);
    o[i] = round_bf16(static_cast<float>(t));
  }
}

}  // namespace grokit::kernels::cuda::attn
