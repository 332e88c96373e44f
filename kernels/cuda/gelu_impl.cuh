// gelu(x) * u as kernels::gelu_mul computes it, for the CUDA ops that apply it
// (gelu_mul.cu, and the weight products' GROKIT_MATMUL_GELU_MUL epilogue): every fp32
// product and sum rounded on its own (no fused multiply-add), tanh in double rounded to
// fp32. Also compiles as plain C++ (the host emulation of the weight products).
#pragma once

#if defined(__CUDACC__)
#define GROKIT_GELU_HD __host__ __device__ __forceinline__
#else
#include <cmath>
#define GROKIT_GELU_HD inline
#endif

namespace grokit::kernels::cuda {

// x * (0.5 * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3)))) times u.
GROKIT_GELU_HD float gelu_times(float x, float u) {
#if defined(__CUDA_ARCH__)
  const float x3 = __fmul_rn(__fmul_rn(x, x), x);
  const float inner = __fmul_rn(0.7978845608028654f, __fadd_rn(x, __fmul_rn(0.044715f, x3)));
  const float th = static_cast<float>(tanh(static_cast<double>(inner)));
  return __fmul_rn(__fmul_rn(x, __fmul_rn(0.5f, __fadd_rn(1.0f, th))), u);
#else
  const float x2 = x * x;
  const float x3 = x2 * x;
  const float cubic = 0.044715f * x3;
  const float sum = x + cubic;
  const float inner = 0.7978845608028654f * sum;
  const float th = static_cast<float>(std::tanh(static_cast<double>(inner)));
  const float half = 0.5f * (1.0f + th);
  const float xh = x * half;
  return xh * u;
#endif
}

}  // namespace grokit::kernels::cuda
