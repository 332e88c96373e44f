// grokit model format: one directory per converted model.
//
//   <model>/manifest.json               config, shard list, provenance; written last
//   <model>/tokenizer.model             SentencePiece model (optional)
//   <model>/shard-RRRRR-of-NNNNN.gkt    one file per tensor-parallel rank
//
// A shard file is a 128-byte header, a tensor index, then the tensors, each aligned to
// at least 4 KiB so the file can be memory-mapped and read in place. Everything is
// little-endian. format/SPEC.md is the full specification; this header is its reader
// and writer. Every length, count and offset read from a file is checked against the
// file size and against overflow before use.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "common/common.h"

namespace grokit::format {

inline constexpr uint32_t kFormatVersion = 1;
inline constexpr char kShardMagic[8] = {'G', 'R', 'O', 'K', 'I', 'T', 'S', 'H'};
inline constexpr uint32_t kShardHeaderSize = 128;
inline constexpr uint32_t kMinAlignment = 4096;
inline constexpr uint32_t kMaxDims = 8;
inline constexpr uint32_t kMaxNameLength = 255;
inline constexpr const char* kManifestFile = "manifest.json";
inline constexpr const char* kTokenizerFile = "tokenizer.model";

// ---------------------------------------------------------------------------------
// Stored data types. Codes are stable: never renumber, only add.
enum class DType : uint32_t {
  kF32 = 0,
  kBF16 = 1,
  kI8 = 2,
  kF8E4M3 = 3,
  // Weight schemes: one entry holds codes and scales (SPEC.md §4).
  kQ8RowBlock = 16,  // int8 codes [.., K, N] then bf16 scales [.., B, N]; param = B
  kQ4Group = 17,     // int4 symmetric groups along K; param = group size (reserved)
  kF8Column = 18,    // fp8 e4m3 codes with one scale per output column (reserved)
};
const char* dtype_name(DType t);
std::optional<DType> dtype_from_name(std::string_view name);
bool dtype_known(uint32_t code);
// Bytes of a payload of this dtype, shape and parameter; nullopt on overflow or a
// parameter that does not fit the shape.
std::optional<uint64_t> payload_size(DType t, std::span<const int64_t> shape, uint32_t param);
// Offset of the bf16 scales inside a kQ8RowBlock payload: codes first, then scales at
// the next 64-byte boundary.
uint64_t q8_scales_offset(std::span<const int64_t> shape);
// The k-chunked layouts (SPEC.md §4.1): bytes of one group of G rows of a kQ4Group
// matrix with N columns (codes, then scales padded to 16 bytes), and of one kF8Column
// matrix (codes, then scales padded to 16 bytes).
inline uint64_t q4g_group_bytes(int64_t G, int64_t N) {
  return static_cast<uint64_t>(16 * (G / 32) * N) + ((static_cast<uint64_t>(2 * N) + 15) / 16 * 16);
}
inline uint64_t f8col_matrix_bytes(int64_t K, int64_t N) {
  return static_cast<uint64_t>(32 * (K / 32) * N) + ((static_cast<uint64_t>(2 * N) + 15) / 16 * 16);
}

// ---------------------------------------------------------------------------------
// The configuration record. One of these drives everything; nothing else hard-codes
// Grok-1's sizes. Field names are the official ones.
struct ModelConfig {
  int64_t vocab_size = 131072;
  int64_t pad_token = 0;
  int64_t eos_token = 2;
  int64_t sequence_len = 8192;
  double embedding_multiplier_scale = 78.38367176906169;
  double output_multiplier_scale = 0.5773502691896257;
  int64_t emb_size = 6144;
  int64_t key_size = 128;
  int64_t num_q_heads = 48;
  int64_t num_kv_heads = 8;
  int64_t num_layers = 64;
  double widening_factor = 8.0;
  double attn_output_multiplier = 0.08838834764831845;
  int64_t num_experts = 8;
  int64_t num_selected_experts = 2;
  double rms_norm_eps = 1e-5;
  double rope_base = 10000.0;
  double attn_logit_cap = 30.0;
  // Inferred from the checkpoint's shapes (defaults: from the fields above).
  int64_t ffn_size = 0;                 // 0: derive from widening_factor
  int64_t attn_output_scale_blocks = 8;
  int64_t moe_down_scale_blocks = 8;

  static ModelConfig grok1();
  // Parses the official JSON object; missing keys keep Grok-1's values, unknown keys are
  // an error (a typo must not silently fall back to a default).
  static Result<ModelConfig> from_json(std::string_view json, std::string_view source);
  std::string to_json() const;  // canonical: fixed key order, round-trip exact doubles
  Status validate() const;      // positive sizes, divisibility the architecture needs
  int64_t ffn() const;          // ffn_size, or int(widening*D)*2//3 rounded up to 8
  bool is_grok1_shape() const;  // every size equals the released model's
  // The multipliers as the forward pass applies them (bf16-rounded, spec §3).
  float embedding_multiplier_bf16() const;
  float output_multiplier_bf16() const;
  // Every weight product over K rows sums in independent chains of this many rows,
  // combined by a pairwise tree: K / nb with nb the largest power of two <= 16 such that
  // 2 * nb divides K. Threads then take whole chains (contiguous rows), and where tensor
  // parallelism splits the rows (attention output, expert down) ranks hold whole chains
  // at TP 1-16, so every degree gets the same bits (kernels/kernels.h).
  static int64_t split_sum_rows(int64_t K);
  // The same for the k-chunked weights (q4g with group G, f8col with G = 32): K / nb, nb
  // the largest power of two <= 16 such that nb * max(32, G) divides K.
  static int64_t chunked_sum_rows(int64_t K, int64_t G);
};

// ---------------------------------------------------------------------------------
// Logical tensors and how tensor parallelism splits them (SPEC.md §6).
enum class TensorKind : uint8_t {
  kEmbedding, kFinalNorm,
  kMoeGate, kMoeDown, kMoeUp,
  kAttnKey, kAttnOutput, kAttnQuery, kAttnValue,
  kNormAttnIn, kNormAttnOut, kNormMoeIn, kNormMoeOut,
  kRouter,
};
const char* tensor_kind_name(TensorKind k);

struct TensorSpec {
  std::string name;            // e.g. "layer.3.attn.query"
  TensorKind kind;
  int32_t layer = -1;          // -1 for the embedding and the final norm
  DType dtype;                 // as stored by convert
  std::vector<int64_t> shape;  // logical (unsharded) shape
  uint32_t blocks = 0;         // kQ8RowBlock: scale blocks of the whole tensor
};

// The model's tensors in the release checkpoint's order (layers in string order).
std::vector<TensorSpec> model_tensors(const ModelConfig& cfg);
std::string layer_tensor_name(int layer, TensorKind kind);

// What one rank holds of a tensor: a contiguous range along one axis (axis -1: all).
struct ShardSlice {
  int32_t axis = -1;
  int64_t start = 0;
  int64_t length = 0;
  std::vector<int64_t> shape;  // local logical shape
  uint32_t blocks = 0;         // kQ8RowBlock: scale blocks held
  uint32_t block_start = 0;    // first global scale block held
};
// Refuses (with the reason) a TP degree the config cannot be split by.
Status check_tensor_parallel(const ModelConfig& cfg, int tp);
ShardSlice shard_slice(const TensorSpec& t, const ModelConfig& cfg, int tp, int rank);

// ---------------------------------------------------------------------------------
// Shard files.
struct IndexEntry {
  std::string name;
  DType dtype = DType::kF32;
  uint32_t param = 0;                  // kQ8RowBlock: scale blocks; kQ4Group: group size
  std::vector<int64_t> shape;          // local shape
  std::vector<int64_t> global_shape;   // shape of the whole tensor
  int32_t split_axis = -1;             // -1: this is the whole tensor
  uint32_t compression = 0;            // 0: raw, 1: zstd
  int64_t split_start = 0;
  uint64_t offset = 0;                 // from the start of the data section
  uint64_t stored_size = 0;            // bytes in the file
  uint64_t size = 0;                   // bytes once decompressed
  uint64_t xxh3 = 0;                   // of the stored bytes
};

struct ShardHeader {
  uint32_t version = kFormatVersion;
  uint32_t rank = 0;
  uint32_t rank_count = 1;
  uint64_t model_id = 0;
  uint64_t tensor_count = 0;
  uint64_t index_offset = kShardHeaderSize;
  uint64_t index_size = 0;
  uint64_t data_offset = 0;
  uint64_t data_size = 0;
  uint64_t file_size = 0;
  uint32_t alignment = kMinAlignment;
  uint32_t flags = 0;
  uint64_t index_xxh3 = 0;
};

std::string serialize_index(const std::vector<IndexEntry>& entries);
std::string serialize_header(const ShardHeader& h);   // exactly kShardHeaderSize bytes
Result<ShardHeader> parse_header(const uint8_t* data, uint64_t size, const std::string& file);
Result<std::vector<IndexEntry>> parse_index(const uint8_t* data, uint64_t size, const ShardHeader& h,
                                            const std::string& file);

// Assigns offsets to entries (in order), each aligned; fills the header's layout fields.
// Entries' stored_size must be set.
void layout_shard(std::vector<IndexEntry>& entries, ShardHeader& h);

std::string shard_file_name(uint32_t rank, uint32_t rank_count);
// Whether a file name is a shard's (shard-*.gkt), as a model directory's listing is read.
bool is_shard_file_name(const std::string& name);

// Writes one entry's payload sequentially at its planned offset in a shard being built,
// through a caller's staging buffer (large runs bypass it), hashing as it goes and
// starting writeback early so dirty pages do not pile up until the final fsync.
// On a file with direct I/O (OutputFile::enable_direct_io) and a staging buffer whose
// address and capacity are multiples of OutputFile::kDirectIoAlign, the payload bypasses
// the page cache: runs of whole aligned blocks go from the caller's memory, others through
// the staging buffer, and the last flush pads the tail with zeros to a whole block. The padding stays inside the entry's
// alignment gap (payload offsets are multiples of the shard alignment, at least 4096) or
// past the end of the file, which write_shard_tail() cuts back to the header's size.
class PayloadWriter {
 public:
  PayloadWriter(const OutputFile* file, uint64_t offset, uint8_t* staging, size_t capacity);
  Status append(const void* data, size_t n);
  Status append_bf16_of_f32(const float* values, size_t count);  // round to nearest even
  Status zeros(size_t n);
  Status flush();
  uint64_t written() const { return pos_ - start_ + used_; }
  uint64_t digest() const { return hash_.digest(); }

 private:
  Status write_out(const uint8_t* p, size_t n);
  bool direct_run(const uint8_t* p, size_t n) const;  // whether p[0, n) may go direct
  const OutputFile* file_;
  uint64_t start_, pos_;
  uint8_t* buf_;
  size_t cap_;
  size_t used_ = 0;
  Xxh3Stream hash_;
};

// Completes a shard whose payloads are written: the index (entries with their final
// checksums) and the header (with the index checksum) go in, and the file is fsynced.
Status write_shard_tail(const OutputFile& file, ShardHeader& header, const std::vector<IndexEntry>& entries);

// A typed, zero-copy view of one stored tensor.
struct TensorView {
  const IndexEntry* entry = nullptr;
  const uint8_t* data = nullptr;
  uint64_t size = 0;
  template <class T>
  const T* as() const { return reinterpret_cast<const T*>(data); }
};
// An int8 weight with row-block scales: codes [E, K, N] (E = 1 for 2-D), scales [E, B, N].
struct Q8View {
  const int8_t* codes = nullptr;
  const uint16_t* scales = nullptr;  // bf16 bits
  int64_t experts = 1, rows = 0, cols = 0;
  uint32_t blocks = 1;
};

// Any stored weight matrix [E, K, N] (E = 1 for 2-D): its dtype decides the layout.
// kQ8RowBlock: codes/scales as Q8View; kQ4Group and kF8Column: `data` is the k-chunked
// payload (SPEC.md §4.1), `matrix_bytes` apart per expert; kBF16: [E, K, N] row-major.
struct WeightView {
  DType dtype = DType::kQ8RowBlock;
  int64_t experts = 1, rows = 0, cols = 0;
  uint32_t param = 0;               // q8rb: scale blocks; q4g: group size
  const uint8_t* data = nullptr;    // q4g, f8col, bf16: the payload
  uint64_t matrix_bytes = 0;        // q4g, f8col, bf16: bytes per expert
  Q8View q8;                        // q8rb
  // The same view restricted to expert e (a 2-D matrix).
  WeightView expert(int64_t e) const;
};

// A memory-mapped shard file, validated on open.
class ShardReader {
 public:
  struct Expect {
    std::optional<uint32_t> rank, rank_count;
    std::optional<uint64_t> model_id, file_size, index_xxh3;
  };
  static Result<ShardReader> open(const std::string& path, const Expect& expect = {});

  const ShardHeader& header() const { return header_; }
  const std::vector<IndexEntry>& entries() const { return entries_; }
  const IndexEntry* find(std::string_view name) const;
  const std::string& path() const { return file_.path(); }
  // Stored bytes of an entry (compressed if it is).
  const uint8_t* stored(const IndexEntry& e) const { return file_.data() + header_.data_offset + e.offset; }
  // Checks dtype and shape ("expected / actual"); refuses compressed entries.
  Result<TensorView> view(std::string_view name, DType dtype, std::span<const int64_t> shape) const;
  Result<Q8View> q8(std::string_view name, std::span<const int64_t> shape) const;
  // A weight matrix of whatever scheme it is stored in; checks the logical shape.
  Result<WeightView> weight(std::string_view name, std::span<const int64_t> shape) const;
  // Recomputes the entry's checksum; names the tensor on mismatch.
  Status verify(const IndexEntry& e) const;
  // Checks that every byte outside the header, the index and the tensors is zero.
  Status verify_padding() const;
  // The entry's bytes, decompressed if needed, into `out` (resized).
  Status read(const IndexEntry& e, std::vector<uint8_t>& out) const;
  const MappedFile& file() const { return file_; }

 private:
  MappedFile file_;
  ShardHeader header_;
  std::vector<IndexEntry> entries_;
  std::map<std::string, size_t, std::less<>> by_name_;
};

// ---------------------------------------------------------------------------------
// The manifest.
struct ShardInfo {
  std::string file;
  uint32_t rank = 0;
  uint64_t size = 0;
  uint64_t tensor_count = 0;
  uint64_t index_xxh3 = 0;
};
struct FileInfo {
  std::string name;
  uint64_t size = 0;
  uint64_t xxh3 = 0;     // 0 when not computed
  std::string tensor;    // provenance: which tensor the source file held
};
struct Manifest {
  uint32_t format_version = kFormatVersion;
  ModelConfig config;
  uint32_t tp = 1;
  uint64_t tensor_count = 0;
  uint64_t model_id = 0;
  std::string scheme = "int8";     // weight scheme of the matrices
  uint32_t alignment = kMinAlignment;
  std::vector<ShardInfo> shards;
  std::optional<FileInfo> tokenizer;
  std::string config_source;       // where the config came from
  std::string source;              // the source checkpoint directory's name
  std::vector<FileInfo> source_files;
  std::string producer;            // "grokit convert 0.1.0"

  std::string to_json() const;
  static Result<Manifest> from_json(std::string_view json, const std::string& file);
};
// Identifies a model's shards: XXH3-64 of the canonical config, TP degree and scheme.
uint64_t compute_model_id(const ModelConfig& cfg, uint32_t tp, std::string_view scheme);

// An opened model directory: the manifest is read and checked against the shard files
// (present, sizes as recorded). A directory without a manifest is not a model.
class Model {
 public:
  static Result<Model> open(const std::string& dir);
  const Manifest& manifest() const { return manifest_; }
  const ModelConfig& config() const { return manifest_.config; }
  const std::string& dir() const { return dir_; }
  Result<ShardReader> open_shard(uint32_t rank) const;
  std::string shard_path(uint32_t rank) const;

 private:
  std::string dir_;
  Manifest manifest_;
};

}  // namespace grokit::format
