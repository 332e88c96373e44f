// grokit quantizers: the release's int8 weights requantized into the k-chunked schemes
// of format/SPEC.md §4.1 (q4g, f8col) or dequantized to bf16, with error statistics.
//
// The source. Every scheme starts from a release int8 matrix (SPEC §4, q8rb): codes
// [K, N] row-major and bf16 scales [B, N], one scale row per block of K/B rows. The
// weight the model uses, and the reference every error here is measured against, is
//
//     w[k][n] = bf16(code[k][n] * scale[block(k)][n])      (fp32 product, bf16 RNE)
//
// An Int8Source names a window of such a matrix: `rows` consecutive rows starting at
// global row `row0` of a matrix of `total_rows` rows, and `cols` consecutive columns:
//
//     codes[k * ld + n]       int8, k in [0, rows), n in [0, cols): global row row0 + k
//     scales[b * lds + n]     bf16 bits, b in [0, blocks): global rows
//                             [b * total_rows / blocks, (b + 1) * total_rows / blocks);
//                             lds = scales_ld, or ld where scales_ld is 0
//
// so a row slice of a row-split matrix (row0 > 0) finds its own blocks. The scales
// pointer covers all `blocks` scale rows of the whole matrix. A column window is a
// pointer offset (codes + c0, scales + c0, the same strides); columns are independent, so
// quantizing [0, c) and [c, N) gives, column for column, the bytes of quantizing [0, N).
// The codes and the scales each keep their own stride: codes read in place from a wide
// matrix (ld its full width) go with scale rows copied for the window only.
//
// The schemes (one block layout each, defined in SPEC §4.1 and sized by format.h):
//
//   q4g    symmetric int4 q in [-7, 7] in groups of G in {32, 64, 128} rows, one bf16 scale
//          per (group, column); stored value bf16(q * scale). Per group:
//            uint8 codes[G/32][cols][16]  chunk c, column j: byte i = row 32c+2i (low
//                                         nibble) | row 32c+2i+1 (high nibble)
//            bf16  scales[cols], zero pad to 16 bytes        (format::q4g_group_bytes)
//          RTN (search = false): scale = bf16(absmax / 7), q = rne(w / scale) clamped.
//          Search (search = true, the default of `grokit quantize`), per (group, column):
//            1. a zero group (all w == 0): scale 0, q 0 (RTN gives the same);
//            2. a group with a non-finite w: scale NaN (0x7fc0), q 0, with or without
//               search (counted in ErrorStats::nonfinite_count, never silent);
//            3. exact grid: when every row of the group uses the same int8 scale s8, all
//               codes are multiples of an integer m with |code / m| <= 7 and s8 * m is a
//               bf16, q = code / m and scale = s8 * m reproduce w exactly (zero error);
//               the smallest such m is taken;
//            4. otherwise the candidates bf16(fp32(absmax / 7) * f) for f = 0.94, 0.88,
//               0.82, 0.76, 0.70 and a least-squares refinement compete; the winner
//               replaces RTN only where its true squared error sum((bf16(q*scale) - w)^2)
//               (fp32, rows in order, q = rne(clamp(w * fp32(1 / scale), -7, 7))) is
//               smaller than RTN's, so search is never worse than RTN on any group.
//               a. Screened, where every row uses one int8 scale s8 (a normal positive
//                  float) and the group's largest |code| is at least 32: each candidate
//                  by its exact squared error in code units, from the codes' magnitudes
//                  a = |c| in 16-bit fixed point (x86 pmulhrsw / pmaddwd, the same
//                  integers on every path): the step r = fp32(scale / s8) must lie in
//                  [1, 4681 / 256]; R = rne(256 r), INV = rne(32768 / r) (at most 32767);
//                  |q| = min((a * INV + 2^14) >> 15, 7), q with the sign of c;
//                  num = sum a |q|, den = sum q q (int32); error = R (R den - 512 num),
//                  which is sum (256 c - q R)^2 less its constant 65536 sum c^2 (int64).
//                  The least error wins (ties: the earlier). Refinement:
//                  bf16(fp32(num) / fp32(den) * s8) with the winner's sums, where it is a
//                  different positive scale in range and its error is smaller.
//               b. Otherwise (mixed int8 scales, small codes): the least true error
//                  among the RTN scale, the five candidates, then the refinement
//                  bf16(sum(w*q) / sum(q*q)) of the best so far (fp32 sums; skipped
//                  when it equals that scale). Ties keep the earlier candidate.
//               The screening picks the same scale as the true error for nearly every
//               group (0.06% more squared error on Laplace-distributed codes) with a
//               quarter of the vector operations per candidate. (Ten factors 0.97, 0.94, ..., 0.70
//               gain 0.2% of error over these five, at twice the time; a second
//               refinement gains nothing.)
//   f8col  OCP E4M3 codes, one bf16 scale per column over all K rows (f8_column_scales:
//          the smallest bf16 >= absmax / 448, so nothing saturates; 0 for a zero column,
//          whose codes are 0); code = f32_to_e4m3(fp32(w / scale)); stored value
//          bf16(e4m3(code) * scale). Layout: uint8 codes[rows/32][cols][32] (chunk c,
//          column j: byte i = row 32c+i), then bf16 scales[cols], zero pad to 16 bytes.
//   bf16   w itself, bf16 bits [rows][cols] row-major (zero error by construction).
//
// Determinism. Every output byte depends only on its own group or column, computed with
// IEEE fp32 operations in a fixed order (no contraction into FMA), so the bytes are the
// same on every CPU (the generic and the AVX2 kernels agree bit for bit), for every
// thread count and every split into calls. quantize_q4g_ref is the scalar ground truth
// the kernels are tested against byte for byte. The functions are single-threaded and
// reentrant; callers parallelize over groups, chunks or column ranges.
//
// Errors. Each function adds to an ErrorStats (when not null): sums over the elements
// of w^2, (w' - w)^2, w * w', w'^2 (w' the stored value), in double (fp32 within one
// column of a group or 32-row chunk, then added to double in column order), the largest |w' - w| in units of the
// target's step at that element, and counts. Elements whose w or w' is not finite are
// left out of the sums; `nonfinite` counts the stored values that are not finite.
// Preconditions (rows a multiple of the group or of 32, blocks dividing total_rows, the
// window inside the matrix) are invariants: a violation aborts with file:line.
#pragma once

#include <cstdint>

namespace grokit::quantize {

struct Int8Source {
  const int8_t* codes = nullptr;     // [rows][ld], the first `cols` of each row used
  const uint16_t* scales = nullptr;  // bf16 bits [blocks][ld] of the whole matrix
  int64_t rows = 0, cols = 0, ld = 0;
  int64_t blocks = 1;                // scale blocks of the whole matrix (q8rb param B)
  int64_t row0 = 0;                  // global index of local row 0
  int64_t total_rows = 0;            // rows of the whole matrix (a multiple of blocks)
  int64_t scales_ld = 0;             // stride of the scale rows; 0: ld

  int64_t scale_stride() const { return scales_ld > 0 ? scales_ld : ld; }
};

struct ErrorStats {
  int64_t count = 0;                 // elements
  double sum_ref2 = 0;               // sum w^2
  double sum_err2 = 0;               // sum (w' - w)^2
  double sum_cross = 0;              // sum w * w'
  double sum_out2 = 0;               // sum w'^2
  double max_steps = 0;              // max |w' - w| / step: int4 the group scale, fp8 the
                                     // E4M3 spacing at |w / scale| times scale, bf16 ulp(w)
  int64_t clipped_count = 0;         // out of the grid's reach: int4 |w/scale| > 7.5,
                                     // fp8 |w/scale| > 448
  int64_t nonfinite_count = 0;       // stored values that are NaN or infinite
  // The RTN baseline of int4 (absmax scale), computed alongside the chosen quantizer.
  // fp8 and bf16 have no search: their baseline sums equal the sums above.
  double rtn_err2 = 0, rtn_cross = 0, rtn_out2 = 0;
  int64_t groups = 0;                // int4: (group, column) pairs
  int64_t exact_groups = 0;          // int4: ... reproduced exactly on the 4-bit grid
  int64_t improved_groups = 0;       // int4: ... where search beat RTN

  // Adds o. Sums are added in the caller's order; max and counts are order-free.
  void merge(const ErrorStats& o);
  double relative_rmse() const;      // sqrt(sum_err2 / sum_ref2); 0 when both are 0
  double cosine() const;             // sum_cross / sqrt(sum_ref2 * sum_out2); 1 when both 0
  double rtn_relative_rmse() const;
  double rtn_cosine() const;
  double max_error_steps() const { return max_steps; }
  double clipped_fraction() const { return count > 0 ? static_cast<double>(clipped_count) / count : 0.0; }
  int64_t nonfinite() const { return nonfinite_count; }
};

// q4g payload of s (s.rows a multiple of group, group in {32, 64, 128}):
// (s.rows / group) * format::q4g_group_bytes(group, s.cols) bytes, padding zeroed.
void quantize_q4g(const Int8Source& s, int64_t group, bool search, uint8_t* out, ErrorStats* stats);
// The scalar reference: the same bytes, one (group, column) at a time.
void quantize_q4g_ref(const Int8Source& s, int64_t group, bool search, uint8_t* out, ErrorStats* stats);

// absmax[j] = max(absmax[j], |w[k][j]|) over the rows of s (NaN weights are skipped,
// infinities kept); call it on every row window of a matrix, starting from zeros.
void column_absmax(const Int8Source& s, float* absmax);
// scales[j] = the smallest bf16 >= absmax[j] / 448 (exactly: scale * 448 >= absmax),
// 0 for absmax 0, +inf for an infinite absmax.
void f8_column_scales(const float* absmax, int64_t n, uint16_t* scales);
// f8col payload of s (s.rows a multiple of 32) with the column scales `scales` [s.cols]:
// format::f8col_matrix_bytes(s.rows, s.cols) bytes: codes, then the scales, padding zeroed.
void quantize_f8col(const Int8Source& s, const uint16_t* scales, uint8_t* out, ErrorStats* stats);
// fp32 -> OCP E4M3, round to nearest even, subnormals (m * 2^-9), saturating to +-448
// (infinities too); NaN -> 0; never the NaN code S.1111.111. -0 -> 0x80.
uint8_t f32_to_e4m3(float v);

// bf16 weights: out[k * s.cols + j] = bits of w[k][j].
void dequantize_bf16(const Int8Source& s, uint16_t* out, ErrorStats* stats);

// For tests and benchmarks: use at most this SIMD level (0 the generic kernels, 1 AVX2,
// 2 AVX-512; -1 the best the CPU has). Returns the level now in use. Every level gives the same
// bytes, so switching while other threads quantize is harmless.
int set_simd_level(int max_level);

}  // namespace grokit::quantize
