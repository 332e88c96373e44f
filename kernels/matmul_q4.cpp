// y = x @ dequant(W) for the q4g layout (SPEC.md §4.1): int4 codes in 32-row chunks, a
// bf16 scale per (group, column), w = bf16(q * scale). Per column, 16 fp32 lanes in the
// order of kernels.h, halved at the end of each chain; the chains meet in tree_sum's tree.
#include <array>
#include <vector>

#include "kernels/chunk_panels.h"

namespace grokit::kernels {
namespace {
using namespace detail;

// One q4g matrix: for each group of G rows, codes [G/32][N][16] then bf16 scales [N] padded
// to 16 bytes.
struct Q4Layout {
  const uint8_t* payload;
  int64_t K, N, G, cpg, log2_cpg, group_bytes;  // cpg: chunks per group (1, 2 or 4)
  Q4Layout(const uint8_t* p, int64_t k, int64_t n, int64_t g)
      : payload(p), K(k), N(n), G(g), cpg(g / 32), log2_cpg(g == 32 ? 0 : g == 64 ? 1 : 2), group_bytes(g / 2 * n + (2 * n + 15) / 16 * 16) {}
  // The 16 bytes of chunk c (global, 32 rows each), column n.
  const uint8_t* chunk(int64_t c, int64_t n) const {
    return payload + (c >> log2_cpg) * group_bytes + ((c & (cpg - 1)) * N + n) * 16;
  }
  // The bf16 scales of group g (column 0 first).
  const uint8_t* scales(int64_t g) const { return payload + g * group_bytes + cpg * N * 16; }
  float scale(int64_t g, int64_t n) const {
    uint16_t h;
    std::memcpy(&h, scales(g) + 2 * n, 2);
    return bf16f(h);
  }
};

void check_args(int64_t M, int64_t K, int64_t ldx, int64_t G, int64_t N, int64_t ldy, int64_t sr) {
  GROKIT_CHECK(M >= 0 && K > 0 && K % 32 == 0 && N > 0 && ldx >= K && ldy >= N);
  GROKIT_CHECK(G == 32 || G == 64 || G == 128);
  GROKIT_CHECK(K % G == 0);
  GROKIT_CHECK(sr > 0 && K % sr == 0 && sr % 32 == 0 && sr % G == 0);
}

// ---------------------------------------------------------------------------------
// Scalar twins (the definition): chain [ch0, ch1) (chunks) of columns [c0, c1) into out
// ([M][ld], column c0 at out[0]).
template <bool kPairs>
void chain_ref(const float* x, int64_t M, int64_t ldx, const Q4Layout& L, int64_t ch0, int64_t ch1, int64_t c0,
               int64_t c1, float* out, int64_t ld) {
  chunk_chain_ref<kPairs>(x, M, ldx, ch0, ch1, c0, c1, out, ld, [&](int64_t c, int64_t n, float* w) {
    const uint8_t* p = L.chunk(c, n);
    const float s = L.scale(c / L.cpg, n);
    for (int i = 0; i < 16; ++i) {
      w[2 * i] = round_bf16(static_cast<float>(((p[i] & 15) ^ 8) - 8) * s);
      w[2 * i + 1] = round_bf16(static_cast<float>(((p[i] >> 4) ^ 8) - 8) * s);
    }
  });
}

// ---------------------------------------------------------------------------------
// AVX2: per column, the group's 16 values bf16(q * scale) become two byte tables (low and
// high bytes, in both 128-bit lanes), and each chunk is decoded by two vpshufb: its 16
// bytes are spread into an index vector of nibbles (`spread` below), the lookups' bytes
// interleaved into bf16 words, the words into fp32 by a shift (even words) and a mask (odd
// words), not by shuffles: the shuffle ports bound this decode. The arrangement puts
// distinct lanes of the pinned order in each vector, so x is staged to match (kStage),
// slot by slot:
//   pairs: A = lanes [0,2,4,6 | 8,10,12,14], B = lanes [1,3,5,7 | 9,11,13,15]; per chunk A's
//          odd rows, A's even rows, then B's (lane i: row 2i + 1, then 2i);
//   fp32:  A = lanes [0,4,8,12 | 1,5,9,13], B = lanes [2,6,10,14 | 3,7,11,15]; A's rows
//          below 16, A's rows from 16, then B's (lane i: row i, then 16 + i).
template <bool kPairs>
constexpr std::array<int, 32> kStage = kPairs ? std::array<int, 32>{1, 5, 9, 13, 17, 21, 25, 29, 0, 4, 8, 12, 16, 20, 24, 28,
                                                                    3, 7, 11, 15, 19, 23, 27, 31, 2, 6, 10, 14, 18, 22, 26, 30}
                                              : std::array<int, 32>{0, 4, 8, 12, 1, 5, 9, 13, 16, 20, 24, 28, 17, 21, 25, 29,
                                                                    2, 6, 10, 14, 3, 7, 11, 15, 18, 22, 26, 30, 19, 23, 27, 31};
template <bool kPairs>
void stage_x_avx2(const Q4Layout&, const float* x, int64_t M, int64_t K, int64_t ldx, Staged<float>& xa) {
  stage_x_chunks(x, M, K, ldx, kStage<kPairs>.data(), xa);
}

// bf16(q * s) for the nibbles 0..15 (q = 0..7, -8..-1): low bytes and high bytes, each
// table in both lanes.
GROKIT_AVX2 inline void q4_tables_avx2(float s, __m256i& tl, __m256i& th) {
  const __m256 sv = _mm256_set1_ps(s);
  const __m256i lo = _mm256_srli_epi32(_mm256_castps_si256(round_bf16x8(_mm256_mul_ps(_mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7), sv))), 16);
  const __m256i hi = _mm256_srli_epi32(_mm256_castps_si256(round_bf16x8(_mm256_mul_ps(_mm256_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1), sv))), 16);
  // Words of nibbles 0..7 | 8..15, then each lane's low bytes before its high bytes.
  const __m256i words = _mm256_permute4x64_epi64(_mm256_packus_epi32(lo, hi), 0xd8);
  const __m256i split = _mm256_shuffle_epi8(words, _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,
                                                                    0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15));
  tl = _mm256_permute4x64_epi64(split, 0x88);  // qwords 0, 2, 0, 2
  th = _mm256_permute4x64_epi64(split, 0xdd);  // qwords 1, 3, 1, 3
}

// The decoder (chunk_panels.h), its slots in kStage's order.
template <bool kPairs>
struct Q4DecoderAvx2 {
  static constexpr std::array<int, 4> kX = {0, 8, 16, 24};
  static constexpr int kColumnBytes = 16;
  struct State {
    __m256i tl, th;  // the group's tables
  };
  static bool new_group(const Q4Layout& L, int64_t c) { return (c & (L.cpg - 1)) == 0; }
  GROKIT_AVX2 __attribute__((always_inline)) static void begin(const Q4Layout& L, int64_t n, int64_t c, State& st) {
    q4_tables_avx2(L.scale(c >> L.log2_cpg, n), st.tl, st.th);
  }
  GROKIT_AVX2 __attribute__((always_inline)) static void decode(const Q4Layout& L, int64_t n, int64_t c, const State& st,
                                                                __m256 (&w)[4]) {
    // Byte j of a lane takes this byte of the chunk; the upper half of each lane (pairs) or
    // the upper lane (fp32) the high nibbles.
    const __m256i spread = kPairs ? _mm256_setr_epi8(0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13,
                                                     14, 15, 8, 9, 10, 11, 12, 13, 14, 15)
                                  : _mm256_setr_epi8(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4,
                                                     5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    constexpr int kHighNibbles = kPairs ? 0xcc : 0xf0;  // dwords taking the shifted bytes
    const __m256i nibble = _mm256_set1_epi8(15), high = _mm256_set1_epi32(static_cast<int>(0xffff0000u));
    const __m256i v = _mm256_shuffle_epi8(
        _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(L.chunk(c, n)))), spread);
    const __m256i idx = _mm256_and_si256(_mm256_blend_epi32(v, _mm256_srli_epi16(v, 4), kHighNibbles), nibble);
    const __m256i bl = _mm256_shuffle_epi8(st.tl, idx), bh = _mm256_shuffle_epi8(st.th, idx);
    // pairs: w1 = rows 0, 2, .., 14 | 16, .., 30, w2 = the odd rows; fp32: w1 = rows 0, 2,
    // .., 14 | 1, 3, .., 15, w2 = those plus 16.
    const __m256i w1 = _mm256_unpacklo_epi8(bl, bh), w2 = _mm256_unpackhi_epi8(bl, bh);
    const __m256 w1s = _mm256_castsi256_ps(_mm256_slli_epi32(w1, 16)), w1m = _mm256_castsi256_ps(_mm256_and_si256(w1, high));
    const __m256 w2s = _mm256_castsi256_ps(_mm256_slli_epi32(w2, 16)), w2m = _mm256_castsi256_ps(_mm256_and_si256(w2, high));
    if (kPairs) {
      w[0] = w2s, w[1] = w1s, w[2] = w2m, w[3] = w1m;
    } else {
      w[0] = w1s, w[1] = w2s, w[2] = w1m, w[3] = w2m;
    }
  }
  // The halving (lane i += lane i+8, +4, +2, +1) on the sums' positions.
  GROKIT_AVX2 __attribute__((always_inline)) static float halve(__m256 a, __m256 b) {
    if (kPairs) {
      // + 8: a's lanes [0,2,4,6], b's [1,3,5,7]; + 4: a's [0,2], b's [1,3]; + 2: [0, 1].
      const __m128 a8 = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
      const __m128 b8 = _mm_add_ps(_mm256_castps256_ps128(b), _mm256_extractf128_ps(b, 1));
      const __m128 a4 = _mm_add_ps(a8, _mm_movehl_ps(a8, a8)), b4 = _mm_add_ps(b8, _mm_movehl_ps(b8, b8));
      const __m128 u = _mm_unpacklo_ps(a4, b4);                // [a4 0, b4 0, a4 1, b4 1]
      const __m128 v2 = _mm_add_ps(u, _mm_movehl_ps(u, u));  // [a4 0 + a4 1, b4 0 + b4 1]
      return _mm_cvtss_f32(_mm_add_ss(v2, _mm_movehdup_ps(v2)));
    }
    // + 8: a's lanes [0,4 | 1,5], b's [2,6 | 3,7] (positions 0, 1 | 4, 5); + 4: a's [0 | 1],
    // b's [2 | 3] (positions 0 | 4); + 2: [0 | 1].
    const __m256 a8 = _mm256_add_ps(a, _mm256_permute_ps(a, 0x4e)), b8 = _mm256_add_ps(b, _mm256_permute_ps(b, 0x4e));
    const __m256 a4 = _mm256_add_ps(a8, _mm256_permute_ps(a8, 0xb1)), b4 = _mm256_add_ps(b8, _mm256_permute_ps(b8, 0xb1));
    const __m256 v2 = _mm256_add_ps(a4, b4);
    return _mm_cvtss_f32(_mm_add_ss(_mm256_castps256_ps128(v2), _mm256_extractf128_ps(v2, 1)));
  }
};
template <bool kPairs>
Q4DecoderAvx2<kPairs> chunk_decoder_avx2(const Q4Layout&) {
  return {};
}

// ---------------------------------------------------------------------------------
// AVX-512 (chunk_walk_avx512 in chunk_panels.h). For chunk c a column group's codes are
// NC * 16 contiguous bytes. Per column and chunk: vpermw + vpsrlvw put each row's nibble
// in the low bits of a word, vpermw looks it up in the column's table of bf16(q * scale)
// (16 entries, duplicated to 32 so that bit 4 of the index does not matter): word r = row
// r (pairs), or word 2i = row i, word 2i+1 = row 16 + i (fp32).
template <int NC, int MB, bool kPairs>
GROKIT_AVX512 void groups_avx512(const uint16_t* xb, const float* x, int64_t ldx, const Q4Layout& L, int64_t m0,
                                 int64_t ch0, int64_t ch1, int64_t c0, int64_t c1, float* out, int64_t ld) {
  alignas(64) uint16_t tab[NC][32];
  alignas(64) uint8_t stage[NC * 16];
  alignas(64) float sf[16];
  // Word r of the expanded chunk takes word r/4 of the 16 bytes (pairs: row r) shifted by
  // 4 (r % 4); fp32: word 2i row i (word i/4), word 2i+1 row 16 + i (word 4 + i/4).
  alignas(64) uint16_t expand_w[32], shift_w[32];
  for (int r = 0; r < 32; ++r) {
    if (kPairs) {
      expand_w[r] = static_cast<uint16_t>(r / 4);
      shift_w[r] = static_cast<uint16_t>(4 * (r % 4));
    } else {
      const int i = r / 2;
      expand_w[r] = static_cast<uint16_t>((r % 2) * 4 + i / 4);
      shift_w[r] = static_cast<uint16_t>(4 * (i % 4));
    }
  }
  const __m512i expand = _mm512_load_si512(expand_w), shifts = _mm512_load_si512(shift_w);
  const __m512 qv = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, -8, -7, -6, -5, -4, -3, -2, -1);
  auto fetch = [&](int64_t pc, int64_t pn, bool first) GROKIT_AVX512_INLINE_LAMBDA {
    // The codes, and the scales where a group starts.
    const char* pf = reinterpret_cast<const char*>(L.chunk(pc, pn));
    for (int b = 0; b < NC * 16; b += 64) _mm_prefetch(pf + b, _MM_HINT_T0);
    if ((pc & (L.cpg - 1)) == 0 || first) _mm_prefetch(reinterpret_cast<const char*>(L.scales(pc >> L.log2_cpg) + 2 * pn), _MM_HINT_T0);
  };
  chunk_walk_avx512<NC, MB>(m0, ch0, ch1, c0, c1, out, ld, [&](__m512 (&acc)[MB][NC], int64_t t0, int64_t t1, int64_t n0,
                                                               int nc, WalkPrefetch<NC>& prefetch, const auto&)
                                                               GROKIT_AVX512_INLINE_LAMBDA {
    if (nc < NC) std::memset(stage, 0, sizeof stage);
    for (int64_t c = t0; c < t1; ++c) {
      // The tables stay in memory (vpermw reads them there): the accumulators need the
      // registers. (The empty asm claims to change them.)
      __asm__ volatile("" : "+m"(tab));
      if (c == t0 || (c & (L.cpg - 1)) == 0) {
        // The group's tables: bf16(q * scale) for q = 0..7, -8..-1, twice.
        const __mmask16 live = static_cast<__mmask16>((1u << nc) - 1);
        const __m256i h = _mm256_maskz_loadu_epi16(live, L.scales(c >> L.log2_cpg) + 2 * n0);
        _mm512_store_ps(sf, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)));
        for (int j = 0; j < NC; ++j) {
          const __m512 p = _mm512_mul_ps(qv, _mm512_set1_ps(sf[j]));
          _mm512_store_si512(tab[j], reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(p, p)));
        }
      }
      prefetch.step(fetch);
      const uint8_t* p = L.chunk(c, n0);
      if (nc < NC) {
        std::memcpy(stage, p, static_cast<size_t>(nc) * 16);
        p = stage;
      }
      const ChunkX<MB, kPairs> xc(xb, L.K, x, ldx, m0, c);
GROKIT_UNROLL16  // the accumulators are registers only with constant indices
      for (int j = 0; j < NC; ++j) {
        const __m512i v = _mm512_zextsi128_si512(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16 * j)));
        const __m512i t = _mm512_srlv_epi16(_mm512_permutexvar_epi16(expand, v), shifts);
        chunk_add<MB, NC, kPairs>(acc, j, _mm512_permutexvar_epi16(t, _mm512_load_si512(tab[j])), xc);
      }
    }
  });
}

// The panels' decode (chunk_panels.h): word r of chunk t of column n = row r, through
// the same lookup as groups_avx512's pairs.
struct Q4Columns {
  const Q4Layout& L;
  void prefetch(int64_t t, int64_t n, int64_t nc) const {
    const char* p = reinterpret_cast<const char*>(L.chunk(t, n));
    for (int64_t b = 0; b < 16 * nc; b += 64) prefetch_line(p + b);
    if ((t & (L.cpg - 1)) == 0) prefetch_line(reinterpret_cast<const char*>(L.scales(t >> L.log2_cpg) + 2 * n));
  }
  // Word r of the expanded chunk: word r / 4 of its 16 bytes, shifted by 4 (r % 4).
  struct Words {
    alignas(64) uint16_t expand[32], shift[32];
  };
  static constexpr Words kWords = [] {
    Words w{};
    for (int r = 0; r < 32; ++r) {
      w.expand[r] = static_cast<uint16_t>(r / 4);
      w.shift[r] = static_cast<uint16_t>(4 * (r % 4));
    }
    return w;
  }();
  GROKIT_AVX512 void column(int64_t n, int64_t t0, int64_t t1, __m512i* dst, int64_t stride) const {
    const __m512i expand = _mm512_load_si512(kWords.expand), shifts = _mm512_load_si512(kWords.shift);
    const __m512 qv = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, -8, -7, -6, -5, -4, -3, -2, -1);
    __m512i tab = _mm512_setzero_si512();
    for (int64_t t = t0; t < t1; ++t) {
      if (t == t0 || (t & (L.cpg - 1)) == 0) {  // bf16(q * scale) for q = 0..7, -8..-1, twice
        const __m512 p = _mm512_mul_ps(qv, _mm512_set1_ps(L.scale(t >> L.log2_cpg, n)));
        tab = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(p, p));
      }
      const __m512i v = _mm512_zextsi128_si512(_mm_loadu_si128(reinterpret_cast<const __m128i*>(L.chunk(t, n))));
      const __m512i idx = _mm512_srlv_epi16(_mm512_permutexvar_epi16(expand, v), shifts);
      dst[(t - t0) * stride] = _mm512_permutexvar_epi16(idx, tab);
    }
  }
};

// The panels' decoder of this layout, for run_chunked (chunk_panels.h).
inline Q4Columns panel_columns(const Q4Layout& L) { return Q4Columns{L}; }

template <Level kLevel, bool kPairs>
Status impl(const float* x, int64_t M, int64_t K, int64_t ldx, const uint8_t* payload, int64_t G, int64_t N, float* y, int64_t ldy, Pool pool, int64_t sum_rows) {
  GROKIT_CHECK(sum_rows >= 0);
  const int64_t sr = sum_rows > 0 ? sum_rows : K;  // rows per independent chain
  check_args(M, K, ldx, G, N, ldy, sr);
  if (M == 0) return {};
  run_chunked<kLevel, kPairs>(x, M, K, ldx, Q4Layout(payload, K, N, G), N, y, ldy, pool, sr);
  return {};
}

template <bool kPairs>
Status dispatch(const float* x, int64_t M, int64_t K, int64_t ldx, const uint8_t* payload, int64_t G, int64_t N,
                float* y, int64_t ldy, Pool pool, int64_t sr) {
  if (use_avx512()) return impl<Level::kAvx512, kPairs>(x, M, K, ldx, payload, G, N, y, ldy, pool, sr);
  if (use_avx2()) return impl<Level::kAvx2, kPairs>(x, M, K, ldx, payload, G, N, y, ldy, pool, sr);
  return impl<Level::kScalar, kPairs>(x, M, K, ldx, payload, G, N, y, ldy, pool, sr);
}

}  // namespace

Status matmul_q4(const float* x, int64_t M, int64_t K, int64_t ldx, const uint8_t* payload, int64_t group, int64_t N,
                 float* y, int64_t ldy, Pool pool, int64_t sum_rows) {
  return dispatch<true>(x, M, K, ldx, payload, group, N, y, ldy, pool, sum_rows);
}
Status matmul_q4_ref(const float* x, int64_t M, int64_t K, int64_t ldx, const uint8_t* payload, int64_t group,
                     int64_t N, float* y, int64_t ldy, Pool pool, int64_t sum_rows) {
  return impl<Level::kScalar, true>(x, M, K, ldx, payload, group, N, y, ldy, pool, sum_rows);
}
Status matmul_q4_f32(const float* x, int64_t M, int64_t K, int64_t ldx, const uint8_t* payload, int64_t group,
                     int64_t N, float* y, int64_t ldy, Pool pool, int64_t sum_rows) {
  return dispatch<false>(x, M, K, ldx, payload, group, N, y, ldy, pool, sum_rows);
}
Status matmul_q4_f32_ref(const float* x, int64_t M, int64_t K, int64_t ldx, const uint8_t* payload, int64_t group,
                         int64_t N, float* y, int64_t ldy, Pool pool, int64_t sum_rows) {
  return impl<Level::kScalar, false>(x, M, K, ldx, payload, group, N, y, ldy, pool, sum_rows);
}

}  // namespace grokit::kernels
