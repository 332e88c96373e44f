// The device engine: the forward pass of runner/engine.cpp on a device backend
// (kernels/ops.h), one host thread per rank, each rank's shard loaded into its device's
// memory, collectives through NCCL or an in-process device communicator, decode steps
// replayed as CUDA graphs. The same code runs on the host twins ("host"), which is how
// it is tested on machines without a GPU.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <map>
#include <mutex>
#include <optional>

#include "kernels/ops.h"
#include "runner/backend.h"
#include "runner/cluster.h"
#include "runner/device_layer.h"
#include "runner/socket_collectives.h"
#include "runner/device_loader.h"
#include "runner/engine_internal.h"

namespace grokit::runner {

using format::TensorKind;

namespace {

std::string fixed(double v, int digits) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.*f", digits, v);
  return buf;
}

struct DevCache {
  DeviceBuffer kv;     // [layers][2][kv_heads][cap][dh] bf16
  DeviceBuffer valid;  // [cap] uint8
};

// Activations of one forward chunk of up to `tokens` tokens (grown on demand).
struct Activations {
  int64_t tokens = 0;
  DeviceBuffer x, a, tmp, q, k, v, o, experts, gates, g, routed, tok, pos, rows;
  DeviceBuffer xf, part, all;  // logits: [32, D], [32, Vr], [TP, 32, Vr]
};

constexpr int64_t kLogitsChunk = 32;

struct DevRank {
  int rank = 0;        // global rank
  int device = 0;
  const GrokitOps* ops = nullptr;
  GrokitStream stream = nullptr;
  std::unique_ptr<ThreadPool> pool;  // the host backend's "stream"
  format::ShardReader shard;
  DeviceBuffer weights;  // the shard's data section
  std::unique_ptr<DeviceComm> comm;
  int64_t q_heads = 0, kv_heads = 0, ffn = 0, vocab_rows = 0, vocab_start = 0;
  const uint16_t* embedding = nullptr;
  const float* final_norm = nullptr;
  std::vector<DevLayer> layers;
  std::vector<DevCache> caches;  // by sequence slot
  Activations act;
  DeviceBuffer host_rows, host_in, host_logits;  // pinned staging
  std::map<int64_t, void*> graphs;  // decode graphs by batch size
  std::map<int64_t, int> graph_warm;  // eager decode steps seen per batch size
  double load_seconds = 0;
  std::string device_name;
};

struct DevSequence {
  bool open = false;
  int64_t capacity = 0, length = 0;
};

// Loading: a rank's shard into its device's memory. "staged" and "mapped"
// (runner/device_loader.h): every tensor's checksum computed by the readers on the way
// (mapped: 256 MiB registered at a time, 3 windows at most). "cufile": GPUDirect Storage
// straight to the device, then the checksums from the file on the host (the bytes never
// pass through host memory on the way in).
Status load_shard(DevRank& R, const EngineOptions& options, Progress& progress, unsigned readers) {
  const format::ShardHeader& h = R.shard.header();
  const std::string& path = R.shard.path();
  for (const auto& e : R.shard.entries()) {
    if (e.compression != 0)
      return make_error(path, ": tensor '", e.name, "' is zstd-compressed; the device engine loads raw shards (convert "
                        "without --compress)");
  }
  GROKIT_TRY(R.weights.allocate(R.ops, h.data_size));
  if (options.loader == "cufile") {
    std::string why_not;
    double seconds = 0;
    GROKIT_ASSIGN_OR_RETURN(bool done, cuda_file_read(R.device, path, h.data_offset, h.data_size, R.weights.get(),
                                                      &seconds, &why_not));
    if (!done) return make_error(path, ": --loader cufile: ", why_not, " (--loader staged works everywhere)");
    R.load_seconds = seconds;
    progress.add(h.data_size);
    if (options.verify) {
      // From the file on the host, on the rank's share of the threads (one thread's XXH3
      // would take longer than the load itself); the first failing tensor in index order.
      const auto& entries = R.shard.entries();
      std::vector<std::optional<Error>> bad(entries.size());
      parallel_for(entries.size(), readers, [&](size_t i) {
        Status s = R.shard.verify(entries[i]);
        if (!s.ok()) bad[i] = s.take_error();
      });
      for (auto& e : bad)
        if (e) return std::move(*e);
    }
    return {};
  }
  std::vector<HashedRange> ranges;
  if (options.verify) {
    for (const auto& e : R.shard.entries()) ranges.push_back({e.name, e.offset, e.stored_size, e.xxh3});
  }
  LoadStats stats;
  const bool mapped = options.loader == "mapped";
  Status s = load_file_to_device(R.ops, R.stream, path, h.data_offset, h.data_size, R.weights.get(), ranges,
                                 &progress, &stats, mapped ? kMappedWindowBytes : kStagingBytes, readers,
                                 mapped ? LoadSource::kMapped : LoadSource::kStaged);
  if (!s.ok() && mapped) return make_error("--loader mapped: ", s.error().message, " (--loader staged works everywhere)");
  GROKIT_TRY(std::move(s));
  R.load_seconds = stats.seconds;
  return {};
}

}  // namespace

// ---------------------------------------------------------------------------------
class DeviceEngine final : public Engine {
 public:
  ~DeviceEngine() override;
  Status load(const std::string& dir, const EngineOptions& options, LoadReport* report);

  const format::ModelConfig& config() const override { return cfg_; }
  const format::Manifest& manifest() const override { return model_.manifest(); }
  int tensor_parallel() const override { return tp_; }
  unsigned threads_per_rank() const override { return threads_per_rank_; }
  Result<int> open_sequence(int64_t capacity) override;
  void close_sequence(int slot) override;
  int64_t sequence_length(int slot) const override {
    return sequences_.at(static_cast<size_t>(slot)).length;
  }
  uint64_t kv_bytes_per_rank(int64_t capacity) const override {
    return 2ull * static_cast<uint64_t>(cfg_.num_layers) * static_cast<uint64_t>(ranks_[0].kv_heads) *
           static_cast<uint64_t>(capacity) * static_cast<uint64_t>(cfg_.key_size) * sizeof(uint16_t);
  }
  uint64_t weight_bytes_per_token() const override {
    std::vector<const format::ShardReader*> shards;
    for (const auto& R : ranks_) shards.push_back(&R.shard);
    // Other hosts' ranks read as many bytes as ours.
    return weight_bytes_per_token_of(shards, cfg_) * static_cast<uint64_t>(tp_) / shards.size();
  }
  Status step(std::span<const StepRow> rows, const LogitsSink& logits, const StepTaps* taps) override;
  Status follow() override;

 private:
  Status open_slot(int slot, int64_t capacity);
  Status run_plan(const std::vector<PlanRow>& plan, const LogitsSink* logits, const StepTaps* taps);
  Status rank_step(DevRank& R, const std::vector<PlanRow>& plan, const LogitsSink* logits, const StepTaps* taps);
  Status forward(DevRank& R, int64_t N, int64_t max_keys, const StepTaps* taps,
                 const std::vector<PlanRow>& plan);
  Status logits_chunk(DevRank& R, const float* x_rows, int64_t n);
  Status emit_logits(DevRank& R, const std::vector<PlanRow>& plan, const std::vector<std::pair<size_t, int64_t>>& want,
                     size_t c0, int64_t n, const LogitsSink* sink);
  Status end_of_step(DevRank& R);
  Status reserve(DevRank& R, int64_t N);
  // Runs fn on every rank; when one fails, the others' collectives are abandoned and the
  // engine stops (check_running fails from then on with the first rank's error).
  Status run_on_ranks(const std::function<Status(DevRank&)>& fn);
  Status check_running() const {
    if (stopped_.ok()) return {};
    return make_error("the device engine stopped after an earlier failure: ", stopped_.error().message);
  }

  format::Model model_;
  format::ModelConfig cfg_;
  EngineOptions options_;
  int tp_ = 1;
  unsigned threads_per_rank_ = 1;
  const GrokitOps* ops_ = nullptr;
  std::vector<DevRank> ranks_;  // this host's ranks
  std::vector<DevSequence> sequences_;
  std::unique_ptr<RankGroup> group_;
  std::unique_ptr<Cluster> cluster_;
  bool leader_ = true;
  std::vector<float> full_logits_;
  Status sink_status_;
  Status stopped_;  // an error that abandoned collectives: every later call fails with it
};

Result<std::unique_ptr<Engine>> load_device_engine(const std::string& model_dir, const EngineOptions& options,
                                                   LoadReport* report) {
  auto e = std::make_unique<DeviceEngine>();
  GROKIT_TRY(e->load(model_dir, options, report));
  return std::unique_ptr<Engine>(std::move(e));
}

DeviceEngine::~DeviceEngine() {
  if (cluster_) {
    if (leader_) (void)cluster_->broadcast(encode_shutdown());
    (void)cluster_->close();
  }
  if (group_) {
    (void)run_on_ranks([&](DevRank& R) -> Status {
      for (auto& [b, g] : R.graphs) R.ops->graph_destroy(g);
      R.graphs.clear();
      R.caches.clear();
      R.act = Activations{};
      R.comm.reset();
      R.weights.reset();
      R.host_rows.reset();
      R.host_in.reset();
      R.host_logits.reset();
      if (R.stream != nullptr && R.pool == nullptr) R.ops->stream_destroy(R.stream);
      return {};
    });
  }
}

Status DeviceEngine::run_on_ranks(const std::function<Status(DevRank&)>& fn) {
  std::vector<Status> st(ranks_.size());
  std::atomic<int> first_failed{-1};
  group_->run([&](int r) {
    DevRank& R = ranks_[static_cast<size_t>(r)];
    Status s = R.ops->set_device(R.device) == GROKIT_OK
                   ? fn(R)
                   : make_error("rank ", R.rank, ": cannot select device ", R.device, ": ", R.ops->error_message());
    int none = -1;
    if (!s.ok() && first_failed.compare_exchange_strong(none, r)) {
      // The others may be waiting for this rank in a collective: release them.
      for (DevRank& P : ranks_)
        if (P.comm) P.comm->abort();
    }
    st[static_cast<size_t>(r)] = std::move(s);
  });
  const int f = first_failed.load();
  if (f < 0) return {};
  Status origin = std::move(st[static_cast<size_t>(f)]);
  // Collectives were abandoned: the ranks' state no longer agrees. The graphs that
  // captured them go now (an NCCL abort waits for that).
  if (ranks_[static_cast<size_t>(f)].comm) {
    stopped_ = Status(origin.error());
    for (DevRank& R : ranks_) {
      if (R.graphs.empty() || R.ops->set_device(R.device) != GROKIT_OK) continue;
      for (auto& [b, g] : R.graphs) R.ops->graph_destroy(g);
      R.graphs.clear();
    }
  }
  return origin;
}

Status DeviceEngine::load(const std::string& dir, const EngineOptions& options, LoadReport* report) {
  const auto t0 = std::chrono::steady_clock::now();
  options_ = options;
  GROKIT_ASSIGN_OR_RETURN(ops_, device_ops(options.device));
  if (options.loader != "staged" && options.loader != "mapped" && options.loader != "cufile")
    return make_error("unknown loader '", options.loader, "' (staged, mapped, cufile)");
  if (options.loader == "cufile" && std::string(ops_->backend) != "cuda")
    return make_error("--loader cufile reads into CUDA device memory: it needs --device cuda");
  GROKIT_ASSIGN_OR_RETURN(model_, format::Model::open(dir));
  cfg_ = model_.config();
  tp_ = static_cast<int>(model_.manifest().tp);
  GROKIT_TRY(format::check_tensor_parallel(cfg_, tp_));

  // Which ranks this host drives.
  const int hosts = std::max(1, options.host_count);
  if (options.hosts.empty() && hosts != 1) return make_error("--host-count ", hosts, " needs --hosts leader:port");
  if (tp_ % hosts != 0)
    return make_error("the model's ", tp_, " ranks do not divide over ", hosts, " hosts");
  if (hosts > 1 && options.host_join_seconds < 1)
    return make_error("--host-join-timeout must be at least 1 second (got ", options.host_join_seconds, ")");
  if (options.host_rank < 0 || options.host_rank >= hosts)
    return make_error("host rank ", options.host_rank, " is outside [0, ", hosts, ")");
  const int local = tp_ / hosts, first = options.host_rank * local;
  leader_ = options.host_rank == 0;

  int device_count = 0;
  DEV_TRY(ops_, ops_->device_count(&device_count));
  std::vector<int> devices = options.devices;
  if (devices.empty()) {
    for (int d = 0; d < std::min(device_count, local); ++d) devices.push_back(d);
  }
  for (int d : devices) {
    if (d < 0 || d >= device_count)
      return make_error("device ", d, " does not exist (", ops_->backend, " has ", device_count, " devices)");
  }
  if (devices.empty()) return make_error("no ", ops_->backend, " device to run on");
  // The devices the ranks use (rank i on devices[i % size]), counted without repeats:
  // "--gpus 0,0" puts two ranks on one GPU, which NCCL refuses (duplicate GPU).
  std::vector<int> used;
  for (int i = 0; i < local; ++i) used.push_back(devices[static_cast<size_t>(i) % devices.size()]);
  std::sort(used.begin(), used.end());
  used.erase(std::unique(used.begin(), used.end()), used.end());
  const bool shared = static_cast<int>(used.size()) < local;

  // Collectives.
  std::string comm = options.comm;
  const GrokitCollectives* nccl = nullptr;
  if (tp_ > 1 && (comm == "auto" || comm == "nccl") && std::string(ops_->backend) == "cuda" && !shared) {
    auto c = cuda_collectives();
    char why[256] = {0};
    if (c.ok() && (*c)->available(why, sizeof why)) nccl = *c;
    else if (comm == "nccl" || hosts > 1)
      return make_error("NCCL is not usable: ", c.ok() ? std::string(why) : c.error().message);
  }
  // The host backend across hosts: TCP collectives (socket_collectives.h) in NCCL's place.
  const bool socket_comm = hosts > 1 && std::string(ops_->backend) == "host";
  if (socket_comm) nccl = socket_collectives();
  if (comm == "nccl" && tp_ > 1 && nccl == nullptr)
    return make_error("--comm nccl needs one CUDA device per rank (", local, " ranks on ", used.size(), " devices)");
  if (comm != "auto" && comm != "nccl" && comm != "local") return make_error("unknown --comm '", comm, "' (auto, nccl, local)");
  if (hosts > 1 && nccl == nullptr) return make_error("several hosts need NCCL and one CUDA device per rank");

  unsigned threads = options.threads == 0 ? hardware_threads() : options.threads;
  threads_per_rank_ = std::max(1u, threads / static_cast<unsigned>(local));

  // Multi-host: the leader hands out the NCCL id.
  GrokitNcclId nccl_id{};
  if (nccl != nullptr && leader_ && nccl->unique_id(&nccl_id) != GROKIT_OK)
    return make_error("cannot create an NCCL id: ", ops_->error_message());
  if (hosts > 1) {
    ClusterOptions co;
    co.leader = options.hosts;
    co.host_rank = options.host_rank;
    co.hosts = hosts;
    // Hosts load their shards between commands, which can take minutes at full size; a
    // host that dies is noticed by the heartbeats, not by this timeout.
    co.message_timeout = std::chrono::milliseconds(3600 * 1000);
    co.join_timeout = std::chrono::seconds(options.host_join_seconds);
    HostHello hello;
    hello.model_id = hex64(model_.manifest().model_id);
    hello.tp = tp_;
    hello.first_rank = first;
    hello.rank_count = local;
    hello.version = GROKIT_VERSION_STRING;
    // Every host cuts a step's prompts into forward steps itself: the same cut everywhere,
    // or the hosts' collectives would not match.
    hello.settings = str_cat("prefill_chunk=", options.prefill_chunk);
    GROKIT_ASSIGN_OR_RETURN(cluster_, Cluster::open(co));
    std::vector<uint8_t> payload;
    if (leader_) payload.assign(nccl_id.bytes, nccl_id.bytes + sizeof nccl_id.bytes);
    // Said before the wait, which lasts until the last host starts (or the timeout).
    if (leader_)
      std::fprintf(stderr, "cluster: leader at %s: waiting up to %d s for %d other host%s to join\n",
                   options.hosts.c_str(), options.host_join_seconds, hosts - 1, hosts == 2 ? "" : "s");
    else
      std::fprintf(stderr, "cluster: host %d of %d: joining the leader at %s (waiting up to %d s)\n",
                   options.host_rank, hosts, options.hosts.c_str(), options.host_join_seconds);
    GROKIT_ASSIGN_OR_RETURN(JoinResult joined, cluster_->join(hello, payload));
    if (!leader_) {
      const auto& got = joined.payload;
      if (got.size() != sizeof nccl_id.bytes) return make_error("the leader sent an NCCL id of ", got.size(), " bytes");
      std::memcpy(nccl_id.bytes, got.data(), sizeof nccl_id.bytes);
    }
    if (socket_comm) {  // where this host reaches rank 0's socket
      const std::string leader_host = options.hosts.substr(0, options.hosts.rfind(':'));
      GROKIT_TRY(socket_id_set_host(&nccl_id, leader_ ? std::string("127.0.0.1") : leader_host));
    }
  }

  ranks_.resize(static_cast<size_t>(local));
  auto host_comms = make_local_communicators(local);
  for (int i = 0; i < local; ++i) {
    DevRank& R = ranks_[static_cast<size_t>(i)];
    R.rank = first + i;
    R.device = devices[static_cast<size_t>(i) % devices.size()];
    R.ops = ops_;
    GROKIT_ASSIGN_OR_RETURN(R.shard, model_.open_shard(static_cast<uint32_t>(R.rank)));
    R.q_heads = cfg_.num_q_heads / tp_;
    R.kv_heads = cfg_.num_kv_heads >= tp_ ? cfg_.num_kv_heads / tp_ : 1;
    R.ffn = cfg_.ffn() / tp_;
    R.vocab_rows = cfg_.vocab_size / tp_;
    R.vocab_start = R.rank * R.vocab_rows;
    char name[256] = {0};
    uint64_t mem = 0;
    if (ops_->device_name(R.device, name, sizeof name, &mem) == GROKIT_OK) R.device_name = name;
  }
  group_ = std::make_unique<RankGroup>(local);

  // Each device's ranks' weights against its free memory, before a byte is read: a model
  // that cannot fit is named now, not as a failed allocation minutes into the load.
  for (int d : used) {
    std::vector<int> on;
    uint64_t need = 0;
    std::string name;
    for (const DevRank& R : ranks_) {
      if (R.device != d) continue;
      on.push_back(R.rank);
      need += R.shard.header().data_size;
      name = R.device_name;
    }
    uint64_t free = 0, total = 0;
    DEV_TRY(ops_, ops_->memory_info(d, &free, &total));
    if (std::string why = device_memory_shortfall(str_cat(ops_->backend, " device ", d, name.empty() ? "" : " (" + name + ")"),
                                                  on, need, free, total);
        !why.empty())
      return make_error(why);
  }

  // Every rank's tensors checked against the config before a byte is loaded.
  std::vector<RankWeights> host_views;
  for (const DevRank& R : ranks_) {
    GROKIT_ASSIGN_OR_RETURN(RankWeights w, rank_weights(R.shard, cfg_, tp_, R.rank));
    host_views.push_back(std::move(w));
  }

  // Streams, then every rank's shard in parallel.
  uint64_t total = 0;
  for (const auto& R : ranks_) total += R.shard.header().data_size;
  Progress progress("load", total, options.progress);
  GROKIT_TRY(run_on_ranks([&](DevRank& R) -> Status {
    if (std::string(ops_->backend) == "host") {
      R.pool = std::make_unique<ThreadPool>(threads_per_rank_);
      R.stream = R.pool.get();
    } else {
      DEV_TRY(ops_, ops_->stream_create(&R.stream));
    }
    // The rank's share of the host's threads read its shard (8 at most: past that the
    // page cache, not the threads, sets the pace).
    return load_shard(R, options, progress, std::min(8u, threads_per_rank_));
  }));
  progress.finish();

  // The backends' weight layouts: the views checked before loading, relocated from the
  // shard's mapping to the rank's device copy of its data section.
  for (size_t i = 0; i < ranks_.size(); ++i) {
    DevRank& R = ranks_[i];
    const RankWeights& w = host_views[i];
    const uint8_t* mapped = R.shard.file().data() + R.shard.header().data_offset;
    uint8_t* base = R.weights.get<uint8_t>();
    auto at = [&](const void* p) { return base + (static_cast<const uint8_t*>(p) - mapped); };
    R.embedding = reinterpret_cast<const uint16_t*>(at(w.embedding));
    R.final_norm = reinterpret_cast<const float*>(at(w.final_norm));
    R.layers.resize(w.layers.size());
    for (size_t l = 0; l < w.layers.size(); ++l) {
      const LayerWeights& H = w.layers[l];
      DevLayer& L = R.layers[l];
      L.attn_norm_in = reinterpret_cast<const float*>(at(H.attn_norm_in));
      L.attn_norm_out = reinterpret_cast<const float*>(at(H.attn_norm_out));
      L.moe_norm_in = reinterpret_cast<const float*>(at(H.moe_norm_in));
      L.moe_norm_out = reinterpret_cast<const float*>(at(H.moe_norm_out));
      L.router = reinterpret_cast<const float*>(at(H.router));
      auto weight = [&](const format::WeightView& v) {
        GrokitWeight g{};
        g.dtype = static_cast<int32_t>(v.dtype);
        g.param = static_cast<int32_t>(v.param);
        g.experts = v.experts;
        g.rows = v.rows;
        g.cols = v.cols;
        const bool q8 = v.dtype == format::DType::kQ8RowBlock;
        g.matrix_bytes = q8 ? static_cast<uint64_t>(v.rows * v.cols) : v.matrix_bytes;
        g.data = at(q8 ? static_cast<const void*>(v.q8.codes) : v.data);
        return g;
      };
      L.query = weight(H.query);
      L.key = weight(H.key);
      L.value = weight(H.value);
      L.output = weight(H.output);
      L.gate = weight(H.gate);
      L.up = weight(H.up);
      L.down = weight(H.down);
    }
  }
  GROKIT_TRY(run_on_ranks([&](DevRank& R) -> Status {
    uint64_t scratch_bytes = 0;
    auto each = [&](auto&& fn) -> Status {
      for (DevLayer& L : R.layers) {
        for (GrokitWeight* w : {&L.query, &L.key, &L.value, &L.output, &L.gate, &L.up, &L.down}) GROKIT_TRY(fn(*w));
      }
      return {};
    };
    GROKIT_TRY(each([&](GrokitWeight& w) -> Status {
      scratch_bytes = std::max(scratch_bytes, R.ops->prepare_scratch_bytes(&w));
      return {};
    }));
    DeviceBuffer scratch;
    GROKIT_TRY(scratch.allocate(R.ops, scratch_bytes));
    GROKIT_TRY(each([&](GrokitWeight& w) -> Status {
      DEV_TRY(R.ops, R.ops->prepare_weight(&w, scratch.get(), R.stream));
      return {};
    }));
    DEV_TRY(R.ops, R.ops->stream_sync(R.stream));
    return {};
  }));

  // Every host has its shards before any starts NCCL's initialisation, which would wait
  // for ever for the ranks of a host that failed to load. The leader says it has loaded
  // and each follower, loaded too, acks (one that failed has left: its lost connection
  // fails the leader's wait); only then does the leader tell them all to start. A leader
  // that failed sends its shutdown instead, which the followers take at either point.
  if (cluster_) {
    if (leader_) {
      GROKIT_ASSIGN_OR_RETURN(const uint64_t loaded, cluster_->send(encode_loaded()));
      GROKIT_TRY(cluster_->wait(loaded));
      GROKIT_ASSIGN_OR_RETURN(const uint64_t start, cluster_->send(encode_start_collectives()));
      GROKIT_TRY(cluster_->wait(start));
    } else {
      for (CommandKind want : {CommandKind::kLoaded, CommandKind::kStartCollectives}) {
        GROKIT_ASSIGN_OR_RETURN(ClusterCommand msg, cluster_->receive(kWaitForever));
        auto cmd = decode_command(msg.bytes);
        if (!cmd.ok() || cmd->kind != want) {
          const bool shutdown = cmd.ok() && cmd->kind == CommandKind::kShutdown;
          Status why = !cmd.ok() ? Status(cmd.error())
                       : shutdown ? make_error("the leader stopped before the hosts started NCCL (a host failed to load?)")
                                  : make_error("the leader sent another command while the hosts were loading");
          (void)cluster_->ack(msg.seq, shutdown ? Status{} : why);
          return why;
        }
        GROKIT_TRY(cluster_->ack(msg.seq, {}));
      }
    }
  }

  // Collectives, one per rank.
  if (nccl != nullptr) {
    std::vector<void*> comms(ranks_.size(), nullptr);
    std::vector<Status> st(ranks_.size());
    // Every device selectable before the group starts: a rank missing from the group's
    // initialisation would leave the others waiting for it.
    for (const DevRank& R : ranks_)
      if (ops_->set_device(R.device) != GROKIT_OK)
        return make_error("rank ", R.rank, ": cannot select device ", R.device, ": ", ops_->error_message());
    // Communicators made before a failure are released, not leaked.
    auto fail = [&](Status s) {
      for (void* c : comms)
        if (c != nullptr) (nccl->comm_abort != nullptr ? nccl->comm_abort : nccl->comm_destroy)(c);
      return s;
    };
    // One process, several devices: the ranks initialise together.
    if (nccl->group_start() != GROKIT_OK) return make_error("NCCL group start failed: ", ops_->error_message());
    for (size_t i = 0; i < ranks_.size(); ++i) {
      DevRank& R = ranks_[i];
      if (ops_->set_device(R.device) != GROKIT_OK || nccl->comm_init(&comms[i], tp_, &nccl_id, R.rank) != GROKIT_OK)
        st[i] = make_error("rank ", R.rank, ": NCCL init failed: ", ops_->error_message());
    }
    if (nccl->group_end() != GROKIT_OK) return fail(make_error("NCCL init failed: ", ops_->error_message()));
    for (auto& s : st)
      if (!s.ok()) return fail(std::move(s));
    for (size_t i = 0; i < ranks_.size(); ++i)
      ranks_[i].comm = make_nccl_comm(ops_, nccl, comms[i], ranks_[i].stream, socket_comm ? "TCP (socket collectives)" : "NCCL");
  } else {
    // One device among the ranks' (not the listed ones, some of which may be unused).
    const bool same_device = std::string(ops_->backend) == "host" || used.size() == 1;
    for (size_t i = 0; i < ranks_.size(); ++i) {
      DevRank& R = ranks_[i];
      if (tp_ == 1) R.comm = make_solo_comm(ops_, R.stream);
      else R.comm = make_local_device_comm(ops_, R.stream, std::move(host_comms[i]), same_device);
    }
  }

  if (report != nullptr) {
    report->bytes = total;
    report->seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    report->kernel_path = ops_->backend;
    double sum_gbps = 0;
    double slowest = 0;
    for (const DevRank& R : ranks_) {
      const double bytes = static_cast<double>(R.shard.header().data_size);
      const double gbps = R.load_seconds > 0 ? bytes / R.load_seconds / 1e9 : 0;
      sum_gbps += gbps;
      slowest = std::max(slowest, R.load_seconds);
      report->details.push_back(str_cat("rank ", R.rank, ": ", ops_->backend, " device ", R.device,
                                        R.device_name.empty() ? "" : " (" + R.device_name + ")", ", ",
                                        human_bytes(bytes), " in ", fixed(R.load_seconds, 2), " s (",
                                        fixed(gbps, 2), " GB/s, ", options.loader, "), collectives: ", R.comm->name()));
    }
    report->details.push_back(str_cat("all ranks: ", human_bytes(static_cast<double>(total)), " at ",
                                      fixed(slowest > 0 ? static_cast<double>(total) / slowest / 1e9 : 0, 2),
                                      " GB/s (sum of the ranks' rates ", fixed(sum_gbps, 2), " GB/s)"));
  }
  return {};
}

// ---------------------------------------------------------------------------------
// Sequences.
Status DeviceEngine::open_slot(int slot, int64_t capacity) {
  GROKIT_TRY(check_running());
  const int64_t L = cfg_.num_layers, dh = cfg_.key_size;
  return run_on_ranks([&](DevRank& R) -> Status {
    if (R.caches.size() <= static_cast<size_t>(slot)) R.caches.resize(static_cast<size_t>(slot) + 1);
    DevCache& c = R.caches[static_cast<size_t>(slot)];
    const size_t bytes = static_cast<size_t>(L * 2 * R.kv_heads * capacity * dh) * sizeof(uint16_t);
    // Each sequence's cache is allocated as it opens: a failure says which sequence size
    // found the device full, and what would make room.
    if (Status st = c.kv.allocate(R.ops, bytes); !st.ok())
      return make_error("rank ", R.rank, ": the KV cache of a sequence of ", capacity, " positions: ", st.error().message,
                        "; ask for fewer positions (shorter prompts, --max-tokens) or fewer sequences at once");
    GROKIT_TRY(c.valid.allocate(R.ops, static_cast<size_t>(capacity)));
    DEV_TRY(R.ops, R.ops->fill(c.kv.get(), 0, bytes, R.stream));
    DEV_TRY(R.ops, R.ops->fill(c.valid.get(), 0, static_cast<size_t>(capacity), R.stream));
    DEV_TRY(R.ops, R.ops->stream_sync(R.stream));
    return {};
  });
}

Result<int> DeviceEngine::open_sequence(int64_t capacity) {
  if (capacity <= 0) return make_error("a sequence needs a capacity of at least one position");
  if (capacity > cfg_.sequence_len)
    return make_error("a sequence of ", capacity, " positions exceeds the model's sequence_len of ", cfg_.sequence_len);
  size_t slot = 0;
  while (slot < sequences_.size() && sequences_[slot].open) ++slot;
  if (slot == sequences_.size()) sequences_.emplace_back();
  if (cluster_ && leader_) GROKIT_TRY(cluster_->broadcast(encode_open_sequence(capacity, static_cast<int32_t>(slot))));
  GROKIT_TRY(open_slot(static_cast<int>(slot), capacity));
  sequences_[slot] = DevSequence{true, capacity, 0};
  return static_cast<int>(slot);
}

void DeviceEngine::close_sequence(int slot) {
  GROKIT_CHECK(slot >= 0 && static_cast<size_t>(slot) < sequences_.size());
  if (cluster_ && leader_) (void)cluster_->broadcast(encode_close_sequence(slot));
  sequences_[static_cast<size_t>(slot)] = DevSequence{};
  (void)run_on_ranks([&](DevRank& R) -> Status {
    if (static_cast<size_t>(slot) < R.caches.size()) R.caches[static_cast<size_t>(slot)] = DevCache{};
    return {};
  });
}

// ---------------------------------------------------------------------------------
// Steps.
Status DeviceEngine::step(std::span<const StepRow> rows, const LogitsSink& logits, const StepTaps* taps) {
  GROKIT_TRY(check_running());
  GROKIT_TRY(check_step_rows(
      rows, cfg_,
      [&](int slot) -> int64_t {
        if (slot < 0 || static_cast<size_t>(slot) >= sequences_.size() || !sequences_[static_cast<size_t>(slot)].open)
          return -1;
        return sequences_[static_cast<size_t>(slot)].length;
      },
      [&](int slot) { return sequences_[static_cast<size_t>(slot)].capacity; }));
  // Followers run the same rows; the leader waits for their acks after its own part.
  uint64_t seq = 0;
  if (cluster_ && leader_) {
    GROKIT_ASSIGN_OR_RETURN(seq, cluster_->send(encode_step(rows)));
  }
  std::vector<int64_t> done(rows.size(), 0);
  Status sink_error;
  while (true) {
    const std::vector<PlanRow> plan = next_chunk(rows, done, options_.prefill_chunk, [&](int slot) {
      return sequences_[static_cast<size_t>(slot)].length;
    });
    if (plan.empty()) break;
    sink_status_ = {};
    GROKIT_TRY(run_plan(plan, leader_ ? &logits : nullptr, leader_ ? taps : nullptr));
    for (const PlanRow& p : plan) {
      sequences_[static_cast<size_t>(p.slot)].length += p.n;
      done[p.user_row] += p.n;
    }
    // Other hosts run the whole step: so does the leader, before it reports.
    if (!sink_status_.ok() && sink_error.ok()) sink_error = std::move(sink_status_);
    if (!sink_error.ok() && !cluster_) return sink_error;
  }
  if (seq != 0) GROKIT_TRY(cluster_->wait(seq));
  return sink_error;
}

Status DeviceEngine::follow() {
  if (!cluster_ || leader_) return Engine::follow();
  while (true) {
    GROKIT_ASSIGN_OR_RETURN(ClusterCommand msg, cluster_->receive(kWaitForever));
    auto cmd = decode_command(msg.bytes);
    if (!cmd.ok()) {
      Status bad = cmd.error();
      (void)cluster_->ack(msg.seq, bad);
      return bad;
    }
    Status s;
    switch (cmd->kind) {
      case CommandKind::kShutdown:
        GROKIT_TRY(cluster_->ack(msg.seq, {}));
        return {};
      case CommandKind::kLoaded:
      case CommandKind::kStartCollectives:
        s = make_error("the leader sent a loading command after the load");
        break;
      case CommandKind::kOpenSequence: {
        const size_t slot = static_cast<size_t>(cmd->slot);
        if (cmd->slot < 0 || cmd->capacity <= 0 || cmd->capacity > cfg_.sequence_len ||
            (slot < sequences_.size() && sequences_[slot].open)) {
          s = make_error("the leader opened sequence ", cmd->slot, " with capacity ", cmd->capacity,
                         ", which this host cannot match");
          break;
        }
        if (sequences_.size() <= slot) sequences_.resize(slot + 1);
        s = open_slot(cmd->slot, cmd->capacity);
        if (s.ok()) sequences_[slot] = DevSequence{true, cmd->capacity, 0};
        break;
      }
      case CommandKind::kCloseSequence:
        if (cmd->slot >= 0 && static_cast<size_t>(cmd->slot) < sequences_.size()) close_sequence(cmd->slot);
        break;
      case CommandKind::kStep: {
        std::vector<StepRow> rows = cmd->step_rows();
        s = step(rows, LogitsSink{}, nullptr);
        break;
      }
    }
    GROKIT_TRY(cluster_->ack(msg.seq, s));
    if (!s.ok()) return s;
  }
}

Status DeviceEngine::reserve(DevRank& R, int64_t N) {
  Activations& A = R.act;
  const GrokitOps* ops = R.ops;
  if (A.xf.get() == nullptr) {
    const int64_t D = cfg_.emb_size, Vr = R.vocab_rows;
    GROKIT_TRY(A.xf.allocate(ops, static_cast<size_t>(kLogitsChunk * D) * 4));
    GROKIT_TRY(A.part.allocate(ops, static_cast<size_t>(kLogitsChunk * Vr) * 4));
    GROKIT_TRY(A.all.allocate(ops, static_cast<size_t>(tp_ * kLogitsChunk * Vr) * 4));
    GROKIT_TRY(R.host_logits.allocate(ops, static_cast<size_t>(tp_ * kLogitsChunk * Vr) * 4, true));
  }
  if (N <= A.tokens) return {};
  // New buffers move every pointer a graph holds.
  for (auto& [b, g] : R.graphs) ops->graph_destroy(g);
  R.graphs.clear();
  R.graph_warm.clear();
  const int64_t n = std::max<int64_t>(N, 16);
  const int64_t D = cfg_.emb_size, dh = cfg_.key_size, top = cfg_.num_selected_experts, L = cfg_.num_layers;
  const size_t f = sizeof(float);
  const size_t QD = static_cast<size_t>(R.q_heads * dh), KVD = static_cast<size_t>(R.kv_heads * dh);
  const size_t nn = static_cast<size_t>(n);
  GROKIT_TRY(A.x.allocate(ops, nn * static_cast<size_t>(D) * f));
  GROKIT_TRY(A.a.allocate(ops, nn * static_cast<size_t>(D) * f));
  GROKIT_TRY(A.tmp.allocate(ops, nn * static_cast<size_t>(D) * f));
  GROKIT_TRY(A.q.allocate(ops, nn * QD * f));
  GROKIT_TRY(A.o.allocate(ops, nn * QD * f));
  GROKIT_TRY(A.k.allocate(ops, nn * KVD * f));
  GROKIT_TRY(A.v.allocate(ops, nn * KVD * f));
  GROKIT_TRY(A.experts.allocate(ops, nn * static_cast<size_t>(top) * 4));
  GROKIT_TRY(A.gates.allocate(ops, nn * static_cast<size_t>(top) * f));
  GROKIT_TRY(A.g.allocate(ops, nn * static_cast<size_t>(top * R.ffn) * f));
  GROKIT_TRY(A.routed.allocate(ops, nn * static_cast<size_t>(top * D) * f));
  GROKIT_TRY(A.tok.allocate(ops, nn * 4));
  GROKIT_TRY(A.pos.allocate(ops, nn * 4));
  GROKIT_TRY(A.rows.allocate(ops, nn * static_cast<size_t>(L) * sizeof(GrokitAttnRow)));
  GROKIT_TRY(R.host_rows.allocate(ops, nn * static_cast<size_t>(L) * sizeof(GrokitAttnRow), true));
  GROKIT_TRY(R.host_in.allocate(ops, nn * 8, true));
  A.tokens = n;
  return {};
}

Status DeviceEngine::run_plan(const std::vector<PlanRow>& plan, const LogitsSink* logits, const StepTaps* taps) {
  return run_on_ranks([&](DevRank& R) { return rank_step(R, plan, logits, taps); });
}

// The layers, on R's stream, for the N tokens whose inputs are in R.act (tok, pos, rows).
Status DeviceEngine::forward(DevRank& R, int64_t N, int64_t max_keys, const StepTaps* taps,
                             const std::vector<PlanRow>& plan) {
  const GrokitOps* ops = R.ops;
  GrokitStream st = R.stream;
  Activations& A = R.act;
  const int64_t D = cfg_.emb_size, dh = cfg_.key_size, E = cfg_.num_experts, top = cfg_.num_selected_experts;
  const int64_t F = R.ffn;
  const float eps = static_cast<float>(cfg_.rms_norm_eps);
  float *x = A.x.get<float>(), *a = A.a.get<float>(), *tmp = A.tmp.get<float>();
  float *q = A.q.get<float>(), *k = A.k.get<float>(), *v = A.v.get<float>(), *o = A.o.get<float>();
  float *g = A.g.get<float>(), *routed = A.routed.get<float>(), *gates = A.gates.get<float>();
  int32_t* experts = A.experts.get<int32_t>();
  std::vector<float> hidden_host;
  std::vector<int32_t> experts_host;
  // Rank 0 hands its copy of dev [N, width] to a tap, plan row by plan row. A sink error
  // is kept (as emit_logits does), not returned: rank 0 leaving the layer loop early
  // would leave the other ranks waiting in the next collective for ever.
  auto emit_rows = [&](auto& host, const auto* dev, int64_t width, auto&& sink) -> Status {
    host.resize(static_cast<size_t>(N * width));
    DEV_TRY(ops, ops->copy(host.data(), dev, host.size() * sizeof host[0], GROKIT_COPY_D2H, st));
    DEV_TRY(ops, ops->stream_sync(st));
    if (R.comm->aborted()) return make_error("rank 0: the step's collectives were aborted");
    int64_t t = 0;
    for (const auto& p : plan) {
      Status s = sink(p, host.data() + t * width);
      if (!s.ok()) {
        sink_status_ = std::move(s);
        return {};
      }
      t += p.n;
    }
    return {};
  };
  auto emit_hidden = [&](int index) -> Status {
    if (taps == nullptr || !taps->hidden || R.rank != 0 || !sink_status_.ok()) return {};
    return emit_rows(hidden_host, x, D, [&](const PlanRow& p, const float* rows) {
      return taps->hidden(index, p.user_row, p.user_offset, p.n, rows);
    });
  };
  auto emit_routing = [&](int layer) -> Status {
    if (taps == nullptr || !taps->routing || R.rank != 0 || !sink_status_.ok()) return {};
    return emit_rows(experts_host, experts, top, [&](const PlanRow& p, const int32_t* rows) {
      return taps->routing(layer, p.user_row, p.user_offset, p.n, rows);
    });
  };

  DEV_TRY(ops, ops->embed(A.tok.get<int32_t>(), N, R.embedding, R.vocab_start, R.vocab_rows, D,
                          cfg_.embedding_multiplier_bf16(), x, st));
  GROKIT_TRY(R.comm->all_reduce_sum(x, static_cast<size_t>(N * D)));
  GROKIT_TRY(emit_hidden(0));
  const LayerDims dims{D, dh, R.q_heads, R.kv_heads, F, E, top, eps, static_cast<float>(cfg_.attn_output_multiplier),
                       static_cast<float>(cfg_.attn_logit_cap), cfg_.rope_base};
  for (int64_t l = 0; l < cfg_.num_layers; ++l) {
    const LayerIO io{x, a, tmp, q, k, v, o, gates, g, routed, experts, A.pos.get<int32_t>(),
                     A.rows.get<GrokitAttnRow>() + l * N};
    // Each layer's last op also writes the next layer's normed input (LayerChain).
    const LayerChain chain{l > 0, l + 1 < cfg_.num_layers ? R.layers[static_cast<size_t>(l + 1)].attn_norm_in : nullptr};
    GROKIT_TRY(run_layer(ops, st, R.layers[static_cast<size_t>(l)], dims, io, N, max_keys, R.comm.get(), chain));
    GROKIT_TRY(emit_routing(static_cast<int>(l)));
    GROKIT_TRY(emit_hidden(static_cast<int>(l + 1)));
  }
  return {};
}

// Logits of n rows of x (device) into R.act.all: [TP][kLogitsChunk][Vr].
Status DeviceEngine::logits_chunk(DevRank& R, const float* x_rows, int64_t n) {
  const GrokitOps* ops = R.ops;
  Activations& A = R.act;
  const int64_t D = cfg_.emb_size, Vr = R.vocab_rows;
  DEV_TRY(ops, ops->rmsnorm(x_rows, n, D, R.final_norm, static_cast<float>(cfg_.rms_norm_eps), A.xf.get<float>(), R.stream));
  DEV_TRY(ops, ops->logits(A.xf.get<float>(), n, D, R.embedding, Vr, cfg_.output_multiplier_bf16(), A.part.get<float>(), Vr,
                           R.stream));
  return R.comm->all_gather(A.part.get(), A.all.get(), static_cast<size_t>(kLogitsChunk * Vr) * sizeof(float));
}

Status DeviceEngine::rank_step(DevRank& R, const std::vector<PlanRow>& plan, const LogitsSink* logits_sink,
                               const StepTaps* taps) {
  const GrokitOps* ops = R.ops;
  GrokitStream st = R.stream;
  int64_t N = 0;
  for (const auto& p : plan) N += p.n;
  GROKIT_TRY(reserve(R, N));
  Activations& A = R.act;
  const int64_t D = cfg_.emb_size, L = cfg_.num_layers, dh = cfg_.key_size;

  // Which positions want logits.
  std::vector<std::pair<size_t, int64_t>> want;  // (plan row, index within it)
  std::vector<int64_t> token_index;
  wanted_logits(plan, &want, &token_index);
  // A decode step (one token per row, every row's logits) can replay a graph.
  bool decode = taps == nullptr && N <= kLogitsChunk && static_cast<int64_t>(want.size()) == N;
  for (const auto& p : plan) decode = decode && p.n == 1;
  const bool graphable = decode && options_.graphs && ops->graph_begin != nullptr && R.comm->graph_safe();
  // Every decode step sizes attention for the whole sequence, replayed or not: the
  // split of the keys follows max_keys, so graphs and op-by-op steps give the same bits.
  const int64_t max_keys = decode ? cfg_.sequence_len : [&] {
    int64_t m = 1;
    for (const auto& p : plan) m = std::max(m, p.start + p.n);
    return m;
  }();

  // Inputs: tokens, positions, and each layer's attention rows.
  int32_t* tok = R.host_in.get<int32_t>();
  int32_t* pos = tok + N;
  auto* rows = R.host_rows.get<GrokitAttnRow>();
  {
    int64_t t = 0;
    for (const auto& p : plan) {
      DevCache& c = R.caches[static_cast<size_t>(p.slot)];
      const int64_t cap = sequences_[static_cast<size_t>(p.slot)].capacity;
      const size_t per_layer = static_cast<size_t>(2 * R.kv_heads * cap * dh);  // uint16 elements
      for (int64_t i = 0; i < p.n; ++i, ++t) {
        tok[t] = p.tokens[i];
        pos[t] = static_cast<int32_t>(p.start + i);
        for (int64_t l = 0; l < L; ++l) {
          GrokitAttnRow& ar = rows[l * N + t];
          uint16_t* base = c.kv.get<uint16_t>() + static_cast<size_t>(l) * per_layer;
          ar.k = base;
          ar.v = base + per_layer / 2;
          ar.valid = c.valid.get<uint8_t>();
          ar.cap = cap;
          ar.n_keys = p.start + p.n;
          ar.pos = static_cast<int32_t>(p.start + i);
          ar.token = p.tokens[i];
        }
      }
    }
  }
  DEV_TRY(ops, ops->copy(A.tok.get(), tok, static_cast<size_t>(N) * 4, GROKIT_COPY_H2D, st));
  DEV_TRY(ops, ops->copy(A.pos.get(), pos, static_cast<size_t>(N) * 4, GROKIT_COPY_H2D, st));
  DEV_TRY(ops, ops->copy(A.rows.get(), rows, static_cast<size_t>(N * L) * sizeof(GrokitAttnRow), GROKIT_COPY_H2D, st));

  const int64_t Vr = R.vocab_rows;
  if (graphable) {
    // The first step of a batch size runs eagerly (every op sizes its scratch), the
    // second is captured, the later ones replay.
    auto it = R.graphs.find(N);
    if (it == R.graphs.end()) {
      if (R.graph_warm[N]++ == 0) {
        GROKIT_TRY(forward(R, N, max_keys, nullptr, plan));
        GROKIT_TRY(logits_chunk(R, A.x.get<float>(), N));
      } else {
        void* graph = nullptr;
        DEV_TRY(ops, ops->graph_begin(st));
        Status s = forward(R, N, max_keys, nullptr, plan);
        if (s.ok()) s = logits_chunk(R, A.x.get<float>(), N);
        int rc = ops->graph_end(st, &graph);
        if (!s.ok() && rc == GROKIT_OK) ops->graph_destroy(graph);  // a partial capture: not kept
        GROKIT_TRY(std::move(s));
        DEV_TRY(ops, rc);
        R.graphs[N] = graph;
        DEV_TRY(ops, ops->graph_launch(graph, st));
      }
    } else {
      DEV_TRY(ops, ops->graph_launch(it->second, st));
    }
    GROKIT_TRY(emit_logits(R, plan, want, 0, N, logits_sink));
    return end_of_step(R);
  }

  GROKIT_TRY(forward(R, N, max_keys, taps, plan));
  for (size_t c0 = 0; c0 < want.size(); c0 += kLogitsChunk) {
    const int64_t n = std::min<int64_t>(kLogitsChunk, static_cast<int64_t>(want.size() - c0));
    // Gather the rows that want logits (contiguous in a decode step).
    bool contiguous = true;
    for (int64_t i = 1; i < n; ++i) contiguous = contiguous && token_index[c0 + i] == token_index[c0] + i;
    const float* xr = A.x.get<float>() + token_index[c0] * D;
    if (!contiguous) {
      for (int64_t i = 0; i < n; ++i)
        DEV_TRY(ops, ops->copy(A.tmp.get<float>() + i * D, A.x.get<float>() + token_index[c0 + static_cast<size_t>(i)] * D,
                               static_cast<size_t>(D) * 4, GROKIT_COPY_D2D, st));
      xr = A.tmp.get<float>();
    }
    GROKIT_TRY(logits_chunk(R, xr, n));
    GROKIT_TRY(emit_logits(R, plan, want, c0, n, logits_sink));
  }
  (void)Vr;
  return end_of_step(R);
}

// Waits for the step (the pinned inputs are rewritten next step) and takes the rank's
// stream's word on the values only the device read (ops.h take_device_errors; ranks
// sharing a GPU have one each, so a bit names its rank). Those are the engine's own
// (positions, key counts, the router's expert ids): a bit raised is a broken invariant.
Status DeviceEngine::end_of_step(DevRank& R) {
  uint32_t flags = 0;
  DEV_TRY(R.ops, R.ops->take_device_errors(R.stream, &flags));
  // A communicator aborted under the step (its watchdog saw a peer fail) let the
  // collectives end without their data: the step's results are not to be used.
  if (R.comm && R.comm->aborted())
    return make_error("rank ", R.rank, ": the step's collectives were abandoned: ", R.comm->abort_reason());
  GROKIT_CHECK_MSG(flags == 0,
                   str_cat("rank ", R.rank, ": the device met values the engine wrote out of range:",
                           (flags & GROKIT_DEVERR_KV_ROW) != 0 ? " a KV-cache store row (position or cache)" : "",
                           (flags & GROKIT_DEVERR_ATTN_ROW) != 0 ? " an attention row (key count, position or cache)" : "",
                           (flags & GROKIT_DEVERR_EXPERT) != 0 ? " an expert id past the stack" : ""));
  return {};
}

// Rank 0 hands the gathered logits to the sink. A sink error is kept, not returned, so
// that every rank (and host) still runs the same collectives; step() returns it.
Status DeviceEngine::emit_logits(DevRank& R, const std::vector<PlanRow>& plan,
                                 const std::vector<std::pair<size_t, int64_t>>& want, size_t c0, int64_t n,
                                 const LogitsSink* sink) {
  if (R.rank != 0 || sink == nullptr || !*sink) return {};
  const GrokitOps* ops = R.ops;
  const int64_t Vr = R.vocab_rows, V = cfg_.vocab_size;
  float* host = R.host_logits.get<float>();
  const float* all = R.act.all.get<float>();
  // Only the chunk's n rows of each rank's part (a decode step of one row would otherwise
  // copy kLogitsChunk rows: 16 MiB at Grok-1's vocabulary and TP 8).
  if (n == kLogitsChunk) {
    DEV_TRY(ops, ops->copy(host, all, static_cast<size_t>(tp_ * kLogitsChunk * Vr) * 4, GROKIT_COPY_D2H, R.stream));
  } else {
    for (int rk = 0; rk < tp_; ++rk) {
      const int64_t at = static_cast<int64_t>(rk) * kLogitsChunk * Vr;
      DEV_TRY(ops, ops->copy(host + at, all + at, static_cast<size_t>(n * Vr) * 4, GROKIT_COPY_D2H, R.stream));
    }
  }
  DEV_TRY(ops, ops->stream_sync(R.stream));
  if (R.comm && R.comm->aborted()) return make_error("rank 0: the logits' collectives were aborted");
  if (!sink_status_.ok()) return {};
  full_logits_.resize(static_cast<size_t>(V));
  for (int64_t i = 0; i < n; ++i) {
    for (int rk = 0; rk < tp_; ++rk)
      std::memcpy(full_logits_.data() + rk * Vr, host + (static_cast<int64_t>(rk) * kLogitsChunk + i) * Vr,
                  static_cast<size_t>(Vr) * 4);
    const auto& [r, idx] = want[c0 + static_cast<size_t>(i)];
    Status s = (*sink)(plan[r].user_row, plan[r].user_offset + idx, full_logits_.data());
    if (!s.ok()) {
      sink_status_ = std::move(s);
      return {};
    }
  }
  return {};
}

}  // namespace grokit::runner
