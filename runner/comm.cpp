// The in-process communicator: ranks are threads; collectives meet at a barrier.
#include <atomic>
#include <cstring>

#include "runner/runner.h"

namespace grokit::runner {
namespace {

// A barrier that spins briefly before it sleeps: collectives come every few hundred
// microseconds during a forward pass, and a futex wake-up costs as much.
// abort() releases every waiter, present and future, for good.
class SpinBarrier {
 public:
  explicit SpinBarrier(int n) : n_(n) {}
  void arrive_and_wait() {
    if (aborted()) return;
    uint32_t phase = phase_.load(std::memory_order_acquire);
    if (count_.fetch_add(1, std::memory_order_acq_rel) + 1 == n_) {
      count_.store(0, std::memory_order_relaxed);
      phase_.fetch_add(1, std::memory_order_release);
      phase_.notify_all();
      return;
    }
    for (int i = 0; i < 2000; ++i) {  // some tens of microseconds, then sleep
      if (phase_.load(std::memory_order_acquire) != phase || aborted()) return;
      __builtin_ia32_pause();
    }
    while (phase_.load(std::memory_order_acquire) == phase && !aborted()) phase_.wait(phase, std::memory_order_acquire);
  }
  void abort() {
    aborted_.store(true, std::memory_order_release);
    phase_.fetch_add(1, std::memory_order_release);
    phase_.notify_all();
  }
  bool aborted() const { return aborted_.load(std::memory_order_acquire); }

 private:
  const int n_;
  std::atomic<int> count_{0};
  std::atomic<uint32_t> phase_{0};
  std::atomic<bool> aborted_{false};
};

struct Hub {
  explicit Hub(int n) : ranks(n), sync(n), ptrs(static_cast<size_t>(n), nullptr) {}
  int ranks;
  SpinBarrier sync;
  std::vector<const void*> ptrs;
};

class LocalCommunicator final : public Communicator {
 public:
  LocalCommunicator(std::shared_ptr<Hub> hub, int rank) : hub_(std::move(hub)), rank_(rank) {}
  int rank() const override { return rank_; }
  int size() const override { return hub_->ranks; }

  void all_reduce_sum(float* data, size_t n) override {
    const int N = hub_->ranks;
    if (N == 1) return;
    hub_->ptrs[static_cast<size_t>(rank_)] = data;
    hub_->sync.arrive_and_wait();
    if (hub_->sync.aborted()) return;  // a peer's pointer may be stale
    // Each rank reduces its own slice of every buffer, in rank order, and writes the
    // sum back to all of them: no element is touched by two ranks.
    size_t per = (n + static_cast<size_t>(N) - 1) / static_cast<size_t>(N);
    size_t a = std::min(n, per * static_cast<size_t>(rank_)), b = std::min(n, a + per);
    // Blocks of the slice gathered per rank, then kernels::tree_sum's tree level by level
    // across the block (the same adds per element, vectorized).
    constexpr size_t kBlock = 2048;
    thread_local std::vector<float> t;
    t.resize(static_cast<size_t>(N) * kBlock);
    auto peer = [&](int q) { return const_cast<float*>(static_cast<const float*>(hub_->ptrs[static_cast<size_t>(q)])); };
    for (size_t i0 = a; i0 < b; i0 += kBlock) {
      const size_t len = std::min(kBlock, b - i0);
      for (int q = 0; q < N; ++q) std::memcpy(t.data() + static_cast<size_t>(q) * kBlock, peer(q) + i0, len * 4);
      for (int m = N; m > 1;) {
        const int half = m / 2;
        for (int i = 0; i < half; ++i) {
          float* d = t.data() + static_cast<size_t>(i) * kBlock;
          const float* x = t.data() + static_cast<size_t>(2 * i) * kBlock;
          const float* y = x + kBlock;
          for (size_t c = 0; c < len; ++c) d[c] = x[c] + y[c];
        }
        if (m % 2 != 0)
          std::memcpy(t.data() + static_cast<size_t>(half) * kBlock, t.data() + static_cast<size_t>(m - 1) * kBlock,
                      len * 4);
        m = half + m % 2;
      }
      for (int q = 0; q < N; ++q) std::memcpy(peer(q) + i0, t.data(), len * 4);
    }
    hub_->sync.arrive_and_wait();
  }

  void all_gather(const void* send, void* recv, size_t bytes) override {
    const int N = hub_->ranks;
    hub_->ptrs[static_cast<size_t>(rank_)] = send;
    hub_->sync.arrive_and_wait();
    if (hub_->sync.aborted()) return;
    for (int q = 0; q < N; ++q)
      std::memcpy(static_cast<uint8_t*>(recv) + static_cast<size_t>(q) * bytes, hub_->ptrs[static_cast<size_t>(q)], bytes);
    hub_->sync.arrive_and_wait();
  }

  void broadcast(void* data, size_t bytes, int root) override {
    if (hub_->ranks == 1) return;
    if (rank_ == root) hub_->ptrs[static_cast<size_t>(root)] = data;
    hub_->sync.arrive_and_wait();
    if (hub_->sync.aborted()) return;
    if (rank_ != root) std::memcpy(data, hub_->ptrs[static_cast<size_t>(root)], bytes);
    hub_->sync.arrive_and_wait();
  }

  void barrier() override { hub_->sync.arrive_and_wait(); }
  void abort() override { hub_->sync.abort(); }
  bool aborted() const override { return hub_->sync.aborted(); }

 private:
  std::shared_ptr<Hub> hub_;
  int rank_;
};

}  // namespace

std::vector<std::unique_ptr<Communicator>> make_local_communicators(int ranks) {
  GROKIT_CHECK(ranks >= 1);
  auto hub = std::make_shared<Hub>(ranks);
  std::vector<std::unique_ptr<Communicator>> out;
  for (int r = 0; r < ranks; ++r) out.push_back(std::make_unique<LocalCommunicator>(hub, r));
  return out;
}

}  // namespace grokit::runner
