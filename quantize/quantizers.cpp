// The quantizers (quantizers.h), several times over: the scalar reference of q4g, the
// generic kernels (plain loops over panels of columns, which the compiler vectorizes on
// any CPU) and the lane kernels of quantize_lanes.inc built for AVX2 (8 columns in
// ymm-wide GCC vectors) and AVX-512 (16 columns in zmm-wide ones). Each
// computes, per column, the same fp32 operations in the same order (no FMA contraction:
// -ffp-contract=off), so every path writes the same bytes.
#include "quantize/quantizers.h"

#include <algorithm>
#include <atomic>
#include <bit>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <numeric>
#include <vector>

#include "common/common.h"
#include "format/format.h"

#if defined(__x86_64__)
#include <immintrin.h>
#define GROKIT_Q_X86 1
// GCC 12's avx512fintrin.h trips -Wmaybe-uninitialized on its own _mm512_undefined values.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#endif

namespace grokit::quantize {

// ---------------------------------------------------------------------------------
// ErrorStats.
void ErrorStats::merge(const ErrorStats& o) {
  count += o.count;
  sum_ref2 += o.sum_ref2;
  sum_err2 += o.sum_err2;
  sum_cross += o.sum_cross;
  sum_out2 += o.sum_out2;
  max_steps = std::max(max_steps, o.max_steps);
  clipped_count += o.clipped_count;
  nonfinite_count += o.nonfinite_count;
  rtn_err2 += o.rtn_err2;
  rtn_cross += o.rtn_cross;
  rtn_out2 += o.rtn_out2;
  groups += o.groups;
  exact_groups += o.exact_groups;
  improved_groups += o.improved_groups;
}

static double rel_rmse(double err2, double ref2) {
  if (ref2 > 0) return std::sqrt(err2 / ref2);
  return err2 > 0 ? std::numeric_limits<double>::infinity() : 0.0;
}
static double cosine_of(double cross, double ref2, double out2) {
  if (ref2 > 0 && out2 > 0) return cross / std::sqrt(ref2 * out2);
  return ref2 == out2 ? 1.0 : 0.0;
}
double ErrorStats::relative_rmse() const { return rel_rmse(sum_err2, sum_ref2); }
double ErrorStats::cosine() const { return cosine_of(sum_cross, sum_ref2, sum_out2); }
double ErrorStats::rtn_relative_rmse() const { return rel_rmse(rtn_err2, sum_ref2); }
double ErrorStats::rtn_cosine() const { return cosine_of(rtn_cross, sum_ref2, rtn_out2); }

namespace {

// ---------------------------------------------------------------------------------
// Scalar element operations. The loops below apply them to the columns of a panel
// (the compiler vectorizes across columns); the reference applies them one by one.
#define QI inline __attribute__((always_inline))

constexpr float kMagic = 12582912.0f;  // 1.5 * 2^23: (t + kMagic) - kMagic = rne(t), |t| < 2^22
constexpr int kCandidates = 5;         // absmax / 7 times these, after RTN
constexpr float kFactors[kCandidates] = {0.94f, 0.88f, 0.82f, 0.76f, 0.70f};
constexpr uint16_t kNanScale = 0x7fc0;

QI uint32_t bits_of_f32(float f) { return std::bit_cast<uint32_t>(f); }
QI float f32_of_bits(uint32_t u) { return std::bit_cast<float>(u); }
QI float rne_small(float t) { return (t + kMagic) - kMagic; }
// NaN becomes -7 (q stays a small integer).
QI float clamp7(float t) {
  t = t > -7.0f ? t : -7.0f;
  return t < 7.0f ? t : 7.0f;
}
QI bool finite_bits(float x) { return (bits_of_f32(x) & 0x7f800000u) != 0x7f800000u; }
QI int32_t finite_i(float x) { return (bits_of_f32(x) & 0x7f800000u) != 0x7f800000u ? 1 : 0; }
QI float abs_bits(float x) { return f32_of_bits(bits_of_f32(x) & 0x7fffffffu); }
// Round to bf16 (RNE) for finite values (NaN payloads not preserved).
QI float bf16_finite(float x) {
  const uint32_t u = bits_of_f32(x);
  return f32_of_bits((u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u);
}
// Exactly round_bf16, NaN included.
QI float bf16_any(float x) {
  const uint32_t u = bits_of_f32(x);
  const uint32_t r = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
  const uint32_t n = (u & 0xffff0000u) | 0x00400000u;
  return f32_of_bits((u & 0x7fffffffu) > 0x7f800000u ? n : r);
}
QI float bf16_value(uint16_t h) { return f32_of_bits(static_cast<uint32_t>(h) << 16); }

// The screening of the int4 scale search in code units (quantizers.h, search step 4):
// a candidate's step r = scale / s8 in 16-bit fixed point, R = rne(256 r) and
// INV = rne(32768 / r); usable for 1 <= r <= 4681 / 256 (INV fits in int16).
constexpr int kScreenMinCodes = 32;   // a column's largest |code| in the group, at least
constexpr float kScreenMaxStep = 4681.0f / 256.0f;
QI bool screen_step(float scale, float s8, int32_t* R, int32_t* INV) {
  const float r = scale / s8;
  if (!(r >= 1.0f && r <= kScreenMaxStep)) return false;
  const float inv = rne_small(32768.0f / r);
  if (!(inv <= 32767.0f)) return false;
  *R = static_cast<int32_t>(rne_small(r * 256.0f));
  *INV = static_cast<int32_t>(inv);
  return true;
}
// |q| of a code of magnitude a = |c| at the fixed-point step: round half up of a / r,
// at most 7 (x86 pmulhrsw); q takes the sign of c, so c q = a |q|.
QI int32_t screen_q(int32_t a, int32_t INV) {
  const int32_t q = (a * INV + 16384) >> 15;
  return q > 7 ? 7 : q;
}
// sum (256 a - q R)^2 less its constant 65536 sum a^2, from num = sum a q and
// den = sum q q: R (R den - 512 num), exact (|R den - 512 num| < 2^27, the product < 2^40).
QI int64_t screen_error(int32_t R, int32_t num, int32_t den) {
  return static_cast<int64_t>(R) * (R * den - 512 * num);
}

// E4M3 code of x (f32_to_e4m3) and its value, branch-free.
QI uint32_t e4m3_encode(float x, float* value) {
  const uint32_t u = bits_of_f32(x), sign = u & 0x80000000u;
  uint32_t a = u & 0x7fffffffu;
  a = a > 0x7f800000u ? 0u : a;                 // NaN -> 0
  a = a > 0x43e00000u ? 0x43e00000u : a;        // saturate at 448 (infinity too)
  const uint32_t r = (a + 0x7ffffu + ((a >> 20) & 1u)) & 0xfff00000u;  // rne to 3 mantissa bits
  const float m = rne_small(f32_of_bits(a) * 512.0f);                 // below 2^-6: m * 2^-9
  const bool sub = a < 0x3c800000u;
  const uint32_t code = sub ? static_cast<uint32_t>(static_cast<int32_t>(m)) : (r >> 20) - 960u;  // exp - 120
  *value = f32_of_bits(bits_of_f32(sub ? m * 0.001953125f : f32_of_bits(r)) | sign);
  return code | (sign >> 24);
}

// Exact grid (quantizers.h, search step 3) for one column of a group whose rows share
// the int8 scale s8: the smallest m >= ceil(camax / 7) dividing every code with s8 * m a
// finite non-zero bf16. col[k * stride], k < G.
bool exact_grid(const int8_t* col, int64_t stride, int64_t G, int camax, float s8, int* m_out) {
  const int m_min = (camax + 6) / 7;
  if (m_min < 1) return false;
  int g = 0;
  for (int64_t k = 0; k < G; ++k) {
    g = std::gcd(g, std::abs(static_cast<int>(col[k * stride])));
    if (g != 0 && g < m_min) return false;
  }
  for (int m = m_min; m <= g; ++m) {
    if (g % m != 0) continue;
    float sm = s8 * static_cast<float>(m);
    if (sm != 0.0f && finite_bits(sm) && round_bf16(sm) == sm) {
      *m_out = m;
      return true;
    }
  }
  return false;
}

void check_source(const Int8Source& s) {
  GROKIT_CHECK((s.codes != nullptr && s.scales != nullptr) || s.rows == 0 || s.cols == 0);
  GROKIT_CHECK(s.rows >= 0 && s.cols >= 0 && s.cols <= s.ld && s.cols <= s.scale_stride());
  GROKIT_CHECK(s.blocks >= 1 && s.total_rows % s.blocks == 0);
  GROKIT_CHECK(s.row0 >= 0 && s.row0 + s.rows <= s.total_rows);
}

// 16 x 16 bytes: out[c * out_stride + r] = in[r * in_stride + c] for c < ncols.
QI void transpose16(const uint8_t* in, ptrdiff_t in_stride, uint8_t* out, ptrdiff_t out_stride, int ncols) {
#if defined(GROKIT_Q_X86)
  __m128i t[16], n[16];
  for (int i = 0; i < 16; ++i) t[i] = _mm_loadu_si128(reinterpret_cast<const __m128i*>(in + in_stride * i));
  // Interleaving row i with row i + 8 rotates the 8-bit (row, column) index left by one;
  // four rounds swap row and column. The rounds alternate between the two arrays (a copy
  // back after each round became a 256-byte rep movs through the stack).
  auto round = [](const __m128i* a, __m128i* b) {
    for (int i = 0; i < 8; ++i) {
      b[2 * i] = _mm_unpacklo_epi8(a[i], a[i + 8]);
      b[2 * i + 1] = _mm_unpackhi_epi8(a[i], a[i + 8]);
    }
  };
  round(t, n);
  round(n, t);
  round(t, n);
  round(n, t);
  if (ncols == 16) {
    for (int c = 0; c < 16; ++c) _mm_storeu_si128(reinterpret_cast<__m128i*>(out + c * out_stride), t[c]);
    return;
  }
  for (int c = 0; c < ncols; ++c) _mm_storeu_si128(reinterpret_cast<__m128i*>(out + c * out_stride), t[c]);
#else
  for (int c = 0; c < ncols; ++c)
    for (int r = 0; r < 16; ++r) out[c * out_stride + r] = in[r * in_stride + c];
#endif
}

// ---------------------------------------------------------------------------------
// The generic kernels work on panels of kP columns (padded with zero columns), rows in
// the outer loops and the panel's columns in the inner ones: every inner loop is the
// same scalar operation per column, which the compiler turns into vector lanes, and
// every per-column sum runs over the rows in order, as in the reference.
constexpr int kP = 32;

// Rows [k0, k0 + rows) x columns [p0, p0 + np) of the codes into code[rows][kP].
QI void copy_panel(const Int8Source& s, int64_t k0, int64_t rows, int64_t p0, int np, int8_t (*code)[kP]) {
  for (int64_t k = 0; k < rows; ++k) {
    std::memcpy(code[k], s.codes + (k0 + k) * s.ld + p0, static_cast<size_t>(np));
    if (np < kP) std::memset(code[k] + np, 0, static_cast<size_t>(kP - np));
  }
}
QI void load_scale_row(const Int8Source& s, int64_t b, int64_t p0, int np, float* s8) {
  for (int j = 0; j < kP; ++j) s8[j] = j < np ? bf16_value(s.scales[b * s.scale_stride() + p0 + j]) : 0.0f;
}

// -------------------------------------------------------------------------------
// q4g.
struct Q4Panel {
  alignas(64) float w[128][kP];
  alignas(64) int8_t code[128][kP];
  alignas(64) int8_t q[128][kP];
  alignas(64) int8_t qe[2][kP];
  alignas(64) uint8_t tile[4][16][kP];  // [chunk][byte][column]
  alignas(64) float s8[kP], s8_first[kP], amax[kP], a7[kP], s0[kP], ss[kP];
  alignas(64) float re[kP], rc[kP], ro[kP], rn[kP], rd[kP];
  alignas(64) float best_e[kP], best_s[kP], best_inv[kP], exact_scale[kP], scale[kP], lim[kP];
  alignas(64) float sj[kP], inv[kP], e[kP], num[kP], den[kP];
  alignas(64) int32_t camax[kP], cmin[kP], nonfin[kP], zero[kP], exact[kP], searching[kP], from_buf[kP], bad[kP];
  alignas(64) float ref2[kP], err2[kP], cross[kP], out2[kP], maxd[kP];
  alignas(64) int32_t clipped[kP], nonfinite[kP];
  // The screening in code units (search step 4).
  alignas(64) int32_t uniform[kP], screened[kP], sok[kP], sR[kP], sINV[kP], inum[kP], iden[kP], cnum[kP], cden[kP];
  alignas(64) int64_t se[kP], ce[kP];
  alignas(64) float cs[kP];
};

// P.e = sum over the group of (bf16(q * sj) - w)^2 with q = rne(clamp(w * inv)).
QI void q4_error(Q4Panel& P, int64_t G) {
  for (int j = 0; j < kP; ++j) P.e[j] = 0.0f;
  for (int64_t k = 0; k < G; ++k)
    for (int j = 0; j < kP; ++j) {
      const float w = P.w[k][j];
      const float d = bf16_finite(rne_small(clamp7(w * P.inv[j])) * P.sj[j]) - w;
      P.e[j] += d * d;
    }
}

// P.se = the screened error at the fixed-point steps P.sR / P.sINV, from the sums
// P.inum = sum |c| q and P.iden = sum q q.
QI void q4_screen_error(Q4Panel& P, int64_t G) {
  for (int j = 0; j < kP; ++j) P.inum[j] = P.iden[j] = 0;
  for (int64_t k = 0; k < G; ++k)
    for (int j = 0; j < kP; ++j) {
      const int32_t a = P.code[k][j] < 0 ? -P.code[k][j] : P.code[k][j], q = screen_q(a, P.sINV[j]);
      P.inum[j] += a * q;
      P.iden[j] += q * q;
    }
  for (int j = 0; j < kP; ++j) P.se[j] = screen_error(P.sR[j], P.inum[j], P.iden[j]);
}
// Search step 4 for the screened columns: the candidates by their error in code units,
// the least-squares step of the winner's q, then the winner against RTN in the true error.
QI void q4_screen(Q4Panel& P, int64_t G) {
  for (int j = 0; j < kP; ++j) {
    P.ce[j] = std::numeric_limits<int64_t>::max();
    P.cs[j] = 0.0f;
    P.cnum[j] = P.cden[j] = 0;
  }
  for (int c = 0; c < kCandidates; ++c) {
    for (int j = 0; j < kP; ++j) {
      P.sj[j] = bf16_any(P.a7[j] * kFactors[c]);
      int32_t R = 0, INV = 0;
      P.sok[j] = P.screened[j] && screen_step(P.sj[j], P.s8_first[j], &R, &INV) ? 1 : 0;
      P.sR[j] = R;
      P.sINV[j] = INV;
    }
    q4_screen_error(P, G);
    for (int j = 0; j < kP; ++j) {
      const bool better = P.sok[j] && P.se[j] < P.ce[j];
      P.ce[j] = better ? P.se[j] : P.ce[j];
      P.cs[j] = better ? P.sj[j] : P.cs[j];
      P.cnum[j] = better ? P.inum[j] : P.cnum[j];
      P.cden[j] = better ? P.iden[j] : P.cden[j];
    }
  }
  for (int j = 0; j < kP; ++j) {
    const float sl =
        bf16_any(static_cast<float>(P.cnum[j]) / static_cast<float>(P.cden[j] > 0 ? P.cden[j] : 1) * P.s8_first[j]);
    int32_t R = 0, INV = 0;
    P.sj[j] = sl;
    P.sok[j] = P.cs[j] > 0.0f && P.cden[j] > 0 && sl > 0.0f && finite_bits(sl) && sl != P.cs[j] &&
                       screen_step(sl, P.s8_first[j], &R, &INV)
                   ? 1
                   : 0;
    P.sR[j] = R;
    P.sINV[j] = INV;
  }
  q4_screen_error(P, G);
  for (int j = 0; j < kP; ++j) {
    P.cs[j] = P.sok[j] && P.se[j] < P.ce[j] ? P.sj[j] : P.cs[j];
    P.sj[j] = P.cs[j] > 0.0f ? P.cs[j] : 1.0f;
    P.inv[j] = 1.0f / P.sj[j];
  }
  q4_error(P, G);
  for (int j = 0; j < kP; ++j) {
    const bool take = P.screened[j] && P.cs[j] > 0.0f && P.e[j] < P.re[j];
    P.best_s[j] = take ? P.cs[j] : P.best_s[j];
    P.best_inv[j] = take ? P.inv[j] : P.best_inv[j];
    P.from_buf[j] = take ? 0 : P.from_buf[j];
  }
}

// Group g, columns [p0, p0 + np): nibbles and scales into gout, stats into st.
QI void q4g_panel(const Int8Source& s, int64_t g, int64_t G, bool search, int64_t p0, int np, uint8_t* gout,
                  ErrorStats& st, Q4Panel& P) {
  const int64_t N = s.cols, lds = s.scale_stride(), rpb = s.total_rows / s.blocks;
  const int64_t lk0 = g * G, r0 = s.row0 + lk0;
  copy_panel(s, lk0, G, p0, np, P.code);

  // Pass 1: the weights, their absmax, the codes' absmax, non-finite columns.
  int64_t b = r0 / rpb, next = (b + 1) * rpb;
  const int64_t b_first = b;
  load_scale_row(s, b, p0, np, P.s8);
  for (int j = 0; j < kP; ++j) {
    P.s8_first[j] = P.s8[j];
    P.amax[j] = 0.0f;
    P.camax[j] = 0;
    P.cmin[j] = 255;
    P.nonfin[j] = 0;
  }
  for (int64_t k = 0; k < G; ++k) {
    if (r0 + k == next) {
      ++b;
      next += rpb;
      load_scale_row(s, b, p0, np, P.s8);
    }
    for (int j = 0; j < kP; ++j) {
      const int32_t c = P.code[k][j];
      const float w = bf16_any(static_cast<float>(c) * P.s8[j]);
      P.w[k][j] = w;
      P.nonfin[j] |= 1 - finite_i(w);
      const float a = abs_bits(w);
      P.amax[j] = a > P.amax[j] ? a : P.amax[j];
      const int32_t ca = c < 0 ? -c : c;
      P.camax[j] = ca > P.camax[j] ? ca : P.camax[j];
      const int32_t cz = ca == 0 ? 255 : ca;
      P.cmin[j] = cz < P.cmin[j] ? cz : P.cmin[j];
    }
  }
  const int64_t b_last = b;

  // Pass 2: RTN, q by division; its q are kept.
  for (int j = 0; j < kP; ++j) {
    P.a7[j] = P.amax[j] / 7.0f;
    P.s0[j] = bf16_any(P.a7[j]);
    P.ss[j] = P.s0[j] == 0.0f ? 1.0f : P.s0[j];
    P.re[j] = P.rc[j] = P.ro[j] = P.rn[j] = P.rd[j] = 0.0f;
  }
  for (int64_t k = 0; k < G; ++k)
    for (int j = 0; j < kP; ++j) {
      const float w = P.w[k][j];
      const float q = rne_small(clamp7(w / P.ss[j]));
      P.q[k][j] = static_cast<int8_t>(static_cast<int32_t>(q));
      const float p = bf16_finite(q * P.s0[j]), d = p - w;
      P.re[j] += d * d;
      P.rc[j] += w * p;
      P.ro[j] += p * p;
      P.rn[j] += w * q;
      P.rd[j] += q * q;
    }

  int32_t any_search = 0, any_screened = 0;
  for (int j = 0; j < kP; ++j) {
    P.screened[j] = 0;
    P.zero[j] = P.amax[j] == 0.0f ? 1 : 0;
    P.exact[j] = 0;
    P.exact_scale[j] = 0.0f;
    P.best_e[j] = P.re[j];
    P.best_s[j] = P.s0[j];
    P.best_inv[j] = 0.0f;
    P.from_buf[j] = 1;  // q from P.q (RTN, exact grid)
  }
  if (search) {
    // Exact grid, column by column (the gcd usually fails within a few codes).
    for (int j = 0; j < kP; ++j) {
      bool uniform = j < np;
      for (int64_t bb = b_first + 1; bb <= b_last && uniform; ++bb)
        uniform = s.scales[bb * lds + p0 + j] == s.scales[b_first * lds + p0 + j];
      P.uniform[j] = uniform ? 1 : 0;
    }
    for (int j = 0; j < np; ++j) {
      // On a grid of step m >= ceil(camax / 7) every non-zero |code| is at least m.
      if (P.zero[j] || P.nonfin[j] || P.camax[j] > 7 * P.cmin[j]) continue;
      int m = 0;
      if (!P.uniform[j] || !exact_grid(&P.code[0][j], kP, G, P.camax[j], P.s8_first[j], &m)) continue;
      P.exact[j] = 1;
      P.exact_scale[j] = P.s8_first[j] * static_cast<float>(m);
      for (int64_t k = 0; k < G; ++k) P.q[k][j] = static_cast<int8_t>(P.code[k][j] / m);
    }
    for (int j = 0; j < kP; ++j) {
      P.searching[j] = (1 - P.zero[j]) & (1 - P.nonfin[j]) & (1 - P.exact[j]);
      P.screened[j] = P.searching[j] & P.uniform[j] & (P.camax[j] >= kScreenMinCodes ? 1 : 0) &
                      (P.s8_first[j] >= std::numeric_limits<float>::min() ? 1 : 0);
      any_search |= P.searching[j] & (1 - P.screened[j]);
      any_screened |= P.screened[j];
    }
  }
  if (any_screened) q4_screen(P, G);
  if (any_search) {  // the columns search step 4 does not screen: every candidate's true error
    for (int c = 0; c < kCandidates; ++c) {
      for (int j = 0; j < kP; ++j) {
        P.sj[j] = bf16_any(P.a7[j] * kFactors[c]);
        P.bad[j] = (P.sj[j] == 0.0f ? 1 : 0) | (1 - finite_i(P.sj[j]));
        P.inv[j] = 1.0f / (P.bad[j] ? 1.0f : P.sj[j]);
      }
      q4_error(P, G);
      for (int j = 0; j < kP; ++j) {
        const bool better = P.e[j] < P.best_e[j] && !P.bad[j] && !P.screened[j];
        P.best_e[j] = better ? P.e[j] : P.best_e[j];
        P.best_s[j] = better ? P.sj[j] : P.best_s[j];
        P.best_inv[j] = better ? P.inv[j] : P.best_inv[j];
        P.from_buf[j] = better ? 0 : P.from_buf[j];
      }
    }
    // Least-squares refinement of the best scale's q.
    int32_t need = 0;
    for (int j = 0; j < kP; ++j) {
      P.num[j] = P.rn[j];
      P.den[j] = P.rd[j];
      need |= (1 - P.from_buf[j]) & P.searching[j] & (1 - P.screened[j]);
    }
    if (need) {
      for (int j = 0; j < kP; ++j) P.sj[j] = P.e[j] = 0.0f;  // sums of w*q and q*q
      for (int64_t k = 0; k < G; ++k)
        for (int j = 0; j < kP; ++j) {
          const float w = P.w[k][j], q = rne_small(clamp7(w * P.best_inv[j]));
          P.sj[j] += w * q;
          P.e[j] += q * q;
        }
      for (int j = 0; j < kP; ++j) {
        P.num[j] = P.from_buf[j] ? P.num[j] : P.sj[j];
        P.den[j] = P.from_buf[j] ? P.den[j] : P.e[j];
      }
    }
    for (int j = 0; j < kP; ++j) {
      const bool okd = P.den[j] > 0.0f;
      const float sl = bf16_any(P.num[j] / (okd ? P.den[j] : 1.0f));
      P.sj[j] = sl;
      P.bad[j] = !okd || !(sl > 0.0f) || !finite_bits(sl) || sl == P.best_s[j] ? 1 : 0;
      P.inv[j] = 1.0f / (P.bad[j] ? 1.0f : sl);
    }
    q4_error(P, G);
    for (int j = 0; j < kP; ++j) {
      const bool better = P.e[j] < P.best_e[j] && !P.bad[j] && !P.screened[j];
      P.best_s[j] = better ? P.sj[j] : P.best_s[j];
      P.best_inv[j] = better ? P.inv[j] : P.best_inv[j];
      P.from_buf[j] = (better ? 0 : P.from_buf[j]) | (1 - P.searching[j]);
    }
  }

  // Emission: q, nibbles, stats.
  for (int j = 0; j < kP; ++j) {
    P.scale[j] = P.nonfin[j] ? f32_of_bits(0x7fc00000u) : (P.exact[j] ? P.exact_scale[j] : P.best_s[j]);
    P.lim[j] = abs_bits(P.scale[j] * 7.5f);
    P.ref2[j] = P.err2[j] = P.cross[j] = P.out2[j] = P.maxd[j] = 0.0f;
    P.clipped[j] = P.nonfinite[j] = 0;
  }
  for (int64_t c = 0; c < G / 32; ++c)
    for (int i = 0; i < 16; ++i) {
      for (int h = 0; h < 2; ++h) {
        const int64_t k = 32 * c + 2 * i + h;
        for (int j = 0; j < kP; ++j) {
          const float w = P.w[k][j];
          const float qb = static_cast<float>(P.q[k][j]), qm = rne_small(clamp7(w * P.best_inv[j]));
          const float q = P.nonfin[j] ? 0.0f : (P.from_buf[j] ? qb : qm);
          const float p = bf16_any(q * P.scale[j]);
          const int32_t fin = finite_i(p) & finite_i(w);
          const float d = fin ? p - w : 0.0f, wf = fin ? w : 0.0f, pf = fin ? p : 0.0f;
          P.err2[j] += d * d;
          P.ref2[j] += wf * wf;
          P.cross[j] += wf * pf;
          P.out2[j] += pf * pf;
          const float ad = abs_bits(d);
          P.maxd[j] = ad > P.maxd[j] ? ad : P.maxd[j];
          P.clipped[j] += (abs_bits(wf) > P.lim[j] ? 1 : 0) & fin;
          P.nonfinite[j] += 1 - finite_i(p);
          P.qe[h][j] = static_cast<int8_t>(static_cast<int32_t>(q));
        }
      }
      for (int j = 0; j < kP; ++j)
        P.tile[c][i][j] = static_cast<uint8_t>((P.qe[0][j] & 15) | ((P.qe[1][j] & 15) << 4));
    }
  for (int64_t c = 0; c < G / 32; ++c)
    for (int t = 0; t < np; t += 16)
      transpose16(&P.tile[c][0][t], kP, gout + (c * N + p0 + t) * 16, 16, std::min(16, np - t));

  uint8_t* sout = gout + (G / 32) * N * 16 + 2 * p0;
  for (int j = 0; j < np; ++j) {
    store_le<uint16_t>(sout + 2 * j, static_cast<uint16_t>(bits_of_f32(P.scale[j]) >> 16));
    st.count += G;
    st.sum_ref2 += P.ref2[j];
    st.sum_err2 += P.err2[j];
    st.sum_cross += P.cross[j];
    st.sum_out2 += P.out2[j];
    if (P.maxd[j] > 0) st.max_steps = std::max(st.max_steps, static_cast<double>(P.maxd[j]) / std::fabs(P.scale[j]));
    st.clipped_count += P.clipped[j];
    st.nonfinite_count += P.nonfinite[j];
    if (!P.nonfin[j]) {
      st.rtn_err2 += P.re[j];
      st.rtn_cross += P.rc[j];
      st.rtn_out2 += P.ro[j];
    }
    st.groups += 1;
    st.exact_groups += P.exact[j];
    st.improved_groups += P.searching[j] && !P.from_buf[j] ? 1 : 0;
  }
}

QI void q4g_body(const Int8Source& s, int64_t G, bool search, uint8_t* out, ErrorStats& st) {
  Q4Panel P;
  const int64_t N = s.cols, gbytes = static_cast<int64_t>(format::q4g_group_bytes(G, N));
  for (int64_t g = 0; g < s.rows / G; ++g) {
    uint8_t* gout = out + g * gbytes;
    for (int64_t p0 = 0; p0 < N; p0 += kP)
      q4g_panel(s, g, G, search, p0, static_cast<int>(std::min<int64_t>(kP, N - p0)), gout, st, P);
    const int64_t pad_at = (G / 32) * N * 16 + 2 * N;
    std::memset(gout + pad_at, 0, static_cast<size_t>(gbytes - pad_at));
  }
}

// -------------------------------------------------------------------------------
// f8col: 32 rows x kP columns at a time.
struct F8Panel {
  alignas(64) int8_t code[32][kP];
  alignas(64) uint8_t tile[32][kP];
  alignas(64) float s8[kP], sc[kP], ss[kP];
  alignas(64) float ref2[kP], err2[kP], cross[kP], out2[kP], maxr[kP];
  alignas(64) int32_t zero[kP], clipped[kP], nonfinite[kP];
};

QI void f8_panel(const Int8Source& s, const uint16_t* scales, int64_t c, int64_t p0, int np, uint8_t* out,
                 ErrorStats& st, F8Panel& P) {
  const int64_t N = s.cols, rpb = s.total_rows / s.blocks, r0 = s.row0 + 32 * c;
  copy_panel(s, 32 * c, 32, p0, np, P.code);
  for (int j = 0; j < kP; ++j) {
    P.sc[j] = j < np ? bf16_value(scales[p0 + j]) : 0.0f;
    P.zero[j] = (bits_of_f32(P.sc[j]) & 0x7fffffffu) == 0 ? 1 : 0;
    P.ss[j] = P.zero[j] ? 1.0f : P.sc[j];
    P.ref2[j] = P.err2[j] = P.cross[j] = P.out2[j] = P.maxr[j] = 0.0f;
    P.clipped[j] = P.nonfinite[j] = 0;
  }
  int64_t b = r0 / rpb, next = (b + 1) * rpb;
  load_scale_row(s, b, p0, np, P.s8);
  for (int64_t i = 0; i < 32; ++i) {
    if (r0 + i == next) {
      ++b;
      next += rpb;
      load_scale_row(s, b, p0, np, P.s8);
    }
    for (int j = 0; j < kP; ++j) {
      const float w = bf16_any(static_cast<float>(static_cast<int32_t>(P.code[i][j])) * P.s8[j]);
      const float x = w / P.ss[j];
      float xr;
      uint32_t code = e4m3_encode(x, &xr);
      code = P.zero[j] ? 0u : code;
      xr = P.zero[j] ? 0.0f : xr;
      const float p = bf16_any(xr * P.sc[j]);
      const int32_t fin = finite_i(p) & finite_i(w);
      const float d = fin ? p - w : 0.0f, wf = fin ? w : 0.0f, pf = fin ? p : 0.0f;
      P.err2[j] += d * d;
      P.ref2[j] += wf * wf;
      P.cross[j] += wf * pf;
      P.out2[j] += pf * pf;
      // The E4M3 spacing at |x| (capped at 448) is 2^(E - 130) for an exponent field
      // E >= 121, else 2^-9; its inverse is the float with exponent field 257 - E.
      uint32_t ex = (bits_of_f32(x) >> 23) & 0xffu;
      ex = ex < 121u ? 121u : ex;
      ex = ex > 135u ? 135u : ex;
      const float r = abs_bits(d) * f32_of_bits((257u - ex) << 23);
      P.maxr[j] = r > P.maxr[j] ? r : P.maxr[j];
      P.clipped[j] += (abs_bits(x) > 448.0f ? 1 : 0) & fin & (1 - P.zero[j]);
      P.nonfinite[j] += 1 - finite_i(p);
      P.tile[i][j] = static_cast<uint8_t>(code);
    }
  }
  for (int t = 0; t < np; t += 16) {
    uint8_t* o = out + (c * N + p0 + t) * 32;
    transpose16(&P.tile[0][t], kP, o, 32, std::min(16, np - t));
    transpose16(&P.tile[16][t], kP, o + 16, 32, std::min(16, np - t));
  }
  for (int j = 0; j < np; ++j) {
    st.count += 32;
    st.sum_ref2 += P.ref2[j];
    st.sum_err2 += P.err2[j];
    st.sum_cross += P.cross[j];
    st.sum_out2 += P.out2[j];
    if (P.maxr[j] > 0) st.max_steps = std::max(st.max_steps, static_cast<double>(P.maxr[j]) / std::fabs(P.sc[j]));
    st.clipped_count += P.clipped[j];
    st.nonfinite_count += P.nonfinite[j];
  }
}

QI void f8_body(const Int8Source& s, const uint16_t* scales, uint8_t* out, ErrorStats& st) {
  F8Panel P;
  const int64_t N = s.cols;
  for (int64_t c = 0; c < s.rows / 32; ++c)
    for (int64_t p0 = 0; p0 < N; p0 += kP)
      f8_panel(s, scales, c, p0, static_cast<int>(std::min<int64_t>(kP, N - p0)), out, st, P);
  uint8_t* sout = out + s.rows * N;
  std::memcpy(sout, scales, 2 * static_cast<size_t>(N));
  const int64_t total = static_cast<int64_t>(format::f8col_matrix_bytes(s.rows, N));
  std::memset(sout + 2 * N, 0, static_cast<size_t>(total - s.rows * N - 2 * N));
}

// -------------------------------------------------------------------------------
// column_absmax and bf16: row by row.
// |bf16(code * s)| grows with |code| for a fixed s (the fp32 product is exact and the
// rounding is monotonic and symmetric), so a block's column maximum is that of its
// largest |code|: one byte-wise max over the rows, then one product per column and
// block. NaN results (a NaN scale, or 0 * inf) are skipped, as element by element.
QI void absmax_body(const Int8Source& s, float* __restrict absmax) {
  const int64_t rpb = s.total_rows / s.blocks, N = s.cols;
  std::vector<uint8_t> top(static_cast<size_t>(N));
  uint8_t* __restrict m = top.data();
  for (int64_t k = 0; k < s.rows;) {
    const int64_t b = (s.row0 + k) / rpb, k_end = std::min(s.rows, (b + 1) * rpb - s.row0);
    std::fill(top.begin(), top.end(), uint8_t{0});
    for (; k < k_end; ++k) {
      const int8_t* __restrict code = s.codes + k * s.ld;
      for (int64_t j = 0; j < N; ++j) {
        const uint8_t a = static_cast<uint8_t>(code[j] < 0 ? -code[j] : code[j]);  // |-128| = 128
        m[j] = a > m[j] ? a : m[j];
      }
    }
    const uint16_t* __restrict sc = s.scales + b * s.scale_stride();
    for (int64_t j = 0; j < N; ++j) {
      const float a = abs_bits(bf16_any(static_cast<float>(m[j]) * bf16_value(sc[j])));
      absmax[j] = a > absmax[j] ? a : absmax[j];
    }
  }
}

struct Bf16Sums {
  alignas(64) float ref2[kP];
  alignas(64) int32_t nonfinite[kP];
};

QI void bf16_body(const Int8Source& s, uint16_t* __restrict out, ErrorStats& st) {
  const int64_t rpb = s.total_rows / s.blocks, N = s.cols;
  Bf16Sums S;
  auto flush = [&st](Bf16Sums& T) {
    for (int j = 0; j < kP; ++j) {
      st.sum_ref2 += T.ref2[j];
      st.sum_cross += T.ref2[j];
      st.sum_out2 += T.ref2[j];
      st.nonfinite_count += T.nonfinite[j];
      T.ref2[j] = 0.0f;
      T.nonfinite[j] = 0;
    }
  };
  for (int j = 0; j < kP; ++j) {
    S.ref2[j] = 0.0f;
    S.nonfinite[j] = 0;
  }
  // Lane j of the partial sums takes the columns j mod kP, rows in order; flushed to
  // double every 32 rows.
  for (int64_t k = 0; k < s.rows; ++k) {
    const int8_t* __restrict code = s.codes + k * s.ld;
    const uint16_t* __restrict sc = s.scales + ((s.row0 + k) / rpb) * s.scale_stride();
    uint16_t* __restrict o = out + k * N;
    int64_t j0 = 0;
    for (; j0 + kP <= N; j0 += kP)
      for (int j = 0; j < kP; ++j) {
        const float w = bf16_any(static_cast<float>(static_cast<int32_t>(code[j0 + j])) * bf16_value(sc[j0 + j]));
        o[j0 + j] = static_cast<uint16_t>(bits_of_f32(w) >> 16);
        const int32_t fin = finite_i(w);
        S.ref2[j] += fin ? w * w : 0.0f;
        S.nonfinite[j] += 1 - fin;
      }
    for (int j = 0; j < N - j0; ++j) {
      const float w = bf16_any(static_cast<float>(static_cast<int32_t>(code[j0 + j])) * bf16_value(sc[j0 + j]));
      o[j0 + j] = static_cast<uint16_t>(bits_of_f32(w) >> 16);
      const int32_t fin = finite_i(w);
      S.ref2[j] += fin ? w * w : 0.0f;
      S.nonfinite[j] += 1 - fin;
    }
    st.count += N;
    if (k % 32 == 31) flush(S);
  }
  flush(S);
}

#if defined(GROKIT_Q_X86)
// ---------------------------------------------------------------------------------
// The SIMD paths: L columns in the lanes of GCC vectors (8 for AVX2, 16 for AVX-512),
// with the widening and narrowing of int8 and int16 lanes done by intrinsics
// (GCC 12 expands those conversions of generic vectors element by element). Each lane
// computes the scalar operations above, in the same order, with the accumulators in
// registers; codes are copied into panels of kW columns first, so the passes over a
// group walk short rows instead of rows a whole matrix row apart.
namespace avx2 {

#define QA inline __attribute__((always_inline, target("avx2")))
#define QT __attribute__((target("avx2")))
constexpr int L = 8;
constexpr int kW = 64;
typedef float vf __attribute__((vector_size(32)));
typedef int32_t vi __attribute__((vector_size(32)));
typedef uint32_t vu __attribute__((vector_size(32)));

QA vi load_i8(const int8_t* p) { return (vi)_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))); }
// bf16 bits of columns [0, nv) to fp32; zero beyond.
QA vf load_bf16(const uint16_t* p, int nv) {
  alignas(16) uint16_t t[L] = {};
  if (nv < L) {
    std::memcpy(t, p, 2 * static_cast<size_t>(nv));
    p = t;
  }
  return (vf)_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16);
}
// Lanes in [-128, 127] (store_i8) or [0, 255] (store_u8) to L bytes.
QA void store_i8(int8_t* p, vi v) {
  __m128i w = _mm_packs_epi32(_mm256_castsi256_si128((__m256i)v), _mm256_extracti128_si256((__m256i)v, 1));
  _mm_storel_epi64(reinterpret_cast<__m128i*>(p), _mm_packs_epi16(w, w));
}
QA void store_u8(uint8_t* p, vi v) {
  __m128i w = _mm_packs_epi32(_mm256_castsi256_si128((__m256i)v), _mm256_extracti128_si256((__m256i)v, 1));
  _mm_storel_epi64(reinterpret_cast<__m128i*>(p), _mm_packus_epi16(w, w));
}
// A lane mask (-1 / 0) as L bytes, and L bytes of src into dst where it is set.
using ByteMask = __m128i;
QA ByteMask byte_mask(vi m) {
  const __m128i w = _mm_packs_epi32(_mm256_castsi256_si128((__m256i)m), _mm256_extracti128_si256((__m256i)m, 1));
  return _mm_packs_epi16(w, w);
}
QA void blend_u8(uint8_t* dst, const uint8_t* src, ByteMask k) {
  const __m128i d = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(dst)),
                s = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(src));
  _mm_storel_epi64(reinterpret_cast<__m128i*>(dst), _mm_blendv_epi8(d, s, k));
}
QA vf vmax(vf a, vf b) { return (vf)_mm256_max_ps((__m256)a, (__m256)b); }
QA vf vclamp7(vf t) {
  return (vf)_mm256_min_ps(_mm256_max_ps((__m256)t, _mm256_set1_ps(-7.0f)), _mm256_set1_ps(7.0f));
}
QA bool any(vi m) { return _mm256_movemask_ps((__m256)m) != 0; }
// int16 pairs (quantize_lanes.inc, the screening): |code| of rows a and b of 8 columns,
// interleaved.
QA vi pair_abs16(const int8_t* a, const int8_t* b) {
  return (vi)_mm256_abs_epi16(_mm256_cvtepi8_epi16(_mm_unpacklo_epi8(
      _mm_loadl_epi64(reinterpret_cast<const __m128i*>(a)), _mm_loadl_epi64(reinterpret_cast<const __m128i*>(b)))));
}
QA vi mulhrs16(vi a, vi b) { return (vi)_mm256_mulhrs_epi16((__m256i)a, (__m256i)b); }
QA vi madd16(vi a, vi b) { return (vi)_mm256_madd_epi16((__m256i)a, (__m256i)b); }
QA vi min7_16(vi a) { return (vi)_mm256_min_epi16((__m256i)a, _mm256_set1_epi16(7)); }
// The screened errors of 8 columns as doubles, lanes 0-3 and 4-7.
struct ScreenError {
  __m256d lo, hi;
};
QA ScreenError screen_product(vi a, vi b) {  // a * b, exact below 2^53
  const __m256i x = (__m256i)a, y = (__m256i)b;
  return {_mm256_mul_pd(_mm256_cvtepi32_pd(_mm256_castsi256_si128(x)), _mm256_cvtepi32_pd(_mm256_castsi256_si128(y))),
          _mm256_mul_pd(_mm256_cvtepi32_pd(_mm256_extracti128_si256(x, 1)),
                        _mm256_cvtepi32_pd(_mm256_extracti128_si256(y, 1)))};
}
QA ScreenError screen_infinity() {
  const __m256d inf = _mm256_set1_pd(std::numeric_limits<double>::infinity());
  return {inf, inf};
}
QA vi screen_less(const ScreenError& a, const ScreenError& b) {  // -1 / 0
  const int m = _mm256_movemask_pd(_mm256_cmp_pd(a.lo, b.lo, _CMP_LT_OQ)) |
                (_mm256_movemask_pd(_mm256_cmp_pd(a.hi, b.hi, _CMP_LT_OQ)) << 4);
  const vi bit = {1, 2, 4, 8, 16, 32, 64, 128};
  return (bit & m) != 0;
}
QA ScreenError screen_select(vi m, const ScreenError& a, const ScreenError& b) {
  const __m256i x = (__m256i)m;
  return {_mm256_blendv_pd(b.lo, a.lo, _mm256_castsi256_pd(_mm256_cvtepi32_epi64(_mm256_castsi256_si128(x)))),
          _mm256_blendv_pd(b.hi, a.hi, _mm256_castsi256_pd(_mm256_cvtepi32_epi64(_mm256_extracti128_si256(x, 1))))};
}

#include "quantize/quantize_lanes.inc"

#undef QA
#undef QT
}  // namespace avx2

// The same kernels in 16 lanes (AVX-512 F/BW/DQ/VL).
namespace avx512 {

#define QA inline __attribute__((always_inline, target("avx512f,avx512bw,avx512dq,avx512vl,avx2")))
#define QT __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2")))
constexpr int L = 16;
constexpr int kW = 64;
typedef float vf __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));
typedef uint32_t vu __attribute__((vector_size(64)));

QA vi load_i8(const int8_t* p) { return (vi)_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
QA vf load_bf16(const uint16_t* p, int nv) {
  const __mmask16 m = nv >= L ? __mmask16{0xffff} : static_cast<__mmask16>((1u << nv) - 1);
  return (vf)_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16);
}
QA void store_i8(int8_t* p, vi v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm512_cvtsepi32_epi8((__m512i)v));
}
QA void store_u8(uint8_t* p, vi v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm512_cvtusepi32_epi8((__m512i)v));
}
using ByteMask = __mmask16;
QA ByteMask byte_mask(vi m) { return _mm512_movepi32_mask((__m512i)m); }
QA void blend_u8(uint8_t* dst, const uint8_t* src, ByteMask k) {
  const __m128i d = _mm_loadu_si128(reinterpret_cast<const __m128i*>(dst)),
                s = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm_mask_blend_epi8(k, d, s));
}
QA vf vmax(vf a, vf b) { return (vf)_mm512_max_ps((__m512)a, (__m512)b); }
QA vf vclamp7(vf t) {
  return (vf)_mm512_min_ps(_mm512_max_ps((__m512)t, _mm512_set1_ps(-7.0f)), _mm512_set1_ps(7.0f));
}
QA bool any(vi m) { return _mm512_movepi32_mask((__m512i)m) != 0; }
QA vi pair_abs16(const int8_t* a, const int8_t* b) {
  const __m128i x = _mm_loadu_si128(reinterpret_cast<const __m128i*>(a)),
                y = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b));
  return (vi)_mm512_abs_epi16(_mm512_cvtepi8_epi16(_mm256_set_m128i(_mm_unpackhi_epi8(x, y), _mm_unpacklo_epi8(x, y))));
}
QA vi mulhrs16(vi a, vi b) { return (vi)_mm512_mulhrs_epi16((__m512i)a, (__m512i)b); }
QA vi madd16(vi a, vi b) { return (vi)_mm512_madd_epi16((__m512i)a, (__m512i)b); }
QA vi min7_16(vi a) { return (vi)_mm512_min_epi16((__m512i)a, _mm512_set1_epi16(7)); }
struct ScreenError {  // lanes 0-7 and 8-15
  __m512d lo, hi;
};
QA ScreenError screen_product(vi a, vi b) {
  const __m512i x = (__m512i)a, y = (__m512i)b;
  return {_mm512_mul_pd(_mm512_cvtepi32_pd(_mm512_castsi512_si256(x)), _mm512_cvtepi32_pd(_mm512_castsi512_si256(y))),
          _mm512_mul_pd(_mm512_cvtepi32_pd(_mm512_extracti64x4_epi64(x, 1)),
                        _mm512_cvtepi32_pd(_mm512_extracti64x4_epi64(y, 1)))};
}
QA ScreenError screen_infinity() {
  const __m512d inf = _mm512_set1_pd(std::numeric_limits<double>::infinity());
  return {inf, inf};
}
QA vi screen_less(const ScreenError& a, const ScreenError& b) {
  const __mmask16 m = static_cast<__mmask16>(_mm512_cmp_pd_mask(a.lo, b.lo, _CMP_LT_OQ) |
                                             (_mm512_cmp_pd_mask(a.hi, b.hi, _CMP_LT_OQ) << 8));
  return (vi)_mm512_movm_epi32(m);
}
QA ScreenError screen_select(vi m, const ScreenError& a, const ScreenError& b) {
  const __mmask16 k = _mm512_movepi32_mask((__m512i)m);
  return {_mm512_mask_blend_pd(static_cast<__mmask8>(k), b.lo, a.lo),
          _mm512_mask_blend_pd(static_cast<__mmask8>(k >> 8), b.hi, a.hi)};
}

#include "quantize/quantize_lanes.inc"

#undef QA
#undef QT
}  // namespace avx512
#endif

// ---------------------------------------------------------------------------------
// Dispatch: the AVX-512 kernels where the CPU has AVX-512 F/BW/DQ/VL, the AVX2 kernels
// where it has AVX2 (column_absmax and bf16 are the generic loops compiled for AVX2),
// else the generic kernels.
void q4g_base(const Int8Source& s, int64_t G, bool search, uint8_t* out, ErrorStats& st) {
  q4g_body(s, G, search, out, st);
}
void f8_base(const Int8Source& s, const uint16_t* sc, uint8_t* out, ErrorStats& st) { f8_body(s, sc, out, st); }
void absmax_base(const Int8Source& s, float* a) { absmax_body(s, a); }
void bf16_base(const Int8Source& s, uint16_t* out, ErrorStats& st) { bf16_body(s, out, st); }
#if defined(GROKIT_Q_X86)
void q4g_avx2(const Int8Source& s, int64_t G, bool search, uint8_t* out, ErrorStats& st) {
  avx2::q4g(s, G, search, out, st);
}
void f8_avx2(const Int8Source& s, const uint16_t* sc, uint8_t* out, ErrorStats& st) { avx2::f8(s, sc, out, st); }
__attribute__((target("avx2"))) void absmax_avx2(const Int8Source& s, float* a) { absmax_body(s, a); }
__attribute__((target("avx2"))) void bf16_avx2(const Int8Source& s, uint16_t* out, ErrorStats& st) {
  bf16_body(s, out, st);
}
// 16 lanes for the two quantizers; column_absmax and bf16 stay on their AVX2 loops.
void q4g_avx512(const Int8Source& s, int64_t G, bool search, uint8_t* out, ErrorStats& st) {
  avx512::q4g(s, G, search, out, st);
}
void f8_avx512(const Int8Source& s, const uint16_t* sc, uint8_t* out, ErrorStats& st) { avx512::f8(s, sc, out, st); }
void absmax_avx512(const Int8Source& s, float* a) { absmax_avx2(s, a); }
void bf16_avx512(const Int8Source& s, uint16_t* out, ErrorStats& st) { bf16_avx2(s, out, st); }
#endif

int detect_level() {
#if defined(GROKIT_Q_X86)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512vl"))
    return 2;
  if (__builtin_cpu_supports("avx2")) return 1;
#endif
  return 0;
}
std::atomic<int> g_level{-1};
int level() {
  int l = g_level.load(std::memory_order_relaxed);
  if (l < 0) {
    l = detect_level();
    g_level.store(l, std::memory_order_relaxed);
  }
  return l;
}

#if defined(GROKIT_Q_X86)
#define GROKIT_Q_DISPATCH(NAME, ...)             \
  if (level() >= 2) NAME##_avx512(__VA_ARGS__);   \
  else if (level() >= 1) NAME##_avx2(__VA_ARGS__); \
  else NAME##_base(__VA_ARGS__)
#else
#define GROKIT_Q_DISPATCH(NAME, ...) NAME##_base(__VA_ARGS__)
#endif

}  // namespace

int set_simd_level(int max_level) {
  int best = detect_level();
  g_level.store(max_level < 0 ? best : std::min(best, max_level), std::memory_order_relaxed);
  return g_level.load(std::memory_order_relaxed);
}

// ---------------------------------------------------------------------------------
// Public entry points.
void quantize_q4g(const Int8Source& s, int64_t group, bool search, uint8_t* out, ErrorStats* stats) {
  check_source(s);
  GROKIT_CHECK(group == 32 || group == 64 || group == 128);
  GROKIT_CHECK(s.rows % group == 0);
  if (s.cols == 0) return;  // an empty payload
  ErrorStats st;
  GROKIT_Q_DISPATCH(q4g, s, group, search, out, st);
  if (stats != nullptr) stats->merge(st);
}

void column_absmax(const Int8Source& s, float* absmax) {
  check_source(s);
  GROKIT_Q_DISPATCH(absmax, s, absmax);
}

void quantize_f8col(const Int8Source& s, const uint16_t* scales, uint8_t* out, ErrorStats* stats) {
  check_source(s);
  GROKIT_CHECK(s.rows % 32 == 0);
  if (s.cols == 0) return;  // an empty payload
  ErrorStats st;
  GROKIT_Q_DISPATCH(f8, s, scales, out, st);
  st.rtn_err2 = st.sum_err2;
  st.rtn_cross = st.sum_cross;
  st.rtn_out2 = st.sum_out2;
  if (stats != nullptr) stats->merge(st);
}

void dequantize_bf16(const Int8Source& s, uint16_t* out, ErrorStats* stats) {
  check_source(s);
  ErrorStats st;
  GROKIT_Q_DISPATCH(bf16, s, out, st);
  st.rtn_cross = st.sum_cross;
  st.rtn_out2 = st.sum_out2;
  if (stats != nullptr) stats->merge(st);
}

void f8_column_scales(const float* absmax, int64_t n, uint16_t* scales) {
  for (int64_t j = 0; j < n; ++j) {
    const float a = absmax[j];
    if (!(a > 0.0f)) {
      scales[j] = 0;
      continue;
    }
    if (!finite_bits(a)) {
      scales[j] = 0x7f80;
      continue;
    }
    // The nearest bf16 of the fp32 quotient, then moved to the smallest b with b * 448 >= a
    // (products of a bf16 and 448 are exact in fp32).
    uint16_t b = f32_to_bf16_bits(a / 448.0f);
    while (bf16_bits_to_f32(b) * 448.0f < a) ++b;
    while (b > 1 && bf16_bits_to_f32(static_cast<uint16_t>(b - 1)) * 448.0f >= a) --b;
    scales[j] = b;
  }
}

uint8_t f32_to_e4m3(float v) {
  float value;
  return static_cast<uint8_t>(e4m3_encode(v, &value));
}

// ---------------------------------------------------------------------------------
// The scalar reference of q4g: one (group, column) at a time.
void quantize_q4g_ref(const Int8Source& s, int64_t group, bool search, uint8_t* out, ErrorStats* stats) {
  check_source(s);
  GROKIT_CHECK(group == 32 || group == 64 || group == 128);
  GROKIT_CHECK(s.rows % group == 0);
  if (s.cols == 0) return;
  const int64_t G = group, N = s.cols, ld = s.ld, lds = s.scale_stride(), rpb = s.total_rows / s.blocks;
  const int64_t gbytes = static_cast<int64_t>(format::q4g_group_bytes(G, N));
  ErrorStats st;
  std::vector<float> w(static_cast<size_t>(G));
  std::vector<int> code(static_cast<size_t>(G)), q(static_cast<size_t>(G)), qr(static_cast<size_t>(G));
  for (int64_t g = 0; g < s.rows / G; ++g) {
    uint8_t* gout = out + g * gbytes;
    std::memset(gout, 0, static_cast<size_t>(gbytes));
    const int64_t lk0 = g * G, r0 = s.row0 + lk0;
    for (int64_t n = 0; n < N; ++n) {
      const uint16_t s8_bits = s.scales[(r0 / rpb) * lds + n];
      const float s8 = bf16_bits_to_f32(s8_bits);
      bool uniform = true, nonfin = false;
      float A = 0;
      int camax = 0;
      for (int64_t k = 0; k < G; ++k) {
        const uint16_t sb = s.scales[((r0 + k) / rpb) * lds + n];
        uniform = uniform && sb == s8_bits;
        code[k] = s.codes[(lk0 + k) * ld + n];
        w[k] = round_bf16(static_cast<float>(code[k]) * bf16_bits_to_f32(sb));
        nonfin = nonfin || !std::isfinite(w[k]);
        const float a = std::fabs(w[k]);
        A = a > A ? a : A;
        camax = std::max(camax, std::abs(code[k]));
      }
      // RTN.
      const float a7 = A / 7.0f, s0 = round_bf16(a7), ss = s0 == 0.0f ? 1.0f : s0;
      float re = 0, rn = 0, rd = 0;
      double rtn_err2 = 0, rtn_cross = 0, rtn_out2 = 0;
      for (int64_t k = 0; k < G; ++k) {
        const float qf = rne_small(clamp7(w[k] / ss));
        qr[k] = static_cast<int>(qf);
        const float p = round_bf16(qf * s0), d = p - w[k];
        re += d * d;
        rn += w[k] * qf;
        rd += qf * qf;
        rtn_err2 += static_cast<double>(d) * d;
        rtn_cross += static_cast<double>(w[k]) * p;
        rtn_out2 += static_cast<double>(p) * p;
      }
      float scale = s0;
      q = qr;
      bool exact = false, improved = false;
      if (nonfin) {
        scale = bf16_bits_to_f32(kNanScale);
        std::fill(q.begin(), q.end(), 0);
      } else if (A > 0 && search) {
        int m = 0;
        if (uniform && exact_grid(s.codes + lk0 * ld + n, ld, G, camax, s8, &m)) {
          exact = true;
          scale = s8 * static_cast<float>(m);
          for (int64_t k = 0; k < G; ++k) q[k] = code[k] / m;
        } else if (uniform && camax >= kScreenMinCodes && s8 >= std::numeric_limits<float>::min()) {
          // Screened in code units: the candidates by their fixed-point error, then the
          // winner against RTN by the true one.
          auto screen = [&](int32_t R, int32_t INV, int32_t* num, int32_t* den) {
            int32_t sn = 0, sd = 0;  // sum |c| q, sum q q
            for (int64_t k = 0; k < G; ++k) {
              const int32_t a = code[k] < 0 ? -code[k] : code[k], qa = screen_q(a, INV);
              sn += a * qa;
              sd += qa * qa;
            }
            *num = sn;
            *den = sd;
            return screen_error(R, sn, sd);
          };
          int64_t ce = std::numeric_limits<int64_t>::max();
          float cs = 0;
          int32_t cnum = 0, cden = 0;
          for (int j = 0; j < kCandidates; ++j) {
            const float sj = round_bf16(a7 * kFactors[j]);
            int32_t R = 0, INV = 0, num = 0, den = 0;
            if (!screen_step(sj, s8, &R, &INV)) continue;
            const int64_t e = screen(R, INV, &num, &den);
            if (e < ce) {
              ce = e;
              cs = sj;
              cnum = num;
              cden = den;
            }
          }
          if (cs > 0.0f) {
            // Least squares in code units from the winner's sums: sum(c q) / sum(q q).
            const float sl = round_bf16(static_cast<float>(cnum) / static_cast<float>(cden > 0 ? cden : 1) * s8);
            int32_t R = 0, INV = 0, num = 0, den = 0;
            if (cden > 0 && sl > 0.0f && finite_bits(sl) && sl != cs && screen_step(sl, s8, &R, &INV)) {
              if (screen(R, INV, &num, &den) < ce) cs = sl;
            }
            const float inv = 1.0f / cs;
            float e = 0;
            for (int64_t k = 0; k < G; ++k) {
              const float d = round_bf16(rne_small(clamp7(w[k] * inv)) * cs) - w[k];
              e += d * d;
            }
            if (e < re) {
              improved = true;
              scale = cs;
              for (int64_t k = 0; k < G; ++k) q[k] = static_cast<int>(rne_small(clamp7(w[k] * inv)));
            }
          }
        } else {
          auto eval = [&](float sj, float inv) {
            float e = 0;
            for (int64_t k = 0; k < G; ++k) {
              const float d = round_bf16(rne_small(clamp7(w[k] * inv)) * sj) - w[k];
              e += d * d;
            }
            return e;
          };
          float best_e = re, best_s = s0, best_inv = 0;
          bool rtn_best = true;
          for (int j = 0; j < kCandidates; ++j) {
            const float sj = round_bf16(a7 * kFactors[j]);
            const bool bad = sj == 0.0f || !finite_bits(sj);
            const float inv = 1.0f / (bad ? 1.0f : sj);
            const float e = eval(sj, inv);
            if (e < best_e && !bad) {
              best_e = e;
              best_s = sj;
              best_inv = inv;
              rtn_best = false;
            }
          }
          float num = rn, den = rd;
          if (!rtn_best) {
            num = 0;
            den = 0;
            for (int64_t k = 0; k < G; ++k) {
              const float qf = rne_small(clamp7(w[k] * best_inv));
              num += w[k] * qf;
              den += qf * qf;
            }
          }
          const bool okd = den > 0.0f;
          const float sl = round_bf16(num / (okd ? den : 1.0f));
          const bool bad = !okd || !(sl > 0.0f) || !finite_bits(sl) || sl == best_s;
          const float inv = 1.0f / (bad ? 1.0f : sl);
          const float e = eval(sl, inv);
          if (e < best_e && !bad) {
            best_s = sl;
            best_inv = inv;
            rtn_best = false;
          }
          if (!rtn_best) {
            improved = true;
            scale = best_s;
            for (int64_t k = 0; k < G; ++k) q[k] = static_cast<int>(rne_small(clamp7(w[k] * best_inv)));
          }
        }
      }
      // Bytes and stats.
      const float lim = std::fabs(scale * 7.5f);
      double maxd = 0;
      for (int64_t k = 0; k < G; ++k) {
        uint8_t* byte = gout + ((k / 32) * N + n) * 16 + (k % 32) / 2;
        *byte = static_cast<uint8_t>(*byte | ((q[k] & 15) << (4 * (k % 2))));
        const float p = round_bf16(static_cast<float>(q[k]) * scale);
        st.count += 1;
        if (!std::isfinite(p)) st.nonfinite_count += 1;
        if (!std::isfinite(p) || !std::isfinite(w[k])) continue;
        const double d = static_cast<double>(p) - w[k];
        st.sum_ref2 += static_cast<double>(w[k]) * w[k];
        st.sum_err2 += d * d;
        st.sum_cross += static_cast<double>(w[k]) * p;
        st.sum_out2 += static_cast<double>(p) * p;
        maxd = std::max(maxd, std::fabs(d));
        if (std::fabs(w[k]) > lim) st.clipped_count += 1;
      }
      if (maxd > 0) st.max_steps = std::max(st.max_steps, maxd / std::fabs(scale));
      store_le<uint16_t>(gout + (G / 32) * N * 16 + 2 * n, f32_to_bf16_bits(scale));
      if (!nonfin) {
        st.rtn_err2 += rtn_err2;
        st.rtn_cross += rtn_cross;
        st.rtn_out2 += rtn_out2;
      }
      st.groups += 1;
      st.exact_groups += exact ? 1 : 0;
      st.improved_groups += improved ? 1 : 0;
    }
  }
  if (stats != nullptr) stats->merge(st);
}

}  // namespace grokit::quantize
