// The device's read bandwidth, measured by a read-only kernel (grokit bench-device).
#include <cuda_runtime.h>

#include <cstdio>

namespace {

// Grid-stride over 16-byte loads; the sum is written only when it equals a value it
// never takes, so the loads stay and nothing else touches memory.
__global__ void read_kernel(const float4* __restrict__ p, size_t n, float never, float* sink) {
  float acc = 0.f;
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    float4 v = __ldcs(p + i);  // streaming: do not keep it in L2
    acc += v.x + v.y + v.z + v.w;
  }
  if (acc == never) *sink = acc;
}

int fail(cudaError_t e, const char* what, char* err, size_t len) {
  std::snprintf(err, len, "%s: %s", what, cudaGetErrorString(e));
  return -1;
}

}  // namespace

extern "C" __attribute__((visibility("default"))) int grokit_cuda_read_bandwidth(int device, unsigned long long bytes,
                                                                                 int reps, double* gbps, char* err,
                                                                                 size_t err_len) {
  cudaError_t e = cudaSetDevice(device);
  if (e != cudaSuccess) return fail(e, "cudaSetDevice", err, err_len);
  const size_t n = static_cast<size_t>(bytes / sizeof(float4));
  float4* buf = nullptr;
  float* sink = nullptr;
  if ((e = cudaMalloc(&buf, n * sizeof(float4))) != cudaSuccess) return fail(e, "cudaMalloc", err, err_len);
  if ((e = cudaMalloc(&sink, sizeof(float))) != cudaSuccess) {
    cudaFree(buf);
    return fail(e, "cudaMalloc", err, err_len);
  }
  cudaMemset(buf, 0, n * sizeof(float4));
  int sms = 0;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  cudaEvent_t t0, t1;
  cudaEventCreate(&t0);
  cudaEventCreate(&t1);
  float best_ms = 1e30f;
  for (int r = 0; r < reps + 1; ++r) {  // the first run warms up
    cudaEventRecord(t0);
    read_kernel<<<sms * 8, 512>>>(buf, n, 1.0f, sink);
    cudaEventRecord(t1);
    cudaEventSynchronize(t1);
    float ms = 0;
    cudaEventElapsedTime(&ms, t0, t1);
    if (r > 0 && ms < best_ms) best_ms = ms;
  }
  e = cudaGetLastError();
  cudaEventDestroy(t0);
  cudaEventDestroy(t1);
  cudaFree(buf);
  cudaFree(sink);
  if (e != cudaSuccess) return fail(e, "read kernel", err, err_len);
  *gbps = static_cast<double>(n * sizeof(float4)) / (best_ms * 1e-3) / 1e9;
  return 0;
}
