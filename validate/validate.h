// grokit validate: proofs that a converted model says what its source says.
//
//  - verify_model: every checksum of a model directory recomputed (shards, tokenizer).
//  - validate_tensors: every stored tensor equals its source tensor in the release
//    pickles: int8 codes and bf16 scale bits bit-exact, norms and router fp32 exact, the
//    embedding equal to bf16(round-to-nearest-even) of the fp32 source; any TP degree.
#pragma once

#include <string>
#include <vector>

#include "common/common.h"
#include "format/format.h"

namespace grokit::validate {

struct TensorIssue {
  std::string tensor;
  uint32_t rank = 0;
  std::string message;
};

struct VerifyReport {
  uint64_t tensors_checked = 0;  // entries, over all ranks
  uint64_t bytes_checked = 0;
  double seconds = 0;
  std::vector<TensorIssue> bad;  // empty when everything matches
};
// Structural errors (no manifest, unreadable header or index) are returned as an Error;
// checksum mismatches are listed in the report, each naming the tensor and rank.
Result<VerifyReport> verify_model(const std::string& model_dir, unsigned threads, bool progress = true);

struct TensorValidateReport {
  uint64_t tensors_checked = 0;  // entries, over all ranks
  uint64_t elements_checked = 0;
  uint64_t source_bytes = 0;
  double seconds = 0;
  std::vector<TensorIssue> bad;
};
Result<TensorValidateReport> validate_tensors(const std::string& ckpt_dir, const std::string& model_dir,
                                              unsigned threads, bool progress = true);

}  // namespace grokit::validate
