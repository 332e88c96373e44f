// grokit runner: a converted model, loaded from its shard files, running the forward pass.
//
// An Engine holds one rank per shard file of the model (its tensor-parallel degree):
// each rank memory-maps its file and computes on its own slice of every tensor (its
// attention heads, its columns of the expert ffn, its rows of the vocabulary), and the
// ranks combine partial results through a Communicator (all-reduce after the attention
// output and the expert down projection, all-gather of the logits). The in-process
// communicator runs the ranks as threads of one process; an NCCL one runs them on GPUs.
//
// Numerics are the official forward pass (format/SPEC.md, scripts/reference.py), with
// fp32 partial sums reduced across ranks before their bf16 rounding.
#pragma once

#include <functional>
#include <memory>
#include <random>
#include <span>
#include <string>
#include <vector>

#include "common/common.h"
#include "format/format.h"

namespace grokit::runner {

// ---------------------------------------------------------------------------------
// Collectives across the ranks of a tensor-parallel group. Every rank calls the same
// sequence of collectives; results are deterministic (fixed reduction order).
class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  // data[i] = sum over ranks of data[i], combined by the pairwise tree over ranks in
  // rank order (kernels::tree_sum), the tree the kernels' chains meet in.
  virtual void all_reduce_sum(float* data, size_t n) = 0;
  // recv = the concatenation of every rank's `bytes` from send, in rank order.
  virtual void all_gather(const void* send, void* recv, size_t bytes) = 0;
  virtual void broadcast(void* data, size_t bytes, int root) = 0;
  virtual void barrier() = 0;
  // Wakes every rank waiting in a collective of this group, now and later, when a rank
  // fails and will not arrive: their collectives return at once and aborted() is true
  // (the data is then garbage; the group is done).
  virtual void abort() {}
  virtual bool aborted() const { return false; }
};
// N communicators for N ranks that are threads of this process.
std::vector<std::unique_ptr<Communicator>> make_local_communicators(int ranks);

// ---------------------------------------------------------------------------------
struct EngineOptions {
  unsigned threads = 0;          // in all, over the ranks; 0: the machine's cores
  bool verify = true;            // recompute every tensor checksum while loading
  bool progress = true;
  int64_t prefill_chunk = 1024;  // tokens of one sequence per forward step

  // Where the forward pass runs: "cpu" (this file's CPU engine), "cuda" (the device
  // engine on the CUDA plugin's ops), or "host" (the device engine on the CPU twins of
  // the device ops: the CUDA path's orchestration, testable without a GPU).
  std::string device = "cpu";
  std::vector<int> devices;      // device indices for this process's ranks (empty: all);
                                 // with fewer devices than ranks, ranks share devices
  std::string comm = "auto";     // device collectives: auto, nccl, local (in-process)
  bool graphs = true;            // replay decode steps as CUDA graphs where possible
  // How shards reach device memory: "staged" (pread into pinned double buffers, copies
  // overlapped), "mapped" (the shard's mapping registered with the device, copied
  // straight from the page cache; fails with the reason where the device cannot register
  // it) or "cufile" (GPUDirect Storage; CUDA only, fails with the reason where cuFile
  // cannot serve the file; checksums are then verified from the file on the host).
  std::string loader = "staged";
  // Several hosts (device engine with NCCL): "leader-host:port", this host's index,
  // and how many hosts; each host drives tensor_parallel / host_count ranks.
  std::string hosts;
  int host_rank = 0;
  int host_count = 1;
  int host_join_seconds = 120;  // how long the hosts wait for each other to start
  // Time every op of rank 0's forward steps (the CPU engine; Engine::profile). The clock
  // is read once per op: a few tens of nanoseconds against tens of microseconds.
  bool profile = false;
};

// Where rank 0's forward steps went since the last Engine::reset_profile, by op, in the
// order the ops first ran. Rank 0's time at a collective includes its wait for the others.
struct OpProfile {
  std::string op;             // "attn.qkv", "moe.down", "logits.product", ...
  double seconds = 0;         // summed over the steps
  int64_t calls = 0;
  uint64_t weight_bytes = 0;  // weight bytes it read on rank 0 (the products), summed
};

struct LoadReport {
  uint64_t bytes = 0;            // weight bytes mapped or loaded (all ranks)
  double seconds = 0;
  std::string kernel_path;       // "avx2", "scalar", or the device backend
  std::vector<std::string> details;  // per rank: where it runs, load GB/s
};

// What a forward step asks for, per row: the row appends `tokens` to sequence `slot`.
struct StepRow {
  int slot = 0;
  std::span<const int32_t> tokens;
  enum class Logits { kNone, kLast, kAll } logits = Logits::kLast;
};
// Receives the logits of each requested position, in row order then position order:
// (row index, position within the row's tokens, V logits, fp32 holding bf16 values).
using LogitsSink = std::function<Status(size_t row, int64_t index, const float* logits)>;
// Receives hidden states: index 0 is the embedding output, i + 1 the output of layer i;
// (index, row, first token index within the row, [n, D] values).
using HiddenSink = std::function<Status(int index, size_t row, int64_t first, int64_t n, const float* x)>;
// Receives each layer's routing: (layer, row, first token index within the row, [n, top]
// expert ids in choice order).
using RoutingSink = std::function<Status(int layer, size_t row, int64_t first, int64_t n, const int32_t* experts)>;
// What a step shows besides the logits (either may be empty), from rank 0, in row order.
struct StepTaps {
  HiddenSink hidden;
  RoutingSink routing;
};

class Engine {
 public:
  static Result<std::unique_ptr<Engine>> load(const std::string& model_dir, const EngineOptions& options,
                                              LoadReport* report = nullptr);
  virtual ~Engine() = default;

  virtual const format::ModelConfig& config() const = 0;
  virtual const format::Manifest& manifest() const = 0;
  virtual int tensor_parallel() const = 0;
  virtual unsigned threads_per_rank() const = 0;

  // A sequence with a KV cache for `capacity` positions (refused beyond sequence_len).
  virtual Result<int> open_sequence(int64_t capacity) = 0;
  virtual void close_sequence(int slot) = 0;
  virtual int64_t sequence_length(int slot) const = 0;
  // Bytes of KV cache one sequence of `capacity` positions takes on each rank.
  virtual uint64_t kv_bytes_per_rank(int64_t capacity) const = 0;
  // Weight bytes one decode step of one sequence reads, over all ranks: every attention
  // matrix, the selected experts' matrices, router, norms and the output projection.
  virtual uint64_t weight_bytes_per_token() const = 0;

  // Runs the rows through the model, appending their tokens to their sequences.
  virtual Status step(std::span<const StepRow> rows, const LogitsSink& logits, const StepTaps* taps = nullptr) = 0;
  // A follower host of a multi-host engine: runs the leader's commands until it shuts
  // down (the leader's engine sends them from open_sequence, step, close and its
  // destructor). An error on a single-host engine.
  virtual Status follow() { return make_error("this engine is not a follower of a multi-host group"); }
  // EngineOptions::profile: the ops' times since the last reset (empty where the engine
  // does not profile: the device engine's ops run asynchronously).
  virtual std::vector<OpProfile> profile() const { return {}; }
  virtual void reset_profile() {}
};

// ---------------------------------------------------------------------------------
// Sampling, as the official runner does it: logits / temperature, the nucleus filter,
// then a draw; plus top-k. temperature 0 is greedy (argmax, ties to the lower id).
struct SamplingParams {
  float temperature = 1.0f;
  float top_p = 1.0f;
  int top_k = 0;          // 0: off
  uint64_t seed = 0;
};
// The official nucleus rule: sort ascending, softmax, find the first index where the
// cumulative probability reaches 1 - top_p; every logit below that one's value gets
// -1e10 (ties at the threshold are kept).
void nucleus_filter(std::vector<float>& logits, float top_p);
// Keeps the top_k largest logits (ties at the k-th value kept), the rest -1e10.
void top_k_filter(std::vector<float>& logits, int top_k);
int32_t argmax(std::span<const float> logits);
class Sampler {
 public:
  explicit Sampler(const SamplingParams& params);
  int32_t sample(std::span<const float> logits);

 private:
  SamplingParams params_;
  std::mt19937_64 rng_;
  std::vector<float> work_;
};

// ---------------------------------------------------------------------------------
// Generation over several prompts at once (each prompt its own sequence and sampler).
struct GenerateOptions {
  int64_t max_tokens = 64;
  SamplingParams sampling;
  bool stop_at_eos = true;
};
struct GenerateStats {
  int64_t prompt_tokens = 0;
  double prefill_seconds = 0;    // until every first token is out
  int64_t generated_tokens = 0;  // after the first
  double decode_seconds = 0;
  double first_token_seconds = 0;
  uint64_t kv_bytes = 0;         // per rank, all sequences
};
// What generate() checks before its first step: every prompt has tokens, each id lies in
// the vocabulary, and prompt + max_tokens fits in sequence_len (max_tokens 0: the prompt
// alone, as `grokit logits` runs it). It needs only the config, so a command checks its
// input before it loads the weights (minutes for Grok-1), not after.
Status check_prompts(const format::ModelConfig& cfg, const std::vector<std::vector<int32_t>>& prompts,
                     int64_t max_tokens);
// The CPU engine maps the shards: weights larger than the memory this process may use are
// read from the disk again at every step. The warning the load prints then (empty where the
// weights fit in 90 % of the memory), and the memory: the machine's, or the cgroup's limit
// where one is set.
std::string weights_memory_warning(uint64_t weight_bytes, uint64_t memory_bytes);
uint64_t usable_memory_bytes();
// The CPU engine's KV caches are the process's own memory (the weights are mapped pages
// the kernel can drop): a new sequence whose caches (kv_bytes over all ranks) exceed what
// the machine has available is refused up front, not left to the out-of-memory killer.
// The reason (empty where they fit, or where available_bytes is 0: unknown), and the
// memory available now: MemAvailable, or less where a cgroup limit leaves less.
std::string kv_cache_memory_shortfall(int64_t capacity, uint64_t kv_bytes, uint64_t available_bytes);
uint64_t available_memory_bytes();
// The device engine refuses, before it reads a byte, to load more weights onto a device
// than it has free (where several ranks share one, their sum): the reason, naming the
// device and its ranks, or empty where they fit.
std::string device_memory_shortfall(const std::string& device, const std::vector<int>& ranks, uint64_t weight_bytes,
                                    uint64_t free_bytes, uint64_t total_bytes);
// on_token(prompt index, token) is called as tokens are chosen.
Result<std::vector<std::vector<int32_t>>> generate(Engine& engine, const std::vector<std::vector<int32_t>>& prompts,
                                                   const GenerateOptions& options,
                                                   const std::function<void(size_t, int32_t)>& on_token,
                                                   GenerateStats* stats = nullptr);

}  // namespace grokit::runner
