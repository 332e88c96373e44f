// The release checkpoint: its names, its config, and the checks made before converting.
#include <dirent.h>

#include <algorithm>
#include <cstdio>
#include <mutex>

#include "convert/convert.h"

namespace grokit::convert {

using format::DType;
using format::ModelConfig;
using format::TensorKind;
using format::TensorSpec;

// One table maps our names to the release's parameter paths.
static const char* release_suffix(TensorKind k) {
  switch (k) {
    case TensorKind::kEmbedding: return "language_model/in_out_embed/embeddings";
    case TensorKind::kFinalNorm: return "language_model/rms_norm/scale";
    case TensorKind::kMoeGate: return "moe/linear";
    case TensorKind::kMoeDown: return "moe/linear_1";
    case TensorKind::kMoeUp: return "moe/linear_v";
    case TensorKind::kAttnKey: return "multi_head_attention/key";
    case TensorKind::kAttnOutput: return "multi_head_attention/linear";
    case TensorKind::kAttnQuery: return "multi_head_attention/query";
    case TensorKind::kAttnValue: return "multi_head_attention/value";
    case TensorKind::kNormAttnIn: return "rms_norm";
    case TensorKind::kNormAttnOut: return "rms_norm_1";
    case TensorKind::kNormMoeIn: return "rms_norm_2";
    case TensorKind::kNormMoeOut: return "rms_norm_3";
    case TensorKind::kRouter: return "router/w";
  }
  return "?";
}

std::string release_path(const TensorSpec& t) {
  if (t.layer < 0) return release_suffix(t.kind);
  return "transformer/decoder_layer_" + std::to_string(t.layer) + "/" + release_suffix(t.kind);
}

std::string release_file_name(size_t index) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "tensor%05zu_000", index);
  return buf;
}

std::optional<uint64_t> grok1_release_file_size(TensorKind kind) {
  switch (kind) {
    case TensorKind::kEmbedding: return 3'221'225'637ull;
    case TensorKind::kMoeGate:
    case TensorKind::kMoeUp: return 1'611'137'347ull;
    case TensorKind::kMoeDown: return 1'611'399'491ull;
    case TensorKind::kAttnOutput: return 37'847'359ull;
    case TensorKind::kAttnQuery: return 37'761'334ull;
    case TensorKind::kAttnKey:
    case TensorKind::kAttnValue: return 6'293'814ull;
    case TensorKind::kRouter: return 196'770ull;
    case TensorKind::kFinalNorm:
    case TensorKind::kNormAttnIn:
    case TensorKind::kNormAttnOut:
    case TensorKind::kNormMoeIn:
    case TensorKind::kNormMoeOut: return 24'727ull;
  }
  return std::nullopt;
}

Result<LoadedConfig> load_config(const std::string& ckpt_dir, const std::optional<std::string>& config_file) {
  std::string path;
  if (config_file) {
    path = *config_file;
  } else {
    std::string beside = path_join(path_dirname(ckpt_dir), "config.json");
    if (path_exists(beside)) path = beside;
  }
  if (path.empty()) return LoadedConfig{ModelConfig::grok1(), "built-in Grok-1 values (no config.json beside ckpt-0)"};
  GROKIT_ASSIGN_OR_RETURN(std::string text, read_small_file(path, 1u << 20));
  GROKIT_ASSIGN_OR_RETURN(ModelConfig cfg, ModelConfig::from_json(text, path));
  return LoadedConfig{cfg, path};
}

Result<ReleaseTensor> read_release_tensor(const std::string& path, MappedFile& mapped) {
  GROKIT_ASSIGN_OR_RETURN(mapped, MappedFile::open(path));
  return parse_release_pickle(mapped.data(), mapped.size(), path);
}

static std::string shape_text(const std::vector<int64_t>& s) {
  std::string r = "[";
  for (size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
  return r + "]";
}

static Status expect_array(const ArrayView& a, ElementType type, const std::vector<int64_t>& shape,
                           const std::string& what) {
  if (a.type != type || a.shape != shape)
    return make_error(what, ": expected ", element_type_name(type), shape_text(shape), " / actual ", a.describe());
  return {};
}

Status check_source_tensor(const ReleaseTensor& t, const TensorSpec& spec, const ModelConfig& cfg,
                           const std::string& path) {
  std::string what = path + " (" + release_path(spec) + ")";
  if (spec.dtype == DType::kQ8RowBlock) {
    if (!t.quantized) return make_error(what, ": expected a QuantizedWeight8bit, found a plain ", t.array.describe(), " array");
    GROKIT_TRY(expect_array(t.weight, ElementType::kI8, spec.shape, what + " weight"));
    std::vector<int64_t> scales = spec.shape;
    scales[scales.size() - 2] = spec.blocks;
    GROKIT_TRY(expect_array(t.scales, ElementType::kBF16, scales, what + " scales"));
    return {};
  }
  if (t.quantized) return make_error(what, ": expected a plain array, found a QuantizedWeight8bit");
  return expect_array(t.array, ElementType::kF32, spec.shape, what);
}

// Reads the shapes of layer 0's expert and attention-output tensors to learn the ffn size
// and the scale-block counts, which the official config does not state directly.
static Status infer_from_shapes(const std::vector<TensorSpec>& specs, const std::string& dir, ModelConfig& cfg,
                                std::vector<std::string>& notes) {
  for (const auto& s : specs) {
    if (s.layer != 0) continue;
    if (s.kind != TensorKind::kMoeDown && s.kind != TensorKind::kAttnOutput) continue;
    size_t index = static_cast<size_t>(&s - specs.data());
    std::string path = path_join(dir, release_file_name(index));
    MappedFile m;
    GROKIT_ASSIGN_OR_RETURN(ReleaseTensor t, read_release_tensor(path, m));
    if (!t.quantized || t.scales.shape.size() < 2 || t.weight.shape.size() < 2)
      return make_error(path, " (", release_path(s), "): expected a QuantizedWeight8bit");
    int64_t blocks = t.scales.shape[t.scales.shape.size() - 2];
    if (s.kind == TensorKind::kMoeDown) {
      int64_t f = t.weight.shape[t.weight.shape.size() - 2];
      if (f != cfg.ffn())
        notes.push_back(str_cat("ffn size ", f, " read from ", release_path(s), " differs from the ", cfg.ffn(),
                                " that widening_factor gives; using ", f));
      cfg.ffn_size = f;
      cfg.moe_down_scale_blocks = blocks;
    } else {
      cfg.attn_output_scale_blocks = blocks;
    }
  }
  if (cfg.ffn_size == 0) cfg.ffn_size = cfg.ffn();
  return cfg.validate();
}

Result<Checkpoint> index_checkpoint(const std::string& dir, const ModelConfig& config, unsigned threads) {
  if (!is_directory(dir)) return make_error(dir, ": not a directory (expected the release's ckpt-0 directory)");
  Checkpoint ck;
  ck.dir = dir;
  ck.config = config;
  std::vector<TensorSpec> specs = format::model_tensors(config);

  // 1. Presence: diff what the config expects against what is on disk.
  std::vector<std::string> missing;
  for (size_t i = 0; i < specs.size(); ++i) {
    if (!path_exists(path_join(dir, release_file_name(i)))) missing.push_back(release_file_name(i));
  }
  size_t extra = 0;
  if (DIR* d = opendir(dir.c_str())) {
    while (dirent* e = readdir(d)) {
      std::string n = e->d_name;
      unsigned idx;
      char tail[8];
      if (n.size() == 15 && std::sscanf(n.c_str(), "tensor%5u_%3s", &idx, tail) == 2 && idx >= specs.size()) ++extra;
    }
    closedir(d);
  }
  if (!missing.empty() || extra > 0) {
    std::string msg = str_cat(dir, ": the config (", config.num_layers, " layers) expects ", specs.size(), " tensor files");
    if (!missing.empty()) {
      msg += str_cat("; ", missing.size(), " missing: ");
      for (size_t i = 0; i < missing.size() && i < 8; ++i) msg += (i ? ", " : "") + missing[i];
      if (missing.size() > 8) msg += ", ...";
    }
    if (extra > 0) msg += str_cat("; ", extra, " more tensor files than expected (wrong config?)");
    return Error{msg};
  }

  // 2. Shapes the config does not state.
  std::vector<std::string> notes;
  GROKIT_TRY(infer_from_shapes(specs, dir, ck.config, notes));
  for (const auto& n : notes) std::fprintf(stderr, "note: %s\n", n.c_str());
  specs = format::model_tensors(ck.config);

  // 3. Sizes (released Grok-1 only) and every file's dtypes and shapes.
  bool grok1 = ck.config.is_grok1_shape();
  ck.tensors.resize(specs.size());
  std::mutex mu;
  std::optional<Error> first_error;
  size_t first_error_index = SIZE_MAX;
  parallel_for(specs.size(), std::max(1u, threads), [&](size_t i) {
    SourceTensor& st = ck.tensors[i];
    st.spec = specs[i];
    st.path = path_join(dir, release_file_name(i));
    auto report = [&](Error e) {
      std::lock_guard<std::mutex> lock(mu);
      if (i < first_error_index) {
        first_error_index = i;
        first_error = std::move(e);
      }
    };
    auto size = file_size(st.path);
    if (!size.ok()) return report(size.take_error());
    st.size = *size;
    if (grok1) {
      uint64_t want = *grok1_release_file_size(st.spec.kind);
      if (st.size != want) {
        return report(make_error(st.path, " (", release_path(st.spec), "): ", st.size, " bytes, the release's file has ",
                                 want, st.size < want ? " (truncated download?)" : ""));
      }
    }
    MappedFile m;
    auto t = read_release_tensor(st.path, m);
    if (!t.ok()) return report(t.take_error());
    auto ok = check_source_tensor(*t, st.spec, ck.config, st.path);
    if (!ok.ok()) return report(ok.take_error());
  });
  if (first_error) return *first_error;
  for (const auto& t : ck.tensors) ck.total_bytes += t.size;
  return ck;
}

}  // namespace grokit::convert
