// y = x @ dequant(W) for the f8col layout (SPEC.md §4.1): fp8 E4M3 codes in 32-row chunks,
// a bf16 scale per column, w = bf16(e4m3(code) * scale). Per column, 16 fp32 lanes in the
// order of kernels.h, halved at the end of each chain; the chains meet in tree_sum's tree.
#include <array>
#include <limits>
#include <vector>

#include "kernels/chunk_panels.h"

namespace grokit::kernels {
namespace {
using namespace detail;

// The fp16 decode (AVX-512, and AVX2's where it has no tables): a code sign-extended to
// 16 bits, shifted left by 7, bit 14 cleared, is the fp16 value e4m3(code) * 2^-8 exactly
// (the e4m3 subnormals as fp16 subnormals, which vcvtph2ps converts exactly: no fp32
// subnormal arises), and the column's scale is folded in as scale * 2^8. Scales too large
// to fold (2^119 and up) and the NaN codes (S.1111.111) take the careful decode: the exact
// value first, NaN blended in.
constexpr float kTwo8 = 0x1p8f, kBigScale = 0x1p119f;
constexpr short kF16Bits = static_cast<short>(0xbfff);

// One f8col matrix: codes [K/32][N][32], then bf16 scales [N] padded to 16 bytes.
struct F8Layout {
  const uint8_t* payload;
  int64_t K, N;
  const uint8_t* chunk(int64_t c, int64_t n) const { return payload + (c * N + n) * 32; }
  const uint8_t* scales() const { return payload + K * N; }
  float scale(int64_t n) const {
    uint16_t h;
    std::memcpy(&h, scales() + 2 * n, 2);
    return bf16f(h);
  }
};

// The same matrix where the AVX2 walks decode by the tables (chains long enough).
struct F8TableLayout : F8Layout {};

void check_args(int64_t M, int64_t K, int64_t ldx, int64_t N, int64_t ldy, int64_t sr) {
  GROKIT_CHECK(M >= 0 && K > 0 && K % 32 == 0 && N > 0 && ldx >= K && ldy >= N);
  GROKIT_CHECK(sr > 0 && K % sr == 0 && sr % 32 == 0);
}

// A scale the decode cannot fold (2^119 <= |s| < inf).
inline bool scale_needs_care(float s) { return std::fabs(s) >= kBigScale && std::isfinite(s); }

// ---------------------------------------------------------------------------------
// Scalar twins (the definition): chain [ch0, ch1) (chunks) of columns [c0, c1) into out
// ([M][ld], column c0 at out[0]).
template <bool kPairs>
void chain_ref(const float* x, int64_t M, int64_t ldx, const F8Layout& L, int64_t ch0, int64_t ch1, int64_t c0,
               int64_t c1, float* out, int64_t ld) {
  chunk_chain_ref<kPairs>(x, M, ldx, ch0, ch1, c0, c1, out, ld, [&](int64_t c, int64_t n, float* w) {
    const uint8_t* p = L.chunk(c, n);
    const float s = L.scale(n);
    for (int i = 0; i < 32; ++i) w[i] = round_bf16(e4m3_to_f32(p[i]) * s);
  });
}

// ---------------------------------------------------------------------------------
// AVX2 (the decoder below, the walks in chunk_panels.h). A code S.EEEE.MMM times a
// column's scale s, rounded to bf16, is for E >= 1
//     bf16 bits = T[E & 1][M] + ((E >> 1) << 8) + (S << 15)
// with T[1][M] the bits for E = 1 and T[0][M] those for E = 2 less 0x100: a power of two
// commutes with the rounding while every product stays a normal, finite bf16, which holds
// for every code when 2^-120 <= s < 2^119 (the "table" scales). The subnormal codes
// (E = 0, zero among them) take a third table, U[M]. So a chunk is decoded by byte
// lookups (vpshufb): the low nibble (E & 1, M) indexes T's low and high bytes (U's where
// E = 0), the high nibble (S, E >> 1) adds to the high byte; the bytes interleave into
// bf16 words, the words become fp32 by a shift (even words) and a mask (odd words). A
// chunk with a NaN code (S.1111.111), or a column whose scale is not a table scale, takes
// the fp16 decode (careful for NaN codes and scales too large to fold). Building a
// column's tables costs about what two chunks' decodes save, and the decode walk builds
// them again for each chain, so chains shorter than kTableMinChunks take the fp16 decode
// with the folded scale (also the AVX-512 one) instead.
constexpr float kTableScaleMin = 0x1p-120f, kTableScaleMax = 0x1p119f;
constexpr int64_t kTableMinChunks = 4;

// Eight codes as fp16 (sign-extended, shifted left by 7, bit 14 cleared: e4m3 * 2^-8) to
// bf16-rounded weights: fast, with the column's folded scale s * 2^8; careful, with s
// itself, the exact value first and NaN blended in.
template <bool kCareful>
GROKIT_AVX2 inline __m256 decode8_fp16_avx2(__m128i h, __m256 s, const Avx2Consts* k) {
  __m256 f = _mm256_cvtph_ps(h);
  if (kCareful) {
    f = _mm256_mul_ps(f, _mm256_set1_ps(kTwo8));
    const __m128i nan = _mm_cmpeq_epi16(_mm_and_si128(h, _mm_set1_epi16(0x3fff)), _mm_set1_epi16(0x3f80));
    f = _mm256_blendv_ps(f, _mm256_set1_ps(std::numeric_limits<float>::quiet_NaN()), _mm256_castsi256_ps(_mm256_cvtepi16_epi32(nan)));
  }
  return round_bf16x8(_mm256_mul_ps(f, s), k);
}

// x as the decoder's slots take it: the even then the odd rows of the chunk's
// first 16, then of its second 16.
constexpr int kChunkLanes[32] = {0,  2,  4,  6,  8,  10, 12, 14, 1,  3,  5,  7,  9,  11, 13, 15,
                                 16, 18, 20, 22, 24, 26, 28, 30, 17, 19, 21, 23, 25, 27, 29, 31};
template <bool kPairs>
void stage_x_avx2(const F8Layout&, const float* x, int64_t M, int64_t K, int64_t ldx, Staged<float>& xa) {
  stage_x_chunks(x, M, K, ldx, kChunkLanes, xa);
}

// A chunk (v) through fp16 into even rows 0..14 (we0), odd rows 1..15 (wo0), and the same
// plus 16 (we1, wo1).
template <bool kCareful>
GROKIT_AVX2 inline void decode_fp16_avx2(__m256i v, __m256 s, const Avx2Consts* k, __m256& we0, __m256& wo0, __m256& we1,
                                      __m256& wo1) {
  // Word i of v holds rows 2i (low byte) and 2i + 1 (high byte): each sign-extended, as fp16.
  const __m256i bits = _mm256_set1_epi16(kF16Bits);
  const __m256i ev = _mm256_and_si256(_mm256_slli_epi16(_mm256_srai_epi16(_mm256_slli_epi16(v, 8), 8), 7), bits);
  const __m256i od = _mm256_and_si256(_mm256_slli_epi16(_mm256_srai_epi16(v, 8), 7), bits);
  we0 = decode8_fp16_avx2<kCareful>(_mm256_castsi256_si128(ev), s, k);
  wo0 = decode8_fp16_avx2<kCareful>(_mm256_castsi256_si128(od), s, k);
  we1 = decode8_fp16_avx2<kCareful>(_mm256_extracti128_si256(ev, 1), s, k);
  wo1 = decode8_fp16_avx2<kCareful>(_mm256_extracti128_si256(od, 1), s, k);
}
// Sixteen words (8 in each lane's low half of 32-bit lanes, a then b) as a byte table of
// their low bytes and one of their high bytes, each in both 128-bit lanes.
GROKIT_AVX2 inline void byte_tables_avx2(__m256i a, __m256i b, __m256i& tl, __m256i& th) {
  const __m256i words = _mm256_permute4x64_epi64(_mm256_packus_epi32(a, b), 0xd8);
  const __m256i split = _mm256_shuffle_epi8(words, _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,
                                                                    0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15));
  tl = _mm256_permute4x64_epi64(split, 0x88);  // qwords 0, 2, 0, 2
  th = _mm256_permute4x64_epi64(split, 0xdd);  // qwords 1, 3, 1, 3
}
GROKIT_AVX2 inline __m256i bf16_words(__m256 v, const Avx2Consts* k) {
  return _mm256_srli_epi32(_mm256_castps_si256(round_bf16x8(v, k)), 16);
}

// The decoders (chunk_panels.h). A chunk's weights come as four vectors of 8: even rows
// 0..14 (we0), odd rows 1..15 (wo0), even rows 16..30 (we1), odd rows 17..31 (wo1), and
// x the same way per chunk (kChunkLanes). Slots: pairs, wo0, we0, wo1, we1 (A = lanes
// 0..7, rows 2i + 1 then 2i; B = lanes 8..15); fp32, we0, we1, wo0, wo1 (A = even lanes
// 2j, rows 2j then 16 + 2j; B = odd lanes).
template <bool kPairs>
GROKIT_AVX2 __attribute__((always_inline)) inline void to_slots(__m256 we0, __m256 wo0, __m256 we1, __m256 wo1, __m256 (&w)[4]) {
  if (kPairs) {
    w[0] = wo0, w[1] = we0, w[2] = wo1, w[3] = we1;
  } else {
    w[0] = we0, w[1] = we1, w[2] = wo0, w[3] = wo1;
  }
}
GROKIT_AVX2 __attribute__((always_inline)) inline bool has_nan_code(__m256i v, const Avx2Consts* k) {
  return _mm256_movemask_epi8(_mm256_cmpeq_epi8(_mm256_or_si256(v, avx2_const(k->x80)), _mm256_set1_epi8(-1))) != 0;
}

// Through fp16, with the folded scale where it can be.
template <bool kPairs>
struct F8DecoderAvx2 {
  static constexpr std::array<int, 4> kX = kPairs ? std::array<int, 4>{8, 0, 24, 16} : std::array<int, 4>{0, 16, 8, 24};
  static constexpr int kColumnBytes = 32;
  struct State {
    __m256 sv, sf;  // the column's scale, and folded (times 2^8)
    bool big;       // too large to fold
  };
  static bool new_group(const F8Layout&, int64_t) { return false; }  // one scale per column
  GROKIT_AVX2 __attribute__((always_inline)) static void begin(const F8Layout& L, int64_t n, int64_t, State& st) {
    const float s = L.scale(n);
    st.big = scale_needs_care(s);
    st.sv = _mm256_set1_ps(s);
    st.sf = _mm256_set1_ps(s * kTwo8);
  }
  GROKIT_AVX2 __attribute__((always_inline)) static void decode(const F8Layout& L, int64_t n, int64_t c, const State& st,
                                                                __m256 (&w)[4]) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(L.chunk(c, n)));
    const Avx2Consts* k = avx2_consts();
    __m256 we0, wo0, we1, wo1;
    if (st.big || has_nan_code(v, k)) {
      decode_fp16_avx2<true>(v, st.sv, k, we0, wo0, we1, wo1);
    } else {
      decode_fp16_avx2<false>(v, st.sf, k, we0, wo0, we1, wo1);
    }
    to_slots<kPairs>(we0, wo0, we1, wo1, w);
  }
  GROKIT_AVX2 __attribute__((always_inline)) static float halve(__m256 a, __m256 b) { return chunk_halve_avx2<kPairs>(a, b); }
};

// By the tables, for a table scale (otherwise as F8DecoderAvx2).
template <bool kPairs>
struct F8TableDecoderAvx2 : F8DecoderAvx2<kPairs> {
  struct State : F8DecoderAvx2<kPairs>::State {
    __m256i tl, th, ul, uh;  // T's and U's byte tables
    bool table;              // a table scale
  };
  GROKIT_AVX2 __attribute__((always_inline)) static void begin(const F8Layout& L, int64_t n, int64_t c, State& st) {
    F8DecoderAvx2<kPairs>::begin(L, n, c, st);
    const float s = L.scale(n);
    st.table = s >= kTableScaleMin && s < kTableScaleMax;
    if (!st.table) return;
    const Avx2Consts* k = avx2_consts();
    const __m256 m8 = _mm256_setr_ps(8, 9, 10, 11, 12, 13, 14, 15), sv = st.sv;
    const __m256i e2 = _mm256_sub_epi32(bf16_words(_mm256_mul_ps(_mm256_mul_ps(m8, _mm256_set1_ps(0x1p-8f)), sv), k),
                                        _mm256_set1_epi32(0x100));
    const __m256i e1 = bf16_words(_mm256_mul_ps(_mm256_mul_ps(m8, _mm256_set1_ps(0x1p-9f)), sv), k);
    const __m256i u = bf16_words(_mm256_mul_ps(_mm256_setr_ps(0, 0x1p-9f, 0x2p-9f, 0x3p-9f, 0x4p-9f, 0x5p-9f, 0x6p-9f, 0x7p-9f), sv), k);
    byte_tables_avx2(e2, e1, st.tl, st.th);
    byte_tables_avx2(u, u, st.ul, st.uh);
  }
  GROKIT_AVX2 __attribute__((always_inline)) static void decode(const F8Layout& L, int64_t n, int64_t c, const State& st,
                                                                __m256 (&w)[4]) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(L.chunk(c, n)));
    const Avx2Consts* k = avx2_consts();
    __m256 we0, wo0, we1, wo1;
    const bool nan = has_nan_code(v, k);
    if (st.table && !nan) {
      // The high nibble's addend to the high byte: E >> 1, and the sign to bit 7.
      const __m256i high_add = _mm256_setr_epi8(0, 1, 2, 3, 4, 5, 6, 7, -128, -127, -126, -125, -124, -123, -122, -121, 0, 1,
                                                2, 3, 4, 5, 6, 7, -128, -127, -126, -125, -124, -123, -122, -121);
      const __m256i nibble = avx2_const(k->x0f);
      // Lane 0 takes rows 0..7 and 16..23, lane 1 rows 8..15 and 24..31.
      const __m256i p = _mm256_permute4x64_epi64(v, 0xd8);
      const __m256i lo = _mm256_and_si256(p, nibble), hi = _mm256_and_si256(_mm256_srli_epi16(p, 4), nibble);
      const __m256i sub = _mm256_cmpeq_epi8(_mm256_and_si256(p, avx2_const(k->x78)), _mm256_setzero_si256());
      const __m256i bl = _mm256_blendv_epi8(_mm256_shuffle_epi8(st.tl, lo), _mm256_shuffle_epi8(st.ul, lo), sub);
      const __m256i bh = _mm256_add_epi8(_mm256_blendv_epi8(_mm256_shuffle_epi8(st.th, lo), _mm256_shuffle_epi8(st.uh, lo), sub),
                                         _mm256_shuffle_epi8(high_add, hi));
      // w1: rows 0..7 | 8..15, w2: rows 16..23 | 24..31, as bf16 words.
      const __m256i w1 = _mm256_unpacklo_epi8(bl, bh), w2 = _mm256_unpackhi_epi8(bl, bh);
      const __m256i high = avx2_const(k->xffff0000);
      we0 = _mm256_castsi256_ps(_mm256_slli_epi32(w1, 16));
      wo0 = _mm256_castsi256_ps(_mm256_and_si256(w1, high));
      we1 = _mm256_castsi256_ps(_mm256_slli_epi32(w2, 16));
      wo1 = _mm256_castsi256_ps(_mm256_and_si256(w2, high));
    } else if (!st.big && !nan) {
      decode_fp16_avx2<false>(v, st.sf, k, we0, wo0, we1, wo1);
    } else {
      decode_fp16_avx2<true>(v, st.sv, k, we0, wo0, we1, wo1);
    }
    to_slots<kPairs>(we0, wo0, we1, wo1, w);
  }
};
template <bool kPairs>
F8DecoderAvx2<kPairs> chunk_decoder_avx2(const F8Layout&) {
  return {};
}
template <bool kPairs>
F8TableDecoderAvx2<kPairs> chunk_decoder_avx2(const F8TableLayout&) {
  return {};
}

// ---------------------------------------------------------------------------------
// AVX-512 (chunk_walk_avx512 in chunk_panels.h). For chunk c a column group's codes are
// NC * 32 contiguous bytes. Per column and chunk: 32 codes to fp16 (vpmovsxbw, shift,
// mask), to fp32 (vcvtph2ps), times the folded scale, rounded to bf16 by vcvtne2ps2bf16
// (word r = row r; fp32: interleaved to word 2i = row i, word 2i+1 = row 16 + i). A tile
// with a NaN code anywhere is done again with the careful decode.

// A column's 32 codes to bf16 weights (word r = row r) with the folded scale (careful: the
// plain scale).
template <bool kCareful>
GROKIT_AVX512 inline __m512i decode32_avx512(const uint8_t* p, __m512 s) {
  const __m512i h = _mm512_and_si512(_mm512_slli_epi16(_mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 7),
                                     _mm512_set1_epi16(kF16Bits));
  __m512 lo = _mm512_cvtph_ps(_mm512_castsi512_si256(h)), hi = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(h, 1));
  if (kCareful) {
    const __m512 nan = _mm512_set1_ps(std::numeric_limits<float>::quiet_NaN());
    const __mmask32 is_nan = _mm512_cmpeq_epi16_mask(_mm512_and_si512(h, _mm512_set1_epi16(0x3fff)), _mm512_set1_epi16(0x3f80));
    lo = _mm512_mask_mov_ps(_mm512_mul_ps(lo, _mm512_set1_ps(kTwo8)), static_cast<__mmask16>(is_nan), nan);
    hi = _mm512_mask_mov_ps(_mm512_mul_ps(hi, _mm512_set1_ps(kTwo8)), static_cast<__mmask16>(is_nan >> 16), nan);
  }
  return reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(_mm512_mul_ps(hi, s), _mm512_mul_ps(lo, s)));
}

// One chunk of a column group: the NC columns' 32 codes each (column j at p + 32 j)
// decoded with the scales s[j] (folded or not, see kCareful) and added to the sums.
template <bool kCareful, int NC, int MB, bool kPairs>
GROKIT_AVX512 __attribute__((always_inline)) inline void chunk_avx512(__m512 (&acc)[MB][NC], const uint8_t* p,
                                                                     const float* s, const ChunkX<MB, kPairs>& xc) {
  // fp32: word 2i = row i, word 2i + 1 = row 16 + i of vcvtne2ps2bf16's row order.
  const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6,
                                              21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
GROKIT_UNROLL16  // the accumulators are registers only with constant indices
  for (int j = 0; j < NC; ++j) {
    const __m512i w = decode32_avx512<kCareful>(p + 32 * j, _mm512_set1_ps(s[j]));
    chunk_add<MB, NC, kPairs>(acc, j, kPairs ? w : _mm512_permutexvar_epi16(interleave, w), xc);
  }
}

// Chunks [t0, t1) of the column group at n0 (nc live columns) added to the sums. The fast
// decode (folded scales s) also returns the largest doubled code byte (0xfe: a NaN code
// was among them, and the caller redoes the tile with the careful decode, unfolded s).
template <bool kCareful, int NC, int MB, bool kPairs>
GROKIT_AVX512 __attribute__((always_inline)) inline __m512i tile_avx512(
    __m512 (&acc)[MB][NC], const F8Layout& L, const uint16_t* xb, const float* x, int64_t ldx, int64_t m0, int64_t t0,
    int64_t t1, int64_t n0, int nc, uint8_t* stage, const float* s, WalkPrefetch<NC>* prefetch) {
  __m512i top = _mm512_setzero_si512();
  auto fetch = [&](int64_t pc, int64_t pn, bool) GROKIT_AVX512_INLINE_LAMBDA {
    const char* pf = reinterpret_cast<const char*>(L.chunk(pc, pn));
    for (int b = 0; b < NC * 32; b += 64) _mm_prefetch(pf + b, _MM_HINT_T0);
  };
  for (int64_t c = t0; c < t1; ++c) {
    // The scales stay in memory (broadcast from there): the accumulators need the registers.
    // (The empty asm claims to change them.)
    __asm__ volatile("" : "+m"(*reinterpret_cast<float(*)[16]>(const_cast<float*>(s))));
    if (prefetch != nullptr) prefetch->step(fetch);
    const uint8_t* p = L.chunk(c, n0);
    if (nc < NC) {
      std::memcpy(stage, p, static_cast<size_t>(nc) * 32);
      p = stage;
    }
    if (!kCareful) {  // v + v drops the sign bit: a NaN code (low 7 bits set) becomes 0xfe
      for (int b = 0; b < NC * 32; b += 64) {
        const __m512i v = _mm512_loadu_si512(p + b);
        top = _mm512_max_epu8(top, _mm512_add_epi8(v, v));
      }
    }
    chunk_avx512<kCareful, NC, MB, kPairs>(acc, p, s, ChunkX<MB, kPairs>(xb, L.K, x, ldx, m0, c));
  }
  return top;
}

// Rows [m0, m0 + MB) of x, columns [c0, c1) in groups of NC, chunks [ch0, ch1) of one chain.
// xb: x as bf16 bits [M][K] (pairs); x, ldx: fp32 x (fp32).
template <int NC, int MB, bool kPairs>
GROKIT_AVX512 void groups_avx512(const uint16_t* xb, const float* x, int64_t ldx, const F8Layout& L, int64_t m0,
                                 int64_t ch0, int64_t ch1, int64_t c0, int64_t c1, float* out, int64_t ld) {
  alignas(64) uint8_t stage[NC * 32];
  alignas(64) float sf[16], sv[16];
  const __m512i nan2 = _mm512_set1_epi8(static_cast<char>(0xfe));  // a NaN code doubled
  chunk_walk_avx512<NC, MB>(m0, ch0, ch1, c0, c1, out, ld, [&](__m512 (&acc)[MB][NC], int64_t t0, int64_t t1, int64_t n0,
                                                               int nc, WalkPrefetch<NC>& prefetch, const auto& restart)
                                                               GROKIT_AVX512_INLINE_LAMBDA {
    if (nc < NC) std::memset(stage, 0, sizeof stage);
    const __mmask16 live = static_cast<__mmask16>((1u << nc) - 1);
    const __m512 s = _mm512_castsi512_ps(
        _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(live, L.scales() + 2 * n0)), 16));
    _mm512_store_ps(sv, s);
    _mm512_store_ps(sf, _mm512_mul_ps(s, _mm512_set1_ps(kTwo8)));
    const __m512 as = _mm512_abs_ps(s);
    const bool big = (_mm512_cmp_ps_mask(as, _mm512_set1_ps(kBigScale), _CMP_GE_OQ) &
                      _mm512_cmp_ps_mask(as, _mm512_set1_ps(std::numeric_limits<float>::infinity()), _CMP_LT_OQ)) != 0;
    bool careful = big;
    if (!careful) {
      const __m512i top = tile_avx512<false, NC, MB, kPairs>(acc, L, xb, x, ldx, m0, t0, t1, n0, nc, stage, sf, &prefetch);
      careful = _mm512_cmpeq_epi8_mask(top, nan2) != 0;
      if (careful) restart();  // start the tile again (the prefetches are done)
    }
    if (careful)
      tile_avx512<true, NC, MB, kPairs>(acc, L, xb, x, ldx, m0, t0, t1, n0, nc, stage, sv, big ? &prefetch : nullptr);
  });
}

// The panels' decode (chunk_panels.h): word r of chunk t of column n = row r, the fast
// decode where it is exact, the careful one for a chunk with a NaN code or a column whose
// scale cannot be folded (the same bits as the walks' decode).
struct F8Columns {
  const F8Layout& L;
  void prefetch(int64_t t, int64_t n, int64_t nc) const {
    const char* p = reinterpret_cast<const char*>(L.chunk(t, n));
    for (int64_t b = 0; b < 32 * nc; b += 64) prefetch_line(p + b);
  }
  GROKIT_AVX512 void column(int64_t n, int64_t t0, int64_t t1, __m512i* dst, int64_t stride) const {
    const float s = L.scale(n);
    const bool big = scale_needs_care(s);
    const __m512 sv = _mm512_set1_ps(s), sf = _mm512_set1_ps(s * kTwo8);
    const __m256i top = _mm256_set1_epi8(static_cast<char>(0x80)), ones = _mm256_set1_epi8(-1);
    for (int64_t t = t0; t < t1; ++t) {
      const uint8_t* p = L.chunk(t, n);
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
      const bool nan = _mm256_cmpeq_epi8_mask(_mm256_or_si256(v, top), ones) != 0;  // S.1111.111
      dst[(t - t0) * stride] = big || nan ? decode32_avx512<true>(p, sv) : decode32_avx512<false>(p, sf);
    }
  }
};

// The panels' decoder of this layout, for run_chunked (chunk_panels.h).
inline F8Columns panel_columns(const F8Layout& L) { return F8Columns{L}; }

template <Level kLevel, bool kPairs>
Status impl(const float* x, int64_t M, int64_t K, int64_t ldx, const uint8_t* payload, int64_t N, float* y, int64_t ldy, Pool pool, int64_t sum_rows) {
  GROKIT_CHECK(sum_rows >= 0);
  const int64_t sr = sum_rows > 0 ? sum_rows : K;  // rows per independent chain
  check_args(M, K, ldx, N, ldy, sr);
  if (M == 0) return {};
  const F8Layout L{payload, K, N};
  if constexpr (kLevel == Level::kAvx2)
    if (sr / 32 >= kTableMinChunks) {
      run_chunked<kLevel, kPairs>(x, M, K, ldx, F8TableLayout{L}, N, y, ldy, pool, sr);
      return {};
    }
  run_chunked<kLevel, kPairs>(x, M, K, ldx, L, N, y, ldy, pool, sr);
  return {};
}

template <bool kPairs>
Status dispatch(const float* x, int64_t M, int64_t K, int64_t ldx, const uint8_t* payload, int64_t N, float* y,
                int64_t ldy, Pool pool, int64_t sr) {
  if (use_avx512()) return impl<Level::kAvx512, kPairs>(x, M, K, ldx, payload, N, y, ldy, pool, sr);
  if (use_avx2()) return impl<Level::kAvx2, kPairs>(x, M, K, ldx, payload, N, y, ldy, pool, sr);
  return impl<Level::kScalar, kPairs>(x, M, K, ldx, payload, N, y, ldy, pool, sr);
}

}  // namespace

float e4m3_to_f32(uint8_t v) {
  const uint32_t e = (v >> 3) & 15u, m = v & 7u;
  float mag;
  if (e == 15 && m == 7) {
    mag = std::numeric_limits<float>::quiet_NaN();
  } else if (e == 0) {
    mag = static_cast<float>(m) * 0x1p-9f;  // subnormal: m * 2^-9
  } else {
    const uint32_t bits = (e + 120u) << 23 | m << 20;  // 2^(e-7) * (1 + m/8)
    std::memcpy(&mag, &bits, 4);
  }
  return (v & 0x80u) != 0 ? -mag : mag;
}

Status matmul_f8(const float* x, int64_t M, int64_t K, int64_t ldx, const uint8_t* payload, int64_t N, float* y,
                 int64_t ldy, Pool pool, int64_t sum_rows) {
  return dispatch<true>(x, M, K, ldx, payload, N, y, ldy, pool, sum_rows);
}
Status matmul_f8_ref(const float* x, int64_t M, int64_t K, int64_t ldx, const uint8_t* payload, int64_t N, float* y,
                     int64_t ldy, Pool pool, int64_t sum_rows) {
  return impl<Level::kScalar, true>(x, M, K, ldx, payload, N, y, ldy, pool, sum_rows);
}
Status matmul_f8_f32(const float* x, int64_t M, int64_t K, int64_t ldx, const uint8_t* payload, int64_t N, float* y,
                     int64_t ldy, Pool pool, int64_t sum_rows) {
  return dispatch<false>(x, M, K, ldx, payload, N, y, ldy, pool, sum_rows);
}
Status matmul_f8_f32_ref(const float* x, int64_t M, int64_t K, int64_t ldx, const uint8_t* payload, int64_t N,
                         float* y, int64_t ldy, Pool pool, int64_t sum_rows) {
  return impl<Level::kScalar, false>(x, M, K, ldx, payload, N, y, ldy, pool, sum_rows);
}

}  // namespace grokit::kernels
