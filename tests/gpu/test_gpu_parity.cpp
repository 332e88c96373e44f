// The parity harness of the device ops (kernels/ops.h), after llama.cpp's
// test-backend-ops: every op runs on every backend against its CPU twin (the CPU kernels
// of kernels/kernels.h, or the op's definition where it has no kernel) on seeded random
// inputs with odd sizes, and is held to a named error budget per op.
//
// Backends: "host" (grokit_host_ops, always: it checks the harness and the host twins,
// which must match the CPU kernels bit for bit, so every budget is exact there) and
// "cuda" (grokit_cuda_ops from the plugin: $GROKIT_CUDA_PLUGIN, else beside the test
// binary as runner::cuda_plugin_path() looks). Without the plugin, its device ops or a
// device every cuda case skips with the reason.
//
// Each case uploads its inputs with the backend's alloc/copy, poisons its outputs with
// 0xFF bytes (a NaN, an expert id of -1), runs the op on a stream of the backend, syncs,
// downloads and compares; elements outside the output (stride padding, cache positions
// not stored to) must keep their old bytes. A failure names the worst element.
// Filter: --gtest_filter='*cuda_matmul_q4g*'.
#include <dlfcn.h>
#include <gtest/gtest-spi.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <sstream>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "common/common.h"
#include "kernels/kernels.h"
#include "kernels/ops.h"
#include "tests/gpu/payloads.h"

namespace grokit::parity {
namespace {

using payloads::Rng;
using payloads::WeightPayload;
namespace K = kernels;

// ---------------------------------------------------------------------------------
// Backends.

struct Backend {
  std::string name;
  const GrokitOps* ops = nullptr;
  const GrokitCollectives* collectives = nullptr;  // the CUDA plugin's NCCL table
  std::string skip;   // why the backend cannot run here (a skip, not a failure)
  std::string error;  // a broken backend (a failure)
};

std::string exe_dir() {
  char buf[PATH_MAX];
  ssize_t n = readlink("/proc/self/exe", buf, sizeof buf - 1);
  if (n <= 0) return ".";
  buf[n] = '\0';
  std::string s(buf);
  return s.substr(0, s.rfind('/'));
}

// Where runner::cuda_plugin_path() looks (without linking the runner, so that this
// binary needs little): $GROKIT_CUDA_PLUGIN, else <bin>/../lib, else <bin>.
std::vector<std::string> plugin_candidates() {
  if (const char* env = std::getenv("GROKIT_CUDA_PLUGIN"); env != nullptr && *env != '\0') return {env};
  const std::string bin = exe_dir();
  return {bin.substr(0, bin.rfind('/')) + "/lib/libgrokit_cuda.so", bin + "/libgrokit_cuda.so"};
}

const Backend& host_backend() {
  static const Backend b = [] {
    Backend h;
    h.name = "host";
    h.ops = grokit_host_ops();
    return h;
  }();
  return b;
}

// GROKIT_REQUIRE_CUDA=1 (scripts/gpu-check.sh): a CUDA backend that cannot run is a
// failure, not a skip, on the machine that is there to run it.
Backend require_if_asked(Backend c) {
  const char* env = std::getenv("GROKIT_REQUIRE_CUDA");
  if (c.ops == nullptr && c.error.empty() && env != nullptr && std::string(env) == "1")
    c.error = "GROKIT_REQUIRE_CUDA=1: " + c.skip;
  return c;
}

const Backend& cuda_backend() {
  static const Backend b = require_if_asked([] {
    Backend c;
    c.name = "cuda";
    std::string path, tried;
    for (const auto& p : plugin_candidates()) {
      if (path.empty() && access(p.c_str(), F_OK) == 0) path = p;
      tried += (tried.empty() ? "" : ", ") + p;
    }
    if (path.empty()) {
      c.skip = "no CUDA plugin (looked for " + tried +
               "): configure with -DGROKIT_CUDA=ON and build grokit_cuda, or set GROKIT_CUDA_PLUGIN";
      return c;
    }
    void* h = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (h == nullptr) {
      c.skip = "cannot load the CUDA plugin " + path + ": " + dlerror();
      return c;
    }
    auto get = reinterpret_cast<const GrokitOps* (*)()>(dlsym(h, "grokit_cuda_ops"));
    if (get == nullptr) {
      c.skip = "the CUDA plugin " + path + " exports no grokit_cuda_ops (no device ops yet)";
      return c;
    }
    const GrokitOps* ops = get();
    if (auto coll = reinterpret_cast<const GrokitCollectives* (*)()>(dlsym(h, "grokit_cuda_collectives")))
      c.collectives = coll();
    if (ops == nullptr || ops->abi_version != GROKIT_OPS_ABI_VERSION) {
      c.error = path + ": device ops ABI " + std::to_string(ops == nullptr ? -1 : ops->abi_version) + ", expected " +
                std::to_string(GROKIT_OPS_ABI_VERSION);
      return c;
    }
    int n = 0;
    if (int rc = ops->device_count(&n); rc != GROKIT_OK || n < 1) {
      c.skip =
          "no CUDA device: " + (rc != GROKIT_OK ? std::string(ops->error_message()) : std::string("device_count is 0"));
      return c;
    }
    if (ops->set_device(0) != GROKIT_OK) {
      c.error = std::string("set_device(0): ") + ops->error_message();
      return c;
    }
    c.ops = ops;
    char name[256] = {0};
    uint64_t mem = 0;
    if (ops->device_name(0, name, sizeof name, &mem) == GROKIT_OK)
      std::printf("[ parity ] cuda device 0: %s, %.1f GiB\n", name, static_cast<double>(mem) / (1ull << 30));
    return c;
  }());
  return b;
}

const Backend& backend_named(const std::string& name) { return name == "host" ? host_backend() : cuda_backend(); }

// ---------------------------------------------------------------------------------
// Running ops on a backend: device buffers freed at the end, errors thrown.

struct Failure : std::runtime_error {
  using std::runtime_error::runtime_error;
};

class Dev {
 public:
  Dev(const GrokitOps* ops, std::string backend) : ops(ops), backend(std::move(backend)) {
    check(ops->stream_create(&stream), "stream_create");
  }
  ~Dev() {
    ops->stream_sync(stream);
    for (void* p : allocs_) ops->free(p);
    ops->stream_destroy(stream);
  }
  Dev(const Dev&) = delete;
  Dev& operator=(const Dev&) = delete;

  void check(int rc, const std::string& what) const {
    if (rc != GROKIT_OK)
      throw Failure(backend + " " + what + " returned " + std::to_string(rc) + ": " + ops->error_message());
  }
  void* alloc(size_t bytes) {
    void* p = nullptr;
    check(ops->alloc(&p, bytes), "alloc(" + std::to_string(bytes) + ")");
    allocs_.push_back(p);
    return p;
  }
  void sync() { check(ops->stream_sync(stream), "stream_sync"); }
  template <class T>
  T* upload(const std::vector<T>& v) {
    auto* p = static_cast<T*>(alloc(std::max<size_t>(1, v.size() * sizeof(T))));
    if (!v.empty()) check(ops->copy(p, v.data(), v.size() * sizeof(T), GROKIT_COPY_H2D, stream), "copy H2D");
    sync();
    return p;
  }
  // n elements of 0xFF bytes (NaN floats, -1 ids), written by copy (not by fill).
  template <class T>
  T* poisoned(size_t n) {
    std::vector<uint8_t> bytes(std::max<size_t>(1, n * sizeof(T)), 0xFF);
    auto* p = static_cast<T*>(alloc(bytes.size()));
    check(ops->copy(p, bytes.data(), bytes.size(), GROKIT_COPY_H2D, stream), "copy H2D");
    sync();
    return p;
  }
  template <class T>
  std::vector<T> download(const T* p, size_t n) {
    std::vector<T> v(n);
    sync();
    if (n > 0) check(ops->copy(v.data(), p, n * sizeof(T), GROKIT_COPY_D2H, stream), "copy D2H");
    sync();
    return v;
  }

  const GrokitOps* ops;
  std::string backend;
  GrokitStream stream = nullptr;

 private:
  std::vector<void*> allocs_;
};

// ---------------------------------------------------------------------------------
// Budgets and comparison.

// Each element: |actual - expected| <= ulps * bf16 ulp of max(|e|, |a|) + rel * scale[i]
// (both 0: equal bits). share < 1: besides, at most that share of the elements (and at
// least 2) may differ at all: for bf16 outputs, where another summation order moves a
// rare element to the next bf16 value but a missed rounding step moves a quarter.
struct Budget {
  const char* name;
  double ulps, rel, share;
};
constexpr Budget kExact{"exact (bit for bit)", 0, 0, 1};
constexpr Budget kRmsnorm{"rmsnorm: 1 bf16 ulp, at most 1% of elements not bit-equal", 1, 0, 0.01};
constexpr Budget kResidualNorm{"residual_norm: 1 bf16 ulp + the slack of a normed addend one bf16 step off "
                                "(payloads::residual_norm_slack), at most 2% of elements not bit-equal (two norms)",
                                1, 1, 0.02};
constexpr Budget kMatmul{"matmul: 2^-16 * sum_k |x_k w_kn|", 0, 0x1p-16, 1};
constexpr Budget kLogits{"logits: 2 bf16 ulps + 2^-16 * |multiplier| * sum_k |x_k E_nk|, at most 1% not bit-equal", 2,
                         0x1p-16, 0.01};
constexpr Budget kAttention{
    "attention: 2 bf16 ulps + 2^-6 * max |v| over the row's visible keys, at most 1% not bit-equal", 2, 0x1p-6, 0.01};
constexpr Budget kGates{"router gates: 2^-14 relative (experts exact)", 0, 0x1p-14, 1};

using payloads::bf16_ulp;

template <class T>
uint64_t bits(T v) {
  uint64_t u = 0;
  std::memcpy(&u, &v, sizeof(T));
  return u;
}

// Compares one output. mask (optional): 1 = the op writes it (held to the budget), 0 =
// it must keep its old bytes (expected holds them). width: elements per row, for the
// report. scale: the rel part's per-element scale.
template <class T>
void compare(const Dev& dev, const std::string& what, const Budget& budget, const std::vector<T>& expected,
             const std::vector<T>& actual, int64_t width, const std::vector<uint8_t>* mask = nullptr,
             const std::vector<double>* scale = nullptr) {
  ASSERT_EQ(expected.size(), actual.size()) << what;
  const bool exact = dev.backend == "host" || (budget.ulps == 0 && budget.rel == 0) || !std::is_floating_point_v<T>;
  size_t bad = 0, worst = SIZE_MAX, held_n = 0, differ = 0;
  double worst_ratio = 0.0, worst_allowed = 0.0;
  for (size_t i = 0; i < expected.size(); ++i) {
    const bool held = mask == nullptr || (*mask)[i] != 0;
    if (!held || exact) {
      if (bits(expected[i]) != bits(actual[i])) {
        ++bad;
        if (worst == SIZE_MAX || worst_ratio < INFINITY) worst = i, worst_ratio = INFINITY, worst_allowed = 0;
      }
      continue;
    }
    if constexpr (std::is_floating_point_v<T>) {
      const double e = expected[i], a = actual[i];
      ++held_n;
      if (bits(expected[i]) != bits(actual[i])) ++differ;
      if (std::isnan(e)) {
        ADD_FAILURE() << what << ": the expected value at " << i << " is NaN (a harness bug)";
        return;
      }
      const double allowed = budget.ulps * bf16_ulp(std::max(std::fabs(e), std::fabs(a))) +
                             budget.rel * (scale != nullptr ? (*scale)[i] : 0.0);
      const double diff = std::isnan(a) ? INFINITY : std::fabs(a - e);
      const double ratio = diff == 0 ? 0.0 : allowed == 0 ? INFINITY : diff / allowed;
      if (diff > allowed) ++bad;
      if (ratio > worst_ratio || worst == SIZE_MAX) worst = i, worst_ratio = ratio, worst_allowed = allowed;
    }
  }
  auto at = [&](size_t i) {
    std::ostringstream os;
    os << i;
    if (width > 0) os << " [" << static_cast<int64_t>(i) / width << ", " << static_cast<int64_t>(i) % width << "]";
    return os.str();
  };
  auto val = [](T v) {
    std::ostringstream os;
    os.precision(9);
    if constexpr (std::is_floating_point_v<T>)
      os << v << " (0x" << std::hex << bits(v) << ")";
    else
      os << +v;
    return os.str();
  };
  if (bad > 0) {
    const bool held = mask == nullptr || (*mask)[worst] != 0;
    ADD_FAILURE() << dev.backend << " " << what << ": " << bad << " of " << expected.size() << " elements outside \""
                  << (exact ? (dev.backend == "host" ? "exact (host twin)" : kExact.name) : budget.name)
                  << "\"; worst at " << at(worst) << (held ? "" : " (must be left alone)") << ": expected "
                  << val(expected[worst]) << ", actual " << val(actual[worst]) << ", allowed " << worst_allowed;
  } else if (!exact && static_cast<double>(differ) > std::max(2.0, budget.share * static_cast<double>(held_n))) {
    ADD_FAILURE() << dev.backend << " " << what << ": " << differ << " of " << held_n
                  << " elements differ from the twin, more than \"" << budget.name
                  << "\" allows (a rounding step missed, or done at another point?); worst at " << at(worst)
                  << ": expected " << val(expected[worst]) << ", actual " << val(actual[worst]);
  } else if (!exact && worst != SIZE_MAX) {
    std::printf("[ parity ] %s %s: worst %.3g of the budget at %s\n", dev.backend.c_str(), what.c_str(), worst_ratio,
                at(worst).c_str());
  }
}

// ---------------------------------------------------------------------------------
// Inputs.

std::vector<float> bf16_values(Rng& rng, size_t n, int lo, int hi) {
  std::vector<float> v(n);
  for (auto& x : v) x = rng.bf16_value(lo, hi);
  return v;
}
std::vector<uint16_t> bf16_bits(Rng& rng, size_t n, int lo, int hi) {
  std::vector<uint16_t> v(n);
  for (auto& x : v) x = rng.bf16_bits(lo, hi);
  return v;
}
// fp32 values (not bf16) of magnitudes 2^lo .. 2^hi.
std::vector<float> f32_values(Rng& rng, size_t n, int lo, int hi) {
  std::vector<float> v(n);
  for (auto& x : v) x = rng.f32(-2.0f, 2.0f) * std::ldexp(1.0f, static_cast<int>(rng.range(lo, hi)));
  return v;
}
uint64_t seed_of(const std::string& s) {
  uint64_t h = 1469598103934665603ull;
  for (char c : s) h = (h ^ static_cast<uint8_t>(c)) * 1099511628211ull;
  return h;
}
std::vector<uint8_t> strided_mask(int64_t rows, int64_t cols, int64_t ld) {
  std::vector<uint8_t> m(static_cast<size_t>(rows * ld), 0);
  for (int64_t r = 0; r < rows; ++r) std::fill_n(m.begin() + r * ld, cols, 1);
  return m;
}
const float kNaN = std::nanf("");

// ---------------------------------------------------------------------------------
// The cases: a name (op first), and the body run on one backend.

struct Case {
  std::string name;
  std::function<void(Dev&, Rng&)> run;
};

std::vector<Case>& registry() {
  static std::vector<Case> cases;
  return cases;
}
void add(std::string name, std::function<void(Dev&, Rng&)> run) {
  registry().push_back({std::move(name), std::move(run)});
}
std::string sz(const char* tag, int64_t v) { return std::string("_") + tag + std::to_string(v); }

// ---- embed, rmsnorm, rope -------------------------------------------------------

void add_embed(int64_t M, int64_t D, int64_t row_start, int64_t rows) {
  add("embed" + sz("M", M) + sz("D", D) + sz("rows", rows), [=](Dev& dev, Rng& rng) {
    std::vector<int32_t> tokens(static_cast<size_t>(M));
    for (auto& t : tokens) t = static_cast<int32_t>(rng.range(row_start - 10, row_start + rows + 10));
    const int32_t edge[] = {static_cast<int32_t>(row_start), static_cast<int32_t>(row_start + rows - 1),
                            static_cast<int32_t>(row_start + rows), static_cast<int32_t>(row_start - 1), -1};
    for (size_t i = 0; i < std::size(edge) && i < tokens.size(); ++i) tokens[i] = edge[i];
    auto table = bf16_bits(rng, static_cast<size_t>(rows * D), -8, 4);
    const float mult = round_bf16(78.38367176906169f);
    std::vector<float> want(static_cast<size_t>(M * D));
    K::embed(tokens.data(), M, table.data(), row_start, rows, D, mult, want.data());
    auto* out = dev.poisoned<float>(want.size());
    dev.check(dev.ops->embed(dev.upload(tokens), M, dev.upload(table), row_start, rows, D, mult, out, dev.stream),
              "embed");
    compare(dev, "embed out", kExact, want, dev.download(out, want.size()), D);
  });
}

void add_rmsnorm(int64_t M, int64_t D, bool in_place) {
  add("rmsnorm" + sz("M", M) + sz("D", D) + (in_place ? "_in_place" : ""), [=](Dev& dev, Rng& rng) {
    std::vector<float> x(static_cast<size_t>(M * D));
    for (int64_t m = 0; m < M; ++m)  // rows of very different magnitudes
      for (int64_t d = 0; d < D; ++d)
        x[static_cast<size_t>(m * D + d)] =
            rng.bf16_value(-12 + static_cast<int>(m % 9), -4 + 2 * static_cast<int>(m % 9));
    auto scale = bf16_values(rng, static_cast<size_t>(D), -2, 1);
    std::vector<float> want(x.size());
    ASSERT_TRUE(K::rmsnorm(x.data(), M, D, scale.data(), 1e-5f, want.data(), nullptr).ok());
    float* xd = dev.upload(x);
    float* out = in_place ? xd : dev.poisoned<float>(x.size());
    dev.check(dev.ops->rmsnorm(xd, M, D, dev.upload(scale), 1e-5f, out, dev.stream), "rmsnorm");
    compare(dev, "rmsnorm out", kRmsnorm, want, dev.download(out, want.size()), D);
  });
}

void add_rope(int64_t M, int64_t heads, int64_t dh) {
  add("rope" + sz("M", M) + sz("H", heads) + sz("dh", dh), [=](Dev& dev, Rng& rng) {
    auto x = bf16_values(rng, static_cast<size_t>(M * heads * dh), -6, 3);
    std::vector<int32_t> pos(static_cast<size_t>(M));
    for (auto& p : pos) p = static_cast<int32_t>(rng.range(0, 8191));
    pos[0] = 8191;
    if (M > 1) pos[1] = 0;
    std::vector<float> want = x;
    ASSERT_TRUE(K::rope(want.data(), M, heads, dh, pos.data(), 10000.0, nullptr).ok());
    float* xd = dev.upload(x);
    dev.check(dev.ops->rope(xd, M, heads, dh, dev.upload(pos), 10000.0, dev.stream), "rope");
    compare(dev, "rope x", kExact, want, dev.download(xd, want.size()), dh);
  });
}

// ---- the KV cache: kv_store and attention ---------------------------------------

// One sequence's cache: keys and values [KV, cap, dh] bf16 bits, valid [cap].
struct Seq {
  int64_t cap = 0, n_keys = 0;
  std::vector<uint16_t> k, v;
  std::vector<uint8_t> valid;
  uint16_t *kd = nullptr, *vd = nullptr;
  uint8_t* validd = nullptr;
};

// Keys [0, n_keys) random (a fifth padding, and the first `left_pad` too); positions
// past n_keys hold NaN (an unused cache is garbage on a device: it must not be read).
Seq make_seq(Rng& rng, int64_t KV, int64_t dh, int64_t cap, int64_t n_keys, int64_t left_pad) {
  Seq s;
  s.cap = cap;
  s.n_keys = n_keys;
  s.k.assign(static_cast<size_t>(KV * cap * dh), 0x7fc1);
  s.v.assign(s.k.size(), 0x7fc1);
  s.valid.assign(static_cast<size_t>(cap), 0);
  for (int64_t h = 0; h < KV; ++h)
    for (int64_t j = 0; j < n_keys; ++j)
      for (int64_t d = 0; d < dh; ++d) {
        s.k[static_cast<size_t>((h * cap + j) * dh + d)] = rng.bf16_bits(-4, 1);
        s.v[static_cast<size_t>((h * cap + j) * dh + d)] = rng.bf16_bits(-6, 2);
      }
  for (int64_t j = 0; j < n_keys; ++j) s.valid[static_cast<size_t>(j)] = j < left_pad || rng.range(0, 4) == 0 ? 0 : 1;
  return s;
}

struct AttnRowSpec {
  int seq;
  int32_t pos;
  int64_t n_keys = 0;  // 0: the sequence's
};

// Rows over sequences; expected per row by kernels::attention alone.
void add_attention(const std::string& name, int64_t Hq, int64_t KV, int64_t dh, float mult, int q_hi,
                   std::vector<std::pair<int64_t, int64_t>> seqs_cap_keys, std::vector<int64_t> left_pads,
                   std::vector<AttnRowSpec> rows, int64_t max_keys) {
  add("attention_" + name + sz("Hq", Hq) + sz("KV", KV) + sz("dh", dh), [=](Dev& dev, Rng& rng) {
    std::vector<Seq> seqs;
    for (size_t i = 0; i < seqs_cap_keys.size(); ++i)
      seqs.push_back(make_seq(rng, KV, dh, seqs_cap_keys[i].first, seqs_cap_keys[i].second, left_pads[i]));
    const auto M = static_cast<int64_t>(rows.size());
    const int64_t QD = Hq * dh;
    auto q = bf16_values(rng, static_cast<size_t>(M * QD), -4, q_hi);
    const GrokitAttnShape shape{Hq, KV, dh, mult, 30.0f};
    std::vector<float> want(static_cast<size_t>(M * QD));
    std::vector<double> scale(want.size(), 0.0);
    for (int64_t m = 0; m < M; ++m) {
      const AttnRowSpec& r = rows[static_cast<size_t>(m)];
      const Seq& s = seqs[static_cast<size_t>(r.seq)];
      const int32_t pos = r.pos;
      const int64_t n_keys = r.n_keys > 0 ? r.n_keys : s.n_keys;
      const K::AttentionShape sh{Hq, KV, dh, s.cap, mult, 30.0f};
      ASSERT_TRUE(K::attention(q.data() + m * QD, 1, &pos, s.k.data(), s.v.data(), s.valid.data(), n_keys, sh,
                               want.data() + m * QD, nullptr)
                      .ok());
      // The budget's scale: max |v| over the keys the row attends to.
      std::vector<int64_t> keys;
      for (int64_t j = 0; j < std::min<int64_t>(n_keys, pos + 1); ++j)
        if (s.valid[static_cast<size_t>(j)] != 0) keys.push_back(j);
      if (keys.empty())
        for (int64_t j = 0; j < n_keys; ++j) keys.push_back(j);
      for (int64_t h = 0; h < Hq; ++h)
        for (int64_t d = 0; d < dh; ++d) {
          double mx = 0;
          for (int64_t j : keys)
            mx = std::max(mx, std::fabs(static_cast<double>(
                                  bf16_bits_to_f32(s.v[static_cast<size_t>(((h / (Hq / KV)) * s.cap + j) * dh + d)]))));
          scale[static_cast<size_t>((m * Hq + h) * dh + d)] = mx;
        }
    }
    for (auto& s : seqs) {
      s.kd = dev.upload(s.k);
      s.vd = dev.upload(s.v);
      s.validd = dev.upload(s.valid);
    }
    std::vector<GrokitAttnRow> rd;
    for (const auto& r : rows) {
      const Seq& s = seqs[static_cast<size_t>(r.seq)];
      rd.push_back({s.kd, s.vd, s.validd, s.cap, r.n_keys > 0 ? r.n_keys : s.n_keys, r.pos, 1});
    }
    float* o = dev.poisoned<float>(want.size());
    dev.check(dev.ops->attention(dev.upload(q), M, dev.upload(rd), max_keys, &shape, o, dev.stream), "attention");
    compare(dev, "attention o", kAttention, want, dev.download(o, want.size()), QD, nullptr, &scale);
    for (size_t i = 0; i < seqs.size(); ++i) {  // read-only
      compare(dev, "attention k cache " + std::to_string(i), kExact, seqs[i].k,
              dev.download(seqs[i].kd, seqs[i].k.size()), dh);
      compare(dev, "attention valid " + std::to_string(i), kExact, seqs[i].valid,
              dev.download(seqs[i].validd, seqs[i].valid.size()), 0);
    }
  });
}

void add_kv_store(int64_t KV, int64_t dh) {
  add("kv_store" + sz("KV", KV) + sz("dh", dh), [=](Dev& dev, Rng& rng) {
    // Five rows over three sequences: decode rows, two prefill rows of one sequence, a
    // padding token (valid 0), the last position of a cache.
    const int64_t caps[] = {7, 40, 300};
    struct R {
      int seq;
      int32_t pos, token;
    };
    const R rows[] = {{0, 6, 5}, {1, 12, 0}, {1, 13, 9}, {2, 0, 3}, {2, 299, 1}};
    const int64_t M = std::size(rows);
    std::vector<Seq> seqs;
    for (int64_t cap : caps) {
      Seq s;
      s.cap = cap;
      s.k = bf16_bits(rng, static_cast<size_t>(KV * cap * dh), -6, 3);
      s.v = bf16_bits(rng, s.k.size(), -6, 3);
      s.valid.resize(static_cast<size_t>(cap));
      for (auto& b : s.valid) b = static_cast<uint8_t>(rng.range(0, 1));
      seqs.push_back(std::move(s));
    }
    auto k = bf16_values(rng, static_cast<size_t>(M * KV * dh), -8, 4);
    auto v = bf16_values(rng, k.size(), -8, 4);
    // Before: the stored-to slots poisoned. After: the new keys there.
    std::vector<Seq> want = seqs;
    for (int64_t m = 0; m < M; ++m) {
      const R& r = rows[m];
      Seq &s = seqs[static_cast<size_t>(r.seq)], &w = want[static_cast<size_t>(r.seq)];
      for (int64_t h = 0; h < KV; ++h)
        for (int64_t d = 0; d < dh; ++d) {
          const size_t at = static_cast<size_t>((h * s.cap + r.pos) * dh + d);
          s.k[at] = s.v[at] = 0xFFFF;
          w.k[at] = f32_to_bf16_bits(k[static_cast<size_t>((m * KV + h) * dh + d)]);
          w.v[at] = f32_to_bf16_bits(v[static_cast<size_t>((m * KV + h) * dh + d)]);
        }
      s.valid[static_cast<size_t>(r.pos)] = 0xFF;
      w.valid[static_cast<size_t>(r.pos)] = r.token > 0 ? 1 : 0;
    }
    std::vector<GrokitAttnRow> rd;
    for (auto& s : seqs) {
      s.kd = dev.upload(s.k);
      s.vd = dev.upload(s.v);
      s.validd = dev.upload(s.valid);
    }
    for (const R& r : rows) {
      const Seq& s = seqs[static_cast<size_t>(r.seq)];
      rd.push_back({s.kd, s.vd, s.validd, s.cap, r.pos + 1, r.pos, r.token});
    }
    const GrokitAttnShape shape{4 * KV, KV, dh, 1.0f, 30.0f};
    dev.check(dev.ops->kv_store(dev.upload(k), dev.upload(v), M, dev.upload(rd), &shape, dev.stream), "kv_store");
    for (size_t i = 0; i < seqs.size(); ++i) {
      compare(dev, "kv_store k cache " + std::to_string(i), kExact, want[i].k,
              dev.download(seqs[i].kd, want[i].k.size()), dh);
      compare(dev, "kv_store v cache " + std::to_string(i), kExact, want[i].v,
              dev.download(seqs[i].vd, want[i].v.size()), dh);
      compare(dev, "kv_store valid " + std::to_string(i), kExact, want[i].valid,
              dev.download(seqs[i].validd, want[i].valid.size()), 0);
    }
  });
}

// matmul_multi: each product against the backend's own matmul of it, bit for bit (CUDA
// runs decode-sized ones in one launch), and against the CPU twin within the budget.
void add_matmul_multi(int32_t dtype, int64_t param, int64_t Kd, int64_t M) {
  add(std::string("matmul_multi_") + payloads::dtype_name(dtype) + sz("M", M) + sz("K", Kd), [=](Dev& dev, Rng& rng) {
    const int64_t Ns[] = {96, 16, 16}, ldx = Kd + 3;
    std::vector<float> x(static_cast<size_t>(M * ldx));
    for (auto& v : x) v = rng.bf16_value(-6, 4);
    float* xd = dev.upload(x);
    std::vector<WeightPayload> ws;
    std::vector<GrokitWeight> wd;
    for (int64_t N : Ns) {
      ws.push_back(payloads::random_weight(dtype, 1, Kd, N, param, rng));
      wd.push_back(ws.back().desc(dev.upload(ws.back().bytes)));
      const uint64_t scratch_bytes = dev.ops->prepare_scratch_bytes(&wd.back());
      void* scratch = scratch_bytes > 0 ? dev.alloc(scratch_bytes) : nullptr;
      dev.check(dev.ops->prepare_weight(&wd.back(), scratch, dev.stream), "prepare_weight");
    }
    dev.sync();
    const GrokitWeight* w[] = {&wd[0], &wd[1], &wd[2]};
    const int64_t ldy[] = {Ns[0] + 1, Ns[1], Ns[2] + 5};
    auto run_all = [&](const char* plan) {
      if (plan != nullptr) ::setenv("GROKIT_CUDA_DECODE_PLAN", plan, 1);
      float* y[3];
      for (int i = 0; i < 3; ++i) y[i] = dev.poisoned<float>(static_cast<size_t>(M * ldy[i]));
      const int rc = dev.ops->matmul_multi(w, 3, xd, M, ldx, GROKIT_MATMUL_ROUND_BF16, y, ldy, dev.stream);
      std::vector<std::vector<float>> alone;
      for (int i = 0; i < 3; ++i) {
        float* yi = dev.poisoned<float>(static_cast<size_t>(M * ldy[i]));
        dev.check(dev.ops->matmul(w[i], xd, M, ldx, GROKIT_MATMUL_ROUND_BF16, nullptr, yi, ldy[i], dev.stream), "matmul");
        alone.push_back(dev.download(yi, static_cast<size_t>(M * ldy[i])));
      }
      if (plan != nullptr) ::unsetenv("GROKIT_CUDA_DECODE_PLAN");
      dev.check(rc, "matmul_multi");
      for (int i = 0; i < 3; ++i) {
        const auto got = dev.download(y[i], static_cast<size_t>(M * ldy[i]));
        compare(dev, "matmul_multi y" + std::to_string(i) + " against matmul" + (plan ? std::string(", plan ") + plan : ""),
                kExact, alone[static_cast<size_t>(i)], got, ldy[i]);
        // Against the twin's sums: the rounded product within two bf16 steps and the
        // matmul budget (2^-16 sum |x w|).
        std::vector<uint8_t> bytes = ws[static_cast<size_t>(i)].bytes;
        GrokitWeight hw = ws[static_cast<size_t>(i)].desc(bytes.data());
        std::vector<float> sums(static_cast<size_t>(M * Ns[i]));
        ASSERT_EQ(grokit_host_ops()->matmul(&hw, x.data(), M, ldx, 0, nullptr, sums.data(), Ns[i], nullptr), GROKIT_OK);
        const std::vector<float> dq = payloads::dequantize(ws[static_cast<size_t>(i)], 0);
        int bad = 0;
        for (int64_t m = 0; m < M; ++m)
          for (int64_t j = 0; j < Ns[i]; ++j) {
            double mag = 0;
            for (int64_t k = 0; k < Kd; ++k)
              mag += std::fabs(double(x[static_cast<size_t>(m * ldx + k)]) * dq[static_cast<size_t>(k * Ns[i] + j)]);
            const double e = sums[static_cast<size_t>(m * Ns[i] + j)], a = got[static_cast<size_t>(m * ldy[i] + j)];
            if (!(std::fabs(a - e) <= 2 * bf16_ulp(std::fabs(e)) + 0x1p-16 * mag) && bad++ < 3)
              ADD_FAILURE() << "matmul_multi y" << i << " [" << m << ", " << j << "]: " << a << " against the twin's " << e;
          }
      }
    };
    run_all(nullptr);
    if (dev.backend == "cuda")
      for (const char* plan : {"0,-1,1", "5,0,0", "32,3,1"}) run_all(plan);
  });
}

// rope_store: against the twins (rope, rope, kv_store on the host), and against the
// backend's own three ops called in turn, bit for bit.
void add_rope_store(int64_t KV, int64_t dh) {
  add("rope_store" + sz("KV", KV) + sz("dh", dh), [=](Dev& dev, Rng& rng) {
    const int64_t caps[] = {7, 300};
    struct R {
      int seq;
      int32_t pos, token;
    };
    const R rows[] = {{0, 6, 5}, {1, 12, 0}, {1, 13, 9}, {1, 299, 1}};
    const int64_t M = std::size(rows), Hq = 3 * KV;
    auto q = bf16_values(rng, static_cast<size_t>(M * Hq * dh), -6, 3);
    auto k = bf16_values(rng, static_cast<size_t>(M * KV * dh), -6, 3);
    auto v = bf16_values(rng, k.size(), -8, 4);
    std::vector<int32_t> pos;
    for (const R& r : rows) pos.push_back(r.pos);
    std::vector<float> want_q = q, want_k = k;
    ASSERT_TRUE(K::rope(want_q.data(), M, Hq, dh, pos.data(), 10000.0, nullptr).ok());
    ASSERT_TRUE(K::rope(want_k.data(), M, KV, dh, pos.data(), 10000.0, nullptr).ok());
    // Two sets of caches: one for the fused op, one for the ops in turn.
    struct Caches {
      std::vector<Seq> seqs;
      std::vector<GrokitAttnRow> rd;
    };
    auto make = [&](Rng& r0) {
      Caches c;
      for (int64_t cap : caps) {
        Seq sq;
        sq.cap = cap;
        sq.k = bf16_bits(r0, static_cast<size_t>(KV * cap * dh), -6, 3);
        sq.v = bf16_bits(r0, sq.k.size(), -6, 3);
        sq.valid.assign(static_cast<size_t>(cap), 7);
        sq.kd = dev.upload(sq.k);
        sq.vd = dev.upload(sq.v);
        sq.validd = dev.upload(sq.valid);
        c.seqs.push_back(std::move(sq));
      }
      for (const R& r : rows) {
        const Seq& sq = c.seqs[static_cast<size_t>(r.seq)];
        c.rd.push_back({sq.kd, sq.vd, sq.validd, sq.cap, r.pos + 1, r.pos, r.token});
      }
      return c;
    };
    Rng r1(rng.next()), r2 = r1;
    Caches fused = make(r1), turn = make(r2);
    std::vector<Seq> want = fused.seqs;  // host copies as uploaded
    for (int64_t m = 0; m < M; ++m) {
      const R& r = rows[m];
      Seq& w = want[static_cast<size_t>(r.seq)];
      for (int64_t h = 0; h < KV; ++h)
        for (int64_t d = 0; d < dh; ++d) {
          const size_t at = static_cast<size_t>((h * w.cap + r.pos) * dh + d);
          w.k[at] = f32_to_bf16_bits(want_k[static_cast<size_t>((m * KV + h) * dh + d)]);
          w.v[at] = f32_to_bf16_bits(v[static_cast<size_t>((m * KV + h) * dh + d)]);
        }
      w.valid[static_cast<size_t>(r.pos)] = r.token > 0 ? 1 : 0;
    }
    const GrokitAttnShape shape{Hq, KV, dh, 1.0f, 30.0f};
    int32_t* posd = dev.upload(pos);
    float *qd = dev.upload(q), *kd = dev.upload(k), *vd = dev.upload(v);
    dev.check(dev.ops->rope_store(qd, kd, vd, M, posd, dev.upload(fused.rd), &shape, 10000.0, dev.stream), "rope_store");
    const std::vector<float> got_q = dev.download(qd, q.size()), got_k = dev.download(kd, k.size());
    compare(dev, "rope_store q", kExact, want_q, got_q, dh);
    compare(dev, "rope_store k", kExact, want_k, got_k, dh);
    float *q2 = dev.upload(q), *k2 = dev.upload(k);
    dev.check(dev.ops->rope(q2, M, Hq, dh, posd, 10000.0, dev.stream), "rope q");
    dev.check(dev.ops->rope(k2, M, KV, dh, posd, 10000.0, dev.stream), "rope k");
    dev.check(dev.ops->kv_store(k2, vd, M, dev.upload(turn.rd), &shape, dev.stream), "kv_store");
    compare(dev, "rope_store q against rope", kExact, dev.download(q2, q.size()), got_q, dh);
    compare(dev, "rope_store k against rope", kExact, dev.download(k2, k.size()), got_k, dh);
    for (size_t i = 0; i < want.size(); ++i) {
      const auto fk = dev.download(fused.seqs[i].kd, want[i].k.size());
      const auto fv = dev.download(fused.seqs[i].vd, want[i].v.size());
      const auto fvalid = dev.download(fused.seqs[i].validd, want[i].valid.size());
      compare(dev, "rope_store k cache " + std::to_string(i), kExact, want[i].k, fk, dh);
      compare(dev, "rope_store v cache " + std::to_string(i), kExact, want[i].v, fv, dh);
      compare(dev, "rope_store valid " + std::to_string(i), kExact, want[i].valid, fvalid, 0);
      compare(dev, "rope_store k cache against kv_store " + std::to_string(i), kExact,
              dev.download(turn.seqs[i].kd, want[i].k.size()), fk, dh);
      compare(dev, "rope_store valid against kv_store " + std::to_string(i), kExact,
              dev.download(turn.seqs[i].validd, want[i].valid.size()), fvalid, 0);
    }
  });
}

// ---- router ---------------------------------------------------------------------

void add_router(int64_t M, int64_t D, int64_t E, int64_t k) {
  add("router_topk" + sz("M", M) + sz("D", D) + sz("E", E) + sz("k", k), [=](Dev& dev, Rng& rng) {
    std::vector<float> x, w;
    ASSERT_TRUE(payloads::router_inputs(M, D, E, k, rng, x, w)) << "no row without near-ties";
    std::vector<int32_t> want_e(static_cast<size_t>(M * k));
    std::vector<float> want_g(want_e.size());
    ASSERT_TRUE(K::router_topk(x.data(), M, D, w.data(), E, k, want_e.data(), want_g.data(), nullptr).ok());
    auto* ed = dev.poisoned<int32_t>(want_e.size());
    auto* gd = dev.poisoned<float>(want_g.size());
    dev.check(dev.ops->router_topk(dev.upload(x), M, D, dev.upload(w), E, k, ed, gd, dev.stream), "router_topk");
    std::vector<double> scale(want_g.size());
    for (size_t i = 0; i < scale.size(); ++i) scale[i] = std::fabs(want_g[i]);
    compare(dev, "router experts", kExact, want_e, dev.download(ed, want_e.size()), k);
    const std::vector<float> got_g = dev.download(gd, want_g.size());
    const std::vector<int32_t> got_e = dev.download(ed, want_e.size());
    compare(dev, "router experts", kExact, want_e, got_e, k);
    compare(dev, "router gates", kGates, want_g, got_g, k, nullptr, &scale);
    // A row's bits do not depend on the batch around it (the backend may take another
    // path for few rows): a few rows again, one at a time.
    for (int64_t m : {int64_t{0}, M / 2, M - 1}) {
      auto* e1 = dev.poisoned<int32_t>(static_cast<size_t>(k));
      auto* g1 = dev.poisoned<float>(static_cast<size_t>(k));
      const std::vector<float> xr(x.begin() + m * D, x.begin() + (m + 1) * D);
      dev.check(dev.ops->router_topk(dev.upload(xr), 1, D, dev.upload(w), E, k, e1, g1, dev.stream), "router_topk");
      const auto at = got_e.begin() + m * k;
      const auto gat = got_g.begin() + m * k;
      compare(dev, "router experts of row " + std::to_string(m) + " alone", kExact, std::vector<int32_t>(at, at + k),
              dev.download(e1, static_cast<size_t>(k)), k);
      compare(dev, "router gates of row " + std::to_string(m) + " alone", kExact, std::vector<float>(gat, gat + k),
              dev.download(g1, static_cast<size_t>(k)), k);
    }
  });
}

// ---- matmul ---------------------------------------------------------------------

enum class Route { kNone, kTopk, kDown };

// One row of the expected product, as the CPU engine computes it: x row [K] @ expert e.
void reference_row(const WeightPayload& w, int64_t e, const float* x, bool fp32, float* y) {
  const int64_t Kr = w.rows, N = w.cols;
  const int64_t sr = payloads::engine_sum_rows(w.dtype, Kr, w.param);
  const uint8_t* base = w.bytes.data();
  Status s;
  switch (w.dtype) {
    case payloads::kQ8RowBlock: {
      const auto* codes = reinterpret_cast<const int8_t*>(base) + e * Kr * N;
      const auto* scales = reinterpret_cast<const uint16_t*>(base + w.q8_scales_offset) + e * w.param * N;
      s = fp32 ? K::matmul_q8_f32(x, 1, Kr, Kr, codes, scales, N, w.param, y, N, nullptr, sr)
               : K::matmul_q8(x, 1, Kr, Kr, codes, scales, N, w.param, y, N, nullptr, sr);
      break;
    }
    case payloads::kQ4Group: {
      const uint8_t* p = base + static_cast<uint64_t>(e) * w.matrix_bytes;
      s = fp32 ? K::matmul_q4_f32(x, 1, Kr, Kr, p, w.param, N, y, N, nullptr, sr)
               : K::matmul_q4(x, 1, Kr, Kr, p, w.param, N, y, N, nullptr, sr);
      break;
    }
    case payloads::kF8Column: {
      const uint8_t* p = base + static_cast<uint64_t>(e) * w.matrix_bytes;
      s = fp32 ? K::matmul_f8_f32(x, 1, Kr, Kr, p, N, y, N, nullptr, sr)
               : K::matmul_f8(x, 1, Kr, Kr, p, N, y, N, nullptr, sr);
      break;
    }
    default: {
      const auto* p = reinterpret_cast<const uint16_t*>(base + static_cast<uint64_t>(e) * w.matrix_bytes);
      s = fp32 ? K::matmul_bf16_f32(x, 1, Kr, Kr, p, N, y, N, nullptr, sr)
               : K::matmul_bf16(x, 1, Kr, Kr, p, N, y, N, nullptr, sr);
    }
  }
  ASSERT_TRUE(s.ok());
}

// M output rows; kTopk: M / 2 tokens, two choices each (x_row_div 2), some rows
// skipped (-1), one expert unused; kDown: M rows of their own (fp32 x as the down
// projection has). pad: extra elements in the x and y strides.
void add_matmul(int32_t dtype, int64_t param, int64_t E, int64_t Kd, int64_t N, int64_t M, bool fp32, Route route,
                int64_t pad = 0) {
  std::string name = std::string("matmul_") + payloads::dtype_name(dtype) +
                     (dtype == payloads::kQ8RowBlock ? sz("B", param)
                      : dtype == payloads::kQ4Group  ? sz("G", param)
                                                     : "") +
                     sz("M", M) + sz("K", Kd) + sz("N", N) + (fp32 ? "_xf32" : "_xbf16") +
                     (route == Route::kTopk   ? sz("topk_E", E)
                      : route == Route::kDown ? sz("routed_E", E)
                                              : "") +
                     (pad != 0 ? "_strided" : "");
  add(name, [=](Dev& dev, Rng& rng) {
    const WeightPayload w = payloads::random_weight(dtype, E, Kd, N, param, rng);
    const int64_t div = route == Route::kTopk ? 2 : 1;
    const int64_t xrows = (M + div - 1) / div, ldx = Kd + pad, ldy = N + 2 * pad;
    std::vector<float> x(static_cast<size_t>(xrows * ldx));
    for (int64_t r = 0; r < xrows; ++r)
      for (int64_t k = 0; k < ldx; ++k)  // stride padding is NaN: reading it shows
        x[static_cast<size_t>(r * ldx + k)] =
            k >= Kd ? kNaN
            : fp32  ? rng.f32(-3.0f, 3.0f) * std::ldexp(1.0f, static_cast<int>(rng.range(-6, 4)))
                    : rng.bf16_value(-6, 4);
    std::vector<int32_t> expert(static_cast<size_t>(M), 0);
    if (route != Route::kNone) {
      const int64_t unused = E - 2;  // never chosen
      for (int64_t m = 0; m < M; ++m) {
        int32_t e;
        do e = static_cast<int32_t>(rng.range(0, E - 1));
        while (e == unused || (route == Route::kTopk && m % 2 == 1 && e == expert[static_cast<size_t>(m - 1)]));
        expert[static_cast<size_t>(m)] = e;
      }
      for (int64_t m = 3; m < M; m += 7) expert[static_cast<size_t>(m)] = -1;
      if (M == 2) expert[1] = -1;
    }
    // Expected rows, and the budget's scale sum_k |x_k w_kn| from the dequantized weights.
    std::vector<float> want(static_cast<size_t>(M * ldy), 0.0f);
    std::vector<double> scale(want.size(), 0.0);
    const auto mask = strided_mask(M, N, ldy);
    for (size_t i = 0; i < want.size(); ++i)
      if (mask[i] == 0) want[i] = kNaN;  // padding keeps its poison
    std::vector<std::vector<float>> deq(static_cast<size_t>(E));
    for (int64_t m = 0; m < M; ++m) {
      const int32_t e = expert[static_cast<size_t>(m)];
      if (e < 0) continue;
      const float* xr = x.data() + (m / div) * ldx;
      reference_row(w, e, xr, fp32, want.data() + m * ldy);
      auto& dq = deq[static_cast<size_t>(e)];
      if (dq.empty()) dq = payloads::dequantize(w, e);
      for (int64_t n = 0; n < N; ++n) {
        double s = 0;
        for (int64_t k = 0; k < Kd; ++k)
          s += std::fabs(static_cast<double>(xr[k]) * dq[static_cast<size_t>(k * N + n)]);
        scale[static_cast<size_t>(m * ldy + n)] = s;
      }
    }
    GrokitWeight wd = w.desc(dev.upload(w.bytes));
    const uint64_t scratch_bytes = dev.ops->prepare_scratch_bytes(&wd);
    void* scratch = scratch_bytes > 0 ? dev.alloc(scratch_bytes) : nullptr;
    dev.check(dev.ops->prepare_weight(&wd, scratch, dev.stream), "prepare_weight");
    dev.sync();
    GrokitRouting routing{route != Route::kNone ? dev.upload(expert) : nullptr, div};
    float* y = dev.poisoned<float>(want.size());
    const int32_t flags = fp32 ? GROKIT_MATMUL_X_FP32 : 0;
    float* xd = dev.upload(x);
    dev.check(dev.ops->matmul(&wd, xd, M, ldx, flags, route != Route::kNone ? &routing : nullptr, y, ldy, dev.stream),
              "matmul");
    std::vector<float> got = dev.download(y, want.size());
    // Padding must keep the poison (0xFF bytes): compare it as bits.
    std::vector<float> want_bits = want;
    for (size_t i = 0; i < want.size(); ++i)
      if (mask[i] == 0) std::memset(&want_bits[i], 0xFF, 4);
    compare(dev, "matmul y", kMatmul, want_bits, got, ldy, &mask, &scale);
    // GROKIT_MATMUL_ROUND_BF16: the bits of the same product rounded after it.
    float* yr = dev.poisoned<float>(want.size());
    dev.check(dev.ops->matmul(&wd, xd, M, ldx, flags | GROKIT_MATMUL_ROUND_BF16,
                              route != Route::kNone ? &routing : nullptr, yr, ldy, dev.stream),
              "matmul (rounded)");
    std::vector<float> rounded = got;
    for (size_t i = 0; i < rounded.size(); ++i)
      if (mask[i] != 0) rounded[i] = round_bf16(rounded[i]);
    compare(dev, "matmul y rounded", kExact, rounded, dev.download(yr, want.size()), ldy);
    // GROKIT_MATMUL_GELU_MUL: y = gelu(y) * bf16(the same product); rows routed to no
    // expert get 0; padding keeps its bytes.
    {
      std::vector<float> gate(want.size());
      for (auto& v : gate) v = rng.bf16_value(-4, 2);
      std::vector<float> want_gelu = gate;
      for (int64_t m = 0; m < M; ++m) {
        const bool none = route != Route::kNone && expert[static_cast<size_t>(m)] < 0;
        for (int64_t n = 0; n < N; ++n) {
          const size_t i = static_cast<size_t>(m * ldy + n);
          if (none) {
            want_gelu[i] = 0.0f;
          } else {
            const float u = round_bf16(got[i]);
            ASSERT_TRUE(K::gelu_mul(&gate[i], &u, 1, &want_gelu[i], nullptr).ok());
          }
        }
      }
      float* yg = dev.upload(gate);
      dev.check(dev.ops->matmul(&wd, xd, M, ldx, flags | GROKIT_MATMUL_GELU_MUL,
                                route != Route::kNone ? &routing : nullptr, yg, ldy, dev.stream),
                "matmul (gelu)");
      compare(dev, "matmul y gelu", kExact, want_gelu, dev.download(yg, want.size()), ldy);
    }
    // The decode plans a benchmark may force (GROKIT_CUDA_DECODE_PLAN: splits, warps across
    // columns, twice the bytes in flight) compute the same products.
    if (dev.backend == "cuda") {
      for (const char* plan : {"0,-1,1", "1,3,0", "32,0,1", "7,2,0", "3,1,1"}) {
        ::setenv("GROKIT_CUDA_DECODE_PLAN", plan, 1);
        float* yp = dev.poisoned<float>(want.size());
        const int rc = dev.ops->matmul(&wd, xd, M, ldx, flags, route != Route::kNone ? &routing : nullptr, yp, ldy,
                                       dev.stream);
        ::unsetenv("GROKIT_CUDA_DECODE_PLAN");
        dev.check(rc, std::string("matmul with the decode plan ") + plan);
        compare(dev, std::string("matmul y, decode plan ") + plan, kMatmul, want_bits, dev.download(yp, want.size()),
                ldy, &mask, &scale);
      }
    }
  });
}

// ---- elementwise and the rest ---------------------------------------------------

enum class Alias { kNone, kFirst, kSecond };
const char* alias_name(Alias a) {
  return a == Alias::kNone ? "" : a == Alias::kFirst ? "_out_is_first" : "_out_is_second";
}

void add_gelu_mul(int64_t n, Alias alias) {
  add("gelu_mul" + sz("n", n) + alias_name(alias), [=](Dev& dev, Rng& rng) {
    auto g = bf16_values(rng, static_cast<size_t>(n), -8, 3);
    auto u = bf16_values(rng, static_cast<size_t>(n), -8, 3);
    std::vector<float> want(static_cast<size_t>(n));
    ASSERT_TRUE(K::gelu_mul(g.data(), u.data(), n, want.data(), nullptr).ok());
    float *gd = dev.upload(g), *ud = dev.upload(u);
    float* h = alias == Alias::kFirst ? gd : alias == Alias::kSecond ? ud : dev.poisoned<float>(want.size());
    dev.check(dev.ops->gelu_mul(gd, ud, n, h, dev.stream), "gelu_mul");
    compare(dev, "gelu_mul h", kExact, want, dev.download(h, want.size()), 0);
  });
}

void add_round_bf16(int64_t n, bool in_place) {
  add("round_bf16" + sz("n", n) + (in_place ? "_in_place" : ""), [=](Dev& dev, Rng& rng) {
    std::vector<float> x(static_cast<size_t>(n));
    for (auto& v : x) {  // random bits, NaN excluded
      uint32_t u;
      do u = static_cast<uint32_t>(rng.next());
      while ((u & 0x7fffffffu) > 0x7f800000u);
      std::memcpy(&v, &u, 4);
    }
    const uint32_t special[] = {0x00000000u, 0x80000000u, 0x7f800000u, 0xff800000u, 0x7f7fffffu, 0x3f808000u,
                                0x3f818000u, 0x3f80ffffu, 0x00008000u, 0x00018000u, 0x807fffffu, 0x3f807fffu};
    for (size_t i = 0; i < std::size(special) && i < x.size(); ++i)
      std::memcpy(&x[i * x.size() / std::size(special)], &special[i], 4);
    std::vector<float> want(x.size());
    K::round_to_bf16(x.data(), n, want.data());
    float* xd = dev.upload(x);
    float* out = in_place ? xd : dev.poisoned<float>(x.size());
    dev.check(dev.ops->round_bf16(xd, n, out, dev.stream), "round_bf16");
    compare(dev, "round_bf16 out", kExact, want, dev.download(out, want.size()), 0);
  });
}

void add_add_bf16(int64_t n, Alias alias) {
  add("add_bf16" + sz("n", n) + alias_name(alias), [=](Dev& dev, Rng& rng) {
    auto a = bf16_values(rng, static_cast<size_t>(n), -10, 8);
    auto b = bf16_values(rng, static_cast<size_t>(n), -10, 8);
    std::vector<float> want(a.size());
    K::add_bf16(a.data(), b.data(), n, want.data());
    float *ad = dev.upload(a), *bd = dev.upload(b);
    float* out = alias == Alias::kFirst ? ad : alias == Alias::kSecond ? bd : dev.poisoned<float>(a.size());
    dev.check(dev.ops->add_bf16(ad, bd, n, out, dev.stream), "add_bf16");
    compare(dev, "add_bf16 out", kExact, want, dev.download(out, want.size()), 0);
  });
}

// Against the CPU twin within the norms' budget, and against the backend's own ops
// called in turn (round_bf16, rmsnorm, add_bf16, rmsnorm), bit for bit.
void add_residual_norm(int64_t M, int64_t D, int32_t round_y, bool with_next) {
  add("residual_norm" + sz("M", M) + sz("D", D) + (round_y != 0 ? "_round" : "") + (with_next ? "_next" : ""),
      [=](Dev& dev, Rng& rng) {
        std::vector<float> y(static_cast<size_t>(M * D)), x(y.size());
        for (int64_t m = 0; m < M; ++m)
          for (int64_t d = 0; d < D; ++d) {
            const size_t i = static_cast<size_t>(m * D + d);
            y[i] = rng.f32(-1.0f, 1.0f) * std::ldexp(1.0f, -8 + static_cast<int>(m % 9));
            x[i] = rng.bf16_value(-6, 3);
          }
        if (round_y == 0) K::round_to_bf16(y.data(), M * D, y.data());  // as the engine's unrounded inputs are
        const auto post = bf16_values(rng, static_cast<size_t>(D), -2, 1);
        const auto next = bf16_values(rng, static_cast<size_t>(D), -2, 1);
        std::vector<float> t(y.size()), want_x = x, want_a(y.size());
        K::round_to_bf16(y.data(), M * D, t.data());
        ASSERT_TRUE(K::rmsnorm(t.data(), M, D, post.data(), 1e-5f, t.data(), nullptr).ok());
        K::add_bf16(want_x.data(), t.data(), M * D, want_x.data());
        if (with_next) {
          ASSERT_TRUE(K::rmsnorm(want_x.data(), M, D, next.data(), 1e-5f, want_a.data(), nullptr).ok());
        }

        float *yd = dev.upload(y), *xd = dev.upload(x), *ad = dev.poisoned<float>(y.size());
        const float *pd = dev.upload(post), *nd = with_next ? dev.upload(next) : nullptr;
        dev.check(dev.ops->residual_norm(yd, nullptr, 0, round_y, M, D, pd, 1e-5f, xd, nd, with_next ? ad : nullptr,
                                         dev.stream),
                  "residual_norm");
        const std::vector<float> got_x = dev.download(xd, x.size()), got_a = dev.download(ad, y.size());
        const auto slack = payloads::residual_norm_slack(t, want_x, with_next ? next.data() : nullptr, M, D, 1e-5f);
        compare(dev, "residual_norm x", kResidualNorm, want_x, got_x, D, nullptr, &slack.x);
        if (with_next) compare(dev, "residual_norm a", kResidualNorm, want_a, got_a, D, nullptr, &slack.a);
        compare(dev, "residual_norm y (not written)", kExact, y, dev.download(yd, y.size()), D);

        float *td = dev.upload(y), *x2 = dev.upload(x), *a2 = dev.poisoned<float>(y.size());
        if (round_y != 0) dev.check(dev.ops->round_bf16(td, M * D, td, dev.stream), "round_bf16");
        dev.check(dev.ops->rmsnorm(td, M, D, pd, 1e-5f, td, dev.stream), "rmsnorm");
        dev.check(dev.ops->add_bf16(x2, td, M * D, x2, dev.stream), "add_bf16");
        if (with_next) dev.check(dev.ops->rmsnorm(x2, M, D, nd, 1e-5f, a2, dev.stream), "rmsnorm");
        compare(dev, "residual_norm x against the ops in turn", kExact, dev.download(x2, x.size()), got_x, D);
        if (with_next)
          compare(dev, "residual_norm a against the ops in turn", kExact, dev.download(a2, y.size()), got_a, D);
      });
}

// residual_norm with gates: the routed rows combined first. Against the twins and against
// the backend's moe_combine, rmsnorm, add_bf16 and rmsnorm in turn, bit for bit.
void add_residual_norm_combine(int64_t M, int64_t D, int64_t top) {
  add("residual_norm_combine" + sz("M", M) + sz("D", D) + sz("top", top), [=](Dev& dev, Rng& rng) {
    std::vector<float> routed(static_cast<size_t>(M * top * D)), gates(static_cast<size_t>(M * top));
    for (auto& v : routed) v = rng.f32(-2.0f, 2.0f);
    for (auto& v : gates) v = rng.f32(0.05f, 0.95f);
    const auto x = bf16_values(rng, static_cast<size_t>(M * D), -6, 3);
    const auto post = bf16_values(rng, static_cast<size_t>(D), -2, 1), next = bf16_values(rng, static_cast<size_t>(D), -2, 1);
    std::vector<float> t(static_cast<size_t>(M * D)), want_x = x, want_a(t.size());
    ASSERT_EQ(grokit_host_ops()->moe_combine(routed.data(), gates.data(), M, top, D, t.data(), nullptr), GROKIT_OK);
    ASSERT_TRUE(K::rmsnorm(t.data(), M, D, post.data(), 1e-5f, t.data(), nullptr).ok());
    K::add_bf16(want_x.data(), t.data(), M * D, want_x.data());
    ASSERT_TRUE(K::rmsnorm(want_x.data(), M, D, next.data(), 1e-5f, want_a.data(), nullptr).ok());
    float *rd = dev.upload(routed), *gd = dev.upload(gates), *xd = dev.upload(x), *ad = dev.poisoned<float>(t.size());
    const float *pd = dev.upload(post), *nd = dev.upload(next);
    dev.check(dev.ops->residual_norm(rd, gd, top, 0, M, D, pd, 1e-5f, xd, nd, ad, dev.stream), "residual_norm");
    const auto got_x = dev.download(xd, x.size()), got_a = dev.download(ad, t.size());
    const auto slack = payloads::residual_norm_slack(t, want_x, next.data(), M, D, 1e-5f);
    compare(dev, "residual_norm (combine) x", kResidualNorm, want_x, got_x, D, nullptr, &slack.x);
    compare(dev, "residual_norm (combine) a", kResidualNorm, want_a, got_a, D, nullptr, &slack.a);
    float *td = dev.poisoned<float>(t.size()), *x2 = dev.upload(x), *a2 = dev.poisoned<float>(t.size());
    dev.check(dev.ops->moe_combine(rd, gd, M, top, D, td, dev.stream), "moe_combine");
    dev.check(dev.ops->rmsnorm(td, M, D, pd, 1e-5f, td, dev.stream), "rmsnorm");
    dev.check(dev.ops->add_bf16(x2, td, M * D, x2, dev.stream), "add_bf16");
    dev.check(dev.ops->rmsnorm(x2, M, D, nd, 1e-5f, a2, dev.stream), "rmsnorm");
    compare(dev, "residual_norm (combine) x against the ops in turn", kExact, dev.download(x2, x.size()), got_x, D);
    compare(dev, "residual_norm (combine) a against the ops in turn", kExact, dev.download(a2, t.size()), got_a, D);
  });
}

void add_moe_combine(int64_t M, int64_t k, int64_t D) {
  add("moe_combine" + sz("M", M) + sz("k", k) + sz("D", D), [=](Dev& dev, Rng& rng) {
    auto y = f32_values(rng, static_cast<size_t>(M * k * D), -8, 6);
    std::vector<float> gates(static_cast<size_t>(M * k));
    for (auto& g : gates) g = rng.f32(0.0f, 1.0f);
    // In odd tokens the last choice nearly cancels the others, so that a fused
    // multiply-add (or another order) shows in the bf16 result.
    for (int64_t t = 1; t < M && k > 1; t += 2)
      for (int64_t d = 0; d < D; ++d) {
        float acc = 0.0f;
        for (int64_t c = 0; c + 1 < k; ++c) {
          volatile float prod =
              round_bf16(gates[static_cast<size_t>(t * k + c)]) * y[static_cast<size_t>((t * k + c) * D + d)];
          acc = acc + prod;
        }
        const float gl = round_bf16(gates[static_cast<size_t>(t * k + k - 1)]);
        y[static_cast<size_t>((t * k + k - 1) * D + d)] = -acc / gl * (1.0f + rng.f32(-1.0f, 1.0f) * 0x1p-14f);
      }
    // The CPU engine's combine (runner/engine.cpp), written out: no fused multiply-add.
    std::vector<float> want(static_cast<size_t>(M * D));
    for (int64_t t = 0; t < M; ++t) {
      std::vector<float> acc(static_cast<size_t>(D), 0.0f);
      for (int64_t c = 0; c < k; ++c) {
        volatile float gb = round_bf16(gates[static_cast<size_t>(t * k + c)]);
        for (int64_t d = 0; d < D; ++d) {
          volatile float prod = gb * y[static_cast<size_t>((t * k + c) * D + d)];
          acc[static_cast<size_t>(d)] = acc[static_cast<size_t>(d)] + prod;
        }
      }
      for (int64_t d = 0; d < D; ++d) want[static_cast<size_t>(t * D + d)] = round_bf16(acc[static_cast<size_t>(d)]);
    }
    float* out = dev.poisoned<float>(want.size());
    dev.check(dev.ops->moe_combine(dev.upload(y), dev.upload(gates), M, k, D, out, dev.stream), "moe_combine");
    compare(dev, "moe_combine out", kExact, want, dev.download(out, want.size()), D);
  });
}

void add_logits(int64_t M, int64_t D, int64_t N, int64_t pad) {
  add("logits" + sz("M", M) + sz("D", D) + sz("N", N) + (pad != 0 ? "_strided" : ""), [=](Dev& dev, Rng& rng) {
    auto x = bf16_values(rng, static_cast<size_t>(M * D), -6, 2);
    auto table = bf16_bits(rng, static_cast<size_t>(N * D), -8, 0);
    const float mult = round_bf16(0.5773502691896257f);
    const int64_t ldy = N + pad;
    std::vector<float> want(static_cast<size_t>(M * ldy));
    std::memset(want.data(), 0xFF, want.size() * 4);  // padding keeps its poison
    ASSERT_TRUE(K::matmul_bf16_nt(x.data(), M, D, table.data(), N, want.data(), ldy, nullptr).ok());
    std::vector<double> scale(want.size(), 0.0);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < N; ++n) {
        float& v = want[static_cast<size_t>(m * ldy + n)];
        v = round_bf16(round_bf16(v) * mult);
        double s = 0;
        for (int64_t d = 0; d < D; ++d)
          s += std::fabs(static_cast<double>(x[static_cast<size_t>(m * D + d)]) *
                         bf16_bits_to_f32(table[static_cast<size_t>(n * D + d)]));
        scale[static_cast<size_t>(m * ldy + n)] = std::fabs(mult) * s;
      }
    float* y = dev.poisoned<float>(want.size());
    dev.check(dev.ops->logits(dev.upload(x), M, D, dev.upload(table), N, mult, y, ldy, dev.stream), "logits");
    const auto mask = strided_mask(M, N, ldy);
    compare(dev, "logits y", kLogits, want, dev.download(y, want.size()), ldy, &mask, &scale);
  });
}

void add_sum_arrays(int count, int64_t n, bool out_is_part) {
  add("sum_arrays" + sz("parts", count) + sz("n", n) + (out_is_part ? "_out_is_part0" : ""), [=](Dev& dev, Rng& rng) {
    std::vector<std::vector<float>> parts;
    for (int c = 0; c < count; ++c) parts.push_back(f32_values(rng, static_cast<size_t>(n), -10, 10));
    std::vector<float> want(static_cast<size_t>(n));
    std::vector<float> v(static_cast<size_t>(count));
    for (int64_t i = 0; i < n; ++i) {
      for (int c = 0; c < count; ++c) v[static_cast<size_t>(c)] = parts[static_cast<size_t>(c)][static_cast<size_t>(i)];
      want[static_cast<size_t>(i)] = K::tree_sum(v.data(), count);
    }
    std::vector<const float*> pd;
    for (const auto& p : parts) pd.push_back(dev.upload(p));
    float* out = out_is_part ? const_cast<float*>(pd[0]) : dev.poisoned<float>(want.size());
    dev.check(dev.ops->sum_arrays(pd.data(), count, n, out, dev.stream), "sum_arrays");
    compare(dev, "sum_arrays out", kExact, want, dev.download(out, want.size()), 0);
  });
}

// Memory, copies, fill, streams and events.
void add_memory() {
  add("memory_copy_fill_events", [](Dev& dev, Rng& rng) {
    const GrokitOps* ops = dev.ops;
    for (size_t bytes : {size_t{1}, size_t{1000}, size_t{1} << 20}) {
      void* p = dev.alloc(bytes);
      EXPECT_EQ(reinterpret_cast<uintptr_t>(p) % 256, 0u) << "alloc(" << bytes << ") is not 256-byte aligned";
    }
    std::vector<uint8_t> src(100003);
    for (auto& b : src) b = static_cast<uint8_t>(rng.next());
    auto* a = static_cast<uint8_t*>(dev.alloc(src.size()));
    auto* b = static_cast<uint8_t*>(dev.alloc(src.size()));
    dev.check(ops->fill(a, 0x5A, src.size(), dev.stream), "fill");
    compare(dev, "fill", kExact, std::vector<uint8_t>(src.size(), 0x5A), dev.download(a, src.size()), 0);
    void* pinned = nullptr;
    dev.check(ops->alloc_pinned(&pinned, src.size()), "alloc_pinned");
    EXPECT_EQ(reinterpret_cast<uintptr_t>(pinned) % 256, 0u);
    std::memcpy(pinned, src.data(), src.size());
    dev.check(ops->copy(a, pinned, src.size(), GROKIT_COPY_H2D, dev.stream), "copy H2D");
    dev.check(ops->copy(b + 7, a + 3, src.size() - 10, GROKIT_COPY_D2D, dev.stream), "copy D2D");
    void* ev = nullptr;
    dev.check(ops->event_create(&ev), "event_create");
    dev.check(ops->event_record(ev, dev.stream), "event_record");
    GrokitStream other = nullptr;
    dev.check(ops->stream_create(&other), "stream_create");
    dev.check(ops->stream_wait_event(other, ev), "stream_wait_event");
    std::vector<uint8_t> back(src.size() - 10);
    dev.check(ops->copy(back.data(), b + 7, back.size(), GROKIT_COPY_D2H, other), "copy D2H");
    dev.check(ops->stream_sync(other), "stream_sync");
    dev.check(ops->event_sync(ev), "event_sync");
    compare(dev, "copies", kExact, std::vector<uint8_t>(src.begin() + 3, src.end() - 7), back, 0);
    dev.check(ops->event_destroy(ev), "event_destroy");
    dev.check(ops->stream_destroy(other), "stream_destroy");
    dev.check(ops->free_pinned(pinned), "free_pinned");
    char name[128] = {0};
    uint64_t mem = 0;
    dev.check(ops->device_name(0, name, sizeof name, &mem), "device_name");
    EXPECT_GT(std::strlen(name), 0u);
    EXPECT_GT(mem, 0u);
  });
}

// Invalid arguments: GROKIT_ERR_INVALID and a message, never a crash. Only what a
// backend can see without reading device memory.
void add_error(const std::string& what, std::function<int(Dev&)> call) {
  add("invalid_" + what, [=](Dev& dev, Rng&) {
    const int rc = call(dev);
    EXPECT_EQ(rc, GROKIT_ERR_INVALID) << what << ": " << dev.ops->error_message();
    const char* msg = dev.ops->error_message();
    ASSERT_NE(msg, nullptr);
    EXPECT_GT(std::strlen(msg), 0u);
    std::printf("[ parity ] %s %s: %s\n", dev.backend.c_str(), what.c_str(), msg);
  });
}

// Values only the device reads (ops.h take_device_errors): the host ops refuse them
// when called; the CUDA ops skip them, raise their bit, and the next take_device_errors
// returns it once. Each op is given one bad row (decode sizes: the graph-captured paths).
void add_device_values() {
  add("device_values", [](Dev& dev, Rng& rng) {
    const bool host = dev.backend == "host";
    auto take = [&](const char* what) {
      uint32_t flags = 0xdeadu;
      dev.check(dev.ops->take_device_errors(dev.stream, &flags), std::string("take_device_errors after ") + what);
      return flags;
    };
    auto expect_reported = [&](int rc, uint32_t bit, const char* what) {
      const std::string msg = dev.ops->error_message();
      const uint32_t flags = take(what);
      if (host) {
        EXPECT_EQ(rc, GROKIT_ERR_INVALID) << what;
        EXPECT_EQ(flags, 0u) << what;
      } else {
        EXPECT_EQ(rc, GROKIT_OK) << what << ": " << msg;
        EXPECT_EQ(flags, bit) << what;
        EXPECT_EQ(take(what), 0u) << what << ": the bits were not cleared";
      }
    };
    EXPECT_EQ(take("the start"), 0u) << "bits left by earlier work";
    const int64_t KV = 2, dh = 16, cap = 8;
    const GrokitAttnShape sh{4, KV, dh, 1.0f, 30.0f};
    auto* kc = static_cast<uint16_t*>(dev.alloc(static_cast<size_t>(KV * cap * dh * 2)));
    auto* vc = static_cast<uint16_t*>(dev.alloc(static_cast<size_t>(KV * cap * dh * 2)));
    auto* valid = static_cast<uint8_t*>(dev.alloc(static_cast<size_t>(cap)));
    dev.check(dev.ops->fill(kc, 0, static_cast<size_t>(KV * cap * dh * 2), dev.stream), "fill");
    dev.check(dev.ops->fill(vc, 0, static_cast<size_t>(KV * cap * dh * 2), dev.stream), "fill");
    dev.check(dev.ops->fill(valid, 1, static_cast<size_t>(cap), dev.stream), "fill");
    const std::vector<float> kv = bf16_values(rng, static_cast<size_t>(KV * dh), -2, 1);
    GrokitAttnRow row{kc, vc, valid, cap, 1, static_cast<int32_t>(cap), 5};  // position == cap
    expect_reported(dev.ops->kv_store(dev.upload(kv), dev.upload(kv), 1, dev.upload(std::vector<GrokitAttnRow>{row}),
                                      &sh, dev.stream),
                    GROKIT_DEVERR_KV_ROW, "kv_store at position cap");
    row.pos = 0;
    row.n_keys = cap + 1;  // more keys than the cache holds
    const std::vector<float> q = bf16_values(rng, static_cast<size_t>(4 * dh), -2, 1);
    expect_reported(dev.ops->attention(dev.upload(q), 1, dev.upload(std::vector<GrokitAttnRow>{row}), cap + 1, &sh,
                                       dev.poisoned<float>(static_cast<size_t>(4 * dh)), dev.stream),
                    GROKIT_DEVERR_ATTN_ROW, "attention with n_keys above cap");
    const WeightPayload w = payloads::random_weight(payloads::kBF16, 2, 64, 40, 0, rng);
    GrokitWeight wd = w.desc(dev.upload(w.bytes));
    const uint64_t scratch_bytes = dev.ops->prepare_scratch_bytes(&wd);
    void* scratch = scratch_bytes > 0 ? dev.alloc(scratch_bytes) : nullptr;
    dev.check(dev.ops->prepare_weight(&wd, scratch, dev.stream), "prepare_weight");
    const GrokitRouting routing{dev.upload(std::vector<int32_t>{0, 2}), 1};  // row 1: expert 2 of 2
    const std::vector<float> x = bf16_values(rng, static_cast<size_t>(2 * 64), -2, 1);
    expect_reported(dev.ops->matmul(&wd, dev.upload(x), 2, 64, 0, &routing, dev.poisoned<float>(80), 40, dev.stream),
                    GROKIT_DEVERR_EXPERT, "matmul with an expert past the stack");
    // Past the routed decode limit (64 rows), the CUDA op groups the rows by expert on the
    // host, and refuses there.
    std::vector<int32_t> many(80, 1);
    many[17] = 2;
    const GrokitRouting routing80{dev.upload(many), 1};
    const std::vector<float> x80 = bf16_values(rng, static_cast<size_t>(80 * 64), -2, 1);
    EXPECT_EQ(dev.ops->matmul(&wd, dev.upload(x80), 80, 64, 0, &routing80, dev.poisoned<float>(80 * 40), 40, dev.stream),
              GROKIT_ERR_INVALID)
        << "matmul of 80 rows with an expert past the stack";
    EXPECT_EQ(take("matmul of 80 rows"), 0u);
    uint32_t flags = 0;
    EXPECT_EQ(dev.ops->take_device_errors(dev.stream, nullptr), GROKIT_ERR_INVALID);
    dev.check(dev.ops->take_device_errors(dev.stream, &flags), "take_device_errors");

    // Each stream's bits are its own (ranks sharing a GPU): a bad row on another stream
    // is reported there, not here, and taking this stream's bits leaves the other's.
    GrokitStream other = nullptr;
    dev.check(dev.ops->stream_create(&other), "stream_create");
    row.pos = static_cast<int32_t>(cap);
    row.n_keys = 1;
    const int rc = dev.ops->kv_store(dev.upload(kv), dev.upload(kv), 1, dev.upload(std::vector<GrokitAttnRow>{row}),
                                     &sh, other);
    dev.check(dev.ops->stream_sync(other), "stream_sync");
    uint32_t here = 0xdeadu, there = 0xdeadu;
    dev.check(dev.ops->take_device_errors(dev.stream, &here), "take_device_errors (this stream)");
    dev.check(dev.ops->take_device_errors(other, &there), "take_device_errors (the other stream)");
    if (host) {
      EXPECT_EQ(rc, GROKIT_ERR_INVALID);
      EXPECT_EQ(there, 0u);
    } else {
      EXPECT_EQ(rc, GROKIT_OK) << dev.ops->error_message();
      EXPECT_EQ(there, static_cast<uint32_t>(GROKIT_DEVERR_KV_ROW)) << "the other stream's bit";
    }
    EXPECT_EQ(here, 0u) << "a bit raised on another stream reached this one";
    dev.check(dev.ops->stream_destroy(other), "stream_destroy");
  });
}

GrokitWeight small_weight(Dev& dev, int32_t dtype, int32_t param, int64_t E, int64_t Kd, int64_t N) {
  GrokitWeight w{};
  w.dtype = dtype;
  w.param = param;
  w.experts = E;
  w.rows = Kd;
  w.cols = N;
  w.matrix_bytes = dtype == payloads::kQ8RowBlock ? static_cast<uint64_t>(Kd * N) : static_cast<uint64_t>(2 * Kd * N);
  w.data = dev.alloc(static_cast<size_t>(E * Kd * N * 2 + 4096));
  return w;
}

void add_errors() {
  auto matmul_with = [](GrokitWeight w, int64_t M, int64_t ldy) {
    return [=](Dev& dev) mutable {
      w.data = small_weight(dev, w.dtype, w.param, w.experts, w.rows, w.cols).data;
      auto* x = static_cast<float*>(dev.alloc(4 * 64 * 96));
      auto* y = static_cast<float*>(dev.alloc(4 * 64 * 96));
      return dev.ops->matmul(&w, x, M, w.rows, 0, nullptr, y, ldy, dev.stream);
    };
  };
  GrokitWeight base{};
  base.dtype = payloads::kBF16;
  base.experts = 1;
  base.rows = 64;
  base.cols = 40;
  base.matrix_bytes = 2 * 64 * 40;
  GrokitWeight w = base;
  w.dtype = 7;
  add_error("matmul_dtype_7", matmul_with(w, 2, 40));
  add_error("matmul_ldy_below_N", matmul_with(base, 2, 39));
  add_error("matmul_negative_M", matmul_with(base, -1, 40));
  w = base;
  w.dtype = payloads::kQ4Group;
  w.param = 48;
  add_error("matmul_q4g_group_48", matmul_with(w, 2, 40));
  w = base;
  w.dtype = payloads::kQ8RowBlock;
  w.param = 5;
  w.matrix_bytes = 64 * 40;
  add_error("matmul_q8rb_rows_not_in_blocks", matmul_with(w, 2, 40));
  w = base;
  w.experts = 3;
  add_error("matmul_experts_without_routing", matmul_with(w, 2, 40));
  add_error("matmul_unknown_flag", [base](Dev& dev) mutable {
    base.data = small_weight(dev, base.dtype, base.param, base.experts, base.rows, base.cols).data;
    auto* x = static_cast<float*>(dev.alloc(4 * 64 * 96));
    auto* y = static_cast<float*>(dev.alloc(4 * 64 * 96));
    return dev.ops->matmul(&base, x, 2, base.rows, 8, nullptr, y, 40, dev.stream);
  });
  add_error("rope_store_odd_head_dim", [](Dev& dev) {
    auto* f = static_cast<float*>(dev.alloc(4096));
    const GrokitAttnShape sh{4, 2, 15, 1.0f, 30.0f};
    return dev.ops->rope_store(f, f + 256, f + 512, 1, static_cast<int32_t*>(dev.alloc(64)),
                               static_cast<GrokitAttnRow*>(dev.alloc(256)), &sh, 10000.0, dev.stream);
  });
  add_error("residual_norm_a_overlaps_x", [](Dev& dev) {
    auto* f = static_cast<float*>(dev.alloc(4 * 1024));
    return dev.ops->residual_norm(f, nullptr, 0, 1, 2, 64, f + 512, 1e-5f, f + 128, f + 640, f + 192, dev.stream);
  });
  add_error("router_k_above_E", [](Dev& dev) {
    auto* f = static_cast<float*>(dev.alloc(4096));
    return dev.ops->router_topk(f, 2, 16, f, 4, 5, static_cast<int32_t*>(dev.alloc(64)), f, dev.stream);
  });
  add_error("rope_odd_head_dim", [](Dev& dev) {
    auto* f = static_cast<float*>(dev.alloc(4096));
    return dev.ops->rope(f, 2, 2, 15, static_cast<int32_t*>(dev.alloc(64)), 10000.0, dev.stream);
  });
  add_error("attention_heads_not_grouped", [](Dev& dev) {
    const GrokitAttnShape sh{6, 4, 16, 1.0f, 30.0f};
    auto* f = static_cast<float*>(dev.alloc(4096));
    return dev.ops->attention(f, 1, static_cast<GrokitAttnRow*>(dev.alloc(256)), 8, &sh, f, dev.stream);
  });
  add_error("attention_max_keys_0", [](Dev& dev) {
    const GrokitAttnShape sh{4, 2, 16, 1.0f, 30.0f};
    auto* f = static_cast<float*>(dev.alloc(4096));
    return dev.ops->attention(f, 1, static_cast<GrokitAttnRow*>(dev.alloc(256)), 0, &sh, f, dev.stream);
  });
  add_error("sum_arrays_no_parts", [](Dev& dev) {
    auto* f = static_cast<float*>(dev.alloc(4096));
    const float* parts[1] = {f};
    return dev.ops->sum_arrays(parts, 0, 16, f, dev.stream);
  });
  add_error("copy_kind_9", [](Dev& dev) {
    void* p = dev.alloc(64);
    return dev.ops->copy(p, p, 64, 9, dev.stream);
  });
  add_error("rmsnorm_D_0", [](Dev& dev) {
    auto* f = static_cast<float*>(dev.alloc(4096));
    return dev.ops->rmsnorm(f, 1, 0, f, 1e-5f, f, dev.stream);
  });
  add_error("embed_negative_M", [](Dev& dev) {
    auto* f = static_cast<float*>(dev.alloc(4096));
    return dev.ops->embed(static_cast<int32_t*>(dev.alloc(64)), -1, static_cast<uint16_t*>(dev.alloc(64)), 0, 4, 8,
                          1.0f, f, dev.stream);
  });
  add_error("logits_ldy_below_N", [](Dev& dev) {
    auto* f = static_cast<float*>(dev.alloc(4096));
    return dev.ops->logits(f, 1, 16, static_cast<uint16_t*>(dev.alloc(4096)), 8, 1.0f, f, 7, dev.stream);
  });
  add_error("moe_combine_k_0", [](Dev& dev) {
    auto* f = static_cast<float*>(dev.alloc(4096));
    return dev.ops->moe_combine(f, f, 2, 0, 16, f, dev.stream);
  });
}

// ---------------------------------------------------------------------------------
// The table.

void build_cases() {
  using namespace payloads;
  // Elementwise and small ops: odd sizes, real widths where it matters.
  for (int64_t M : {1, 17}) add_embed(M, 96, 100, 50);
  add_embed(3, 6144, 0, 7);
  for (int64_t M : {1, 3, 33}) add_rmsnorm(M, 96, false);
  add_rmsnorm(5, 6144, false);
  add_rmsnorm(17, 96, true);
  add_rope(1, 8, 128);
  add_rope(17, 3, 128);
  add_rope(5, 8, 16);
  add_device_values();
  add_kv_store(2, 128);
  add_kv_store(8, 16);
  add_rope_store(2, 128);
  add_rope_store(1, 80);

  // Attention. Decode: rows of different sequences, n_keys 1 .. 300, padding, a row
  // with no visible key (its first three keys are padding), max_keys above them all.
  // Prefill: many rows of one sequence (all see n_keys = start + rows), two sequences
  // in one call, rows at the start whose visible keys are all padding.
  const float m128 = 0.08838834764831845f, m16 = 0.25f;
  add_attention("decode", 8, 2, 128, m128, 2, {{8, 1}, {45, 37}, {320, 300}, {5, 3}, {200, 129}}, {0, 3, 0, 3, 1},
                {{0, 0}, {1, 36}, {2, 299}, {3, 2}, {4, 128}}, 320);
  add_attention("decode", 8, 8, 16, m16, 2, {{8, 1}, {45, 37}, {320, 300}, {5, 3}}, {0, 3, 0, 3},
                {{0, 0}, {1, 36}, {2, 299}, {3, 2}}, 512);
  add_attention("decode_capped", 4, 1, 128, 1.0f, 4, {{64, 50}, {300, 297}}, {0, 5}, {{0, 49}, {1, 296}}, 300);
  // Sized for a graph (max_keys 4096) with shorter rows: a row's keys spread over all
  // splits in smaller chunks than the plan's (row_chunk), Grok-1's 6 heads per kv head.
  add_attention("decode_graph_sized", 6, 1, 128, m128, 2, {{1100, 1025}, {320, 300}, {64, 40}, {8, 5}}, {0, 3, 0, 0},
                {{0, 1024}, {1, 299}, {2, 39}, {3, 4}}, 4096);
  {
    std::vector<AttnRowSpec> rows;
    for (int32_t p = 236; p < 300; ++p) rows.push_back({0, p});
    add_attention("prefill_M64_keys300", 8, 2, 128, m128, 2, {{320, 300}}, {0}, rows, 300);
  }
  {
    std::vector<AttnRowSpec> rows;
    for (int32_t p = 0; p < 33; ++p) rows.push_back({0, p});
    add_attention("prefill_M33_from0_leftpad", 8, 2, 128, m128, 2, {{40, 33}}, {3}, rows, 33);
    add_attention("prefill_M33_from0_leftpad", 8, 8, 16, m16, 2, {{40, 33}}, {3}, rows, 64);
    for (auto& r : rows) r.n_keys = r.pos + 1;  // each row sees only its own keys
    add_attention("prefill_M33_causal_n_keys", 8, 2, 128, m128, 2, {{40, 33}}, {3}, rows, 40);
  }
  {
    std::vector<AttnRowSpec> rows;
    for (int32_t p = 0; p < 20; ++p) rows.push_back({0, p});
    for (int32_t p = 100; p < 117; ++p) rows.push_back({1, p});
    add_attention("prefill_two_sequences", 8, 2, 128, m128, 2, {{24, 20}, {128, 117}}, {2, 0}, rows, 128);
  }
  // M > 64 takes the tensor-core prefill kernels: one row past a tile, tiles that span
  // two sequences, head_dim 16 / 80 / 128 / 256, causal n_keys per row, and max_keys far
  // above the keys present (the split must follow n_keys, not max_keys).
  const float m80 = 0.11180339887498948f, m256 = 0.0625f;
  {
    std::vector<AttnRowSpec> rows;
    for (int32_t p = 0; p < 65; ++p) rows.push_back({0, p});
    add_attention("prefill_M65_from0_leftpad", 8, 2, 128, m128, 2, {{80, 65}}, {3}, rows, 65);
    add_attention("prefill_M65_from0_leftpad", 8, 8, 16, m16, 2, {{80, 65}}, {3}, rows, 80);
    for (auto& r : rows) r.n_keys = r.pos + 1;
    add_attention("prefill_M65_causal_n_keys", 8, 2, 128, m128, 2, {{80, 65}}, {3}, rows, 80);
  }
  {
    std::vector<AttnRowSpec> rows;
    for (int32_t p = 0; p < 70; ++p) rows.push_back({0, p});
    for (int32_t p = 100; p < 160; ++p) rows.push_back({1, p});
    add_attention("prefill_M130_two_sequences", 8, 2, 128, m128, 2, {{96, 70}, {200, 160}}, {2, 0}, rows, 200);
    add_attention("prefill_M130_two_sequences", 4, 2, 256, m256, 2, {{96, 70}, {200, 160}}, {2, 0}, rows, 200);
  }
  {
    std::vector<AttnRowSpec> rows;
    for (int32_t p = 0; p < 300; ++p) rows.push_back({0, p});
    add_attention("prefill_M300_max_keys4096", 4, 2, 80, m80, 2, {{320, 300}}, {1}, rows, 4096);
    add_attention("prefill_M300_capped", 4, 1, 128, 1.0f, 4, {{300, 300}}, {5}, rows, 300);
  }
  add_attention("decode", 4, 2, 80, m80, 2, {{8, 1}, {320, 300}}, {0, 0}, {{0, 0}, {1, 299}}, 4096);
  add_attention("decode", 4, 1, 256, m256, 2, {{45, 37}, {320, 300}}, {3, 0}, {{0, 36}, {1, 299}}, 320);

  for (int64_t M : {1, 17, 33}) add_router(M, 96, 8, 2);
  add_router(3, 6144, 8, 2);
  add_router(70, 96, 8, 2);    // row tiles (M >= 64), the last one partial
  add_router(130, 6144, 8, 2);
  add_router(67, 40, 5, 1);
  add_router(5, 40, 5, 1);
  add_router(4, 96, 3, 3);

  // Matrix products: every scheme, decode and prefill batch sizes (M 1, 3 | 17, 33 cross
  // the M > 16 switch), bf16 and fp32 x, several scale blocks and groups.
  struct W {
    int32_t dtype;
    int64_t param, K;
  };
  const W schemes[] = {{kQ8RowBlock, 3, 96}, {kQ8RowBlock, 8, 96}, {kQ4Group, 32, 96}, {kQ4Group, 64, 192},
                       {kQ4Group, 128, 384}, {kF8Column, 0, 96},   {kBF16, 0, 96}};
  for (const W& s : schemes) {
    for (int64_t M : {1, 3, 17, 33}) add_matmul(s.dtype, s.param, 1, s.K, 40, M, false, Route::kNone);
    for (int64_t M : {1, 17}) add_matmul(s.dtype, s.param, 1, s.K, 40, M, true, Route::kNone);
  }
  for (const W& s : {schemes[0], schemes[2], schemes[5], schemes[6]}) {
    add_matmul(s.dtype, s.param, 1, s.K, 33, 3, false, Route::kNone);
    add_matmul(s.dtype, s.param, 1, s.K, 40, 5, false, Route::kNone, 3);
    add_matmul(s.dtype, s.param, 1, s.K, 40, 20, true, Route::kNone, 5);
  }
  add_matmul(kQ8RowBlock, 8, 1, 768, 40, 17, false, Route::kNone);
  add_matmul(kQ4Group, 128, 1, 1024, 40, 2, true, Route::kNone);
  // Experts: top-2 rows over four experts (one unused, rows skipped), and the down
  // projection's own rows in fp32.
  for (const W& s : {schemes[0], schemes[2], schemes[4], schemes[5], schemes[6]}) {
    add_matmul(s.dtype, s.param, 4, s.K, 40, 2, false, Route::kTopk);
    add_matmul(s.dtype, s.param, 4, s.K, 40, 40, false, Route::kTopk);
    add_matmul(s.dtype, s.param, 4, s.K, 40, 40, true, Route::kDown);
    // Past the routed decode limit (64 rows): the grouped prefill path.
    add_matmul(s.dtype, s.param, 4, s.K, 40, 130, false, Route::kTopk);
    add_matmul(s.dtype, s.param, 4, s.K, 40, 80, true, Route::kDown);
  }
  // A real-width column count with an odd tail, and a prefill of many rows.
  add_matmul(kQ8RowBlock, 8, 1, 768, 1037, 1, false, Route::kNone);
  for (int64_t M : {1, 3, 17}) add_matmul_multi(kQ8RowBlock, 2, 256, M);
  add_matmul_multi(kQ4Group, 64, 256, 1);
  add_matmul_multi(kBF16, 0, 96, 2);
  add_matmul(kQ4Group, 128, 1, 768, 1037, 5, false, Route::kNone);
  add_matmul(kF8Column, 0, 1, 768, 1037, 70, true, Route::kNone);

  for (int64_t n : {1, 1001}) add_gelu_mul(n, Alias::kNone);
  add_gelu_mul(1001, Alias::kFirst);
  add_gelu_mul(1001, Alias::kSecond);
  add_round_bf16(1, false);
  add_round_bf16(4099, false);
  add_round_bf16(1001, true);
  add_add_bf16(1001, Alias::kNone);
  add_add_bf16(1001, Alias::kFirst);
  add_add_bf16(1001, Alias::kSecond);
  for (int64_t M : {1, 3}) add_residual_norm(M, 6144, 1, true);
  add_residual_norm(5, 96, 0, true);
  add_residual_norm(2, 96, 1, false);
  add_residual_norm(17, 37, 1, true);  // D odd: element by element
  add_residual_norm_combine(1, 6144, 2);
  add_residual_norm_combine(5, 96, 3);
  add_residual_norm_combine(3, 37, 2);
  add_moe_combine(1, 2, 96);
  add_moe_combine(17, 2, 96);
  add_moe_combine(5, 1, 40);
  add_moe_combine(5, 3, 6144);
  for (int64_t M : {1, 3, 17}) add_logits(M, 96, 40, 0);
  add_logits(5, 96, 40, 3);
  add_logits(2, 6144, 33, 0);
  for (int c = 1; c <= 8; ++c) add_sum_arrays(c, 1001, false);
  add_sum_arrays(3, 1001, true);
  add_sum_arrays(8, 1, true);
  add_memory();
  add_errors();
}

const std::vector<Case>& cases() {
  static const bool built = (build_cases(), true);
  (void)built;
  return registry();
}

// ---------------------------------------------------------------------------------
// The tests: (backend, case), named <backend>_<case>.

class Parity : public ::testing::TestWithParam<std::tuple<std::string, size_t>> {};

TEST_P(Parity, MatchesTheCpuTwin) {
  const auto& [backend_name, index] = GetParam();
  const Backend& b = backend_named(backend_name);
  if (!b.error.empty()) FAIL() << b.error;
  if (b.ops == nullptr) GTEST_SKIP() << b.skip;
  const Case& c = cases()[index];
  Rng rng(seed_of(c.name));
  try {
    Dev dev(b.ops, b.name);
    c.run(dev, rng);
  } catch (const Failure& f) {
    FAIL() << f.what();
  }
}

std::vector<size_t> case_indices() {
  std::vector<size_t> v(cases().size());
  for (size_t i = 0; i < v.size(); ++i) v[i] = i;
  return v;
}

INSTANTIATE_TEST_SUITE_P(Ops, Parity,
                         ::testing::Combine(::testing::Values("host", "cuda"), ::testing::ValuesIn(case_indices())),
                         [](const ::testing::TestParamInfo<Parity::ParamType>& info) {
                           return std::get<0>(info.param) + "_" + cases()[std::get<1>(info.param)].name;
                         });

// The harness itself: the comparison catches what it must.
TEST(ParityHarness, CompareCatchesPoisonBudgetsAndPadding) {
  Dev dev(grokit_host_ops(), "probe");  // not "host": budgets apply
  std::vector<float> e = {1.0f, 2.0f, 0.0f}, a = e;
  std::vector<double> s = {1.0, 1.0, 1.0};
  compare(dev, "same", kMatmul, e, a, 0, nullptr, &s);
  EXPECT_FALSE(::testing::Test::HasFailure());
  a[1] = 2.0f + 0x1p-18f;  // within 2^-16 * 1
  compare(dev, "within", kMatmul, e, a, 0, nullptr, &s);
  EXPECT_FALSE(::testing::Test::HasFailure());
  auto fails = [&](const std::vector<float>& act, const std::vector<uint8_t>* mask, const Budget& bud) {
    ::testing::TestPartResultArray results;
    {
      ::testing::ScopedFakeTestPartResultReporter fake(
          ::testing::ScopedFakeTestPartResultReporter::INTERCEPT_ONLY_CURRENT_THREAD, &results);
      compare(dev, "probe", bud, e, act, 0, mask, &s);
    }
    return results.size() > 0;
  };
  std::vector<float> poisoned = e;
  std::memset(&poisoned[2], 0xFF, 4);
  EXPECT_TRUE(fails(poisoned, nullptr, kMatmul)) << "an unwritten (poisoned) element passed";
  EXPECT_TRUE(fails(poisoned, nullptr, kAttention));
  std::vector<float> off = e;
  off[0] = 1.0f + 0x1p-14f;
  EXPECT_TRUE(fails(off, nullptr, kMatmul)) << "an error of 2^-14 * scale passed a 2^-16 budget";
  std::vector<float> one_ulp = e;
  one_ulp[1] = 2.0f + 0x1p-6f;  // one bf16 ulp at 2
  EXPECT_FALSE(fails(one_ulp, nullptr, kRmsnorm));
  one_ulp[1] = 2.0f + 0x1p-5f;
  EXPECT_TRUE(fails(one_ulp, nullptr, kRmsnorm));
  {  // many elements one bf16 ulp off: within each element's budget, not within the share
    std::vector<float> ev(400), av(400);
    std::vector<double> sv(400, 1.0);
    for (size_t i = 0; i < ev.size(); ++i) ev[i] = av[i] = 1.0f + static_cast<float>(i % 100) / 128.0f;
    for (size_t i = 0; i < 40; ++i) av[i * 10] = ev[i * 10] + 0x1p-7f;
    ::testing::TestPartResultArray results;
    {
      ::testing::ScopedFakeTestPartResultReporter fake(
          ::testing::ScopedFakeTestPartResultReporter::INTERCEPT_ONLY_CURRENT_THREAD, &results);
      compare(dev, "share", kAttention, ev, av, 0, nullptr, &sv);
    }
    EXPECT_EQ(results.size(), 1) << "10% of elements off by one ulp passed a 1% share";
    for (size_t i = 1; i < 40; ++i) av[i * 10] = ev[i * 10];  // one left: allowed
    compare(dev, "share", kAttention, ev, av, 0, nullptr, &sv);
  }
  const std::vector<uint8_t> mask = {1, 1, 0};  // element 2 must be left alone
  std::vector<float> touched = e;
  touched[2] = 1e-30f;
  EXPECT_TRUE(fails(touched, &mask, kMatmul)) << "a write into padding passed";
  Dev host(grokit_host_ops(), "host");  // the host twin is held to exact bits
  ::testing::TestPartResultArray results;
  {
    ::testing::ScopedFakeTestPartResultReporter fake(
        ::testing::ScopedFakeTestPartResultReporter::INTERCEPT_ONLY_CURRENT_THREAD, &results);
    compare(host, "probe", kMatmul, e, a, 0, nullptr, &s);
  }
  EXPECT_EQ(results.size(), 1) << "the host twin passed with a 2^-18 difference";
}

// NCCL through the plugin's table on one rank (the one GPU a check machine has): loading
// libnccl, the ABI mirror, init, each collective, the collectives captured in a graph and
// replayed, destroy and abort. One rank sums and gathers only itself, so the results are
// the inputs; what this proves is that every call goes through and lands.
TEST(ParityHarness, CudaNcclOneRank) {
  const Backend& b = cuda_backend();
  if (!b.error.empty()) FAIL() << b.error;
  if (b.ops == nullptr) GTEST_SKIP() << b.skip;
  const GrokitCollectives* nc = b.collectives;
  ASSERT_NE(nc, nullptr) << "the CUDA plugin exports no grokit_cuda_collectives";
  ASSERT_EQ(nc->abi_version, GROKIT_OPS_ABI_VERSION);
  char why[512] = {0};
  if (nc->available(why, sizeof why) == 0) GTEST_SKIP() << "NCCL cannot be loaded here: " << why;
  const GrokitOps* ops = b.ops;
  auto ok = [&](int rc, const char* what) {
    if (rc != GROKIT_OK) throw Failure(std::string(what) + " returned " + std::to_string(rc) + ": " + ops->error_message());
  };
  try {
    ok(ops->set_device(0), "set_device");
    GrokitNcclId id{};
    ok(nc->unique_id(&id), "unique_id");
    void* comm = nullptr;
    ok(nc->comm_init(&comm, 1, &id, 0), "comm_init");
    {
      Dev dev(ops, "cuda");
      Rng rng(7);
      const size_t n = 1001;
      std::vector<float> data(n);
      for (float& v : data) v = rng.f32(-4.0f, 4.0f);
      float* buf = dev.upload(data);
      float* gathered = dev.poisoned<float>(n);
      ok(nc->all_reduce_sum(buf, buf, n, comm, dev.stream), "all_reduce_sum");
      ok(nc->all_gather(buf, gathered, n * sizeof(float), comm, dev.stream), "all_gather");
      ok(nc->broadcast(buf, n * sizeof(float), 0, comm, dev.stream), "broadcast");
      EXPECT_EQ(dev.download(buf, n), data);
      EXPECT_EQ(dev.download(gathered, n), data);
      if (ops->graph_begin != nullptr) {
        float* replayed = dev.poisoned<float>(n);
        void* graph = nullptr;
        ok(ops->graph_begin(dev.stream), "graph_begin");
        const int rc1 = nc->all_reduce_sum(buf, buf, n, comm, dev.stream);
        const int rc2 = nc->all_gather(buf, replayed, n * sizeof(float), comm, dev.stream);
        ok(ops->graph_end(dev.stream, &graph), "graph_end");
        ok(rc1, "all_reduce_sum (captured)");
        ok(rc2, "all_gather (captured)");
        EXPECT_TRUE(std::isnan(dev.download(replayed, n)[0])) << "captured work ran before the launch";
        ok(ops->graph_launch(graph, dev.stream), "graph_launch");
        EXPECT_EQ(dev.download(replayed, n), data);
        ok(ops->graph_destroy(graph), "graph_destroy");  // before the communicator goes
      }
    }
    ok(nc->comm_destroy(comm), "comm_destroy");
    // A unique id bootstraps one communicator: the second needs its own.
    ok(nc->unique_id(&id), "unique_id (second)");
    void* doomed = nullptr;
    ok(nc->comm_init(&doomed, 1, &id, 0), "comm_init (second)");
    ok(nc->comm_abort(doomed), "comm_abort");
  } catch (const Failure& f) {
    FAIL() << f.what();
  }
}

TEST(ParityHarness, CudaBackendStatus) {
  const Backend& b = cuda_backend();
  if (!b.error.empty()) FAIL() << b.error;
  if (b.ops == nullptr) GTEST_SKIP() << b.skip;
  EXPECT_STREQ(b.ops->backend, "cuda");
  // memory_info: about the memory device_name reports (cudaMemGetInfo may leave out what
  // the driver keeps), some of it free.
  uint64_t named = 0, free = 0, total = 0;
  char name[256] = {0};
  ASSERT_EQ(b.ops->device_name(0, name, sizeof name, &named), GROKIT_OK) << b.ops->error_message();
  ASSERT_EQ(b.ops->set_device(0), GROKIT_OK) << b.ops->error_message();
  ASSERT_EQ(b.ops->memory_info(0, &free, &total), GROKIT_OK) << b.ops->error_message();
  EXPECT_GT(total, named / 2);
  EXPECT_LE(total, named);
  EXPECT_GT(free, 0u);
  EXPECT_LE(free, total);
  int count = 0;
  ASSERT_EQ(b.ops->device_count(&count), GROKIT_OK);
  EXPECT_NE(b.ops->memory_info(count, &free, &total), GROKIT_OK);
}

}  // namespace
}  // namespace grokit::parity
