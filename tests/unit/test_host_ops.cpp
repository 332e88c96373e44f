// Tests of the host device ops (grokit_host_ops, kernels/ops_cpu.cpp): the table, memory,
// every op equal bit for bit to the direct CPU kernel (or to the op's definition) on
// random inputs, on the calling thread and on a ThreadPool stream; matmul's expert
// routing (stable grouping, gathered x rows, skipped rows); and invalid arguments, which
// must give GROKIT_ERR_INVALID with a message naming the op and the value, never abort.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include "format/format.h"
#include "kernels/kernels.h"
#include "kernels/ops.h"
#include "tests/gpu/payloads.h"

namespace grokit::kernels {
namespace {

using payloads::Rng;
using payloads::WeightPayload;

const GrokitOps& ops() { return *grokit_host_ops(); }

// Streams the host accepts: the calling thread, and pools of 1 and 3 threads.
std::vector<GrokitStream> streams() {
  static ThreadPool p1(1), p3(3);
  return {nullptr, &p1, &p3};
}

template <class T>
void expect_same_bits(const std::vector<T>& want, const std::vector<T>& got, const std::string& what) {
  ASSERT_EQ(want.size(), got.size()) << what;
  size_t bad = 0, first = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    if (std::memcmp(&want[i], &got[i], sizeof(T)) != 0 && bad++ == 0) first = i;
  }
  EXPECT_EQ(bad, 0u) << what << ": " << bad << " elements differ, first at " << first << ": expected " << +want[first]
                     << ", actual " << +got[first];
}

std::vector<float> bf16_values(Rng& rng, size_t n, int lo, int hi) {
  std::vector<float> v(n);
  for (auto& x : v) x = rng.bf16_value(lo, hi);
  return v;
}
std::vector<float> poison(size_t n) {
  std::vector<float> v(n);
  std::memset(v.data(), 0xFF, n * 4);
  return v;
}

// ---------------------------------------------------------------------------------
// The table, memory, streams, events.

TEST(HostOps, TableIsCompleteAndSaysHost) {
  const GrokitOps& t = ops();
  EXPECT_EQ(t.abi_version, GROKIT_OPS_ABI_VERSION);
  EXPECT_STREQ(t.backend, "host");
  const void* fns[] = {reinterpret_cast<const void*>(t.error_message),
                       reinterpret_cast<const void*>(t.device_count),
                       reinterpret_cast<const void*>(t.set_device),
                       reinterpret_cast<const void*>(t.device_name),
                       reinterpret_cast<const void*>(t.memory_info),
                       reinterpret_cast<const void*>(t.alloc),
                       reinterpret_cast<const void*>(t.free),
                       reinterpret_cast<const void*>(t.alloc_pinned),
                       reinterpret_cast<const void*>(t.free_pinned),
                       reinterpret_cast<const void*>(t.host_register),
                       reinterpret_cast<const void*>(t.host_unregister),
                       reinterpret_cast<const void*>(t.copy),
                       reinterpret_cast<const void*>(t.fill),
                       reinterpret_cast<const void*>(t.stream_create),
                       reinterpret_cast<const void*>(t.stream_destroy),
                       reinterpret_cast<const void*>(t.stream_sync),
                       reinterpret_cast<const void*>(t.event_create),
                       reinterpret_cast<const void*>(t.event_destroy),
                       reinterpret_cast<const void*>(t.event_record),
                       reinterpret_cast<const void*>(t.event_sync),
                       reinterpret_cast<const void*>(t.stream_wait_event),
                       reinterpret_cast<const void*>(t.prepare_scratch_bytes),
                       reinterpret_cast<const void*>(t.prepare_weight),
                       reinterpret_cast<const void*>(t.embed),
                       reinterpret_cast<const void*>(t.rmsnorm),
                       reinterpret_cast<const void*>(t.rope),
                       reinterpret_cast<const void*>(t.kv_store),
                       reinterpret_cast<const void*>(t.rope_store),
                       reinterpret_cast<const void*>(t.attention),
                       reinterpret_cast<const void*>(t.router_topk),
                       reinterpret_cast<const void*>(t.matmul),
                       reinterpret_cast<const void*>(t.matmul_multi),
                       reinterpret_cast<const void*>(t.gelu_mul),
                       reinterpret_cast<const void*>(t.round_bf16),
                       reinterpret_cast<const void*>(t.add_bf16),
                       reinterpret_cast<const void*>(t.residual_norm),
                       reinterpret_cast<const void*>(t.moe_combine),
                       reinterpret_cast<const void*>(t.logits),
                       reinterpret_cast<const void*>(t.sum_arrays)};
  for (size_t i = 0; i < std::size(fns); ++i) EXPECT_NE(fns[i], nullptr) << "entry " << i;
  EXPECT_EQ(t.graph_begin, nullptr);
  EXPECT_EQ(t.graph_end, nullptr);
  EXPECT_EQ(t.graph_launch, nullptr);
  EXPECT_EQ(t.graph_destroy, nullptr);
  EXPECT_NE(t.error_message(), nullptr);
}

TEST(HostOps, OneDeviceWithANameAndMemory) {
  int n = 0;
  ASSERT_EQ(ops().device_count(&n), GROKIT_OK);
  EXPECT_EQ(n, 1);
  EXPECT_EQ(ops().set_device(0), GROKIT_OK);
  char name[128] = {0};
  uint64_t mem = 0;
  ASSERT_EQ(ops().device_name(0, name, sizeof name, &mem), GROKIT_OK);
  EXPECT_NE(std::string(name).find("host"), std::string::npos) << name;
  EXPECT_GT(mem, 0u);
  // Its memory free and in all: the machine's, some of it free.
  uint64_t free = 0, total = 0;
  ASSERT_EQ(ops().memory_info(0, &free, &total), GROKIT_OK) << ops().error_message();
  EXPECT_EQ(total, mem);
  EXPECT_GT(free, 0u);
  EXPECT_LE(free, total);
  EXPECT_NE(ops().memory_info(1, &free, &total), GROKIT_OK);
  EXPECT_NE(std::string(ops().error_message()).find("device 1 does not exist"), std::string::npos);
  EXPECT_NE(ops().memory_info(0, nullptr, &total), GROKIT_OK);
}

TEST(HostOps, MemoryIsAlignedAndCopiesAndFillsWork) {
  for (size_t bytes : {size_t{0}, size_t{1}, size_t{1000}, size_t{1} << 20}) {
    void* p = nullptr;
    ASSERT_EQ(ops().alloc(&p, bytes), GROKIT_OK);
    ASSERT_NE(p, nullptr);
    EXPECT_EQ(reinterpret_cast<uintptr_t>(p) % 256, 0u);
    EXPECT_EQ(ops().free(p), GROKIT_OK);
    ASSERT_EQ(ops().alloc_pinned(&p, bytes), GROKIT_OK);
    EXPECT_EQ(reinterpret_cast<uintptr_t>(p) % 256, 0u);
    EXPECT_EQ(ops().free_pinned(p), GROKIT_OK);
  }
  EXPECT_EQ(ops().free(nullptr), GROKIT_OK);
  std::vector<uint8_t> a(1001), b(1001, 0);
  for (size_t i = 0; i < a.size(); ++i) a[i] = static_cast<uint8_t>(i * 7);
  for (int kind : {GROKIT_COPY_H2D, GROKIT_COPY_D2H, GROKIT_COPY_D2D}) {
    std::fill(b.begin(), b.end(), 0);
    ASSERT_EQ(ops().copy(b.data(), a.data(), a.size(), kind, nullptr), GROKIT_OK);
    EXPECT_EQ(a, b);
  }
  ASSERT_EQ(ops().fill(b.data(), 0xA5, b.size(), nullptr), GROKIT_OK);
  EXPECT_EQ(b, std::vector<uint8_t>(b.size(), 0xA5));
  EXPECT_EQ(ops().copy(nullptr, nullptr, 0, GROKIT_COPY_H2D, nullptr), GROKIT_OK);
}

TEST(HostOps, StreamsAreNullAndEventsAreTrivial) {
  GrokitStream s = reinterpret_cast<GrokitStream>(1);
  ASSERT_EQ(ops().stream_create(&s), GROKIT_OK);
  EXPECT_EQ(s, nullptr);
  void* ev = nullptr;
  ASSERT_EQ(ops().event_create(&ev), GROKIT_OK);
  ASSERT_NE(ev, nullptr);
  EXPECT_EQ(ops().event_record(ev, s), GROKIT_OK);
  EXPECT_EQ(ops().stream_wait_event(s, ev), GROKIT_OK);
  EXPECT_EQ(ops().event_sync(ev), GROKIT_OK);
  EXPECT_EQ(ops().event_destroy(ev), GROKIT_OK);
  EXPECT_EQ(ops().stream_sync(s), GROKIT_OK);
  EXPECT_EQ(ops().stream_destroy(s), GROKIT_OK);
}

// ---------------------------------------------------------------------------------
// Each op against the direct kernel.

TEST(HostOps, ElementwiseOpsEqualTheKernels) {
  Rng rng(1);
  for (GrokitStream s : streams()) {
    for (int64_t n : {int64_t{1}, int64_t{1001}, int64_t{100003}}) {  // past one pool chunk
      auto a = bf16_values(rng, static_cast<size_t>(n), -10, 8), b = bf16_values(rng, static_cast<size_t>(n), -10, 8);
      std::vector<float> x(static_cast<size_t>(n));
      for (auto& v : x) v = rng.f32(-3.0f, 3.0f) * std::ldexp(1.0f, static_cast<int>(rng.range(-20, 20)));
      std::vector<float> want(a.size()), got = poison(a.size());
      round_to_bf16(x.data(), n, want.data());
      ASSERT_EQ(ops().round_bf16(x.data(), n, got.data(), s), GROKIT_OK);
      expect_same_bits(want, got, "round_bf16");
      add_bf16(a.data(), b.data(), n, want.data());
      got = poison(a.size());
      ASSERT_EQ(ops().add_bf16(a.data(), b.data(), n, got.data(), s), GROKIT_OK);
      expect_same_bits(want, got, "add_bf16");
      got = a;  // in place
      ASSERT_EQ(ops().add_bf16(got.data(), b.data(), n, got.data(), s), GROKIT_OK);
      expect_same_bits(want, got, "add_bf16 in place");
      ASSERT_TRUE(gelu_mul(a.data(), b.data(), n, want.data(), nullptr).ok());
      got = poison(a.size());
      ASSERT_EQ(ops().gelu_mul(a.data(), b.data(), n, got.data(), s), GROKIT_OK);
      expect_same_bits(want, got, "gelu_mul");
    }
  }
}

// residual_norm is the sequence it replaces, bit for bit: round_bf16 (or not), rmsnorm,
// add_bf16, and rmsnorm with the next scale (or none), on the same values.
TEST(HostOps, ResidualNormIsTheOpsInTurn) {
  Rng rng(12);
  for (GrokitStream s : streams()) {
    for (const int64_t D : {int64_t{96}, int64_t{37}}) {
      const int64_t M = 19;
      std::vector<float> y(static_cast<size_t>(M * D)), x0(y.size());
      for (int64_t m = 0; m < M; ++m)
        for (int64_t d = 0; d < D; ++d) {
          const size_t i = static_cast<size_t>(m * D + d);
          // y: fp32 sums (not bf16 values), rows of different magnitudes.
          y[i] = rng.f32(-1.0f, 1.0f) * std::ldexp(1.0f, -8 + static_cast<int>(m % 9));
          x0[i] = rng.bf16_value(-6, 3);
        }
      const auto post = bf16_values(rng, static_cast<size_t>(D), -2, 1), next = bf16_values(rng, static_cast<size_t>(D), -2, 1);
      for (const int32_t round_y : {0, 1}) {
        for (const bool with_next : {false, true}) {
          std::vector<float> t(y.size()), want_x = x0, want_a = poison(y.size());
          if (round_y != 0) round_to_bf16(y.data(), M * D, t.data());
          else t = y;
          ASSERT_EQ(ops().rmsnorm(t.data(), M, D, post.data(), 1e-5f, t.data(), nullptr), GROKIT_OK);
          ASSERT_EQ(ops().add_bf16(want_x.data(), t.data(), M * D, want_x.data(), nullptr), GROKIT_OK);
          if (with_next) {
            ASSERT_EQ(ops().rmsnorm(want_x.data(), M, D, next.data(), 1e-5f, want_a.data(), nullptr), GROKIT_OK);
          }
          std::vector<float> got_x = x0, got_a = poison(y.size());
          const std::vector<float> y_before = y;
          ASSERT_EQ(ops().residual_norm(y.data(), nullptr, 0, round_y, M, D, post.data(), 1e-5f, got_x.data(),
                                        with_next ? next.data() : nullptr, got_a.data(), s),
                    GROKIT_OK)
              << ops().error_message();
          const std::string what = "residual_norm D " + std::to_string(D) + " round " + std::to_string(round_y) +
                                   (with_next ? " with next" : "");
          expect_same_bits(want_x, got_x, what + ": x");
          expect_same_bits(want_a, got_a, what + ": a");  // untouched (poison) without a next scale
          expect_same_bits(y_before, y, what + ": y is not written");
          if (round_y != 0) {  // the rounding matters: without it x differs somewhere
            std::vector<float> plain_x = x0;
            ASSERT_EQ(ops().residual_norm(y.data(), nullptr, 0, 0, M, D, post.data(), 1e-5f, plain_x.data(), nullptr, nullptr, s),
                      GROKIT_OK);
            EXPECT_NE(0, std::memcmp(plain_x.data(), got_x.data(), plain_x.size() * sizeof(float))) << what;
          }
        }
      }
    }
  }
}

// With gates, residual_norm first combines each token's routed rows: moe_combine, then the
// rest as above, bit for bit.
TEST(HostOps, ResidualNormCombinesRoutedRows) {
  Rng rng(13);
  for (GrokitStream s : streams()) {
    const int64_t M = 9, D = 96, top = 2;
    std::vector<float> routed(static_cast<size_t>(M * top * D)), gates(static_cast<size_t>(M * top)), x0(static_cast<size_t>(M * D));
    for (auto& v : routed) v = rng.f32(-2.0f, 2.0f);
    for (auto& v : gates) v = rng.f32(0.05f, 0.95f);
    for (auto& v : x0) v = rng.bf16_value(-6, 3);
    const auto post = bf16_values(rng, static_cast<size_t>(D), -2, 1), next = bf16_values(rng, static_cast<size_t>(D), -2, 1);
    std::vector<float> t(static_cast<size_t>(M * D)), want_x = x0, want_a(t.size());
    ASSERT_EQ(ops().moe_combine(routed.data(), gates.data(), M, top, D, t.data(), nullptr), GROKIT_OK);
    ASSERT_EQ(ops().rmsnorm(t.data(), M, D, post.data(), 1e-5f, t.data(), nullptr), GROKIT_OK);
    ASSERT_EQ(ops().add_bf16(want_x.data(), t.data(), M * D, want_x.data(), nullptr), GROKIT_OK);
    ASSERT_EQ(ops().rmsnorm(want_x.data(), M, D, next.data(), 1e-5f, want_a.data(), nullptr), GROKIT_OK);
    std::vector<float> got_x = x0, got_a = poison(t.size());
    ASSERT_EQ(ops().residual_norm(routed.data(), gates.data(), top, 0, M, D, post.data(), 1e-5f, got_x.data(), next.data(),
                                  got_a.data(), s),
              GROKIT_OK)
        << ops().error_message();
    expect_same_bits(want_x, got_x, "residual_norm with gates: x");
    expect_same_bits(want_a, got_a, "residual_norm with gates: a");
    // x inside the routed rows: refused.
    EXPECT_EQ(ops().residual_norm(routed.data(), gates.data(), top, 0, M, D, post.data(), 1e-5f, routed.data() + D, nullptr,
                                  nullptr, s),
              GROKIT_ERR_INVALID);
    EXPECT_NE(std::string(ops().error_message()).find("x overlaps the routed rows"), std::string::npos);
  }
}

TEST(HostOps, EmbedRmsnormRopeRouterEqualTheKernels) {
  Rng rng(2);
  for (GrokitStream s : streams()) {
    const int64_t M = 17, D = 96, rows = 50, start = 100;
    std::vector<int32_t> tokens(static_cast<size_t>(M));
    for (auto& t : tokens) t = static_cast<int32_t>(rng.range(90, 160));
    std::vector<uint16_t> table(static_cast<size_t>(rows * D));
    for (auto& v : table) v = rng.bf16_bits(-8, 4);
    std::vector<float> want(static_cast<size_t>(M * D)), got = poison(want.size());
    embed(tokens.data(), M, table.data(), start, rows, D, 78.5f, want.data());
    ASSERT_EQ(ops().embed(tokens.data(), M, table.data(), start, rows, D, 78.5f, got.data(), s), GROKIT_OK);
    expect_same_bits(want, got, "embed");

    std::vector<float> x(static_cast<size_t>(M * D));
    for (int64_t m = 0; m < M; ++m)  // rows of very different magnitudes (eps matters in some)
      for (int64_t d = 0; d < D; ++d)
        x[static_cast<size_t>(m * D + d)] =
            rng.bf16_value(-12 + static_cast<int>(m % 9), -4 + 2 * static_cast<int>(m % 9));
    auto scale = bf16_values(rng, static_cast<size_t>(D), -2, 1);
    ASSERT_TRUE(rmsnorm(x.data(), M, D, scale.data(), 1e-5f, want.data(), nullptr).ok());
    got = x;  // in place
    ASSERT_EQ(ops().rmsnorm(got.data(), M, D, scale.data(), 1e-5f, got.data(), s), GROKIT_OK);
    expect_same_bits(want, got, "rmsnorm");

    std::vector<int32_t> pos(static_cast<size_t>(M));
    for (auto& p : pos) p = static_cast<int32_t>(rng.range(0, 8191));
    auto q = bf16_values(rng, static_cast<size_t>(M * 3 * 128), -6, 3);
    want = q;
    got = q;
    ASSERT_TRUE(rope(want.data(), M, 3, 128, pos.data(), 10000.0, nullptr).ok());
    ASSERT_EQ(ops().rope(got.data(), M, 3, 128, pos.data(), 10000.0, s), GROKIT_OK);
    expect_same_bits(want, got, "rope");

    const int64_t E = 8, k = 2;
    std::vector<float> w(static_cast<size_t>(D * E));
    for (auto& v : w) v = rng.f32(-0.1f, 0.1f);
    std::vector<int32_t> we(static_cast<size_t>(M * k)), ge(we.size(), -7);
    std::vector<float> wg(we.size()), gg = poison(we.size());
    ASSERT_TRUE(router_topk(x.data(), M, D, w.data(), E, k, we.data(), wg.data(), nullptr).ok());
    ASSERT_EQ(ops().router_topk(x.data(), M, D, w.data(), E, k, ge.data(), gg.data(), s), GROKIT_OK);
    expect_same_bits(we, ge, "router experts");
    expect_same_bits(wg, gg, "router gates");
  }
}

// A stack of E matrices and expected rows computed one by one through the format's own
// view of the payload (format::WeightView::expert) and the engine's chain rules.
std::vector<float> expected_rows(const WeightPayload& p, const std::vector<int32_t>& expert, int64_t div,
                                 const std::vector<float>& x, int64_t ldx, bool fp32, int64_t ldy) {
  const int64_t M = static_cast<int64_t>(expert.size()), Kd = p.rows, N = p.cols;
  std::vector<float> y = poison(static_cast<size_t>(M * ldy));
  format::WeightView v;
  v.dtype = static_cast<format::DType>(p.dtype);
  v.experts = p.experts;
  v.rows = Kd;
  v.cols = N;
  v.param = static_cast<uint32_t>(p.param);
  if (p.dtype == payloads::kQ8RowBlock) {
    const int64_t shape[] = {p.experts, Kd, N};
    v.q8 = {reinterpret_cast<const int8_t*>(p.bytes.data()),
            reinterpret_cast<const uint16_t*>(p.bytes.data() + format::q8_scales_offset(shape)),
            p.experts,
            Kd,
            N,
            static_cast<uint32_t>(p.param)};
  } else {
    v.data = p.bytes.data();
    v.matrix_bytes = p.bytes.size() / static_cast<uint64_t>(p.experts);
  }
  for (int64_t m = 0; m < M; ++m) {
    float* yr = y.data() + m * ldy;
    const int32_t e = expert[static_cast<size_t>(m)];
    if (e < 0) {
      std::fill(yr, yr + N, 0.0f);
      continue;
    }
    const format::WeightView w = v.expert(e);
    const float* xr = x.data() + m / div * ldx;
    Status s;
    switch (p.dtype) {
      case payloads::kQ8RowBlock: {
        const int64_t sr = format::ModelConfig::split_sum_rows(Kd);
        s = fp32 ? matmul_q8_f32(xr, 1, Kd, Kd, w.q8.codes, w.q8.scales, N, p.param, yr, N, nullptr, sr)
                 : matmul_q8(xr, 1, Kd, Kd, w.q8.codes, w.q8.scales, N, p.param, yr, N, nullptr, sr);
        break;
      }
      case payloads::kQ4Group: {
        const int64_t sr = format::ModelConfig::chunked_sum_rows(Kd, p.param);
        s = fp32 ? matmul_q4_f32(xr, 1, Kd, Kd, w.data, p.param, N, yr, N, nullptr, sr)
                 : matmul_q4(xr, 1, Kd, Kd, w.data, p.param, N, yr, N, nullptr, sr);
        break;
      }
      case payloads::kF8Column: {
        const int64_t sr = format::ModelConfig::chunked_sum_rows(Kd, 32);
        s = fp32 ? matmul_f8_f32(xr, 1, Kd, Kd, w.data, N, yr, N, nullptr, sr)
                 : matmul_f8(xr, 1, Kd, Kd, w.data, N, yr, N, nullptr, sr);
        break;
      }
      default: {
        const int64_t sr = format::ModelConfig::split_sum_rows(Kd);
        const auto* wb = reinterpret_cast<const uint16_t*>(w.data);
        s = fp32 ? matmul_bf16_f32(xr, 1, Kd, Kd, wb, N, yr, N, nullptr, sr)
                 : matmul_bf16(xr, 1, Kd, Kd, wb, N, yr, N, nullptr, sr);
      }
    }
    EXPECT_TRUE(s.ok());
  }
  return y;
}

struct Scheme {
  int32_t dtype;
  int64_t param, K;
};
const Scheme kSchemes[] = {
    {payloads::kQ8RowBlock, 3, 96}, {payloads::kQ8RowBlock, 8, 768}, {payloads::kQ4Group, 32, 96},
    {payloads::kQ4Group, 64, 192},  {payloads::kQ4Group, 128, 1024}, {payloads::kF8Column, 0, 96},
    {payloads::kF8Column, 0, 512},  {payloads::kBF16, 0, 96},        {payloads::kBF16, 0, 6144}};

TEST(HostOps, MatmulEqualsTheKernelsForEverySchemeAndBothXKinds) {
  Rng rng(3);
  for (const Scheme& sc : kSchemes) {
    for (bool fp32 : {false, true}) {
      for (int64_t M : {1, 3, 17, 33}) {
        const int64_t N = 40, ldx = sc.K + 3, ldy = N + 5;
        const WeightPayload p = payloads::random_weight(sc.dtype, 1, sc.K, N, sc.param, rng);
        std::vector<float> x(static_cast<size_t>(M * ldx));
        for (auto& v : x) v = fp32 ? rng.f32(-3.0f, 3.0f) : rng.bf16_value(-6, 4);
        const auto want = expected_rows(p, std::vector<int32_t>(static_cast<size_t>(M), 0), 1, x, ldx, fp32, ldy);
        for (GrokitStream s : streams()) {
          std::vector<uint8_t> bytes = p.bytes;
          GrokitWeight w = p.desc(bytes.data());
          EXPECT_EQ(ops().prepare_scratch_bytes(&w), 0u);
          ASSERT_EQ(ops().prepare_weight(&w, nullptr, s), GROKIT_OK) << ops().error_message();
          EXPECT_EQ(w.layout, 0);
          EXPECT_EQ(bytes, p.bytes) << "prepare_weight changed the payload";
          std::vector<float> got = poison(want.size());
          ASSERT_EQ(ops().matmul(&w, x.data(), M, ldx, fp32, nullptr, got.data(), ldy, s), GROKIT_OK)
              << ops().error_message();
          const std::string what = std::string(payloads::dtype_name(sc.dtype)) + " K " + std::to_string(sc.K) + " M " +
                                   std::to_string(M) + (fp32 ? " fp32" : " bf16");
          expect_same_bits(want, got, what);
          // GROKIT_MATMUL_ROUND_BF16: each row's N sums rounded, the padding untouched.
          std::vector<float> rounded = want, got_rounded = poison(want.size());
          for (int64_t m = 0; m < M; ++m) round_to_bf16(rounded.data() + m * ldy, N, rounded.data() + m * ldy);
          const int32_t flags = (fp32 ? GROKIT_MATMUL_X_FP32 : 0) | GROKIT_MATMUL_ROUND_BF16;
          ASSERT_EQ(ops().matmul(&w, x.data(), M, ldx, flags, nullptr, got_rounded.data(), ldy, s), GROKIT_OK);
          expect_same_bits(rounded, got_rounded, what + " rounded");
          // GROKIT_MATMUL_GELU_MUL: y = gelu(y) * bf16(sums), y holding the gate's values.
          std::vector<float> gate = poison(want.size()), want_gelu = poison(want.size());
          for (int64_t m = 0; m < M; ++m)
            for (int64_t n = 0; n < N; ++n) gate[static_cast<size_t>(m * ldy + n)] = rng.bf16_value(-4, 2);
          want_gelu = gate;
          for (int64_t m = 0; m < M; ++m)
            ASSERT_TRUE(gelu_mul(want_gelu.data() + m * ldy, rounded.data() + m * ldy, N, want_gelu.data() + m * ldy, nullptr).ok());
          std::vector<float> got_gelu = gate;
          const int32_t gflags = (fp32 ? GROKIT_MATMUL_X_FP32 : 0) | GROKIT_MATMUL_GELU_MUL;
          ASSERT_EQ(ops().matmul(&w, x.data(), M, ldx, gflags, nullptr, got_gelu.data(), ldy, s), GROKIT_OK);
          expect_same_bits(want_gelu, got_gelu, what + " gelu");
        }
      }
    }
  }
}

TEST(HostOps, MatmulMultiIsMatmulOnEach) {
  Rng rng(17);
  const int64_t K = 64, M = 3, ldx = K + 1;
  std::vector<float> x(static_cast<size_t>(M * ldx));
  for (auto& v : x) v = rng.bf16_value(-6, 4);
  const WeightPayload a = payloads::random_weight(payloads::kQ8RowBlock, 1, K, 40, 1, rng);
  const WeightPayload b = payloads::random_weight(payloads::kQ8RowBlock, 1, K, 8, 1, rng);
  const WeightPayload c = payloads::random_weight(payloads::kBF16, 1, K, 8, 0, rng);
  std::vector<uint8_t> ab = a.bytes, bb = b.bytes, cb = c.bytes;
  const GrokitWeight wa = a.desc(ab.data()), wb = b.desc(bb.data()), wc = c.desc(cb.data());
  const GrokitWeight* w[] = {&wa, &wb, &wc};
  const int64_t ldy[] = {41, 8, 9};
  for (GrokitStream s : streams()) {
    std::vector<std::vector<float>> want, got;
    for (int i = 0; i < 3; ++i) {
      want.push_back(poison(static_cast<size_t>(M * ldy[i])));
      got.push_back(poison(static_cast<size_t>(M * ldy[i])));
      ASSERT_EQ(ops().matmul(w[i], x.data(), M, ldx, GROKIT_MATMUL_ROUND_BF16, nullptr, want.back().data(), ldy[i], s), GROKIT_OK);
    }
    float* y[] = {got[0].data(), got[1].data(), got[2].data()};
    ASSERT_EQ(ops().matmul_multi(w, 3, x.data(), M, ldx, GROKIT_MATMUL_ROUND_BF16, y, ldy, s), GROKIT_OK) << ops().error_message();
    for (int i = 0; i < 3; ++i) expect_same_bits(want[static_cast<size_t>(i)], got[static_cast<size_t>(i)], "matmul_multi " + std::to_string(i));
    EXPECT_EQ(ops().matmul_multi(w, 5, x.data(), M, ldx, 0, y, ldy, s), GROKIT_ERR_INVALID);
    EXPECT_NE(std::string(ops().error_message()).find("count = 5"), std::string::npos) << ops().error_message();
  }
}

TEST(HostOps, MatmulRoutesRowsToExpertsStablyAndSkipsNegativeOnes) {
  Rng rng(4);
  for (const Scheme& sc : kSchemes) {
    if (sc.K > 1024) continue;
    const int64_t E = 5, N = 40, ldy = N + 2;
    const WeightPayload p = payloads::random_weight(sc.dtype, E, sc.K, N, sc.param, rng);
    // Top-2 rows of 23 tokens (x_row_div 2), expert 3 unused, every 5th row skipped;
    // then the down projection's own rows (div 1, fp32 x).
    for (int64_t div : {2, 1}) {
      const bool fp32 = div == 1;
      const int64_t M = 46, ldx = sc.K + 1;
      std::vector<int32_t> expert(static_cast<size_t>(M));
      for (auto& e : expert) {
        do e = static_cast<int32_t>(rng.range(0, E - 1));
        while (e == 3);
      }
      for (int64_t m = 2; m < M; m += 5) expert[static_cast<size_t>(m)] = -1;
      expert[0] = 4;  // rows out of expert order
      expert[1] = 0;
      std::vector<float> x(static_cast<size_t>((M + div - 1) / div * ldx));
      for (auto& v : x) v = fp32 ? rng.f32(-3.0f, 3.0f) : rng.bf16_value(-6, 4);
      const auto want = expected_rows(p, expert, div, x, ldx, fp32, ldy);
      for (GrokitStream s : streams()) {
        GrokitWeight w = p.desc(const_cast<uint8_t*>(p.bytes.data()));
        const GrokitRouting r{expert.data(), div};
        std::vector<float> got = poison(want.size());
        ASSERT_EQ(ops().matmul(&w, x.data(), M, ldx, fp32, &r, got.data(), ldy, s), GROKIT_OK) << ops().error_message();
        expect_same_bits(want, got,
                         std::string(payloads::dtype_name(sc.dtype)) + " routed, div " + std::to_string(div));
      }
    }
  }
}

TEST(HostOps, MatmulWithAllRowsSkippedWritesZeros) {
  Rng rng(5);
  const WeightPayload p = payloads::random_weight(payloads::kQ8RowBlock, 2, 64, 8, 2, rng);
  GrokitWeight w = p.desc(const_cast<uint8_t*>(p.bytes.data()));
  std::vector<int32_t> expert = {-1, -1, -3};
  const GrokitRouting r{expert.data(), 1};
  std::vector<float> x(3 * 64, 1.0f), y = poison(3 * 8);
  ASSERT_EQ(ops().matmul(&w, x.data(), 3, 64, 0, &r, y.data(), 8, nullptr), GROKIT_OK);
  expect_same_bits(std::vector<float>(3 * 8, 0.0f), y, "skipped rows");
}

// Caches of three sequences.
struct Caches {
  int64_t KV, dh;
  std::vector<int64_t> caps;
  std::vector<std::vector<uint16_t>> k, v;
  std::vector<std::vector<uint8_t>> valid;
  Caches(Rng& rng, int64_t KV, int64_t dh, std::vector<int64_t> caps) : KV(KV), dh(dh), caps(caps) {
    for (int64_t cap : caps) {
      std::vector<uint16_t> kc(static_cast<size_t>(KV * cap * dh)), vc(kc.size());
      for (auto& b : kc) b = rng.bf16_bits(-4, 1);
      for (auto& b : vc) b = rng.bf16_bits(-6, 2);
      std::vector<uint8_t> val(static_cast<size_t>(cap));
      for (auto& b : val) b = rng.range(0, 4) == 0 ? 0 : 1;
      k.push_back(kc);
      v.push_back(vc);
      valid.push_back(val);
    }
  }
  GrokitAttnRow row(size_t s, int64_t n_keys, int32_t pos, int32_t token) {
    return {k[s].data(), v[s].data(), valid[s].data(), caps[s], n_keys, pos, token};
  }
};

TEST(HostOps, KvStoreWritesBf16AtEachRowsPositionAndValidity) {
  Rng rng(6);
  const int64_t KV = 2, dh = 40, M = 4;
  Caches c(rng, KV, dh, {8, 40, 300});
  Caches want = c;
  const struct {
    size_t seq;
    int32_t pos, token;
  } spec[] = {{0, 7, 5}, {1, 12, 0}, {1, 13, 9}, {2, 299, 1}};
  std::vector<float> k(static_cast<size_t>(M * KV * dh)), v(k.size());
  for (auto& x : k) x = rng.f32(-5.0f, 5.0f);  // not bf16 values: stored rounded
  for (auto& x : v) x = rng.f32(-5.0f, 5.0f);
  std::vector<GrokitAttnRow> rows;
  for (int64_t m = 0; m < M; ++m) {
    const auto& sp = spec[m];
    rows.push_back(c.row(sp.seq, sp.pos + 1, sp.pos, sp.token));
    for (int64_t h = 0; h < KV; ++h)
      for (int64_t d = 0; d < dh; ++d) {
        const size_t at = static_cast<size_t>((h * c.caps[sp.seq] + sp.pos) * dh + d);
        want.k[sp.seq][at] = f32_to_bf16_bits(k[static_cast<size_t>((m * KV + h) * dh + d)]);
        want.v[sp.seq][at] = f32_to_bf16_bits(v[static_cast<size_t>((m * KV + h) * dh + d)]);
      }
    want.valid[sp.seq][static_cast<size_t>(sp.pos)] = sp.token > 0 ? 1 : 0;
  }
  const GrokitAttnShape shape{4, KV, dh, 1.0f, 30.0f};
  ASSERT_EQ(ops().kv_store(k.data(), v.data(), M, rows.data(), &shape, nullptr), GROKIT_OK) << ops().error_message();
  for (size_t s = 0; s < 3; ++s) {
    EXPECT_EQ(c.k[s], want.k[s]) << "k cache " << s;
    EXPECT_EQ(c.v[s], want.v[s]) << "v cache " << s;
    EXPECT_EQ(c.valid[s], want.valid[s]) << "valid " << s;
  }
}

// rope_store is rope(q), rope(k), kv_store(k, v); a bad row is refused before q, k or
// any cache changes.
TEST(HostOps, RopeStoreIsRopeRopeAndKvStore) {
  Rng rng(16);
  const int64_t KV = 2, dh = 40, M = 3, Hq = 6;
  Caches c(rng, KV, dh, {8, 40});
  Caches want = c;
  std::vector<GrokitAttnRow> rows{c.row(0, 8, 7, 5), c.row(1, 13, 12, 0), c.row(1, 14, 13, 9)};
  std::vector<GrokitAttnRow> want_rows{want.row(0, 8, 7, 5), want.row(1, 13, 12, 0), want.row(1, 14, 13, 9)};
  const std::vector<int32_t> pos{7, 12, 13};
  auto q = bf16_values(rng, static_cast<size_t>(M * Hq * dh), -6, 3), k = bf16_values(rng, static_cast<size_t>(M * KV * dh), -6, 3);
  auto v = bf16_values(rng, k.size(), -6, 3);
  const GrokitAttnShape shape{Hq, KV, dh, 1.0f, 30.0f};
  std::vector<float> wq = q, wk = k;
  ASSERT_EQ(ops().rope(wq.data(), M, Hq, dh, pos.data(), 10000.0, nullptr), GROKIT_OK);
  ASSERT_EQ(ops().rope(wk.data(), M, KV, dh, pos.data(), 10000.0, nullptr), GROKIT_OK);
  ASSERT_EQ(ops().kv_store(wk.data(), v.data(), M, want_rows.data(), &shape, nullptr), GROKIT_OK);
  for (GrokitStream s : streams()) {
    Caches got = c;
    std::vector<GrokitAttnRow> got_rows{got.row(0, 8, 7, 5), got.row(1, 13, 12, 0), got.row(1, 14, 13, 9)};
    std::vector<float> gq = q, gk = k;
    ASSERT_EQ(ops().rope_store(gq.data(), gk.data(), v.data(), M, pos.data(), got_rows.data(), &shape, 10000.0, s), GROKIT_OK)
        << ops().error_message();
    expect_same_bits(wq, gq, "rope_store q");
    expect_same_bits(wk, gk, "rope_store k");
    for (size_t i = 0; i < 2; ++i) {
      EXPECT_EQ(got.k[i], want.k[i]) << "k cache " << i;
      EXPECT_EQ(got.v[i], want.v[i]) << "v cache " << i;
      EXPECT_EQ(got.valid[i], want.valid[i]) << "valid " << i;
    }
    // A row past its cache: refused, nothing changed.
    got_rows[2].pos = 40;
    std::vector<float> bq = q, bk = k;
    const Caches before = got;
    EXPECT_EQ(ops().rope_store(bq.data(), bk.data(), v.data(), M, pos.data(), got_rows.data(), &shape, 10000.0, s),
              GROKIT_ERR_INVALID);
    EXPECT_NE(std::string(ops().error_message()).find("row 2: position 40"), std::string::npos) << ops().error_message();
    expect_same_bits(q, bq, "rope_store q after a refusal");
    expect_same_bits(k, bk, "rope_store k after a refusal");
    EXPECT_EQ(got.k[1], before.k[1]);
  }
}

TEST(HostOps, AttentionEqualsTheKernelRowByRow) {
  Rng rng(7);
  const int64_t Hq = 8, KV = 2, dh = 128, QD = Hq * dh;
  Caches c(rng, KV, dh, {8, 64, 320});
  for (int j = 0; j < 3; ++j) c.valid[1][static_cast<size_t>(j)] = 0;  // left padding
  // Decode rows of different sequences, then prefill rows of one (grouped in one call),
  // a row whose visible keys are all padding.
  std::vector<GrokitAttnRow> rows = {c.row(0, 1, 0, 1), c.row(2, 300, 299, 1), c.row(1, 3, 2, 1)};
  for (int32_t p = 40; p < 60; ++p) rows.push_back(c.row(1, 60, p, 1));
  rows.push_back(c.row(2, 129, 128, 1));
  const auto M = static_cast<int64_t>(rows.size());
  auto q = bf16_values(rng, static_cast<size_t>(M * QD), -4, 2);
  const GrokitAttnShape shape{Hq, KV, dh, 0.08838834764831845f, 30.0f};
  std::vector<float> want(static_cast<size_t>(M * QD));
  for (int64_t m = 0; m < M; ++m) {
    const GrokitAttnRow& r = rows[static_cast<size_t>(m)];
    const AttentionShape sh{Hq, KV, dh, r.cap, shape.multiplier, shape.logit_cap};
    ASSERT_TRUE(
        attention(q.data() + m * QD, 1, &r.pos, r.k, r.v, r.valid, r.n_keys, sh, want.data() + m * QD, nullptr).ok());
  }
  for (GrokitStream s : streams()) {
    std::vector<float> got = poison(want.size());
    ASSERT_EQ(ops().attention(q.data(), M, rows.data(), 320, &shape, got.data(), s), GROKIT_OK)
        << ops().error_message();
    expect_same_bits(want, got, "attention");
  }
}

TEST(HostOps, MoeCombineIsTheEnginesLoopAlsoInPlace) {
  Rng rng(8);
  for (int64_t k : {1, 2, 3}) {
    const int64_t M = 9, D = 70;
    std::vector<float> y(static_cast<size_t>(M * k * D)), gates(static_cast<size_t>(M * k));
    for (auto& v : y) v = rng.f32(-2.0f, 2.0f) * std::ldexp(1.0f, static_cast<int>(rng.range(-8, 8)));
    for (auto& g : gates) g = rng.f32(0.0f, 1.0f);
    for (int64_t t = 1; t < M && k > 1; t += 2)  // the last choice nearly cancels: a fused multiply-add shows
      for (int64_t d = 0; d < D; ++d) {
        float acc = 0.0f;
        for (int64_t c = 0; c + 1 < k; ++c) {
          volatile float prod =
              round_bf16(gates[static_cast<size_t>(t * k + c)]) * y[static_cast<size_t>((t * k + c) * D + d)];
          acc = acc + prod;
        }
        y[static_cast<size_t>((t * k + k - 1) * D + d)] =
            -acc / round_bf16(gates[static_cast<size_t>(t * k + k - 1)]) * (1.0f + rng.f32(-1.0f, 1.0f) * 0x1p-14f);
      }
    std::vector<float> want(static_cast<size_t>(M * D));
    for (int64_t t = 0; t < M; ++t) {  // runner/engine.cpp's combine
      float* acc = want.data() + t * D;
      std::fill(acc, acc + D, 0.0f);
      for (int64_t c = 0; c < k; ++c) {
        float gb = round_bf16(gates[static_cast<size_t>(t * k + c)]);
        const float* yr = y.data() + (t * k + c) * D;
        for (int64_t d = 0; d < D; ++d) acc[d] = acc[d] + gb * yr[d];
      }
    }
    round_to_bf16(want.data(), M * D, want.data());
    for (GrokitStream s : streams()) {
      std::vector<float> got = poison(want.size());
      ASSERT_EQ(ops().moe_combine(y.data(), gates.data(), M, k, D, got.data(), s), GROKIT_OK);
      expect_same_bits(want, got, "moe_combine k " + std::to_string(k));
      std::vector<float> yy = y;  // out = y
      ASSERT_EQ(ops().moe_combine(yy.data(), gates.data(), M, k, D, yy.data(), s), GROKIT_OK);
      expect_same_bits(want, std::vector<float>(yy.begin(), yy.begin() + M * D),
                       "moe_combine in place, k " + std::to_string(k));
    }
  }
}

TEST(HostOps, LogitsAreTheNtProductRoundedTwice) {
  Rng rng(9);
  const int64_t M = 5, D = 96, N = 41, ldy = 45;
  auto x = bf16_values(rng, static_cast<size_t>(M * D), -6, 2);
  std::vector<uint16_t> table(static_cast<size_t>(N * D));
  for (auto& v : table) v = rng.bf16_bits(-8, 0);
  const float mult = round_bf16(0.5773502691896257f);
  std::vector<float> want = poison(static_cast<size_t>(M * ldy));
  ASSERT_TRUE(matmul_bf16_nt(x.data(), M, D, table.data(), N, want.data(), ldy, nullptr).ok());
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {
      float& v = want[static_cast<size_t>(m * ldy + n)];
      v = round_bf16(round_bf16(v) * mult);
    }
  for (GrokitStream s : streams()) {
    std::vector<float> got = poison(want.size());
    ASSERT_EQ(ops().logits(x.data(), M, D, table.data(), N, mult, got.data(), ldy, s), GROKIT_OK);
    expect_same_bits(want, got, "logits");
  }
}

TEST(HostOps, SumArraysIsTheTreeSumAlsoIntoAPart) {
  Rng rng(10);
  for (int count = 1; count <= 8; ++count) {
    for (int64_t n : {int64_t{1}, int64_t{70001}}) {
      std::vector<std::vector<float>> parts(static_cast<size_t>(count));
      for (auto& p : parts) {
        p.resize(static_cast<size_t>(n));
        for (auto& v : p) v = rng.f32(-1.0f, 1.0f) * std::ldexp(1.0f, static_cast<int>(rng.range(-12, 12)));
      }
      std::vector<float> want(static_cast<size_t>(n)), tmp(static_cast<size_t>(count));
      for (int64_t i = 0; i < n; ++i) {
        for (int c = 0; c < count; ++c)
          tmp[static_cast<size_t>(c)] = parts[static_cast<size_t>(c)][static_cast<size_t>(i)];
        want[static_cast<size_t>(i)] = tree_sum(tmp.data(), count);
      }
      for (GrokitStream s : streams()) {
        std::vector<const float*> ptrs;
        for (auto& p : parts) ptrs.push_back(p.data());
        std::vector<float> got = poison(want.size());
        ASSERT_EQ(ops().sum_arrays(ptrs.data(), count, n, got.data(), s), GROKIT_OK);
        expect_same_bits(want, got, "sum_arrays " + std::to_string(count));
      }
      std::vector<float> last = parts.back();  // out = the last part
      std::vector<const float*> ptrs;
      for (size_t c = 0; c + 1 < parts.size(); ++c) ptrs.push_back(parts[c].data());
      ptrs.push_back(last.data());
      ASSERT_EQ(ops().sum_arrays(ptrs.data(), count, n, last.data(), nullptr), GROKIT_OK);
      expect_same_bits(want, last, "sum_arrays into a part");
    }
  }
}

TEST(HostOps, ZeroRowsAreANoOpEvenWithNullPointers) {
  const GrokitAttnShape shape{4, 2, 16, 1.0f, 30.0f};
  EXPECT_EQ(ops().embed(nullptr, 0, nullptr, 0, 4, 8, 1.0f, nullptr, nullptr), GROKIT_OK);
  EXPECT_EQ(ops().rmsnorm(nullptr, 0, 8, nullptr, 1e-5f, nullptr, nullptr), GROKIT_OK);
  EXPECT_EQ(ops().rope(nullptr, 0, 2, 16, nullptr, 1e4, nullptr), GROKIT_OK);
  EXPECT_EQ(ops().kv_store(nullptr, nullptr, 0, nullptr, &shape, nullptr), GROKIT_OK);
  EXPECT_EQ(ops().attention(nullptr, 0, nullptr, 0, &shape, nullptr, nullptr), GROKIT_OK);
  EXPECT_EQ(ops().router_topk(nullptr, 0, 8, nullptr, 4, 2, nullptr, nullptr, nullptr), GROKIT_OK);
  EXPECT_EQ(ops().gelu_mul(nullptr, nullptr, 0, nullptr, nullptr), GROKIT_OK);
  EXPECT_EQ(ops().round_bf16(nullptr, 0, nullptr, nullptr), GROKIT_OK);
  EXPECT_EQ(ops().add_bf16(nullptr, nullptr, 0, nullptr, nullptr), GROKIT_OK);
  EXPECT_EQ(ops().moe_combine(nullptr, nullptr, 0, 2, 8, nullptr, nullptr), GROKIT_OK);
  EXPECT_EQ(ops().logits(nullptr, 0, 8, nullptr, 4, 1.0f, nullptr, 4, nullptr), GROKIT_OK);
  EXPECT_EQ(ops().sum_arrays(nullptr, 2, 0, nullptr, nullptr), GROKIT_OK);
  std::vector<uint8_t> data(64 * 8 * 2);
  GrokitWeight w{payloads::kBF16, 0, 0, 0, 1, 64, 8, 64 * 8 * 2, data.data()};
  EXPECT_EQ(ops().matmul(&w, nullptr, 0, 64, 0, nullptr, nullptr, 8, nullptr), GROKIT_OK);
}

// ---------------------------------------------------------------------------------
// Invalid arguments.

struct BadCall {
  const char* name;
  std::function<int()> call;
  std::vector<std::string> says;  // in the message
};

TEST(HostOps, InvalidArgumentsAreErrorsThatNameTheOpAndTheValue) {
  static std::vector<uint8_t> bytes(1 << 16);
  static std::vector<float> f(1 << 14, 1.0f);
  static std::vector<int32_t> ids(64, 0);
  static std::vector<uint16_t> cache(1 << 14);
  static std::vector<uint8_t> valid(256, 1);
  auto weight = [](int32_t dtype, int32_t param, int64_t E, int64_t Kd, int64_t N) {
    GrokitWeight w{dtype, param, 0, 0, E, Kd, N, 0, bytes.data()};
    w.matrix_bytes = dtype == payloads::kQ8RowBlock ? static_cast<uint64_t>(Kd * N)
                     : dtype == payloads::kQ4Group
                         ? static_cast<uint64_t>(Kd / param * (16 * (param / 32) * N + (2 * N + 15) / 16 * 16))
                     : dtype == payloads::kF8Column ? static_cast<uint64_t>(Kd * N + (2 * N + 15) / 16 * 16)
                                                    : static_cast<uint64_t>(2 * Kd * N);
    return w;
  };
  auto mm = [](GrokitWeight w, int64_t M = 2, int64_t ldx = 64, int64_t ldy = 8, const GrokitRouting* r = nullptr) {
    return [=] { return ops().matmul(&w, f.data(), M, ldx, 0, r, f.data() + 4096, ldy, nullptr); };
  };
  auto with = [&](GrokitWeight w, const std::function<void(GrokitWeight&)>& edit) {
    edit(w);
    return w;
  };
  const GrokitWeight bf = weight(payloads::kBF16, 0, 1, 64, 8);
  static const int32_t far_expert[2] = {0, 3};
  static const GrokitRouting far{far_expert, 1}, div0{far_expert, 0};
  const GrokitAttnShape shape{4, 2, 16, 1.0f, 30.0f}, ungrouped{6, 4, 16, 1.0f, 30.0f};
  auto row = [](int64_t cap, int64_t n_keys, int32_t pos) {
    return GrokitAttnRow{cache.data(), cache.data() + 4096, valid.data(), cap, n_keys, pos, 1};
  };
  static GrokitAttnRow r_keys_over_cap, r_keys_over_max, r_pos_past_cap, r_null;
  r_keys_over_cap = row(16, 17, 3);
  r_keys_over_max = row(64, 40, 3);
  r_pos_past_cap = row(16, 4, 16);
  r_null = row(16, 4, 3);
  r_null.v = nullptr;
  const BadCall calls[] = {
      {"matmul dtype", mm(with(bf, [](GrokitWeight& w) { w.dtype = 7; })), {"matmul", "dtype 7"}},
      {"matmul flags", [&] { GrokitWeight w = bf; return ops().matmul(&w, f.data(), 2, 64, 9, nullptr, f.data() + 4096, 8, nullptr); },
       {"matmul", "flags = 9"}},
      {"matmul layout", mm(with(bf, [](GrokitWeight& w) { w.layout = 2; })), {"matmul", "layout 2"}},
      {"matmul matrix_bytes", mm(with(bf, [](GrokitWeight& w) { w.matrix_bytes = 100; })), {"matmul", "matrix_bytes 100", "1024"}},
      {"matmul q8 matrix_bytes", mm(with(weight(payloads::kQ8RowBlock, 2, 3, 64, 8), [](GrokitWeight& w) { w.matrix_bytes = 0; }), 2, 64, 8, &far),
       {"matmul", "matrix_bytes 0", "512"}},
      {"matmul null data", mm(with(bf, [](GrokitWeight& w) { w.data = nullptr; })), {"matmul", "data is NULL"}},
      {"matmul zero rows", mm(with(bf, [](GrokitWeight& w) { w.rows = 0; })), {"matmul", "0 x 8"}},
      {"matmul q8 blocks", mm(weight(payloads::kQ8RowBlock, 5, 1, 64, 8)), {"matmul", "5 scale blocks"}},
      {"matmul q8 no blocks", mm(weight(payloads::kQ8RowBlock, 0, 1, 64, 8)), {"matmul", "0 scale blocks"}},
      {"matmul q4 group", mm(with(weight(payloads::kQ4Group, 32, 1, 64, 8), [](GrokitWeight& w) { w.param = 48; })), {"matmul", "group 48"}},
      {"matmul q4 rows", mm(weight(payloads::kQ4Group, 64, 1, 96, 8), 2, 96), {"matmul", "96 rows", "group 64"}},
      {"matmul f8 rows", mm(with(weight(payloads::kF8Column, 0, 1, 64, 8), [](GrokitWeight& w) { w.rows = 48; }), 2, 48), {"matmul", "48 rows"}},
      {"matmul ldx", mm(bf, 2, 63), {"matmul", "ldx 63"}},
      {"matmul ldy", mm(bf, 2, 64, 7), {"matmul", "ldy 7"}},
      {"matmul M", mm(bf, -4), {"matmul", "M = -4"}},
      {"matmul experts unrouted", mm(weight(payloads::kBF16, 0, 3, 64, 8)), {"matmul", "3 experts", "routing"}},
      {"matmul expert out of range", mm(weight(payloads::kBF16, 0, 3, 64, 8), 2, 64, 8, &far), {"matmul", "row 1", "expert 3 of 3"}},
      {"matmul div 0", mm(weight(payloads::kBF16, 0, 3, 64, 8), 2, 64, 8, &div0), {"matmul", "x_row_div 0"}},
      {"prepare_weight dtype", [&] { GrokitWeight w = with(bf, [](GrokitWeight& x) { x.dtype = 2; }); return ops().prepare_weight(&w, nullptr, nullptr); },
       {"prepare_weight", "dtype 2"}},
      {"embed D", [] { return ops().embed(ids.data(), 2, cache.data(), 0, 4, 0, 1.0f, f.data(), nullptr); }, {"embed", "D = 0"}},
      {"embed null", [] { return ops().embed(ids.data(), 2, cache.data(), 0, 4, 8, 1.0f, nullptr, nullptr); }, {"embed", "out is NULL"}},
      {"rmsnorm D", [] { return ops().rmsnorm(f.data(), 2, -1, f.data(), 1e-5f, f.data(), nullptr); }, {"rmsnorm", "D = -1"}},
      {"rope odd dh", [] { return ops().rope(f.data(), 2, 2, 15, ids.data(), 1e4, nullptr); }, {"rope", "dh = 15"}},
      {"kv_store shape", [&] { auto r = row(16, 4, 3); return ops().kv_store(f.data(), f.data(), 1, &r, &ungrouped, nullptr); },
       {"kv_store", "q_heads 6", "kv_heads 4"}},
      {"kv_store position", [&] { return ops().kv_store(f.data(), f.data(), 1, &r_pos_past_cap, &shape, nullptr); },
       {"kv_store", "row 0", "position 16"}},
      {"kv_store null cache", [&] { return ops().kv_store(f.data(), f.data(), 1, &r_null, &shape, nullptr); }, {"kv_store", "NULL"}},
      {"attention keys over cap", [&] { return ops().attention(f.data(), 1, &r_keys_over_cap, 64, &shape, f.data() + 4096, nullptr); },
       {"attention", "n_keys 17", "cap 16"}},
      {"attention keys over max", [&] { return ops().attention(f.data(), 1, &r_keys_over_max, 32, &shape, f.data() + 4096, nullptr); },
       {"attention", "n_keys 40", "max_keys 32"}},
      {"attention null shape", [&] { return ops().attention(f.data(), 1, &r_keys_over_max, 64, nullptr, f.data() + 4096, nullptr); },
       {"attention", "shape is NULL"}},
      {"router k", [] { return ops().router_topk(f.data(), 2, 8, f.data(), 4, 5, ids.data(), f.data(), nullptr); }, {"router_topk", "k = 5"}},
      {"router E", [] { return ops().router_topk(f.data(), 2, 8, f.data(), 0, 1, ids.data(), f.data(), nullptr); }, {"router_topk", "E = 0"}},
      {"gelu_mul n", [] { return ops().gelu_mul(f.data(), f.data(), -1, f.data(), nullptr); }, {"gelu_mul", "n = -1"}},
      {"round_bf16 null", [] { return ops().round_bf16(nullptr, 4, f.data(), nullptr); }, {"round_bf16", "x is NULL"}},
      {"add_bf16 n", [] { return ops().add_bf16(f.data(), f.data(), -2, f.data(), nullptr); }, {"add_bf16", "n = -2"}},
      {"residual_norm D", [] { return ops().residual_norm(f.data(), nullptr, 0, 0, 2, 0, f.data(), 1e-5f, f.data(), nullptr, nullptr, nullptr); },
       {"residual_norm", "D = 0"}},
      {"residual_norm a", [] { return ops().residual_norm(f.data(), nullptr, 0, 1, 2, 8, f.data(), 1e-5f, f.data() + 64, f.data(), nullptr, nullptr); },
       {"residual_norm", "NULL"}},
      {"residual_norm overlap", [] { return ops().residual_norm(f.data(), nullptr, 0, 1, 2, 8, f.data(), 1e-5f, f.data() + 64, f.data(), f.data() + 72, nullptr); },
       {"residual_norm", "a overlaps y or x"}},
      {"moe_combine k", [] { return ops().moe_combine(f.data(), f.data(), 2, 0, 8, f.data(), nullptr); }, {"moe_combine", "k = 0"}},
      {"logits ldy", [] { return ops().logits(f.data(), 2, 8, cache.data(), 16, 1.0f, f.data(), 15, nullptr); }, {"logits", "ldy = 15"}},
      {"sum_arrays count", [] { const float* p[1] = {f.data()}; return ops().sum_arrays(p, 0, 8, f.data(), nullptr); },
       {"sum_arrays", "count = 0"}},
      {"sum_arrays null part", [] { const float* p[2] = {f.data(), nullptr}; return ops().sum_arrays(p, 2, 8, f.data(), nullptr); },
       {"sum_arrays", "part 1"}},
      {"copy kind", [] { return ops().copy(f.data(), f.data() + 8, 16, 0, nullptr); }, {"copy", "kind 0"}},
      {"copy null", [] { return ops().copy(nullptr, f.data(), 16, GROKIT_COPY_D2H, nullptr); }, {"copy", "dst is NULL"}},
      {"fill null", [] { return ops().fill(nullptr, 0, 16, nullptr); }, {"fill", "dst is NULL"}},
      {"alloc null", [] { return ops().alloc(nullptr, 16); }, {"alloc", "NULL"}},
      {"set_device", [] { return ops().set_device(1); }, {"set_device", "device 1"}},
      {"device_name", [] { return ops().device_name(2, nullptr, 0, nullptr); }, {"device_name", "device 2"}},
      {"device_count", [] { return ops().device_count(nullptr); }, {"device_count", "NULL"}},
      {"event_record", [] { return ops().event_record(nullptr, nullptr); }, {"event_record", "NULL"}},
  };
  for (const BadCall& c : calls) {
    SCOPED_TRACE(c.name);
    EXPECT_EQ(c.call(), GROKIT_ERR_INVALID);
    const std::string msg = ops().error_message();
    for (const auto& s : c.says) EXPECT_NE(msg.find(s), std::string::npos) << "message: " << msg << "\nlacks: " << s;
  }
}

TEST(HostOps, ErrorMessagesArePerThread) {
  ASSERT_EQ(ops().set_device(5), GROKIT_ERR_INVALID);
  std::string other;
  std::thread t([&] {
    ops().rope(nullptr, 1, 1, 3, nullptr, 1e4, nullptr);
    other = ops().error_message();
  });
  t.join();
  EXPECT_NE(std::string(ops().error_message()).find("set_device"), std::string::npos);
  EXPECT_NE(other.find("rope"), std::string::npos);
}

}  // namespace
}  // namespace grokit::kernels
