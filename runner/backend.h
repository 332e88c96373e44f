// Run-time loading of the CUDA backend.
//
// The grokit binary links no CUDA library, so it starts on any machine. The CUDA backend
// is a plugin (libgrokit_cuda.so) opened with dlopen only when a command asks for a GPU;
// on a machine without a GPU, a driver or the plugin, that command fails with a message
// that says which.
#pragma once

#include <string>
#include <vector>

#include "common/common.h"
#include "kernels/ops.h"

namespace grokit::runner {

struct CudaDeviceInfo {
  int index = 0;
  std::string name;
  uint64_t memory_bytes = 0;
  int compute_major = 0, compute_minor = 0;
};

// Where the plugin is looked for: $GROKIT_CUDA_PLUGIN, else beside the executable
// (<bin>/../lib/libgrokit_cuda.so, then <bin>/libgrokit_cuda.so).
std::string cuda_plugin_path();
Result<std::vector<CudaDeviceInfo>> list_cuda_devices();
// The CUDA plugin's device ops and collectives (the plugin stays loaded). The ops fail
// here, with the reason, when there is no usable device.
Result<const GrokitOps*> cuda_ops();
Result<const GrokitCollectives*> cuda_collectives();
// The device's read bandwidth in GB/s, by a read-only kernel over `bytes` (best of reps).
Result<double> cuda_read_bandwidth(int device, uint64_t bytes, int reps = 5);
// GPUDirect Storage: bytes [offset, offset + bytes) of `path` read with cuFile straight
// into dst (memory of CUDA device `device`). false (and *why_not) when cuFile cannot serve
// the file on this machine (not installed, no driver, a file system it refuses); an
// error when a read fails.
Result<bool> cuda_file_read(int device, const std::string& path, uint64_t offset, uint64_t bytes, void* dst,
                            double* seconds, std::string* why_not);
// The ops of a device engine backend: "cuda" or "host" (kernels/ops.h).
Result<const GrokitOps*> device_ops(const std::string& backend);

}  // namespace grokit::runner
