// Shared by the CUDA ops: error reporting in the ops.h convention and the bf16 helpers
// every kernel needs. Internal to kernels/cuda.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <utility>

#include "kernels/cuda/emulable.cuh"
#include "kernels/ops.h"

namespace grokit::kernels::cuda {

// The calling thread's last error message (ops.h error_message).
const char* last_error();
// Sets the message (printf-style) and returns code.
int set_error(int code, const char* fmt, ...) __attribute__((format(printf, 2, 3)));
// GROKIT_OK, or GROKIT_ERR_DEVICE with "<what>: <CUDA error>" when e is an error.
int check_cuda(cudaError_t e, const char* what);
// After a kernel launch: the launch error, if any (does not wait for the kernel).
inline int check_launch(const char* what) { return check_cuda(cudaGetLastError(), what); }

// Whether launch_pdl asks for programmatic dependent launch: the current device is sm_90 or
// later, and GROKIT_CUDA_PDL is not "0" (read at each call, so that a benchmark can time a
// step captured each way).
bool pdl_enabled();
// kernel<<<grid, block, smem, stream>>>(args...), allowed to overlap the end of the kernel
// before it in the stream where pdl_enabled(). Only for kernels that keep pdl_wait's rule
// (emulable.cuh) in every block. Returns the launch's error.
template <class... P, class... A>
cudaError_t launch_pdl(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream, A&&... args) {
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cfg.attrs = attr;
  // Not on the legacy default stream (no overlap is wanted there; its implicit
  // synchronization with other streams is kept whole).
  cfg.numAttrs = stream != nullptr && stream != cudaStreamLegacy && pdl_enabled() ? 1 : 0;
  return cudaLaunchKernelEx(&cfg, kernel, std::forward<A>(args)...);
}

inline cudaStream_t as_stream(GrokitStream s) { return static_cast<cudaStream_t>(s); }

// The word the kernels launched on `stream` raise their GROKIT_DEVERR_* bits in (ops.h
// take_device_errors), or NULL when it cannot be had (nothing is recorded then). A stream
// made by stream_create has its own; any other stream shares its device's, found once per
// device (set_device does it, outside any graph capture). A captured graph raises in the
// word of the stream it was captured on.
unsigned int* device_errors_word(cudaStream_t stream);
// The word of a stream made by stream_create, and its release by stream_destroy.
int stream_errors_create(cudaStream_t stream);
int stream_errors_release(cudaStream_t stream);
// ops.h take_device_errors.
int take_device_errors(GrokitStream stream, uint32_t* flags);
__device__ __forceinline__ void raise_device_error(unsigned int* word, unsigned int bit) {
  if (word != nullptr) atomicOr(word, bit);
}

// True when p is 16-byte aligned (float4 / uint4 access).
inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// Grid size for a grid-stride loop over n items of `threads` threads each, capped (the
// loop covers the rest).
inline unsigned blocks_for(int64_t n, int threads) {
  int64_t b = (n + threads - 1) / threads;
  return static_cast<unsigned>(b < 1 ? 1 : (b > 65535LL * 1024 ? 65535LL * 1024 : b));
}

// bf16 as the CPU kernels do it: round to nearest even, NaN kept a (quiet) NaN.
__device__ __forceinline__ float round_bf16(float x) {
  uint32_t u = __float_as_uint(x);
  if ((u & 0x7fffffffu) > 0x7f800000u) return __uint_as_float((u | 0x00400000u) & 0xffff0000u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return __uint_as_float(u & 0xffff0000u);
}
__device__ __forceinline__ uint16_t f32_to_bf16_bits(float x) {
  return static_cast<uint16_t>(__float_as_uint(round_bf16(x)) >> 16);
}
__device__ __forceinline__ float bf16_bits_to_f32(uint16_t h) { return __uint_as_float(static_cast<uint32_t>(h) << 16); }

constexpr unsigned kFullWarp = 0xffffffffu;

// Sum over the warp by xor butterfly (every lane gets the total).
__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o >= 1; o /= 2) v = __fadd_rn(v, __shfl_xor_sync(kFullWarp, v, o));
  return v;
}

}  // namespace grokit::kernels::cuda
