// The prefill path of the CUDA weight products (kernels/cuda/matmul.h): one matrix at a
// time dequantized to a bf16 scratch [K, N], x rows gathered as bf16 (hi and lo for fp32
// x), products by cuBLASLt (bf16 x bf16 -> fp32, fp32 compute), y rows scattered.
#include <algorithm>
#include <climits>

#include "kernels/cuda/matmul_internal.cuh"

namespace grokit::kernels::cuda::mm {
namespace {

constexpr size_t kLtWorkspace = size_t{32} << 20;
constexpr uint64_t kChunkBytes = uint64_t{96} << 20;  // x (bf16) and y rows of one step
constexpr int kNoAlgo = -1;                           // cuBLASLt has no kernel for the shape

int check_lt(cublasStatus_t s, const char* what) {
  if (s == CUBLAS_STATUS_SUCCESS) return GROKIT_OK;
  const int code = s == CUBLAS_STATUS_ALLOC_FAILED ? GROKIT_ERR_MEMORY : GROKIT_ERR_DEVICE;
  return set_error(code, "matmul: cuBLASLt %s: %s (status %d)", what, cublasLtGetStatusString(s), static_cast<int>(s));
}

uint32_t alignment(const void* p) {
  const auto a = reinterpret_cast<uintptr_t>(p);
  uint32_t r = 256;
  while (r > 1 && (a & (r - 1)) != 0) r >>= 1;
  return r;
}

struct LtDescs {
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
  cublasLtMatmulPreference_t pref = nullptr;
  LtDescs() = default;
  LtDescs(const LtDescs&) = delete;
  LtDescs& operator=(const LtDescs&) = delete;
  ~LtDescs() {
    if (pref != nullptr) cublasLtMatmulPreferenceDestroy(pref);
    if (c != nullptr) cublasLtMatrixLayoutDestroy(c);
    if (b != nullptr) cublasLtMatrixLayoutDestroy(b);
    if (a != nullptr) cublasLtMatrixLayoutDestroy(a);
    if (op != nullptr) cublasLtMatmulDescDestroy(op);
  }
};

// Rows of x the algorithm of a product is chosen for: n rounded up to a power of two
// (multiples of 8192 above it). A routed prefill gives each expert its own row count, so
// asking cuBLASLt's heuristic for every exact count (tens of microseconds of host time
// each, with the stream drained while the host waits) would cost a long prompt about a
// millisecond per layer.
int64_t rows_bucket(int64_t n) {
  if (n > 8192) return (n + 8191) / 8192 * 8192;
  int64_t b = 16;
  while (b < n) b <<= 1;
  return b;
}

// t.b, t.c: the layouts of x^T (K x n, bf16) and y^T (N x n, fp32, ld ldd).
int xy_layouts(LtDescs& t, int64_t N, int64_t n, int64_t K, int64_t ldd) {
  if (int rc = check_lt(cublasLtMatrixLayoutCreate(&t.b, CUDA_R_16BF, static_cast<uint64_t>(K), static_cast<uint64_t>(n), K),
                        "layout of x");
      rc != GROKIT_OK)
    return rc;
  return check_lt(cublasLtMatrixLayoutCreate(&t.c, CUDA_R_32F, static_cast<uint64_t>(N), static_cast<uint64_t>(n), ldd),
                  "layout of y");
}

// The heuristic's first algorithm for D^T (N x n) = W^T X^T (gemm, below) with n rows,
// into *algo; kNoAlgo when it has none.
int find_algo(Ctx& c, const LtDescs& t, int64_t N, int64_t n, int64_t K, int64_t ldd, uint32_t aa, uint32_t ab,
              uint32_t ac, cublasLtMatmulAlgo_t* algo) {
  LtDescs q;  // layouts of x and y for n rows (the operation's descriptor is t's)
  if (int rc = xy_layouts(q, N, n, K, ldd); rc != GROKIT_OK) return rc;
  if (int rc = check_lt(cublasLtMatmulPreferenceCreate(&q.pref), "preference"); rc != GROKIT_OK) return rc;
  const uint64_t ws = kLtWorkspace;
  cublasLtMatmulPreferenceSetAttribute(q.pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof ws);
  cublasLtMatmulPreferenceSetAttribute(q.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &aa, sizeof aa);
  cublasLtMatmulPreferenceSetAttribute(q.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &ab, sizeof ab);
  cublasLtMatmulPreferenceSetAttribute(q.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &ac, sizeof ac);
  cublasLtMatmulPreferenceSetAttribute(q.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &ac, sizeof ac);
  cublasLtMatmulHeuristicResult_t res{};
  int count = 0;
  const cublasStatus_t s = cublasLtMatmulAlgoGetHeuristic(c.lt, t.op, t.a, q.b, q.c, q.c, q.pref, 1, &res, &count);
  if (s == CUBLAS_STATUS_NOT_SUPPORTED || (s == CUBLAS_STATUS_SUCCESS && (count < 1 || res.state != CUBLAS_STATUS_SUCCESS)))
    return kNoAlgo;
  if (int rc = check_lt(s, "heuristic"); rc != GROKIT_OK) return rc;
  *algo = res.algo;
  return GROKIT_OK;
}

// D [n, N] fp32 (row stride ldd) = X [n, K] bf16 (row stride K) @ W [K, N] bf16 (row
// stride N) + beta * D. cuBLASLt is column-major, so this is D^T (N x n, ld ldd) =
// W^T (N x K, ld N) X^T (K x n, ld K), no transposes. The algorithm: the one cached for
// this exact shape; else the one chosen for n's bucket (rows_bucket), if cuBLASLt's
// check accepts it for this shape; else the heuristic's for this shape. kNoAlgo when no
// kernel fits.
int gemm(Ctx& c, const uint16_t* W, const uint16_t* X, float* D, int64_t ldd, int64_t N, int64_t n, int64_t K,
         float beta) {
  LtDescs t;
  if (int rc = check_lt(cublasLtMatmulDescCreate(&t.op, CUBLAS_COMPUTE_32F, CUDA_R_32F), "matmul descriptor"); rc != GROKIT_OK)
    return rc;
  if (int rc = check_lt(cublasLtMatrixLayoutCreate(&t.a, CUDA_R_16BF, static_cast<uint64_t>(N), static_cast<uint64_t>(K), N),
                        "layout of W");
      rc != GROKIT_OK)
    return rc;
  if (int rc = xy_layouts(t, N, n, K, ldd); rc != GROKIT_OK) return rc;
  const uint32_t aa = alignment(W), ab = alignment(X), ac = alignment(D);
  // Keys (N, rows, K, ldd, alignments, beta): rows = -n for an exact shape, the bucket's
  // row count for a bucket's choice.
  auto key_of = [&](int64_t rows) { return std::array<int64_t, 8>{N, rows, K, ldd, aa, ab, ac, beta != 0.0f ? 1 : 0}; };
  const auto exact = key_of(-n);
  cublasLtMatmulAlgo_t algo;
  if (auto it = c.algos.find(exact); it != c.algos.end()) {
    algo = it->second;
  } else {
    bool found = false;
    const int64_t nb = rows_bucket(n);
    if (nb != n) {
      const auto bucket = key_of(nb);
      auto bt = c.algos.find(bucket);
      if (bt == c.algos.end()) {
        cublasLtMatmulAlgo_t a;
        const int rc = find_algo(c, t, N, nb, K, ldd, aa, ab, ac, &a);
        if (rc != GROKIT_OK && rc != kNoAlgo) return rc;
        if (rc == GROKIT_OK) bt = c.algos.emplace(bucket, a).first;
      }
      cublasLtMatmulHeuristicResult_t res{};
      if (bt != c.algos.end() &&
          cublasLtMatmulAlgoCheck(c.lt, t.op, t.a, t.b, t.c, t.c, &bt->second, &res) == CUBLAS_STATUS_SUCCESS &&
          res.workspaceSize <= kLtWorkspace) {
        algo = bt->second;
        found = true;
      }
    }
    if (!found) {
      const int rc = find_algo(c, t, N, n, K, ldd, aa, ab, ac, &algo);
      if (rc != GROKIT_OK) return rc;  // kNoAlgo included
    }
    c.algos.emplace(exact, algo);
  }
  const float alpha = 1.0f;
  const cublasStatus_t ms =
      cublasLtMatmul(c.lt, t.op, &alpha, W, t.a, X, t.b, &beta, D, t.c, D, t.c, &algo, c.ws.p, c.ws.bytes, c.stream);
  if (ms == CUBLAS_STATUS_NOT_SUPPORTED) {  // the algorithm refuses the call: as if none
    c.algos.erase(exact);
    return kNoAlgo;
  }
  return check_lt(ms, "matmul");
}

template <int F>
void launch_dequant(const DequantParams& p, int units, cudaStream_t st) {
  const dim3 grid(blocks_for(p.N, kThreads), static_cast<unsigned>(std::min(units, 65535)));
  dequant_kernel<F><<<grid, kThreads, 0, st>>>(p);
}

// Expert e of w as bf16 [K, N] row-major: in place for bf16 weights, else dequantized
// into c.wb.
int weight_bf16(Ctx& c, const WDesc& d, int64_t e, const uint16_t** out) {
  if (d.fmt == kBF16) {
    *out = reinterpret_cast<const uint16_t*>(d.data + static_cast<uint64_t>(e) * d.stride);
    return GROKIT_OK;
  }
  const DequantParams p = make_dequant_params(d, e, static_cast<uint16_t*>(c.wb.p));
  const int units = static_cast<int>(d.K / unit_rows(d.fmt));
  switch (d.fmt) {
    case kQ8C: launch_dequant<kQ8C>(p, units, c.stream); break;
    case kQ8R: launch_dequant<kQ8R>(p, units, c.stream); break;
    case kQ4: launch_dequant<kQ4>(p, units, c.stream); break;
    default: launch_dequant<kF8>(p, units, c.stream); break;
  }
  *out = p.out;
  return check_launch("matmul: dequantize kernel");
}

int gather(Ctx& c, const float* x, int64_t ldx, const int32_t* rows, int64_t row0, int64_t div, int64_t n, int64_t K,
           uint16_t* hi, uint16_t* lo) {
  const dim3 grid(blocks_for(K, kThreads), static_cast<unsigned>(std::min<int64_t>(n, 65535)));
  gather_x_kernel<><<<grid, kThreads, 0, c.stream>>>(x, ldx, rows, row0, div, n, K, hi, lo);
  return check_launch("matmul: gather x kernel");
}

// y rows = x rows @ W (hi, then lo when fp32 x).
int product(Ctx& c, const uint16_t* W, const uint16_t* hi, const uint16_t* lo, float* D, int64_t ldd, int64_t N,
            int64_t n, int64_t K) {
  if (int rc = gemm(c, W, hi, D, ldd, N, n, K, 0.0f); rc != GROKIT_OK) return rc;
  if (lo != nullptr) return gemm(c, W, lo, D, ldd, N, n, K, 1.0f);
  return GROKIT_OK;
}

}  // namespace

int run_prefill(Ctx& c, const WDesc& d, const float* x, int64_t M, int64_t ldx, bool x_fp32,
                const GrokitRouting* routing, float* y, int64_t ldy, bool capturing, bool* done) {
  *done = false;
  if (routing != nullptr && capturing) return GROKIT_OK;  // grouping waits for the host
  if (c.lt == nullptr) {
    if (capturing) return GROKIT_OK;
    if (int rc = check_lt(cublasLtCreate(&c.lt), "handle"); rc != GROKIT_OK) return rc;
  }
  const int64_t K = d.K, N = d.N;
  const int64_t nb = x_fp32 ? 2 : 1;
  // Rows per step: x (and y, routed) of one step in kChunkBytes.
  int64_t ch = static_cast<int64_t>(kChunkBytes / static_cast<uint64_t>(2 * K * nb));
  if (routing != nullptr) ch = std::min<int64_t>(ch, static_cast<int64_t>(kChunkBytes / static_cast<uint64_t>(4 * N)));
  ch = std::min<int64_t>(std::max<int64_t>(ch, 64), M);
  if (ch > 16) ch = ch / 16 * 16;

  bool ok = true, b = false;
  auto need = [&](DevBuf& buf, size_t bytes) -> int {
    const int rc = ensure(c, buf, bytes, capturing, false, &b);
    ok = ok && b;
    return rc;
  };
  if (d.fmt != kBF16)
    if (int rc = need(c.wb, static_cast<size_t>(K) * static_cast<size_t>(N) * 2); rc != GROKIT_OK) return rc;
  if (int rc = need(c.xb, static_cast<size_t>(ch * K * nb) * 2); rc != GROKIT_OK) return rc;
  if (routing != nullptr) {
    if (int rc = need(c.yt, static_cast<size_t>(ch * N) * 4); rc != GROKIT_OK) return rc;
    if (int rc = need(c.rows, static_cast<size_t>(M) * 4); rc != GROKIT_OK) return rc;
  }
  if (int rc = need(c.ws, kLtWorkspace); rc != GROKIT_OK) return rc;
  if (!ok) return GROKIT_OK;  // capturing without scratch
  uint16_t* xh = static_cast<uint16_t*>(c.xb.p);
  uint16_t* xl = x_fp32 ? xh + ch * K : nullptr;

  if (routing == nullptr) {
    const uint16_t* W = nullptr;
    if (int rc = weight_bf16(c, d, 0, &W); rc != GROKIT_OK) return rc;
    for (int64_t r0 = 0; r0 < M; r0 += ch) {
      const int64_t n = std::min(ch, M - r0);
      if (int rc = gather(c, x, ldx, nullptr, r0, 1, n, K, xh, xl); rc != GROKIT_OK) return rc;
      const int rc = product(c, W, xh, xl, y + r0 * ldy, ldy, N, n, K);
      if (rc == kNoAlgo) return GROKIT_OK;  // the decode kernel takes any shape
      if (rc != GROKIT_OK) return rc;
    }
    *done = true;
    return GROKIT_OK;
  }

  // Routed: the expert ids to the host (waits for the stream), rows grouped per expert
  // in row order.
  const int64_t E = d.E;
  // host_ids: the previous call waited for its copy. host_rows: replaced only after the
  // wait below, which also covers the previous call's copy from it (same stream).
  if (int rc = ensure_host(c.host_ids, static_cast<size_t>(M)); rc != GROKIT_OK) return rc;
  if (int rc = check_cuda(cudaMemcpyAsync(c.host_ids.p, routing->expert, static_cast<size_t>(M) * 4,
                                          cudaMemcpyDeviceToHost, c.stream),
                          "matmul: copying expert ids to the host");
      rc != GROKIT_OK)
    return rc;
  if (int rc = check_cuda(cudaStreamSynchronize(c.stream), "matmul: waiting for expert ids"); rc != GROKIT_OK) return rc;
  if (int rc = ensure_host(c.host_rows, static_cast<size_t>(M)); rc != GROKIT_OK) return rc;
  std::vector<int64_t> start(static_cast<size_t>(E) + 1, 0);
  int64_t unrouted = 0;
  for (int64_t m = 0; m < M; ++m) {
    const int32_t e = c.host_ids.p[m];
    if (e >= E)  // seen here on the host: refused as the CPU twin does
      return set_error(GROKIT_ERR_INVALID, "matmul: row %lld routes to expert %d of %lld", static_cast<long long>(m),
                       e, static_cast<long long>(E));
    if (e < 0)
      ++unrouted;
    else
      ++start[static_cast<size_t>(e) + 1];
  }
  for (int64_t e = 0; e < E; ++e) start[static_cast<size_t>(e) + 1] += start[static_cast<size_t>(e)];
  {
    std::vector<int64_t> at(start.begin(), start.end() - 1);
    for (int64_t m = 0; m < M; ++m) {
      const int32_t e = c.host_ids.p[m];
      if (e >= 0 && e < E) c.host_rows.p[at[static_cast<size_t>(e)]++] = static_cast<int32_t>(m);
    }
  }
  if (M - unrouted > 0) {
    // From pinned memory: the copy runs later in the stream; host_rows is not written
    // again before the next call has waited for this stream.
    if (int rc = check_cuda(cudaMemcpyAsync(c.rows.p, c.host_rows.p, static_cast<size_t>(M - unrouted) * 4,
                                            cudaMemcpyHostToDevice, c.stream),
                            "matmul: copying row lists to the device");
        rc != GROKIT_OK)
      return rc;
  }
  if (unrouted > 0) {
    const dim3 grid(blocks_for(N, kThreads), static_cast<unsigned>(std::min<int64_t>(M, 65535)));
    zero_unrouted_kernel<><<<grid, kThreads, 0, c.stream>>>(routing->expert, M, E, N, y, ldy);
    if (int rc = check_launch("matmul: zero rows kernel"); rc != GROKIT_OK) return rc;
  }
  const auto* rows = static_cast<const int32_t*>(c.rows.p);
  auto* yt = static_cast<float*>(c.yt.p);
  for (int64_t e = 0; e < E; ++e) {
    const int64_t first = start[static_cast<size_t>(e)], count = start[static_cast<size_t>(e) + 1] - first;
    if (count == 0) continue;
    const uint16_t* W = nullptr;
    if (int rc = weight_bf16(c, d, e, &W); rc != GROKIT_OK) return rc;
    for (int64_t r0 = 0; r0 < count; r0 += ch) {
      const int64_t n = std::min(ch, count - r0);
      const int32_t* rl = rows + first + r0;
      if (int rc = gather(c, x, ldx, rl, 0, routing->x_row_div, n, K, xh, xl); rc != GROKIT_OK) return rc;
      const int rc = product(c, W, xh, xl, yt, N, N, n, K);
      if (rc == kNoAlgo) return GROKIT_OK;
      if (rc != GROKIT_OK) return rc;
      const dim3 grid(blocks_for(N, kThreads), static_cast<unsigned>(std::min<int64_t>(n, 65535)));
      scatter_rows_kernel<><<<grid, kThreads, 0, c.stream>>>(yt, rl, n, N, y, ldy);
      if (int rc2 = check_launch("matmul: scatter rows kernel"); rc2 != GROKIT_OK) return rc2;
    }
  }
  *done = true;
  return GROKIT_OK;
}

}  // namespace grokit::kernels::cuda::mm
