// y = x @ W^T for a bf16 W [N, K] (the embedding table as the output projection).
#include "kernels/internal.h"

namespace grokit::kernels {
namespace {
using namespace detail;

float dot_ref(const float* x, const uint16_t* w, int64_t K) {
  double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (int64_t k = 0; k < K; ++k) acc[k % 8] += static_cast<double>(x[k]) * static_cast<double>(bf16f(w[k]));
  return static_cast<float>(combine8(acc));
}

void rows_ref(const float* x, int64_t M, int64_t K, const uint16_t* w, float* y, int64_t ldy, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t m = 0; m < M; ++m) y[m * ldy + n] = dot_ref(x + m * K, w + n * K, K);
  }
}

// Up to 4 rows of x against one row of w at a time, the w row read once.
GROKIT_AVX2 void rows_avx2(const float* x, int64_t M, int64_t K, const uint16_t* w, float* y, int64_t ldy,
                           int64_t n0, int64_t n1) {
  const int64_t K8 = K / 8 * 8;
  for (int64_t n = n0; n < n1; ++n) {
    const uint16_t* wr = w + n * K;
    for (int64_t m0 = 0; m0 < M; m0 += 4) {
      int64_t mc = std::min<int64_t>(4, M - m0);
      __m256d lo[4], hi[4];
      for (int64_t i = 0; i < 4; ++i) lo[i] = hi[i] = _mm256_setzero_pd();
      for (int64_t k = 0; k < K8; k += 8) {
        __m256 wv = load_bf16x8(wr + k);
        for (int64_t i = 0; i < mc; ++i) fma8_pd(_mm256_loadu_ps(x + (m0 + i) * K + k), wv, lo[i], hi[i]);
      }
      for (int64_t i = 0; i < mc; ++i) {
        double lanes[8];
        store8_pd(lo[i], hi[i], lanes);
        const float* xr = x + (m0 + i) * K;
        for (int64_t k = K8; k < K; ++k) lanes[k % 8] += static_cast<double>(xr[k]) * static_cast<double>(bf16f(wr[k]));
        y[(m0 + i) * ldy + n] = static_cast<float>(combine8(lanes));
      }
    }
  }
}

template <bool kSimd>
Status impl(const float* x, int64_t M, int64_t K, const uint16_t* w, int64_t N, float* y, int64_t ldy, Pool pool) {
  GROKIT_CHECK(M >= 0 && K > 0 && N > 0 && ldy >= N);
  if (M == 0) return {};
  const int64_t chunk = chunk_size(N, task_count(pool), 8);
  const int64_t tasks = (N + chunk - 1) / chunk;
  for_each(pool, static_cast<size_t>(tasks), [&](size_t t) {
    int64_t n0 = static_cast<int64_t>(t) * chunk, n1 = std::min(N, n0 + chunk);
    if (kSimd) rows_avx2(x, M, K, w, y, ldy, n0, n1);
    else rows_ref(x, M, K, w, y, ldy, n0, n1);
  });
  return {};
}

}  // namespace

Status matmul_bf16_nt(const float* x, int64_t M, int64_t K, const uint16_t* w, int64_t N, float* y, int64_t ldy,
                      Pool pool) {
  if (detail::use_avx2()) return impl<true>(x, M, K, w, N, y, ldy, pool);
  return impl<false>(x, M, K, w, N, y, ldy, pool);
}
Status matmul_bf16_nt_ref(const float* x, int64_t M, int64_t K, const uint16_t* w, int64_t N, float* y, int64_t ldy,
                          Pool pool) {
  return impl<false>(x, M, K, w, N, y, ldy, pool);
}

}  // namespace grokit::kernels
