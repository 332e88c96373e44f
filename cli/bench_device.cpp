// grokit bench-device: the GPU checks' benchmarks, each against a limit measured in the
// same run: read bandwidth, host-to-device bandwidth, the decode step and the prefill of
// one real-width layer as one rank of TP 8 runs it, and shard loading.
#include <unistd.h>
#include <xxhash.h>

#include <cxxopts.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <random>
#include <thread>
#include <vector>

#include "cli/cli.h"
#include "runner/backend.h"
#include "runner/device_layer.h"
#include "runner/device_loader.h"

namespace grokit::cli {

namespace {

using runner::DeviceBuffer;
using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

// Fast deterministic bytes.
void fill_random(uint8_t* p, size_t n, uint64_t seed) {
  uint64_t s = seed * 0x9E3779B97F4A7C15ull + 1;
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    s ^= s << 13;
    s ^= s >> 7;
    s ^= s << 17;
    std::memcpy(p + i, &s, 8);
  }
  for (; i < n; ++i) p[i] = static_cast<uint8_t>(s >> (8 * (i % 8)));
}

void fill_u16(uint8_t* p, size_t count, uint16_t v) {
  for (size_t i = 0; i < count; ++i) std::memcpy(p + 2 * i, &v, 2);
}

// A weight payload (format/SPEC.md §4, §4.1) of random codes with sane scales.
Result<std::vector<uint8_t>> make_payload(format::DType dt, uint32_t param, int64_t E, int64_t K, int64_t N,
                                          uint64_t seed) {
  std::vector<int64_t> shape{E, K, N};
  const std::optional<uint64_t> bytes = format::payload_size(dt, shape, param);
  if (!bytes)
    return make_error("a ", format::dtype_name(dt), " matrix of ", K, " x ", N, " (parameter ", param,
                      ") does not exist: pick another layer shape");
  std::vector<uint8_t> p(*bytes);
  fill_random(p.data(), p.size(), seed);
  switch (dt) {
    case format::DType::kQ8RowBlock: {
      const uint64_t codes = align_up(static_cast<uint64_t>(E * K * N), 64);
      std::fill(p.begin() + static_cast<ptrdiff_t>(E * K * N), p.begin() + static_cast<ptrdiff_t>(codes), 0);
      fill_u16(p.data() + codes, static_cast<size_t>(E * param * N), 0x3a80);  // 2^-10 * 1.0
      break;
    }
    case format::DType::kQ4Group: {
      const int64_t G = param, groups = E * (K / G);
      const uint64_t gbytes = format::q4g_group_bytes(G, N);
      for (int64_t g = 0; g < groups; ++g) {
        uint8_t* s = p.data() + g * gbytes + G / 2 * N;
        std::memset(s, 0, gbytes - static_cast<uint64_t>(G / 2 * N));
        fill_u16(s, static_cast<size_t>(N), 0x3c80);  // 2^-6
      }
      break;
    }
    case format::DType::kBF16:
      for (size_t i = 0; i + 1 < p.size(); i += 2) p[i + 1] = static_cast<uint8_t>(0x3c + (p[i + 1] & 1)) | (p[i + 1] & 0x80);
      break;
    default: break;
  }
  return p;
}

struct Layer {
  runner::DevLayer w;
  std::vector<DeviceBuffer> buffers;
  uint64_t attention_bytes = 0, expert_bytes = 0, small_bytes = 0;
};

// Rank 0 of TP `tp`'s share of layer 0 of `cfg`, in `scheme` ("int8", "int4", "bf16").
Result<Layer> make_layer(const GrokitOps* ops, GrokitStream st, const format::ModelConfig& cfg, int tp,
                         const std::string& scheme) {
  Layer L;
  uint64_t seed = 7;
  auto upload = [&](const void* host, size_t bytes) -> Result<void*> {
    DeviceBuffer b;
    GROKIT_TRY(b.allocate(ops, bytes));
    DEV_TRY(ops, ops->copy(b.get(), host, bytes, GROKIT_COPY_H2D, st));
    DEV_TRY(ops, ops->stream_sync(st));
    void* p = b.get();
    L.buffers.push_back(std::move(b));
    return p;
  };
  uint64_t scratch = 0;
  for (const auto& spec : format::model_tensors(cfg)) {
    if (spec.layer != 0) continue;
    format::ShardSlice s = format::shard_slice(spec, cfg, tp, 0);
    if (spec.dtype == format::DType::kF32) {
      int64_t n = 1;
      for (int64_t d : s.shape) n *= d;
      std::vector<float> v(static_cast<size_t>(n), 1.0f);
      if (spec.kind == format::TensorKind::kRouter) {
        std::mt19937 rng(static_cast<uint32_t>(seed++));
        std::normal_distribution<float> nd(0.f, 0.02f);
        for (auto& f : v) f = nd(rng);
      }
      GROKIT_ASSIGN_OR_RETURN(void* p, upload(v.data(), v.size() * 4));
      L.small_bytes += v.size() * 4;
      const float* f = static_cast<const float*>(p);
      switch (spec.kind) {
        case format::TensorKind::kNormAttnIn: L.w.attn_norm_in = f; break;
        case format::TensorKind::kNormAttnOut: L.w.attn_norm_out = f; break;
        case format::TensorKind::kNormMoeIn: L.w.moe_norm_in = f; break;
        case format::TensorKind::kNormMoeOut: L.w.moe_norm_out = f; break;
        case format::TensorKind::kRouter: L.w.router = f; break;
        default: break;
      }
      continue;
    }
    const bool expert = s.shape.size() == 3;
    const int64_t E = expert ? s.shape[0] : 1, K = s.shape[s.shape.size() - 2], N = s.shape.back();
    format::DType dt = format::DType::kQ8RowBlock;
    uint32_t param = s.blocks;
    if (scheme == "int4") dt = format::DType::kQ4Group, param = 128;
    if (scheme == "bf16") dt = format::DType::kBF16, param = 0;
    if (dt == format::DType::kQ4Group && K % 128 != 0) param = K % 64 == 0 ? 64 : 32;
    GROKIT_ASSIGN_OR_RETURN(std::vector<uint8_t> payload, make_payload(dt, param, E, K, N, seed++));
    GROKIT_ASSIGN_OR_RETURN(void* p, upload(payload.data(), payload.size()));
    GrokitWeight w{};
    w.dtype = static_cast<int32_t>(dt);
    w.param = static_cast<int32_t>(param);
    w.experts = E;
    w.rows = K;
    w.cols = N;
    w.matrix_bytes = dt == format::DType::kQ8RowBlock ? static_cast<uint64_t>(K * N) : payload.size() / static_cast<uint64_t>(E);
    w.data = p;
    (expert ? L.expert_bytes : L.attention_bytes) += payload.size();
    scratch = std::max(scratch, ops->prepare_scratch_bytes(&w));
    switch (spec.kind) {
      case format::TensorKind::kAttnQuery: L.w.query = w; break;
      case format::TensorKind::kAttnKey: L.w.key = w; break;
      case format::TensorKind::kAttnValue: L.w.value = w; break;
      case format::TensorKind::kAttnOutput: L.w.output = w; break;
      case format::TensorKind::kMoeGate: L.w.gate = w; break;
      case format::TensorKind::kMoeUp: L.w.up = w; break;
      case format::TensorKind::kMoeDown: L.w.down = w; break;
      default: break;
    }
  }
  DeviceBuffer sb;
  GROKIT_TRY(sb.allocate(ops, scratch));
  for (GrokitWeight* w : {&L.w.query, &L.w.key, &L.w.value, &L.w.output, &L.w.gate, &L.w.up, &L.w.down})
    DEV_TRY(ops, ops->prepare_weight(w, sb.get(), st));
  DEV_TRY(ops, ops->stream_sync(st));
  return L;
}

// Activations and a KV cache for N tokens of one sequence with `cap` positions.
struct Run {
  DeviceBuffer x, a, tmp, q, k, v, o, gates, g, routed, experts, pos, rows, kv, valid;
  runner::LayerIO io{};
};

Result<std::unique_ptr<Run>> make_run(const GrokitOps* ops, GrokitStream st, const runner::LayerDims& d, int64_t N,
                                      int64_t first_pos, int64_t cap) {
  auto r = std::make_unique<Run>();
  const size_t n = static_cast<size_t>(N), f = 4;
  const size_t QD = static_cast<size_t>(d.q_heads * d.head_dim), KVD = static_cast<size_t>(d.kv_heads * d.head_dim);
  const size_t D = static_cast<size_t>(d.D), F = static_cast<size_t>(d.ffn), top = static_cast<size_t>(d.top);
  for (auto [b, bytes] : {std::pair{&r->x, n * D * f}, {&r->a, n * D * f}, {&r->tmp, n * D * f}, {&r->q, n * QD * f},
                          {&r->o, n * QD * f}, {&r->k, n * KVD * f}, {&r->v, n * KVD * f}, {&r->gates, n * top * f},
                          {&r->g, n * top * F * f}, {&r->routed, n * top * D * f},
                          {&r->experts, n * top * 4}, {&r->pos, n * 4}, {&r->rows, n * sizeof(GrokitAttnRow)}})
    GROKIT_TRY(b->allocate(ops, bytes));
  const size_t kv_elems = static_cast<size_t>(2 * d.kv_heads * cap * d.head_dim);
  GROKIT_TRY(r->kv.allocate(ops, kv_elems * 2));
  GROKIT_TRY(r->valid.allocate(ops, static_cast<size_t>(cap)));
  // Inputs: x of bf16 values, the cache of random bf16 values, every position valid.
  std::vector<float> x(n * D);
  std::mt19937 rng(11);
  std::normal_distribution<float> nd(0.f, 1.f);
  for (auto& v : x) v = round_bf16(nd(rng));
  DEV_TRY(ops, ops->copy(r->x.get(), x.data(), x.size() * 4, GROKIT_COPY_H2D, st));
  std::vector<uint16_t> kv(kv_elems);
  for (auto& v : kv) v = f32_to_bf16_bits(nd(rng) * 0.5f);
  DEV_TRY(ops, ops->copy(r->kv.get(), kv.data(), kv.size() * 2, GROKIT_COPY_H2D, st));
  DEV_TRY(ops, ops->fill(r->valid.get(), 1, static_cast<size_t>(cap), st));
  std::vector<int32_t> pos(n);
  std::vector<GrokitAttnRow> rows(n);
  for (size_t i = 0; i < n; ++i) {
    pos[i] = static_cast<int32_t>(first_pos + static_cast<int64_t>(i));
    GrokitAttnRow& ar = rows[i];
    ar.k = r->kv.get<uint16_t>();
    ar.v = r->kv.get<uint16_t>() + kv_elems / 2;
    ar.valid = r->valid.get<uint8_t>();
    ar.cap = cap;
    ar.n_keys = first_pos + N;
    ar.pos = pos[i];
    ar.token = 5;
  }
  DEV_TRY(ops, ops->copy(r->pos.get(), pos.data(), n * 4, GROKIT_COPY_H2D, st));
  DEV_TRY(ops, ops->copy(r->rows.get(), rows.data(), n * sizeof(GrokitAttnRow), GROKIT_COPY_H2D, st));
  DEV_TRY(ops, ops->stream_sync(st));
  r->io = runner::LayerIO{r->x.get<float>(),      r->a.get<float>(),    r->tmp.get<float>(), r->q.get<float>(),
                          r->k.get<float>(),      r->v.get<float>(),    r->o.get<float>(),   r->gates.get<float>(),
                          r->g.get<float>(),      r->routed.get<float>(), r->experts.get<int32_t>(),
                          r->pos.get<int32_t>(),  r->rows.get<GrokitAttnRow>()};
  return r;
}

// Median seconds of one decode step of the layer (a replayed graph where the backend has them).
Result<double> time_decode(const GrokitOps* ops, GrokitStream st, const Layer& L, const runner::LayerDims& d,
                           Run& r, int64_t max_keys, int reps, int steps) {
  // As in a stack of such layers: each step's last op norms the next step's input.
  runner::LayerChain chain{false, L.w.attn_norm_in};
  auto once = [&]() { return runner::run_layer(ops, st, L.w, d, r.io, 1, max_keys, nullptr, chain); };
  GROKIT_TRY(once());  // sizes every op's scratch
  chain.input_normed = true;
  DEV_TRY(ops, ops->stream_sync(st));
  void* graph = nullptr;
  if (ops->graph_begin != nullptr) {
    DEV_TRY(ops, ops->graph_begin(st));
    Status s = once();
    int rc = ops->graph_end(st, &graph);
    GROKIT_TRY(std::move(s));
    DEV_TRY(ops, rc);
  }
  std::vector<double> t;
  for (int i = 0; i < reps; ++i) {
    auto t0 = Clock::now();
    for (int j = 0; j < steps; ++j) {  // several steps per timing, so launch and sync costs amortize
      if (graph != nullptr) DEV_TRY(ops, ops->graph_launch(graph, st));
      else GROKIT_TRY(once());
    }
    DEV_TRY(ops, ops->stream_sync(st));
    t.push_back(seconds_since(t0) / steps);
  }
  if (graph != nullptr) ops->graph_destroy(graph);
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

struct Row {
  std::string what, value, limit, ratio, target;
};

// Times each op of a layer: waits for the stream after each one (so the ops do not
// overlap and the host's own work between them counts where it happens).
class OpClock final : public runner::LayerProbe {
 public:
  OpClock(const GrokitOps* ops, GrokitStream st) : ops_(ops), st_(st) {}
  void start() {
    ops_->stream_sync(st_);
    last_ = Clock::now();
  }
  Status mark(const char* op) override {
    DEV_TRY(ops_, ops_->stream_sync(st_));
    const auto now = Clock::now();
    const double s = std::chrono::duration<double>(now - last_).count();
    last_ = now;
    for (auto& [name, secs] : ops)
      if (name == op) return secs = std::min(secs, s), Status{};
    ops.emplace_back(op, s);
    return {};
  }
  std::vector<std::pair<std::string, double>> ops;  // the fastest of the runs, per op

 private:
  const GrokitOps* ops_;
  GrokitStream st_;
  Clock::time_point last_;
};

// --sweep: each decode product of a layer alone, timed under every decode plan the CUDA
// backend can be told to use (GROKIT_CUDA_DECODE_PLAN = k splits, log2 of the warps
// across columns, twice the bytes in flight or not), against the read bandwidth: which
// plan the planner should pick.
// Prints the plan's own choice and the three fastest per product on stdout.
Status sweep_decode(const GrokitOps* ops, GrokitStream st, const char* scheme, const Layer& L, const runner::LayerDims& d,
                    Run& r, int64_t max_keys, double hbm_gbps, int steps) {
  GROKIT_TRY(runner::run_layer(ops, st, L.w, d, r.io, 1, max_keys, nullptr, runner::LayerChain{}));  // routes the row
  DEV_TRY(ops, ops->stream_sync(st));
  const int64_t D = d.D, QD = d.q_heads * d.head_dim, F = d.ffn, top = d.top;
  const GrokitRouting up_route{r.io.experts, top}, down_route{r.io.experts, 1};
  struct Product {
    const char* name;
    int count;  // 1: matmul; more: one matmul_multi
    const GrokitWeight* w[3];
    const float* x;
    int64_t M, ldx;
    int32_t flags;
    const GrokitRouting* routing;
    float* y[3];
    int64_t ldy[3];
  };
  const int64_t KVD = d.kv_heads * d.head_dim;
  const Product products[] = {
      {"q, k, v", 3, {&L.w.query, &L.w.key, &L.w.value}, r.io.a, 1, D, GROKIT_MATMUL_ROUND_BF16, nullptr,
       {r.io.q, r.io.k, r.io.v}, {QD, KVD, KVD}},
      {"output", 1, {&L.w.output}, r.io.o, 1, QD, 0, nullptr, {r.io.tmp}, {D}},
      {"expert gate", 1, {&L.w.gate}, r.io.a, top, D, GROKIT_MATMUL_ROUND_BF16, &up_route, {r.io.g}, {F}},
      {"expert down", 1, {&L.w.down}, r.io.g, top, F, GROKIT_MATMUL_X_FP32, &down_route, {r.io.routed}, {D}},
  };
  auto bytes_of = [&](const Product& pr) {
    double b = 0;
    for (int i = 0; i < pr.count; ++i)
      b += static_cast<double>(pr.w[i]->matrix_bytes) * (pr.w[i]->experts > 1 ? static_cast<double>(top) : 1.0);
    return b;
  };
  for (const Product& pr : products) {
    struct Timed {
      double us;
      std::string plan;
    };
    std::vector<Timed> all;
    Timed own{0, "the plan's own"};
    auto time_with = [&](const std::string& plan) -> Result<double> {
      if (plan.empty()) ::unsetenv("GROKIT_CUDA_DECODE_PLAN");
      else ::setenv("GROKIT_CUDA_DECODE_PLAN", plan.c_str(), 1);
      double best = 1e30;
      for (int rep = 0; rep < 3; ++rep) {
        auto t0 = Clock::now();
        for (int i = 0; i < steps; ++i) {
          if (pr.count == 1) DEV_TRY(ops, ops->matmul(pr.w[0], pr.x, pr.M, pr.ldx, pr.flags, pr.routing, pr.y[0], pr.ldy[0], st));
          else DEV_TRY(ops, ops->matmul_multi(pr.w, pr.count, pr.x, pr.M, pr.ldx, pr.flags, pr.y, pr.ldy, st));
        }
        DEV_TRY(ops, ops->stream_sync(st));
        best = std::min(best, seconds_since(t0) / steps);
      }
      return best * 1e6;
    };
    GROKIT_ASSIGN_OR_RETURN(own.us, time_with(""));
    for (int deep : {0, 1})
      for (int wl = 0; wl <= 3; ++wl)
        for (int ks : {1, 2, 4, 6, 8, 12, 16, 24, 32}) {
          const std::string plan = str_cat(ks, ",", wl, ",", deep);
          auto t = time_with(plan);
          ::unsetenv("GROKIT_CUDA_DECODE_PLAN");
          if (!t.ok()) return t.error();
          all.push_back({*t, str_cat("ks ", ks, ", ", 1 << wl, " warps across", deep != 0 ? ", deep" : "")});
        }
    std::sort(all.begin(), all.end(), [](const Timed& a, const Timed& b) { return a.us < b.us; });
    const double mb = bytes_of(pr) / 1e6;
    auto line = [&](const Timed& t) {
      const double gbps = mb * 1e6 / (t.us * 1e-6) / 1e9;
      std::printf("sweep %-5s %-12s %-32s %8.1f us %7.0f GB/s  %.2f of read\n", scheme, pr.name, t.plan.c_str(), t.us,
                  gbps, gbps / hbm_gbps);
    };
    line(own);
    for (size_t i = 0; i < std::min<size_t>(3, all.size()); ++i) line(all[i]);
  }
  return {};
}

std::string fmt(const char* f, double v) {
  char buf[64];
  std::snprintf(buf, sizeof buf, f, v);
  return buf;
}

}  // namespace

int cmd_bench_device(int argc, char** argv) {
  const char* prog = "grokit bench-device";
  cxxopts::Options opts(prog,
                        "Benchmark a device against limits measured in the same run: read bandwidth, host-to-device "
                        "bandwidth, the decode step (batch 1, int8 and int4) and the prefill of one real-width Grok-1 "
                        "layer as one rank of TP 8 runs it, and shard loading. Prints a table on stdout.");
  opts.add_options()
      ("device", "cuda, or host (the CPU twins; with --small, a smoke test)", cxxopts::value<std::string>()->default_value("cuda"))
      ("gpu", "device index", cxxopts::value<int>()->default_value("0"))
      ("small", "a small layer instead of Grok-1's (emb 256, ffn 512, TP 1) (default: off)",
       cxxopts::value<bool>()->default_value("false")->implicit_value("true"))
      ("context", "positions already in the KV cache for the decode step", cxxopts::value<int64_t>()->default_value("1024"))
      ("prefill-tokens", "tokens of the prefill", cxxopts::value<int64_t>()->default_value("4096"))
      ("load-mb", "MiB of the file the load benchmark writes and loads", cxxopts::value<uint64_t>()->default_value("4096"))
      ("load-readers", "threads reading the file in the load benchmark (0: every core, at most 8)",
       cxxopts::value<unsigned>()->default_value("0"))
      ("work", "directory for the load benchmark's file", cxxopts::value<std::string>()->default_value("/tmp"))
      ("reps", "timed repetitions (the median is kept)", cxxopts::value<int>()->default_value("7"))
      ("steps", "decode steps per timed repetition", cxxopts::value<int>()->default_value("20"))
      ("only", "the parts to run, comma-separated: decode, prefill, load (the two bandwidth limits always run; "
               "a profiler run takes one part at a time)",
       cxxopts::value<std::vector<std::string>>()->default_value("decode,prefill,load"))
      ("sweep", "with the decode part: also time each decode product alone under every decode plan (CUDA) "
                "(default: off)",
       cxxopts::value<bool>()->default_value("false")->implicit_value("true"));
  ParsedArgs parsed;
  if (auto rc = parse_args(opts, argc, argv, 0, 0, parsed)) return *rc;
  const cxxopts::ParseResult& r = parsed.result;
  const std::string device = r["device"].as<std::string>();
  const bool small = r["small"].as<bool>();
  const int gpu = r["gpu"].as<int>(), reps = std::max(1, r["reps"].as<int>());
  const int64_t context = r["context"].as<int64_t>(), prefill = r["prefill-tokens"].as<int64_t>();
  if (context < 0 || prefill < 1) return std::fprintf(stderr, "%s: --context >= 0 and --prefill-tokens >= 1\n", prog), kExitUsage;
  const int steps = r["steps"].as<int>();
  if (steps < 1) return std::fprintf(stderr, "%s: --steps must be at least 1\n", prog), kExitUsage;
  bool want_decode = false, want_prefill = false, want_load = false;
  for (const std::string& part : r["only"].as<std::vector<std::string>>()) {
    if (part == "decode") want_decode = true;
    else if (part == "prefill") want_prefill = true;
    else if (part == "load") want_load = true;
    else return std::fprintf(stderr, "%s: --only: unknown part '%s' (decode, prefill, load)\n", prog, part.c_str()), kExitUsage;
  }
  auto die = [&](const Error& e) {
    std::fprintf(stderr, "%s: error: %s\n", prog, e.message.c_str());
    return kExitFailure;
  };
  auto ops_r = runner::device_ops(device);
  if (!ops_r.ok()) return die(ops_r.error());
  const GrokitOps* ops = *ops_r;
  if (ops->set_device(gpu) != GROKIT_OK) return die(make_error("device ", gpu, ": ", ops->error_message()));
  char name[256] = "host";
  uint64_t mem = 0;
  ops->device_name(gpu, name, sizeof name, &mem);
  GrokitStream st = nullptr;
  if (ops->stream_create(&st) != GROKIT_OK) return die(make_error("stream: ", ops->error_message()));
  std::fprintf(stderr, "%s: %s device %d: %s\n", prog, ops->backend, gpu, name);

  auto body = [&]() -> Status {
    std::vector<Row> rows;
    // 1. Limits.
    const uint64_t probe = small ? (uint64_t{256} << 20) : (uint64_t{4} << 30);
    double hbm = 0;
    if (device == "cuda") {
      GROKIT_ASSIGN_OR_RETURN(hbm, runner::cuda_read_bandwidth(gpu, probe));
    } else {
      hbm = measure_read_bandwidth(hardware_threads(), probe) / 1e9;
    }
    rows.push_back({"device read bandwidth", fmt("%.0f GB/s", hbm), "", "", ""});
    double h2d = 0;
    {
      DeviceBuffer host, dev;
      const size_t bytes = small ? (size_t{64} << 20) : (size_t{1} << 30);
      GROKIT_TRY(host.allocate(ops, bytes, true));
      GROKIT_TRY(dev.allocate(ops, bytes));
      std::memset(host.get(), 1, bytes);
      for (int i = 0; i < reps; ++i) {
        auto t0 = Clock::now();
        DEV_TRY(ops, ops->copy(dev.get(), host.get(), bytes, GROKIT_COPY_H2D, st));
        DEV_TRY(ops, ops->stream_sync(st));
        h2d = std::max(h2d, static_cast<double>(bytes) / seconds_since(t0) / 1e9);
      }
    }
    rows.push_back({"host-to-device (pinned)", fmt("%.1f GB/s", h2d), "", "", ""});

    // 2. One layer as rank 0 of TP 8.
    format::ModelConfig cfg;
    int tp = 8;
    if (small) {
      cfg.emb_size = 256, cfg.num_q_heads = 8, cfg.num_kv_heads = 8, cfg.key_size = 32, cfg.widening_factor = 3;  // ffn 512
      cfg.num_layers = 1, cfg.vocab_size = 1024;
      tp = 1;
    }
    const int64_t dh = cfg.key_size;
    const runner::LayerDims d{cfg.emb_size, dh, cfg.num_q_heads / tp, cfg.num_kv_heads >= tp ? cfg.num_kv_heads / tp : 1,
                              cfg.ffn() / tp, cfg.num_experts, cfg.num_selected_experts,
                              static_cast<float>(cfg.rms_norm_eps), static_cast<float>(cfg.attn_output_multiplier),
                              static_cast<float>(cfg.attn_logit_cap), cfg.rope_base};
    const int64_t cap = std::max(context + 1, prefill);
    for (const char* scheme : {"int8", "int4"}) {
      if (!want_decode) break;
      GROKIT_ASSIGN_OR_RETURN(Layer L, make_layer(ops, st, cfg, tp, scheme));
      GROKIT_ASSIGN_OR_RETURN(auto run, make_run(ops, st, d, 1, context, cap));
      GROKIT_ASSIGN_OR_RETURN(double t, time_decode(ops, st, L, d, *run, cap, reps, steps));
      if (r["sweep"].as<bool>()) GROKIT_TRY(sweep_decode(ops, st, scheme, L, d, *run, cap, hbm, steps));
      const uint64_t kv = static_cast<uint64_t>(2 * d.kv_heads * (context + 1) * dh * 2);
      const uint64_t bytes = L.attention_bytes + L.expert_bytes / static_cast<uint64_t>(d.experts) *
                                                     static_cast<uint64_t>(d.top) + L.small_bytes + kv;
      const double gbps = static_cast<double>(bytes) / t / 1e9;
      rows.push_back({std::string("decode step, ") + scheme + ", batch 1",
                      fmt("%.1f us", t * 1e6) + fmt(", %.1f MB", static_cast<double>(bytes) / 1e6) + fmt(" -> %.0f GB/s", gbps),
                      "read bandwidth", fmt("%.2f", gbps / hbm), ">= 0.7"});
      // The same step with each kernel waiting for the one before to finish before it starts
      // (the CUDA backend's programmatic dependent launch off): what the overlap gains.
      const char* pdl = std::getenv("GROKIT_CUDA_PDL");
      if (std::strcmp(scheme, "int8") == 0 && (pdl == nullptr || std::strcmp(pdl, "0") != 0)) {
        const std::string was = pdl != nullptr ? pdl : "";
        ::setenv("GROKIT_CUDA_PDL", "0", 1);
        Result<double> serial = time_decode(ops, st, L, d, *run, cap, reps, steps);
        if (pdl != nullptr) ::setenv("GROKIT_CUDA_PDL", was.c_str(), 1);
        else ::unsetenv("GROKIT_CUDA_PDL");
        GROKIT_ASSIGN_OR_RETURN(double ts, std::move(serial));
        rows.push_back({"  int8, launches serialized", fmt("%.1f us", ts * 1e6), "overlapped / not",
                        fmt("%.2f", t / ts), ""});
      }
    }

    // 3. Prefill against the bf16 matrix peak (a large bf16 product through the same op).
    double peak = 0;
    if (want_prefill) {
      const int64_t n = small ? 256 : 8192;
      GROKIT_ASSIGN_OR_RETURN(std::vector<uint8_t> w, make_payload(format::DType::kBF16, 0, 1, n, n, 3));
      DeviceBuffer wb, x, y;
      GROKIT_TRY(wb.allocate(ops, w.size()));
      GROKIT_TRY(x.allocate(ops, static_cast<size_t>(n * n) * 4));
      GROKIT_TRY(y.allocate(ops, static_cast<size_t>(n * n) * 4));
      DEV_TRY(ops, ops->copy(wb.get(), w.data(), w.size(), GROKIT_COPY_H2D, st));
      {
        std::vector<float> xs(static_cast<size_t>(n * n));
        std::mt19937 rng(2);
        std::normal_distribution<float> nd(0.f, 1.f);
        for (auto& v : xs) v = round_bf16(nd(rng));
        DEV_TRY(ops, ops->copy(x.get(), xs.data(), xs.size() * 4, GROKIT_COPY_H2D, st));
      }
      GrokitWeight gw{};
      gw.dtype = static_cast<int32_t>(format::DType::kBF16);
      gw.experts = 1, gw.rows = n, gw.cols = n, gw.matrix_bytes = w.size(), gw.data = wb.get();
      for (int i = 0; i < reps + 1; ++i) {
        auto t0 = Clock::now();
        DEV_TRY(ops, ops->matmul(&gw, x.get<float>(), n, n, 0, nullptr, y.get<float>(), n, st));
        DEV_TRY(ops, ops->stream_sync(st));
        if (i > 0) peak = std::max(peak, 2.0 * n * n * n / seconds_since(t0));
      }
    }
    if (want_prefill) {
      rows.push_back({"bf16 matrix product (peak)", fmt("%.1f TFLOP/s", peak / 1e12), "", "", ""});
      GROKIT_ASSIGN_OR_RETURN(Layer L, make_layer(ops, st, cfg, tp, "int8"));
      GROKIT_ASSIGN_OR_RETURN(auto run, make_run(ops, st, d, prefill, 0, cap));
      double best = 1e30;
      for (int i = 0; i < std::min(reps, 3) + 1; ++i) {
        auto t0 = Clock::now();
        GROKIT_TRY(runner::run_layer(ops, st, L.w, d, run->io, prefill, prefill, nullptr, runner::LayerChain{}));
        DEV_TRY(ops, ops->stream_sync(st));
        if (i > 0) best = std::min(best, seconds_since(t0));
      }
      const double D = static_cast<double>(d.D), QD = static_cast<double>(d.q_heads * dh),
                   KVD = static_cast<double>(d.kv_heads * dh), F = static_cast<double>(d.ffn), P = static_cast<double>(prefill);
      const double macs = P * (D * QD + 2 * D * KVD + QD * D + static_cast<double>(d.top) * 3 * D * F) +
                          static_cast<double>(d.q_heads) * static_cast<double>(dh) * 2 * P * (P + 1) / 2;
      const double flops = 2 * macs / best;
      rows.push_back({fmt("prefill %.0f tokens, int8", P), fmt("%.2f ms", best * 1e3) + fmt(" -> %.1f TFLOP/s", flops / 1e12),
                      "bf16 peak", fmt("%.2f", flops / peak), ">= 0.5"});
      // Where it goes: each op alone (the stream waited for after each).
      OpClock clock(ops, st);
      for (int i = 0; i < 2; ++i) {
        clock.start();
        GROKIT_TRY(runner::run_layer(ops, st, L.w, d, run->io, prefill, prefill, nullptr, runner::LayerChain{}, &clock));
      }
      double sum = 0;
      for (const auto& [op, secs] : clock.ops) sum += secs;
      for (const auto& [op, secs] : clock.ops)
        rows.push_back({"  " + op, fmt("%.3f ms", secs * 1e3), "of the op sum", fmt("%.2f", secs / sum), ""});
    }

    // 4. Loading a shard-sized file (page cache warm: it was just written).
    if (want_load) {
      const uint64_t bytes = (small ? std::min<uint64_t>(r["load-mb"].as<uint64_t>(), 256) : r["load-mb"].as<uint64_t>()) << 20;
      const std::string path = path_join(r["work"].as<std::string>(), str_cat("grokit-bench-load-", getpid(), ".bin"));
      // "Tensors" of 48 MiB (a quarter of one of Grok-1's expert matrices at TP 8) with
      // their checksums, as the index of a shard records them.
      std::vector<runner::HashedRange> tensors;
      {
        GROKIT_ASSIGN_OR_RETURN(OutputFile f, OutputFile::open(path, OutputFile::Mode::kCreateOrTruncate));
        std::vector<uint8_t> buf(size_t{48} << 20);
        fill_random(buf.data(), buf.size(), 5);
        for (uint64_t done = 0; done < bytes; done += buf.size()) {
          const size_t n = static_cast<size_t>(std::min<uint64_t>(buf.size(), bytes - done));
          GROKIT_TRY(f.pwrite_all(done, buf.data(), n));
          tensors.push_back({str_cat("t", tensors.size()), done, n, XXH3_64bits(buf.data(), n)});
        }
        GROKIT_TRY(f.close());
      }
      // The same bytes read into host memory, 32 MiB preads by one thread (as cat does) and
      // by as many threads as the loader uses: on a host whose page cache reads slower than
      // the host-to-device copies run, this and not the copies bounds the load.
      const unsigned readers =
          r["load-readers"].as<unsigned>() != 0 ? r["load-readers"].as<unsigned>() : std::min(8u, hardware_threads());
      auto read_rate = [&](unsigned threads) -> Result<double> {
        GROKIT_ASSIGN_OR_RETURN(OutputFile f, OutputFile::open(path, OutputFile::Mode::kOpenExisting));
        constexpr size_t kChunk = size_t{32} << 20;
        const uint64_t chunks = (bytes + kChunk - 1) / kChunk;
        double best = 0;
        for (int i = 0; i < std::min(reps, 3); ++i) {
          std::atomic<uint64_t> next{0};
          std::atomic<bool> failed{false};
          const auto t0 = std::chrono::steady_clock::now();
          std::vector<std::thread> pool;
          for (unsigned t = 0; t < threads; ++t)
            pool.emplace_back([&] {
              std::vector<uint8_t> buf(kChunk);
              for (uint64_t c = next.fetch_add(1); c < chunks; c = next.fetch_add(1)) {
                const uint64_t at = c * kChunk;
                if (!f.pread_all(at, buf.data(), static_cast<size_t>(std::min<uint64_t>(kChunk, bytes - at))).ok())
                  failed.store(true);
              }
            });
          for (auto& t : pool) t.join();
          if (failed.load()) return make_error(path, ": read failed");
          const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
          best = std::max(best, static_cast<double>(bytes) / secs / 1e9);
        }
        GROKIT_TRY(f.close());
        return best;
      };
      GROKIT_ASSIGN_OR_RETURN(const double read_one, read_rate(1));
      GROKIT_ASSIGN_OR_RETURN(const double read_best, read_rate(readers));
      rows.push_back({"file read (page cache)", fmt("%.1f GB/s", read_one), "", "", ""});
      rows.push_back({str_cat("file read, ", readers, " threads"), fmt("%.1f GB/s", read_best), "", "", ""});
      DeviceBuffer dev;
      GROKIT_TRY(dev.allocate(ops, bytes));
      // The load as `grokit run` does it (every tensor's checksum verified on the way), then
      // without the checksums (--no-verify); staged, then mapped (--loader mapped).
      struct LoadRun {
        double rate = 0, hash_share = 0, register_seconds = 0;
      };
      auto load_rate = [&](const std::vector<runner::HashedRange>& ranges, runner::LoadSource source) -> Result<LoadRun> {
        LoadRun best;
        const bool mapped = source == runner::LoadSource::kMapped;
        for (int i = 0; i < std::min(reps, 3); ++i) {
          runner::LoadStats ls;
          GROKIT_TRY(runner::load_file_to_device(ops, st, path, 0, bytes, dev.get(), ranges, nullptr, &ls,
                                                 mapped ? runner::kMappedWindowBytes : runner::kStagingBytes, readers, source));
          const double rate = static_cast<double>(bytes) / ls.seconds / 1e9;
          if (rate > best.rate) {
            best.rate = rate;
            best.hash_share = ls.hash_seconds / std::max(1e-9, ls.hash_seconds + ls.read_seconds);
            best.register_seconds = ls.register_seconds;
          }
        }
        return best;
      };
      auto staged = [&](const std::vector<runner::HashedRange>& ranges) -> Result<LoadRun> {
        Result<LoadRun> r = load_rate(ranges, runner::LoadSource::kStaged);
        if (!r.ok()) ::unlink(path.c_str());
        return r;
      };
      GROKIT_ASSIGN_OR_RETURN(const LoadRun verified, staged(tensors));
      GROKIT_ASSIGN_OR_RETURN(const LoadRun unverified, staged({}));
      rows.push_back({"shard load (page cache)", fmt("%.1f GB/s", verified.rate) + str_cat(", ", readers, " readers, checksums"),
                      "host-to-device", fmt("%.2f", verified.rate / h2d), ">= 0.8"});
      rows.push_back({"  readers' time in XXH3", fmt("%.0f %%", 100 * verified.hash_share), "", "", ""});
      rows.push_back({"  without checksums", fmt("%.1f GB/s", unverified.rate), "host-to-device",
                      fmt("%.2f", unverified.rate / h2d), ""});
      rows.push_back({"  the same load", fmt("%.1f GB/s", unverified.rate), "file read",
                      fmt("%.2f", unverified.rate / read_best), ""});
      // Mapped: where the device cannot register the page cache, the row says why.
      Result<LoadRun> mapped = load_rate(tensors, runner::LoadSource::kMapped);
      if (mapped.ok()) {
        GROKIT_ASSIGN_OR_RETURN(const LoadRun mapped_unverified, load_rate({}, runner::LoadSource::kMapped));
        rows.push_back({"shard load (mapped)", fmt("%.1f GB/s", mapped->rate) + str_cat(", ", readers, " readers, checksums"),
                        "host-to-device", fmt("%.2f", mapped->rate / h2d), ">= 0.8"});
        rows.push_back({"  in host_register", fmt("%.0f %%", 100 * mapped->register_seconds * mapped->rate * 1e9 /
                                                                 static_cast<double>(bytes)),
                        "", "", ""});
        rows.push_back({"  without checksums (mapped)", fmt("%.1f GB/s", mapped_unverified.rate), "host-to-device",
                        fmt("%.2f", mapped_unverified.rate / h2d), ""});
      } else {
        rows.push_back({"shard load (mapped)", "unavailable: " + mapped.error().message.substr(0, 200), "", "", ""});
      }
      if (device == "cuda") {  // GPUDirect Storage, where cuFile is installed
        std::string why_not;
        double seconds = 0;
        auto done = runner::cuda_file_read(gpu, path, 0, bytes, dev.get(), &seconds, &why_not);
        if (!done.ok()) {
          ::unlink(path.c_str());
          return done.error();
        }
        if (*done)
          rows.push_back({"shard load (cuFile)", fmt("%.1f GB/s", static_cast<double>(bytes) / seconds / 1e9),
                          "host-to-device", fmt("%.2f", static_cast<double>(bytes) / seconds / 1e9 / h2d), ""});
        else
          rows.push_back({"shard load (cuFile)", "unavailable: " + why_not.substr(0, 60), "", "", ""});
      }
      ::unlink(path.c_str());
    }

    std::printf("%-30s %-44s %-16s %-6s %s\n", "benchmark", "result", "against", "ratio", "target");
    for (const Row& row : rows)
      std::printf("%-30s %-44s %-16s %-6s %s\n", row.what.c_str(), row.value.c_str(), row.limit.c_str(),
                  row.ratio.c_str(), row.target.c_str());
    return {};
  };
  Status s = body();
  if (st != nullptr) ops->stream_destroy(st);
  if (!s.ok()) return die(s.error());
  return kExitOk;
}

}  // namespace grokit::cli
