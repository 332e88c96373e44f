// Loading files into device memory (kernels/ops.h backends): large reads into pinned
// staging buffers by `readers` threads at once (one thread's reads from the page cache run
// at a fraction of a host-to-device copy), each buffer's copy to the device overlapping
// the reads into the others. The XXH3-64 of named byte ranges is computed from the staged
// bytes by the thread that read them (a range is read by one thread, in order), so the
// checksums cost no more time than the reads. Only the calling thread touches the device
// (copies, events).
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
  double read_seconds = 0;    // in pread, summed over the reader threads
  double hash_seconds = 0;    // in XXH3, summed over the reader threads
  uint64_t bytes = 0;
  unsigned readers = 0;
};

// Copies bytes [file_offset, file_offset + bytes) of `path` to dst (device memory) on
// `stream`, returning when the device holds them. staging_bytes: each pinned buffer (one
// chunk); readers: threads reading chunks at once (readers + 2 buffers). Ranges must not
// overlap.
Status load_file_to_device(const GrokitOps* ops, GrokitStream stream, const std::string& path, uint64_t file_offset,
                           uint64_t bytes, void* dst, const std::vector<HashedRange>& ranges, Progress* progress,
                           LoadStats* stats, size_t staging_bytes = size_t{32} << 20, unsigned readers = 1);

}  // namespace grokit::runner
