// RoPE on split halves, as kernels::rope: inv_freq[j] = fp32(1 / base^(2j/dh)) in double,
// phase = fp32(position) * inv_freq[j] in fp32, cos and sin of the phase in double rounded
// to fp32, then x' = bf16(x * cos + rotate_half(x) * sin) with separate fp32 products and
// sum (no fused multiply-add), so the result is the CPU twin's to the bit (up to the last
// double ulp of the library's pow/sin/cos deciding an fp32 rounding, ~2^-28 per value).
#include "kernels/cuda/cuda_util.cuh"
#include "kernels/cuda/rope.h"

namespace grokit::kernels::cuda {

namespace {
constexpr int kThreads = 256;
constexpr int64_t kMaxHeadDim = 8192;  // cos/sin of a row in dynamic shared memory: 4 * dh bytes
}  // namespace

// One block per row (grid-stride over M): the row's half-dim cos/sin table goes to shared
// memory once, then the block rotates all heads of the row (adjacent threads, adjacent j).
static __global__ void __launch_bounds__(kThreads)
    rope_kernel(float* x, int64_t M, int64_t heads, int64_t dh, const int32_t* positions, double base) {
  extern __shared__ float cs[];  // cos [half], then sin [half]
  const int64_t half = dh / 2;
  float* c = cs;
  float* s = cs + half;
  for (int64_t m = blockIdx.x; m < M; m += gridDim.x) {
    const float pos = static_cast<float>(positions[m]);
    for (int64_t j = threadIdx.x; j < half; j += kThreads) {
      const float inv_freq =
          static_cast<float>(1.0 / pow(base, static_cast<double>(2 * j) / static_cast<double>(dh)));
      const double phase = static_cast<double>(__fmul_rn(pos, inv_freq));
      c[j] = static_cast<float>(cos(phase));
      s[j] = static_cast<float>(sin(phase));
    }
    __syncthreads();
    float* row = x + m * heads * dh;
    for (int64_t i = threadIdx.x; i < heads * half; i += kThreads) {
      const int64_t h = i / half, j = i - h * half;
      float* v = row + h * dh;
      const float a = v[j], b = v[j + half];
      v[j] = round_bf16(__fadd_rn(__fmul_rn(a, c[j]), __fmul_rn(-b, s[j])));
      v[j + half] = round_bf16(__fadd_rn(__fmul_rn(b, c[j]), __fmul_rn(a, s[j])));
    }
    __syncthreads();  // the table is rewritten for the next row
  }
}

int rope(float* x, int64_t M, int64_t heads, int64_t dh, const int32_t* positions, double base, GrokitStream stream) {
  if (M < 0) return set_error(GROKIT_ERR_INVALID, "rope: M = %lld", static_cast<long long>(M));
  if (heads <= 0) return set_error(GROKIT_ERR_INVALID, "rope: heads = %lld", static_cast<long long>(heads));
  if (dh <= 0 || dh % 2 != 0) return set_error(GROKIT_ERR_INVALID, "rope: head_dim = %lld (must be even and > 0)",
                                               static_cast<long long>(dh));
  if (dh > kMaxHeadDim)
    return set_error(GROKIT_ERR_UNSUPPORTED, "rope: head_dim = %lld (at most %lld)", static_cast<long long>(dh),
                     static_cast<long long>(kMaxHeadDim));
  if (!(base > 0.0)) return set_error(GROKIT_ERR_INVALID, "rope: base = %g", base);
  if (M == 0) return GROKIT_OK;
  if (x == nullptr || positions == nullptr) return set_error(GROKIT_ERR_INVALID, "rope: null x or positions");
  const unsigned grid = static_cast<unsigned>(M < (1 << 20) ? M : (1 << 20));
  const size_t smem = sizeof(float) * static_cast<size_t>(dh);
  rope_kernel<<<grid, kThreads, smem, as_stream(stream)>>>(x, M, heads, dh, positions, base);
  return check_launch("rope");
}

}  // namespace grokit::kernels::cuda
