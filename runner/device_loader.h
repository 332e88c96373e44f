// Loading files into device memory (kernels/ops.h backends): a few large reads into two
// pinned staging buffers, each buffer's copy to the device overlapping the read into the
// other, XXH3-64 of named byte ranges computed from the staged bytes on the way.
#pragma once

#include <string>
#include <vector>

#include "common/common.h"
#include "kernels/ops.h"

namespace grokit::runner {

// A range of the loaded bytes (offsets relative to the start of the load) and the XXH3-64
// it must have; a mismatch names it.
struct HashedRange {
  std::string name;
  uint64_t offset = 0, size = 0, xxh3 = 0;
};

struct LoadStats {
  double seconds = 0;         // from the first read to the last copy done
  double read_seconds = 0;    // in pread
  uint64_t bytes = 0;
};

// Copies bytes [file_offset, file_offset + bytes) of `path` to dst (device memory) on
// `stream`, returning when the device holds them. staging_bytes: each of the two pinned
// buffers. Ranges must not overlap.
Status load_file_to_device(const GrokitOps* ops, GrokitStream stream, const std::string& path, uint64_t file_offset,
                           uint64_t bytes, void* dst, const std::vector<HashedRange>& ranges, Progress* progress,
                           LoadStats* stats, size_t staging_bytes = size_t{64} << 20);

}  // namespace grokit::runner
