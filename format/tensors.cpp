// Logical tensors, their names and the tensor-parallel sharding rules (SPEC.md §6).
#include <algorithm>

#include "format/format.h"

namespace grokit::format {

const char* tensor_kind_name(TensorKind k) {
  switch (k) {
    case TensorKind::kEmbedding: return "embedding";
    case TensorKind::kFinalNorm: return "final_norm";
    case TensorKind::kMoeGate: return "moe.gate";
    case TensorKind::kMoeDown: return "moe.down";
    case TensorKind::kMoeUp: return "moe.up";
    case TensorKind::kAttnKey: return "attn.key";
    case TensorKind::kAttnOutput: return "attn.output";
    case TensorKind::kAttnQuery: return "attn.query";
    case TensorKind::kAttnValue: return "attn.value";
    case TensorKind::kNormAttnIn: return "attn.norm_in";
    case TensorKind::kNormAttnOut: return "attn.norm_out";
    case TensorKind::kNormMoeIn: return "moe.norm_in";
    case TensorKind::kNormMoeOut: return "moe.norm_out";
    case TensorKind::kRouter: return "moe.router";
  }
  return "?";
}

std::string layer_tensor_name(int layer, TensorKind kind) {
  return "layer." + std::to_string(layer) + "." + tensor_kind_name(kind);
}

// The twelve per-layer tensors in the order of their release paths sorted as strings.
static constexpr TensorKind kLayerKinds[] = {
    TensorKind::kMoeGate,    TensorKind::kMoeDown,   TensorKind::kMoeUp,       TensorKind::kAttnKey,
    TensorKind::kAttnOutput, TensorKind::kAttnQuery, TensorKind::kAttnValue,   TensorKind::kNormAttnIn,
    TensorKind::kNormAttnOut, TensorKind::kNormMoeIn, TensorKind::kNormMoeOut, TensorKind::kRouter,
};

std::vector<TensorSpec> model_tensors(const ModelConfig& c) {
  const int64_t D = c.emb_size, F = c.ffn(), E = c.num_experts;
  const int64_t QD = c.num_q_heads * c.key_size, KVD = c.num_kv_heads * c.key_size;
  std::vector<TensorSpec> out;
  out.push_back({"embedding", TensorKind::kEmbedding, -1, DType::kBF16, {c.vocab_size, D}, 0});
  out.push_back({"final_norm", TensorKind::kFinalNorm, -1, DType::kF32, {D}, 0});
  // JAX flattens parameters with their paths sorted as strings: layer 10 before layer 2.
  std::vector<std::string> layers;
  for (int64_t i = 0; i < c.num_layers; ++i) layers.push_back(std::to_string(i));
  std::sort(layers.begin(), layers.end());
  for (const auto& ls : layers) {
    int layer = std::stoi(ls);
    for (TensorKind k : kLayerKinds) {
      TensorSpec t{layer_tensor_name(layer, k), k, layer, DType::kQ8RowBlock, {}, 1};
      switch (k) {
        case TensorKind::kMoeGate:
        case TensorKind::kMoeUp: t.shape = {E, D, F}; break;
        case TensorKind::kMoeDown: t.shape = {E, F, D}; t.blocks = static_cast<uint32_t>(c.moe_down_scale_blocks); break;
        case TensorKind::kAttnKey:
        case TensorKind::kAttnValue: t.shape = {D, KVD}; break;
        case TensorKind::kAttnQuery: t.shape = {D, QD}; break;
        case TensorKind::kAttnOutput: t.shape = {QD, D}; t.blocks = static_cast<uint32_t>(c.attn_output_scale_blocks); break;
        case TensorKind::kRouter: t.dtype = DType::kF32; t.shape = {D, E}; t.blocks = 0; break;
        default: t.dtype = DType::kF32; t.shape = {D}; t.blocks = 0; break;
      }
      out.push_back(std::move(t));
    }
  }
  return out;
}

Status check_tensor_parallel(const ModelConfig& c, int tp) {
  if (tp < 1 || tp > 4096) return make_error("tensor-parallel degree ", tp, " is out of range");
  const int64_t H = c.num_q_heads, KV = c.num_kv_heads, F = c.ffn();
  if (c.vocab_size % tp != 0)
    return make_error("TP ", tp, ": vocab_size ", c.vocab_size, " does not split evenly (the embedding is split by rows)");
  if (H % tp != 0) return make_error("TP ", tp, ": num_q_heads ", H, " does not split evenly across ranks");
  if (KV >= tp ? KV % tp != 0 : (H / KV) % (H / tp) != 0)
    return make_error("TP ", tp, ": the query heads of one rank would use more than one of the ", KV,
                      " kv heads (need num_kv_heads to divide TP or TP to divide num_kv_heads)");
  if (F % tp != 0) return make_error("TP ", tp, ": expert ffn size ", F, " does not split evenly across ranks");
  auto blocks_ok = [&](int64_t b) { return b % tp == 0 || tp % b == 0; };
  if (!blocks_ok(c.attn_output_scale_blocks))
    return make_error("TP ", tp, ": attention output has ", c.attn_output_scale_blocks,
                      " row-block scales, which do not align with ", tp, " ranks");
  if (!blocks_ok(c.moe_down_scale_blocks))
    return make_error("TP ", tp, ": expert down projection has ", c.moe_down_scale_blocks,
                      " row-block scales, which do not align with ", tp, " ranks");
  return {};
}

ShardSlice shard_slice(const TensorSpec& t, const ModelConfig& c, int tp, int rank) {
  GROKIT_CHECK(rank >= 0 && rank < tp);
  ShardSlice s;
  s.shape = t.shape;
  s.blocks = t.blocks;
  auto split = [&](int32_t axis, int64_t start, int64_t length) {
    s.axis = axis;
    s.start = start;
    s.length = length;
    s.shape[static_cast<size_t>(axis)] = length;
  };
  auto even = [&](int32_t axis) {
    int64_t n = t.shape[static_cast<size_t>(axis)] / tp;
    split(axis, rank * n, n);
  };
  switch (t.kind) {
    case TensorKind::kEmbedding: even(0); break;
    case TensorKind::kAttnQuery: even(1); break;
    case TensorKind::kAttnKey:
    case TensorKind::kAttnValue:
      if (c.num_kv_heads >= tp) {
        even(1);
      } else {
        // Fewer kv heads than ranks: each rank holds a copy of the one its queries use.
        int64_t q_per_rank = c.num_q_heads / tp, q_per_kv = c.num_q_heads / c.num_kv_heads;
        int64_t kv_head = rank * q_per_rank / q_per_kv;
        split(1, kv_head * c.key_size, c.key_size);
      }
      break;
    case TensorKind::kAttnOutput: even(0); break;
    case TensorKind::kMoeGate:
    case TensorKind::kMoeUp: even(2); break;
    case TensorKind::kMoeDown: even(1); break;
    default: break;  // norms, router, final norm: replicated
  }
  // A row split takes the scale blocks its rows fall in.
  if (t.dtype == DType::kQ8RowBlock && s.axis == static_cast<int32_t>(t.shape.size()) - 2) {
    int64_t rows = t.shape[t.shape.size() - 2];
    int64_t per_block = rows / t.blocks;
    int64_t first = s.start / per_block, last = (s.start + s.length + per_block - 1) / per_block;
    s.block_start = static_cast<uint32_t>(first);
    s.blocks = static_cast<uint32_t>(last - first);
  }
  return s;
}

}  // namespace grokit::format
