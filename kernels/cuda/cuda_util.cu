#include <cstdarg>
#include <cstdio>

#include "kernels/cuda/cuda_util.cuh"

namespace grokit::kernels::cuda {

namespace {
thread_local char g_error[1024] = "no error";
}

const char* last_error() { return g_error; }

int set_error(int code, const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  std::vsnprintf(g_error, sizeof g_error, fmt, ap);
  va_end(ap);
  return code;
}

int check_cuda(cudaError_t e, const char* what) {
  if (e == cudaSuccess) return GROKIT_OK;
  (void)cudaGetLastError();  // clear it, so that the next launch check does not see it again
  return set_error(e == cudaErrorMemoryAllocation ? GROKIT_ERR_MEMORY : GROKIT_ERR_DEVICE, "%s: %s (%s)", what,
                   cudaGetErrorString(e), cudaGetErrorName(e));
}

}  // namespace grokit::kernels::cuda
