#include "runner/device_layer.h"

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <thread>

namespace grokit::runner {

namespace {

class SoloComm final : public DeviceComm {
 public:
  SoloComm(const GrokitOps* ops, GrokitStream stream) : ops_(ops), stream_(stream) {}
  Status all_reduce_sum(float*, size_t) override { return {}; }
  Status all_gather(const void* send, void* recv, size_t bytes) override {
    if (send != recv) DEV_TRY(ops_, ops_->copy(recv, send, bytes, GROKIT_COPY_D2D, stream_));
    return {};
  }
  bool graph_safe() const override { return true; }
  const char* name() const override { return "none (one rank)"; }

 private:
  const GrokitOps* ops_;
  GrokitStream stream_;
};

// ncclCommAbort runs on a thread of its own: it sets NCCL's abort flag at once (this
// rank's waiting kernels end), then waits until every graph that captured this
// communicator is destroyed (DeviceEngine::run_on_ranks does that once the ranks have
// returned), which it could not do on a rank's thread.
// A watchdog thread asks NCCL every kWatchEvery whether the communicator met an error of
// its own (a peer process on another host died or aborted: this rank's collectives
// would wait for it for ever) and then aborts it, so that the step fails instead.
class NcclComm final : public DeviceComm {
 public:
  static constexpr std::chrono::milliseconds kWatchEvery{100};
  NcclComm(const GrokitOps* ops, const GrokitCollectives* c, void* comm, GrokitStream stream, const char* name)
      : ops_(ops), c_(c), comm_(comm), stream_(stream), name_(name) {
    if (comm_ != nullptr && c_->comm_async_error != nullptr && c_->comm_abort != nullptr)
      watchdog_ = std::thread([this] { watch(); });
  }
  ~NcclComm() override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stopping_ = true;
    }
    wake_.notify_all();
    if (watchdog_.joinable()) watchdog_.join();
    if (aborter_.joinable()) aborter_.join();
    else if (comm_ != nullptr) c_->comm_destroy(comm_);
  }
  void abort() override {
    std::lock_guard<std::mutex> lock(mu_);
    abort_locked("another rank failed");
  }
  bool aborted() const override { return aborted_.load(); }
  std::string abort_reason() const override {
    std::lock_guard<std::mutex> lock(mu_);
    return reason_;
  }
  Status all_reduce_sum(float* data, size_t n) override {
    GROKIT_TRY(check_not_aborted());
    if (c_->all_reduce_sum(data, data, n, comm_, stream_) != GROKIT_OK)
      return make_error(name_, " all-reduce failed: ", ops_->error_message());
    return {};
  }
  Status all_gather(const void* send, void* recv, size_t bytes) override {
    GROKIT_TRY(check_not_aborted());
    if (c_->all_gather(send, recv, bytes, comm_, stream_) != GROKIT_OK)
      return make_error(name_, " all-gather failed: ", ops_->error_message());
    return {};
  }
  bool graph_safe() const override { return true; }
  const char* name() const override { return name_; }

 private:
  Status check_not_aborted() const {
    if (aborted_.load()) return make_error(name_, " communicator aborted: ", abort_reason());
    return {};
  }
  // The first abort wins. Under mu_, so that the watchdog never asks NCCL about a
  // communicator that comm_abort has begun to take down.
  void abort_locked(std::string why) {
    if (comm_ == nullptr || c_->comm_abort == nullptr || aborted_.load()) return;
    reason_ = std::move(why);
    aborted_ = true;
    aborter_ = std::thread([c = c_, comm = comm_] { c->comm_abort(comm); });
    wake_.notify_all();
  }
  void watch() {
    std::unique_lock<std::mutex> lock(mu_);
    while (!stopping_ && !aborted_.load()) {
      int failed = 0;
      char why[256] = {0};
      if (c_->comm_async_error(comm_, &failed, why, sizeof why) == GROKIT_OK && failed != 0) {
        abort_locked(str_cat(name_, " reported an error on this rank's communicator (a peer failed?): ", why));
        return;
      }
      wake_.wait_for(lock, kWatchEvery, [&] { return stopping_ || aborted_.load(); });
    }
  }
  const GrokitOps* ops_;
  const GrokitCollectives* c_;
  void* comm_;
  GrokitStream stream_;
  const char* name_;
  std::atomic<bool> aborted_{false};
  mutable std::mutex mu_;
  std::condition_variable wake_;
  bool stopping_ = false;  // under mu_
  std::string reason_;     // under mu_
  std::thread aborter_;    // started under mu_
  std::thread watchdog_;
};

// Ranks that are threads of this process. When they share one device (or the host
// backend), peers' buffers are read in place and summed by the device (sum_arrays, the
// pairwise tree in rank order); otherwise the data goes through pinned host memory.
// Host barriers make it unfit for graph capture.
class LocalDeviceComm final : public DeviceComm {
 public:
  LocalDeviceComm(const GrokitOps* ops, GrokitStream stream, std::unique_ptr<Communicator> host, bool same_device)
      : ops_(ops), stream_(stream), host_(std::move(host)), same_device_(same_device) {}

  Status all_reduce_sum(float* data, size_t n) override {
    const int N = host_->size();
    const size_t bytes = n * sizeof(float);
    DEV_TRY(ops_, ops_->stream_sync(stream_));
    if (same_device_) {
      std::vector<const float*> parts(static_cast<size_t>(N));
      const float* mine = data;
      host_->all_gather(&mine, parts.data(), sizeof mine);  // also the barrier: all data ready
      GROKIT_TRY(check_peers());
      GROKIT_TRY(scratch_.reserve(ops_, bytes));
      DEV_TRY(ops_, ops_->sum_arrays(parts.data(), N, static_cast<int64_t>(n), scratch_.get<float>(), stream_));
      DEV_TRY(ops_, ops_->stream_sync(stream_));
      host_->barrier();  // every rank has read every part
      GROKIT_TRY(check_peers());
      DEV_TRY(ops_, ops_->copy(data, scratch_.get(), bytes, GROKIT_COPY_D2D, stream_));
      return {};
    }
    GROKIT_TRY(pinned_.reserve(ops_, bytes, true));
    DEV_TRY(ops_, ops_->copy(pinned_.get(), data, bytes, GROKIT_COPY_D2H, stream_));
    DEV_TRY(ops_, ops_->stream_sync(stream_));
    host_->all_reduce_sum(pinned_.get<float>(), n);
    GROKIT_TRY(check_peers());
    DEV_TRY(ops_, ops_->copy(data, pinned_.get(), bytes, GROKIT_COPY_H2D, stream_));
    DEV_TRY(ops_, ops_->stream_sync(stream_));  // the pinned buffer is reused next call
    return {};
  }

  Status all_gather(const void* send, void* recv, size_t bytes) override {
    const int N = host_->size();
    DEV_TRY(ops_, ops_->stream_sync(stream_));
    if (same_device_) {
      std::vector<const void*> parts(static_cast<size_t>(N));
      host_->all_gather(&send, parts.data(), sizeof send);
      GROKIT_TRY(check_peers());
      for (int q = 0; q < N; ++q)
        DEV_TRY(ops_, ops_->copy(static_cast<uint8_t*>(recv) + static_cast<size_t>(q) * bytes, parts[static_cast<size_t>(q)],
                                 bytes, GROKIT_COPY_D2D, stream_));
      DEV_TRY(ops_, ops_->stream_sync(stream_));
      host_->barrier();
      return {};
    }
    GROKIT_TRY(pinned_.reserve(ops_, bytes * static_cast<size_t>(N + 1), true));
    uint8_t* mine = pinned_.get<uint8_t>() + bytes * static_cast<size_t>(N);
    DEV_TRY(ops_, ops_->copy(mine, send, bytes, GROKIT_COPY_D2H, stream_));
    DEV_TRY(ops_, ops_->stream_sync(stream_));
    host_->all_gather(mine, pinned_.get(), bytes);
    GROKIT_TRY(check_peers());
    DEV_TRY(ops_, ops_->copy(recv, pinned_.get(), bytes * static_cast<size_t>(N), GROKIT_COPY_H2D, stream_));
    DEV_TRY(ops_, ops_->stream_sync(stream_));
    return {};
  }

  bool graph_safe() const override { return false; }
  const char* name() const override { return same_device_ ? "in-process (shared device)" : "in-process (via host)"; }
  void abort() override { host_->abort(); }

 private:
  Status check_peers() const {
    if (host_->aborted()) return make_error("a collective was abandoned: another rank failed");
    return {};
  }

  const GrokitOps* ops_;
  GrokitStream stream_;
  std::unique_ptr<Communicator> host_;
  bool same_device_;
  DeviceBuffer scratch_, pinned_;
};

}  // namespace

std::unique_ptr<DeviceComm> make_solo_comm(const GrokitOps* ops, GrokitStream stream) {
  return std::make_unique<SoloComm>(ops, stream);
}
std::unique_ptr<DeviceComm> make_nccl_comm(const GrokitOps* ops, const GrokitCollectives* c, void* comm,
                                           GrokitStream stream, const char* name) {
  return std::make_unique<NcclComm>(ops, c, comm, stream, name);
}
std::unique_ptr<DeviceComm> make_local_device_comm(const GrokitOps* ops, GrokitStream stream,
                                                   std::unique_ptr<Communicator> host, bool same_device) {
  return std::make_unique<LocalDeviceComm>(ops, stream, std::move(host), same_device);
}

Status run_layer(const GrokitOps* ops, GrokitStream st, const DevLayer& Ly, const LayerDims& d, const LayerIO& io,
                 int64_t N, int64_t max_keys, DeviceComm* comm, const LayerChain& chain, LayerProbe* probe) {
  const int64_t D = d.D, QD = d.q_heads * d.head_dim, KVD = d.kv_heads * d.head_dim, F = d.ffn, top = d.top;
  const GrokitAttnShape shape{d.q_heads, d.kv_heads, d.head_dim, d.attn_multiplier, d.attn_cap};
  auto all_reduce = [&](float* p, int64_t n) -> Status {
    return comm != nullptr ? comm->all_reduce_sum(p, static_cast<size_t>(n)) : Status{};
  };
  auto mark = [&](const char* op) -> Status { return probe != nullptr ? probe->mark(op) : Status{}; };
  // Attention.
  if (!chain.input_normed) DEV_TRY(ops, ops->rmsnorm(io.x, N, D, Ly.attn_norm_in, d.eps, io.a, st));
  GROKIT_TRY(mark("input norm"));
  constexpr int32_t kRound = GROKIT_MATMUL_ROUND_BF16;  // y = bf16(x @ W) in the product's own stores
  {  // q, k and v side by side
    const GrokitWeight* w[] = {&Ly.query, &Ly.key, &Ly.value};
    float* y[] = {io.q, io.k, io.v};
    const int64_t ldy[] = {QD, KVD, KVD};
    DEV_TRY(ops, ops->matmul_multi(w, 3, io.a, N, D, kRound, y, ldy, st));
    GROKIT_TRY(mark("q, k, v"));
  }
  DEV_TRY(ops, ops->rope_store(io.q, io.k, io.v, N, io.pos, io.rows, &shape, d.rope_base, st));  // rope q, k; cache k, v
  GROKIT_TRY(mark("rope and cache"));
  DEV_TRY(ops, ops->attention(io.q, N, io.rows, max_keys, &shape, io.o, st));
  GROKIT_TRY(mark("attention"));
  DEV_TRY(ops, ops->matmul(&Ly.output, io.o, N, QD, 0, nullptr, io.tmp, D, st));
  GROKIT_TRY(mark("output projection"));
  GROKIT_TRY(all_reduce(io.tmp, N * D));
  GROKIT_TRY(mark("all-reduce (attention)"));
  // x = bf16(x + rmsnorm(bf16(tmp))); a = rmsnorm(x): the mixture's input.
  DEV_TRY(ops, ops->residual_norm(io.tmp, nullptr, 0, 1, N, D, Ly.attn_norm_out, d.eps, io.x, Ly.moe_norm_in, io.a, st));
  GROKIT_TRY(mark("residual, norms (attn)"));
  // Mixture of experts: routing on the device; each rank its ffn columns.
  const GrokitRouting up_route{io.experts, top}, down_route{io.experts, 1};
  DEV_TRY(ops, ops->router_topk(io.a, N, D, Ly.router, d.experts, top, io.experts, io.gates, st));
  GROKIT_TRY(mark("router"));
  DEV_TRY(ops, ops->matmul(&Ly.gate, io.a, N * top, D, kRound, &up_route, io.g, F, st));
  GROKIT_TRY(mark("expert gate"));
  // g = gelu(g) * bf16(x @ W_up), in the up projection's own stores.
  DEV_TRY(ops, ops->matmul(&Ly.up, io.a, N * top, D, GROKIT_MATMUL_GELU_MUL, &up_route, io.g, F, st));
  GROKIT_TRY(mark("expert up, gelu"));
  DEV_TRY(ops, ops->matmul(&Ly.down, io.g, N * top, F, GROKIT_MATMUL_X_FP32, &down_route, io.routed, D, st));
  GROKIT_TRY(mark("expert down"));
  GROKIT_TRY(all_reduce(io.routed, N * top * D));
  GROKIT_TRY(mark("all-reduce (experts)"));
  // The experts' rows combined, normed and added; the next layer's input norm rides along.
  DEV_TRY(ops, ops->residual_norm(io.routed, io.gates, top, 0, N, D, Ly.moe_norm_out, d.eps, io.x, chain.next_norm_in,
                                  io.a, st));
  GROKIT_TRY(mark("combine, residual, norms"));
  return {};
}

}  // namespace grokit::runner
