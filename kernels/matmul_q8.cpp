// y = x @ dequant(W) for int8 codes with row-block bf16 scales, fp32 accumulation in the
// pinned pair order of kernels.h (bf16 activations) or in k order with fma (fp32 ones).
#include <type_traits>
#include <vector>

#include "kernels/internal.h"
#include "kernels/pair_panels.h"

// GCC 12's avx512fintrin.h trips -Wmaybe-uninitialized on its own _mm512_undefined values.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif

namespace grokit::kernels {
namespace {
using namespace detail;

constexpr int64_t kRowBlock = 64;  // rows of codes per pass over a task's columns (even)
constexpr int64_t kMaxWidth = 1 << 20;  // columns per decode task (narrower parts measured slower)

void check_args(int64_t M, int64_t K, int64_t ldx, int64_t N, int64_t blocks, int64_t ldy) {
  GROKIT_CHECK(M >= 0 && K > 0 && N > 0 && blocks > 0 && K % blocks == 0 && ldx >= K && ldy >= N);
}

inline float weight(const int8_t* codes, const uint16_t* scales, int64_t N, int64_t rpb, int64_t k, int64_t n) {
  return round_bf16(static_cast<float>(codes[k * N + n]) * bf16f(scales[(k / rpb) * N + n]));
}

// ---------------------------------------------------------------------------------
// Scalar twins: columns [n0, n1) of every row.
// One chain: the sums over rows [k0, k1) of columns [c0, c1) into out ([M][ld], column c0
// at out[0]), in the pair order or with fma in k order.
template <bool kPairs>
void chain_columns_ref(const float* x, int64_t M, int64_t ldx, const int8_t* codes, const uint16_t* scales, int64_t N,
                       int64_t rpb, int64_t k0, int64_t k1, int64_t c0, int64_t c1, float* out, int64_t ld) {
  for (int64_t m = 0; m < M; ++m) {
    const float* xr = x + m * ldx;
    for (int64_t n = c0; n < c1; ++n) {
      float acc = 0.0f;
      if (kPairs) {
        for (int64_t k = k0; k < k1; k += 2) {
          if (k + 1 < k1) acc = acc + xr[k + 1] * weight(codes, scales, N, rpb, k + 1, n);
          acc = acc + xr[k] * weight(codes, scales, N, rpb, k, n);
        }
      } else {
        for (int64_t k = k0; k < k1; ++k) acc = std::fma(xr[k], weight(codes, scales, N, rpb, k, n), acc);
      }
      out[m * ld + (n - c0)] = acc;
    }
  }
}

// ---------------------------------------------------------------------------------
// AVX2: 8 columns per vector; each row of codes dequantized once per (row block, tile)
// into a small fp32 panel, then used by every row of x.
GROKIT_AVX2 inline __m256 dequant8_avx2(const int8_t* p, __m256 s) {
  __m256 f = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  return round_bf16x8(_mm256_mul_ps(f, s));
}

// NV 8-column vectors of columns from c (4: a whole tile; 1: the groups past the last tile);
// first: rows [k0, k1) start the chain (the sums start from zero).
template <bool kPairs, int NV>
GROKIT_AVX2 void block_avx2(const float* x, int64_t M, int64_t ldx, int64_t K, const int8_t* codes,
                            const uint16_t* scales, int64_t N, int64_t rpb, int64_t k0, int64_t k1, int64_t c,
                            float* acc, int64_t acc_ld, bool first) {
  alignas(32) float panel[kRowBlock + 1][32];
  const int64_t rows = k1 - k0;
  for (int64_t r = 0; r < rows; ++r) {
    int64_t k = k0 + r;
    const uint16_t* sp = scales + (k / rpb) * N + c;
    const int8_t* row = codes + k * N + c;
    for (int j = 0; j < NV; ++j) _mm256_store_ps(panel[r] + 8 * j, dequant8_avx2(row + 8 * j, load_bf16x8(sp + 8 * j)));
  }
  panel_all_rows_avx2<kPairs, NV>(x, M, ldx, K, panel, k0, k1, acc, acc_ld, first);
}

// Rows in the order their products are added to a column's sum: each pair's high row
// first (bf16 x: the pinned pair order), else k order.
template <bool kPairs, int kRows>
constexpr int kRowOrder[4] = {kPairs && kRows > 1 ? 1 : 0, kPairs && kRows > 1 ? 0 : 1, kPairs && kRows > 3 ? 3 : 2,
                              kPairs && kRows > 3 ? 2 : 3};

// kGroups 8-column groups at column c: per row, dequantize each group (its scale an fp32
// load), then add it to the sums of each row of x; the groups' sums are independent
// chains, so the out-of-order core overlaps their fma latencies.
template <bool kPairs, int kRows, int kM, int kGroups>
GROKIT_AVX2 __attribute__((always_inline)) inline void rows_groups_avx2(const __m256 (&xv)[kM][kRows],
                                                                        const int8_t* ra, int64_t N,
                                                                        const float* const* s, int64_t c, float* ap,
                                                                        int64_t acc_ld) {
  __m256 a[kM][kGroups];
  for (int m = 0; m < kM; ++m)
    for (int g = 0; g < kGroups; ++g) a[m][g] = _mm256_loadu_ps(ap + m * acc_ld + 8 * g);
  for (int i = 0; i < kRows; ++i) {
    const int r = kRowOrder<kPairs, kRows>[i];
    for (int g = 0; g < kGroups; ++g) {
      const __m128i q = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(ra + r * N + c + 8 * g));
      const __m256 w = round_bf16x8(_mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)),
                                                  _mm256_loadu_ps(s[r] + c + 8 * g)));
      for (int m = 0; m < kM; ++m) a[m][g] = _mm256_fmadd_ps(xv[m][r], w, a[m][g]);
    }
  }
  for (int m = 0; m < kM; ++m)
    for (int g = 0; g < kGroups; ++g) _mm256_storeu_ps(ap + m * acc_ld + 8 * g, a[m][g]);
}

template <bool kPairs, int kRows, int kM>
GROKIT_AVX2 void rows_step_avx2(const float* x, int64_t ldx, int64_t k, const int8_t* ra, int64_t N,
                                const float* const* s, int64_t c0, int64_t c1, BlockPrefetch& prefetch, int64_t fetch,
                                float* acc, int64_t acc_ld) {
  __m256 xv[kM][kRows];
  for (int m = 0; m < kM; ++m)
    for (int r = 0; r < kRows; ++r) xv[m][r] = _mm256_broadcast_ss(x + m * ldx + k + r);
  // Groups per step: kM x kG sums and the dequantized groups stay in registers (x's
  // broadcasts, loop-invariant, may live in memory as fma operands).
  constexpr int kG = kM <= 2 ? 4 : kM == 3 ? 2 : 1;
  int64_t c = c0;
  for (; c + 8 * kG <= c1; c += 8 * kG) {
    if (((c - c0) & 63) == 0) prefetch.next(fetch);
    rows_groups_avx2<kPairs, kRows, kM, kG>(xv, ra, N, s, c, acc + (c - c0), acc_ld);
  }
  for (; c < c1; c += 8) {
    if (((c - c0) & 63) == 0) prefetch.next(fetch);
    rows_groups_avx2<kPairs, kRows, kM, 1>(xv, ra, N, s, c, acc + (c - c0), acc_ld);
  }
}

// AVX2, decode and small batches (up to kAvx2RowsMaxM rows of x; fewer column groups per
// step as rows are added, so the sums stay in registers): four rows of codes at a time walk the
// task's columns in memory order, the next rows prefetched ahead as in the AVX-512 walks
// (BlockPrefetch), each 8-column group dequantized in registers and added to every row of
// x's sums in `acc` (read and written once per four rows), in the pinned order. The
// panels of block_avx2 cost a store and a load per weight, and their 64-row tiles read 64
// rows side by side.
constexpr int64_t kAvx2RowsMaxM = 4;
template <bool kPairs, int kM>
GROKIT_AVX2 void rows_avx2(const float* x, int64_t ldx, const int8_t* codes, const float* scale_table, int64_t N,
                           int64_t rpb, int64_t k0, int64_t k1, int64_t c0, int64_t c1, float* acc, int64_t acc_ld) {
  GROKIT_CHECK((c1 - c0) % 8 == 0);
  const int64_t ahead = rows_ahead(N, 4);
  for (int64_t k = k0; k < std::min(k1, k0 + ahead); ++k)
    for (int64_t c = c0; c < c1; c += 64) prefetch_line(reinterpret_cast<const char*>(codes + k * N + c));
  for (int64_t k = k0; k < k1; k += 4) {
    const int64_t rows = std::min<int64_t>(4, k1 - k);
    const int64_t fetch = rows_to_fetch(k, ahead, k1, 4);
    BlockPrefetch prefetch;
    prefetch.reset((fetch > 0 ? codes + (k + ahead) * N : codes) + c0, N, c1 - c0, fetch);
    const float* s[4];
    for (int64_t r = 0; r < 4; ++r) s[r] = scale_table + ((k + std::min(r, rows - 1)) / rpb) * N;
    const int8_t* ra = codes + k * N;
    switch (rows) {
      case 4: rows_step_avx2<kPairs, 4, kM>(x, ldx, k, ra, N, s, c0, c1, prefetch, fetch, acc, acc_ld); break;
      case 3: rows_step_avx2<kPairs, 3, kM>(x, ldx, k, ra, N, s, c0, c1, prefetch, fetch, acc, acc_ld); break;
      case 2: rows_step_avx2<kPairs, 2, kM>(x, ldx, k, ra, N, s, c0, c1, prefetch, fetch, acc, acc_ld); break;
      default: rows_step_avx2<kPairs, 1, kM>(x, ldx, k, ra, N, s, c0, c1, prefetch, fetch, acc, acc_ld); break;
    }
  }
}

// ---------------------------------------------------------------------------------
// AVX-512 with bf16 instructions. Pairs: a pair of code rows becomes, per column, one
// dword of two bf16 (row k low, row k + 1 high; vcvtne2ps2bf16 does the dequantization's
// bf16 rounding), and vdpbf16ps adds x[k+1] w[k+1] then x[k] w[k] to each column's fp32
// sum: the pinned order, in one instruction per 16 columns and pair of rows. The
// loads of a task's last, narrower tile are masked (pair_panels.h: load_f32, for_each_tile).
template <class F>
GROKIT_AVX512 inline __m512 dequant16_f32(const int8_t* p, __m512 s, F full, __mmask16 m) {
  __m128i q;
  if constexpr (F::value) (void)full, (void)m, q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  else q = _mm_maskz_loadu_epi8(m, p);
  return _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q)), s);
}

// The fp32 scales of one row's 32-column tile (lo: its first 16 columns).
struct RowScales {
  __m512 lo, hi;
};
template <class F>
GROKIT_AVX512 inline RowScales row_scales_at(const float* p, F full, __mmask16 ml, __mmask16 mh) {
  return RowScales{load_f32(p, full, ml), load_f32(p + 16, full, mh)};
}
// One pair of rows (k at r0, k + 1 at r0 + N; zero when `second` is false) of a 32-column
// tile, dequantized: two vectors of 16 dwords, each (w[k][n] low, w[k+1][n] high) with
// w = bf16(code * scale).
template <class F>
GROKIT_AVX512 inline void pair_tile(const int8_t* r0, int64_t N, F full, __mmask16 ml, __mmask16 mh, RowScales s0,
                                    RowScales s1, bool second, __m512i& lo, __m512i& hi) {
  const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6,
                                              21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  __m512 lo0 = dequant16_f32(r0, s0.lo, full, ml), hi0 = dequant16_f32(r0 + 16, s0.hi, full, mh);
  __m512 lo1 = _mm512_setzero_ps(), hi1 = _mm512_setzero_ps();
  if (second) {
    lo1 = dequant16_f32(r0 + N, s1.lo, full, ml);
    hi1 = dequant16_f32(r0 + N + 16, s1.hi, full, mh);
  }
  lo = _mm512_permutexvar_epi16(interleave, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(lo1, lo0)));
  hi = _mm512_permutexvar_epi16(interleave, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(hi1, hi0)));
}

// Rows [k0, k1) of columns [c0, c1) (the last tile masked), two row pairs at a time: the rows
// stream through sequentially, each 32-column tile of a pair is dequantized once (the
// bf16 rounding done by vcvtne2ps2bf16, the pairs interleaved into dwords) and added to
// every row of x's fp32 sums in `acc` ([M][acc_ld], column c0 at 0) by vdpbf16ps.
GROKIT_AVX512 void pairs_rows_avx512(const uint32_t* xpairs, int64_t M, int64_t kp_stride, int64_t K,
                                     const int8_t* codes, const float* scale_table, int64_t N, int64_t rpb, int64_t k0,
                                     int64_t k1, int64_t c0, int64_t c1, float* acc, int64_t acc_ld) {
  const int64_t ahead = rows_ahead(N, 4);  // prefetch (internal.h)
  // The scales of row k, column c0 at [0] (found once per row, not per tile).
  auto row_scales = [&](int64_t k) { return scale_table + (k / rpb) * N + c0; };
  // The rows before the first prefetch distance, requested all at once up front.
  for (int64_t k = k0; k < std::min(k1, k0 + ahead); ++k)
    for (int64_t c = c0; c < c1; c += 64) prefetch_line(reinterpret_cast<const char*>(codes + k * N + c));
  for (int64_t k = k0; k < k1; k += 4) {
    const bool two = k + 2 < k1;  // a second pair in this step
    const int64_t fetch = rows_to_fetch(k, ahead, k1, 4);
    const int8_t* next = fetch > 0 ? codes + (k + ahead) * N : codes;
    BlockPrefetch prefetch;
    prefetch.reset(next + c0, N, c1 - c0, fetch);
    // x's pairs for one row of x, hoisted out of the column loop.
    const __m512bh xa1 = reinterpret_cast<__m512bh>(_mm512_set1_epi32(static_cast<int>(xpairs[k / 2])));
    const __m512bh xb1 = reinterpret_cast<__m512bh>(_mm512_set1_epi32(static_cast<int>(two ? xpairs[k / 2 + 1] : 0)));
    const int8_t* ra = codes + k * N;
    const bool a1 = k + 1 < K, b1 = two && k + 3 < K;
    const float* sa0 = row_scales(k);
    const float* sa1 = a1 ? row_scales(k + 1) : sa0;
    const float* sb0 = two ? row_scales(k + 2) : sa0;
    const float* sb1 = b1 ? row_scales(k + 3) : sa0;
    // The usual step: four rows of one scale block, whose scales are loaded once per tile
    // (the loads, not the arithmetic, bound this loop on data in cache).
    const bool one_block = b1 && sa0 == sb1;
    auto step = [&](auto uniform) GROKIT_AVX512_INLINE_LAMBDA {
      for_each_tile(c0, c1, [&](auto full, int64_t c, __mmask16 ml, __mmask16 mh) GROKIT_AVX512_INLINE_LAMBDA {
        if (((c - c0) & 63) == 0) prefetch.next(fetch);
        auto scales_of = [&](const float* row) GROKIT_AVX512_INLINE_LAMBDA {
          return row_scales_at(row + (c - c0), full, ml, mh);
        };
        __m512i ai_lo, ai_hi, bi_lo = _mm512_setzero_si512(), bi_hi = _mm512_setzero_si512();  // b: read only with two
        if constexpr (decltype(uniform)::value) {
          const RowScales sc = scales_of(sa0);
          pair_tile(ra + c, N, full, ml, mh, sc, sc, true, ai_lo, ai_hi);
          pair_tile(ra + 2 * N + c, N, full, ml, mh, sc, sc, true, bi_lo, bi_hi);
        } else {
          pair_tile(ra + c, N, full, ml, mh, scales_of(sa0), scales_of(sa1), a1, ai_lo, ai_hi);
          if (two) pair_tile(ra + 2 * N + c, N, full, ml, mh, scales_of(sb0), scales_of(sb1), b1, bi_lo, bi_hi);
        }
        const __m512bh alo = reinterpret_cast<__m512bh>(ai_lo), ahi = reinterpret_cast<__m512bh>(ai_hi);
        const __m512bh blo = reinterpret_cast<__m512bh>(bi_lo), bhi = reinterpret_cast<__m512bh>(bi_hi);
        for (int64_t m = 0; m < M; ++m) {
          const uint32_t* xp = xpairs + m * kp_stride + k / 2;
          __m512bh xa = M == 1 ? xa1 : reinterpret_cast<__m512bh>(_mm512_set1_epi32(static_cast<int>(xp[0])));
          float* ap = acc + m * acc_ld + (c - c0);
          __m512 s0 = _mm512_dpbf16_ps(load_f32(ap, full, ml), alo, xa);
          __m512 s1 = _mm512_dpbf16_ps(load_f32(ap + 16, full, mh), ahi, xa);
          if (decltype(uniform)::value || two) {
            __m512bh xb = M == 1 ? xb1 : reinterpret_cast<__m512bh>(_mm512_set1_epi32(static_cast<int>(xp[1])));
            s0 = _mm512_dpbf16_ps(s0, blo, xb);
            s1 = _mm512_dpbf16_ps(s1, bhi, xb);
          }
          store_f32(ap, s0, full, ml);
          store_f32(ap + 16, s1, full, mh);
        }
      });
    };
    if (one_block) step(std::true_type{});
    else step(std::false_type{});
  }
}


// The panels' pairs of this layout (pair_panels.h): rows k and k + 1 of a tile dequantized
// as pairs_rows_avx512 does it, each with its row block's scales.
struct Q8Pairs {
  const int8_t* codes;
  const float* scale_table;  // fp32 [blocks][N]
  int64_t N, rpb;
  template <class F>
  GROKIT_AVX512 __attribute__((always_inline)) void pair(int64_t k, int64_t c, F full, __mmask16 ml, __mmask16 mh,
                                                         bool second, __m512i& lo, __m512i& hi) const {
    const RowScales s0 = row_scales_at(scale_table + (k / rpb) * N + c, full, ml, mh);
    const RowScales s1 = second ? row_scales_at(scale_table + ((k + 1) / rpb) * N + c, full, ml, mh) : s0;
    pair_tile(codes + k * N + c, N, full, ml, mh, s0, s1, second, lo, hi);
  }
  void prefetch64(int64_t k, int64_t c) const { prefetch_line(reinterpret_cast<const char*>(codes + k * N + c)); }
};

// fp32 activations, four rows at a time: each 32-column tile of a pair of rows is
// dequantized and bf16-rounded once (one vcvtne2ps2bf16, the pair interleaved into dwords
// as above, then split into fp32 by a shift and a mask), then acc = fma(x[k], w[k], acc)
// in k order for every row of x: one load and store of the sums per four rows (prefill
// is bound by them).
GROKIT_AVX512 void fma_rows_avx512(const float* x, int64_t M, int64_t ldx, const int8_t* codes,
                                   const float* scale_table, int64_t N, int64_t rpb, int64_t k0, int64_t k1, int64_t c0,
                                   int64_t c1, float* acc, int64_t acc_ld) {
  const __m512i high_half = _mm512_set1_epi32(static_cast<int>(0xffff0000u));
  const int64_t ahead = rows_ahead(N, 4);  // prefetch (internal.h)
  auto row_scales = [&](int64_t k) { return scale_table + (k / rpb) * N + c0; };
  for (int64_t k = k0; k < std::min(k1, k0 + ahead); ++k)  // as pairs_rows_avx512
    for (int64_t c = c0; c < c1; c += 64) prefetch_line(reinterpret_cast<const char*>(codes + k * N + c));
  // Rows k and k + 1 (zero when absent; s1 == s0 when they share a block) of tile c as
  // fp32: w[0..1] row k (columns 0-15, 16-31), w[2..3] row k + 1.
  auto pair_f32 = [&](auto full, const int8_t* r0, int64_t c, __mmask16 ml, __mmask16 mh, const float* s0,
                      const float* s1, bool second, __m512* w) GROKIT_AVX512_INLINE_LAMBDA {
    const RowScales sc0 = row_scales_at(s0 + (c - c0), full, ml, mh);
    const RowScales sc1 = s1 == s0 ? sc0 : row_scales_at(s1 + (c - c0), full, ml, mh);
    __m512i lo, hi;
    pair_tile(r0 + c, N, full, ml, mh, sc0, sc1, second, lo, hi);
    w[0] = _mm512_castsi512_ps(_mm512_slli_epi32(lo, 16));
    w[1] = _mm512_castsi512_ps(_mm512_slli_epi32(hi, 16));
    w[2] = _mm512_castsi512_ps(_mm512_and_si512(lo, high_half));
    w[3] = _mm512_castsi512_ps(_mm512_and_si512(hi, high_half));
  };
  for (int64_t k = k0; k < k1; k += 4) {
    const int64_t rows = std::min<int64_t>(4, k1 - k);
    const int64_t fetch = rows_to_fetch(k, ahead, k1, 4);
    const int8_t* next = fetch > 0 ? codes + (k + ahead) * N : codes;
    BlockPrefetch prefetch;
    prefetch.reset(next + c0, N, c1 - c0, fetch);
    const int8_t* ra = codes + k * N;
    const float* s[4];
    for (int64_t r = 0; r < 4; ++r) s[r] = row_scales(k + std::min(r, rows - 1));
    // x for one row of x, hoisted out of the column loop (the stores to acc could alias it).
    __m512 x1[4];
    for (int64_t r = 0; r < 4; ++r) x1[r] = _mm512_set1_ps(r < rows ? x[k + r] : 0.0f);
    for_each_tile(c0, c1, [&](auto full, int64_t c, __mmask16 ml, __mmask16 mh) GROKIT_AVX512_INLINE_LAMBDA {
      if (((c - c0) & 63) == 0) prefetch.next(fetch);
      __m512 w[8];  // row k + r, columns 0-15 / 16-31: w[2r], w[2r + 1]
      pair_f32(full, ra, c, ml, mh, s[0], s[1], rows > 1, w);
      if (rows > 2) pair_f32(full, ra + 2 * N, c, ml, mh, s[2], s[3], rows > 3, w + 4);
      if (M == 1 && rows == 4) {  // decode
        __m512 s0 = load_f32(acc + (c - c0), full, ml), s1 = load_f32(acc + (c - c0) + 16, full, mh);
        for (int r = 0; r < 4; ++r) {
          s0 = _mm512_fmadd_ps(x1[r], w[2 * r], s0);
          s1 = _mm512_fmadd_ps(x1[r], w[2 * r + 1], s1);
        }
        store_f32(acc + (c - c0), s0, full, ml);
        store_f32(acc + (c - c0) + 16, s1, full, mh);
        return;
      }
      for (int64_t m = 0; m < M; ++m) {
        const float* xr = x + m * ldx + k;
        float* ap = acc + m * acc_ld + (c - c0);
        __m512 s0 = load_f32(ap, full, ml), s1 = load_f32(ap + 16, full, mh);
        if (rows == 4) {
          for (int r = 0; r < 4; ++r) {
            const __m512 xk = _mm512_set1_ps(xr[r]);
            s0 = _mm512_fmadd_ps(xk, w[2 * r], s0);
            s1 = _mm512_fmadd_ps(xk, w[2 * r + 1], s1);
          }
        } else {
          for (int64_t r = 0; r < rows; ++r) {
            const __m512 xk = _mm512_set1_ps(xr[r]);
            s0 = _mm512_fmadd_ps(xk, w[2 * r], s0);
            s1 = _mm512_fmadd_ps(xk, w[2 * r + 1], s1);
          }
        }
        store_f32(ap, s0, full, ml);
        store_f32(ap + 16, s1, full, mh);
      }
    });
  }
}



// ---------------------------------------------------------------------------------
enum class Level { kScalar, kAvx2, kAvx512 };

template <Level kLevel, bool kPairs>
Status impl(const float* x, int64_t M, int64_t K, int64_t ldx, const Q8Operand* ops, int64_t count, Pool pool,
            int64_t sum_rows) {
  for (int64_t p = 0; p < count; ++p) check_args(M, K, ldx, ops[p].N, ops[p].blocks, ops[p].ldy);
  const int64_t sr = sum_rows > 0 ? sum_rows : K;  // rows per independent chain
  GROKIT_CHECK(K % sr == 0 && (sr == K || sr % 2 == 0));
  const int64_t chains = K / sr;
  if (M == 0) return {};
  // x's bf16 pairs (stage_x_pairs), [M][kp].
  const int64_t kp = (K + 1) / 2;
  // Owned by the calling thread and reused across calls; the tasks reach it through this
  // reference (a thread_local named inside the lambdas would be each worker's own).
  static thread_local Staged<uint32_t> xpairs_storage;
  Staged<uint32_t>& xpairs = xpairs_storage;
  // Each operand's scales as fp32 [blocks][N], converted once per call for every task.
  static thread_local std::vector<std::vector<float>> scale_tables_storage;
  std::vector<std::vector<float>>& scale_tables = scale_tables_storage;
  if (kLevel == Level::kAvx512 || (kLevel == Level::kAvx2 && M <= kAvx2RowsMaxM)) {
    if (static_cast<int64_t>(scale_tables.size()) < count) scale_tables.resize(static_cast<size_t>(count));
    for (int64_t p = 0; p < count; ++p) {
      std::vector<float>& table = scale_tables[static_cast<size_t>(p)];
      table.resize(static_cast<size_t>(ops[p].blocks * ops[p].N));
      for (int64_t i = 0; i < ops[p].blocks * ops[p].N; ++i) table[static_cast<size_t>(i)] = bf16f(ops[p].scales[i]);
    }
  }
  if (kLevel == Level::kAvx512 && kPairs) stage_x_pairs(x, M, K, ldx, xpairs);
  // Prefill's bf16 products (panels of 3+ rows of x) by two fmas where they beat one
  // vdpbf16ps (detail::bf16_products_by_fma): the same sums in the same order.
  const bool fma_pairs = kLevel == Level::kAvx512 && kPairs && M >= kPanelMinRows && bf16_products_by_fma();
  // One chain of operand p over rows [k0, k1) of columns [c0, c1) into out ([M][ld], c0
  // at out[0]): whole 32-column tiles by SIMD, the rest by the scalar twin.
  auto chain_part = [&](int64_t p, int64_t k0, int64_t k1, int64_t c0, int64_t c1, float* out, int64_t ld) {
    const int8_t* codes = ops[p].codes;
    const uint16_t* scales = ops[p].scales;
    const int64_t N = ops[p].N, rpb = K / ops[p].blocks;
    // AVX-512 takes every column (its last tile masked), AVX2 the whole 8-column groups.
    const bool avx2_rows = kLevel == Level::kAvx2 && M <= kAvx2RowsMaxM;
    const int64_t vec_end = kLevel == Level::kScalar ? c0 : kLevel == Level::kAvx512 ? c1 : c0 + (c1 - c0) / 8 * 8;
    if (vec_end > c0) {
      // The panels start the sums from zero themselves.
      if ((kLevel == Level::kAvx512 && M < kPanelMinRows) || avx2_rows)
        for (int64_t m = 0; m < M; ++m) std::fill(out + m * ld, out + m * ld + (vec_end - c0), 0.0f);
      if constexpr (kLevel == Level::kAvx512) {
        // Row by row over the columns: sequential reads, the sums in L1.
        const float* table = scale_tables[static_cast<size_t>(p)].data();
        if (fma_pairs)
          fma_panels_avx512<true>(x, M, ldx, Q8Pairs{codes, table, N, rpb}, k0, k1, c0, vec_end, out, ld);
        else if (kPairs && M >= kPanelMinRows)
          pairs_panels_avx512(xpairs.data(), M, kp, Q8Pairs{codes, table, N, rpb}, k0, k1, c0, vec_end, out, ld);
        else if (kPairs)
          pairs_rows_avx512(xpairs.data(), M, kp, K, codes, table, N, rpb, k0, k1, c0, vec_end, out, ld);
        else if (M >= kPanelMinRows)
          fma_panels_avx512<false>(x, M, ldx, Q8Pairs{codes, table, N, rpb}, k0, k1, c0, vec_end, out, ld);
        else
          fma_rows_avx512(x, M, ldx, codes, table, N, rpb, k0, k1, c0, vec_end, out, ld);
      } else if constexpr (kLevel == Level::kAvx2) {
        if (avx2_rows) {
          const float* table = scale_tables[static_cast<size_t>(p)].data();
          if (M == 1) rows_avx2<kPairs, 1>(x, ldx, codes, table, N, rpb, k0, k1, c0, vec_end, out, ld);
          else if (M == 2) rows_avx2<kPairs, 2>(x, ldx, codes, table, N, rpb, k0, k1, c0, vec_end, out, ld);
          else if (M == 3) rows_avx2<kPairs, 3>(x, ldx, codes, table, N, rpb, k0, k1, c0, vec_end, out, ld);
          else rows_avx2<kPairs, 4>(x, ldx, codes, table, N, rpb, k0, k1, c0, vec_end, out, ld);
        } else {
          for (int64_t b0 = k0; b0 < k1; b0 += kRowBlock) {
            const int64_t b1 = std::min(k1, b0 + kRowBlock);
            int64_t c = c0;
            for (; c + 32 <= vec_end; c += 32)
              block_avx2<kPairs, 4>(x, M, ldx, K, codes, scales, N, rpb, b0, b1, c, out + (c - c0), ld, b0 == k0);
            for (; c < vec_end; c += 8)
              block_avx2<kPairs, 1>(x, M, ldx, K, codes, scales, N, rpb, b0, b1, c, out + (c - c0), ld, b0 == k0);
          }
        }
      }
    }
    if (vec_end < c1) chain_columns_ref<kPairs>(x, M, ldx, codes, scales, N, rpb, k0, k1, vec_end, c1, out + (vec_end - c0), ld);
  };
  // Prefill with chains: tiles that walk the chains and their tree themselves.
  auto by_tiles = [&](int64_t p) {
    return kLevel == Level::kAvx512 && M >= kPanelMinRows && chains > 1 && K <= kTileChainsMaxRows &&
           !decode_plan_fits(M, ops[p].N, chains);
  };
  if constexpr (kLevel == Level::kAvx512) {
    for (int64_t p = 0; p < count; ++p) {
      if (!by_tiles(p)) continue;
      const Q8Operand& op = ops[p];
      const float* table = scale_tables[static_cast<size_t>(p)].data();
      for_each(pool, static_cast<size_t>((op.N + 31) / 32), [&](size_t t) {
        thread_local std::vector<float> panel;
        const int64_t c = static_cast<int64_t>(t) * 32;
        const Q8Pairs src{op.codes, table, op.N, K / op.blocks};
        if (fma_pairs)
          tile_chains_avx512<kPairs, kPairs>(xpairs.data(), kp, x, ldx, M, K, src, op.N, sr, c, op.y, op.ldy, panel);
        else
          tile_chains_avx512<kPairs, false>(xpairs.data(), kp, x, ldx, M, K, src, op.N, sr, c, op.y, op.ldy, panel);
      });
    }
  }
  // Several operands that each take the decode plan share one (the threads meet once for
  // all of them); otherwise each has its own.
  bool together = count > 1;
  for (int64_t p = 0; p < count; ++p) together = together && decode_plan_fits(M, ops[p].N, chains);
  if (together) {
    static thread_local std::vector<ChainProduct> prods_storage;
    std::vector<ChainProduct>& prods = prods_storage;
    prods.resize(static_cast<size_t>(count));
    for (int64_t p = 0; p < count; ++p) prods[static_cast<size_t>(p)] = {ops[p].N, ops[p].y, ops[p].ldy};
    run_chains_decode(pool, M, prods.data(), count, chains, 32, kMaxWidth,
                      [&](int64_t p, int64_t ch, int64_t c0, int64_t c1, float* out, int64_t ld) {
                        chain_part(p, ch * sr, (ch + 1) * sr, c0, c1, out, ld);
                      });
    return {};
  }
  for (int64_t p = 0; p < count; ++p)
    if (!by_tiles(p))
      run_chains(pool, M, ops[p].N, chains, 32, kMaxWidth, ops[p].y, ops[p].ldy,
               [&](int64_t ch, int64_t c0, int64_t c1, float* out, int64_t ld) {
                 chain_part(p, ch * sr, (ch + 1) * sr, c0, c1, out, ld);
               });
  return {};
}

template <bool kPairs>
Status dispatch(const float* x, int64_t M, int64_t K, int64_t ldx, const Q8Operand* ops, int64_t count, Pool pool,
                int64_t sr) {
  if (use_avx512()) return impl<Level::kAvx512, kPairs>(x, M, K, ldx, ops, count, pool, sr);
  if (use_avx2()) return impl<Level::kAvx2, kPairs>(x, M, K, ldx, ops, count, pool, sr);
  return impl<Level::kScalar, kPairs>(x, M, K, ldx, ops, count, pool, sr);
}

}  // namespace

namespace detail {
void combine_chains(float* parts, int64_t chains, int64_t stride, int64_t ld, int64_t M, int64_t width, float* y,
                    int64_t ldy) {
  // One row of x (decode: the chains' sums come from every thread's cache), up to 32
  // chains: a block of columns at a time in a local array (L1), each chain's sums read once
  // and y written once; the adds per column are the tree's below. Prefill's sums are the
  // task's own, in its cache, [chains][M][ld] with a stride that is often a multiple of
  // 4 KiB (every chain's block in one L1 set): the level-by-level walk below is faster
  // there (measured: a 1024-token prefill 5-7 % slower with the blocks).
  constexpr int64_t kMaxLocal = 32, kCols = 64;
  if (M == 1 && chains <= kMaxLocal) {
    alignas(64) float t[kMaxLocal][kCols];
    for (int64_t m = 0; m < M; ++m) {
      const float* row = parts + m * ld;
      for (int64_t c0 = 0; c0 < width; c0 += kCols) {
        const int64_t w = std::min(kCols, width - c0);
        for (int64_t n = chains; n > 1;) {
          const int64_t half = n / 2;
          for (int64_t i = 0; i < half; ++i) {
            // The first level reads the chains' sums, the others the local array.
            const float* a = n == chains ? row + 2 * i * stride + c0 : t[2 * i];
            const float* b = n == chains ? row + (2 * i + 1) * stride + c0 : t[2 * i + 1];
            float* d = t[i];
GROKIT_IVDEP  // d is a (i = 0) or a row already consumed
            for (int64_t c = 0; c < w; ++c) d[c] = a[c] + b[c];
          }
          if (n % 2 != 0) std::copy_n(n == chains ? row + (n - 1) * stride + c0 : t[n - 1], w, t[half]);
          n = half + n % 2;
        }
        std::copy_n(chains == 1 ? row + c0 : t[0], w, y + m * ldy + c0);
      }
    }
    return;
  }
  for (int64_t m = 0; m < M; ++m) {
    float* row = parts + m * ld;
    for (int64_t n = chains; n > 1;) {
      const int64_t half = n / 2;
      for (int64_t i = 0; i < half; ++i) {
        float* d = row + i * stride;
        const float* a = row + 2 * i * stride;
        const float* b = row + (2 * i + 1) * stride;
GROKIT_IVDEP  // d is a (i = 0) or a row already consumed
        for (int64_t c = 0; c < width; ++c) d[c] = a[c] + b[c];
      }
      if (n % 2 != 0) std::copy(row + (n - 1) * stride, row + (n - 1) * stride + width, row + half * stride);
      n = half + n % 2;
    }
    std::copy(row, row + width, y + m * ldy);
  }
}
}  // namespace detail

float tree_sum(float* v, int64_t n) {
  GROKIT_CHECK(n >= 1);
  while (n > 1) {
    int64_t half = n / 2;
    for (int64_t i = 0; i < half; ++i) v[i] = v[2 * i] + v[2 * i + 1];
    if (n % 2 != 0) v[half] = v[n - 1];
    n = half + n % 2;
  }
  return v[0];
}

Status matmul_q8(const float* x, int64_t M, int64_t K, int64_t ldx, const int8_t* codes, const uint16_t* scales,
                 int64_t N, int64_t blocks, float* y, int64_t ldy, Pool pool, int64_t sum_rows) {
  const Q8Operand op{codes, scales, N, blocks, y, ldy};
  return dispatch<true>(x, M, K, ldx, &op, 1, pool, sum_rows);
}
Status matmul_q8_multi(const float* x, int64_t M, int64_t K, int64_t ldx, const Q8Operand* ops, int64_t count,
                       Pool pool, int64_t sum_rows) {
  GROKIT_CHECK(count >= 0 && (count == 0 || ops != nullptr));
  return dispatch<true>(x, M, K, ldx, ops, count, pool, sum_rows);
}
Status matmul_q8_ref(const float* x, int64_t M, int64_t K, int64_t ldx, const int8_t* codes, const uint16_t* scales,
                     int64_t N, int64_t blocks, float* y, int64_t ldy, Pool pool, int64_t sum_rows) {
  const Q8Operand op{codes, scales, N, blocks, y, ldy};
  return impl<Level::kScalar, true>(x, M, K, ldx, &op, 1, pool, sum_rows);
}
Status matmul_q8_f32(const float* x, int64_t M, int64_t K, int64_t ldx, const int8_t* codes, const uint16_t* scales,
                     int64_t N, int64_t blocks, float* y, int64_t ldy, Pool pool, int64_t sum_rows) {
  const Q8Operand op{codes, scales, N, blocks, y, ldy};
  return dispatch<false>(x, M, K, ldx, &op, 1, pool, sum_rows);
}
Status matmul_q8_f32_ref(const float* x, int64_t M, int64_t K, int64_t ldx, const int8_t* codes,
                         const uint16_t* scales, int64_t N, int64_t blocks, float* y, int64_t ldy, Pool pool,
                         int64_t sum_rows) {
  const Q8Operand op{codes, scales, N, blocks, y, ldy};
  return impl<Level::kScalar, false>(x, M, K, ldx, &op, 1, pool, sum_rows);
}

}  // namespace grokit::kernels
