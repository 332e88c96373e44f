// libFuzzer target: the safe pickle reader on arbitrary bytes. It must return an error
// or arrays whose views lie inside the input; never crash, hang or allocate unboundedly.
#include <cstdint>
#include <cstring>

#include "convert/pickle.h"

static uint8_t touch(const grokit::convert::ArrayView& a) {
  uint8_t x = 0;
  for (uint64_t i = 0; i < a.nbytes; i += 4096) x ^= a.data[i];
  if (a.nbytes) x ^= a.data[a.nbytes - 1];
  return x;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  grokit::convert::PickleLimits limits;
  limits.max_ops = 1u << 16;
  auto r = grokit::convert::parse_release_pickle(data, size, "fuzz", limits);
  if (!r.ok()) return 0;
  uint8_t x = r->quantized ? touch(r->weight) ^ touch(r->scales) : touch(r->array);
  volatile uint8_t sink = x;
  (void)sink;
  return 0;
}
