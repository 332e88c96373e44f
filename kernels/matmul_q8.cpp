// y = x @ dequant(W) for int8 codes with row-block bf16 scales.
#include <vector>

#include "kernels/internal.h"

namespace grokit::kernels {
namespace {
using namespace detail;

void check_args(int64_t M, int64_t K, int64_t ldx, int64_t N, int64_t blocks, int64_t ldy) {
  GROKIT_CHECK(M >= 0 && K > 0 && N > 0 && blocks > 0 && K % blocks == 0 && ldx >= K && ldy >= N);
}

// Columns [n0, n1) of every row, scalar. Accumulates in double (the products of fp32 and
// bf16 values are exact there) and rounds once to fp32: the ideal fp32 accumulator.
void q8_columns_ref(const float* x, int64_t M, int64_t K, int64_t ldx, const int8_t* codes, const uint16_t* scales,
                    int64_t N, int64_t rows_per_block, float* y, int64_t ldy, int64_t n0, int64_t n1) {
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t n = n0; n < n1; ++n) {
      double acc = 0.0;
      for (int64_t k = 0; k < K; ++k) {
        float s = bf16f(scales[(k / rows_per_block) * N + n]);
        float w = round_bf16(static_cast<float>(codes[k * N + n]) * s);
        acc += static_cast<double>(x[m * ldx + k]) * static_cast<double>(w);
      }
      y[m * ldy + n] = static_cast<float>(acc);
    }
  }
}

// Columns [n0, n1) (n1 - n0 a multiple of 16) of one row. Walks the rows of the codes in
// blocks; a 16-column tile's double accumulators live in registers for a block and in
// `acc` between blocks, so the codes stream through once, row after row.
GROKIT_AVX2 void q8_row_avx2(const float* x, int64_t K, const int8_t* codes, const uint16_t* scales, int64_t N,
                             int64_t rows_per_block, double* acc, float* y, int64_t n0, int64_t n1) {
  constexpr int64_t kRowBlock = 64;
  for (int64_t k0 = 0, k1 = 0; k0 < K; k0 = k1) {
    int64_t blk = k0 / rows_per_block;
    k1 = std::min(std::min(K, k0 + kRowBlock), (blk + 1) * rows_per_block);
    for (int64_t c = n0; c < n1; c += 16) {
      double* ap = acc + (c - n0);
      __m256d a0, a1, a2, a3;
      if (k0 == 0) {
        a0 = a1 = a2 = a3 = _mm256_setzero_pd();
      } else {
        a0 = _mm256_loadu_pd(ap);
        a1 = _mm256_loadu_pd(ap + 4);
        a2 = _mm256_loadu_pd(ap + 8);
        a3 = _mm256_loadu_pd(ap + 12);
      }
      const uint16_t* sp = scales + blk * N + c;
      __m256 s0 = load_bf16x8(sp), s1 = load_bf16x8(sp + 8);
      const int8_t* row = codes + k0 * N + c;
      for (int64_t k = k0; k < k1; ++k, row += N) {
        __m256d xb = _mm256_set1_pd(static_cast<double>(x[k]));
        __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row));
        __m256 w0 = round_bf16x8(_mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(raw)), s0));
        __m256 w1 = round_bf16x8(_mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(raw, 8))), s1));
        a0 = _mm256_fmadd_pd(xb, _mm256_cvtps_pd(_mm256_castps256_ps128(w0)), a0);
        a1 = _mm256_fmadd_pd(xb, _mm256_cvtps_pd(_mm256_extractf128_ps(w0, 1)), a1);
        a2 = _mm256_fmadd_pd(xb, _mm256_cvtps_pd(_mm256_castps256_ps128(w1)), a2);
        a3 = _mm256_fmadd_pd(xb, _mm256_cvtps_pd(_mm256_extractf128_ps(w1, 1)), a3);
      }
      _mm256_storeu_pd(ap, a0);
      _mm256_storeu_pd(ap + 4, a1);
      _mm256_storeu_pd(ap + 8, a2);
      _mm256_storeu_pd(ap + 12, a3);
    }
  }
  for (int64_t c = n0; c < n1; ++c) y[c] = static_cast<float>(acc[c - n0]);
}

template <bool kSimd>
Status matmul_q8_impl(const float* x, int64_t M, int64_t K, int64_t ldx, const int8_t* codes, const uint16_t* scales,
                      int64_t N, int64_t blocks, float* y, int64_t ldy, Pool pool) {
  check_args(M, K, ldx, N, blocks, ldy);
  if (M == 0) return {};
  const int64_t rpb = K / blocks;
  const int64_t chunk = chunk_size(N, task_count(pool), 16);
  const int64_t tasks = (N + chunk - 1) / chunk;
  for_each(pool, static_cast<size_t>(tasks), [&](size_t t) {
    int64_t n0 = static_cast<int64_t>(t) * chunk, n1 = std::min(N, n0 + chunk);
    int64_t vec_end = kSimd ? n0 + (n1 - n0) / 16 * 16 : n0;
    thread_local std::vector<double> acc;
    acc.resize(static_cast<size_t>(vec_end - n0));
    for (int64_t m = 0; m < M && vec_end > n0; ++m)
      q8_row_avx2(x + m * ldx, K, codes, scales, N, rpb, acc.data(), y + m * ldy, n0, vec_end);
    if (vec_end < n1) q8_columns_ref(x, M, K, ldx, codes, scales, N, rpb, y, ldy, vec_end, n1);
  });
  return {};
}

}  // namespace

Status matmul_q8(const float* x, int64_t M, int64_t K, int64_t ldx, const int8_t* codes, const uint16_t* scales,
                 int64_t N, int64_t blocks, float* y, int64_t ldy, Pool pool) {
  if (detail::use_avx2()) return matmul_q8_impl<true>(x, M, K, ldx, codes, scales, N, blocks, y, ldy, pool);
  return matmul_q8_impl<false>(x, M, K, ldx, codes, scales, N, blocks, y, ldy, pool);
}

Status matmul_q8_ref(const float* x, int64_t M, int64_t K, int64_t ldx, const int8_t* codes, const uint16_t* scales,
                     int64_t N, int64_t blocks, float* y, int64_t ldy, Pool pool) {
  return matmul_q8_impl<false>(x, M, K, ldx, codes, scales, N, blocks, y, ldy, pool);
}

}  // namespace grokit::kernels
