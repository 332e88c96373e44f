// The C interface between the grokit binary and libgrokit_cuda.so. Plain C types only:
// the two sides may be built by different compilers.
#pragma once
#include <stddef.h>
#include <stdint.h>

#include "kernels/ops.h"

// The plugin's exports, versioned apart from the op tables (kernels/ops.h). 1: device
// count and info; 2: grokit_cuda_ops, grokit_cuda_collectives (grokit_cuda_read_bandwidth
// and grokit_cuda_file_read are optional exports, looked up by name).
#define GROKIT_CUDA_ABI_VERSION 2

typedef struct GrokitCudaDevice {
  char name[256];
  uint64_t memory_bytes;
  int major, minor;
} GrokitCudaDevice;

#ifdef __cplusplus
extern "C" {
#endif
int grokit_cuda_abi_version(void);
// Number of CUDA devices, or -1 with a reason in err (no driver, no device).
int grokit_cuda_device_count(char* err, size_t err_len);
int grokit_cuda_device_info(int index, GrokitCudaDevice* out);
// The device-op table (kernels/ops.h, backend "cuda"); never NULL.
const GrokitOps* grokit_cuda_ops(void);
// NCCL collectives, loaded at first use; available() says whether NCCL is there.
const GrokitCollectives* grokit_cuda_collectives(void);
#ifdef __cplusplus
}
#endif
