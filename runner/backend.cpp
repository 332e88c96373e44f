#include "runner/backend.h"

#include <dlfcn.h>
#include <unistd.h>

#include <climits>
#include <cstdlib>
#include <mutex>
#include <optional>

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

namespace {

struct Plugin {
  void* handle = nullptr;
  int (*count)(char*, size_t) = nullptr;
  int (*info)(int, GrokitCudaDevice*) = nullptr;
  const GrokitOps* (*ops)() = nullptr;
  const GrokitCollectives* (*collectives)() = nullptr;
  int (*read_bandwidth)(int, unsigned long long, int, double*, char*, size_t) = nullptr;
  int (*file_read)(int, const char*, unsigned long long, unsigned long long, void*, double*, char*, size_t) = nullptr;
};

// Opened once; never closed (its code may run until exit).
Result<Plugin> open_plugin() {
  static std::mutex mu;
  static std::optional<Result<Plugin>> cached;
  std::lock_guard<std::mutex> lock(mu);
  if (cached) return *cached;
  auto attempt = [&]() -> Result<Plugin> {
    std::string path = cuda_plugin_path();
    if (!path_exists(path))
      return make_error("the CUDA backend is not installed (", path, " is missing; build with -DGROKIT_CUDA=ON)");
    void* h = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (h == nullptr) return make_error("cannot load the CUDA backend ", path, ": ", dlerror());
    auto abi = reinterpret_cast<int (*)()>(dlsym(h, "grokit_cuda_abi_version"));
    Plugin p;
    p.handle = h;
    p.count = reinterpret_cast<int (*)(char*, size_t)>(dlsym(h, "grokit_cuda_device_count"));
    p.info = reinterpret_cast<int (*)(int, GrokitCudaDevice*)>(dlsym(h, "grokit_cuda_device_info"));
    p.ops = reinterpret_cast<const GrokitOps* (*)()>(dlsym(h, "grokit_cuda_ops"));
    p.collectives = reinterpret_cast<const GrokitCollectives* (*)()>(dlsym(h, "grokit_cuda_collectives"));
    p.read_bandwidth = reinterpret_cast<int (*)(int, unsigned long long, int, double*, char*, size_t)>(
        dlsym(h, "grokit_cuda_read_bandwidth"));
    p.file_read = reinterpret_cast<int (*)(int, const char*, unsigned long long, unsigned long long, void*, double*,
                                           char*, size_t)>(dlsym(h, "grokit_cuda_file_read"));
    if (abi == nullptr || p.count == nullptr || p.info == nullptr || abi() != GROKIT_CUDA_ABI_VERSION)
      return make_error(path, ": not a compatible grokit CUDA backend (ABI ", abi == nullptr ? -1 : abi(), ", expected ",
                        GROKIT_CUDA_ABI_VERSION, ")");
    return p;
  };
  cached = attempt();
  return *cached;
}

}  // namespace

Result<std::vector<CudaDeviceInfo>> list_cuda_devices() {
  GROKIT_ASSIGN_OR_RETURN(Plugin p, open_plugin());
  char err[256] = {0};
  int n = p.count(err, sizeof err);
  if (n < 0) return make_error("CUDA is not usable on this machine: ", err);
  std::vector<CudaDeviceInfo> out;
  for (int i = 0; i < n; ++i) {
    GrokitCudaDevice d{};
    if (p.info(i, &d) != 0) return make_error("CUDA device ", i, ": cannot read its properties");
    out.push_back({i, d.name, d.memory_bytes, d.major, d.minor});
  }
  return out;
}

Result<const GrokitOps*> cuda_ops() {
  GROKIT_ASSIGN_OR_RETURN(Plugin p, open_plugin());
  if (p.ops == nullptr) return make_error(cuda_plugin_path(), ": the CUDA backend has no device ops");
  char err[256] = {0};
  if (p.count(err, sizeof err) < 0) return make_error("CUDA is not usable on this machine: ", err);
  const GrokitOps* ops = p.ops();
  if (ops == nullptr || ops->abi_version != GROKIT_OPS_ABI_VERSION)
    return make_error(cuda_plugin_path(), ": device ops ABI ", ops == nullptr ? -1 : ops->abi_version, ", expected ",
                      GROKIT_OPS_ABI_VERSION);
  return ops;
}

Result<const GrokitCollectives*> cuda_collectives() {
  GROKIT_ASSIGN_OR_RETURN(Plugin p, open_plugin());
  if (p.collectives == nullptr) return make_error(cuda_plugin_path(), ": the CUDA backend has no collectives");
  const GrokitCollectives* c = p.collectives();
  if (c == nullptr) return make_error(cuda_plugin_path(), ": no collectives");
  if (c->abi_version != GROKIT_OPS_ABI_VERSION)
    return make_error(cuda_plugin_path(), ": collectives ABI ", c->abi_version, ", expected ", GROKIT_OPS_ABI_VERSION);
  return c;
}

Result<double> cuda_read_bandwidth(int device, uint64_t bytes, int reps) {
  GROKIT_ASSIGN_OR_RETURN(Plugin p, open_plugin());
  if (p.read_bandwidth == nullptr) return make_error(cuda_plugin_path(), ": no bandwidth probe");
  char err[256] = {0};
  double gbps = 0;
  if (p.read_bandwidth(device, bytes, reps, &gbps, err, sizeof err) != 0)
    return make_error("measuring the read bandwidth of CUDA device ", device, ": ", err);
  return gbps;
}

Result<bool> cuda_file_read(int device, const std::string& path, uint64_t offset, uint64_t bytes, void* dst,
                            double* seconds, std::string* why_not) {
  GROKIT_ASSIGN_OR_RETURN(Plugin p, open_plugin());
  char err[512] = {0};
  double s = 0;
  const int rc = p.file_read == nullptr ? 1 : p.file_read(device, path.c_str(), offset, bytes, dst, &s, err, sizeof err);
  if (rc < 0) return make_error("GPUDirect Storage read: ", err);
  if (rc > 0) {
    if (why_not != nullptr) *why_not = p.file_read == nullptr ? "the CUDA backend has no cuFile reader" : err;
    return false;
  }
  if (seconds != nullptr) *seconds = s;
  return true;
}

Result<const GrokitOps*> device_ops(const std::string& backend) {
  if (backend == "host") return grokit_host_ops();
  if (backend == "cuda") return cuda_ops();
  return make_error("unknown device backend '", backend, "' (cuda, host)");
}

}  // namespace grokit::runner
