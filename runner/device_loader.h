// Loading files into device memory (kernels/ops.h backends), two ways:
//   - staged: large reads into pinned staging buffers by `readers` threads at once (one
//     thread's reads from the page cache run at a fraction of a host-to-device copy), each
//     buffer's copy to the device overlapping the reads into the others;
//   - mapped: the file is mapped read-only and registered with the device a window at a
//     time (GrokitOps.host_register), so the device copies straight out of the page cache
//     and no thread copies the bytes at all; the readers only hash. The file must not
//     shrink while it loads (its pages would fault, as for any mapped file).
// The XXH3-64 of named byte ranges is computed by the reader threads (a range by one
// thread, in order; staged: from the bytes it staged), so the checksums cost no more
// time than the reads. Only the calling thread touches the device (copies, events).
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

enum class LoadSource { kStaged, kMapped };
// The chunk sizes the engine uses: a staging buffer, a registered window of the mapping
// (registration costs per call: fewer, larger windows).
constexpr size_t kStagingBytes = size_t{32} << 20, kMappedWindowBytes = size_t{256} << 20;

struct LoadStats {
  double seconds = 0;           // from the first read to the last copy done
  double read_seconds = 0;      // in pread, summed over the reader threads (staged)
  double hash_seconds = 0;      // in XXH3, summed over the reader threads (mapped: with page faults)
  double register_seconds = 0;  // in host_register and host_unregister (mapped)
  uint64_t bytes = 0;
  unsigned readers = 0;
};

// Copies bytes [file_offset, file_offset + bytes) of `path` to dst (device memory) on
// `stream`, returning when the device holds them. staging_bytes: each pinned buffer (one
// chunk; mapped: each registered window, rounded up to pages); readers: threads reading
// (staged) or hashing at once (staged: readers + 2 buffers; mapped: 3 windows registered
// at most). Ranges must not overlap. Mapped, where the backend cannot register the
// mapping, the error says so and nothing was copied; staged works everywhere.
Status load_file_to_device(const GrokitOps* ops, GrokitStream stream, const std::string& path, uint64_t file_offset,
                           uint64_t bytes, void* dst, const std::vector<HashedRange>& ranges, Progress* progress,
                           LoadStats* stats, size_t staging_bytes = kStagingBytes, unsigned readers = 1,
                           LoadSource source = LoadSource::kStaged);

}  // namespace grokit::runner
