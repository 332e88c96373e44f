// The quantizers of grokit quantize (quantize/quantizers.h): byte-exact layouts, the
// scalar reference against every SIMD path, E4M3 encoding, and a named error budget per
// scheme for round trip and dot products on data with trained-like statistics.
#include <gtest/gtest.h>

#include <algorithm>
#include <bit>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "common/common.h"
#include "format/format.h"
#include "quantize/quantizers.h"

namespace grokit::quantize {
namespace {

// ---------------------------------------------------------------------------------
// Error budgets: relative RMSE of the stored weights against w, and relative error of
// x @ W for random bf16 x, on the Laplace / log-normal data of make_release below
// (512 x 256 matrices, 8 scale blocks, 3 seeds; the numbers are printed).
//
// bf16: exact (0).
// fp8: E4M3 keeps 3 mantissa bits, so a value in [2^e, 2^(e+1)) has step 2^(e-3), a
//   relative step between 2^-4 and 2^-3; a uniform rounding error has RMS step/sqrt(12),
//   at most 2^-3/sqrt(12) = 0.036 of the value. Weighted by w^2 (the large values carry
//   the energy, and they sit where the relative step is smaller) it comes to ~0.026:
//   measured 0.0258-0.0260, dot products 0.0259-0.0262. Budget: the worst case plus
//   10%, 0.04.
// int4 (q in [-7, 7]): RTN's step is absmax/7 and its error RMS step/sqrt(12). Laplace
//   codes (b = 18, sigma = 25.5) have E[absmax of G] ~ b (ln G + 0.58), so rel. RMSE
//   ~ b (ln G + 0.58) / 7 / sqrt(12) / sigma = 0.118, 0.137, 0.158 for G = 32, 64, 128.
//   Measured:
//     group   RTN rel.RMSE    search rel.RMSE   dot products (RTN / search, max)
//      32     0.1191-0.1205   0.1131-0.1146     0.1233 / 0.1206
//      64     0.1373-0.1390   0.1282-0.1301     0.1406 / 0.1352
//     128     0.1575-0.1595   0.1428-0.1448     0.1597 / 0.1460
//   Budgets a little above: RTN 0.125 / 0.145 / 0.165, search 0.12 / 0.135 / 0.15; dot
//   products the same times 1.1 (errors of different rows are independent, so a dot
//   product's relative error is about the weights' relative RMSE; 2048 products per
//   matrix leave a few percent of sampling noise).
constexpr double kBudgetBf16 = 0.0;
constexpr double kBudgetFp8 = 0.04;
struct Int4Budget {
  int64_t group;
  double rtn, search;
};
constexpr Int4Budget kBudgetInt4[] = {{32, 0.125, 0.12}, {64, 0.145, 0.135}, {128, 0.165, 0.15}};
constexpr double kDotFactor = 1.1;

// ---------------------------------------------------------------------------------
// A release-like int8 matrix: Laplace codes (b = 18, std ~25, clipped to int8) and
// log-normal scales per column (sigma 0.3) and per block (sigma 0.15), as
// scripts/make_checkpoint.py draws them.
struct Release {
  int64_t K = 0, N = 0, B = 1;
  std::vector<int8_t> codes;     // [K][N]
  std::vector<uint16_t> scales;  // [B][N]

  Int8Source view(int64_t row0 = 0, int64_t rows = -1, int64_t c0 = 0, int64_t cols = -1) const {
    Int8Source s;
    s.codes = codes.data() + row0 * N + c0;
    s.scales = scales.data() + c0;
    s.rows = rows < 0 ? K - row0 : rows;
    s.cols = cols < 0 ? N - c0 : cols;
    s.ld = N;
    s.blocks = B;
    s.row0 = row0;
    s.total_rows = K;
    return s;
  }
  float scale(int64_t k, int64_t n) const { return bf16_bits_to_f32(scales[(k / (K / B)) * N + n]); }
  float w(int64_t k, int64_t n) const { return round_bf16(static_cast<float>(codes[k * N + n]) * scale(k, n)); }
};

Release make_release(int64_t K, int64_t N, int64_t B, uint64_t seed) {
  Release r;
  r.K = K;
  r.N = N;
  r.B = B;
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<double> uni(0.0, 1.0);
  std::normal_distribution<double> normal(0.0, 1.0);
  r.codes.resize(static_cast<size_t>(K * N));
  for (auto& c : r.codes) {
    double u = uni(rng) - 0.5;
    double v = -18.0 * std::copysign(std::log1p(-2.0 * std::fabs(u)), u);
    c = static_cast<int8_t>(std::clamp(std::round(v), -128.0, 127.0));
  }
  std::vector<double> col(static_cast<size_t>(N));
  for (auto& c : col) c = std::exp(0.3 * normal(rng));
  r.scales.resize(static_cast<size_t>(B * N));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t n = 0; n < N; ++n)
      r.scales[b * N + n] = f32_to_bf16_bits(static_cast<float>(0.02 / 25.0 * col[n] * std::exp(0.15 * normal(rng))));
  return r;
}

// ---------------------------------------------------------------------------------
// Independent decoders of the stored layouts (SPEC.md §4.1).
std::vector<float> decode_q4g(const std::vector<uint8_t>& p, int64_t K, int64_t N, int64_t G) {
  std::vector<float> w(static_cast<size_t>(K * N));
  const size_t gbytes = format::q4g_group_bytes(G, N);
  for (int64_t k = 0; k < K; ++k) {
    const uint8_t* g = p.data() + (k / G) * gbytes;
    const int64_t r = k % G, c = r / 32, i = (r % 32) / 2;
    for (int64_t n = 0; n < N; ++n) {
      const uint8_t byte = g[(c * N + n) * 16 + i];
      int q = (r % 2 == 0) ? (byte & 15) : (byte >> 4);
      if (q >= 8) q -= 16;
      const float scale = bf16_bits_to_f32(load_le<uint16_t>(g + (G / 32) * N * 16 + 2 * n));
      w[k * N + n] = round_bf16(static_cast<float>(q) * scale);
    }
  }
  return w;
}

// E4M3 from its definition (sign, 4 exponent bits with bias 7, 3 mantissa bits).
float e4m3_value(uint8_t c) {
  const int e = (c >> 3) & 15, m = c & 7;
  const float sign = (c & 0x80) ? -1.0f : 1.0f;
  if (e == 15 && m == 7) return std::numeric_limits<float>::quiet_NaN();
  if (e == 0) return sign * std::ldexp(static_cast<float>(m), -9);
  return sign * std::ldexp(1.0f + static_cast<float>(m) / 8.0f, e - 7);
}

std::vector<float> decode_f8col(const std::vector<uint8_t>& p, int64_t K, int64_t N) {
  std::vector<float> w(static_cast<size_t>(K * N));
  for (int64_t k = 0; k < K; ++k)
    for (int64_t n = 0; n < N; ++n) {
      const float scale = bf16_bits_to_f32(load_le<uint16_t>(p.data() + K * N + 2 * n));
      w[k * N + n] = round_bf16(e4m3_value(p[((k / 32) * N + n) * 32 + k % 32]) * scale);
    }
  return w;
}

std::vector<float> reference(const Release& r) {
  std::vector<float> w(static_cast<size_t>(r.K * r.N));
  for (int64_t k = 0; k < r.K; ++k)
    for (int64_t n = 0; n < r.N; ++n) w[k * r.N + n] = r.w(k, n);
  return w;
}

double rel_rmse(const std::vector<float>& a, const std::vector<float>& ref) {
  double e = 0, s = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    e += (static_cast<double>(a[i]) - ref[i]) * (static_cast<double>(a[i]) - ref[i]);
    s += static_cast<double>(ref[i]) * ref[i];
  }
  return std::sqrt(e / s);
}

// Relative error of x @ W over `vectors` random bf16 x (all columns together).
double dot_error(const std::vector<float>& wq, const std::vector<float>& ref, int64_t K, int64_t N, int vectors = 8) {
  std::mt19937_64 rng(99);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  double e = 0, s = 0;
  std::vector<float> x(static_cast<size_t>(K));
  for (int v = 0; v < vectors; ++v) {
    for (auto& xi : x) xi = round_bf16(normal(rng));
    for (int64_t n = 0; n < N; ++n) {
      double y = 0, yq = 0;
      for (int64_t k = 0; k < K; ++k) {
        y += static_cast<double>(x[k]) * ref[k * N + n];
        yq += static_cast<double>(x[k]) * wq[k * N + n];
      }
      e += (yq - y) * (yq - y);
      s += y * y;
    }
  }
  return std::sqrt(e / s);
}

std::vector<uint8_t> run_q4g(const Int8Source& s, int64_t G, bool search, ErrorStats* st = nullptr) {
  std::vector<uint8_t> out(static_cast<size_t>(s.rows / G) * format::q4g_group_bytes(G, s.cols), 0xcd);
  quantize_q4g(s, G, search, out.data(), st);
  return out;
}
std::vector<uint8_t> run_q4g_ref(const Int8Source& s, int64_t G, bool search, ErrorStats* st = nullptr) {
  std::vector<uint8_t> out(static_cast<size_t>(s.rows / G) * format::q4g_group_bytes(G, s.cols), 0xab);
  quantize_q4g_ref(s, G, search, out.data(), st);
  return out;
}
std::vector<uint16_t> col_scales(const Int8Source& s) {
  std::vector<float> a(static_cast<size_t>(s.cols), 0.0f);
  column_absmax(s, a.data());
  std::vector<uint16_t> sc(static_cast<size_t>(s.cols));
  f8_column_scales(a.data(), s.cols, sc.data());
  return sc;
}
std::vector<uint8_t> run_f8(const Int8Source& s, const std::vector<uint16_t>& sc, ErrorStats* st = nullptr) {
  std::vector<uint8_t> out(format::f8col_matrix_bytes(s.rows, s.cols), 0xcd);
  quantize_f8col(s, sc.data(), out.data(), st);
  return out;
}

void expect_stats_near(const ErrorStats& a, const ErrorStats& b) {
  auto near = [](double x, double y) { return std::fabs(x - y) <= 1e-5 * std::max(std::fabs(x), std::fabs(y)) + 1e-30; };
  EXPECT_EQ(a.count, b.count);
  EXPECT_TRUE(near(a.sum_ref2, b.sum_ref2)) << a.sum_ref2 << " " << b.sum_ref2;
  EXPECT_TRUE(near(a.sum_err2, b.sum_err2)) << a.sum_err2 << " " << b.sum_err2;
  EXPECT_TRUE(near(a.sum_cross, b.sum_cross));
  EXPECT_TRUE(near(a.sum_out2, b.sum_out2));
  EXPECT_TRUE(near(a.max_steps, b.max_steps)) << a.max_steps << " " << b.max_steps;
  EXPECT_TRUE(near(a.rtn_err2, b.rtn_err2));
  EXPECT_TRUE(near(a.rtn_cross, b.rtn_cross));
  EXPECT_TRUE(near(a.rtn_out2, b.rtn_out2));
  EXPECT_EQ(a.clipped_count, b.clipped_count);
  EXPECT_EQ(a.nonfinite_count, b.nonfinite_count);
  EXPECT_EQ(a.groups, b.groups);
  EXPECT_EQ(a.exact_groups, b.exact_groups);
  EXPECT_EQ(a.improved_groups, b.improved_groups);
}

// Runs fn once per SIMD level the CPU has, then restores the best.
template <class Fn>
void for_each_simd_level(Fn&& fn) {
  const int best = set_simd_level(-1);
  for (int l = 0; l <= best; ++l) {
    ASSERT_EQ(set_simd_level(l), l);
    SCOPED_TRACE(testing::Message() << "SIMD level " << l);
    fn(l);
  }
  set_simd_level(-1);
}

// ---------------------------------------------------------------------------------
// q4g.
TEST(QuantizeQ4g, LayoutByteExact) {
  // 64 rows, 2 columns, group 32, scales 1.0, codes in [-7, 7]: absmax 7 gives scale 1
  // and q = code under RTN. Column 0: q = k % 15 - 7; column 1: -(k % 8).
  Release r;
  r.K = 64;
  r.N = 2;
  r.B = 1;
  for (int k = 0; k < 64; ++k) {
    r.codes.push_back(static_cast<int8_t>(k % 15 - 7));
    r.codes.push_back(static_cast<int8_t>(-(k % 8)));
  }
  r.codes[1] = -7;  // column 1's absmax is 7 in both groups
  r.codes[65] = 7;
  r.scales = {0x3f80, 0x3f80};
  for (bool search : {false, true}) {
    std::vector<uint8_t> p = run_q4g(r.view(), 32, search);
    ASSERT_EQ(p.size(), 2u * 48u);
    // Group 0, chunk 0, column 0: rows 0/1 are -7/-6 -> 0x9 | 0xa << 4.
    EXPECT_EQ(p[0], 0xa9);
    EXPECT_EQ(p[1], 0xcb);  // rows 2, 3: -5, -4
    EXPECT_EQ(p[7], 0x97);  // rows 14, 15: 7, -7
    // Column 1 starts at byte 16: rows 0/1: -7 (set above), -1.
    EXPECT_EQ(p[16], 0xf9);
    // Scales of group 0 at 32: two bf16 1.0, then 12 zero bytes of padding.
    EXPECT_EQ(p[32], 0x80);
    EXPECT_EQ(p[33], 0x3f);
    EXPECT_EQ(p[34], 0x80);
    EXPECT_EQ(p[35], 0x3f);
    for (int i = 36; i < 48; ++i) EXPECT_EQ(p[i], 0) << i;
    // Group 1 (rows 32..63) starts at 48: rows 32/33 of column 0: 32 % 15 - 7 = -5, -4.
    EXPECT_EQ(p[48], 0xcb);
    EXPECT_EQ(p[48 + 16], 0x07 | 0xf0);  // column 1 rows 32, 33: 7 (set above), -1
    // Exactly the hand-computed nibbles everywhere.
    for (int64_t k = 0; k < 64; ++k)
      for (int64_t n = 0; n < 2; ++n) {
        const int64_t g = k / 32, i = (k % 32) / 2;
        const uint8_t byte = p[static_cast<size_t>(g * 48 + n * 16 + i)];
        const int q = (k % 2 == 0) ? (byte & 15) : (byte >> 4);
        EXPECT_EQ(q, r.codes[k * 2 + n] & 15) << k << " " << n;
      }
  }
  // Group 64: two chunks, chunk 1 after all columns of chunk 0.
  std::vector<uint8_t> p = run_q4g(r.view(), 64, false);
  ASSERT_EQ(p.size(), format::q4g_group_bytes(64, 2));
  ASSERT_EQ(p.size(), 2u * 2u * 16u + 16u);
  EXPECT_EQ(p[0], 0xa9);       // chunk 0, column 0, rows 0/1
  EXPECT_EQ(p[32], 0xcb);      // chunk 1, column 0, rows 32/33
  EXPECT_EQ(p[48], 0x07 | 0xf0);  // chunk 1, column 1, rows 32/33
  EXPECT_EQ(load_le<uint16_t>(p.data() + 64), 0x3f80);
}

TEST(QuantizeQ4g, MatchesScalarReferenceOnEveryPath) {
  struct Case {
    int64_t K, N, B, G;
  };
  for (Case c : {Case{128, 37, 1, 32}, Case{256, 64, 4, 64}, Case{256, 100, 8, 128}, Case{384, 17, 3, 128},
                 Case{64, 1, 2, 32}}) {
    Release r = make_release(c.K, c.N, c.B, static_cast<uint64_t>(c.K * 1000 + c.N));
    // Exact-grid, zero, zero-scale and non-finite columns exercise every branch.
    if (c.N > 5) {
      for (int64_t k = 0; k < c.K; ++k) {
        r.codes[k * c.N + 1] = static_cast<int8_t>(4 * ((k * 7) % 15 - 7));
        r.codes[k * c.N + 2] = 0;
      }
      r.scales[3] = 0;
      r.scales[(c.B - 1) * c.N + 5] = 0x7fc0;
    }
    // The screening's edges (search step 4a): small codes (|code| < 32, not screened),
    // a negative int8 scale (not screened), and codes at -128 / 127 (the fixed-point
    // residuals near -2^15).
    if (c.N > 9) {
      for (int64_t k = 0; k < c.K; ++k) {
        r.codes[k * c.N + 6] = static_cast<int8_t>(r.codes[k * c.N + 6] / 5);
        r.codes[k * c.N + 8] = static_cast<int8_t>(k % 3 == 0 ? -128 : (k % 3 == 1 ? 127 : (k * 37) % 61 - 30));
      }
      for (int64_t b = 0; b < c.B; ++b) r.scales[b * c.N + 7] |= 0x8000;
    }
    for (bool search : {false, true}) {
      SCOPED_TRACE(testing::Message() << c.K << "x" << c.N << " B " << c.B << " G " << c.G << " search " << search);
      ErrorStats sr;
      std::vector<uint8_t> ref = run_q4g_ref(r.view(), c.G, search, &sr);
      for_each_simd_level([&](int) {
        ErrorStats sf;
        EXPECT_EQ(run_q4g(r.view(), c.G, search, &sf), ref);
        expect_stats_near(sf, sr);
      });
      // A row slice from a block boundary's middle, and a column window.
      const int64_t row0 = c.K / 2 - c.G;
      ErrorStats srs;
      std::vector<uint8_t> ref_slice = run_q4g_ref(r.view(row0, c.G, 1, c.N - 1), c.G, search, &srs);
      for_each_simd_level([&](int) {
        ErrorStats sfs;
        EXPECT_EQ(run_q4g(r.view(row0, c.G, 1, c.N - 1), c.G, search, &sfs), ref_slice);
        expect_stats_near(sfs, srs);
      });
    }
  }
}

// The budgets, search against RTN per group and in total, the stats against the payload.
TEST(QuantizeQ4g, ErrorBudgetsAndSearch) {
  const int64_t K = 512, N = 256;
  for (const Int4Budget& b : kBudgetInt4) {
    for (uint64_t seed : {1, 2, 3}) {
      SCOPED_TRACE(testing::Message() << "group " << b.group << " seed " << seed);
      Release r = make_release(K, N, 8, seed);
      const std::vector<float> w = reference(r);
      ErrorStats st_rtn, st_search;
      const std::vector<float> wr = decode_q4g(run_q4g(r.view(), b.group, false, &st_rtn), K, N, b.group);
      const std::vector<float> ws = decode_q4g(run_q4g(r.view(), b.group, true, &st_search), K, N, b.group);
      const double e_rtn = rel_rmse(wr, w), e_search = rel_rmse(ws, w);
      const double d_rtn = dot_error(wr, w, K, N), d_search = dot_error(ws, w, K, N);
      std::printf("int4 g%-3lld seed %llu: RTN rel.RMSE %.4f dot %.4f | search rel.RMSE %.4f dot %.4f | improved %.1f%%\n",
                  static_cast<long long>(b.group), static_cast<unsigned long long>(seed), e_rtn, d_rtn, e_search,
                  d_search, 100.0 * st_search.improved_groups / st_search.groups);
      EXPECT_LE(e_rtn, b.rtn);
      EXPECT_LE(e_search, b.search);
      EXPECT_LE(d_rtn, b.rtn * kDotFactor);
      EXPECT_LE(d_search, b.search * kDotFactor);
      EXPECT_LT(e_search, e_rtn);
      // The stats describe the payloads.
      EXPECT_NEAR(st_search.relative_rmse(), e_search, 1e-6);
      EXPECT_NEAR(st_search.rtn_relative_rmse(), e_rtn, 1e-6);
      EXPECT_NEAR(st_rtn.relative_rmse(), e_rtn, 1e-6);
      EXPECT_NEAR(st_rtn.rtn_relative_rmse(), e_rtn, 1e-6);
      EXPECT_GT(st_search.cosine(), 1.0 - b.search * b.search);  // about 1 / sqrt(1 + rmse^2)
      EXPECT_GE(st_search.cosine(), st_search.rtn_cosine());
      EXPECT_EQ(st_search.count, K * N);
      EXPECT_EQ(st_search.groups, K / b.group * N);
      EXPECT_EQ(st_rtn.clipped_count, 0);
      EXPECT_LE(st_rtn.max_steps, 0.52);  // half a step plus the bf16 rounding of q * scale (7 * 2^-9)
      EXPECT_GT(st_search.clipped_count, 0);              // shrunk scales clip the tails
      // Never worse on any group (up to fp32 summation in the choice).
      int worse = 0;
      for (int64_t g = 0; g < K / b.group; ++g)
        for (int64_t n = 0; n < N; ++n) {
          double er = 0, es = 0;
          for (int64_t k = g * b.group; k < (g + 1) * b.group; ++k) {
            const size_t i = static_cast<size_t>(k * N + n);
            er += (static_cast<double>(wr[i]) - w[i]) * (static_cast<double>(wr[i]) - w[i]);
            es += (static_cast<double>(ws[i]) - w[i]) * (static_cast<double>(ws[i]) - w[i]);
          }
          if (es > er * (1 + 1e-5)) ++worse;
        }
      EXPECT_EQ(worse, 0);
    }
  }
}

TEST(QuantizeQ4g, ExactGridGroupsHaveZeroError) {
  const int64_t K = 256, N = 48;
  for (int variant = 0; variant < 2; ++variant) {
    Release r = make_release(K, N, 4, 7);
    std::mt19937 rng(5);
    for (auto& c : r.codes) {
      int v = static_cast<int>(rng() % 15) - 7;  // [-7, 7]
      c = static_cast<int8_t>(variant == 0 ? 4 * v : v);
    }
    for (int64_t G : {32, 64}) {
      ErrorStats st;
      const std::vector<float> ws = decode_q4g(run_q4g(r.view(), G, true, &st), K, N, G);
      EXPECT_EQ(ws, reference(r)) << "variant " << variant << " G " << G;
      EXPECT_EQ(st.exact_groups, st.groups);
      EXPECT_EQ(st.sum_err2, 0.0);
      EXPECT_EQ(st.max_steps, 0.0);
      EXPECT_GT(st.rtn_err2, 0.0);  // RTN alone does not find the grid
    }
  }
  // Multiples of 3 under a scale with 8 significant bits: s8 * 3 is no bf16, so no exact
  // grid; under scale 1.0 it is.
  Release r = make_release(64, 2, 1, 9);
  for (int64_t k = 0; k < 64; ++k) {
    r.codes[k * 2] = r.codes[k * 2 + 1] = static_cast<int8_t>(3 * ((k % 15) - 7));
  }
  r.scales = {f32_to_bf16_bits(1.9921875f), 0x3f80};
  ErrorStats st;
  std::vector<uint8_t> p = run_q4g(r.view(), 64, true, &st);
  EXPECT_EQ(st.exact_groups, 1);
  EXPECT_EQ(load_le<uint16_t>(p.data() + 64 + 2), f32_to_bf16_bits(3.0f));
  // A group across two blocks with different scales is not on one grid.
  Release r2 = make_release(128, 1, 2, 11);
  for (auto& c : r2.codes) c = static_cast<int8_t>(c % 8);
  r2.scales = {0x3f80, 0x4000};
  ErrorStats st2;
  run_q4g(r2.view(), 128, true, &st2);
  EXPECT_EQ(st2.exact_groups, 0);
  r2.scales = {0x3f80, 0x3f80};
  ErrorStats st3;
  run_q4g(r2.view(), 128, true, &st3);
  EXPECT_EQ(st3.exact_groups, 1);
  EXPECT_EQ(st3.sum_err2, 0.0);
}

TEST(QuantizeQ4g, ZeroAndNonFiniteGroups) {
  Release r = make_release(128, 20, 2, 3);
  for (int64_t k = 0; k < 128; ++k) r.codes[k * 20 + 4] = 0;  // column 4: zero codes
  r.scales[7] = 0;                                            // column 7, block 0: zero scale
  r.scales[20 + 9] = 0x7f80;                                   // column 9, block 1: +inf
  r.scales[11] = 0xffff;       // column 11, block 0: a negative NaN, every payload bit set
  r.scales[20 + 13] = 0x7f81;  // column 13, block 1: a signaling NaN
  for (bool search : {false, true}) {
    ErrorStats st;
    std::vector<uint8_t> p = run_q4g(r.view(), 64, search, &st);
    const size_t gb = format::q4g_group_bytes(64, 20);
    auto scale_bits = [&](int64_t g, int64_t n) { return load_le<uint16_t>(p.data() + g * gb + 2 * 16 * 20 + 2 * n); };
    auto codes_zero = [&](int64_t g, int64_t n) {
      for (int64_t c = 0; c < 2; ++c)
        for (int i = 0; i < 16; ++i)
          if (p[g * gb + (c * 20 + n) * 16 + i] != 0) return false;
      return true;
    };
    for (int64_t g = 0; g < 2; ++g) {
      EXPECT_EQ(scale_bits(g, 4), 0);
      EXPECT_TRUE(codes_zero(g, 4));
    }
    EXPECT_EQ(scale_bits(0, 7), 0);
    EXPECT_TRUE(codes_zero(0, 7));
    EXPECT_NE(scale_bits(1, 7), 0);
    EXPECT_EQ(scale_bits(1, 9), 0x7fc0);  // a non-finite group: NaN scale, q 0, counted
    EXPECT_TRUE(codes_zero(1, 9));
    EXPECT_NE(scale_bits(0, 9), 0x7fc0);
    EXPECT_EQ(scale_bits(0, 11), 0x7fc0);
    EXPECT_TRUE(codes_zero(0, 11));
    EXPECT_EQ(scale_bits(1, 13), 0x7fc0);
    EXPECT_TRUE(codes_zero(1, 13));
    EXPECT_EQ(st.nonfinite_count, 3 * 64);
    EXPECT_TRUE(std::isfinite(st.sum_err2) && std::isfinite(st.rtn_err2) && std::isfinite(st.max_steps));
    EXPECT_EQ(run_q4g_ref(r.view(), 64, search), p);
  }
}

// Scales of one bf16 subnormal step u and codes up to 10: RTN's scale bf16(amax / 7) is
// u where amax is 8u to 10u, so 7.5u does not reach the largest weights and RTN clips
// (the only way it can).
TEST(QuantizeQ4g, SubnormalScalesClipUnderRtn) {
  Release r = make_release(64, 24, 1, 5);
  for (auto& c : r.codes) c = static_cast<int8_t>(c % 11);
  for (auto& sc : r.scales) sc = 0x0001;
  for (bool search : {false, true}) {
    for_each_simd_level([&](int) {
      ErrorStats st, st_ref;
      EXPECT_EQ(run_q4g(r.view(), 32, search, &st), run_q4g_ref(r.view(), 32, search, &st_ref));
      expect_stats_near(st, st_ref);
      if (!search) {
        EXPECT_GT(st.clipped_count, 0);
      }
    });
  }
}

// ---------------------------------------------------------------------------------
// Slices: rows of a row-split matrix, and columns.
TEST(QuantizeSlices, RowSliceOfRowSplitMatrixUsesItsBlocks) {
  const int64_t K = 512, N = 40, B = 4;  // blocks of 128 rows
  Release r = make_release(K, N, B, 21);
  const int64_t row0 = 192, rows = 192;  // rows 192..383: blocks 1 and 2
  // q4g: the slice's groups are the whole matrix's groups 3..5 (group 64).
  for (bool search : {false, true}) {
    std::vector<uint8_t> whole = run_q4g(r.view(), 64, search), part = run_q4g(r.view(row0, rows), 64, search);
    const size_t gb = format::q4g_group_bytes(64, N);
    EXPECT_TRUE(std::equal(part.begin(), part.end(), whole.begin() + 3 * static_cast<std::ptrdiff_t>(gb)));
  }
  // The values themselves: the bf16 scheme is w.
  std::vector<uint16_t> out(static_cast<size_t>(rows * N));
  dequantize_bf16(r.view(row0, rows), out.data(), nullptr);
  for (int64_t k = 0; k < rows; ++k)
    for (int64_t n = 0; n < N; ++n)
      ASSERT_EQ(out[k * N + n], f32_to_bf16_bits(r.w(row0 + k, n))) << k << " " << n;
  // f8col with the whole matrix's column scales: the slice's chunks 6..11.
  const std::vector<uint16_t> sc = col_scales(r.view());
  std::vector<uint8_t> whole = run_f8(r.view(), sc), part = run_f8(r.view(row0, rows), sc);
  EXPECT_TRUE(std::equal(part.begin(), part.begin() + rows * N, whole.begin() + row0 * N));
  // Absmax over slices = absmax over the whole.
  std::vector<float> a1(N, 0.0f), a2(N, 0.0f);
  column_absmax(r.view(), a1.data());
  column_absmax(r.view(0, row0), a2.data());
  column_absmax(r.view(row0, K - row0), a2.data());
  EXPECT_EQ(a1, a2);
}

// column_absmax against its definition, element by element: max |w| over the rows with
// NaN weights skipped and infinities kept, on scales that are negative, subnormal, huge
// (products overflow), infinite or NaN, codes -128 and 0, blocks of odd length, and row
// windows that start inside a block.
TEST(QuantizeAbsmax, EqualsTheElementwiseMaximum) {
  const int64_t K = 150, N = 37, B = 3;  // blocks of 50 rows
  Release r = make_release(K, N, B, 77);
  const uint16_t special[] = {0xbc00 /* -0.0078 */, 0x0001 /* subnormal */, 0x7f00 /* 1.7e38 */,
                              0x7f80 /* inf */,     0xff80 /* -inf */,      0x7fc0 /* NaN */, 0x0000, 0x8000};
  for (int64_t n = 0; n < 8; ++n) r.scales[(n % B) * N + n] = special[n];
  for (int64_t n = 8; n < 12; ++n) {  // columns of zero codes under an infinite scale: 0 * inf is NaN
    for (int64_t k = 0; k < K; ++k) r.codes[k * N + n] = n % 2 == 0 ? 0 : r.codes[k * N + n];
    r.scales[n] = 0x7f80;
  }
  r.codes[3 * N + 5] = -128;
  for (int64_t row0 : {int64_t{0}, int64_t{17}, int64_t{50}, int64_t{99}}) {
    for (int64_t rows : {int64_t{1}, int64_t{33}, K - row0}) {
      if (row0 + rows > K) continue;
      std::vector<float> got(N, 0.0f), want(N, 0.0f);
      column_absmax(r.view(row0, rows), got.data());
      for (int64_t k = row0; k < row0 + rows; ++k)
        for (int64_t n = 0; n < N; ++n) {
          const float a = std::fabs(r.w(k, n));
          if (a > want[n]) want[n] = a;  // NaN fails the comparison: skipped
        }
      for (int64_t n = 0; n < N; ++n)
        ASSERT_EQ(std::bit_cast<uint32_t>(got[n]), std::bit_cast<uint32_t>(want[n]))
            << "row0 " << row0 << " rows " << rows << " column " << n << ": " << got[n] << " vs " << want[n];
    }
  }
}

TEST(QuantizeSlices, ColumnHalvesGiveTheWholeBytes) {
  const int64_t K = 256, N = 100, c = 48;
  Release r = make_release(K, N, 2, 33);
  for (int64_t G : {32, 128}) {
    ErrorStats sw, s1, s2;
    std::vector<uint8_t> whole = run_q4g(r.view(), G, true, &sw);
    std::vector<uint8_t> left = run_q4g(r.view(0, -1, 0, c), G, true, &s1);
    std::vector<uint8_t> right = run_q4g(r.view(0, -1, c, N - c), G, true, &s2);
    const size_t gw = format::q4g_group_bytes(G, N), gl = format::q4g_group_bytes(G, c),
                 gr = format::q4g_group_bytes(G, N - c);
    for (int64_t g = 0; g < K / G; ++g) {
      for (int64_t ch = 0; ch < G / 32; ++ch) {
        const uint8_t* w = whole.data() + g * gw + ch * N * 16;
        EXPECT_EQ(0, std::memcmp(w, left.data() + g * gl + ch * c * 16, c * 16));
        EXPECT_EQ(0, std::memcmp(w + c * 16, right.data() + g * gr + ch * (N - c) * 16, (N - c) * 16));
      }
      const uint8_t* ws = whole.data() + g * gw + (G / 32) * N * 16;
      EXPECT_EQ(0, std::memcmp(ws, left.data() + g * gl + (G / 32) * c * 16, 2 * c));
      EXPECT_EQ(0, std::memcmp(ws + 2 * c, right.data() + g * gr + (G / 32) * (N - c) * 16, 2 * (N - c)));
    }
    s1.merge(s2);
    expect_stats_near(s1, sw);
  }
  // f8col: per chunk, the columns; then the scales.
  const std::vector<uint16_t> sc = col_scales(r.view());
  const std::vector<uint16_t> scl(sc.begin(), sc.begin() + c), scr(sc.begin() + c, sc.end());
  EXPECT_EQ(col_scales(r.view(0, -1, 0, c)), scl);
  std::vector<uint8_t> whole = run_f8(r.view(), sc), left = run_f8(r.view(0, -1, 0, c), scl),
                       right = run_f8(r.view(0, -1, c, N - c), scr);
  for (int64_t ch = 0; ch < K / 32; ++ch) {
    EXPECT_EQ(0, std::memcmp(whole.data() + ch * N * 32, left.data() + ch * c * 32, c * 32));
    EXPECT_EQ(0, std::memcmp(whole.data() + ch * N * 32 + c * 32, right.data() + ch * (N - c) * 32, (N - c) * 32));
  }
}

// A column window whose scale rows are copied for the window alone (stride = its width,
// Int8Source::scales_ld) while its codes stay in place (stride = the matrix's width), as
// the quantize pipeline reads them: the same bytes and statistics as the window over the
// whole scale rows, at every SIMD level, in every scheme. Four scale blocks, so a
// mistaken stride reads other blocks' scales.
TEST(QuantizeSlices, WindowScaleRowsKeepTheirOwnStride) {
  const int64_t K = 256, N = 100, B = 4, c0 = 24, c = 48;
  Release r = make_release(K, N, B, 41);
  std::vector<uint16_t> compact(static_cast<size_t>(B * c));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t j = 0; j < c; ++j) compact[static_cast<size_t>(b * c + j)] = r.scales[static_cast<size_t>(b * N + c0 + j)];
  const Int8Source full = r.view(0, -1, c0, c);
  Int8Source own = full;
  own.scales = compact.data();
  own.scales_ld = c;
  for_each_simd_level([&](int) {
    for (int64_t G : {32, 128})
      for (bool search : {false, true}) {
        ErrorStats a, b;
        EXPECT_EQ(run_q4g(own, G, search, &a), run_q4g(full, G, search, &b)) << G << " " << search;
        expect_stats_near(a, b);
        EXPECT_EQ(a.sum_err2, b.sum_err2);
        ErrorStats ra, rb;
        EXPECT_EQ(run_q4g_ref(own, G, search, &ra), run_q4g_ref(full, G, search, &rb)) << G << " " << search;
        EXPECT_EQ(ra.sum_err2, rb.sum_err2);
      }
    const std::vector<uint16_t> sc = col_scales(full);
    EXPECT_EQ(col_scales(own), sc);
    ErrorStats a, b;
    EXPECT_EQ(run_f8(own, sc, &a), run_f8(full, sc, &b));
    EXPECT_EQ(a.sum_err2, b.sum_err2);
    std::vector<uint16_t> w1(static_cast<size_t>(K * c)), w2(w1.size());
    dequantize_bf16(own, w1.data(), nullptr);
    dequantize_bf16(full, w2.data(), nullptr);
    EXPECT_EQ(w1, w2);
  });
  // And they are the window's scales: block 3's weights differ from block 0's scale's.
  EXPECT_NE(r.scales[3 * N + c0], r.scales[c0]);
}

// ---------------------------------------------------------------------------------
// E4M3.
TEST(QuantizeE4m3, AllCodesRoundTrip) {
  for (int c = 0; c < 256; ++c) {
    const float v = e4m3_value(static_cast<uint8_t>(c));
    if (std::isnan(v)) {
      EXPECT_TRUE(c == 0x7f || c == 0xff);
      continue;
    }
    EXPECT_EQ(f32_to_e4m3(v), c) << c << " " << v;
  }
  EXPECT_EQ(e4m3_value(0x7e), 448.0f);
  EXPECT_EQ(e4m3_value(0x01), std::ldexp(1.0f, -9));
  EXPECT_EQ(e4m3_value(0x08), std::ldexp(1.0f, -6));
  EXPECT_EQ(f32_to_e4m3(std::numeric_limits<float>::quiet_NaN()), 0);
  EXPECT_EQ(f32_to_e4m3(464.0f), 0x7e);  // the midpoint to the missing 480: saturates
  EXPECT_EQ(f32_to_e4m3(1e30f), 0x7e);
  EXPECT_EQ(f32_to_e4m3(std::numeric_limits<float>::infinity()), 0x7e);
  EXPECT_EQ(f32_to_e4m3(-std::numeric_limits<float>::infinity()), 0xfe);
  EXPECT_EQ(f32_to_e4m3(-0.0f), 0x80);
  EXPECT_EQ(f32_to_e4m3(std::ldexp(1.0f, -11)), 0x00);  // a quarter of the smallest: 0
  EXPECT_EQ(f32_to_e4m3(-std::ldexp(1.0f, -10)), 0x80);  // half the smallest: tie to even 0
}

// The values to test RNE on: every midpoint of two neighbouring codes, and its bf16
// neighbours (midpoints have 5 significant bits, so both are bf16 values strictly inside).
struct Probe {
  float x;
  uint8_t expect;
};
std::vector<Probe> midpoint_probes() {
  std::vector<Probe> v;
  for (int c = 0; c < 0x7e; ++c) {
    const float a = e4m3_value(static_cast<uint8_t>(c)), b = e4m3_value(static_cast<uint8_t>(c + 1));
    const float mid = (a + b) / 2;
    const uint16_t mb = f32_to_bf16_bits(mid);
    EXPECT_EQ(bf16_bits_to_f32(mb), mid);
    const uint8_t even = (c % 2 == 0) ? static_cast<uint8_t>(c) : static_cast<uint8_t>(c + 1);
    for (float sign : {1.0f, -1.0f}) {
      const uint8_t s = sign < 0 ? 0x80 : 0;
      v.push_back({sign * mid, static_cast<uint8_t>(even | s)});
      v.push_back({sign * bf16_bits_to_f32(static_cast<uint16_t>(mb + 1)), static_cast<uint8_t>((c + 1) | s)});
      v.push_back({sign * bf16_bits_to_f32(static_cast<uint16_t>(mb - 1)), static_cast<uint8_t>(c | s)});
    }
  }
  return v;
}

TEST(QuantizeE4m3, RoundsToNearestEvenAtMidpoints) {
  for (const Probe& p : midpoint_probes()) EXPECT_EQ(f32_to_e4m3(p.x), p.expect) << p.x;
}

// The vector encoder inside quantize_f8col: one column per probe, w = probe (code 1 or
// -1 times a scale equal to the probe), column scale 1.0.
TEST(QuantizeE4m3, VectorPathMatchesAtMidpoints) {
  std::vector<Probe> probes = midpoint_probes();
  for (int c = 0; c < 256; ++c)
    if (c != 0x7f && c != 0xff) probes.push_back({e4m3_value(static_cast<uint8_t>(c)), static_cast<uint8_t>(c)});
  probes.push_back({600.0f, 0x7e});
  probes.push_back({-464.0f, 0xfe});
  const int64_t N = static_cast<int64_t>(probes.size());
  Release r;
  r.K = 32;
  r.N = N;
  r.B = 1;
  r.codes.assign(static_cast<size_t>(32 * N), 0);
  for (int64_t n = 0; n < N; ++n) {
    const float x = probes[n].x;
    r.scales.push_back(f32_to_bf16_bits(std::fabs(x)));
    for (int64_t k = 0; k < 32; ++k) r.codes[k * N + n] = static_cast<int8_t>(k % 2 == 0 ? (x < 0 ? -1 : 1) : 0);
  }
  const std::vector<uint16_t> ones(static_cast<size_t>(N), 0x3f80);
  for_each_simd_level([&](int) {
    ErrorStats st;
    std::vector<uint8_t> p = run_f8(r.view(), ones, &st);
    for (int64_t n = 0; n < N; ++n) {
      if (probes[n].x == 0.0f) continue;  // -0 is stored through code 0 * scale: +0
      EXPECT_EQ(p[n * 32], probes[n].expect) << probes[n].x;
      EXPECT_EQ(p[n * 32 + 1], 0);
    }
    EXPECT_EQ(st.clipped_count, 32);  // 600 and -464 on the 16 even rows
  });
}

// ---------------------------------------------------------------------------------
// f8col.
TEST(QuantizeF8col, LayoutByteExact) {
  // 64 rows, 3 columns, int8 scale 1.0 (w = code), column scale 1.0: x = code.
  Release r;
  r.K = 64;
  r.N = 3;
  r.B = 1;
  for (int k = 0; k < 64; ++k)
    for (int n = 0; n < 3; ++n) r.codes.push_back(static_cast<int8_t>((k + 10 * n) % 9 - 4));
  r.scales = {0x3f80, 0x3f80, 0x3f80};
  const std::vector<uint16_t> sc = {0x3f80, 0x3f80, 0x3f80};
  std::vector<uint8_t> p = run_f8(r.view(), sc);
  ASSERT_EQ(p.size(), format::f8col_matrix_bytes(64, 3));
  ASSERT_EQ(p.size(), 208u);
  // Row 0: codes -4, -3, -2: E4M3 0xc8, 0xc4, 0xc0.
  EXPECT_EQ(p[0], 0xc8);
  EXPECT_EQ(p[32], 0xc4);
  EXPECT_EQ(p[64], 0xc0);
  // Row 1, column 0: -3 = 0xc4; row 33 (chunk 1, byte 1), column 2: (33+20)%9-4 = 4 = 0x48.
  EXPECT_EQ(p[1], 0xc4);
  EXPECT_EQ(p[3 * 32 + 2 * 32 + 1], 0x48);
  for (int64_t k = 0; k < 64; ++k)
    for (int64_t n = 0; n < 3; ++n)
      EXPECT_EQ(p[((k / 32) * 3 + n) * 32 + k % 32], f32_to_e4m3(static_cast<float>(r.codes[k * 3 + n])));
  // Scales at 192, then 10 zero bytes.
  for (int n = 0; n < 3; ++n) EXPECT_EQ(load_le<uint16_t>(p.data() + 192 + 2 * n), 0x3f80);
  for (int i = 198; i < 208; ++i) EXPECT_EQ(p[i], 0) << i;
}

TEST(QuantizeF8col, ColumnScales) {
  std::mt19937_64 rng(4);
  std::uniform_real_distribution<float> u(-30.0f, 10.0f);
  std::vector<float> a(2000);
  for (auto& x : a) x = std::exp2(u(rng));
  a[0] = 0.0f;
  a[1] = 448.0f;  // exactly 1.0
  a[2] = 448.0f * 1.0078125f;
  a[3] = std::nextafter(448.0f, 1000.0f);
  std::vector<uint16_t> s(a.size());
  f8_column_scales(a.data(), static_cast<int64_t>(a.size()), s.data());
  EXPECT_EQ(s[0], 0);
  EXPECT_EQ(s[1], 0x3f80);
  EXPECT_EQ(s[2], 0x3f81);
  EXPECT_EQ(s[3], 0x3f81);
  for (size_t j = 1; j < a.size(); ++j) {
    const double sj = bf16_bits_to_f32(s[j]), prev = bf16_bits_to_f32(static_cast<uint16_t>(s[j] - 1));
    EXPECT_GE(sj * 448.0, a[j]) << j;
    EXPECT_LT(prev * 448.0, a[j]) << j;
  }
}

TEST(QuantizeF8col, ErrorBudgetAndPaths) {
  const int64_t K = 512, N = 256;
  for (uint64_t seed : {1, 2}) {
    Release r = make_release(K, N, 8, seed);
    const std::vector<float> w = reference(r);
    const std::vector<uint16_t> sc = col_scales(r.view());
    ErrorStats st;
    std::vector<uint8_t> p = run_f8(r.view(), sc, &st);
    const std::vector<float> wq = decode_f8col(p, K, N);
    const double e = rel_rmse(wq, w), d = dot_error(wq, w, K, N);
    std::printf("fp8 seed %llu: rel.RMSE %.4f dot %.4f cosine %.6f max/step %.3f\n",
                static_cast<unsigned long long>(seed), e, d, st.cosine(), st.max_steps);
    EXPECT_LE(e, kBudgetFp8);
    EXPECT_LE(d, kBudgetFp8 * kDotFactor);
    EXPECT_NEAR(st.relative_rmse(), e, 1e-6);
    EXPECT_EQ(st.rtn_relative_rmse(), st.relative_rmse());
    EXPECT_EQ(st.clipped_count, 0);
    EXPECT_EQ(st.nonfinite_count, 0);
    EXPECT_LE(st.max_steps, 0.55);  // half a step plus the bf16 rounding (< 16 * 2^-9 steps)
    EXPECT_EQ(st.count, K * N);
    // Every code is the scalar encoder's of fp32(w / scale), on every path.
    for_each_simd_level([&](int) {
      std::vector<uint8_t> q = run_f8(r.view(), sc);
      EXPECT_EQ(q, p);
    });
    for (int64_t k = 0; k < K; k += 7)
      for (int64_t n = 0; n < N; ++n)
        ASSERT_EQ(p[((k / 32) * N + n) * 32 + k % 32], f32_to_e4m3(w[k * N + n] / bf16_bits_to_f32(sc[n])));
  }
}

TEST(QuantizeF8col, ZeroColumns) {
  Release r = make_release(64, 5, 1, 8);
  for (int64_t k = 0; k < 64; ++k) r.codes[k * 5 + 2] = 0;
  r.scales[4] = 0;
  const std::vector<uint16_t> sc = col_scales(r.view());
  EXPECT_EQ(sc[2], 0);
  EXPECT_EQ(sc[4], 0);
  EXPECT_NE(sc[0], 0);
  ErrorStats st;
  std::vector<uint8_t> p = run_f8(r.view(), sc, &st);
  for (int64_t ch = 0; ch < 2; ++ch)
    for (int i = 0; i < 32; ++i) {
      EXPECT_EQ(p[(ch * 5 + 2) * 32 + i], 0);
      EXPECT_EQ(p[(ch * 5 + 4) * 32 + i], 0);
    }
  EXPECT_EQ(st.nonfinite_count, 0);
  EXPECT_TRUE(std::isfinite(st.max_steps));
}

// Odd sizes, scale blocks shorter than a chunk, a row slice, zero and non-finite
// columns: every path gives the scalar encoder's codes and the same stats.
TEST(QuantizeF8col, MatchesScalarEncoderOnEveryPath) {
  const int64_t K = 128, N = 45, B = 8;  // blocks of 16 rows
  Release r = make_release(K, N, B, 17);
  for (int64_t k = 0; k < K; ++k) r.codes[k * N + 6] = 0;
  r.scales[3 * N + 9] = 0x7f80;  // column 9, rows 48..63: +inf
  const std::vector<uint16_t> sc = col_scales(r.view());
  EXPECT_EQ(sc[6], 0);
  EXPECT_EQ(sc[9], 0x7f80);
  const int64_t row0 = 32, rows = 64;
  std::vector<uint8_t> first;
  ErrorStats first_st;
  for_each_simd_level([&](int level) {
    ErrorStats st;
    std::vector<uint8_t> p = run_f8(r.view(row0, rows), sc, &st);
    for (int64_t k = 0; k < rows; ++k)
      for (int64_t n = 0; n < N; ++n) {
        const float scale = bf16_bits_to_f32(sc[n]);
        const uint8_t expect = scale == 0.0f ? 0 : f32_to_e4m3(r.w(row0 + k, n) / scale);
        ASSERT_EQ(p[((k / 32) * N + n) * 32 + k % 32], expect) << k << " " << n;
      }
    EXPECT_EQ(st.nonfinite_count, rows);  // column 9 stores NaN (0 * inf) everywhere
    EXPECT_TRUE(std::isfinite(st.sum_err2) && std::isfinite(st.max_steps));
    if (level == 0) {
      first = p;
      first_st = st;
    } else {
      EXPECT_EQ(p, first);
      expect_stats_near(st, first_st);
    }
  });
}

// ---------------------------------------------------------------------------------
// bf16.
TEST(QuantizeBf16, ExactWithStats) {
  const int64_t K = 96, N = 70;
  Release r = make_release(K, N, 3, 12);
  const std::vector<float> w = reference(r);
  for_each_simd_level([&](int) {
    std::vector<uint16_t> out(static_cast<size_t>(K * N));
    ErrorStats st;
    dequantize_bf16(r.view(), out.data(), &st);
    std::vector<float> wq(out.size());
    for (size_t i = 0; i < out.size(); ++i) wq[i] = bf16_bits_to_f32(out[i]);
    EXPECT_EQ(wq, w);
    EXPECT_EQ(rel_rmse(wq, w), kBudgetBf16);
    EXPECT_EQ(dot_error(wq, w, K, N, 2), kBudgetBf16);
    EXPECT_EQ(st.relative_rmse(), 0.0);
    EXPECT_NEAR(st.cosine(), 1.0, 1e-12);
    EXPECT_EQ(st.count, K * N);
    EXPECT_EQ(st.max_steps, 0.0);
    EXPECT_GT(st.sum_ref2, 0.0);
  });
}

// ---------------------------------------------------------------------------------
// Throughput: int8 -> int4 of a [6144 x 4096] matrix, group 128, one thread, against
// memcpy of the same int8 bytes. Run with --gtest_also_run_disabled_tests.
TEST(QuantizeBench, DISABLED_Throughput) {
  const int64_t K = 6144, N = 4096, G = 128;
  Release r = make_release(K, N, 8, 77);
  std::vector<uint8_t> out(static_cast<size_t>(K / G) * format::q4g_group_bytes(G, N));
  std::vector<int8_t> copy(r.codes.size());
  auto time_it = [](auto&& fn) {
    double best = 1e30;
    for (int i = 0; i < 3; ++i) {
      auto t0 = std::chrono::steady_clock::now();
      fn();
      best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    }
    return best;
  };
  const double bytes = static_cast<double>(K * N);
  const double t_copy = time_it([&] { std::memcpy(copy.data(), r.codes.data(), r.codes.size()); });
  std::printf("memcpy              %8.2f GB/s\n", bytes / t_copy / 1e9);
  for_each_simd_level([&](int level) {
    for (bool search : {false, true}) {
      const double t = time_it([&] { quantize_q4g(r.view(), G, search, out.data(), nullptr); });
      std::printf("q4g g128 %-6s L%d  %8.2f GB/s  (%.3f x memcpy)\n", search ? "search" : "rtn", level,
                  bytes / t / 1e9, t_copy / t);
    }
    std::vector<uint16_t> sc = col_scales(r.view());
    std::vector<uint8_t> f8(format::f8col_matrix_bytes(K, N));
    const double tf = time_it([&] { quantize_f8col(r.view(), sc.data(), f8.data(), nullptr); });
    std::printf("f8col        L%d  %8.2f GB/s  (%.3f x memcpy)\n", level, bytes / tf / 1e9, t_copy / tf);
  });
}

}  // namespace
}  // namespace grokit::quantize
