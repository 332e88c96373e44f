// The GrokitOps table of the CUDA backend: runtime calls for devices, memory, streams,
// events and graphs, and the kernels of kernels/cuda/<op>.cu. Errors go through
// cuda_util's per-thread message.
#include <cstdio>
#include <new>

#include "kernels/cuda/add_bf16.h"
#include "kernels/cuda/residual_norm.h"
#include "kernels/cuda/rope_store.h"
#include "kernels/cuda/attention.h"
#include "kernels/cuda/cuda_util.cuh"
#include "kernels/cuda/embed.h"
#include "kernels/cuda/gelu_mul.h"
#include "kernels/cuda/kv_store.h"
#include "kernels/cuda/logits.h"
#include "kernels/cuda/matmul.h"
#include "kernels/cuda/moe_combine.h"
#include "kernels/cuda/ops_cuda.h"
#include "kernels/cuda/rmsnorm.h"
#include "kernels/cuda/rope.h"
#include "kernels/cuda/round_bf16.h"
#include "kernels/cuda/router_topk.h"
#include "kernels/cuda/sum_arrays.h"

namespace grokit::kernels::cuda {

namespace {

const char* error_message() { return last_error(); }

// check_cuda, and a failed runtime call's error taken off the thread's last-error state,
// so that the next kernel's check_launch does not report it again.
int call(cudaError_t e, const char* what) {
  if (e != cudaSuccess) (void)cudaGetLastError();
  return check_cuda(e, what);
}

// ---- devices ------------------------------------------------------------------------
int device_count(int* count) {
  if (count == nullptr) return set_error(GROKIT_ERR_INVALID, "device_count: null count");
  *count = 0;
  return call(cudaGetDeviceCount(count), "cudaGetDeviceCount");
}

int set_device(int device) {
  if (device < 0) return set_error(GROKIT_ERR_INVALID, "set_device: device = %d", device);
  if (int rc = call(cudaSetDevice(device), "cudaSetDevice"); rc != GROKIT_OK) return rc;
  // Found here, before any capture: the ops look it up while a graph may be captured.
  if (device_errors_word(nullptr) == nullptr)
    return set_error(GROKIT_ERR_DEVICE, "set_device: device %d: its error word cannot be found", device);
  return GROKIT_OK;
}

int device_name(int device, char* name, size_t len, uint64_t* memory_bytes) {
  if (device < 0) return set_error(GROKIT_ERR_INVALID, "device_name: device = %d", device);
  cudaDeviceProp p{};
  if (int rc = call(cudaGetDeviceProperties(&p, device), "cudaGetDeviceProperties"); rc != GROKIT_OK) return rc;
  if (name != nullptr && len > 0) std::snprintf(name, len, "%s", p.name);
  if (memory_bytes != nullptr) *memory_bytes = p.totalGlobalMem;
  return GROKIT_OK;
}

int memory_info(int device, uint64_t* free_bytes, uint64_t* total_bytes) {
  if (device < 0) return set_error(GROKIT_ERR_INVALID, "memory_info: device = %d", device);
  if (free_bytes == nullptr || total_bytes == nullptr) return set_error(GROKIT_ERR_INVALID, "memory_info: null result");
  int previous = 0;
  if (int rc = call(cudaGetDevice(&previous), "cudaGetDevice"); rc != GROKIT_OK) return rc;
  if (int rc = call(cudaSetDevice(device), "cudaSetDevice"); rc != GROKIT_OK) return rc;
  size_t free = 0, total = 0;
  const int rc = call(cudaMemGetInfo(&free, &total), "cudaMemGetInfo");
  (void)cudaSetDevice(previous);
  *free_bytes = free;
  *total_bytes = total;
  return rc;
}

// ---- memory -------------------------------------------------------------------------
// Zero bytes still give a distinct pointer (one byte), as the host backend does.
int alloc(void** ptr, size_t bytes) {
  if (ptr == nullptr) return set_error(GROKIT_ERR_INVALID, "alloc: null ptr");
  *ptr = nullptr;
  const cudaError_t e = cudaMalloc(ptr, bytes > 0 ? bytes : 1);
  if (e != cudaSuccess) {
    *ptr = nullptr;
    (void)cudaGetLastError();
    return set_error(e == cudaErrorMemoryAllocation ? GROKIT_ERR_MEMORY : GROKIT_ERR_DEVICE,
                     "cudaMalloc of %zu bytes: %s (%s)", bytes, cudaGetErrorString(e), cudaGetErrorName(e));
  }
  return GROKIT_OK;
}

int free_device(void* ptr) { return ptr == nullptr ? GROKIT_OK : call(cudaFree(ptr), "cudaFree"); }

// Portable: usable for copies by every device's context (one thread per GPU shares it).
int alloc_pinned(void** ptr, size_t bytes) {
  if (ptr == nullptr) return set_error(GROKIT_ERR_INVALID, "alloc_pinned: null ptr");
  *ptr = nullptr;
  const cudaError_t e = cudaHostAlloc(ptr, bytes > 0 ? bytes : 1, cudaHostAllocPortable);
  if (e != cudaSuccess) {
    *ptr = nullptr;
    (void)cudaGetLastError();
    return set_error(e == cudaErrorMemoryAllocation ? GROKIT_ERR_MEMORY : GROKIT_ERR_DEVICE,
                     "cudaHostAlloc of %zu bytes: %s (%s)", bytes, cudaGetErrorString(e), cudaGetErrorName(e));
  }
  return GROKIT_OK;
}

int free_pinned(void* ptr) { return ptr == nullptr ? GROKIT_OK : call(cudaFreeHost(ptr), "cudaFreeHost"); }

// Read-only registration: the driver pins the pages without asking for write access,
// which a PROT_READ mapping of a file refuses. Portable, like the staging buffers.
int host_register(void* ptr, size_t bytes) {
  if (ptr == nullptr || bytes == 0) return set_error(GROKIT_ERR_INVALID, "host_register: null ptr or 0 bytes");
  int device = 0, read_only = 0, supported = 0;
  if (int rc = call(cudaGetDevice(&device), "cudaGetDevice"); rc != GROKIT_OK) return rc;
  (void)cudaDeviceGetAttribute(&supported, cudaDevAttrHostRegisterSupported, device);
  (void)cudaDeviceGetAttribute(&read_only, cudaDevAttrHostRegisterReadOnlySupported, device);
  (void)cudaGetLastError();
  if (supported == 0 || read_only == 0)
    return set_error(GROKIT_ERR_UNSUPPORTED,
                     "device %d cannot register read-only host memory (cudaDevAttrHostRegisterSupported %d, "
                     "cudaDevAttrHostRegisterReadOnlySupported %d)",
                     device, supported, read_only);
  const cudaError_t e = cudaHostRegister(ptr, bytes, cudaHostRegisterPortable | cudaHostRegisterReadOnly);
  if (e != cudaSuccess) {
    (void)cudaGetLastError();
    return set_error(e == cudaErrorNotSupported || e == cudaErrorNotPermitted ? GROKIT_ERR_UNSUPPORTED
                     : e == cudaErrorMemoryAllocation                          ? GROKIT_ERR_MEMORY
                                                                               : GROKIT_ERR_DEVICE,
                     "cudaHostRegister (read-only) of %zu bytes: %s (%s)", bytes, cudaGetErrorString(e),
                     cudaGetErrorName(e));
  }
  return GROKIT_OK;
}
int host_unregister(void* ptr) { return call(cudaHostUnregister(ptr), "cudaHostUnregister"); }

int copy(void* dst, const void* src, size_t bytes, int kind, GrokitStream stream) {
  cudaMemcpyKind k;
  switch (kind) {
    case GROKIT_COPY_H2D: k = cudaMemcpyHostToDevice; break;
    case GROKIT_COPY_D2H: k = cudaMemcpyDeviceToHost; break;
    case GROKIT_COPY_D2D: k = cudaMemcpyDeviceToDevice; break;
    default: return set_error(GROKIT_ERR_INVALID, "copy: kind = %d", kind);
  }
  if (bytes == 0) return GROKIT_OK;
  if (dst == nullptr || src == nullptr) return set_error(GROKIT_ERR_INVALID, "copy: null dst or src (%zu bytes)", bytes);
  return call(cudaMemcpyAsync(dst, src, bytes, k, as_stream(stream)), "cudaMemcpyAsync");
}

int fill(void* dst, int byte, size_t bytes, GrokitStream stream) {
  if (bytes == 0) return GROKIT_OK;
  if (dst == nullptr) return set_error(GROKIT_ERR_INVALID, "fill: null dst (%zu bytes)", bytes);
  return call(cudaMemsetAsync(dst, byte, bytes, as_stream(stream)), "cudaMemsetAsync");
}

// ---- streams and events ---------------------------------------------------------------
// Non-blocking: no implicit synchronization with the legacy default stream.
int stream_create(GrokitStream* stream) {
  if (stream == nullptr) return set_error(GROKIT_ERR_INVALID, "stream_create: null stream");
  cudaStream_t s = nullptr;
  if (int rc = call(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), "cudaStreamCreateWithFlags");
      rc != GROKIT_OK)
    return rc;
  if (int rc = stream_errors_create(s); rc != GROKIT_OK) {
    cudaStreamDestroy(s);
    return rc;
  }
  *stream = s;
  return GROKIT_OK;
}

int stream_destroy(GrokitStream stream) {
  if (stream == nullptr) return GROKIT_OK;  // the default stream is not ours to destroy
  // The scratch matmul and attention keep per (device, stream) would otherwise outlive the stream
  // (and be inherited by the next stream given the same handle). Callers destroy the
  // graphs captured on the stream first (matmul.h).
  const int rc = matmul_release_stream(stream);
  const int rc1 = attention_release_stream(stream);
  const int rc2 = call(cudaStreamDestroy(as_stream(stream)), "cudaStreamDestroy");
  const int rc3 = stream_errors_release(as_stream(stream));
  return rc != GROKIT_OK ? rc : rc1 != GROKIT_OK ? rc1 : rc2 != GROKIT_OK ? rc2 : rc3;
}

int stream_sync(GrokitStream stream) {
  return call(cudaStreamSynchronize(as_stream(stream)), "cudaStreamSynchronize");
}

// Timing disabled: the lightest events, for ordering streams and waiting on the host.
int event_create(void** event) {
  if (event == nullptr) return set_error(GROKIT_ERR_INVALID, "event_create: null event");
  cudaEvent_t e = nullptr;
  if (int rc = call(cudaEventCreateWithFlags(&e, cudaEventDisableTiming), "cudaEventCreateWithFlags");
      rc != GROKIT_OK)
    return rc;
  *event = e;
  return GROKIT_OK;
}

int event_destroy(void* event) {
  if (event == nullptr) return GROKIT_OK;
  return call(cudaEventDestroy(static_cast<cudaEvent_t>(event)), "cudaEventDestroy");
}

int event_record(void* event, GrokitStream stream) {
  if (event == nullptr) return set_error(GROKIT_ERR_INVALID, "event_record: null event");
  return call(cudaEventRecord(static_cast<cudaEvent_t>(event), as_stream(stream)), "cudaEventRecord");
}

int event_sync(void* event) {
  if (event == nullptr) return set_error(GROKIT_ERR_INVALID, "event_sync: null event");
  return call(cudaEventSynchronize(static_cast<cudaEvent_t>(event)), "cudaEventSynchronize");
}

int stream_wait_event(GrokitStream stream, void* event) {
  if (event == nullptr) return set_error(GROKIT_ERR_INVALID, "stream_wait_event: null event");
  return call(cudaStreamWaitEvent(as_stream(stream), static_cast<cudaEvent_t>(event), 0), "cudaStreamWaitEvent");
}

// ---- graphs ---------------------------------------------------------------------------
// A captured graph and its executable instance, handed out as one opaque pointer.
struct Graph {
  cudaGraph_t graph = nullptr;
  cudaGraphExec_t exec = nullptr;
};

// Thread-local capture mode: other threads (other ranks' streams) keep working while
// this one captures, and unsafe calls from this thread fail instead of being captured.
int graph_begin(GrokitStream stream) {
  if (stream == nullptr) return set_error(GROKIT_ERR_INVALID, "graph_begin: the default stream cannot be captured");
  return call(cudaStreamBeginCapture(as_stream(stream), cudaStreamCaptureModeThreadLocal),
                    "cudaStreamBeginCapture");
}

int graph_end(GrokitStream stream, void** graph) {
  if (graph == nullptr) return set_error(GROKIT_ERR_INVALID, "graph_end: null graph");
  *graph = nullptr;
  cudaGraph_t g = nullptr;
  // Ends the capture even when it failed, so the stream is usable again.
  if (int rc = call(cudaStreamEndCapture(as_stream(stream), &g), "cudaStreamEndCapture"); rc != GROKIT_OK) {
    if (g != nullptr) cudaGraphDestroy(g);
    return rc;
  }
  if (g == nullptr) return set_error(GROKIT_ERR_DEVICE, "cudaStreamEndCapture: no graph captured");
  cudaGraphExec_t exec = nullptr;
  if (int rc = call(cudaGraphInstantiate(&exec, g, 0), "cudaGraphInstantiate"); rc != GROKIT_OK) {
    cudaGraphDestroy(g);
    return rc;
  }
  Graph* h = new (std::nothrow) Graph{g, exec};
  if (h == nullptr) {
    cudaGraphExecDestroy(exec);
    cudaGraphDestroy(g);
    return set_error(GROKIT_ERR_MEMORY, "graph_end: out of host memory");
  }
  *graph = h;
  return GROKIT_OK;
}

int graph_launch(void* graph, GrokitStream stream) {
  if (graph == nullptr) return set_error(GROKIT_ERR_INVALID, "graph_launch: null graph");
  return call(cudaGraphLaunch(static_cast<Graph*>(graph)->exec, as_stream(stream)), "cudaGraphLaunch");
}

int graph_destroy(void* graph) {
  if (graph == nullptr) return GROKIT_OK;
  Graph* h = static_cast<Graph*>(graph);
  int rc = call(cudaGraphExecDestroy(h->exec), "cudaGraphExecDestroy");
  int rc2 = call(cudaGraphDestroy(h->graph), "cudaGraphDestroy");
  delete h;
  return rc != GROKIT_OK ? rc : rc2;
}

GrokitOps make_table() {
  GrokitOps t{};
  t.abi_version = GROKIT_OPS_ABI_VERSION;
  t.backend = "cuda";
  t.error_message = error_message;
  t.device_count = device_count;
  t.set_device = set_device;
  t.device_name = device_name;
  t.memory_info = memory_info;
  t.alloc = alloc;
  t.free = free_device;
  t.alloc_pinned = alloc_pinned;
  t.free_pinned = free_pinned;
  t.host_register = host_register;
  t.host_unregister = host_unregister;
  t.copy = copy;
  t.fill = fill;
  t.stream_create = stream_create;
  t.stream_destroy = stream_destroy;
  t.stream_sync = stream_sync;
  t.event_create = event_create;
  t.event_destroy = event_destroy;
  t.event_record = event_record;
  t.event_sync = event_sync;
  t.stream_wait_event = stream_wait_event;
  t.graph_begin = graph_begin;
  t.graph_end = graph_end;
  t.graph_launch = graph_launch;
  t.graph_destroy = graph_destroy;
  t.prepare_scratch_bytes = prepare_scratch_bytes;
  t.prepare_weight = prepare_weight;
  t.embed = embed;
  t.rmsnorm = rmsnorm;
  t.rope = rope;
  t.kv_store = kv_store;
  t.rope_store = rope_store;
  t.attention = attention;
  t.router_topk = router_topk;
  t.matmul = matmul;
  t.matmul_multi = matmul_multi;
  t.gelu_mul = gelu_mul;
  t.round_bf16 = round_bf16;
  t.add_bf16 = add_bf16;
  t.residual_norm = residual_norm;
  t.moe_combine = moe_combine;
  t.logits = logits;
  t.sum_arrays = sum_arrays;
  t.take_device_errors = take_device_errors;
  return t;
}

}  // namespace

const GrokitOps* grokit_cuda_ops_table() {
  static const GrokitOps table = make_table();
  return &table;
}

}  // namespace grokit::kernels::cuda
