// y = x @ dequant(W) for int8 codes with row-block bf16 scales, fp32 accumulation in the
// pinned pair order of kernels.h (bf16 activations) or in k order with fma (fp32 ones).
#include <vector>

#include "kernels/internal.h"

// GCC 12's avx512fintrin.h trips -Wmaybe-uninitialized on its own _mm512_undefined values.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace grokit::kernels {
namespace {
using namespace detail;

constexpr int64_t kRowBlock = 64;  // rows of codes per pass over a task's columns (even)

void check_args(int64_t M, int64_t K, int64_t ldx, int64_t N, int64_t blocks, int64_t ldy) {
  GROKIT_CHECK(M >= 0 && K > 0 && N > 0 && blocks > 0 && K % blocks == 0 && ldx >= K && ldy >= N);
}

inline float weight(const int8_t* codes, const uint16_t* scales, int64_t N, int64_t rpb, int64_t k, int64_t n) {
  return round_bf16(static_cast<float>(codes[k * N + n]) * bf16f(scales[(k / rpb) * N + n]));
}

// ---------------------------------------------------------------------------------
// Scalar twins: columns [n0, n1) of every row.
template <bool kPairs>
void columns_ref(const float* x, int64_t M, int64_t K, int64_t ldx, const int8_t* codes, const uint16_t* scales,
                 int64_t N, int64_t rpb, int64_t sr, float* y, int64_t ldy, int64_t n0, int64_t n1) {
  std::vector<float> sums(static_cast<size_t>(K / sr));
  for (int64_t m = 0; m < M; ++m) {
    const float* xr = x + m * ldx;
    for (int64_t n = n0; n < n1; ++n) {
      for (int64_t s = 0; s < K / sr; ++s) {
        const int64_t a = s * sr, b = a + sr;
        float acc = 0.0f;
        if (kPairs) {
          for (int64_t k = a; k < b; k += 2) {
            if (k + 1 < b) acc = acc + xr[k + 1] * weight(codes, scales, N, rpb, k + 1, n);
            acc = acc + xr[k] * weight(codes, scales, N, rpb, k, n);
          }
        } else {
          for (int64_t k = a; k < b; ++k) acc = std::fma(xr[k], weight(codes, scales, N, rpb, k, n), acc);
        }
        sums[static_cast<size_t>(s)] = acc;
      }
      y[m * ldy + n] = tree_sum(sums.data(), K / sr);
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

GROKIT_AVX512 void pairs_block_avx512(const uint32_t* xpairs, int64_t M, int64_t kp_stride, int64_t K,
                                      const int8_t* codes, const uint16_t* scales, int64_t N, int64_t rpb, int64_t k0,
                                      int64_t k1, int64_t c, float* acc, int64_t acc_ld) {
  const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6,
                                              21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  __m512i wp[kRowBlock / 2][2];
  const int64_t pairs = (k1 - k0 + 1) / 2;
  // The scales change only at block boundaries: convert them once per block.
  int64_t blk = -1;
  __m512 s_lo = _mm512_setzero_ps(), s_hi = _mm512_setzero_ps();
  auto scales_of = [&](int64_t k) GROKIT_AVX512_LAMBDA {
    if (k / rpb != blk) {
      blk = k / rpb;
      s_lo = load_bf16x16(scales + blk * N + c);
      s_hi = load_bf16x16(scales + blk * N + c + 16);
    }
  };
  for (int64_t p = 0; p < pairs; ++p) {
    int64_t k = k0 + 2 * p;
    const int8_t* r0 = codes + k * N + c;
    scales_of(k);
    __m512 lo0 = dequant16_f32(r0, s_lo), hi0 = dequant16_f32(r0 + 16, s_hi);
    __m512 lo1 = _mm512_setzero_ps(), hi1 = _mm512_setzero_ps();
    if (k + 1 < K) {
      const int8_t* r1 = r0 + N;
      scales_of(k + 1);
      lo1 = dequant16_f32(r1, s_lo);
      hi1 = dequant16_f32(r1 + 16, s_hi);
    }
    wp[p][0] = _mm512_permutexvar_epi16(interleave, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(lo1, lo0)));
    wp[p][1] = _mm512_permutexvar_epi16(interleave, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(hi1, hi0)));
  }
  for (int64_t m = 0; m < M; ++m) {
    float* ap = acc + m * acc_ld;
    __m512 a0 = _mm512_loadu_ps(ap), a1 = _mm512_loadu_ps(ap + 16);
    const uint32_t* xp = xpairs + m * kp_stride + k0 / 2;
    for (int64_t p = 0; p < pairs; ++p) {
      __m512bh xb = reinterpret_cast<__m512bh>(_mm512_set1_epi32(static_cast<int>(xp[p])));
      a0 = _mm512_dpbf16_ps(a0, reinterpret_cast<__m512bh>(wp[p][0]), xb);
      a1 = _mm512_dpbf16_ps(a1, reinterpret_cast<__m512bh>(wp[p][1]), xb);
    }
    _mm512_storeu_ps(ap, a0);
    _mm512_storeu_ps(ap + 16, a1);
  }
}

// fp32 activations: each code row dequantized to fp32 (bf16-rounded) once per block and
// tile, then acc = fma(x[k], w[k], acc) in k order for every row of x.
GROKIT_AVX512 void fma_block_avx512(const float* x, int64_t M, int64_t ldx, const int8_t* codes,
                                    const uint16_t* scales, int64_t N, int64_t rpb, int64_t k0, int64_t k1, int64_t c,
                                    float* acc, int64_t acc_ld) {
  __m512 panel[kRowBlock][2];
  int64_t blk = -1;
  __m512 s[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
  for (int64_t k = k0; k < k1; ++k) {
    if (k / rpb != blk) {  // the scales change only at block boundaries
      blk = k / rpb;
      s[0] = load_bf16x16(scales + blk * N + c);
      s[1] = load_bf16x16(scales + blk * N + c + 16);
    }
    const int8_t* row = codes + k * N + c;
    for (int j = 0; j < 2; ++j) {
      __m512 f = dequant16_f32(row + 16 * j, s[j]);
      __m256i b = reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(f));
      panel[k - k0][j] = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16));
    }
  }
  for (int64_t m = 0; m < M; ++m) {
    const float* xr = x + m * ldx;
    float* ap = acc + m * acc_ld;
    __m512 a0 = _mm512_loadu_ps(ap), a1 = _mm512_loadu_ps(ap + 16);
    for (int64_t k = k0; k < k1; ++k) {
      __m512 xk = _mm512_set1_ps(xr[k]);
      a0 = _mm512_fmadd_ps(xk, panel[k - k0][0], a0);
      a1 = _mm512_fmadd_ps(xk, panel[k - k0][1], a1);
    }
    _mm512_storeu_ps(ap, a0);
    _mm512_storeu_ps(ap + 16, a1);
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
  std::vector<uint32_t> xpairs;
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
  const int64_t chunk = chunk_size(N, task_count(pool), 32);
  const int64_t tasks = (N + chunk - 1) / chunk;
  for_each(pool, static_cast<size_t>(tasks), [&](size_t t) {
    const int64_t n0 = static_cast<int64_t>(t) * chunk, n1 = std::min(N, n0 + chunk);
    const int64_t vec_end = kLevel == Level::kScalar ? n0 : n0 + (n1 - n0) / 32 * 32;
    if (vec_end > n0) {
      // Chains outer, then row blocks, then 32-column tiles: the codes stream through row
      // by row; each tile's fp32 sums wait in `acc` (one slice per chain) between blocks.
      const int64_t width = vec_end - n0, slice = M * width;
      thread_local std::vector<float> acc;
      acc.assign(static_cast<size_t>(chains * slice), 0.0f);
      for (int64_t ch = 0; ch < chains; ++ch) {
        for (int64_t k0 = ch * sr; k0 < (ch + 1) * sr; k0 += kRowBlock) {
          const int64_t k1 = std::min((ch + 1) * sr, k0 + kRowBlock);
          for (int64_t c = n0; c < vec_end; c += 32) {
            float* ap = acc.data() + ch * slice + (c - n0);
            if constexpr (kLevel == Level::kAvx512) {
              if (kPairs) pairs_block_avx512(xpairs.data(), M, kp, K, codes, scales, N, rpb, k0, k1, c, ap, width);
              else fma_block_avx512(x, M, ldx, codes, scales, N, rpb, k0, k1, c, ap, width);
            } else if constexpr (kLevel == Level::kAvx2) {
              block_avx2<kPairs>(x, M, ldx, K, codes, scales, N, rpb, k0, k1, c, ap, width);
            }
          }
        }
      }
      std::vector<float> v(static_cast<size_t>(chains));
      for (int64_t m = 0; m < M; ++m) {
        for (int64_t j = 0; j < width; ++j) {
          if (chains == 1) {
            y[m * ldy + n0 + j] = acc[static_cast<size_t>(m * width + j)];
            continue;
          }
          for (int64_t ch = 0; ch < chains; ++ch) v[static_cast<size_t>(ch)] = acc[static_cast<size_t>(ch * slice + m * width + j)];
          y[m * ldy + n0 + j] = tree_sum(v.data(), chains);
        }
      }
    }
    if (vec_end < n1) columns_ref<kPairs>(x, M, K, ldx, codes, scales, N, rpb, sr, y, ldy, vec_end, n1);
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
