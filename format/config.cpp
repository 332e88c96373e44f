// ModelConfig: the one record that carries a model's sizes.
#include <algorithm>
#include <cmath>
#include <nlohmann/json.hpp>

#include "format/format.h"

namespace grokit::format {

using ordered_json = nlohmann::ordered_json;

ModelConfig ModelConfig::grok1() { return ModelConfig{}; }

int64_t ModelConfig::ffn() const {
  if (ffn_size > 0) return ffn_size;
  // The official code: int(widening_factor * emb_size) * 2 // 3, rounded up to 8.
  // A factor from a hostile file may not fit int64: -1 then, which validate() refuses.
  const double product = widening_factor * static_cast<double>(emb_size);
  if (!(product >= 0 && product < 0x1p62)) return -1;
  auto f = static_cast<int64_t>(product) * 2 / 3;
  return f + ((8 - f % 8) % 8);
}

bool ModelConfig::is_grok1_shape() const {
  ModelConfig g;
  return vocab_size == g.vocab_size && emb_size == g.emb_size && key_size == g.key_size &&
         num_q_heads == g.num_q_heads && num_kv_heads == g.num_kv_heads && num_layers == g.num_layers &&
         num_experts == g.num_experts && ffn() == g.ffn() && attn_output_scale_blocks == g.attn_output_scale_blocks &&
         moe_down_scale_blocks == g.moe_down_scale_blocks;
}

float ModelConfig::embedding_multiplier_bf16() const {
  return round_bf16(static_cast<float>(embedding_multiplier_scale));
}
float ModelConfig::output_multiplier_bf16() const { return round_bf16(static_cast<float>(output_multiplier_scale)); }

int64_t ModelConfig::chunked_sum_rows(int64_t K, int64_t G) {
  const int64_t unit = std::max<int64_t>(32, G);
  int64_t nb = 16;
  while (nb > 1 && K % (nb * unit) != 0) nb /= 2;
  return K / nb;
}

int64_t ModelConfig::split_sum_rows(int64_t K) {
  int64_t nb = 16;
  while (nb > 1 && K % (2 * nb) != 0) nb /= 2;
  return K / nb;
}

namespace {

struct IntField { const char* key; int64_t ModelConfig::*member; };
struct RealField { const char* key; double ModelConfig::*member; };

constexpr IntField kIntFields[] = {
    {"vocab_size", &ModelConfig::vocab_size},
    {"pad_token", &ModelConfig::pad_token},
    {"eos_token", &ModelConfig::eos_token},
    {"sequence_len", &ModelConfig::sequence_len},
    {"emb_size", &ModelConfig::emb_size},
    {"key_size", &ModelConfig::key_size},
    {"num_q_heads", &ModelConfig::num_q_heads},
    {"num_kv_heads", &ModelConfig::num_kv_heads},
    {"num_layers", &ModelConfig::num_layers},
    {"num_experts", &ModelConfig::num_experts},
    {"num_selected_experts", &ModelConfig::num_selected_experts},
    {"ffn_size", &ModelConfig::ffn_size},
    {"attn_output_scale_blocks", &ModelConfig::attn_output_scale_blocks},
    {"moe_down_scale_blocks", &ModelConfig::moe_down_scale_blocks},
};
constexpr RealField kRealFields[] = {
    {"embedding_multiplier_scale", &ModelConfig::embedding_multiplier_scale},
    {"output_multiplier_scale", &ModelConfig::output_multiplier_scale},
    {"widening_factor", &ModelConfig::widening_factor},
    {"attn_output_multiplier", &ModelConfig::attn_output_multiplier},
    {"rms_norm_eps", &ModelConfig::rms_norm_eps},
    {"rope_base", &ModelConfig::rope_base},
    {"attn_logit_cap", &ModelConfig::attn_logit_cap},
};

}  // namespace

Result<ModelConfig> ModelConfig::from_json(std::string_view text, std::string_view source) {
  nlohmann::json j = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return make_error(source, ": not valid JSON");
  if (!j.is_object()) return make_error(source, ": the config must be a JSON object");
  ModelConfig c;
  for (auto it = j.begin(); it != j.end(); ++it) {
    const std::string& key = it.key();
    const auto& v = it.value();
    bool known = false;
    for (const auto& f : kIntFields) {
      if (key != f.key) continue;
      known = true;
      if (!v.is_number_integer() && !(v.is_number_float() && std::floor(v.get<double>()) == v.get<double>()))
        return make_error(source, ": '", key, "' must be an integer, found ", v.dump());
      double d = v.get<double>();
      if (std::fabs(d) > 9.0e15) return make_error(source, ": '", key, "' is out of range: ", v.dump());
      c.*f.member = v.is_number_integer() ? v.get<int64_t>() : static_cast<int64_t>(d);
    }
    for (const auto& f : kRealFields) {
      if (key != f.key) continue;
      known = true;
      if (!v.is_number()) return make_error(source, ": '", key, "' must be a number, found ", v.dump());
      c.*f.member = v.get<double>();
    }
    if (!known) return make_error(source, ": unknown config key '", key, "'");
  }
  if (auto s = c.validate(); !s.ok()) return with_context(s.take_error(), source);
  return c;
}

std::string ModelConfig::to_json() const {
  ordered_json j;
  auto put_int = [&](const char* k, int64_t v) { j[k] = v; };
  j["vocab_size"] = vocab_size;
  j["pad_token"] = pad_token;
  j["eos_token"] = eos_token;
  j["sequence_len"] = sequence_len;
  j["embedding_multiplier_scale"] = embedding_multiplier_scale;
  j["output_multiplier_scale"] = output_multiplier_scale;
  j["emb_size"] = emb_size;
  j["key_size"] = key_size;
  j["num_q_heads"] = num_q_heads;
  j["num_kv_heads"] = num_kv_heads;
  j["num_layers"] = num_layers;
  j["widening_factor"] = widening_factor;
  j["attn_output_multiplier"] = attn_output_multiplier;
  j["num_experts"] = num_experts;
  j["num_selected_experts"] = num_selected_experts;
  j["rms_norm_eps"] = rms_norm_eps;
  j["rope_base"] = rope_base;
  j["attn_logit_cap"] = attn_logit_cap;
  put_int("ffn_size", ffn());
  put_int("attn_output_scale_blocks", attn_output_scale_blocks);
  put_int("moe_down_scale_blocks", moe_down_scale_blocks);
  return j.dump(2);
}

Status ModelConfig::validate() const {
  const int64_t kMaxDim = int64_t{1} << 31;
  for (const auto& f : kIntFields) {
    int64_t v = this->*f.member;
    bool may_be_zero = std::string_view(f.key) == "pad_token" || std::string_view(f.key) == "eos_token" ||
                       std::string_view(f.key) == "ffn_size";
    if (v < 0 || (v == 0 && !may_be_zero)) return make_error("'", f.key, "' must be positive, found ", v);
    if (v > kMaxDim) return make_error("'", f.key, "' = ", v, " is larger than 2^31");
  }
  for (const auto& f : kRealFields) {
    double v = this->*f.member;
    if (!std::isfinite(v) || v <= 0) return make_error("'", f.key, "' must be a positive finite number, found ", v);
  }
  if (pad_token >= vocab_size || eos_token >= vocab_size)
    return make_error("pad_token and eos_token must be below vocab_size ", vocab_size);
  if (num_q_heads % num_kv_heads != 0)
    return make_error("num_q_heads ", num_q_heads, " is not a multiple of num_kv_heads ", num_kv_heads);
  if (num_selected_experts > num_experts)
    return make_error("num_selected_experts ", num_selected_experts, " exceeds num_experts ", num_experts);
  if (key_size % 2 != 0) return make_error("key_size ", key_size, " must be even (RoPE rotates halves)");
  if (ffn() <= 0 || ffn() > kMaxDim)
    return make_error("the ffn size derived from widening_factor ", widening_factor, " x emb_size ", emb_size,
                      " is out of range");
  if ((num_q_heads * key_size) % attn_output_scale_blocks != 0)
    return make_error("attention output rows ", num_q_heads * key_size, " do not split into ",
                      attn_output_scale_blocks, " scale blocks");
  if (ffn() % moe_down_scale_blocks != 0)
    return make_error("expert ffn size ", ffn(), " does not split into ", moe_down_scale_blocks, " scale blocks");
  return {};
}

}  // namespace grokit::format
