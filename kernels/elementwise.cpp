// GELU * up, bf16 rounding, residual add, embedding lookup, and the SIMD path choice.
#include <algorithm>
#include <chrono>
#include <cstdlib>

#include <cpuid.h>

#include "kernels/internal.h"
#include "kernels/vmath.h"

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
    // F16C is CPUID.1:ECX bit 29, asked directly: clang's __builtin_cpu_supports lacks it.
    unsigned a = 0, b = 0, c = 0, d = 0;
    const bool f16c = __get_cpuid(1, &a, &b, &c, &d) != 0 && (c & (1u << 29)) != 0;
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && f16c;
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

namespace {
// Seconds for `rounds` rounds of ten independent sums, each round one vdpbf16ps per sum
// (fma = false) or two fmas (fma = true).
GROKIT_AVX512 double time_bf16_products(bool fma, int rounds) {
  __m512 acc[10];
  for (int j = 0; j < 10; ++j) acc[j] = _mm512_set1_ps(static_cast<float>(j));  // ten distinct sums
  const __m512 w = _mm512_set1_ps(1.0f / 1024);
  const __m512bh wb = reinterpret_cast<__m512bh>(_mm512_set1_epi32(0x3a803a80));
  const auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < rounds; ++i) {
    if (fma) {
      for (__m512& a : acc) a = _mm512_fmadd_ps(w, w, _mm512_fmadd_ps(w, w, a));
    } else {
      for (__m512& a : acc) a = _mm512_dpbf16_ps(a, wb, wb);
    }
  }
  const double t = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  float sum = 0;  // every sum used, so that none is left out
  for (const __m512& a : acc) sum += _mm512_cvtss_f32(a);
  volatile float sink = sum;
  (void)sink;
  return t;
}
}  // namespace

bool bf16_products_by_fma() {
  static const bool yes = [] {
    if (!use_avx512()) return false;
    const char* force = std::getenv("GROKIT_BF16_PRODUCTS");
    if (force != nullptr && std::string_view(force) == "fma") return true;
    if (force != nullptr && std::string_view(force) == "vdpbf16ps") return false;
    // The two differ by a factor near 2 either way. A core that has not run wide vector
    // code lately runs it slowly for some tens of microseconds (its upper lanes power up),
    // so both are warmed first, then timed in turns, the least of eight each: ~0.3 ms.
    time_bf16_products(true, 4000);
    time_bf16_products(false, 4000);
    double by_fma = 1e30, by_dp = 1e30;
    for (int attempt = 0; attempt < 8; ++attempt) {
      by_fma = std::min(by_fma, time_bf16_products(true, 1000));
      by_dp = std::min(by_dp, time_bf16_products(false, 1000));
    }
    return by_fma < 0.75 * by_dp;
  }();
  return yes;
}
}  // namespace detail

const char* cpu_bf16_pair_form() {
  if (!detail::use_avx512()) return "";
  return detail::bf16_products_by_fma() ? "fma" : "vdpbf16ps";
}
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

// The SIMD GELU: the same fp32 operations as gelu() (this file is built without FMA
// contraction), with tanh in double lanes (vmath.h).
template <class F, class D, class U, int kLanes>
inline __attribute__((always_inline)) void gelu_mul_lanes(const float* g, const float* u, int64_t a, int64_t b,
                                                          float* h) {
  int64_t i = a;
  // Two vectors per step: the tanh chains are long, two in flight hide their latency.
  for (; i + 2 * kLanes <= b; i += 2 * kLanes) {
    F x0, x1, u0, u1;
    std::memcpy(&x0, g + i, sizeof x0);
    std::memcpy(&x1, g + i + kLanes, sizeof x1);
    std::memcpy(&u0, u + i, sizeof u0);
    std::memcpy(&u1, u + i + kLanes, sizeof u1);
    const F in0 = 0.7978845608028654f * (x0 + 0.044715f * (x0 * x0 * x0));
    const F in1 = 0.7978845608028654f * (x1 + 0.044715f * (x1 * x1 * x1));
    const F t0 = __builtin_convertvector(detail::tanh_lanes<D, U>(__builtin_convertvector(in0, D)), F);
    const F t1 = __builtin_convertvector(detail::tanh_lanes<D, U>(__builtin_convertvector(in1, D)), F);
    const F o0 = x0 * (0.5f * (1.0f + t0)) * u0;
    const F o1 = x1 * (0.5f * (1.0f + t1)) * u1;
    std::memcpy(h + i, &o0, sizeof o0);
    std::memcpy(h + i + kLanes, &o1, sizeof o1);
  }
  for (; i + kLanes <= b; i += kLanes) {
    F x, uv;
    std::memcpy(&x, g + i, sizeof x);
    std::memcpy(&uv, u + i, sizeof uv);
    const F inner = 0.7978845608028654f * (x + 0.044715f * (x * x * x));
    const F t = __builtin_convertvector(detail::tanh_lanes<D, U>(__builtin_convertvector(inner, D)), F);
    const F out = x * (0.5f * (1.0f + t)) * uv;
    std::memcpy(h + i, &out, sizeof out);
  }
  gelu_mul_range(g, u, i, b, h);
}


GROKIT_AVX512 void gelu_mul_avx512(const float* g, const float* u, int64_t a, int64_t b, float* h) {
  gelu_mul_lanes<detail::f32x8, detail::f64x8, detail::u64x8, 8>(g, u, a, b, h);
}
GROKIT_AVX2 void gelu_mul_avx2(const float* g, const float* u, int64_t a, int64_t b, float* h) {
  gelu_mul_lanes<detail::f32x4, detail::f64x4, detail::u64x4, 4>(g, u, a, b, h);
}
void gelu_mul_best(const float* g, const float* u, int64_t a, int64_t b, float* h) {
  if (detail::use_avx512()) return gelu_mul_avx512(g, u, a, b, h);
  if (detail::use_avx2()) return gelu_mul_avx2(g, u, a, b, h);
  gelu_mul_range(g, u, a, b, h);
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
    gelu_mul_best(g, u, a, std::min(n, a + chunk), h);
  });
  return {};
}

namespace {
inline __attribute__((always_inline)) void scale_bf16_range(const float* x, int64_t a, int64_t b, float m,
                                                              float* out) {
  for (int64_t i = a; i < b; ++i) out[i] = grokit::round_bf16(grokit::round_bf16(x[i]) * m);
}
GROKIT_AVX512 void scale_bf16_avx512(const float* x, int64_t a, int64_t b, float m, float* out) {
  scale_bf16_range(x, a, b, m, out);
}
GROKIT_AVX2 void scale_bf16_avx2(const float* x, int64_t a, int64_t b, float m, float* out) {
  scale_bf16_range(x, a, b, m, out);
}
}  // namespace

Status scale_bf16_ref(const float* x, int64_t n, float multiplier, float* out, Pool) {
  scale_bf16_range(x, 0, n, multiplier, out);
  return {};
}
Status scale_bf16(const float* x, int64_t n, float multiplier, float* out, Pool pool) {
  const int64_t chunk = detail::chunk_size(n, detail::thread_count(pool), 4096);
  detail::for_each(pool, static_cast<size_t>((n + chunk - 1) / chunk), [&](size_t t) {
    const int64_t a = static_cast<int64_t>(t) * chunk, b = std::min(n, a + chunk);
    if (detail::use_avx512()) scale_bf16_avx512(x, a, b, multiplier, out);
    else if (detail::use_avx2()) scale_bf16_avx2(x, a, b, multiplier, out);
    else scale_bf16_range(x, a, b, multiplier, out);
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
