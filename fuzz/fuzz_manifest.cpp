// libFuzzer target: manifest.json (and the config record inside it) on arbitrary text.
#include <cstdint>
#include <string>

#include "format/format.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string text(reinterpret_cast<const char*>(data), size);
  auto m = grokit::format::Manifest::from_json(text, "fuzz");
  if (m.ok()) {
    // A manifest that parses must survive a round trip and describe a splittable model.
    auto again = grokit::format::Manifest::from_json(m->to_json(), "fuzz-roundtrip");
    if (!again.ok()) __builtin_trap();
    (void)grokit::format::check_tensor_parallel(m->config, static_cast<int>(m->tp));
  }
  auto c = grokit::format::ModelConfig::from_json(text, "fuzz");
  (void)c;
  return 0;
}
