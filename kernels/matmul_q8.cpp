// y = x @ dequant(W) for int8 codes with row-block bf16 scales, fp32 accumulation in the
// pinned pair order of kernels.h (bf16 activations) or in k order with fma (fp32 ones).
#include <vector>

#include "kernels/internal.h"

// GCC 12's avx512fintrin.h trips -Wmaybe-uninitialized on its own _mm512_undefined values.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace grokit::kernels {
namespace {
using namespace detail;

constexpr int64_t kRowBlock = 64;  // rows of codes per pass over a task's columns (even)
constexpr int64_t kPrefetchRows = 8;  // how far ahead the row-by-row walks fetch
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

template <bool kPairs>
GROKIT_AVX2 void block_avx2(const float* x, int64_t M, int64_t ldx, int64_t K, const int8_t* codes,
                            const uint16_t* scales, int64_t N, int64_t rpb, int64_t k0, int64_t k1, int64_t c,
                            float* acc, int64_t acc_ld) {
  alignas(32) float panel[kRowBlock + 1][32];
  const int64_t rows = k1 - k0;
  for (int64_t r = 0; r < rows; ++r) {
    int64_t k = k0 + r;
    const uint16_t* sp = scales + (k / rpb) * N + c;
    const int8_t* row = codes + k * N + c;
    for (int j = 0; j < 4; ++j) _mm256_store_ps(panel[r] + 8 * j, dequant8_avx2(row + 8 * j, load_bf16x8(sp + 8 * j)));
  }
  for (int64_t m = 0; m < M; ++m) {
    const float* xr = x + m * ldx;
    float* ap = acc + m * acc_ld;
    __m256 a[4];
    for (int j = 0; j < 4; ++j) a[j] = _mm256_loadu_ps(ap + 8 * j);
    if (kPairs) {
      for (int64_t k = k0; k < k1; k += 2) {
        int64_t r = k - k0;
        if (k + 1 < K) {
          __m256 x1 = _mm256_broadcast_ss(xr + k + 1);
          for (int j = 0; j < 4; ++j) a[j] = _mm256_fmadd_ps(x1, _mm256_load_ps(panel[r + 1] + 8 * j), a[j]);
        }
        __m256 x0 = _mm256_broadcast_ss(xr + k);
        for (int j = 0; j < 4; ++j) a[j] = _mm256_fmadd_ps(x0, _mm256_load_ps(panel[r] + 8 * j), a[j]);
      }
    } else {
      for (int64_t k = k0; k < k1; ++k) {
        __m256 xk = _mm256_broadcast_ss(xr + k);
        for (int j = 0; j < 4; ++j) a[j] = _mm256_fmadd_ps(xk, _mm256_load_ps(panel[k - k0] + 8 * j), a[j]);
      }
    }
    for (int j = 0; j < 4; ++j) _mm256_storeu_ps(ap + 8 * j, a[j]);
  }
}

// ---------------------------------------------------------------------------------
// AVX-512 with bf16 instructions. Pairs: a pair of code rows becomes, per column, one
// dword of two bf16 (row k low, row k + 1 high; vcvtne2ps2bf16 does the dequantization's
// bf16 rounding), and vdpbf16ps adds x[k+1] w[k+1] then x[k] w[k] to each column's fp32
// sum: the pinned order, in one instruction per 16 columns and pair of rows.
GROKIT_AVX512 inline __m512 dequant16_f32(const int8_t* p, __m512 s) {
  return _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))), s);
}
GROKIT_AVX512 inline __m512 load_bf16x16(const uint16_t* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}

// The scales of the blocks that rows [k0, k1) use, columns [c0, c1), as fp32 (converted
// once per block instead of once per row): row k's are at scales_f32(k0, ...) +
// (k / rpb - k0 / rpb) * (c1 - c0).
GROKIT_AVX512 const float* scales_f32(const uint16_t* scales, int64_t N, int64_t rpb, int64_t k0, int64_t k1,
                                      int64_t c0, int64_t c1) {
  thread_local std::vector<float> out;
  const int64_t b0 = k0 / rpb, b1 = (k1 - 1) / rpb + 1, width = c1 - c0;
  out.resize(static_cast<size_t>((b1 - b0) * width));
  for (int64_t b = b0; b < b1; ++b) {
    for (int64_t c = c0; c < c1; c += 16)
      _mm512_storeu_ps(out.data() + (b - b0) * width + (c - c0), load_bf16x16(scales + b * N + c));
  }
  return out.data();
}

// Fetches rows [k, k + n) of columns [c0, c1): the walks read short runs of many rows, so
// every run would start with a full memory latency without it.
inline void prefetch_rows(const int8_t* codes, int64_t N, int64_t k, int64_t n, int64_t c0, int64_t c1) {
  for (int64_t r = k; r < k + n; ++r) {
    for (int64_t c = c0; c < c1; c += 64) _mm_prefetch(reinterpret_cast<const char*>(codes + r * N + c), _MM_HINT_T1);
  }
}

// Rows [k0, k1) of columns [c0, c1) (a multiple of 32), two row pairs at a time: the rows
// stream through sequentially, each 32-column tile of a pair is dequantized once (the
// bf16 rounding done by vcvtne2ps2bf16, the pairs interleaved into dwords) and added to
// every row of x's fp32 sums in `acc` ([M][acc_ld], column c0 at 0) by vdpbf16ps.
GROKIT_AVX512 void pairs_rows_avx512(const uint32_t* xpairs, int64_t M, int64_t kp_stride, int64_t K,
                                     const int8_t* codes, const uint16_t* scales, int64_t N, int64_t rpb, int64_t k0,
                                     int64_t k1, int64_t c0, int64_t c1, float* acc, int64_t acc_ld) {
  const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6,
                                              21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  const float* sf = scales_f32(scales, N, rpb, k0, k1, c0, c1);
  const int64_t width = c1 - c0, b0 = k0 / rpb;
  // One pair of rows (k, k + 1; a missing k + 1 counts as zero) of tile c: two vectors of
  // 16 dwords, each (w[k][n] low, w[k+1][n] high).
  auto pair_tile = [&](int64_t k, int64_t c, __m512bh& lo, __m512bh& hi) GROKIT_AVX512_LAMBDA {
    const int8_t* r0 = codes + k * N + c;
    const float* s0 = sf + (k / rpb - b0) * width + (c - c0);
    __m512 lo0 = dequant16_f32(r0, _mm512_loadu_ps(s0)), hi0 = dequant16_f32(r0 + 16, _mm512_loadu_ps(s0 + 16));
    __m512 lo1 = _mm512_setzero_ps(), hi1 = _mm512_setzero_ps();
    if (k + 1 < K) {
      const float* s1 = sf + ((k + 1) / rpb - b0) * width + (c - c0);
      lo1 = dequant16_f32(r0 + N, _mm512_loadu_ps(s1));
      hi1 = dequant16_f32(r0 + N + 16, _mm512_loadu_ps(s1 + 16));
    }
    lo = reinterpret_cast<__m512bh>(_mm512_permutexvar_epi16(interleave, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(lo1, lo0))));
    hi = reinterpret_cast<__m512bh>(_mm512_permutexvar_epi16(interleave, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(hi1, hi0))));
  };
  for (int64_t k = k0; k < k1; k += 4) {
    const bool two = k + 2 < k1;  // a second pair in this step
    if (k + kPrefetchRows < k1) prefetch_rows(codes, N, k + kPrefetchRows, std::min<int64_t>(4, k1 - k - kPrefetchRows), c0, c1);
    for (int64_t c = c0; c < c1; c += 32) {
      __m512bh alo, ahi, blo, bhi;
      pair_tile(k, c, alo, ahi);
      if (two) pair_tile(k + 2, c, blo, bhi);
      for (int64_t m = 0; m < M; ++m) {
        const uint32_t* xp = xpairs + m * kp_stride + k / 2;
        __m512bh xa = reinterpret_cast<__m512bh>(_mm512_set1_epi32(static_cast<int>(xp[0])));
        float* ap = acc + m * acc_ld + (c - c0);
        __m512 s0 = _mm512_dpbf16_ps(_mm512_loadu_ps(ap), alo, xa);
        __m512 s1 = _mm512_dpbf16_ps(_mm512_loadu_ps(ap + 16), ahi, xa);
        if (two) {
          __m512bh xb = reinterpret_cast<__m512bh>(_mm512_set1_epi32(static_cast<int>(xp[1])));
          s0 = _mm512_dpbf16_ps(s0, blo, xb);
          s1 = _mm512_dpbf16_ps(s1, bhi, xb);
        }
        _mm512_storeu_ps(ap, s0);
        _mm512_storeu_ps(ap + 16, s1);
      }
    }
  }
}

// fp32 activations, two rows at a time: each 32-column tile of a row dequantized to fp32
// (bf16-rounded) once, then acc = fma(x[k], w[k], acc) in k order for every row of x.
GROKIT_AVX512 void fma_rows_avx512(const float* x, int64_t M, int64_t ldx, const int8_t* codes, const uint16_t* scales,
                                   int64_t N, int64_t rpb, int64_t k0, int64_t k1, int64_t c0, int64_t c1, float* acc,
                                   int64_t acc_ld) {
  const float* sf = scales_f32(scales, N, rpb, k0, k1, c0, c1);
  const int64_t width = c1 - c0, b0 = k0 / rpb;
  auto row_tile = [&](int64_t k, int64_t c, __m512& w0, __m512& w1) GROKIT_AVX512_LAMBDA {
    const int8_t* row = codes + k * N + c;
    const float* sp = sf + (k / rpb - b0) * width + (c - c0);
    __m512 f0 = dequant16_f32(row, _mm512_loadu_ps(sp)), f1 = dequant16_f32(row + 16, _mm512_loadu_ps(sp + 16));
    w0 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(f0))), 16));
    w1 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(f1))), 16));
  };
  for (int64_t k = k0; k < k1; k += 2) {
    const bool two = k + 1 < k1;
    if (k + kPrefetchRows < k1) prefetch_rows(codes, N, k + kPrefetchRows, std::min<int64_t>(2, k1 - k - kPrefetchRows), c0, c1);
    for (int64_t c = c0; c < c1; c += 32) {
      __m512 a0, a1, b0v, b1v;
      row_tile(k, c, a0, a1);
      if (two) row_tile(k + 1, c, b0v, b1v);
      for (int64_t m = 0; m < M; ++m) {
        const float* xr = x + m * ldx;
        float* ap = acc + m * acc_ld + (c - c0);
        __m512 xa = _mm512_set1_ps(xr[k]);
        __m512 s0 = _mm512_fmadd_ps(xa, a0, _mm512_loadu_ps(ap)), s1 = _mm512_fmadd_ps(xa, a1, _mm512_loadu_ps(ap + 16));
        if (two) {
          __m512 xb = _mm512_set1_ps(xr[k + 1]);
          s0 = _mm512_fmadd_ps(xb, b0v, s0);
          s1 = _mm512_fmadd_ps(xb, b1v, s1);
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
Status impl(const float* x, int64_t M, int64_t K, int64_t ldx, const int8_t* codes, const uint16_t* scales, int64_t N,
            int64_t blocks, float* y, int64_t ldy, Pool pool, int64_t sum_rows) {
  check_args(M, K, ldx, N, blocks, ldy);
  const int64_t sr = sum_rows > 0 ? sum_rows : K;  // rows per independent chain
  GROKIT_CHECK(K % sr == 0 && (sr == K || sr % 2 == 0));
  const int64_t chains = K / sr;
  if (M == 0) return {};
  const int64_t rpb = K / blocks;
  // bf16 pairs of x for vdpbf16ps: x[k] in the low half, x[k + 1] in the high half.
  const int64_t kp = (K + 1) / 2;
  // Owned by the calling thread and reused across calls; the tasks reach it through this
  // reference (a thread_local named inside the lambdas would be each worker's own).
  static thread_local std::vector<uint32_t> xpairs_storage;
  std::vector<uint32_t>& xpairs = xpairs_storage;
  if (kLevel == Level::kAvx512 && kPairs) {
    xpairs.resize(static_cast<size_t>(M * kp));
    for (int64_t m = 0; m < M; ++m) {
      for (int64_t p = 0; p < kp; ++p) {
        uint32_t lo = f32_to_bf16_bits(x[m * ldx + 2 * p]);
        uint32_t hi = 2 * p + 1 < K ? f32_to_bf16_bits(x[m * ldx + 2 * p + 1]) : 0;
        xpairs[static_cast<size_t>(m * kp + p)] = lo | hi << 16;
      }
    }
  }
  // One chain over rows [k0, k1) of columns [c0, c1) into out ([M][ld], c0 at out[0]):
  // whole 32-column tiles by SIMD, the rest by the scalar twin.
  auto chain_part = [&](int64_t k0, int64_t k1, int64_t c0, int64_t c1, float* out, int64_t ld) {
    const int64_t vec_end = kLevel == Level::kScalar ? c0 : c0 + (c1 - c0) / 32 * 32;
    if (vec_end > c0) {
      for (int64_t m = 0; m < M; ++m) std::fill(out + m * ld, out + m * ld + (vec_end - c0), 0.0f);
      if constexpr (kLevel == Level::kAvx512) {
        // Row by row over the columns: sequential reads, the sums in L1.
        if (kPairs) pairs_rows_avx512(xpairs.data(), M, kp, K, codes, scales, N, rpb, k0, k1, c0, vec_end, out, ld);
        else fma_rows_avx512(x, M, ldx, codes, scales, N, rpb, k0, k1, c0, vec_end, out, ld);
      } else if constexpr (kLevel == Level::kAvx2) {
        for (int64_t b0 = k0; b0 < k1; b0 += kRowBlock) {
          const int64_t b1 = std::min(k1, b0 + kRowBlock);
          for (int64_t c = c0; c < vec_end; c += 32)
            block_avx2<kPairs>(x, M, ldx, K, codes, scales, N, rpb, b0, b1, c, out + (c - c0), ld);
        }
      }
    }
    if (vec_end < c1) chain_columns_ref<kPairs>(x, M, ldx, codes, scales, N, rpb, k0, k1, vec_end, c1, out + (vec_end - c0), ld);
  };
  run_chains(pool, M, N, chains, 32, kMaxWidth, y, ldy, [&](int64_t ch, int64_t c0, int64_t c1, float* out, int64_t ld) {
    chain_part(ch * sr, (ch + 1) * sr, c0, c1, out, ld);
  });
  return {};
}

template <bool kPairs>
Status dispatch(const float* x, int64_t M, int64_t K, int64_t ldx, const int8_t* codes, const uint16_t* scales,
                int64_t N, int64_t blocks, float* y, int64_t ldy, Pool pool, int64_t sr) {
  if (use_avx512()) return impl<Level::kAvx512, kPairs>(x, M, K, ldx, codes, scales, N, blocks, y, ldy, pool, sr);
  if (use_avx2()) return impl<Level::kAvx2, kPairs>(x, M, K, ldx, codes, scales, N, blocks, y, ldy, pool, sr);
  return impl<Level::kScalar, kPairs>(x, M, K, ldx, codes, scales, N, blocks, y, ldy, pool, sr);
}

}  // namespace

namespace detail {
void combine_chains(float* parts, int64_t chains, int64_t stride, int64_t ld, int64_t M, int64_t width, float* y,
                    int64_t ldy) {
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
  return dispatch<true>(x, M, K, ldx, codes, scales, N, blocks, y, ldy, pool, sum_rows);
}
Status matmul_q8_ref(const float* x, int64_t M, int64_t K, int64_t ldx, const int8_t* codes, const uint16_t* scales,
                     int64_t N, int64_t blocks, float* y, int64_t ldy, Pool pool, int64_t sum_rows) {
  return impl<Level::kScalar, true>(x, M, K, ldx, codes, scales, N, blocks, y, ldy, pool, sum_rows);
}
Status matmul_q8_f32(const float* x, int64_t M, int64_t K, int64_t ldx, const int8_t* codes, const uint16_t* scales,
                     int64_t N, int64_t blocks, float* y, int64_t ldy, Pool pool, int64_t sum_rows) {
  return dispatch<false>(x, M, K, ldx, codes, scales, N, blocks, y, ldy, pool, sum_rows);
}
Status matmul_q8_f32_ref(const float* x, int64_t M, int64_t K, int64_t ldx, const int8_t* codes,
                         const uint16_t* scales, int64_t N, int64_t blocks, float* y, int64_t ldy, Pool pool,
                         int64_t sum_rows) {
  return impl<Level::kScalar, false>(x, M, K, ldx, codes, scales, N, blocks, y, ldy, pool, sum_rows);
}

}  // namespace grokit::kernels
