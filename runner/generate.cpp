// Generation: prefill every prompt, then one token per step for all live sequences.
#include <chrono>

#include "runner/runner.h"

namespace grokit::runner {

Status check_prompts(const format::ModelConfig& cfg, const std::vector<std::vector<int32_t>>& prompts,
                     int64_t max_tokens) {
  if (max_tokens < 0) return make_error("max_tokens must not be negative");
  for (size_t i = 0; i < prompts.size(); ++i) {
    const auto& p = prompts[i];
    if (p.empty()) return make_error("prompt ", i, " is empty");
    for (size_t k = 0; k < p.size(); ++k)
      if (p[k] < 0 || p[k] >= cfg.vocab_size)
        return make_error("prompt ", i, ", token ", k, ": id ", p[k], " is outside the vocabulary [0, ", cfg.vocab_size,
                          ")");
    const int64_t need = static_cast<int64_t>(p.size()) + max_tokens;
    if (need > cfg.sequence_len) {
      if (max_tokens == 0)
        return make_error("prompt ", i, ": ", p.size(), " positions, more than the model's sequence_len of ",
                          cfg.sequence_len);
      return make_error("prompt ", i, ": ", p.size(), " tokens + max_tokens ", max_tokens, " = ", need,
                        " positions, more than the model's sequence_len of ", cfg.sequence_len);
    }
  }
  return {};
}

Result<std::vector<std::vector<int32_t>>> generate(Engine& engine, const std::vector<std::vector<int32_t>>& prompts,
                                                   const GenerateOptions& options,
                                                   const std::function<void(size_t, int32_t)>& on_token,
                                                   GenerateStats* stats) {
  const auto& cfg = engine.config();
  if (options.max_tokens < 1) return make_error("max_tokens must be at least 1");
  GROKIT_TRY(check_prompts(cfg, prompts, options.max_tokens));
  GenerateStats st;
  std::vector<int> slots;
  auto close_all = [&] {
    for (int s : slots) engine.close_sequence(s);
  };
  for (size_t i = 0; i < prompts.size(); ++i) {
    const int64_t need = static_cast<int64_t>(prompts[i].size()) + options.max_tokens;
    auto slot = engine.open_sequence(need);
    if (!slot.ok()) return close_all(), slot.take_error();
    slots.push_back(*slot);
    st.prompt_tokens += static_cast<int64_t>(prompts[i].size());
    st.kv_bytes += engine.kv_bytes_per_rank(need);
  }
  std::vector<Sampler> samplers;
  for (size_t i = 0; i < prompts.size(); ++i) samplers.emplace_back(options.sampling);  // each prompt alike
  std::vector<std::vector<int32_t>> out(prompts.size());
  std::vector<bool> live(prompts.size(), true);
  auto t0 = std::chrono::steady_clock::now();
  auto seconds = [&] { return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(); };

  auto choose = [&](size_t row, const float* logits) {
    int32_t tok = samplers[row].sample(std::span<const float>(logits, static_cast<size_t>(cfg.vocab_size)));
    out[row].push_back(tok);
    if (on_token) on_token(row, tok);
    if ((options.stop_at_eos && tok == cfg.eos_token) || static_cast<int64_t>(out[row].size()) >= options.max_tokens)
      live[row] = false;
  };
  std::vector<StepRow> rows;
  for (size_t i = 0; i < prompts.size(); ++i) rows.push_back({slots[i], prompts[i], StepRow::Logits::kLast});
  Status s = engine.step(rows, [&](size_t row, int64_t, const float* logits) {
    choose(row, logits);
    return Status{};
  });
  if (!s.ok()) return close_all(), s.take_error();
  st.prefill_seconds = st.first_token_seconds = seconds();

  std::vector<int32_t> last(prompts.size());
  std::vector<size_t> index;  // step row -> prompt
  while (true) {
    rows.clear();
    index.clear();
    for (size_t i = 0; i < prompts.size(); ++i) {
      if (!live[i]) continue;
      last[i] = out[i].back();
      rows.push_back({slots[i], std::span<const int32_t>(&last[i], 1), StepRow::Logits::kLast});
      index.push_back(i);
    }
    if (rows.empty()) break;
    s = engine.step(rows, [&](size_t row, int64_t, const float* logits) {
      choose(index[row], logits);
      ++st.generated_tokens;
      return Status{};
    });
    if (!s.ok()) return close_all(), s.take_error();
  }
  st.decode_seconds = seconds() - st.prefill_seconds;
  close_all();
  if (stats != nullptr) *stats = st;
  return out;
}

}  // namespace grokit::runner
