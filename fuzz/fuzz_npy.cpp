// libFuzzer target: the .npy header parser (token ids and logits files given to
// `grokit logits`, `grokit run --tokens-in` and `grokit validate logits`) on arbitrary bytes.
#include <cstdint>
#include <string>

#include "common/npy.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto h = grokit::npy::parse_header(data, size, "fuzz");
  if (h.ok()) {
    // A header that parses describes exactly the bytes that follow it, elements aligned.
    for (int64_t d : h->shape)
      if (d < 0) __builtin_trap();
    if (h->element_size == 0 || h->data_offset > size || h->data_offset % h->element_size != 0) __builtin_trap();
    if (h->element_count() * h->element_size != size - h->data_offset) __builtin_trap();
  }
  return 0;
}
