// Device code of the prefill attention (attention_prefill.cu launches it) and its plan.
// A block takes 64 query rows x one query head and stages bf16 K/V tiles in shared
// memory; each warp owns 16 rows. Q.K runs on the fp64 tensor cores (mma.sync m8n8k4
// f64): the products of bf16 values are exact in double and so are their sums, so every
// dot is the CPU twin's exact double dot and bf16(q.k) has its bits. W.V runs on the bf16
// tensor cores (m16n8k16, fp32 accumulation). Three passes, so that every softmax term is
// the twin's:
//
//   pass 0  per (row, head, split): the max visible logit x -> stats.x.
//   pass 1  mx = cap * tanh(max x / cap) from every split, exactly as the twin; the sum
//           of the twin's fp32 terms e = exp(s - mx), in double -> stats (bytes 8-15).
//           (An fp32 online sum with tanhf/expf was off by up to ~1e-6 of the sum,
//           enough to flip the bf16 rounding of about one weight in a thousand.)
//   pass 2  w = bf16(e / fp32(sum)), O += W V -> o (bf16) or per-split fp32 partials.
//   combine_splits (nsplit > 1)  o = bf16(sum of the partials).
//
// Grid (q_heads, ceil(M / 64), nsplit), 128 threads; the heads of a tile are adjacent
// blocks (they share K/V through L2) and the tiles with the most keys start first.
// Rows of a tile that use different caches are processed run by run (a run: consecutive
// rows with the same k, v, valid, cap), each run masking the others' rows.
//
// Also compiles as plain C++ (emulable.cuh) for the host emulation in tests: the includer
// then provides, besides what attention_impl.cuh asks, the warp-wide instructions
// gk_emu_ballot(pred), gk_emu_ldsm_x4_trans(r, p), gk_emu_mma_bf16(d, a, b0, b1) and
// gk_emu_mma_f64(d, a, b), with the fragment layouts of the PTX instructions they stand for.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>

#include "kernels/cuda/attention_impl.cuh"
#include "kernels/cuda/widen.h"

namespace grokit::kernels::cuda::attn {
#if !defined(__CUDACC__)
using ::grokit::f32_to_bf16_bits;
#endif
namespace pf {

constexpr int kThreads = 128;
constexpr int kBM = 64;          // query rows per block (16 per warp)
constexpr int kMinChunk = 256;   // keys per split, at least
constexpr size_t kAlign = 256;

GK_HD size_t align_up(size_t x) { return (x + kAlign - 1) / kAlign * kAlign; }

// The plan of one call (PrefillPlan); false when the grid would be too large.
inline bool plan(const Args& a, int sms, PrefillPlan* p) {
  p->dhp = a.head_dim <= 64 ? 64 : a.head_dim <= 128 ? 128 : 256;
  p->tiles = (a.M + kBM - 1) / kBM;
  if (p->tiles > 65535 || a.q_heads > 65535) return false;
  // Split the keys only when the tiles do not fill about two blocks per SM.
  const int64_t base = p->tiles * a.q_heads, target = 2 * static_cast<int64_t>(std::max(sms, 1));
  int64_t ns = base >= target ? 1 : (target + base - 1) / base;
  ns = std::clamp<int64_t>(ns, 1, (a.max_keys + kMinChunk - 1) / kMinChunk);
  int64_t chunk = (a.max_keys + ns - 1) / ns;
  chunk = (chunk + 63) / 64 * 64;  // a multiple of every BN
  p->chunk = chunk;
  p->nsplit = static_cast<int>((a.max_keys + chunk - 1) / chunk);
  const size_t rh = static_cast<size_t>(a.M) * static_cast<size_t>(a.q_heads);
  size_t off = 0;
  p->off_stats = off;
  off = align_up(off + rh * p->nsplit * sizeof(float4));
  p->off_part = off;
  if (p->nsplit > 1) off = align_up(off + rh * p->nsplit * static_cast<size_t>(a.head_dim) * sizeof(float));
  p->bytes = off;
  return true;
}

// DHP: head_dim padded to 64, 128 or 256 (zeros). LD: shared row stride in bf16; the
// 16-byte pad keeps the eight rows of every ldmatrix on distinct banks.
template <int DHP>
struct Cfg {
  static constexpr int BN = DHP <= 128 ? 64 : 32;  // keys per tile
  static constexpr int LD = DHP + 8;
  static constexpr size_t smem(bool pass2) {
    return static_cast<size_t>(kBM + (pass2 ? 2 : 1) * BN) * LD * sizeof(uint16_t);
  }
};

// ---- warp-wide instructions -----------------------------------------------------------

// Bit l set where lane l's pred is true (every lane of the warp calls it).
GK_D uint32_t ballot(bool pred) {
#if defined(__CUDA_ARCH__)
  return __ballot_sync(0xffffffffu, pred);
#elif defined(__CUDACC__)
  return pred;  // host pass of nvcc: never called
#else
  return gk_emu_ballot(pred);
#endif
}
// The index of the lowest set bit of a nonzero word.
GK_D int lowest_bit(uint32_t bits) {
#if defined(__CUDA_ARCH__)
  return __ffs(static_cast<int>(bits)) - 1;
#else
  return __builtin_ctz(bits);
#endif
}
// Four 8x8 b16 matrices from shared memory, transposed: lanes 8i .. 8i + 7 give the row
// addresses of matrix i; r[i] of lane l holds its elements (2 (l % 4), l / 4) and
// (2 (l % 4) + 1, l / 4), the lower in the low half.
GK_D void ldsm_x4_trans(uint32_t (&r)[4], const uint16_t* p) {
#if defined(__CUDA_ARCH__)
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(p));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
#elif defined(__CUDACC__)
  (void)r, (void)p;
#else
  gk_emu_ldsm_x4_trans(r, p);
#endif
}
// d += a * b, m16n8k16, bf16 in, fp32 accumulate. Lane l = 4 g + t holds A (row-major
// 16 x 16) rows g and g + 8, columns 2t, 2t + 1 and 2t + 8, 2t + 9 (a[0]: row g, a[1]:
// row g + 8, a[2]: row g, columns + 8, a[3]: row g + 8, columns + 8); B (16 x 8) rows
// 2t, 2t + 1 (b0) and 2t + 8, 2t + 9 (b1) of column g; D rows g (d[0], d[1]) and g + 8
// (d[2], d[3]), columns 2t, 2t + 1.
GK_D void mma_bf16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__)
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#elif defined(__CUDACC__)
  (void)d, (void)a, (void)b0, (void)b1;
#else
  gk_emu_mma_bf16(d, a, b0, b1);
#endif
}
// d += a * b, m8n8k4, fp64. Lane l = 4 g + t holds A[g][t], B[k = t][n = g] and
// D[g][2t], D[g][2t + 1].
GK_D void mma_f64(double (&d)[2], double a, double b) {
#if defined(__CUDA_ARCH__)
  asm volatile("mma.sync.aligned.m8n8k4.row.col.f64.f64.f64.f64 {%0, %1}, {%2}, {%3}, {%0, %1};\n"
               : "+d"(d[0]), "+d"(d[1])
               : "d"(a), "d"(b));
#elif defined(__CUDACC__)
  (void)d, (void)a, (void)b;
#else
  gk_emu_mma_f64(d, a, b);
#endif
}

// Two bf16-exact floats -> bf16x2 (lo in the low half).
GK_D uint32_t pack_bf16(float lo, float hi) {
  uint32_t l, h;
  std::memcpy(&l, &lo, 4);
  std::memcpy(&h, &hi, 4);
  return (l >> 16) | (h & 0xffff0000u);
}
GK_D uint32_t bf16_pair(float lo, float hi) {
  return static_cast<uint32_t>(f32_to_bf16_bits(lo)) | (static_cast<uint32_t>(f32_to_bf16_bits(hi)) << 16);
}

// S[16 x BN] of this warp = Q[warp rows] . K^T as fp32(exact double dot), the CPU twin's
// dot. Layout of m16n8k16's accumulator (pv_tile's A): lane = 4 * gq + tq; s[nt] holds
// rows gq, gq + 8, keys nt*8 + 2*tq + {0, 1} -- which is also m8n8k4's D layout, one
// mma for rows 0-7 and one for rows 8-15.
template <int DHP>
GK_D void qk_tile(const uint16_t* Qs, const uint16_t* Ks, int warp, int lane, float (&s)[Cfg<DHP>::BN / 8][4]) {
  constexpr int BN = Cfg<DHP>::BN, LD = Cfg<DHP>::LD;
  const int g = lane >> 2, t = lane & 3;
  const uint16_t* q0 = Qs + (warp * 16 + g) * LD + t;
  const uint16_t* q1 = q0 + 8 * LD;
  const uint16_t* k0 = Ks + g * LD + t;
  // k outer, keys inner: each q value is widened once per tile, not once per 8 keys (the
  // widening, not the fp64 mma, bounds this loop). Each key's sum takes k in the same
  // order as before, so the bits are the same.
  double c[BN / 8][2][2];
  GK_UNROLL
  for (int nt = 0; nt < BN / 8; ++nt) c[nt][0][0] = c[nt][0][1] = c[nt][1][0] = c[nt][1][1] = 0.0;
  GK_UNROLL_BY(1)
  for (int kk = 0; kk < DHP / 4; ++kk) {
    const double a0 = widen_bf16(q0[kk * 4]), a1 = widen_bf16(q1[kk * 4]);
    GK_UNROLL
    for (int nt = 0; nt < BN / 8; ++nt) {
      const double b = widen_bf16(k0[nt * 8 * LD + kk * 4]);
      mma_f64(c[nt][0], a0, b);
      mma_f64(c[nt][1], a1, b);
    }
  }
  GK_UNROLL
  for (int nt = 0; nt < BN / 8; ++nt) {
    s[nt][0] = static_cast<float>(c[nt][0][0]);
    s[nt][1] = static_cast<float>(c[nt][0][1]);
    s[nt][2] = static_cast<float>(c[nt][1][0]);
    s[nt][3] = static_cast<float>(c[nt][1][1]);
  }
}

// O[16 x DHP] += W[16 x BN] . V[BN x DHP]; W (bf16-exact floats) in the S layout, which
// is the A layout of m16n8k16 for keys 16*kk .. 16*kk + 15.
template <int DHP>
GK_D void pv_tile(const float (&w)[Cfg<DHP>::BN / 8][4], const uint16_t* Vs, int lane, float (&o)[DHP / 8][4]) {
  constexpr int BN = Cfg<DHP>::BN, LD = Cfg<DHP>::LD;
  const int mi = lane >> 3, ri = lane & 7;
  // B (V row-major = keys x dims), transposed loads: (keys 0-7 | 8-15) x (dims 0-7 | 8-15).
  const uint16_t* va = Vs + ((mi & 1) * 8 + ri) * LD + (mi >> 1) * 8;
  GK_UNROLL
  for (int kk = 0; kk < BN / 16; ++kk) {
    const uint32_t af[4] = {pack_bf16(w[2 * kk][0], w[2 * kk][1]), pack_bf16(w[2 * kk][2], w[2 * kk][3]),
                            pack_bf16(w[2 * kk + 1][0], w[2 * kk + 1][1]),
                            pack_bf16(w[2 * kk + 1][2], w[2 * kk + 1][3])};
    GK_UNROLL
    for (int dp = 0; dp < DHP / 16; ++dp) {
      uint32_t bf[4];
      ldsm_x4_trans(bf, va + kk * 16 * LD + dp * 16);
      mma_bf16(o[2 * dp], af, bf[0], bf[1]);
      mma_bf16(o[2 * dp + 1], af, bf[2], bf[3]);
    }
  }
}

// Rows [0, avail) of a K or V tile from the cache (row stride dh), zeros elsewhere and
// in the padding dims. vec16: dh % 8 == 0 and src 16-byte aligned.
template <int DHP>
GK_D void load_tile(uint16_t* dst, const uint16_t* src, int nrows, int avail, int dh, bool vec16) {
  constexpr int LD = Cfg<DHP>::LD;
  const int tid = static_cast<int>(threadIdx.x);
  if (vec16) {
    constexpr int C = DHP / 8;
    for (int i = tid; i < nrows * C; i += kThreads) {
      const int r = i / C, d = (i % C) * 8;
      uint4 v{0, 0, 0, 0};
      if (r < avail && d < dh) v = *reinterpret_cast<const uint4*>(src + static_cast<int64_t>(r) * dh + d);
      *reinterpret_cast<uint4*>(dst + r * LD + d) = v;
    }
  } else {
    constexpr int C = DHP / 2;
    for (int i = tid; i < nrows * C; i += kThreads) {
      const int r = i / C, d = (i % C) * 2;
      uint32_t v = 0;
      if (r < avail && d < dh) v = *reinterpret_cast<const uint32_t*>(src + static_cast<int64_t>(r) * dh + d);
      *reinterpret_cast<uint32_t*>(dst + r * LD + d) = v;
    }
  }
}

// The first j < vmax with valid[j] != 0, or vmax (block-wide; all threads call it).
GK_D int64_t first_valid(const uint8_t* valid, int64_t vmax, int64_t* red) {
  const int tid = static_cast<int>(threadIdx.x), lane = tid & 31, warp = tid >> 5;
  for (int64_t base = 0; base < vmax; base += kThreads) {
    const int64_t j = base + tid;
    const uint32_t bits = ballot(j < vmax && valid[j] != 0);
    if (lane == 0) red[warp] = bits ? base + warp * 32 + lowest_bit(bits) : vmax;
    GK_SYNC();
    int64_t best = red[0];
    for (int w = 1; w < kThreads / 32; ++w) best = std::min(best, red[w]);
    GK_SYNC();
    if (best < vmax) return best;
  }
  return vmax;
}

// The score rule, per row r and key j (n_r keys, visible end ve_r):
//   j >= n_r                      excluded (-inf: weight 0 even in a row without
//                                 visible keys);
//   j >= ve_r or !valid[j]        masked, -1e30 (weight 0, or 1/n in a row without
//                                 visible keys, mx = -1e30);
//   else                          s = cap * tanh(bf16(q . k) * mult / cap).
// A tile row that is not in the current run has n_r = 0.
// stats[(row * q_heads + head) * nsplit + split]: x = max visible logit (pass 0), bytes
// 8-15 = the split's sum of terms, a double (pass 1).
template <int DHP, int kPass>
GK_KERNEL_MAX(kThreads) prefill_kernel(Args a, PrefillPlan p, float4* __restrict__ stats, float* __restrict__ part) {
  constexpr int BN = Cfg<DHP>::BN, LD = Cfg<DHP>::LD;
  uint16_t* Qs = reinterpret_cast<uint16_t*>(dyn_smem());
  uint16_t* Ks = Qs + kBM * LD;
  uint16_t* Vs = Ks + BN * LD;  // pass 2 only
  constexpr bool kPass2 = kPass == 2;
  GK_SHARED const uint16_t* s_k[kBM];
  GK_SHARED const uint16_t* s_v[kBM];
  GK_SHARED const uint8_t* s_valid[kBM];
  GK_SHARED int64_t s_cap[kBM], s_n[kBM], s_ve[kBM];
  GK_SHARED float s_mx[kBM], s_sum[kBM];
  GK_SHARED int64_t s_red[kThreads / 32];
  GK_SHARED uint8_t s_ok[BN];

  const int tid = static_cast<int>(threadIdx.x), warp = tid >> 5, lane = tid & 31, gq = lane >> 2, tq = lane & 3;
  const int h = static_cast<int>(blockIdx.x), kvh = h / a.group, dh = a.head_dim, split = static_cast<int>(blockIdx.z);
  const int64_t r0 = (static_cast<int64_t>(gridDim.y) - 1 - blockIdx.y) * kBM;
  const int rows_here = static_cast<int>(std::min<int64_t>(kBM, a.M - r0));
  const float mult = a.multiplier, cap = a.cap;

  if (tid < kBM) {
    if (tid < rows_here) {
      const GrokitAttnRow r = a.rows[r0 + tid];
      if (h == 0 && split == 0 && row_out_of_contract(r, a.max_keys)) raise_device_error(a.errors, GROKIT_DEVERR_ATTN_ROW);
      const int64_t n = row_keys(r, a.max_keys);
      s_k[tid] = r.k;
      s_v[tid] = r.v;
      s_valid[tid] = r.valid;
      s_cap[tid] = r.cap;
      s_n[tid] = n;
      s_ve[tid] = row_visible_end(r, n);
    } else {
      s_k[tid] = nullptr;
      s_v[tid] = nullptr;
      s_valid[tid] = nullptr;
      s_cap[tid] = 0;
      s_n[tid] = 0;
      s_ve[tid] = 0;
    }
  }
  // Q tile as bf16 (exact for bf16 values); rows past M and dims past dh are zero.
  for (int i = tid; i < kBM * (DHP / 2); i += kThreads) {
    const int r = i / (DHP / 2), d = (i % (DHP / 2)) * 2;
    uint32_t v = 0;
    if (r < rows_here && d < dh) {
      const float2 x = *reinterpret_cast<const float2*>(a.q + ((r0 + r) * a.q_heads + h) * dh + d);
      v = bf16_pair(x.x, x.y);
    }
    *reinterpret_cast<uint32_t*>(Qs + r * LD + d) = v;
  }
  GK_SYNC();

  for (int rs = 0; rs < rows_here;) {
    // The run [rs, re): every thread finds the same one.
    int re = rs + 1;
    while (re < rows_here && s_k[re] == s_k[rs] && s_v[re] == s_v[rs] && s_valid[re] == s_valid[rs] &&
           s_cap[re] == s_cap[rs])
      ++re;
    const uint8_t* valid = s_valid[rs];
    int64_t vmax = 0;
    for (int r = rs; r < re; ++r) vmax = std::max(vmax, s_ve[r]);
    // A row has a visible key iff the first valid key is before its visible end; rows
    // without one need all their n keys (uniform weights), the others only [0, ve).
    const int64_t fv = first_valid(valid, vmax, s_red);
    int64_t kend = 0;
    for (int r = rs; r < re; ++r) kend = std::max(kend, fv < s_ve[r] ? s_ve[r] : s_n[r]);
    const int64_t ks = split * p.chunk, ke = std::min(ks + p.chunk, kend);

    if constexpr (kPass > 0) {
      if (tid >= rs && tid < re) {
        const float4* st = stats + ((r0 + tid) * a.q_heads + h) * p.nsplit;
        float mxx = neg_inf_f();
        for (int s = 0; s < p.nsplit; ++s) mxx = fmaxf(mxx, st[s].x);
        const float mx = mxx == neg_inf_f() ? kMasked : cap_logit(mxx, cap);
        s_mx[tid] = mx;
        if constexpr (kPass2) {
          double sum = 0.0;
          for (int s = 0; s < p.nsplit; ++s) sum += reinterpret_cast<const double*>(st + s)[1];
          s_sum[tid] = final_sum(sum, mx);
        }
      }
    }
    GK_SYNC();

    // This thread's two rows: warp * 16 + gq + 8 * i.
    int64_t rn[2], rve[2];
    float rmx[2] = {0.0f, 0.0f}, rsum[2] = {0.0f, 0.0f};
    GK_UNROLL
    for (int i = 0; i < 2; ++i) {
      const int r = warp * 16 + gq + 8 * i;
      const bool in = r >= rs && r < re;
      rn[i] = in ? s_n[r] : 0;
      rve[i] = in ? s_ve[r] : 0;
      if constexpr (kPass > 0) rmx[i] = in ? s_mx[r] : 0.0f;
      if constexpr (kPass2) rsum[i] = in ? s_sum[r] : 0.0f;
    }
    const bool warp_on = warp * 16 < re && warp * 16 + 16 > rs;
    float mxx[2] = {neg_inf_f(), neg_inf_f()};
    double esum[2] = {0.0, 0.0};
    float o[DHP / 8][4];
    GK_UNROLL
    for (int i = 0; i < DHP / 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.0f;

    const uint16_t* kbase = s_k[rs] + static_cast<int64_t>(kvh) * s_cap[rs] * dh;
    const uint16_t* vbase = s_v[rs] + static_cast<int64_t>(kvh) * s_cap[rs] * dh;
    const bool vec16 = dh % 8 == 0 && (reinterpret_cast<uintptr_t>(kbase) & 15) == 0 &&
                       (!kPass2 || (reinterpret_cast<uintptr_t>(vbase) & 15) == 0);

    // Tiles lie inside the split (chunk % BN == 0); keys >= kend are zero and masked.
    for (int64_t kb = ks; kb < ke; kb += BN) {
      const int avail = static_cast<int>(std::min<int64_t>(BN, kend - kb));
      GK_SYNC();  // the previous tile is consumed
      load_tile<DHP>(Ks, kbase + kb * dh, BN, avail, dh, vec16);
      if constexpr (kPass2) load_tile<DHP>(Vs, vbase + kb * dh, BN, avail, dh, vec16);
      if (tid < BN) s_ok[tid] = tid < avail ? valid[kb + tid] : 0;
      GK_SYNC();
      if (!warp_on) continue;

      float sc[BN / 8][4];
      qk_tile<DHP>(Qs, Ks, warp, lane, sc);
      GK_UNROLL
      for (int nt = 0; nt < BN / 8; ++nt) {
        GK_UNROLL
        for (int e = 0; e < 4; ++e) {
          const int i = e >> 1, jt = nt * 8 + 2 * tq + (e & 1);
          const int64_t j = kb + jt;
          const bool live = j < rn[i];
          const bool vis = live && j < rve[i] && s_ok[jt] != 0;
          if constexpr (kPass == 0) {
            if (vis) mxx[i] = fmaxf(mxx[i], logit_x(sc[nt][e], mult));
          } else if constexpr (kPass == 1) {
            // The twin's term: a masked key's score is kMasked, whose term is 1 in a row
            // without visible keys (mx = kMasked) and 0 otherwise.
            if (vis) {
              esum[i] += static_cast<double>(softmax_num(cap_logit(logit_x(sc[nt][e], mult), cap), rmx[i]));
            } else if (live && rmx[i] == kMasked) {
              esum[i] += 1.0;
            }
          } else {
            float w = 0.0f;
            if (vis) {
              w = softmax_weight(softmax_num(cap_logit(logit_x(sc[nt][e], mult), cap), rmx[i]), rsum[i]);
            } else if (live && rmx[i] == kMasked) {
              w = softmax_weight(1.0f, rsum[i]);  // no visible key: exp(-1e30 - -1e30) = 1
            }
            sc[nt][e] = w;
          }
        }
      }
      if constexpr (kPass2) pv_tile<DHP>(sc, Vs, lane, o);
    }

    // Results of the run's rows (every row of the run, also without keys in this split).
    GK_UNROLL
    for (int i = 0; i < 2; ++i) {
      const int r = warp * 16 + gq + 8 * i;
      const bool in = r >= rs && r < re;
      const int64_t rh = (r0 + r) * a.q_heads + h;
      if constexpr (kPass == 0) {
        for (int off = 1; off < 4; off <<= 1) mxx[i] = fmaxf(mxx[i], shfl_xor(mxx[i], off));
        if (in && tq == 0) stats[rh * p.nsplit + split] = float4{mxx[i], 0.0f, 0.0f, 0.0f};
      } else if constexpr (kPass == 1) {
        for (int off = 1; off < 4; off <<= 1) esum[i] += shfl_xor(esum[i], off);
        // Bytes 8-15 only: other blocks read x of this split meanwhile.
        if (in && tq == 0) reinterpret_cast<double*>(stats + rh * p.nsplit + split)[1] = esum[i];
      } else if (in) {
        GK_UNROLL
        for (int nt = 0; nt < DHP / 8; ++nt) {
          const int d = nt * 8 + 2 * tq;
          if (d < dh) {
            const float2 v{o[nt][2 * i], o[nt][2 * i + 1]};
            if (p.nsplit == 1) {
              *reinterpret_cast<float2*>(a.o + rh * dh + d) = float2{round_bf16(v.x), round_bf16(v.y)};
            } else {
              *reinterpret_cast<float2*>(part + (rh * p.nsplit + split) * dh + d) = v;
            }
          }
        }
      }
    }
    rs = re;
    GK_SYNC();
  }
}

// o[i] = bf16(fp32(sum over splits of part)), the split partials summed in double.
// part: [rows * heads, nsplit, dh]; o: [rows * heads, dh] (total elements). Grid-stride,
// 256 threads a block.
constexpr int kCombineThreads = 256;
GK_KERNEL_MAX(kCombineThreads) combine_splits(const float* __restrict__ part, int64_t total, int dh, int nsplit,
                                                float* __restrict__ o) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kCombineThreads + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * kCombineThreads) {
    const int64_t rh = i / dh;
    const float* q = part + rh * nsplit * dh + (i - rh * dh);
    double t = 0.0;
    for (int s = 0; s < nsplit; ++s) t += static_cast<double>(q[static_cast<int64_t>(s) * dh]);
    o[i] = round_bf16(static_cast<float>(t));
  }
}

}  // namespace pf
}  // namespace grokit::kernels::cuda::attn
