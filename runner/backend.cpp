#include "runner/backend.h"

#include <dlfcn.h>
#include <unistd.h>

#include <climits>
#include <cstdlib>

#include "runner/cuda/plugin_abi.h"

namespace grokit::runner {

static std::string executable_dir() {
  char buf[PATH_MAX];
  ssize_t n = readlink("/proc/self/exe", buf, sizeof buf - 1);
  if (n <= 0) return ".";
  buf[n] = '\0';
  return path_dirname(buf);
}

std::string cuda_plugin_path() {
  if (const char* env = std::getenv("GROKIT_CUDA_PLUGIN"); env != nullptr && *env != '\0') return env;
  std::string bin = executable_dir();
  std::string lib = path_join(path_dirname(bin), "lib/libgrokit_cuda.so");
  if (path_exists(lib)) return lib;
  return path_join(bin, "libgrokit_cuda.so");
}

Result<std::vector<CudaDeviceInfo>> list_cuda_devices() {
  std::string path = cuda_plugin_path();
  if (!path_exists(path))
    return make_error("the CUDA backend is not installed (", path, " is missing; build with -DGROKIT_CUDA=ON)");
  void* h = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (h == nullptr) return make_error("cannot load the CUDA backend ", path, ": ", dlerror());
  auto abi = reinterpret_cast<int (*)()>(dlsym(h, "grokit_cuda_abi_version"));
  auto count = reinterpret_cast<int (*)(char*, size_t)>(dlsym(h, "grokit_cuda_device_count"));
  auto info = reinterpret_cast<int (*)(int, GrokitCudaDevice*)>(dlsym(h, "grokit_cuda_device_info"));
  if (abi == nullptr || count == nullptr || info == nullptr || abi() != GROKIT_CUDA_ABI_VERSION)
    return make_error(path, ": not a compatible grokit CUDA backend");
  char err[256] = {0};
  int n = count(err, sizeof err);
  if (n < 0) return make_error("CUDA is not usable on this machine: ", err);
  std::vector<CudaDeviceInfo> out;
  for (int i = 0; i < n; ++i) {
    GrokitCudaDevice d{};
    if (info(i, &d) != 0) return make_error("CUDA device ", i, ": cannot read its properties");
    out.push_back({i, d.name, d.memory_bytes, d.major, d.minor});
  }
  return out;
}

}  // namespace grokit::runner
