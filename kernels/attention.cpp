// Grouped-query attention over a KV cache, with the 30*tanh(x/30) logit cap.
#include <vector>

#include "kernels/internal.h"
#include "kernels/vmath.h"

// GCC 12's avx512fintrin.h trips -Wmaybe-uninitialized on its own _mm512_undefined values.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif

namespace grokit::kernels {
namespace {
using namespace detail;

constexpr float kMasked = -1e30f;

float dot_bf16_ref(const float* q, const uint16_t* k, int64_t dh) {
  double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (int64_t d = 0; d < dh; ++d) acc[d % 8] += static_cast<double>(q[d]) * static_cast<double>(bf16f(k[d]));
  return static_cast<float>(combine8(acc));
}

GROKIT_AVX2 float dot_bf16_avx2(const float* q, const uint16_t* k, int64_t dh) {
  __m256d lo = _mm256_setzero_pd(), hi = _mm256_setzero_pd();
  int64_t d8 = dh / 8 * 8;
  for (int64_t d = 0; d < d8; d += 8) fma8_pd(_mm256_loadu_ps(q + d), load_bf16x8(k + d), lo, hi);
  double lanes[8];
  store8_pd(lo, hi, lanes);
  for (int64_t d = d8; d < dh; ++d) lanes[d % 8] += static_cast<double>(q[d]) * static_cast<double>(bf16f(k[d]));
  return static_cast<float>(combine8(lanes));
}

// Four keys at once (k, k + dh, ...), q converted to double once per head: eight
// independent chains in flight (one key's two leave the core waiting on the fma latency);
// each key's sum exactly dot_bf16_avx2's.
GROKIT_AVX2 void dot4_bf16_avx2(const double* qd, const uint16_t* k, int64_t dh, float* out) {
  __m256d lo[4], hi[4];
  for (int r = 0; r < 4; ++r) lo[r] = hi[r] = _mm256_setzero_pd();
  const int64_t d8 = dh / 8 * 8;
  for (int64_t d = 0; d < d8; d += 8) {
    const __m256d ql = _mm256_loadu_pd(qd + d), qh = _mm256_loadu_pd(qd + d + 4);
    for (int r = 0; r < 4; ++r) {
      const __m256 kf = load_bf16x8(k + r * dh + d);
      lo[r] = _mm256_fmadd_pd(ql, _mm256_cvtps_pd(_mm256_castps256_ps128(kf)), lo[r]);
      hi[r] = _mm256_fmadd_pd(qh, _mm256_cvtps_pd(_mm256_extractf128_ps(kf, 1)), hi[r]);
    }
  }
  for (int r = 0; r < 4; ++r) {
    double lanes[8];
    store8_pd(lo[r], hi[r], lanes);
    for (int64_t d = d8; d < dh; ++d) lanes[d % 8] += qd[d] * static_cast<double>(bf16f(k[r * dh + d]));
    out[r] = static_cast<float>(combine8(lanes));
  }
}

// The same eight lanes in one AVX-512 register, q converted to double once per head.
GROKIT_AVX512 float dot_bf16_avx512(const double* qd, const uint16_t* k, int64_t dh) {
  __m512d acc = _mm512_setzero_pd();
  const int64_t d8 = dh / 8 * 8;
  for (int64_t d = 0; d < d8; d += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(k + d));
    const __m256 kf = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    acc = _mm512_fmadd_pd(_mm512_loadu_pd(qd + d), _mm512_cvtps_pd(kf), acc);
  }
  double lanes[8];
  _mm512_storeu_pd(lanes, acc);
  for (int64_t d = d8; d < dh; ++d) lanes[d % 8] += qd[d] * static_cast<double>(bf16f(k[d]));
  return static_cast<float>(combine8(lanes));
}

// Four keys at once (k, k + dh, ...; four independent chains in flight), each key's sum
// exactly dot_bf16_avx512's.
GROKIT_AVX512 void dot4_bf16_avx512(const double* qd, const uint16_t* k, int64_t dh, float* out) {
  __m512d acc[4] = {_mm512_setzero_pd(), _mm512_setzero_pd(), _mm512_setzero_pd(), _mm512_setzero_pd()};
  const int64_t d8 = dh / 8 * 8;
  for (int64_t d = 0; d < d8; d += 8) {
    const __m512d qv = _mm512_loadu_pd(qd + d);
    for (int r = 0; r < 4; ++r) {
      const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(k + r * dh + d));
      const __m256 kf = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
      acc[r] = _mm512_fmadd_pd(qv, _mm512_cvtps_pd(kf), acc[r]);
    }
  }
  for (int r = 0; r < 4; ++r) {
    double lanes[8];
    _mm512_storeu_pd(lanes, acc[r]);
    for (int64_t d = d8; d < dh; ++d) lanes[d % 8] += qd[d] * static_cast<double>(bf16f(k[r * dh + d]));
    out[r] = static_cast<float>(combine8(lanes));
  }
}

// Four queries (qd, qd + qstride, ...) against four keys (k, k + dh, ...): each key is
// converted once for the four queries; every (query, key) sum exactly dot_bf16_avx512's.
GROKIT_AVX512 void dot4x4_bf16_avx512(const double* qd, int64_t qstride, const uint16_t* k, int64_t dh,
                                      float out[4][4]) {
  __m512d acc[4][4];
  for (int a = 0; a < 4; ++a)
    for (int r = 0; r < 4; ++r) acc[a][r] = _mm512_setzero_pd();
  const int64_t d8 = dh / 8 * 8;
  for (int64_t d = 0; d < d8; d += 8) {
    __m512d kv[4];
    for (int r = 0; r < 4; ++r) {
      const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(k + r * dh + d));
      kv[r] = _mm512_cvtps_pd(_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)));
    }
    for (int a = 0; a < 4; ++a) {
      const __m512d qv = _mm512_loadu_pd(qd + a * qstride + d);
      for (int r = 0; r < 4; ++r) acc[a][r] = _mm512_fmadd_pd(qv, kv[r], acc[a][r]);
    }
  }
  for (int a = 0; a < 4; ++a) {
    for (int r = 0; r < 4; ++r) {
      double lanes[8];
      _mm512_storeu_pd(lanes, acc[a][r]);
      for (int64_t d = d8; d < dh; ++d) lanes[d % 8] += qd[a * qstride + d] * static_cast<double>(bf16f(k[r * dh + d]));
      out[a][r] = static_cast<float>(combine8(lanes));
    }
  }
}

// acc[d] += w * v[d] in double, key after key.
void accumulate_ref(float w, const uint16_t* v, int64_t dh, double* acc) {
  for (int64_t d = 0; d < dh; ++d) acc[d] += static_cast<double>(w) * static_cast<double>(bf16f(v[d]));
}

GROKIT_AVX2 void accumulate_avx2(float w, const uint16_t* v, int64_t dh, double* acc) {
  __m256 wv = _mm256_set1_ps(w);
  int64_t d8 = dh / 8 * 8;
  for (int64_t d = 0; d < d8; d += 8) {
    __m256d lo = _mm256_loadu_pd(acc + d), hi = _mm256_loadu_pd(acc + d + 4);
    fma8_pd(wv, load_bf16x8(v + d), lo, hi);
    store8_pd(lo, hi, acc + d);
  }
  for (int64_t d = d8; d < dh; ++d) acc[d] += static_cast<double>(w) * static_cast<double>(bf16f(v[d]));
}

// The logit cap and the softmax's exp over a row of scores, as one_head's scalar loops
// compute them (s = cap * tanh_f(s / cap) for every unmasked s; e = exp_f(s - mx)), in
// double lanes (vmath.h). A masked score is exactly kMasked, which no capped score is.
void cap_scores_ref(float* s, int64_t a, int64_t n, float cap) {
  for (int64_t j = a; j < n; ++j)
    if (s[j] != kMasked) s[j] = cap * tanh_f(s[j] / cap);
}
void exp_scores_ref(float* s, int64_t a, int64_t n, float mx) {
  for (int64_t j = a; j < n; ++j) s[j] = exp_f(s[j] - mx);
}
template <class F, class D, class U, int kLanes>
GROKIT_VMATH void cap_exp_lanes(float* s, int64_t n, float cap, float mx, bool do_exp) {
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    F v;
    std::memcpy(&v, s + j, sizeof v);
    F out;
    if (do_exp) {
      out = __builtin_convertvector(exp_lanes<D, U>(__builtin_convertvector(v - mx, D)), F);
    } else {
      const F t = __builtin_convertvector(tanh_lanes<D, U>(__builtin_convertvector(v / cap, D)), F);
      out = v == kMasked ? v : cap * t;
    }
    std::memcpy(s + j, &out, sizeof out);
  }
  if (do_exp) exp_scores_ref(s, j, n, mx);
  else cap_scores_ref(s, j, n, cap);
}
GROKIT_AVX512 void cap_exp_avx512(float* s, int64_t n, float cap, float mx, bool do_exp) {
  cap_exp_lanes<f32x8, f64x8, u64x8, 8>(s, n, cap, mx, do_exp);
}
GROKIT_AVX2 void cap_exp_avx2(float* s, int64_t n, float cap, float mx, bool do_exp) {
  cap_exp_lanes<f32x4, f64x4, u64x4, 4>(s, n, cap, mx, do_exp);
}
}  // namespace

void detail::attention_cap_scores(float* s, int64_t n, float cap, bool simd) {
  if (simd && use_avx512()) return cap_exp_avx512(s, n, cap, 0.0f, false);
  if (simd && use_avx2()) return cap_exp_avx2(s, n, cap, 0.0f, false);
  cap_scores_ref(s, 0, n, cap);
}
void detail::attention_exp_scores(float* s, int64_t n, float mx, bool simd) {
  if (simd && use_avx512()) return cap_exp_avx512(s, n, 0.0f, mx, true);
  if (simd && use_avx2()) return cap_exp_avx2(s, n, 0.0f, mx, true);
  exp_scores_ref(s, 0, n, mx);
}

namespace {

GROKIT_AVX512 void accumulate_avx512(float w, const uint16_t* v, int64_t dh, double* acc) {
  const __m512d wv = _mm512_set1_pd(static_cast<double>(w));
  const int64_t d8 = dh / 8 * 8;
  for (int64_t d = 0; d < d8; d += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(v + d));
    const __m256 vf = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    _mm512_storeu_pd(acc + d, _mm512_fmadd_pd(wv, _mm512_cvtps_pd(vf), _mm512_loadu_pd(acc + d)));
  }
  for (int64_t d = d8; d < dh; ++d) acc[d] += static_cast<double>(w) * static_cast<double>(bf16f(v[d]));
}

// The whole weighted sum of one head with head_dim 128 (Grok-1's): the 16 double vectors of
// acc stay in registers over the keys (acc[d] += w_j v_j[d], key after key, as
// accumulate_avx512 does with acc in memory). w[j] as one_head computes them; a zero w adds
// nothing and is skipped, as there.
GROKIT_AVX512 void weighted_sum128_avx512(const float* scores, float sum, const uint16_t* v, int64_t end, double* acc) {
  constexpr int kVecs = 16;
  __m512d a[kVecs];
  for (int i = 0; i < kVecs; ++i) a[i] = _mm512_setzero_pd();
  for (int64_t j = 0; j < end; ++j) {
    const float w = round_bf16(scores[j] / sum);
    if (w == 0.0f) continue;
    const __m512d wv = _mm512_set1_pd(static_cast<double>(w));
    const uint16_t* vr = v + j * 128;
    for (int i = 0; i < kVecs; ++i) {
      const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(vr + 8 * i));
      const __m256 vf = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
      a[i] = _mm512_fmadd_pd(wv, _mm512_cvtps_pd(vf), a[i]);
    }
  }
  for (int i = 0; i < kVecs; ++i) _mm512_storeu_pd(acc + 8 * i, a[i]);
}

// kSimd: 0 the scalar twin, 1 AVX2, 2 AVX-512 (the same sums in the same lanes).
// The query's visible keys: [0, end), and whether any of them is valid (else every key
// counts, uniformly). Keys after the query's position are masked: exp(-1e30 - max) is
// exactly 0, so they are skipped.
struct KeyRange {
  int64_t end;
  bool any;
};
KeyRange key_range(int32_t pos, const uint8_t* valid, int64_t n_keys) {
  const int64_t visible_end = std::min<int64_t>(n_keys, static_cast<int64_t>(pos) + 1);
  bool any = false;
  for (int64_t j = 0; j < visible_end && !any; ++j) any = valid[j] != 0;
  return {any ? visible_end : n_keys, any};
}

// pre: the query's dots with keys [0, pre_end) where the key is valid, computed already
// (attention_block's shared walk); the others are computed here.
// weights: when given, the softmax weights w[j] = bf16(e_j / sum) of keys [0, *weights_end)
// go there and the weighted sum is left to the caller (attention_block).
// The weighted sum of one 128-wide head (Grok-1's) on AVX2: a quarter of the head (32
// dims, eight double vectors) at a time with its sums in registers over the keys
// (acc[d] += w_j v_j[d], key after key, as accumulate_avx2 does with acc in memory). w: the
// softmax weights; a zero one adds nothing and is skipped, as there.
GROKIT_AVX2 void weighted_sum128_avx2(const float* w, const uint16_t* v, int64_t end, double* acc) {
  for (int quarter = 0; quarter < 4; ++quarter) {
    __m256d a[8];
    for (int i = 0; i < 8; ++i) a[i] = _mm256_setzero_pd();
    for (int64_t j = 0; j < end; ++j) {
      if (w[j] == 0.0f) continue;
      const __m256d wv = _mm256_set1_pd(static_cast<double>(w[j]));
      const uint16_t* vr = v + j * 128 + 32 * quarter;
      for (int i = 0; i < 4; ++i) {
        const __m256 vf = load_bf16x8(vr + 8 * i);
        a[2 * i] = _mm256_fmadd_pd(wv, _mm256_cvtps_pd(_mm256_castps256_ps128(vf)), a[2 * i]);
        a[2 * i + 1] = _mm256_fmadd_pd(wv, _mm256_cvtps_pd(_mm256_extractf128_ps(vf, 1)), a[2 * i + 1]);
      }
    }
    for (int i = 0; i < 8; ++i) _mm256_storeu_pd(acc + 32 * quarter + 4 * i, a[i]);
  }
}

template <int kSimd>
void one_head(const float* q, int32_t pos, const uint16_t* k, const uint16_t* v, const uint8_t* valid, int64_t n_keys,
              const AttentionShape& sh, float* o, std::vector<float>& scores, std::vector<double>& acc,
              const float* pre = nullptr, int64_t pre_end = 0, float* weights = nullptr,
              int64_t* weights_end = nullptr) {
  const int64_t dh = sh.head_dim;
  // q in double (SIMD, head_dim <= 512; the AVX-512 impl is taken only then).
  double qd[kSimd > 0 ? 512 : 1];
  const bool by4 = kSimd > 0 && dh <= 512;
  if (by4)
    for (int64_t d = 0; d < dh; ++d) qd[d] = static_cast<double>(q[d]);
  const auto [end, any] = key_range(pos, valid, n_keys);
  scores.resize(static_cast<size_t>(end));
  const int64_t given = any ? std::min(pre_end, end) : 0;
  for (int64_t j = 0; j < given; ++j)
    scores[static_cast<size_t>(j)] = valid[j] != 0 ? round_bf16(pre[j]) * sh.multiplier : kMasked;
  for (int64_t j = given; j < end; ++j) {
    if constexpr (kSimd > 0) {  // four valid keys at once
      if (by4 && any && j + 4 <= end && (valid[j] & valid[j + 1] & valid[j + 2] & valid[j + 3]) != 0) {
        float dots[4];
        if (kSimd == 2) dot4_bf16_avx512(qd, k + j * dh, dh, dots);
        else dot4_bf16_avx2(qd, k + j * dh, dh, dots);
        for (int r = 0; r < 4; ++r) scores[static_cast<size_t>(j + r)] = round_bf16(dots[r]) * sh.multiplier;
        j += 3;
        continue;
      }
    }
    float s = kMasked;
    if (any && valid[j] != 0) {
      float dot = kSimd == 2   ? dot_bf16_avx512(qd, k + j * dh, dh)
                  : kSimd == 1 ? dot_bf16_avx2(q, k + j * dh, dh)
                               : dot_bf16_ref(q, k + j * dh, dh);
      s = round_bf16(dot) * sh.multiplier;
    }
    scores[static_cast<size_t>(j)] = s;
  }
  attention_cap_scores(scores.data(), end, sh.logit_cap, kSimd > 0);
  float mx = kMasked;
  for (int64_t j = 0; j < end; ++j) mx = std::max(mx, scores[static_cast<size_t>(j)]);
  attention_exp_scores(scores.data(), end, mx, kSimd > 0);
  float sum = 0.0f;
  for (int64_t j = 0; j < end; ++j) sum += scores[static_cast<size_t>(j)];
  if (weights != nullptr) {
    for (int64_t j = 0; j < end; ++j) weights[j] = round_bf16(scores[static_cast<size_t>(j)] / sum);
    *weights_end = end;
    return;
  }
  acc.assign(static_cast<size_t>(dh), 0.0);
  if (kSimd == 2 && dh == 128) {
    weighted_sum128_avx512(scores.data(), sum, v, end, acc.data());
    for (int64_t d = 0; d < dh; ++d) o[d] = round_bf16(static_cast<float>(acc[static_cast<size_t>(d)]));
    return;
  }
  if (kSimd == 1 && dh == 128) {
    for (int64_t j = 0; j < end; ++j) scores[static_cast<size_t>(j)] = round_bf16(scores[static_cast<size_t>(j)] / sum);
    weighted_sum128_avx2(scores.data(), v, end, acc.data());
    for (int64_t d = 0; d < dh; ++d) o[d] = round_bf16(static_cast<float>(acc[static_cast<size_t>(d)]));
    return;
  }
  for (int64_t j = 0; j < end; ++j) {
    float w = round_bf16(scores[static_cast<size_t>(j)] / sum);
    if (w == 0.0f) continue;  // adds exactly nothing
    if (kSimd == 2) accumulate_avx512(w, v + j * dh, dh, acc.data());
    else if (kSimd == 1) accumulate_avx2(w, v + j * dh, dh, acc.data());
    else accumulate_ref(w, v + j * dh, dh, acc.data());
  }
  for (int64_t d = 0; d < dh; ++d) o[d] = round_bf16(static_cast<float>(acc[static_cast<size_t>(d)]));
}

// The weighted sums of up to four queries of a 128-wide head over the same values, a
// quarter of the head (32 dims, four double vectors per query) at a time with every sum in
// registers: each value vector is converted once for the four. Per (query, dim) the adds
// are weighted_sum128_avx512's: key after key, a zero weight (or a key past the query's
// end) skipped. w: [4][ld] weights, ends[a]: query a's keys.
GROKIT_AVX512 void weighted_sum128x4_avx512(const float* w, int64_t ld, const int64_t* ends, int64_t nq,
                                            const uint16_t* v, float* const* out) {
  int64_t max_end = 0;
  for (int64_t a = 0; a < nq; ++a) max_end = std::max(max_end, ends[a]);
  for (int quarter = 0; quarter < 4; ++quarter) {
    __m512d acc[4][4];
    for (int a = 0; a < 4; ++a)
      for (int i = 0; i < 4; ++i) acc[a][i] = _mm512_setzero_pd();
    for (int64_t j = 0; j < max_end; ++j) {
      const uint16_t* vr = v + j * 128 + 32 * quarter;
      __m512d vd[4];
      for (int i = 0; i < 4; ++i) {
        const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(vr + 8 * i));
        vd[i] = _mm512_cvtps_pd(_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)));
      }
      for (int a = 0; a < 4; ++a) {
        if (a >= nq || j >= ends[a]) continue;
        const float wj = w[a * ld + j];
        if (wj == 0.0f) continue;
        const __m512d wv = _mm512_set1_pd(static_cast<double>(wj));
        for (int i = 0; i < 4; ++i) acc[a][i] = _mm512_fmadd_pd(wv, vd[i], acc[a][i]);
      }
    }
    for (int64_t a = 0; a < nq; ++a) {
      for (int i = 0; i < 4; ++i) {
        alignas(64) double t[8];
        _mm512_store_pd(t, acc[a][i]);
        for (int l = 0; l < 8; ++l) out[a][32 * quarter + 8 * i + l] = round_bf16(static_cast<float>(t[l]));
      }
    }
  }
}

// Rows m0 .. m0 + nq - 1 (nq <= 4) of head h (prefill): the dots of every query with the
// keys all of them see are taken four keys by four queries (each key converted once for
// the four), then each query finishes in one_head.
GROKIT_AVX512 void attention_block(const float* q, int64_t m0, int64_t nq, int64_t h, const int32_t* q_pos,
                                            const uint16_t* k, const uint16_t* v, const uint8_t* valid, int64_t n_keys,
                                            const AttentionShape& sh, float* o, std::vector<float>& scores,
                                            std::vector<double>& acc, std::vector<float>& pre,
                                            std::vector<double>& qd, std::vector<float>& weights) {
  const int64_t dh = sh.head_dim, qrow = sh.q_heads * dh;
  int64_t common = n_keys;
  for (int64_t a = 0; a < nq; ++a) {
    const KeyRange kr = key_range(q_pos[m0 + a], valid, n_keys);
    common = kr.any ? std::min(common, kr.end) : 0;
  }
  pre.resize(static_cast<size_t>(4 * std::max<int64_t>(common, 1)));
  qd.resize(static_cast<size_t>(4 * dh));
  for (int64_t a = 0; a < 4; ++a)
    for (int64_t d = 0; d < dh; ++d)
      qd[static_cast<size_t>(a * dh + d)] = a < nq ? static_cast<double>(q[(m0 + a) * qrow + h * dh + d]) : 0.0;
  for (int64_t j = 0; j < common; ++j) {
    if (nq == 4 && j + 4 <= common && (valid[j] & valid[j + 1] & valid[j + 2] & valid[j + 3]) != 0) {
      float dots[4][4];
      dot4x4_bf16_avx512(qd.data(), dh, k + j * dh, dh, dots);
      for (int64_t a = 0; a < 4; ++a)
        for (int r = 0; r < 4; ++r) pre[static_cast<size_t>(a * common + j + r)] = dots[a][r];
      j += 3;
      continue;
    }
    if (valid[j] == 0) continue;
    for (int64_t a = 0; a < nq; ++a)
      pre[static_cast<size_t>(a * common + j)] = dot_bf16_avx512(qd.data() + a * dh, k + j * dh, dh);
  }
  if (dh != 128) {
    for (int64_t a = 0; a < nq; ++a) {
      const int64_t m = m0 + a;
      one_head<2>(q + m * qrow + h * dh, q_pos[m], k, v, valid, n_keys, sh, o + m * qrow + h * dh, scores, acc,
                  pre.data() + a * common, common);
    }
    return;
  }
  // A 128-wide head: the softmax weights of each query, then the four weighted sums at once.
  weights.resize(static_cast<size_t>(4 * n_keys));
  int64_t ends[4] = {0, 0, 0, 0};
  float* outs[4] = {nullptr, nullptr, nullptr, nullptr};
  for (int64_t a = 0; a < nq; ++a) {
    const int64_t m = m0 + a;
    outs[a] = o + m * qrow + h * dh;
    one_head<2>(q + m * qrow + h * dh, q_pos[m], k, v, valid, n_keys, sh, outs[a], scores, acc,
                pre.data() + a * common, common, weights.data() + a * n_keys, &ends[a]);
  }
  weighted_sum128x4_avx512(weights.data(), n_keys, ends, nq, v, outs);
}

template <int kSimd>
Status impl(const float* q, int64_t M, const int32_t* q_pos, const uint16_t* k_cache, const uint16_t* v_cache,
            const uint8_t* key_valid, int64_t n_keys, const AttentionShape& sh, float* o, Pool pool) {
  GROKIT_CHECK(M >= 0 && sh.q_heads > 0 && sh.kv_heads > 0 && sh.q_heads % sh.kv_heads == 0 && sh.head_dim > 0);
  GROKIT_CHECK(n_keys > 0 && n_keys <= sh.cap);
  const int64_t group = sh.q_heads / sh.kv_heads, dh = sh.head_dim;
  if (kSimd == 2 && M >= 4) {  // several rows of x: blocks of four queries of one head
    const int64_t blocks = (M + 3) / 4;
    for_each(pool, static_cast<size_t>(blocks * sh.q_heads), [&](size_t i) {
      thread_local std::vector<float> scores, pre, weights;
      thread_local std::vector<double> acc, qd;
      const int64_t b = static_cast<int64_t>(i) / sh.q_heads, h = static_cast<int64_t>(i) % sh.q_heads;
      const int64_t kv = h / group, m0 = 4 * b;
      attention_block(q, m0, std::min<int64_t>(4, M - m0), h, q_pos, k_cache + kv * sh.cap * dh,
                      v_cache + kv * sh.cap * dh, key_valid, n_keys, sh, o, scores, acc, pre, qd, weights);
    });
    return {};
  }
  for_each(pool, static_cast<size_t>(M * sh.q_heads), [&](size_t i) {
    thread_local std::vector<float> scores;
    thread_local std::vector<double> acc;
    int64_t m = static_cast<int64_t>(i) / sh.q_heads, h = static_cast<int64_t>(i) % sh.q_heads;
    int64_t kv = h / group;
    one_head<kSimd>(q + (m * sh.q_heads + h) * dh, q_pos[m], k_cache + kv * sh.cap * dh, v_cache + kv * sh.cap * dh,
                    key_valid, n_keys, sh, o + (m * sh.q_heads + h) * dh, scores, acc);
  });
  return {};
}

}  // namespace

Status attention(const float* q, int64_t M, const int32_t* q_pos, const uint16_t* k_cache, const uint16_t* v_cache,
                 const uint8_t* key_valid, int64_t n_keys, const AttentionShape& shape, float* o, Pool pool) {
  if (detail::use_avx512() && shape.head_dim <= 512)
    return impl<2>(q, M, q_pos, k_cache, v_cache, key_valid, n_keys, shape, o, pool);
  if (detail::use_avx2()) return impl<1>(q, M, q_pos, k_cache, v_cache, key_valid, n_keys, shape, o, pool);
  return impl<0>(q, M, q_pos, k_cache, v_cache, key_valid, n_keys, shape, o, pool);
}
Status attention_ref(const float* q, int64_t M, const int32_t* q_pos, const uint16_t* k_cache,
                     const uint16_t* v_cache, const uint8_t* key_valid, int64_t n_keys, const AttentionShape& shape,
                     float* o, Pool pool) {
  return impl<0>(q, M, q_pos, k_cache, v_cache, key_valid, n_keys, shape, o, pool);
}

}  // namespace grokit::kernels
