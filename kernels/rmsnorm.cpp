// RMSNorm in fp32, rounded to bf16.
#include "kernels/internal.h"

namespace grokit::kernels {
namespace {
using namespace detail;

// One row: the mean of squares summed in fp32 in index order (each square rounded to fp32
// first), then out = bf16((x * (1 / sqrt(ms + eps))) * scale). Sequential on purpose:
// D is small next to the matrix products, and the order is the reference's.
void row(const float* x, int64_t D, const float* scale, float eps, float* o) {
  float ss = 0.0f;
  for (int64_t d = 0; d < D; ++d) {
    float sq = x[d] * x[d];
    ss = ss + sq;
  }
  float inv = 1.0f / std::sqrt(ss / static_cast<float>(D) + eps);
  for (int64_t d = 0; d < D; ++d) o[d] = round_bf16((x[d] * inv) * scale[d]);
}

}  // namespace

Status rmsnorm_ref(const float* x, int64_t M, int64_t D, const float* scale, float eps, float* out, Pool pool) {
  GROKIT_CHECK(M >= 0 && D > 0);
  for (int64_t m = 0; m < M; ++m) row(x + m * D, D, scale, eps, out + m * D);
  return {};
}

// The same rows, spread over the pool.
Status rmsnorm(const float* x, int64_t M, int64_t D, const float* scale, float eps, float* out, Pool pool) {
  GROKIT_CHECK(M >= 0 && D > 0);
  const int64_t per_task = std::max<int64_t>(1, M / task_count(pool));
  const int64_t tasks = (M + per_task - 1) / per_task;
  for_each(pool, static_cast<size_t>(tasks), [&](size_t t) {
    int64_t a = static_cast<int64_t>(t) * per_task, b = std::min(M, a + per_task);
    for (int64_t m = a; m < b; ++m) row(x + m * D, D, scale, eps, out + m * D);
  });
  return {};
}

}  // namespace grokit::kernels
