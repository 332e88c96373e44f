// Macros and helpers for device code that also compiles as plain C++ for a host
// emulation of its kernels in tests (__CUDACC__ undefined). The includer of such a header
// then provides threadIdx, blockIdx, gridDim (thread-local / global), gk_emu_sync() (a
// barrier over the block's threads), gk_emu_smem() (the block's dynamic shared memory),
// gk_emu_pdl_wait(), gk_emu_shfl_xor (a warp's exchange) and whatever else the header names
// (tests/gpu/test_cuda_emulation.cpp). Internal to kernels/cuda.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#include <cuda_runtime.h>
#define GK_HD __host__ __device__ __forceinline__
#define GK_D __device__ __forceinline__
// Kernels are templates, instantiated by the one .cu that launches them.
#define GK_KERNEL_T(threads, min_blocks) __global__ void __launch_bounds__(threads, min_blocks)
// Bounded by the block size alone: ptxas then chooses registers as without a minimum of
// blocks (a minimum of 1 is not neutral: measured, other counts and spills).
#define GK_KERNEL_MAX(threads) __global__ void __launch_bounds__(threads)
#define GK_SHARED __shared__
#define GK_SYNC() __syncthreads()
#else
#include <vector_types.h>
#define GK_HD inline
#define GK_D inline
#define GK_KERNEL_T(threads, min_blocks) inline void
#define GK_KERNEL_MAX(threads) inline void
// Statics in a section of their own, which the emulation poisons before each block (a
// device's shared memory starts with whatever the last block left, never zeros).
#define GK_SHARED static __attribute__((section("gk_emu_shared")))
#define GK_SYNC() gk_emu_sync()
#endif
#if defined(__CUDA_ARCH__)
#define GK_PRAGMA(x) _Pragma(#x)
#define GK_UNROLL _Pragma("unroll")
#define GK_UNROLL_BY(n) GK_PRAGMA(unroll n)
#else
#define GK_UNROLL
#define GK_UNROLL_BY(n)
#endif

namespace grokit::kernels::cuda {

// fp32 arithmetic rounded on its own (never contracted into an fma), as the CPU twins'.
GK_D float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  volatile float r = a + b;
  return r;
#endif
}
GK_D float sub_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  volatile float r = a - b;
  return r;
#endif
}
GK_D float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  volatile float r = a * b;
  return r;
#endif
}
GK_D float div_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  volatile float r = a / b;
  return r;
#endif
}
GK_D float sqrt_rn(float a) {
#if defined(__CUDA_ARCH__)
  return __fsqrt_rn(a);
#else
  return std::sqrt(a);  // IEEE: correctly rounded
#endif
}

// Lane exchange across a full warp.
template <class T>
GK_D T shfl_xor(T v, int mask) {
#if defined(__CUDA_ARCH__)
  return __shfl_xor_sync(0xffffffffu, v, mask);
#elif defined(__CUDACC__)
  return v;  // host pass of nvcc: never called
#else
  return gk_emu_shfl_xor(v, mask);
#endif
}

// Memory order and counters between the blocks of one launch (a last-block combine).
GK_D void fence() {
#if defined(__CUDA_ARCH__)
  __threadfence();
#else
  __atomic_thread_fence(__ATOMIC_SEQ_CST);
#endif
}
GK_D uint32_t atomic_add(uint32_t* p, uint32_t v) {
#if defined(__CUDA_ARCH__)
  return atomicAdd(p, v);
#else
  return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST);
#endif
}
// Programmatic dependent launch (cuda_util.cuh launch_pdl; sm_90 and later): a kernel so
// launched may start while the kernel before it in the stream still runs, once every block
// of that one has called pdl_trigger (or exited). pdl_wait blocks until that kernel has
// completed and its writes are visible. The rule, in every block of a kernel launched so:
// nothing an earlier kernel writes is read, and nothing an earlier kernel reads is written,
// before pdl_wait; before it, only weights (written at load, never during a step) may be
// read. Both are no-ops on older GPUs and in a launch without the attribute; the host
// emulation's pdl_wait (gk_emu_pdl_wait) is where it checks the rule.
GK_D void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#elif !defined(__CUDACC__)
  gk_emu_pdl_wait();
#endif
}
GK_D void pdl_trigger() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: );
#endif
}
// A hint: the 128-byte line at p into L2 (no value comes back; safe on any address a
// kernel may read).
GK_D void prefetch_l2(const void* p) {
#if defined(__CUDA_ARCH__)
  asm volatile("prefetch.global.L2 [%0];" ::"l"(p));
#else
  (void)p;
#endif
}
// prefetch_l2 over the lines of [p, p + bytes), thread t of T taking every T-th line.
GK_D void prefetch_span_l2(const void* p, int64_t bytes, int t, int T) {
  if (bytes <= 0) return;
  const uintptr_t a = reinterpret_cast<uintptr_t>(p), first = a & ~uintptr_t{127};
  for (uintptr_t l = first + static_cast<uintptr_t>(t) * 128; l < a + static_cast<uintptr_t>(bytes);
       l += static_cast<uintptr_t>(T) * 128)
    prefetch_l2(reinterpret_cast<const void*>(l));
}
// A read of data other blocks of this launch wrote (from L2, never a stale L1 line).
template <class T>
GK_D T ldcg(const T* p) {
#if defined(__CUDA_ARCH__)
  return __ldcg(p);
#else
  return *static_cast<const volatile T*>(p);
#endif
}
// The block's dynamic shared memory (16-byte aligned; gk_emu_smem() in emulation).
GK_D float* dyn_smem() {
#if defined(__CUDA_ARCH__)
  extern __shared__ float4 gk_smem4[];
  return reinterpret_cast<float*>(gk_smem4);
#elif defined(__CUDACC__)
  return nullptr;  // host pass of nvcc: never called
#else
  return gk_emu_smem();
#endif
}
// A read of data no block of this launch writes (the read-only path).
template <class T>
GK_D T ldg(const T* p) {
#if defined(__CUDA_ARCH__)
  return __ldg(p);
#else
  return *p;
#endif
}

}  // namespace grokit::kernels::cuda
