// grokit bench: measurements against the machine's own limits.
#include <immintrin.h>

#include <cxxopts.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "cli/cli.h"
#include "format/format.h"
#include "kernels/kernels.h"
#include "runner/runner.h"

namespace grokit::cli {

namespace {

__attribute__((target("avx2"))) double sum_avx2(const float* p, size_t n) {
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  for (size_t i = 0; i + 32 <= n; i += 32) {
    a0 = _mm256_add_ps(a0, _mm256_load_ps(p + i));
    a1 = _mm256_add_ps(a1, _mm256_load_ps(p + i + 8));
    a2 = _mm256_add_ps(a2, _mm256_load_ps(p + i + 16));
    a3 = _mm256_add_ps(a3, _mm256_load_ps(p + i + 24));
  }
  alignas(32) float t[8];
  _mm256_store_ps(t, _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
  double s = 0;
  for (float v : t) s += v;
  return s;
}

// The best read bandwidth (bytes/s) of `reps` passes over segments of memory, split
// evenly over the threads by bytes (each segment's length a multiple of 128 bytes).
double read_bandwidth(ThreadPool& pool, unsigned threads, const std::vector<std::pair<const float*, size_t>>& segs,
                      int reps) {
  size_t total = 0;
  for (const auto& s : segs) total += s.second;
  const size_t per = (total / threads + 31) / 32 * 32;
  double best = 0;
  for (int rep = 0; rep < reps; ++rep) {
    std::atomic<double> sink{0};
    auto t0 = std::chrono::steady_clock::now();
    pool.run(threads, [&](size_t t) {
      // Thread t reads floats [t * per, (t + 1) * per) of the segments laid end to end.
      size_t begin = t * per, end = std::min(total, begin + per), at = 0;
      double s = 0;
      for (const auto& [p, n] : segs) {
        const size_t a = std::max(begin, at), b = std::min(end, at + n);
        if (a < b) s += sum_avx2(p + (a - at), b - a);
        at += n;
      }
      double expected = sink.load();
      while (!sink.compare_exchange_weak(expected, expected + s)) {
      }
    });
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    best = std::max(best, static_cast<double>(total * sizeof(float)) / secs);
  }
  return best;
}

// A buffer larger than the caches, first touched by the threads that read it; measure()
// returns the best read bandwidth (bytes/s) of `reps` passes.
class ReadProbe {
 public:
  ReadProbe(unsigned threads, uint64_t bytes)
      : threads_(threads), n_(bytes / sizeof(float) / 32 * 32), pool_(threads) {
    buf_ = static_cast<float*>(std::aligned_alloc(64, n_ * sizeof(float)));
    GROKIT_CHECK(buf_ != nullptr);
    parallel_for(threads, threads, [&](size_t t) {
      size_t a = n_ / threads * t, b = t + 1 == threads ? n_ : n_ / threads * (t + 1);
      for (size_t i = a; i < b; ++i) buf_[i] = 1.0f;
    });
  }
  ~ReadProbe() { std::free(buf_); }
  ReadProbe(const ReadProbe&) = delete;
  ReadProbe& operator=(const ReadProbe&) = delete;

  double measure(int reps) { return read_bandwidth(pool_, threads_, {{buf_, n_}}, reps); }
  ThreadPool& pool() { return pool_; }

 private:
  unsigned threads_;
  size_t n_;
  ThreadPool pool_;
  float* buf_ = nullptr;
};

double median_of(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

}  // namespace

double measure_read_bandwidth(unsigned threads, uint64_t bytes) { return ReadProbe(threads, bytes).measure(5); }

void print_profile(std::FILE* f, const std::vector<runner::OpProfile>& prof, double per, const char* unit) {
  double total = 0;
  for (const auto& p : prof) total += p.seconds;
  for (const auto& p : prof) {
    std::fprintf(f, "  %-16s %10.3f %s  %5.1f %%", p.op.c_str(), p.seconds / per * 1e3, unit,
                 total > 0 ? 100.0 * p.seconds / total : 0.0);
    if (p.weight_bytes > 0 && p.seconds > 0)
      std::fprintf(f, "  %7.2f GB/s  (%.3f MiB per %s)", static_cast<double>(p.weight_bytes) / p.seconds / 1e9,
                   static_cast<double>(p.weight_bytes) / per / (1 << 20), per == 1 ? "run" : "step");
    std::fprintf(f, "\n");
  }
  std::fprintf(f, "  %-16s %10.3f %s\n", "all ops", total / per * 1e3, unit);
}

int cmd_bench(int argc, char** argv) {
  const char* prog = "grokit bench";
  cxxopts::Options opts(prog,
                        "Measure memory read bandwidth, then decode one token at a time on a model and print the "
                        "roofline ratio: (weight bytes read per token / bandwidth) / step time.");
  opts.positional_help("<model dir>");
  opts.add_options()
      ("threads", "threads (0: every core)", cxxopts::value<unsigned>()->default_value("0"))
      ("steps", "decode steps to time in each round", cxxopts::value<int>()->default_value("32"))
      ("rounds", "rounds of (bandwidth probe, decode steps): the limit is measured next to the steps it bounds, "
       "since a shared host's bandwidth drifts", cxxopts::value<int>()->default_value("5"))
      ("prompt-tokens", "prompt length before the timed steps (its prefill is timed too)",
       cxxopts::value<int>()->default_value("16"))
      ("buffer-mb", "bandwidth test buffer, MiB (larger than the caches); also the most of the weights' pages read "
       "for their bandwidth", cxxopts::value<unsigned>()->default_value("1024"))
      ("device", "cpu, cuda or host (see grokit run --help); the bandwidth measured is the host's memory: for "
       "cuda see scripts/gpu-check.sh", cxxopts::value<std::string>()->default_value("cpu"))
      ("profile", "also print where the timed steps went, op by op (rank 0; --device cpu), with the weight "
       "products' GB/s (default: off)", cxxopts::value<bool>()->default_value("false")->implicit_value("true"))
;
  ParsedArgs parsed;
  if (auto rc = parse_args(opts, argc, argv, 1, 1, parsed)) return *rc;
  const cxxopts::ParseResult& r = parsed.result;
  const std::string model_dir = parsed.positional[0], device = r["device"].as<std::string>();
  unsigned threads = r["threads"].as<unsigned>();
  if (threads == 0) threads = hardware_threads();
  int steps = r["steps"].as<int>(), prompt = r["prompt-tokens"].as<int>(), rounds = r["rounds"].as<int>();
  if (steps < 1 || prompt < 1 || rounds < 1)
    return std::fprintf(stderr, "%s: --steps, --rounds and --prompt-tokens must be >= 1\n", prog), kExitUsage;

  const uint64_t probe_bytes = uint64_t{r["buffer-mb"].as<unsigned>()} << 20;
  ReadProbe probe(threads, probe_bytes);
  runner::EngineOptions eo;
  eo.threads = threads;
  eo.verify = false;
  eo.progress = false;
  eo.device = device;
  eo.profile = r["profile"].as<bool>();
  if (eo.profile && device != "cpu")
    return std::fprintf(stderr, "%s: --profile times the CPU engine's ops; --device %s runs them asynchronously\n", prog,
                        device.c_str()),
           kExitUsage;
  auto engine = runner::Engine::load(model_dir, eo);
  if (!engine.ok()) return std::fprintf(stderr, "%s: error: %s\n", prog, engine.error().message.c_str()), kExitFailure;
  runner::Engine& eng = **engine;
  auto slot = eng.open_sequence(prompt + steps * rounds + 1);
  if (!slot.ok()) return std::fprintf(stderr, "%s: error: %s\n", prog, slot.error().message.c_str()), kExitFailure;
  std::vector<int32_t> tokens(static_cast<size_t>(prompt));
  for (int i = 0; i < prompt; ++i) tokens[static_cast<size_t>(i)] = 3 + (i * 7919) % static_cast<int>(eng.config().vocab_size - 3);
  int32_t next = 0;
  auto take = [&](size_t, int64_t, const float* logits) {
    next = runner::argmax(std::span<const float>(logits, static_cast<size_t>(eng.config().vocab_size)));
    if (next == 0) next = 3;
    return Status{};
  };
  runner::StepRow row{*slot, tokens, runner::StepRow::Logits::kLast};
  const auto prompt_t0 = std::chrono::steady_clock::now();
  if (auto s = eng.step(std::span<const runner::StepRow>(&row, 1), take); !s.ok())
    return std::fprintf(stderr, "%s: error: %s\n", prog, s.error().message.c_str()), kExitFailure;
  const double prompt_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - prompt_t0).count();
  eng.reset_profile();  // the timed decode steps only, not the prompt
  // The prompt's prefill, once (its first call also faults in the weights' pages: run a
  // long one, --prompt-tokens, for a prefill rate).
  std::printf("prompt (prefill)      : %8d tokens in %.2f ms -> %.1f tok/s\n", prompt, prompt_s * 1e3, prompt / prompt_s);
  const uint64_t bytes = eng.weight_bytes_per_token();
  std::printf("weights read per token: %10.3f MiB (attention, %ld of %ld experts, output projection)\n",
              static_cast<double>(bytes) / (1 << 20), static_cast<long>(eng.config().num_selected_experts),
              static_cast<long>(eng.config().num_experts));
  // On the CPU the weights are the shard files' page-cache pages, memory-mapped: the limit
  // for reading them is measured on those very pages (mapped again here; each file whole,
  // or 64 MiB pieces spread evenly over it, --buffer-mb in all), like `cp` of the same bytes. A fresh anonymous buffer
  // is measured too and its ratio shown beside: the two differ by the host's placement
  // of the memory (a few percent here, in either direction).
  std::vector<MappedFile> shards;
  std::vector<std::pair<const float*, size_t>> shard_pages;
  if (device == "cpu") {
    const int tp = eng.tensor_parallel();
    for (int rk = 0; rk < tp; ++rk) {
      const std::string path = model_dir + "/" + format::shard_file_name(static_cast<uint32_t>(rk), static_cast<uint32_t>(tp));
      auto m = MappedFile::open(path);
      if (!m.ok()) return std::fprintf(stderr, "%s: error: %s\n", prog, m.error().message.c_str()), kExitFailure;
      shards.push_back(std::move(*m));
      const uint8_t* base = shards.back().data();
      const uint64_t size = shards.back().size() / 128 * 128, budget = probe_bytes / static_cast<uint64_t>(tp);
      constexpr uint64_t kPiece = uint64_t{64} << 20;
      if (size <= budget) {
        shard_pages.emplace_back(reinterpret_cast<const float*>(base), size / 4);
        continue;
      }
      const uint64_t pieces = std::max<uint64_t>(1, budget / kPiece);
      for (uint64_t i = 0; i < pieces; ++i) {
        const uint64_t at = size / pieces * i / 4096 * 4096;
        shard_pages.emplace_back(reinterpret_cast<const float*>(base + at), std::min(kPiece, size - at) / 128 * 32);
      }
    }
  }
  const bool same_pages = !shard_pages.empty();
  // Each round: the read bandwidths (best of 3 passes), then `steps` decode steps; the
  // round's ratio = (bytes / the bandwidth) / the median step of the round.
  std::vector<double> all_times, ratios, bws, buffer_ratios, buffer_bws;
  for (int round = 0; round < rounds; ++round) {
    const double buffer_bw = probe.measure(3);
    const double bw = same_pages ? read_bandwidth(probe.pool(), threads, shard_pages, 3) : buffer_bw;
    std::vector<double> times;
    for (int i = 0; i < steps; ++i) {
      int32_t t = next;
      row = {*slot, std::span<const int32_t>(&t, 1), runner::StepRow::Logits::kLast};
      auto t0 = std::chrono::steady_clock::now();
      if (auto s = eng.step(std::span<const runner::StepRow>(&row, 1), take); !s.ok())
        return std::fprintf(stderr, "%s: error: %s\n", prog, s.error().message.c_str()), kExitFailure;
      times.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    }
    const double med = median_of(times);
    all_times.insert(all_times.end(), times.begin(), times.end());
    bws.push_back(bw);
    ratios.push_back(static_cast<double>(bytes) / bw / med);
    buffer_bws.push_back(buffer_bw);
    buffer_ratios.push_back(static_cast<double>(bytes) / buffer_bw / med);
    if (same_pages)
      std::printf("round %d: read bandwidth %7.2f GB/s (the weights' pages; a fresh buffer %.2f), %u threads, decode step "
                  "%7.3f ms, ratio %.2f (against the buffer %.2f)\n",
                  round + 1, bw / 1e9, buffer_bw / 1e9, threads, med * 1e3, ratios.back(), buffer_ratios.back());
    else
      std::printf("round %d: read bandwidth %7.2f GB/s (%u threads), decode step %7.3f ms, ratio %.2f\n", round + 1,
                  bw / 1e9, threads, med * 1e3, ratios.back());
  }
  const double median = median_of(all_times), ratio = median_of(ratios);
  const double best_bw = *std::max_element(bws.begin(), bws.end());
  std::printf("decode step (median)  : %8.2f ms  -> %6.2f tok/s\n", median * 1e3, 1.0 / median);
  std::printf("read bandwidth        : %8.2f - %.2f GB/s over the rounds%s\n",
              *std::min_element(bws.begin(), bws.end()) / 1e9, best_bw / 1e9, same_pages ? " (the weights' pages)" : "");
  std::printf("roofline ratio        : %8.2f (median of the rounds, %.2f - %.2f; target >= 0.7)\n", ratio,
              *std::min_element(ratios.begin(), ratios.end()), *std::max_element(ratios.begin(), ratios.end()));
  std::printf("  against the best bandwidth of all rounds and the median step: %.2f\n",
              static_cast<double>(bytes) / best_bw / median);
  if (same_pages)
    std::printf("  against a fresh buffer (%.2f - %.2f GB/s): median %.2f, best buffer bandwidth %.2f\n",
                *std::min_element(buffer_bws.begin(), buffer_bws.end()) / 1e9,
                *std::max_element(buffer_bws.begin(), buffer_bws.end()) / 1e9, median_of(buffer_ratios),
                static_cast<double>(bytes) / *std::max_element(buffer_bws.begin(), buffer_bws.end()) / median);
  if (eo.profile) {
    double steps_total = 0;
    for (double t : all_times) steps_total += t;
    std::printf("profile (rank 0, mean per decode step over %zu steps, the steps as timed %.3f ms):\n",
                all_times.size(), steps_total / static_cast<double>(all_times.size()) * 1e3);
    print_profile(stdout, eng.profile(), static_cast<double>(all_times.size()), "ms");
  }
  const bool pair_form = eo.device == "cpu" && *kernels::cpu_bf16_pair_form() != 0;
  std::fprintf(stderr, "%s: %.2f tok/s, roofline %.2f, kernels %s%s%s%s\n", prog, 1.0 / median, ratio,
               kernels::cpu_kernel_path(), pair_form ? " (bf16 pairs by " : "",
               pair_form ? kernels::cpu_bf16_pair_form() : "", pair_form ? ")" : "");
  return kExitOk;
}

}  // namespace grokit::cli
