// Shared helpers of the CPU kernels (not part of the public interface).
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "kernels/kernels.h"

namespace grokit::kernels::detail {

bool use_avx2();
// AVX-512 F/BW/VL/DQ with BF16 (vcvtneps2bf16 rounds to bf16 exactly as round_bf16 does
// for every value the forward pass meets: it flushes denormals, which no scale or
// activation here is).
bool use_avx512();
// Whether the AVX-512 kernels form prefill's bf16 products (panels for 3+ rows of x) with
// two fmas per pair of k (k + 1 first) instead of one vdpbf16ps: the same sums in the same
// order. Decided once per process by timing both on this core: vdpbf16ps issues about
// twice per cycle on Zen 5, but once per two cycles on the Xeons measured, where two fmas
// take one. GROKIT_BF16_PRODUCTS=fma or =vdpbf16ps forces the choice.
bool bf16_products_by_fma();

inline float bf16f(uint16_t h) { return bf16_bits_to_f32(h); }

// The sum of 16 fp32 lanes by halving (lane i += lane i + 8, + 4, + 2, + 1): the pinned
// end of a chain's sums (kernels.h). Overwrites l.
inline float halve16_lanes(float* l) {
  for (int step = 8; step >= 1; step /= 2) {
    for (int i = 0; i < step; ++i) l[i] = l[i] + l[i + step];
  }
  return l[0];
}

// Runs fn(i) for i in [0, n) on the pool, or inline without one.
template <class Fn>
void for_each(Pool pool, size_t n, Fn&& fn) {
  if (pool == nullptr || n <= 1) {
    for (size_t i = 0; i < n; ++i) fn(i);
  } else {
    pool->run(n, std::function<void(size_t)>(fn));
  }
}

// Splits [0, n) into about `parts` chunks whose sizes are multiples of `align`.
inline int64_t chunk_size(int64_t n, int64_t parts, int64_t align) {
  int64_t c = (n + parts - 1) / std::max<int64_t>(parts, 1);
  c = (c + align - 1) / align * align;
  return std::max<int64_t>(c, align);
}
inline int64_t thread_count(Pool pool) { return pool == nullptr ? 1 : static_cast<int64_t>(pool->size()); }
inline int64_t task_count(Pool pool) { return 4 * thread_count(pool); }

// Dot products accumulate in double (products of fp32 and bf16 values are exact there)
// and round once to fp32: an ideal fp32 accumulator, so the result does not depend on
// the order of the terms beyond double rounding. Where the SIMD form runs across k, the
// order is still fixed, so the twins agree to the bit: eight partial sums (lane j takes
// k = j mod 8) combined as ((0+1)+(2+3))+((4+5)+(6+7)).
// The chains' partial sums of a product (parts: [chains][stride], row m at m * ld,
// `width` columns) meet in tree_sum's pairwise tree, level by level across whole rows
// of columns (vectorized, the same adds per column), in place; the sums go to y rows
// (ldy apart). Defined in matmul_q8.cpp beside tree_sum.
void combine_chains(float* parts, int64_t chains, int64_t stride, int64_t ld, int64_t M, int64_t width, float* y,
                    int64_t ldy);

// Staged copies of x start on a cache line: the AVX2 walks and panels load 32 bytes of
// x at a time and the AVX-512 ones 64, which a vector's 16-byte alignment would split
// across two lines half or all of the time.
template <class T>
using Staged = std::vector<T, AlignedAllocator<T, 64>>;

// x staged once per call for the row-major products' AVX-512 pair kernels (q8rb, bf16 W
// [K][N]): bf16 pairs for vdpbf16ps, [M][(K + 1) / 2], x[k] in the low half and x[k + 1]
// in the high half (zero past K).
inline void stage_x_pairs(const float* x, int64_t M, int64_t K, int64_t ldx, Staged<uint32_t>& xpairs) {
  const int64_t kp = (K + 1) / 2;
  xpairs.resize(static_cast<size_t>(M * kp));
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t p = 0; p < kp; ++p) {
      const uint32_t lo = f32_to_bf16_bits(x[m * ldx + 2 * p]);
      const uint32_t hi = 2 * p + 1 < K ? f32_to_bf16_bits(x[m * ldx + 2 * p + 1]) : 0;
      xpairs[static_cast<size_t>(m * kp + p)] = lo | hi << 16;
    }
  }
}

// x staged once per call for the k-chunked products (q4g, f8col): bf16 bits [M][K] for
// the AVX-512 pair kernels; for AVX2, each chunk in its layout's lane order
// (stage_x_chunks).
inline void stage_x_bf16(const float* x, int64_t M, int64_t K, int64_t ldx, Staged<uint16_t>& xb) {
  xb.resize(static_cast<size_t>(M * K));
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) xb[static_cast<size_t>(m * K + k)] = f32_to_bf16_bits(x[m * ldx + k]);
}
// For a layout's AVX2 decode, each 32-row chunk of x in the order its lanes take it:
// a[j] = x[order[j]], [M][K].
inline void stage_x_chunks(const float* x, int64_t M, int64_t K, int64_t ldx, const int* order, Staged<float>& xa) {
  xa.resize(static_cast<size_t>(M * K));
  for (int64_t m = 0; m < M; ++m)
    for (int64_t c = 0; c < K / 32; ++c)
      for (int j = 0; j < 32; ++j) xa[static_cast<size_t>(m * K + 32 * c + j)] = x[m * ldx + 32 * c + order[j]];
}

// The task plan every weight product shares. chain_part(ch, c0, c1, out, ld) writes the
// sums of chain ch (its rows of W) for columns [c0, c1) of every row of x into out
// ([M][ld], column c0 at out[0]); the chains then meet in combine_chains, into y.
//   Few rows of x (decode): tasks are (chain, column part) pairs, so each task streams
//   one contiguous block of rows; parts of at most max_width columns, and narrow enough
//   that a task's sums fit in L2.
//   Many rows (prefill) or one chain: tasks are column ranges narrow enough that every
//   chain's sums for them fit in a few MiB.
// align: the columns of a task start at multiples of it (the kernels' tile width).
// The decode plan takes products with few rows of x and several chains.
inline bool decode_plan_fits(int64_t M, int64_t N, int64_t chains) {
  return chains > 1 && M * N * chains <= (int64_t{1} << 22);
}
// One product of a decode plan: N columns into y (rows ldy apart).
struct ChainProduct {
  int64_t N = 0;
  float* y = nullptr;
  int64_t ldy = 0;
};
// The decode plan over several products of the same x (each decode_plan_fits):
// chain_part(p, ch, c0, c1, out, ld) as run_chains' for product p. Tasks are (product,
// chain, column part) triples, then column ranges of the combines: the threads meet
// twice for all the products together.
template <class ChainPart>
void run_chains_decode(Pool pool, int64_t M, const ChainProduct* prods, int64_t count, int64_t chains, int64_t align,
                       int64_t max_width, const ChainPart& chain_part) {
  // A task's sums (M x width floats) stay within L2: they are read and written once per
  // step of rows (measured: M = 256, N = 1024 ran at a sixth of the speed with 1 MiB).
  constexpr int64_t kTaskSums = int64_t{1} << 16;
  struct Plan {
    int64_t parts, width, ld, at;  // column parts and their width; sums' row length; offset in out
    int64_t first_task, first_combine, cw;
  };
  // Reused across calls (a fresh buffer of this size would be mapped and faulted in on
  // every call of a decode step), as are the plans.
  static thread_local std::vector<float> out_storage;
  static thread_local std::vector<Plan> plan_storage;
  std::vector<float>& out = out_storage;
  std::vector<Plan>& plans = plan_storage;
  plans.resize(static_cast<size_t>(count));
  int64_t tasks = 0, combines = 0, floats = 0;
  for (int64_t p = 0; p < count; ++p) {
    const int64_t N = prods[p].N;
    Plan& P = plans[static_cast<size_t>(p)];
    P.parts = std::max<int64_t>({1, (thread_count(pool) + chains - 1) / chains, (N + max_width - 1) / max_width,
                                 (M * N + kTaskSums - 1) / kTaskSums});
    P.width = chunk_size(N, P.parts, align);
    P.ld = N + 16;  // rows one cache line longer than N (see the padding below)
    P.at = floats;
    floats += chains * M * P.ld;
    P.first_task = tasks;
    tasks += chains * P.parts;
    P.cw = chunk_size(N, task_count(pool), 64);
    P.first_combine = combines;
    combines += (N + P.cw - 1) / P.cw;
  }
  out.resize(static_cast<size_t>(floats));
  auto product_of = [&](int64_t t, int64_t Plan::*first) {
    int64_t p = 0;
    while (p + 1 < count && plans[static_cast<size_t>(p + 1)].*first <= t) ++p;
    return p;
  };
  for_each(pool, static_cast<size_t>(tasks), [&](size_t task) {
    const int64_t p = product_of(static_cast<int64_t>(task), &Plan::first_task);
    const Plan& P = plans[static_cast<size_t>(p)];
    const int64_t t = static_cast<int64_t>(task) - P.first_task, N = prods[p].N;
    const int64_t ch = t / P.parts, part = t % P.parts;
    const int64_t c0 = std::min(N, part * P.width), c1 = std::min(N, c0 + P.width);
    if (c0 < c1) chain_part(p, ch, c0, c1, out.data() + P.at + ch * M * P.ld + c0, P.ld);
  });
  for_each(pool, static_cast<size_t>(combines), [&](size_t task) {
    const int64_t p = product_of(static_cast<int64_t>(task), &Plan::first_combine);
    const Plan& P = plans[static_cast<size_t>(p)];
    const int64_t t = static_cast<int64_t>(task) - P.first_combine, N = prods[p].N;
    const int64_t c0 = t * P.cw, c1 = std::min(N, c0 + P.cw);
    combine_chains(out.data() + P.at + c0, chains, M * P.ld, P.ld, M, c1 - c0, prods[p].y + c0, prods[p].ldy);
  });
}

template <class ChainPart>
void run_chains(Pool pool, int64_t M, int64_t N, int64_t chains, int64_t align, int64_t max_width, float* y,
                int64_t ldy, const ChainPart& chain_part) {
  if (decode_plan_fits(M, N, chains)) {
    const ChainProduct one{N, y, ldy};
    run_chains_decode(pool, M, &one, 1, chains, align, max_width,
                      [&](int64_t, int64_t ch, int64_t c0, int64_t c1, float* out, int64_t ld) {
                        chain_part(ch, c0, c1, out, ld);
                      });
    return;
  }
  int64_t chunk = chunk_size(N, task_count(pool), align);
  chunk = std::max<int64_t>(align, std::min(chunk, (int64_t{1} << 19) / std::max<int64_t>(1, chains * M) / align * align));
  const int64_t tasks = (N + chunk - 1) / chunk;
  for_each(pool, static_cast<size_t>(tasks), [&](size_t t) {
    const int64_t c0 = static_cast<int64_t>(t) * chunk, c1 = std::min(N, c0 + chunk), width = c1 - c0;
    if (chains == 1) return chain_part(0, c0, c1, y + c0, ldy);
    // Rows of the sums one cache line longer than the task: a power-of-two row length
    // would map every row's tile to the same few L1 sets (measured: M = 64, width 512
    // ran at a third of the speed).
    const int64_t ld = width + 16;
    // The chains' blocks one cache line apart beyond their size: M * ld floats is often a
    // multiple of 4 KiB, which would put row m of every chain in one L1 set.
    const int64_t cs = M * ld + 16;
    thread_local std::vector<float> parts;
    parts.resize(static_cast<size_t>(chains * cs));
    for (int64_t ch = 0; ch < chains; ++ch) chain_part(ch, c0, c1, parts.data() + ch * cs, ld);
    combine_chains(parts.data(), chains, cs, ld, M, width, y + c0, ldy);
  });
}

// The decode walks over rows of W (matmul_q8, matmul_bf16) read a few rows at a time,
// streams a row apart, and spend enough work on each line that the hardware prefetchers
// fall behind (and stop at every 4 KiB page of the mapped file): each step over a
// tile's columns requests the rows one step further on, or about 4 KiB on for short rows,
// in memory order (BlockPrefetch; measured on two Zen 5 cores: 22 -> 40-45 GB/s for
// int8, about the plain read bandwidth). rows_ahead: how far, in rows, for a step of
// `step` rows.
inline int64_t rows_ahead(int64_t row_bytes, int64_t step) {
  return step * std::max<int64_t>(1, 4096 / (step * row_bytes));
}
// The line at p. An asm statement: GCC 12 deleted these prefetches as side-effect free
// (as _mm_prefetch or __builtin_prefetch, no prefetch was left in the object code).
inline void prefetch_line(const char* p) { asm volatile("prefetcht0 %0" : : "m"(*p)); }
// The lines of a block of `rows` rows (row_bytes apart, `width` bytes from base in each)
// requested in memory order, a few per call: the walks read their rows side by side, and
// requests made in that order (a line of each row in turn) reached DRAM as that many
// interleaved streams, slower than one stream (measured: four rows side by side read
// 43 GB/s where a sequential read gets 69-73).
struct BlockPrefetch {
  const char* row = nullptr;
  int64_t row_bytes = 0, width = 0, rows = 0, at = 0;  // at: offset in the current row
  void reset(const void* base, int64_t row_bytes_, int64_t width_, int64_t rows_) {
    row = static_cast<const char*>(base);
    row_bytes = row_bytes_;
    width = width_;
    rows = rows_;
    at = 0;
  }
  void next(int64_t lines) {
    for (; lines > 0 && rows > 0; --lines) {
      prefetch_line(row + at);
      at += 64;
      if (at >= width) {
        at = 0;
        row += row_bytes;
        --rows;
      }
    }
  }
};
// How many of the `step` rows from k + ahead lie before k1.
inline int64_t rows_to_fetch(int64_t k, int64_t ahead, int64_t k1, int64_t step) {
  return std::min<int64_t>(step, std::max<int64_t>(0, k1 - (k + ahead)));
}

inline double combine8(const double* a) { return ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7])); }

// Transcendentals in double, rounded once to fp32: the same value in every twin.
inline float exp_f(float x) { return static_cast<float>(std::exp(static_cast<double>(x))); }
inline float tanh_f(float x) { return static_cast<float>(std::tanh(static_cast<double>(x))); }

// The attention's score transforms over s[0, n) (attention.cpp), public here for the
// tests: cap: s = cap * tanh_f(s / cap) for every s but the mask value -1e30; exp:
// s = exp_f(s - mx). simd: in double lanes (vmath.h) where the CPU has AVX2, with the same
// results as the scalar loops (simd = false).
void attention_cap_scores(float* s, int64_t n, float cap, bool simd);
void attention_exp_scores(float* s, int64_t n, float mx, bool simd);

// Loop hints: "no loop-carried dependence" and "fully unroll", spelled per compiler
// (clang vectorizes these loops unaided and warns when a forced vectorization fails).
#if defined(__clang__)
#define GROKIT_IVDEP
#define GROKIT_UNROLL16 _Pragma("unroll 16")
#else
#define GROKIT_IVDEP _Pragma("GCC ivdep")
#define GROKIT_UNROLL16 _Pragma("GCC unroll 16")
#endif

// AVX2 with FMA and F16C (every AVX2 CPU has both; use_avx2 checks all three).
#define GROKIT_AVX2 __attribute__((target("avx2,fma,f16c")))
#define GROKIT_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c")))
// A lambda inside a target function needs the target too.
#define GROKIT_AVX512_LAMBDA __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c")))
// ... for a loop body: GCC does not inline a generic lambda into a target function
// on its own (measured: the int8 decode product twice as slow).
#define GROKIT_AVX512_INLINE_LAMBDA \
  __attribute__((always_inline, target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c")))
#define GROKIT_AVX2_INLINE_LAMBDA __attribute__((always_inline, target("avx2,fma,f16c")))

// Byte and word constants of the AVX2 decodes, read from memory in their loops. Where a
// loop uses every ymm register GCC 12 rebuilds a _mm256_set1 constant in each iteration
// from a general register (mov, vmovq, vpbroadcast: three uops, measured in the fp8
// walk); a load whose value it cannot see (avx2_consts()) folds into the instruction that
// uses it instead.
struct alignas(32) Avx2Consts {
  uint8_t x0f[32], x78[32], x80[32];
  uint32_t x7fff[8], x1[8], xffff0000[8];
};
inline constexpr Avx2Consts kAvx2Consts = {
    {0x0f, 0x0f, 0x0f, 0x0f, 0x0f, 0x0f, 0x0f, 0x0f, 0x0f, 0x0f, 0x0f, 0x0f, 0x0f, 0x0f, 0x0f, 0x0f,
     0x0f, 0x0f, 0x0f, 0x0f, 0x0f, 0x0f, 0x0f, 0x0f, 0x0f, 0x0f, 0x0f, 0x0f, 0x0f, 0x0f, 0x0f, 0x0f},
    {0x78, 0x78, 0x78, 0x78, 0x78, 0x78, 0x78, 0x78, 0x78, 0x78, 0x78, 0x78, 0x78, 0x78, 0x78, 0x78,
     0x78, 0x78, 0x78, 0x78, 0x78, 0x78, 0x78, 0x78, 0x78, 0x78, 0x78, 0x78, 0x78, 0x78, 0x78, 0x78},
    {0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80,
     0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80},
    {0x7fff, 0x7fff, 0x7fff, 0x7fff, 0x7fff, 0x7fff, 0x7fff, 0x7fff},
    {1, 1, 1, 1, 1, 1, 1, 1},
    {0xffff0000, 0xffff0000, 0xffff0000, 0xffff0000, 0xffff0000, 0xffff0000, 0xffff0000, 0xffff0000}};
inline const Avx2Consts* avx2_consts() {
  const Avx2Consts* p = &kAvx2Consts;
  __asm__("" : "+r"(p));  // hides the values: loads, not rebuilt constants
  return p;
}
GROKIT_AVX2 inline __m256i avx2_const(const uint8_t (&c)[32]) { return _mm256_load_si256(reinterpret_cast<const __m256i*>(c)); }
GROKIT_AVX2 inline __m256i avx2_const(const uint32_t (&c)[8]) { return _mm256_load_si256(reinterpret_cast<const __m256i*>(c)); }

GROKIT_AVX2 inline __m256 load_bf16x8(const uint16_t* p) {
  __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
// Round-to-nearest-even to bf16, kept in fp32 lanes (NaN inputs do not occur here).
GROKIT_AVX2 inline __m256 round_bf16x8(__m256 v) {
  __m256i b = _mm256_castps_si256(v);
  __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
  b = _mm256_add_epi32(b, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff)));
  return _mm256_castsi256_ps(_mm256_and_si256(b, _mm256_set1_epi32(static_cast<int>(0xffff0000u))));
}
// The same with its constants read from k (avx2_consts()), for loops short of registers.
// (Not the default: where the constants fit in registers, as in the int8 walks, reading
// them from memory changed the code for nothing.)
GROKIT_AVX2 inline __m256 round_bf16x8(__m256 v, const Avx2Consts* k) {
  __m256i b = _mm256_castps_si256(v);
  __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(b, 16), avx2_const(k->x1));
  b = _mm256_add_epi32(b, _mm256_add_epi32(lsb, avx2_const(k->x7fff)));
  return _mm256_castsi256_ps(_mm256_and_si256(b, avx2_const(k->xffff0000)));
}
// The AVX2 prefill panels of the row-major layouts (matmul_q8.cpp, matmul_bf16w.cpp): a
// block of rows [k0, k1) of a 32-column tile, as fp32 weights (panel[k - k0]), added to the
// sums acc ([M][acc_ld]) of rows of x in the pinned order (pairs: k + 1 before k; else k
// order), or starting them (first: the chain's first block; acc need not be set). MB rows
// of x at a time: each panel vector loaded once for the MB rows' sums (the loads, not the
// fmas, bound one row at a time).
template <bool kPairs, int MB, int NV>
GROKIT_AVX2 __attribute__((always_inline)) inline void panel_rows_avx2(const float* x, int64_t ldx, int64_t K,
                                                                       const float (*panel)[32], int64_t k0, int64_t k1,
                                                                       float* acc, int64_t acc_ld, bool first) {
  __m256 a[MB][NV];
  for (int mb = 0; mb < MB; ++mb)
    for (int j = 0; j < NV; ++j) a[mb][j] = first ? _mm256_setzero_ps() : _mm256_loadu_ps(acc + mb * acc_ld + 8 * j);
  auto add_row = [&](int64_t k) GROKIT_AVX2_INLINE_LAMBDA {
    __m256 w[NV];
    for (int j = 0; j < NV; ++j) w[j] = _mm256_load_ps(panel[k - k0] + 8 * j);
    for (int mb = 0; mb < MB; ++mb) {
      const __m256 xk = _mm256_broadcast_ss(x + mb * ldx + k);
      for (int j = 0; j < NV; ++j) a[mb][j] = _mm256_fmadd_ps(xk, w[j], a[mb][j]);
    }
  };
  if (kPairs) {
    for (int64_t k = k0; k < k1; k += 2) {
      if (k + 1 < K) add_row(k + 1);
      add_row(k);
    }
  } else {
    for (int64_t k = k0; k < k1; ++k) add_row(k);
  }
  for (int mb = 0; mb < MB; ++mb)
    for (int j = 0; j < NV; ++j) _mm256_storeu_ps(acc + mb * acc_ld + 8 * j, a[mb][j]);
}

// Every row of x down the panel, three at a time: 12 independent sums cover the fma
// latency (two rows' 8 left the core waiting: 57 against 44 GFLOP/s on one Zen 3 core).
template <bool kPairs, int NV>
GROKIT_AVX2 inline void panel_all_rows_avx2(const float* x, int64_t M, int64_t ldx, int64_t K, const float (*panel)[32],
                                            int64_t k0, int64_t k1, float* acc, int64_t acc_ld, bool first) {
  int64_t m = 0;
  for (; m + 3 <= M; m += 3)
    panel_rows_avx2<kPairs, 3, NV>(x + m * ldx, ldx, K, panel, k0, k1, acc + m * acc_ld, acc_ld, first);
  for (; m + 2 <= M; m += 2)
    panel_rows_avx2<kPairs, 2, NV>(x + m * ldx, ldx, K, panel, k0, k1, acc + m * acc_ld, acc_ld, first);
  if (m < M) panel_rows_avx2<kPairs, 1, NV>(x + m * ldx, ldx, K, panel, k0, k1, acc + m * acc_ld, acc_ld, first);
}

// x (8 fp32) times w (8 bf16 widened) into two double accumulators: lanes 0-3 and 4-7.
GROKIT_AVX2 inline void fma8_pd(__m256 x, __m256 w, __m256d& lo, __m256d& hi) {
  lo = _mm256_fmadd_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(x)), _mm256_cvtps_pd(_mm256_castps256_ps128(w)), lo);
  hi = _mm256_fmadd_pd(_mm256_cvtps_pd(_mm256_extractf128_ps(x, 1)), _mm256_cvtps_pd(_mm256_extractf128_ps(w, 1)), hi);
}
GROKIT_AVX2 inline void store8_pd(__m256d lo, __m256d hi, double* a) {
  _mm256_storeu_pd(a, lo);
  _mm256_storeu_pd(a + 4, hi);
}

}  // namespace grokit::kernels::detail
