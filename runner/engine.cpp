// The forward pass over tensor-parallel ranks (one thread each), with KV caches.
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <new>
#include <thread>

#include "kernels/kernels.h"
#include "runner/engine_internal.h"
#include "runner/runner.h"

namespace grokit::runner {

using format::Q8View;
using format::WeightView;
using format::TensorKind;

namespace {

struct Cache {
  std::vector<std::vector<uint16_t>> k, v;  // per layer: [kv_heads, capacity, head_dim] bf16
};

struct Rank {
  int index = 0;
  format::ShardReader shard;
  std::unique_ptr<Communicator> comm;
  std::unique_ptr<ThreadPool> pool;
  int64_t q_heads = 0, kv_heads = 0, ffn = 0, vocab_start = 0, vocab_rows = 0;
  const uint16_t* embedding = nullptr;
  const float* final_norm = nullptr;
  std::vector<LayerWeights> layers;
  std::vector<Cache> caches;  // by sequence slot
  std::vector<float> logits_x, logits_part, logits_all, logits_full;  // scratch
  // A step's activations, kept from step to step (every element is written before it is
  // read): a fresh 4 MiB vector per activation and expert was mapped, faulted in and
  // cleared on every prefill chunk.
  struct Scratch {
    std::vector<float> x, a, tmp, q, k, v, o, gates, routed, me, g, u, y;
    std::vector<int32_t> experts;
    std::vector<int64_t> picks;
  } scratch;
};

// v holds n elements (grown when short, never shrunk: what it held stays until written).
template <class T>
std::vector<T>& sized(std::vector<T>& v, int64_t n) {
  if (static_cast<int64_t>(v.size()) < n) v.resize(static_cast<size_t>(n));
  return v;
}

// Laps of rank 0's ops into a profile (a no-op without one).
class OpClock {
 public:
  explicit OpClock(std::vector<OpProfile>* out) : out_(out) {
    if (out_ != nullptr) t_ = std::chrono::steady_clock::now();
  }
  // The time since the last lap goes to `op`.
  void lap(const char* op, uint64_t weight_bytes = 0) {
    if (out_ == nullptr) return;
    const auto t = std::chrono::steady_clock::now();
    auto it = std::find_if(out_->begin(), out_->end(), [&](const OpProfile& p) { return p.op == op; });
    if (it == out_->end()) it = out_->insert(out_->end(), OpProfile{op});
    it->seconds += std::chrono::duration<double>(t - t_).count();
    it->calls += 1;
    it->weight_bytes += weight_bytes;
    t_ = t;
  }

 private:
  std::vector<OpProfile>* out_;
  std::chrono::steady_clock::time_point t_;
};

uint64_t matrix_bytes_of(const WeightView& w) {
  if (w.dtype == format::DType::kQ8RowBlock)
    return static_cast<uint64_t>(w.rows * w.cols + w.q8.blocks * w.cols * 2) * static_cast<uint64_t>(w.experts);
  return w.matrix_bytes * static_cast<uint64_t>(w.experts);
}

struct Sequence {
  bool open = false;
  int64_t capacity = 0, length = 0;
  std::vector<uint8_t> valid;  // per position: the token is real (not padding)
};


}  // namespace

struct CpuImpl {
  format::Model model;
  format::ModelConfig cfg;
  EngineOptions options;
  unsigned threads_per_rank = 1;
  std::vector<Rank> ranks;
  std::vector<Sequence> sequences;
  std::unique_ptr<RankGroup> group;
  std::vector<OpProfile> profile;  // rank 0's, when options.profile

  Status load(const std::string& dir, LoadReport* report);
  void rank_step(Rank& R, const std::vector<PlanRow>& plan, const LogitsSink& logits, const StepTaps* taps,
                 Status& sink_status);
};

namespace {

// One weight product, whatever scheme the weight is stored in. k_global: the rows of the
// whole (unsplit) matrix, which fix the chains (kernels/kernels.h); fp32_x: x holds fp32
// values (the expert down projection), not bf16 ones.
Status weight_matmul(const float* x, int64_t M, int64_t K, int64_t ldx, const WeightView& w, float* y, int64_t ldy,
                     ThreadPool* pool, int64_t k_global, bool fp32_x) {
  namespace K_ = kernels;
  GROKIT_CHECK(w.rows == K && w.experts == 1);
  auto local = [&](int64_t sr) { return K % sr == 0 ? sr : 0; };  // less than a chain: one chain
  const int64_t N = w.cols;
  switch (w.dtype) {
    case format::DType::kQ8RowBlock: {
      int64_t sr = local(format::ModelConfig::split_sum_rows(k_global));
      return fp32_x ? K_::matmul_q8_f32(x, M, K, ldx, w.q8.codes, w.q8.scales, N, w.q8.blocks, y, ldy, pool, sr)
                    : K_::matmul_q8(x, M, K, ldx, w.q8.codes, w.q8.scales, N, w.q8.blocks, y, ldy, pool, sr);
    }
    case format::DType::kBF16: {
      int64_t sr = local(format::ModelConfig::split_sum_rows(k_global));
      const auto* wb = reinterpret_cast<const uint16_t*>(w.data);
      return fp32_x ? K_::matmul_bf16_f32(x, M, K, ldx, wb, N, y, ldy, pool, sr)
                    : K_::matmul_bf16(x, M, K, ldx, wb, N, y, ldy, pool, sr);
    }
    case format::DType::kQ4Group: {
      int64_t sr = local(format::ModelConfig::chunked_sum_rows(k_global, w.param));
      return fp32_x ? K_::matmul_q4_f32(x, M, K, ldx, w.data, w.param, N, y, ldy, pool, sr)
                    : K_::matmul_q4(x, M, K, ldx, w.data, w.param, N, y, ldy, pool, sr);
    }
    case format::DType::kF8Column: {
      int64_t sr = local(format::ModelConfig::chunked_sum_rows(k_global, 32));
      return fp32_x ? K_::matmul_f8_f32(x, M, K, ldx, w.data, N, y, ldy, pool, sr)
                    : K_::matmul_f8(x, M, K, ldx, w.data, N, y, ldy, pool, sr);
    }
    default: return make_error("weight dtype ", format::dtype_name(w.dtype), " has no CPU kernel");
  }
}

// Products of the same bf16 x (the attention's query, key, value; an expert's gate and up):
// int8 ones on one task plan (kernels::matmul_q8_multi), the others one by one.
struct WeightOut {
  const WeightView* w;
  float* y;
  int64_t ldy;
};
Status weight_matmuls(const float* x, int64_t M, int64_t K, int64_t ldx, std::initializer_list<WeightOut> outs,
                      ThreadPool* pool, int64_t k_global) {
  bool all_q8 = true;
  for (const WeightOut& o : outs) all_q8 = all_q8 && o.w->dtype == format::DType::kQ8RowBlock;
  if (!all_q8) {
    for (const WeightOut& o : outs) GROKIT_TRY(weight_matmul(x, M, K, ldx, *o.w, o.y, o.ldy, pool, k_global, false));
    return {};
  }
  kernels::Q8Operand ops[4];
  int64_t n = 0;
  for (const WeightOut& o : outs) {
    GROKIT_CHECK(n < 4 && o.w->rows == K && o.w->experts == 1);
    ops[n++] = {o.w->q8.codes, o.w->q8.scales, o.w->cols, o.w->q8.blocks, o.y, o.ldy};
  }
  const int64_t sr = format::ModelConfig::split_sum_rows(k_global);
  return kernels::matmul_q8_multi(x, M, K, ldx, ops, n, pool, K % sr == 0 ? sr : 0);
}

}  // namespace

std::vector<PlanRow> next_chunk(std::span<const StepRow> rows, const std::vector<int64_t>& done, int64_t chunk,
                                const std::function<int64_t(int slot)>& length_of) {
  std::vector<PlanRow> plan;
  for (size_t r = 0; r < rows.size(); ++r) {
    const int64_t total = static_cast<int64_t>(rows[r].tokens.size());
    if (done[r] >= total) continue;
    const int64_t n = std::min(chunk, total - done[r]);
    PlanRow p{rows[r].slot, rows[r].tokens.data() + done[r], n, length_of(rows[r].slot), n, r, done[r]};
    if (rows[r].logits == StepRow::Logits::kAll) p.first_logit = 0;
    if (rows[r].logits == StepRow::Logits::kLast && done[r] + n == total) p.first_logit = n - 1;
    plan.push_back(p);
  }
  return plan;
}

void wanted_logits(const std::vector<PlanRow>& plan, std::vector<std::pair<size_t, int64_t>>* want,
                   std::vector<int64_t>* token_index) {
  int64_t t = 0;
  for (size_t r = 0; r < plan.size(); ++r) {
    for (int64_t i = plan[r].first_logit; i < plan[r].n; ++i) {
      want->emplace_back(r, i);
      token_index->push_back(t + i);
    }
    t += plan[r].n;
  }
}

Result<RankWeights> rank_weights(const format::ShardReader& shard, const format::ModelConfig& cfg, int tp, int rank) {
  RankWeights out;
  out.layers.resize(static_cast<size_t>(cfg.num_layers));
  for (const auto& spec : format::model_tensors(cfg)) {
    const format::ShardSlice s = format::shard_slice(spec, cfg, tp, rank);
    if (spec.kind == TensorKind::kEmbedding) {
      GROKIT_ASSIGN_OR_RETURN(auto v, shard.view(spec.name, format::DType::kBF16, s.shape));
      out.embedding = v.as<uint16_t>();
      continue;
    }
    if (spec.dtype == format::DType::kF32) {
      GROKIT_ASSIGN_OR_RETURN(auto v, shard.view(spec.name, format::DType::kF32, s.shape));
      const float* p = v.as<float>();
      if (spec.kind == TensorKind::kFinalNorm) {
        out.final_norm = p;
        continue;
      }
      LayerWeights& L = out.layers[static_cast<size_t>(spec.layer)];
      switch (spec.kind) {
        case TensorKind::kNormAttnIn: L.attn_norm_in = p; break;
        case TensorKind::kNormAttnOut: L.attn_norm_out = p; break;
        case TensorKind::kNormMoeIn: L.moe_norm_in = p; break;
        case TensorKind::kNormMoeOut: L.moe_norm_out = p; break;
        case TensorKind::kRouter: L.router = p; break;
        default: GROKIT_CHECK_MSG(false, spec.name);
      }
      continue;
    }
    GROKIT_ASSIGN_OR_RETURN(WeightView q, shard.weight(spec.name, s.shape));
    if (q.dtype == format::DType::kQ8RowBlock && q.q8.blocks != s.blocks)
      return make_error(shard.path(), ": tensor '", spec.name, "': expected ", s.blocks, " scale blocks / actual ",
                        q.q8.blocks);
    LayerWeights& L = out.layers[static_cast<size_t>(spec.layer)];
    switch (spec.kind) {
      case TensorKind::kAttnQuery: L.query = q; break;
      case TensorKind::kAttnKey: L.key = q; break;
      case TensorKind::kAttnValue: L.value = q; break;
      case TensorKind::kAttnOutput: L.output = q; break;
      case TensorKind::kMoeGate: L.gate = q; break;
      case TensorKind::kMoeUp: L.up = q; break;
      case TensorKind::kMoeDown: L.down = q; break;
      default: GROKIT_CHECK_MSG(false, spec.name);
    }
  }
  return out;
}

std::string weights_memory_warning(uint64_t weight_bytes, uint64_t memory_bytes) {
  if (memory_bytes == 0 || static_cast<double>(weight_bytes) <= 0.9 * static_cast<double>(memory_bytes)) return {};
  const std::string w = human_bytes(static_cast<double>(weight_bytes)), m = human_bytes(static_cast<double>(memory_bytes));
  if (weight_bytes > memory_bytes)
    return str_cat("warning: the weights (", w, ") exceed this machine's memory (", m,
                   "): every step reads them from the disk again, which takes seconds to minutes per token; use a "
                   "smaller scheme (grokit quantize) or --device cuda");
  return str_cat("warning: the weights (", w, ") take more than 90 % of this machine's memory (", m,
                 "): steps may read some of them from the disk again");
}

std::string device_memory_shortfall(const std::string& device, const std::vector<int>& ranks, uint64_t weight_bytes,
                                    uint64_t free_bytes, uint64_t total_bytes) {
  if (weight_bytes <= free_bytes) return {};
  std::string who = ranks.size() == 1 ? "rank " : "ranks ";
  for (size_t i = 0; i < ranks.size(); ++i)
    who += str_cat(i == 0 ? "" : i + 1 == ranks.size() ? " and " : ", ", ranks[i]);
  return str_cat(device, " cannot hold the weights of ", who, ": ", human_bytes(static_cast<double>(weight_bytes)),
                 " against ", human_bytes(static_cast<double>(free_bytes)), " free (",
                 human_bytes(static_cast<double>(total_bytes)),
                 " in all); put the ranks on more devices (--gpus), or load a smaller scheme (grokit quantize)");
}

uint64_t usable_memory_bytes() {
  const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
  uint64_t m = pages > 0 && page > 0 ? static_cast<uint64_t>(pages) * static_cast<uint64_t>(page) : 0;
  // cgroup v2: a container's limit (mapped file pages count against it), "max" where none.
  if (auto limit = read_small_file("/sys/fs/cgroup/memory.max", 64); limit.ok()) {
    char* end = nullptr;
    const unsigned long long v = std::strtoull(limit->c_str(), &end, 10);
    if (end != limit->c_str() && v > 0 && (m == 0 || v < m)) m = v;
  }
  return m;
}

std::string kv_cache_memory_shortfall(int64_t capacity, uint64_t kv_bytes, uint64_t available_bytes) {
  if (available_bytes == 0 || kv_bytes <= available_bytes) return {};
  return str_cat("a sequence of ", capacity, " positions needs ", human_bytes(static_cast<double>(kv_bytes)),
                 " of KV cache, more than the ", human_bytes(static_cast<double>(available_bytes)),
                 " of memory available; ask for fewer positions (a shorter prompt, --max-tokens) or free memory");
}

uint64_t available_memory_bytes() {
  uint64_t m = meminfo_available_bytes();
  // cgroup v2: what the limit leaves ("max" where there is none).
  auto limit = read_small_file("/sys/fs/cgroup/memory.max", 64);
  auto current = read_small_file("/sys/fs/cgroup/memory.current", 64);
  if (limit.ok() && current.ok()) {
    char* end = nullptr;
    const unsigned long long max = std::strtoull(limit->c_str(), &end, 10);
    const unsigned long long used = std::strtoull(current->c_str(), nullptr, 10);
    if (end != limit->c_str() && max > 0) {
      const uint64_t left = max > used ? max - used : 0;
      if (m == 0 || left < m) m = std::max<uint64_t>(left, 1);
    }
  }
  return m;
}

Status CpuImpl::load(const std::string& dir, LoadReport* report) {
  auto t0 = std::chrono::steady_clock::now();
  GROKIT_ASSIGN_OR_RETURN(model, format::Model::open(dir));
  cfg = model.config();
  const int tp = static_cast<int>(model.manifest().tp);
  GROKIT_TRY(format::check_tensor_parallel(cfg, tp));
  unsigned threads = options.threads == 0 ? hardware_threads() : options.threads;
  threads_per_rank = std::max(1u, threads / static_cast<unsigned>(tp));
  auto comms = make_local_communicators(tp);
  ranks.resize(static_cast<size_t>(tp));
  uint64_t bytes = 0;
  for (int r = 0; r < tp; ++r) {
    Rank& R = ranks[static_cast<size_t>(r)];
    R.index = r;
    GROKIT_ASSIGN_OR_RETURN(R.shard, model.open_shard(static_cast<uint32_t>(r)));
    R.comm = std::move(comms[static_cast<size_t>(r)]);
    R.pool = std::make_unique<ThreadPool>(threads_per_rank);
    R.q_heads = cfg.num_q_heads / tp;
    R.kv_heads = cfg.num_kv_heads >= tp ? cfg.num_kv_heads / tp : 1;
    R.ffn = cfg.ffn() / tp;
    R.vocab_rows = cfg.vocab_size / tp;
    R.vocab_start = r * R.vocab_rows;
    GROKIT_ASSIGN_OR_RETURN(RankWeights w, rank_weights(R.shard, cfg, tp, r));
    R.embedding = w.embedding;
    R.final_norm = w.final_norm;
    R.layers = std::move(w.layers);
    for (const auto& e : R.shard.entries()) bytes += e.stored_size;
  }
  // Said before the checksums are verified, which reads every byte once.
  if (std::string w = weights_memory_warning(bytes, usable_memory_bytes()); !w.empty()) std::fprintf(stderr, "%s\n", w.c_str());
  if (options.verify) {
    // Every checksum, in parallel: a corrupt shard is named here, not met as garbage output.
    std::vector<std::pair<const format::ShardReader*, const format::IndexEntry*>> work;
    for (const auto& R : ranks) {
      for (const auto& e : R.shard.entries()) work.emplace_back(&R.shard, &e);
    }
    Progress prog("verify", bytes, options.progress);
    std::mutex mu;
    std::optional<Error> bad;
    parallel_for(work.size(), threads, [&](size_t i) {
      Status s = work[i].first->verify(*work[i].second);
      prog.add(work[i].second->stored_size);
      if (!s.ok()) {
        std::lock_guard<std::mutex> lock(mu);
        if (!bad) bad = s.take_error();
      }
    });
    prog.finish();
    if (bad) return *bad;
  }
  group = std::make_unique<RankGroup>(tp);
  if (report != nullptr) {
    report->bytes = bytes;
    report->seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    report->kernel_path = kernels::cpu_kernel_path();
  }
  return {};
}

namespace {

class CpuEngine final : public Engine {
 public:
  explicit CpuEngine(std::unique_ptr<CpuImpl> impl) : impl_(std::move(impl)) {}
  const format::ModelConfig& config() const override { return impl_->cfg; }
  const format::Manifest& manifest() const override { return impl_->model.manifest(); }
  int tensor_parallel() const override { return static_cast<int>(impl_->ranks.size()); }
  unsigned threads_per_rank() const override { return impl_->threads_per_rank; }
  Result<int> open_sequence(int64_t capacity) override;
  void close_sequence(int slot) override;
  int64_t sequence_length(int slot) const override;
  uint64_t kv_bytes_per_rank(int64_t capacity) const override;
  uint64_t weight_bytes_per_token() const override;
  Status step(std::span<const StepRow> rows, const LogitsSink& logits, const StepTaps* taps) override;
  std::vector<OpProfile> profile() const override { return impl_->profile; }
  void reset_profile() override { impl_->profile.clear(); }

 private:
  std::unique_ptr<CpuImpl> impl_;
};

}  // namespace

Result<std::unique_ptr<Engine>> load_cpu_engine(const std::string& model_dir, const EngineOptions& options,
                                                LoadReport* report) {
  auto impl = std::make_unique<CpuImpl>();
  impl->options = options;
  GROKIT_TRY(impl->load(model_dir, report));
  return std::unique_ptr<Engine>(new CpuEngine(std::move(impl)));
}

uint64_t CpuEngine::kv_bytes_per_rank(int64_t capacity) const {
  const Rank& R = impl_->ranks[0];
  return 2ull * static_cast<uint64_t>(impl_->cfg.num_layers) * static_cast<uint64_t>(R.kv_heads) *
         static_cast<uint64_t>(capacity) * static_cast<uint64_t>(impl_->cfg.key_size) * sizeof(uint16_t);
}

uint64_t CpuEngine::weight_bytes_per_token() const {
  std::vector<const format::ShardReader*> shards;
  for (const Rank& R : impl_->ranks) shards.push_back(&R.shard);
  return weight_bytes_per_token_of(shards, impl_->cfg);
}

uint64_t weight_bytes_per_token_of(const std::vector<const format::ShardReader*>& shards, const format::ModelConfig& cfg) {
  uint64_t total = 0;
  for (const format::ShardReader* shard : shards) {
    for (const auto& e : shard->entries()) {
      bool expert = e.name.find(".moe.gate") != std::string::npos || e.name.find(".moe.up") != std::string::npos ||
                    e.name.find(".moe.down") != std::string::npos;
      if (e.name == "embedding") total += e.size;  // read whole as the output projection
      else if (expert) total += e.size / static_cast<uint64_t>(cfg.num_experts) * static_cast<uint64_t>(cfg.num_selected_experts);
      else total += e.size;
    }
  }
  return total;
}

Status check_step_rows(std::span<const StepRow> rows, const format::ModelConfig& cfg,
                       const std::function<int64_t(int slot)>& length_of,
                       const std::function<int64_t(int slot)>& capacity_of) {
  for (size_t r = 0; r < rows.size(); ++r) {
    const StepRow& row = rows[r];
    const int64_t length = length_of(row.slot);
    if (length < 0) return make_error("row ", r, ": sequence ", row.slot, " is not open");
    const int64_t capacity = capacity_of(row.slot);
    if (row.tokens.empty()) return make_error("row ", r, ": no tokens");
    if (length + static_cast<int64_t>(row.tokens.size()) > capacity)
      return make_error("row ", r, ": ", length, " + ", row.tokens.size(), " tokens exceed the sequence's capacity of ",
                        capacity, " positions");
    for (size_t i = 0; i < row.tokens.size(); ++i) {
      if (row.tokens[i] < 0 || row.tokens[i] >= cfg.vocab_size)
        return make_error("row ", r, ", token ", i, ": id ", row.tokens[i], " is outside the vocabulary [0, ", cfg.vocab_size, ")");
    }
    for (size_t q = 0; q < r; ++q) {
      if (rows[q].slot == row.slot) return make_error("rows ", q, " and ", r, " append to the same sequence");
    }
  }
  return {};
}

Result<std::unique_ptr<Engine>> Engine::load(const std::string& model_dir, const EngineOptions& options,
                                             LoadReport* report) {
  if (options.device == "cpu") {
    if (!options.hosts.empty()) return make_error("several hosts need a device engine (--device cuda)");
    if (options.loader != "staged")
      return make_error("--loader ", options.loader, " loads onto GPUs; the CPU engine memory-maps its shards");
    return load_cpu_engine(model_dir, options, report);
  }
  if (options.device == "cuda" || options.device == "host") return load_device_engine(model_dir, options, report);
  return make_error("unknown device '", options.device, "' (cpu, cuda, host)");
}

Result<int> CpuEngine::open_sequence(int64_t capacity) {
  const auto& cfg = impl_->cfg;
  if (capacity <= 0) return make_error("a sequence needs a capacity of at least one position");
  if (capacity > cfg.sequence_len)
    return make_error("a sequence of ", capacity, " positions exceeds the model's sequence_len of ", cfg.sequence_len);
  const uint64_t kv_bytes = kv_bytes_per_rank(capacity) * impl_->ranks.size();
  if (std::string why = kv_cache_memory_shortfall(capacity, kv_bytes, available_memory_bytes()); !why.empty())
    return make_error(why);
  size_t slot = 0;
  while (slot < impl_->sequences.size() && impl_->sequences[slot].open) ++slot;
  if (slot == impl_->sequences.size()) impl_->sequences.emplace_back();
  Sequence& s = impl_->sequences[slot];
  s.open = true;
  s.capacity = capacity;
  s.length = 0;
  s.valid.assign(static_cast<size_t>(capacity), 0);
  try {
    for (Rank& R : impl_->ranks) {
      if (R.caches.size() <= slot) R.caches.resize(slot + 1);
      Cache& c = R.caches[slot];
      size_t n = static_cast<size_t>(R.kv_heads * capacity * cfg.key_size);
      c.k.assign(static_cast<size_t>(cfg.num_layers), std::vector<uint16_t>(n));
      c.v.assign(static_cast<size_t>(cfg.num_layers), std::vector<uint16_t>(n));
    }
  } catch (const std::bad_alloc&) {  // what was allocated goes back; the slot stays free
    impl_->sequences[slot] = Sequence{};
    for (Rank& R : impl_->ranks)
      if (R.caches.size() > slot) R.caches[slot] = Cache{};
    return make_error("out of memory for the KV cache of a sequence of ", capacity, " positions (",
                      human_bytes(static_cast<double>(kv_bytes)), ")");
  }
  return static_cast<int>(slot);
}

void CpuEngine::close_sequence(int slot) {
  GROKIT_CHECK(slot >= 0 && static_cast<size_t>(slot) < impl_->sequences.size());
  impl_->sequences[static_cast<size_t>(slot)] = Sequence{};
  for (Rank& R : impl_->ranks) R.caches[static_cast<size_t>(slot)] = Cache{};
}

int64_t CpuEngine::sequence_length(int slot) const { return impl_->sequences.at(static_cast<size_t>(slot)).length; }

Status CpuEngine::step(std::span<const StepRow> rows, const LogitsSink& logits, const StepTaps* taps) {
  CpuImpl& I = *impl_;
  const auto& cfg = I.cfg;
  GROKIT_TRY(check_step_rows(
      rows, cfg,
      [&](int slot) -> int64_t {
        if (slot < 0 || static_cast<size_t>(slot) >= I.sequences.size() || !I.sequences[static_cast<size_t>(slot)].open)
          return -1;
        return I.sequences[static_cast<size_t>(slot)].length;
      },
      [&](int slot) { return I.sequences[static_cast<size_t>(slot)].capacity; }));
  // Long rows go through in chunks; results do not depend on the chunking.
  std::vector<int64_t> done(rows.size(), 0);
  while (true) {
    const std::vector<PlanRow> plan = next_chunk(rows, done, I.options.prefill_chunk, [&](int slot) {
      return I.sequences[static_cast<size_t>(slot)].length;
    });
    if (plan.empty()) break;
    for (const PlanRow& p : plan) {
      Sequence& s = I.sequences[static_cast<size_t>(p.slot)];
      for (int64_t i = 0; i < p.n; ++i) s.valid[static_cast<size_t>(s.length + i)] = p.tokens[i] > 0;
    }
    std::vector<Status> sink_status(I.ranks.size());
    I.group->run([&](int r) { I.rank_step(I.ranks[static_cast<size_t>(r)], plan, logits, taps, sink_status[static_cast<size_t>(r)]); });
    for (const PlanRow& p : plan) {
      I.sequences[static_cast<size_t>(p.slot)].length += p.n;
      done[p.user_row] += p.n;
    }
    for (auto& s : sink_status) GROKIT_TRY(std::move(s));
  }
  return {};
}

// Every rank runs this with the same plan; only rank 0 talks to the sinks.
void CpuImpl::rank_step(Rank& R, const std::vector<PlanRow>& plan, const LogitsSink& logits_sink,
                             const StepTaps* taps, Status& sink_status) {
  namespace K = kernels;
  ThreadPool* pool = R.pool.get();
  const int64_t D = cfg.emb_size, dh = cfg.key_size, E = cfg.num_experts, top = cfg.num_selected_experts;
  const int64_t QD = R.q_heads * dh, KVD = R.kv_heads * dh, F = R.ffn;
  const float eps = static_cast<float>(cfg.rms_norm_eps);
  int64_t N = 0;
  for (const auto& p : plan) N += p.n;
  std::vector<int32_t> tokens(static_cast<size_t>(N)), positions(static_cast<size_t>(N));
  {
    int64_t t = 0;
    for (const auto& p : plan) {
      for (int64_t i = 0; i < p.n; ++i, ++t) {
        tokens[static_cast<size_t>(t)] = p.tokens[i];
        positions[static_cast<size_t>(t)] = static_cast<int32_t>(p.start + i);
      }
    }
  }
  const bool talk = R.index == 0;
  auto emit_hidden = [&](int index, const float* x) {
    if (!talk || taps == nullptr || !taps->hidden || !sink_status.ok()) return;
    int64_t t = 0;
    for (const auto& p : plan) {
      Status s = taps->hidden(index, p.user_row, p.user_offset, p.n, x + t * D);
      if (!s.ok()) sink_status = std::move(s);
      t += p.n;
    }
  };
  auto emit_routing = [&](int layer, const int32_t* experts) {
    if (!talk || taps == nullptr || !taps->routing || !sink_status.ok()) return;
    int64_t t = 0;
    for (const auto& p : plan) {
      Status s = taps->routing(layer, p.user_row, p.user_offset, p.n, experts + t * top);
      if (!s.ok()) sink_status = std::move(s);
      t += p.n;
    }
  };
  auto check = [](Status s) { GROKIT_CHECK_MSG(s.ok(), s.error().message); };
  OpClock clock(talk && options.profile ? &profile : nullptr);

  auto& S = R.scratch;
  std::vector<float>&x = sized(S.x, N * D), &a = sized(S.a, N * D), &tmp = sized(S.tmp, N * D);
  std::vector<float>&q = sized(S.q, N * QD), &k = sized(S.k, N * KVD), &v = sized(S.v, N * KVD);
  std::vector<float>& o = sized(S.o, N * QD);

  // 1. Embedding: each rank fills the tokens of its vocabulary rows; the sum is exact.
  K::embed(tokens.data(), N, R.embedding, R.vocab_start, R.vocab_rows, D, cfg.embedding_multiplier_bf16(), x.data());
  clock.lap("embedding");
  R.comm->all_reduce_sum(x.data(), static_cast<size_t>(N * D));
  clock.lap("all-reduce");
  emit_hidden(0, x.data());

  std::vector<int32_t>& experts = sized(S.experts, N * top);
  std::vector<float>& gates = sized(S.gates, N * top);
  std::vector<float>& routed = sized(S.routed, N * top * D);  // y of each (token, choice)
  const kernels::AttentionShape ashape{R.q_heads, R.kv_heads, dh, 0, static_cast<float>(cfg.attn_output_multiplier),
                                       static_cast<float>(cfg.attn_logit_cap)};
  for (int64_t l = 0; l < cfg.num_layers; ++l) {
    const LayerWeights& L = R.layers[static_cast<size_t>(l)];
    // 2. Attention.
    check(K::rmsnorm(x.data(), N, D, L.attn_norm_in, eps, a.data(), pool));
    clock.lap("norms");
    check(weight_matmuls(a.data(), N, D, D, {{&L.query, q.data(), QD}, {&L.key, k.data(), KVD}, {&L.value, v.data(), KVD}},
                         pool, D));
    clock.lap("attn.qkv", matrix_bytes_of(L.query) + matrix_bytes_of(L.key) + matrix_bytes_of(L.value));
    K::round_to_bf16(q.data(), N * QD, q.data());
    K::round_to_bf16(k.data(), N * KVD, k.data());
    K::round_to_bf16(v.data(), N * KVD, v.data());
    check(K::rope(q.data(), N, R.q_heads, dh, positions.data(), cfg.rope_base, pool));
    check(K::rope(k.data(), N, R.kv_heads, dh, positions.data(), cfg.rope_base, pool));
    clock.lap("rope");
    int64_t t0 = 0;
    for (const auto& p : plan) {
      Sequence& seq = sequences[static_cast<size_t>(p.slot)];
      Cache& c = R.caches[static_cast<size_t>(p.slot)];
      uint16_t* kc = c.k[static_cast<size_t>(l)].data();
      uint16_t* vc = c.v[static_cast<size_t>(l)].data();
      for (int64_t i = 0; i < p.n; ++i) {
        for (int64_t h = 0; h < R.kv_heads; ++h) {
          const float* ks = k.data() + ((t0 + i) * R.kv_heads + h) * dh;
          const float* vs = v.data() + ((t0 + i) * R.kv_heads + h) * dh;
          uint16_t* kd = kc + (h * seq.capacity + p.start + i) * dh;
          uint16_t* vd = vc + (h * seq.capacity + p.start + i) * dh;
          for (int64_t d = 0; d < dh; ++d) {
            kd[d] = f32_to_bf16_bits(ks[d]);
            vd[d] = f32_to_bf16_bits(vs[d]);
          }
        }
      }
      kernels::AttentionShape sh = ashape;
      sh.cap = seq.capacity;
      check(K::attention(q.data() + t0 * QD, p.n, positions.data() + t0, kc, vc, seq.valid.data(), p.start + p.n, sh,
                         o.data() + t0 * QD, pool));
      t0 += p.n;
    }
    clock.lap("attention");
    check(weight_matmul(o.data(), N, QD, QD, L.output, tmp.data(), D, pool, cfg.num_q_heads * dh, false));
    clock.lap("attn.output", matrix_bytes_of(L.output));
    R.comm->all_reduce_sum(tmp.data(), static_cast<size_t>(N * D));
    clock.lap("all-reduce");
    K::round_to_bf16(tmp.data(), N * D, tmp.data());
    check(K::rmsnorm(tmp.data(), N, D, L.attn_norm_out, eps, tmp.data(), pool));
    K::add_bf16(x.data(), tmp.data(), N * D, x.data());

    // 3. Mixture of experts: every rank routes alike; each computes its ffn columns.
    check(K::rmsnorm(x.data(), N, D, L.moe_norm_in, eps, a.data(), pool));
    clock.lap("norms");
    check(K::router_topk(a.data(), N, D, L.router, E, top, experts.data(), gates.data(), pool));
    clock.lap("router", static_cast<uint64_t>(D * E) * sizeof(float));
    emit_routing(static_cast<int>(l), experts.data());
    for (int64_t e = 0; e < E; ++e) {
      std::vector<int64_t>& picks = S.picks;  // (token * top + choice) routed to e, in token order
      picks.clear();
      for (int64_t i = 0; i < N * top; ++i) {
        if (experts[static_cast<size_t>(i)] == e) picks.push_back(i);
      }
      if (picks.empty()) continue;
      const int64_t ne = static_cast<int64_t>(picks.size());
      std::vector<float>&me = sized(S.me, ne * D), &g = sized(S.g, ne * F), &u = sized(S.u, ne * F);
      for (int64_t i = 0; i < ne; ++i)
        std::memcpy(me.data() + i * D, a.data() + (picks[static_cast<size_t>(i)] / top) * D, sizeof(float) * static_cast<size_t>(D));
      clock.lap("moe.dispatch");
      const WeightView gate = L.gate.expert(e), up = L.up.expert(e);
      check(weight_matmuls(me.data(), ne, D, D, {{&gate, g.data(), F}, {&up, u.data(), F}}, pool, D));
      clock.lap("moe.gate+up", matrix_bytes_of(gate) + matrix_bytes_of(up));
      K::round_to_bf16(g.data(), ne * F, g.data());
      K::round_to_bf16(u.data(), ne * F, u.data());
      check(K::gelu_mul(g.data(), u.data(), ne * F, g.data(), pool));
      clock.lap("moe.gelu");
      std::vector<float>& y = sized(S.y, ne * D);
      check(weight_matmul(g.data(), ne, F, F, L.down.expert(e), y.data(), D, pool, cfg.ffn(), true));
      clock.lap("moe.down", matrix_bytes_of(L.down.expert(e)));
      for (int64_t i = 0; i < ne; ++i)
        std::memcpy(routed.data() + picks[static_cast<size_t>(i)] * D, y.data() + i * D, sizeof(float) * static_cast<size_t>(D));
    }
    clock.lap("moe.dispatch");
    // Each choice's y is all-reduced before gating, so the gated sum is the TP-1 one.
    R.comm->all_reduce_sum(routed.data(), static_cast<size_t>(N * top * D));
    clock.lap("all-reduce");
    // moe = sum over the choices, in choice order, of fp32(bf16(gate)) * y.
    for (int64_t t = 0; t < N; ++t) {
      float* acc = tmp.data() + t * D;
      std::fill(acc, acc + D, 0.0f);
      for (int64_t c = 0; c < top; ++c) {
        float gb = round_bf16(gates[static_cast<size_t>(t * top + c)]);
        const float* y = routed.data() + (t * top + c) * D;
        for (int64_t d = 0; d < D; ++d) acc[d] = acc[d] + gb * y[d];
      }
    }
    K::round_to_bf16(tmp.data(), N * D, tmp.data());
    check(K::rmsnorm(tmp.data(), N, D, L.moe_norm_out, eps, tmp.data(), pool));
    K::add_bf16(x.data(), tmp.data(), N * D, x.data());
    clock.lap("moe.combine");
    emit_hidden(static_cast<int>(l + 1), x.data());
  }

  // 4. Logits of the requested positions, a chunk at a time: each rank its vocabulary
  // rows, gathered on rank 0.
  std::vector<std::pair<size_t, int64_t>> want;  // (plan row, index within the chunk)
  std::vector<int64_t> token_index;
  wanted_logits(plan, &want, &token_index);
  const int64_t V = cfg.vocab_size, Vr = R.vocab_rows;
  const int64_t chunk = std::max<int64_t>(1, std::min<int64_t>(32, static_cast<int64_t>(want.size())));
  // Reused across steps: a decode step must not allocate (and fault in) [32, V] buffers.
  auto& xf = R.logits_x;
  auto& part = R.logits_part;
  auto& all = R.logits_all;
  auto& full = R.logits_full;
  xf.resize(static_cast<size_t>(chunk * D));
  part.resize(static_cast<size_t>(chunk * Vr));
  all.resize(static_cast<size_t>(chunk * V));
  full.resize(talk ? static_cast<size_t>(V) : 0);
  const float out_mult = cfg.output_multiplier_bf16();
  for (size_t c0 = 0; c0 < want.size(); c0 += chunk) {
    int64_t n = std::min<int64_t>(chunk, static_cast<int64_t>(want.size() - c0));
    for (int64_t i = 0; i < n; ++i)
      std::memcpy(xf.data() + i * D, x.data() + token_index[c0 + static_cast<size_t>(i)] * D, sizeof(float) * static_cast<size_t>(D));
    check(K::rmsnorm(xf.data(), n, D, R.final_norm, eps, xf.data(), pool));
    clock.lap("norms");
    check(K::matmul_bf16_nt(xf.data(), n, D, R.embedding, Vr, part.data(), Vr, pool));
    clock.lap("logits.product", static_cast<uint64_t>(Vr * D) * sizeof(uint16_t));
    check(K::scale_bf16(part.data(), n * Vr, out_mult, part.data(), pool));
    clock.lap("logits.scale");
    // all_gather of equal-sized parts: [rank][n][Vr]
    R.comm->all_gather(part.data(), all.data(), sizeof(float) * static_cast<size_t>(chunk * Vr));
    clock.lap("all-gather");
    if (!talk || !sink_status.ok()) continue;
    for (int64_t i = 0; i < n; ++i) {
      for (size_t rk = 0; rk < ranks.size(); ++rk)
        std::memcpy(full.data() + static_cast<int64_t>(rk) * Vr, all.data() + (static_cast<int64_t>(rk) * chunk + i) * Vr,
                    sizeof(float) * static_cast<size_t>(Vr));
      const auto& [r, idx] = want[c0 + static_cast<size_t>(i)];
      Status s = logits_sink(plan[r].user_row, plan[r].user_offset + idx, full.data());
      if (!s.ok()) {
        sink_status = std::move(s);
        break;
      }
    }
    clock.lap("logits.sink");
  }
}

}  // namespace grokit::runner
