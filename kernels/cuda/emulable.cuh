// Macros for device code that also compiles as plain C++ for a host emulation of its
// kernels in tests (__CUDACC__ undefined). The includer of such a header then provides
// threadIdx, blockIdx, gridDim (thread-local / global), gk_emu_sync() (a barrier over the
// block's threads) and whatever else the header names (tests/gpu/test_cuda_emulation.cpp).
// Internal to kernels/cuda.
#pragma once

#if defined(__CUDACC__)
#include <cuda_runtime.h>
#define GK_HD __host__ __device__ __forceinline__
#define GK_D __device__ __forceinline__
// Kernels are templates, instantiated by the one .cu that launches them.
#define GK_KERNEL_T(threads, min_blocks) __global__ void __launch_bounds__(threads, min_blocks)
#define GK_SHARED __shared__
#define GK_SYNC() __syncthreads()
#else
#include <vector_types.h>
#define GK_HD inline
#define GK_D inline
#define GK_KERNEL_T(threads, min_blocks) inline void
#define GK_SHARED static
#define GK_SYNC() gk_emu_sync()
#endif
#if defined(__CUDA_ARCH__)
#define GK_UNROLL _Pragma("unroll")
#else
#define GK_UNROLL
#endif
