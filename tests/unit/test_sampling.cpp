// Tests of sampling (runner/runner.h): the nucleus filter against the official rule
// (xai-org/grok-1 runners.py top_p_filter) transcribed independently below and against
// hand-computed cases, top-k, argmax, and the Sampler's determinism, greedy limits and
// distribution; and the prompt checks generation makes before its first step.
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

#include "runner/runner.h"

namespace grokit::runner {
namespace {

constexpr float kFiltered = -1e10f;

// The official rule, line by line (JAX):
//   sorted_logits = jax.lax.sort(logits, is_stable=False)
//   sorted_probs = jax.nn.softmax(sorted_logits)
//   threshold_idx = jnp.argmax(jnp.cumsum(sorted_probs, -1) >= 1 - top_p, axis=-1)
//   threshold_largest_logits = jnp.take_along_axis(sorted_logits, threshold_idx[..., None], -1)
//   mask = logits >= threshold_largest_logits
//   logits = jnp.where(mask, logits, -1e10)
// with the softmax and the cumulative sum in double. `1 - top_p` stays fp32 (top_p is a
// float32 array there), and jnp.argmax of an all-false mask is 0.
std::vector<float> official_top_p(const std::vector<float>& logits, float top_p) {
  std::vector<float> sorted_logits = logits;
  std::sort(sorted_logits.begin(), sorted_logits.end());
  const double mx = sorted_logits.back();
  std::vector<double> sorted_probs(sorted_logits.size());
  double total = 0;
  for (size_t i = 0; i < sorted_logits.size(); ++i) {
    sorted_probs[i] = std::exp(static_cast<double>(sorted_logits[i]) - mx);
    total += sorted_probs[i];
  }
  for (double& p : sorted_probs) p /= total;
  const float one_minus_top_p = 1.0f - top_p;
  size_t threshold_idx = 0;
  double cumsum = 0;
  for (size_t i = 0; i < sorted_probs.size(); ++i) {
    cumsum += sorted_probs[i];
    if (cumsum >= one_minus_top_p) {
      threshold_idx = i;
      break;
    }
  }
  const float threshold = sorted_logits[threshold_idx];
  std::vector<float> out = logits;
  for (float& l : out) l = l >= threshold ? l : kFiltered;
  return out;
}

std::vector<float> nucleus(std::vector<float> logits, float top_p) {
  nucleus_filter(logits, top_p);
  return logits;
}

std::vector<float> top_k(std::vector<float> logits, int k) {
  top_k_filter(logits, k);
  return logits;
}

// Logits whose softmax is `probs` (up to an offset), in the given order.
std::vector<float> logits_of(const std::vector<double>& probs, float offset = 1.5f) {
  std::vector<float> l;
  for (double p : probs) l.push_back(static_cast<float>(std::log(p)) + offset);
  return l;
}

// Which entries survive (are not -1e10).
std::vector<bool> kept(const std::vector<float>& logits) {
  std::vector<bool> k;
  for (float l : logits) k.push_back(l != kFiltered);
  return k;
}

// ---------------------------------------------------------------------------------
// The nucleus filter.

TEST(NucleusFilter, TopPOneKeepsEverything) {
  const std::vector<float> l = {3.0f, -2.0f, 0.5f, -40.0f, 7.0f, 7.0f, -1e9f};
  EXPECT_EQ(nucleus(l, 1.0f), l);
  EXPECT_EQ(official_top_p(l, 1.0f), l);
}

TEST(NucleusFilter, KeepsExactlyTheTopTwoWhenTheyReachTopP) {
  // probs 0.6, 0.3, 0.07, 0.03 (shuffled). Sorted ascending: 0.03, 0.07, 0.3, 0.6;
  // cumulative 0.03, 0.10, 0.40, 1.0. top_p = 0.8: the first cumulative >= 0.2 is 0.40, so
  // the threshold is the 0.3 token: the top two stay (0.6 alone is short of 0.8).
  const std::vector<float> l = logits_of({0.07, 0.6, 0.03, 0.3});
  const std::vector<bool> top_two = {false, true, false, true};
  EXPECT_EQ(kept(nucleus(l, 0.8f)), top_two);
  EXPECT_EQ(kept(nucleus(l, 0.65f)), top_two);  // cumulative must reach 0.35: 0.40
  // Kept logits keep their values.
  std::vector<float> f = nucleus(l, 0.8f);
  EXPECT_EQ(f[1], l[1]);
  EXPECT_EQ(f[3], l[3]);
  EXPECT_EQ(f[0], kFiltered);
  // top_p = 0.5: must reach 0.5; 0.40 does not, 1.0 does: only the top one.
  EXPECT_EQ(kept(nucleus(l, 0.5f)), std::vector<bool>({false, true, false, false}));
  // top_p = 0.95: must reach 0.05: 0.10, the 0.07 token: three stay.
  EXPECT_EQ(kept(nucleus(l, 0.95f)), std::vector<bool>({true, true, false, true}));
  for (float p : {0.8f, 0.65f, 0.5f, 0.95f}) EXPECT_EQ(nucleus(l, p), official_top_p(l, p)) << p;
}

TEST(NucleusFilter, TiesAtTheThresholdAreKept) {
  // probs 0.4, 0.2, 0.2, 0.1, 0.1 with exactly equal logits for the equal probabilities.
  // Sorted: 0.1, 0.1, 0.2, 0.2, 0.4; cumulative 0.1, 0.2, 0.4, 0.6, 1.0.
  std::vector<float> l = logits_of({0.2, 0.1, 0.4, 0.2, 0.1});
  ASSERT_EQ(l[0], l[3]);
  ASSERT_EQ(l[1], l[4]);
  // top_p = 0.5: must reach 0.5: 0.6, the second 0.2; both 0.2 tokens stay although 0.4
  // plus one of them (0.6) would already reach 0.5.
  EXPECT_EQ(kept(nucleus(l, 0.5f)), std::vector<bool>({true, false, true, true, false}));
  // top_p = 0.75: must reach 0.25: 0.4, the first 0.2: again both 0.2 tokens.
  EXPECT_EQ(kept(nucleus(l, 0.75f)), std::vector<bool>({true, false, true, true, false}));
  // top_p = 0.85: must reach 0.15: 0.2 at the second 0.1: both 0.1 tokens stay (all).
  EXPECT_EQ(kept(nucleus(l, 0.85f)), std::vector<bool>(5, true));
  for (float p : {0.5f, 0.75f, 0.85f}) EXPECT_EQ(nucleus(l, p), official_top_p(l, p)) << p;
}

TEST(NucleusFilter, TinyTopPKeepsOnlyTheMaximumAndItsTies) {
  const std::vector<float> l = logits_of({0.1, 0.5, 0.15, 0.25});
  EXPECT_EQ(kept(nucleus(l, 1e-6f)), std::vector<bool>({false, true, false, false}));
  // Tied maxima all stay.
  const std::vector<float> tied = {1.0f, 4.0f, -3.0f, 4.0f, 3.999f};
  EXPECT_EQ(kept(nucleus(tied, 1e-6f)), std::vector<bool>({false, true, false, true, false}));
  EXPECT_EQ(nucleus(tied, 1e-6f), official_top_p(tied, 1e-6f));
  // A dominant maximum is alone even at top_p 0.5.
  const std::vector<float> dom = {0.0f, 20.0f, 1.0f};
  EXPECT_EQ(kept(nucleus(dom, 0.5f)), std::vector<bool>({false, true, false}));
  // One logit: kept.
  EXPECT_EQ(nucleus({2.5f}, 1e-6f), std::vector<float>({2.5f}));
}

TEST(NucleusFilter, AlreadyFilteredLogitsStayFiltered) {
  std::vector<float> l = logits_of({0.5, 0.3, 0.2});
  l.push_back(kFiltered);
  l.insert(l.begin(), kFiltered);
  for (float p : {1.0f, 0.9f, 0.5f, 0.1f}) {
    std::vector<float> f = nucleus(l, p);
    EXPECT_EQ(f.front(), kFiltered) << p;
    EXPECT_EQ(f.back(), kFiltered) << p;
    EXPECT_EQ(f, official_top_p(l, p)) << p;
  }
}

TEST(NucleusFilter, AgreesWithTheOfficialRuleOnRandomLogits) {
  std::mt19937_64 rng(1234);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_int_distribution<int> size(1, 200), tie(0, 3);
  std::uniform_real_distribution<float> p(0.001f, 1.0f), scale(0.1f, 8.0f);
  int filtered_some = 0;
  for (int trial = 0; trial < 2000; ++trial) {
    std::vector<float> l(static_cast<size_t>(size(rng)));
    const float s = scale(rng);
    for (float& v : l) v = normal(rng) * s;
    // Some exact ties (copies) and coarse values (many ties).
    for (size_t i = 1; i < l.size(); ++i)
      if (tie(rng) == 0) l[i] = l[i - 1];
    if (trial % 5 == 0)
      for (float& v : l) v = std::round(v);
    const float top_p = trial % 7 == 0 ? 1.0f : p(rng);
    std::vector<float> got = nucleus(l, top_p);
    ASSERT_EQ(got, official_top_p(l, top_p)) << "trial " << trial << ", top_p " << top_p;
    // The maximum always survives.
    const float mx = *std::max_element(l.begin(), l.end());
    for (size_t i = 0; i < l.size(); ++i) {
      if (l[i] == mx) {
        ASSERT_EQ(got[i], mx);
      }
    }
    filtered_some += std::count(got.begin(), got.end(), kFiltered) > 0 ? 1 : 0;
  }
  EXPECT_GT(filtered_some, 1000);  // the comparison is not vacuous
}

// At vocabulary size (the filter sorts by radix there): negative and positive values,
// signed zeros, subnormals, already filtered entries, many ties.
TEST(NucleusFilter, AgreesWithTheOfficialRuleAtVocabularySize) {
  std::mt19937_64 rng(99);
  std::normal_distribution<float> normal(0.0f, 4.0f);
  for (int trial = 0; trial < 6; ++trial) {
    std::vector<float> l(131072);
    for (float& v : l) v = trial % 2 == 0 ? normal(rng) : std::round(normal(rng));
    for (size_t i = 0; i < l.size(); i += 97) l[i] = (i / 97) % 2 == 0 ? 0.0f : -0.0f;
    for (size_t i = 5; i < l.size(); i += 1009) l[i] = (i % 2 == 0 ? 1.0f : -1.0f) * 1e-41f;
    for (size_t i = 7; i < l.size(); i += 331) l[i] = kFiltered;
    if (trial == 4) l[123] = 60.0f;  // one token holds almost all the mass
    for (float top_p : {0.05f, 0.5f, 0.9f, 0.999f}) {
      ASSERT_EQ(nucleus(l, top_p), official_top_p(l, top_p)) << "trial " << trial << ", top_p " << top_p;
    }
  }
}

// ---------------------------------------------------------------------------------
// top-k and argmax.

TEST(TopKFilter, KeepsTheKLargestAndTiesAtTheKth) {
  const std::vector<float> l = {0.5f, 3.0f, -1.0f, 2.0f, 2.0f, 7.0f, 2.0f};
  EXPECT_EQ(kept(top_k(l, 1)), std::vector<bool>({false, false, false, false, false, true, false}));
  EXPECT_EQ(kept(top_k(l, 2)), std::vector<bool>({false, true, false, false, false, true, false}));
  // The 3rd largest is 2.0, held by three tokens: all three stay (5 kept).
  EXPECT_EQ(kept(top_k(l, 3)), std::vector<bool>({false, true, false, true, true, true, true}));
  EXPECT_EQ(kept(top_k(l, 5)), std::vector<bool>({false, true, false, true, true, true, true}));
  EXPECT_EQ(kept(top_k(l, 6)), std::vector<bool>({true, true, false, true, true, true, true}));
  std::vector<float> f = top_k(l, 2);
  EXPECT_EQ(f[1], 3.0f);
  EXPECT_EQ(f[5], 7.0f);
  EXPECT_EQ(f[0], kFiltered);
}

TEST(TopKFilter, ZeroNegativeAndLargeKAreOff) {
  const std::vector<float> l = {0.5f, 3.0f, -1.0f, 2.0f};
  EXPECT_EQ(top_k(l, 0), l);
  EXPECT_EQ(top_k(l, -3), l);
  EXPECT_EQ(top_k(l, 4), l);
  EXPECT_EQ(top_k(l, 100), l);
}

TEST(Argmax, TiesGoToTheLowerId) {
  EXPECT_EQ(argmax(std::vector<float>{1.0f, 3.0f, 3.0f, 2.0f}), 1);
  EXPECT_EQ(argmax(std::vector<float>{5.0f, 5.0f}), 0);
  EXPECT_EQ(argmax(std::vector<float>{-1e10f, -3.0f, -1e10f}), 1);
  EXPECT_EQ(argmax(std::vector<float>{4.0f}), 0);
}

// The lane-parallel argmax against one scan keeping the first strict maximum, on long
// arrays with ties, NaNs (never the answer, except in front) and signed zeros.
TEST(Argmax, EqualsASingleScanOnLongArrays) {
  auto scan = [](const std::vector<float>& v) {
    int32_t best = 0;
    for (size_t i = 1; i < v.size(); ++i)
      if (v[i] > v[static_cast<size_t>(best)]) best = static_cast<int32_t>(i);
    return best;
  };
  const float nan = std::numeric_limits<float>::quiet_NaN();
  std::mt19937 rng(7);
  for (size_t n : {size_t{1}, size_t{15}, size_t{16}, size_t{17}, size_t{1000}, size_t{131072}}) {
    for (int variant = 0; variant < 5; ++variant) {
      std::vector<float> v(n);
      for (auto& x : v) x = static_cast<float>(static_cast<int>(rng() % 50)) - 25.0f;  // many ties
      if (variant == 1) v[rng() % n] = nan;
      if (variant == 2) v[0] = nan;
      if (variant == 3) {
        std::fill(v.begin(), v.end(), -1.0f);
        v[n - 1] = 0.0f;
        v[(n - 1) / 2] = -0.0f;
      }
      if (variant == 4) v[n - 1] = 1e30f;
      EXPECT_EQ(argmax(v), scan(v)) << "n " << n << " variant " << variant;
    }
  }
}

// ---------------------------------------------------------------------------------
// The Sampler.

std::vector<int32_t> draws(const SamplingParams& params, const std::vector<float>& logits, int n) {
  Sampler s(params);
  std::vector<int32_t> out;
  for (int i = 0; i < n; ++i) out.push_back(s.sample(logits));
  return out;
}

std::vector<double> softmax(const std::vector<float>& l, double temperature = 1.0) {
  double mx = *std::max_element(l.begin(), l.end()) / temperature, sum = 0;
  std::vector<double> p;
  for (float v : l) {
    p.push_back(std::exp(v / temperature - mx));
    sum += p.back();
  }
  for (double& v : p) v /= sum;
  return p;
}

const std::vector<float> kSixLogits = {0.3f, -1.2f, 1.7f, 0.0f, 1.1f, -0.4f};

TEST(Sampler, SameSeedSameSequence) {
  SamplingParams p;
  p.seed = 77;
  p.top_p = 0.95f;
  const auto a = draws(p, kSixLogits, 2000), b = draws(p, kSixLogits, 2000);
  EXPECT_EQ(a, b);
  // And the draws are not constant.
  EXPECT_NE(std::count(a.begin(), a.end(), a[0]), static_cast<long>(a.size()));
}

TEST(Sampler, DifferentSeedsDiffer) {
  SamplingParams p1, p2, p3;
  p1.seed = 1;
  p2.seed = 2;
  p3.seed = 0x9e3779b97f4a7c15ull;
  const std::vector<float> flat(10, 0.0f);
  const auto a = draws(p1, flat, 200), b = draws(p2, flat, 200), c = draws(p3, flat, 200);
  EXPECT_NE(a, b);
  EXPECT_NE(a, c);
  EXPECT_NE(b, c);
  // Not merely shifted copies: most positions differ (10 tokens: about 90%).
  int same = 0;
  for (size_t i = 0; i < a.size(); ++i) same += a[i] == b[i] ? 1 : 0;
  EXPECT_LT(same, 60);
}

TEST(Sampler, TemperatureZeroIsArgmax) {
  SamplingParams p;
  p.temperature = 0.0f;
  const std::vector<float> l = {1.0f, 3.0f, -2.0f, 3.0f, 2.9f};
  for (uint64_t seed : {0ull, 1ull, 99ull}) {
    p.seed = seed;
    for (int32_t t : draws(p, l, 50)) EXPECT_EQ(t, 1);
  }
  // Filters do not matter to the greedy choice.
  p.top_p = 0.1f;
  p.top_k = 1;
  for (int32_t t : draws(p, l, 10)) EXPECT_EQ(t, 1);
}

TEST(Sampler, TinyTemperatureIsGreedy) {
  SamplingParams p;
  p.temperature = 1e-6f;
  const std::vector<float> l = {1.0f, 3.0f, -2.0f, 2.99f, 2.5f};  // a clear max: 0.01 / 1e-6 apart
  for (uint64_t seed : {0ull, 5ull}) {
    p.seed = seed;
    for (int32_t t : draws(p, l, 1000)) ASSERT_EQ(t, 1);
  }
}

// 20000 draws at temperature 1 against the softmax. Six categories: the chi-square
// statistic has 5 degrees of freedom; P(chi2_5 > 20.5) = 0.001, so a correct sampler
// passes for all but one seed in a thousand (the seeds are fixed: the outcome is
// deterministic). The largest frequency error: each frequency has a standard deviation of
// at most sqrt(0.25 / 20000) = 0.0035, and 0.015 is more than four of them.
void expect_distribution(const SamplingParams& params, const std::vector<float>& logits,
                         const std::vector<double>& want) {
  const int n = 20000;
  std::vector<int> count(logits.size(), 0);
  Sampler s(params);
  for (int i = 0; i < n; ++i) {
    int32_t t = s.sample(logits);
    ASSERT_TRUE(t >= 0 && static_cast<size_t>(t) < logits.size()) << t;
    ++count[static_cast<size_t>(t)];
  }
  double chi2 = 0, max_diff = 0;
  int categories = 0;
  for (size_t i = 0; i < logits.size(); ++i) {
    if (want[i] == 0) {
      EXPECT_EQ(count[i], 0) << "token " << i << " has probability 0 but was drawn";
      continue;
    }
    ++categories;
    const double expected = want[i] * n;
    chi2 += (count[i] - expected) * (count[i] - expected) / expected;
    max_diff = std::max(max_diff, std::fabs(count[i] / static_cast<double>(n) - want[i]));
  }
  // Critical values at 0.001 for 1..5 degrees of freedom.
  const double critical[] = {0, 10.83, 13.82, 16.27, 18.47, 20.52};
  ASSERT_LE(categories, 6);
  if (categories > 1) {
    EXPECT_LT(chi2, critical[categories - 1]) << "chi-square over " << categories << " categories";
  }
  EXPECT_LT(max_diff, 0.015);
}

TEST(Sampler, TemperatureOneMatchesSoftmax) {
  SamplingParams p;
  p.seed = 2024;
  expect_distribution(p, kSixLogits, softmax(kSixLogits));
  p.seed = 7;
  expect_distribution(p, kSixLogits, softmax(kSixLogits));
}

TEST(Sampler, TemperatureScalesTheLogits) {
  SamplingParams p;
  p.seed = 3;
  p.temperature = 2.0f;
  expect_distribution(p, kSixLogits, softmax(kSixLogits, 2.0));
  p.temperature = 0.5f;
  expect_distribution(p, kSixLogits, softmax(kSixLogits, 0.5));
}

TEST(Sampler, FilteredTokensAreNeverDrawn) {
  // Tokens already at -1e10 (masked by the caller) and tokens the nucleus removes.
  std::vector<float> l = {0.2f, kFiltered, 1.0f, -0.5f, kFiltered, 0.8f};
  SamplingParams p;
  p.seed = 11;
  std::vector<double> want = softmax(l);
  EXPECT_EQ(want[1], 0.0);
  expect_distribution(p, l, want);
  // top_p 0.6: probs over {0, 2, 3, 5} = 0.180, 0.401, 0.090, 0.329; sorted cumulative
  // 0.090, 0.270, 0.599, 1.0 must reach 0.4: the 0.329 token (5) is the threshold: {2, 5}.
  p.top_p = 0.6f;
  p.seed = 12;
  std::vector<float> nf = official_top_p(l, 0.6f);
  ASSERT_EQ(kept(nf), std::vector<bool>({false, false, true, false, false, true}));
  expect_distribution(p, l, softmax(nf));
  // top_k = 2 keeps {2, 5} as well; top_k = 3 keeps {0, 2, 5}.
  p.top_p = 1.0f;
  p.top_k = 3;
  p.seed = 13;
  ASSERT_EQ(kept(top_k(l, 3)), std::vector<bool>({true, false, true, false, false, true}));
  expect_distribution(p, l, softmax(top_k(l, 3)));
  // Temperature, then top-k, then the nucleus. At T = 0.5 the top 3 {0, 2, 5} have probs
  // 0.108, 0.534, 0.358; cumulative (sorted) 0.108, 0.466, 1.0 must reach 0.4 at top_p
  // 0.6: {2, 5} stay, drawn as softmax of the scaled logits.
  p.top_k = 3;
  p.top_p = 0.6f;
  p.temperature = 0.5f;
  p.seed = 14;
  std::vector<float> scaled = l;
  for (float& v : scaled) v = v / 0.5f;
  std::vector<float> both = official_top_p(top_k(scaled, 3), 0.6f);
  ASSERT_EQ(kept(both), std::vector<bool>({false, false, true, false, false, true}));
  expect_distribution(p, l, softmax(both));
}

// check_prompts: each failure names the prompt, and the boundaries are exact.
TEST(CheckPrompts, RefusesEmptyOutOfVocabularyAndTooLongPrompts) {
  format::ModelConfig cfg;
  cfg.vocab_size = 32;
  cfg.sequence_len = 16;
  auto message = [&](const std::vector<std::vector<int32_t>>& prompts, int64_t max_tokens) {
    Status s = check_prompts(cfg, prompts, max_tokens);
    return s.ok() ? std::string("ok") : s.error().message;
  };
  const std::vector<int32_t> twelve(12, 5);
  EXPECT_EQ(message({{1, 2, 31}, twelve}, 4), "ok");          // 12 + 4 = 16: exactly full
  EXPECT_EQ(message({std::vector<int32_t>(16, 3)}, 0), "ok");  // logits: the prompt alone
  EXPECT_EQ(message({{1}, {}}, 1), "prompt 1 is empty");
  EXPECT_EQ(message({{1}, {4, 32}}, 1), "prompt 1, token 1: id 32 is outside the vocabulary [0, 32)");
  EXPECT_EQ(message({{-1}}, 1), "prompt 0, token 0: id -1 is outside the vocabulary [0, 32)");
  EXPECT_EQ(message({twelve}, 5), "prompt 0: 12 tokens + max_tokens 5 = 17 positions, more than the model's "
                                  "sequence_len of 16");
  EXPECT_EQ(message({{1}, std::vector<int32_t>(17, 3)}, 0),
            "prompt 1: 17 positions, more than the model's sequence_len of 16");
  EXPECT_NE(message({{1}}, -1), "ok");
}

TEST(WeightsMemoryWarning, OnlyWhereTheWeightsCrowdTheMemory) {
  const uint64_t GiB = 1ull << 30;
  EXPECT_EQ(weights_memory_warning(10 * GiB, 64 * GiB), "");
  EXPECT_EQ(weights_memory_warning(57 * GiB, 64 * GiB), "");  // under 90 %
  EXPECT_EQ(weights_memory_warning(300 * GiB, 0), "");         // memory unknown: no guess
  const std::string near = weights_memory_warning(60 * GiB, 64 * GiB);
  EXPECT_NE(near.find("take more than 90 % of this machine's memory"), std::string::npos) << near;
  const std::string over = weights_memory_warning(296 * GiB, 256 * GiB);
  EXPECT_NE(over.find("exceed this machine's memory"), std::string::npos) << over;
  EXPECT_NE(over.find("reads them from the disk again"), std::string::npos) << over;
  EXPECT_NE(over.find(human_bytes(296.0 * GiB)), std::string::npos) << over;
  // The memory this process may use: at most the machine's, and more than nothing.
  const uint64_t usable = usable_memory_bytes();
  EXPECT_GT(usable, 0u);
  const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
  EXPECT_LE(usable, static_cast<uint64_t>(pages) * static_cast<uint64_t>(page));
}

TEST(DeviceMemoryShortfall, NamesTheDeviceAndItsRanksWhereTheWeightsDoNotFit) {
  const uint64_t GiB = 1ull << 30;
  EXPECT_EQ(device_memory_shortfall("cuda device 0", {0}, 40 * GiB, 40 * GiB, 80 * GiB), "");  // exactly fits
  EXPECT_EQ(device_memory_shortfall("cuda device 0", {0, 1}, 70 * GiB, 79 * GiB, 80 * GiB), "");
  const std::string one = device_memory_shortfall("cuda device 3 (NVIDIA H100)", {3}, 40 * GiB + 1, 40 * GiB, 80 * GiB);
  EXPECT_NE(one.find("cuda device 3 (NVIDIA H100) cannot hold the weights of rank 3: "), std::string::npos) << one;
  EXPECT_NE(one.find(human_bytes(40.0 * GiB) + " free (" + human_bytes(80.0 * GiB) + " in all)"), std::string::npos) << one;
  const std::string all = device_memory_shortfall("cuda device 0", {0, 2, 4, 6}, 296 * GiB, 130 * GiB, 140 * GiB);
  EXPECT_NE(all.find("the weights of ranks 0, 2, 4 and 6: " + human_bytes(296.0 * GiB)), std::string::npos) << all;
  EXPECT_NE(all.find("--gpus"), std::string::npos) << all;
  EXPECT_NE(all.find("grokit quantize"), std::string::npos) << all;
}

TEST(KvCacheMemoryShortfall, RefusesASequenceWhoseCachesExceedTheAvailableMemory) {
  const uint64_t GiB = 1ull << 30;
  EXPECT_EQ(kv_cache_memory_shortfall(8192, 2 * GiB, 2 * GiB), "");  // exactly fits
  EXPECT_EQ(kv_cache_memory_shortfall(8192, 64 * GiB, 0), "");       // unknown: no check
  const std::string why = kv_cache_memory_shortfall(8192, 2 * GiB + 1, 2 * GiB);
  EXPECT_NE(why.find("a sequence of 8192 positions needs " + human_bytes(2.0 * GiB + 1) + " of KV cache"),
            std::string::npos) << why;
  EXPECT_NE(why.find("more than the " + human_bytes(2.0 * GiB) + " of memory available"), std::string::npos) << why;
  EXPECT_NE(why.find("--max-tokens"), std::string::npos) << why;
  // This machine's figure is real: positive, and no more than its physical memory.
  const uint64_t avail = available_memory_bytes();
  EXPECT_GT(avail, 0u);
  EXPECT_LE(avail, static_cast<uint64_t>(sysconf(_SC_PHYS_PAGES)) * static_cast<uint64_t>(sysconf(_SC_PAGESIZE)));
}

}  // namespace
}  // namespace grokit::runner
