// Output projection of a vocabulary part: y[m, n] = bf16(bf16(x[m] . E[n]) * multiplier).
//
// The dot product follows kernels::matmul_bf16_nt's pinned order exactly: sixteen fp32
// lanes, lane i takes the pairs (32j + 2i, 32j + 2i + 1) for j = 0, 1, ..., adding the odd
// element's product before the even one's, then the lanes are halved (i += i+8, +4, +2,
// +1). Products of bf16 values are exact in fp32, so fma(x, w, acc) is the CPU's
// acc + x * w, and the result is the CPU twin's to the bit.
//
// Geometry: 4 threads per row of E, 64 rows per block of 256 threads. Thread q (0..3) of a
// row owns lanes 4q..4q+3, i.e. the 8 elements 32j + 8q .. 32j + 8q + 7 of every 32-element
// step j: one 16-byte load per step, the 4 threads of a row reading 64 contiguous bytes
// and a warp 8 rows, several steps in flight per thread. x is staged in shared memory in
// tiles of MT rows x (8192 / MT) columns; grid.y walks tiles of MT x rows (MT = 1, 2, 4, 8
// for M up to 8, else 16), so each block streams its rows of E once per x tile.
#include "kernels/cuda/cuda_util.cuh"
#include "kernels/cuda/logits.h"

namespace grokit::kernels::cuda {

namespace {
constexpr int kThreads = 256;
constexpr int kRowsPerBlock = kThreads / 4;
constexpr int kTileFloats = 8192;  // x tile: 32 KB of shared memory
}  // namespace

// Elements k .. k+7 of a row of E as four words (element k in the low half of .x); zero
// when !ok or past D.
template <bool kVec>
static __device__ __forceinline__ uint4 load8(const uint16_t* row, int64_t k, int64_t D, bool ok) {
  if (!ok || k >= D) return make_uint4(0u, 0u, 0u, 0u);
  if constexpr (kVec) {
    return __ldcs(reinterpret_cast<const uint4*>(row + k));  // streamed (evict first)
  } else {
    uint32_t w[4];
#pragma unroll
    for (int t = 0; t < 4; ++t) {
      const uint32_t lo = k + 2 * t < D ? __ldg(row + k + 2 * t) : 0u;
      const uint32_t hi = k + 2 * t + 1 < D ? __ldg(row + k + 2 * t + 1) : 0u;
      w[t] = lo | (hi << 16);
    }
    return make_uint4(w[0], w[1], w[2], w[3]);
  }
}

static __device__ __forceinline__ float odd_of(uint32_t w) { return __uint_as_float(w & 0xffff0000u); }
static __device__ __forceinline__ float even_of(uint32_t w) { return __uint_as_float(w << 16); }

// kVec: D % 8 == 0 and E 16-byte aligned, so a thread's 8 elements are all inside the row
// or all past it; otherwise single loads and per-element guards (odd sizes).
template <int MT, bool kVec>
static __global__ void __launch_bounds__(kThreads, MT >= 16 ? 1 : 2)
    logits_kernel(const float* __restrict__ x, int64_t M, int64_t D, const uint16_t* __restrict__ table, int64_t N,
                  float multiplier, float* __restrict__ y, int64_t ldy) {
  constexpr int KC = kTileFloats / MT;  // x columns per tile, a multiple of 32
  constexpr int kUnroll = MT >= 8 ? 4 : 8;
  __shared__ __align__(16) float xs[kTileFloats];

  const int q = static_cast<int>(threadIdx.x & 3);
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + (threadIdx.x >> 2);
  const bool row_ok = n < N;
  const uint16_t* w = table + (row_ok ? n : 0) * D;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * MT;

  float acc[MT][4];
#pragma unroll
  for (int r = 0; r < MT; ++r) acc[r][0] = acc[r][1] = acc[r][2] = acc[r][3] = 0.0f;

  for (int64_t k0 = 0; k0 < D; k0 += KC) {
    const int kc = static_cast<int>(D - k0 < KC ? D - k0 : KC);
    const int steps = (kc + 31) / 32;
    const int cols = steps * 32;
    __syncthreads();  // the previous tile is consumed
    for (int i = threadIdx.x; i < MT * cols; i += kThreads) {
      const int r = i / cols, c = i - r * cols;
      const int64_t m = m0 + r;
      xs[r * KC + c] = (m < M && c < kc) ? x[m * D + k0 + c] : 0.0f;
    }
    __syncthreads();

    for (int s0 = 0; s0 < steps; s0 += kUnroll) {
      uint4 wv[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u)
        wv[u] = load8<kVec>(w, k0 + (s0 + u) * 32 + q * 8, D, row_ok && s0 + u < steps);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int c = (s0 + u) * 32 + q * 8;
        const int64_t rem = D - (k0 + c);  // elements of this thread's 8 inside the row
        if (s0 + u >= steps || rem <= 0) continue;
        const uint32_t ww[4] = {wv[u].x, wv[u].y, wv[u].z, wv[u].w};
        if (rem >= 8) {
#pragma unroll
          for (int r = 0; r < MT; ++r) {
            const float4 xa = *reinterpret_cast<const float4*>(&xs[r * KC + c]);
            const float4 xb = *reinterpret_cast<const float4*>(&xs[r * KC + c + 4]);
            const float xv[8] = {xa.x, xa.y, xa.z, xa.w, xb.x, xb.y, xb.z, xb.w};
#pragma unroll
            for (int t = 0; t < 4; ++t) {
              acc[r][t] = __fmaf_rn(xv[2 * t + 1], odd_of(ww[t]), acc[r][t]);
              acc[r][t] = __fmaf_rn(xv[2 * t], even_of(ww[t]), acc[r][t]);
            }
          }
        } else {
#pragma unroll
          for (int r = 0; r < MT; ++r) {
#pragma unroll
            for (int t = 0; t < 4; ++t) {
              if (2 * t + 1 < rem) acc[r][t] = __fmaf_rn(xs[r * KC + c + 2 * t + 1], odd_of(ww[t]), acc[r][t]);
              if (2 * t < rem) acc[r][t] = __fmaf_rn(xs[r * KC + c + 2 * t], even_of(ww[t]), acc[r][t]);
            }
          }
        }
      }
    }
  }

  // Halving across the row's 4 threads: lanes i += i+8 (thread q += q+2), i += i+4
  // (q += q+1), then within thread 0: 0 += 2, 1 += 3, 0 += 1. Every lane of the warp runs
  // the shuffles; only the lanes named keep the sums.
#pragma unroll
  for (int r = 0; r < MT; ++r) {
    float o[4];
#pragma unroll
    for (int t = 0; t < 4; ++t) o[t] = __shfl_xor_sync(kFullWarp, acc[r][t], 2);
    if (q < 2) {
#pragma unroll
      for (int t = 0; t < 4; ++t) acc[r][t] = __fadd_rn(acc[r][t], o[t]);
    }
#pragma unroll
    for (int t = 0; t < 4; ++t) o[t] = __shfl_xor_sync(kFullWarp, acc[r][t], 1);
    const int64_t m = m0 + r;
    if (q == 0 && row_ok && m < M) {
      float l0 = __fadd_rn(acc[r][0], o[0]), l1 = __fadd_rn(acc[r][1], o[1]);
      const float l2 = __fadd_rn(acc[r][2], o[2]), l3 = __fadd_rn(acc[r][3], o[3]);
      l0 = __fadd_rn(l0, l2);
      l1 = __fadd_rn(l1, l3);
      l0 = __fadd_rn(l0, l1);
      y[m * ldy + n] = round_bf16(__fmul_rn(round_bf16(l0), multiplier));
    }
  }
}

template <int MT, bool kVec>
static void launch(const float* x, int64_t M, int64_t D, const uint16_t* table, int64_t N, float multiplier, float* y,
                   int64_t ldy, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((N + kRowsPerBlock - 1) / kRowsPerBlock), static_cast<unsigned>((M + MT - 1) / MT));
  logits_kernel<MT, kVec><<<grid, kThreads, 0, stream>>>(x, M, D, table, N, multiplier, y, ldy);
}

template <bool kVec>
static void launch_for_m(const float* x, int64_t M, int64_t D, const uint16_t* table, int64_t N, float multiplier,
                         float* y, int64_t ldy, cudaStream_t stream) {
  if (M <= 1) launch<1, kVec>(x, M, D, table, N, multiplier, y, ldy, stream);
  else if (M <= 2) launch<2, kVec>(x, M, D, table, N, multiplier, y, ldy, stream);
  else if (M <= 4) launch<4, kVec>(x, M, D, table, N, multiplier, y, ldy, stream);
  else if (M <= 8) launch<8, kVec>(x, M, D, table, N, multiplier, y, ldy, stream);
  else launch<16, kVec>(x, M, D, table, N, multiplier, y, ldy, stream);
}

int logits(const float* x, int64_t M, int64_t D, const uint16_t* table, int64_t N, float multiplier, float* y,
           int64_t ldy, GrokitStream stream) {
  if (M < 0) return set_error(GROKIT_ERR_INVALID, "logits: M = %lld", static_cast<long long>(M));
  if (D <= 0) return set_error(GROKIT_ERR_INVALID, "logits: D = %lld", static_cast<long long>(D));
  if (N < 1) return set_error(GROKIT_ERR_INVALID, "logits: N = %lld", static_cast<long long>(N));
  if (ldy < N)
    return set_error(GROKIT_ERR_INVALID, "logits: ldy = %lld < N = %lld", static_cast<long long>(ldy),
                     static_cast<long long>(N));
  if (M == 0) return GROKIT_OK;
  if (x == nullptr || table == nullptr || y == nullptr) return set_error(GROKIT_ERR_INVALID, "logits: null x, table or y");
  if ((N + kRowsPerBlock - 1) / kRowsPerBlock > 0x7fffffffLL || (M + 15) / 16 > 65535)
    return set_error(GROKIT_ERR_UNSUPPORTED, "logits: M = %lld, N = %lld too large for one launch",
                     static_cast<long long>(M), static_cast<long long>(N));
  cudaStream_t s = as_stream(stream);
  if (D % 8 == 0 && aligned16(table)) launch_for_m<true>(x, M, D, table, N, multiplier, y, ldy, s);
  else launch_for_m<false>(x, M, D, table, N, multiplier, y, ldy, s);
  return check_launch("logits");
}

}  // namespace grokit::kernels::cuda
