// y = x @ W for bf16 weights [K, N] row-major (the bf16 scheme): the int8 products' orders
// exactly (matmul_q8.cpp) with the stored value in place of the dequantized one: per
// column, the pinned pair order of kernels.h (bf16 activations) or fma in k order (fp32
// ones), in chains of sum_rows rows that meet in tree_sum. Prefill (3+ rows of x) takes
// the int8 products' panels (pair_panels.h) with this layout's pairs.
#include <vector>

#include "kernels/internal.h"
#include "kernels/pair_panels.h"

// GCC 12's avx512fintrin.h trips -Wmaybe-uninitialized on its own _mm512_undefined values.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace grokit::kernels {
namespace {
using namespace detail;

constexpr int64_t kRowBlock = 64;     // rows per pass over a task's columns (AVX2; even)

void check_args(int64_t M, int64_t K, int64_t ldx, int64_t N, int64_t ldy) {
  GROKIT_CHECK(M >= 0 && K > 0 && N > 0 && ldx >= K && ldy >= N);
}

// ---------------------------------------------------------------------------------
// Scalar twins: one chain, the sums over rows [k0, k1) of columns [c0, c1) into out
// ([M][ld], column c0 at out[0]), in the pair order or with fma in k order. The chain
// ends at k1 (an odd chain is only ever the whole of K, so k + 1 < k1 is k + 1 < K).
template <bool kPairs>
void chain_columns_ref(const float* x, int64_t M, int64_t ldx, const uint16_t* w, int64_t N, int64_t k0, int64_t k1,
                       int64_t c0, int64_t c1, float* out, int64_t ld) {
  for (int64_t m = 0; m < M; ++m) {
    const float* xr = x + m * ldx;
    for (int64_t n = c0; n < c1; ++n) {
      float acc = 0.0f;
      if (kPairs) {
        for (int64_t k = k0; k < k1; k += 2) {
          if (k + 1 < k1) acc = acc + xr[k + 1] * bf16f(w[(k + 1) * N + n]);
          acc = acc + xr[k] * bf16f(w[k * N + n]);
        }
      } else {
        for (int64_t k = k0; k < k1; ++k) acc = std::fma(xr[k], bf16f(w[k * N + n]), acc);
      }
      out[m * ld + (n - c0)] = acc;
    }
  }
}

// ---------------------------------------------------------------------------------
// AVX2: 8 columns per vector; a row block of a 32-column tile widened to fp32 once into a
// small panel, then used by every row of x.
template <bool kPairs>
GROKIT_AVX2 void block_avx2(const float* x, int64_t M, int64_t ldx, int64_t K, const uint16_t* w, int64_t N,
                            int64_t k0, int64_t k1, int64_t c, float* acc, int64_t acc_ld, bool first) {
  alignas(32) float panel[kRowBlock][32];
  for (int64_t k = k0; k < k1; ++k)
    for (int j = 0; j < 4; ++j) _mm256_store_ps(panel[k - k0] + 8 * j, load_bf16x8(w + k * N + c + 8 * j));
  panel_all_rows_avx2<kPairs, 4>(x, M, ldx, K, panel, k0, k1, acc, acc_ld, first);
}

// ---------------------------------------------------------------------------------
// AVX-512 with bf16 instructions. Pairs: two rows of a 32-column tile interleaved into
// dwords (w[k][n] low, w[k+1][n] high; vpermt2w), and vdpbf16ps adds x[k+1] w[k+1] then
// x[k] w[k] to each column's fp32 sum: the pinned order, one instruction per 16 columns
// and pair of rows.
GROKIT_AVX512 inline __m512 load_bf16x16(const uint16_t* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}

// Rows [k0, k1) of columns [c0, c1) (a multiple of 32), two row pairs at a time: the rows
// stream through sequentially, each 32-column tile of a pair is interleaved once and added
// to every row of x's fp32 sums in `acc` ([M][acc_ld], column c0 at 0) by vdpbf16ps.
GROKIT_AVX512 void pairs_rows_avx512(const uint32_t* xpairs, int64_t M, int64_t kp_stride, int64_t K, const uint16_t* w,
                                     int64_t N, int64_t k0, int64_t k1, int64_t c0, int64_t c1, float* acc,
                                     int64_t acc_ld) {
  // Word 2i of `lo` is column i of row k, word 2i + 1 column i of row k + 1 (operand
  // indices 32.. are the second row); `hi` the same for columns 16..31.
  alignas(64) uint16_t lo_w[32], hi_w[32];
  for (int i = 0; i < 16; ++i) {
    lo_w[2 * i] = static_cast<uint16_t>(i);
    lo_w[2 * i + 1] = static_cast<uint16_t>(32 + i);
    hi_w[2 * i] = static_cast<uint16_t>(16 + i);
    hi_w[2 * i + 1] = static_cast<uint16_t>(48 + i);
  }
  const __m512i lo_idx = _mm512_load_si512(lo_w), hi_idx = _mm512_load_si512(hi_w);
  // One pair of rows (k, k + 1; a missing k + 1 counts as zero) of tile c.
  auto pair_tile = [&](int64_t k, int64_t c, __m512bh& lo, __m512bh& hi) GROKIT_AVX512_LAMBDA {
    const uint16_t* r0 = w + k * N + c;
    const __m512i a = _mm512_loadu_si512(r0);
    const __m512i b = k + 1 < K ? _mm512_loadu_si512(r0 + N) : _mm512_setzero_si512();
    lo = reinterpret_cast<__m512bh>(_mm512_permutex2var_epi16(a, lo_idx, b));
    hi = reinterpret_cast<__m512bh>(_mm512_permutex2var_epi16(a, hi_idx, b));
  };
  const int64_t ahead = rows_ahead(2 * N, 4);  // prefetch (internal.h)
  for (int64_t k = k0; k < k1; k += 4) {
    const bool two = k + 2 < k1;  // a second pair in this step
    const int64_t fetch = rows_to_fetch(k, ahead, k1, 4);
    const uint16_t* next = fetch > 0 ? w + (k + ahead) * N : w;
    BlockPrefetch prefetch;  // as matmul_q8's walks
    prefetch.reset(next + c0, 2 * N, 2 * (c1 - c0), fetch);
    // x's pairs for one row of x, hoisted out of the column loop.
    const __m512bh xa1 = reinterpret_cast<__m512bh>(_mm512_set1_epi32(static_cast<int>(xpairs[k / 2])));
    const __m512bh xb1 = reinterpret_cast<__m512bh>(_mm512_set1_epi32(static_cast<int>(two ? xpairs[k / 2 + 1] : 0)));
    for (int64_t c = c0; c < c1; c += 32) {
      prefetch.next(fetch);
      __m512bh alo, ahi, blo, bhi;
      pair_tile(k, c, alo, ahi);
      if (two) pair_tile(k + 2, c, blo, bhi);
      for (int64_t m = 0; m < M; ++m) {
        const uint32_t* xp = xpairs + m * kp_stride + k / 2;
        const __m512bh xa = M == 1 ? xa1 : reinterpret_cast<__m512bh>(_mm512_set1_epi32(static_cast<int>(xp[0])));
        float* ap = acc + m * acc_ld + (c - c0);
        __m512 s0 = _mm512_dpbf16_ps(_mm512_loadu_ps(ap), alo, xa);
        __m512 s1 = _mm512_dpbf16_ps(_mm512_loadu_ps(ap + 16), ahi, xa);
        if (two) {
          const __m512bh xb = M == 1 ? xb1 : reinterpret_cast<__m512bh>(_mm512_set1_epi32(static_cast<int>(xp[1])));
          s0 = _mm512_dpbf16_ps(s0, blo, xb);
          s1 = _mm512_dpbf16_ps(s1, bhi, xb);
        }
        _mm512_storeu_ps(ap, s0);
        _mm512_storeu_ps(ap + 16, s1);
      }
    }
  }
}

// The panels' pairs of this layout (pair_panels.h): rows k and k + 1 of a tile interleaved
// into dwords, as pairs_rows_avx512 does it; a narrower last tile's loads masked.
struct Bf16Pairs {
  const uint16_t* w;
  int64_t N;
  template <class F>
  GROKIT_AVX512 __attribute__((always_inline)) void pair(int64_t k, int64_t c, F full, __mmask16 ml, __mmask16 mh,
                                                         bool second, __m512i& lo, __m512i& hi) const {
    (void)full;
    const __m512i lo_idx = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
    const __m512i hi_idx = _mm512_set_epi16(63, 31, 62, 30, 61, 29, 60, 28, 59, 27, 58, 26, 57, 25, 56, 24, 55, 23, 54, 22, 53, 21, 52, 20, 51, 19, 50, 18, 49, 17, 48, 16);
    const uint16_t* r0 = w + k * N + c;
    const __mmask32 m = static_cast<__mmask32>(ml) | (static_cast<__mmask32>(mh) << 16);
    __m512i a, b = _mm512_setzero_si512();
    if constexpr (F::value) {
      a = _mm512_loadu_si512(r0);
      if (second) b = _mm512_loadu_si512(r0 + N);
    } else {
      a = _mm512_maskz_loadu_epi16(m, r0);
      if (second) b = _mm512_maskz_loadu_epi16(m, r0 + N);
    }
    lo = _mm512_permutex2var_epi16(a, lo_idx, b);
    hi = _mm512_permutex2var_epi16(a, hi_idx, b);
  }
  void prefetch64(int64_t k, int64_t c) const {
    prefetch_line(reinterpret_cast<const char*>(w + k * N + c));
    prefetch_line(reinterpret_cast<const char*>(w + k * N + c + 32));
  }
};

// fp32 activations, two rows at a time: each 32-column tile of a row widened to fp32 once,
// then acc = fma(x[k], w[k], acc) in k order for every row of x.
GROKIT_AVX512 void fma_rows_avx512(const float* x, int64_t M, int64_t ldx, const uint16_t* w, int64_t N, int64_t k0,
                                   int64_t k1, int64_t c0, int64_t c1, float* acc, int64_t acc_ld) {
  const int64_t ahead = rows_ahead(2 * N, 2);  // prefetch (internal.h)
  for (int64_t k = k0; k < k1; k += 2) {
    const bool two = k + 1 < k1;
    const int64_t fetch = rows_to_fetch(k, ahead, k1, 2);
    const uint16_t* next = fetch > 0 ? w + (k + ahead) * N : w;
    BlockPrefetch prefetch;
    prefetch.reset(next + c0, 2 * N, 2 * (c1 - c0), fetch);
    // x for one row of x, hoisted out of the column loop (the stores to acc could alias it).
    const __m512 xa1 = _mm512_set1_ps(x[k]), xb1 = _mm512_set1_ps(two ? x[k + 1] : 0.0f);
    for (int64_t c = c0; c < c1; c += 32) {
      prefetch.next(fetch);
      const uint16_t* row = w + k * N + c;
      const __m512 a0 = load_bf16x16(row), a1 = load_bf16x16(row + 16);
      __m512 b0 = _mm512_setzero_ps(), b1 = _mm512_setzero_ps();
      if (two) {
        b0 = load_bf16x16(row + N);
        b1 = load_bf16x16(row + N + 16);
      }
      for (int64_t m = 0; m < M; ++m) {
        const float* xr = x + m * ldx;
        float* ap = acc + m * acc_ld + (c - c0);
        const __m512 xa = M == 1 ? xa1 : _mm512_set1_ps(xr[k]);
        __m512 s0 = _mm512_fmadd_ps(xa, a0, _mm512_loadu_ps(ap)), s1 = _mm512_fmadd_ps(xa, a1, _mm512_loadu_ps(ap + 16));
        if (two) {
          const __m512 xb = M == 1 ? xb1 : _mm512_set1_ps(xr[k + 1]);
          s0 = _mm512_fmadd_ps(xb, b0, s0);
          s1 = _mm512_fmadd_ps(xb, b1, s1);
        }
        _mm512_storeu_ps(ap, s0);
        _mm512_storeu_ps(ap + 16, s1);
      }
    }
  }
}

// ---------------------------------------------------------------------------------
enum class Level { kScalar, kAvx2, kAvx512 };

template <Level kLevel, bool kPairs>
Status impl(const float* x, int64_t M, int64_t K, int64_t ldx, const uint16_t* w, int64_t N, float* y, int64_t ldy,
            Pool pool, int64_t sum_rows) {
  check_args(M, K, ldx, N, ldy);
  GROKIT_CHECK(sum_rows >= 0);
  const int64_t sr = sum_rows > 0 ? sum_rows : K;  // rows per independent chain
  GROKIT_CHECK(K % sr == 0 && (sr == K || sr % 2 == 0));
  const int64_t chains = K / sr;
  if (M == 0) return {};
  // x's bf16 pairs (stage_x_pairs), owned by the calling thread and reused across calls;
  // the tasks reach them through this reference.
  const int64_t kp = (K + 1) / 2;
  static thread_local Staged<uint32_t> xpairs_storage;
  Staged<uint32_t>& xpairs = xpairs_storage;
  if (kLevel == Level::kAvx512 && kPairs) stage_x_pairs(x, M, K, ldx, xpairs);
  // Prefill (3+ rows of x) takes the panels (pair_panels.h), as the int8 products do, with
  // bf16 x's pairs by two fmas where they beat one vdpbf16ps: the same sums in the same order.
  const bool panels = kLevel == Level::kAvx512 && M >= kPanelMinRows;
  const bool fma_pairs = panels && kPairs && bf16_products_by_fma();
  const Bf16Pairs src{w, N};
  if constexpr (kLevel == Level::kAvx512) {
    // With chains: one 32-column tile per task, walking the chains and their tree itself.
    if (panels && chains > 1 && K <= kTileChainsMaxRows && !decode_plan_fits(M, N, chains)) {
      for_each(pool, static_cast<size_t>((N + 31) / 32), [&](size_t t) {
        thread_local std::vector<float> panel;
        const int64_t c = static_cast<int64_t>(t) * 32;
        if (fma_pairs) tile_chains_avx512<kPairs, kPairs>(xpairs.data(), kp, x, ldx, M, K, src, N, sr, c, y, ldy, panel);
        else tile_chains_avx512<kPairs, false>(xpairs.data(), kp, x, ldx, M, K, src, N, sr, c, y, ldy, panel);
      });
      return {};
    }
  }
  // One chain over rows [k0, k1) of columns [c0, c1) into out ([M][ld], c0 at out[0]):
  // whole 32-column tiles by SIMD (every column, the last tile masked, in the panels),
  // the rest by the scalar twin.
  auto chain_part = [&](int64_t k0, int64_t k1, int64_t c0, int64_t c1, float* out, int64_t ld) {
    if constexpr (kLevel == Level::kAvx512) {
      if (panels) {  // the panels start the sums from zero themselves
        if (fma_pairs) fma_panels_avx512<true>(x, M, ldx, src, k0, k1, c0, c1, out, ld);
        else if (kPairs) pairs_panels_avx512(xpairs.data(), M, kp, src, k0, k1, c0, c1, out, ld);
        else fma_panels_avx512<false>(x, M, ldx, src, k0, k1, c0, c1, out, ld);
        return;
      }
    }
    const int64_t vec_end = kLevel == Level::kScalar ? c0 : c0 + (c1 - c0) / 32 * 32;
    if (vec_end > c0) {
      if constexpr (kLevel == Level::kAvx512) {
        for (int64_t m = 0; m < M; ++m) std::fill(out + m * ld, out + m * ld + (vec_end - c0), 0.0f);
        if (kPairs) pairs_rows_avx512(xpairs.data(), M, kp, K, w, N, k0, k1, c0, vec_end, out, ld);
        else fma_rows_avx512(x, M, ldx, w, N, k0, k1, c0, vec_end, out, ld);
      } else if constexpr (kLevel == Level::kAvx2) {
        for (int64_t b0 = k0; b0 < k1; b0 += kRowBlock) {
          const int64_t b1 = std::min(k1, b0 + kRowBlock);
          for (int64_t c = c0; c < vec_end; c += 32)
            block_avx2<kPairs>(x, M, ldx, K, w, N, b0, b1, c, out + (c - c0), ld, b0 == k0);
        }
      }
    }
    if (vec_end < c1) chain_columns_ref<kPairs>(x, M, ldx, w, N, k0, k1, vec_end, c1, out + (vec_end - c0), ld);
  };
  run_chains(pool, M, N, chains, 32, N, y, ldy, [&](int64_t ch, int64_t c0, int64_t c1, float* out, int64_t ld) {
    chain_part(ch * sr, (ch + 1) * sr, c0, c1, out, ld);
  });
  return {};
}

template <bool kPairs>
Status dispatch(const float* x, int64_t M, int64_t K, int64_t ldx, const uint16_t* w, int64_t N, float* y, int64_t ldy,
                Pool pool, int64_t sr) {
  if (use_avx512()) return impl<Level::kAvx512, kPairs>(x, M, K, ldx, w, N, y, ldy, pool, sr);
  if (use_avx2()) return impl<Level::kAvx2, kPairs>(x, M, K, ldx, w, N, y, ldy, pool, sr);
  return impl<Level::kScalar, kPairs>(x, M, K, ldx, w, N, y, ldy, pool, sr);
}

}  // namespace

Status matmul_bf16(const float* x, int64_t M, int64_t K, int64_t ldx, const uint16_t* w, int64_t N, float* y,
                   int64_t ldy, Pool pool, int64_t sum_rows) {
  return dispatch<true>(x, M, K, ldx, w, N, y, ldy, pool, sum_rows);
}
Status matmul_bf16_ref(const float* x, int64_t M, int64_t K, int64_t ldx, const uint16_t* w, int64_t N, float* y,
                       int64_t ldy, Pool pool, int64_t sum_rows) {
  return impl<Level::kScalar, true>(x, M, K, ldx, w, N, y, ldy, pool, sum_rows);
}
Status matmul_bf16_f32(const float* x, int64_t M, int64_t K, int64_t ldx, const uint16_t* w, int64_t N, float* y,
                       int64_t ldy, Pool pool, int64_t sum_rows) {
  return dispatch<false>(x, M, K, ldx, w, N, y, ldy, pool, sum_rows);
}
Status matmul_bf16_f32_ref(const float* x, int64_t M, int64_t K, int64_t ldx, const uint16_t* w, int64_t N, float* y,
                           int64_t ldy, Pool pool, int64_t sum_rows) {
  return impl<Level::kScalar, false>(x, M, K, ldx, w, N, y, ldy, pool, sum_rows);
}

}  // namespace grokit::kernels
