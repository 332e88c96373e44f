// grokit validate: proofs that a converted model says what its source says.
//
//  - verify_model: every checksum of a model directory recomputed (shards, tokenizer).
//  - validate_tensors: every stored tensor equals its source tensor in the release
//    pickles: int8 codes and bf16 scale bits bit-exact, norms and router fp32 exact, the
//    embedding equal to bf16(round-to-nearest-even) of the fp32 source; any TP degree.
//  - compare_logits: a candidate's float32 logits against a reference's, position by
//    position: KL divergence, top-1 agreement, |delta logit| and perplexity, each against
//    a threshold.
#pragma once

#include <optional>
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

// ---------------------------------------------------------------------------------
// Logits parity. Both files are .npy float32 ('<f4') of the same shape, [B, T, V] or
// [N, V] (read as [1, N, V]). For each position (b, t) the two rows are turned into
// log-softmaxes in float64 (max subtracted first) and compared:
//   kl       KL(reference || candidate) = sum_v p_ref(v) * (log p_ref(v) - log p_cand(v))
//   top-1    argmax of each row (ties go to the lower index), and whether they agree
//   margin   the reference's largest logit minus its second largest (0 on a tie); a
//            position with margin < near_tie_margin is a near tie, whose top-1 may
//            legitimately flip, and is counted apart
//   |delta|  max_v |ref(v) - cand(v)|
// With a tokens file (int32 [B, T], or [N] for [N, V] logits; 0 is padding, on the right
// of each row) padding positions are skipped, and position t predicts token t+1 when
// that is not padding: the perplexity of each model is exp(mean negative log-likelihood)
// over those predictions.
// The files are memory-mapped and streamed block by block; per position only a few
// numbers are kept. Results do not depend on the thread count: positions are reduced in
// order.

// Each threshold is active when set. max_kl and min_top1 are on by default.
struct LogitsThresholds {
  std::optional<double> max_kl = 1e-3;    // max KL over positions <= this
  std::optional<double> min_top1 = 1.0;  // top-1 agreement (fraction) outside near ties >= this
  double near_tie_margin = 0.1;           // not a threshold: where near ties end
  std::optional<double> max_mean_kl;      // mean KL <= this
  std::optional<double> max_p99_kl;       // 99th percentile of KL (numpy's linear rule) <= this
  std::optional<double> max_abs_diff;     // max |delta logit| <= this
  std::optional<double> max_ppl_ratio;    // |ppl_candidate / ppl_reference - 1| <= this; needs tokens
};

struct LogitsCheck {
  std::string name;        // the threshold's name: "max_kl", "min_top1", "max_mean_kl", ...
  double value = 0;        // the measured metric (NaN when it could not be measured)
  double threshold = 0;
  bool at_least = false;   // passes when value >= threshold (else value <= threshold)
  bool pass = false;
};

struct LogitsPosition {
  int64_t b = 0, t = 0;    // b is 0 for [N, V] logits, t the row
  double kl = 0;
};

struct LogitsReport {
  std::vector<int64_t> shape;       // as in the files
  int64_t batch = 0, seq = 0, vocab = 0;
  uint64_t positions = 0;           // compared
  uint64_t padding = 0;             // skipped (token 0)
  double mean_kl = 0, p99_kl = 0, max_kl = 0;
  uint64_t decisive = 0, decisive_agree = 0;  // reference margin >= near_tie_margin
  double top1_agreement = 1;                  // decisive_agree / decisive (1 when there are none)
  uint64_t near_ties = 0, near_tie_agree = 0;
  double near_tie_agreement = 1;
  double max_abs_diff = 0;
  bool has_perplexity = false;      // a tokens file with at least one prediction
  uint64_t predictions = 0;         // next tokens scored
  double ppl_reference = 0, ppl_candidate = 0, ppl_ratio = 0;  // ratio: candidate / reference
  std::vector<LogitsPosition> worst;  // up to 5 largest KLs, largest first (ties: earlier first)
  LogitsThresholds thresholds;
  std::vector<LogitsCheck> checks;    // one per active threshold
  bool pass = false;                  // every check passed
  uint64_t bytes_read = 0;            // logits bytes of the compared positions, both files
  double seconds = 0;
};

// Bad files (not .npy, wrong dtype or rank, shapes that differ, a NaN or Inf in a
// compared position, a token out of range or after padding, no position to compare)
// are errors naming the file and the position; threshold failures are in the report.
// `tokens` may be empty. threads >= 1.
Result<LogitsReport> compare_logits(const std::string& reference, const std::string& candidate,
                                    const std::string& tokens, const LogitsThresholds& thresholds, unsigned threads,
                                    bool progress = false);

}  // namespace grokit::validate
