// kernels/cuda/widen.h: the integer fp32 -> fp64 widening equals the hardware's.
#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <limits>
#include <random>

#include "kernels/cuda/widen.h"

namespace {

uint64_t bits_of(double d) {
  uint64_t b;
  std::memcpy(&b, &d, sizeof b);
  return b;
}
float float_of(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

TEST(Widen, EveryBf16Value) {
  for (uint32_t h = 0; h < 65536; ++h) {
    const double want = static_cast<double>(float_of(h << 16));
    const double got = grokit::kernels::cuda::widen_bf16(static_cast<uint16_t>(h));
    if (want != want) {
      EXPECT_NE(got, got) << "bf16 bits " << h;
    } else {
      ASSERT_EQ(bits_of(got), bits_of(want)) << "bf16 bits " << h;
    }
  }
}

TEST(Widen, Fp32EdgesAndASample) {
  const float edges[] = {0.0f, -0.0f, 1.0f, -1.0f, std::numeric_limits<float>::min(), std::numeric_limits<float>::max(),
                         -std::numeric_limits<float>::max(), std::numeric_limits<float>::denorm_min(),
                         -std::numeric_limits<float>::denorm_min(), std::numeric_limits<float>::infinity(),
                         -std::numeric_limits<float>::infinity(), float_of(0x007fffffu), float_of(0x00800001u),
                         float_of(0x7f7fffffu), 3.14159274f, 1e-30f, 78.5f};
  for (float x : edges)
    ASSERT_EQ(bits_of(grokit::kernels::cuda::widen_f32(x)), bits_of(static_cast<double>(x))) << x;
  std::mt19937 rng(11);
  for (int i = 0; i < 4000000; ++i) {
    const float x = float_of(static_cast<uint32_t>(rng()));
    if (x != x) continue;  // NaNs: checked below
    ASSERT_EQ(bits_of(grokit::kernels::cuda::widen_f32(x)), bits_of(static_cast<double>(x))) << x;
  }
  const double nan = grokit::kernels::cuda::widen_f32(std::numeric_limits<float>::quiet_NaN());
  EXPECT_NE(nan, nan);
}

}  // namespace
