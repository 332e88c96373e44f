// fp32 -> fp64 by rebuilding the bits with integer operations (host and device).
//
// Why: on Hopper the F2F.F64.F32 conversion issues at a small fraction of the FP64 rate.
// The router converts both operands of every product: with this, its decode step went
// from 26 to 19 us on the H200 (ncu). Where one conversion serves many products (the
// decode attention's k and v, shared by up to 8 heads) the extra integer instructions
// cost more than they save (25.6 -> 30 us measured), so those keep static_cast.
// Normal numbers and zeros are exact here by construction; subnormals, infinities and
// NaNs (rare) take the hardware conversion. The result equals static_cast<double>(x)
// for every x (tests/unit/test_widen.cpp checks every bf16 value and 4M fp32 ones).
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define GROKIT_HD __host__ __device__ __forceinline__
#else
#define GROKIT_HD inline
#endif

namespace grokit::kernels::cuda {

GROKIT_HD double widen_f32(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  const uint32_t e = (u >> 23) & 0xffu, m = u & 0x7fffffu;
  if (e == 0xffu || (e == 0u && m != 0u)) return static_cast<double>(x);
  // exponent bias 127 -> 1023 (+896); the 23 mantissa bits lead the 52.
  const uint64_t bits = (static_cast<uint64_t>(u & 0x80000000u) << 32) |
                        (static_cast<uint64_t>(e == 0u ? 0u : e + 896u) << 52) | (static_cast<uint64_t>(m) << 29);
  double d;
  std::memcpy(&d, &bits, sizeof d);
  return d;
}

// A bf16 value given by its bits.
GROKIT_HD double widen_bf16(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return widen_f32(f);
}

}  // namespace grokit::kernels::cuda
