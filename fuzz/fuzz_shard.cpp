// libFuzzer target: a shard file's header and tensor index on arbitrary bytes, then every
// entry's stored bytes hashed (so an offset the parser let through that lies outside the
// buffer is caught by ASan). The header and index checksums are recomputed by the target
// so that mutations reach the parser behind them.
#include <cstdint>
#include <cstring>
#include <vector>

#include "format/format.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace grokit;
  std::vector<uint8_t> buf(data, data + size);
  if (size >= format::kShardHeaderSize) {
    // Fix up the checksums (the interesting checks are behind them).
    uint64_t index_size = load_le<uint64_t>(buf.data() + 48);
    if (index_size <= size - format::kShardHeaderSize)
      store_le<uint64_t>(buf.data() + 88, xxh3_64(buf.data() + format::kShardHeaderSize, index_size));
    store_le<uint64_t>(buf.data() + 72, size);  // the file size field
    store_le<uint64_t>(buf.data() + 120, xxh3_64(buf.data(), 120));
  }
  auto h = format::parse_header(buf.data(), buf.size(), "fuzz");
  if (!h.ok()) return 0;
  auto entries = format::parse_index(buf.data(), buf.size(), *h, "fuzz");
  if (!entries.ok()) return 0;
  uint64_t x = 0;
  for (const auto& e : *entries) x ^= xxh3_64(buf.data() + h->data_offset + e.offset, e.stored_size);
  volatile uint64_t sink = x;
  (void)sink;
  return 0;
}
