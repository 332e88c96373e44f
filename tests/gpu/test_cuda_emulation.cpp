// The CUDA weight products' and router's device code (kernels/cuda/matmul_device.cuh,
// router_device.cuh) compiled as plain C++ and run on the host: each block's threads are
// std::threads, __syncthreads a barrier, __shared__ a static, so the decode kernel's
// indexing, split-k, routing, rounding and every plan a benchmark may force (k splits,
// warps across columns, the deep variant), and the router's two shapes, are checked
// against the host twin on a machine without a GPU. The arithmetic
// is the device's (fp32 fma, bf16x2 multiplies from cuda_bf16.h's host versions); the
// summation order is the kernel's, so results are held to the parity harness's matmul
// budget, and the rounded output to the bits of the unrounded one rounded.
#include <vector_types.h>

#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <optional>
#include <string>
#include <thread>
#include <vector>

// What matmul_device.cuh asks of its includer in emulation.
thread_local uint3 threadIdx;
thread_local uint3 blockIdx;
dim3 gridDim;
void gk_emu_sync();
float* gk_emu_smem();
void gk_emu_align(const void* p, int bytes, const char* what);
namespace grokit::kernels::cuda {
inline void raise_device_error(unsigned int* word, unsigned int bit) {
  if (word != nullptr) __atomic_fetch_or(word, bit, __ATOMIC_SEQ_CST);
}
}  // namespace grokit::kernels::cuda

#include "kernels/cuda/matmul_device.cuh"
#include "kernels/cuda/router_device.cuh"
#include "kernels/kernels.h"
#include "kernels/ops.h"
#include "tests/gpu/payloads.h"

#include <gtest/gtest.h>

namespace {

namespace mm = grokit::kernels::cuda::mm;
namespace payloads = grokit::payloads;
using payloads::Rng;
using payloads::WeightPayload;

std::optional<std::barrier<>> g_sync;
std::vector<float> g_smem;

}  // namespace

void gk_emu_sync() { g_sync->arrive_and_wait(); }
float* gk_emu_smem() { return g_smem.data(); }
void gk_emu_align(const void* p, int bytes, const char* what) {
  if (reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(bytes) != 0) {
    std::fprintf(stderr, "emulated kernel: %s of %p is not %d-byte aligned\n", what, p, bytes);
    std::abort();
  }
}

namespace {

// Runs fn as a kernel over `grid`, one block at a time, each with T threads.
// A thread that returns early leaves the block's barrier (as an exited CUDA thread no
// longer counts at __syncthreads). Dynamic shared memory is NaN before each block.
template <class Fn>
void launch(dim3 grid, size_t smem_bytes, const Fn& fn, int T = mm::kThreads) {
  gridDim = grid;
  g_smem.assign(smem_bytes / 4 + 4, std::nanf(""));
  g_sync.emplace(T);
  std::barrier start(T), end(T);
  std::vector<std::thread> threads;
  for (int t = 0; t < T; ++t) {
    threads.emplace_back([&, t] {
      threadIdx = uint3{static_cast<unsigned>(t), 0, 0};
      for (unsigned z = 0; z < grid.z; ++z)
        for (unsigned y = 0; y < grid.y; ++y)
          for (unsigned x = 0; x < grid.x; ++x) {
            start.arrive_and_wait();
            blockIdx = uint3{x, y, z};
            fn();
            g_sync->arrive_and_drop();
            end.arrive_and_wait();
            if (t == 0) {  // nobody touches these until the next start
              g_sync.emplace(T);
              std::fill(g_smem.begin(), g_smem.end(), std::nanf(""));
            }
          }
    });
  }
  for (auto& th : threads) th.join();
}

// The decode kernel (or its multi variant) a plan selects, emulated over `grid`.
void run_decode(int fmt, int kmt, bool deep, dim3 grid, size_t smem, const mm::DecodeParams& p) {
  mm::with_decode_kernel(fmt, kmt, deep, [&](auto f, auto k, auto u) {
    launch(grid, smem, [&] { mm::decode_kernel<decltype(f)::value, decltype(k)::value, decltype(u)::value>(p); });
  });
}
void run_multi(int fmt, int kmt, bool deep, dim3 grid, size_t smem, const mm::DecodeMulti& m) {
  mm::with_decode_kernel(fmt, kmt, deep, [&](auto f, auto k, auto u) {
    launch(grid, smem, [&] { mm::decode_multi_kernel<decltype(f)::value, decltype(k)::value, decltype(u)::value>(m); });
  });
}

// q8rb codes relaid k-chunked (layout 1) by the emulated q8_chunk_kernel, as prepare_weight does.
void chunk_q8(std::vector<uint8_t>& bytes, int64_t E, int64_t K, int64_t N) {
  const uint64_t mbytes = static_cast<uint64_t>(K * N);
  std::vector<uint8_t> scratch(mbytes);
  for (int64_t e = 0; e < E; ++e) {
    uint8_t* ce = bytes.data() + e * mbytes;
    std::memcpy(scratch.data(), ce, mbytes);
    const dim3 grid(static_cast<unsigned>((N + mm::kThreads - 1) / mm::kThreads), static_cast<unsigned>(K / 16), 1);
    launch(grid, 0, [&] { mm::q8_chunk_kernel<>(scratch.data(), K, N, ce); });
  }
}

struct Case {
  int32_t dtype;
  int64_t param, E, K, N, M, x_div;
  bool chunked;  // q8rb in the decode layout (layout 1), relaid by q8_chunk_kernel
};

// What the product stores: its sums, rounded, or the gate's gelu times them rounded.
enum class Out { kSums, kRounded, kGelu };

std::string name_of(const Case& c, const mm::DecodeForce& f, Out out) {
  return std::string(payloads::dtype_name(c.dtype)) + (c.chunked ? " (chunked)" : "") + " E " + std::to_string(c.E) +
         " K " + std::to_string(c.K) + " N " + std::to_string(c.N) + " M " + std::to_string(c.M) + " plan " +
         std::to_string(f.ks) + "," + std::to_string(f.wl) + "," + std::to_string(f.deep) +
         (out == Out::kRounded ? " rounded" : out == Out::kGelu ? " gelu" : "");
}

// The emulated decode product of one case under one forced plan, against the host twin.
void check_case(const Case& c, const mm::DecodeForce& force, Out out, Rng& rng) {
  const bool round = out == Out::kRounded, gelu = out == Out::kGelu;
  const std::string what = name_of(c, force, out);
  SCOPED_TRACE(what);
  WeightPayload w = payloads::random_weight(c.dtype, c.E, c.K, c.N, c.param, rng);
  const int64_t ldx = c.K + 3, ldy = c.N + 2, xrows = (c.M + c.x_div - 1) / c.x_div;
  std::vector<float> x(static_cast<size_t>(xrows * ldx));
  for (auto& v : x) v = rng.bf16_value(-6, 3);
  std::vector<int32_t> expert(static_cast<size_t>(c.M), 0);
  const bool routed = c.E > 1;
  if (routed) {
    for (auto& e : expert) e = static_cast<int32_t>(rng.range(0, c.E - 1));
    if (c.M > 2) expert[1] = -1;  // a row routed to no expert: zeros
  }
  const GrokitRouting routing{expert.data(), c.x_div};

  // The host twin (y first holds the gate's bf16 values when the gelu is asked for).
  std::vector<float> want(static_cast<size_t>(c.M * ldy), -7.0f);
  if (gelu)
    for (int64_t m = 0; m < c.M; ++m)
      for (int64_t n = 0; n < c.N; ++n) want[static_cast<size_t>(m * ldy + n)] = rng.bf16_value(-4, 2);
  const std::vector<float> gate = want;
  {
    std::vector<uint8_t> bytes = w.bytes;
    GrokitWeight hw = w.desc(bytes.data());
    const int32_t flags = round ? GROKIT_MATMUL_ROUND_BF16 : gelu ? GROKIT_MATMUL_GELU_MUL : 0;
    ASSERT_EQ(grokit_host_ops()->matmul(&hw, x.data(), c.M, ldx, flags,
                                        routed ? &routing : nullptr, want.data(), ldy, nullptr),
              GROKIT_OK)
        << grokit_host_ops()->error_message();
  }

  // The device layout, then the plan and the parameters as matmul.cu's run_decode makes them.
  std::vector<uint8_t> bytes = w.bytes;
  GrokitWeight dw = w.desc(bytes.data());
  if (c.chunked) {
    chunk_q8(bytes, c.E, c.K, c.N);
    dw.layout = 1;
  }
  mm::WDesc d;
  char msg[512];
  ASSERT_EQ(mm::describe_weight("emulation", &dw, &d, msg, sizeof msg), GROKIT_OK) << msg;
  const int64_t div = routed ? std::min<int64_t>(c.x_div, c.M) : 1;
  const int64_t per = routed ? (c.M + div - 1) / div : c.M;
  const int64_t active = routed ? std::min<int64_t>(d.E, 2) : 1;
  const int sms = 3;  // a small device: plans with few blocks, and split-k
  const mm::DecodePlan P = mm::plan_decode(d.fmt, d.K, d.N, per, active, sms, mm::kMaxSplits, force);
  const int64_t egrid = routed ? d.E : 1;
  std::vector<float> partial(static_cast<size_t>(P.ks * c.M * c.N), std::nanf(""));
  std::vector<uint32_t> counters(static_cast<size_t>(egrid * P.tiles), 0);
  unsigned int errors[2] = {0, 0};
  std::vector<float> got = gate;
  mm::DecodeParams p = mm::make_decode_params(d, P, x.data(), c.M, ldx, routed ? expert.data() : nullptr, div,
                                              got.data(), ldy, partial.data(), counters.data(), errors);
  p.round_y = round ? 1 : 0;
  p.gelu = gelu ? 1 : 0;
  const dim3 grid(static_cast<unsigned>(P.tiles), static_cast<unsigned>(P.ks), static_cast<unsigned>(egrid));
  const bool deep = force.deep != 0 && P.kmt == 1;
  run_decode(d.fmt, P.kmt, deep, grid, P.smem, p);
  EXPECT_EQ(errors[0], 0u) << "a device error was raised";
  for (uint32_t v : counters) ASSERT_EQ(v, 0u) << "a split-k counter was not reset for the next launch";

  // Budget: 2^-16 of sum_k |x_k w_kn| (the parity harness's), plus one bf16 ulp of the
  // result when rounded. Padding (columns N..ldy) untouched.
  int bad = 0;
  for (int64_t m = 0; m < c.M; ++m) {
    const int32_t e = routed ? expert[static_cast<size_t>(m)] : 0;
    std::vector<float> dq;
    if (e >= 0) dq = payloads::dequantize(w, e);
    const float* xr = x.data() + (m / c.x_div) * ldx;
    for (int64_t n = 0; n < ldy; ++n) {
      const size_t i = static_cast<size_t>(m * ldy + n);
      if (n >= c.N) {
        if (got[i] != -7.0f && bad++ < 5) ADD_FAILURE() << "padding written at row " << m << " column " << n;
        continue;
      }
      double scale = 0;
      for (int64_t k = 0; e >= 0 && k < c.K; ++k) scale += std::fabs(double(xr[k]) * dq[static_cast<size_t>(k * c.N + n)]);
      double allowed = 0x1p-16 * scale;
      if (round) allowed += std::ldexp(1.0, std::max(-126, std::ilogb(std::fabs(double(want[i])) + 1e-30) - 7));
      if (gelu) {  // gelu(g) times the product rounded: its error, and a bf16 step of it
        const double gl = std::fabs(double(grokit::kernels::cuda::gelu_times(gate[i], 1.0f)));
        const double u = std::fabs(double(want[i])) / std::max(gl, 1e-30);
        allowed = gl * (0x1p-16 * scale + std::ldexp(2.0, std::max(-126, std::ilogb(u + 1e-30) - 7))) +
                  0x1p-20 * std::fabs(double(want[i]));
      }
      if (!(std::fabs(double(got[i]) - double(want[i])) <= allowed) && bad++ < 5)
        ADD_FAILURE() << "row " << m << " column " << n << ": got " << got[i] << ", the twin " << want[i] << " (allowed "
                      << allowed << ")";
      if (round && got[i] != grokit::round_bf16(got[i]) && bad++ < 5)
        ADD_FAILURE() << "row " << m << " column " << n << ": " << got[i] << " is not a bf16 value";
    }
  }
  EXPECT_EQ(bad, 0) << P.tiles << " tiles x " << P.ks << " splits x " << egrid << " experts, kmt " << P.kmt
                    << ", warps across 2^" << P.wn_log2 << (deep ? ", deep" : "");
}

const mm::DecodeForce kPlans[] = {{0, -1, 0}, {0, -1, 1}, {1, 3, 0}, {5, 0, 1}, {3, 1, 0}, {32, 2, 0}};

TEST(CudaEmulation, DecodeProductsMatchTheHostTwinUnderEveryPlan) {
  Rng rng(41);
  const Case cases[] = {
      // dtype, param, E, K, N, M, x_div, chunked
      {payloads::kQ8RowBlock, 2, 1, 256, 300, 1, 1, false},
      {payloads::kQ8RowBlock, 2, 1, 256, 300, 1, 1, true},
      {payloads::kQ8RowBlock, 1, 1, 192, 40, 3, 1, true},
      {payloads::kQ4Group, 64, 1, 256, 300, 1, 1, false},
      {payloads::kF8Column, 0, 1, 128, 72, 2, 1, false},
      {payloads::kBF16, 0, 1, 96, 300, 1, 1, false},
      {payloads::kBF16, 0, 1, 64, 37, 5, 1, false},
  };
  for (const Case& c : cases)
    for (const mm::DecodeForce& f : kPlans) check_case(c, f, Out::kSums, rng);
}

TEST(CudaEmulation, RoutedDecodeRoundedAndGeluOutputs) {
  Rng rng(43);
  const Case cases[] = {
      {payloads::kQ8RowBlock, 1, 3, 256, 96, 4, 2, true},  // 2 rows of x, top 2: Grok-1's routed shape
      {payloads::kQ4Group, 32, 3, 128, 40, 4, 2, false},
      {payloads::kBF16, 0, 2, 64, 40, 3, 1, false},
  };
  for (const Case& c : cases)
    for (const mm::DecodeForce& f : kPlans) {
      check_case(c, f, Out::kSums, rng);
      check_case(c, f, Out::kRounded, rng);
      check_case(c, f, Out::kGelu, rng);
    }
  for (const mm::DecodeForce& f : {kPlans[0], kPlans[3]}) {
    check_case({payloads::kQ8RowBlock, 2, 1, 256, 300, 1, 1, true}, f, Out::kRounded, rng);
    check_case({payloads::kQ8RowBlock, 2, 1, 256, 300, 1, 1, true}, f, Out::kGelu, rng);
  }
}

// matmul_multi's one launch (decode_multi_kernel) gives each product the bits of its own
// launch under the same plan, whatever the others' grids.
TEST(CudaEmulation, MultiProductsGiveEachProductItsOwnBits) {
  Rng rng(47);
  const int64_t K = 256, Ns[] = {96, 16, 40};
  for (const bool chunked : {true, false})
    for (const int64_t M : {int64_t{1}, int64_t{3}})
      for (const mm::DecodeForce& force : {kPlans[0], kPlans[1], kPlans[3], kPlans[5]}) {
        SCOPED_TRACE(std::string(chunked ? "q8rb chunked" : "q8rb") + " M " + std::to_string(M) + " plan " +
                     std::to_string(force.ks) + "," + std::to_string(force.wl) + "," + std::to_string(force.deep));
        const int64_t ldx = K + 1;
        std::vector<float> x(static_cast<size_t>(M * ldx));
        for (auto& v : x) v = rng.bf16_value(-6, 3);
        std::vector<std::vector<uint8_t>> bytes;
        bytes.reserve(3);
        mm::WDesc d[3];
        int64_t ldy[3];
        for (int i = 0; i < 3; ++i) {
          const WeightPayload w = payloads::random_weight(payloads::kQ8RowBlock, 1, K, Ns[i], 2, rng);
          bytes.push_back(w.bytes);
          GrokitWeight dw = w.desc(bytes.back().data());
          if (chunked) {
            chunk_q8(bytes.back(), 1, K, Ns[i]);
            dw.layout = 1;
          }
          char msg[512];
          ASSERT_EQ(mm::describe_weight("emulation", &dw, &d[i], msg, sizeof msg), GROKIT_OK) << msg;
          ldy[i] = Ns[i] + i;
        }
        const mm::MultiPlan mp = mm::plan_multi(d, 3, M, 3, force);
        const bool deep = force.deep != 0 && mp.P[0].kmt == 1;
        // Together.
        std::vector<std::vector<float>> together(3);
        float* yt[3];
        for (int i = 0; i < 3; ++i) {
          together[static_cast<size_t>(i)].assign(static_cast<size_t>(M * ldy[i]), -7.0f);
          yt[i] = together[static_cast<size_t>(i)].data();
        }
        std::vector<float> partial(mp.partial_floats + 1, std::nanf(""));
        std::vector<uint32_t> counters(mp.counter_words, 0);
        unsigned int errors[2] = {0, 0};
        const mm::DecodeMulti m =
            mm::make_decode_multi(mp, d, x.data(), M, ldx, yt, ldy, partial.data(), counters.data(), errors, true, false);
        const dim3 grid(static_cast<unsigned>(mp.max_tiles), static_cast<unsigned>(mp.max_ks), 3);
        run_multi(d[0].fmt, mp.P[0].kmt, deep, grid, mp.smem, m);
        for (uint32_t v : counters) ASSERT_EQ(v, 0u) << "a split-k counter was not reset";
        EXPECT_EQ(errors[0], 0u);
        // Alone, each under its plan.
        for (int i = 0; i < 3; ++i) {
          const mm::DecodePlan& P = mp.P[i];
          std::vector<float> alone(static_cast<size_t>(M * ldy[i]), -7.0f);
          std::vector<float> part(static_cast<size_t>(P.ks * M * Ns[i]) + 1, std::nanf(""));
          std::vector<uint32_t> cnt(static_cast<size_t>(P.tiles), 0);
          mm::DecodeParams p = mm::make_decode_params(d[i], P, x.data(), M, ldx, nullptr, 1, alone.data(), ldy[i],
                                                      part.data(), cnt.data(), errors);
          p.round_y = 1;
          const dim3 g(static_cast<unsigned>(P.tiles), static_cast<unsigned>(P.ks), 1);
          run_decode(d[i].fmt, P.kmt, deep, g, P.smem, p);
          EXPECT_EQ(0, std::memcmp(alone.data(), together[static_cast<size_t>(i)].data(), alone.size() * 4))
              << "product " << i << " (N " << Ns[i] << ", " << P.tiles << " tiles x " << P.ks << " splits)";
        }
      }
}

// The router's two shapes (one row per block of 1024 threads; row tiles in blocks of
// 256) give the same bits, and the host twin's experts and gates (the parity harness's
// budget: experts exact, gates 2^-14 relative).
TEST(CudaEmulation, RouterShapesGiveTheSameBitsAndTheTwinsExperts) {
  namespace rt = grokit::kernels::cuda::router;
  Rng rng(53);
  struct Shape {
    int64_t M, D, E, k;
  };
  // E 5 and 3: 1024 and 256 not multiples of E (idle threads); D 40 < S: empty slices;
  // E 200: one slice in flight per expert in the tiles; M 9: two tiles, the last partial.
  const Shape shapes[] = {{6, 96, 8, 2}, {9, 6144, 8, 2}, {5, 40, 5, 1}, {7, 300, 3, 3}, {4, 64, 200, 4}, {1, 33, 2, 1}};
  for (const Shape& c : shapes) {
    SCOPED_TRACE("M " + std::to_string(c.M) + " D " + std::to_string(c.D) + " E " + std::to_string(c.E) + " k " +
                 std::to_string(c.k));
    std::vector<float> x, w;
    ASSERT_TRUE(payloads::router_inputs(c.M, c.D, c.E, c.k, rng, x, w));
    const size_t n = static_cast<size_t>(c.M * c.k);
    std::vector<int32_t> want_e(n), row_e(n, -5), tile_e(n, -5);
    std::vector<float> want_g(n), row_g(n, -5.0f), tile_g(n, -5.0f);
    ASSERT_EQ(grokit_host_ops()->router_topk(x.data(), c.M, c.D, w.data(), c.E, c.k, want_e.data(), want_g.data(),
                                             nullptr),
              GROKIT_OK);
    const int E = static_cast<int>(c.E), k = static_cast<int>(c.k);
    launch(dim3(static_cast<unsigned>(c.M), 1, 1), 0,
           [&] { rt::router_kernel<rt::kRowThreads, 1>(x.data(), c.M, c.D, w.data(), E, k, row_e.data(), row_g.data()); },
           rt::kRowThreads);
    // Two blocks at most: the grid-stride loop over tiles.
    launch(dim3(2, 1, 1), 0,
           [&] {
             rt::router_kernel<rt::kTileThreads, rt::kTileRows>(x.data(), c.M, c.D, w.data(), E, k, tile_e.data(),
                                                                tile_g.data());
           },
           rt::kTileThreads);
    EXPECT_EQ(row_e, want_e);
    EXPECT_EQ(tile_e, row_e);
    EXPECT_EQ(0, std::memcmp(tile_g.data(), row_g.data(), n * 4)) << "the tiles' gates differ from the rows'";
    for (size_t i = 0; i < n; ++i)
      EXPECT_LE(std::fabs(double(row_g[i]) - double(want_g[i])), 0x1p-14 * std::fabs(double(want_g[i])))
          << "gate " << i << ": " << row_g[i] << ", the twin " << want_g[i];
  }
}

}  // namespace
