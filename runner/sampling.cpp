// Sampling: temperature, the official nucleus filter, top-k, a seeded draw.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "runner/runner.h"

namespace grokit::runner {

static constexpr float kFiltered = -1e10f;

// The maximum first, in 16 independent lanes (a single running best is one long chain of
// dependent compares: 10x slower over a 131072-token vocabulary), then its first index.
// The same answer as one scan keeping the first strict maximum: NaNs never win, and a
// NaN in front wins outright (nothing compares greater than it).
int32_t argmax(std::span<const float> logits) {
  const size_t n = logits.size();
  if (n == 0) return 0;
  const float* v = logits.data();
  float lane[16];
  for (float& l : lane) l = v[0];
  size_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int j = 0; j < 16; ++j) lane[j] = v[i + j] > lane[j] ? v[i + j] : lane[j];
  float m = v[0];
  for (float l : lane) m = l > m ? l : m;
  for (; i < n; ++i) m = v[i] > m ? v[i] : m;
  if (m != m) return 0;  // v[0] is NaN
  for (size_t k = 0; k < n; ++k) {
    if (v[k] == m) return static_cast<int32_t>(k);
  }
  return 0;
}

namespace {

// Ascending order of `v` by an LSD radix sort on order-preserving keys (three passes of
// 11 bits): the order std::sort gives for the values a model emits (no NaN; -0 and +0,
// equal there, land next to each other, which changes no sum below), in O(n): a 131072
// logit vocabulary sorts in about a tenth of std::sort's time.
std::vector<float> sorted_ascending(const std::vector<float>& v) {
  const size_t n = v.size();
  auto key = [](float f) {
    uint32_t u;
    std::memcpy(&u, &f, sizeof u);
    return (u & 0x80000000u) != 0 ? ~u : u | 0x80000000u;  // negatives reversed below positives
  };
  std::vector<uint32_t> a(n), b(n);
  for (size_t i = 0; i < n; ++i) a[i] = key(v[i]);
  for (int shift = 0; shift < 32; shift += 11) {
    size_t count[2049] = {};
    for (uint32_t k : a) ++count[((k >> shift) & 2047u) + 1];
    for (size_t d = 1; d < 2049; ++d) count[d] += count[d - 1];
    for (uint32_t k : a) b[count[(k >> shift) & 2047u]++] = k;
    a.swap(b);
  }
  std::vector<float> out(n);
  for (size_t i = 0; i < n; ++i) {
    uint32_t k = a[i], u = (k & 0x80000000u) != 0 ? k & 0x7fffffffu : ~k;
    std::memcpy(&out[i], &u, sizeof u);
  }
  return out;
}

}  // namespace

void nucleus_filter(std::vector<float>& logits, float top_p) {
  if (logits.empty()) return;
  const std::vector<float> sorted = sorted_ascending(logits);  // ascending, as jax.lax.sort
  // softmax of the sorted logits, in double; then the first index where the cumulative
  // probability reaches 1 - top_p.
  double mx = sorted.back(), sum = 0;
  std::vector<double> p(sorted.size());
  for (size_t i = 0; i < sorted.size(); ++i) sum += p[i] = std::exp(static_cast<double>(sorted[i]) - mx);
  // 1 - top_p in fp32, as the official code computes it; when no cumulative sum reaches
  // it, jnp.argmax of all-false is index 0: the smallest logit, so everything is kept.
  double cum = 0, need = static_cast<double>(1.0f - top_p);
  size_t idx = 0;
  for (size_t i = 0; i < sorted.size(); ++i) {
    cum += p[i] / sum;
    if (cum >= need) {
      idx = i;
      break;
    }
  }
  float threshold = sorted[idx];
  for (float& l : logits) {
    if (l < threshold) l = kFiltered;
  }
}

void top_k_filter(std::vector<float>& logits, int top_k) {
  if (top_k <= 0 || static_cast<size_t>(top_k) >= logits.size()) return;
  std::vector<float> sorted = logits;
  std::nth_element(sorted.begin(), sorted.begin() + (top_k - 1), sorted.end(), std::greater<float>());
  float threshold = sorted[static_cast<size_t>(top_k - 1)];
  for (float& l : logits) {
    if (l < threshold) l = kFiltered;
  }
}

Sampler::Sampler(const SamplingParams& params) : params_(params), rng_(params.seed) {}

int32_t Sampler::sample(std::span<const float> logits) {
  if (params_.temperature <= 0.0f) return argmax(logits);
  work_.assign(logits.begin(), logits.end());
  for (float& l : work_) l = l / params_.temperature;
  top_k_filter(work_, params_.top_k);
  if (params_.top_p < 1.0f) nucleus_filter(work_, params_.top_p);
  // A categorical draw: inverse CDF of the softmax, in token order, in double.
  double mx = *std::max_element(work_.begin(), work_.end()), sum = 0;
  std::vector<double> p(work_.size());
  for (size_t i = 0; i < work_.size(); ++i) sum += p[i] = std::exp(static_cast<double>(work_[i]) - mx);
  double u = std::uniform_real_distribution<double>(0.0, 1.0)(rng_) * sum, cum = 0;
  size_t last = 0;
  for (size_t i = 0; i < p.size(); ++i) {
    if (p[i] == 0) continue;
    last = i;
    cum += p[i];
    if (u < cum) return static_cast<int32_t>(i);
  }
  return static_cast<int32_t>(last);
}

}  // namespace grokit::runner
