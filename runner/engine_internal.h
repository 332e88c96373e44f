// Internal to runner/: what the CPU engine and the device engine share.
#pragma once

#include <condition_variable>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

#include "runner/runner.h"

namespace grokit::runner {

// One thread per rank, so that every rank reaches every collective.
class RankGroup {
 public:
  explicit RankGroup(int n) : n_(n) {
    for (int r = 1; r < n; ++r) threads_.emplace_back([this, r] { loop(r); });
  }
  ~RankGroup() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    wake_.notify_all();
    for (auto& t : threads_) t.join();
  }
  // Runs fn(rank) on every rank (rank 0 on the calling thread) and waits for all.
  void run(const std::function<void(int)>& fn) {
    if (n_ == 1) return fn(0);
    {
      std::lock_guard<std::mutex> lock(mu_);
      fn_ = &fn;
      pending_ = n_ - 1;
      ++generation_;
    }
    wake_.notify_all();
    fn(0);
    std::unique_lock<std::mutex> lock(mu_);
    done_.wait(lock, [&] { return pending_ == 0; });
  }

 private:
  void loop(int r) {
    uint64_t seen = 0;
    while (true) {
      std::unique_lock<std::mutex> lock(mu_);
      wake_.wait(lock, [&] { return stop_ || generation_ != seen; });
      if (stop_) return;
      seen = generation_;
      const auto* fn = fn_;
      lock.unlock();
      (*fn)(r);
      lock.lock();
      if (--pending_ == 0) done_.notify_one();
    }
  }
  int n_;
  std::vector<std::thread> threads_;
  std::mutex mu_;
  std::condition_variable wake_, done_;
  const std::function<void(int)>* fn_ = nullptr;
  int pending_ = 0;
  uint64_t generation_ = 0;
  bool stop_ = false;
};

// One layer's tensors as views into a memory-mapped shard.
struct LayerWeights {
  format::WeightView query, key, value, output, gate, up, down;
  const float *attn_norm_in = nullptr, *attn_norm_out = nullptr, *moe_norm_in = nullptr, *moe_norm_out = nullptr;
  const float* router = nullptr;
};
// A rank's tensors, each checked against the config (dtype, shape, scale blocks): what
// both engines bind their layers from (the device engine relocates them to its copy).
struct RankWeights {
  const uint16_t* embedding = nullptr;
  const float* final_norm = nullptr;
  std::vector<LayerWeights> layers;
};
Result<RankWeights> rank_weights(const format::ShardReader& shard, const format::ModelConfig& cfg, int tp, int rank);

// One row of a forward step's chunk, the same on every rank.
struct PlanRow {
  int slot;
  const int32_t* tokens;
  int64_t n, start;     // tokens and the position of the first
  int64_t first_logit;  // index within this chunk of the first position that wants logits (n: none)
  size_t user_row;      // the caller's row number
  int64_t user_offset;  // index of tokens[0] within the caller's row
};
// The next chunk of a step: up to `chunk` tokens of each row not yet done (done[r]
// tokens of row r are), starting at the row's sequence length. Empty when all are done.
std::vector<PlanRow> next_chunk(std::span<const StepRow> rows, const std::vector<int64_t>& done, int64_t chunk,
                                const std::function<int64_t(int slot)>& length_of);
// The positions of a chunk that want logits: (plan row, index within it), and each one's
// index among the chunk's tokens.
void wanted_logits(const std::vector<PlanRow>& plan, std::vector<std::pair<size_t, int64_t>>* want,
                   std::vector<int64_t>* token_index);

// Weight bytes one decode step of one sequence reads (Engine::weight_bytes_per_token).
uint64_t weight_bytes_per_token_of(const std::vector<const format::ShardReader*>& shards, const format::ModelConfig& cfg);

// Checks the rows of a step against the open sequences (open, capacity, token range,
// one row per sequence). length_of(slot) < 0: the slot is not open.
Status check_step_rows(std::span<const StepRow> rows, const format::ModelConfig& cfg,
                       const std::function<int64_t(int slot)>& length_of,
                       const std::function<int64_t(int slot)>& capacity_of);

Result<std::unique_ptr<Engine>> load_cpu_engine(const std::string& model_dir, const EngineOptions& options,
                                                LoadReport* report);
Result<std::unique_ptr<Engine>> load_device_engine(const std::string& model_dir, const EngineOptions& options,
                                                   LoadReport* report);

}  // namespace grokit::runner
