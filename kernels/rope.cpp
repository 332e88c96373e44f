// Rotary position embedding, split halves ([x1, x2] -> [-x2, x1]).
#include <vector>

#include "kernels/internal.h"

namespace grokit::kernels {
namespace {
using namespace detail;

float inv_freq(int64_t j, int64_t dh, double base) {
  return static_cast<float>(1.0 / std::pow(base, static_cast<double>(2 * j) / static_cast<double>(dh)));
}

// out[j] = bf16(x[j] * cos + rotate_half(x)[j] * sin) for one head, in place.
void rotate_head(float* v, int64_t half, const float* c, const float* s) {
  for (int64_t j = 0; j < half; ++j) {
    float a = v[j], b = v[j + half];
    float lo = a * c[j] + (-b) * s[j];
    float hi = b * c[j] + a * s[j];
    v[j] = round_bf16(lo);
    v[j + half] = round_bf16(hi);
  }
}

}  // namespace

Status rope_ref(float* x, int64_t M, int64_t heads, int64_t dh, const int32_t* positions, double base, Pool pool) {
  GROKIT_CHECK(M >= 0 && heads > 0 && dh > 0 && dh % 2 == 0);
  const int64_t half = dh / 2;
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t h = 0; h < heads; ++h) {
      float* v = x + (m * heads + h) * dh;
      for (int64_t j = 0; j < half; ++j) {
        float phase = static_cast<float>(positions[m]) * inv_freq(j, dh, base);
        float c = static_cast<float>(std::cos(static_cast<double>(phase)));
        float s = static_cast<float>(std::sin(static_cast<double>(phase)));
        float a = v[j], b = v[j + half];
        v[j] = round_bf16(a * c + (-b) * s);
        v[j + half] = round_bf16(b * c + a * s);
      }
    }
  }
  return {};
}

Status rope(float* x, int64_t M, int64_t heads, int64_t dh, const int32_t* positions, double base, Pool pool) {
  GROKIT_CHECK(M >= 0 && heads > 0 && dh > 0 && dh % 2 == 0);
  const int64_t half = dh / 2;
  std::vector<float> freq(static_cast<size_t>(half));
  for (int64_t j = 0; j < half; ++j) freq[static_cast<size_t>(j)] = inv_freq(j, dh, base);
  // cos/sin once per row, shared by its heads.
  detail::for_each(pool, static_cast<size_t>(M), [&](size_t m) {
    std::vector<float> c(static_cast<size_t>(half)), s(static_cast<size_t>(half));
    for (int64_t j = 0; j < half; ++j) {
      double phase = static_cast<double>(static_cast<float>(positions[m]) * freq[static_cast<size_t>(j)]);
      c[static_cast<size_t>(j)] = static_cast<float>(std::cos(phase));
      s[static_cast<size_t>(j)] = static_cast<float>(std::sin(phase));
    }
    for (int64_t h = 0; h < heads; ++h) rotate_head(x + (static_cast<int64_t>(m) * heads + h) * dh, half, c.data(), s.data());
  });
  return {};
}

}  // namespace grokit::kernels
