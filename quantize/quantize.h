// grokit quantize: requantizes a converted int8 model's weight matrices into another
// scheme and reports the error of every tensor.
//
// Schemes (the stored layouts are format/SPEC.md §4): int8 (the release's codes and
// scales, bit-exact), int4 (symmetric groups of G rows per column with a searched bf16
// scale), fp8 (E4M3 with one bf16 scale per column), bf16 (the dequantized weights).
// Norms, router and embedding keep their precision. Each weight matrix is quantized as a
// whole (every value depends only on its group or column, never on the sharding), then
// split for the output's tensor-parallel degree, so TP 1 output equals the concatenated
// TP 8 output bit for bit. Streaming and bounded: a worker holds a few row blocks of one
// matrix at a time. Output is atomic (the manifest is written last), checksummed and
// deterministic.
#pragma once

#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "common/common.h"
#include "format/format.h"
#include "quantize/quantizers.h"

namespace grokit::quantize {

enum class Scheme { kInt8, kInt4, kFp8, kBf16 };
const char* scheme_name(Scheme s);
std::optional<Scheme> parse_scheme(std::string_view name);
// The stored dtype of a weight matrix under a scheme.
format::DType scheme_dtype(Scheme s);

// Glob patterns over tensor names ('*' any run of characters, '?' one character).
bool glob_match(std::string_view pattern, std::string_view name);

struct Override {
  std::string pattern;  // e.g. "layer.*.attn.*"
  Scheme scheme;
};

struct QuantizeOptions {
  std::string in_dir, out_dir;
  Scheme scheme = Scheme::kInt4;
  int64_t group_size = 128;   // int4
  bool search = true;         // int4: search each group's scale (false: plain RTN absmax)
  std::vector<Override> overrides;  // first match wins; weight matrices only
  int tp = 0;                 // output TP degree; 0: the input's
  unsigned threads = 4;
  bool force = false;
  bool progress = true;
  bool dry_run = false;
  bool direct_io = true;      // write the shards past the page cache where the file system can
};

struct TensorReport {
  std::string name, kind, scheme;
  std::vector<int64_t> shape;
  uint64_t bytes_in = 0, bytes_out = 0;
  bool quantized = false;     // false: kept as it was (norms, router, embedding)
  ErrorStats stats;
  bool flagged = false;       // relative RMSE more than 1.5x the median of its kind
};

struct QuantizeReport {
  std::string scheme;         // as recorded in the manifest
  int tp = 1;
  std::vector<TensorReport> tensors;  // in the model's tensor order
  uint64_t bytes_in = 0, bytes_out = 0;
  double seconds = 0;
  uint64_t peak_rss_anon = 0;
};

Result<QuantizeReport> quantize_model(const QuantizeOptions& options);
std::string report_table(const QuantizeReport& r);
std::string report_json(const QuantizeReport& r);

}  // namespace grokit::quantize
