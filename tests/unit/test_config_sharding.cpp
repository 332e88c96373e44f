// Tests of the configuration record, the logical tensor list, the tensor-parallel
// sharding rules (format/format.h, format/SPEC.md §5-§7), and the bf16 conversion and
// checked arithmetic of common/common.h.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "common/common.h"
#include "format/format.h"

namespace grokit::format {
namespace {

bool contains(const std::string& s, const std::string& frag) { return s.find(frag) != std::string::npos; }

#define EXPECT_ERROR_HAS(result, ...)                                                      \
  do {                                                                                     \
    const auto& r_ = (result);                                                             \
    ASSERT_FALSE(r_.ok()) << "accepted input that should be refused";                      \
    for (const std::string& frag_ : std::vector<std::string>{__VA_ARGS__})                 \
      EXPECT_TRUE(contains(r_.error().message, frag_))                                     \
          << "message: " << r_.error().message << "\nlacks: " << frag_;                   \
  } while (0)

// Python: json.dumps(config, indent=2) of the Grok-1 config in the manifest's key order
// (SPEC §7: the canonical config text is exactly this).
const char* const kPythonGrok1Config =
    "{\n  \"vocab_size\": 131072,\n  \"pad_token\": 0,\n  \"eos_token\": 2,\n  \"sequence_len\": 8192,\n"
    "  \"embedding_multiplier_scale\": 78.38367176906169,\n  \"output_multiplier_scale\": 0.5773502691896257,\n"
    "  \"emb_size\": 6144,\n  \"key_size\": 128,\n  \"num_q_heads\": 48,\n  \"num_kv_heads\": 8,\n"
    "  \"num_layers\": 64,\n  \"widening_factor\": 8.0,\n  \"attn_output_multiplier\": 0.08838834764831845,\n"
    "  \"num_experts\": 8,\n  \"num_selected_experts\": 2,\n  \"rms_norm_eps\": 1e-05,\n  \"rope_base\": 10000.0,\n"
    "  \"attn_logit_cap\": 30.0,\n  \"ffn_size\": 32768,\n  \"attn_output_scale_blocks\": 8,\n"
    "  \"moe_down_scale_blocks\": 8\n}";

// =================================================================================
// ModelConfig::from_json and validate().

TEST(ModelConfigTest, OfficialKeys) {
  // The official Grok-1 values under their official names (run.py's LanguageModelConfig
  // and TransformerConfig), plus the three extras.
  const char* json = R"({
    "vocab_size": 131072, "pad_token": 0, "eos_token": 2, "sequence_len": 8192,
    "embedding_multiplier_scale": 78.38367176906169, "output_multiplier_scale": 0.5773502691896257,
    "emb_size": 6144, "key_size": 128, "num_q_heads": 48, "num_kv_heads": 8, "num_layers": 64,
    "widening_factor": 8, "attn_output_multiplier": 0.08838834764831845,
    "num_experts": 8, "num_selected_experts": 2,
    "rms_norm_eps": 1e-5, "rope_base": 10000, "attn_logit_cap": 30,
    "attn_output_scale_blocks": 8, "moe_down_scale_blocks": 8})";
  auto r = ModelConfig::from_json(json, "config.json");
  ASSERT_TRUE(r.ok()) << r.error().message;
  EXPECT_EQ(r->vocab_size, 131072);
  EXPECT_EQ(r->emb_size, 6144);
  EXPECT_EQ(r->num_q_heads, 48);
  EXPECT_EQ(r->num_kv_heads, 8);
  EXPECT_EQ(r->num_layers, 64);
  EXPECT_EQ(r->widening_factor, 8.0);
  EXPECT_EQ(r->embedding_multiplier_scale, 78.38367176906169);
  EXPECT_EQ(r->output_multiplier_scale, 0.5773502691896257);
  EXPECT_EQ(r->attn_output_multiplier, 0.08838834764831845);
  EXPECT_EQ(r->rms_norm_eps, 1e-5);
  EXPECT_EQ(r->ffn(), 32768);
  EXPECT_TRUE(r->is_grok1_shape());
  EXPECT_EQ(r->to_json(), ModelConfig::grok1().to_json());
}

TEST(ModelConfigTest, CanonicalTextAndModelIdMatchPython) {
  EXPECT_EQ(ModelConfig::grok1().to_json(), kPythonGrok1Config);
  std::string key = std::string(kPythonGrok1Config) + "\ntp=8\nscheme=int8";
  EXPECT_EQ(compute_model_id(ModelConfig::grok1(), 8, "int8"), xxh3_64(key.data(), key.size()));
  // The canonical text reads back to the same config.
  auto r = ModelConfig::from_json(kPythonGrok1Config, "canon");
  ASSERT_TRUE(r.ok()) << r.error().message;
  EXPECT_EQ(r->to_json(), kPythonGrok1Config);
}

TEST(ModelConfigTest, MissingKeysDefaultToGrok1) {
  auto r = ModelConfig::from_json("{}", "c.json");
  ASSERT_TRUE(r.ok()) << r.error().message;
  EXPECT_EQ(r->to_json(), ModelConfig::grok1().to_json());
  EXPECT_TRUE(r->is_grok1_shape());
  auto r2 = ModelConfig::from_json(R"({"num_layers": 2, "vocab_size": 256})", "c.json");
  ASSERT_TRUE(r2.ok()) << r2.error().message;
  EXPECT_EQ(r2->num_layers, 2);
  EXPECT_EQ(r2->vocab_size, 256);
  EXPECT_EQ(r2->emb_size, 6144);
  EXPECT_EQ(r2->num_q_heads, 48);
  EXPECT_EQ(r2->rope_base, 10000.0);
  EXPECT_EQ(r2->ffn(), 32768);
  EXPECT_FALSE(r2->is_grok1_shape());
  // Integral floats are integers.
  auto r3 = ModelConfig::from_json(R"({"num_layers": 3.0})", "c.json");
  ASSERT_TRUE(r3.ok()) << r3.error().message;
  EXPECT_EQ(r3->num_layers, 3);
}

TEST(ModelConfigTest, UnknownKeyIsAnError) {
  EXPECT_ERROR_HAS(ModelConfig::from_json(R"({"num_layer": 2})", "c.json"), "c.json: unknown config key 'num_layer'");
  EXPECT_ERROR_HAS(ModelConfig::from_json(R"({"embedding_init_scale": 1.0})", "c.json"),
                   "unknown config key 'embedding_init_scale'");
  EXPECT_ERROR_HAS(ModelConfig::from_json(R"({"Num_Layers": 2})", "c.json"), "'Num_Layers'");
}

TEST(ModelConfigTest, WrongTypeIsAnError) {
  EXPECT_ERROR_HAS(ModelConfig::from_json(R"({"num_layers": "64"})", "c.json"),
                   "c.json: 'num_layers' must be an integer, found \"64\"");
  EXPECT_ERROR_HAS(ModelConfig::from_json(R"({"num_layers": 2.5})", "c.json"), "'num_layers' must be an integer, found 2.5");
  EXPECT_ERROR_HAS(ModelConfig::from_json(R"({"num_layers": true})", "c.json"), "'num_layers' must be an integer");
  EXPECT_ERROR_HAS(ModelConfig::from_json(R"({"num_layers": null})", "c.json"), "'num_layers' must be an integer");
  EXPECT_ERROR_HAS(ModelConfig::from_json(R"({"num_layers": [64]})", "c.json"), "'num_layers' must be an integer");
  EXPECT_ERROR_HAS(ModelConfig::from_json(R"({"rope_base": "10000"})", "c.json"), "'rope_base' must be a number");
  EXPECT_ERROR_HAS(ModelConfig::from_json(R"({"rms_norm_eps": false})", "c.json"), "'rms_norm_eps' must be a number");
  EXPECT_ERROR_HAS(ModelConfig::from_json(R"({"num_layers": 1e16})", "c.json"), "'num_layers' is out of range");
  EXPECT_ERROR_HAS(ModelConfig::from_json(R"({"num_layers": 18446744073709551615})", "c.json"),
                   "'num_layers' is out of range");
  EXPECT_ERROR_HAS(ModelConfig::from_json("[1, 2]", "c.json"), "c.json: the config must be a JSON object");
  EXPECT_ERROR_HAS(ModelConfig::from_json("{\"num_layers\": ", "c.json"), "c.json: not valid JSON");
}

TEST(ModelConfigTest, ValidateErrors) {
  auto refused = [](const std::string& json, const std::string& frag) {
    EXPECT_ERROR_HAS(ModelConfig::from_json(json, "c.json"), "c.json: " + frag);
  };
  refused(R"({"num_kv_heads": 5})", "num_q_heads 48 is not a multiple of num_kv_heads 5");
  refused(R"({"num_q_heads": 12, "num_kv_heads": 8})", "num_q_heads 12 is not a multiple of num_kv_heads 8");
  refused(R"({"num_selected_experts": 9})", "num_selected_experts 9 exceeds num_experts 8");
  refused(R"({"key_size": 127})", "key_size 127 must be even");
  refused(R"({"num_layers": 0})", "'num_layers' must be positive, found 0");
  refused(R"({"vocab_size": -1})", "'vocab_size' must be positive, found -1");
  refused(R"({"pad_token": -1})", "'pad_token' must be positive, found -1");
  refused(R"({"emb_size": 2147483649})", "'emb_size' = 2147483649 is larger than 2^31");
  refused(R"({"pad_token": 131072})", "pad_token and eos_token must be below vocab_size 131072");
  refused(R"({"vocab_size": 2})", "pad_token and eos_token must be below vocab_size 2");
  refused(R"({"rms_norm_eps": 0})", "'rms_norm_eps' must be a positive finite number, found 0");
  refused(R"({"widening_factor": -8})", "'widening_factor' must be a positive finite number");
  // Too large for int64 once multiplied by emb_size (found by fuzz_manifest: the
  // conversion was undefined), and large enough to exceed 2^31 rows only.
  refused(R"({"num_kv_heads": 2, "num_layers": 1, "widening_factor": 3535533845424652})",
          "the ffn size derived from widening_factor 3.53553e+15 x emb_size 6144 is out of range");
  refused(R"({"widening_factor": 1e300})", "the ffn size derived from widening_factor 1e+300 x emb_size 6144");
  refused(R"({"widening_factor": 600000})", "the ffn size derived from widening_factor 600000 x emb_size 6144");
  refused(R"({"attn_logit_cap": 1e400})", "not valid JSON");  // out of double range
  refused(R"({"attn_output_scale_blocks": 7})", "attention output rows 6144 do not split into 7 scale blocks");
  refused(R"({"moe_down_scale_blocks": 3})", "expert ffn size 32768 does not split into 3 scale blocks");
  refused(R"({"ffn_size": 100})", "expert ffn size 100 does not split into 8 scale blocks");
  // pad/eos 0 and ffn_size 0 (derive) are allowed.
  auto ok = ModelConfig::from_json(R"({"pad_token": 0, "eos_token": 0, "ffn_size": 0})", "c.json");
  ASSERT_TRUE(ok.ok()) << ok.error().message;
  EXPECT_EQ(ok->ffn(), 32768);
  // validate() on a record built in code.
  ModelConfig c;
  EXPECT_TRUE(c.validate().ok());
  c.num_experts = 0;
  EXPECT_FALSE(c.validate().ok());
}

TEST(ModelConfigTest, FfnDerivation) {
  ModelConfig g = ModelConfig::grok1();
  EXPECT_EQ(g.ffn(), 32768);
  // Python: f = int(w * D) * 2 // 3; f + (8 - f) % 8.
  struct Case { double w; int64_t d, expect; };
  for (const Case& c : {Case{8, 6144, 32768}, Case{8, 64, 344}, Case{2.5, 100, 168}, Case{1.1, 10, 8},
                        Case{4, 6144, 16384}, Case{2, 64, 88}, Case{3.3, 96, 216}, Case{1, 12, 8}, Case{0.5, 30, 16}}) {
    ModelConfig m;
    m.widening_factor = c.w;
    m.emb_size = c.d;
    EXPECT_EQ(m.ffn(), c.expect) << "widening " << c.w << " emb " << c.d;
  }
  ModelConfig m;
  m.ffn_size = 1000;  // read from the checkpoint: used as it is
  EXPECT_EQ(m.ffn(), 1000);
  EXPECT_FALSE(m.is_grok1_shape());
}

TEST(ModelConfigTest, MultipliersAsTheForwardPassAppliesThem) {
  ModelConfig g = ModelConfig::grok1();
  EXPECT_EQ(g.embedding_multiplier_bf16(), 78.5f);
  EXPECT_EQ(g.output_multiplier_bf16(), 0.578125f);
  ModelConfig m;
  m.embedding_multiplier_scale = std::sqrt(64.0);
  EXPECT_EQ(m.embedding_multiplier_bf16(), 8.0f);
}

// =================================================================================
// model_tensors: names, order and shapes.

std::vector<std::string> release_layer_order(int64_t n) {
  std::vector<std::string> v;
  for (int64_t i = 0; i < n; ++i) v.push_back(std::to_string(i));
  std::sort(v.begin(), v.end());
  return v;
}

const char* const kLayerSuffixes[12] = {"moe.gate",       "moe.down",      "moe.up",         "attn.key",
                                        "attn.output",    "attn.query",    "attn.value",     "attn.norm_in",
                                        "attn.norm_out",  "moe.norm_in",   "moe.norm_out",   "moe.router"};

TEST(ModelTensorsTest, Grok1CountOrderAndShapes) {
  ModelConfig g = ModelConfig::grok1();
  auto t = model_tensors(g);
  ASSERT_EQ(t.size(), 2u + 12u * 64u);
  ASSERT_EQ(t.size(), 770u);  // the release's file count
  EXPECT_EQ(t[0].name, "embedding");
  EXPECT_EQ(t[0].kind, TensorKind::kEmbedding);
  EXPECT_EQ(t[0].dtype, DType::kBF16);
  EXPECT_EQ(t[0].shape, (std::vector<int64_t>{131072, 6144}));
  EXPECT_EQ(t[0].layer, -1);
  EXPECT_EQ(t[1].name, "final_norm");
  EXPECT_EQ(t[1].dtype, DType::kF32);
  EXPECT_EQ(t[1].shape, (std::vector<int64_t>{6144}));
  // Layers in string order: 0, 1, 10, 11, ..., 19, 2, 20, ...
  auto order = release_layer_order(64);
  for (size_t li = 0; li < order.size(); ++li) {
    for (size_t k = 0; k < 12; ++k) {
      const TensorSpec& s = t[2 + li * 12 + k];
      EXPECT_EQ(s.name, "layer." + order[li] + "." + kLayerSuffixes[k]);
      EXPECT_EQ(s.layer, std::stoi(order[li]));
    }
  }
  EXPECT_EQ(t[2 + 12 * 2].name, "layer.10.moe.gate");  // layer 10 right after layer 1
  EXPECT_EQ(t[2 + 12 * 12].name, "layer.2.moe.gate");  // layer 2 after 19
  EXPECT_EQ(t[2 + 12 * 63].name, "layer.9.moe.gate");  // layer 9 last
  // Layer 0's tensors, the spec's table.
  struct Want { std::vector<int64_t> shape; DType dt; uint32_t blocks; TensorKind kind; };
  const Want want[12] = {
      {{8, 6144, 32768}, DType::kQ8RowBlock, 1, TensorKind::kMoeGate},
      {{8, 32768, 6144}, DType::kQ8RowBlock, 8, TensorKind::kMoeDown},
      {{8, 6144, 32768}, DType::kQ8RowBlock, 1, TensorKind::kMoeUp},
      {{6144, 1024}, DType::kQ8RowBlock, 1, TensorKind::kAttnKey},
      {{6144, 6144}, DType::kQ8RowBlock, 8, TensorKind::kAttnOutput},
      {{6144, 6144}, DType::kQ8RowBlock, 1, TensorKind::kAttnQuery},
      {{6144, 1024}, DType::kQ8RowBlock, 1, TensorKind::kAttnValue},
      {{6144}, DType::kF32, 0, TensorKind::kNormAttnIn},
      {{6144}, DType::kF32, 0, TensorKind::kNormAttnOut},
      {{6144}, DType::kF32, 0, TensorKind::kNormMoeIn},
      {{6144}, DType::kF32, 0, TensorKind::kNormMoeOut},
      {{6144, 8}, DType::kF32, 0, TensorKind::kRouter},
  };
  for (size_t k = 0; k < 12; ++k) {
    const TensorSpec& s = t[2 + k];
    EXPECT_EQ(s.shape, want[k].shape) << s.name;
    EXPECT_EQ(s.dtype, want[k].dt) << s.name;
    EXPECT_EQ(s.blocks, want[k].blocks) << s.name;
    EXPECT_EQ(s.kind, want[k].kind) << s.name;
    EXPECT_EQ(s.name, layer_tensor_name(0, s.kind));
    auto size = payload_size(s.dtype, s.shape, s.dtype == DType::kQ8RowBlock ? s.blocks : 0);
    ASSERT_TRUE(size.has_value()) << s.name;
  }
  // Sizes the q8rb payloads take (codes + 64-byte pad + scales).
  EXPECT_EQ(payload_size(DType::kQ8RowBlock, t[3].shape, 8), 8ull * 32768 * 6144 + 8ull * 8 * 6144 * 2);
  EXPECT_EQ(payload_size(DType::kQ8RowBlock, t[5].shape, 1), 6144ull * 1024 + 1024ull * 2);
}

TEST(ModelTensorsTest, SmallModelsFollowTheSameRules) {
  ModelConfig c;
  c.num_layers = 11;
  c.emb_size = 64;
  c.num_q_heads = 4;
  c.num_kv_heads = 2;
  c.key_size = 16;
  c.num_experts = 4;
  c.vocab_size = 256;
  c.widening_factor = 2;
  c.attn_output_scale_blocks = 2;
  c.moe_down_scale_blocks = 4;
  ASSERT_TRUE(c.validate().ok());
  auto t = model_tensors(c);
  ASSERT_EQ(t.size(), 2u + 12u * 11u);
  std::vector<int> layers;
  for (size_t i = 2; i < t.size(); i += 12) layers.push_back(t[i].layer);
  EXPECT_EQ(layers, (std::vector<int>{0, 1, 10, 2, 3, 4, 5, 6, 7, 8, 9}));
  const TensorSpec* down = nullptr;
  const TensorSpec* key = nullptr;
  const TensorSpec* out = nullptr;
  for (const auto& s : t) {
    if (s.name == "layer.10.moe.down") down = &s;
    if (s.name == "layer.10.attn.key") key = &s;
    if (s.name == "layer.10.attn.output") out = &s;
  }
  ASSERT_TRUE(down && key && out);
  EXPECT_EQ(down->shape, (std::vector<int64_t>{4, 88, 64}));
  EXPECT_EQ(down->blocks, 4u);
  EXPECT_EQ(key->shape, (std::vector<int64_t>{64, 32}));
  EXPECT_EQ(out->shape, (std::vector<int64_t>{64, 64}));
  EXPECT_EQ(out->blocks, 2u);
  EXPECT_EQ(t[0].shape, (std::vector<int64_t>{256, 64}));
  auto one = model_tensors([] {
    ModelConfig m;
    m.num_layers = 1;
    return m;
  }());
  EXPECT_EQ(one.size(), 14u);
}

// =================================================================================
// Tensor parallelism.

const TensorSpec& find_spec(const std::vector<TensorSpec>& t, const std::string& name) {
  for (const auto& s : t)
    if (s.name == name) return s;
  ADD_FAILURE() << "no tensor " << name;
  return t.front();
}

TEST(TensorParallelTest, Grok1AtEveryDegree) {
  const ModelConfig g = ModelConfig::grok1();
  const auto t = model_tensors(g);
  const int64_t V = 131072, D = 6144, H = 48, KV = 8, dh = 128, F = 32768, E = 8, B = 8;
  for (int tp : {1, 2, 4, 8, 16}) {
    SCOPED_TRACE("TP " + std::to_string(tp));
    Status st = check_tensor_parallel(g, tp);
    ASSERT_TRUE(st.ok()) << st.error().message;
    for (int r = 0; r < tp; ++r) {
      SCOPED_TRACE("rank " + std::to_string(r));
      // Embedding rows.
      ShardSlice e = shard_slice(find_spec(t, "embedding"), g, tp, r);
      EXPECT_EQ(e.axis, 0);
      EXPECT_EQ(e.start, r * V / tp);
      EXPECT_EQ(e.length, V / tp);
      EXPECT_EQ(e.shape, (std::vector<int64_t>{V / tp, D}));
      // Query columns: heads [r*H/T, (r+1)*H/T).
      ShardSlice q = shard_slice(find_spec(t, "layer.0.attn.query"), g, tp, r);
      const int64_t q_first = r * H / tp, q_count = H / tp;
      EXPECT_EQ(q.axis, 1);
      EXPECT_EQ(q.start, q_first * dh);
      EXPECT_EQ(q.length, q_count * dh);
      EXPECT_EQ(q.shape, (std::vector<int64_t>{D, q_count * dh}));
      EXPECT_EQ(q.blocks, 1u);
      EXPECT_EQ(q.block_start, 0u);
      // Key and value: the kv heads this rank's query heads use (h uses kv h / (H/KV)).
      for (const char* kv_name : {"layer.0.attn.key", "layer.0.attn.value"}) {
        ShardSlice k = shard_slice(find_spec(t, kv_name), g, tp, r);
        EXPECT_EQ(k.axis, 1) << kv_name;
        ASSERT_EQ(k.start % dh, 0) << kv_name;
        ASSERT_EQ(k.length % dh, 0) << kv_name;
        const int64_t kv_first = k.start / dh, kv_count = k.length / dh;
        if (tp <= KV) {
          EXPECT_EQ(kv_first, r * KV / tp);
          EXPECT_EQ(kv_count, KV / tp);
        } else {
          EXPECT_EQ(kv_count, 1);
          EXPECT_EQ(kv_first, q_first / (H / KV));  // TP 16: r / 2
          EXPECT_EQ(kv_first, r / 2);
        }
        for (int64_t h = q_first; h < q_first + q_count; ++h) {
          int64_t kvh = h / (H / KV);
          EXPECT_TRUE(kvh >= kv_first && kvh < kv_first + kv_count) << "query head " << h << " uses kv head " << kvh;
        }
        EXPECT_EQ(k.shape, (std::vector<int64_t>{D, kv_count * dh}));
        EXPECT_EQ(k.blocks, 1u);
      }
      // Attention output rows with their scale blocks.
      ShardSlice o = shard_slice(find_spec(t, "layer.0.attn.output"), g, tp, r);
      EXPECT_EQ(o.axis, 0);
      EXPECT_EQ(o.start, r * H * dh / tp);
      EXPECT_EQ(o.length, H * dh / tp);
      EXPECT_EQ(o.shape, (std::vector<int64_t>{H * dh / tp, D}));
      if (tp <= B) {
        EXPECT_EQ(o.blocks, static_cast<uint32_t>(B / tp));
        EXPECT_EQ(o.block_start, static_cast<uint32_t>(r * B / tp));
      } else {
        EXPECT_EQ(o.blocks, 1u);
        EXPECT_EQ(o.block_start, static_cast<uint32_t>(r * B / tp));  // TP 16: r / 2
        EXPECT_EQ(o.block_start, static_cast<uint32_t>(r / 2));
      }
      if (tp == 4) {
        EXPECT_EQ(o.blocks, 2u);
        EXPECT_EQ(o.block_start, static_cast<uint32_t>(2 * r));
      }
      ASSERT_TRUE(payload_size(DType::kQ8RowBlock, o.shape, o.blocks).has_value());
      // Experts: gate/up split columns of F, down splits rows of F with its blocks.
      for (const char* n : {"layer.0.moe.gate", "layer.0.moe.up"}) {
        ShardSlice s = shard_slice(find_spec(t, n), g, tp, r);
        EXPECT_EQ(s.axis, 2) << n;
        EXPECT_EQ(s.start, r * F / tp) << n;
        EXPECT_EQ(s.shape, (std::vector<int64_t>{E, D, F / tp})) << n;
        EXPECT_EQ(s.blocks, 1u) << n;
        EXPECT_EQ(s.block_start, 0u) << n;
      }
      ShardSlice d = shard_slice(find_spec(t, "layer.0.moe.down"), g, tp, r);
      EXPECT_EQ(d.axis, 1);
      EXPECT_EQ(d.start, r * F / tp);
      EXPECT_EQ(d.shape, (std::vector<int64_t>{E, F / tp, D}));
      EXPECT_EQ(d.blocks, tp <= B ? static_cast<uint32_t>(B / tp) : 1u);
      EXPECT_EQ(d.block_start, static_cast<uint32_t>(r * B / tp));
      ASSERT_TRUE(payload_size(DType::kQ8RowBlock, d.shape, d.blocks).has_value());
      // Replicated.
      for (const char* n : {"final_norm", "layer.0.attn.norm_in", "layer.0.moe.norm_out", "layer.0.moe.router"}) {
        const TensorSpec& spec = find_spec(t, n);
        ShardSlice s = shard_slice(spec, g, tp, r);
        EXPECT_EQ(s.axis, -1) << n;
        EXPECT_EQ(s.shape, spec.shape) << n;
        EXPECT_EQ(s.blocks, 0u) << n;
      }
    }
    // The ranks' slices of a split tensor tile it exactly.
    for (const char* n : {"embedding", "layer.0.attn.query", "layer.0.attn.output", "layer.0.moe.gate", "layer.0.moe.down"}) {
      const TensorSpec& spec = find_spec(t, n);
      int64_t next = 0;
      for (int r = 0; r < tp; ++r) {
        ShardSlice s = shard_slice(spec, g, tp, r);
        EXPECT_EQ(s.start, next) << n;
        next = s.start + s.length;
      }
      EXPECT_EQ(next, spec.shape[static_cast<size_t>(shard_slice(spec, g, tp, 0).axis)]) << n;
    }
  }
}

TEST(TensorParallelTest, KvHeadsReplicatedOnSmallModels) {
  // H = 12, KV = 4: at TP 12 each rank has one query head and a copy of kv head r / 3.
  ModelConfig c;
  c.vocab_size = 240;
  c.emb_size = 48;
  c.num_q_heads = 12;
  c.num_kv_heads = 4;
  c.key_size = 8;
  c.ffn_size = 96;
  c.attn_output_scale_blocks = 4;
  c.moe_down_scale_blocks = 4;
  ASSERT_TRUE(c.validate().ok()) << c.validate().error().message;
  ASSERT_TRUE(check_tensor_parallel(c, 12).ok()) << check_tensor_parallel(c, 12).error().message;
  auto t = model_tensors(c);
  for (int r = 0; r < 12; ++r) {
    ShardSlice k = shard_slice(find_spec(t, "layer.0.attn.value"), c, 12, r);
    EXPECT_EQ(k.start, (r / 3) * 8) << r;
    EXPECT_EQ(k.length, 8);
    ShardSlice o = shard_slice(find_spec(t, "layer.0.attn.output"), c, 12, r);
    EXPECT_EQ(o.blocks, 1u);
    EXPECT_EQ(o.block_start, static_cast<uint32_t>(r * 4 / 12)) << r;
  }
  // At TP 2 the kv heads split evenly: 2 each.
  ASSERT_TRUE(check_tensor_parallel(c, 2).ok());
  ShardSlice k1 = shard_slice(find_spec(t, "layer.0.attn.key"), c, 2, 1);
  EXPECT_EQ(k1.start, 16);
  EXPECT_EQ(k1.length, 16);
}

ModelConfig small(int64_t h, int64_t kv, int64_t vocab = 256) {
  ModelConfig c;
  c.vocab_size = vocab;
  c.emb_size = 64;
  c.num_q_heads = h;
  c.num_kv_heads = kv;
  c.key_size = 16;
  c.num_layers = 1;
  c.ffn_size = 96;
  c.attn_output_scale_blocks = 1;
  c.moe_down_scale_blocks = 1;
  return c;
}

TEST(TensorParallelTest, Refusals) {
  const ModelConfig g = ModelConfig::grok1();
  EXPECT_ERROR_HAS(check_tensor_parallel(g, 0), "tensor-parallel degree 0 is out of range");
  EXPECT_ERROR_HAS(check_tensor_parallel(g, 4097), "tensor-parallel degree 4097 is out of range");
  EXPECT_ERROR_HAS(check_tensor_parallel(g, -2), "out of range");
  EXPECT_ERROR_HAS(check_tensor_parallel(g, 3), "TP 3: vocab_size 131072 does not split evenly");
  EXPECT_ERROR_HAS(check_tensor_parallel(g, 32), "TP 32: num_q_heads 48 does not split evenly");
  EXPECT_ERROR_HAS(check_tensor_parallel(g, 64), "TP 64: num_q_heads 48");
  // H not divisible by TP (vocab fine).
  ModelConfig h6 = small(6, 6);
  EXPECT_ERROR_HAS(check_tensor_parallel(h6, 4), "TP 4: num_q_heads 6 does not split evenly");
  // KV >= TP but not divisible: H = 6, KV = 3, TP = 2 (rank 0 would hold heads 0-2,
  // which use kv heads 0 and 1).
  ModelConfig kv3 = small(6, 3, 258);
  ASSERT_TRUE(kv3.validate().ok());
  EXPECT_ERROR_HAS(check_tensor_parallel(kv3, 2), "TP 2: the query heads of one rank would use more than one of the 3 kv heads");
  EXPECT_TRUE(check_tensor_parallel(kv3, 3).ok());
  // KV < TP and KV does not divide TP: H = 12, KV = 4, TP = 6 (rank 1 holds heads 2-3,
  // which use kv heads 0 and 1).
  ModelConfig kv4 = small(12, 4, 240);
  ASSERT_TRUE(kv4.validate().ok());
  EXPECT_ERROR_HAS(check_tensor_parallel(kv4, 6), "TP 6: the query heads of one rank would use more than one of the 4 kv heads");
  EXPECT_TRUE(check_tensor_parallel(kv4, 12).ok());
  // F not divisible.
  ModelConfig f = small(8, 8);
  f.ffn_size = 44;
  ASSERT_TRUE(f.validate().ok());
  EXPECT_ERROR_HAS(check_tensor_parallel(f, 8), "TP 8: expert ffn size 44 does not split evenly");
  EXPECT_TRUE(check_tensor_parallel(f, 4).ok());
  // Scale blocks that do not line up with the ranks.
  ModelConfig ab = small(6, 2);
  ab.attn_output_scale_blocks = 3;
  ASSERT_TRUE(ab.validate().ok());
  EXPECT_ERROR_HAS(check_tensor_parallel(ab, 2), "TP 2: attention output has 3 row-block scales, which do not align with 2 ranks");
  EXPECT_TRUE(check_tensor_parallel(ab, 1).ok());
  ModelConfig db = small(6, 2);
  db.moe_down_scale_blocks = 3;
  ASSERT_TRUE(db.validate().ok());
  EXPECT_ERROR_HAS(check_tensor_parallel(db, 2), "TP 2: expert down projection has 3 row-block scales");
  // Blocks fewer than ranks are fine when they divide the degree.
  ModelConfig b2 = small(4, 4);
  b2.attn_output_scale_blocks = 2;
  b2.moe_down_scale_blocks = 2;
  ASSERT_TRUE(check_tensor_parallel(b2, 4).ok());
  auto t = model_tensors(b2);
  for (int r = 0; r < 4; ++r) {
    ShardSlice o = shard_slice(find_spec(t, "layer.0.attn.output"), b2, 4, r);
    EXPECT_EQ(o.blocks, 1u);
    EXPECT_EQ(o.block_start, static_cast<uint32_t>(r / 2));
  }
}

}  // namespace
}  // namespace grokit::format

// =================================================================================
// common: bf16 conversion and checked arithmetic.
namespace grokit {
namespace {

uint32_t bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
float from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
bool bf16_is_nan(uint16_t h) { return (h & 0x7f80) == 0x7f80 && (h & 0x7f) != 0; }

// Reference: the bf16 value nearest to x, ties to the even mantissa, computed on doubles.
uint16_t reference_bf16(float x) {
  uint32_t u = bits(x);
  uint16_t sign = static_cast<uint16_t>(u >> 16 & 0x8000);
  double a = std::fabs(static_cast<double>(x));
  uint16_t lo = static_cast<uint16_t>((u & 0x7fffffff) >> 16);  // truncation toward zero
  double lo_v = static_cast<double>(bf16_bits_to_f32(lo));
  // The next bf16 magnitude; above the largest finite one it is 2^128 (rounds to inf).
  double hi_v = lo == 0x7f7f ? std::ldexp(1.0, 128) : static_cast<double>(bf16_bits_to_f32(static_cast<uint16_t>(lo + 1)));
  uint16_t r;
  if (a - lo_v < hi_v - a) r = lo;
  else if (a - lo_v > hi_v - a) r = static_cast<uint16_t>(lo + 1);
  else r = (lo & 1) ? static_cast<uint16_t>(lo + 1) : lo;
  return static_cast<uint16_t>(sign | r);
}

TEST(Bf16Test, RoundsToNearestEven) {
  EXPECT_EQ(f32_to_bf16_bits(1.0f), 0x3f80);
  EXPECT_EQ(f32_to_bf16_bits(-2.0f), 0xc000);
  EXPECT_EQ(f32_to_bf16_bits(0.0f), 0x0000);
  EXPECT_EQ(f32_to_bf16_bits(-0.0f), 0x8000);
  // Exactly halfway: to the even neighbour.
  EXPECT_EQ(f32_to_bf16_bits(from_bits(0x3f808000)), 0x3f80);  // 1 + 2^-8 -> 1
  EXPECT_EQ(f32_to_bf16_bits(from_bits(0x3f818000)), 0x3f82);  // odd below -> up
  EXPECT_EQ(f32_to_bf16_bits(from_bits(0xbf808000)), 0xbf80);
  EXPECT_EQ(f32_to_bf16_bits(from_bits(0xbf818000)), 0xbf82);
  // Just off halfway.
  EXPECT_EQ(f32_to_bf16_bits(from_bits(0x3f808001)), 0x3f81);
  EXPECT_EQ(f32_to_bf16_bits(from_bits(0x3f807fff)), 0x3f80);
  // Carry into the exponent.
  EXPECT_EQ(f32_to_bf16_bits(from_bits(0x3fffc000)), 0x4000);
  // Subnormals.
  EXPECT_EQ(f32_to_bf16_bits(from_bits(0x00000001)), 0x0000);
  EXPECT_EQ(f32_to_bf16_bits(from_bits(0x00008000)), 0x0000);
  EXPECT_EQ(f32_to_bf16_bits(from_bits(0x00018000)), 0x0002);
  EXPECT_EQ(f32_to_bf16_bits(from_bits(0x00008001)), 0x0001);
  // The spec's multipliers.
  EXPECT_EQ(round_bf16(static_cast<float>(78.38367176906169)), 78.5f);
  EXPECT_EQ(round_bf16(static_cast<float>(0.5773502691896257)), 0.578125f);
  EXPECT_EQ(bf16_bits_to_f32(0x3f80), 1.0f);
  EXPECT_EQ(bf16_bits_to_f32(0x429d), 78.5f);
}

TEST(Bf16Test, InfinityAndNaN) {
  const float inf = std::numeric_limits<float>::infinity();
  EXPECT_EQ(f32_to_bf16_bits(inf), 0x7f80);
  EXPECT_EQ(f32_to_bf16_bits(-inf), 0xff80);
  // The largest float rounds up to infinity; just below the halfway point does not.
  EXPECT_EQ(f32_to_bf16_bits(std::numeric_limits<float>::max()), 0x7f80);
  EXPECT_EQ(f32_to_bf16_bits(from_bits(0x7f7f7fff)), 0x7f7f);
  EXPECT_EQ(f32_to_bf16_bits(from_bits(0x7f7f8000)), 0x7f80);  // tie, odd -> up to inf
  // NaN stays NaN, also when only the low mantissa bits are set (plain truncation or
  // rounding would make those infinity or carry into the sign), and keeps its sign.
  for (uint32_t n : {0x7fc00000u, 0x7f800001u, 0x7f80ffffu, 0x7fffffffu, 0x7f808000u, 0xff800001u, 0xffc00000u,
                     0xffffffffu}) {
    uint16_t h = f32_to_bf16_bits(from_bits(n));
    EXPECT_TRUE(bf16_is_nan(h)) << std::hex << n << " -> " << h;
    EXPECT_EQ(static_cast<uint32_t>(h & 0x8000), (n >> 16) & 0x8000) << std::hex << n;
    EXPECT_TRUE(std::isnan(bf16_bits_to_f32(h)));
  }
  EXPECT_EQ(f32_to_bf16_bits(std::numeric_limits<float>::quiet_NaN()) & 0x7fc0, 0x7fc0);
}

TEST(Bf16Test, MatchesAReferenceOnManyValues) {
  std::mt19937 rng(12345);
  int checked = 0;
  auto check = [&](uint32_t u) {
    float x = from_bits(u);
    if (std::isnan(x)) return;
    ASSERT_EQ(f32_to_bf16_bits(x), reference_bf16(x)) << std::hex << "0x" << u;
    ++checked;
  };
  for (uint32_t hi = 0; hi < 0x10000; ++hi) {
    for (uint32_t lo : {0x0000u, 0x0001u, 0x7fffu, 0x8000u, 0x8001u, 0xffffu}) check(hi << 16 | lo);
  }
  for (int i = 0; i < 300000; ++i) check(static_cast<uint32_t>(rng()));
  EXPECT_GT(checked, 600000);
}

TEST(CheckedArithmeticTest, AddMulAlign) {
  const uint64_t max = std::numeric_limits<uint64_t>::max();
  uint64_t out = 7;
  EXPECT_TRUE(checked_add(max - 1, 1, &out));
  EXPECT_EQ(out, max);
  EXPECT_FALSE(checked_add(max, 1, &out));
  EXPECT_FALSE(checked_add(uint64_t{1} << 63, uint64_t{1} << 63, &out));
  EXPECT_TRUE(checked_add(0, 0, &out));
  EXPECT_EQ(out, 0u);
  EXPECT_TRUE(checked_mul(uint64_t{1} << 32, uint64_t{1} << 31, &out));
  EXPECT_EQ(out, uint64_t{1} << 63);
  EXPECT_FALSE(checked_mul(uint64_t{1} << 32, uint64_t{1} << 32, &out));
  EXPECT_FALSE(checked_mul(max, 2, &out));
  EXPECT_TRUE(checked_mul(0, max, &out));
  EXPECT_EQ(out, 0u);
  EXPECT_TRUE(checked_mul(3, 5, &out));
  EXPECT_EQ(out, 15u);
  EXPECT_EQ(align_up(0, 4096), 0u);
  EXPECT_EQ(align_up(1, 4096), 4096u);
  EXPECT_EQ(align_up(4096, 4096), 4096u);
  EXPECT_EQ(align_up(4097, 64), 4160u);
}

TEST(Hex64Test, RoundTrip) {
  EXPECT_EQ(hex64(0x1234), "0000000000001234");
  EXPECT_EQ(hex64(~uint64_t{0}), "ffffffffffffffff");
  EXPECT_EQ(parse_hex64("00000000deadbeef"), 0xdeadbeefull);
  EXPECT_FALSE(parse_hex64("00000000DEADBEEF").has_value());  // lowercase only
  EXPECT_FALSE(parse_hex64("deadbeef").has_value());
  EXPECT_FALSE(parse_hex64("0x000000deadbeef").has_value());
}

}  // namespace
}  // namespace grokit
