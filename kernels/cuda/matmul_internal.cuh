// Host side shared by the launchers of the CUDA weight products (matmul.cu,
// matmul_prefill.cu, prepare_weight.cu). Internal to kernels/cuda.
#pragma once

#include <cublasLt.h>

#include <array>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <vector>

#include "kernels/cuda/cuda_util.cuh"
#include "kernels/cuda/matmul.h"
#include "kernels/cuda/matmul_device.cuh"

namespace grokit::kernels::cuda::mm {

constexpr int64_t kDecodeRows = 16;        // plain products: decode up to this many rows
constexpr int64_t kDecodeRoutedRows = 64;  // routed products: decode up to this many rows


// Checks w (op names the caller in messages) and fills d. Layout 0 of every dtype is
// accepted, and layout 1 of q8rb.
int describe(const char* op, const GrokitWeight* w, WDesc* d);

// Device memory kept per (device, stream).
struct DevBuf {
  void* p = nullptr;
  size_t bytes = 0;
  bool in_graph = false;  // a capture used it: never freed before release
  bool async = false;     // from cudaMallocAsync
};

// Pinned host memory kept per (device, stream): int32 elements.
struct HostBuf {
  int32_t* p = nullptr;
  size_t count = 0;
};
// Makes b hold at least `count` elements. Only between uses: the stream has finished
// every copy from or to b (its caller waited for the stream since).
int ensure_host(HostBuf& b, size_t count);
void free_host(HostBuf& b);

struct Ctx {
  std::mutex mu;  // held for a whole call
  int device = 0;
  cudaStream_t stream = nullptr;
  DevBuf partial, counters;            // decode split-k
  DevBuf wb, xb, yt, rows, ws;         // prefill: bf16 weight, bf16 x (hi, lo), y rows, row list, cuBLASLt
  DevBuf gt;                           // prefill with GROKIT_MATMUL_GELU_MUL: the product before the gelu
  std::vector<DevBuf> retired;         // replaced while a graph may still use them
  cublasLtHandle_t lt = nullptr;
  std::map<std::array<int64_t, 8>, cublasLtMatmulAlgo_t> algos;
  // Pinned, so that the copies of routed prefill never hold the driver in a pageable
  // copy while other ranks' collectives wait (one process driving several GPUs).
  HostBuf host_ids, host_rows;
};

// The context of (current device, stream); created on first use.
int context(cudaStream_t stream, Ctx** ctx);
// *cap: the stream is capturing a graph (no allocation, no host wait then).
int stream_capturing(cudaStream_t stream, bool* cap);
int sm_count(int device);
// Makes b hold at least `bytes` (zeroed when zero) and sets *ok. While capturing nothing
// is allocated: *ok says whether b is already large enough (and marks it used by a graph).
int ensure(Ctx& c, DevBuf& b, size_t bytes, bool capturing, bool zero, bool* ok);

// The tensor-core path. *done = false (and GROKIT_OK) when it cannot run without
// allocating or waiting while the stream is capturing: the caller then decodes.
int run_prefill(Ctx& c, const WDesc& d, const float* x, int64_t M, int64_t ldx, bool x_fp32,
                const GrokitRouting* routing, float* y, int64_t ldy, bool capturing, bool* done);

}  // namespace grokit::kernels::cuda::mm
