// CUDA weight products (ops.h `matmul`, `prepare_scratch_bytes`, `prepare_weight`):
// weight-only decode kernels that stream int8, int4, fp8 and bf16 weights (experts chosen
// on the device), and a tensor-core path (cuBLASLt) for prefill.
//
// Device layouts (GrokitWeight.layout after prepare_weight):
//   q8rb, layout 1 (kLayoutQ8Chunk16; when K % 16 == 0 and (K / B) % 16 == 0): the codes
//       of expert e at e * K * N, k-chunked [K/16][N][16] (byte i of chunk u, column n is
//       code[16u + i, n]; one 16-byte load = 16 rows of one column, a warp's 32 columns
//       512 contiguous bytes); the scales stay where the stored payload has them
//       (align64(E * K * N): [E][B][N] bf16). Same size as stored.
//   q8rb, layout 0 (other shapes): as stored, codes [E][K][N] row-major (slower path).
//   q4g, f8col: as stored (format/SPEC.md 4.1), experts matrix_bytes apart.
//   bf16: as stored, [E][K][N] row-major (cuBLASLt reads it in place for prefill).
//
// Paths (all asynchronous on the stream, unless said):
//   decode: M <= 16, or routed with M <= 64 (top-2 decode of up to 32 tokens), or any M
//       while the stream is capturing and the prefill path cannot run without allocating.
//       One launch: grid (column tiles, k splits, experts); each block scans the expert ids
//       on the device for its rows (no host sync), stages their x in shared memory and
//       streams its slice of W[e] once with 16-byte loads, dequantizing in registers and
//       accumulating in fp32. k splits are summed in a fixed order (by the last block of a
//       tile), so results are reproducible.
//   prefill: otherwise. Each needed matrix is dequantized to a bf16 scratch [K, N], x rows
//       are converted to bf16 (fp32 x: hi = bf16(x) and lo = bf16(x - hi), two products
//       accumulated), and cuBLASLt computes y^T = W^T x^T (bf16 in, fp32 out, fp32
//       compute). Routed prefill copies the expert ids to the host and WAITS for the
//       stream (never captured: while capturing, routed products take the decode path);
//       rows are grouped per expert in row order, gathered, multiplied and scattered.
//   Rows whose expert is < 0 (or >= experts: the device cannot report it) get zeros.
//
// Precision: w = bf16(q * scale) exactly as the CPU twins; products x * w are exact in
// fp32 for bf16 x; sums in fp32 in another order than the CPU's. Expected |y - y_cpu| <=
// 2 * (K + 40) * 2^-24 * sum_k |x_k w_kn| in the worst case (typically within a few
// 2^-24 of sum |x w|); fp32 x through the prefill path adds up to 2^-17 * sum |x w|
// (x carried as hi + lo). Decode results are bitwise reproducible for a given shape and
// row count; the k split and the path (decode / prefill) depend on M, so a row's bits
// may change with the batch size.
//
// Scratch: per (device, stream), behind a mutex: the decode split-k workspace and the
// prefill buffers and cuBLASLt handle are allocated on first need (stream-ordered),
// never while the stream is capturing (cudaStreamIsCapturing): a captured call uses what
// an earlier eager call of that shape allocated, or falls back to fewer k splits / the
// decode path. Buffers a capture used are never freed until matmul_release_stream, so a
// graph stays valid; launch a graph on the stream it was captured from (or ordered with
// it), as the scratch is per stream.
#pragma once

#include "kernels/ops.h"

namespace grokit::kernels::cuda {

constexpr int32_t kLayoutQ8Chunk16 = 1;

uint64_t prepare_scratch_bytes(const GrokitWeight* w);
int prepare_weight(GrokitWeight* w, void* scratch, GrokitStream stream);
int matmul(const GrokitWeight* w, const float* x, int64_t M, int64_t ldx, int32_t flags, const GrokitRouting* routing,
           float* y, int64_t ldy, GrokitStream stream);
int matmul_multi(const GrokitWeight* const* w, int count, const float* x, int64_t M, int64_t ldx, int32_t flags,
                 float* const* y, const int64_t* ldy, GrokitStream stream);

// Frees the scratch matmul keeps for this stream on the calling thread's device (waits
// for the stream first). Call before destroying the stream, once no graph that used it
// will run again. Optional: without it the scratch lives until the process ends.
int matmul_release_stream(GrokitStream stream);

}  // namespace grokit::kernels::cuda
