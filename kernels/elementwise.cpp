// GELU * up, bf16 rounding, residual add, embedding lookup, and the SIMD path choice.
#include <cstdlib>

#include "kernels/internal.h"

namespace grokit::kernels {

namespace detail {
// GROKIT_KERNELS=scalar|avx2 caps the SIMD level (for tests and comparisons).
static std::string_view forced_level() {
  const char* force = std::getenv("GROKIT_KERNELS");
  return force == nullptr ? std::string_view() : std::string_view(force);
}
bool use_avx2() {
  static const bool yes = [] {
    if (forced_level() == "scalar") return false;
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return yes;
}
bool use_avx512() {
  static const bool yes = [] {
    if (!use_avx2() || forced_level() == "avx2") return false;
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512bf16");
  }();
  return yes;
}
}  // namespace detail

const char* cpu_kernel_path() { return detail::use_avx512() ? "avx512" : detail::use_avx2() ? "avx2" : "scalar"; }

namespace {
// JAX's gelu(approximate=True): x * (0.5 * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3)))).
inline float gelu(float x) {
  const float kSqrt2OverPi = 0.7978845608028654f;
  float inner = kSqrt2OverPi * (x + 0.044715f * (x * x * x));
  return x * (0.5f * (1.0f + detail::tanh_f(inner)));
}
void gelu_mul_range(const float* g, const float* u, int64_t a, int64_t b, float* h) {
  for (int64_t i = a; i < b; ++i) h[i] = gelu(g[i]) * u[i];
}
}  // namespace

Status gelu_mul_ref(const float* g, const float* u, int64_t n, float* h, Pool pool) {
  gelu_mul_range(g, u, 0, n, h);
  return {};
}

Status gelu_mul(const float* g, const float* u, int64_t n, float* h, Pool pool) {
  const int64_t chunk = detail::chunk_size(n, detail::task_count(pool), 256);
  detail::for_each(pool, static_cast<size_t>((n + chunk - 1) / chunk), [&](size_t t) {
    int64_t a = static_cast<int64_t>(t) * chunk;
    gelu_mul_range(g, u, a, std::min(n, a + chunk), h);
  });
  return {};
}

void round_to_bf16(const float* x, int64_t n, float* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = grokit::round_bf16(x[i]);
}

void add_bf16(const float* a, const float* b, int64_t n, float* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = grokit::round_bf16(a[i] + b[i]);
}

void embed(const int32_t* tokens, int64_t M, const uint16_t* table, int64_t row_start, int64_t rows, int64_t D,
           float multiplier, float* out) {
  for (int64_t m = 0; m < M; ++m) {
    int64_t t = tokens[m] - row_start;
    float* o = out + m * D;
    if (t < 0 || t >= rows) {
      std::fill(o, o + D, 0.0f);
      continue;
    }
    const uint16_t* e = table + t * D;
    for (int64_t d = 0; d < D; ++d) o[d] = grokit::round_bf16(bf16_bits_to_f32(e[d]) * multiplier);
  }
}

}  // namespace grokit::kernels
