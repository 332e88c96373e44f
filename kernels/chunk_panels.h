// What the chunked layouts' products (q4g, f8col; SPEC.md §4.1) share: their driver
// (run_chunked, at the end), the skeletons of their decode walks, and their prefill, the
// panels. In those layouts a column's 32-row chunk decodes to one vector of 32 bf16
// weights and each (row of x, column) keeps 16 fp32 lanes, halved at the end of a chain.
// Each layout's file supplies only the decode of a chunk. The decode walks
// (groups_avx512) decode every chunk again for each block of at most 4 rows of x. A
// panel of 8 columns by up to 32 chunks is decoded once into L1 for a block of 64 rows of
// x, which then run down it two at a time with their 16 sums in registers: per (row of x,
// column) the same instruction sequence in chunk order as the walks, so the same bits.
#pragma once

#include <algorithm>
#include <vector>

#include "kernels/internal.h"

// GCC 12's avx512fintrin.h trips -Wmaybe-uninitialized on its own _mm512_undefined values.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace grokit::kernels::detail {

// The 16 lane sums of 16 accumulators at once, each halved (lane i += lane i+8, +4, +2,
// +1): sum[t] = halving of a[t]. Each level adds a blend of two vectors to a shuffle of
// the same two, so that it pairs the right lanes; the columns end up permuted, undone
// at the end.
GROKIT_AVX512 inline __m512 halve16(const __m512* a) {
  __m512 b[8], c[4], d[2];
  const __m512i quarters = _mm512_setr_epi32(4, 5, 6, 7, 16, 17, 18, 19, 12, 13, 14, 15, 24, 25, 26, 27);
  for (int i = 0; i < 8; ++i)  // [a.lo, b.hi] + [a.hi, b.lo]
    b[i] = _mm512_add_ps(_mm512_mask_blend_ps(0xff00, a[2 * i], a[2 * i + 1]), _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0x4e));
  for (int i = 0; i < 4; ++i)
    c[i] = _mm512_add_ps(_mm512_mask_blend_ps(0xf0f0, b[2 * i], b[2 * i + 1]), _mm512_permutex2var_ps(b[2 * i], quarters, b[2 * i + 1]));
  for (int i = 0; i < 2; ++i)
    d[i] = _mm512_add_ps(_mm512_mask_blend_ps(0xcccc, c[2 * i], c[2 * i + 1]), _mm512_shuffle_ps(c[2 * i], c[2 * i + 1], 0x4e));
  const __m512 e = _mm512_add_ps(_mm512_shuffle_ps(d[0], d[1], 0x88), _mm512_shuffle_ps(d[0], d[1], 0xdd));
  // e holds the sums of a[0, 4, 8, 12, 2, 6, 10, 14, 1, 5, 9, 13, 3, 7, 11, 15].
  return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 8, 4, 12, 1, 9, 5, 13, 2, 10, 6, 14, 3, 11, 7, 15), e);
}

// ---------------------------------------------------------------------------------
// The decode walks.

// Scalar twin (the definition): chain [ch0, ch1) (chunks) of columns [c0, c1) into out
// ([M][ld], column c0 at out[0]). decode(c, n, w) gives chunk c of column n as 32
// bf16-rounded weights, w[r] = row r. Lane i adds rows 2i + 1 then 2i (pairs), or fmas
// rows i then 16 + i (fp32).
template <bool kPairs, class Decode>
void chunk_chain_ref(const float* x, int64_t M, int64_t ldx, int64_t ch0, int64_t ch1, int64_t c0, int64_t c1,
                     float* out, int64_t ld, const Decode& decode) {
  std::vector<float> lanes(static_cast<size_t>(16 * M));
  for (int64_t n = c0; n < c1; ++n) {
    std::fill(lanes.begin(), lanes.end(), 0.0f);
    for (int64_t c = ch0; c < ch1; ++c) {
      float w[32];
      decode(c, n, w);
      for (int64_t m = 0; m < M; ++m) {
        const float* xc = x + m * ldx + 32 * c;
        float* l = lanes.data() + 16 * m;
        for (int i = 0; i < 16; ++i) {
          if (kPairs) {
            l[i] = l[i] + xc[2 * i + 1] * w[2 * i + 1];
            l[i] = l[i] + xc[2 * i] * w[2 * i];
          } else {
            l[i] = std::fma(xc[i], w[i], l[i]);
            l[i] = std::fma(xc[16 + i], w[16 + i], l[i]);
          }
        }
      }
    }
    for (int64_t m = 0; m < M; ++m) out[m * ld + (n - c0)] = halve16_lanes(lanes.data() + 16 * m);
  }
}

// AVX2. Each layout's file supplies a chunk decoder type Dec (chunk_decoder_avx2<kPairs>(L),
// found by argument-dependent lookup on its Layout type), with
//   Dec::begin(L, n, c, st): column n's state st (a Dec::State) set up for chunk c, where
//     a walk starts and where Dec::new_group(L, c) says the chunk starts a scale group;
//   Dec::decode(L, n, c, st, w): chunk c of column n as four vectors of 8 bf16-rounded
//     weights in fp32 lanes;
//   Dec::kX[s]: where slot s's 8 values of x start in the chunk's 32 staged ones (its
//     stage_x_avx2 arranges x to match): a column's 16 sums are two vectors, A taking
//     slots 0 then 1 of each chunk, B slots 2 then 3, which is the pinned lane order;
//   Dec::halve(A, B): the halving sum of the 16 lanes.
//   Dec::kColumnBytes: the bytes of one column in a chunk (a chunk's columns lie side
//     by side, so NC columns are NC * kColumnBytes contiguous bytes).
// The walk takes NC columns side by side (one row of x 8, two rows 2, more rows one
// column, up to 4 rows at a time): one column's fma chain alone waits on the fma latency
// (measured: int4 decode 4.4 against 2.6 GB/s, one core). pf_n >= 0: the first column
// of a walk the caller makes later (two walks ahead), whose bytes in each chunk are
// prefetched as this walk passes that chunk: a chain of many chunks is as many streams,
// each 16 or 32 bytes per column wide and in its own 4 KiB page of a mapped file, more
// than the hardware prefetchers follow (the real-width expert down, 64-chunk chains:
// int4 2.5 -> 5.1-5.5 GB/s, fp8 6.3 -> 9.5-10.7 on two threads).
template <int MB, int NC, bool kPairs, class Layout>
GROKIT_AVX2 void column_walk_avx2(const float* xa, int64_t K, const Layout& L, int64_t ch0, int64_t ch1, int64_t n,
                                  float* out, int64_t ld, int64_t pf_n = -1) {
  using Dec = decltype(chunk_decoder_avx2<kPairs>(L));
  constexpr auto kX = Dec::kX;
  constexpr int kBytes = NC * Dec::kColumnBytes;
  typename Dec::State st[NC];
  __m256 A[MB][NC], B[MB][NC];
  for (int mm = 0; mm < MB; ++mm)
    for (int j = 0; j < NC; ++j) A[mm][j] = B[mm][j] = _mm256_setzero_ps();
  for (int64_t c = ch0; c < ch1; ++c) {
    if (pf_n >= 0) {
      const char* p = reinterpret_cast<const char*>(L.chunk(c, pf_n));
      for (int b = 0; b < kBytes; b += 64) _mm_prefetch(p + b, _MM_HINT_T0);
      _mm_prefetch(p + kBytes - 1, _MM_HINT_T0);
    }
    if (c == ch0 || Dec::new_group(L, c))
      for (int j = 0; j < NC; ++j) Dec::begin(L, n + j, c, st[j]);
    for (int j = 0; j < NC; ++j) {
      __m256 w[4];
      Dec::decode(L, n + j, c, st[j], w);
      for (int mm = 0; mm < MB; ++mm) {
        const float* xp = xa + mm * K + 32 * c;
        A[mm][j] = _mm256_fmadd_ps(_mm256_loadu_ps(xp + kX[1]), w[1], _mm256_fmadd_ps(_mm256_loadu_ps(xp + kX[0]), w[0], A[mm][j]));
        B[mm][j] = _mm256_fmadd_ps(_mm256_loadu_ps(xp + kX[3]), w[3], _mm256_fmadd_ps(_mm256_loadu_ps(xp + kX[2]), w[2], B[mm][j]));
      }
    }
  }
  for (int mm = 0; mm < MB; ++mm)
    for (int j = 0; j < NC; ++j) out[mm * ld + j] = Dec::halve(A[mm][j], B[mm][j]);
}

// AVX2 panels (prefill): three columns' chunks of one chain decoded once into L1, then
// the rows of x run down them three at a time, in two passes: the sums A (slots 0 then 1
// of each chunk), then the sums B (slots 2 then 3). Each pass keeps 9 sums, 3 vectors of x
// and 3 of weights in registers, two loads per three fmas. Each sum adds the same products
// in the same order as the walk, so the same bits. Chains up to kChunkPanelAvx2Chunks
// chunks.
// The rows' x comes from L2 once many rows no longer fit L1, so the panels are laid out
// for few reads of it: several column triples are decoded at once (up to
// kChunkPanelAvx2Bytes of panels) and each row triple runs down all of them; a chain
// longer than kChunkPanelAvx2Tile chunks goes by tiles of that many, its sums parked
// between tiles (a row triple's x for one tile, 6 KiB, stays in L1 next to the panels).
// At 256 rows the triple-at-a-time order over whole chains was bound by L2.
constexpr int64_t kChunkPanelAvx2Chunks = 64;
constexpr int kChunkPanelAvx2Columns = 3;
constexpr int kChunkPanelAvx2Triples = 8;            // column triples decoded together, at most
constexpr int64_t kChunkPanelAvx2Bytes = 20 << 10;  // their panels' bytes, at most (L1)
constexpr int64_t kChunkPanelAvx2Tile = 16;          // chunks per tile of a longer chain
inline int64_t chunk_panels_avx2_min_rows() { return 6; }
// acc[r][j] += the products of rows [0, R) of x (xa, rows K apart) over slots s0 then
// s0 + 1 of chunks [c0, c0 + steps) of the panel's columns (panel[t][j]: chunk c0 + t of
// column j).
template <int R, class Dec>
GROKIT_AVX2 __attribute__((always_inline)) inline void chunk_panel_pass_avx2(
    const float* xa, int64_t K, const __m256 (*panel)[kChunkPanelAvx2Columns][4], int64_t c0, int64_t steps, int s0,
    __m256 (&acc)[R][kChunkPanelAvx2Columns]) {
  constexpr int NC = kChunkPanelAvx2Columns;
  constexpr auto kX = Dec::kX;
  for (int64_t t = 0; t < steps; ++t) {
    const float* xp = xa + 32 * (c0 + t);
    for (int s = s0; s < s0 + 2; ++s) {
      __m256 xv[R], wv[NC];
      for (int r = 0; r < R; ++r) xv[r] = _mm256_loadu_ps(xp + r * K + kX[s]);
      for (int j = 0; j < NC; ++j) wv[j] = panel[t][j][s];
      for (int r = 0; r < R; ++r)
        for (int j = 0; j < NC; ++j) acc[r][j] = _mm256_fmadd_ps(xv[r], wv[j], acc[r][j]);
    }
  }
}
// One tile [c0, c0 + steps) of a chain for rows [0, R) and one column triple: the sums
// start from zero (first) or from park, and end in out (last) or in park. park: row r's
// sums at park + r * park_ld floats, A of column j at [16j], B at [16j + 8].
template <int R, bool kPairs, class Dec>
GROKIT_AVX2 inline void chunk_panel_rows_avx2(const float* xa, int64_t K,
                                             const __m256 (*panel)[kChunkPanelAvx2Columns][4], int64_t c0,
                                             int64_t steps, bool first, bool last, float* park, int64_t park_ld,
                                             int nc, float* out, int64_t ld) {
  constexpr int NC = kChunkPanelAvx2Columns;
  __m256 A[R][NC], B[R][NC];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < NC; ++j) A[r][j] = first ? _mm256_setzero_ps() : _mm256_loadu_ps(park + r * park_ld + 16 * j);
  chunk_panel_pass_avx2<R, Dec>(xa, K, panel, c0, steps, 0, A);
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < NC; ++j)
      B[r][j] = first ? _mm256_setzero_ps() : _mm256_loadu_ps(park + r * park_ld + 16 * j + 8);
  chunk_panel_pass_avx2<R, Dec>(xa, K, panel, c0, steps, 2, B);
  if (last) {
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < nc; ++j) out[r * ld + j] = Dec::halve(A[r][j], B[r][j]);
    return;
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < NC; ++j) {
      _mm256_storeu_ps(park + r * park_ld + 16 * j, A[r][j]);
      _mm256_storeu_ps(park + r * park_ld + 16 * j + 8, B[r][j]);
    }
}
// Chain [ch0, ch1) (at most kChunkPanelAvx2Chunks chunks) of columns [c0, c1), every row
// of x (xa staged, [M][K]), into out ([M][ld], column c0 at out[0]).
template <bool kPairs, class Layout>
GROKIT_AVX2 void chunk_panels_avx2(const float* xa, int64_t M, int64_t K, const Layout& L, int64_t ch0, int64_t ch1,
                                   int64_t c0, int64_t c1, float* out, int64_t ld) {
  using Dec = decltype(chunk_decoder_avx2<kPairs>(L));
  constexpr int NC = kChunkPanelAvx2Columns;
  using Panel = __m256[NC][4];  // one chunk of a column triple
  GROKIT_CHECK(ch1 > ch0 && ch1 - ch0 <= kChunkPanelAvx2Chunks);
  const int64_t tile = std::min(ch1 - ch0, kChunkPanelAvx2Tile);
  // Triples per block: as many as kChunkPanelAvx2Bytes holds at the tile's length.
  const int64_t per_block = std::clamp<int64_t>(kChunkPanelAvx2Bytes / (tile * static_cast<int64_t>(sizeof(Panel))), 1,
                                                kChunkPanelAvx2Triples);
  // per_block * tile chunks: at most max(kChunkPanelAvx2Bytes / sizeof(Panel), tile).
  static_assert(kChunkPanelAvx2Bytes / sizeof(Panel) <= kChunkPanelAvx2Chunks);
  alignas(32) Panel panel[kChunkPanelAvx2Chunks];
  // Parked sums (chains of several tiles): [M][per_block][NC][A, B] of 8 floats, kept by
  // the thread.
  const int64_t park_ld = per_block * NC * 16;
  thread_local std::vector<float> parked;
  if (tile < ch1 - ch0 && parked.size() < static_cast<size_t>(M * park_ld))
    parked.resize(static_cast<size_t>(M * park_ld));
  for (int64_t b0 = c0; b0 < c1; b0 += per_block * NC) {
    const int64_t b1 = std::min(c1, b0 + per_block * NC), triples = (b1 - b0 + NC - 1) / NC;
    for (int64_t t0 = ch0; t0 < ch1; t0 += tile) {
      const int64_t steps = std::min(tile, ch1 - t0);
      const bool first = t0 == ch0, last = t0 + steps == ch1;
      for (int64_t tr = 0; tr < triples; ++tr) {
        const int64_t n = b0 + tr * NC;
        const int nc = static_cast<int>(std::min<int64_t>(NC, b1 - n));
        Panel* pt = panel + tr * tile;
        for (int j = 0; j < NC; ++j) {
          if (j >= nc) {  // the last columns' missing partners
            for (int64_t t = 0; t < steps; ++t)
              for (int s = 0; s < 4; ++s) pt[t][j][s] = _mm256_setzero_ps();
            continue;
          }
          typename Dec::State st;
          for (int64_t t = 0; t < steps; ++t) {
            if (t == 0 || Dec::new_group(L, t0 + t)) Dec::begin(L, n + j, t0 + t, st);
            Dec::decode(L, n + j, t0 + t, st, pt[t][j]);
          }
        }
      }
      // Each row triple (then each remaining row) down every triple of the block.
      auto rows = [&](auto r, int64_t m) GROKIT_AVX2_INLINE_LAMBDA {
        for (int64_t tr = 0; tr < triples; ++tr) {
          const int64_t n = b0 + tr * NC;
          const int nc = static_cast<int>(std::min<int64_t>(NC, b1 - n));
          float* park = first && last ? nullptr : parked.data() + m * park_ld + tr * NC * 16;
          chunk_panel_rows_avx2<decltype(r)::value, kPairs, Dec>(xa + m * K, K, panel + tr * tile, t0, steps, first,
                                                                 last, park, park_ld, nc, out + (n - c0) + m * ld, ld);
        }
      };
      int64_t m = 0;
      for (; m + 3 <= M; m += 3) rows(std::integral_constant<int, 3>{}, m);
      for (; m < M; ++m) rows(std::integral_constant<int, 1>{}, m);
    }
  }
}

// The halving sum of the 16 lanes of (A, B).
template <bool kPairs>
GROKIT_AVX2 inline float chunk_halve_avx2(__m256 a, __m256 b) {
  if (!kPairs) {  // to lane order: [a0 b0 a1 b1 ..], [a4 b4 ..]
    const __m256 lo = _mm256_unpacklo_ps(a, b), hi = _mm256_unpackhi_ps(a, b);
    a = _mm256_permute2f128_ps(lo, hi, 0x20);
    b = _mm256_permute2f128_ps(lo, hi, 0x31);
  }
  const __m256 v8 = _mm256_add_ps(a, b);
  const __m128 v4 = _mm_add_ps(_mm256_castps256_ps128(v8), _mm256_extractf128_ps(v8, 1));
  const __m128 v2 = _mm_add_ps(v4, _mm_movehl_ps(v4, v4));
  return _mm_cvtss_f32(_mm_add_ss(v2, _mm_shuffle_ps(v2, v2, 1)));
}

// AVX-512 with bf16 instructions: a column group of NC columns and MB rows of x keeps
// NC * MB <= 16 accumulators (16 lanes each) in registers while the chain's chunks stream
// by. Per column and chunk the layout decodes 32 bf16 weights, which chunk_add adds to
// the sums.
constexpr int64_t kWalkPrefetchAhead = 12;  // (column group, chunk) steps a walk fetches ahead
constexpr int64_t kWalkChainChunks = 16;    // longest chain (in chunks) a walk keeps whole in registers
constexpr int64_t kWalkTileChunks = 8;      // chunks per pass of a longer chain
constexpr int64_t kWalkParkColumns = 256;   // columns (times rows of x) whose sums a tiled walk parks in L1

// x at one chunk for rows [m0, m0 + MB): bf16 bits (pairs), or fp32 rows 0..15 and 16..31.
template <int MB, bool kPairs>
struct ChunkX {
  __m512i xv[MB];
  __m512 x0[MB], x1[MB];
  GROKIT_AVX512 __attribute__((always_inline)) ChunkX(const uint16_t* xb, int64_t K, const float* x, int64_t ldx,
                                                       int64_t m0, int64_t c) {
    for (int mm = 0; mm < MB; ++mm) {
      if (kPairs) {
        xv[mm] = _mm512_loadu_si512(xb + (m0 + mm) * K + 32 * c);
      } else {
        x0[mm] = _mm512_loadu_ps(x + (m0 + mm) * ldx + 32 * c);
        x1[mm] = _mm512_loadu_ps(x + (m0 + mm) * ldx + 32 * c + 16);
      }
    }
  }
};
// acc[.][j] += a chunk's weights w times x: pairs (word r = row r) by vdpbf16ps, fp32
// (word 2i = row i, word 2i + 1 = row 16 + i) by two fmas.
template <int MB, int NC, bool kPairs>
GROKIT_AVX512 __attribute__((always_inline)) inline void chunk_add(__m512 (&acc)[MB][NC], int j, __m512i w,
                                                                  const ChunkX<MB, kPairs>& xc) {
  if (kPairs) {
    for (int mm = 0; mm < MB; ++mm)
      acc[mm][j] = _mm512_dpbf16_ps(acc[mm][j], reinterpret_cast<__m512bh>(w), reinterpret_cast<__m512bh>(xc.xv[mm]));
  } else {
    const __m512 we = _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
    const __m512 wo = _mm512_castsi512_ps(_mm512_and_si512(w, _mm512_set1_epi32(static_cast<int>(0xffff0000u))));
    for (int mm = 0; mm < MB; ++mm) acc[mm][j] = _mm512_fmadd_ps(xc.x1[mm], wo, _mm512_fmadd_ps(xc.x0[mm], we, acc[mm][j]));
  }
}

// A walk's prefetch cursor: kWalkPrefetchAhead (column group, chunk) steps ahead of the
// walk over chunks [t0, t1) of columns [.., b1), in groups of NC.
template <int NC>
struct WalkPrefetch {
  int64_t pc, pn, t0, t1, b1;
  WalkPrefetch(int64_t t0_, int64_t t1_, int64_t b0, int64_t b1_)
      : pc(t0_ + kWalkPrefetchAhead % (t1_ - t0_)), pn(b0 + kWalkPrefetchAhead / (t1_ - t0_) * NC), t0(t0_), t1(t1_),
        b1(b1_) {}
  // One step: fetch(c, n, first) requests chunk c of the group at column n (first: c is
  // the tile's first chunk).
  template <class Fetch>
  GROKIT_AVX512 __attribute__((always_inline)) void step(const Fetch& fetch) {
    if (pn < b1) fetch(pc, pn, pc == t0);
    if (++pc == t1) {
      pc = t0;
      pn += NC;
    }
  }
};

// Rows [m0, m0 + MB) of x, columns [c0, c1) in groups of NC, chunks [ch0, ch1) of one
// chain into out ([M][ld], column c0 at out[0]). A chain of up to kWalkChainChunks chunks
// is walked group by group with the whole chain in registers; a longer one in tiles of
// kWalkTileChunks chunks over blocks of columns, the sums parked in L1 between tiles, so
// that the walk reads a few long runs instead of many short ones.
// tile(acc, t0, t1, n0, nc, prefetch, restart), the layout's part: adds chunks [t0, t1)
// of the group at n0 (nc live columns, the rest of the NC to be read as zeros) to acc,
// stepping prefetch once per chunk; restart() puts acc back as the tile got it.
template <int NC, int MB, class Tile>
GROKIT_AVX512 __attribute__((always_inline)) inline void chunk_walk_avx512(int64_t m0, int64_t ch0, int64_t ch1,
                                                                          int64_t c0, int64_t c1, float* out, int64_t ld,
                                                                          const Tile& tile) {
  static_assert(NC * MB <= 16 && NC <= 16);
  alignas(64) float park[kWalkParkColumns * 16];  // [column group][MB][NC][16 lanes]
  const int64_t tile_chunks = ch1 - ch0 <= kWalkChainChunks ? ch1 - ch0 : kWalkTileChunks;
  const int64_t block = tile_chunks == ch1 - ch0 ? c1 - c0 : kWalkParkColumns / (MB * NC) * NC;
  for (int64_t b0 = c0; b0 < c1; b0 += block) {
    const int64_t b1 = std::min(c1, b0 + block);
    for (int64_t t0 = ch0; t0 < ch1; t0 += tile_chunks) {
      const int64_t t1 = std::min(ch1, t0 + tile_chunks);
      WalkPrefetch<NC> prefetch(t0, t1, b0, b1);
      for (int64_t n0 = b0; n0 < b1; n0 += NC) {
        const int nc = static_cast<int>(std::min<int64_t>(NC, b1 - n0));
        // Sums are parked only when the chain is walked in tiles; a chain in registers walks
        // all of [c0, c1) as one block, past the park's end, so it points nowhere else.
        float* parked = tile_chunks == ch1 - ch0 ? park : park + (n0 - b0) / NC * (MB * NC * 16);
        __m512 acc[MB][NC];
        auto restart = [&]() GROKIT_AVX512_INLINE_LAMBDA {
          for (int mm = 0; mm < MB; ++mm)
            for (int j = 0; j < NC; ++j)
              acc[mm][j] = t0 == ch0 ? _mm512_setzero_ps() : _mm512_load_ps(parked + (mm * NC + j) * 16);
        };
        restart();
        tile(acc, t0, t1, n0, nc, prefetch, restart);
        if (t1 < ch1) {
          for (int mm = 0; mm < MB; ++mm)
            for (int j = 0; j < NC; ++j) _mm512_store_ps(parked + (mm * NC + j) * 16, acc[mm][j]);
          continue;
        }
        __m512 all[16];
        for (int t = 0; t < 16; ++t) all[t] = t < NC * MB ? acc[t / NC][t % NC] : _mm512_setzero_ps();
        const __m512 sums = halve16(all);
        if (MB == 1) {
          _mm512_mask_storeu_ps(out + m0 * ld + (n0 - c0), static_cast<__mmask16>((1u << nc) - 1), sums);
        } else {
          alignas(64) float s[16];
          _mm512_store_ps(s, sums);
          for (int mm = 0; mm < MB; ++mm)
            for (int j = 0; j < nc; ++j) out[(m0 + mm) * ld + (n0 - c0) + j] = s[mm * NC + j];
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------
// The panels.

// From this many rows of x on, products take the panels (measured against the decode
// walks, K 1024 and 6144, two threads: bf16 x gains from 8 rows on, fp32 x from 12).
inline int64_t chunk_panels_min_rows(bool pairs) { return pairs ? 8 : 12; }
// A panel's 8 columns times the 2 rows of x run down it at a time: 16 sums in registers
// (4 x 4 for fp32 x, sharing each panel load among more rows, measured no faster).
constexpr int kChunkPanelColumns = 8;
constexpr int64_t kChunkPanelRows = 64;   // rows of x per panel decode
constexpr int64_t kChunkPanelBytes = 16384;  // a panel's decoded weights (L1)

// Rows [m, m + R) of x down panel rows [0, steps) (chunk t0 first), the sums started from
// zero (first) or from park; left in park (more chunks of the chain follow: returns zero)
// or returned halved (row m + r, column j in lane 8 r + j). The panel: pairs, one vector
// per column and chunk (word r = row r) for vdpbf16ps (V = 1) or two for fmas (V = 2:
// rows 2i and 2i + 1 of lane i as fp32); fp32 x, two (rows i and 16 + i of lane i).
// Every form adds the same products in the same order, so every form gets the same bits.
template <int R, bool kPairs, int64_t V>
GROKIT_AVX512 __attribute__((always_inline)) inline __m512 chunk_panel_block(
    const __m512i (*panel)[kChunkPanelColumns][V], int64_t steps, const uint16_t* xb, int64_t K, const float* x,
    int64_t ldx, int64_t m, int64_t t0, __m512* park, bool first, bool last) {
  constexpr int NC = kChunkPanelColumns;
  static_assert(R * NC <= 16 && NC == 8);
  __m512 acc[R][NC];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < NC; ++j) acc[r][j] = first ? _mm512_setzero_ps() : park[r * NC + j];
  for (int64_t t = 0; t < steps; ++t) {
    if constexpr (kPairs && V == 2) {
      // By fmas: x's pairs split like the panel's, row 2i + 1 added first, then row 2i.
      const __m512i high = _mm512_set1_epi32(static_cast<int>(0xffff0000u));
      __m512 xe[R], xo[R];
      for (int r = 0; r < R; ++r) {
        const __m512i v = _mm512_loadu_si512(xb + (m + r) * K + 32 * (t0 + t));
        xe[r] = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
        xo[r] = _mm512_castsi512_ps(_mm512_and_si512(v, high));
      }
      for (int j = 0; j < NC; ++j)
        for (int r = 0; r < R; ++r)
          acc[r][j] = _mm512_fmadd_ps(xe[r], _mm512_castsi512_ps(panel[t][j][0]),
                                      _mm512_fmadd_ps(xo[r], _mm512_castsi512_ps(panel[t][j][1]), acc[r][j]));
    } else if constexpr (kPairs) {
      __m512bh xv[R];
      for (int r = 0; r < R; ++r) xv[r] = reinterpret_cast<__m512bh>(_mm512_loadu_si512(xb + (m + r) * K + 32 * (t0 + t)));
      for (int j = 0; j < NC; ++j)
        for (int r = 0; r < R; ++r) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], reinterpret_cast<__m512bh>(panel[t][j][0]), xv[r]);
    } else {
      __m512 x0[R], x1[R];
      for (int r = 0; r < R; ++r) {
        x0[r] = _mm512_loadu_ps(x + (m + r) * ldx + 32 * (t0 + t));
        x1[r] = _mm512_loadu_ps(x + (m + r) * ldx + 32 * (t0 + t) + 16);
      }
      for (int j = 0; j < NC; ++j)
        for (int r = 0; r < R; ++r)
          acc[r][j] = _mm512_fmadd_ps(x1[r], _mm512_castsi512_ps(panel[t][j][1]),
                                      _mm512_fmadd_ps(x0[r], _mm512_castsi512_ps(panel[t][j][0]), acc[r][j]));
    }
  }
  if (!last) {
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < NC; ++j) park[r * NC + j] = acc[r][j];
    return _mm512_setzero_ps();
  }
  __m512 all[16];
  for (int i = 0; i < 16; ++i) all[i] = i < R * NC ? acc[i / NC][i % NC] : _mm512_setzero_ps();
  return halve16(all);
}

// The chains' tree (below) holds up to kChunkTreeDepth subtrees: fewer than 2^7 chains.
constexpr int kChunkTreeDepth = 8;
inline bool chunk_panels_take(bool pairs, int64_t M, int64_t chains) {
  return M >= chunk_panels_min_rows(pairs) && chains < (int64_t{1} << (kChunkTreeDepth - 1));
}

// Chains [0, chains) of cpc chunks each (K = 32 chains cpc) of columns [c0, c1), every
// row of x, into y ([M][ldy], column c0 at y[0]). xb: x as bf16 bits [M][K] (pairs); x,
// ldx: fp32 x (fp32). Each chain's sums are halved as it ends and added into the chains'
// tree at once, as matmul_q8.cpp's tile_chains does (two subtrees of the same size added,
// the earlier on the left; what is left at the end added from the last one back): the
// adds of tree_sum's level-by-level tree, so y gets the bits of run_chains with
// combine_chains, without the chains' sums ever being stored.
// dec, the layout's decode:
//   dec.column(n, t0, t1, dst, stride): dst[(t - t0) * stride] = the bf16 weights of chunk
//     t of column n, word r = row r;
//   dec.prefetch(t, n, nc): requests chunk t of columns [n, n + nc) (and its scales).
// kFmaPairs (with kPairs): bf16 x by two fmas per pair where they beat one vdpbf16ps on
// this core (bf16_products_by_fma), the panel holding each pair split into fp32.
template <bool kPairs, bool kFmaPairs, class Decoder>
GROKIT_AVX512 void chunk_panels_avx512(const Decoder& dec, const uint16_t* xb, int64_t K, const float* x, int64_t ldx,
                                       int64_t M, int64_t chains, int64_t cpc, int64_t c0, int64_t c1, float* y,
                                       int64_t ldy) {
  constexpr int NC = kChunkPanelColumns, R = 2;
  static_assert(kPairs || !kFmaPairs);
  // Vectors per column and chunk: the pairs, or as fp32 rows 2i and 2i + 1 (fma pairs), or
  // rows i and 16 + i (fp32 x).
  constexpr int64_t V = kPairs && !kFmaPairs ? 1 : 2;
  constexpr int64_t T = kChunkPanelBytes / (NC * 64 * V);
  constexpr int64_t kBlocks = kChunkPanelRows / R;
  GROKIT_CHECK(chains < (int64_t{1} << (kChunkTreeDepth - 1)));
  alignas(64) __m512i panel[T][NC][V];
  alignas(64) __m512 park[kChunkPanelRows * NC];
  alignas(64) __m512 tree[kChunkTreeDepth][kBlocks];  // per block of rows of x, as chunk_panel_block returns them
  int64_t size[kChunkTreeDepth];
  // fp32: word 2i = row i, word 2i + 1 = row 16 + i, then split into two fp32 vectors.
  const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6,
                                              21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  const __m512i high_half = _mm512_set1_epi32(static_cast<int>(0xffff0000u));
  auto prefetch_panel = [&](int64_t t0, int64_t t1, int64_t n0) {
    for (int64_t t = t0; t < t1; ++t) dec.prefetch(t, n0, std::min<int64_t>(NC, c1 - n0));
  };
  prefetch_panel(0, std::min(cpc, T), c0);
  for (int64_t m0 = 0; m0 < M; m0 += kChunkPanelRows) {
    const int64_t m1 = std::min(M, m0 + kChunkPanelRows);
    for (int64_t n0 = c0; n0 < c1; n0 += NC) {
      const int nc = static_cast<int>(std::min<int64_t>(NC, c1 - n0));
      int depth = 0;
      for (int64_t ch = 0; ch < chains; ++ch) {
        const int64_t ch0 = ch * cpc, ch1 = ch0 + cpc;
        // This chain's place in the tree: the subtrees of its size it adds to on its way.
        int merges = 0;
        int64_t sz = 1;
        while (depth - merges > 0 && size[depth - merges - 1] == sz) {
          ++merges;
          sz *= 2;
        }
        for (int64_t t0 = ch0; t0 < ch1; t0 += T) {
          const int64_t t1 = std::min(ch1, t0 + T), steps = t1 - t0;
          for (int j = 0; j < NC; ++j) {
            if (j >= nc) {
              for (int64_t t = 0; t < steps; ++t)
                for (int64_t v = 0; v < V; ++v) panel[t][j][v] = _mm512_setzero_si512();
              continue;
            }
            dec.column(n0 + j, t0, t1, &panel[0][j][0], NC * V);
            if constexpr (kFmaPairs) {
              for (int64_t t = 0; t < steps; ++t) {
                const __m512i w = panel[t][j][0];
                panel[t][j][0] = _mm512_slli_epi32(w, 16);
                panel[t][j][1] = _mm512_and_si512(w, high_half);
              }
            } else if constexpr (!kPairs) {
              for (int64_t t = 0; t < steps; ++t) {
                const __m512i w = _mm512_permutexvar_epi16(interleave, panel[t][j][0]);
                panel[t][j][0] = _mm512_slli_epi32(w, 16);
                panel[t][j][1] = _mm512_and_si512(w, high_half);
              }
            }
          }
          // The next panel's codes, requested while this one is used.
          if (t1 < ch1) prefetch_panel(t1, std::min(ch1, t1 + T), n0);
          else if (ch + 1 < chains) prefetch_panel(ch1, std::min(ch1 + cpc, ch1 + T), n0);
          else if (n0 + NC < c1) prefetch_panel(0, std::min(cpc, T), n0 + NC);
          const bool first = t0 == ch0, last = t1 == ch1;
          auto add = [&](int64_t b, __m512 s) GROKIT_AVX512_INLINE_LAMBDA {
            if (!last) return;
            for (int i = 0; i < merges; ++i) s = _mm512_add_ps(tree[depth - 1 - i][b], s);
            tree[depth - merges][b] = s;
          };
          int64_t m = m0;
          for (; m + R <= m1; m += R)
            add((m - m0) / R, chunk_panel_block<R, kPairs, V>(panel, steps, xb, K, x, ldx, m, t0, park + (m - m0) * NC,
                                                              first, last));
          if (m < m1)
            add((m - m0) / R, chunk_panel_block<1, kPairs, V>(panel, steps, xb, K, x, ldx, m, t0, park + (m - m0) * NC,
                                                              first, last));
        }
        depth -= merges;
        size[depth++] = sz;
      }
      const int64_t blocks = (m1 - m0 + R - 1) / R;
      for (; depth > 1; --depth)
        for (int64_t b = 0; b < blocks; ++b) tree[depth - 2][b] = _mm512_add_ps(tree[depth - 2][b], tree[depth - 1][b]);
      const __mmask8 live = static_cast<__mmask8>((1u << nc) - 1);
      for (int64_t b = 0; b < blocks; ++b) {
        const int64_t m = m0 + R * b;
        float* o = y + m * ldy + (n0 - c0);
        _mm256_mask_storeu_ps(o, live, _mm512_castps512_ps256(tree[0][b]));
        if (m + 1 < m1) _mm256_mask_storeu_ps(o + ldy, live, _mm512_extractf32x8_ps(tree[0][b], 1));
      }
    }
  }
}

// The whole product (chunk_panels_take): tasks over columns, each taking every chain.
template <bool kPairs, bool kFmaPairs, class Decoder>
void run_chunk_panels(Pool pool, const Decoder& dec, const uint16_t* xb, int64_t K, const float* x, int64_t ldx,
                      int64_t M, int64_t N, int64_t chains, int64_t cpc, float* y, int64_t ldy) {
  const int64_t chunk = chunk_size(N, task_count(pool), kChunkPanelColumns);
  const int64_t tasks = (N + chunk - 1) / chunk;
  for_each(pool, static_cast<size_t>(tasks), [&](size_t t) {
    const int64_t c0 = static_cast<int64_t>(t) * chunk, c1 = std::min(N, c0 + chunk);
    chunk_panels_avx512<kPairs, kFmaPairs>(dec, xb, K, x, ldx, M, chains, cpc, c0, c1, y + c0, ldy);
  });
}

enum class Level { kScalar, kAvx2, kAvx512 };

// y = x @ W for a chunked layout at one SIMD level: x staged once per call (bf16 bits for
// the AVX-512 pairs, the AVX2 arrangement), then the panels where chunk_panels_take says
// so, else run_chains over the decode walks, one chain of sr rows at a time. The layout's
// file (matmul_q4.cpp, matmul_f8.cpp) defines, beside its Layout type L, the walks this
// calls (found by argument-dependent lookup on L's type):
//   panel_columns(L), the panels' Decoder;
//   groups_avx512<NC, MB, kPairs>(xb, x, ldx, L, m0, ch0, ch1, c0, c1, out, ld): AVX-512,
//     rows [m0, m0 + MB) of x, chunks [ch0, ch1), columns [c0, c1) into out;
//   stage_x_avx2<kPairs>(L, x, M, K, ldx, xa): x in the order its AVX2 decoder's slots take it;
//   chunk_decoder_avx2<kPairs>(L): the AVX2 decoder (above);
//   chain_ref<kPairs>(x, M, ldx, L, ch0, ch1, c0, c1, out, ld): the scalar walk.
template <Level kLevel, bool kPairs, class Layout>
void run_chunked(const float* x, int64_t M, int64_t K, int64_t ldx, const Layout& L, int64_t N, float* y,
                 int64_t ldy, Pool pool, int64_t sr) {
  const int64_t chains = K / sr, cpc = sr / 32;  // chunks per chain
  // Owned by the calling thread, reached by the tasks through these references.
  static thread_local Staged<uint16_t> xb_storage;
  static thread_local Staged<float> xa_storage;
  Staged<uint16_t>& xb = xb_storage;
  Staged<float>& xa = xa_storage;
  if (kLevel == Level::kAvx512 && kPairs) stage_x_bf16(x, M, K, ldx, xb);
  if (kLevel == Level::kAvx2) stage_x_avx2<kPairs>(L, x, M, K, ldx, xa);
  if (kLevel == Level::kAvx512 && chunk_panels_take(kPairs, M, chains)) {
    if (kPairs && bf16_products_by_fma())
      run_chunk_panels<kPairs, kPairs>(pool, panel_columns(L), xb.data(), K, x, ldx, M, N, chains, cpc, y, ldy);
    else
      run_chunk_panels<kPairs, false>(pool, panel_columns(L), xb.data(), K, x, ldx, M, N, chains, cpc, y, ldy);
    return;
  }
  // One chain over columns [c0, c1) into out ([M][ld], c0 at out[0]).
  auto chain_part = [&](int64_t ch, int64_t c0, int64_t c1, float* out, int64_t ld) {
    const int64_t ch0 = ch * cpc, ch1 = ch0 + cpc;
    if constexpr (kLevel == Level::kAvx512) {
      for (int64_t m = 0; m < M;) {
        const int64_t mb = std::min<int64_t>(4, M - m);
        const uint16_t* xbp = xb.data();
        switch (mb) {
          case 1: groups_avx512<16, 1, kPairs>(xbp, x, ldx, L, m, ch0, ch1, c0, c1, out, ld); break;
          case 2: groups_avx512<8, 2, kPairs>(xbp, x, ldx, L, m, ch0, ch1, c0, c1, out, ld); break;
          case 3: groups_avx512<4, 3, kPairs>(xbp, x, ldx, L, m, ch0, ch1, c0, c1, out, ld); break;
          default: groups_avx512<4, 4, kPairs>(xbp, x, ldx, L, m, ch0, ch1, c0, c1, out, ld); break;
        }
        m += mb;
      }
    } else if constexpr (kLevel == Level::kAvx2) {
      if (M >= chunk_panels_avx2_min_rows() && ch1 - ch0 <= kChunkPanelAvx2Chunks) {
        chunk_panels_avx2<kPairs>(xa.data(), M, K, L, ch0, ch1, c0, c1, out, ld);
        return;
      }
      const int64_t nc = M == 1 ? 8 : M == 2 ? 2 : 1;
      for (int64_t n = c0; n < c1;) {
        float* o = out + (n - c0);
        if (nc > 1 && c1 - n >= nc) {
          const int64_t pf_n = c1 - n >= 3 * nc ? n + 2 * nc : -1;
          if (nc == 8)
            column_walk_avx2<1, 8, kPairs>(xa.data(), K, L, ch0, ch1, n, o, ld, pf_n);
          else
            column_walk_avx2<2, 2, kPairs>(xa.data(), K, L, ch0, ch1, n, o, ld, pf_n);
          n += nc;
          continue;
        }
        for (int64_t m = 0; m < M;) {
          const int64_t mb = std::min<int64_t>(4, M - m);
          const float* xp = xa.data() + m * K;
          switch (mb) {
            case 1: column_walk_avx2<1, 1, kPairs>(xp, K, L, ch0, ch1, n, o + m * ld, ld); break;
            case 2: column_walk_avx2<2, 1, kPairs>(xp, K, L, ch0, ch1, n, o + m * ld, ld); break;
            case 3: column_walk_avx2<3, 1, kPairs>(xp, K, L, ch0, ch1, n, o + m * ld, ld); break;
            default: column_walk_avx2<4, 1, kPairs>(xp, K, L, ch0, ch1, n, o + m * ld, ld); break;
          }
          m += mb;
        }
        n += 1;
      }
    } else {
      chain_ref<kPairs>(x, M, ldx, L, ch0, ch1, c0, c1, out, ld);
    }
  };
  run_chains(pool, M, N, chains, 16, N, y, ldy, chain_part);
}

}  // namespace grokit::kernels::detail
