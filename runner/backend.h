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

}  // namespace grokit::runner
