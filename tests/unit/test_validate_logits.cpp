// Tests of validate::compare_logits on small hand-made .npy files: exact values on
// hand-computed cases (KL, near ties, perplexity), padding, errors that name the file
// and the position, and results that do not depend on the thread count.
#include <gtest/gtest.h>
#include <stdlib.h>

#include <cerrno>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "common/common.h"
#include "common/npy.h"
#include "validate/validate.h"
#include "tests/unit/temp_dir.h"

namespace grokit::validate {
namespace {

struct TempDir : grokit::testing::TempDir {
  TempDir() : grokit::testing::TempDir("logits") {}
};

std::string write_f32(const TempDir& dir, const std::string& name, std::vector<int64_t> shape,
                      const std::vector<float>& v) {
  std::string path = dir.file(name);
  auto s = npy::write_array(path, "<f4", shape, v.data(), true);
  EXPECT_TRUE(s.ok()) << s.error().message;
  return path;
}

std::string write_i32(const TempDir& dir, const std::string& name, std::vector<int64_t> shape,
                      const std::vector<int32_t>& v) {
  std::string path = dir.file(name);
  auto s = npy::write_array(path, "<i4", shape, v.data(), true);
  EXPECT_TRUE(s.ok()) << s.error().message;
  return path;
}

const LogitsCheck* find_check(const LogitsReport& r, const std::string& name) {
  for (const auto& c : r.checks)
    if (c.name == name) return &c;
  return nullptr;
}

std::vector<float> random_logits(size_t n, uint32_t seed, float scale) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> d(0.0f, scale);
  std::vector<float> v(n);
  for (auto& x : v) x = d(rng);
  return v;
}

// ---------------------------------------------------------------------------------
TEST(CompareLogits, IdenticalFilesHaveZeroKlAndFullAgreement) {
  TempDir dir;
  auto v = random_logits(2 * 5 * 64, 1, 4.0f);
  auto a = write_f32(dir, "a.npy", {2, 5, 64}, v);
  auto b = write_f32(dir, "b.npy", {2, 5, 64}, v);
  auto rep = compare_logits(a, b, "", LogitsThresholds{}, 2);
  ASSERT_TRUE(rep.ok()) << rep.error().message;
  EXPECT_EQ(rep->positions, 10u);
  EXPECT_EQ(rep->batch, 2);
  EXPECT_EQ(rep->seq, 5);
  EXPECT_EQ(rep->vocab, 64);
  EXPECT_EQ(rep->max_kl, 0.0);
  EXPECT_EQ(rep->mean_kl, 0.0);
  EXPECT_EQ(rep->p99_kl, 0.0);
  EXPECT_EQ(rep->max_abs_diff, 0.0);
  EXPECT_EQ(rep->top1_agreement, 1.0);
  EXPECT_EQ(rep->decisive_agree + rep->near_tie_agree, 10u);
  EXPECT_TRUE(rep->pass);
  ASSERT_EQ(rep->checks.size(), 2u);  // max_kl and min_top1 by default
  EXPECT_FALSE(rep->has_perplexity);
  EXPECT_EQ(rep->worst.size(), 5u);
}

TEST(CompareLogits, TwoTokenKlMatchesHandComputation) {
  // p = softmax(1, 0) = (e/(1+e), 1/(1+e)), q = softmax(0, 0) = (1/2, 1/2):
  // KL(p || q) = p1 ln(2 p1) + p2 ln(2 p2) = 0.11094407167172736...
  TempDir dir;
  auto a = write_f32(dir, "a.npy", {1, 2}, {1.0f, 0.0f});
  auto b = write_f32(dir, "b.npy", {1, 2}, {0.0f, 0.0f});
  LogitsThresholds th;
  th.max_kl = 0.2;
  auto rep = compare_logits(a, b, "", th, 1);
  ASSERT_TRUE(rep.ok()) << rep.error().message;
  const double p1 = std::exp(1.0) / (1.0 + std::exp(1.0)), p2 = 1.0 - p1;
  const double kl = p1 * std::log(2 * p1) + p2 * std::log(2 * p2);
  EXPECT_NEAR(kl, 0.11094407167172736, 1e-15);
  EXPECT_NEAR(rep->max_kl, kl, 1e-9);
  EXPECT_NEAR(rep->mean_kl, kl, 1e-9);
  EXPECT_NEAR(rep->p99_kl, kl, 1e-9);
  EXPECT_EQ(rep->max_abs_diff, 1.0);
  // The candidate's tie (0, 0) resolves to index 0, the reference's argmax: agreement.
  EXPECT_EQ(rep->decisive, 1u);
  EXPECT_EQ(rep->decisive_agree, 1u);
  EXPECT_TRUE(rep->pass);
  ASSERT_EQ(rep->worst.size(), 1u);
  EXPECT_EQ(rep->worst[0].b, 0);
  EXPECT_EQ(rep->worst[0].t, 0);
  // The default bound 1e-3 fails it.
  auto strict = compare_logits(a, b, "", LogitsThresholds{}, 1);
  ASSERT_TRUE(strict.ok());
  EXPECT_FALSE(strict->pass);
  EXPECT_FALSE(find_check(*strict, "max_kl")->pass);
  EXPECT_TRUE(find_check(*strict, "min_top1")->pass);
  // KL is not symmetric: the other direction differs.
  auto back = compare_logits(b, a, "", th, 1);
  ASSERT_TRUE(back.ok());
  const double kl_back = 0.5 * std::log(0.5 / p1) + 0.5 * std::log(0.5 / p2);
  EXPECT_NEAR(back->max_kl, kl_back, 1e-9);
}

TEST(CompareLogits, NearTiesAreCountedApart) {
  TempDir dir;
  // Position 0: decisive (margin 2), agrees. Position 1: near tie (margin 0.02),
  // flips. Position 2: decisive, agrees. Position 3: exact tie in the reference (margin 0).
  auto a = write_f32(dir, "a.npy", {4, 3}, {2, 0, 0, /**/ 0.02f, 0, -1, /**/ 0, 0, 3, /**/ 1, 1, 0});
  auto b = write_f32(dir, "b.npy", {4, 3}, {2, 0, 0, /**/ 0, 0.02f, -1, /**/ 0, 0, 3, /**/ 1, 1, 0});
  auto rep = compare_logits(a, b, "", LogitsThresholds{}, 1);
  ASSERT_TRUE(rep.ok()) << rep.error().message;
  EXPECT_EQ(rep->decisive, 2u);
  EXPECT_EQ(rep->decisive_agree, 2u);
  EXPECT_EQ(rep->top1_agreement, 1.0);
  EXPECT_EQ(rep->near_ties, 2u);
  EXPECT_EQ(rep->near_tie_agree, 1u);
  EXPECT_EQ(rep->near_tie_agreement, 0.5);
  EXPECT_TRUE(rep->pass) << "a flipped near tie does not fail top-1";
  EXPECT_EQ(rep->worst[0].t, 1);
  // With a margin of 0.01 position 1 is decisive, and its flip fails the check.
  LogitsThresholds th;
  th.near_tie_margin = 0.01;
  auto strict = compare_logits(a, b, "", th, 1);
  ASSERT_TRUE(strict.ok());
  EXPECT_EQ(strict->decisive, 3u);
  EXPECT_EQ(strict->decisive_agree, 2u);
  EXPECT_NEAR(strict->top1_agreement, 2.0 / 3.0, 1e-15);
  EXPECT_FALSE(strict->pass);
  EXPECT_FALSE(find_check(*strict, "min_top1")->pass);
  th.min_top1 = 0.6;
  auto loose = compare_logits(a, b, "", th, 1);
  ASSERT_TRUE(loose.ok());
  EXPECT_TRUE(loose->pass);
}

TEST(CompareLogits, PaddingIsSkipped) {
  TempDir dir;
  const float nan = std::numeric_limits<float>::quiet_NaN();
  // [2, 3, 2]: row 0 holds 2 tokens then padding, row 1 holds 3; the padding position's
  // logits are garbage (NaN, and a flipped top-1) and must not be looked at.
  auto a = write_f32(dir, "a.npy", {2, 3, 2}, {1, 0, 1, 0, nan, 5, /**/ 1, 0, 1, 0, 1, 0});
  auto b = write_f32(dir, "b.npy", {2, 3, 2}, {1, 0, 1, 0, 9, -9, /**/ 1, 0, 1, 0, 1, 0});
  auto t = write_i32(dir, "t.npy", {2, 3}, {1, 1, 0, /**/ 1, 1, 1});
  auto rep = compare_logits(a, b, t, LogitsThresholds{}, 2);
  ASSERT_TRUE(rep.ok()) << rep.error().message;
  EXPECT_EQ(rep->positions, 5u);
  EXPECT_EQ(rep->padding, 1u);
  EXPECT_EQ(rep->max_kl, 0.0);
  EXPECT_TRUE(rep->pass);
  // Row 0: position 0 predicts token 1 (position 1 predicts padding: nothing);
  // row 1: positions 0 and 1 predict.
  EXPECT_EQ(rep->predictions, 3u);
  // Without tokens the NaN is found.
  auto no_tokens = compare_logits(a, b, "", LogitsThresholds{}, 2);
  ASSERT_FALSE(no_tokens.ok());
}

TEST(CompareLogits, PerplexityRatioOnAHandComputedCase) {
  // One row of 3 tokens (1, 2, 3) over a vocabulary of 4. Position 0 predicts token 2,
  // position 1 predicts token 3, position 2 predicts nothing.
  // Reference: uniform logits: p = 1/4 each time, perplexity 4.
  // Candidate: logit 1 on the right token: p = e / (3 + e), perplexity 1 + 3/e.
  TempDir dir;
  auto a = write_f32(dir, "a.npy", {1, 3, 4}, {0, 0, 0, 0, /**/ 0, 0, 0, 0, /**/ 0, 0, 0, 0});
  auto b = write_f32(dir, "b.npy", {1, 3, 4}, {0, 0, 1, 0, /**/ 0, 0, 0, 1, /**/ 0, 0, 0, 0});
  auto t = write_i32(dir, "t.npy", {1, 3}, {1, 2, 3});
  LogitsThresholds th;
  th.max_kl = 1.0;
  th.max_ppl_ratio = 0.5;
  auto rep = compare_logits(a, b, t, th, 1);
  ASSERT_TRUE(rep.ok()) << rep.error().message;
  ASSERT_TRUE(rep->has_perplexity);
  EXPECT_EQ(rep->predictions, 2u);
  const double e = std::exp(1.0);
  EXPECT_NEAR(rep->ppl_reference, 4.0, 1e-12);
  EXPECT_NEAR(rep->ppl_candidate, 1.0 + 3.0 / e, 1e-12);
  EXPECT_NEAR(rep->ppl_ratio, (1.0 + 3.0 / e) / 4.0, 1e-12);  // 0.5259...
  const LogitsCheck* c = find_check(*rep, "max_ppl_ratio");
  ASSERT_NE(c, nullptr);
  EXPECT_NEAR(c->value, 1.0 - (1.0 + 3.0 / e) / 4.0, 1e-12);  // 0.474 <= 0.5
  EXPECT_TRUE(c->pass);
  th.max_ppl_ratio = 0.4;
  auto fails = compare_logits(a, b, t, th, 1);
  ASSERT_TRUE(fails.ok());
  EXPECT_FALSE(fails->pass);
  // Uniform reference logits are an exact tie: every position is a near tie.
  EXPECT_EQ(rep->decisive, 0u);
  EXPECT_EQ(rep->near_ties, 3u);
}

TEST(CompareLogits, NonFiniteValueNamesTheFirstPosition) {
  TempDir dir;
  auto v = random_logits(2 * 3 * 8, 2, 1.0f);
  auto w = v;
  w[(1 * 3 + 1) * 8 + 5] = std::numeric_limits<float>::quiet_NaN();  // candidate [1, 1], index 5
  v[(1 * 3 + 2) * 8 + 0] = std::numeric_limits<float>::infinity();   // reference [1, 2], later
  auto a = write_f32(dir, "ref.npy", {2, 3, 8}, v);
  auto b = write_f32(dir, "cand.npy", {2, 3, 8}, w);
  for (unsigned threads : {1u, 3u}) {
    auto rep = compare_logits(a, b, "", LogitsThresholds{}, threads);
    ASSERT_FALSE(rep.ok());
    const std::string& m = rep.error().message;
    EXPECT_NE(m.find("cand.npy"), std::string::npos) << m;
    EXPECT_NE(m.find("nan"), std::string::npos) << m;
    EXPECT_NE(m.find("position [1, 1]"), std::string::npos) << m;
    EXPECT_NE(m.find("vocabulary index 5"), std::string::npos) << m;
  }
  // In the reference alone.
  auto c = write_f32(dir, "cand2.npy", {2, 3, 8}, random_logits(2 * 3 * 8, 3, 1.0f));
  auto rep = compare_logits(a, c, "", LogitsThresholds{}, 2);
  ASSERT_FALSE(rep.ok());
  EXPECT_NE(rep.error().message.find("ref.npy: non-finite logit inf at position [1, 2]"), std::string::npos)
      << rep.error().message;
}

TEST(CompareLogits, MismatchedShapesAndBadFilesAreErrors) {
  TempDir dir;
  auto a = write_f32(dir, "a.npy", {2, 8, 16}, std::vector<float>(2 * 8 * 16));
  auto b = write_f32(dir, "b.npy", {2, 7, 16}, std::vector<float>(2 * 7 * 16));
  auto rep = compare_logits(a, b, "", LogitsThresholds{}, 1);
  ASSERT_FALSE(rep.ok());
  EXPECT_NE(rep.error().message.find("reference [2, 8, 16] / candidate [2, 7, 16]"), std::string::npos)
      << rep.error().message;
  // Wrong dtype, wrong rank.
  auto i = write_i32(dir, "i.npy", {2, 8, 16}, std::vector<int32_t>(2 * 8 * 16));
  auto r1 = compare_logits(a, i, "", LogitsThresholds{}, 1);
  ASSERT_FALSE(r1.ok());
  EXPECT_NE(r1.error().message.find("i.npy: expected float32 logits"), std::string::npos) << r1.error().message;
  auto flat = write_f32(dir, "flat.npy", {16}, std::vector<float>(16));
  EXPECT_FALSE(compare_logits(flat, flat, "", LogitsThresholds{}, 1).ok());
  // Tokens of the wrong shape, out of the vocabulary, after padding, all padding.
  auto t_shape = write_i32(dir, "t1.npy", {2, 7}, std::vector<int32_t>(14, 1));
  auto r2 = compare_logits(a, a, t_shape, LogitsThresholds{}, 1);
  ASSERT_FALSE(r2.ok());
  EXPECT_NE(r2.error().message.find("t1.npy"), std::string::npos);
  std::vector<int32_t> tok(16, 1);
  tok[9] = 16;
  auto r3 = compare_logits(a, a, write_i32(dir, "t2.npy", {2, 8}, tok), LogitsThresholds{}, 1);
  ASSERT_FALSE(r3.ok());
  EXPECT_NE(r3.error().message.find("token 16 at [1, 1] is outside the vocabulary"), std::string::npos)
      << r3.error().message;
  tok[9] = 1;
  tok[3] = 0;
  auto r4 = compare_logits(a, a, write_i32(dir, "t3.npy", {2, 8}, tok), LogitsThresholds{}, 1);
  ASSERT_FALSE(r4.ok());
  EXPECT_NE(r4.error().message.find("at [0, 4] follows padding"), std::string::npos) << r4.error().message;
  auto r5 = compare_logits(a, a, write_i32(dir, "t4.npy", {2, 8}, std::vector<int32_t>(16, 0)), LogitsThresholds{}, 1);
  ASSERT_FALSE(r5.ok());
  EXPECT_NE(r5.error().message.find("no position to compare"), std::string::npos) << r5.error().message;
  // A perplexity bound without tokens.
  LogitsThresholds th;
  th.max_ppl_ratio = 0.1;
  EXPECT_FALSE(compare_logits(a, a, "", th, 1).ok());
  // A missing file is named.
  auto r6 = compare_logits(a, dir.file("missing.npy"), "", LogitsThresholds{}, 1);
  ASSERT_FALSE(r6.ok());
  EXPECT_NE(r6.error().message.find("missing.npy"), std::string::npos);
}

TEST(CompareLogits, OptionalThresholds) {
  TempDir dir;
  auto v = random_logits(3 * 50, 4, 3.0f);
  auto w = v;
  for (size_t i = 0; i < w.size(); ++i) w[i] += (i % 7 == 0) ? 0.01f : 0.0f;
  auto a = write_f32(dir, "a.npy", {3, 50}, v);
  auto b = write_f32(dir, "b.npy", {3, 50}, w);
  LogitsThresholds th;
  th.max_mean_kl = 1.0;
  th.max_p99_kl = 1.0;
  th.max_abs_diff = 0.0101;
  auto rep = compare_logits(a, b, "", th, 1);
  ASSERT_TRUE(rep.ok()) << rep.error().message;
  EXPECT_EQ(rep->checks.size(), 5u);
  EXPECT_TRUE(rep->pass);
  EXPECT_NEAR(rep->max_abs_diff, 0.01, 1e-6);
  EXPECT_GT(rep->max_kl, 0.0);
  EXPECT_LE(rep->p99_kl, rep->max_kl);
  EXPECT_LE(rep->mean_kl, rep->p99_kl);
  th.max_abs_diff = 0.005;
  auto fails = compare_logits(a, b, "", th, 1);
  ASSERT_TRUE(fails.ok());
  EXPECT_FALSE(fails->pass);
  EXPECT_FALSE(find_check(*fails, "max_abs_diff")->pass);
  th.max_abs_diff.reset();
  th.max_kl.reset();
  th.min_top1.reset();
  th.max_mean_kl.reset();
  th.max_p99_kl = 0.0;
  auto p99 = compare_logits(a, b, "", th, 1);
  ASSERT_TRUE(p99.ok());
  ASSERT_EQ(p99->checks.size(), 1u);
  EXPECT_FALSE(p99->pass);
  // [N, V] positions are reported as [0, n].
  EXPECT_EQ(rep->batch, 1);
  EXPECT_EQ(rep->seq, 3);
  for (const auto& p : rep->worst) EXPECT_EQ(p.b, 0);
}

TEST(CompareLogits, ResultDoesNotDependOnThreads) {
  TempDir dir;
  const int64_t B = 3, T = 37, V = 101;
  auto v = random_logits(static_cast<size_t>(B * T * V), 5, 5.0f);
  auto w = v;
  std::mt19937 rng(6);
  std::normal_distribution<float> noise(0.0f, 0.05f);
  for (auto& x : w) x += noise(rng);
  std::vector<int32_t> tok(static_cast<size_t>(B * T));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t)
      tok[static_cast<size_t>(b * T + t)] = t < T - 5 * b ? static_cast<int32_t>(1 + (t * 13 + b) % (V - 1)) : 0;
  auto a = write_f32(dir, "a.npy", {B, T, V}, v);
  auto c = write_f32(dir, "c.npy", {B, T, V}, w);
  auto t = write_i32(dir, "t.npy", {B, T}, tok);
  LogitsThresholds th;
  th.max_mean_kl = 1.0;
  th.max_ppl_ratio = 1.0;
  auto r1 = compare_logits(a, c, t, th, 1);
  auto r3 = compare_logits(a, c, t, th, 3);
  ASSERT_TRUE(r1.ok()) << r1.error().message;
  ASSERT_TRUE(r3.ok()) << r3.error().message;
  EXPECT_EQ(r1->positions, static_cast<uint64_t>(B * T - 15));
  EXPECT_EQ(r1->padding, 15u);
  EXPECT_GT(r1->max_kl, 0.0);
  EXPECT_GT(r1->near_ties + r1->decisive, 0u);
  // Bitwise equal doubles, not close ones.
  auto same = [](double x, double y) { return std::memcmp(&x, &y, sizeof x) == 0; };
  EXPECT_EQ(r1->positions, r3->positions);
  EXPECT_EQ(r1->padding, r3->padding);
  EXPECT_TRUE(same(r1->mean_kl, r3->mean_kl));
  EXPECT_TRUE(same(r1->p99_kl, r3->p99_kl));
  EXPECT_TRUE(same(r1->max_kl, r3->max_kl));
  EXPECT_TRUE(same(r1->max_abs_diff, r3->max_abs_diff));
  EXPECT_EQ(r1->decisive, r3->decisive);
  EXPECT_EQ(r1->decisive_agree, r3->decisive_agree);
  EXPECT_EQ(r1->near_ties, r3->near_ties);
  EXPECT_EQ(r1->near_tie_agree, r3->near_tie_agree);
  EXPECT_EQ(r1->predictions, r3->predictions);
  EXPECT_TRUE(same(r1->ppl_reference, r3->ppl_reference));
  EXPECT_TRUE(same(r1->ppl_candidate, r3->ppl_candidate));
  EXPECT_TRUE(same(r1->ppl_ratio, r3->ppl_ratio));
  ASSERT_EQ(r1->worst.size(), r3->worst.size());
  for (size_t i = 0; i < r1->worst.size(); ++i) {
    EXPECT_EQ(r1->worst[i].b, r3->worst[i].b);
    EXPECT_EQ(r1->worst[i].t, r3->worst[i].t);
    EXPECT_TRUE(same(r1->worst[i].kl, r3->worst[i].kl));
    if (i > 0) {
      EXPECT_GE(r1->worst[i - 1].kl, r1->worst[i].kl);
    }
  }
  ASSERT_EQ(r1->checks.size(), r3->checks.size());
  for (size_t i = 0; i < r1->checks.size(); ++i) {
    EXPECT_EQ(r1->checks[i].name, r3->checks[i].name);
    EXPECT_TRUE(same(r1->checks[i].value, r3->checks[i].value));
    EXPECT_EQ(r1->checks[i].pass, r3->checks[i].pass);
  }
}

}  // namespace
}  // namespace grokit::validate
