// grokit kernels: the operations of the Grok-1 forward pass on the CPU.
//
// Every op comes twice with the same signature: `<op>` (multi-threaded, AVX2/FMA where
// the CPU has it) and `<op>_ref` (plain scalar C++, the ground truth the tests compare
// against). A CUDA backend gives each op a third twin with the same signature but a
// stream in place of the pool. Launch parameters are raw pointers; a null pool runs on
// the calling thread. Ops return a Status; invalid arguments are invariants (they abort).
//
// Numerics follow the official forward pass (format/SPEC.md and the reference
// scripts/reference.py): activations travel as fp32 arrays holding bf16 values where
// the official code holds bf16, products of bf16 operands accumulate in fp32 (matrix
// products in a pinned order, see below; attention and the router exactly, in double),
// and each op says where it rounds. Transcendentals (exp, tanh, sin, cos) are evaluated
// in double and rounded to fp32, so that independent implementations agree to the bit.
// For any row of a batch, the result does not depend on the other rows (batched equals
// alone).
#pragma once

#include <cstdint>

#include "common/common.h"

namespace grokit::kernels {

using Pool = ThreadPool*;

// Which SIMD path the dispatching ops use ("avx2" or "scalar"); GROKIT_KERNELS=scalar
// in the environment forces the scalar twins.
const char* cpu_kernel_path();
// How the AVX-512 products of 3+ rows of bf16 x add each pair of terms, "vdpbf16ps" or
// "fma" (the same sums in the same order; timed once per process, the faster one on this
// core; GROKIT_BF16_PRODUCTS=fma|vdpbf16ps forces one); "" on other paths.
const char* cpu_bf16_pair_form();

// ---------------------------------------------------------------------------------
// Matrix products accumulate in fp32 in a pinned order, the order of the AVX-512 bf16
// dot-product instruction (vdpbf16ps), so that every twin (and scripts/reference.py)
// gets the same bits: products of bf16 values are exact in fp32, and each pair of
// terms (k, k+1) is added as  acc = acc + x[k+1] w[k+1];  acc = acc + x[k] w[k].
// A missing term (past K) adds nothing.
//
// Weight-only int8 product, the release's layout: codes [K, N] row-major with bf16
// scales [B, N]; rows [b*K/B, (b+1)*K/B) use scale row b:
//   y[m, n] = sum_k x[m, k] w[k, n],   w[k, n] = bf16(code[k, n] * scale[k / (K/B), n])
// x [M, K] (row stride ldx) holds bf16 values; y [M, N] (row stride ldy) gets fp32 sums
// in the pair order above. The caller rounds y where the forward pass does.
//
// sum_rows splits the sum over k into independent chains of sum_rows rows each (0: one
// chain), combined by a pairwise tree (adjacent sums added level by level, an odd last
// one carried up). The products whose rows tensor parallelism splits (attention output,
// expert down projection) use the model's sum_rows (format::ModelConfig), and the
// ranks' partial sums meet in the same tree, so every TP degree gets the TP-1 bits.
Status matmul_q8(const float* x, int64_t M, int64_t K, int64_t ldx, const int8_t* codes, const uint16_t* scales,
                 int64_t N, int64_t blocks, float* y, int64_t ldy, Pool pool, int64_t sum_rows = 0);
Status matmul_q8_ref(const float* x, int64_t M, int64_t K, int64_t ldx, const int8_t* codes, const uint16_t* scales,
                     int64_t N, int64_t blocks, float* y, int64_t ldy, Pool pool, int64_t sum_rows = 0);

// Several products of one x (the attention's query, key and value; an expert's gate and
// up): each y exactly matmul_q8's, the decode-sized ones on one task plan, so that the
// threads meet once for all of them rather than once per product.
struct Q8Operand {
  const int8_t* codes = nullptr;
  const uint16_t* scales = nullptr;
  int64_t N = 0, blocks = 1;
  float* y = nullptr;
  int64_t ldy = 0;
};
Status matmul_q8_multi(const float* x, int64_t M, int64_t K, int64_t ldx, const Q8Operand* ops, int64_t count,
                       Pool pool, int64_t sum_rows = 0);

// The pairwise tree of sum_rows: v[0..n) reduced in place, level by level (v[i] =
// v[2i] + v[2i+1], an odd last element carried up); returns the total.
float tree_sum(float* v, int64_t n);

// The same product for fp32 activations (the expert down projection, h = gelu(g) * u,
// which the official code keeps in fp32): acc = fma(x[k], w[k], acc) in k order.
Status matmul_q8_f32(const float* x, int64_t M, int64_t K, int64_t ldx, const int8_t* codes, const uint16_t* scales,
                     int64_t N, int64_t blocks, float* y, int64_t ldy, Pool pool, int64_t sum_rows = 0);
Status matmul_q8_f32_ref(const float* x, int64_t M, int64_t K, int64_t ldx, const int8_t* codes,
                         const uint16_t* scales, int64_t N, int64_t blocks, float* y, int64_t ldy, Pool pool,
                         int64_t sum_rows = 0);

// ---------------------------------------------------------------------------------
// The quantized schemes (grokit quantize; SPEC.md §4 and §4.1). Same arguments as
// matmul_q8 with the weight given by its stored payload.
//
// k-chunked weights (q4g: int4 in groups of `group` rows, bf16 scale per group and
// column; f8col: fp8 E4M3, bf16 scale per column), w[k, n] = bf16(q * scale). Per output
// column, 16 fp32 lanes; for each 32-row chunk c of a chain:
//   bf16 x:  lane i adds x[32c+2i+1] w[32c+2i+1], then x[32c+2i] w[32c+2i]
//   fp32 x:  lane i adds fma(x[32c+i], w[32c+i], .), then fma(x[32c+16+i], w[32c+16+i], .)
// and at the end of each chain (sum_rows rows, a multiple of 32 and of the group; 0:
// one chain) the lanes are summed by halving (i += i+8, +4, +2, +1); chains meet in
// tree_sum. `payload` is one matrix (experts are format::WeightView::matrix_bytes apart).
Status matmul_q4(const float* x, int64_t M, int64_t K, int64_t ldx, const uint8_t* payload, int64_t group, int64_t N,
                 float* y, int64_t ldy, Pool pool, int64_t sum_rows = 0);
Status matmul_q4_ref(const float* x, int64_t M, int64_t K, int64_t ldx, const uint8_t* payload, int64_t group,
                     int64_t N, float* y, int64_t ldy, Pool pool, int64_t sum_rows = 0);
Status matmul_q4_f32(const float* x, int64_t M, int64_t K, int64_t ldx, const uint8_t* payload, int64_t group,
                     int64_t N, float* y, int64_t ldy, Pool pool, int64_t sum_rows = 0);
Status matmul_q4_f32_ref(const float* x, int64_t M, int64_t K, int64_t ldx, const uint8_t* payload, int64_t group,
                         int64_t N, float* y, int64_t ldy, Pool pool, int64_t sum_rows = 0);
Status matmul_f8(const float* x, int64_t M, int64_t K, int64_t ldx, const uint8_t* payload, int64_t N, float* y,
                 int64_t ldy, Pool pool, int64_t sum_rows = 0);
Status matmul_f8_ref(const float* x, int64_t M, int64_t K, int64_t ldx, const uint8_t* payload, int64_t N, float* y,
                     int64_t ldy, Pool pool, int64_t sum_rows = 0);
Status matmul_f8_f32(const float* x, int64_t M, int64_t K, int64_t ldx, const uint8_t* payload, int64_t N, float* y,
                     int64_t ldy, Pool pool, int64_t sum_rows = 0);
Status matmul_f8_f32_ref(const float* x, int64_t M, int64_t K, int64_t ldx, const uint8_t* payload, int64_t N,
                         float* y, int64_t ldy, Pool pool, int64_t sum_rows = 0);

// bf16 weights [K, N] row-major (the bf16 scheme): the int8 products' orders exactly
// (column lanes; pairs for bf16 x, fma in k order for fp32 x; chains and tree).
Status matmul_bf16(const float* x, int64_t M, int64_t K, int64_t ldx, const uint16_t* w, int64_t N, float* y,
                   int64_t ldy, Pool pool, int64_t sum_rows = 0);
Status matmul_bf16_ref(const float* x, int64_t M, int64_t K, int64_t ldx, const uint16_t* w, int64_t N, float* y,
                       int64_t ldy, Pool pool, int64_t sum_rows = 0);
Status matmul_bf16_f32(const float* x, int64_t M, int64_t K, int64_t ldx, const uint16_t* w, int64_t N, float* y,
                       int64_t ldy, Pool pool, int64_t sum_rows = 0);
Status matmul_bf16_f32_ref(const float* x, int64_t M, int64_t K, int64_t ldx, const uint16_t* w, int64_t N, float* y,
                           int64_t ldy, Pool pool, int64_t sum_rows = 0);

// E4M3 to fp32 (OCP FP8: bias 7, no infinities, S.1111.111 NaN, subnormals m * 2^-9).
float e4m3_to_f32(uint8_t v);

// bf16 matrix against transposed rows (the embedding as the output projection:
// logits = x @ E^T): y[m, n] = sum_k x[m, k] w[n, k], x holding bf16 values, w bf16 bits
// [N, K] row-major. Sixteen fp32 lanes: lane i takes the pairs k = 32j + 2i, 32j + 2i + 1
// for j = 0, 1, ... in the pair order above; then the lanes are summed by halving
// (lane i += lane i+8, then i+4, i+2, i+1).
Status matmul_bf16_nt(const float* x, int64_t M, int64_t K, const uint16_t* w, int64_t N, float* y, int64_t ldy,
                      Pool pool);
Status matmul_bf16_nt_ref(const float* x, int64_t M, int64_t K, const uint16_t* w, int64_t N, float* y, int64_t ldy,
                          Pool pool);

// ---------------------------------------------------------------------------------
// RMSNorm: out[m, :] = bf16((x * (1 / sqrt(mean(x*x) + eps))) * scale), all in fp32.
// x and out [M, D] may alias.
Status rmsnorm(const float* x, int64_t M, int64_t D, const float* scale, float eps, float* out, Pool pool);
Status rmsnorm_ref(const float* x, int64_t M, int64_t D, const float* scale, float eps, float* out, Pool pool);

// Rotary embedding on split halves, in place: x [M, heads, dh] (bf16 values), row m at
// position positions[m]: x' = bf16(x * cos + rotate_half(x) * sin), rotate_half([a, b]) =
// [-b, a], phase[j] = fp32(position) * inv_freq[j] with inv_freq[j] = fp32(1 / base^(2j/dh))
// duplicated over both halves; cos and sin of the fp32 phase in double, rounded.
Status rope(float* x, int64_t M, int64_t heads, int64_t dh, const int32_t* positions, double base, Pool pool);
Status rope_ref(float* x, int64_t M, int64_t heads, int64_t dh, const int32_t* positions, double base, Pool pool);

// ---------------------------------------------------------------------------------
// Attention of M query rows of one sequence over its KV cache.
// q: [M, Hq, dh] (bf16 values) at positions q_pos[m]; k_cache, v_cache: bf16 bits
// [KV, cap, dh] holding keys for positions [0, n_keys); key_valid[j] != 0 when the token
// at position j is real (not padding). Query head h uses kv head h / (Hq / KV).
// s = fp32(bf16(q . k)) * multiplier; s = cap * tanh(s / cap); keys after q_pos or
// padding get -1e30; softmax in fp32; weights rounded to bf16; o = bf16(sum w * v).
// A row with no visible key attends uniformly to all n_keys keys (as -1e30 everywhere
// does in the official code). o: [M, Hq * dh].
struct AttentionShape {
  int64_t q_heads, kv_heads, head_dim, cap;  // cap: allocated positions per kv head
  float multiplier, logit_cap;
};
Status attention(const float* q, int64_t M, const int32_t* q_pos, const uint16_t* k_cache, const uint16_t* v_cache,
                 const uint8_t* key_valid, int64_t n_keys, const AttentionShape& shape, float* o, Pool pool);
Status attention_ref(const float* q, int64_t M, const int32_t* q_pos, const uint16_t* k_cache,
                     const uint16_t* v_cache, const uint8_t* key_valid, int64_t n_keys, const AttentionShape& shape,
                     float* o, Pool pool);

// ---------------------------------------------------------------------------------
// Router: probs = softmax(x @ w) in fp32 (x [M, D] fp32, w [D, E] fp32), then the top k
// experts by probability, ties to the lower index; gates are the probabilities as they
// are (not renormalized). experts, gates: [M, k].
Status router_topk(const float* x, int64_t M, int64_t D, const float* w, int64_t E, int64_t k, int32_t* experts,
                   float* gates, Pool pool);
Status router_topk_ref(const float* x, int64_t M, int64_t D, const float* w, int64_t E, int64_t k, int32_t* experts,
                       float* gates, Pool pool);

// h = gelu(g) * u in fp32, gelu the tanh approximation as JAX writes it:
// x * (0.5 * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x*x*x)))). h may alias g or u.
Status gelu_mul(const float* g, const float* u, int64_t n, float* h, Pool pool);
Status gelu_mul_ref(const float* g, const float* u, int64_t n, float* h, Pool pool);

// ---------------------------------------------------------------------------------
// Small elementwise ops (no SIMD twin needed: the compiler vectorizes them; each is
// its own reference).
// out = bf16(x) elementwise (round to nearest even).
void round_to_bf16(const float* x, int64_t n, float* out);
// out = bf16(bf16(x) * multiplier) elementwise (the logits' output multiplier), SIMD and
// on the pool; out may alias x.
Status scale_bf16(const float* x, int64_t n, float multiplier, float* out, Pool pool);
Status scale_bf16_ref(const float* x, int64_t n, float multiplier, float* out, Pool pool);
// out = bf16(a + b) (the residual add of two bf16 arrays).
void add_bf16(const float* a, const float* b, int64_t n, float* out);
// Embedding rows [row_start, row_start + rows) of a vocabulary-split bf16 table:
// out[m, :] = bf16(E[tok] * multiplier) when tok falls in this part, else 0.
void embed(const int32_t* tokens, int64_t M, const uint16_t* table, int64_t row_start, int64_t rows, int64_t D,
           float multiplier, float* out);

}  // namespace grokit::kernels
