// The device code of every kernel of a decode step (the weight products, the router, the
// decode attention, residual_norm, rope_store: kernels/cuda/*_device.cuh and the *_impl.cuh
// they use) and of the prefill attention compiled as plain C++ and run on the host: each
// block's threads are fibers taking turns (std::threads under ThreadSanitizer: emu_block.h),
// __syncthreads a barrier, __shared__ a static (poisoned before each block), a warp
// shuffle a barrier per warp, and the prefill attention's tensor-core instructions
// (ldmatrix, mma) whole-warp exchanges of their PTX fragments. So the decode kernel's
// indexing, split-k, routing, rounding and every plan a benchmark may force (k splits,
// warps across columns, the deep variant), the router's two shapes and the others' plans
// are checked against the host twins on a machine without a GPU. The arithmetic is the
// device's (fp32 fma, bf16x2 multiplies from cuda_bf16.h's host versions); the summation
// order is the kernel's, so results are held to the parity harness's budgets, or to the
// bits of the CUDA ops a fused kernel replaces.
//
// The kernels' pdl_wait rule (emulable.cuh) is checked too: every buffer of a launch but
// the weights lives in pages of its own (PageBuf), which no thread may touch until all the
// block's threads have reached pdl_wait (the pages are inaccessible until then), so a read
// or write placed ahead of the wait ends the test with a message.
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>
#include <vector_types.h>

#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#include "tests/gpu/emu_block.h"

// What matmul_device.cuh asks of its includer in emulation (per thread where the block's
// threads are std::threads; fibers set threadIdx at each turn).
#if GK_EMU_THREADS
thread_local uint3 threadIdx;
thread_local uint3 blockIdx;
#else
uint3 threadIdx;
uint3 blockIdx;
#endif
dim3 gridDim;
void gk_emu_sync();
void gk_emu_pdl_wait();
float* gk_emu_smem();
void gk_emu_align(const void* p, int bytes, const char* what);
template <class T>
T gk_emu_shfl_xor(T v, int mask);
uint32_t gk_emu_ballot(bool pred);
void gk_emu_ldsm_x4_trans(uint32_t (&r)[4], const uint16_t* p);
void gk_emu_mma_bf16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);
void gk_emu_mma_f64(double (&d)[2], double a, double b);
namespace grokit::kernels::cuda {
inline void raise_device_error(unsigned int* word, unsigned int bit) {
  if (word != nullptr) __atomic_fetch_or(word, bit, __ATOMIC_SEQ_CST);
}
}  // namespace grokit::kernels::cuda

#include "kernels/cuda/attention_decode_device.cuh"
#include "kernels/cuda/attention_prefill_device.cuh"
#include "kernels/cuda/matmul_device.cuh"
#include "kernels/cuda/residual_norm_device.cuh"
#include "kernels/cuda/rope_store_device.cuh"
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

std::optional<emu::Barrier> g_sync;
std::vector<float> g_smem;
// A warp's exchange: each lane's value, and a barrier per warp.
constexpr int kMaxEmuThreads = 1024;
std::vector<std::unique_ptr<emu::Barrier>> g_warps;
uint64_t g_lanes[kMaxEmuThreads];

// The guarded pages of the launch running now, inaccessible from each block's start until
// its threads have all called pdl_wait.
struct Region {
  void* p;
  size_t bytes;
};
std::vector<Region> g_guarded;
void set_guard(bool on) {
  for (const Region& r : g_guarded)
    if (mprotect(r.p, r.bytes, on ? PROT_NONE : PROT_READ | PROT_WRITE) != 0) std::abort();
}
void unguard() { set_guard(false); }
// The kernels' __shared__ statics (GK_SHARED: emulable.cuh), poisoned before each block:
// bytes 0xff are NaN as floats, -1 as integers and a non-canonical address as pointers,
// so a read of shared memory no thread of the block wrote shows.
extern "C" unsigned char __start_gk_emu_shared[], __stop_gk_emu_shared[];
void poison_static_shared() {
  std::memset(__start_gk_emu_shared, 0xff, static_cast<size_t>(__stop_gk_emu_shared - __start_gk_emu_shared));
}
std::optional<emu::Barrier> g_pdl;
bool g_pdl_waited[kMaxEmuThreads];  // the thread has passed its first pdl_wait in this block
void on_fault(int, siginfo_t* info, void*) {
  for (const Region& r : g_guarded) {
    const auto a = reinterpret_cast<uintptr_t>(info->si_addr), b = reinterpret_cast<uintptr_t>(r.p);
    if (a >= b && a < b + r.bytes) {
      static const char msg[] = "emulated kernel: a buffer of earlier kernels touched before pdl_wait (emulable.cuh)\n";
      (void)!write(2, msg, sizeof msg - 1);
      _exit(3);
    }
  }
  signal(SIGSEGV, SIG_DFL);  // not a guarded page: the usual crash
}

}  // namespace

void gk_emu_sync() { g_sync->arrive_and_wait(); }
// Every thread of the block reaches it (the kernels call it uniformly); the last one in
// opens the guarded pages. Later calls in the block return at once, as on the device
// (it waits for the kernel before, not for the block's other threads): no barrier that
// could hide a missing __syncthreads.
void gk_emu_pdl_wait() {
  const auto t = static_cast<size_t>(threadIdx.x);
  if (g_pdl_waited[t]) return;
  g_pdl_waited[t] = true;
  g_pdl->arrive_and_wait();
}
// Every lane of the warp calls it (as __shfl_xor_sync with a full mask requires).
template <class T>
T gk_emu_shfl_xor(T v, int mask) {
  static_assert(sizeof(T) <= sizeof(uint64_t));
  const int t = static_cast<int>(threadIdx.x);
  uint64_t mine = 0;
  std::memcpy(&mine, &v, sizeof v);
  g_lanes[t] = mine;
  g_warps[static_cast<size_t>(t / 32)]->arrive_and_wait();
  const uint64_t theirs = g_lanes[(t & ~31) | ((t & 31) ^ mask)];
  g_warps[static_cast<size_t>(t / 32)]->arrive_and_wait();
  T r;
  std::memcpy(&r, &theirs, sizeof r);
  return r;
}
namespace {
// A warp's exchange of whole values: each lane's `mine` out, all 32 lanes' values in.
constexpr size_t kShareBytes = 64;
alignas(16) unsigned char g_share[kMaxEmuThreads][kShareBytes];
template <class T>
void warp_gather(const T& mine, T (&all)[32]) {
  static_assert(sizeof(T) <= kShareBytes && std::is_trivially_copyable_v<T>);
  const int t = static_cast<int>(threadIdx.x), w0 = t & ~31;
  std::memcpy(g_share[t], &mine, sizeof(T));
  g_warps[static_cast<size_t>(t / 32)]->arrive_and_wait();
  for (int l = 0; l < 32; ++l) std::memcpy(&all[l], g_share[w0 + l], sizeof(T));
  g_warps[static_cast<size_t>(t / 32)]->arrive_and_wait();
}
float bf16_half(uint32_t word, int hi) { return grokit::bf16_bits_to_f32(static_cast<uint16_t>(hi ? word >> 16 : word)); }
}  // namespace

uint32_t gk_emu_ballot(bool pred) {
  bool all[32];
  warp_gather(pred, all);
  uint32_t bits = 0;
  for (int l = 0; l < 32; ++l) bits |= all[l] ? 1u << l : 0u;
  return bits;
}
// ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16: lane 8i + j gives row j of matrix i;
// lane l receives, for each matrix, its elements (2 (l % 4), l / 4) and (2 (l % 4) + 1, l / 4).
void gk_emu_ldsm_x4_trans(uint32_t (&r)[4], const uint16_t* p) {
  const uint16_t* rows[32];
  warp_gather(p, rows);
  const int l = static_cast<int>(threadIdx.x) & 31;
  for (int i = 0; i < 4; ++i) {
    const uint16_t lo = rows[8 * i + 2 * (l % 4)][l / 4], hi = rows[8 * i + 2 * (l % 4) + 1][l / 4];
    r[i] = static_cast<uint32_t>(lo) | static_cast<uint32_t>(hi) << 16;
  }
}
// mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32, fragments as the PTX ISA gives
// them (lane 4 g + t; attention_prefill_device.cuh's mma_bf16). The products are exact;
// they are summed with C in double and rounded once (the tensor cores' order and internal
// width are their own: the test holds the result to the parity budget, not to bits).
void gk_emu_mma_bf16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  struct Frag {
    uint32_t a[4], b0, b1;
  };
  Frag all[32];
  warp_gather(Frag{{a[0], a[1], a[2], a[3]}, b0, b1}, all);
  float A[16][16], B[16][8];
  for (int g = 0; g < 8; ++g)
    for (int t = 0; t < 4; ++t) {
      const Frag& f = all[4 * g + t];
      for (int e = 0; e < 2; ++e) {
        A[g][2 * t + e] = bf16_half(f.a[0], e);
        A[g + 8][2 * t + e] = bf16_half(f.a[1], e);
        A[g][2 * t + 8 + e] = bf16_half(f.a[2], e);
        A[g + 8][2 * t + 8 + e] = bf16_half(f.a[3], e);
        B[2 * t + e][g] = bf16_half(f.b0, e);
        B[2 * t + 8 + e][g] = bf16_half(f.b1, e);
      }
    }
  const int l = static_cast<int>(threadIdx.x) & 31, g = l / 4, t = l % 4;
  for (int i = 0; i < 4; ++i) {
    const int row = g + 8 * (i / 2), col = 2 * t + i % 2;
    double sum = d[i];
    for (int k = 0; k < 16; ++k) sum += static_cast<double>(A[row][k]) * static_cast<double>(B[k][col]);
    d[i] = static_cast<float>(sum);
  }
}
// mma.sync.aligned.m8n8k4.row.col.f64.f64.f64.f64: lane 4 g + t holds A[g][t], B[t][g],
// and D[g][2t], D[g][2t + 1]; fma in k order.
void gk_emu_mma_f64(double (&d)[2], double a, double b) {
  struct Frag {
    double a, b;
  };
  Frag all[32];
  warp_gather(Frag{a, b}, all);
  const int l = static_cast<int>(threadIdx.x) & 31, g = l / 4, t = l % 4;
  for (int i = 0; i < 2; ++i) {
    const int n = 2 * t + i;
    for (int k = 0; k < 4; ++k) d[i] = std::fma(all[4 * g + k].a, all[4 * n + k].b, d[i]);
  }
}

float* gk_emu_smem() { return g_smem.data(); }
void gk_emu_align(const void* p, int bytes, const char* what) {
  if (reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(bytes) != 0) {
    std::fprintf(stderr, "emulated kernel: %s of %p is not %d-byte aligned\n", what, p, bytes);
    std::abort();
  }
}

namespace {

// An array in pages of its own, so that a launch can guard it (Region).
template <class T>
class PageBuf {
 public:
  explicit PageBuf(size_t n, T fill = T{}) : n_(n) {
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    bytes_ = (std::max<size_t>(n, 1) * sizeof(T) + page - 1) / page * page;
    void* p = mmap(nullptr, bytes_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) std::abort();
    p_ = static_cast<T*>(p);
    std::fill(p_, p_ + n_, fill);
  }
  explicit PageBuf(const std::vector<T>& v) : PageBuf(v.size()) { std::copy(v.begin(), v.end(), p_); }
  ~PageBuf() { munmap(p_, bytes_); }
  PageBuf(const PageBuf&) = delete;
  PageBuf& operator=(const PageBuf&) = delete;
  T* data() const { return p_; }
  size_t size() const { return n_; }
  T& operator[](size_t i) const { return p_[i]; }
  T* begin() const { return p_; }
  T* end() const { return p_ + n_; }
  Region region() const { return {p_, bytes_}; }

 private:
  T* p_ = nullptr;
  size_t n_ = 0, bytes_ = 0;
};

// Runs fn as a kernel over `grid`, one block at a time, each with T threads.
// A thread that returns early leaves the block's barriers (as an exited CUDA thread no
// longer counts at __syncthreads). Dynamic shared memory is NaN before each block. The
// guard's pages are inaccessible from each block's start until its pdl_wait.
template <class Fn>
void launch(dim3 grid, size_t smem_bytes, const Fn& fn, int T = mm::kThreads, std::vector<Region> guard = {}) {
  ASSERT_TRUE(T % 32 == 0 && T <= kMaxEmuThreads);
  static const bool handler = [] {
    struct sigaction sa = {};
    sa.sa_sigaction = on_fault;
    sa.sa_flags = SA_SIGINFO;
    return sigaction(SIGSEGV, &sa, nullptr) == 0;
  }();
  ASSERT_TRUE(handler);
  g_guarded = std::move(guard);
  gridDim = grid;
  g_smem.resize(smem_bytes / 4 + 4);
  // The block's barriers, fresh, its guard on and its shared memory NaN.
  auto new_block = [T] {
    g_sync.emplace(T, nullptr);
    g_pdl.emplace(T, unguard);
    std::fill(std::begin(g_pdl_waited), std::end(g_pdl_waited), false);
    g_warps.clear();
    for (int w = 0; w < T / 32; ++w) g_warps.push_back(std::make_unique<emu::Barrier>(32, nullptr));
    set_guard(true);
    std::fill(g_smem.begin(), g_smem.end(), std::nanf(""));
    poison_static_shared();
  };
  auto thread_body = [&fn](int t) {
    fn();
    g_sync->arrive_and_drop();
    g_pdl->arrive_and_drop();
    g_warps[static_cast<size_t>(t / 32)]->arrive_and_drop();
  };
#if GK_EMU_THREADS
  new_block();
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
            thread_body(t);
            end.arrive_and_wait();
            if (t == 0) new_block();  // nobody touches these until the next start
          }
    });
  }
  for (auto& th : threads) th.join();
#else
  // Launches and blocks alternate which warp runs ahead (the lowest or the highest).
  static unsigned launches = 0;
  auto set_thread = [](int t) { threadIdx = uint3{static_cast<unsigned>(t), 0, 0}; };
  for (unsigned z = 0, b = launches++; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x, ++b) {
        new_block();
        blockIdx = uint3{x, y, z};
        emu::run_block(T, b % 2 == 1, thread_body, set_thread);
      }
#endif
  set_guard(false);
  g_guarded.clear();
}

// The decode kernel (or its multi variant) a plan selects, emulated over `grid`.
void run_decode(int fmt, int kmt, bool deep, dim3 grid, size_t smem, const mm::DecodeParams& p,
                std::vector<Region> guard) {
  mm::with_decode_kernel(fmt, kmt, deep, [&](auto f, auto k, auto u) {
    launch(grid, smem, [&] { mm::decode_kernel<decltype(f)::value, decltype(k)::value, decltype(u)::value>(p); },
           mm::kThreads, guard);
  });
}
void run_multi(int fmt, int kmt, bool deep, dim3 grid, size_t smem, const mm::DecodeMulti& m, std::vector<Region> guard) {
  mm::with_decode_kernel(fmt, kmt, deep, [&](auto f, auto k, auto u) {
    launch(grid, smem, [&] { mm::decode_multi_kernel<decltype(f)::value, decltype(k)::value, decltype(u)::value>(m); },
           mm::kThreads, guard);
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
  bool chunked;     // q8rb in the decode layout (layout 1), relaid by q8_chunk_kernel
  int32_t all = -2;  // routed: every row to this expert (-1: none), or -2: drawn
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
  if (routed && c.all != -2) {
    for (auto& e : expert) e = c.all;
  } else if (routed) {
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
  bool slots = false;
  const int64_t egrid = mm::expert_grid(d.E, c.M, routed, &slots);
  // Everything but the weights guarded (launch): what earlier kernels write or read.
  const PageBuf<float> gx(x), got(gate), partial(static_cast<size_t>(P.ks * c.M * c.N), std::nanf(""));
  const PageBuf<int32_t> gexpert(expert);
  const PageBuf<uint32_t> counters(static_cast<size_t>(egrid * P.tiles), 0), errors(2, 0);
  mm::DecodeParams p = mm::make_decode_params(d, P, gx.data(), c.M, ldx, routed ? gexpert.data() : nullptr, div,
                                              got.data(), ldy, partial.data(), counters.data(), errors.data());
  p.round_y = round ? 1 : 0;
  p.gelu = gelu ? 1 : 0;
  p.slots = slots ? 1 : 0;
  const dim3 grid(static_cast<unsigned>(P.tiles), static_cast<unsigned>(P.ks), static_cast<unsigned>(egrid));
  const bool deep = force.deep != 0 && P.kmt == 1;
  run_decode(d.fmt, P.kmt, deep, grid, P.smem, p,
             {gx.region(), got.region(), partial.region(), gexpert.region(), counters.region(), errors.region()});
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
    // Expert slots: one expert used of 5 (the other slots exit), and none (slot 0 only
    // writes the zeros).
    check_case({payloads::kQ8RowBlock, 1, 5, 256, 96, 4, 2, true, 3}, f, Out::kSums, rng);
    check_case({payloads::kQ8RowBlock, 1, 5, 256, 96, 4, 2, true, -1}, f, Out::kSums, rng);
    // 130 rows: the slots' scan and each block's row collection take three windows of ids.
    check_case({payloads::kQ8RowBlock, 1, 5, 64, 40, 130, 2, true}, f, Out::kSums, rng);
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
        // Together (everything but the weights guarded, as in check_case).
        const PageBuf<float> gx(x);
        std::vector<std::unique_ptr<PageBuf<float>>> together;
        float* yt[3];
        std::vector<Region> guard = {gx.region()};
        for (int i = 0; i < 3; ++i) {
          together.push_back(std::make_unique<PageBuf<float>>(static_cast<size_t>(M * ldy[i]), -7.0f));
          yt[i] = together.back()->data();
          guard.push_back(together.back()->region());
        }
        const PageBuf<float> partial(mp.partial_floats + 1, std::nanf(""));
        const PageBuf<uint32_t> counters(mp.counter_words, 0), errors(2, 0);
        guard.insert(guard.end(), {partial.region(), counters.region(), errors.region()});
        const mm::DecodeMulti m = mm::make_decode_multi(mp, d, gx.data(), M, ldx, yt, ldy, partial.data(),
                                                        counters.data(), errors.data(), true, false);
        const dim3 grid(static_cast<unsigned>(mp.max_tiles), static_cast<unsigned>(mp.max_ks), 3);
        run_multi(d[0].fmt, mp.P[0].kmt, deep, grid, mp.smem, m, guard);
        for (uint32_t v : counters) ASSERT_EQ(v, 0u) << "a split-k counter was not reset";
        EXPECT_EQ(errors[0], 0u);
        // Alone, each under its plan.
        for (int i = 0; i < 3; ++i) {
          const mm::DecodePlan& P = mp.P[i];
          const PageBuf<float> alone(static_cast<size_t>(M * ldy[i]), -7.0f);
          const PageBuf<float> part(static_cast<size_t>(P.ks * M * Ns[i]) + 1, std::nanf(""));
          const PageBuf<uint32_t> cnt(static_cast<size_t>(P.tiles), 0);
          mm::DecodeParams p = mm::make_decode_params(d[i], P, gx.data(), M, ldx, nullptr, 1, alone.data(), ldy[i],
                                                      part.data(), cnt.data(), errors.data());
          p.round_y = 1;
          const dim3 g(static_cast<unsigned>(P.tiles), static_cast<unsigned>(P.ks), 1);
          run_decode(d[i].fmt, P.kmt, deep, g, P.smem, p,
                     {gx.region(), alone.region(), part.region(), cnt.region(), errors.region()});
          EXPECT_EQ(0, std::memcmp(alone.data(), together[static_cast<size_t>(i)]->data(), alone.size() * 4))
              << "product " << i << " (N " << Ns[i] << ", " << P.tiles << " tiles x " << P.ks << " splits)";
        }
      }
}

// The router's shapes (one row per block of 1024 threads, x widened into shared memory
// or not; row tiles in blocks of 256) give the same bits, and the host twin's experts and gates (the parity harness's
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
    std::vector<int32_t> want_e(n);
    std::vector<float> want_g(n);
    ASSERT_EQ(grokit_host_ops()->router_topk(x.data(), c.M, c.D, w.data(), c.E, c.k, want_e.data(), want_g.data(),
                                             nullptr),
              GROKIT_OK);
    // x and the outputs guarded (the weight w is not).
    const PageBuf<float> gx(x), row_g(n, -5.0f), xs_g(n, -5.0f), tile_g(n, -5.0f);
    const PageBuf<int32_t> row_e(n, -5), xs_e(n, -5), tile_e(n, -5);
    const int E = static_cast<int>(c.E), k = static_cast<int>(c.k);
    launch(dim3(static_cast<unsigned>(c.M), 1, 1), 0,
           [&] { rt::router_kernel<rt::kRowThreads, 1>(gx.data(), c.M, c.D, w.data(), E, k, row_e.data(), row_g.data()); },
           rt::kRowThreads, {gx.region(), row_e.region(), row_g.region()});
    // The decode shape with x widened into shared memory.
    launch(dim3(static_cast<unsigned>(c.M), 1, 1), static_cast<size_t>(c.D) * 8,
           [&] {
             rt::router_kernel<rt::kRowThreads, 1, true>(gx.data(), c.M, c.D, w.data(), E, k, xs_e.data(), xs_g.data());
           },
           rt::kRowThreads, {gx.region(), xs_e.region(), xs_g.region()});
    const std::vector<int32_t> rows_e(row_e.begin(), row_e.end());
    EXPECT_EQ(std::vector<int32_t>(xs_e.begin(), xs_e.end()), rows_e);
    EXPECT_EQ(0, std::memcmp(xs_g.data(), row_g.data(), n * 4)) << "the gates with x in shared memory differ";
    // Two blocks at most: the grid-stride loop over tiles.
    launch(dim3(2, 1, 1), 0,
           [&] {
             rt::router_kernel<rt::kTileThreads, rt::kTileRows>(gx.data(), c.M, c.D, w.data(), E, k, tile_e.data(),
                                                                tile_g.data());
           },
           rt::kTileThreads, {gx.region(), tile_e.region(), tile_g.region()});
    EXPECT_EQ(rows_e, want_e);
    EXPECT_EQ(std::vector<int32_t>(tile_e.begin(), tile_e.end()), rows_e);
    EXPECT_EQ(0, std::memcmp(tile_g.data(), row_g.data(), n * 4)) << "the tiles' gates differ from the rows'";
    for (size_t i = 0; i < n; ++i)
      EXPECT_LE(std::fabs(double(row_g[i]) - double(want_g[i])), 0x1p-14 * std::fabs(double(want_g[i])))
          << "gate " << i << ": " << row_g[i] << ", the twin " << want_g[i];
  }
}

// ---- decode attention ------------------------------------------------------------

// One sequence's cache for an attention case, in pages of its own (PageBuf): kv heads x
// cap positions x dh keys and values, drawn for positions [0, n) and NaN past them; the
// first `pad` keys invalid (padding), and about a fifth of the rest.
struct AttnCache {
  std::unique_ptr<PageBuf<uint16_t>> k, v;
  std::unique_ptr<PageBuf<uint8_t>> valid;
  AttnCache(int64_t KV, int64_t cap, int64_t n, int64_t pad, int64_t dh, Rng& rng)
      : k(std::make_unique<PageBuf<uint16_t>>(static_cast<size_t>(KV * cap * dh), uint16_t{0x7fc1})),
        v(std::make_unique<PageBuf<uint16_t>>(static_cast<size_t>(KV * cap * dh), uint16_t{0x7fc1})),
        valid(std::make_unique<PageBuf<uint8_t>>(static_cast<size_t>(cap), uint8_t{0})) {
    for (int64_t h = 0; h < KV; ++h)
      for (int64_t j = 0; j < n; ++j)
        for (int64_t d = 0; d < dh; ++d) {
          (*k)[static_cast<size_t>((h * cap + j) * dh + d)] = rng.bf16_bits(-4, 1);
          (*v)[static_cast<size_t>((h * cap + j) * dh + d)] = rng.bf16_bits(-6, 2);
        }
    for (int64_t j = 0; j < n; ++j) (*valid)[static_cast<size_t>(j)] = j < pad || rng.range(0, 4) == 0 ? 0 : 1;
  }
  std::vector<Region> regions() const { return {k->region(), v->region(), valid->region()}; }
};

// One row of a decode attention case: its own cache of `cap` positions, keys [0, n) in
// it (the first `pad` of them padding), the query at `pos`.
struct AttnRowCase {
  int64_t cap, n, pad;
  int32_t pos;
};

// The decode attention's three kernels emulated under the plan of a device with `sms`
// SMs, against the CPU twin row by row: every output written, within one bf16 ulp, and
// at most 1% of them not bit-equal (the V sums run in double, in splits).
void check_decode_attention(const std::string& what, int64_t Hq, int64_t KV, int64_t dh, float mult, int q_hi,
                            const std::vector<AttnRowCase>& rows, int64_t max_keys, int sms, Rng& rng) {
  namespace at = grokit::kernels::cuda::attn;
  SCOPED_TRACE(what);
  const auto M = static_cast<int64_t>(rows.size());
  // Every buffer guarded (launch): the caches, the rows, q, o, the scratch.
  std::vector<AttnCache> caches;
  const PageBuf<GrokitAttnRow> rd(rows.size());
  std::vector<Region> guard = {rd.region()};
  for (size_t i = 0; i < rows.size(); ++i) {
    const AttnRowCase& r = rows[i];
    const AttnCache& c = caches.emplace_back(KV, r.cap, r.n, r.pad, dh, rng);
    rd[i] = {c.k->data(), c.v->data(), c.valid->data(), r.cap, r.n, r.pos, 1};
    const std::vector<Region> more = c.regions();
    guard.insert(guard.end(), more.begin(), more.end());
  }
  const PageBuf<float> q(static_cast<size_t>(M * Hq * dh));
  for (auto& x : q) x = rng.bf16_value(-4, q_hi);
  std::vector<float> want(q.size());
  const PageBuf<float> got(q.size(), std::nanf(""));
  for (int64_t m = 0; m < M; ++m) {
    const AttnRowCase& r = rows[static_cast<size_t>(m)];
    const grokit::kernels::AttentionShape sh{Hq, KV, dh, r.cap, mult, 30.0f};
    const AttnCache& c = caches[static_cast<size_t>(m)];
    ASSERT_TRUE(grokit::kernels::attention(q.data() + m * Hq * dh, 1, &r.pos, c.k->data(), c.v->data(), c.valid->data(), r.n,
                                           sh, want.data() + m * Hq * dh, nullptr)
                    .ok());
  }
  const PageBuf<unsigned int> errors(2, 0);
  const at::Args a{q.data(), got.data(), rd.data(), M, max_keys, static_cast<int>(Hq), static_cast<int>(KV),
                   static_cast<int>(Hq / KV), static_cast<int>(dh), mult, 30.0f, errors.data()};
  at::DecodePlan p{};
  ASSERT_TRUE(at::plan_decode(a, sms, &p));
  const PageBuf<double> scratch(p.bytes / 8 + 1, std::nan(""));
  guard.insert(guard.end(), {q.region(), got.region(), errors.region(), scratch.region()});
  auto* base = reinterpret_cast<unsigned char*>(scratch.data());
  auto* S = reinterpret_cast<float*>(base + p.off_s);
  auto* PM = reinterpret_cast<float*>(base + p.off_pm);
  auto* PL = reinterpret_cast<double*>(base + p.off_pl);
  auto* P = reinterpret_cast<double*>(base + p.off_p);
  // The counters as another op may leave the shared scratch: decode_scores zeroes them.
  uint32_t* cnt = p.nsplit > 1 ? reinterpret_cast<uint32_t*>(base + p.off_cnt) : nullptr;
  if (cnt != nullptr) std::memset(cnt, 0x5a, p.bytes - p.off_cnt);
  const dim3 grid(static_cast<unsigned>(p.nsplit), static_cast<unsigned>(M * KV * p.hsub), 1);
  launch(grid, 0, [&] { at::decode_scores(a, p, S, PM, PL, cnt); }, at::kThreads, guard);
  if (p.nsplit == 1)
    launch(grid, 0, [&] { at::decode_pv<true>(a, p, S, PM, PL, nullptr, nullptr); }, at::kThreads, guard);
  else
    launch(grid, 0, [&] { at::decode_pv<false>(a, p, S, PM, PL, P, cnt); }, at::kThreads, guard);
  EXPECT_EQ(errors[0], 0u);
  size_t differ = 0;
  int bad = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    if (std::memcmp(&got[i], &want[i], 4) == 0) continue;
    ++differ;
    const double ulp = std::ldexp(1.0, std::ilogb(std::max(std::fabs(double(want[i])), 1e-30)) - 7);
    if (!(std::fabs(double(got[i]) - double(want[i])) <= ulp) && bad++ < 5)
      ADD_FAILURE() << "row " << i / static_cast<size_t>(Hq * dh) << " element " << i % static_cast<size_t>(Hq * dh)
                    << ": got " << got[i] << ", the twin " << want[i];
  }
  EXPECT_LE(differ, want.size() / 100) << differ << " of " << want.size() << " not bit-equal (" << p.nsplit
                                        << " splits of " << p.chunk << " keys)";
}

TEST(CudaEmulation, DecodeAttentionMatchesTheTwinUnderItsPlans) {
  Rng rng(59);
  const float m128 = 0.08838834764831845f, m16 = 0.25f;
  // Sized for a graph (max_keys 4096 on 16 SMs: 11 splits of 384 keys) with shorter rows
  // (1025 keys: 11 splits of 96), Grok-1's 6 heads per kv head; a row with padding first;
  // a row of 5 keys.
  check_decode_attention("graph sized", 6, 1, 128, m128, 2,
                         {{1100, 1025, 0, 1024}, {320, 300, 3, 299}, {8, 5, 0, 4}}, 4096, 16, rng);
  // Few SMs: one split (o written directly), then a few.
  const std::vector<AttnRowCase> mixed = {{8, 1, 0, 0}, {45, 37, 3, 36}, {320, 300, 0, 299}, {5, 3, 3, 2}};
  check_decode_attention("one split", 8, 2, 128, m128, 2, mixed, 320, 3, rng);
  check_decode_attention("some splits", 8, 2, 128, m128, 2, mixed, 320, 40, rng);
  check_decode_attention("head_dim 16, group 1", 8, 8, 16, m16, 2, mixed, 512, 20, rng);
  // Two blocks of heads per kv head (group 12 > 8), and logits past the cap.
  check_decode_attention("group 12, capped", 12, 1, 128, 1.0f, 4, {{64, 50, 0, 49}, {300, 297, 5, 296}}, 300, 16, rng);
}

// ---- prefill attention -------------------------------------------------------------

// A prompt's rows in a prefill case: `rows` query rows at positions pos0, pos0 + 1, ..,
// all over one cache of `cap` positions holding keys [0, n) (the first `pad` padding,
// and about a fifth of the rest invalid); consecutive rows of one prompt form a run.
struct PrefillPrompt {
  int64_t cap, n, pad;
  int32_t pos0;
  int64_t rows;
};

// The prefill attention's kernels (three passes, and the splits' combine where the plan
// splits the keys) emulated under the plan of a device with `sms` SMs, against the CPU
// twin row by row, within the parity harness's budget for attention (2 bf16 ulps +
// 2^-6 max |v|, at most 1% of the elements not bit-equal): every output written.
void check_prefill_attention(const std::string& what, int64_t Hq, int64_t KV, int64_t dh, float mult, int q_hi,
                             const std::vector<PrefillPrompt>& prompts, int sms, Rng& rng, int want_splits) {
  namespace at = grokit::kernels::cuda::attn;
  SCOPED_TRACE(what);
  std::vector<AttnCache> caches;
  std::vector<GrokitAttnRow> rows;
  std::vector<size_t> prompt_of;
  int64_t max_keys = 0;
  for (size_t i = 0; i < prompts.size(); ++i) {
    const PrefillPrompt& pr = prompts[i];
    const AttnCache& c = caches.emplace_back(KV, pr.cap, pr.n, pr.pad, dh, rng);
    for (int64_t r = 0; r < pr.rows; ++r) {
      rows.push_back({c.k->data(), c.v->data(), c.valid->data(), pr.cap, pr.n, static_cast<int32_t>(pr.pos0 + r), 1});
      prompt_of.push_back(i);
    }
    max_keys = std::max(max_keys, pr.n);
  }
  const auto M = static_cast<int64_t>(rows.size());
  const PageBuf<GrokitAttnRow> rd(rows);
  const PageBuf<float> q(static_cast<size_t>(M * Hq * dh));
  for (auto& x : q) x = rng.bf16_value(-4, q_hi);
  std::vector<float> want(q.size());
  const PageBuf<float> got(q.size(), std::nanf(""));
  for (int64_t m = 0; m < M; ++m) {
    const size_t i = prompt_of[static_cast<size_t>(m)];
    const GrokitAttnRow& r = rows[static_cast<size_t>(m)];
    const grokit::kernels::AttentionShape sh{Hq, KV, dh, r.cap, mult, 30.0f};
    ASSERT_TRUE(grokit::kernels::attention(q.data() + m * Hq * dh, 1, &r.pos, caches[i].k->data(), caches[i].v->data(),
                                           caches[i].valid->data(), r.n_keys, sh, want.data() + m * Hq * dh, nullptr)
                    .ok());
  }
  const PageBuf<unsigned int> errors(2, 0);
  const at::Args a{q.data(), got.data(), rd.data(), M, max_keys, static_cast<int>(Hq), static_cast<int>(KV),
                   static_cast<int>(Hq / KV), static_cast<int>(dh), mult, 30.0f, errors.data()};
  at::PrefillPlan p{};
  ASSERT_TRUE(at::pf::plan(a, sms, &p));
  EXPECT_EQ(p.nsplit, want_splits) << "the case meant to exercise " << want_splits << " splits";
  const PageBuf<double> scratch(p.bytes / 8 + 1, std::nan(""));
  auto* base = reinterpret_cast<unsigned char*>(scratch.data());
  auto* stats = reinterpret_cast<float4*>(base + p.off_stats);
  auto* part = reinterpret_cast<float*>(base + p.off_part);
  const dim3 grid(static_cast<unsigned>(Hq), static_cast<unsigned>(p.tiles), static_cast<unsigned>(p.nsplit));
  auto passes = [&](auto dhp) {
    constexpr int D = decltype(dhp)::value;
    using C = at::pf::Cfg<D>;
    launch(grid, C::smem(false), [&] { at::pf::prefill_kernel<D, 0>(a, p, stats, part); }, at::pf::kThreads);
    launch(grid, C::smem(false), [&] { at::pf::prefill_kernel<D, 1>(a, p, stats, part); }, at::pf::kThreads);
    launch(grid, C::smem(true), [&] { at::pf::prefill_kernel<D, 2>(a, p, stats, part); }, at::pf::kThreads);
  };
  switch (p.dhp) {
    case 64: passes(std::integral_constant<int, 64>{}); break;
    case 128: passes(std::integral_constant<int, 128>{}); break;
    default: passes(std::integral_constant<int, 256>{}); break;
  }
  if (p.nsplit > 1) {
    const int64_t total = M * Hq * dh;
    const dim3 cgrid(static_cast<unsigned>(std::min<int64_t>(4, (total + 255) / 256)), 1, 1);
    launch(cgrid, 0, [&] { at::pf::combine_splits(part, total, static_cast<int>(dh), p.nsplit, got.data()); },
           at::pf::kCombineThreads);
  }
  EXPECT_EQ(errors[0], 0u);
  size_t differ = 0;
  int bad = 0;
  for (int64_t m = 0; m < M; ++m) {
    const GrokitAttnRow& r = rows[static_cast<size_t>(m)];
    const size_t pi = prompt_of[static_cast<size_t>(m)];
    for (int64_t h = 0; h < Hq; ++h) {
      // 2^-6 of the largest |v| of the row's keys (the budget's scale).
      double vmax = 0;
      const int64_t kvh = h / (Hq / KV);
      for (int64_t j = 0; j < r.n_keys; ++j)
        for (int64_t d = 0; d < dh; ++d)
          vmax = std::max(vmax, std::fabs(double(grokit::bf16_bits_to_f32(
                                    (*caches[pi].v)[static_cast<size_t>((kvh * r.cap + j) * dh + d)]))));
      for (int64_t d = 0; d < dh; ++d) {
        const size_t i = static_cast<size_t>((m * Hq + h) * dh + d);
        if (std::memcmp(&got[i], &want[i], 4) == 0) continue;
        ++differ;
        const double allowed = 2 * std::ldexp(1.0, std::ilogb(std::max(std::fabs(double(want[i])), 1e-30)) - 7) +
                               0x1p-6 * vmax;
        if (!(std::fabs(double(got[i]) - double(want[i])) <= allowed) && bad++ < 5)
          ADD_FAILURE() << "row " << m << " (pos " << r.pos << ") head " << h << " dim " << d << ": got " << got[i]
                        << ", the twin " << want[i];
      }
    }
  }
  EXPECT_EQ(bad, 0);
  EXPECT_LE(differ, want.size() / 100) << differ << " of " << want.size() << " not bit-equal (" << p.nsplit
                                        << " splits of " << p.chunk << " keys, " << p.tiles << " tiles)";
}

TEST(CudaEmulation, PrefillAttentionMatchesTheTwin) {
  Rng rng(61);
  const float m128 = 0.08838834764831845f, m16 = 0.25f;
  // A 70-row prompt (two tiles, the second of 6 rows) with 3 padding keys first, so its
  // first rows see no valid key (uniform weights); Grok-1's head_dim and group of 6.
  check_prefill_attention("one prompt", 6, 1, 128, m128, 2, {{80, 70, 3, 0, 70}}, 132, rng, 1);
  // Two prompts in one tile (two runs), the second after a cached prefix of 40 keys, and
  // few tiles on many SMs: the keys split.
  check_prefill_attention("two runs, splits", 4, 2, 128, m128, 2, {{40, 30, 0, 0, 30}, {700, 690, 2, 40, 20}}, 132,
                          rng, 3);
  // head_dim 16 (padded to 64; odd dims: the 4-byte loads), and 20 (not a multiple of 8).
  check_prefill_attention("head_dim 16", 4, 4, 16, m16, 2, {{50, 45, 0, 0, 45}}, 8, rng, 1);
  check_prefill_attention("head_dim 20", 2, 1, 20, 0.22360679774997896f, 2, {{40, 33, 1, 0, 33}}, 8, rng, 1);
  // 45 padding keys: the first valid key lies past the first warp's 32 (first_valid's
  // per-warp minimum across the block).
  check_prefill_attention("45 padding keys", 2, 1, 128, m128, 2, {{100, 90, 45, 0, 90}}, 8, rng, 1);
  // head_dim 160 (padded to 256: tiles of 32 keys), logits past the cap.
  check_prefill_attention("head_dim 160, capped", 2, 1, 160, 1.0f, 4, {{72, 70, 0, 0, 70}}, 8, rng, 1);
}

// ---- residual_norm and rope_store --------------------------------------------------

// residual_norm's kernel in every mode (y as it is, rounded, a token's routed rows
// combined; with and without the next norm; float4 groups or single elements) against
// the CPU twin within the parity harness's budget (1 bf16 ulp, at most 2% of the
// elements not bit-equal: the reduction runs in another order), and against the CUDA ops
// it replaces, bit for bit: rmsnorm's kernel emulated, the elementwise ops (round_bf16,
// moe_combine, add_bf16) done here as their kernels do them.
TEST(CudaEmulation, ResidualNormMatchesTheTwinAndTheOpsInTurn) {
  namespace nm = grokit::kernels::cuda::norm;
  using grokit::round_bf16;
  using grokit::kernels::cuda::add_rn;
  using grokit::kernels::cuda::mul_rn;
  Rng rng(61);
  struct Shape {
    int64_t M, D;
    int mode;  // 0 y, 1 bf16(y), 2 combined (top 2)
    bool next;
  };
  const Shape shapes[] = {{2, 6144, 0, true}, {3, 96, 1, true}, {1, 100, 1, false},
                          {2, 200, 2, true},  {1, 6144, 2, true}, {2, 37, 2, false}};
  for (const Shape& c : shapes) {
    SCOPED_TRACE("M " + std::to_string(c.M) + " D " + std::to_string(c.D) + " mode " + std::to_string(c.mode) +
                 (c.next ? " with the next norm" : ""));
    const int64_t M = c.M, D = c.D, top = c.mode == 2 ? 2 : 1;
    std::vector<float> y(static_cast<size_t>(M * top * D)), gates(static_cast<size_t>(M * top)),
        x(static_cast<size_t>(M * D)), post(static_cast<size_t>(D)), next(static_cast<size_t>(D));
    for (auto& v : y) v = rng.f32(-2.0f, 2.0f);
    if (c.mode == 0) for (auto& v : y) v = round_bf16(v);  // as the engine's unrounded inputs are
    for (auto& v : gates) v = rng.f32(0.05f, 0.95f);
    for (auto& v : x) v = rng.bf16_value(-6, 3);
    for (auto& v : post) v = rng.bf16_value(-2, 1);
    for (auto& v : next) v = rng.bf16_value(-2, 1);
    const float eps = 1e-5f;
    std::vector<float> want_x = x, want_a(x.size(), std::nanf(""));
    ASSERT_EQ(grokit_host_ops()->residual_norm(y.data(), c.mode == 2 ? gates.data() : nullptr, top, c.mode == 1 ? 1 : 0,
                                               M, D, post.data(), eps, want_x.data(), c.next ? next.data() : nullptr,
                                               c.next ? want_a.data() : nullptr, nullptr),
              GROKIT_OK)
        << grokit_host_ops()->error_message();

    // The kernel, everything but the scales guarded.
    const PageBuf<float> gy(y), gg(gates), gx(x), ga(x.size(), std::nanf(""));
    const bool vec = D % 4 == 0;
    auto run = [&](auto kvec, auto kmode) {
      launch(dim3(static_cast<unsigned>(M), 1, 1), 0,
             [&] {
               grokit::kernels::cuda::residual_norm_kernel<decltype(kvec)::value, decltype(kmode)::value>(
                   gy.data(), gg.data(), top, M, D, post.data(), eps, gx.data(), c.next ? next.data() : nullptr,
                   ga.data());
             },
             nm::kThreads, {gy.region(), gg.region(), gx.region(), ga.region()});
    };
    using T = std::true_type;
    using F = std::false_type;
    using M0 = std::integral_constant<int, 0>;
    using M1 = std::integral_constant<int, 1>;
    using M2 = std::integral_constant<int, 2>;
    if (vec) c.mode == 0 ? run(T{}, M0{}) : c.mode == 1 ? run(T{}, M1{}) : run(T{}, M2{});
    else c.mode == 0 ? run(F{}, M0{}) : c.mode == 1 ? run(F{}, M1{}) : run(F{}, M2{});

    // Against the ops in turn: t = y' (rounded or combined), t = rmsnorm(t), x = bf16(x + t),
    // a = rmsnorm(x).
    std::vector<float> t(x.size()), turn_x = x, turn_a(x.size(), std::nanf(""));
    for (int64_t m = 0; m < M; ++m)
      for (int64_t d = 0; d < D; ++d) {
        float v = y[static_cast<size_t>(m * top * D + d)];
        if (c.mode == 1) v = round_bf16(v);
        if (c.mode == 2) {
          float acc = 0.0f;
          for (int64_t k = 0; k < top; ++k)
            acc = add_rn(acc, mul_rn(round_bf16(gates[static_cast<size_t>(m * top + k)]),
                                     y[static_cast<size_t>((m * top + k) * D + d)]));
          v = round_bf16(acc);
        }
        t[static_cast<size_t>(m * D + d)] = v;
      }
    // Against the twin, with the slack of a normed addend one bf16 step off.
    std::vector<float> t_twin(t.size());
    ASSERT_TRUE(grokit::kernels::rmsnorm(t.data(), M, D, post.data(), eps, t_twin.data(), nullptr).ok());
    const auto slack = payloads::residual_norm_slack(t_twin, want_x, c.next ? next.data() : nullptr, M, D, eps);
    auto near = [&](const char* what, const std::vector<float>& want, const PageBuf<float>& got,
                    const std::vector<double>& extra) {
      size_t differ = 0;
      int bad = 0;
      for (size_t i = 0; i < want.size(); ++i) {
        if (std::memcmp(&want[i], &got[i], 4) == 0) continue;
        ++differ;
        const double allowed = payloads::bf16_ulp(std::max(std::fabs(double(want[i])), std::fabs(double(got[i])))) + extra[i];
        if (!(std::fabs(double(got[i]) - double(want[i])) <= allowed) && bad++ < 5)
          ADD_FAILURE() << what << " element " << i << ": got " << got[i] << ", the twin " << want[i] << " (allowed "
                        << allowed << ")";
      }
      EXPECT_LE(differ, want.size() / 50) << what << ": " << differ << " of " << want.size() << " not bit-equal";
    };
    near("x", want_x, gx, slack.x);
    if (c.next) near("a", want_a, ga, slack.a);

    auto rmsnorm = [&](const std::vector<float>& in, const std::vector<float>& scale, std::vector<float>& out) {
      launch(dim3(static_cast<unsigned>(M), 1, 1), 0,
             [&] {
               if (vec) nm::rmsnorm_kernel<true>(in.data(), M, D, scale.data(), eps, out.data());
               else nm::rmsnorm_kernel<false>(in.data(), M, D, scale.data(), eps, out.data());
             },
             nm::kThreads);
    };
    rmsnorm(t, post, t);
    for (size_t i = 0; i < t.size(); ++i) turn_x[i] = round_bf16(add_rn(turn_x[i], t[i]));
    EXPECT_EQ(0, std::memcmp(turn_x.data(), gx.data(), x.size() * 4)) << "x differs from the ops in turn";
    if (c.next) {
      rmsnorm(turn_x, next, turn_a);
      EXPECT_EQ(0, std::memcmp(turn_a.data(), ga.data(), x.size() * 4)) << "a differs from the ops in turn";
    } else {
      for (size_t i = 0; i < x.size(); ++i) ASSERT_TRUE(std::isnan(ga[i])) << "a written without the next norm";
    }
  }
}

// rope_store's kernel against the CPU twins (rope of q, rope of k, kv_store), bit for bit:
// rows of two caches, a padding token (valid 0), and a row whose position is outside its
// cache (rotated, not stored, an error raised).
TEST(CudaEmulation, RopeStoreMatchesRopeAndKvStore) {
  namespace rt = grokit::kernels::cuda::rot;
  Rng rng(67);
  const int64_t KV = 2, dh = 128, Hq = 6 * KV;
  const int64_t caps[] = {7, 300};
  struct R {
    int seq;
    int32_t pos, token;
  };
  const R rows[] = {{0, 6, 5}, {1, 12, 0}, {1, 13, 9}, {1, 299, 1}, {0, 7, 3}};  // the last: pos == cap
  const int64_t M = std::size(rows);
  std::vector<float> q(static_cast<size_t>(M * Hq * dh)), k(static_cast<size_t>(M * KV * dh)), v(k.size());
  for (auto& e : q) e = rng.bf16_value(-6, 3);
  for (auto& e : k) e = rng.bf16_value(-6, 3);
  for (auto& e : v) e = rng.bf16_value(-8, 4);
  std::vector<int32_t> pos;
  for (const R& r : rows) pos.push_back(r.pos);
  // The twins: rope on q and k, then the rows that fit stored.
  std::vector<float> want_q = q, want_k = k;
  ASSERT_TRUE(grokit::kernels::rope(want_q.data(), M, Hq, dh, pos.data(), 10000.0, nullptr).ok());
  ASSERT_TRUE(grokit::kernels::rope(want_k.data(), M, KV, dh, pos.data(), 10000.0, nullptr).ok());
  std::vector<std::unique_ptr<PageBuf<uint16_t>>> kc, vc;
  std::vector<std::unique_ptr<PageBuf<uint8_t>>> valid;
  std::vector<std::vector<uint16_t>> want_kc, want_vc;
  std::vector<std::vector<uint8_t>> want_valid;
  for (int64_t cap : caps) {
    kc.push_back(std::make_unique<PageBuf<uint16_t>>(static_cast<size_t>(KV * cap * dh)));
    vc.push_back(std::make_unique<PageBuf<uint16_t>>(static_cast<size_t>(KV * cap * dh)));
    valid.push_back(std::make_unique<PageBuf<uint8_t>>(static_cast<size_t>(cap), uint8_t{7}));
    for (auto& e : *kc.back()) e = rng.bf16_bits(-6, 3);
    for (auto& e : *vc.back()) e = rng.bf16_bits(-6, 3);
    want_kc.emplace_back(kc.back()->begin(), kc.back()->end());
    want_vc.emplace_back(vc.back()->begin(), vc.back()->end());
    want_valid.emplace_back(valid.back()->begin(), valid.back()->end());
  }
  const PageBuf<GrokitAttnRow> rd(static_cast<size_t>(M));
  for (int64_t m = 0; m < M; ++m) {
    const R& r = rows[m];
    const auto s = static_cast<size_t>(r.seq);
    rd[static_cast<size_t>(m)] = {kc[s]->data(), vc[s]->data(), valid[s]->data(), caps[s], r.pos + 1, r.pos, r.token};
    if (r.pos >= caps[s]) continue;
    for (int64_t h = 0; h < KV; ++h)
      for (int64_t d = 0; d < dh; ++d) {
        const size_t at = static_cast<size_t>((h * caps[s] + r.pos) * dh + d);
        want_kc[s][at] = grokit::f32_to_bf16_bits(want_k[static_cast<size_t>((m * KV + h) * dh + d)]);
        want_vc[s][at] = grokit::f32_to_bf16_bits(v[static_cast<size_t>((m * KV + h) * dh + d)]);
      }
    want_valid[s][static_cast<size_t>(r.pos)] = r.token > 0 ? 1 : 0;
  }
  // The kernel, every buffer guarded.
  const PageBuf<float> gq(q), gk(k), gv(v);
  const PageBuf<int32_t> gpos(pos);
  const PageBuf<unsigned int> errors(2, 0);
  std::vector<Region> guard = {gq.region(), gk.region(), gv.region(), gpos.region(), rd.region(), errors.region()};
  for (size_t i = 0; i < kc.size(); ++i)
    guard.insert(guard.end(), {kc[i]->region(), vc[i]->region(), valid[i]->region()});
  launch(dim3(static_cast<unsigned>(M), 1, 1), sizeof(float) * static_cast<size_t>(dh),
         [&] {
           grokit::kernels::cuda::rope_store_kernel<>(gq.data(), gk.data(), gv.data(), M, gpos.data(), rd.data(), Hq, KV,
                                                      dh, 10000.0, errors.data());
         },
         rt::kThreads, guard);
  EXPECT_EQ(0, std::memcmp(want_q.data(), gq.data(), q.size() * 4)) << "q differs from rope";
  EXPECT_EQ(0, std::memcmp(want_k.data(), gk.data(), k.size() * 4)) << "k differs from rope";
  for (size_t i = 0; i < kc.size(); ++i) {
    EXPECT_EQ(0, std::memcmp(want_kc[i].data(), kc[i]->data(), want_kc[i].size() * 2)) << "key cache " << i;
    EXPECT_EQ(0, std::memcmp(want_vc[i].data(), vc[i]->data(), want_vc[i].size() * 2)) << "value cache " << i;
    EXPECT_EQ(0, std::memcmp(want_valid[i].data(), valid[i]->data(), want_valid[i].size())) << "valid " << i;
  }
  EXPECT_EQ(errors[0], static_cast<unsigned int>(GROKIT_DEVERR_KV_ROW)) << "the row past its cache raised no error";
}

}  // namespace
