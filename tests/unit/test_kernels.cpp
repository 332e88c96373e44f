// Tests of the CPU kernels (kernels/kernels.h).
//
// 1. One parity harness for every op, in the manner of ggml's test-backend-ops: a table of
//    cases, each naming its op, its parameters (odd sizes on purpose: K off multiples of
//    8 and 16, N off multiples of 16 and 32, M = 1, 2, 3, 7, 33, padded strides) and its
//    error budget against the scalar twin run on the calling thread. Every budget here is
//    0: the kernels pin their accumulation order so that `<op>` (AVX-512 or AVX2 where
//    the CPU has it) equals `<op>_ref` bit for bit, with or without a ThreadPool of 1, 2
//    or 3 threads. Outputs are poisoned with a NaN bit pattern before each run, so an
//    element that is not written fails, and so does one written outside the output
//    (stride padding). Filter by op: --gtest_filter='Ops/KernelParity.*matmul_q8_M*'.
// 2. The numerics of the scalar twins against independent hand computations on tiny
//    inputs (these define what the kernels compute), and the pool under many short runs.
// 3. Batched equals alone: row m of a batched call equals the same row computed alone.
//
// The SIMD level (avx512, avx2, scalar) is decided once per process, so this process
// reaches its best level by comparing `<op>` with `<op>_ref`; the lower levels are
// reached by running the parity suite again in child processes with GROKIT_KERNELS set
// (KernelLevels below).
#include <gtest/gtest.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>
#include <xmmintrin.h>

#include <atomic>
#include <cfloat>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <numbers>
#include <ostream>
#include <string>
#include <string_view>
#include <vector>

#include "common/common.h"
#include "kernels/internal.h"
#include "kernels/kernels.h"
#include "tests/gpu/payloads.h"

extern char** environ;

namespace grokit::kernels {
namespace {

// ---------------------------------------------------------------------------------
// Helpers.

using grokit::payloads::Rng;  // splitmix64: the same stream on every platform

constexpr uint32_t kPoison = 0x7fbadbadu;  // a NaN no kernel produces

uint32_t bits_of(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
float from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
template <class T>
void poison(std::vector<T>& v) {
  static_assert(sizeof(T) == 4);
  for (auto& x : v) std::memcpy(&x, &kPoison, 4);
}
float bf16_ulp(float v) {  // the spacing of bf16 values at |v|
  int e = 0;
  std::frexp(v, &e);
  return std::ldexp(1.0f, e - 8);
}

ThreadPool* pool_of(unsigned threads) {
  static ThreadPool p1(1), p2(2), p3(3);
  switch (threads) {
    case 1: return &p1;
    case 2: return &p2;
    case 3: return &p3;
    default: return nullptr;
  }
}

// ---------------------------------------------------------------------------------
// 1. The parity harness.

enum class Twin { kRef, kSimd };

// What one run of a case wrote: its output buffers as 4-byte words, and for each word
// whether the op must write it (1) or must leave it alone (0: stride padding).
struct Output {
  std::vector<uint32_t> words;
  std::vector<uint8_t> written;
  void add(const void* data, size_t count, const std::vector<uint8_t>& mask) {
    size_t at = words.size();
    words.resize(at + count);
    if (count > 0) std::memcpy(words.data() + at, data, count * 4);  // data may be null when empty
    written.insert(written.end(), mask.begin(), mask.end());
  }
  void add_all(const void* data, size_t count) { add(data, count, std::vector<uint8_t>(count, 1)); }
};
using CaseRunner = std::function<Output(Twin, Pool)>;

struct KernelCase {
  std::string name;                    // op and parameters; a gtest name
  uint32_t max_ulps;                   // budget against the scalar twin; 0: bit for bit
  std::function<CaseRunner()> make;    // builds the (seeded) inputs, returns the runner
};

std::vector<uint8_t> strided_mask(int64_t rows, int64_t cols, int64_t ld) {
  std::vector<uint8_t> m(static_cast<size_t>(rows * ld), 0);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) m[static_cast<size_t>(r * ld + c)] = 1;
  return m;
}

// f32: matmul_q8_f32 on fp32 activations (any fp32 value), else matmul_q8 on bf16 ones.
KernelCase case_matmul_q8(int64_t M, int64_t K, int64_t N, int64_t blocks, int64_t pad, bool f32 = false,
                          int64_t sum_rows = 0) {
  std::string name = std::string(f32 ? "matmul_q8_f32" : "matmul_q8") + "_M" + std::to_string(M) + "_K" +
                     std::to_string(K) + "_N" + std::to_string(N) + "_B" + std::to_string(blocks) +
                     (sum_rows != 0 ? "_chains" + std::to_string(K / sum_rows) : "") + (pad != 0 ? "_strided" : "");
  return {name, 0, [=]() -> CaseRunner {
            Rng rng(static_cast<uint64_t>(M * 1000003 + K * 1009 + N * 7 + blocks + (f32 ? 5 : 0)));
            const int64_t ldx = K + pad, ldy = N + 2 * pad;
            auto x = std::make_shared<std::vector<float>>(static_cast<size_t>(M * ldx));
            for (int64_t m = 0; m < M; ++m)
              for (int64_t k = 0; k < ldx; ++k)  // padding holds NaN: reading it would show
                (*x)[static_cast<size_t>(m * ldx + k)] =
                    k >= K ? from_bits(0x7fc00001u) : f32 ? rng.f32(-3.0f, 3.0f) * std::ldexp(1.0f, static_cast<int>(rng.range(-6, 4)))
                                                         : rng.bf16_value(-6, 4);
            auto codes = std::make_shared<std::vector<int8_t>>(static_cast<size_t>(K * N));
            for (auto& c : *codes) c = static_cast<int8_t>(rng.range(-128, 127));
            (*codes)[0] = -128;
            (*codes)[codes->size() - 1] = 127;
            auto scales = std::make_shared<std::vector<uint16_t>>(static_cast<size_t>(blocks * N));
            for (auto& s : *scales) s = f32_to_bf16_bits(std::fabs(rng.bf16_value(-14, 2)) + 0x1p-20f);
            auto mask = std::make_shared<std::vector<uint8_t>>(strided_mask(M, N, ldy));
            return [=](Twin twin, Pool pool) {
              std::vector<float> y(static_cast<size_t>(M * ldy));
              poison(y);
              auto fn = f32 ? (twin == Twin::kRef ? matmul_q8_f32_ref : matmul_q8_f32)
                            : (twin == Twin::kRef ? matmul_q8_ref : matmul_q8);
              EXPECT_TRUE(fn(x->data(), M, K, ldx, codes->data(), scales->data(), N, blocks, y.data(), ldy, pool, sum_rows).ok());
              Output out;
              out.add(y.data(), y.size(), *mask);
              return out;
            };
          }};
}

// matmul_q8_multi against one matmul_q8_ref per operand: operands of several widths and
// scale blocks, strided y; decode-sized (one task plan for all) or not (one plan each).
KernelCase case_matmul_q8_multi(int64_t M, int64_t K, std::vector<int64_t> Ns, int64_t sum_rows) {
  std::string name = "matmul_q8_multi_M" + std::to_string(M) + "_K" + std::to_string(K) + "_N";
  for (int64_t N : Ns) name += std::to_string(N) + "x";
  name += "_chains" + std::to_string(sum_rows == 0 ? 1 : K / sum_rows);
  return {name, 0, [=]() -> CaseRunner {
            Rng rng(static_cast<uint64_t>(M * 31 + K * 7 + static_cast<int64_t>(Ns.size()) * 1009 + sum_rows));
            const int64_t ldx = K + 3, count = static_cast<int64_t>(Ns.size());
            auto x = std::make_shared<std::vector<float>>(static_cast<size_t>(M * ldx));
            for (int64_t m = 0; m < M; ++m)
              for (int64_t k = 0; k < ldx; ++k)
                (*x)[static_cast<size_t>(m * ldx + k)] = k >= K ? from_bits(0x7fc00001u) : rng.bf16_value(-6, 4);
            struct Operand {
              std::vector<int8_t> codes;
              std::vector<uint16_t> scales;
              int64_t N, blocks, ldy;
            };
            auto operands = std::make_shared<std::vector<Operand>>();
            for (int64_t i = 0; i < count; ++i) {
              Operand o;
              o.N = Ns[static_cast<size_t>(i)];
              o.blocks = i % 2 == 0 ? 1 : 4;
              o.ldy = o.N + i;
              o.codes.resize(static_cast<size_t>(K * o.N));
              for (auto& c : o.codes) c = static_cast<int8_t>(rng.range(-128, 127));
              o.scales.resize(static_cast<size_t>(o.blocks * o.N));
              for (auto& v : o.scales) v = f32_to_bf16_bits(std::fabs(rng.bf16_value(-14, 2)) + 0x1p-20f);
              operands->push_back(std::move(o));
            }
            return [=](Twin twin, Pool pool) {
              std::vector<std::vector<float>> ys;
              std::vector<Q8Operand> ops;
              for (const auto& o : *operands) {
                ys.emplace_back(static_cast<size_t>(M * o.ldy));
                poison(ys.back());
              }
              for (int64_t i = 0; i < count; ++i) {
                const Operand& o = (*operands)[static_cast<size_t>(i)];
                ops.push_back({o.codes.data(), o.scales.data(), o.N, o.blocks, ys[static_cast<size_t>(i)].data(), o.ldy});
              }
              if (twin == Twin::kRef) {
                for (const auto& op : ops)
                  EXPECT_TRUE(matmul_q8_ref(x->data(), M, K, ldx, op.codes, op.scales, op.N, op.blocks, op.y, op.ldy, pool,
                                            sum_rows).ok());
              } else {
                EXPECT_TRUE(matmul_q8_multi(x->data(), M, K, ldx, ops.data(), count, pool, sum_rows).ok());
              }
              Output out;
              for (int64_t i = 0; i < count; ++i) {
                const Operand& o = (*operands)[static_cast<size_t>(i)];
                out.add(ys[static_cast<size_t>(i)].data(), ys[static_cast<size_t>(i)].size(), strided_mask(M, o.N, o.ldy));
              }
              return out;
            };
          }};
}

KernelCase case_matmul_bf16_nt(int64_t M, int64_t K, int64_t N, int64_t pad) {
  std::string name = "matmul_bf16_nt_M" + std::to_string(M) + "_K" + std::to_string(K) + "_N" + std::to_string(N) +
                     (pad != 0 ? "_strided" : "");
  return {name, 0, [=]() -> CaseRunner {
            Rng rng(static_cast<uint64_t>(M * 7919 + K * 104729 + N));
            const int64_t ldy = N + pad;
            auto x = std::make_shared<std::vector<float>>(static_cast<size_t>(M * K));
            for (auto& v : *x) v = rng.bf16_value(-8, 6);
            auto w = std::make_shared<std::vector<uint16_t>>(static_cast<size_t>(N * K));
            for (auto& v : *w) v = rng.bf16_bits(-10, 2);
            auto mask = std::make_shared<std::vector<uint8_t>>(strided_mask(M, N, ldy));
            return [=](Twin twin, Pool pool) {
              std::vector<float> y(static_cast<size_t>(M * ldy));
              poison(y);
              auto fn = twin == Twin::kRef ? matmul_bf16_nt_ref : matmul_bf16_nt;
              EXPECT_TRUE(fn(x->data(), M, K, w->data(), N, y.data(), ldy, pool).ok());
              Output out;
              out.add(y.data(), y.size(), *mask);
              return out;
            };
          }};
}

// The weight payloads of the quantized schemes, packed here from SPEC.md §4.1 on their
// own (not with the kernels' code), and the dequantized weights by the definitions.
// q4g: codes q [K][N] in [-8, 7], bf16 scales [K/G][N]. Per group: codes [G/32][N][16]
// (byte i of a chunk and column: rows 32c + 2i low nibble, 32c + 2i + 1 high nibble), then
// the group's scales, zero-padded to 16 bytes.
std::vector<uint8_t> pack_q4g(const std::vector<int8_t>& q, const std::vector<uint16_t>& scales, int64_t K, int64_t N,
                              int64_t G) {
  const int64_t code_bytes = 16 * (G / 32) * N, group_bytes = code_bytes + (2 * N + 15) / 16 * 16;
  std::vector<uint8_t> out(static_cast<size_t>(K / G * group_bytes), 0);
  for (int64_t g = 0; g < K / G; ++g) {
    uint8_t* base = out.data() + g * group_bytes;
    for (int64_t c = 0; c < G / 32; ++c) {
      for (int64_t n = 0; n < N; ++n) {
        for (int64_t i = 0; i < 16; ++i) {
          const int64_t k = g * G + 32 * c + 2 * i;
          const auto lo = static_cast<uint8_t>(q[static_cast<size_t>(k * N + n)] & 15);
          const auto hi = static_cast<uint8_t>(q[static_cast<size_t>((k + 1) * N + n)] & 15);
          base[(c * N + n) * 16 + i] = static_cast<uint8_t>(lo | hi << 4);
        }
      }
    }
    for (int64_t n = 0; n < N; ++n) {
      const uint16_t s = scales[static_cast<size_t>(g * N + n)];
      base[code_bytes + 2 * n] = static_cast<uint8_t>(s & 0xff);
      base[code_bytes + 2 * n + 1] = static_cast<uint8_t>(s >> 8);
    }
  }
  return out;
}

// f8col: E4M3 codes [K][N], bf16 scales [N]: codes [K/32][N][32] (byte i = row 32c + i),
// then the scales, zero-padded to 16 bytes.
std::vector<uint8_t> pack_f8col(const std::vector<uint8_t>& codes, const std::vector<uint16_t>& scales, int64_t K,
                                int64_t N) {
  std::vector<uint8_t> out(static_cast<size_t>(K * N + (2 * N + 15) / 16 * 16), 0);
  for (int64_t c = 0; c < K / 32; ++c)
    for (int64_t n = 0; n < N; ++n)
      for (int64_t i = 0; i < 32; ++i) out[static_cast<size_t>((c * N + n) * 32 + i)] = codes[static_cast<size_t>((32 * c + i) * N + n)];
  for (int64_t n = 0; n < N; ++n) {
    out[static_cast<size_t>(K * N + 2 * n)] = static_cast<uint8_t>(scales[static_cast<size_t>(n)] & 0xff);
    out[static_cast<size_t>(K * N + 2 * n + 1)] = static_cast<uint8_t>(scales[static_cast<size_t>(n)] >> 8);
  }
  return out;
}

// OCP E4M3 by its definition: (-1)^s 2^(e-7) (1 + m/8), subnormals (e = 0) 2^-6 (m/8),
// S.1111.111 NaN.
double e4m3_value(uint8_t v) {
  const int s = v >> 7, e = (v >> 3) & 15, m = v & 7;
  if (e == 15 && m == 7) return std::nan("");
  const double mag = e == 0 ? std::ldexp(m / 8.0, -6) : std::ldexp(1.0 + m / 8.0, e - 7);
  return s != 0 ? -mag : mag;
}

// bf16(value * scale): the products are exact in double, so rounding the double once to
// fp32 and then to bf16 is the fp32 product rounded to bf16.
float q4_weight(int8_t q, uint16_t scale) { return round_bf16(static_cast<float>(q * static_cast<double>(bf16_bits_to_f32(scale)))); }
float f8_weight(uint8_t code, uint16_t scale) {
  return round_bf16(static_cast<float>(e4m3_value(code) * static_cast<double>(bf16_bits_to_f32(scale))));
}

// A random E4M3 code that is not NaN.
uint8_t f8_code(Rng& rng) {
  for (;;) {
    const auto c = static_cast<uint8_t>(rng.range(0, 255));
    if ((c & 0x7f) != 0x7f) return c;
  }
}

// The weight products with a stored payload: matmul_q4 (group G), matmul_f8, matmul_bf16,
// on bf16 activations, or their _f32 twins on fp32 ones. big_scales: f8 column scales of
// 2^119 and more (too large to fold into the SIMD decode: the careful one).
enum class Scheme { kQ4, kF8, kBf16 };

KernelCase case_matmul_w(Scheme scheme, int64_t M, int64_t K, int64_t N, int64_t G, int64_t pad, bool f32,
                         int64_t sum_rows = 0, bool big_scales = false) {
  const char* op = scheme == Scheme::kQ4 ? "matmul_q4" : scheme == Scheme::kF8 ? "matmul_f8" : "matmul_bf16";
  std::string name = std::string(op) + (f32 ? "_f32" : "") + "_M" + std::to_string(M) + "_K" + std::to_string(K) + "_N" +
                     std::to_string(N) + (scheme == Scheme::kQ4 ? "_G" + std::to_string(G) : "") +
                     (sum_rows != 0 ? "_chains" + std::to_string(K / sum_rows) : "") + (pad != 0 ? "_strided" : "") +
                     (big_scales ? "_bigscales" : "");
  return {name, 0, [=]() -> CaseRunner {
            Rng rng(static_cast<uint64_t>(M * 1000003 + K * 1009 + N * 7 + G * 3 + static_cast<int>(scheme) * 11 +
                                          (f32 ? 5 : 0) + sum_rows * 13 + (big_scales ? 17 : 0)));
            const int64_t ldx = K + pad, ldy = N + 2 * pad;
            auto x = std::make_shared<std::vector<float>>(static_cast<size_t>(M * ldx));
            for (int64_t m = 0; m < M; ++m)
              for (int64_t k = 0; k < ldx; ++k)  // padding holds NaN: reading it would show
                (*x)[static_cast<size_t>(m * ldx + k)] =
                    k >= K ? from_bits(0x7fc00001u) : f32 ? rng.f32(-3.0f, 3.0f) * std::ldexp(1.0f, static_cast<int>(rng.range(-6, 4)))
                                                         : rng.bf16_value(-6, 4);
            auto payload = std::make_shared<std::vector<uint8_t>>();
            auto wbf = std::make_shared<std::vector<uint16_t>>();
            if (scheme == Scheme::kQ4) {
              std::vector<int8_t> q(static_cast<size_t>(K * N));
              for (auto& v : q) v = static_cast<int8_t>(rng.range(-8, 7));
              q[0] = -8;
              q[q.size() - 1] = 7;
              std::vector<uint16_t> s(static_cast<size_t>(K / G * N));
              for (size_t i = 0; i < s.size(); ++i)  // every fifth scale negative
                s[i] = f32_to_bf16_bits((i % 5 == 4 ? -1.0f : 1.0f) * (std::fabs(rng.bf16_value(-14, 2)) + 0x1p-14f));
              *payload = pack_q4g(q, s, K, N, G);
            } else if (scheme == Scheme::kF8) {
              std::vector<uint8_t> codes(static_cast<size_t>(K * N));
              for (auto& v : codes) v = f8_code(rng);
              // Subnormals, zeros and the extremes at fixed places.
              const uint8_t special[] = {0x00, 0x80, 0x01, 0x81, 0x07, 0x87, 0x08, 0x7e, 0xfe, 0x38};
              for (size_t i = 0; i < std::size(special) && i < codes.size(); ++i) codes[i * codes.size() / std::size(special)] = special[i];
              std::vector<uint16_t> s(static_cast<size_t>(N));
              for (size_t i = 0; i < s.size(); ++i)
                s[i] = f32_to_bf16_bits((i % 5 == 4 ? -1.0f : 1.0f) * (std::fabs(rng.bf16_value(-12, 2)) + 0x1p-12f));
              if (big_scales) {  // every third column near 2^119 (codes below 2^-5 keep the sums finite)
                for (auto& v : codes) v = static_cast<uint8_t>(v & 0x8f);
                for (size_t i = 0; i < s.size(); i += 3) s[i] = f32_to_bf16_bits(std::ldexp(1.0f + static_cast<float>(i % 7) / 8.0f, 119));
              }
              *payload = pack_f8col(codes, s, K, N);
            } else {
              wbf->resize(static_cast<size_t>(K * N));
              for (auto& v : *wbf) v = rng.bf16_bits(-10, 2);
            }
            auto mask = std::make_shared<std::vector<uint8_t>>(strided_mask(M, N, ldy));
            return [=](Twin twin, Pool pool) {
              std::vector<float> y(static_cast<size_t>(M * ldy));
              poison(y);
              const bool ref = twin == Twin::kRef;
              Status st;
              if (scheme == Scheme::kQ4) {
                auto fn = f32 ? (ref ? matmul_q4_f32_ref : matmul_q4_f32) : (ref ? matmul_q4_ref : matmul_q4);
                st = fn(x->data(), M, K, ldx, payload->data(), G, N, y.data(), ldy, pool, sum_rows);
              } else if (scheme == Scheme::kF8) {
                auto fn = f32 ? (ref ? matmul_f8_f32_ref : matmul_f8_f32) : (ref ? matmul_f8_ref : matmul_f8);
                st = fn(x->data(), M, K, ldx, payload->data(), N, y.data(), ldy, pool, sum_rows);
              } else {
                auto fn = f32 ? (ref ? matmul_bf16_f32_ref : matmul_bf16_f32) : (ref ? matmul_bf16_ref : matmul_bf16);
                st = fn(x->data(), M, K, ldx, wbf->data(), N, y.data(), ldy, pool, sum_rows);
              }
              EXPECT_TRUE(st.ok());
              Output out;
              out.add(y.data(), y.size(), *mask);
              return out;
            };
          }};
}

KernelCase case_rmsnorm(int64_t M, int64_t D, bool in_place) {
  std::string name = "rmsnorm_M" + std::to_string(M) + "_D" + std::to_string(D) + (in_place ? "_in_place" : "");
  return {name, 0, [=]() -> CaseRunner {
            Rng rng(static_cast<uint64_t>(M * 31 + D * 17 + (in_place ? 1 : 0)));
            auto x = std::make_shared<std::vector<float>>(static_cast<size_t>(M * D));
            for (int64_t m = 0; m < M; ++m)  // rows of very different magnitudes
              for (int64_t d = 0; d < D; ++d) (*x)[static_cast<size_t>(m * D + d)] = rng.bf16_value(-12 + static_cast<int>(m % 9), -4 + static_cast<int>(m % 9) * 2);
            auto scale = std::make_shared<std::vector<float>>(static_cast<size_t>(D));
            for (auto& s : *scale) s = rng.bf16_value(-2, 1);
            return [=](Twin twin, Pool pool) {
              std::vector<float> out(static_cast<size_t>(M * D));
              auto fn = twin == Twin::kRef ? rmsnorm_ref : rmsnorm;
              if (in_place) {
                out = *x;
                EXPECT_TRUE(fn(out.data(), M, D, scale->data(), 1e-5f, out.data(), pool).ok());
              } else {
                poison(out);
                EXPECT_TRUE(fn(x->data(), M, D, scale->data(), 1e-5f, out.data(), pool).ok());
              }
              Output o;
              o.add_all(out.data(), out.size());
              return o;
            };
          }};
}

KernelCase case_rope(int64_t M, int64_t heads, int64_t dh) {
  std::string name = "rope_M" + std::to_string(M) + "_H" + std::to_string(heads) + "_dh" + std::to_string(dh);
  return {name, 0, [=]() -> CaseRunner {
            Rng rng(static_cast<uint64_t>(M * 131 + heads * 13 + dh));
            auto x = std::make_shared<std::vector<float>>(static_cast<size_t>(M * heads * dh));
            for (auto& v : *x) v = rng.bf16_value(-6, 3);
            auto pos = std::make_shared<std::vector<int32_t>>(static_cast<size_t>(M));
            for (auto& p : *pos) p = static_cast<int32_t>(rng.range(0, 8191));
            (*pos)[0] = 8191;
            if (M > 1) (*pos)[1] = 0;
            return [=](Twin twin, Pool pool) {
              std::vector<float> v = *x;  // in place
              auto fn = twin == Twin::kRef ? rope_ref : rope;
              EXPECT_TRUE(fn(v.data(), M, heads, dh, pos->data(), 10000.0, pool).ok());
              Output o;
              o.add_all(v.data(), v.size());
              return o;
            };
          }};
}

// Query positions: kPrefill puts the M rows at the last M positions of the cache (a
// prefill chunk), kRandom anywhere in [0, 8191] (also past n_keys).
enum class QueryPos { kPrefill, kRandom };

KernelCase case_attention(int64_t M, int64_t Hq, int64_t KV, int64_t dh, int64_t n_keys, QueryPos qp, float multiplier,
                          bool no_visible_key) {
  std::string name = "attention_M" + std::to_string(M) + "_Hq" + std::to_string(Hq) + "_KV" + std::to_string(KV) +
                     "_dh" + std::to_string(dh) + "_keys" + std::to_string(n_keys) +
                     (qp == QueryPos::kPrefill ? "_prefill" : "_randpos") + (multiplier >= 1.0f ? "_capped" : "") +
                     (no_visible_key ? "_novisible" : "");
  return {name, 0, [=]() -> CaseRunner {
            Rng rng(static_cast<uint64_t>(M * 3 + Hq * 5 + KV * 7 + dh * 11 + n_keys * 13 + (no_visible_key ? 1 : 0)));
            AttentionShape sh{Hq, KV, dh, n_keys + 5, multiplier, 30.0f};
            auto q = std::make_shared<std::vector<float>>(static_cast<size_t>(M * Hq * dh));
            for (auto& v : *q) v = rng.bf16_value(-4, 2);
            auto kc = std::make_shared<std::vector<uint16_t>>(static_cast<size_t>(KV * sh.cap * dh));
            auto vc = std::make_shared<std::vector<uint16_t>>(kc->size());
            for (auto& v : *kc) v = rng.bf16_bits(-4, 1);
            for (auto& v : *vc) v = rng.bf16_bits(-6, 2);
            auto valid = std::make_shared<std::vector<uint8_t>>(static_cast<size_t>(sh.cap), 1);
            for (int64_t j = 0; j < n_keys; ++j) (*valid)[static_cast<size_t>(j)] = rng.range(0, 4) == 0 ? 0 : 1;
            for (int64_t j = 0; j < std::min<int64_t>(3, n_keys - 1); ++j) (*valid)[static_cast<size_t>(j)] = 0;  // left padding
            auto pos = std::make_shared<std::vector<int32_t>>(static_cast<size_t>(M));
            for (int64_t m = 0; m < M; ++m)
              (*pos)[static_cast<size_t>(m)] = qp == QueryPos::kPrefill ? static_cast<int32_t>(n_keys - M + m)
                                                                        : static_cast<int32_t>(rng.range(0, 8191));
            if (no_visible_key) (*pos)[0] = static_cast<int32_t>(std::min<int64_t>(2, n_keys - 2));  // keys 0..2 are padding
            auto mask = std::make_shared<std::vector<uint8_t>>(q->size(), 1);
            return [=](Twin twin, Pool pool) {
              std::vector<float> o(q->size());
              poison(o);
              auto fn = twin == Twin::kRef ? attention_ref : attention;
              EXPECT_TRUE(fn(q->data(), M, pos->data(), kc->data(), vc->data(), valid->data(), n_keys, sh, o.data(), pool).ok());
              Output out;
              out.add(o.data(), o.size(), *mask);
              return out;
            };
          }};
}

KernelCase case_router(int64_t M, int64_t D, int64_t E, int64_t k) {
  std::string name = "router_topk_M" + std::to_string(M) + "_D" + std::to_string(D) + "_E" + std::to_string(E) + "_k" +
                     std::to_string(k);
  return {name, 0, [=]() -> CaseRunner {
            Rng rng(static_cast<uint64_t>(M * 101 + D * 103 + E * 107 + k));
            auto x = std::make_shared<std::vector<float>>(static_cast<size_t>(M * D));
            for (auto& v : *x) v = rng.bf16_value(-6, 2);
            auto w = std::make_shared<std::vector<float>>(static_cast<size_t>(D * E));
            for (auto& v : *w) v = rng.f32(-0.5f, 0.5f);
            if (E >= 3) {  // expert E-1 duplicates expert 1: exact ties in every row
              for (int64_t d = 0; d < D; ++d) (*w)[static_cast<size_t>(d * E + E - 1)] = (*w)[static_cast<size_t>(d * E + 1)];
            }
            return [=](Twin twin, Pool pool) {
              std::vector<int32_t> experts(static_cast<size_t>(M * k));
              std::vector<float> gates(static_cast<size_t>(M * k));
              poison(experts);
              poison(gates);
              auto fn = twin == Twin::kRef ? router_topk_ref : router_topk;
              EXPECT_TRUE(fn(x->data(), M, D, w->data(), E, k, experts.data(), gates.data(), pool).ok());
              for (int32_t e : experts) EXPECT_TRUE(e >= 0 && e < E) << e;
              Output out;
              out.add_all(experts.data(), experts.size());
              out.add_all(gates.data(), gates.size());
              return out;
            };
          }};
}

// alias: 0 separate output, 1 h = g, 2 h = u.
KernelCase case_gelu_mul(int64_t n, int alias) {
  std::string name = "gelu_mul_n" + std::to_string(n) + (alias == 1 ? "_h_is_g" : alias == 2 ? "_h_is_u" : "");
  return {name, 0, [=]() -> CaseRunner {
            Rng rng(static_cast<uint64_t>(n * 3 + alias));
            auto g = std::make_shared<std::vector<float>>(static_cast<size_t>(n));
            auto u = std::make_shared<std::vector<float>>(static_cast<size_t>(n));
            for (auto& v : *g) v = rng.range(0, 15) == 0 ? rng.f32(-40.0f, 40.0f) : rng.f32(-6.0f, 6.0f);
            for (auto& v : *u) v = rng.f32(-4.0f, 4.0f);
            return [=](Twin twin, Pool pool) {
              std::vector<float> gg = *g, uu = *u, h(static_cast<size_t>(n));
              poison(h);
              float* dst = alias == 1 ? gg.data() : alias == 2 ? uu.data() : h.data();
              auto fn = twin == Twin::kRef ? gelu_mul_ref : gelu_mul;
              EXPECT_TRUE(fn(gg.data(), uu.data(), n, dst, pool).ok());
              Output out;
              out.add_all(alias == 1 ? gg.data() : alias == 2 ? uu.data() : h.data(), static_cast<size_t>(n));
              return out;
            };
          }};
}

// The logits' output multiplier: bf16(bf16(x) * m), in place or not; x spans many
// magnitudes, with bf16 halfway cases and values that overflow to inf after rounding.
KernelCase case_scale_bf16(int64_t n, bool in_place) {
  std::string name = "scale_bf16_n" + std::to_string(n) + (in_place ? "_in_place" : "");
  return {name, 0, [=]() -> CaseRunner {
            Rng rng(static_cast<uint64_t>(n * 5 + (in_place ? 1 : 0)));
            auto x = std::make_shared<std::vector<float>>(static_cast<size_t>(n));
            // (The harness wants finite outputs; KernelNumerics.ScaleBf16KeepsTheSpecials has the rest.)
            const float specials[] = {0.0f, -0.0f, 3.0e38f, -3.0e38f, 1.00390625f, 1.01171875f, -1.00390625f};
            for (auto& v : *x) {
              const int64_t pick = rng.range(0, 40);
              v = pick < 7 ? specials[pick] : rng.f32(-1.0f, 1.0f) * std::ldexp(1.0f, static_cast<int>(rng.range(0, 60)) - 30);
            }
            return [=](Twin twin, Pool pool) {
              std::vector<float> xx = *x, out(static_cast<size_t>(n));
              poison(out);
              float* dst = in_place ? xx.data() : out.data();
              auto fn = twin == Twin::kRef ? scale_bf16_ref : scale_bf16;
              EXPECT_TRUE(fn(xx.data(), n, 0.5773502691896257f, dst, pool).ok());
              Output o;
              o.add_all(dst, static_cast<size_t>(n));
              return o;
            };
          }};
}

std::vector<KernelCase> all_cases() {
  std::vector<KernelCase> c;
  // matmul_q8 and matmul_q8_f32: {M, K, N, blocks}; K % blocks == 0. K = 150 / B2 and
  // 560 / B8 give blocks of 75 and 70 rows (odd), so pairs of rows straddle scale blocks
  // and the kernel's 64-row tiles; N = 32, 64 are whole SIMD tiles, the others leave a
  // masked last tile (AVX-512) or a scalar tail (AVX2: past the last 8-column group where
  // M <= 4, past the last 32-column tile otherwise); odd K leaves a last pair of one; the
  // AVX2 walk of M <= 4 steps four rows at a time, so K and the chains leave 1 to 3 rows,
  // and 32, 16 or 8 columns at a time (M 1-2, 3, 4), so N leaves 8-column groups after
  // the last step.
  const int64_t q8[][4] = {{1, 1, 1, 1},     {1, 6, 17, 2},    {2, 30, 33, 1},  {3, 24, 47, 8},   {7, 150, 100, 2},
                           {33, 40, 16, 8},  {1, 560, 129, 8}, {2, 130, 32, 1}, {7, 9, 300, 1},   {33, 100, 31, 2},
                           {3, 136, 65, 8},  {1, 200, 257, 8}, {7, 2, 15, 2},   {2, 1000, 48, 8}, {33, 66, 129, 2},
                           {1, 63, 64, 1},   {3, 127, 33, 1},  {4, 150, 100, 2}, {4, 561, 129, 3}, {3, 130, 40, 1},
                           {4, 7, 8, 1},     {5, 64, 41, 2}};
  for (const auto& p : q8) {
    c.push_back(case_matmul_q8(p[0], p[1], p[2], p[3], 0));
    c.push_back(case_matmul_q8(p[0], p[1], p[2], p[3], 0, true));
  }
  c.push_back(case_matmul_q8(3, 150, 100, 2, 3));
  c.push_back(case_matmul_q8(7, 24, 33, 8, 1));
  c.push_back(case_matmul_q8(2, 65, 64, 5, 0));
  c.push_back(case_matmul_q8(3, 150, 100, 2, 3, true));
  c.push_back(case_matmul_q8(2, 129, 96, 3, 1, true));
  // Independent chains combined by the tree (the row-split products): 2, 3, 8, 16 chains,
  // chains shorter and longer than the kernels' 64-row blocks.
  c.push_back(case_matmul_q8(1, 256, 96, 8, 0, false, 16));
  c.push_back(case_matmul_q8(3, 192, 70, 2, 1, false, 64));
  c.push_back(case_matmul_q8(2, 256, 64, 8, 0, true, 128));
  c.push_back(case_matmul_q8(5, 96, 33, 1, 0, true, 12));
  c.push_back(case_matmul_q8(4, 192, 72, 4, 0, false, 32));
  c.push_back(case_matmul_q8(3, 256, 56, 8, 0, true, 64));
  c.push_back(case_matmul_q8(1, 24, 40, 3, 0, false, 8));
  // Prefill-sized with chains (M N chains > 2^22): the AVX-512 tiles that walk the chains'
  // tree themselves; 12 and 24 chains (not powers of two), a partial last tile.
  c.push_back(case_matmul_q8(600, 384, 600, 2, 0, false, 32));
  c.push_back(case_matmul_q8(500, 384, 360, 3, 0, true, 16));
  c.push_back(case_matmul_q8(600, 224, 500, 1, 0, false, 16));  // 14 chains: three subtrees left at the end
  c.push_back(case_matmul_q8(0, 64, 40, 2, 0));  // M = 0: nothing to write, nothing written
  c.push_back(case_matmul_q8(0, 64, 40, 2, 0, true));
  // Several products of one x: the decode plan shared (M = 1, 2; chains), one operand,
  // one chain (each its own plan), prefill-sized (each its own plan), M = 0.
  c.push_back(case_matmul_q8_multi(1, 256, {96, 33, 64}, 16));
  c.push_back(case_matmul_q8_multi(2, 128, {100, 7}, 32));
  c.push_back(case_matmul_q8_multi(4, 128, {96, 40}, 32));
  c.push_back(case_matmul_q8_multi(1, 64, {40}, 8));
  c.push_back(case_matmul_q8_multi(1, 64, {40, 50}, 0));
  c.push_back(case_matmul_q8_multi(600, 512, {120, 33}, 8));
  c.push_back(case_matmul_q8_multi(0, 64, {10, 20}, 16));
  // matmul_bf16_nt: {M, K, N}; K off and on multiples of 32 (the lanes' block), N off
  // multiples of 4 (the AVX-512 rows in flight).
  const int64_t nt[][3] = {{1, 1, 1},   {1, 7, 9},     {2, 9, 31},  {3, 15, 33},  {5, 17, 100}, {7, 100, 7},
                           {33, 257, 65}, {4, 32, 32}, {1, 1023, 5}, {6, 33, 129}, {2, 64, 3},   {3, 95, 18}};
  for (const auto& p : nt) c.push_back(case_matmul_bf16_nt(p[0], p[1], p[2], 0));
  c.push_back(case_matmul_bf16_nt(7, 23, 37, 3));
  c.push_back(case_matmul_bf16_nt(0, 23, 37, 0));
  // The quantized schemes. matmul_q4, matmul_f8 and their _f32 twins: {M, K, N, G, sum_rows};
  // K a multiple of 32 (32 itself too), N off and on multiples of 16 (the AVX-512 column
  // groups: N % 16 leaves a partial group, N < 16 only one), chains of one chunk and more,
  // groups of 1..4 chunks, M in every row-block shape (1, 2, 3, 4, then blocks of 4 and a
  // rest), chains longer than 16 chunks (walked in tiles, over several column blocks).
  const int64_t qw[][5] = {{1, 32, 1, 32, 0},      {1, 64, 17, 32, 0},     {2, 128, 33, 64, 0},   {3, 256, 47, 128, 0},
                           {7, 96, 100, 32, 0},    {33, 64, 31, 64, 0},    {1, 1024, 129, 128, 0}, {4, 64, 16, 32, 0},
                           {5, 128, 250, 64, 0},   {1, 256, 300, 32, 64},  {2, 512, 65, 64, 128}, {3, 384, 40, 128, 128},
                           {7, 256, 17, 32, 32},   {1, 512, 48, 32, 32},   {33, 128, 70, 32, 64}, {2, 256, 129, 128, 128},
                           {1, 2048, 37, 128, 0},  {6, 64, 35, 32, 32},    {3, 1024, 50, 64, 0},  {33, 640, 40, 32, 0},
                           {2, 1024, 300, 32, 0},  {4, 2048, 70, 128, 1024},
                           // From 8 (bf16 x) or 12 (fp32 x) rows of x on, the panels (chunk_panels.h): 8
                           // columns, two rows of x at a time and a last one alone, chains longer than a
                           // panel (32 chunks for bf16 x, 16 for fp32), blocks of 64 rows of x and a rest,
                           // the chains' tree in the panels with 3, 12, 14 and 24 chains.
                           {8, 64, 9, 32, 0},      {9, 2048, 37, 64, 0},   {70, 1088, 21, 64, 0}, {17, 1024, 50, 128, 256},
                           {11, 96, 8, 32, 32},    {13, 384, 20, 32, 32},  {12, 448, 17, 32, 32}, {15, 768, 9, 32, 32},
                           {13, 4096, 17, 64, 2048}, {66, 256, 40, 32, 64},
                           // AVX2 from 6 rows of x on: panels of three columns (one or two left at
                           // the end), rows of x by three and one, for chains up to 64 chunks; a
                           // longer chain takes the walk. Several triples per block, chains longer
                           // than a tile (16 chunks) with their sums parked: two chains of 41 chunks
                           // (a last tile of 9), blocks of 9 columns and a last one of 5.
                           {6, 4096, 19, 128, 0},  {7, 2080, 5, 32, 0},    {10, 2624, 23, 32, 1312}};
  for (const auto& p : qw) {
    for (bool f32 : {false, true}) {
      c.push_back(case_matmul_w(Scheme::kQ4, p[0], p[1], p[2], p[3], 0, f32, p[4]));
      c.push_back(case_matmul_w(Scheme::kF8, p[0], p[1], p[2], 32, 0, f32, p[4]));
    }
  }
  for (bool f32 : {false, true}) {
    c.push_back(case_matmul_w(Scheme::kQ4, 3, 128, 100, 64, 3, f32));
    c.push_back(case_matmul_w(Scheme::kQ4, 7, 96, 33, 32, 1, f32, 32));
    c.push_back(case_matmul_w(Scheme::kF8, 3, 128, 100, 32, 3, f32));
    c.push_back(case_matmul_w(Scheme::kF8, 7, 96, 33, 32, 1, f32, 32));
    c.push_back(case_matmul_w(Scheme::kF8, 3, 128, 40, 32, 0, f32, 0, true));  // scales >= 2^119
    c.push_back(case_matmul_w(Scheme::kF8, 1, 64, 20, 32, 0, f32, 32, true));
    c.push_back(case_matmul_w(Scheme::kF8, 9, 1088, 20, 32, 0, f32, 0, true));
    c.push_back(case_matmul_w(Scheme::kQ4, 0, 64, 40, 32, 0, f32));  // M = 0: nothing written
    c.push_back(case_matmul_w(Scheme::kF8, 0, 64, 40, 32, 0, f32));
  }
  // Many rows and many chains: the column tasks with a tree per task (M N chains > 2^22).
  c.push_back(case_matmul_w(Scheme::kQ4, 65, 512, 4100, 32, 0, false, 32));
  c.push_back(case_matmul_w(Scheme::kF8, 65, 512, 4100, 32, 0, true, 32));
  // matmul_bf16 and matmul_bf16_f32 (the int8 products' shapes): {M, K, N, sum_rows}.
  const int64_t bw[][4] = {{1, 1, 1, 0},    {1, 6, 17, 2},    {2, 30, 33, 0},   {3, 24, 47, 8},  {7, 150, 100, 0},
                           {33, 40, 16, 0}, {1, 560, 129, 70}, {2, 130, 32, 0}, {7, 9, 300, 0},  {33, 100, 31, 0},
                           {1, 63, 64, 0},  {3, 127, 33, 0},  {1, 256, 96, 16}, {3, 192, 70, 64}, {5, 96, 33, 12},
                           {2, 1000, 48, 0}};
  for (const auto& p : bw) {
    c.push_back(case_matmul_w(Scheme::kBf16, p[0], p[1], p[2], 0, 0, false, p[3]));
    c.push_back(case_matmul_w(Scheme::kBf16, p[0], p[1], p[2], 0, 0, true, p[3]));
  }
  c.push_back(case_matmul_w(Scheme::kBf16, 3, 150, 100, 0, 3, false));
  c.push_back(case_matmul_w(Scheme::kBf16, 2, 129, 96, 0, 1, true));
  c.push_back(case_matmul_w(Scheme::kBf16, 7, 24, 33, 0, 1, false, 8));
  c.push_back(case_matmul_w(Scheme::kBf16, 0, 64, 40, 0, 0, false));
  c.push_back(case_matmul_w(Scheme::kBf16, 0, 64, 40, 0, 0, true));
  c.push_back(case_matmul_w(Scheme::kBf16, 65, 32, 4100, 0, 0, false, 2));
  c.push_back(case_matmul_w(Scheme::kBf16, 65, 32, 4100, 0, 0, true, 2));
  // rmsnorm: {M, D}.
  const int64_t rn[][2] = {{0, 5}, {1, 1}, {2, 7}, {3, 33}, {7, 129}, {33, 100}, {1, 6144}};
  for (const auto& p : rn) {
    c.push_back(case_rmsnorm(p[0], p[1], false));
    c.push_back(case_rmsnorm(p[0], p[1], true));
  }
  // rope: {M, heads, dh}.
  const int64_t rp[][3] = {{1, 1, 2}, {2, 3, 6}, {3, 2, 30}, {7, 5, 128}, {33, 1, 10}};
  for (const auto& p : rp) c.push_back(case_rope(p[0], p[1], p[2]));
  // attention: group sizes 1, 2, 3, 8; head_dim on and off multiples of 8.
  c.push_back(case_attention(1, 1, 1, 1, 1, QueryPos::kPrefill, 1.0f, false));
  c.push_back(case_attention(1, 2, 2, 7, 5, QueryPos::kPrefill, 0.25f, false));
  c.push_back(case_attention(2, 4, 2, 8, 40, QueryPos::kPrefill, 0.125f, false));
  c.push_back(case_attention(3, 6, 2, 9, 40, QueryPos::kPrefill, 0.0883883476f, false));
  c.push_back(case_attention(7, 8, 1, 33, 100, QueryPos::kPrefill, 0.0883883476f, false));
  c.push_back(case_attention(7, 3, 3, 16, 300, QueryPos::kRandom, 0.0883883476f, false));
  c.push_back(case_attention(3, 4, 1, 128, 64, QueryPos::kPrefill, 4.0f, false));
  c.push_back(case_attention(2, 2, 1, 17, 8192, QueryPos::kRandom, 0.0883883476f, false));
  c.push_back(case_attention(3, 2, 2, 12, 20, QueryPos::kRandom, 0.25f, true));
  // Blocks of four queries (AVX-512, 4+ rows): a head of 128, a partial last block, a
  // block holding a query with no visible key.
  c.push_back(case_attention(6, 4, 2, 128, 70, QueryPos::kPrefill, 0.0883883476f, false));
  c.push_back(case_attention(8, 2, 2, 128, 300, QueryPos::kRandom, 0.0883883476f, false));
  c.push_back(case_attention(9, 2, 1, 24, 50, QueryPos::kRandom, 0.25f, false));
  c.push_back(case_attention(5, 2, 2, 12, 20, QueryPos::kRandom, 0.25f, true));
  c.push_back(case_attention(1, 4, 2, 8, 6, QueryPos::kPrefill, 0.25f, true));
  // router_topk: {M, D, E, k}.
  const int64_t rt[][4] = {{1, 1, 1, 1}, {3, 7, 3, 2}, {7, 33, 8, 2}, {33, 100, 9, 3}, {2, 6144 / 64, 5, 5}, {7, 13, 16, 4}};
  for (const auto& p : rt) c.push_back(case_router(p[0], p[1], p[2], p[3]));
  // gelu_mul: chunks of 256 per task.
  for (int64_t n : {0, 1, 7, 255, 256, 257, 1000, 5003}) c.push_back(case_gelu_mul(n, 0));
  c.push_back(case_gelu_mul(1001, 1));
  c.push_back(case_gelu_mul(777, 2));
  // scale_bf16: chunks of 4096 per task.
  for (int64_t n : {0, 1, 17, 4095, 4096, 4097, 131073}) c.push_back(case_scale_bf16(n, false));
  c.push_back(case_scale_bf16(9000, true));
  return c;
}

// gtest prints a failing case's parameter: its name, not its bytes.
void PrintTo(const KernelCase& c, std::ostream* os) { *os << c.name; }

class KernelParity : public ::testing::TestWithParam<KernelCase> {};

void expect_same(const Output& want, const Output& got, uint32_t max_ulps, const std::string& what) {
  ASSERT_EQ(want.words.size(), got.words.size()) << what;
  size_t unwritten = 0, clobbered = 0, differ = 0, first_bad = SIZE_MAX;
  for (size_t i = 0; i < got.words.size(); ++i) {
    const bool is_unwritten = got.written[i] != 0 && got.words[i] == kPoison;
    const bool is_clobbered = got.written[i] == 0 && got.words[i] != kPoison;
    // Within budget: bit for bit at 0, else the distance in fp32 bit patterns (ulps).
    const int64_t d = static_cast<int64_t>(got.words[i]) - static_cast<int64_t>(want.words[i]);
    const bool is_different = std::llabs(d) > static_cast<int64_t>(max_ulps);
    unwritten += is_unwritten ? 1 : 0;
    clobbered += is_clobbered ? 1 : 0;
    differ += is_different ? 1 : 0;
    if ((is_unwritten || is_clobbered || is_different) && first_bad == SIZE_MAX) first_bad = i;
  }
  if (max_ulps == 0 && !got.words.empty()) {
    EXPECT_EQ(std::memcmp(want.words.data(), got.words.data(), got.words.size() * 4), 0) << what;
  }
  EXPECT_EQ(unwritten, 0u) << what << ": elements left unwritten";
  EXPECT_EQ(clobbered, 0u) << what << ": elements written outside the output";
  EXPECT_EQ(differ, 0u) << what << ": elements differ from the scalar twin; first at word " << first_bad
                        << ": want 0x" << std::hex << want.words[first_bad] << " (" << from_bits(want.words[first_bad])
                        << "), got 0x" << got.words[first_bad] << " (" << from_bits(got.words[first_bad]) << ")";
}

TEST_P(KernelParity, SimdAndThreadsEqualScalar) {
  const KernelCase& kc = GetParam();
  CaseRunner run = kc.make();
  const Output want = run(Twin::kRef, nullptr);
  // The reference itself: fully written, nothing outside, nothing but finite values.
  expect_same(want, want, 0, "scalar twin");
  for (size_t i = 0; i < want.words.size(); ++i) {
    if (want.written[i] != 0) {
      ASSERT_TRUE(std::isfinite(from_bits(want.words[i]))) << "word " << i;
    }
  }
  struct Variant {
    Twin twin;
    unsigned threads;
    const char* label;
  };
  const Variant variants[] = {{Twin::kRef, 0, "scalar twin, again"}, {Twin::kRef, 3, "scalar twin, 3 threads"},
                              {Twin::kSimd, 0, "simd twin, no pool"}, {Twin::kSimd, 1, "simd twin, 1 thread"},
                              {Twin::kSimd, 2, "simd twin, 2 threads"}, {Twin::kSimd, 3, "simd twin, 3 threads"},
                              {Twin::kSimd, 3, "simd twin, 3 threads, again"}};
  for (const auto& v : variants) {
    expect_same(want, run(v.twin, pool_of(v.threads)), kc.max_ulps, std::string(v.label) + " (" + cpu_kernel_path() + ")");
  }
}

INSTANTIATE_TEST_SUITE_P(Ops, KernelParity, ::testing::ValuesIn(all_cases()),
                         [](const ::testing::TestParamInfo<KernelCase>& info) { return info.param.name; });

// ---------------------------------------------------------------------------------
// 2. Numerics of the scalar twins on tiny hand-made inputs.

constexpr uint16_t kOne = 0x3f80;  // bf16 1.0

// One-hot rows of x read single rows of the dequantized matrix: y = w[k, :].
std::vector<float> q8_rows(const std::vector<int8_t>& codes, const std::vector<uint16_t>& scales, int64_t K, int64_t N,
                           int64_t blocks) {
  std::vector<float> x(static_cast<size_t>(K * K), 0.0f), y(static_cast<size_t>(K * N));
  for (int64_t k = 0; k < K; ++k) x[static_cast<size_t>(k * K + k)] = 1.0f;
  EXPECT_TRUE(matmul_q8_ref(x.data(), K, K, K, codes.data(), scales.data(), N, blocks, y.data(), N, nullptr).ok());
  return y;
}

TEST(KernelNumerics, MatmulQ8DequantizesToBf16OfCodeTimesScale) {
  // Scales 1 + 2^-7 (0x3f81) and 1 + 3*2^-7 (0x3f83). bf16 keeps 8 significant bits.
  //   3 * (1 + 2^-7)   = 3 + 1.5 * 2^-6: a tie between 3 + 2^-6 (odd) and 3 + 2^-5 (even) -> 3.03125
  //   5 * (1 + 2^-7)   = 5 + 1.25 * 2^-5: below the half -> 5 + 2^-5 = 5.03125
  //   3 * (1 + 3*2^-7) = 3 + 4.5 * 2^-6: a tie between 3 + 4*2^-6 (even) and 5*2^-6 -> 3.0625
  //   -128 * (1 + 3*2^-7) = -(128 + 3): 131 needs 8 bits: exact -> -131
  //   127 * (1 + 2^-7) = 127 + 127/128 = 127.9921875: spacing 0.5 there -> 128
  //   -3 * (1 + 2^-7): the tie by symmetry -> -3.03125
  const std::vector<int8_t> codes = {3, 5, 3, -128, 127, -3};
  const std::vector<uint16_t> scales = {0x3f81, 0x3f81, 0x3f83, 0x3f83, 0x3f81, 0x3f81};
  std::vector<float> y = q8_rows(codes, scales, 1, 6, 1);
  const std::vector<float> want = {3.03125f, 5.03125f, 3.0625f, -131.0f, 128.0f, -3.03125f};
  for (size_t i = 0; i < want.size(); ++i) EXPECT_EQ(y[i], want[i]) << "column " << i;
}

TEST(KernelNumerics, MatmulQ8RowBlocksPickTheirScaleRow) {
  // K = 6, blocks = 3: rows {0,1} use scale row 0, {2,3} row 1, {4,5} row 2. Codes all 1
  // so each output is the scale itself; N = 2 with different scales per column.
  const int64_t K = 6, N = 2, B = 3;
  std::vector<int8_t> codes(static_cast<size_t>(K * N), 1);
  const std::vector<uint16_t> scales = {f32_to_bf16_bits(2.0f),  f32_to_bf16_bits(-0.5f),   // row 0
                                        f32_to_bf16_bits(4.0f),  f32_to_bf16_bits(0.25f),   // row 1
                                        f32_to_bf16_bits(-8.0f), f32_to_bf16_bits(0.125f)};  // row 2
  std::vector<float> y = q8_rows(codes, scales, K, N, B);
  const float want[6][2] = {{2, -0.5f}, {2, -0.5f}, {4, 0.25f}, {4, 0.25f}, {-8, 0.125f}, {-8, 0.125f}};
  for (int64_t k = 0; k < K; ++k)
    for (int64_t n = 0; n < N; ++n) EXPECT_EQ(y[static_cast<size_t>(k * N + n)], want[k][n]) << k << "," << n;
  // And through the SIMD twin, with N = 16 so the row goes through a whole SIMD tile.
  const int64_t N16 = 16;
  std::vector<int8_t> c16(static_cast<size_t>(K * N16), 1);
  std::vector<uint16_t> s16(static_cast<size_t>(B * N16));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t n = 0; n < N16; ++n) s16[static_cast<size_t>(b * N16 + n)] = f32_to_bf16_bits(static_cast<float>((b + 1) * 100 + n));
  std::vector<float> x(static_cast<size_t>(K * K), 0.0f), y16(static_cast<size_t>(K * N16));
  for (int64_t k = 0; k < K; ++k) x[static_cast<size_t>(k * K + k)] = 1.0f;
  ASSERT_TRUE(matmul_q8(x.data(), K, K, K, c16.data(), s16.data(), N16, B, y16.data(), N16, nullptr).ok());
  for (int64_t k = 0; k < K; ++k)
    for (int64_t n = 0; n < N16; ++n)
      EXPECT_EQ(y16[static_cast<size_t>(k * N16 + n)], round_bf16(static_cast<float>((k / 2 + 1) * 100 + n))) << k << "," << n;
}

// The pinned order of kernels.h, written out independently: terms taken in pairs
// (k, k+1), each pair adding term k+1 then term k to one fp32 sum.
float pinned_pair_sum(const std::vector<float>& terms, float acc = 0.0f) {
  for (size_t k = 0; k < terms.size(); k += 2) {
    if (k + 1 < terms.size()) acc = acc + terms[k + 1];
    acc = acc + terms[k];
  }
  return acc;
}

float q8_one(const std::vector<float>& x, bool f32) {
  const std::vector<int8_t> codes(x.size(), 1);
  const std::vector<uint16_t> scales = {kOne};
  const int64_t K = static_cast<int64_t>(x.size());
  float y = from_bits(kPoison);
  auto fn = f32 ? matmul_q8_f32_ref : matmul_q8_ref;
  EXPECT_TRUE(fn(x.data(), 1, K, K, codes.data(), scales.data(), 1, 1, &y, 1, nullptr, 0).ok());
  return y;
}

TEST(KernelNumerics, MatmulQ8ChainsMeetInAPairwiseTree) {
  // Terms (w = 1) 2^25, 1, 1, -2^25, 1, 1, 1, 1 in 4 chains of 2: each chain in the pair
  // order: (1 + 2^25) = 2^25 (1 lost), (-2^25 + 1) = -2^25 + 1 exactly? 2^25 - 1 needs 25
  // bits: it rounds to -2^25 (ties to even); (1 + 1) = 2, (1 + 1) = 2. Tree: (2^25 + -2^25)
  // + (2 + 2) = 4. One chain would give a different value.
  const std::vector<float> x = {0x1p25f, 1, 1, -0x1p25f, 1, 1, 1, 1};
  const std::vector<int8_t> codes(x.size(), 1);
  const std::vector<uint16_t> scales = {kOne};
  for (auto fn : {matmul_q8_ref, matmul_q8}) {
    float y4 = from_bits(kPoison), y1 = from_bits(kPoison);
    ASSERT_TRUE(fn(x.data(), 1, 8, 8, codes.data(), scales.data(), 1, 1, &y4, 1, nullptr, 2).ok());
    ASSERT_TRUE(fn(x.data(), 1, 8, 8, codes.data(), scales.data(), 1, 1, &y1, 1, nullptr, 0).ok());
    EXPECT_EQ(y4, 4.0f);
    EXPECT_NE(y4, y1);
  }
  // tree_sum itself: an odd last element is carried up.
  std::vector<float> v = {1, 2, 3, 4, 5};
  EXPECT_EQ(tree_sum(v.data(), 5), 15.0f);
}

TEST(KernelNumerics, MatmulQ8AccumulatesInThePinnedPairOrder) {
  // Terms (w = 1) 1, 2^27, -2^27, 1. The pinned order adds 2^27, 1 (lost: fp32 spacing at
  // 2^27 is 16), then 1 (lost), then -2^27: 0. Plain k order gives 1 (the last 1 lands
  // after the cancellation); the exact sum is 2.
  const float big = 134217728.0f;  // 2^27, a bf16 value
  const std::vector<float> x = {1.0f, big, -big, 1.0f};
  EXPECT_EQ(q8_one(x, false), 0.0f);
  EXPECT_EQ(pinned_pair_sum(x), 0.0f);
  // Odd K, the last pair has one term: terms -2^27, 2^27, 1: the pair adds 2^27 then
  // -2^27 (0), then the lone 1: 1.
  EXPECT_EQ(q8_one({-big, big, 1.0f}, false), 1.0f);
  // Terms 2^27, 1, -2^27: pair (1 then 2^27) = 2^27, then -2^27: 0 (exact would be 1).
  EXPECT_EQ(q8_one({big, 1.0f, -big}, false), 0.0f);
  // Random bf16 products: bit for bit against the transcription.
  Rng rng(21);
  const int64_t K = 37, N = 3;
  std::vector<float> xr(static_cast<size_t>(K));
  for (auto& v : xr) v = rng.bf16_value(-8, 8);
  std::vector<int8_t> codes(static_cast<size_t>(K * N));
  for (auto& c : codes) c = static_cast<int8_t>(rng.range(-128, 127));
  std::vector<uint16_t> scales(static_cast<size_t>(N));
  for (auto& sc : scales) sc = f32_to_bf16_bits(std::fabs(rng.bf16_value(-8, 0)) + 0x1p-10f);
  std::vector<float> y(static_cast<size_t>(N));
  ASSERT_TRUE(matmul_q8_ref(xr.data(), 1, K, K, codes.data(), scales.data(), N, 1, y.data(), N, nullptr).ok());
  for (int64_t n = 0; n < N; ++n) {
    std::vector<float> terms(static_cast<size_t>(K));
    for (int64_t k = 0; k < K; ++k) {
      const float w = round_bf16(static_cast<float>(codes[static_cast<size_t>(k * N + n)]) * bf16_bits_to_f32(scales[static_cast<size_t>(n)]));
      terms[static_cast<size_t>(k)] = xr[static_cast<size_t>(k)] * w;  // exact: bf16 times bf16
    }
    EXPECT_EQ(bits_of(y[static_cast<size_t>(n)]), bits_of(pinned_pair_sum(terms))) << n;
  }
}

TEST(KernelNumerics, MatmulQ8F32FusesEachProductInKOrder) {
  // x = [t, -t], w = [1 + 2^-7, 1 + 2^-7] (bf16 0x3f81), t = 1 + 3 * 2^-23 (fp32, not bf16).
  // t w = 1 + 2^-7 + 3*2^-23 + 3*2^-30 rounds (fma with 0) to 1 + 2^-7 + 3*2^-23; the second
  // fma adds -t w exactly: the result is the rounding error, -3 * 2^-30. An unfused
  // multiply-add would give 0.
  const float t = 1.0f + 3 * 0x1p-23f;
  const std::vector<float> x = {t, -t};
  const std::vector<int8_t> codes = {1, 1};
  const std::vector<uint16_t> scales = {0x3f81};
  float y = 0;
  ASSERT_TRUE(matmul_q8_f32_ref(x.data(), 1, 2, 2, codes.data(), scales.data(), 1, 1, &y, 1, nullptr).ok());
  EXPECT_EQ(y, -3 * 0x1p-30f);
  // Same SIMD twin.
  float ys = 0;
  ASSERT_TRUE(matmul_q8_f32(x.data(), 1, 2, 2, codes.data(), scales.data(), 1, 1, &ys, 1, nullptr).ok());
  EXPECT_EQ(bits_of(ys), bits_of(y));
  // k order, not pairs: terms 1, 2^27, -2^27, 1 (w = 1) -> ((1 + 2^27) - 2^27) + 1 = 1.
  EXPECT_EQ(q8_one({1.0f, 134217728.0f, -134217728.0f, 1.0f}, true), 1.0f);
  // Random fp32 activations against std::fma in k order.
  Rng rng(22);
  const int64_t K = 29;
  std::vector<float> xr(static_cast<size_t>(K));
  for (auto& v : xr) v = rng.f32(-5.0f, 5.0f);
  std::vector<int8_t> c(static_cast<size_t>(K));
  for (auto& v : c) v = static_cast<int8_t>(rng.range(-128, 127));
  const std::vector<uint16_t> s1 = {f32_to_bf16_bits(0.0123f)};
  ASSERT_TRUE(matmul_q8_f32_ref(xr.data(), 1, K, K, c.data(), s1.data(), 1, 1, &y, 1, nullptr).ok());
  float acc = 0;
  for (int64_t k = 0; k < K; ++k)
    acc = std::fma(xr[static_cast<size_t>(k)], round_bf16(static_cast<float>(c[static_cast<size_t>(k)]) * bf16_bits_to_f32(s1[0])), acc);
  EXPECT_EQ(bits_of(y), bits_of(acc));
}

// The lanes of kernels.h for matmul_bf16_nt, written out independently: lane i sums the
// pairs starting at k = 32 j + 2 i in the pinned order; lanes reduce by halving.
float lanes_dot(const std::vector<float>& terms) {
  float lane[16] = {};
  for (size_t k = 0; k < terms.size(); k += 2) {
    float& l = lane[(k % 32) / 2];
    if (k + 1 < terms.size()) l = l + terms[k + 1];
    l = l + terms[k];
  }
  for (int half = 8; half >= 1; half /= 2)
    for (int i = 0; i < half; ++i) lane[i] = lane[i] + lane[i + half];
  return lane[0];
}

float nt_one(const std::vector<float>& x, const std::vector<float>& w, bool simd = false) {
  std::vector<uint16_t> wb(w.size());
  for (size_t i = 0; i < w.size(); ++i) wb[i] = f32_to_bf16_bits(w[i]);
  float y = from_bits(kPoison);
  auto fn = simd ? matmul_bf16_nt : matmul_bf16_nt_ref;
  EXPECT_TRUE(fn(x.data(), 1, static_cast<int64_t>(x.size()), wb.data(), 1, &y, 1, nullptr).ok());
  return y;
}

TEST(KernelNumerics, MatmulBf16NtSumsLanesThenHalves) {
  const float big = 134217728.0f;  // 2^27
  // K = 64, w = 1. Lane 0 holds 2^27 (k = 0), lane 8 holds 1 (k = 16), lane 4 holds -2^27
  // (k = 8). Halving: lane 0 += lane 8 -> 2^27 (1 lost); lane 0 += lane 4 -> 0. Exact: 1.
  std::vector<float> x(64, 0.0f), w(64, 1.0f);
  x[0] = big;
  x[16] = 1.0f;
  x[8] = -big;
  EXPECT_EQ(nt_one(x, w), 0.0f);
  EXPECT_EQ(nt_one(x, w, true), 0.0f);
  // Lane 1 (k = 2) holds the 1 instead: it meets lane 0 only at the last step, after
  // lanes 0 and 4 cancelled: 1.
  x[16] = 0.0f;
  x[2] = 1.0f;
  EXPECT_EQ(nt_one(x, w), 1.0f);
  EXPECT_EQ(nt_one(x, w, true), 1.0f);
  // The second block of 32 lands in the same lanes: k = 32 -> lane 0 after k = 0, 1.
  std::vector<float> x2(40, 0.0f), w2(40, 1.0f);
  x2[0] = 1.0f;
  x2[1] = big;
  x2[32] = -big;
  x2[39] = 1.0f;  // lane 3, on its own: survives
  EXPECT_EQ(nt_one(x2, w2), 1.0f);  // lane 0: (2^27 + 1) - 2^27 = 0; plus lane 3's 1
  EXPECT_EQ(nt_one(x2, w2, true), 1.0f);
}

TEST(KernelNumerics, MatmulBf16NtEqualsADoublePrecisionDot) {
  // Integer-valued inputs (|x|, |w| <= 8): every partial sum is an integer below 2^24,
  // exact in fp32 in any order, so the result equals the double-precision dot exactly.
  Rng rng(42);
  const int64_t M = 3, K = 77, N = 5;
  std::vector<float> x(static_cast<size_t>(M * K));
  std::vector<uint16_t> w(static_cast<size_t>(N * K));
  for (auto& v : x) v = static_cast<float>(rng.range(-8, 8));
  for (auto& v : w) v = f32_to_bf16_bits(static_cast<float>(rng.range(-8, 8)));
  std::vector<float> y(static_cast<size_t>(M * N));
  ASSERT_TRUE(matmul_bf16_nt_ref(x.data(), M, K, w.data(), N, y.data(), N, nullptr).ok());
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {
      double dot = 0;
      for (int64_t k = 0; k < K; ++k)
        dot += static_cast<double>(x[static_cast<size_t>(m * K + k)]) * bf16_bits_to_f32(w[static_cast<size_t>(n * K + k)]);
      EXPECT_EQ(y[static_cast<size_t>(m * N + n)], static_cast<float>(dot)) << m << "," << n;
    }
  // Random bf16 values: bit for bit against the lanes written out, and within the fp32
  // error bound of the double-precision dot (K * 2^-24 * sum |x w| covers any order).
  const int64_t K2 = 333;
  std::vector<float> xr(static_cast<size_t>(K2)), wr(static_cast<size_t>(K2)), terms(static_cast<size_t>(K2));
  for (auto& v : xr) v = rng.bf16_value(-6, 3);
  for (auto& v : wr) v = rng.bf16_value(-6, 3);
  double dot = 0, mag = 0;
  for (size_t k = 0; k < terms.size(); ++k) {
    terms[k] = xr[k] * wr[k];
    dot += static_cast<double>(xr[k]) * wr[k];
    mag += std::fabs(static_cast<double>(xr[k]) * wr[k]);
  }
  const float got = nt_one(xr, wr);
  EXPECT_EQ(bits_of(got), bits_of(lanes_dot(terms)));
  EXPECT_NEAR(got, dot, static_cast<double>(K2) * 0x1p-24 * mag);
  // Hand-made: [1, 2, 3] . [0.5, -1, 2] = 4.5.
  EXPECT_EQ(nt_one({1, 2, 3}, {0.5f, -1.0f, 2.0f}), 4.5f);
}

// ---- The quantized schemes (SPEC.md §4.1). Payloads are packed by pack_q4g / pack_f8col
// above, the weights dequantized by q4_weight / f8_weight: both from the spec's words.

TEST(KernelNumerics, E4m3ToF32MatchesTheDefinitionForAll256Codes) {
  for (int v = 0; v < 256; ++v) {
    const auto code = static_cast<uint8_t>(v);
    const double want = e4m3_value(code);
    const float got = e4m3_to_f32(code);
    if (std::isnan(want)) {
      EXPECT_TRUE(std::isnan(got)) << "code 0x" << std::hex << v;
    } else {
      EXPECT_EQ(bits_of(got), bits_of(static_cast<float>(want))) << "code 0x" << std::hex << v << ": " << got << " vs " << want;
    }
  }
  // Landmarks: the largest finite value, the smallest subnormal, one, negative zero.
  EXPECT_EQ(e4m3_to_f32(0x7e), 448.0f);
  EXPECT_EQ(e4m3_to_f32(0xfe), -448.0f);
  EXPECT_EQ(e4m3_to_f32(0x01), 0x1p-9f);
  EXPECT_EQ(e4m3_to_f32(0x07), 7 * 0x1p-9f);
  EXPECT_EQ(e4m3_to_f32(0x08), 0x1p-6f);
  EXPECT_EQ(e4m3_to_f32(0x38), 1.0f);
  EXPECT_EQ(bits_of(e4m3_to_f32(0x80)), 0x80000000u);
  EXPECT_TRUE(std::isnan(e4m3_to_f32(0x7f)) && std::isnan(e4m3_to_f32(0xff)));
}

// A quantized matrix in both forms: the packed payload and the dequantized weights [K][N].
struct QuantMatrix {
  std::vector<uint8_t> payload;
  std::vector<float> w;
};
QuantMatrix q4_matrix(const std::vector<int8_t>& q, const std::vector<uint16_t>& s, int64_t K, int64_t N, int64_t G) {
  QuantMatrix m{pack_q4g(q, s, K, N, G), std::vector<float>(static_cast<size_t>(K * N))};
  for (int64_t k = 0; k < K; ++k)
    for (int64_t n = 0; n < N; ++n)
      m.w[static_cast<size_t>(k * N + n)] = q4_weight(q[static_cast<size_t>(k * N + n)], s[static_cast<size_t>((k / G) * N + n)]);
  return m;
}
QuantMatrix f8_matrix(const std::vector<uint8_t>& codes, const std::vector<uint16_t>& s, int64_t K, int64_t N) {
  QuantMatrix m{pack_f8col(codes, s, K, N), std::vector<float>(static_cast<size_t>(K * N))};
  for (int64_t k = 0; k < K; ++k)
    for (int64_t n = 0; n < N; ++n)
      m.w[static_cast<size_t>(k * N + n)] = f8_weight(codes[static_cast<size_t>(k * N + n)], s[static_cast<size_t>(n)]);
  return m;
}
QuantMatrix random_q4(Rng& rng, int64_t K, int64_t N, int64_t G) {
  std::vector<int8_t> q(static_cast<size_t>(K * N));
  for (auto& v : q) v = static_cast<int8_t>(rng.range(-8, 7));
  std::vector<uint16_t> s(static_cast<size_t>(K / G * N));
  for (auto& v : s) v = f32_to_bf16_bits(rng.bf16_value(-9, 1) + 0x1p-12f);
  return q4_matrix(q, s, K, N, G);
}
QuantMatrix random_f8(Rng& rng, int64_t K, int64_t N) {
  std::vector<uint8_t> codes(static_cast<size_t>(K * N));
  for (auto& v : codes) v = f8_code(rng);
  std::vector<uint16_t> s(static_cast<size_t>(N));
  for (auto& v : s) v = f32_to_bf16_bits(rng.bf16_value(-9, -2) + 0x1p-12f);
  return f8_matrix(codes, s, K, N);
}

// One product through a chunked op: scheme kQ4 (group G) or kF8, fp32 x or bf16 x, the
// scalar twin or the dispatching one.
Status chunked(Scheme scheme, bool f32, bool simd, const float* x, int64_t M, int64_t K, const QuantMatrix& w, int64_t G,
               int64_t N, float* y, int64_t sum_rows = 0, Pool pool = nullptr) {
  if (scheme == Scheme::kQ4) {
    auto fn = f32 ? (simd ? matmul_q4_f32 : matmul_q4_f32_ref) : (simd ? matmul_q4 : matmul_q4_ref);
    return fn(x, M, K, K, w.payload.data(), G, N, y, N, pool, sum_rows);
  }
  auto fn = f32 ? (simd ? matmul_f8_f32 : matmul_f8_f32_ref) : (simd ? matmul_f8 : matmul_f8_ref);
  return fn(x, M, K, K, w.payload.data(), N, y, N, pool, sum_rows);
}

TEST(KernelNumerics, ChunkedOneHotRowsReadTheDequantizedWeights) {
  // x = identity: y[k, :] = w[k, :], one nonzero product per sum, so exact (a zero weight
  // of either sign gives +0, equal as a value). Every code of
  // every nibble position (q4: -8 .. 7 in both nibbles of each byte) and every group's
  // scale row show up; N = 37 leaves a partial SIMD column group.
  const int64_t K = 256, N = 37;
  Rng rng(31);
  std::vector<float> x(static_cast<size_t>(K * K), 0.0f);
  for (int64_t k = 0; k < K; ++k) x[static_cast<size_t>(k * K + k)] = 1.0f;
  for (int64_t G : {32, 64, 128}) {
    std::vector<int8_t> q(static_cast<size_t>(K * N));
    for (size_t i = 0; i < q.size(); ++i) q[i] = static_cast<int8_t>(static_cast<int>((i * 7 + i / 37) % 16) - 8);
    std::vector<uint16_t> s(static_cast<size_t>(K / G * N));
    for (auto& v : s) v = f32_to_bf16_bits(rng.bf16_value(-6, 3));
    const QuantMatrix w = q4_matrix(q, s, K, N, G);
    for (bool f32 : {false, true})
      for (bool simd : {false, true}) {
        std::vector<float> y(static_cast<size_t>(K * N));
        ASSERT_TRUE(chunked(Scheme::kQ4, f32, simd, x.data(), K, K, w, G, N, y.data()).ok());
        EXPECT_EQ(y, w.w) << "q4 G" << G << (f32 ? " f32" : "") << (simd ? " simd" : " ref");
      }
  }
  std::vector<uint8_t> codes(static_cast<size_t>(K * N));
  for (size_t i = 0; i < codes.size(); ++i) codes[i] = static_cast<uint8_t>((i * 13 + i / 37) % 256);
  for (auto& cd : codes)
    if ((cd & 0x7f) == 0x7f) cd = 0x38;
  std::vector<uint16_t> s(static_cast<size_t>(N));
  for (auto& v : s) v = f32_to_bf16_bits(rng.bf16_value(-6, 3));
  const QuantMatrix w = f8_matrix(codes, s, K, N);
  for (bool f32 : {false, true})
    for (bool simd : {false, true}) {
      std::vector<float> y(static_cast<size_t>(K * N));
      ASSERT_TRUE(chunked(Scheme::kF8, f32, simd, x.data(), K, K, w, 32, N, y.data()).ok());
      EXPECT_EQ(y, w.w) << "f8" << (f32 ? " f32" : "") << (simd ? " simd" : " ref");
    }
}

TEST(KernelNumerics, ChunkedSingleNonzeroWeightGivesItsExactValue) {
  // All codes zero but one, at (k0, n0): y[m, n0] = x[m, k0] * w exactly, 0 elsewhere. Hand
  // values: q4 -8 with scale 0.375 (row 69: group 2 of 4 at G = 32) -> -3; 7 * (1 + 2^-7) =
  // 7.0546875, between the bf16 neighbours 7.03125 and 7.0625 and above their middle ->
  // 7.0625; f8 0xd6 = -(1 + 6/8) 2^3 = -14 with scale 0.75 -> -10.5; f8 0x03 = 3 * 2^-9
  // (subnormal) with scale 3 -> 9 * 2^-9.
  struct One {
    Scheme scheme;
    int64_t G, k0, n0;
    int code;
    float scale, want;
  };
  const One cases[] = {{Scheme::kQ4, 32, 64 + 5, 3, -8, 0.375f, -3.0f},   {Scheme::kQ4, 64, 64 + 33, 18, 7, 1.0078125f, 7.0625f},
                       {Scheme::kQ4, 128, 127, 0, -1, 2.0f, -2.0f},       {Scheme::kF8, 32, 40, 17, 0xd6, 0.75f, -10.5f},
                       {Scheme::kF8, 32, 127, 20, 0x03, 3.0f, 9 * 0x1p-9f}};
  const int64_t K = 128, N = 21, M = 3;
  Rng rng(32);
  std::vector<float> x(static_cast<size_t>(M * K));
  for (auto& v : x) v = rng.bf16_value(-4, 4);
  for (const One& c : cases) {
    QuantMatrix w;
    if (c.scheme == Scheme::kQ4) {
      std::vector<int8_t> q(static_cast<size_t>(K * N), 0);
      q[static_cast<size_t>(c.k0 * N + c.n0)] = static_cast<int8_t>(c.code);
      std::vector<uint16_t> s(static_cast<size_t>(K / c.G * N), f32_to_bf16_bits(1.0f));
      s[static_cast<size_t>((c.k0 / c.G) * N + c.n0)] = f32_to_bf16_bits(c.scale);
      w = q4_matrix(q, s, K, N, c.G);
    } else {
      std::vector<uint8_t> codes(static_cast<size_t>(K * N), 0);
      codes[static_cast<size_t>(c.k0 * N + c.n0)] = static_cast<uint8_t>(c.code);
      std::vector<uint16_t> s(static_cast<size_t>(N), f32_to_bf16_bits(1.0f));
      s[static_cast<size_t>(c.n0)] = f32_to_bf16_bits(c.scale);
      w = f8_matrix(codes, s, K, N);
    }
    EXPECT_EQ(w.w[static_cast<size_t>(c.k0 * N + c.n0)], c.want);
    for (bool f32 : {false, true})
      for (bool simd : {false, true}) {
        std::vector<float> y(static_cast<size_t>(M * N));
        ASSERT_TRUE(chunked(c.scheme, f32, simd, x.data(), M, K, w, c.G, N, y.data(), c.G).ok());
        for (int64_t m = 0; m < M; ++m)
          for (int64_t n = 0; n < N; ++n)
            EXPECT_EQ(y[static_cast<size_t>(m * N + n)], n == c.n0 ? x[static_cast<size_t>(m * K + c.k0)] * c.want : 0.0f)
                << "code " << c.code << " m " << m << " n " << n << (f32 ? " f32" : "") << (simd ? " simd" : " ref");
      }
  }
}

// The chunked order of kernels.h for one column, written out independently: 16 lanes per
// chain; per 32-row chunk, bf16 x: lane i adds x w at row 2i+1, then at 2i; fp32 x: lane
// i takes fma at row i, then at 16+i; lanes halved at the chain's end; chains in a tree.
float chunked_dot(const std::vector<float>& x, const std::vector<float>& w, bool f32, int64_t sum_rows) {
  const size_t K = x.size(), sr = sum_rows > 0 ? static_cast<size_t>(sum_rows) : K;
  std::vector<float> sums;
  for (size_t k0 = 0; k0 < K; k0 += sr) {
    float lane[16] = {};
    for (size_t c = k0; c < k0 + sr; c += 32) {
      for (size_t i = 0; i < 16; ++i) {
        if (f32) {
          lane[i] = std::fma(x[c + i], w[c + i], lane[i]);
          lane[i] = std::fma(x[c + 16 + i], w[c + 16 + i], lane[i]);
        } else {
          lane[i] = lane[i] + x[c + 2 * i + 1] * w[c + 2 * i + 1];
          lane[i] = lane[i] + x[c + 2 * i] * w[c + 2 * i];
        }
      }
    }
    for (int half = 8; half >= 1; half /= 2)
      for (int i = 0; i < half; ++i) lane[i] = lane[i] + lane[i + half];
    sums.push_back(lane[0]);
  }
  while (sums.size() > 1) {
    std::vector<float> next;
    for (size_t i = 0; i + 1 < sums.size(); i += 2) next.push_back(sums[i] + sums[i + 1]);
    if (sums.size() % 2 != 0) next.push_back(sums.back());
    sums = next;
  }
  return sums[0];
}

// x through a column of ones (q4: q = 1, scale 1; f8: 0x38 = 1, scale 1).
float chunked_ones(Scheme scheme, const std::vector<float>& x, bool f32, bool simd, int64_t sum_rows = 0) {
  const auto K = static_cast<int64_t>(x.size());
  const QuantMatrix w = scheme == Scheme::kQ4
                            ? q4_matrix(std::vector<int8_t>(x.size(), 1), std::vector<uint16_t>(x.size() / 32, kOne), K, 1, 32)
                            : f8_matrix(std::vector<uint8_t>(x.size(), 0x38), {kOne}, K, 1);
  float y = from_bits(kPoison);
  EXPECT_TRUE(chunked(scheme, f32, simd, x.data(), 1, K, w, 32, 1, &y, sum_rows).ok());
  return y;
}

TEST(KernelNumerics, ChunkedSumsLanesInTheirOrderThenHalves) {
  const float big = 134217728.0f;  // 2^27: fp32 spacing 16 there, so + 1 is lost
  for (Scheme scheme : {Scheme::kQ4, Scheme::kF8})
    for (bool simd : {false, true}) {
      const std::string what = std::string(scheme == Scheme::kQ4 ? "q4" : "f8") + (simd ? " simd" : " ref");
      // bf16 x, K = 32: x[0] -> lane 0, x[8] -> lane 4, x[16] -> lane 8, x[2] -> lane 1.
      // Lane 0 (2^27) += lane 8 (1): 2^27; += lane 4 (-2^27): 0. Exact: 1.
      std::vector<float> x(32, 0.0f);
      x[0] = big;
      x[8] = -big;
      x[16] = 1.0f;
      EXPECT_EQ(chunked_ones(scheme, x, false, simd), 0.0f) << what;
      // The 1 in lane 1 meets lane 0 only at the last step, after the cancellation: 1.
      x[16] = 0.0f;
      x[2] = 1.0f;
      EXPECT_EQ(chunked_ones(scheme, x, false, simd), 1.0f) << what;
      // Within a lane, row 2i+1 comes first: rows 1, 0 of chunk 0 then 33, 32 of chunk 1:
      // ((1 + 2^27) - 2^27) + 1 = 1; in k order (2^27 + 1 + 1 - 2^27) it would be 0.
      std::vector<float> x2(64, 0.0f);
      x2[0] = big;
      x2[1] = 1.0f;
      x2[32] = 1.0f;
      x2[33] = -big;
      EXPECT_EQ(chunked_ones(scheme, x2, false, simd), 1.0f) << what;
      // fp32 x: lane i takes rows i and 16 + i. x[0] -> lane 0, x[4] -> lane 4, x[8] ->
      // lane 8: (2^27 + 1) - 2^27 = 0; x[1] in lane 1 instead survives: 1.
      std::vector<float> x3(32, 0.0f);
      x3[0] = big;
      x3[4] = -big;
      x3[8] = 1.0f;
      EXPECT_EQ(chunked_ones(scheme, x3, true, simd), 0.0f) << what;
      x3[8] = 0.0f;
      x3[1] = 1.0f;
      EXPECT_EQ(chunked_ones(scheme, x3, true, simd), 1.0f) << what;
      // Lane 0 takes rows 0, 16, 32, 48 in that order: 2^27, 1, -2^27, 1 give
      // ((2^27 + 1) - 2^27) + 1 = 1, and 1, 2^27, 1, -2^27 give ((1 + 2^27) + 1) - 2^27 = 0.
      std::vector<float> x4(64, 0.0f);
      x4[0] = big;
      x4[16] = 1.0f;
      x4[32] = -big;
      x4[48] = 1.0f;
      EXPECT_EQ(chunked_ones(scheme, x4, true, simd), 1.0f) << what;
      std::swap(x4[0], x4[16]);
      std::swap(x4[32], x4[48]);
      EXPECT_EQ(chunked_ones(scheme, x4, true, simd), 0.0f) << what;
      // fma, not a rounded product: rows 0 and 16 hold t and -t, w = 1 + 2^-7 (q4: scale
      // 0x3f81): the result is the rounding error of t w, -3 * 2^-30 (see the q8 case).
      if (scheme == Scheme::kQ4) {
        const float t = 1.0f + 3 * 0x1p-23f;
        std::vector<float> x5(32, 0.0f);
        x5[0] = t;
        x5[16] = -t;
        const QuantMatrix w = q4_matrix(std::vector<int8_t>(32, 1), {0x3f81}, 32, 1, 32);
        float y = 0;
        ASSERT_TRUE(chunked(scheme, true, simd, x5.data(), 1, 32, w, 32, 1, &y).ok());
        EXPECT_EQ(y, -3 * 0x1p-30f) << what;
      }
      // Chains: K = 128 in 4 chains of 32: chain sums 2^27, 1, -2^27, 1 -> tree (2^27 + 1) +
      // (-2^27 + 1) = 2^27 - 2^27 = 0; one chain would add them lane by lane.
      std::vector<float> x6(128, 0.0f);
      x6[0] = big;
      x6[32] = 1.0f;
      x6[64] = -big;
      x6[96] = 1.0f;
      EXPECT_EQ(chunked_ones(scheme, x6, false, simd, 32), 0.0f) << what;
      EXPECT_EQ(chunked_ones(scheme, x6, false, simd, 0), 1.0f) << what;  // lane 0: ((2^27 + 1) - 2^27) + 1
      EXPECT_EQ(chunked_ones(scheme, x6, true, simd, 32), 0.0f) << what;
      // Random values: bit for bit against the transcription, every chain length.
      Rng rng(33);
      for (int64_t sr : {0, 32, 64, 128})
        for (bool f32 : {false, true}) {
          std::vector<float> xr(256);
          for (auto& v : xr) v = f32 ? rng.f32(-8.0f, 8.0f) * std::ldexp(1.0f, static_cast<int>(rng.range(-20, 20))) : rng.bf16_value(-20, 20);
          EXPECT_EQ(bits_of(chunked_ones(scheme, xr, f32, simd, sr)), bits_of(chunked_dot(xr, std::vector<float>(256, 1.0f), f32, sr)))
              << what << " chains of " << sr << (f32 ? " f32" : "");
        }
    }
}

TEST(KernelNumerics, ChunkedEqualsADoublePrecisionDot) {
  // Random matrices (packed by the test) against the double-precision dot with the
  // dequantized weights: within the fp32 bound of the order (each lane adds 2 K/(32
  // chains) terms, 4 halving steps, the tree's levels), and bit for bit against the order
  // written out.
  Rng rng(34);
  const int64_t M = 3, K = 512, N = 19;
  for (Scheme scheme : {Scheme::kQ4, Scheme::kF8})
    for (int64_t G : {32, 64, 128}) {
      if (scheme == Scheme::kF8 && G != 32) continue;
      const QuantMatrix w = scheme == Scheme::kQ4 ? random_q4(rng, K, N, G) : random_f8(rng, K, N);
      for (bool f32 : {false, true})
        for (int64_t sr : {int64_t{0}, int64_t{128}, G}) {
          std::vector<float> x(static_cast<size_t>(M * K));
          for (auto& v : x) v = f32 ? rng.f32(-2.0f, 2.0f) : rng.bf16_value(-4, 1);
          std::vector<float> y(static_cast<size_t>(M * N)), ys(y.size());
          ASSERT_TRUE(chunked(scheme, f32, false, x.data(), M, K, w, G, N, y.data(), sr).ok());
          ASSERT_TRUE(chunked(scheme, f32, true, x.data(), M, K, w, G, N, ys.data(), sr).ok());
          EXPECT_EQ(std::memcmp(y.data(), ys.data(), y.size() * 4), 0);
          const int64_t chains = sr == 0 ? 1 : K / sr, levels = chains == 1 ? 0 : chains <= 2 ? 1 : chains <= 4 ? 2 : 3;
          for (int64_t m = 0; m < M; ++m)
            for (int64_t n = 0; n < N; ++n) {
              double dot = 0, mag = 0;
              std::vector<float> xc(static_cast<size_t>(K)), wc(static_cast<size_t>(K));
              for (int64_t k = 0; k < K; ++k) {
                const double t = static_cast<double>(x[static_cast<size_t>(m * K + k)]) * w.w[static_cast<size_t>(k * N + n)];
                dot += t;
                mag += std::fabs(t);
                xc[static_cast<size_t>(k)] = x[static_cast<size_t>(m * K + k)];
                wc[static_cast<size_t>(k)] = w.w[static_cast<size_t>(k * N + n)];
              }
              const float got = y[static_cast<size_t>(m * N + n)];
              const double bound = static_cast<double>(2 * (K / chains) / 32 + 4 + levels) * 0x1p-24 * mag;
              EXPECT_NEAR(got, dot, bound) << (scheme == Scheme::kQ4 ? "q4 G" : "f8 G") << G << " m" << m << " n" << n;
              EXPECT_EQ(bits_of(got), bits_of(chunked_dot(xc, wc, f32, sr)));
            }
        }
    }
}

TEST(KernelNumerics, MatmulF8NanCodesGiveNanAndTheCarefulDecodeAgrees) {
  // A NaN code (0x7f or 0xff) in a column makes that column NaN in every twin; the other
  // columns, decoded through the careful path in the SIMD twins, keep their bits. M = 2
  // takes the decode walks, M = 9 the panels.
  for (const int64_t M : {2, 9}) {
    const int64_t K = 96, N = 35;
    Rng rng(35);
    QuantMatrix w = random_f8(rng, K, N);
    std::vector<float> x(static_cast<size_t>(M * K));
    for (auto& v : x) v = rng.bf16_value(-4, 2);
    std::vector<float> clean(static_cast<size_t>(M * N));
    ASSERT_TRUE(chunked(Scheme::kF8, false, false, x.data(), M, K, w, 32, N, clean.data()).ok());
    // Column 3 gets 0x7f at row 40, column 33 0xff at row 95 (chunk 2, byte 31).
    w.payload[static_cast<size_t>((1 * N + 3) * 32 + 8)] = 0x7f;
    w.payload[static_cast<size_t>((2 * N + 33) * 32 + 31)] = 0xff;
    for (bool f32 : {false, true})
      for (bool simd : {false, true}) {
        std::vector<float> y(static_cast<size_t>(M * N)), yc(y.size());
        ASSERT_TRUE(chunked(Scheme::kF8, f32, simd, x.data(), M, K, w, 32, N, y.data(), 32).ok());
        QuantMatrix w0 = w;
        w0.payload[static_cast<size_t>((1 * N + 3) * 32 + 8)] = 0;
        w0.payload[static_cast<size_t>((2 * N + 33) * 32 + 31)] = 0;
        ASSERT_TRUE(chunked(Scheme::kF8, f32, false, x.data(), M, K, w0, 32, N, yc.data(), 32).ok());
        for (int64_t m = 0; m < M; ++m)
          for (int64_t n = 0; n < N; ++n) {
            const float v = y[static_cast<size_t>(m * N + n)];
            if (n == 3 || n == 33) {
              EXPECT_TRUE(std::isnan(v)) << m << "," << n << (simd ? " simd" : " ref");
            } else {
              EXPECT_EQ(bits_of(v), bits_of(yc[static_cast<size_t>(m * N + n)]))
                  << m << "," << n << (simd ? " simd" : " ref");
            }
          }
      }
    EXPECT_TRUE(std::isfinite(clean[0]));
  }
}

TEST(KernelNumerics, MatmulF8EveryCodeAtTheTableScaleBoundsEqualsTheScalarTwin) {
  // The AVX2 decode looks a code's bf16 bits up in per-column tables only for scales in
  // [2^-120, 2^119) (every product a normal, finite bf16); the scales at and beside those
  // bounds, the other signs and the special values take one path or the other. Each column
  // holds every code but the NaN ones (row k: code k); x = identity reads each weight back
  // alone (panels), and 1 or 2 random rows take the decode walks; chains of 8 chunks decode
  // by the tables, chains of one by the fp16 decode.
  const int64_t K = 256;
  const float below_min = 0x1p-121f * (2.0f - 0x1p-7f), below_max = 0x1p118f * (2.0f - 0x1p-7f);
  const std::vector<uint16_t> s = {
      f32_to_bf16_bits(0x1p-120f), f32_to_bf16_bits(below_min), f32_to_bf16_bits(0x1p-120f * (1.0f + 0x1p-7f)),
      f32_to_bf16_bits(0x1p119f), f32_to_bf16_bits(below_max), f32_to_bf16_bits(0x1p118f), f32_to_bf16_bits(1.0f),
      f32_to_bf16_bits(0x1p119f * 1.5f), f32_to_bf16_bits(0x1p120f),
      f32_to_bf16_bits(0.75f), f32_to_bf16_bits(3.0e-5f), f32_to_bf16_bits(-0.5f), f32_to_bf16_bits(-0x1p-120f),
      0x0000, 0x8000, 0x0001, 0x007f, 0x7f80, 0xff80, 0x7fc0, 0x7f7f, f32_to_bf16_bits(1.0f + 0x1p-7f * 127)};
  const int64_t N = static_cast<int64_t>(s.size());
  std::vector<uint8_t> codes(static_cast<size_t>(K * N));
  for (int64_t k = 0; k < K; ++k)
    for (int64_t n = 0; n < N; ++n) codes[static_cast<size_t>(k * N + n)] = (k & 0x7f) == 0x7f ? 0 : static_cast<uint8_t>(k);
  const QuantMatrix w = f8_matrix(codes, s, K, N);
  Rng rng(37);
  for (const int64_t M : {int64_t{1}, int64_t{2}, K}) {
    std::vector<float> x(static_cast<size_t>(M * K), 0.0f);
    if (M == K) {
      for (int64_t k = 0; k < K; ++k) x[static_cast<size_t>(k * K + k)] = 1.0f;
    } else {
      for (auto& v : x) v = rng.bf16_value(-4, 2);
    }
    for (bool f32 : {false, true})
      for (int64_t sr : {int64_t{0}, int64_t{32}}) {
        std::vector<float> want(static_cast<size_t>(M * N)), got(want.size());
        ASSERT_TRUE(chunked(Scheme::kF8, f32, false, x.data(), M, K, w, 32, N, want.data(), sr).ok());
        ASSERT_TRUE(chunked(Scheme::kF8, f32, true, x.data(), M, K, w, 32, N, got.data(), sr).ok());
        int64_t finite = 0;
        for (size_t i = 0; i < want.size(); ++i) {
          finite += std::isfinite(want[i]) ? 1 : 0;
          if (std::isnan(want[i]) && std::isnan(got[i])) continue;
          ASSERT_EQ(bits_of(got[i]), bits_of(want[i]))
              << "M " << M << (f32 ? " f32" : "") << " sr " << sr << ", row " << i / N << ", scale 0x" << std::hex << s[i % N];
        }
        EXPECT_GT(finite, static_cast<int64_t>(want.size()) / 2) << M;  // the large scales overflow
        if (M == K) {  // each weight read back alone (the finite scales' columns)
          for (int64_t k = 0; k < K; ++k)
            for (int64_t n : {0, 1, 2, 3, 4, 5, 6, 9, 10, 11, 12, 13, 14, 15, 16})
              ASSERT_EQ(got[static_cast<size_t>(k * N + n)], w.w[static_cast<size_t>(k * N + n)]) << k << "," << n;
        }
      }
  }
}

TEST(KernelNumerics, MatmulF8SubnormalCodesSurviveDenormalsAreZero) {
  // The SIMD decode reads e4m3 subnormals through fp32 subnormals: a caller running with
  // DAZ set must still get the scalar twin's bits, and get its MXCSR back.
  const int64_t M = 1, K = 64, N = 16;
  std::vector<uint8_t> codes(static_cast<size_t>(K * N));
  for (size_t i = 0; i < codes.size(); ++i) codes[i] = static_cast<uint8_t>((i % 8) | (i % 3 == 0 ? 0x80 : 0));  // subnormals
  const QuantMatrix w = f8_matrix(codes, std::vector<uint16_t>(static_cast<size_t>(N), f32_to_bf16_bits(0.5f)), K, N);
  std::vector<float> x(static_cast<size_t>(K), 1.0f);
  for (bool f32 : {false, true}) {
    std::vector<float> want(static_cast<size_t>(N)), got(static_cast<size_t>(N));
    ASSERT_TRUE(chunked(Scheme::kF8, f32, false, x.data(), M, K, w, 32, N, want.data()).ok());
    const unsigned csr = _mm_getcsr();
    _mm_setcsr(csr | 0x40u);  // DAZ
    const Status st = chunked(Scheme::kF8, f32, true, x.data(), M, K, w, 32, N, got.data());
    const unsigned after = _mm_getcsr();
    _mm_setcsr(csr);
    ASSERT_TRUE(st.ok());
    EXPECT_EQ(after, csr | 0x40u);
    EXPECT_EQ(std::memcmp(want.data(), got.data(), want.size() * 4), 0) << (f32 ? "f32" : "bf16");
    EXPECT_NE(want[1], 0.0f);
  }
}

TEST(KernelNumerics, MatmulBf16EqualsMatmulQ8OnTheDequantizedWeights) {
  // The bf16 scheme stores the dequantized weight; its products follow the int8 ones'
  // orders exactly, so on bf16(code * scale) they give matmul_q8's bits, chains included.
  Rng rng(36);
  const int64_t M = 3;
  const int64_t shapes[][4] = {{150, 70, 2, 0}, {256, 33, 8, 16}, {64, 100, 1, 8}, {33, 20, 3, 0}};  // K, N, blocks, sum_rows
  for (const auto& sh : shapes) {
    const int64_t K = sh[0], N = sh[1], B = sh[2], sr = sh[3];
    std::vector<int8_t> codes(static_cast<size_t>(K * N));
    for (auto& c : codes) c = static_cast<int8_t>(rng.range(-128, 127));
    std::vector<uint16_t> scales(static_cast<size_t>(B * N));
    for (auto& s : scales) s = f32_to_bf16_bits(std::fabs(rng.bf16_value(-10, 0)) + 0x1p-12f);
    std::vector<uint16_t> wb(static_cast<size_t>(K * N));
    for (int64_t k = 0; k < K; ++k)
      for (int64_t n = 0; n < N; ++n)
        wb[static_cast<size_t>(k * N + n)] = f32_to_bf16_bits(static_cast<float>(codes[static_cast<size_t>(k * N + n)]) *
                                                              bf16_bits_to_f32(scales[static_cast<size_t>((k / (K / B)) * N + n)]));
    for (bool f32 : {false, true}) {
      std::vector<float> x(static_cast<size_t>(M * K));
      for (auto& v : x) v = f32 ? rng.f32(-3.0f, 3.0f) : rng.bf16_value(-6, 3);
      std::vector<float> yq(static_cast<size_t>(M * N));
      ASSERT_TRUE((f32 ? matmul_q8_f32_ref : matmul_q8_ref)(x.data(), M, K, K, codes.data(), scales.data(), N, B, yq.data(), N, nullptr, sr).ok());
      for (bool simd : {false, true}) {
        std::vector<float> yb(static_cast<size_t>(M * N));
        auto fn = f32 ? (simd ? matmul_bf16_f32 : matmul_bf16_f32_ref) : (simd ? matmul_bf16 : matmul_bf16_ref);
        ASSERT_TRUE(fn(x.data(), M, K, K, wb.data(), N, yb.data(), N, nullptr, sr).ok());
        EXPECT_EQ(std::memcmp(yq.data(), yb.data(), yq.size() * 4), 0) << "K" << K << " N" << N << (f32 ? " f32" : "") << (simd ? " simd" : " ref");
      }
    }
  }
}

TEST(KernelNumerics, RmsnormFollowsTheFormula) {
  // x = [3, 4]: mean(x*x) = 12.5; with eps = 0 the factor is 1/sqrt(12.5).
  {
    const std::vector<float> x = {3.0f, 4.0f}, scale = {1.0f, 2.0f};
    std::vector<float> out(2);
    ASSERT_TRUE(rmsnorm_ref(x.data(), 1, 2, scale.data(), 0.0f, out.data(), nullptr).ok());
    const double inv = 1.0 / std::sqrt(12.5);  // 0.28284271...
    EXPECT_EQ(out[0], round_bf16(static_cast<float>(3.0 * inv)));         // 0.8485 -> 0.84765625
    EXPECT_EQ(out[1], round_bf16(static_cast<float>(4.0 * inv * 2.0)));   // 2.2627 -> 2.265625
    EXPECT_EQ(out[0], 0.84765625f);
    EXPECT_EQ(out[1], 2.265625f);
  }
  // Random rows: bit for bit against the formula written out in fp32, and within one
  // bf16 ulp (plus the fp32 slack) of the formula in double.
  Rng rng(7);
  const int64_t M = 4, D = 333;
  const float eps = 1e-5f;
  std::vector<float> x(static_cast<size_t>(M * D)), scale(static_cast<size_t>(D)), out(x.size());
  for (auto& v : x) v = rng.bf16_value(-10, 4);
  for (auto& v : scale) v = rng.bf16_value(-1, 1);
  ASSERT_TRUE(rmsnorm_ref(x.data(), M, D, scale.data(), eps, out.data(), nullptr).ok());
  for (int64_t m = 0; m < M; ++m) {
    const float* r = x.data() + m * D;
    float ss = 0;
    double ssd = 0;
    for (int64_t d = 0; d < D; ++d) {
      ss += r[d] * r[d];
      ssd += static_cast<double>(r[d]) * r[d];
    }
    const float inv = 1.0f / std::sqrt(ss / static_cast<float>(D) + eps);
    const double invd = 1.0 / std::sqrt(ssd / static_cast<double>(D) + eps);
    for (int64_t d = 0; d < D; ++d) {
      const float got = out[static_cast<size_t>(m * D + d)];
      EXPECT_EQ(got, round_bf16((r[d] * inv) * scale[static_cast<size_t>(d)])) << m << "," << d;
      const double ideal = r[d] * invd * scale[static_cast<size_t>(d)];
      EXPECT_LE(std::fabs(got - ideal), bf16_ulp(static_cast<float>(ideal)) * 0.5 + std::fabs(ideal) * 1e-6) << m << "," << d;
    }
  }
}

TEST(KernelNumerics, RopeAtPositionThreeRotatesSplitHalves) {
  // dh = 4, base 10000: inv_freq = {1, 1/100}. x = [1, 0, 0, 0] at position 3: the pair
  // (x[0], x[2]) rotates by 3 radians: [cos 3, 0, sin 3, 0], rounded to bf16:
  //   cos 3 = -0.98999 -> -253/256 = -0.98828125;  sin 3 = 0.141120 -> 145/1024 = 0.1416015625
  {
    std::vector<float> x = {1, 0, 0, 0};
    const int32_t pos = 3;
    ASSERT_TRUE(rope_ref(x.data(), 1, 1, 4, &pos, 10000.0, nullptr).ok());
    EXPECT_EQ(x[0], -0.98828125f);
    EXPECT_EQ(x[1], 0.0f);
    EXPECT_EQ(x[2], 0.1416015625f);
    EXPECT_EQ(x[3], 0.0f);
  }
  // Random heads at position 3, dh = 8: against the split-halves formula written out.
  Rng rng(3);
  const int64_t heads = 3, dh = 8, half = dh / 2;
  std::vector<float> x(static_cast<size_t>(heads * dh));
  for (auto& v : x) v = rng.bf16_value(-3, 3);
  std::vector<float> got = x;
  const int32_t pos = 3;
  ASSERT_TRUE(rope_ref(got.data(), 1, heads, dh, &pos, 10000.0, nullptr).ok());
  for (int64_t h = 0; h < heads; ++h)
    for (int64_t j = 0; j < half; ++j) {
      const float inv = static_cast<float>(1.0 / std::pow(10000.0, static_cast<double>(2 * j) / dh));
      const float phase = 3.0f * inv;
      const float c = static_cast<float>(std::cos(static_cast<double>(phase)));
      const float s = static_cast<float>(std::sin(static_cast<double>(phase)));
      const float a = x[static_cast<size_t>(h * dh + j)], b = x[static_cast<size_t>(h * dh + j + half)];
      EXPECT_EQ(got[static_cast<size_t>(h * dh + j)], round_bf16(a * c - b * s)) << h << "," << j;
      EXPECT_EQ(got[static_cast<size_t>(h * dh + j + half)], round_bf16(b * c + a * s)) << h << "," << j;
      // And near the exact rotation (catches a wrong pairing, e.g. interleaved).
      const double ex = a * std::cos(3.0 * inv) - b * std::sin(3.0 * inv);
      EXPECT_NEAR(got[static_cast<size_t>(h * dh + j)], ex, bf16_ulp(static_cast<float>(ex)) + 1e-5) << h << "," << j;
    }
}

TEST(KernelNumerics, RopeAtPositionZeroIsTheIdentity) {
  Rng rng(5);
  const int64_t M = 2, heads = 2, dh = 10;
  std::vector<float> x(static_cast<size_t>(M * heads * dh));
  for (auto& v : x) v = rng.bf16_value(-8, 8);
  std::vector<float> got = x;
  const int32_t pos[2] = {0, 0};
  ASSERT_TRUE(rope_ref(got.data(), M, heads, dh, pos, 10000.0, nullptr).ok());
  // Compared as values: x * 1 + (-b) * 0 turns a -0 into +0, which is fine.
  for (size_t i = 0; i < x.size(); ++i) EXPECT_EQ(got[i], x[i]) << i;
  ASSERT_TRUE(rope(got.data(), M, heads, dh, pos, 10000.0, pool_of(2)).ok());
  for (size_t i = 0; i < x.size(); ++i) EXPECT_EQ(got[i], x[i]) << i;
}

// A tiny attention problem, one sequence: keys/values given as float rows (bf16 values).
struct TinyAttention {
  int64_t q_heads = 1, kv_heads = 1, dh = 2;
  float multiplier = 1.0f;
  std::vector<std::vector<std::vector<float>>> k, v;  // [kv_head][key][dh]
  std::vector<uint8_t> valid;

  std::vector<float> run(const std::vector<float>& q, const std::vector<int32_t>& pos, bool simd = false,
                         Pool pool = nullptr) const {
    const int64_t n_keys = static_cast<int64_t>(valid.size()), cap = n_keys + 1, M = static_cast<int64_t>(pos.size());
    std::vector<uint16_t> kc(static_cast<size_t>(kv_heads * cap * dh), 0x7fc1), vc(kc.size(), 0x7fc1);  // NaN past n_keys
    for (int64_t h = 0; h < kv_heads; ++h)
      for (int64_t j = 0; j < n_keys; ++j)
        for (int64_t d = 0; d < dh; ++d) {
          size_t at = static_cast<size_t>((h * cap + j) * dh + d);
          kc[at] = f32_to_bf16_bits(k[static_cast<size_t>(h)][static_cast<size_t>(j)][static_cast<size_t>(d)]);
          vc[at] = f32_to_bf16_bits(v[static_cast<size_t>(h)][static_cast<size_t>(j)][static_cast<size_t>(d)]);
        }
    AttentionShape sh{q_heads, kv_heads, dh, cap, multiplier, 30.0f};
    std::vector<float> o(static_cast<size_t>(M * q_heads * dh));
    poison(o);
    auto fn = simd ? attention : attention_ref;
    EXPECT_TRUE(fn(q.data(), M, pos.data(), kc.data(), vc.data(), valid.data(), n_keys, sh, o.data(), pool).ok());
    return o;
  }
};

TEST(KernelNumerics, AttentionTwoKeysByHand) {
  // q = [1, 0]; k0 = [2, 0], k1 = [0, 1]: logits 2 and 0, capped: 30 tanh(2/30) and 0.
  // softmax weights w0 = 1 / (1 + e^-s0), w1 = e^-s0 / (1 + e^-s0); v0 = [1, 0],
  // v1 = [0, 1], so o = [bf16(w0), bf16(w1)].
  //   s0 = 1.99703..., w0 = 0.88046 -> 225/256 = 0.87890625, w1 = 0.11954 -> 0.11962890625
  TinyAttention t;
  t.k = {{{2, 0}, {0, 1}}};
  t.v = {{{1, 0}, {0, 1}}};
  t.valid = {1, 1};
  std::vector<float> o = t.run({1, 0}, {1});
  EXPECT_EQ(o[0], 0.87890625f);
  EXPECT_EQ(o[1], 0.11962890625f);
  // The same in fp32 step by step, as the header states it.
  const float s0 = 30.0f * static_cast<float>(std::tanh(static_cast<double>(2.0f / 30.0f)));
  const float e0 = 1.0f, e1 = static_cast<float>(std::exp(static_cast<double>(0.0f - s0)));
  const float sum = e0 + e1;
  EXPECT_EQ(o[0], round_bf16(round_bf16(e0 / sum) * 1.0f));
  EXPECT_EQ(o[1], round_bf16(round_bf16(e1 / sum) * 1.0f));
  // A mix of values: o = bf16(w0 * v0 + w1 * v1) with bf16 weights.
  t.v = {{{3, -2}, {0.5f, 8}}};
  o = t.run({1, 0}, {1});
  const double w0 = round_bf16(e0 / sum), w1 = round_bf16(e1 / sum);
  EXPECT_EQ(o[0], round_bf16(static_cast<float>(w0 * 3 + w1 * 0.5)));
  EXPECT_EQ(o[1], round_bf16(static_cast<float>(w0 * -2 + w1 * 8)));
}

TEST(KernelNumerics, AttentionCapsLogitsAt30Tanh) {
  // q . k0 = 100 (multiplier 1): the logit becomes 30 tanh(100/30) = 29.92..., not 100.
  // k1 gives 0. So w1 = e^-29.92 / (1 + e^-29.92) = 1.0e-13, where an uncapped logit
  // would give e^-100 = 3.7e-44. v0 = [1, 0], v1 = [0, 1]: o = [1, bf16(w1)].
  TinyAttention t;
  t.k = {{{10, 0}, {0, 1}}};
  t.v = {{{1, 0}, {0, 1}}};
  t.valid = {1, 1};
  std::vector<float> o = t.run({10, 0}, {1});
  const double capped = 30.0 * std::tanh(100.0 / 30.0);
  EXPECT_NEAR(capped, 29.9237, 1e-4);
  EXPECT_EQ(o[0], 1.0f);
  const double w1 = std::exp(-capped);
  EXPECT_NEAR(o[1], w1, w1 * 0.01);  // bf16 precision and fp32 phase
  // With the multiplier: q . k = 100, multiplier 0.5 -> 30 tanh(50/30).
  t.multiplier = 0.5f;
  o = t.run({10, 0}, {1});
  const double w1b = std::exp(-30.0 * std::tanh(50.0 / 30.0));
  EXPECT_NEAR(o[1], w1b, w1b * 0.01);
}

TEST(KernelNumerics, AttentionIgnoresPaddingKeys) {
  // Keys 0 and 2 real, key 1 padding with a large value: the result equals attention over
  // keys {0, 2} alone, bit for bit.
  TinyAttention with_pad, without;
  with_pad.dh = without.dh = 3;
  with_pad.k = {{{1, 2, -1}, {4, 4, 4}, {0.5f, -1, 3}}};
  with_pad.v = {{{1, -1, 2}, {1000, 1000, 1000}, {-3, 0.25f, 5}}};
  with_pad.valid = {1, 0, 1};
  without.k = {{with_pad.k[0][0], with_pad.k[0][2]}};
  without.v = {{with_pad.v[0][0], with_pad.v[0][2]}};
  without.valid = {1, 1};
  const std::vector<float> q = {0.5f, 1, -0.75f};
  std::vector<float> a = with_pad.run(q, {2}), b = without.run(q, {1});
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) EXPECT_EQ(bits_of(a[i]), bits_of(b[i])) << i;
  for (float x : a) EXPECT_LT(std::fabs(x), 10.0f);
  std::vector<float> c = with_pad.run(q, {2}, true, pool_of(2));
  for (size_t i = 0; i < a.size(); ++i) EXPECT_EQ(bits_of(a[i]), bits_of(c[i])) << i;
}

TEST(KernelNumerics, AttentionIsCausal) {
  // Three keys; a query at position 1 ignores key 2 (equals the 2-key result); a query
  // at position 0 sees key 0 alone: o = v0 exactly (weight 1).
  TinyAttention three, two;
  three.k = {{{1, 0}, {0, 1}, {5, 5}}};
  three.v = {{{1, 2}, {-2, 0.5f}, {1000, -1000}}};
  three.valid = {1, 1, 1};
  two.k = {{three.k[0][0], three.k[0][1]}};
  two.v = {{three.v[0][0], three.v[0][1]}};
  two.valid = {1, 1};
  const std::vector<float> q = {0.75f, -0.5f};
  std::vector<float> a = three.run(q, {1}), b = two.run(q, {1});
  for (size_t i = 0; i < a.size(); ++i) EXPECT_EQ(bits_of(a[i]), bits_of(b[i])) << i;
  std::vector<float> z = three.run(q, {0});
  EXPECT_EQ(z[0], 1.0f);
  EXPECT_EQ(z[1], 2.0f);
  // The three queries of a prefill at positions 0, 1, 2 in one call.
  std::vector<float> all = three.run({0.75f, -0.5f, 0.75f, -0.5f, 0.75f, -0.5f}, {0, 1, 2});
  EXPECT_EQ(all[0], 1.0f);
  EXPECT_EQ(all[1], 2.0f);
  EXPECT_EQ(all[2], a[0]);
  EXPECT_EQ(all[3], a[1]);
  EXPECT_GT(std::fabs(all[4]), 10.0f);  // position 2 sees key 2
}

TEST(KernelNumerics, AttentionWithNoVisibleKeyIsUniform) {
  // Query at position 1; keys 0 and 1 are padding, key 2 (after the query) is real. Every
  // key is masked, so the softmax is uniform over all n_keys = 4 keys (weights bf16(1/4)).
  TinyAttention t;
  t.k = {{{1, 0}, {0, 1}, {3, 3}, {-1, 2}}};
  t.v = {{{1, 2}, {3, 4}, {5, 6}, {7, 8.5f}}};
  t.valid = {0, 0, 1, 1};
  std::vector<float> o = t.run({1, 1}, {1});
  EXPECT_EQ(o[0], 4.0f);       // (1 + 3 + 5 + 7) / 4
  EXPECT_EQ(o[1], 5.125f);     // (2 + 4 + 6 + 8.5) / 4
  // Three keys: weights bf16(1/3) = 0.333984375, o = bf16(w * (1 + 3 + 5)) = bf16(3.005859375) = 3.0
  t.k.resize(1);
  t.k[0].resize(3);
  t.v[0].resize(3);
  t.valid = {0, 0, 1};
  o = t.run({1, 1}, {1});
  EXPECT_EQ(o[0], round_bf16(static_cast<float>(0.333984375 * 9.0)));
  EXPECT_EQ(o[0], 3.0f);
  EXPECT_EQ(o[1], round_bf16(static_cast<float>(0.333984375 * 12.0)));  // 4.0078125 -> 4.0
}

TEST(KernelNumerics, AttentionGroupsQueryHeadsOverKvHeads) {
  // 4 query heads, 2 kv heads: heads 0, 1 read kv head 0; heads 2, 3 read kv head 1.
  // One key each, so every head's output is its kv head's value row.
  TinyAttention t;
  t.q_heads = 4;
  t.kv_heads = 2;
  t.k = {{{1, 1}}, {{-1, 2}}};
  t.v = {{{1, 1.5f}}, {{2, -4}}};
  t.valid = {1};
  std::vector<float> o = t.run({1, 0, 0, 1, 2, 2, -1, 3}, {0});
  const std::vector<float> want = {1, 1.5f, 1, 1.5f, 2, -4, 2, -4};
  for (size_t i = 0; i < want.size(); ++i) EXPECT_EQ(o[i], want[i]) << i;
  // With two keys the weights depend on the head's kv keys: head h equals a one-head
  // call on kv head h / 2.
  t.k = {{{1, 1}, {0.5f, -2}}, {{-1, 2}, {3, 0.25f}}};
  t.v = {{{1, 1.5f}, {-2, 3}}, {{2, -4}, {0.5f, 6}}};
  t.valid = {1, 1};
  const std::vector<float> q = {1, 0, 0, 1, 2, 2, -1, 3};
  o = t.run(q, {1});
  for (int64_t h = 0; h < 4; ++h) {
    TinyAttention one;
    one.k = {t.k[static_cast<size_t>(h / 2)]};
    one.v = {t.v[static_cast<size_t>(h / 2)]};
    one.valid = {1, 1};
    std::vector<float> r = one.run({q[static_cast<size_t>(2 * h)], q[static_cast<size_t>(2 * h + 1)]}, {1});
    EXPECT_EQ(o[static_cast<size_t>(2 * h)], r[0]) << h;
    EXPECT_EQ(o[static_cast<size_t>(2 * h + 1)], r[1]) << h;
  }
}

TEST(KernelNumerics, RouterTiesGoToTheLowerIndexAndGatesAreNotRenormalized) {
  // D = 1, x = [1], logits = w = [0.5, 2, 2, 1]. softmax: e = exp(l - 2) =
  // [e^-1.5, 1, 1, e^-1]; sum = 2.59101; p = [0.08612, 0.38595, 0.38595, 0.14198].
  const std::vector<float> x = {1.0f}, w = {0.5f, 2.0f, 2.0f, 1.0f};
  int32_t experts[3] = {-1, -1, -1};
  float gates[3] = {0, 0, 0};
  ASSERT_TRUE(router_topk_ref(x.data(), 1, 1, w.data(), 4, 3, experts, gates, nullptr).ok());
  EXPECT_EQ(experts[0], 1);
  EXPECT_EQ(experts[1], 2);
  EXPECT_EQ(experts[2], 3);
  const float e[4] = {static_cast<float>(std::exp(-1.5)), 1.0f, 1.0f, static_cast<float>(std::exp(-1.0))};
  const float sum = ((e[0] + e[1]) + e[2]) + e[3];
  EXPECT_EQ(gates[0], 1.0f / sum);
  EXPECT_EQ(gates[1], 1.0f / sum);
  EXPECT_EQ(gates[2], e[3] / sum);
  EXPECT_NEAR(gates[0], 0.385950, 1e-5);
  EXPECT_NEAR(gates[2], 0.141983, 1e-5);
  // Not renormalized over the chosen two: they sum to 0.7719, not 1.
  int32_t e2[2];
  float g2[2];
  ASSERT_TRUE(router_topk_ref(x.data(), 1, 1, w.data(), 4, 2, e2, g2, nullptr).ok());
  EXPECT_NEAR(g2[0] + g2[1], 0.771900, 1e-5);
  // All equal: the first k indices, each gate 1/E.
  const std::vector<float> flat = {0.25f, 0.25f, 0.25f, 0.25f, 0.25f};
  ASSERT_TRUE(router_topk_ref(x.data(), 1, 1, flat.data(), 5, 2, e2, g2, nullptr).ok());
  EXPECT_EQ(e2[0], 0);
  EXPECT_EQ(e2[1], 1);
  EXPECT_EQ(g2[0], 1.0f / 5.0f);
  // The logits are x @ w with D = 2: x = [1, -2], w columns: e0 = [1, 0] -> 1,
  // e1 = [0, -1] -> 2, e2 = [2, 0] -> 2 (ties e1). k = 1 picks e1.
  const std::vector<float> x2 = {1.0f, -2.0f}, w2 = {1.0f, 0.0f, 2.0f, 0.0f, -1.0f, 0.0f};
  int32_t e1 = -1;
  float g1 = 0;
  ASSERT_TRUE(router_topk_ref(x2.data(), 1, 2, w2.data(), 3, 1, &e1, &g1, nullptr).ok());
  EXPECT_EQ(e1, 1);
  ASSERT_TRUE(router_topk(x2.data(), 1, 2, w2.data(), 3, 1, &e1, &g1, pool_of(2)).ok());
  EXPECT_EQ(e1, 1);
}

TEST(KernelNumerics, GeluMulFollowsTheTanhFormula) {
  const std::vector<float> g = {0.0f, 1.0f, -1.0f, 0.5f, 3.0f, -3.0f, 10.0f, -10.0f, 40.0f, -0.001f};
  const std::vector<float> u = {5.0f, 1.0f, 1.0f, -2.0f, 0.5f, 1.0f, 1.0f, 1.0f, 1.0f, 3.0f};
  std::vector<float> h(g.size());
  ASSERT_TRUE(gelu_mul_ref(g.data(), u.data(), static_cast<int64_t>(g.size()), h.data(), nullptr).ok());
  for (size_t i = 0; i < g.size(); ++i) {
    const double x = g[i];
    const double ideal = x * 0.5 * (1.0 + std::tanh(std::sqrt(2.0 / std::numbers::pi) * (x + 0.044715 * x * x * x))) * u[i];
    // fp32 steps: a few ulps relative, plus tanh's fp32 rounding (6e-8) carried by x * u
    // where 1 + tanh cancels (negative x).
    EXPECT_NEAR(h[i], ideal, std::fabs(ideal) * 4e-7 + 1e-7 * std::fabs(x * u[i])) << "g = " << g[i];
    // The header's expression in fp32, tanh in double.
    const float xf = g[i];
    const float inner = 0.7978845608028654f * (xf + 0.044715f * (xf * xf * xf));
    const float want = xf * (0.5f * (1.0f + static_cast<float>(std::tanh(static_cast<double>(inner))))) * u[i];
    EXPECT_EQ(h[i], want) << "g = " << g[i];
  }
  EXPECT_EQ(h[0], 0.0f);
  EXPECT_NEAR(h[1], 0.841192, 1e-6);   // gelu_tanh(1)
  EXPECT_NEAR(h[2], -0.158808, 1e-6);  // gelu_tanh(-1)
  EXPECT_EQ(h[6], 10.0f);
  EXPECT_EQ(h[7], -0.0f);
}

// gelu_mul's SIMD path takes tanh in double lanes of its own (not std::tanh): a sweep over
// fp32 inputs of every magnitude in [-12, 12] (beyond, tanh is +-1) plus the specials, each
// compared bit for bit with the scalar twin.
TEST(KernelNumerics, GeluMulSimdTanhAgreesWithTheScalarTwinOnASweep) {
  std::vector<float> g;
  for (uint32_t b = 0; b < 0x41400000u; b += 211) {  // 0x41400000 = 12.0f
    const float f = std::bit_cast<float>(b);
    g.push_back(f);
    g.push_back(-f);
  }
  for (float f : {0.0f, -0.0f, 12.0f, -12.0f, 19.9f, -25.0f, 1e30f, -1e30f, std::numeric_limits<float>::infinity(),
                  -std::numeric_limits<float>::infinity(), std::numeric_limits<float>::quiet_NaN(),
                  std::numeric_limits<float>::denorm_min(), 1e-20f, -3e-8f})
    g.push_back(f);
  const int64_t n = static_cast<int64_t>(g.size());
  std::vector<float> u(g.size(), 1.0f), want(g.size()), got(g.size());
  ASSERT_TRUE(gelu_mul_ref(g.data(), u.data(), n, want.data(), nullptr).ok());
  ASSERT_TRUE(gelu_mul(g.data(), u.data(), n, got.data(), pool_of(2)).ok());
  int64_t differ = 0;
  for (int64_t i = 0; i < n; ++i) {
    const bool same = std::bit_cast<uint32_t>(want[static_cast<size_t>(i)]) == std::bit_cast<uint32_t>(got[static_cast<size_t>(i)]) ||
                      (std::isnan(want[static_cast<size_t>(i)]) && std::isnan(got[static_cast<size_t>(i)]));
    if (!same && differ++ < 5)
      ADD_FAILURE() << "g = " << g[static_cast<size_t>(i)] << ": scalar " << want[static_cast<size_t>(i)] << ", "
                    << cpu_kernel_path() << " " << got[static_cast<size_t>(i)];
  }
  EXPECT_EQ(differ, 0) << "of " << n;
  EXPECT_GT(n, 10'000'000 / 2);
}

// The attention's logit cap and exp in double lanes against their scalar loops, bit for bit,
// on sweeps over fp32 inputs (every magnitude up to 2^12 for the cap, [-130, 0] and a
// little above for exp, where fp32 results reach their subnormals and 0) and the specials.
TEST(KernelNumerics, AttentionCapAndExpLanesAgreeWithTheScalarLoops) {
  auto same = [](float a, float b) { return std::bit_cast<uint32_t>(a) == std::bit_cast<uint32_t>(b) || (std::isnan(a) && std::isnan(b)); };
  const float inf = std::numeric_limits<float>::infinity(), nan = std::numeric_limits<float>::quiet_NaN();
  std::vector<float> cap_in;
  for (uint32_t b = 0; b < 0x45800000u; b += 331) {  // 0x45800000 = 4096.0f
    cap_in.push_back(std::bit_cast<float>(b));
    cap_in.push_back(-std::bit_cast<float>(b));
  }
  for (float f : {-1e30f, 1e30f, inf, -inf, nan, 0.0f, -0.0f}) cap_in.push_back(f);
  for (float cap : {30.0f, 1.0f, 50.0f}) {
    std::vector<float> want = cap_in, got = cap_in;
    detail::attention_cap_scores(want.data(), static_cast<int64_t>(want.size()), cap, false);
    detail::attention_cap_scores(got.data(), static_cast<int64_t>(got.size()), cap, true);
    int64_t differ = 0;
    for (size_t i = 0; i < want.size(); ++i)
      if (!same(want[i], got[i]) && differ++ < 5)
        ADD_FAILURE() << "cap " << cap << ", s = " << cap_in[i] << ": scalar " << want[i] << ", lanes " << got[i];
    EXPECT_EQ(differ, 0) << "cap " << cap << " of " << want.size();
  }
  EXPECT_EQ(cap_in[cap_in.size() - 7], -1e30f);  // the mask value passes through
  std::vector<float> exp_in;
  for (float x = -130.0f; x < 2.0f; x += 1.3e-5f) exp_in.push_back(x);
  for (float f : {-1e30f, -inf, inf, nan, 0.0f, -0.0f, 88.0f, 89.0f, -103.5f, -104.0f}) exp_in.push_back(f);
  for (float mx : {0.0f, 1.5f, -1e30f}) {
    std::vector<float> want = exp_in, got = exp_in;
    detail::attention_exp_scores(want.data(), static_cast<int64_t>(want.size()), mx, false);
    detail::attention_exp_scores(got.data(), static_cast<int64_t>(got.size()), mx, true);
    int64_t differ = 0, subnormal = 0;
    for (size_t i = 0; i < want.size(); ++i) {
      subnormal += std::fpclassify(want[i]) == FP_SUBNORMAL ? 1 : 0;
      if (!same(want[i], got[i]) && differ++ < 5)
        ADD_FAILURE() << "mx " << mx << ", s = " << exp_in[i] << ": scalar " << want[i] << ", lanes " << got[i];
    }
    EXPECT_EQ(differ, 0) << "mx " << mx << " of " << want.size();
    if (mx == 0.0f) {
      EXPECT_GT(subnormal, 1000);
    }
  }
}

// combine_chains (every chained product's last step) against tree_sum column by column:
// chains 1-40 (odd counts carry an element up; above 32 the in-place path), widths around
// its 64-column blocks, several rows of x, values whose sums depend on the order.
TEST(KernelNumerics, CombineChainsIsTheTreeOfEachColumn) {
  Rng rng(77);
  for (int64_t chains = 1; chains <= 40; ++chains) {
    for (int64_t width : {1, 63, 64, 65, 200}) {
      const int64_t M = chains % 3 + 1, ld = width + 5, stride = M * ld + 3;
      std::vector<float> parts(static_cast<size_t>(chains * stride));
      for (auto& v : parts) v = rng.f32(-1.0f, 1.0f) * std::ldexp(1.0f, static_cast<int>(rng.range(0, 40)) - 20);
      const std::vector<float> original = parts;
      const int64_t ldy = width + 2;
      std::vector<float> y(static_cast<size_t>(M * ldy), -7.0f);
      detail::combine_chains(parts.data(), chains, stride, ld, M, width, y.data(), ldy);
      for (int64_t m = 0; m < M; ++m) {
        for (int64_t c = 0; c < width; ++c) {
          std::vector<float> col(static_cast<size_t>(chains));
          for (int64_t ch = 0; ch < chains; ++ch) col[static_cast<size_t>(ch)] = original[static_cast<size_t>(ch * stride + m * ld + c)];
          const float want = tree_sum(col.data(), chains);
          ASSERT_EQ(std::bit_cast<uint32_t>(y[static_cast<size_t>(m * ldy + c)]), std::bit_cast<uint32_t>(want))
              << chains << " chains, width " << width << ", row " << m << ", column " << c;
        }
        for (int64_t c = width; c < ldy; ++c) ASSERT_EQ(y[static_cast<size_t>(m * ldy + c)], -7.0f);
      }
    }
  }
}

TEST(KernelNumerics, ScaleBf16KeepsTheSpecials) {
  const float inf = std::numeric_limits<float>::infinity();
  std::vector<float> x = {std::numeric_limits<float>::quiet_NaN(), inf, -inf, 0.0f, -0.0f, 3.3e38f, 1.00390625f,
                          1.01171875f, std::bit_cast<float>(0x7f800001u), -2.5f};
  x.resize(100, 1.5f);  // past one SIMD vector
  std::vector<float> want(x.size()), got(x.size());
  ASSERT_TRUE(scale_bf16_ref(x.data(), static_cast<int64_t>(x.size()), 2.0f, want.data(), nullptr).ok());
  ASSERT_TRUE(scale_bf16(x.data(), static_cast<int64_t>(x.size()), 2.0f, got.data(), pool_of(2)).ok());
  for (size_t i = 0; i < x.size(); ++i) EXPECT_EQ(std::bit_cast<uint32_t>(want[i]), std::bit_cast<uint32_t>(got[i])) << i;
  EXPECT_TRUE(std::isnan(got[0]) && std::isnan(got[8]));
  EXPECT_EQ(got[1], inf);
  EXPECT_EQ(got[2], -inf);
  EXPECT_EQ(got[5], inf);          // bf16(3.3e38) * 2 overflows
  EXPECT_EQ(got[6], 2.0f);         // 1 + 2^-8 is a bf16 halfway case: to even, 1
  EXPECT_EQ(got[7], 2.03125f);     // 1 + 3 * 2^-8: halfway, to even 1 + 2^-6
  EXPECT_EQ(got[9], -5.0f);
}

TEST(KernelNumerics, EmbedZerosOutsideItsRows) {
  // This part holds rows [10, 13) of a D = 3 table.
  const int64_t D = 3;
  const std::vector<uint16_t> table = {f32_to_bf16_bits(1.0f), f32_to_bf16_bits(-2.0f), f32_to_bf16_bits(0.5f),
                                       f32_to_bf16_bits(3.0f), f32_to_bf16_bits(1.0f / 3.0f), f32_to_bf16_bits(7.0f),
                                       f32_to_bf16_bits(-1.0f), f32_to_bf16_bits(0.0f), f32_to_bf16_bits(100.0f)};
  const std::vector<int32_t> tokens = {10, 9, 12, 13, 11, -1, 0};
  std::vector<float> out(tokens.size() * D);
  poison(out);
  embed(tokens.data(), static_cast<int64_t>(tokens.size()), table.data(), 10, 3, D, 78.38367176906169f, out.data());
  const float mult = 78.38367176906169f;
  auto row = [&](size_t m) { return std::vector<float>(out.begin() + static_cast<long>(m * D), out.begin() + static_cast<long>((m + 1) * D)); };
  auto scaled = [&](size_t r) {
    std::vector<float> v(D);
    for (int64_t d = 0; d < D; ++d) v[static_cast<size_t>(d)] = round_bf16(bf16_bits_to_f32(table[r * D + static_cast<size_t>(d)]) * mult);
    return v;
  };
  EXPECT_EQ(row(0), scaled(0));
  EXPECT_EQ(row(1), std::vector<float>(D, 0.0f));
  EXPECT_EQ(row(2), scaled(2));
  EXPECT_EQ(row(3), std::vector<float>(D, 0.0f));  // one past the last row
  EXPECT_EQ(row(4), scaled(1));
  EXPECT_EQ(row(5), std::vector<float>(D, 0.0f));
  EXPECT_EQ(row(6), std::vector<float>(D, 0.0f));
  EXPECT_EQ(out[0], round_bf16(78.38367176906169f));  // 78.5
  EXPECT_EQ(out[0], 78.5f);
}

TEST(KernelNumerics, RoundToBf16AndAddBf16TieToEven) {
  const std::vector<float> x = {
      1.0f + 0x1p-8f,               // tie between 1 (even) and 1 + 2^-7 -> 1
      1.0f + 3 * 0x1p-8f,           // tie between 1 + 2^-7 (odd) and 1 + 2^-6 -> 1 + 2^-6
      1.0f + 0x1p-8f + 0x1p-20f,    // just above the tie -> 1 + 2^-7
      -(1.0f + 0x1p-8f),            // -1
      -(1.0f + 3 * 0x1p-8f),        // -(1 + 2^-6)
      255.5f,                       // spacing 1 in [128, 256): tie between 255 (odd) and 256 -> 256
      254.5f,                       // tie -> 254 (even)
      FLT_MAX,                      // 0x7f7fffff: rounds up, out of range -> +inf
      -FLT_MAX,                     // -inf
      0.0f, -0.0f};
  const std::vector<float> want = {1.0f, 1.0f + 0x1p-6f, 1.0f + 0x1p-7f, -1.0f, -(1.0f + 0x1p-6f), 256.0f, 254.0f,
                                   INFINITY, -INFINITY, 0.0f, -0.0f};
  std::vector<float> out(x.size());
  round_to_bf16(x.data(), static_cast<int64_t>(x.size()), out.data());
  for (size_t i = 0; i < x.size(); ++i) EXPECT_EQ(bits_of(out[i]), bits_of(want[i])) << i << ": " << x[i];
  // add_bf16: the sum in fp32, then the same rounding.
  const std::vector<float> a = {1.0f, 1.0f + 0x1p-7f, 256.0f, -1.0f, 0.5f};
  const std::vector<float> b = {0x1p-8f, 0x1p-8f, -1.5f, -0x1p-8f, 0.25f};
  const std::vector<float> sum_want = {1.0f, 1.0f + 0x1p-6f, 254.0f /* 254.5 tie -> 254 */, -1.0f, 0.75f};
  std::vector<float> s(a.size());
  add_bf16(a.data(), b.data(), static_cast<int64_t>(a.size()), s.data());
  for (size_t i = 0; i < a.size(); ++i) EXPECT_EQ(s[i], sum_want[i]) << i;
}

// The pool the multi-threaded twins run on: many short runs in a row (the pattern of a
// forward pass), every index exactly once, for every size around the thread count.
TEST(KernelPool, EveryIndexRunsOnceOverManyShortRuns) {
  for (unsigned threads : {1u, 2u, 3u}) {
    ThreadPool& pool = *pool_of(threads);
    std::vector<std::atomic<int>> hits(64);
    int64_t runs = 0, wrong = 0;
    for (int round = 0; round < 150; ++round) {
      for (size_t n : {size_t{0}, size_t{1}, size_t{2}, size_t{3}, size_t{5}, size_t{64}}) {
        for (auto& h : hits) h.store(0);
        pool.run(n, [&](size_t i) { hits[i].fetch_add(1); });
        for (size_t i = 0; i < hits.size(); ++i) wrong += hits[i].load() != (i < n ? 1 : 0) ? 1 : 0;
        ++runs;
      }
    }
    EXPECT_EQ(wrong, 0) << threads << " threads, " << runs << " runs";
  }
}

// ---------------------------------------------------------------------------------
// 3. Batched equals alone.

TEST(KernelBatching, MatmulQ8RowEqualsTheRowAlone) {
  const int64_t M = 7, K = 150, N = 70, B = 2, ldx = K + 2, ldy = N + 1;
  Rng rng(11);
  std::vector<float> x(static_cast<size_t>(M * ldx));
  for (auto& v : x) v = rng.bf16_value(-5, 3);
  std::vector<int8_t> codes(static_cast<size_t>(K * N));
  for (auto& c : codes) c = static_cast<int8_t>(rng.range(-128, 127));
  std::vector<uint16_t> scales(static_cast<size_t>(B * N));
  for (auto& s : scales) s = f32_to_bf16_bits(std::fabs(rng.bf16_value(-10, 0)) + 0x1p-12f);
  for (bool simd : {false, true})
    for (unsigned threads : {0u, 3u}) {
      auto fn = simd ? matmul_q8 : matmul_q8_ref;
      std::vector<float> all(static_cast<size_t>(M * ldy));
      ASSERT_TRUE(fn(x.data(), M, K, ldx, codes.data(), scales.data(), N, B, all.data(), ldy, pool_of(threads), 0).ok());
      for (int64_t m = 0; m < M; ++m) {
        std::vector<float> one(static_cast<size_t>(N));
        ASSERT_TRUE(fn(x.data() + m * ldx, 1, K, K, codes.data(), scales.data(), N, B, one.data(), N, pool_of(threads), 0).ok());
        EXPECT_EQ(std::memcmp(one.data(), all.data() + m * ldy, static_cast<size_t>(N) * 4), 0)
            << "row " << m << (simd ? " simd" : " ref") << ", threads " << threads;
      }
    }
}

TEST(KernelBatching, MatmulBf16NtRowEqualsTheRowAlone) {
  const int64_t M = 7, K = 203, N = 45;
  Rng rng(12);
  std::vector<float> x(static_cast<size_t>(M * K));
  for (auto& v : x) v = rng.bf16_value(-8, 4);
  std::vector<uint16_t> w(static_cast<size_t>(N * K));
  for (auto& v : w) v = rng.bf16_bits(-8, 2);
  for (bool simd : {false, true})
    for (unsigned threads : {0u, 2u}) {
      auto fn = simd ? matmul_bf16_nt : matmul_bf16_nt_ref;
      std::vector<float> all(static_cast<size_t>(M * N));
      ASSERT_TRUE(fn(x.data(), M, K, w.data(), N, all.data(), N, pool_of(threads)).ok());
      for (int64_t m = 0; m < M; ++m) {
        std::vector<float> one(static_cast<size_t>(N));
        ASSERT_TRUE(fn(x.data() + m * K, 1, K, w.data(), N, one.data(), N, pool_of(threads)).ok());
        EXPECT_EQ(std::memcmp(one.data(), all.data() + m * N, static_cast<size_t>(N) * 4), 0)
            << "row " << m << (simd ? " simd" : " ref") << ", threads " << threads;
      }
    }
}

TEST(KernelBatching, QuantizedSchemesRowEqualsTheRowAlone) {
  // Every M takes a different register blocking in the AVX-512 walks (1, 2, 3 or 4 rows,
  // then blocks of 4): a row's bits must not depend on it, nor on the chains or threads.
  const int64_t M = 7, K = 256, N = 45, ldx = K + 2, ldy = N + 1;
  Rng rng(14);
  const QuantMatrix q4 = random_q4(rng, K, N, 64), f8 = random_f8(rng, K, N);
  std::vector<uint16_t> wb(static_cast<size_t>(K * N));
  for (auto& v : wb) v = rng.bf16_bits(-8, 2);
  for (bool f32 : {false, true}) {
    std::vector<float> x(static_cast<size_t>(M * ldx));
    for (auto& v : x) v = f32 ? rng.f32(-3.0f, 3.0f) : rng.bf16_value(-5, 3);
    for (int scheme = 0; scheme < 3; ++scheme)
      for (bool simd : {false, true})
        for (unsigned threads : {0u, 3u})
          for (int64_t sr : {int64_t{0}, int64_t{64}}) {
            auto run = [&](const float* xs, int64_t rows, int64_t lx, float* y, int64_t ly) {
              if (scheme == 0) {
                auto fn = f32 ? (simd ? matmul_q4_f32 : matmul_q4_f32_ref) : (simd ? matmul_q4 : matmul_q4_ref);
                return fn(xs, rows, K, lx, q4.payload.data(), 64, N, y, ly, pool_of(threads), sr);
              }
              if (scheme == 1) {
                auto fn = f32 ? (simd ? matmul_f8_f32 : matmul_f8_f32_ref) : (simd ? matmul_f8 : matmul_f8_ref);
                return fn(xs, rows, K, lx, f8.payload.data(), N, y, ly, pool_of(threads), sr);
              }
              auto fn = f32 ? (simd ? matmul_bf16_f32 : matmul_bf16_f32_ref) : (simd ? matmul_bf16 : matmul_bf16_ref);
              return fn(xs, rows, K, lx, wb.data(), N, y, ly, pool_of(threads), sr);
            };
            std::vector<float> all(static_cast<size_t>(M * ldy));
            ASSERT_TRUE(run(x.data(), M, ldx, all.data(), ldy).ok());
            for (int64_t m = 0; m < M; ++m) {
              std::vector<float> one(static_cast<size_t>(N));
              ASSERT_TRUE(run(x.data() + m * ldx, 1, K, one.data(), N).ok());
              EXPECT_EQ(std::memcmp(one.data(), all.data() + m * ldy, static_cast<size_t>(N) * 4), 0)
                  << "scheme " << scheme << " row " << m << (f32 ? " f32" : "") << (simd ? " simd" : " ref") << ", threads "
                  << threads << ", sum_rows " << sr;
            }
          }
  }
}

TEST(KernelBatching, AttentionRowEqualsTheRowAlone) {
  const int64_t M = 7, Hq = 6, KV = 2, dh = 20, n_keys = 50;
  AttentionShape sh{Hq, KV, dh, 64, 0.125f, 30.0f};
  Rng rng(13);
  std::vector<float> q(static_cast<size_t>(M * Hq * dh));
  for (auto& v : q) v = rng.bf16_value(-3, 2);
  std::vector<uint16_t> kc(static_cast<size_t>(KV * sh.cap * dh)), vc(kc.size());
  for (auto& v : kc) v = rng.bf16_bits(-3, 1);
  for (auto& v : vc) v = rng.bf16_bits(-3, 1);
  std::vector<uint8_t> valid(static_cast<size_t>(sh.cap), 1);
  valid[0] = valid[1] = valid[17] = 0;
  const std::vector<int32_t> pos = {43, 44, 45, 46, 47, 48, 1};  // the last one sees no valid key
  for (bool simd : {false, true})
    for (unsigned threads : {0u, 3u}) {
      auto fn = simd ? attention : attention_ref;
      std::vector<float> all(q.size());
      ASSERT_TRUE(fn(q.data(), M, pos.data(), kc.data(), vc.data(), valid.data(), n_keys, sh, all.data(), pool_of(threads)).ok());
      for (int64_t m = 0; m < M; ++m) {
        std::vector<float> one(static_cast<size_t>(Hq * dh));
        ASSERT_TRUE(fn(q.data() + m * Hq * dh, 1, &pos[static_cast<size_t>(m)], kc.data(), vc.data(), valid.data(), n_keys, sh,
                       one.data(), pool_of(threads))
                        .ok());
        EXPECT_EQ(std::memcmp(one.data(), all.data() + m * Hq * dh, one.size() * 4), 0)
            << "row " << m << (simd ? " simd" : " ref") << ", threads " << threads;
      }
    }
}

// ---------------------------------------------------------------------------------
// 4. Every SIMD level. This process runs the best level the CPU has; the suites above
// run again in child processes with GROKIT_KERNELS=avx2 and =scalar, so that the AVX2
// kernels are checked on machines that also have AVX-512 (and the other way round
// nothing is lost: a forced level the CPU lacks falls back to a lower one).

// Runs this binary with `setting` (NAME=value: GROKIT_KERNELS or GROKIT_BF16_PRODUCTS)
// in place of the parent's, and no GTEST_* variables (so that an output file of the
// parent is not overwritten), on `filter`; returns the wait status.
int run_self(const std::string& setting, const std::string& filter) {
  std::vector<char> self(4096, '\0');
  ssize_t len = readlink("/proc/self/exe", self.data(), self.size() - 1);
  if (len <= 0) return -1;
  std::vector<std::string> env;
  for (char** e = environ; *e != nullptr; ++e) {
    std::string_view v(*e);
    if (v.starts_with("GROKIT_KERNELS=") || v.starts_with("GROKIT_BF16_PRODUCTS=") || v.starts_with("GTEST_"))
      continue;
    env.emplace_back(v);
  }
  env.push_back(setting);
  std::vector<std::string> args = {self.data(), "--gtest_filter=" + filter, "--gtest_also_run_disabled_tests",
                                   "--gtest_brief=1"};
  std::vector<char*> argv, envp;
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  for (auto& e : env) envp.push_back(e.data());
  envp.push_back(nullptr);
  pid_t pid = 0;
  if (posix_spawn(&pid, self.data(), nullptr, nullptr, argv.data(), envp.data()) != 0) return -1;
  int status = 0;
  if (waitpid(pid, &status, 0) != pid) return -1;
  return status;
}

TEST(KernelLevels, LowerLevelsMatchTheScalarTwinsInChildProcesses) {
  if (std::getenv("GROKIT_KERNELS") != nullptr) GTEST_SKIP() << "a child run (GROKIT_KERNELS is set)";
  for (const char* level : {"avx2", "scalar"}) {
    int status = run_self(std::string("GROKIT_KERNELS=") + level,
                          "Ops/KernelParity.*:KernelNumerics.*:KernelBatching.*:KernelLevels.ForcedLevelIsHonoured");
    EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0)
        << "the kernel tests fail with GROKIT_KERNELS=" << level << " (wait status " << status
        << "); rerun with that variable to see which";
  }
}

// Prefill's bf16 products (the int8 panels and the chunked layouts' panels) take one of
// two forms on AVX-512 (detail::bf16_products_by_fma, chosen by timing): this process
// checks the one it chose, a child process the other.
TEST(KernelLevels, TheOtherBf16ProductFormMatchesTheScalarTwinsInAChildProcess) {
  if (std::getenv("GROKIT_KERNELS") != nullptr || std::getenv("GROKIT_BF16_PRODUCTS") != nullptr)
    GTEST_SKIP() << "a child run";
  if (!detail::use_avx512()) GTEST_SKIP() << "no AVX-512 BF16 here: the bf16 products have one form";
  const std::string other = detail::bf16_products_by_fma() ? "vdpbf16ps" : "fma";
  int status = run_self("GROKIT_BF16_PRODUCTS=" + other,
                        "Ops/KernelParity.*matmul_q8*:Ops/KernelParity.*matmul_q4*:Ops/KernelParity.*matmul_f8*:"
                        "Ops/KernelParity.*matmul_bf16*:"
                        "KernelBatching.*:KernelNumerics.*Chunked*:KernelNumerics.MatmulF8*:"
                        "KernelLevelsChild.DISABLED_ForcedBf16FormIsHonoured");
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0)
      << "the weight products fail with GROKIT_BF16_PRODUCTS=" << other << " (wait status " << status
      << "); rerun with that variable to see which";
}

// Run only by the test above, in its child (a plain run does not list it).
TEST(KernelLevelsChild, DISABLED_ForcedBf16FormIsHonoured) {
  const char* forced = std::getenv("GROKIT_BF16_PRODUCTS");
  ASSERT_NE(forced, nullptr) << "run by TheOtherBf16ProductFormMatchesTheScalarTwinsInAChildProcess";
  EXPECT_EQ(detail::bf16_products_by_fma(), std::string_view(forced) == "fma") << forced;
  EXPECT_STREQ(cpu_bf16_pair_form(), forced);  // what `grokit bench` reports
}

TEST(KernelLevels, ForcedLevelIsHonoured) {
  const std::string path = cpu_kernel_path();
  RecordProperty("kernel_path", path);
  const char* forced = std::getenv("GROKIT_KERNELS");
  if (forced == nullptr) {
    EXPECT_TRUE(path == "avx512" || path == "avx2" || path == "scalar") << path;
  } else if (std::string_view(forced) == "scalar") {
    EXPECT_EQ(path, "scalar");
  } else if (std::string_view(forced) == "avx2") {
    __builtin_cpu_init();
    const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    EXPECT_EQ(path, has ? "avx2" : "scalar");
  }
}

}  // namespace
}  // namespace grokit::kernels
