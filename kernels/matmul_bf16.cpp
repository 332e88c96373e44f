// y = x @ W^T for a bf16 W [N, K] (the embedding as the output projection), sixteen fp32
// lanes in the pinned pair order of kernels.h, then summed by halving.
#include <vector>

#include "kernels/internal.h"

// GCC 12's avx512fintrin.h trips -Wmaybe-uninitialized on its own _mm512_undefined values.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace grokit::kernels {
namespace {
using namespace detail;

// Adds the pairs of blocks [j0, ...) (from k = 32 * j0 on) to the 16 lanes.
void lanes_ref(const float* x, const uint16_t* w, int64_t K, int64_t from, float* l) {
  for (int64_t k = from; k < K; k += 2) {
    int lane = static_cast<int>((k % 32) / 2);
    if (k + 1 < K) l[lane] = l[lane] + x[k + 1] * bf16f(w[k + 1]);
    l[lane] = l[lane] + x[k] * bf16f(w[k]);
  }
}

void rows_ref(const float* x, int64_t M, int64_t K, const uint16_t* w, float* y, int64_t ldy, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t m = 0; m < M; ++m) {
      float l[16] = {};
      lanes_ref(x + m * K, w + n * K, K, 0, l);
      y[m * ldy + n] = halve16_lanes(l);
    }
  }
}

// AVX2: lanes 0-7 and 8-15 in two vectors; the odd element of each bf16 pair is the high
// half of its dword, the even one the low half.
GROKIT_AVX2 inline __m256 odd_of(__m256i v) { return _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(static_cast<int>(0xffff0000u)))); }
GROKIT_AVX2 inline __m256 even_of(__m256i v) { return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16)); }

GROKIT_AVX2 void rows_avx2(const uint16_t* xb, int64_t M, int64_t K, const float* x, const uint16_t* w, float* y,
                           int64_t ldy, int64_t n0, int64_t n1) {
  const int64_t K32 = K / 32 * 32;
  for (int64_t n = n0; n < n1; ++n) {
    const uint16_t* wr = w + n * K;
    for (int64_t m = 0; m < M; ++m) {
      const uint16_t* xr = xb + m * K;
      __m256 a = _mm256_setzero_ps(), b = _mm256_setzero_ps();
      for (int64_t k = 0; k < K32; k += 32) {
        __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr + k));
        __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr + k + 16));
        __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr + k));
        __m256i x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr + k + 16));
        a = _mm256_fmadd_ps(odd_of(x0), odd_of(w0), a);
        a = _mm256_fmadd_ps(even_of(x0), even_of(w0), a);
        b = _mm256_fmadd_ps(odd_of(x1), odd_of(w1), b);
        b = _mm256_fmadd_ps(even_of(x1), even_of(w1), b);
      }
      alignas(32) float l[16];
      _mm256_store_ps(l, a);
      _mm256_store_ps(l + 8, b);
      lanes_ref(x + m * K, wr, K, K32, l);
      y[m * ldy + n] = halve16_lanes(l);
    }
  }
}

// AVX-512: one vdpbf16ps per 32 elements, one row of w at a time: a single sequential
// stream (several rows in flight are streams a row apart, measured 30% slower on Zen 5),
// fetched 8 KiB ahead in software, since the hardware prefetchers stop at the 4 KiB
// pages of the mapped model file (measured in the decode step: 43 -> 48 GB/s).
GROKIT_AVX512 void rows_avx512(const uint16_t* xb, int64_t M, int64_t K, const float* x, const uint16_t* w, float* y,
                               int64_t ldy, int64_t n0, int64_t n1) {
  const int64_t K32 = K / 32 * 32;
  constexpr int64_t kAhead = 4096;  // elements: 8 KiB
  for (int64_t n = n0; n < n1; ++n) {
    const uint16_t* wr = w + n * K;
    for (int64_t m = 0; m < M; ++m) {
      const uint16_t* xr = xb + m * K;
      __m512 a = _mm512_setzero_ps();
      for (int64_t k = 0; k < K32; k += 32) {
        if (m == 0) prefetch_line(reinterpret_cast<const char*>(wr + k + kAhead));
        a = _mm512_dpbf16_ps(a, reinterpret_cast<__m512bh>(_mm512_loadu_si512(wr + k)), reinterpret_cast<__m512bh>(_mm512_loadu_si512(xr + k)));
      }
      alignas(64) float l[16];
      _mm512_store_ps(l, a);
      lanes_ref(x + m * K, wr, K, K32, l);
      y[m * ldy + n] = halve16_lanes(l);
    }
  }
}

enum class Level { kScalar, kAvx2, kAvx512 };

template <Level kLevel>
Status impl(const float* x, int64_t M, int64_t K, const uint16_t* w, int64_t N, float* y, int64_t ldy, Pool pool) {
  GROKIT_CHECK(M >= 0 && K > 0 && N > 0 && ldy >= N);
  if (M == 0) return {};
  Staged<uint16_t> xb;  // x as bf16, on a cache line
  if (kLevel != Level::kScalar) {
    xb.resize(static_cast<size_t>(M * K));
    for (int64_t i = 0; i < M * K; ++i) xb[static_cast<size_t>(i)] = f32_to_bf16_bits(x[i]);
  }
  const int64_t chunk = chunk_size(N, task_count(pool), 16);
  const int64_t tasks = (N + chunk - 1) / chunk;
  for_each(pool, static_cast<size_t>(tasks), [&](size_t t) {
    int64_t n0 = static_cast<int64_t>(t) * chunk, n1 = std::min(N, n0 + chunk);
    if (kLevel == Level::kAvx512) rows_avx512(xb.data(), M, K, x, w, y, ldy, n0, n1);
    else if (kLevel == Level::kAvx2) rows_avx2(xb.data(), M, K, x, w, y, ldy, n0, n1);
    else rows_ref(x, M, K, w, y, ldy, n0, n1);
  });
  return {};
}

}  // namespace

Status matmul_bf16_nt(const float* x, int64_t M, int64_t K, const uint16_t* w, int64_t N, float* y, int64_t ldy,
                      Pool pool) {
  if (detail::use_avx512()) return impl<Level::kAvx512>(x, M, K, w, N, y, ldy, pool);
  if (detail::use_avx2()) return impl<Level::kAvx2>(x, M, K, w, N, y, ldy, pool);
  return impl<Level::kScalar>(x, M, K, w, N, y, ldy, pool);
}
Status matmul_bf16_nt_ref(const float* x, int64_t M, int64_t K, const uint16_t* w, int64_t N, float* y, int64_t ldy,
                          Pool pool) {
  return impl<Level::kScalar>(x, M, K, w, N, y, ldy, pool);
}

}  // namespace grokit::kernels
