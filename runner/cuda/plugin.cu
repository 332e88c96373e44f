// libgrokit_cuda.so: the CUDA backend, opened at run time by the grokit binary.
#include <cuda_runtime.h>
#include <dlfcn.h>

#include <cstdio>
#include <cstring>

#include "kernels/cuda/nccl.h"
#include "kernels/cuda/ops_cuda.h"
#include "runner/cuda/plugin_abi.h"

namespace {

// cudart reports a machine without any NVIDIA driver as cudaErrorInsufficientDriver, the
// same as a driver too old for it: tell the two apart by asking the driver library itself.
void describe_driver_error(cudaError_t e, char* err, size_t err_len) {
  const int rt = CUDART_VERSION;
  if (e == cudaErrorInsufficientDriver) {
    void* h = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    if (h == nullptr) {
      const char* why = dlerror();
      std::snprintf(err, err_len, "no NVIDIA driver is installed (libcuda.so.1 cannot be loaded: %s)",
                    why != nullptr ? why : "not found");
      return;
    }
    auto version = reinterpret_cast<int (*)(int*)>(dlsym(h, "cuDriverGetVersion"));
    int v = 0;
    if (version != nullptr && version(&v) == 0 && v > 0) {
      std::snprintf(err, err_len,
                    "the NVIDIA driver supports CUDA up to %d.%d; this backend was built with CUDA %d.%d: update "
                    "the driver (%s)",
                    v / 1000, v % 1000 / 10, rt / 1000, rt % 1000 / 10, cudaGetErrorName(e));
      dlclose(h);
      return;
    }
    dlclose(h);
  }
  std::snprintf(err, err_len, "%s (%s)", cudaGetErrorString(e), cudaGetErrorName(e));
}

}  // namespace

extern "C" {

__attribute__((visibility("default"))) int grokit_cuda_abi_version(void) { return GROKIT_CUDA_ABI_VERSION; }

__attribute__((visibility("default"))) int grokit_cuda_device_count(char* err, size_t err_len) {
  int n = 0;
  cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess) {
    describe_driver_error(e, err, err_len);
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
