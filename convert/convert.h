// grokit convert: the released Grok-1 checkpoint (ckpt-0/tensor%05d_000 pickles) into
// grokit's sharded format (format/SPEC.md).
//
// Conversion streams: each source file is memory-mapped and parsed by the safe pickle
// reader (pickle.h), and each rank's slice is copied through a bounded staging buffer
// into a pre-planned offset of that rank's shard. Offsets are fixed before the first
// byte is written, so output is byte-identical whatever the thread timing. State lives
// in <out>/.grokit-convert/ until the manifest, written last, makes the model complete.
#pragma once

#include <optional>
#include <string>
#include <vector>

#include "common/common.h"
#include "convert/pickle.h"
#include "format/format.h"

namespace grokit::convert {

// ---------------------------------------------------------------------------------
// The release checkpoint.

// "transformer/decoder_layer_3/moe/linear" etc.: the parameter path in the release.
std::string release_path(const format::TensorSpec& t);
std::string release_file_name(size_t index);  // "tensor00042_000"

// The config: an explicit file, else config.json beside the ckpt-0 directory, else the
// built-in Grok-1 values. `source` says which.
struct LoadedConfig {
  format::ModelConfig config;
  std::string source;
};
Result<LoadedConfig> load_config(const std::string& ckpt_dir, const std::optional<std::string>& config_file);

struct SourceTensor {
  format::TensorSpec spec;   // stored dtype; the source is f32 or QuantizedWeight8bit
  std::string path;          // ckpt-0/tensorNNNNN_000
  uint64_t size = 0;
};
struct Checkpoint {
  std::string dir;
  format::ModelConfig config;  // with ffn size and scale blocks inferred from the shapes
  std::vector<SourceTensor> tensors;  // release order
  uint64_t total_bytes = 0;
};
// Checks, before anything is written: every expected file is present (missing ones are
// named), no extra tensor files, every file parses and its dtypes and shapes match the
// config, and for Grok-1 shapes every file has the released size.
Result<Checkpoint> index_checkpoint(const std::string& ckpt_dir, const format::ModelConfig& config,
                                    unsigned threads = 4);
// The released size of each kind of file (spec §2.1), when the config is Grok-1's.
std::optional<uint64_t> grok1_release_file_size(format::TensorKind kind);
// Opens and parses one source file; `mapped` keeps the memory map alive for the views.
Result<ReleaseTensor> read_release_tensor(const std::string& path, MappedFile& mapped);
// Checks a parsed source tensor against what the config expects.
Status check_source_tensor(const ReleaseTensor& t, const format::TensorSpec& spec, const format::ModelConfig& cfg,
                           const std::string& path);

// ---------------------------------------------------------------------------------
// Conversion.
struct ConvertOptions {
  std::string ckpt_dir;
  std::string out_dir;
  int tp = 8;
  std::optional<std::string> config_file;
  std::optional<std::string> tokenizer_file;
  bool resume = false;
  bool force = false;          // replace an existing model or partial output
  bool compress = false;       // per-tensor zstd (archives; not mappable)
  int zstd_level = 3;
  unsigned threads = 4;        // source files in flight
  uint64_t staging_bytes = 32u << 20;  // per thread
  bool progress = true;
  bool direct_io = true;       // write the shards past the page cache where the file system can
  bool dry_run = false;        // check and plan, write nothing
};

struct ConvertReport {
  std::string config_source;
  std::string tokenizer_source;
  size_t tensors = 0;
  size_t tensors_resumed = 0;  // kept from an interrupted run after re-checking
  uint64_t bytes_read = 0;
  uint64_t bytes_written = 0;
  double seconds = 0;
  uint64_t peak_rss_anon = 0;
  uint64_t anon_bound = 0;     // the stated bound on anonymous memory
};

Result<ConvertReport> convert_checkpoint(const ConvertOptions& options);

// The state directory of an unfinished conversion inside the output directory.
inline constexpr const char* kStateDir = ".grokit-convert";

}  // namespace grokit::convert
