// manifest.json and the model directory.

#include <nlohmann/json.hpp>

#include "format/format.h"

namespace grokit::format {

using json = nlohmann::json;
using ordered_json = nlohmann::ordered_json;

uint64_t compute_model_id(const ModelConfig& cfg, uint32_t tp, std::string_view scheme) {
  std::string key = cfg.to_json() + "\ntp=" + std::to_string(tp) + "\nscheme=" + std::string(scheme);
  return xxh3_64(key.data(), key.size());
}

std::string Manifest::to_json() const {
  ordered_json j;
  j["format"] = "grokit-model";
  j["format_version"] = format_version;
  j["producer"] = producer;
  j["model_id"] = hex64(model_id);
  j["scheme"] = scheme;
  j["tensor_parallel"] = tp;
  j["alignment"] = alignment;
  j["tensor_count"] = tensor_count;
  j["config"] = ordered_json::parse(config.to_json());
  // Informational: values the forward pass derives from the config, as it applies them.
  ordered_json d;
  d["ffn_size"] = config.ffn();
  d["head_dim"] = config.key_size;
  d["q_heads_per_kv_head"] = config.num_q_heads / config.num_kv_heads;
  d["embedding_multiplier_bf16"] = config.embedding_multiplier_bf16();
  d["output_multiplier_bf16"] = config.output_multiplier_bf16();
  d["attn_output_multiplier_f32"] = static_cast<float>(config.attn_output_multiplier);
  j["derived"] = d;
  ordered_json shards = ordered_json::array();
  for (const auto& s : this->shards) {
    ordered_json o;
    o["file"] = s.file;
    o["rank"] = s.rank;
    o["size"] = s.size;
    o["tensor_count"] = s.tensor_count;
    o["index_xxh3"] = hex64(s.index_xxh3);
    shards.push_back(o);
  }
  j["shards"] = shards;
  if (tokenizer) {
    j["tokenizer"] = {{"file", tokenizer->name}, {"size", tokenizer->size}, {"xxh3", hex64(tokenizer->xxh3)}};
  } else {
    j["tokenizer"] = nullptr;
  }
  ordered_json prov;
  prov["source"] = source;
  prov["config_source"] = config_source;
  ordered_json files = ordered_json::array();
  for (const auto& f : source_files) {
    ordered_json o;
    o["name"] = f.name;
    o["size"] = f.size;
    o["tensor"] = f.tensor;
    files.push_back(o);
  }
  prov["files"] = files;
  j["provenance"] = prov;
  return j.dump(2) + "\n";
}

namespace {
// Typed getters that name the manifest and the key on failure.
struct Reader {
  const std::string& file;
  Result<const json*> get(const json& o, const char* key, json::value_t type) const {
    auto it = o.find(key);
    if (it == o.end()) return make_error(file, ": missing key '", key, "'");
    bool ok = it->type() == type || (type == json::value_t::number_unsigned && it->is_number_unsigned()) ||
              (type == json::value_t::number_integer && it->is_number_integer());
    if (!ok) return make_error(file, ": key '", key, "' has the wrong type (", it->type_name(), ")");
    return &*it;
  }
  Result<uint64_t> u64(const json& o, const char* key) const {
    GROKIT_ASSIGN_OR_RETURN(const json* v, get(o, key, json::value_t::number_unsigned));
    return v->get<uint64_t>();
  }
  Result<std::string> str(const json& o, const char* key) const {
    GROKIT_ASSIGN_OR_RETURN(const json* v, get(o, key, json::value_t::string));
    return v->get<std::string>();
  }
  Result<uint64_t> hex(const json& o, const char* key) const {
    GROKIT_ASSIGN_OR_RETURN(std::string s, str(o, key));
    auto v = parse_hex64(s);
    if (!v) return make_error(file, ": key '", key, "' is not 16 hex digits");
    return *v;
  }
};
}  // namespace

Result<Manifest> Manifest::from_json(std::string_view text, const std::string& file) {
  json j = json::parse(text, nullptr, false);
  if (j.is_discarded() || !j.is_object()) return make_error(file, ": not a JSON object");
  Reader r{file};
  Manifest m;
  GROKIT_ASSIGN_OR_RETURN(std::string fmt, r.str(j, "format"));
  if (fmt != "grokit-model") return make_error(file, ": format '", fmt, "' is not grokit-model");
  GROKIT_ASSIGN_OR_RETURN(uint64_t version, r.u64(j, "format_version"));
  if (version == 0 || version > kFormatVersion)
    return make_error(file, ": format version ", version, " is not supported (this grokit reads version ", kFormatVersion, ")");
  m.format_version = static_cast<uint32_t>(version);
  GROKIT_ASSIGN_OR_RETURN(m.producer, r.str(j, "producer"));
  GROKIT_ASSIGN_OR_RETURN(m.model_id, r.hex(j, "model_id"));
  GROKIT_ASSIGN_OR_RETURN(m.scheme, r.str(j, "scheme"));
  GROKIT_ASSIGN_OR_RETURN(uint64_t tp, r.u64(j, "tensor_parallel"));
  if (tp == 0 || tp > 4096) return make_error(file, ": tensor_parallel ", tp, " is out of range");
  m.tp = static_cast<uint32_t>(tp);
  GROKIT_ASSIGN_OR_RETURN(uint64_t alignment, r.u64(j, "alignment"));
  if (alignment < kMinAlignment || alignment > (1u << 30) || (alignment & (alignment - 1)) != 0)
    return make_error(file, ": alignment ", alignment, " is not a power of two from 4096 to 2^30");
  m.alignment = static_cast<uint32_t>(alignment);
  GROKIT_ASSIGN_OR_RETURN(m.tensor_count, r.u64(j, "tensor_count"));
  GROKIT_ASSIGN_OR_RETURN(const json* cfg, r.get(j, "config", json::value_t::object));
  GROKIT_ASSIGN_OR_RETURN(m.config, ModelConfig::from_json(cfg->dump(), file + " config"));
  if (compute_model_id(m.config, m.tp, m.scheme) != m.model_id)
    return make_error(file, ": model_id does not match the config, TP degree and scheme it records (edited manifest?)");
  GROKIT_ASSIGN_OR_RETURN(const json* shards, r.get(j, "shards", json::value_t::array));
  if (shards->size() != m.tp) return make_error(file, ": ", shards->size(), " shards listed for TP ", m.tp);
  for (size_t i = 0; i < shards->size(); ++i) {
    const json& s = (*shards)[i];
    if (!s.is_object()) return make_error(file, ": shards[", i, "] is not an object");
    ShardInfo info;
    GROKIT_ASSIGN_OR_RETURN(info.file, r.str(s, "file"));
    GROKIT_ASSIGN_OR_RETURN(uint64_t rank, r.u64(s, "rank"));
    if (rank != i) return make_error(file, ": shards[", i, "] has rank ", rank);
    info.rank = static_cast<uint32_t>(rank);
    if (info.file != shard_file_name(info.rank, m.tp))
      return make_error(file, ": shards[", i, "] names file '", info.file, "', expected '", shard_file_name(info.rank, m.tp), "'");
    GROKIT_ASSIGN_OR_RETURN(info.size, r.u64(s, "size"));
    GROKIT_ASSIGN_OR_RETURN(info.tensor_count, r.u64(s, "tensor_count"));
    if (info.tensor_count != m.tensor_count)
      return make_error(file, ": shards[", i, "] holds ", info.tensor_count, " tensors, the model ", m.tensor_count);
    GROKIT_ASSIGN_OR_RETURN(info.index_xxh3, r.hex(s, "index_xxh3"));
    m.shards.push_back(info);
  }
  auto tok = j.find("tokenizer");
  if (tok != j.end() && !tok->is_null()) {
    if (!tok->is_object()) return make_error(file, ": tokenizer must be an object or null");
    FileInfo t;
    GROKIT_ASSIGN_OR_RETURN(t.name, r.str(*tok, "file"));
    if (t.name != kTokenizerFile) return make_error(file, ": tokenizer file must be '", kTokenizerFile, "'");
    GROKIT_ASSIGN_OR_RETURN(t.size, r.u64(*tok, "size"));
    GROKIT_ASSIGN_OR_RETURN(t.xxh3, r.hex(*tok, "xxh3"));
    m.tokenizer = t;
  }
  auto prov = j.find("provenance");
  if (prov != j.end() && prov->is_object()) {
    if (auto v = prov->find("source"); v != prov->end() && v->is_string()) m.source = v->get<std::string>();
    if (auto v = prov->find("config_source"); v != prov->end() && v->is_string()) m.config_source = v->get<std::string>();
    if (auto v = prov->find("files"); v != prov->end() && v->is_array()) {
      for (const auto& f : *v) {
        if (!f.is_object()) continue;
        FileInfo fi;
        if (auto n = f.find("name"); n != f.end() && n->is_string()) fi.name = n->get<std::string>();
        if (auto n = f.find("size"); n != f.end() && n->is_number_unsigned()) fi.size = n->get<uint64_t>();
        if (auto n = f.find("tensor"); n != f.end() && n->is_string()) fi.tensor = n->get<std::string>();
        m.source_files.push_back(fi);
      }
    }
  }
  return m;
}

// ---------------------------------------------------------------------------------
Result<Model> Model::open(const std::string& dir) {
  if (!is_directory(dir)) return make_error(dir, ": not a directory");
  std::string manifest_path = path_join(dir, kManifestFile);
  if (!path_exists(manifest_path)) {
    // quantize's state without a manifest: an interrupted quantization (its shards are
    // renamed into place just before the manifest is written).
    if (path_exists(path_join(dir, ".grokit-quantize")))
      return make_error(dir, ": no ", kManifestFile,
                        ": this is an incomplete quantization (interrupted?); run 'grokit quantize' again with --force");
    // Shards or convert state without a manifest: an interrupted or failed conversion.
    bool partial = path_exists(path_join(dir, ".grokit-convert"));
    for (const auto& n : list_directory(dir)) partial = partial || is_shard_file_name(n);
    if (partial)
      return make_error(dir, ": no ", kManifestFile,
                        ": this is an incomplete conversion (interrupted?); finish it with 'grokit convert --resume'");
    return make_error(dir, ": no ", kManifestFile, ": not a grokit model directory");
  }
  Model m;
  m.dir_ = dir;
  GROKIT_ASSIGN_OR_RETURN(std::string text, read_small_file(manifest_path, 256u << 20));
  GROKIT_ASSIGN_OR_RETURN(m.manifest_, Manifest::from_json(text, manifest_path));
  for (const auto& s : m.manifest_.shards) {
    std::string p = path_join(dir, s.file);
    auto size = file_size(p);
    if (!size.ok()) return make_error(dir, ": shard ", s.rank, " (", s.file, ") is missing");
    if (*size != s.size)
      return make_error(p, ": ", *size, " bytes, the manifest records ", s.size, *size < s.size ? " (truncated)" : "");
  }
  if (m.manifest_.tokenizer) {
    std::string p = path_join(dir, m.manifest_.tokenizer->name);
    auto size = file_size(p);
    if (!size.ok()) return make_error(dir, ": tokenizer file ", m.manifest_.tokenizer->name, " is missing");
    if (*size != m.manifest_.tokenizer->size)
      return make_error(p, ": ", *size, " bytes, the manifest records ", m.manifest_.tokenizer->size);
  }
  return m;
}

std::string Model::shard_path(uint32_t rank) const { return path_join(dir_, shard_file_name(rank, manifest_.tp)); }

Result<ShardReader> Model::open_shard(uint32_t rank) const {
  if (rank >= manifest_.tp) return make_error(dir_, ": rank ", rank, " out of range for TP ", manifest_.tp);
  const ShardInfo& s = manifest_.shards[rank];
  ShardReader::Expect e;
  e.rank = rank;
  e.rank_count = manifest_.tp;
  e.model_id = manifest_.model_id;
  e.file_size = s.size;
  e.index_xxh3 = s.index_xxh3;
  GROKIT_ASSIGN_OR_RETURN(ShardReader r, ShardReader::open(path_join(dir_, s.file), e));
  if (r.header().alignment != manifest_.alignment)
    return make_error(r.path(), ": alignment ", r.header().alignment, ", the manifest records ", manifest_.alignment);
  if (r.entries().size() != s.tensor_count)
    return make_error(r.path(), ": ", r.entries().size(), " tensors, the manifest records ", s.tensor_count);
  return r;
}

}  // namespace grokit::format
