// Device code and plan of the attention for few query rows (decode; attention_decode.cu
// launches it): each row reads its own cache, keys split across blocks (flash-decoding),
// two passes so that the bf16 weights are rounded after normalisation as on the CPU. Arithmetic mirrors kernels/attention.cpp exactly: dot
// products in double in the CPU's chain order (lane d % 8, combined pairwise), tanh and
// exp in double, weighted sums of V in double.
//
//   decode_scores  grid (nsplit, M * kv_heads * hsub), 128 threads: scores s of its keys
//                  for up to 8 query heads of one kv head -> S; per split (max, sum e).
//   decode_pv      same grid: global (max, sum) from the split partials, w = bf16(e / sum),
//                  partial sum w * v of its keys (double) -> P, or o when nsplit == 1;
//                  the last block of a (row, heads) to finish (a counter that
//                  decode_scores zeroes) sets o = bf16(sum over the row's splits with
//                  keys of P), in split order.
//
// Also compiles as plain C++ (emulable.cuh, attention_impl.cuh) for the host emulation of
// these kernels in tests (tests/gpu/test_cuda_emulation.cpp).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>

#include "kernels/cuda/attention_impl.cuh"

namespace grokit::kernels::cuda::attn {

constexpr int kThreads = 128;
constexpr int kHB = 8;           // query heads per block
constexpr int kMinChunk = 32;    // keys per split, at least (one pass of decode_scores)
constexpr int kTK = 128;         // keys per weight tile in decode_pv
constexpr int kMaxSteps = 32;    // 256 / 8: words of a key row per lane in decode_scores
constexpr int kBatch = 16;       // V rows in flight per thread in decode_pv
constexpr size_t kAlign = 256;

inline size_t align_up(size_t x) { return (x + kAlign - 1) / kAlign * kAlign; }

struct BlockIds {
  int split, h0, nh, g;
  int64_t m;
};
GK_D BlockIds block_ids(const Args& a, int hsub) {
  BlockIds b;
  b.split = static_cast<int>(blockIdx.x);
  int64_t y = blockIdx.y;
  const int hs = static_cast<int>(y % hsub);
  y /= hsub;
  b.g = static_cast<int>(y % a.kv_heads);
  b.m = y / a.kv_heads;
  b.h0 = b.g * a.group + hs * kHB;
  const int left = a.group - hs * kHB;
  b.nh = left < kHB ? left : kHB;
  return b;
}

// Keys per split of a row with n keys. The plan's chunk is sized for max_keys (a step's
// graph serves every length up to it), which left most splits of a shorter row empty and
// its keys on few SMs; the row's own keys are spread over all splits instead, in
// multiples of 32 (one pass of a scores block), never above the plan's chunk.
GK_D int64_t row_chunk(int64_t n, const DecodePlan& p) {
  int64_t c = (n + p.nsplit - 1) / p.nsplit;
  c = (c + 31) / 32 * 32;
  return c < 32 ? 32 : (c > p.chunk ? p.chunk : c);
}

// Online (max, sum of exp(s - max)) in double.
GK_D void online_add(double& m, double& l, float s) {
  const double sd = s;
  if (sd > m) {
    l = l * std::exp(m - sd) + 1.0;  // m = -inf: exp(-inf) = 0
    m = sd;
  } else {
    l += std::exp(sd - m);
  }
}
GK_D void online_merge(double& m, double& l, double mo, double lo) {
  const double mm = std::fmax(m, mo);
  if (mm == neg_inf_d()) return;
  l = (m == neg_inf_d() ? 0.0 : l * std::exp(m - mm)) + (mo == neg_inf_d() ? 0.0 : lo * std::exp(mo - mm));
  m = mm;
}

// Invariants: every (row, head, split) gets its (PM, PL) from exactly one block, also
// when the split has no keys (-inf, 0); S holds the scores of keys [0, n) of each row.
GK_KERNEL_T(kThreads, 1) decode_scores(Args a, DecodePlan p, float* __restrict__ S,
                                                                 float* __restrict__ PM, double* __restrict__ PL,
                                                                 uint32_t* __restrict__ cnt) {
  GK_SHARED __align__(16) double q_s[kHB * 256];
  GK_SHARED double red_m[kThreads / 32][kHB], red_l[kThreads / 32][kHB];
  const int tid = static_cast<int>(threadIdx.x), lane = tid & 31, warp = tid >> 5, slot = tid >> 2, l4 = tid & 3;
  pdl_trigger();
  pdl_wait();  // q and the caches are earlier kernels'; cnt was the last decode_pv's
  const BlockIds b = block_ids(a, p.hsub);
  const int dh = a.head_dim;
  const GrokitAttnRow row = a.rows[b.m];
  if (b.split == 0 && tid == 0 && cnt != nullptr) cnt[blockIdx.y] = 0;  // decode_pv's, in a later launch
  if (b.split == 0 && b.h0 == 0 && tid == 0 && row_out_of_contract(row, a.max_keys))
    raise_device_error(a.errors, GROKIT_DEVERR_ATTN_ROW);
  const int64_t n = row_keys(row, a.max_keys), vend = row_visible_end(row, n), chunk = row_chunk(n, p);
  const int64_t j0 = b.split * chunk, j1 = std::min(j0 + chunk, n);
  const int64_t rh0 = b.m * a.q_heads + b.h0;  // (row, first head) index
  if (j0 < j1) {  // the split's keys past its first pass, and its values (decode_pv's), head for L2
    const int64_t row_bytes = 2 * static_cast<int64_t>(dh), at = static_cast<int64_t>(b.g) * row.cap + j0;
    const int64_t first = std::min<int64_t>(j1 - j0, kThreads / 4);  // the first pass loads these itself
    prefetch_span_l2(row.k + (at + first) * dh, (j1 - j0 - first) * row_bytes, tid, kThreads);
    prefetch_span_l2(row.v + at * dh, (j1 - j0) * row_bytes, tid, kThreads);
  }

  for (int i = tid; i < b.nh * dh; i += kThreads) q_s[i] = static_cast<double>(a.q[rh0 * dh + i]);
  GK_SYNC();

  // Thread (slot, l4): key jb + slot, chains 2*l4 and 2*l4+1 (d = 8i + 2*l4, +1).
  double mr[2] = {neg_inf_d(), neg_inf_d()}, lr[2] = {0.0, 0.0};  // heads l4, l4 + 4
  const int steps = (dh - 2 * l4 + 7) / 8;                          // d = 2*l4 + 8*i < dh
  if (j0 < j1) {
    const uint16_t* kbase = row.k + static_cast<int64_t>(b.g) * row.cap * dh;
    for (int64_t jb = j0; jb < j1; jb += kThreads / 4) {
      const int64_t j = jb + slot;
      const bool live = j < j1;
      const uint16_t* kr = kbase + (live ? j : j1 - 1) * dh;
      // All of this lane's words of the key first (one memory round trip), then the sums.
      uint32_t kw[kMaxSteps];
GK_UNROLL
      for (int i = 0; i < kMaxSteps; ++i)
        kw[i] = i < steps ? *reinterpret_cast<const uint32_t*>(kr + 2 * l4 + 8 * i) : 0u;
      double acc[kHB][2];
GK_UNROLL
      for (int hh = 0; hh < kHB; ++hh) acc[hh][0] = acc[hh][1] = 0.0;
GK_UNROLL
      for (int i = 0; i < kMaxSteps; ++i) {
        if (i < steps) {
          const int d = 2 * l4 + 8 * i;
          const double k0 = static_cast<double>(bits_to_f32(kw[i] << 16));
          const double k1 = static_cast<double>(bits_to_f32(kw[i] & 0xffff0000u));
GK_UNROLL
          for (int hh = 0; hh < kHB; ++hh) {
            if (hh < b.nh) {
              const double2 qv = *reinterpret_cast<const double2*>(q_s + hh * dh + d);
              acc[hh][0] = std::fma(qv.x, k0, acc[hh][0]);  // = acc + q*k: the product is exact
              acc[hh][1] = std::fma(qv.y, k1, acc[hh][1]);
            }
          }
        }
      }
      const bool vis = live && j < vend && row.valid[j] != 0;
      // Every lane of a quad gets each head's dot; lane l4 keeps heads l4 and l4 + 4, so
      // the tanh and exp below run on every lane at once (two rounds, not one per head).
      double mine[2] = {0.0, 0.0};
GK_UNROLL
      for (int hh = 0; hh < kHB; ++hh) {
        // ((c0 + c1) + (c2 + c3)) + ((c4 + c5) + (c6 + c7)), as combine8 (+ commutes exactly).
        double t = acc[hh][0] + acc[hh][1];
        t += shfl_xor(t, 1);
        t += shfl_xor(t, 2);
        if ((hh & 3) == l4) mine[hh >> 2] = t;
      }
GK_UNROLL
      for (int i = 0; i < 2; ++i) {
        const int hh = l4 + 4 * i;
        if (live && hh < b.nh) {
          const float s = vis ? cap_logit(logit_x(static_cast<float>(mine[i]), a.multiplier), a.cap) : kMasked;
          S[(rh0 + hh) * a.max_keys + j] = s;
          online_add(mr[i], lr[i], s);
        }
      }
    }
  }
GK_UNROLL
  for (int i = 0; i < 2; ++i) {
    for (int off = 4; off < 32; off <<= 1) {
      const double mo = shfl_xor(mr[i], off);
      const double lo = shfl_xor(lr[i], off);
      online_merge(mr[i], lr[i], mo, lo);
    }
  }
  if (lane < 4) {
    red_m[warp][lane] = mr[0];
    red_l[warp][lane] = lr[0];
    red_m[warp][lane + 4] = mr[1];
    red_l[warp][lane + 4] = lr[1];
  }
  GK_SYNC();
  if (tid < b.nh) {
    double m = red_m[0][tid], l = red_l[0][tid];
    for (int w = 1; w < kThreads / 32; ++w) online_merge(m, l, red_m[w][tid], red_l[w][tid]);
    const int64_t idx = (rh0 + tid) * p.nsplit + b.split;
    PM[idx] = static_cast<float>(m);  // a score (fp32) or -inf
    PL[idx] = l;
  }
}

// One block of decode_pv before the combine. kDirect (nsplit == 1): writes o =
// bf16(sum) itself; else the split's partial to P.
template <bool kDirect>
GK_D void decode_pv_block(const Args& a, const DecodePlan& p, const float* __restrict__ S,
                          const float* __restrict__ PM, const double* __restrict__ PL, double* __restrict__ P) {
  GK_SHARED float w_s[kHB][kTK];
  GK_SHARED __align__(16) double red[2 * kThreads * kHB];  // [streams][kHB][dh], streams * dh <= 256
  GK_SHARED float mx_s[kHB], sum_s[kHB];
  const int tid = static_cast<int>(threadIdx.x), lane = tid & 31, warp = tid >> 5;
  const BlockIds b = block_ids(a, p.hsub);
  const int dh = a.head_dim;
  const GrokitAttnRow row = a.rows[b.m];
  const int64_t n = row_keys(row, a.max_keys), chunk = row_chunk(n, p);
  const int64_t j0 = b.split * chunk, j1 = std::min(j0 + chunk, n);
  const int64_t rh0 = b.m * a.q_heads + b.h0;

  auto store = [&](int hh, int d, double t) {
    if constexpr (kDirect) a.o[(rh0 + hh) * dh + d] = round_bf16(static_cast<float>(t));
    else P[((rh0 + hh) * p.nsplit + b.split) * dh + d] = t;
  };
  if (j0 >= j1) {  // no keys here (n == 0 only when the descriptor is out of contract)
    for (int i = tid; i < b.nh * dh; i += kThreads) store(i / dh, i % dh, 0.0);
    return;
  }

  // Global max and fp32 denominator of each head, from all splits (one warp per head).
  for (int hh = warp; hh < b.nh; hh += kThreads / 32) {
    const int64_t base = (rh0 + hh) * p.nsplit;
    float mx = neg_inf_f();
    for (int s = lane; s < p.nsplit; s += 32) mx = std::fmax(mx, PM[base + s]);
    for (int off = 16; off > 0; off >>= 1) mx = std::fmax(mx, shfl_xor(mx, off));
    double sum = 0.0;
    for (int s = lane; s < p.nsplit; s += 32) {
      const float ms = PM[base + s];
      if (ms != neg_inf_f()) sum += PL[base + s] * std::exp(static_cast<double>(ms) - static_cast<double>(mx));
    }
    for (int off = 16; off > 0; off >>= 1) sum += shfl_xor(sum, off);
    if (lane == 0) {
      mx_s[hh] = mx;
      sum_s[hh] = final_sum(sum, mx);
    }
  }

  // Thread (stream, pair): dims 2*pair, 2*pair+1 of keys stream, stream + kp, ...
  const int dp = dh >> 1, kp = kThreads / dp, pair = tid % dp, stream = tid / dp;
  const bool worker = stream < kp;
  const uint16_t* vbase = row.v + static_cast<int64_t>(b.g) * row.cap * dh;
  double acc[kHB][2];
GK_UNROLL
  for (int hh = 0; hh < kHB; ++hh) acc[hh][0] = acc[hh][1] = 0.0;
  for (int64_t tb = j0; tb < j1; tb += kTK) {
    const int cnt = static_cast<int>(std::min<int64_t>(kTK, j1 - tb));
    GK_SYNC();  // mx_s / sum_s ready; the previous tile's w_s consumed
    for (int i = tid; i < b.nh * kTK; i += kThreads) {
      const int hh = i / kTK, jt = i % kTK;
      float w = 0.0f;
      if (jt < cnt) w = softmax_weight(softmax_num(S[(rh0 + hh) * a.max_keys + tb + jt], mx_s[hh]), sum_s[hh]);
      w_s[hh][jt] = w;
    }
    GK_SYNC();
    if (worker) {
      for (int jt0 = stream; jt0 < cnt; jt0 += kBatch * kp) {
        uint32_t vv[kBatch];  // kBatch rows in flight, then the sums
GK_UNROLL
        for (int i = 0; i < kBatch; ++i) {
          const int jt = jt0 + i * kp;
          vv[i] = jt < cnt ? *reinterpret_cast<const uint32_t*>(vbase + (tb + jt) * dh + 2 * pair) : 0u;
        }
GK_UNROLL
        for (int i = 0; i < kBatch; ++i) {
          const int jt = jt0 + i * kp;
          if (jt < cnt) {
            const double v0 = static_cast<double>(bits_to_f32(vv[i] << 16));
            const double v1 = static_cast<double>(bits_to_f32(vv[i] & 0xffff0000u));
GK_UNROLL
            for (int hh = 0; hh < kHB; ++hh) {
              if (hh < b.nh) {
                const float w = w_s[hh][jt];
                if (w != 0.0f) {  // the CPU skips zero weights (adds exactly nothing)
                  acc[hh][0] = std::fma(static_cast<double>(w), v0, acc[hh][0]);
                  acc[hh][1] = std::fma(static_cast<double>(w), v1, acc[hh][1]);
                }
              }
            }
          }
        }
      }
    }
  }
  GK_SYNC();
  if (worker) {
    for (int hh = 0; hh < b.nh; ++hh) {
      red[(stream * kHB + hh) * dh + 2 * pair] = acc[hh][0];
      red[(stream * kHB + hh) * dh + 2 * pair + 1] = acc[hh][1];
    }
  }
  GK_SYNC();
  for (int i = tid; i < b.nh * dh; i += kThreads) {
    const int hh = i / dh, d = i % dh;
    double t = 0.0;
    for (int st = 0; st < kp; ++st) t += red[(st * kHB + hh) * dh + d];
    store(hh, d, t);
  }
}

// o = bf16(fp32(sum over splits of P)) of one (row, head, dim), in split order as
// combine_splits, but only over the splits that hold keys of the row (row_chunk: the last
// ones may be empty; their partials are +0.0, which adds nothing: the sum starts at +0.0
// and never becomes -0.0). part: the element's partial of split 0 (stride head_dim).
// Loads go out four at a time.
GK_D float combine_splits_of(const double* part, int used, int dh) {
  double t = 0.0;
  int s = 0;
  for (; s + 4 <= used; s += 4) {
    const double v0 = ldcg(part + static_cast<int64_t>(s) * dh), v1 = ldcg(part + static_cast<int64_t>(s + 1) * dh);
    const double v2 = ldcg(part + static_cast<int64_t>(s + 2) * dh), v3 = ldcg(part + static_cast<int64_t>(s + 3) * dh);
    t += v0;
    t += v1;
    t += v2;
    t += v3;
  }
  for (; s < used; ++s) t += ldcg(part + static_cast<int64_t>(s) * dh);
  return round_bf16(static_cast<float>(t));
}

template <bool kDirect>
GK_KERNEL_T(kThreads, 1) decode_pv(Args a, DecodePlan p, const float* __restrict__ S, const float* __restrict__ PM,
                                   const double* __restrict__ PL, double* __restrict__ P, uint32_t* __restrict__ cnt) {
  pdl_trigger();
  pdl_wait();  // decode_scores' S, PM, PL and zeroed counters
  decode_pv_block<kDirect>(a, p, S, PM, PL, P);
  if constexpr (!kDirect) {
    // Every split's block of this (row, heads) arrives; the last one adds their partials.
    GK_SHARED int s_last;
    const int tid = static_cast<int>(threadIdx.x);
    fence();
    GK_SYNC();
    if (tid == 0) s_last = atomic_add(cnt + blockIdx.y, 1u) == static_cast<uint32_t>(p.nsplit - 1) ? 1 : 0;
    GK_SYNC();
    if (s_last == 0) return;
    fence();
    const BlockIds b = block_ids(a, p.hsub);
    const int dh = a.head_dim;
    const int64_t n = row_keys(a.rows[b.m], a.max_keys), chunk = row_chunk(n, p);
    const int used = static_cast<int>(std::min<int64_t>(p.nsplit, (n + chunk - 1) / chunk));
    const int64_t rh0 = b.m * a.q_heads + b.h0;
    for (int i = tid; i < b.nh * dh; i += kThreads) {
      const int64_t rh = rh0 + i / dh;
      a.o[rh * dh + i % dh] = combine_splits_of(P + rh * p.nsplit * dh + i % dh, used, dh);
    }
  }
}

// The decode plan (decode_plan's, which adds the error): false when the grid would be
// too large.
inline bool plan_decode(const Args& a, int sms, DecodePlan* p) {
  p->hsub = (a.group + kHB - 1) / kHB;
  const int64_t base = a.M * a.kv_heads * p->hsub;
  if (base > 65535) return false;
  // About two blocks per SM; splits of at least kMinChunk keys (multiples of 32) for a row
  // of max_keys (a shorter row spreads its keys over the same splits: row_chunk).
  const int64_t target = 2 * static_cast<int64_t>(std::max(sms, 1));
  int64_t ns = (target + base - 1) / base;
  ns = std::clamp<int64_t>(ns, 1, (a.max_keys + kMinChunk - 1) / kMinChunk);
  int64_t chunk = (a.max_keys + ns - 1) / ns;
  chunk = (chunk + 31) / 32 * 32;
  p->chunk = chunk;
  p->nsplit = static_cast<int>((a.max_keys + chunk - 1) / chunk);
  const size_t rh = static_cast<size_t>(a.M) * static_cast<size_t>(a.q_heads);
  size_t off = 0;
  p->off_s = off;
  off = align_up(off + rh * static_cast<size_t>(a.max_keys) * sizeof(float));
  p->off_pm = off;
  off = align_up(off + rh * p->nsplit * sizeof(float));
  p->off_pl = off;
  off = align_up(off + rh * p->nsplit * sizeof(double));
  p->off_p = off;
  if (p->nsplit > 1) off = align_up(off + rh * p->nsplit * static_cast<size_t>(a.head_dim) * sizeof(double));
  p->off_cnt = off;
  if (p->nsplit > 1) off = align_up(off + static_cast<size_t>(base) * sizeof(uint32_t));
  p->bytes = off;
  return true;
}

}  // namespace grokit::kernels::cuda::attn
