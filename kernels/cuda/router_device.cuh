// Device code of the CUDA MoE router (router_topk.h), as kernels::router_topk:
//   logits[e] = fp32(sum_d double(x[d]) * double(w[d, e]))  (products exact in double)
//   p = exp(logit - max) in double rounded to fp32, summed in fp32 in expert order,
//   p[e] / sum in fp32; top k by repeated argmax (strictly greater wins).
//
// The double sum has one order for every M, so a row routes to the same experts, with the
// same gates, alone or in a batch of any size. It is a fixed tree, not the CPU's d order:
// the two differ by double rounding only (relative ~D * 2^-53), so the fp32 logits agree
// except when the exact sum lies within that of an fp32 rounding boundary (then by 1 ulp).
//   S = 1024 / E slices; slice s sums d = s, s + S, ... in batches of kBatch terms,
//   term j of a batch into acc[j % 4], the rest into acc[0]; the slice's partial is
//   (acc[0] + acc[1]) + (acc[2] + acc[3]); the S partials of an expert fold in halves
//   (slot i += slot i + ceil(width / 2)) down to one.
//
// One kernel, two shapes (router_kernel<T, R, XS>):
//   decode (M < kTileFrom): 1024 threads, one row per block, a thread per (slice, expert);
//   with XS, the row's x widened to double once into dynamic shared memory (D doubles, up
//   to kMaxXsRow; each x value was widened by every expert's thread);
//   prefill: 256 threads, kTileRows rows per block, a thread per (S / 4 slices, expert),
//   so that w (D * E floats, read whole by every block) is read once per kTileRows rows
//   instead of once per row (4096 rows of Grok-1 read 805 GB of it from L2).
// Also compiles as plain C++ (emulable.cuh) for the host emulation in tests.
#pragma once

#include <cmath>
#include <cstdint>

#include "kernels/cuda/emulable.cuh"
#include "kernels/cuda/widen.h"

namespace grokit::kernels::cuda::router {

constexpr int kSlicedThreads = 1024;  // threads over which the slices S = 1024 / E are defined
constexpr int kMaxExperts = 256;
constexpr int kBatch = 16;            // terms per slice per batch: loads in flight per thread
constexpr int kRowThreads = 1024;     // decode: one row per block
constexpr int kTileThreads = 256;     // prefill: kTileRows rows per block
constexpr int kTileRows = 4;          // red[] of the tile: 4 x 1024 doubles = 32 KiB of shared memory
constexpr int64_t kTileFrom = 64;     // M at or above this takes the tiled shape
constexpr int64_t kMaxXsRow = 12288;  // decode: widths whose x row (as doubles) goes to shared memory

GK_HD int slices(int E) { return kSlicedThreads / E; }

// T threads, R rows per block (grid-stride over row tiles); XS (R == 1): x from D doubles
// of dynamic shared memory.
template <int T, int R, bool XS = false>
GK_KERNEL_T(T, 1) router_kernel(const float* x, int64_t M, int64_t D, const float* w, int E, int k, int32_t* experts,
                                float* gates) {
  static_assert(!XS || R == 1, "x in shared memory: one row per block");
  GK_SHARED double red[R][kSlicedThreads];
  GK_SHARED float p[R][kMaxExperts];
  GK_SHARED unsigned char taken[R][kMaxExperts];
  const int t = static_cast<int>(threadIdx.x);
  pdl_trigger();
  if (R == 1 && blockIdx.x == 0)  // decode: the weight heads for L2 while the kernel before ends
    for (int64_t i = static_cast<int64_t>(t) * 32; i < D * E; i += static_cast<int64_t>(T) * 32) prefetch_l2(w + i);
  pdl_wait();  // x is an earlier kernel's
  const int S = slices(E);
  const int ST = T / E;  // slices in flight: thread (st, e) takes slices st, st + ST, ...
  const int e = t % E, st = t / E;
  const bool summing = st < ST;  // T % E threads have no slice
  const int64_t tiles = (M + R - 1) / R;
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int64_t m0 = tile * R;
    const int rows = static_cast<int>(M - m0 < R ? M - m0 : R);
    double* xs = reinterpret_cast<double*>(dyn_smem());
    if constexpr (XS) {
      for (int64_t i = t; i < D; i += T) xs[i] = widen_f32(ldg(x + m0 * D + i));
      GK_SYNC();
    }
    if (summing) {
      for (int s = st; s < S; s += ST) {
        double acc[R][4];
        GK_UNROLL
        for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = acc[r][2] = acc[r][3] = 0.0;
        int64_t d = s;
        for (; d + (kBatch - 1) * static_cast<int64_t>(S) < D; d += kBatch * static_cast<int64_t>(S)) {
          float wf[kBatch];
          GK_UNROLL
          for (int j = 0; j < kBatch; ++j) wf[j] = ldg(w + (d + j * S) * E + e);
          if constexpr (XS) {  // x already widened
            GK_UNROLL
            for (int j = 0; j < kBatch; ++j) acc[0][j & 3] = std::fma(xs[d + j * S], widen_f32(wf[j]), acc[0][j & 3]);
          } else if constexpr (R == 1) {  // widened at use: 64 registers a thread at 1024 threads
            if (rows > 0) {
              const float* xr = x + m0 * D;
              float xv[kBatch];
              GK_UNROLL
              for (int j = 0; j < kBatch; ++j) xv[j] = ldg(xr + d + j * S);
              GK_UNROLL
              for (int j = 0; j < kBatch; ++j) acc[0][j & 3] = std::fma(widen_f32(xv[j]), widen_f32(wf[j]), acc[0][j & 3]);
            }
          } else {  // widened once for the tile's rows
            double wv[kBatch];
            GK_UNROLL
            for (int j = 0; j < kBatch; ++j) wv[j] = widen_f32(wf[j]);
            GK_UNROLL
            for (int r = 0; r < R; ++r) {
              if (r < rows) {
                const float* xr = x + (m0 + r) * D;
                float xv[kBatch];
                GK_UNROLL
                for (int j = 0; j < kBatch; ++j) xv[j] = ldg(xr + d + j * S);
                GK_UNROLL
                for (int j = 0; j < kBatch; ++j) acc[r][j & 3] = std::fma(widen_f32(xv[j]), wv[j], acc[r][j & 3]);
              }
            }
          }
        }
        for (; d < D; d += S) {
          const double wd = widen_f32(ldg(w + d * E + e));
          GK_UNROLL
          for (int r = 0; r < R; ++r)
            if (r < rows) acc[r][0] = std::fma(XS ? xs[d] : widen_f32(ldg(x + (m0 + r) * D + d)), wd, acc[r][0]);
        }
        GK_UNROLL
        for (int r = 0; r < R; ++r) red[r][s * E + e] = (acc[r][0] + acc[r][1]) + (acc[r][2] + acc[r][3]);
      }
    }
    GK_SYNC();
    // Fold the upper slots of each expert's S partials onto the lower ones.
    for (int width = S; width > 1;) {
      const int half = (width + 1) / 2, moves = (width - half) * E;
      for (int i = t; i < R * moves; i += T) {
        const int r = i / moves, j = i % moves;
        red[r][j] = red[r][j] + red[r][j + half * E];
      }
      GK_SYNC();
      width = half;
    }
    // The exponentials one (row, expert) per thread (each a long double-precision chain),
    // then one thread per row sums them in expert order and selects.
    for (int i = t; i < R * E; i += T) {
      const int r = i / E, ei = i % E;
      float mx = static_cast<float>(red[r][0]);
      for (int j = 1; j < E; ++j) {
        const float v = static_cast<float>(red[r][j]);
        mx = mx < v ? v : mx;
      }
      p[r][ei] = static_cast<float>(std::exp(static_cast<double>(sub_rn(static_cast<float>(red[r][ei]), mx))));
      taken[r][ei] = 0;
    }
    GK_SYNC();
    if (t < rows) {
      const int r = t;
      const int64_t m = m0 + r;
      float sum = 0.0f;
      for (int i = 0; i < E; ++i) sum = add_rn(sum, p[r][i]);
      for (int i = 0; i < E; ++i) p[r][i] = div_rn(p[r][i], sum);
      for (int c = 0; c < k; ++c) {
        int best = -1;
        for (int i = 0; i < E; ++i) {
          if (!taken[r][i] && (best < 0 || p[r][i] > p[r][best])) best = i;
        }
        taken[r][best] = 1;
        experts[m * k + c] = best;
        gates[m * k + c] = p[r][best];
      }
    }
    GK_SYNC();  // red, p and taken are reused by the next tile
  }
}

}  // namespace grokit::kernels::cuda::router
