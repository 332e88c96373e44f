// y = x @ dequant(W) for the f8col layout (SPEC.md §4.1): fp8 E4M3 codes in 32-row chunks,
// a bf16 scale per column, w = bf16(e4m3(code) * scale). Per column, 16 fp32 lanes in the
// order of kernels.h, halved at the end of each chain; the chains meet in tree_sum's tree.
#include <limits>
#include <vector>

#include <cpuid.h>

#include "kernels/chunk_panels.h"

namespace grokit::kernels {
namespace {
using namespace detail;

constexpr int64_t kPrefetchAhead = 12;  // (column group, chunk) steps the AVX-512 walks fetch ahead
constexpr int64_t kChainChunks = 16;    // longest chain (in chunks) an AVX-512 walk keeps whole in registers
constexpr int64_t kTileChunks = 8;      // chunks per pass of a longer chain
constexpr int64_t kParkColumns = 256;   // columns (times rows of x) whose sums a tiled walk parks in L1

// The SIMD decode: a code sign-extended to 16 bits, shifted left by 7, bit 14 cleared, is
// the fp16 value e4m3(code) * 2^-8 exactly (the e4m3 subnormals as fp16 subnormals,
// which vcvtph2ps converts exactly: no fp32 subnormal arises), and the column's scale is
// folded in as scale * 2^8. Scales too large to fold (2^119 and up) and the NaN codes
// (S.1111.111) take the careful decode: the exact value first, NaN blended in.
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

void check_args(int64_t M, int64_t K, int64_t ldx, int64_t N, int64_t ldy, int64_t sr) {
  GROKIT_CHECK(M >= 0 && K > 0 && K % 32 == 0 && N > 0 && ldx >= K && ldy >= N);
  GROKIT_CHECK(sr > 0 && K % sr == 0 && sr % 32 == 0);
}

inline float reduce16(float* l) {
  for (int step = 8; step >= 1; step /= 2) {
    for (int i = 0; i < step; ++i) l[i] = l[i] + l[i + step];
  }
  return l[0];
}

// A scale the decode cannot fold (2^119 <= |s| < inf).
inline bool scale_needs_care(float s) { return std::fabs(s) >= kBigScale && std::isfinite(s); }

// ---------------------------------------------------------------------------------
// Scalar twins (the definition): chain [ch0, ch1) (chunks) of columns [c0, c1) into out
// ([M][ld], column c0 at out[0]).
template <bool kPairs>
void chain_ref(const float* x, int64_t M, int64_t ldx, const F8Layout& L, int64_t ch0, int64_t ch1, int64_t c0,
               int64_t c1, float* out, int64_t ld) {
  std::vector<float> lanes(static_cast<size_t>(16 * M));
  for (int64_t n = c0; n < c1; ++n) {
    const float s = L.scale(n);
    std::fill(lanes.begin(), lanes.end(), 0.0f);
    for (int64_t c = ch0; c < ch1; ++c) {
      const uint8_t* p = L.chunk(c, n);
      float w[32];
      for (int i = 0; i < 32; ++i) w[i] = round_bf16(e4m3_to_f32(p[i]) * s);
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
    for (int64_t m = 0; m < M; ++m) out[m * ld + (n - c0)] = reduce16(lanes.data() + 16 * m);
  }
}

// ---------------------------------------------------------------------------------
// AVX2 (with F16C): one column at a time, up to 4 rows of x. Each chunk gives four vectors
// of 8 weights: even rows 0..14, odd rows 1..15, even rows 16..30, odd rows 17..31; x comes
// arranged the same way per chunk. Lanes: pairs: A = lanes 0..7 (rows 2i+1 then 2i), B =
// lanes 8..15; fp32: A = even lanes 2j (rows 2j then 16+2j), B = odd lanes 2j+1.
#define GROKIT_AVX2_F16C __attribute__((target("avx2,fma,f16c")))

// The halving sum of the 16 lanes.
template <bool kPairs>
GROKIT_AVX2 inline float halve_avx2(__m256 a, __m256 b) {
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

// Eight fp16 values (e4m3 * 2^-8) to bf16-rounded weights in fp32 lanes.
template <bool kCareful>
GROKIT_AVX2_F16C inline __m256 decode8_avx2(__m128i h, __m256 s) {
  __m256 f = _mm256_cvtph_ps(h);
  if (kCareful) {
    f = _mm256_mul_ps(f, _mm256_set1_ps(kTwo8));
    const __m128i nan = _mm_cmpeq_epi16(_mm_and_si128(h, _mm_set1_epi16(0x3fff)), _mm_set1_epi16(0x3f80));
    f = _mm256_blendv_ps(f, _mm256_set1_ps(std::numeric_limits<float>::quiet_NaN()), _mm256_castsi256_ps(_mm256_cvtepi16_epi32(nan)));
  }
  return round_bf16x8(_mm256_mul_ps(f, s));
}

template <int MB, bool kPairs>
GROKIT_AVX2_F16C void column_avx2(const float* xa, int64_t K, const F8Layout& L, int64_t ch0, int64_t ch1, int64_t n,
                                  float* out, int64_t ld) {
  __m256 A[MB], B[MB];
  for (int mm = 0; mm < MB; ++mm) A[mm] = B[mm] = _mm256_setzero_ps();
  const float s = L.scale(n);
  const bool big = scale_needs_care(s);
  const __m256 sv = _mm256_set1_ps(s), sf = _mm256_set1_ps(s * kTwo8);
  const __m256i ones = _mm256_set1_epi8(-1), top = _mm256_set1_epi8(-128), bits = _mm256_set1_epi16(kF16Bits);
  for (int64_t c = ch0; c < ch1; ++c) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(L.chunk(c, n)));
    // Words k of v hold rows 2k (low byte) and 2k + 1 (high byte): each sign-extended, as fp16.
    const __m256i ev = _mm256_and_si256(_mm256_slli_epi16(_mm256_srai_epi16(_mm256_slli_epi16(v, 8), 8), 7), bits);
    const __m256i od = _mm256_and_si256(_mm256_slli_epi16(_mm256_srai_epi16(v, 8), 7), bits);
    const __m128i e0 = _mm256_castsi256_si128(ev), e1 = _mm256_extracti128_si256(ev, 1);
    const __m128i o0 = _mm256_castsi256_si128(od), o1 = _mm256_extracti128_si256(od, 1);
    __m256 we0, wo0, we1, wo1;
    if (big || _mm256_movemask_epi8(_mm256_cmpeq_epi8(_mm256_or_si256(v, top), ones)) != 0) {
      we0 = decode8_avx2<true>(e0, sv);
      wo0 = decode8_avx2<true>(o0, sv);
      we1 = decode8_avx2<true>(e1, sv);
      wo1 = decode8_avx2<true>(o1, sv);
    } else {
      we0 = decode8_avx2<false>(e0, sf);
      wo0 = decode8_avx2<false>(o0, sf);
      we1 = decode8_avx2<false>(e1, sf);
      wo1 = decode8_avx2<false>(o1, sf);
    }
    for (int mm = 0; mm < MB; ++mm) {
      const float* xp = xa + mm * K + 32 * c;
      const __m256 xe0 = _mm256_loadu_ps(xp), xo0 = _mm256_loadu_ps(xp + 8);
      const __m256 xe1 = _mm256_loadu_ps(xp + 16), xo1 = _mm256_loadu_ps(xp + 24);
      if (kPairs) {
        A[mm] = _mm256_fmadd_ps(xe0, we0, _mm256_fmadd_ps(xo0, wo0, A[mm]));
        B[mm] = _mm256_fmadd_ps(xe1, we1, _mm256_fmadd_ps(xo1, wo1, B[mm]));
      } else {
        A[mm] = _mm256_fmadd_ps(xe1, we1, _mm256_fmadd_ps(xe0, we0, A[mm]));
        B[mm] = _mm256_fmadd_ps(xo1, wo1, _mm256_fmadd_ps(xo0, wo0, B[mm]));
      }
    }
  }
  for (int mm = 0; mm < MB; ++mm) out[mm * ld] = halve_avx2<kPairs>(A[mm], B[mm]);
}

// ---------------------------------------------------------------------------------
// AVX-512 with bf16 instructions. A column group of NC columns and MB rows of x keeps
// NC * MB <= 16 accumulators (16 lanes each) in registers while the chain's chunks stream
// by; for chunk c the group's codes are NC * 32 contiguous bytes. Per column and chunk:
// 32 codes to fp16 (vpmovsxbw, shift, mask), to fp32 (vcvtph2ps), times the folded scale,
// rounded to bf16 by vcvtne2ps2bf16 (word r = row r), then vdpbf16ps (pairs) or,
// interleaved to word 2i = row i, word 2i+1 = row 16 + i and split into two fp32 vectors,
// two fmas (fp32). A tile with a NaN code anywhere is done again with the careful decode.


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
                                                                     const float* s, const __m512i* xv, const __m512* x0,
                                                                     const __m512* x1) {
  // fp32: word 2i = row i, word 2i + 1 = row 16 + i of vcvtne2ps2bf16's row order.
  const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6,
                                              21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
GROKIT_UNROLL16  // the accumulators are registers only with constant indices
  for (int j = 0; j < NC; ++j) {
    __m512i w = decode32_avx512<kCareful>(p + 32 * j, _mm512_set1_ps(s[j]));
    if (kPairs) {
      for (int mm = 0; mm < MB; ++mm)
        acc[mm][j] = _mm512_dpbf16_ps(acc[mm][j], reinterpret_cast<__m512bh>(w), reinterpret_cast<__m512bh>(xv[mm]));
    } else {
      w = _mm512_permutexvar_epi16(interleave, w);
      const __m512 we = _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
      const __m512 wo = _mm512_castsi512_ps(_mm512_and_si512(w, _mm512_set1_epi32(static_cast<int>(0xffff0000u))));
      for (int mm = 0; mm < MB; ++mm) acc[mm][j] = _mm512_fmadd_ps(x1[mm], wo, _mm512_fmadd_ps(x0[mm], we, acc[mm][j]));
    }
  }
}

// The walks' prefetch cursor: kPrefetchAhead (column group, chunk) steps ahead of the walk
// over chunks [t0, t1) of columns [.., b1), in groups of NC.
template <int NC>
struct Prefetcher {
  const F8Layout* L;
  int64_t pc, pn, t0, t1, b1;
  Prefetcher(const F8Layout* l, int64_t t0_, int64_t t1_, int64_t b0, int64_t b1_)
      : L(l), pc(t0_ + kPrefetchAhead % (t1_ - t0_)), pn(b0 + kPrefetchAhead / (t1_ - t0_) * NC), t0(t0_), t1(t1_), b1(b1_) {}
  void step() {
    if (pn < b1) {
      const char* pf = reinterpret_cast<const char*>(L->chunk(pc, pn));
      for (int b = 0; b < NC * 32; b += 64) _mm_prefetch(pf + b, _MM_HINT_T0);
    }
    if (++pc == t1) {
      pc = t0;
      pn += NC;
    }
  }
};

// Chunks [t0, t1) of the column group at n0 (nc live columns) added to the sums. The fast
// decode (folded scales s) also returns the largest doubled code byte (0xfe: a NaN code
// was among them, and the caller redoes the tile with the careful decode, unfolded s).
template <bool kCareful, int NC, int MB, bool kPairs>
GROKIT_AVX512 __attribute__((always_inline)) inline __m512i tile_avx512(
    __m512 (&acc)[MB][NC], const F8Layout& L, const uint16_t* xb, const float* x, int64_t ldx, int64_t m0, int64_t t0,
    int64_t t1, int64_t n0, int nc, uint8_t* stage, const float* s, Prefetcher<NC>* prefetch) {
  __m512i top = _mm512_setzero_si512();
  for (int64_t c = t0; c < t1; ++c) {
    // The scales stay in memory (broadcast from there): the accumulators need the registers.
    // (The empty asm claims to change them.)
    __asm__ volatile("" : "+m"(*reinterpret_cast<float(*)[16]>(const_cast<float*>(s))));
    if (prefetch != nullptr) prefetch->step();
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
    __m512i xv[MB];
    __m512 x0[MB], x1[MB];
    for (int mm = 0; mm < MB; ++mm) {
      if (kPairs) {
        xv[mm] = _mm512_loadu_si512(xb + (m0 + mm) * L.K + 32 * c);
      } else {
        x0[mm] = _mm512_loadu_ps(x + (m0 + mm) * ldx + 32 * c);
        x1[mm] = _mm512_loadu_ps(x + (m0 + mm) * ldx + 32 * c + 16);
      }
    }
    chunk_avx512<kCareful, NC, MB, kPairs>(acc, p, s, xv, x0, x1);
  }
  return top;
}

// Rows [m0, m0 + MB) of x, columns [c0, c1) in groups of NC, chunks [ch0, ch1) of one chain.
// xb: x as bf16 bits [M][K] (pairs); x, ldx: fp32 x (fp32). A chain of up to
// kChainChunks chunks is walked group by group with the whole chain in registers; a
// longer one in tiles of kTileChunks chunks over blocks of columns, the accumulators
// parked in L1 between tiles, so that the walk reads a few long runs instead of many
// short ones.
template <int NC, int MB, bool kPairs>
GROKIT_AVX512 void groups_avx512(const uint16_t* xb, const float* x, int64_t ldx, const F8Layout& L, int64_t m0,
                                 int64_t ch0, int64_t ch1, int64_t c0, int64_t c1, float* out, int64_t ld) {
  static_assert(NC * MB <= 16 && NC <= 16);
  alignas(64) uint8_t stage[NC * 32];
  alignas(64) float sf[16], sv[16];
  alignas(64) float park[kParkColumns * 16];  // [column group][MB][NC][16 lanes]
  const __m512i nan2 = _mm512_set1_epi8(static_cast<char>(0xfe));  // a NaN code doubled
  const int64_t tile = ch1 - ch0 <= kChainChunks ? ch1 - ch0 : kTileChunks;
  const int64_t block = tile == ch1 - ch0 ? c1 - c0 : kParkColumns / (MB * NC) * NC;
  for (int64_t b0 = c0; b0 < c1; b0 += block) {
    const int64_t b1 = std::min(c1, b0 + block);
    for (int64_t t0 = ch0; t0 < ch1; t0 += tile) {
      const int64_t t1 = std::min(ch1, t0 + tile);
      Prefetcher<NC> prefetch(&L, t0, t1, b0, b1);
      for (int64_t n0 = b0; n0 < b1; n0 += NC) {
        const int nc = static_cast<int>(std::min<int64_t>(NC, b1 - n0));
        if (nc < NC) std::memset(stage, 0, sizeof stage);
        const __mmask16 live = static_cast<__mmask16>((1u << nc) - 1);
        const __m512 s = _mm512_castsi512_ps(
            _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(live, L.scales() + 2 * n0)), 16));
        _mm512_store_ps(sv, s);
        _mm512_store_ps(sf, _mm512_mul_ps(s, _mm512_set1_ps(kTwo8)));
        const __m512 as = _mm512_abs_ps(s);
        const bool big = (_mm512_cmp_ps_mask(as, _mm512_set1_ps(kBigScale), _CMP_GE_OQ) &
                          _mm512_cmp_ps_mask(as, _mm512_set1_ps(std::numeric_limits<float>::infinity()), _CMP_LT_OQ)) != 0;
        float* parked = park + (n0 - b0) / NC * (MB * NC * 16);
        __m512 acc[MB][NC];
        for (int mm = 0; mm < MB; ++mm)
          for (int j = 0; j < NC; ++j)
            acc[mm][j] = t0 == ch0 ? _mm512_setzero_ps() : _mm512_load_ps(parked + (mm * NC + j) * 16);
        bool careful = big;
        if (!careful) {
          const __m512i top = tile_avx512<false, NC, MB, kPairs>(acc, L, xb, x, ldx, m0, t0, t1, n0, nc, stage, sf, &prefetch);
          careful = _mm512_cmpeq_epi8_mask(top, nan2) != 0;
          if (careful) {  // start the tile again (the prefetches are done)
            for (int mm = 0; mm < MB; ++mm)
              for (int j = 0; j < NC; ++j)
                acc[mm][j] = t0 == ch0 ? _mm512_setzero_ps() : _mm512_load_ps(parked + (mm * NC + j) * 16);
          }
        }
        if (careful)
          tile_avx512<true, NC, MB, kPairs>(acc, L, xb, x, ldx, m0, t0, t1, n0, nc, stage, sv, big ? &prefetch : nullptr);
        if (t1 < ch1) {
          for (int mm = 0; mm < MB; ++mm)
            for (int j = 0; j < NC; ++j) _mm512_store_ps(parked + (mm * NC + j) * 16, acc[mm][j]);
          continue;
        }
        __m512 all[16];
        for (int t = 0; t < 16; ++t) all[t] = t < NC * MB ? acc[t / NC][t % NC] : _mm512_setzero_ps();
        const __m512 sums = halve16(all);
        if (MB == 1) {
          _mm512_mask_storeu_ps(out + m0 * ld + (n0 - c0), live, sums);
        } else {
          alignas(64) float sm[16];
          _mm512_store_ps(sm, sums);
          for (int mm = 0; mm < MB; ++mm)
            for (int j = 0; j < nc; ++j) out[(m0 + mm) * ld + (n0 - c0) + j] = sm[mm * NC + j];
        }
      }
    }
  }
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
  run_chunked<kLevel, kPairs>(x, M, K, ldx, F8Layout{payload, K, N}, N, y, ldy, pool, sr);
  return {};
}

template <bool kPairs>
Status dispatch(const float* x, int64_t M, int64_t K, int64_t ldx, const uint8_t* payload, int64_t N, float* y,
                int64_t ldy, Pool pool, int64_t sr) {
  if (use_avx512()) return impl<Level::kAvx512, kPairs>(x, M, K, ldx, payload, N, y, ldy, pool, sr);
  // F16C is CPUID.1:ECX bit 29; asked directly since clang's __builtin_cpu_supports lacks "f16c".
  static const bool f16c = [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    return __get_cpuid(1, &a, &b, &c, &d) != 0 && (c & (1u << 29)) != 0;
  }();
  if (use_avx2() && f16c) return impl<Level::kAvx2, kPairs>(x, M, K, ldx, payload, N, y, ldy, pool, sr);
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
