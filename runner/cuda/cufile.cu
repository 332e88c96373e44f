// GPUDirect Storage: a file range read straight into device memory with cuFile, where
// libcufile is installed (opened at run time, so the plugin needs it only when asked).
//
// The few cuFile declarations used are written out here (no cufile.h at build time);
// they follow cuFile's stable C ABI: CUfileError_t {CUfileOpError err; CUresult cu_err},
// CUfileDescr_t {type; union {int fd; void* handle}; const CUfileFSOps_t* fs_ops},
// handle type 1 = a Linux file descriptor; cuFileRead returns bytes read or a negative
// error.
#include <cuda_runtime.h>
#include <dlfcn.h>
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <mutex>

namespace {

struct CuFileError {
  int err;     // CUfileOpError, 0 = success
  int cu_err;  // CUresult
};
struct CuFileDescr {
  int type;  // 1: CU_FILE_HANDLE_TYPE_OPAQUE_FD
  union {
    int fd;
    void* handle;
  } handle;
  const void* fs_ops;
};
using CuFileHandle = void*;

struct CuFile {
  CuFileError (*driver_open)() = nullptr;
  CuFileError (*handle_register)(CuFileHandle*, CuFileDescr*) = nullptr;
  void (*handle_deregister)(CuFileHandle) = nullptr;
  ssize_t (*read)(CuFileHandle, void*, size_t, off_t, off_t) = nullptr;
  CuFileError (*buf_register)(const void*, size_t, int) = nullptr;
  CuFileError (*buf_deregister)(const void*) = nullptr;
  char why_not[256] = {0};  // empty when usable
};

// Opened once per process; the driver stays open until exit.
const CuFile& cufile() {
  static CuFile f;
  static std::once_flag once;
  std::call_once(once, [] {
    void* h = dlopen("libcufile.so.0", RTLD_NOW | RTLD_LOCAL);
    if (h == nullptr) h = dlopen("libcufile.so", RTLD_NOW | RTLD_LOCAL);
    if (h == nullptr) {
      std::snprintf(f.why_not, sizeof f.why_not, "libcufile is not installed (%s)", dlerror());
      return;
    }
    f.driver_open = reinterpret_cast<CuFileError (*)()>(dlsym(h, "cuFileDriverOpen"));
    f.handle_register = reinterpret_cast<CuFileError (*)(CuFileHandle*, CuFileDescr*)>(dlsym(h, "cuFileHandleRegister"));
    f.handle_deregister = reinterpret_cast<void (*)(CuFileHandle)>(dlsym(h, "cuFileHandleDeregister"));
    f.read = reinterpret_cast<ssize_t (*)(CuFileHandle, void*, size_t, off_t, off_t)>(dlsym(h, "cuFileRead"));
    f.buf_register = reinterpret_cast<CuFileError (*)(const void*, size_t, int)>(dlsym(h, "cuFileBufRegister"));
    f.buf_deregister = reinterpret_cast<CuFileError (*)(const void*)>(dlsym(h, "cuFileBufDeregister"));
    if (f.driver_open == nullptr || f.handle_register == nullptr || f.handle_deregister == nullptr ||
        f.read == nullptr) {
      std::snprintf(f.why_not, sizeof f.why_not, "libcufile lacks the cuFile entry points");
      return;
    }
    CuFileError e = f.driver_open();
    if (e.err != 0)
      std::snprintf(f.why_not, sizeof f.why_not, "cuFileDriverOpen failed (cuFile error %d, CUDA error %d)", e.err,
                    e.cu_err);
  });
  return f;
}

}  // namespace

// Reads bytes [offset, offset + bytes) of `path` into dst (memory of `device`).
// Returns 0 when done (*seconds: the reads), 1 when cuFile cannot serve this file here
// (not installed, no driver, a file system it refuses: err says why; nothing was
// written), -1 on a failed read (err says where).
extern "C" __attribute__((visibility("default"))) int grokit_cuda_file_read(int device, const char* path,
                                                                            unsigned long long offset,
                                                                            unsigned long long bytes, void* dst,
                                                                            double* seconds, char* err,
                                                                            size_t err_len) {
  const CuFile& f = cufile();
  if (f.why_not[0] != 0) return std::snprintf(err, err_len, "%s", f.why_not), 1;
  cudaError_t ce = cudaSetDevice(device);
  if (ce != cudaSuccess) return std::snprintf(err, err_len, "device %d: %s", device, cudaGetErrorString(ce)), -1;
  int fd = open(path, O_RDONLY | O_DIRECT | O_CLOEXEC);
  if (fd < 0 && errno == EINVAL) fd = open(path, O_RDONLY | O_CLOEXEC);  // no O_DIRECT on this file system
  if (fd < 0) return std::snprintf(err, err_len, "%s: cannot open: %s", path, std::strerror(errno)), -1;
  CuFileDescr descr{};
  descr.type = 1;
  descr.handle.fd = fd;
  CuFileHandle fh = nullptr;
  CuFileError e = f.handle_register(&fh, &descr);
  if (e.err != 0) {
    close(fd);
    return std::snprintf(err, err_len, "cuFile does not take %s (cuFileHandleRegister: cuFile error %d)", path, e.err),
           1;
  }
  const bool registered = f.buf_register != nullptr && f.buf_register(dst, bytes, 0).err == 0;
  const auto t0 = std::chrono::steady_clock::now();
  int rc = 0;
  constexpr unsigned long long kChunk = 1ull << 30;  // cuFile reads at most 2 GiB - 4 KiB per call
  for (unsigned long long done = 0; done < bytes;) {
    const size_t want = static_cast<size_t>(std::min(kChunk, bytes - done));
    const ssize_t n = f.read(fh, dst, want, static_cast<off_t>(offset + done), static_cast<off_t>(done));
    if (n <= 0) {
      if (n == 0)
        std::snprintf(err, err_len, "%s: cuFileRead at byte %llu: unexpected end of file", path, offset + done);
      else if (n == -1)
        std::snprintf(err, err_len, "%s: cuFileRead at byte %llu: %s", path, offset + done, std::strerror(errno));
      else
        std::snprintf(err, err_len, "%s: cuFileRead at byte %llu: cuFile error %lld", path, offset + done,
                      static_cast<long long>(-n));
      rc = -1;
      break;
    }
    done += static_cast<unsigned long long>(n);
  }
  *seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  if (registered) f.buf_deregister(dst);
  f.handle_deregister(fh);
  close(fd);
  return rc;
}
