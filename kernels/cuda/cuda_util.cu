#include <atomic>
#include <map>
#include <mutex>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "kernels/cuda/cuda_util.cuh"

namespace grokit::kernels::cuda {

namespace {
thread_local char g_error[1024] = "no error";

// Each word is two unsigned ints: [0] the bits raised, [1] where take_device_errors swaps
// them out. One per stream made by stream_create (its ranks' errors are its own, also
// when several ranks share a GPU); the device's static word serves every other stream.
__device__ unsigned int g_device_errors[2];
constexpr int kMaxDevices = 256;
std::atomic<unsigned int*> g_words[kMaxDevices];
std::mutex g_stream_mu;
std::map<cudaStream_t, unsigned int*> g_stream_words;

__global__ void take_errors_kernel(unsigned int* word) { word[1] = atomicExch(&word[0], 0u); }

unsigned int* static_word() {
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= kMaxDevices) {
    (void)cudaGetLastError();
    return nullptr;
  }
  unsigned int* w = g_words[dev].load(std::memory_order_acquire);
  if (w == nullptr) {
    void* p = nullptr;
    if (cudaGetSymbolAddress(&p, g_device_errors) != cudaSuccess) {
      (void)cudaGetLastError();
      return nullptr;
    }
    w = static_cast<unsigned int*>(p);
    g_words[dev].store(w, std::memory_order_release);
  }
  return w;
}
}  // namespace

bool pdl_enabled() {
  static std::atomic<int> major[kMaxDevices];  // compute capability, 0 until asked
  if (const char* v = std::getenv("GROKIT_CUDA_PDL"); v != nullptr && std::strcmp(v, "0") == 0) return false;
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= kMaxDevices) {
    (void)cudaGetLastError();
    return false;
  }
  int m = major[dev].load(std::memory_order_relaxed);
  if (m == 0) {
    if (cudaDeviceGetAttribute(&m, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess) {
      (void)cudaGetLastError();
      return false;
    }
    major[dev].store(m, std::memory_order_relaxed);
  }
  return m >= 9;
}

unsigned int* device_errors_word(cudaStream_t stream) {
  if (stream != nullptr) {
    std::lock_guard<std::mutex> lk(g_stream_mu);
    auto it = g_stream_words.find(stream);
    if (it != g_stream_words.end()) return it->second;
  }
  return static_word();
}

int stream_errors_create(cudaStream_t stream) {
  if (stream == nullptr) return GROKIT_OK;
  void* p = nullptr;
  if (int rc = check_cuda(cudaMalloc(&p, 2 * sizeof(unsigned int)), "stream_create: error word"); rc != GROKIT_OK)
    return rc;
  // Cleared before any kernel of the stream can raise a bit in it.
  if (int rc = check_cuda(cudaMemsetAsync(p, 0, 2 * sizeof(unsigned int), stream), "stream_create: clearing the error word");
      rc != GROKIT_OK) {
    cudaFree(p);
    return rc;
  }
  std::lock_guard<std::mutex> lk(g_stream_mu);
  g_stream_words[stream] = static_cast<unsigned int*>(p);
  return GROKIT_OK;
}

int stream_errors_release(cudaStream_t stream) {
  unsigned int* w = nullptr;
  {
    std::lock_guard<std::mutex> lk(g_stream_mu);
    auto it = g_stream_words.find(stream);
    if (it == g_stream_words.end()) return GROKIT_OK;
    w = it->second;
    g_stream_words.erase(it);
  }
  return check_cuda(cudaFree(w), "stream_destroy: freeing the error word");
}

int take_device_errors(GrokitStream stream, uint32_t* flags) {
  if (flags == nullptr) return set_error(GROKIT_ERR_INVALID, "take_device_errors: null flags");
  *flags = 0;
  const cudaStream_t st = as_stream(stream);
  unsigned int* w = device_errors_word(st);
  if (w == nullptr) return set_error(GROKIT_ERR_DEVICE, "take_device_errors: no error word on this device");
  // Swapped out on the device (atomically: a kernel on another stream may be raising a
  // bit meanwhile), then read.
  take_errors_kernel<<<1, 1, 0, st>>>(w);
  if (int rc = check_launch("take_device_errors: swap kernel"); rc != GROKIT_OK) return rc;
  unsigned int h = 0;
  if (int rc = check_cuda(cudaMemcpyAsync(&h, w + 1, sizeof h, cudaMemcpyDeviceToHost, st), "take_device_errors: copy");
      rc != GROKIT_OK)
    return rc;
  if (int rc = check_cuda(cudaStreamSynchronize(st), "take_device_errors: cudaStreamSynchronize"); rc != GROKIT_OK)
    return rc;
  *flags = h;
  return GROKIT_OK;
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
