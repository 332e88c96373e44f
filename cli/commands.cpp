#include <cxxopts.hpp>
#include <nlohmann/json.hpp>

#include <cmath>
#include <cstdio>
#include <functional>
#include <optional>

#include "cli/cli.h"
#include "convert/convert.h"
#include "format/format.h"
#include "runner/backend.h"
#include "validate/validate.h"

namespace grokit::cli {

namespace {

using json = nlohmann::ordered_json;

int fail(const std::string& program, const Error& e) {
  std::fprintf(stderr, "%s: error: %s\n", program.c_str(), e.message.c_str());
  return kExitFailure;
}

std::string shape_text(const std::vector<int64_t>& s) {
  std::string r = "[";
  for (size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
  return r + "]";
}

unsigned default_threads() { return std::max(2u, std::min(8u, hardware_threads())); }

}  // namespace

std::optional<int> parse_args(cxxopts::Options& opts, int argc, char** argv, size_t min_pos, size_t max_pos,
                              ParsedArgs& out) {
  opts.add_options()("h,help", "show this help");
  opts.add_options()("positional", "", cxxopts::value<std::vector<std::string>>());
  opts.parse_positional({"positional"});
  try {
    out.result = opts.parse(argc, argv);
  } catch (const cxxopts::exceptions::exception& e) {
    std::fprintf(stderr, "%s: %s\n\n%s", opts.program().c_str(), e.what(), opts.help().c_str());
    return kExitUsage;
  }
  if (out.result.count("help")) {
    std::printf("%s", opts.help().c_str());
    return kExitOk;
  }
  if (out.result.count("positional")) out.positional = out.result["positional"].as<std::vector<std::string>>();
  if (out.positional.size() < min_pos || out.positional.size() > max_pos) {
    std::fprintf(stderr, "%s: expected %zu%s argument%s, got %zu\n\n%s", opts.program().c_str(), min_pos,
                 max_pos > min_pos ? " or more" : "", min_pos == 1 ? "" : "s", out.positional.size(),
                 opts.help().c_str());
    return kExitUsage;
  }
  return std::nullopt;
}

// ---------------------------------------------------------------------------------
int cmd_convert(int argc, char** argv) {
  cxxopts::Options opts("grokit convert",
                        "Convert the released checkpoint (a ckpt-0 directory of tensorNNNNN_000 pickles) into a sharded "
                        "grokit model directory, one shard file per tensor-parallel rank.\n"
                        "The output is written atomically: until the manifest is written last, the directory is "
                        "an incomplete conversion that verify and the loaders refuse.");
  opts.positional_help("<ckpt-0 dir> <out dir>");
  opts.add_options()
      ("tp", "tensor-parallel degree: 1, 2, 4, 8 or 16", cxxopts::value<int>()->default_value("8"))
      ("config", "config JSON (official field names); default: config.json beside ckpt-0, else Grok-1",
       cxxopts::value<std::string>())
      ("tokenizer", "SentencePiece model to copy into the model; default: tokenizer.model beside ckpt-0",
       cxxopts::value<std::string>())
      ("resume", "continue an interrupted conversion, re-checking what it keeps (default: off)", cxxopts::value<bool>()->default_value("false")->implicit_value("true"))
      ("force", "replace an existing model or interrupted conversion in <out dir> (DESTRUCTIVE) (default: off)",
       cxxopts::value<bool>()->default_value("false")->implicit_value("true"))
      ("compress", "zstd-compress each tensor (for archives: compressed models cannot be memory-mapped) (default: off)",
       cxxopts::value<bool>()->default_value("false")->implicit_value("true"))
      ("zstd-level", "zstd level with --compress", cxxopts::value<int>()->default_value("3"))
      ("threads", "source files converted at once", cxxopts::value<unsigned>()->default_value("4"))
      ("staging-mb", "staging buffer per thread, MiB (bounds anonymous memory)", cxxopts::value<unsigned>()->default_value("32"))
      ("dry-run", "check the checkpoint and print the plan; write nothing (default: off)", cxxopts::value<bool>()->default_value("false")->implicit_value("true"))
      ("no-direct-io", "write the shards through the page cache (default: off: direct I/O where the file system "
       "allows it, so a large output neither costs a copy nor evicts other files)",
       cxxopts::value<bool>()->default_value("false")->implicit_value("true"))
      ("no-progress", "no progress bar (default: off)", cxxopts::value<bool>()->default_value("false")->implicit_value("true"));
  ParsedArgs p;
  if (auto rc = parse_args(opts, argc, argv, 2, 2, p)) return *rc;
  const auto& r = p.result;
  convert::ConvertOptions o;
  o.ckpt_dir = p.positional[0];
  o.out_dir = p.positional[1];
  o.tp = r["tp"].as<int>();
  if (o.tp != 1 && o.tp != 2 && o.tp != 4 && o.tp != 8 && o.tp != 16) {
    std::fprintf(stderr, "grokit convert: --tp must be 1, 2, 4, 8 or 16 (got %d)\n\n%s", o.tp, opts.help().c_str());
    return kExitUsage;
  }
  if (r.count("config")) o.config_file = r["config"].as<std::string>();
  if (r.count("tokenizer")) o.tokenizer_file = r["tokenizer"].as<std::string>();
  o.resume = r["resume"].as<bool>();
  o.force = r["force"].as<bool>();
  if (o.resume && o.force) {
    std::fprintf(stderr, "grokit convert: --resume and --force contradict each other\n");
    return kExitUsage;
  }
  o.compress = r["compress"].as<bool>();
  o.zstd_level = r["zstd-level"].as<int>();
  o.threads = r["threads"].as<unsigned>();
  unsigned mb = r["staging-mb"].as<unsigned>();
  if (o.threads == 0 || o.threads > 256 || mb == 0 || mb > 4096 || o.zstd_level < 1 || o.zstd_level > 19) {
    std::fprintf(stderr, "grokit convert: --threads must be 1..256, --staging-mb 1..4096, --zstd-level 1..19\n");
    return kExitUsage;
  }
  o.staging_bytes = uint64_t{mb} << 20;
  o.dry_run = r["dry-run"].as<bool>();
  o.progress = !r["no-progress"].as<bool>();
  o.direct_io = !r["no-direct-io"].as<bool>();
  auto rep = convert::convert_checkpoint(o);
  if (!rep.ok()) return fail("grokit convert", rep.error());
  if (o.dry_run) {
    std::fprintf(stderr, "dry run: checks passed, nothing written\n");
    return kExitOk;
  }
  if (rep->tensors == 0) return kExitOk;  // resume of a complete model
  std::fprintf(stderr, "tokenizer: %s\n", rep->tokenizer_source.c_str());
  double s = std::max(rep->seconds, 1e-9);
  std::fprintf(stderr,
               "converted %zu tensors (%zu kept from the interrupted run) to TP %d in %.2f s: read %s at %.2f GB/s, "
               "wrote %s; peak RssAnon %s (bound %s)\n",
               rep->tensors, rep->tensors_resumed, o.tp, rep->seconds, human_bytes(static_cast<double>(rep->bytes_read)).c_str(),
               static_cast<double>(rep->bytes_read) / s / 1e9, human_bytes(static_cast<double>(rep->bytes_written)).c_str(),
               human_bytes(static_cast<double>(rep->peak_rss_anon)).c_str(),
               human_bytes(static_cast<double>(rep->anon_bound)).c_str());
  return kExitOk;
}

// ---------------------------------------------------------------------------------
int cmd_inspect(int argc, char** argv) {
  cxxopts::Options opts("grokit inspect", "Describe a converted model: config, shards and tensors.");
  opts.positional_help("<model dir>");
  opts.add_options()
      ("json", "print JSON instead of text (default: off)", cxxopts::value<bool>()->default_value("false")->implicit_value("true"))
      ("tensors", "list every tensor of every rank (text mode lists rank 0) (default: off)", cxxopts::value<bool>()->default_value("false")->implicit_value("true"));
  ParsedArgs p;
  if (auto rc = parse_args(opts, argc, argv, 1, 1, p)) return *rc;
  bool as_json = p.result["json"].as<bool>();
  bool tensors = p.result["tensors"].as<bool>();
  auto model = format::Model::open(p.positional[0]);
  if (!model.ok()) return fail("grokit inspect", model.error());
  const auto& m = model->manifest();
  std::vector<format::ShardReader> shards;
  for (uint32_t r = 0; r < m.tp; ++r) {
    auto s = model->open_shard(r);
    if (!s.ok()) return fail("grokit inspect", s.error());
    shards.push_back(std::move(*s));
  }
  if (as_json) {
    json j = json::parse(m.to_json());
    json ranks = json::array();
    for (uint32_t r = 0; r < m.tp; ++r) {
      json t = json::array();
      for (const auto& e : shards[r].entries()) {
        t.push_back({{"name", e.name}, {"dtype", format::dtype_name(e.dtype)}, {"param", e.param}, {"shape", e.shape},
                     {"global_shape", e.global_shape}, {"split_axis", e.split_axis}, {"split_start", e.split_start},
                     {"offset", shards[r].header().data_offset + e.offset}, {"stored_size", e.stored_size},
                     {"size", e.size}, {"compression", e.compression ? "zstd" : "none"}, {"xxh3", hex64(e.xxh3)}});
      }
      ranks.push_back({{"rank", r}, {"tensors", t}});
    }
    j["ranks"] = ranks;
    std::printf("%s\n", j.dump(2).c_str());
    return kExitOk;
  }
  const auto& c = m.config;
  std::printf("model      %s\n", model->dir().c_str());
  std::printf("format     grokit-model v%u, %s, model id %s\n", m.format_version, m.producer.c_str(), hex64(m.model_id).c_str());
  std::printf("source     %s (config: %s)\n", m.source.c_str(), m.config_source.c_str());
  std::printf("config     vocab %ld, emb %ld, %ld layers, %ld/%ld heads of %ld, %ld experts (top %ld), ffn %ld\n",
              static_cast<long>(c.vocab_size), static_cast<long>(c.emb_size), static_cast<long>(c.num_layers),
              static_cast<long>(c.num_q_heads), static_cast<long>(c.num_kv_heads), static_cast<long>(c.key_size),
              static_cast<long>(c.num_experts), static_cast<long>(c.num_selected_experts), static_cast<long>(c.ffn()));
  std::printf("           sequence %ld, scale blocks: attention output %ld, expert down %ld\n",
              static_cast<long>(c.sequence_len), static_cast<long>(c.attn_output_scale_blocks),
              static_cast<long>(c.moe_down_scale_blocks));
  std::printf("           multipliers as applied: embedding %g, output %g, attention %.9g\n", c.embedding_multiplier_bf16(),
              c.output_multiplier_bf16(), static_cast<float>(c.attn_output_multiplier));
  std::printf("weights    %s, %lu tensors\n", m.scheme.c_str(), static_cast<unsigned long>(m.tensor_count));
  std::printf("tokenizer  %s\n", m.tokenizer ? (m.tokenizer->name + " (" + human_bytes(static_cast<double>(m.tokenizer->size)) + ")").c_str() : "none");
  uint64_t total = 0;
  for (const auto& s : m.shards) total += s.size;
  std::printf("shards     %u (TP %u), %s in all\n", m.tp, m.tp, human_bytes(static_cast<double>(total)).c_str());
  for (const auto& s : m.shards)
    std::printf("  %-28s %12lu bytes  %lu tensors\n", s.file.c_str(), static_cast<unsigned long>(s.size),
                static_cast<unsigned long>(s.tensor_count));
  for (uint32_t r = 0; r < (tensors ? m.tp : 1); ++r) {
    std::printf("\nrank %u tensors:\n  %-28s %-6s %-22s %-22s %s\n", r, "name", "dtype", "shape", "of", "bytes");
    for (const auto& e : shards[r].entries()) {
      std::printf("  %-28s %-6s %-22s %-22s %lu%s\n", e.name.c_str(), format::dtype_name(e.dtype), shape_text(e.shape).c_str(),
                  e.split_axis < 0 ? "(whole)" : shape_text(e.global_shape).c_str(), static_cast<unsigned long>(e.stored_size),
                  e.compression ? " zstd" : "");
    }
  }
  return kExitOk;
}

// ---------------------------------------------------------------------------------
int cmd_verify(int argc, char** argv) {
  cxxopts::Options opts("grokit verify",
                        "Recompute every checksum of a converted model in parallel and name the tensors that differ.");
  opts.positional_help("<model dir>");
  opts.add_options()
      ("threads", "threads", cxxopts::value<unsigned>()->default_value(std::to_string(default_threads())))
      ("json", "print the report as JSON on stdout (default: off)", cxxopts::value<bool>()->default_value("false")->implicit_value("true"))
      ("no-progress", "no progress bar (default: off)", cxxopts::value<bool>()->default_value("false")->implicit_value("true"));
  ParsedArgs p;
  if (auto rc = parse_args(opts, argc, argv, 1, 1, p)) return *rc;
  unsigned threads = p.result["threads"].as<unsigned>();
  if (threads == 0) return std::fprintf(stderr, "grokit verify: --threads must be at least 1\n"), kExitUsage;
  auto rep = validate::verify_model(p.positional[0], threads, !p.result["no-progress"].as<bool>());
  if (!rep.ok()) return fail("grokit verify", rep.error());
  if (p.result["json"].as<bool>()) {
    json bad = json::array();
    for (const auto& b : rep->bad) bad.push_back({{"tensor", b.tensor}, {"rank", b.rank}, {"message", b.message}});
    std::printf("%s\n", json{{"ok", rep->bad.empty()}, {"tensors_checked", rep->tensors_checked},
                             {"bytes_checked", rep->bytes_checked}, {"bad", bad}}.dump(2).c_str());
  } else {
    for (const auto& b : rep->bad) std::printf("BAD  rank %u  %s: %s\n", b.rank, b.tensor.c_str(), b.message.c_str());
  }
  std::fprintf(stderr, "verify: %s: %lu tensors, %s checked in %.2f s (%.2f GB/s)%s\n",
               rep->bad.empty() ? "OK" : "FAILED", static_cast<unsigned long>(rep->tensors_checked),
               human_bytes(static_cast<double>(rep->bytes_checked)).c_str(), rep->seconds,
               static_cast<double>(rep->bytes_checked) / std::max(rep->seconds, 1e-9) / 1e9,
               rep->bad.empty() ? "" : str_cat(", ", rep->bad.size(), " bad").c_str());
  return rep->bad.empty() ? kExitOk : kExitFailure;
}

// ---------------------------------------------------------------------------------
namespace {
int cmd_validate_logits(int argc, char** argv);
}  // namespace

int cmd_validate(int argc, char** argv) {
  if (argc < 2 || std::string(argv[1]) == "--help" || std::string(argv[1]) == "-h") {
    std::FILE* out = argc < 2 ? stderr : stdout;
    std::fprintf(out, "usage: grokit validate <what> ...\n\n"
                      "  tensors   every stored tensor equals its source (grokit validate tensors --help)\n"
                      "  logits    candidate logits agree with reference logits: KL, top-1, perplexity\n"
                      "            (grokit validate logits --help)\n");
    return argc < 2 ? kExitUsage : kExitOk;
  }
  std::string what = argv[1];
  if (what == "logits") {
    std::string prog = "grokit validate logits";
    argv[1] = prog.data();
    return cmd_validate_logits(argc - 1, argv + 1);
  }
  if (what != "tensors") {
    std::fprintf(stderr, "grokit validate: unknown check '%s' (available: tensors, logits)\n", what.c_str());
    return kExitUsage;
  }
  cxxopts::Options opts("grokit validate tensors",
                        "Check that every stored tensor equals its source in the release pickles: int8 codes and "
                        "bf16 scales bit-exact, norms and router fp32 exact, the embedding equal to bf16 of the source.");
  opts.positional_help("<ckpt-0 dir> <model dir>");
  opts.add_options()
      ("threads", "threads", cxxopts::value<unsigned>()->default_value(std::to_string(default_threads())))
      ("json", "print the report as JSON on stdout (default: off)", cxxopts::value<bool>()->default_value("false")->implicit_value("true"))
      ("no-progress", "no progress bar (default: off)", cxxopts::value<bool>()->default_value("false")->implicit_value("true"));
  ParsedArgs p;
  std::string prog = "grokit validate tensors";
  argv[1] = prog.data();
  if (auto rc = parse_args(opts, argc - 1, argv + 1, 2, 2, p)) return *rc;
  unsigned threads = p.result["threads"].as<unsigned>();
  if (threads == 0) return std::fprintf(stderr, "%s: --threads must be at least 1\n", prog.c_str()), kExitUsage;
  auto rep = validate::validate_tensors(p.positional[0], p.positional[1], threads, !p.result["no-progress"].as<bool>());
  if (!rep.ok()) return fail(prog, rep.error());
  if (p.result["json"].as<bool>()) {
    json bad = json::array();
    for (const auto& b : rep->bad) bad.push_back({{"tensor", b.tensor}, {"rank", b.rank}, {"message", b.message}});
    std::printf("%s\n", json{{"ok", rep->bad.empty()}, {"tensors_checked", rep->tensors_checked},
                             {"elements_checked", rep->elements_checked}, {"bad", bad}}.dump(2).c_str());
  } else {
    for (const auto& b : rep->bad) std::printf("MISMATCH  rank %u  %s: %s\n", b.rank, b.tensor.c_str(), b.message.c_str());
  }
  std::fprintf(stderr, "validate tensors: %s: %lu tensor slices, %lu elements equal to the source in %.2f s (%.2f GB/s of source)\n",
               rep->bad.empty() ? "OK" : "FAILED", static_cast<unsigned long>(rep->tensors_checked),
               static_cast<unsigned long>(rep->elements_checked), rep->seconds,
               static_cast<double>(rep->source_bytes) / std::max(rep->seconds, 1e-9) / 1e9);
  return rep->bad.empty() ? kExitOk : kExitFailure;
}

// ---------------------------------------------------------------------------------
namespace {

std::string fmt_g(double v) {
  if (std::isnan(v)) return "n/a";
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.6g", v);
  return buf;
}

std::string fmt_fraction(uint64_t agree, uint64_t of) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.4f%% (%lu/%lu)", of ? 100.0 * static_cast<double>(agree) / static_cast<double>(of) : 100.0,
                static_cast<unsigned long>(agree), static_cast<unsigned long>(of));
  return buf;
}

int cmd_validate_logits(int argc, char** argv) {
  const std::string prog = "grokit validate logits";
  cxxopts::Options opts(prog,
                        "Compare candidate float32 logits with reference logits (.npy, [B, T, V] or [N, V]) position "
                        "by position: KL(reference || candidate) of the softmaxes in float64, top-1 agreement outside "
                        "near ties (reference top-2 margin below --near-tie-margin) and within them, max |delta "
                        "logit|, and with --tokens the perplexity of each model on the next tokens. Exits 0 only if "
                        "every active threshold passes, 1 if one fails or a file is bad.");
  opts.positional_help("");
  opts.add_options()
      ("reference", "reference logits .npy, float32 (default: none; required)", cxxopts::value<std::string>())
      ("candidate", "candidate logits .npy, same shape (default: none; required)", cxxopts::value<std::string>())
      ("tokens", "int32 tokens .npy [B, T] ([N] for [N, V] logits); 0 is padding on the right: padding positions "
                 "are skipped and perplexity is measured (default: none)", cxxopts::value<std::string>())
      ("max-kl", "fail if the max KL over positions exceeds this", cxxopts::value<double>()->default_value("0.001"))
      ("min-top1", "fail if top-1 agreement outside near ties is below this fraction",
       cxxopts::value<double>()->default_value("1"))
      ("near-tie-margin", "positions whose reference top-2 margin is below this are near ties, counted apart",
       cxxopts::value<double>()->default_value("0.1"))
      ("max-mean-kl", "fail if the mean KL exceeds this (default: off)", cxxopts::value<double>())
      ("max-p99-kl", "fail if the 99th percentile of KL exceeds this (default: off)", cxxopts::value<double>())
      ("max-abs-diff", "fail if max |delta logit| exceeds this (default: off)", cxxopts::value<double>())
      ("max-ppl-ratio", "fail if |ppl(candidate) / ppl(reference) - 1| exceeds this; needs --tokens (default: off)",
       cxxopts::value<double>())
      ("threads", "threads over positions (the result does not depend on it)",
       cxxopts::value<unsigned>()->default_value(std::to_string(std::min(8u, hardware_threads()))))
      ("json", "print the report as JSON on stdout (default: off)", cxxopts::value<bool>()->default_value("false")->implicit_value("true"))
      ("no-progress", "no progress bar (default: off)", cxxopts::value<bool>()->default_value("false")->implicit_value("true"));
  ParsedArgs p;
  if (auto rc = parse_args(opts, argc, argv, 0, 0, p)) return *rc;
  const auto& r = p.result;
  auto usage = [&](const std::string& msg) {
    std::fprintf(stderr, "%s: %s\n\n%s", prog.c_str(), msg.c_str(), opts.help().c_str());
    return kExitUsage;
  };
  if (!r.count("reference") || !r.count("candidate")) return usage("--reference and --candidate are required");
  validate::LogitsThresholds th;
  th.max_kl = r["max-kl"].as<double>();
  th.min_top1 = r["min-top1"].as<double>();
  th.near_tie_margin = r["near-tie-margin"].as<double>();
  auto optional_flag = [&](const char* name) -> std::optional<double> {
    if (!r.count(name)) return std::nullopt;
    return r[name].as<double>();
  };
  th.max_mean_kl = optional_flag("max-mean-kl");
  th.max_p99_kl = optional_flag("max-p99-kl");
  th.max_abs_diff = optional_flag("max-abs-diff");
  th.max_ppl_ratio = optional_flag("max-ppl-ratio");
  for (auto [name, v] : {std::pair{"--max-kl", th.max_kl}, {"--max-mean-kl", th.max_mean_kl},
                         {"--max-p99-kl", th.max_p99_kl}, {"--max-abs-diff", th.max_abs_diff},
                         {"--max-ppl-ratio", th.max_ppl_ratio}, {"--near-tie-margin", std::optional{th.near_tie_margin}}}) {
    if (v && !(std::isfinite(*v) && *v >= 0)) return usage(str_cat(name, " must be a non-negative number (got ", *v, ")"));
  }
  if (!(*th.min_top1 >= 0 && *th.min_top1 <= 1)) return usage(str_cat("--min-top1 must be a fraction in [0, 1] (got ", *th.min_top1, ")"));
  std::string tokens = r.count("tokens") ? r["tokens"].as<std::string>() : std::string();
  if (th.max_ppl_ratio && tokens.empty()) return usage("--max-ppl-ratio needs --tokens");
  unsigned threads = r["threads"].as<unsigned>();
  if (threads == 0 || threads > 256) return usage("--threads must be 1..256");
  const std::string ref_path = r["reference"].as<std::string>(), cand_path = r["candidate"].as<std::string>();
  auto rep = validate::compare_logits(ref_path, cand_path, tokens, th, threads, !r["no-progress"].as<bool>());
  if (!rep.ok()) return fail(prog, rep.error());

  auto threshold_of = [&](const char* name) -> const validate::LogitsCheck* {
    for (const auto& c : rep->checks)
      if (c.name == name) return &c;
    return nullptr;
  };
  if (r["json"].as<bool>()) {
    auto opt = [](const std::optional<double>& v) { return v ? json(*v) : json(nullptr); };
    json checks = json::array();
    for (const auto& c : rep->checks)
      checks.push_back({{"name", c.name}, {"value", c.value}, {"threshold", c.threshold},
                        {"op", c.at_least ? ">=" : "<="}, {"pass", c.pass}});
    json worst = json::array();
    for (const auto& w : rep->worst) worst.push_back(json::array({w.b, w.t, w.kl}));
    json ppl = nullptr;
    if (rep->has_perplexity)
      ppl = {{"predictions", rep->predictions}, {"reference", rep->ppl_reference}, {"candidate", rep->ppl_candidate},
             {"ratio", rep->ppl_ratio}};
    json j = {{"ok", rep->pass},
              {"reference", ref_path},
              {"candidate", cand_path},
              {"tokens", tokens.empty() ? json(nullptr) : json(tokens)},
              {"shape", rep->shape},
              {"positions", rep->positions},
              {"padding_skipped", rep->padding},
              {"kl", {{"mean", rep->mean_kl}, {"p99", rep->p99_kl}, {"max", rep->max_kl}}},
              {"top1", {{"positions", rep->decisive}, {"agree", rep->decisive_agree}, {"agreement", rep->top1_agreement}}},
              {"near_ties", {{"margin", th.near_tie_margin}, {"positions", rep->near_ties}, {"agree", rep->near_tie_agree},
                             {"agreement", rep->near_tie_agreement}}},
              {"max_abs_diff", rep->max_abs_diff},
              {"perplexity", ppl},
              {"thresholds", {{"max_kl", opt(th.max_kl)}, {"min_top1", opt(th.min_top1)},
                              {"near_tie_margin", th.near_tie_margin}, {"max_mean_kl", opt(th.max_mean_kl)},
                              {"max_p99_kl", opt(th.max_p99_kl)}, {"max_abs_diff", opt(th.max_abs_diff)},
                              {"max_ppl_ratio", opt(th.max_ppl_ratio)}}},
              {"checks", checks},
              {"worst_positions", worst},
              {"seconds", rep->seconds}};
    std::printf("%s\n", j.dump(2).c_str());
  } else {
    std::printf("reference  %s  %s\ncandidate  %s\n", ref_path.c_str(), shape_text(rep->shape).c_str(), cand_path.c_str());
    if (!tokens.empty()) std::printf("tokens     %s\n", tokens.c_str());
    std::printf("\n%-34s %-24s %-16s %s\n", "metric", "value", "threshold", "result");
    auto row = [&](const std::string& metric, const std::string& value, const char* check) {
      const validate::LogitsCheck* c = check ? threshold_of(check) : nullptr;
      std::string limit = "-", result;
      if (c != nullptr) {
        limit = std::string(c->at_least ? ">= " : "<= ") + fmt_g(c->threshold);
        if (std::string(check) == "max_ppl_ratio") limit = "|r - 1| <= " + fmt_g(c->threshold);
        result = c->pass ? "PASS" : "FAIL";
      }
      std::printf("%-34s %-24s %-16s %s\n", metric.c_str(), value.c_str(), limit.c_str(), result.c_str());
    };
    row("positions compared", std::to_string(rep->positions), nullptr);
    if (!tokens.empty()) row("padding positions skipped", std::to_string(rep->padding), nullptr);
    row("mean KL", fmt_g(rep->mean_kl), "max_mean_kl");
    row("p99 KL", fmt_g(rep->p99_kl), "max_p99_kl");
    row("max KL", fmt_g(rep->max_kl), "max_kl");
    row("top-1 agreement (margin >= " + fmt_g(th.near_tie_margin) + ")", fmt_fraction(rep->decisive_agree, rep->decisive),
        "min_top1");
    row("near-tie top-1 agreement", fmt_fraction(rep->near_tie_agree, rep->near_ties), nullptr);
    row("max |delta logit|", fmt_g(rep->max_abs_diff), "max_abs_diff");
    if (!tokens.empty()) {
      row("next tokens scored", std::to_string(rep->predictions), nullptr);
      row("perplexity reference", rep->has_perplexity ? fmt_g(rep->ppl_reference) : "n/a", nullptr);
      row("perplexity candidate", rep->has_perplexity ? fmt_g(rep->ppl_candidate) : "n/a", nullptr);
      row("perplexity ratio cand/ref", rep->has_perplexity ? fmt_g(rep->ppl_ratio) : "n/a", "max_ppl_ratio");
    }
    if (!rep->worst.empty()) {
      std::printf("\nlargest KL at");
      for (const auto& w : rep->worst) std::printf("  [%ld, %ld] %s", static_cast<long>(w.b), static_cast<long>(w.t), fmt_g(w.kl).c_str());
      std::printf("\n");
    }
  }
  size_t failed = 0;
  for (const auto& c : rep->checks) failed += !c.pass;
  std::fprintf(stderr, "validate logits: %s: %lu positions, max KL %s, top-1 %s outside near ties%s; %zu/%zu checks passed in %.2f s (%.2f GB/s)\n",
               rep->pass ? "OK" : "FAILED", static_cast<unsigned long>(rep->positions), fmt_g(rep->max_kl).c_str(),
               fmt_fraction(rep->decisive_agree, rep->decisive).c_str(),
               rep->has_perplexity ? str_cat(", ppl ratio ", fmt_g(rep->ppl_ratio)).c_str() : "",
               rep->checks.size() - failed, rep->checks.size(), rep->seconds,
               static_cast<double>(rep->bytes_read) / std::max(rep->seconds, 1e-9) / 1e9);
  return rep->pass ? kExitOk : kExitFailure;
}

}  // namespace

// ---------------------------------------------------------------------------------
int cmd_devices(int argc, char** argv) {
  cxxopts::Options opts("grokit devices", "List the CUDA devices, loading the CUDA backend plugin at run time.");
  ParsedArgs p;
  if (auto rc = parse_args(opts, argc, argv, 0, 0, p)) return *rc;
  auto devs = runner::list_cuda_devices();
  if (!devs.ok()) return fail("grokit devices", devs.error());
  for (const auto& d : *devs)
    std::printf("cuda:%d  %s  %s  sm_%d%d\n", d.index, d.name.c_str(), human_bytes(static_cast<double>(d.memory_bytes)).c_str(),
                d.compute_major, d.compute_minor);
  return kExitOk;
}

}  // namespace grokit::cli
