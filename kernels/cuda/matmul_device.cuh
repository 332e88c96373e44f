// Device code of the CUDA weight products (kernels/cuda/matmul.h): the decode kernel,
// the prefill helpers (dequantize one matrix to bf16, gather x rows as bf16, scatter y
// rows) and the q8rb relayout, with the host-side launch plan. Internal to kernels/cuda.
//
// Written so that the same source also compiles as plain C++ for a host emulation of the
// kernels in tests (emulable.cuh): the includer then provides threadIdx, blockIdx,
// gridDim, gk_emu_sync(), gk_emu_smem() (the block's dynamic shared memory),
// gk_emu_align(p, bytes, what) (a check of a vector access's alignment) and
// cuda::raise_device_error (tests/gpu/test_cuda_emulation.cpp is that includer).
#pragma once

#include <cuda_bf16.h>

#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <type_traits>

#include "kernels/cuda/emulable.cuh"
#include "kernels/cuda/gelu_impl.cuh"
#include "kernels/cuda/matmul.h"
#include "kernels/ops.h"

// Every kernel here: 256 threads.
#define GK_KERNEL(min_blocks) GK_KERNEL_T(256, min_blocks)

namespace grokit::kernels::cuda::mm {

constexpr int kThreads = 256;      // every kernel here: 8 warps
constexpr int kWarps = kThreads / 32;
constexpr int kWindow = 64;        // expert ids a decode block scans per step
constexpr int kXsFloats = 8192;    // decode x tile: 32 KiB of shared memory at most
constexpr int kMaxSplits = 32;     // decode k splits across blocks
constexpr int kMaxRowsPerPass = 16;

// The decode kernel's weight formats (matmul.h describes the layouts).
enum Fmt : int {
  kQ8C = 0,   // q8rb codes k-chunked [K/16][N][16] (layout 1), scales [B][N]
  kQ8R = 1,   // q8rb as stored: codes [K][N] row-major, scales [B][N]
  kQ4 = 2,    // q4g (SPEC 4.1)
  kF8 = 3,    // f8col (SPEC 4.1)
  kBF16 = 4,  // bf16 [K][N] row-major
};

// Rows of one column that one unit of work holds: one 16-byte load (q8c, q4), two
// (f8col's 32-row chunk), or one row (row-major formats, cols_per_thread columns).
GK_HD constexpr int unit_rows(int f) { return f == kQ8C ? 16 : (f == kQ4 || f == kF8) ? 32 : 1; }
// Columns a thread owns: one for the k-chunked formats; for the row-major ones, fewer
// as the rows per pass grow (accumulators: rows x columns registers).
GK_HD constexpr int cols_per_thread(int f, int kmt) {
  return (f == kQ8R || f == kBF16) ? (kmt <= 2 ? 8 : kmt <= 8 ? 4 : 2) : 1;
}
// Units per batch of loads: 64 bytes per thread for the k-chunked formats and bf16 at
// up to 4 rows per pass (twice that in flight while the next batch loads, see
// decode_pass), less for the others, which are bound by arithmetic or a fallback.
GK_HD constexpr int batch_units(int f, int cpt) { return f == kF8 ? 2 : (f == kBF16 && cpt == 2) ? 8 : 4; }
GK_HD constexpr int ilog2(int v) { return v <= 1 ? 0 : 1 + ilog2(v / 2); }

// ---------------------------------------------------------------------------------
// Bit helpers (host twins for the emulation).

GK_HD float as_f32(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}
GK_HD uint32_t as_u32(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
#endif
}
GK_HD uint32_t bf2_bits(__nv_bfloat162 v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  return u;
}
GK_HD __nv_bfloat162 bits_bf2(uint32_t u) {
  __nv_bfloat162 v;
  std::memcpy(static_cast<void*>(&v), &u, 4);
  return v;
}
// The two halves of a bf16x2 word as floats (low half: the lower address).
GK_HD float bf_lo(uint32_t u) { return as_f32(u << 16); }
GK_HD float bf_hi(uint32_t u) { return as_f32(u & 0xffff0000u); }

// Byte permute (__byte_perm): result byte i = byte (s >> 4i) & 7 of {b:a}.
GK_HD uint32_t prmt(uint32_t a, uint32_t b, uint32_t s) {
#if defined(__CUDA_ARCH__)
  return __byte_perm(a, b, s);
#else
  const uint64_t pool = static_cast<uint64_t>(b) << 32 | a;
  uint32_t r = 0;
  for (int i = 0; i < 4; ++i) r |= static_cast<uint32_t>((pool >> (8 * ((s >> (4 * i)) & 7))) & 0xffu) << (8 * i);
  return r;
#endif
}

GK_HD uint32_t umulhi(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

// n / d for n < 2^31 by multiply and shift (Granlund-Montgomery): magic and shift from
// make_fastdiv(d).
struct FastDiv {
  uint32_t magic = 1;
  int32_t shift = 0;
};
inline FastDiv make_fastdiv(uint32_t d) {
  int l = 0;
  while ((uint64_t{1} << l) < d) ++l;
  const uint64_t m = ((uint64_t{1} << 32) * ((uint64_t{1} << l) - d)) / d + 1;
  return FastDiv{static_cast<uint32_t>(m), l};
}
GK_HD uint32_t fastdiv(uint32_t n, uint32_t magic, int shift) { return (umulhi(n, magic) + n) >> shift; }

// bf16 round to nearest even of an fp32 value, as bits (NaN stays a quiet NaN), as the
// CPU kernels round.
GK_HD uint16_t bf16_rne_bits(float x) {
  uint32_t u = as_u32(x);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u | 0x00400000u) >> 16);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

// ---------------------------------------------------------------------------------
// Dequantization in registers: w = bf16(q * scale), the exact product rounded once to
// bf16 by a bf16x2 multiply (q and the scale are bf16 values, so the multiply's
// internal product is exact and its RN rounding is the CPU's round-to-nearest-even).

// int8: four codes of one word (bytes 0..3) -> w01 = (w0, w1), w23 = (w2, w3).
// q = fp32(2^23 + (code ^ 0x80)) - (2^23 + 128), exact; packed to bf16 (exact, |q| <= 128).
GK_HD void dq_q8_word(uint32_t v, __nv_bfloat162 s01, __nv_bfloat162 s23, uint32_t& w01, uint32_t& w23) {
  const uint32_t b = v ^ 0x80808080u;
  const float q0 = as_f32(prmt(b, 0x4B000000u, 0x7440u)) - 8388736.0f;
  const float q1 = as_f32(prmt(b, 0x4B000000u, 0x7441u)) - 8388736.0f;
  const float q2 = as_f32(prmt(b, 0x4B000000u, 0x7442u)) - 8388736.0f;
  const float q3 = as_f32(prmt(b, 0x4B000000u, 0x7443u)) - 8388736.0f;
  w01 = bf2_bits(__hmul2_rn(__floats2bfloat162_rn(q0, q1), s01));
  w23 = bf2_bits(__hmul2_rn(__floats2bfloat162_rn(q2, q3), s23));
}
// Two codes (bytes i0, i0 + 1 of v) -> (w_i0, w_i0+1).
GK_HD uint32_t dq_q8_pair(uint32_t v, int i0, __nv_bfloat162 s2) {
  const uint32_t b = v ^ 0x80808080u;
  const float qa = as_f32(prmt(b, 0x4B000000u, 0x7440u | static_cast<uint32_t>(i0))) - 8388736.0f;
  const float qb = as_f32(prmt(b, 0x4B000000u, 0x7440u | static_cast<uint32_t>(i0 + 1))) - 8388736.0f;
  return bf2_bits(__hmul2_rn(__floats2bfloat162_rn(qa, qb), s2));
}

// int4: the eight nibbles of one word (nibble j = row 8w + j of a q4g chunk) ->
// p[j] = (w_j, w_j+4) for j < 4. bf16 bits 0x4300 | u are 128 + u, so with
// u = q + 8 (xor 8): q = (128 + u) - 136, exact.
GK_HD void dq_q4_word(uint32_t v, __nv_bfloat162 s2, uint32_t (&p)[4]) {
  const uint32_t b = v ^ 0x88888888u;
  const __nv_bfloat162 c136 = bits_bf2(0x43084308u);
  GK_UNROLL
  for (int j = 0; j < 4; ++j) {
    const uint32_t t = ((b >> (4 * j)) & 0x000F000Fu) | 0x43004300u;
    p[j] = bf2_bits(__hmul2_rn(__hsub2_rn(bits_bf2(t), c136), s2));
  }
}

// E4M3: the four codes of one word (byte j = row 4w + j of an f8col chunk) ->
// pa = (w0, w2), pb = (w1, w3). A code's 7 magnitude bits shifted to bf16 bits 4..10
// are its value times 2^-120 exactly (subnormals included), the sign goes to bit 15;
// times 2^120 (exact), times the scale (rounded). NaN codes: see f8_nan_bytes.
GK_HD void dq_f8_word(uint32_t v, __nv_bfloat162 s2, uint32_t& pa, uint32_t& pb) {
  const uint32_t m = v & 0x7F7F7F7Fu;
  const uint32_t ea = (prmt(m, 0u, 0x4240u) << 4) | ((v << 8) & 0x80008000u);
  const uint32_t eb = (prmt(m, 0u, 0x4341u) << 4) | (v & 0x80008000u);
  const __nv_bfloat162 k120 = bits_bf2(0x7B807B80u);
  pa = bf2_bits(__hmul2_rn(__hmul2_rn(bits_bf2(ea), k120), s2));
  pb = bf2_bits(__hmul2_rn(__hmul2_rn(bits_bf2(eb), k120), s2));
}
// Bit 7 of byte j set where code j is a NaN (S.1111.111).
GK_HD uint32_t f8_nan_bytes(uint32_t v) { return ((v & 0x7F7F7F7Fu) + 0x01010101u) & 0x80808080u; }
// Makes the halves of pa / pb whose codes are NaN a NaN.
GK_HD void f8_fix_nan(uint32_t nan_bytes, uint32_t& pa, uint32_t& pb) {
  if (nan_bytes & 0x00000080u) pa = (pa & 0xffff0000u) | 0x7FC0u;
  if (nan_bytes & 0x00800000u) pa = (pa & 0x0000ffffu) | 0x7FC00000u;
  if (nan_bytes & 0x00008000u) pb = (pb & 0xffff0000u) | 0x7FC0u;
  if (nan_bytes & 0x80000000u) pb = (pb & 0x0000ffffu) | 0x7FC00000u;
}

// ---------------------------------------------------------------------------------
// Memory access (read-only weights through the non-coherent path).

GK_D uint4 ld16(const uint8_t* p) {
#if defined(__CUDA_ARCH__)
  return __ldg(reinterpret_cast<const uint4*>(p));
#else
  uint4 v;
  std::memcpy(&v, p, 16);
  return v;
#endif
}
GK_D uint2 ld8(const uint8_t* p) {
#if defined(__CUDA_ARCH__)
  return __ldg(reinterpret_cast<const uint2*>(p));
#else
  uint2 v;
  std::memcpy(&v, p, 8);
  return v;
#endif
}
GK_D uint32_t ld4(const uint8_t* p) {
#if defined(__CUDA_ARCH__)
  return __ldg(reinterpret_cast<const unsigned int*>(p));
#else
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
#endif
}
GK_D uint32_t ld2(const uint8_t* p) {
#if defined(__CUDA_ARCH__)
  return __ldg(reinterpret_cast<const unsigned short*>(p));
#else
  uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
#endif
}
GK_D uint32_t ld1(const uint8_t* p) {
#if defined(__CUDA_ARCH__)
  return static_cast<uint32_t>(__ldg(reinterpret_cast<const unsigned char*>(p)));
#else
  return *p;
#endif
}
// Shared-memory float4 (16-byte aligned).
GK_D float4 lds4(const float* p) {
#if defined(__CUDA_ARCH__)
  return *reinterpret_cast<const float4*>(p);
#else
  float4 v;
  std::memcpy(&v, p, 16);
  return v;
#endif
}
template <class T>
GK_HD T imin(T a, T b) { return a < b ? a : b; }
template <class T>
GK_HD T imax(T a, T b) { return a < b ? b : a; }

// ---------------------------------------------------------------------------------
// Decode: weight-only streaming, one launch for every expert.
//
// Grid (tiles, ks, expert_grid), 256 threads. Block (x, s, e) owns the columns
// [x*TN, (x+1)*TN) (TN = WN * 32 * cols_per_thread), the units [s*ups, (s+1)*ups) of
// K, and expert e: it scans the expert ids (kWindow at a time) for the rows that chose
// e, stages their x rows in shared memory, and streams its part of W[e] once per pass of
// up to KMT rows; an expert nobody chose costs its blocks one scan. Warps: WN across the
// tile's columns x WK = 8 / WN along k (warp (wn, wk) takes units wk, wk + WK, ...), lane
// l columns l*cpt .. of its warp's 32*cpt. Sums: per thread in fp32 over its units in
// order, then the WK warps added in order through shared memory, then (ks > 1) the k
// splits: each block writes its partial [s, m, n], and the last of the ks blocks of a
// tile (an atomic counter, reset by that block) adds them in split order into y. The
// order is fixed by the plan, so results are reproducible.

struct DecodeParams {
  const uint8_t* w;         // expert 0: the codes (q8rb) or the payload of its matrix
  uint64_t w_stride;        // bytes between experts
  const uint16_t* scales;   // q8rb: expert 0's scale rows [B, N] (bf16 bits)
  uint64_t s_stride;        // q8rb: elements between experts' scales (B * N)
  const float* x;
  int64_t ldx;
  float* y;
  int64_t ldy;
  const int32_t* expert;    // NULL: rows 0..M-1 all use expert 0
  int32_t x_div;            // row m reads x row m / x_div
  int32_t M, E, K, N;
  int32_t units;            // K / unit_rows
  int32_t ups;              // units per k split
  int32_t ks;               // k splits (gridDim.y)
  int32_t tile_units;       // units of x staged at a time
  int32_t wn_log2;          // WN = 1 << wn_log2
  int32_t group_log2;       // q4g: log2(G / 32)
  uint64_t group_bytes;     // q4g: bytes of one group of G rows
  uint32_t div_magic;       // q8rb: unit (q8c) or row (q8r) -> scale row, by fastdiv
  int32_t div_shift;
  int32_t vec;              // row-major: vector loads allowed (alignment)
  float* partial;           // [ks, M, N] when ks > 1
  uint32_t* counters;       // [gridDim.z, gridDim.x] when ks > 1; zero between launches
  unsigned int* errors;     // device_errors_word(stream): a row routed past the stack raises GROKIT_DEVERR_EXPERT
  int32_t round_y;          // y = bf16(sum) (GROKIT_MATMUL_ROUND_BF16); partials stay fp32
  int32_t gelu;             // y = gelu(y) * bf16(sum) (GROKIT_MATMUL_GELU_MUL)
  int32_t slots;            // routed: blockIdx.z is the z-th expert some row uses (expert_grid)
};

// Experts a slot grid covers at most: the used experts are found with one flag each.
constexpr int kSlotExperts = 64;

// The z extent of a decode grid: 1 unrouted; a routed stack of up to kSlotExperts experts
// gets one slot per expert its M rows can use (blockIdx.z = the z-th used expert in
// ascending order; slots past the used ones exit), where one block per expert of the
// stack left most blocks idle at batch 1 (2 of 8 experts used); larger stacks one per
// expert.
GK_HD int64_t expert_grid(int64_t E, int64_t M, bool routed, bool* slots) {
  *slots = routed && E <= kSlotExperts;
  if (!routed) return 1;
  return *slots ? (M < E ? M : E) : E;
}

// Stores a finished sum at y: as it is, rounded, or as the gate's gelu times it rounded.
GK_HD void store_y(const DecodeParams& p, float* at, float sum) {
  const float r = as_f32(static_cast<uint32_t>(bf16_rne_bits(sum)) << 16);
  if (p.gelu != 0) *at = gelu_times(*at, r);
  else *at = p.round_y != 0 ? r : sum;
}

// The loads of one unit, by format.
template <int F, int CPT>
struct Raw;
template <int CPT>
struct Raw<kQ8C, CPT> {
  uint4 c;
  uint32_t s;
};
template <int CPT>
struct Raw<kQ4, CPT> {
  uint4 c;
  uint32_t s;
};
template <int CPT>
struct Raw<kF8, CPT> {
  uint4 c0, c1;
};
template <int CPT>
struct Raw<kBF16, CPT> {
  uint32_t c[CPT / 2];
};
template <int CPT>
struct Raw<kQ8R, CPT> {
  uint32_t c[(CPT + 3) / 4];
  uint32_t s[CPT / 2];
};

// A thread's columns of expert e.
struct Col {
  const uint8_t* w;     // column-offset base (q4g: the expert's base)
  const uint8_t* s;     // q8rb: column-offset scale base (bytes)
  int64_t col0;         // first column
  int nvalid;           // columns < N among the thread's cpt
  uint32_t f8_scale;    // f8col: the column's scale (bf16 bits)
};

template <int F, int CPT>
GK_D Col make_col(const DecodeParams& p, int e, int64_t col0) {
  Col c;
  c.col0 = col0;
  c.nvalid = static_cast<int>(imax<int64_t>(0, imin<int64_t>(CPT, p.N - col0)));
  const uint8_t* we = p.w + static_cast<uint64_t>(e) * p.w_stride;
  c.s = nullptr;
  c.f8_scale = 0;
  if constexpr (F == kQ8C) {
    c.w = we + static_cast<uint64_t>(col0) * 16;
  } else if constexpr (F == kQ4) {
    c.w = we;
  } else if constexpr (F == kF8) {
    c.w = we + static_cast<uint64_t>(col0) * 32;
    if (c.nvalid > 0) c.f8_scale = ld2(we + static_cast<uint64_t>(p.units) * static_cast<uint64_t>(p.N) * 32 + 2 * col0);
  } else if constexpr (F == kBF16) {
    c.w = we + static_cast<uint64_t>(col0) * 2;
  } else {
    c.w = we + static_cast<uint64_t>(col0);
  }
  if constexpr (F == kQ8C || F == kQ8R)
    c.s = reinterpret_cast<const uint8_t*>(p.scales + static_cast<uint64_t>(e) * p.s_stride) + 2 * col0;
  return c;
}

// NB bytes at p into words, by one vector load when vec, else byte by byte (bytes at or
// past nb_valid read as zero).
template <int NB>
GK_D void load_bytes(const uint8_t* p, bool vec, int nb_valid, uint32_t* w) {
  if (vec) {
    if constexpr (NB == 16) {
      const uint4 v = ld16(p);
      w[0] = v.x, w[1] = v.y, w[2] = v.z, w[3] = v.w;
    } else if constexpr (NB == 8) {
      const uint2 v = ld8(p);
      w[0] = v.x, w[1] = v.y;
    } else if constexpr (NB == 4) {
      w[0] = ld4(p);
    } else {
      w[0] = ld2(p);
    }
    return;
  }
  constexpr int NW = (NB + 3) / 4;
  for (int i = 0; i < NW; ++i) w[i] = 0;
  for (int i = 0; i < NB; ++i)
    if (i < nb_valid) w[i / 4] |= ld1(p + i) << (8 * (i % 4));
}

template <int F, int CPT>
GK_D void load_unit(const DecodeParams& p, const Col& c, int u, Raw<F, CPT>& r) {
  const uint64_t N = static_cast<uint32_t>(p.N);
  if constexpr (F == kQ8C) {
    r.c = ld16(c.w + static_cast<uint64_t>(u) * N * 16);
    const uint32_t b = fastdiv(static_cast<uint32_t>(u), p.div_magic, p.div_shift);
    r.s = ld2(c.s + 2 * static_cast<uint64_t>(b) * N);
  } else if constexpr (F == kQ4) {
    const uint32_t g = static_cast<uint32_t>(u) >> p.group_log2;
    const uint32_t ch = static_cast<uint32_t>(u) & ((1u << p.group_log2) - 1u);
    const uint8_t* gb = c.w + g * p.group_bytes;
    r.c = ld16(gb + (ch * N + static_cast<uint64_t>(c.col0)) * 16);
    r.s = ld2(gb + (static_cast<uint64_t>(1u << p.group_log2) * N * 16) + 2 * static_cast<uint64_t>(c.col0));
  } else if constexpr (F == kF8) {
    const uint8_t* q = c.w + static_cast<uint64_t>(u) * N * 32;
    r.c0 = ld16(q);
    r.c1 = ld16(q + 16);
  } else if constexpr (F == kBF16) {
    const bool vec = p.vec != 0 && c.nvalid == CPT;
    load_bytes<2 * CPT>(c.w + static_cast<uint64_t>(u) * N * 2, vec, 2 * c.nvalid, r.c);
  } else {
    const bool vec = p.vec != 0 && c.nvalid == CPT;
    load_bytes<CPT>(c.w + static_cast<uint64_t>(u) * N, vec, c.nvalid, r.c);
    const uint32_t b = fastdiv(static_cast<uint32_t>(u), p.div_magic, p.div_shift);
    load_bytes<2 * CPT>(c.s + 2 * static_cast<uint64_t>(b) * N, vec, 2 * c.nvalid, r.s);
  }
}

// acc[r][.] += x[r, rows of the unit] . w: the unit's rows start at xs + kk in each of
// the MT staged x rows (row stride ktp floats).
template <int F, int CPT, int MT>
GK_D void compute_unit(const Raw<F, CPT>& r, const Col& c, const float* xs, int ktp, int kk, float (&acc)[MT][CPT]) {
  if constexpr (F == kQ8C || F == kQ4 || F == kF8) {
    // The unit's weights in row order, then each staged x row against them.
    constexpr int R = unit_rows(F);
    float wv[R];
    if constexpr (F == kQ8C) {
      const __nv_bfloat162 s2 = bits_bf2(r.s | (r.s << 16));
      const uint32_t cw[4] = {r.c.x, r.c.y, r.c.z, r.c.w};
      GK_UNROLL
      for (int w = 0; w < 4; ++w) {
        uint32_t p01, p23;
        dq_q8_word(cw[w], s2, s2, p01, p23);
        wv[4 * w] = bf_lo(p01), wv[4 * w + 1] = bf_hi(p01), wv[4 * w + 2] = bf_lo(p23), wv[4 * w + 3] = bf_hi(p23);
      }
    } else if constexpr (F == kQ4) {
      const __nv_bfloat162 s2 = bits_bf2(r.s | (r.s << 16));
      const uint32_t cw[4] = {r.c.x, r.c.y, r.c.z, r.c.w};
      GK_UNROLL
      for (int w = 0; w < 4; ++w) {
        uint32_t q[4];
        dq_q4_word(cw[w], s2, q);
        GK_UNROLL
        for (int j = 0; j < 4; ++j) wv[8 * w + j] = bf_lo(q[j]), wv[8 * w + j + 4] = bf_hi(q[j]);
      }
    } else {
      const __nv_bfloat162 s2 = bits_bf2(c.f8_scale | (c.f8_scale << 16));
      const uint32_t cw[8] = {r.c0.x, r.c0.y, r.c0.z, r.c0.w, r.c1.x, r.c1.y, r.c1.z, r.c1.w};
      uint32_t nan = 0;
      GK_UNROLL
      for (int w = 0; w < 8; ++w) nan |= f8_nan_bytes(cw[w]);
      GK_UNROLL
      for (int w = 0; w < 8; ++w) {
        uint32_t pa, pb;
        dq_f8_word(cw[w], s2, pa, pb);
        if (nan != 0) f8_fix_nan(f8_nan_bytes(cw[w]), pa, pb);
        wv[4 * w] = bf_lo(pa), wv[4 * w + 1] = bf_lo(pb), wv[4 * w + 2] = bf_hi(pa), wv[4 * w + 3] = bf_hi(pb);
      }
    }
    GK_UNROLL
    for (int m = 0; m < MT; ++m) {
      float a = acc[m][0];
      GK_UNROLL
      for (int q = 0; q < R / 4; ++q) {
        const float4 xv = lds4(xs + m * ktp + kk + 4 * q);
        a = fmaf(xv.x, wv[4 * q], a);
        a = fmaf(xv.y, wv[4 * q + 1], a);
        a = fmaf(xv.z, wv[4 * q + 2], a);
        a = fmaf(xv.w, wv[4 * q + 3], a);
      }
      acc[m][0] = a;
    }
  } else {
    float wf[CPT];
    if constexpr (F == kBF16) {
  GK_UNROLL
      for (int j = 0; j < CPT / 2; ++j) wf[2 * j] = bf_lo(r.c[j]), wf[2 * j + 1] = bf_hi(r.c[j]);
    } else {
  GK_UNROLL
      for (int j = 0; j < CPT / 2; ++j) {
        const uint32_t pw = dq_q8_pair(r.c[j / 2], 2 * (j % 2), bits_bf2(r.s[j]));
        wf[2 * j] = bf_lo(pw), wf[2 * j + 1] = bf_hi(pw);
      }
    }
  GK_UNROLL
    for (int m = 0; m < MT; ++m) {
      const float xv = xs[m * ktp + kk];
  GK_UNROLL
      for (int j = 0; j < CPT; ++j) acc[m][j] = fmaf(xv, wf[j], acc[m][j]);
    }
  }
}

template <int F, int CPT, int U>
GK_D void load_batch(const DecodeParams& p, const Col& c, int u, int t1, int wk_count, Raw<F, CPT> (&r)[U]) {
  GK_UNROLL
  for (int i = 0; i < U; ++i) {
    const int ui = u + i * wk_count;
    if (ui < t1 && c.nvalid > 0) {
      load_unit<F, CPT>(p, c, ui, r[i]);
    } else {
      r[i] = Raw<F, CPT>{};
    }
  }
}

// One pass: rows[0..c) (c <= MT) of expert e over this block's k split and columns.
// UM: a multiple of the usual units per batch (2: twice the bytes in flight, for the
// decode plan sweep).
template <int F, int CPT, int MT, int UM = 1>
GK_D void decode_pass(const DecodeParams& p, const int* rows, int c, int e, float* xs) {
  constexpr int R = unit_rows(F);
  constexpr bool kPipe = MT <= 4;  // beyond, the arithmetic covers the latency
  constexpr int U = UM * (kPipe ? batch_units(F, CPT) : (batch_units(F, CPT) + 1) / 2);
  using RawT = Raw<F, CPT>;
  const int tid = static_cast<int>(threadIdx.x), warp = tid >> 5, lane = tid & 31;
  const int wn_count = 1 << p.wn_log2, wk_count = kWarps >> p.wn_log2;
  const int wn = warp & (wn_count - 1), wk = warp >> p.wn_log2;
  const int64_t col0 = (static_cast<int64_t>(blockIdx.x) * wn_count + wn) * (32 * CPT) + static_cast<int64_t>(lane) * CPT;
  const Col col = make_col<F, CPT>(p, e, col0);
  float acc[MT][CPT];
  GK_UNROLL
  for (int m = 0; m < MT; ++m)
  GK_UNROLL
    for (int j = 0; j < CPT; ++j) acc[m][j] = 0.0f;

  const int u_begin = static_cast<int>(blockIdx.y) * p.ups;
  const int u_end = imin(p.units, u_begin + p.ups);
  const int ktp = p.tile_units * R;
  GK_SYNC();  // the previous pass's reads of shared memory are done
  for (int t0 = u_begin; t0 < u_end; t0 += p.tile_units) {
    const int t1 = imin(u_end, t0 + p.tile_units);
    int u = t0 + wk;
    RawT cur[U];
    load_batch<F, CPT, U>(p, col, u, t1, wk_count, cur);  // in flight while x is staged
    pdl_wait();  // x is the kernel before's (weights only above: they stream in meanwhile)
    const int nk = (t1 - t0) * R;
    const int64_t k0 = static_cast<int64_t>(t0) * R;
    for (int m = 0; m < c; ++m) {
      const float* xr = p.x + static_cast<int64_t>(rows[m] / p.x_div) * p.ldx + k0;
      float* dst = xs + m * ktp;
      for (int i = tid; i < nk; i += kThreads) dst[i] = xr[i];
    }
    GK_SYNC();
    if constexpr (kPipe) {
      // The next batch loads while this one is computed.
      RawT nxt[U];
      while (u < t1) {
        const int un = u + U * wk_count;
        const bool more = un < t1;
        if (more) load_batch<F, CPT, U>(p, col, un, t1, wk_count, nxt);
        GK_UNROLL
        for (int i = 0; i < U; ++i) {
          const int ui = u + i * wk_count;
          if (ui < t1) compute_unit<F, CPT, MT>(cur[i], col, xs, ktp, (ui - t0) * R, acc);
        }
        if (!more) break;
        GK_UNROLL
        for (int i = 0; i < U; ++i) cur[i] = nxt[i];
        u = un;
      }
    } else {
      while (u < t1) {
        GK_UNROLL
        for (int i = 0; i < U; ++i) {
          const int ui = u + i * wk_count;
          if (ui < t1) compute_unit<F, CPT, MT>(cur[i], col, xs, ktp, (ui - t0) * R, acc);
        }
        u += U * wk_count;
        if (u < t1) load_batch<F, CPT, U>(p, col, u, t1, wk_count, cur);
      }
    }
    GK_SYNC();
  }
  pdl_wait();  // a split with no units at all, before its stores

  // The WK warps of a column group, added in warp order.
  const int tn = wn_count * 32 * CPT;
  if (wk_count > 1) {
    float* red = xs;  // [WK - 1][MT][TN], free since the barrier above
    if (wk > 0) {
  GK_UNROLL
      for (int m = 0; m < MT; ++m)
  GK_UNROLL
        for (int j = 0; j < CPT; ++j) red[((wk - 1) * MT + m) * tn + (wn * CPT + j) * 32 + lane] = acc[m][j];
    }
    GK_SYNC();
    if (wk == 0) {
      for (int w2 = 1; w2 < wk_count; ++w2)
  GK_UNROLL
        for (int m = 0; m < MT; ++m)
  GK_UNROLL
          for (int j = 0; j < CPT; ++j) acc[m][j] += red[((w2 - 1) * MT + m) * tn + (wn * CPT + j) * 32 + lane];
    }
  }
  if (wk == 0) {
  GK_UNROLL
    for (int m = 0; m < MT; ++m) {
      if (m >= c) break;
      const int64_t row = rows[m];
  GK_UNROLL
      for (int j = 0; j < CPT; ++j) {
        if (j >= col.nvalid) break;
        const int64_t n = col0 + j;
        if (p.ks == 1)
          store_y(p, p.y + row * p.ldy + n, acc[m][j]);
        else
          p.partial[(static_cast<int64_t>(blockIdx.y) * p.M + row) * p.N + n] = acc[m][j];
      }
    }
  }
}

// Runs decode_pass with the smallest MT (power of two, <= KMT) that holds c rows.
template <int F, int CPT, int MT, int KMT, int UM = 1>
GK_D void decode_dispatch(const DecodeParams& p, const int* rows, int c, int e, float* xs) {
  if constexpr (MT < KMT) {
    if (c <= MT) {
      decode_pass<F, CPT, MT, UM>(p, rows, c, e, xs);
      return;
    }
    decode_dispatch<F, CPT, MT * 2, KMT, UM>(p, rows, c, e, xs);
  } else {
    decode_pass<F, CPT, KMT, UM>(p, rows, c, e, xs);
  }
}

// Rows [m0, m0 + kWindow) that use expert e, in order, into s_rows; returns their count.
// Block-wide (barriers).
GK_D int collect_rows(const DecodeParams& p, int e, int m0, int* s_ids, int* s_rows, int* s_count) {
  const int n = imin(kWindow, p.M - m0);
  const int tid = static_cast<int>(threadIdx.x);
  if (p.expert != nullptr && tid < n) s_ids[tid] = p.expert[m0 + tid];
  GK_SYNC();
  if (tid == 0) {
    int c = 0;
    for (int i = 0; i < n; ++i)
      if (p.expert == nullptr || s_ids[i] == e) s_rows[c++] = m0 + i;
    *s_count = c;
  }
  GK_SYNC();
  return *s_count;
}

// The z-th expert (ascending) that some row uses, or -1 (p.slots; E <= kSlotExperts).
// Block-wide (barriers).
GK_D int slot_expert(const DecodeParams& p, int z, int* s_ids, int* s_used, int* s_e) {
  const int tid = static_cast<int>(threadIdx.x);
  if (tid < kSlotExperts) s_used[tid] = 0;
  if (tid == 0) *s_e = -1;
  for (int m0 = 0; m0 < p.M; m0 += kWindow) {
    const int n = imin(kWindow, p.M - m0);
    GK_SYNC();  // s_used cleared, or the previous window scanned
    if (tid < n) s_ids[tid] = p.expert[m0 + tid];
    GK_SYNC();
    if (tid < p.E)
      for (int i = 0; i < n; ++i) s_used[tid] |= s_ids[i] == tid ? 1 : 0;
  }
  GK_SYNC();
  if (tid < p.E && s_used[tid] != 0) {
    int before = 0;
    for (int i = 0; i < tid; ++i) before += s_used[i];
    if (before == z) *s_e = tid;
  }
  GK_SYNC();
  return *s_e;
}

// One block of a decode product: expert e's rows of this block's columns and k split
// (blockIdx.x, blockIdx.y), then, with split-k, the last block of the tile sums the
// partials; e < 0 (a slot past the used experts): nothing but the zeros below. z: the
// block's index along the grid's expert axis (its split-k counters' row). Block-wide.
template <int F, int KMT, int UM>
GK_D void decode_block(const DecodeParams& p, int e, int z) {
  constexpr int CPT = cols_per_thread(F, KMT);
  GK_SHARED int s_ids[kWindow];
  GK_SHARED int s_rows[kWindow];
  GK_SHARED int s_count;
  GK_SHARED int s_last;
  float* xs = dyn_smem();
  const int tid = static_cast<int>(threadIdx.x);
  const int tn_log2 = 5 + ilog2(CPT) + p.wn_log2;
  const int tn = 1 << tn_log2;
  const int64_t tile_col0 = static_cast<int64_t>(blockIdx.x) * tn;

  // Rows routed to no expert (< 0, or past the stack: an error, raised) get zeros, once
  // per column (by the first expert's or slot's blocks).
  if (p.expert != nullptr && blockIdx.y == 0 && z == 0) {
    for (int t = tid; t < tn; t += kThreads) {
      const int64_t n = tile_col0 + t;
      if (n >= p.N) break;
      for (int m = 0; m < p.M; ++m) {
        const int32_t ex = p.expert[m];
        if (ex < 0 || ex >= p.E) p.y[static_cast<int64_t>(m) * p.ldy + n] = 0.0f;
        if (ex >= p.E && n == tile_col0) raise_device_error(p.errors, GROKIT_DEVERR_EXPERT);
      }
    }
  }

  if (e < 0) return;
  bool any = false;
  for (int m0 = 0; m0 < p.M; m0 += kWindow) {
    const int c_all = collect_rows(p, e, m0, s_ids, s_rows, &s_count);
    for (int g0 = 0; g0 < c_all; g0 += KMT) decode_dispatch<F, CPT, 1, KMT, UM>(p, s_rows + g0, imin(KMT, c_all - g0), e, xs);
    any = any || c_all > 0;
  }
  if (p.ks <= 1 || !any) return;

  // Split-k: the last block of this (expert, tile) adds the partials in split order.
  fence();
  GK_SYNC();
  uint32_t* counter = p.counters + static_cast<int64_t>(z) * gridDim.x + blockIdx.x;
  if (tid == 0) s_last = atomic_add(counter, 1u) == static_cast<uint32_t>(p.ks - 1) ? 1 : 0;
  GK_SYNC();
  if (s_last == 0) return;
  fence();
  const int64_t split_stride = static_cast<int64_t>(p.M) * p.N;
  for (int m0 = 0; m0 < p.M; m0 += kWindow) {
    const int c_all = collect_rows(p, e, m0, s_ids, s_rows, &s_count);
    for (int i = tid; i < (c_all << tn_log2); i += kThreads) {
      const int64_t n = tile_col0 + (i & (tn - 1));
      if (n >= p.N) continue;
      const int64_t row = s_rows[i >> tn_log2];
      const float* src = p.partial + row * p.N + n;
      float sum = 0.0f;
      int s = 0;
      for (; s + 4 <= p.ks; s += 4) {
        const float v0 = ldcg(src + s * split_stride), v1 = ldcg(src + (s + 1) * split_stride);
        const float v2 = ldcg(src + (s + 2) * split_stride), v3 = ldcg(src + (s + 3) * split_stride);
        sum += v0;
        sum += v1;
        sum += v2;
        sum += v3;
      }
      for (; s < p.ks; ++s) sum += ldcg(src + s * split_stride);
      store_y(p, p.y + row * p.ldy + n, sum);
    }
  }
  if (tid == 0) *counter = 0;
}

// A product: expert blockIdx.z of a routed stack, or the expert of slot blockIdx.z
// (p.slots), or the one matrix.
template <int F, int KMT, int UM = 1>
GK_KERNEL(KMT == 1 && UM == 1 ? 3 : 2) decode_kernel(const DecodeParams p) {
  pdl_trigger();
  if (p.expert != nullptr) pdl_wait();  // the expert ids (unrouted: in decode_pass, after the first weights)
  int e = static_cast<int>(blockIdx.z);
  if (p.slots != 0) {
    GK_SHARED int s_ids[kWindow];
    GK_SHARED int s_used[kSlotExperts];
    GK_SHARED int s_e;
    e = slot_expert(p, e, s_ids, s_used, &s_e);
  }
  decode_block<F, KMT, UM>(p, e, static_cast<int>(blockIdx.z));
}

// Several unrouted products of one x side by side (q, k and v): blockIdx.z picks the
// product, each with its own plan; a block past its product's grid exits at once.
constexpr int kMaxMulti = 4;
struct DecodeMulti {
  DecodeParams p[kMaxMulti];
  int32_t tiles[kMaxMulti];
};
template <int F, int KMT, int UM = 1>
GK_KERNEL(KMT == 1 && UM == 1 ? 3 : 2) decode_multi_kernel(const DecodeMulti m) {
  pdl_trigger();
  const DecodeParams& p = m.p[blockIdx.z];
  if (static_cast<int32_t>(blockIdx.x) >= m.tiles[blockIdx.z] || static_cast<int32_t>(blockIdx.y) >= p.ks) {
    pdl_wait();  // every block waits: this kernel then ends after the one before
    return;
  }
  decode_block<F, KMT, UM>(p, 0, 0);
}

// The launch geometry of a decode product (host).
struct DecodePlan {
  int kmt = 1;         // rows per pass (power of two <= 16)
  int cpt = 1;         // columns per thread
  int wn_log2 = 0;     // warps across columns
  int64_t tiles = 1;   // gridDim.x
  int ks = 1;          // gridDim.y
  int units = 0;       // K / unit_rows
  int ups = 0;         // units per split
  int tile_units = 0;  // x staged per step
  size_t smem = 0;     // dynamic shared memory bytes
};

// rows_per_pass: the rows one expert is expected to get (M, or M / x_div routed);
// active: experts expected to have rows; max_ks: splits the workspace allows.
// The grid aims at one full wave of resident blocks (3 or 2 per multiprocessor, as
// decode_kernel's __launch_bounds__ give), so that no block runs alone at the end.
// force: a benchmark's override (DecodeForce; ks and warps across columns), kept within
// what the workspace and the shape allow.
struct DecodeForce {
  int ks = 0;    // k splits, 0: the plan's choice
  int wl = -1;   // log2 of the warps across columns, -1: the plan's choice
  int deep = 0;  // one row per pass: twice the bytes in flight per thread (decode_kernel UM 2)
};
inline DecodePlan plan_decode(int f, int64_t K, int64_t N, int64_t rows_per_pass, int64_t active, int sms, int max_ks,
                              DecodeForce force = {}) {
  DecodePlan P;
  const int64_t per = imax<int64_t>(1, imin<int64_t>(kMaxRowsPerPass, rows_per_pass));
  while (P.kmt < per) P.kmt *= 2;
  P.cpt = cols_per_thread(f, P.kmt);
  const int R = unit_rows(f), U = batch_units(f, P.cpt);
  P.units = static_cast<int>(K / R);
  const int tu_max = imax(1, kXsFloats / (P.kmt * R));
  const int64_t col_groups = (N + 32 * P.cpt - 1) / (32 * P.cpt);
  const int64_t target = (P.kmt == 1 ? 3 : 2) * static_cast<int64_t>(imax(1, sms));  // one wave
  active = imax<int64_t>(1, active);
  max_ks = imax(1, imin(kMaxSplits, max_ks));
  int64_t best = -1;
  for (int wl = 3; wl >= 0; --wl) {
    const int wn = 1 << wl, wk = kWarps >> wl;
    if (force.wl >= 0 ? wl != force.wl : wn > 1 && wn > col_groups) continue;
    const int64_t tiles = (col_groups + wn - 1) / wn;
    const int ks_hi = static_cast<int>(imax<int64_t>(1, imin<int64_t>(max_ks, P.units / (wk * U))));
    const int ks_lo = static_cast<int>(imin<int64_t>(ks_hi, (P.units + tu_max - 1) / tu_max));
    const int64_t want = imax<int64_t>(1, target / (tiles * active));
    const int ks = force.ks > 0 ? static_cast<int>(imin<int64_t>(imin<int64_t>(force.ks, max_ks), imax(1, P.units)))
                                : static_cast<int>(imax<int64_t>(ks_lo, imin<int64_t>(ks_hi, want)));
    const int64_t score = imin<int64_t>(target, tiles * active * ks);
    if (score > best) {
      best = score;
      P.wn_log2 = wl;
      P.tiles = tiles;
      P.ks = ks;
    }
  }
  P.ups = (P.units + P.ks - 1) / P.ks;
  P.ks = (P.units + P.ups - 1) / P.ups;  // no empty split
  P.tile_units = imin(tu_max, P.ups);
  const int wn = 1 << P.wn_log2, wk = kWarps >> P.wn_log2;
  const size_t xs = static_cast<size_t>(P.kmt) * P.tile_units * R;
  const size_t red = static_cast<size_t>(wk - 1) * P.kmt * wn * 32 * P.cpt;
  P.smem = 4 * (xs > red ? xs : red);
  return P;
}

// ---------------------------------------------------------------------------------
// Host: a validated weight as the kernels address it, and the kernels' parameters.

struct WDesc {
  int fmt = kBF16;                   // Fmt
  int32_t dtype = 0, param = 0;
  int64_t E = 1, K = 0, N = 0;
  const uint8_t* data = nullptr;     // the payload
  uint64_t stride = 0;               // bytes between experts (q8rb: between their codes)
  const uint16_t* scales = nullptr;  // q8rb: expert 0's scale rows
  uint64_t s_stride = 0;             // q8rb: scale elements between experts
  int64_t rpb = 0;                   // q8rb: rows per scale block (K / B)
  int group_log2 = 0;                // q4g: log2(G / 32)
  uint64_t group_bytes = 0;          // q4g: bytes of one group
};

// q8rb: the divisor from a unit (layout 1) or a row (layout 0) to its scale row.
inline FastDiv scale_div(const WDesc& d) {
  return make_fastdiv(static_cast<uint32_t>(d.fmt == kQ8C ? d.rpb / 16 : d.fmt == kQ8R ? d.rpb : 1));
}

constexpr int32_t kDtBF16 = 1, kDtQ8 = 16, kDtQ4 = 17, kDtF8 = 18;

#define GK_FAIL(code, ...) (std::snprintf(msg, len, __VA_ARGS__), (code))

// Checks w (op names the caller in the message) and fills d; on failure returns the
// ops.h code with the reason in msg. Layout 0 of every dtype is accepted, and layout 1
// of q8rb.
inline const char* dtype_label(int32_t dtype) {
  switch (dtype) {
    case kDtBF16: return "bf16";
    case kDtQ8: return "q8rb";
    case kDtQ4: return "q4g";
    case kDtF8: return "f8col";
    default: return "?";
  }
}

inline int describe_weight(const char* op, const GrokitWeight* w, WDesc* d, char* msg, size_t len) {
  if (w == nullptr) return GK_FAIL(GROKIT_ERR_INVALID, "%s: w is NULL", op);
  if (w->dtype != kDtQ8 && w->dtype != kDtQ4 && w->dtype != kDtF8 && w->dtype != kDtBF16)
    return GK_FAIL(GROKIT_ERR_INVALID, "%s: weight dtype %d is not a weight scheme (16 q8rb, 17 q4g, 18 f8col, 1 bf16)", op,
                     static_cast<int>(w->dtype));
  const char* dt = dtype_label(w->dtype);
  const long long E = w->experts, K = w->rows, N = w->cols;
  if (E < 1 || K < 1 || N < 1)
    return GK_FAIL(GROKIT_ERR_INVALID, "%s: %s weight of %lld x %lld x %lld (experts x K x N) is not a valid shape", op,
                     dt, E, K, N);
  if (K > INT_MAX || N > INT_MAX || E > INT_MAX)
    return GK_FAIL(GROKIT_ERR_UNSUPPORTED, "%s: %s weight of %lld x %lld x %lld (experts x K x N) is too large", op, dt,
                     E, K, N);
  if (w->data == nullptr) return GK_FAIL(GROKIT_ERR_INVALID, "%s: %s weight data is NULL", op, dt);
  const uint64_t KN = static_cast<uint64_t>(K) * static_cast<uint64_t>(N);
  // Divided, not multiplied: K * N * E can wrap 64 bits for K, N, E near 2^31.
  if (KN > (uint64_t{1} << 56) / static_cast<uint64_t>(E))
    return GK_FAIL(GROKIT_ERR_INVALID, "%s: %s weight of %lld x %lld x %lld (experts x K x N) is too large", op, dt, E,
                     K, N);
  uint64_t expect = 0;
  WDesc r;
  r.dtype = w->dtype;
  r.param = w->param;
  r.E = E, r.K = K, r.N = N;
  r.data = static_cast<const uint8_t*>(w->data);
  switch (w->dtype) {
    case kDtQ8: {
      const long long B = w->param;
      if (B < 1 || K % B != 0)
        return GK_FAIL(GROKIT_ERR_INVALID, "%s: q8rb weight: K = %lld rows do not split into B = %lld scale blocks", op,
                         K, B);
      if (w->layout != 0 && w->layout != kLayoutQ8Chunk16)
        return GK_FAIL(GROKIT_ERR_INVALID, "%s: q8rb weight has layout %d (0: as stored, 1: k-chunked)", op,
                         static_cast<int>(w->layout));
      r.rpb = K / B;
      if (w->layout == kLayoutQ8Chunk16 && (K % 16 != 0 || r.rpb % 16 != 0))
        return GK_FAIL(GROKIT_ERR_INVALID, "%s: q8rb weight K = %lld, B = %lld cannot have layout 1 (16-row chunks)", op,
                         K, B);
      r.fmt = w->layout == kLayoutQ8Chunk16 ? kQ8C : kQ8R;
      expect = KN;
      r.stride = KN;
      const uint64_t codes = (static_cast<uint64_t>(E) * KN + 63) / 64 * 64;
      r.scales = reinterpret_cast<const uint16_t*>(r.data + codes);
      r.s_stride = static_cast<uint64_t>(B) * static_cast<uint64_t>(N);
      break;
    }
    case kDtQ4: {
      const long long G = w->param;
      if (G != 32 && G != 64 && G != 128)
        return GK_FAIL(GROKIT_ERR_INVALID, "%s: q4g weight: group G = %lld is not 32, 64 or 128", op, G);
      if (K % G != 0)
        return GK_FAIL(GROKIT_ERR_INVALID, "%s: q4g weight: K = %lld rows are not a multiple of the group G = %lld", op,
                         K, G);
      r.fmt = kQ4;
      r.group_log2 = G == 32 ? 0 : G == 64 ? 1 : 2;
      r.group_bytes = 16 * static_cast<uint64_t>(G / 32) * static_cast<uint64_t>(N) + (2 * static_cast<uint64_t>(N) + 15) / 16 * 16;
      expect = static_cast<uint64_t>(K / G) * r.group_bytes;
      break;
    }
    case kDtF8:
      if (K % 32 != 0) return GK_FAIL(GROKIT_ERR_INVALID, "%s: f8col weight: K = %lld rows are not a multiple of 32", op, K);
      r.fmt = kF8;
      expect = KN + (2 * static_cast<uint64_t>(N) + 15) / 16 * 16;
      break;
    default:
      r.fmt = kBF16;
      expect = 2 * KN;
      break;
  }
  if (w->dtype != kDtQ8 && w->layout != 0)
    return GK_FAIL(GROKIT_ERR_INVALID, "%s: %s weight has layout %d (the CUDA backend keeps it as stored: 0)", op, dt,
                     static_cast<int>(w->layout));
  if (w->matrix_bytes != expect)
    return GK_FAIL(GROKIT_ERR_INVALID, "%s: %s weight %lld x %lld (G/B %d): matrix_bytes %llu, expected %llu", op, dt, K,
                     N, static_cast<int>(w->param), static_cast<unsigned long long>(w->matrix_bytes),
                     static_cast<unsigned long long>(expect));
  if (r.fmt != kQ8R && r.fmt != kQ8C) r.stride = w->matrix_bytes;
  // The k-chunked kernels load 16 bytes at a time.
  if ((r.fmt == kQ8C || r.fmt == kQ4 || r.fmt == kF8) && (reinterpret_cast<uintptr_t>(r.data) & 15) != 0)
    return GK_FAIL(GROKIT_ERR_INVALID, "%s: %s weight data %p is not 16-byte aligned", op, dt, w->data);
  // bf16 weights and q8rb scales are read as 2-byte values (an odd address faults).
  if ((reinterpret_cast<uintptr_t>(r.data) & 1) != 0)
    return GK_FAIL(GROKIT_ERR_INVALID, "%s: %s weight data %p is not 2-byte aligned", op, dt, w->data);
  *d = r;
  return GROKIT_OK;
}

#undef GK_FAIL

// x_div: 1 unrouted; expert: NULL unrouted. partial / counters: the split-k workspace.
inline DecodeParams make_decode_params(const WDesc& d, const DecodePlan& P, const float* x, int64_t M, int64_t ldx,
                                       const int32_t* expert, int64_t x_div, float* y, int64_t ldy, float* partial,
                                       uint32_t* counters, unsigned int* errors) {
  DecodeParams p{};
  p.w = d.data;
  p.w_stride = d.stride;
  p.scales = d.scales;
  p.s_stride = d.s_stride;
  p.x = x;
  p.ldx = ldx;
  p.y = y;
  p.ldy = ldy;
  p.expert = expert;
  p.errors = errors;
  p.x_div = static_cast<int32_t>(x_div);
  p.M = static_cast<int32_t>(M);
  p.E = static_cast<int32_t>(d.E);
  p.K = static_cast<int32_t>(d.K);
  p.N = static_cast<int32_t>(d.N);
  p.units = P.units;
  p.ups = P.ups;
  p.ks = P.ks;
  p.tile_units = P.tile_units;
  p.wn_log2 = P.wn_log2;
  p.group_log2 = d.group_log2;
  p.group_bytes = d.group_bytes;
  const FastDiv fd = scale_div(d);
  p.div_magic = fd.magic;
  p.div_shift = fd.shift;
  p.vec = (reinterpret_cast<uintptr_t>(d.data) & 15) == 0 && d.N % P.cpt == 0 ? 1 : 0;
  p.partial = P.ks > 1 ? partial : nullptr;
  p.counters = P.ks > 1 ? counters : nullptr;
  return p;
}

// Calls fn(F, KMT, UM), each an std::integral_constant<int, ...>, for the decode kernel
// instance that a format, a plan's rows per pass and the deep variant select: the one
// place that maps them to template arguments (launchers and the host emulation).
template <class Fn>
inline void with_decode_kernel(int fmt, int kmt, bool deep, const Fn& fn) {
  auto by_rows = [&](auto f) {
    using C1 = std::integral_constant<int, 1>;
    switch (kmt) {
      case 1:
        if (deep) fn(f, C1{}, std::integral_constant<int, 2>{});
        else fn(f, C1{}, C1{});
        break;
      case 2: fn(f, std::integral_constant<int, 2>{}, C1{}); break;
      case 4: fn(f, std::integral_constant<int, 4>{}, C1{}); break;
      case 8: fn(f, std::integral_constant<int, 8>{}, C1{}); break;
      default: fn(f, std::integral_constant<int, 16>{}, C1{}); break;
    }
  };
  switch (fmt) {
    case kQ8C: by_rows(std::integral_constant<int, kQ8C>{}); break;
    case kQ8R: by_rows(std::integral_constant<int, kQ8R>{}); break;
    case kQ4: by_rows(std::integral_constant<int, kQ4>{}); break;
    case kF8: by_rows(std::integral_constant<int, kF8>{}); break;
    default: by_rows(std::integral_constant<int, kBF16>{}); break;
  }
}

constexpr uint64_t kPartialCap = uint64_t{256} << 20;  // split-k partials of one product, bytes at most

// The plan of an unrouted or routed product when its workspace can be had (eager calls,
// and captures after one): matmul alone and matmul_multi's products use the same, so the
// same bits.
inline DecodePlan first_plan(const WDesc& d, int64_t M, int64_t per, int64_t active, int sms, const DecodeForce& force) {
  const uint64_t mn = static_cast<uint64_t>(M) * static_cast<uint64_t>(d.N);
  const int max_ks = static_cast<int>(imin<uint64_t>(kMaxSplits, kPartialCap / (mn * 4)));
  return plan_decode(d.fmt, d.K, d.N, per, active, sms, max_ks, force);
}

// Several unrouted products of one x in one launch (decode_multi_kernel): each product's
// own plan, the workspace they need (partials one after another, a counter row each) and
// the launch shape.
struct MultiPlan {
  DecodePlan P[kMaxMulti];
  int count = 0;
  size_t partial_floats = 0, counter_words = 0, smem = 0;
  int64_t max_tiles = 1, max_ks = 1;
};
inline MultiPlan plan_multi(const WDesc* d, int count, int64_t M, int sms, const DecodeForce& force) {
  MultiPlan mp;
  mp.count = count;
  for (int i = 0; i < count; ++i) {
    mp.P[i] = first_plan(d[i], M, M, 1, sms, force);
    if (mp.P[i].ks > 1) mp.partial_floats += static_cast<size_t>(mp.P[i].ks) * static_cast<size_t>(M * d[i].N);
    mp.max_tiles = imax<int64_t>(mp.max_tiles, mp.P[i].tiles);
    mp.max_ks = imax<int64_t>(mp.max_ks, mp.P[i].ks);
    mp.smem = mp.smem > mp.P[i].smem ? mp.smem : mp.P[i].smem;
  }
  mp.counter_words = static_cast<size_t>(count) * static_cast<size_t>(mp.max_tiles);
  return mp;
}
inline DecodeMulti make_decode_multi(const MultiPlan& mp, const WDesc* d, const float* x, int64_t M, int64_t ldx,
                                     float* const* y, const int64_t* ldy, float* partial, uint32_t* counters,
                                     unsigned int* errors, bool round_y, bool gelu) {
  DecodeMulti m{};
  size_t off = 0;
  for (int i = 0; i < mp.count; ++i) {
    m.p[i] = make_decode_params(d[i], mp.P[i], x, M, ldx, nullptr, 1, y[i], ldy[i], partial + off,
                                counters + static_cast<size_t>(i) * static_cast<size_t>(mp.max_tiles), errors);
    m.p[i].round_y = round_y ? 1 : 0;
    m.p[i].gelu = gelu ? 1 : 0;
    m.tiles[i] = static_cast<int32_t>(mp.P[i].tiles);
    if (mp.P[i].ks > 1) off += static_cast<size_t>(mp.P[i].ks) * static_cast<size_t>(M * d[i].N);
  }
  return m;
}

// ---------------------------------------------------------------------------------
// Prefill helpers.

// One matrix dequantized to bf16 bits [K, N] row-major (the bits the decode kernel
// multiplies by). Grid (ceil(N / 256), min(units, 65535)), units by grid stride.
struct DequantParams {
  const uint8_t* w;         // the matrix: codes (q8rb) or payload
  const uint16_t* scales;   // q8rb: its scale rows [B, N]
  int32_t K, N;
  int32_t group_log2;       // q4g
  uint64_t group_bytes;     // q4g
  uint32_t div_magic;       // q8rb: unit (layout 1) or row -> scale row
  int32_t div_shift;
  uint16_t* out;
};

// Expert e of d (not bf16) into out.
inline DequantParams make_dequant_params(const WDesc& d, int64_t e, uint16_t* out) {
  DequantParams p{};
  p.w = d.data + static_cast<uint64_t>(e) * d.stride;
  p.scales = d.scales != nullptr ? d.scales + static_cast<uint64_t>(e) * d.s_stride : nullptr;
  p.K = static_cast<int32_t>(d.K);
  p.N = static_cast<int32_t>(d.N);
  p.group_log2 = d.group_log2;
  p.group_bytes = d.group_bytes;
  const FastDiv fd = scale_div(d);
  p.div_magic = fd.magic;
  p.div_shift = fd.shift;
  p.out = out;
  return p;
}

template <int F>
GK_KERNEL(1) dequant_kernel(const DequantParams p) {
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (n >= p.N) return;
  const uint64_t N = static_cast<uint32_t>(p.N);
  const int units = p.K / unit_rows(F);
  for (int u = static_cast<int>(blockIdx.y); u < units; u += static_cast<int>(gridDim.y)) {
    uint16_t* o = p.out + static_cast<uint64_t>(u) * unit_rows(F) * N + n;
    if constexpr (F == kQ8C) {
      const uint4 c = ld16(p.w + (static_cast<uint64_t>(u) * N + n) * 16);
      const uint32_t b = fastdiv(static_cast<uint32_t>(u), p.div_magic, p.div_shift);
      const uint32_t s = ld2(reinterpret_cast<const uint8_t*>(p.scales + static_cast<uint64_t>(b) * N + n));
      const __nv_bfloat162 s2 = bits_bf2(s | (s << 16));
      const uint32_t cw[4] = {c.x, c.y, c.z, c.w};
      for (int w = 0; w < 4; ++w) {
        uint32_t p01, p23;
        dq_q8_word(cw[w], s2, s2, p01, p23);
        o[(4 * w + 0) * N] = static_cast<uint16_t>(p01);
        o[(4 * w + 1) * N] = static_cast<uint16_t>(p01 >> 16);
        o[(4 * w + 2) * N] = static_cast<uint16_t>(p23);
        o[(4 * w + 3) * N] = static_cast<uint16_t>(p23 >> 16);
      }
    } else if constexpr (F == kQ4) {
      const uint32_t g = static_cast<uint32_t>(u) >> p.group_log2;
      const uint32_t ch = static_cast<uint32_t>(u) & ((1u << p.group_log2) - 1u);
      const uint8_t* gb = p.w + g * p.group_bytes;
      const uint4 c = ld16(gb + (ch * N + static_cast<uint64_t>(n)) * 16);
      const uint32_t s = ld2(gb + static_cast<uint64_t>(1u << p.group_log2) * N * 16 + 2 * static_cast<uint64_t>(n));
      const __nv_bfloat162 s2 = bits_bf2(s | (s << 16));
      const uint32_t cw[4] = {c.x, c.y, c.z, c.w};
      for (int w = 0; w < 4; ++w) {
        uint32_t q[4];
        dq_q4_word(cw[w], s2, q);
        for (int j = 0; j < 4; ++j) {
          o[(8 * w + j) * N] = static_cast<uint16_t>(q[j]);
          o[(8 * w + j + 4) * N] = static_cast<uint16_t>(q[j] >> 16);
        }
      }
    } else if constexpr (F == kF8) {
      const uint8_t* q = p.w + (static_cast<uint64_t>(u) * N + n) * 32;
      const uint4 c0 = ld16(q), c1 = ld16(q + 16);
      const uint32_t s = ld2(p.w + static_cast<uint64_t>(units) * N * 32 + 2 * static_cast<uint64_t>(n));
      const __nv_bfloat162 s2 = bits_bf2(s | (s << 16));
      const uint32_t cw[8] = {c0.x, c0.y, c0.z, c0.w, c1.x, c1.y, c1.z, c1.w};
      for (int w = 0; w < 8; ++w) {
        uint32_t pa, pb;
        dq_f8_word(cw[w], s2, pa, pb);
        f8_fix_nan(f8_nan_bytes(cw[w]), pa, pb);
        o[(4 * w + 0) * N] = static_cast<uint16_t>(pa);
        o[(4 * w + 1) * N] = static_cast<uint16_t>(pb);
        o[(4 * w + 2) * N] = static_cast<uint16_t>(pa >> 16);
        o[(4 * w + 3) * N] = static_cast<uint16_t>(pb >> 16);
      }
    } else {  // kQ8R: one row
      const uint32_t code = ld1(p.w + static_cast<uint64_t>(u) * N + n);
      const uint32_t b = fastdiv(static_cast<uint32_t>(u), p.div_magic, p.div_shift);
      const uint32_t s = ld2(reinterpret_cast<const uint8_t*>(p.scales + static_cast<uint64_t>(b) * N + n));
      o[0] = static_cast<uint16_t>(dq_q8_pair(code, 0, bits_bf2(s | (s << 16))));
    }
  }
}

// Rows of x as bf16 bits: hi[r, k] = bf16(x[src(r), k]) and, when lo is not NULL,
// lo[r, k] = bf16(x - hi) (0 where x is not finite), so that hi + lo carries x to about
// 2^-17 relative. src(r) = (rows ? rows[r] : row0 + r) / div. Grid (ceil(K / 256),
// min(n, 65535)), rows by grid stride.
template <int kUnused = 0>
GK_KERNEL(1) gather_x_kernel(const float* x, int64_t ldx, const int32_t* rows, int64_t row0, int64_t div, int64_t n,
                             int64_t K, uint16_t* hi, uint16_t* lo) {
  const int64_t k = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (k >= K) return;
  for (int64_t r = blockIdx.y; r < n; r += gridDim.y) {
    const int64_t src = (rows != nullptr ? static_cast<int64_t>(rows[r]) : row0 + r) / div;
    const float v = x[src * ldx + k];
    uint16_t h = bf16_rne_bits(v);
    if (lo != nullptr) {
      const uint32_t vb = as_u32(v);
      const bool finite = (vb & 0x7f800000u) != 0x7f800000u;
      if (finite && (h & 0x7f80u) == 0x7f80u) h = static_cast<uint16_t>(vb >> 16);  // rounded up to inf: truncate
      lo[r * K + k] = finite ? bf16_rne_bits(v - as_f32(static_cast<uint32_t>(h) << 16)) : uint16_t{0};
    }
    hi[r * K + k] = h;
  }
}

// y[rows[r], :] = t[r, :] for r < n. Grid (ceil(N / 256), min(n, 65535)).
template <int kUnused = 0>
GK_KERNEL(1) scatter_rows_kernel(const float* t, const int32_t* rows, int64_t n, int64_t N, float* y, int64_t ldy) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (c >= N) return;
  for (int64_t r = blockIdx.y; r < n; r += gridDim.y) y[static_cast<int64_t>(rows[r]) * ldy + c] = t[r * N + c];
}

// y[m, :] = 0 for the rows whose expert is < 0 or >= E. Grid (ceil(N / 256), min(M, 65535)).
template <int kUnused = 0>
GK_KERNEL(1) zero_unrouted_kernel(const int32_t* expert, int64_t M, int64_t E, int64_t N, float* y, int64_t ldy) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (c >= N) return;
  for (int64_t m = blockIdx.y; m < M; m += gridDim.y) {
    const int32_t e = expert[m];
    if (e < 0 || e >= E) y[m * ldy + c] = 0.0f;
  }
}

// q8rb relayout of one matrix: src codes [K, N] row-major -> dst [K/16][N][16] (byte i of
// (u, n) is row 16u + i of column n). Grid (ceil(N / 256), min(K / 16, 65535)).
template <int kUnused = 0>
GK_KERNEL(1) q8_chunk_kernel(const uint8_t* src, int64_t K, int64_t N, uint8_t* dst) {
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (n >= N) return;
  for (int64_t u = blockIdx.y; u < K / 16; u += gridDim.y) {
    const uint8_t* s = src + u * 16 * N + n;
    uint32_t w[4] = {0, 0, 0, 0};
    for (int i = 0; i < 16; ++i) w[i / 4] |= ld1(s + i * N) << (8 * (i % 4));
    uint4 v;
    v.x = w[0], v.y = w[1], v.z = w[2], v.w = w[3];
#if defined(__CUDA_ARCH__)
    *reinterpret_cast<uint4*>(dst + (u * N + n) * 16) = v;
#else
    std::memcpy(dst + (u * N + n) * 16, &v, 16);
#endif
  }
}

}  // namespace grokit::kernels::cuda::mm
