// grokit device ops: the forward pass's operations behind one C interface, so that a
// backend can live in a run-time-loaded plugin (libgrokit_cuda.so) and the engine that
// drives it (runner/device_engine.cpp) is the same code for every backend.
//
// Two backends fill a GrokitOps table:
//   - "host": the CPU twins (kernels/ops_cpu.cpp, in grokit_kernels), built from the CPU
//     kernels of kernels/kernels.h; "device memory" is host memory. It is the ground
//     truth of the parity harness (tests/gpu/test_gpu_parity.cpp) and lets the device engine run,
//     and be tested, on a machine without a GPU.
//   - "cuda": one CUDA kernel per op (kernels/cuda/<op>.cu, each with a small header
//     and a host launcher of exactly the signature below), assembled by
//     kernels/cuda/ops_cuda.cu and exported by the plugin as grokit_cuda_ops().
//
// Conventions (both backends):
//   - Every pointer an op reads or writes is device memory of its backend, unless the
//     comment says "host". Descriptors passed by pointer (GrokitWeight, GrokitRouting,
//     GrokitAttnShape) are host memory, read during the call only.
//   - Ops are asynchronous on `stream` (CUDA: a cudaStream_t; host: a grokit::ThreadPool*
//     or NULL, and the op has finished when it returns). Nothing in an op waits for the
//     device, except where its comment says so, so that a decode step can be captured in
//     a CUDA graph.
//   - Activations are float32 arrays; "bf16 values" means float32 values that are exactly
//     representable in bf16, as the CPU engine keeps them (kernels/kernels.h).
//   - Return GROKIT_OK or an error code; grokit_ops_error_message() (per thread) says
//     what. Invalid arguments are errors, not undefined behaviour. n or M == 0 is a no-op.
//   - Numerics: the op's CPU twin defines the result; a CUDA op matches it within the
//     budget the parity harness names for it (summation order may differ; where the CPU
//     twin rounds to bf16, the CUDA op rounds at the same point).
#pragma once

#include <stddef.h>
#include <stdint.h>

// The tables' layout version (GrokitOps, GrokitCollectives): the engine refuses a plugin
// built against another. 1: the first; 2: GrokitCollectives.comm_abort;
// 3: GrokitOps.take_device_errors, GrokitCollectives.comm_async_error;
// 4: GrokitOps.residual_norm, rope_store and matmul_multi, GrokitOps.matmul's flags (was
// x_fp32; ROUND_BF16, GELU_MUL); 5: GrokitOps.host_register, host_unregister;
// 6: GrokitOps.memory_info.
#define GROKIT_OPS_ABI_VERSION 6

#ifdef __cplusplus
extern "C" {
#endif

enum {
  GROKIT_OK = 0,
  GROKIT_ERR_INVALID = 1,      // bad arguments
  GROKIT_ERR_DEVICE = 2,       // the device or its runtime failed
  GROKIT_ERR_MEMORY = 3,       // out of (device or pinned) memory
  GROKIT_ERR_UNSUPPORTED = 4,  // this backend cannot do that (dtype, size)
};

typedef void* GrokitStream;

// GrokitOps.matmul's flags.
enum {
  GROKIT_MATMUL_X_FP32 = 1,      // x holds fp32 values (else bf16 values)
  GROKIT_MATMUL_ROUND_BF16 = 2,  // y = bf16(sums) (else the fp32 sums)
  GROKIT_MATMUL_GELU_MUL = 4,    // y = gelu(y) * bf16(sums): y holds the gate's bf16 values on entry
};

// A weight matrix (or a stack of expert matrices) in device memory.
// dtype is the format::DType code of its stored payload (format/SPEC.md §4, §4.1):
// 16 q8rb (param = scale blocks B), 17 q4g (param = group rows G), 18 f8col, 1 bf16.
// As stored, q4g, f8col and bf16 stacks are `matrix_bytes` apart per expert, while a
// q8rb payload keeps all codes first ([E, K, N] int8, zero pad to 64 bytes) and then all
// scales ([E, B, N] bf16), so its matrix_bytes is only K * N (the codes of one matrix).
// After prepare_weight, `data` holds the backend's layout of the same values
// (`layout` says which; 0 = as stored); only the backend's own ops read it.
typedef struct GrokitWeight {
  int32_t dtype;
  int32_t param;
  int32_t layout;
  int32_t reserved;
  int64_t experts;        // matrices in the stack (1 for attention)
  int64_t rows, cols;     // K, N of one matrix
  uint64_t matrix_bytes;  // see above
  void* data;             // the whole payload (format::payload_size bytes)
} GrokitWeight;

// Which expert each output row uses, and which x row it reads (mixture of experts):
// row m of y = x[m / x_row_div] @ W[expert[m]]; expert[m] < 0 leaves row m of y zero.
typedef struct GrokitRouting {
  const int32_t* expert;  // device [M]
  int64_t x_row_div;      // >= 1
} GrokitRouting;

// One query row of attention: the KV cache of its sequence and where it stands.
// Caches are bf16 bits [kv_heads, cap, head_dim]; valid[j] != 0 when the token at
// position j is real (not padding).
typedef struct GrokitAttnRow {
  uint16_t* k;
  uint16_t* v;
  uint8_t* valid;
  int64_t cap;     // allocated positions
  int64_t n_keys;  // keys [0, n_keys) are in the cache (including this row's own)
  int32_t pos;     // the query's position
  int32_t token;   // the row's token id (kv_store: valid[pos] = token > 0)
} GrokitAttnRow;

typedef struct GrokitAttnShape {
  int64_t q_heads, kv_heads, head_dim;
  float multiplier, logit_cap;
} GrokitAttnShape;

enum { GROKIT_COPY_H2D = 1, GROKIT_COPY_D2H = 2, GROKIT_COPY_D2D = 3 };

// What an op found wrong in values that only the device reads (take_device_errors).
enum {
  GROKIT_DEVERR_KV_ROW = 1u << 0,    // kv_store: a position outside [0, cap) or a NULL cache
  GROKIT_DEVERR_ATTN_ROW = 1u << 1,  // attention: n_keys outside [1, cap], a position < 0 or a NULL cache
  GROKIT_DEVERR_EXPERT = 1u << 2,    // matmul: a row routed to an expert past the stack
};

typedef struct GrokitOps {
  int32_t abi_version;  // GROKIT_OPS_ABI_VERSION
  const char* backend;  // "host" or "cuda"
  // The calling thread's last error message (never NULL).
  const char* (*error_message)(void);

  // ---- devices, memory, streams, events --------------------------------------
  int (*device_count)(int* count);
  int (*set_device)(int device);  // for the calling thread
  int (*device_name)(int device, char* name, size_t len, uint64_t* memory_bytes);
  // The device's memory free now and in all (CUDA: cudaMemGetInfo, which other processes'
  // use lowers; host: the memory the kernel reports available), so that a load that cannot
  // fit is refused before it reads a byte. Leaves the calling thread's device as it was.
  int (*memory_info)(int device, uint64_t* free_bytes, uint64_t* total_bytes);
  int (*alloc)(void** ptr, size_t bytes);          // device memory, 256-byte aligned
  int (*free)(void* ptr);
  int (*alloc_pinned)(void** ptr, size_t bytes);   // host memory the device copies from fast
  int (*free_pinned)(void* ptr);
  // Page-locks existing host memory that the host only reads (a read-only mapping of a
  // file: the device copies straight from the page cache), until host_unregister(ptr).
  // ptr and bytes are page-aligned; a registered range must not overlap another.
  // GROKIT_ERR_UNSUPPORTED where the device or the system cannot (the caller stages).
  int (*host_register)(void* ptr, size_t bytes);
  int (*host_unregister)(void* ptr);
  int (*copy)(void* dst, const void* src, size_t bytes, int kind, GrokitStream stream);
  int (*fill)(void* dst, int byte, size_t bytes, GrokitStream stream);
  int (*stream_create)(GrokitStream* stream);
  int (*stream_destroy)(GrokitStream stream);
  int (*stream_sync)(GrokitStream stream);
  int (*event_create)(void** event);
  int (*event_destroy)(void* event);
  int (*event_record)(void* event, GrokitStream stream);
  int (*event_sync)(void* event);                   // host waits
  int (*stream_wait_event)(GrokitStream stream, void* event);
  // CUDA graphs (NULL on backends without them): capture the ops issued on `stream`
  // between begin and end, then replay them.
  int (*graph_begin)(GrokitStream stream);
  int (*graph_end)(GrokitStream stream, void** graph);
  int (*graph_launch)(void* graph, GrokitStream stream);
  int (*graph_destroy)(void* graph);

  // ---- weights ---------------------------------------------------------------
  // Bytes of scratch (device memory) prepare_weight needs for w; 0 if none.
  uint64_t (*prepare_scratch_bytes)(const GrokitWeight* w);
  // w->data holds the stored payload; converts it in place to the backend's layout.
  int (*prepare_weight)(GrokitWeight* w, void* scratch, GrokitStream stream);

  // ---- the forward pass ------------------------------------------------------
  // out[m, :] = bf16(E[tok - row_start] * multiplier) for tok = tokens[m] in
  // [row_start, row_start + rows), else 0 (a vocabulary-split table; ranks' outputs sum).
  // table: bf16 bits [rows, D].
  int (*embed)(const int32_t* tokens, int64_t M, const uint16_t* table, int64_t row_start, int64_t rows, int64_t D,
               float multiplier, float* out, GrokitStream stream);
  // kernels::rmsnorm: out[m] = bf16(x * rsqrt(mean(x^2) + eps) * scale); out may be x.
  int (*rmsnorm)(const float* x, int64_t M, int64_t D, const float* scale, float eps, float* out,
                 GrokitStream stream);
  // kernels::rope, in place on x [M, heads, dh].
  int (*rope)(float* x, int64_t M, int64_t heads, int64_t dh, const int32_t* positions, double base,
              GrokitStream stream);
  // Stores row m's keys and values (k, v: [M, kv_heads, dh] bf16 values) at position
  // rows[m].pos of its caches, and rows[m].valid[pos] = rows[m].token > 0.
  int (*kv_store)(const float* k, const float* v, int64_t M, const GrokitAttnRow* rows, const GrokitAttnShape* shape,
                  GrokitStream stream);
  // rope(q), rope(k) and kv_store(k, v) in one op (one rotation table per row for both):
  // the bits of the three called in turn. q [M, q_heads, dh] and k are rotated in place;
  // the host refuses a bad row before it changes anything.
  int (*rope_store)(float* q, float* k, const float* v, int64_t M, const int32_t* positions, const GrokitAttnRow* rows,
                    const GrokitAttnShape* shape, double base, GrokitStream stream);
  // kernels::attention for each row m over its own cache: q [M, Hq, dh] bf16 values,
  // o [M, Hq * dh]. max_keys (host) >= every rows[m].n_keys: launch sizes depend on it
  // only, so a captured graph stays valid while sequences grow up to it.
  int (*attention)(const float* q, int64_t M, const GrokitAttnRow* rows, int64_t max_keys,
                   const GrokitAttnShape* shape, float* o, GrokitStream stream);
  // kernels::router_topk: experts, gates [M, k].
  int (*router_topk)(const float* x, int64_t M, int64_t D, const float* w, int64_t E, int64_t k, int32_t* experts,
                     float* gates, GrokitStream stream);
  // y [M, N] fp32 sums = x @ W (x [., K] with row stride ldx; bf16 values, or fp32 values
  // with GROKIT_MATMUL_X_FP32, as the expert down projection's input is). With routing
  // (may be NULL for a single matrix), row m = x[m / div] @ W[expert[m]]. The caller
  // rounds, or asks for y = bf16(sums) with GROKIT_MATMUL_ROUND_BF16 (the bits of a
  // round_bf16 op after it, one launch fewer), or for y = gelu(y) * bf16(sums) with
  // GROKIT_MATMUL_GELU_MUL (the bits of gelu_mul(y, bf16(sums)): the up projection
  // finishing the gate's rows; a row routed to no expert gets 0). Other bits are refused.
  int (*matmul)(const GrokitWeight* w, const float* x, int64_t M, int64_t ldx, int32_t flags,
                const GrokitRouting* routing, float* y, int64_t ldy, GrokitStream stream);
  // count (1 to 4) unrouted products of one x: y[i] = x @ W[i] (row stride ldy[i]), with
  // matmul's flags; the bits of matmul called on each. w, y and ldy are host arrays.
  // CUDA runs decode-sized ones (one format and K) side by side in one launch (q, k, v).
  int (*matmul_multi)(const GrokitWeight* const* w, int count, const float* x, int64_t M, int64_t ldx, int32_t flags,
                      float* const* y, const int64_t* ldy, GrokitStream stream);
  // kernels::gelu_mul: h = gelu(g) * u in fp32; h may be g or u.
  int (*gelu_mul)(const float* g, const float* u, int64_t n, float* h, GrokitStream stream);
  // out = bf16(x); out may be x.
  int (*round_bf16)(const float* x, int64_t n, float* out, GrokitStream stream);
  // out = bf16(a + b) (the residual add); out may be a or b.
  int (*add_bf16)(const float* a, const float* b, int64_t n, float* out, GrokitStream stream);
  // The end of a sublayer and the start of the next in one op (a decode step's small ops
  // are bound by their launches): t = rmsnorm(y', post_scale); x = bf16(x + t); then,
  // when next_scale is not NULL, a = rmsnorm(x, next_scale). y' is y [M, D], or bf16(y)
  // with round_y, or, with gates (not NULL), moe_combine of y's routed rows [M * top, D]
  // with gates [M, top]. Each backend gives the bits of its own round_bf16 or moe_combine,
  // rmsnorm, add_bf16 and rmsnorm called in turn (CUDA: with the arrays 16-byte aligned,
  // or D odd). x, a: [M, D]; y is only read; a may not overlap y or x, nor x routed y.
  int (*residual_norm)(const float* y, const float* gates, int64_t top, int32_t round_y, int64_t M, int64_t D,
                       const float* post_scale, float eps, float* x, const float* next_scale, float* a,
                       GrokitStream stream);
  // out[t, :] = bf16(sum over c < k, in order, of fp32(bf16(gates[t, c])) * y[t * k + c, :]),
  // each step acc = acc + g * y (no fused multiply-add). y [M * k, D], out [M, D].
  int (*moe_combine)(const float* y, const float* gates, int64_t M, int64_t k, int64_t D, float* out,
                     GrokitStream stream);
  // The output projection of a vocabulary part: y[m, n] = bf16(bf16(x[m] . E[n]) * multiplier)
  // with x [M, D] bf16 values, E bf16 bits [N, D]; y row stride ldy.
  int (*logits)(const float* x, int64_t M, int64_t D, const uint16_t* table, int64_t N, float multiplier, float* y,
                int64_t ldy, GrokitStream stream);
  // out = the pairwise tree sum (kernels::tree_sum's order) of count arrays of n floats;
  // parts: host array of device pointers (the in-process communicator's reduction; out
  // may be one of the parts).
  int (*sum_arrays)(const float* const* parts, int count, int64_t n, float* out, GrokitStream stream);

  // ---- checks of device-side values ------------------------------------------
  // Positions, key counts and expert ids reach some ops in device memory (written by
  // the engine or by an earlier op, and read again by a replayed graph), where a check
  // would mean waiting for the device. The CUDA ops skip a bad row, raise its
  // GROKIT_DEVERR_* bit and go on; this waits for `stream`, returns in *flags the bits
  // raised by ops on `stream` since the last call, and clears them. Each stream from
  // stream_create has its own bits (ranks sharing a GPU do not see each other's); other
  // streams share their device's; a replayed graph raises in its capture stream's. The
  // host ops see every value when called and reject a bad one there: their flags stay 0.
  int (*take_device_errors)(GrokitStream stream, uint32_t* flags);
} GrokitOps;

// The host backend (grokit_kernels). Its streams are grokit::ThreadPool pointers (NULL:
// the calling thread); stream_create gives NULL.
const GrokitOps* grokit_host_ops(void);
// Sets the message the host backend's error_message gives on the calling thread (for
// host-side tables beside it, such as runner's socket collectives).
void grokit_host_set_error(const char* message);

// ---------------------------------------------------------------------------------
// Collectives across devices (NCCL, loaded by the CUDA plugin at run time from
// libnccl.so.2). Each rank calls with its own communicator on its own stream.
typedef struct GrokitNcclId {
  uint8_t bytes[128];
} GrokitNcclId;

typedef struct GrokitCollectives {
  int32_t abi_version;
  int (*available)(char* why, size_t len);  // 1 if NCCL could be loaded, else 0 and why
  int (*unique_id)(GrokitNcclId* id);
  // Call from one thread per rank of this process (or inside group_start/group_end).
  int (*comm_init)(void** comm, int world, const GrokitNcclId* id, int rank);
  int (*comm_destroy)(void* comm);
  int (*group_start)(void);
  int (*group_end)(void);
  int (*all_reduce_sum)(const float* send, float* recv, size_t n, void* comm, GrokitStream stream);
  int (*all_gather)(const void* send, void* recv, size_t bytes, void* comm, GrokitStream stream);
  int (*broadcast)(void* data, size_t bytes, int root, void* comm, GrokitStream stream);
  // Abandons the communicator's pending and future operations (any thread; a rank
  // blocked in a collective returns). Destroys it: do not call comm_destroy after.
  int (*comm_abort)(void* comm);
  // Whether the communicator met an error of its own while its operations ran (NCCL's
  // ncclCommGetAsyncError: a peer process that died or aborted, a network failure), which
  // leaves them waiting for ever: *failed = 1 and why says what, else 0. Does not block;
  // callable from any thread while the communicator lives (not with comm_abort).
  int (*comm_async_error)(void* comm, int* failed, char* why, size_t len);
} GrokitCollectives;

#ifdef __cplusplus
}
#endif
