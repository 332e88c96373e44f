// Internal to kernels/cuda/attention*.cu: the arguments, plans and the device helpers
// that spell out the CPU twin's numerics (kernels/attention.cpp). Also compiles as plain
// C++ (emulable.cuh) for the host emulation of the kernels in tests: the includer
// then provides round_bf16 (grokit's, common.h) and cuda::raise_device_error.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "kernels/cuda/emulable.cuh"
#include "kernels/ops.h"
#if defined(__CUDACC__)
#include "kernels/cuda/cuda_util.cuh"
#else
#include <driver_types.h>  // cudaStream_t (the launchers' declarations)

#include "common/common.h"
#endif

namespace grokit::kernels::cuda::attn {

#if !defined(__CUDACC__)
using ::grokit::round_bf16;
#endif

GK_D float bits_to_f32(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

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
  size_t off_s, off_pm, off_pl, off_p, off_cnt, bytes;  // scratch layout
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
GK_D float neg_inf_f() { return -INFINITY; }
GK_D double neg_inf_d() { return -static_cast<double>(INFINITY); }

// A descriptor the CPU twin refuses: the kernels read nothing outside its cache (none
// with a NULL pointer) and its first block raises GROKIT_DEVERR_ATTN_ROW.
GK_D bool row_out_of_contract(const GrokitAttnRow& r, int64_t max_keys) {
  return r.k == nullptr || r.v == nullptr || r.valid == nullptr || r.n_keys < 1 || r.n_keys > r.cap ||
         r.n_keys > max_keys || r.pos < 0;
}
// Keys [0, n) of a row, clamped to its cache and to max_keys (the CPU twin requires
// 0 < n_keys <= cap; out-of-range descriptors read nothing outside the cache).
GK_D int64_t row_keys(const GrokitAttnRow& r, int64_t max_keys) {
  if (r.k == nullptr || r.v == nullptr || r.valid == nullptr) return 0;
  int64_t n = r.n_keys;
  if (n > r.cap) n = r.cap;
  if (n > max_keys) n = max_keys;
  return n < 0 ? 0 : n;
}
// Keys before this are not after the query (may be <= 0).
GK_D int64_t row_visible_end(const GrokitAttnRow& r, int64_t n) {
  const int64_t e = static_cast<int64_t>(r.pos) + 1;
  return e < n ? e : n;
}

// x = fp32(bf16(dot)) * multiplier.
GK_D float logit_x(float dot, float mult) { return mul_rn(round_bf16(dot), mult); }
// s = cap * fp32(tanh(double(x / cap))): the CPU twin's bits.
GK_D float cap_logit(float x, float cap) {
  return mul_rn(cap, static_cast<float>(std::tanh(static_cast<double>(div_rn(x, cap)))));
}
// e = fp32(exp(double(fp32(s - mx)))).
GK_D float softmax_num(float s, float mx) {
  return static_cast<float>(std::exp(static_cast<double>(sub_rn(s, mx))));
}
// w = bf16(e / sum); 0 stays 0 (also when sum is 0: a row without keys).
GK_D float softmax_weight(float e, float sum) {
  return e == 0.0f ? 0.0f : round_bf16(div_rn(e, sum));
}
// The fp32 softmax denominator from an (accurate) double sum; a row with no visible key
// sums n ones in fp32 on the CPU, which stops at 2^24.
GK_D float final_sum(double sum, float mx) {
  const float s = static_cast<float>(sum);
  return mx == kMasked ? fminf(s, 16777216.0f) : s;
}

}  // namespace grokit::kernels::cuda::attn
