// A safe reader for the pickles of the Grok-1 release (spec §2.1).
//
// It interprets the opcodes itself and never executes anything: the only globals it
// accepts are the handful the release and its pickler variants name (numpy array
// reconstruction, numpy.dtype, ml_dtypes.bfloat16, __main__.QuantizedWeight8bit,
// _codecs.encode for protocol 2, numpy's _frombuffer for protocol 5). Every other
// global is refused with its name, the file and the byte offset. Stack depth, memo
// size, object count and nesting are bounded; every declared length is checked against
// the bytes that remain. Arrays are views into the caller's buffer (normally a memory
// map), except protocol-2 payloads, which pickle stores as text and must be decoded.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "common/common.h"

namespace grokit::convert {

enum class ElementType : uint8_t { kF32, kI8, kBF16 };
const char* element_type_name(ElementType t);
uint64_t element_size(ElementType t);

struct ArrayView {
  ElementType type = ElementType::kF32;
  std::vector<int64_t> shape;
  const uint8_t* data = nullptr;  // C-order, little-endian
  uint64_t nbytes = 0;
  uint64_t file_offset = 0;       // where the payload starts in the file (0 if decoded)
  std::shared_ptr<const std::vector<uint8_t>> owned;  // set only for decoded payloads

  uint64_t element_count() const;
  std::string describe() const;   // e.g. "int8[8, 128, 256]"
};

// One released parameter: a plain array, or a QuantizedWeight8bit (weight + scales).
struct ReleaseTensor {
  bool quantized = false;
  ArrayView array;    // when !quantized
  ArrayView weight;   // when quantized: int8
  ArrayView scales;   // when quantized: bf16
};

struct PickleLimits {
  uint32_t max_stack = 256;
  uint32_t max_marks = 32;
  uint32_t max_memo = 4096;
  uint32_t max_objects = 1u << 16;
  uint32_t max_depth = 16;          // nesting of containers
  uint64_t max_ops = 1u << 20;
};

// Parses one pickle held in [data, data+size). `name` (normally the file path) is used
// in error messages, which read "<name>: byte <offset>: <what>".
Result<ReleaseTensor> parse_release_pickle(const uint8_t* data, uint64_t size, const std::string& name,
                                           const PickleLimits& limits = {});

}  // namespace grokit::convert
