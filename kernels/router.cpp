// MoE router: fp32 softmax over experts, top-k by probability (ties to the lower index).
#include <vector>

#include "kernels/internal.h"

namespace grokit::kernels {
namespace {
using namespace detail;

// logits[e] = sum_d x[d] * w[d, e], in double in d order, rounded once to fp32.
void logits_ref(const float* x, int64_t D, const float* w, int64_t E, float* out) {
  for (int64_t e = 0; e < E; ++e) {
    double acc = 0.0;
    for (int64_t d = 0; d < D; ++d) acc += static_cast<double>(x[d]) * static_cast<double>(w[d * E + e]);
    out[e] = static_cast<float>(acc);
  }
}

GROKIT_AVX2 void logits_avx2(const float* x, int64_t D, const float* w, int64_t E, float* out) {
  int64_t E4 = E / 4 * 4;
  for (int64_t e0 = 0; e0 < E4; e0 += 4) {
    __m256d acc = _mm256_setzero_pd();
    for (int64_t d = 0; d < D; ++d)
      acc = _mm256_fmadd_pd(_mm256_set1_pd(static_cast<double>(x[d])),
                            _mm256_cvtps_pd(_mm_loadu_ps(w + d * E + e0)), acc);
    _mm_storeu_ps(out + e0, _mm256_cvtpd_ps(acc));
  }
  for (int64_t e = E4; e < E; ++e) {
    double acc = 0.0;
    for (int64_t d = 0; d < D; ++d) acc += static_cast<double>(x[d]) * static_cast<double>(w[d * E + e]);
    out[e] = static_cast<float>(acc);
  }
}

void select(float* p, int64_t E, int64_t k, int32_t* experts, float* gates) {
  float mx = p[0];
  for (int64_t e = 1; e < E; ++e) mx = std::max(mx, p[e]);
  float sum = 0.0f;
  for (int64_t e = 0; e < E; ++e) {
    p[e] = exp_f(p[e] - mx);
    sum += p[e];
  }
  for (int64_t e = 0; e < E; ++e) p[e] = p[e] / sum;
  // Selection by repeated argmax: strictly greater wins, so ties go to the lower index.
  std::vector<bool> taken(static_cast<size_t>(E), false);
  for (int64_t i = 0; i < k; ++i) {
    int64_t best = -1;
    for (int64_t e = 0; e < E; ++e) {
      if (!taken[static_cast<size_t>(e)] && (best < 0 || p[e] > p[best])) best = e;
    }
    taken[static_cast<size_t>(best)] = true;
    experts[i] = static_cast<int32_t>(best);
    gates[i] = p[best];
  }
}

template <bool kSimd>
Status impl(const float* x, int64_t M, int64_t D, const float* w, int64_t E, int64_t k, int32_t* experts, float* gates,
            Pool pool) {
  GROKIT_CHECK(M >= 0 && D > 0 && E > 0 && k > 0 && k <= E);
  for_each(pool, static_cast<size_t>(M), [&](size_t m) {
    std::vector<float> p(static_cast<size_t>(E));
    if (kSimd) logits_avx2(x + static_cast<int64_t>(m) * D, D, w, E, p.data());
    else logits_ref(x + static_cast<int64_t>(m) * D, D, w, E, p.data());
    select(p.data(), E, k, experts + static_cast<int64_t>(m) * k, gates + static_cast<int64_t>(m) * k);
  });
  return {};
}

}  // namespace

Status router_topk(const float* x, int64_t M, int64_t D, const float* w, int64_t E, int64_t k, int32_t* experts,
                   float* gates, Pool pool) {
  if (detail::use_avx2()) return impl<true>(x, M, D, w, E, k, experts, gates, pool);
  return impl<false>(x, M, D, w, E, k, experts, gates, pool);
}
Status router_topk_ref(const float* x, int64_t M, int64_t D, const float* w, int64_t E, int64_t k, int32_t* experts,
                       float* gates, Pool pool) {
  return impl<false>(x, M, D, w, E, k, experts, gates, pool);
}

}  // namespace grokit::kernels
