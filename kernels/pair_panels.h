// The prefill products of the row-major weight layouts (int8 codes with row-block scales,
// matmul_q8.cpp; bf16 weights, matmul_bf16w.cpp), for AVX-512: panels of bf16 pairs. A
// 32-column tile's rows are made into pairs once per band of rows (or once per tile for
// the chains' walk) in L1, then every block of up to 8 rows of x runs down them with its
// sums in registers, by vdpbf16ps or by two fmas per pair (the same sums in the same
// order), or by fmas in k order for fp32 x. The layout supplies the pairs, a Src:
//   src.pair(k, c, full, ml, mh, second, lo, hi): rows k and k + 1 (zero when !second) of
//     the 32-column tile at column c (masks ml, mh: its columns 0-15 and 16-31 that exist;
//     full: all of them), as 16 dwords each, w[k][n] low and w[k + 1][n] high (lo: columns
//     0-15, hi: 16-31), w the weight the model uses (bf16);
//   src.prefetch64(k, c): requests row k's columns [c, c + 64).
#pragma once

#include <type_traits>
#include <vector>

#include "kernels/internal.h"

// GCC 12's avx512fintrin.h trips -Wmaybe-uninitialized on its own _mm512_undefined values.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace grokit::kernels::detail {

// A task's last tile may be narrower than 32 columns: the loads and stores below take
// the tile's column mask (16 columns each) and `full` (a compile-time all-ones), masked
// loads reading nothing past the last column.
using Full = std::true_type;
using Partial = std::false_type;
template <class F>
GROKIT_AVX512 inline __m512 load_f32(const float* p, F full, __mmask16 m) {
  if constexpr (F::value) return (void)full, (void)m, _mm512_loadu_ps(p);
  else return _mm512_maskz_loadu_ps(m, p);
}
template <class F>
GROKIT_AVX512 inline void store_f32(float* p, __m512 v, F full, __mmask16 m) {
  if constexpr (F::value) (void)full, (void)m, _mm512_storeu_ps(p, v);
  else _mm512_mask_storeu_ps(p, m, v);
}
// The masks of the tile at column c of [.., c1): columns [c, c + 16) and [c + 16, c + 32).
inline __mmask16 mask_lo(int64_t c, int64_t c1) {
  return c1 - c >= 16 ? __mmask16{0xffff} : static_cast<__mmask16>((1u << (c1 - c)) - 1);
}
inline __mmask16 mask_hi(int64_t c, int64_t c1) { return mask_lo(c + 16, std::max(c + 16, c1)); }
// Runs tile(Full, c, ..) for the whole 32-column tiles of [c0, c1), then
// tile(Partial, c, masks) for the rest.
template <class Tile>
GROKIT_AVX512 __attribute__((always_inline)) inline void for_each_tile(int64_t c0, int64_t c1, const Tile& tile) {
  int64_t c = c0;
  for (; c + 32 <= c1; c += 32) tile(Full{}, c, __mmask16{0xffff}, __mmask16{0xffff});
  if (c < c1) tile(Partial{}, c, mask_lo(c, c1), mask_hi(c, c1));
}

// Many rows of x (prefill): each 32-column tile's rows are made into pairs (src.pair) a
// panel of 64 rows (32 pairs) at a time into L1, then every block of up to 8 rows of x
// runs down the panel with its sums in registers: per (row of x, column) the same
// vdpbf16ps sequence in k order as the decode walks, so the same bits, with the sums
// loaded and stored once per panel instead of once per four rows (the first panel of the
// chain starts them from zero: acc need not be cleared).
constexpr int64_t kPanelPairs = 32;
// Runs block(R, m) over the rows of x in blocks of R = 8, then the rest, R a compile-time
// constant (std::integral_constant) so that a block's sums stay in registers.
template <class Block>
GROKIT_AVX512 __attribute__((always_inline)) inline void for_row_blocks(int64_t M, const Block& block) {
  int64_t m = 0;
  for (; m + 8 <= M; m += 8) block(std::integral_constant<int, 8>{}, m);
  switch (M - m) {
    case 7: block(std::integral_constant<int, 7>{}, m); break;
    case 6: block(std::integral_constant<int, 6>{}, m); break;
    case 5: block(std::integral_constant<int, 5>{}, m); break;
    case 4: block(std::integral_constant<int, 4>{}, m); break;
    case 3: block(std::integral_constant<int, 3>{}, m); break;
    case 2: block(std::integral_constant<int, 2>{}, m); break;
    case 1: block(std::integral_constant<int, 1>{}, m); break;
    default: break;
  }
}
// From 3 rows of x on, the panels win (measured, K 1024, N 5464, from memory: 3 rows
// 17.8 against 16.5 GB/s, 8 rows 13.5 against 8.8; 2 rows 18 against 25).
constexpr int64_t kPanelMinRows = 3;
// tile_chains_avx512 keeps a tile's whole column of rows as pairs (64 bytes a row):
// up to 1 MiB.
constexpr int64_t kTileChainsMaxRows = 16384;
template <int R, class F>
GROKIT_AVX512 inline void pairs_panel_block(const uint32_t* xp, int64_t kp_stride, const __m512i (*panel)[2],
                                            int64_t npairs, F full, __mmask16 ml, __mmask16 mh, float* ap,
                                            int64_t acc_ld, bool first) {
  __m512 s[R][2];
  for (int r = 0; r < R; ++r) {
    s[r][0] = first ? _mm512_setzero_ps() : load_f32(ap + r * acc_ld, full, ml);
    s[r][1] = first ? _mm512_setzero_ps() : load_f32(ap + r * acc_ld + 16, full, mh);
  }
  for (int64_t i = 0; i < npairs; ++i) {
    const __m512bh lo = reinterpret_cast<__m512bh>(panel[i][0]), hi = reinterpret_cast<__m512bh>(panel[i][1]);
    for (int r = 0; r < R; ++r) {
      const __m512bh xb = reinterpret_cast<__m512bh>(_mm512_set1_epi32(static_cast<int>(xp[r * kp_stride + i])));
      s[r][0] = _mm512_dpbf16_ps(s[r][0], lo, xb);
      s[r][1] = _mm512_dpbf16_ps(s[r][1], hi, xb);
    }
  }
  for (int r = 0; r < R; ++r) {
    store_f32(ap + r * acc_ld, s[r][0], full, ml);
    store_f32(ap + r * acc_ld + 16, s[r][1], full, mh);
  }
}
template <class Src>
GROKIT_AVX512 void pairs_panels_avx512(const uint32_t* xpairs, int64_t M, int64_t kp_stride, const Src& src, int64_t k0,
                                       int64_t k1, int64_t c0, int64_t c1, float* acc, int64_t acc_ld) {
  alignas(64) __m512i panel[kPanelPairs][2];
  // A band of 64 rows at a time across the columns, so that x's slice of the band stays
  // in cache while every tile uses it (x has M * K values: tiles walking all of K each
  // streamed the whole of x once per tile, from memory for a long K).
  for (int64_t kb = k0; kb < k1; kb += 2 * kPanelPairs) {
    const int64_t ke = std::min(k1, kb + 2 * kPanelPairs), npairs = (ke - kb + 1) / 2;
    for_each_tile(c0, c1, [&](auto full, int64_t c, __mmask16 ml, __mmask16 mh) GROKIT_AVX512_INLINE_LAMBDA {
      // The next tiles' lines of the band are requested a line ahead (two tiles share a
      // line).
      if (((c - c0) & 63) == 0 && c + 64 < c1)
        for (int64_t k = kb; k < ke; ++k) src.prefetch64(k, c + 64);
      for (int64_t i = 0; i < npairs; ++i) {
        const int64_t k = kb + 2 * i;
        const bool second = k + 1 < ke;
        src.pair(k, c, full, ml, mh, second, panel[i][0], panel[i][1]);
      }
      const uint32_t* xp = xpairs + kb / 2;
      float* ap = acc + (c - c0);
      for_row_blocks(M, [&](auto R, int64_t m) GROKIT_AVX512_INLINE_LAMBDA {
        pairs_panel_block<decltype(R)::value>(xp + m * kp_stride, kp_stride, panel, npairs, full, ml, mh,
                                              ap + m * acc_ld, acc_ld, kb == k0);
      });
    });
  }
}

// The fp32-x twin of pairs_panels_avx512 (prefill's down projection): panels of 64 rows of
// fp32 weights (each pair from src.pair, split into fp32 by a shift and a mask), then
// blocks of up to 8 rows of x with acc = fma(x[k], w[k], acc) in k order in registers.
// kPairOrder: bf16 x in vdpbf16ps's order (detail::bf16_products_by_fma).
template <int R, bool kPairOrder, class F>
GROKIT_AVX512 inline void fma_panel_block(const float* x, int64_t ldx, const __m512 (*panel)[2], int64_t rows, F full,
                                          __mmask16 ml, __mmask16 mh, float* ap, int64_t acc_ld, bool first) {
  __m512 s[R][2];
  for (int r = 0; r < R; ++r) {
    s[r][0] = first ? _mm512_setzero_ps() : load_f32(ap + r * acc_ld, full, ml);
    s[r][1] = first ? _mm512_setzero_ps() : load_f32(ap + r * acc_ld + 16, full, mh);
  }
  auto add_row = [&](int r, int64_t i) GROKIT_AVX512_INLINE_LAMBDA {
    const __m512 xk = _mm512_set1_ps(x[r * ldx + i]);
    s[r][0] = _mm512_fmadd_ps(xk, panel[i][0], s[r][0]);
    s[r][1] = _mm512_fmadd_ps(xk, panel[i][1], s[r][1]);
  };
  if constexpr (kPairOrder) {
    // bf16 x: each pair (k, k + 1) as vdpbf16ps adds it, k + 1 first (a missing k + 1 adds
    // nothing: a sum started at +0 is never -0, so skipping it changes no bit).
    for (int64_t i = 0; i < rows; i += 2)
      for (int r = 0; r < R; ++r) {
        if (i + 1 < rows) add_row(r, i + 1);
        add_row(r, i);
      }
  } else {
    for (int64_t i = 0; i < rows; ++i)
      for (int r = 0; r < R; ++r) add_row(r, i);
  }
  for (int r = 0; r < R; ++r) {
    store_f32(ap + r * acc_ld, s[r][0], full, ml);
    store_f32(ap + r * acc_ld + 16, s[r][1], full, mh);
  }
}
template <bool kPairOrder, class Src>
GROKIT_AVX512 void fma_panels_avx512(const float* x, int64_t M, int64_t ldx, const Src& src, int64_t k0, int64_t k1,
                                     int64_t c0, int64_t c1, float* acc, int64_t acc_ld) {
  const __m512i high_half = _mm512_set1_epi32(static_cast<int>(0xffff0000u));
  alignas(64) __m512 panel[2 * kPanelPairs][2];
  for (int64_t kb = k0; kb < k1; kb += 2 * kPanelPairs) {  // bands of rows, as pairs_panels_avx512
    const int64_t ke = std::min(k1, kb + 2 * kPanelPairs);
    for_each_tile(c0, c1, [&](auto full, int64_t c, __mmask16 ml, __mmask16 mh) GROKIT_AVX512_INLINE_LAMBDA {
      if (((c - c0) & 63) == 0 && c + 64 < c1)  // as pairs_panels_avx512
        for (int64_t k = kb; k < ke; ++k) src.prefetch64(k, c + 64);
      for (int64_t k = kb; k < ke; k += 2) {
        const bool second = k + 1 < ke;
        __m512i lo, hi;
        src.pair(k, c, full, ml, mh, second, lo, hi);
        const int64_t i = k - kb;
        panel[i][0] = _mm512_castsi512_ps(_mm512_slli_epi32(lo, 16));
        panel[i][1] = _mm512_castsi512_ps(_mm512_slli_epi32(hi, 16));
        panel[i + 1][0] = _mm512_castsi512_ps(_mm512_and_si512(lo, high_half));
        panel[i + 1][1] = _mm512_castsi512_ps(_mm512_and_si512(hi, high_half));
      }
      const int64_t rows = ke - kb;
      const float* xk = x + kb;
      float* ap = acc + (c - c0);
      for_row_blocks(M, [&](auto R, int64_t m) GROKIT_AVX512_INLINE_LAMBDA {
        fma_panel_block<decltype(R)::value, kPairOrder>(xk + m * ldx, ldx, panel, rows, full, ml, mh,
                                                        ap + m * acc_ld, acc_ld, kb == k0);
      });
    });
  }
}

// Prefill with chains (3+ rows of x, more chains' sums than the decode plan keeps): one
// 32-column tile per call. Its rows [0, K) are made into a panel of bf16 pairs once
// (src.pair), then each block of up to 8 rows of x walks the chains with
// its sums in registers and adds each finished chain into the chains' tree at once: two
// subtrees of the same size are added (the earlier one on the left), and what is left at
// the end is added from the last one back. Those are the adds of tree_sum's
// level-by-level tree, so y gets the bits of the chains' sums combined by combine_chains,
// without the chains' sums ever being stored (at M = 1024 they were twice the L2).
// Every chain has an even number of rows here (K = chains * sum_rows, sum_rows even).
constexpr int kTreeDepth = 8;  // chains < 2^7
template <bool kPairs, bool kFmaPairs, class Src, class F>
GROKIT_AVX512 inline void tile_chains_body(const uint32_t* xpairs, int64_t kp, const float* x, int64_t ldx, int64_t M,
                                           int64_t K, const Src& src, int64_t sr, int64_t c, F full, __mmask16 ml,
                                           __mmask16 mh, __m512i (*panel)[2], float* y, int64_t ldy) {
  const __m512i high_half = _mm512_set1_epi32(static_cast<int>(0xffff0000u));
  for (int64_t k = 0; k < K; k += 2) {
    src.pair(k, c, full, ml, mh, true, panel[k / 2][0], panel[k / 2][1]);
  }
  const int64_t chains = K / sr, pairs_per_chain = sr / 2;
  alignas(64) float tree[kTreeDepth][8][32];
  int64_t size[kTreeDepth];
  for_row_blocks(M, [&](auto rows, int64_t m0) GROKIT_AVX512_INLINE_LAMBDA {
    constexpr int R = decltype(rows)::value;
    int depth = 0;
    for (int64_t ch = 0; ch < chains; ++ch) {
      __m512 acc[R][2];
      for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
      for (int64_t i = ch * pairs_per_chain; i < (ch + 1) * pairs_per_chain; ++i) {
        if constexpr (kPairs && !kFmaPairs) {
          const __m512bh lo = reinterpret_cast<__m512bh>(panel[i][0]), hi = reinterpret_cast<__m512bh>(panel[i][1]);
          for (int r = 0; r < R; ++r) {
            const __m512bh xb = reinterpret_cast<__m512bh>(_mm512_set1_epi32(static_cast<int>(xpairs[(m0 + r) * kp + i])));
            acc[r][0] = _mm512_dpbf16_ps(acc[r][0], lo, xb);
            acc[r][1] = _mm512_dpbf16_ps(acc[r][1], hi, xb);
          }
        } else {
          const __m512 w0l = _mm512_castsi512_ps(_mm512_slli_epi32(panel[i][0], 16));
          const __m512 w0h = _mm512_castsi512_ps(_mm512_slli_epi32(panel[i][1], 16));
          const __m512 w1l = _mm512_castsi512_ps(_mm512_and_si512(panel[i][0], high_half));
          const __m512 w1h = _mm512_castsi512_ps(_mm512_and_si512(panel[i][1], high_half));
          for (int r = 0; r < R; ++r) {
            const float* xr = x + (m0 + r) * ldx + 2 * i;
            const __m512 xa = _mm512_set1_ps(xr[0]), xb = _mm512_set1_ps(xr[1]);
            if constexpr (kPairs) {  // the pair order: k + 1, then k
              acc[r][0] = _mm512_fmadd_ps(xa, w0l, _mm512_fmadd_ps(xb, w1l, acc[r][0]));
              acc[r][1] = _mm512_fmadd_ps(xa, w0h, _mm512_fmadd_ps(xb, w1h, acc[r][1]));
            } else {  // k order
              acc[r][0] = _mm512_fmadd_ps(xb, w1l, _mm512_fmadd_ps(xa, w0l, acc[r][0]));
              acc[r][1] = _mm512_fmadd_ps(xb, w1h, _mm512_fmadd_ps(xa, w0h, acc[r][1]));
            }
          }
        }
      }
      // Into the tree: while the last subtree has this one's size, add it on the left.
      int64_t sz = 1;
      while (depth > 0 && size[depth - 1] == sz) {
        --depth;
        for (int r = 0; r < R; ++r) {
          acc[r][0] = _mm512_add_ps(_mm512_load_ps(tree[depth][r]), acc[r][0]);
          acc[r][1] = _mm512_add_ps(_mm512_load_ps(tree[depth][r] + 16), acc[r][1]);
        }
        sz *= 2;
      }
      GROKIT_CHECK(depth < kTreeDepth);
      for (int r = 0; r < R; ++r) {
        _mm512_store_ps(tree[depth][r], acc[r][0]);
        _mm512_store_ps(tree[depth][r] + 16, acc[r][1]);
      }
      size[depth++] = sz;
    }
    for (; depth > 1; --depth)
      for (int r = 0; r < R; ++r)
        for (int h = 0; h < 2; ++h)
          _mm512_store_ps(tree[depth - 2][r] + 16 * h, _mm512_add_ps(_mm512_load_ps(tree[depth - 2][r] + 16 * h),
                                                                     _mm512_load_ps(tree[depth - 1][r] + 16 * h)));
    for (int r = 0; r < R; ++r) {
      store_f32(y + (m0 + r) * ldy + c, _mm512_load_ps(tree[0][r]), full, ml);
      store_f32(y + (m0 + r) * ldy + c + 16, _mm512_load_ps(tree[0][r] + 16), full, mh);
    }
  });
}
template <bool kPairs, bool kFmaPairs, class Src>
GROKIT_AVX512 void tile_chains_avx512(const uint32_t* xpairs, int64_t kp, const float* x, int64_t ldx, int64_t M,
                                      int64_t K, const Src& src, int64_t N, int64_t sr, int64_t c, float* y, int64_t ldy,
                                      std::vector<float>& panel) {
  panel.resize(static_cast<size_t>(16 * K + 16));  // K / 2 pairs of (lo, hi), 64-byte aligned below
  const uintptr_t at = (reinterpret_cast<uintptr_t>(panel.data()) + 63) & ~uintptr_t{63};
  auto* pp = reinterpret_cast<__m512i(*)[2]>(at);
  for_each_tile(c, std::min(N, c + 32), [&](auto full, int64_t cc, __mmask16 ml, __mmask16 mh) GROKIT_AVX512_INLINE_LAMBDA {
    tile_chains_body<kPairs, kFmaPairs>(xpairs, kp, x, ldx, M, K, src, sr, cc, full, ml, mh, pp, y, ldy);
  });
}

}  // namespace grokit::kernels::detail
