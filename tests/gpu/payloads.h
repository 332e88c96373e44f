// Weight payloads of the stored schemes (format/SPEC.md §4, §4.1) built from codes and
// scales, their dequantized values read back from the bytes, and a seeded generator:
// shared by the parity harness, the host-ops tests and the GPU benchmark. Header-only.
#pragma once

#include <algorithm>
#include <cmath>
#include <functional>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "common/common.h"
#include "kernels/ops.h"

namespace grokit::payloads {

// splitmix64: the same stream on every platform.
class Rng {
 public:
  explicit Rng(uint64_t seed) : s_(seed) {}
  uint64_t next() {
    uint64_t z = (s_ += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  double uniform() { return static_cast<double>(next() >> 11) * 0x1.0p-53; }  // [0, 1)
  int64_t range(int64_t lo, int64_t hi) {
    return lo + static_cast<int64_t>(next() % static_cast<uint64_t>(hi - lo + 1));
  }
  float f32(float lo, float hi) { return lo + static_cast<float>(uniform()) * (hi - lo); }
  // A bf16 value +-(1 + m/128) * 2^e, e in [min_exp, max_exp]; zero one time in 32.
  float bf16_value(int min_exp, int max_exp) {
    if (range(0, 31) == 0) return 0.0f;
    const float v = magnitude(min_exp, max_exp);
    return range(0, 1) != 0 ? -v : v;
  }
  uint16_t bf16_bits(int min_exp, int max_exp) { return f32_to_bf16_bits(bf16_value(min_exp, max_exp)); }
  // A positive bf16 scale in [2^min_exp, 2^(max_exp+1)).
  uint16_t scale_bits(int min_exp, int max_exp) { return f32_to_bf16_bits(magnitude(min_exp, max_exp)); }

 private:
  // (1 + m/128) * 2^e: mantissa drawn first, then the exponent (sequenced, so every
  // compiler draws the same stream).
  float magnitude(int min_exp, int max_exp) {
    const float mant = 1.0f + static_cast<float>(range(0, 127)) / 128.0f;
    return std::ldexp(mant, static_cast<int>(range(min_exp, max_exp)));
  }
  uint64_t s_;
};

enum : int32_t { kBF16 = 1, kQ8RowBlock = 16, kQ4Group = 17, kF8Column = 18 };

inline const char* dtype_name(int32_t d) {
  return d == kQ8RowBlock ? "q8rb" : d == kQ4Group ? "q4g" : d == kF8Column ? "f8col" : d == kBF16 ? "bf16" : "?";
}

// A stack of E matrices [K, N] as stored, with the GrokitWeight fields that describe it.
struct WeightPayload {
  int32_t dtype = kBF16, param = 0;
  int64_t experts = 1, rows = 0, cols = 0;
  uint64_t matrix_bytes = 0;      // as ops.h defines it (q8rb: K * N)
  uint64_t q8_scales_offset = 0;  // q8rb: where the [E, B, N] scales start
  std::vector<uint8_t> bytes;
  GrokitWeight desc(void* device_data) const {
    GrokitWeight w{};
    w.dtype = dtype;
    w.param = param;
    w.layout = 0;
    w.experts = experts;
    w.rows = rows;
    w.cols = cols;
    w.matrix_bytes = matrix_bytes;
    w.data = device_data;
    return w;
  }
};

inline uint64_t align_to(uint64_t v, uint64_t a) { return (v + a - 1) / a * a; }

// q8rb: codes [E][K][N] int8, scales [E][B][N] bf16 bits: all codes, zero pad to 64
// bytes, then all scales.
inline WeightPayload make_q8rb(const std::vector<int8_t>& codes, const std::vector<uint16_t>& scales, int64_t E,
                               int64_t K, int64_t N, int64_t B) {
  WeightPayload p{kQ8RowBlock, static_cast<int32_t>(B), E, K, N, static_cast<uint64_t>(K * N), 0, {}};
  const uint64_t n = static_cast<uint64_t>(E * K * N);
  p.q8_scales_offset = align_to(n, 64);
  p.bytes.assign(p.q8_scales_offset + 2 * static_cast<uint64_t>(E * B * N), 0);
  std::memcpy(p.bytes.data(), codes.data(), n);
  for (size_t i = 0; i < scales.size(); ++i) {
    p.bytes[p.q8_scales_offset + 2 * i] = static_cast<uint8_t>(scales[i] & 0xff);
    p.bytes[p.q8_scales_offset + 2 * i + 1] = static_cast<uint8_t>(scales[i] >> 8);
  }
  return p;
}

// q4g: q [E][K][N] in [-8, 7], scales [E][K/G][N]. Per matrix, per group: codes
// [G/32][N][16] (byte i: row 32c + 2i low nibble, 32c + 2i + 1 high), then the group's
// scales padded to 16 bytes.
inline WeightPayload make_q4g(const std::vector<int8_t>& q, const std::vector<uint16_t>& scales, int64_t E, int64_t K,
                              int64_t N, int64_t G) {
  const int64_t code_bytes = 16 * (G / 32) * N;
  const int64_t group_bytes = code_bytes + static_cast<int64_t>(align_to(static_cast<uint64_t>(2 * N), 16));
  const int64_t mb = K / G * group_bytes;
  WeightPayload p{kQ4Group, static_cast<int32_t>(G), E, K, N, static_cast<uint64_t>(mb), 0, {}};
  p.bytes.assign(static_cast<size_t>(E * mb), 0);
  for (int64_t e = 0; e < E; ++e) {
    const int8_t* qe = q.data() + e * K * N;
    const uint16_t* se = scales.data() + e * (K / G) * N;
    for (int64_t g = 0; g < K / G; ++g) {
      uint8_t* base = p.bytes.data() + e * mb + g * group_bytes;
      for (int64_t c = 0; c < G / 32; ++c)
        for (int64_t n = 0; n < N; ++n)
          for (int64_t i = 0; i < 16; ++i) {
            const int64_t k = g * G + 32 * c + 2 * i;
            const auto lo = static_cast<uint8_t>(qe[k * N + n] & 15),
                       hi = static_cast<uint8_t>(qe[(k + 1) * N + n] & 15);
            base[(c * N + n) * 16 + i] = static_cast<uint8_t>(lo | hi << 4);
          }
      for (int64_t n = 0; n < N; ++n) {
        base[code_bytes + 2 * n] = static_cast<uint8_t>(se[g * N + n] & 0xff);
        base[code_bytes + 2 * n + 1] = static_cast<uint8_t>(se[g * N + n] >> 8);
      }
    }
  }
  return p;
}

// f8col: E4M3 codes [E][K][N], scales [E][N]. Per matrix: codes [K/32][N][32] (byte i:
// row 32c + i), then the scales padded to 16 bytes.
inline WeightPayload make_f8col(const std::vector<uint8_t>& codes, const std::vector<uint16_t>& scales, int64_t E,
                                int64_t K, int64_t N) {
  const int64_t mb = K * N + static_cast<int64_t>(align_to(static_cast<uint64_t>(2 * N), 16));
  WeightPayload p{kF8Column, 0, E, K, N, static_cast<uint64_t>(mb), 0, {}};
  p.bytes.assign(static_cast<size_t>(E * mb), 0);
  for (int64_t e = 0; e < E; ++e) {
    uint8_t* base = p.bytes.data() + e * mb;
    for (int64_t c = 0; c < K / 32; ++c)
      for (int64_t n = 0; n < N; ++n)
        for (int64_t i = 0; i < 32; ++i)
          base[(c * N + n) * 32 + i] = codes[static_cast<size_t>((e * K + 32 * c + i) * N + n)];
    for (int64_t n = 0; n < N; ++n) {
      base[K * N + 2 * n] = static_cast<uint8_t>(scales[static_cast<size_t>(e * N + n)] & 0xff);
      base[K * N + 2 * n + 1] = static_cast<uint8_t>(scales[static_cast<size_t>(e * N + n)] >> 8);
    }
  }
  return p;
}

// bf16: weights [E][K][N] bf16 bits, row-major.
inline WeightPayload make_bf16(const std::vector<uint16_t>& w, int64_t E, int64_t K, int64_t N) {
  WeightPayload p{kBF16, 0, E, K, N, static_cast<uint64_t>(2 * K * N), 0, {}};
  p.bytes.resize(2 * w.size());
  std::memcpy(p.bytes.data(), w.data(), p.bytes.size());
  return p;
}

// OCP E4M3 by its definition (bias 7, subnormals m/8 * 2^-6, S.1111.111 NaN).
inline double e4m3_value(uint8_t v) {
  const int s = v >> 7, e = (v >> 3) & 15, m = v & 7;
  if (e == 15 && m == 7) return std::nan("");
  const double mag = e == 0 ? std::ldexp(m / 8.0, -6) : std::ldexp(1.0 + m / 8.0, e - 7);
  return s != 0 ? -mag : mag;
}

// Expert e's weights [K][N] as the forward pass uses them (bf16(code * scale)), decoded
// from the payload bytes.
inline std::vector<float> dequantize(const WeightPayload& p, int64_t e) {
  const int64_t K = p.rows, N = p.cols;
  std::vector<float> w(static_cast<size_t>(K * N));
  auto u16 = [&](uint64_t at) { return static_cast<uint16_t>(p.bytes[at] | p.bytes[at + 1] << 8); };
  auto prod = [](double a, uint16_t s) {
    return round_bf16(static_cast<float>(a * static_cast<double>(bf16_bits_to_f32(s))));
  };
  for (int64_t k = 0; k < K; ++k) {
    for (int64_t n = 0; n < N; ++n) {
      float v = 0.0f;
      switch (p.dtype) {
        case kQ8RowBlock: {
          const auto code = static_cast<int8_t>(p.bytes[static_cast<size_t>((e * K + k) * N + n)]);
          const int64_t b = k / (K / p.param);
          v = prod(code, u16(p.q8_scales_offset + 2 * static_cast<uint64_t>((e * p.param + b) * N + n)));
          break;
        }
        case kQ4Group: {
          const int64_t G = p.param, code_bytes = 16 * (G / 32) * N;
          const uint64_t group_bytes = static_cast<uint64_t>(code_bytes) + align_to(static_cast<uint64_t>(2 * N), 16);
          const int64_t g = k / G, c = (k % G) / 32, i = (k % 32) / 2;
          const uint64_t base = static_cast<uint64_t>(e) * p.matrix_bytes + static_cast<uint64_t>(g) * group_bytes;
          const uint8_t byte = p.bytes[base + static_cast<uint64_t>((c * N + n) * 16 + i)];
          int q = (k % 2 == 0 ? byte : byte >> 4) & 15;
          if (q >= 8) q -= 16;
          v = prod(q, u16(base + static_cast<uint64_t>(code_bytes + 2 * n)));
          break;
        }
        case kF8Column: {
          const uint64_t base = static_cast<uint64_t>(e) * p.matrix_bytes;
          const uint8_t code = p.bytes[base + static_cast<uint64_t>(((k / 32) * N + n) * 32 + k % 32)];
          v = prod(e4m3_value(code), u16(base + static_cast<uint64_t>(K * N + 2 * n)));
          break;
        }
        default:
          v = bf16_bits_to_f32(u16(static_cast<uint64_t>(e) * p.matrix_bytes + 2 * static_cast<uint64_t>(k * N + n)));
      }
      w[static_cast<size_t>(k * N + n)] = v;
    }
  }
  return w;
}

// A random stack: q8rb (param = B), q4g (param = G), f8col, bf16, with weights of about
// 2^-10 .. 2^-2 and every code value reached (the extremes at fixed places).
inline WeightPayload random_weight(int32_t dtype, int64_t E, int64_t K, int64_t N, int64_t param, Rng& rng) {
  const auto n = static_cast<size_t>(E * K * N);
  switch (dtype) {
    case kQ8RowBlock: {
      std::vector<int8_t> codes(n);
      for (auto& c : codes) c = static_cast<int8_t>(rng.range(-128, 127));
      codes[0] = -128;
      codes[n - 1] = 127;
      std::vector<uint16_t> scales(static_cast<size_t>(E * param * N));
      for (auto& s : scales) s = rng.scale_bits(-16, -10);
      return make_q8rb(codes, scales, E, K, N, param);
    }
    case kQ4Group: {
      std::vector<int8_t> q(n);
      for (auto& v : q) v = static_cast<int8_t>(rng.range(-8, 7));
      q[0] = -8;
      q[n - 1] = 7;
      std::vector<uint16_t> scales(static_cast<size_t>(E * (K / param) * N));
      for (size_t i = 0; i < scales.size(); ++i)  // every fifth scale negative
        scales[i] = static_cast<uint16_t>(rng.scale_bits(-13, -6) | (i % 5 == 4 ? 0x8000 : 0));
      return make_q4g(q, scales, E, K, N, param);
    }
    case kF8Column: {
      std::vector<uint8_t> codes(n);
      for (auto& c : codes) {
        do c = static_cast<uint8_t>(rng.range(0, 255));
        while ((c & 0x7f) == 0x7f);  // no NaN
      }
      const uint8_t special[] = {0x00, 0x80, 0x01, 0x81, 0x07, 0x87, 0x08, 0x7e, 0xfe, 0x38};
      for (size_t i = 0; i < std::size(special) && i < n; ++i) codes[i * n / std::size(special)] = special[i];
      std::vector<uint16_t> scales(static_cast<size_t>(E * N));
      for (auto& s : scales) s = rng.scale_bits(-12, -8);
      return make_f8col(codes, scales, E, K, N);
    }
    case kBF16: {
      std::vector<uint16_t> w(n);
      for (auto& v : w) v = rng.bf16_bits(-10, -2);
      return make_bf16(w, E, K, N);
    }
    default: throw std::invalid_argument("random_weight: dtype " + std::to_string(dtype));
  }
}

// Router inputs: w [D, E] and x [M, D], each row of x drawn again until its top k + 1
// logits are apart (2^-8): two sides summing in other orders must pick the same experts,
// and near-ties are ties of rounding. Returns false when no such row was found.
inline bool router_inputs(int64_t M, int64_t D, int64_t E, int64_t k, Rng& rng, std::vector<float>& x,
                          std::vector<float>& w) {
  w.assign(static_cast<size_t>(D * E), 0.0f);
  for (auto& v : w) v = rng.f32(-1.0f, 1.0f) / std::sqrt(static_cast<float>(D));
  x.assign(static_cast<size_t>(M * D), 0.0f);
  std::vector<double> logit(static_cast<size_t>(E));
  for (int64_t m = 0; m < M; ++m) {
    for (int attempt = 0;; ++attempt) {
      if (attempt == 10000) return false;
      float* xr = x.data() + m * D;
      for (int64_t d = 0; d < D; ++d) xr[d] = rng.bf16_value(-3, 2);
      for (int64_t e = 0; e < E; ++e) {
        double acc = 0;
        for (int64_t d = 0; d < D; ++d) acc += static_cast<double>(xr[d]) * w[static_cast<size_t>(d * E + e)];
        logit[static_cast<size_t>(e)] = acc;  // gaps of probabilities are gaps of logits
      }
      std::sort(logit.begin(), logit.end(), std::greater<>());
      bool apart = true;
      for (int64_t i = 0; i < std::min(k, E - 1); ++i)
        apart = apart && logit[static_cast<size_t>(i)] - logit[static_cast<size_t>(i + 1)] > 0x1p-8;
      if (apart) break;
    }
  }
  return true;
}

// The chains the CPU engine sums a product in at TP 1 (format::ModelConfig::
// split_sum_rows for q8rb and bf16, chunked_sum_rows for q4g and f8col).
inline int64_t engine_sum_rows(int32_t dtype, int64_t K, int64_t param) {
  int64_t nb = 16;
  if (dtype == kQ4Group || dtype == kF8Column) {
    const int64_t unit = dtype == kQ4Group && param > 32 ? param : 32;
    while (nb > 1 && K % (nb * unit) != 0) nb /= 2;
  } else {
    while (nb > 1 && K % (2 * nb) != 0) nb /= 2;
  }
  return K / nb;
}

// The spacing of bf16 values at |v| (0 for 0 and non-finite v).
inline double bf16_ulp(double v) {
  if (v == 0.0 || !std::isfinite(v)) return 0.0;
  int e = 0;
  std::frexp(v, &e);
  return std::ldexp(1.0, e - 8);
}

// What a residual_norm output may differ from the CPU twin's beyond 1 bf16 ulp of its
// own, per element. A backend whose norm sums in another order may round the normed
// addend t = rmsnorm(y') to the neighbouring bf16 value: that moves x = bf16(x + t) by
// ulp(t), which is many ulps of x where x and t nearly cancel, and a = rmsnorm(x) by
// x's whole move (ulp(t) and its own rounding, ulp(x)) times the second norm's factor
// inv_rms(x) * |next|. t and x_after: the twin's, [M, D]; next may be NULL (no a).
struct ResidualNormSlack {
  std::vector<double> x, a;
};
inline ResidualNormSlack residual_norm_slack(const std::vector<float>& t, const std::vector<float>& x_after,
                                             const float* next, int64_t M, int64_t D, float eps) {
  ResidualNormSlack s;
  s.x.resize(t.size());
  s.a.assign(t.size(), 0.0);
  for (int64_t m = 0; m < M; ++m) {
    double ss = 0.0;
    for (int64_t d = 0; d < D; ++d) ss += double(x_after[static_cast<size_t>(m * D + d)]) * x_after[static_cast<size_t>(m * D + d)];
    const double inv = 1.0 / std::sqrt(ss / static_cast<double>(D) + eps);
    for (int64_t d = 0; d < D; ++d) {
      const auto i = static_cast<size_t>(m * D + d);
      s.x[i] = bf16_ulp(std::fabs(double(t[i])));
      if (next != nullptr)
        s.a[i] = (s.x[i] + bf16_ulp(std::fabs(double(x_after[i])))) * inv * std::fabs(double(next[d]));
    }
  }
  return s;
}

}  // namespace grokit::payloads
