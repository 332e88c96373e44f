// The device engine's building blocks (internal to runner/): device memory, collectives
// on device buffers, and one transformer layer as a sequence of device ops
// (kernels/ops.h). The engine and the GPU benchmark (grokit bench-device) run the same
// layer.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "common/common.h"
#include "kernels/ops.h"
#include "runner/runner.h"

namespace grokit::runner {

// ---------------------------------------------------------------------------------
// Op calls: a failed op becomes an error naming the op and the backend's message.
inline Status op_status(const GrokitOps* ops, int rc, const char* what) {
  if (rc == GROKIT_OK) return {};
  return make_error(what, " failed on ", ops->backend, ": ", ops->error_message());
}
#define DEV_TRY(ops, call) GROKIT_TRY(::grokit::runner::op_status((ops), (call), #call))

// Device memory owned by one rank.
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  DeviceBuffer(DeviceBuffer&& o) noexcept { *this = std::move(o); }
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept {
    reset();
    ops_ = o.ops_;
    ptr_ = o.ptr_;
    bytes_ = o.bytes_;
    pinned_ = o.pinned_;
    o.ptr_ = nullptr;
    o.bytes_ = 0;
    return *this;
  }
  ~DeviceBuffer() { reset(); }
  Status allocate(const GrokitOps* ops, size_t bytes, bool pinned = false) {
    reset();
    ops_ = ops;
    pinned_ = pinned;
    if (bytes == 0) return {};
    int rc = pinned ? ops->alloc_pinned(&ptr_, bytes) : ops->alloc(&ptr_, bytes);
    if (rc != GROKIT_OK) {
      ptr_ = nullptr;
      return make_error("cannot allocate ", human_bytes(static_cast<double>(bytes)), pinned ? " of pinned host memory" : " of device memory",
                        " on ", ops->backend, ": ", ops->error_message());
    }
    bytes_ = bytes;
    return {};
  }
  // Grows (never shrinks); the contents are lost when it grows.
  Status reserve(const GrokitOps* ops, size_t bytes, bool pinned = false) {
    if (bytes <= bytes_ && ptr_ != nullptr) return {};
    return allocate(ops, std::max(bytes, bytes_ + bytes_ / 2), pinned);
  }
  void reset() {
    if (ptr_ != nullptr) (pinned_ ? ops_->free_pinned : ops_->free)(ptr_);
    ptr_ = nullptr;
    bytes_ = 0;
  }
  template <class T = void>
  T* get() const {
    return static_cast<T*>(ptr_);
  }
  size_t bytes() const { return bytes_; }

 private:
  const GrokitOps* ops_ = nullptr;
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
  bool pinned_ = false;
};

// ---------------------------------------------------------------------------------
// Collectives on device buffers, on the rank's stream.
class DeviceComm {
 public:
  virtual ~DeviceComm() = default;
  virtual Status all_reduce_sum(float* data, size_t n) = 0;
  // recv = every rank's `bytes` of send, in rank order.
  virtual Status all_gather(const void* send, void* recv, size_t bytes) = 0;
  // Whether these collectives can be captured in a graph.
  virtual bool graph_safe() const = 0;
  virtual const char* name() const = 0;
  // Called (from any thread) when a rank of the group failed: ranks waiting in, or later
  // entering, a collective return an error instead of waiting for it for ever.
  virtual void abort() {}
  // Whether abort() was called: a wait that returned after it may have abandoned a
  // collective, so its results must not be used (an aborted NCCL kernel ends without error).
  virtual bool aborted() const { return false; }
  // Why the collectives were abandoned (once aborted()).
  virtual std::string abort_reason() const { return "another rank failed"; }
};

// One rank alone: collectives are copies at most.
std::unique_ptr<DeviceComm> make_solo_comm(const GrokitOps* ops, GrokitStream stream);
// NCCL, or another table of its shape (takes the communicator); `name` says which.
std::unique_ptr<DeviceComm> make_nccl_comm(const GrokitOps* ops, const GrokitCollectives* c, void* comm,
                                           GrokitStream stream, const char* name = "NCCL");
// Ranks that are threads of this process (`host` carries their barriers): on one device
// (or the host backend) peers' buffers are summed in place by the device; across devices
// through pinned host memory. Not capturable in a graph.
std::unique_ptr<DeviceComm> make_local_device_comm(const GrokitOps* ops, GrokitStream stream,
                                                   std::unique_ptr<Communicator> host, bool same_device);

struct DevLayer {
  GrokitWeight query{}, key{}, value{}, output{}, gate{}, up{}, down{};
  const float *attn_norm_in = nullptr, *attn_norm_out = nullptr, *moe_norm_in = nullptr, *moe_norm_out = nullptr;
  const float* router = nullptr;
};


// The activations one layer reads and writes, for N tokens (device memory, row-major):
// x [N, D] the residual stream (updated in place), a and tmp [N, D] scratch, q and o
// [N, QD], k and v [N, KVD], experts [N, top], gates [N, top], g [N, top, F],
// routed [N, top, D]; pos [N] positions; rows [N] the attention rows of this layer.
struct LayerIO {
  float *x, *a, *tmp, *q, *k, *v, *o, *gates, *g, *routed;
  int32_t *experts;
  const int32_t* pos;
  const GrokitAttnRow* rows;
};

// The dimensions a rank's layer works with.
struct LayerDims {
  int64_t D, head_dim, q_heads, kv_heads, ffn, experts, top;
  float eps, attn_multiplier, attn_cap;
  double rope_base;
};

// How a layer meets its neighbours. Each layer ends with residual_norm, which can also
// write the next layer's normed input into io.a (one launch instead of two).
struct LayerChain {
  bool input_normed = false;           // io.a holds rmsnorm(x, attn_norm_in) already
  const float* next_norm_in = nullptr;  // the next layer's attn_norm_in, or NULL
};

// A hook a benchmark passes to run_layer to time its ops: mark(op) runs after each op is
// enqueued, and may wait for the stream (never pass one while capturing a graph).
class LayerProbe {
 public:
  virtual ~LayerProbe() = default;
  virtual Status mark(const char* op) = 0;
};

// One layer, on `stream`: attention (rmsnorm unless chained, q/k/v, rope and cache in
// one op, attention, output, all-reduce, then rmsnorm, residual and the mixture's rmsnorm
// in one op) then the mixture of experts (router, gate, then up with the gelu in its
// stores, both routed on the device, down, all-reduce, then the combine, rmsnorm,
// residual and the next layer's rmsnorm in one op). comm may be null for a rank measured
// alone.
Status run_layer(const GrokitOps* ops, GrokitStream stream, const DevLayer& layer, const LayerDims& dims,
                 const LayerIO& io, int64_t N, int64_t max_keys, DeviceComm* comm, const LayerChain& chain,
                 LayerProbe* probe = nullptr);

}  // namespace grokit::runner
