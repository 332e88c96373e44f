// libgrokit_cuda.so: the CUDA backend, opened at run time by the grokit binary.
#include <cuda_runtime.h>

#include <cstdio>
#include <cstring>

#include "kernels/cuda/nccl.h"
#include "kernels/cuda/ops_cuda.h"
#include "runner/cuda/plugin_abi.h"

extern "C" {

__attribute__((visibility("default"))) int grokit_cuda_abi_version(void) { return GROKIT_CUDA_ABI_VERSION; }

__attribute__((visibility("default"))) int grokit_cuda_device_count(char* err, size_t err_len) {
  int n = 0;
  cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess) {
    std::snprintf(err, err_len, "%s (%s)", cudaGetErrorString(e), cudaGetErrorName(e));
    return -1;
  }
  if (n == 0) {
    std::snprintf(err, err_len, "no CUDA device found");
    return -1;
  }
  return n;
}

__attribute__((visibility("default"))) int grokit_cuda_device_info(int index, GrokitCudaDevice* out) {
  cudaDeviceProp p{};
  if (cudaGetDeviceProperties(&p, index) != cudaSuccess) return -1;
  std::memset(out, 0, sizeof *out);
  std::snprintf(out->name, sizeof out->name, "%s", p.name);
  out->memory_bytes = p.totalGlobalMem;
  out->major = p.major;
  out->minor = p.minor;
  return 0;
}

__attribute__((visibility("default"))) const GrokitOps* grokit_cuda_ops(void) {
  return grokit::kernels::cuda::grokit_cuda_ops_table();
}

__attribute__((visibility("default"))) const GrokitCollectives* grokit_cuda_collectives(void) {
  return grokit::kernels::cuda::grokit_cuda_collectives_table();
}

}  // extern "C"
