// out[i] = tree_sum(parts[0][i], ..., parts[count-1][i]): level by level, v[j] = v[2j] +
// v[2j+1], an odd last value carried up, exactly kernels::tree_sum's order and fp32
// rounding, so the result is the CPU twin's to the bit.
#include "kernels/cuda/cuda_util.cuh"
#include "kernels/cuda/sum_arrays.h"

namespace grokit::kernels::cuda {

namespace {
constexpr int kThreads = 256;
constexpr int kMaxParts = 64;

// The part pointers travel by value in the kernel parameters (512 bytes).
struct Parts {
  const float* p[kMaxParts];
};

__device__ __forceinline__ float add(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ float4 add(float4 a, float4 b) {
  return make_float4(__fadd_rn(a.x, b.x), __fadd_rn(a.y, b.y), __fadd_rn(a.z, b.z), __fadd_rn(a.w, b.w));
}

// The tree over count <= kMax values held in registers: the loops unroll completely
// (kMax is a power of two), so every index is a constant; `live` only predicates.
template <int kMax, class T>
__device__ __forceinline__ T tree(T (&v)[kMax], int count) {
  int live = count;
#pragma unroll
  for (int width = kMax; width > 1; width = (width + 1) / 2) {
#pragma unroll
    for (int j = 0; j < (width + 1) / 2; ++j) {
      if (2 * j + 1 < live) v[j] = add(v[2 * j], v[2 * j + 1]);
      else if (2 * j < live) v[j] = v[2 * j];
    }
    live = (live + 1) / 2;
  }
  return v[0];
}
}  // namespace

// Grid-stride over n (float4 groups when kVec, then the last n % 4 singly). out may be
// one of the parts: each element's inputs are all read before it is written.
template <int kMax, bool kVec>
static __global__ void __launch_bounds__(kThreads) sum_arrays_kernel(Parts parts, int count, int64_t n, float* out) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  int64_t done = 0;
  if constexpr (kVec) {
    const int64_t n4 = n / 4;
    for (int64_t i = first; i < n4; i += stride) {
      float4 v[kMax];
#pragma unroll
      for (int j = 0; j < kMax; ++j)
        v[j] = j < count ? reinterpret_cast<const float4*>(parts.p[j])[i] : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
      reinterpret_cast<float4*>(out)[i] = tree<kMax>(v, count);
    }
    done = n4 * 4;
  }
  for (int64_t i = done + first; i < n; i += stride) {
    float v[kMax];
#pragma unroll
    for (int j = 0; j < kMax; ++j) v[j] = j < count ? parts.p[j][i] : 0.0f;
    out[i] = tree<kMax>(v, count);
  }
}

template <int kMax, bool kVec>
static void launch(const Parts& parts, int count, int64_t n, float* out, cudaStream_t stream) {
  const int64_t items = kVec ? (n + 3) / 4 : n;
  sum_arrays_kernel<kMax, kVec><<<blocks_for(items, kThreads), kThreads, 0, stream>>>(parts, count, n, out);
}

int sum_arrays(const float* const* parts, int count, int64_t n, float* out, GrokitStream stream) {
  if (n < 0) return set_error(GROKIT_ERR_INVALID, "sum_arrays: n = %lld", static_cast<long long>(n));
  if (count <= 0 || count > kMaxParts)
    return set_error(count <= 0 ? GROKIT_ERR_INVALID : GROKIT_ERR_UNSUPPORTED, "sum_arrays: count = %d (1 to %d)",
                     count, kMaxParts);
  if (n == 0) return GROKIT_OK;
  if (parts == nullptr || out == nullptr) return set_error(GROKIT_ERR_INVALID, "sum_arrays: null parts or out");
  Parts p{};
  bool aligned = aligned16(out);
  for (int j = 0; j < count; ++j) {
    if (parts[j] == nullptr) return set_error(GROKIT_ERR_INVALID, "sum_arrays: part %d is null", j);
    p.p[j] = parts[j];
    aligned = aligned && aligned16(parts[j]);
  }
  cudaStream_t s = as_stream(stream);
  // float4 registers for up to 8 parts (32 values), single floats beyond.
  if (count <= 2) aligned ? launch<2, true>(p, count, n, out, s) : launch<2, false>(p, count, n, out, s);
  else if (count <= 4) aligned ? launch<4, true>(p, count, n, out, s) : launch<4, false>(p, count, n, out, s);
  else if (count <= 8) aligned ? launch<8, true>(p, count, n, out, s) : launch<8, false>(p, count, n, out, s);
  else if (count <= 16) launch<16, false>(p, count, n, out, s);
  else if (count <= 32) launch<32, false>(p, count, n, out, s);
  else launch<64, false>(p, count, n, out, s);
  return check_launch("sum_arrays");
}

}  // namespace grokit::kernels::cuda
