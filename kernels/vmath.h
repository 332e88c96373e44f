// tanh and exp of fp32 values in double lanes, for the SIMD twins of tanh_f and exp_f
// (internal.h), which compute in double and round once to fp32.
//
// Both reduce to r = y - k ln2 with |r| <= ln2 / 2 (ln2 in two parts, the first with 32
// trailing zero bits, so k * hi is exact) and take expm1(r) by Taylor to r^13 (the
// truncation is below 2^-57 relative). That is a few ulps of double, as glibc's and
// CUDA's tanh and exp are, so rounding to fp32 gives the same value as the scalar twin
// except where the result lies within about 2^-50 of an fp32 rounding midpoint (none in
// the tests' sweeps of 10^7 inputs).
//
// GCC vector types: the same code in 4 (AVX2) or 8 (AVX-512) double lanes, inlined into
// each target's loop (callers are built with -ffp-contract=off, so the fp32 operations
// around these match the scalar code's).
#pragma once

#include <cstdint>

namespace grokit::kernels::detail {

typedef float f32x4 __attribute__((vector_size(16)));
typedef double f64x4 __attribute__((vector_size(32)));
typedef uint64_t u64x4 __attribute__((vector_size(32)));
typedef float f32x8 __attribute__((vector_size(32)));
typedef double f64x8 __attribute__((vector_size(64)));
typedef uint64_t u64x8 __attribute__((vector_size(64)));

#define GROKIT_VMATH inline __attribute__((always_inline))

// expm1(r) for |r| <= ln2 / 2.
template <class D>
GROKIT_VMATH D expm1_reduced(D r) {
  D p = D{} + 1.0 / 6227020800.0;  // 1/13!
  p = p * r + 1.0 / 479001600.0;
  p = p * r + 1.0 / 39916800.0;
  p = p * r + 1.0 / 3628800.0;
  p = p * r + 1.0 / 362880.0;
  p = p * r + 1.0 / 40320.0;
  p = p * r + 1.0 / 5040.0;
  p = p * r + 1.0 / 720.0;
  p = p * r + 1.0 / 120.0;
  p = p * r + 1.0 / 24.0;
  p = p * r + 1.0 / 6.0;
  p = p * r + 0.5;
  return (p * r) * r + r;
}

// y = k ln2 + r; returns r and 2^k (k + 1023 must lie in [1, 2046]).
template <class D, class U>
GROKIT_VMATH D reduce_ln2(D y, D* two_k) {
  const double kMagic = 6755399441055744.0;  // 1.5 * 2^52: t + kMagic rounds t to an integer
  D kd = y * 1.4426950408889634 + kMagic;
  const U kbits = (U)kd;  // the low bits hold k (two's complement)
  kd = kd - kMagic;
  const U two_bits = (kbits + 1023) << 52;
  *two_k = (D)two_bits;
  return (y - kd * 6.93147180369123816490e-01) - kd * 1.90821492927058770002e-10;
}

template <class D, class U>
GROKIT_VMATH D tanh_lanes(D x) {
  const U sign = ((U)x) & 0x8000000000000000ull;
  const U abits = ((U)x) & 0x7fffffffffffffffull;
  D a = (D)abits;
  const D kCap = D{} + 20.0;  // tanh(20) = 1 - 8e-18: 1 in double; keeps inf finite
  a = a < kCap ? a : kCap;
  D two_k;
  const D p = expm1_reduced(reduce_ln2<D, U>(a + a, &two_k));
  const D e = two_k * p + (two_k - 1.0);  // expm1(2a) = 2^k (1 + p) - 1
  const D t = e / (e + 2.0);
  const U tbits = ((U)t) | sign;
  return x == x ? (D)tbits : x;  // NaN stays NaN
}

template <class D, class U>
GROKIT_VMATH D exp_lanes(D x) {
  // Below -120 the fp32 result is 0, above 100 it is inf: clamping changes neither.
  const D lo = D{} - 120.0, hi = D{} + 100.0;
  D y = x < lo ? lo : x;
  y = y > hi ? hi : y;
  D two_k;
  const D p = expm1_reduced(reduce_ln2<D, U>(y, &two_k));
  const D e = two_k * p + two_k;
  return x == x ? e : x;
}

}  // namespace grokit::kernels::detail
