// ops.h prepare_weight for the CUDA backend: q8rb codes go k-chunked (layout 1, see
// kernels/cuda/matmul.h) in place, one matrix at a time through the scratch; every other
// weight stays as stored.
#include <algorithm>

#include "kernels/cuda/matmul_internal.cuh"

namespace grokit::kernels::cuda {
namespace {

// q8rb stored row-major whose codes can go k-chunked.
bool chunkable(const GrokitWeight* w, const mm::WDesc& d) {
  return w->dtype == mm::kDtQ8 && w->layout == 0 && d.K % 16 == 0 && d.rpb % 16 == 0 &&
         (reinterpret_cast<uintptr_t>(d.data) & 15) == 0;
}

}  // namespace

uint64_t prepare_scratch_bytes(const GrokitWeight* w) {
  mm::WDesc d;
  if (mm::describe("prepare_scratch_bytes", w, &d) != GROKIT_OK) return 0;  // prepare_weight reports it
  return chunkable(w, d) ? static_cast<uint64_t>(d.K) * static_cast<uint64_t>(d.N) : 0;
}

int prepare_weight(GrokitWeight* w, void* scratch, GrokitStream stream) {
  mm::WDesc d;
  if (int rc = mm::describe("prepare_weight", w, &d); rc != GROKIT_OK) return rc;
  if (!chunkable(w, d)) return GROKIT_OK;
  const uint64_t bytes = static_cast<uint64_t>(d.K) * static_cast<uint64_t>(d.N);
  if (scratch == nullptr)
    return set_error(GROKIT_ERR_INVALID,
                     "prepare_weight: q8rb weight K = %lld x N = %lld needs %llu bytes of scratch (prepare_scratch_bytes); "
                     "got NULL",
                     static_cast<long long>(d.K), static_cast<long long>(d.N), static_cast<unsigned long long>(bytes));
  const cudaStream_t st = as_stream(stream);
  auto* codes = static_cast<uint8_t*>(w->data);
  const dim3 grid(blocks_for(d.N, mm::kThreads), static_cast<unsigned>(std::min<int64_t>(d.K / 16, 65535)));
  for (int64_t e = 0; e < d.E; ++e) {
    uint8_t* ce = codes + static_cast<uint64_t>(e) * bytes;
    if (int rc = check_cuda(cudaMemcpyAsync(scratch, ce, bytes, cudaMemcpyDeviceToDevice, st),
                            "prepare_weight: copying q8rb codes to the scratch");
        rc != GROKIT_OK)
      return rc;
    mm::q8_chunk_kernel<><<<grid, mm::kThreads, 0, st>>>(static_cast<const uint8_t*>(scratch), d.K, d.N, ce);
    if (int rc = check_launch("prepare_weight: q8rb relayout kernel"); rc != GROKIT_OK) return rc;
  }
  w->layout = kLayoutQ8Chunk16;
  return GROKIT_OK;
}

}  // namespace grokit::kernels::cuda
