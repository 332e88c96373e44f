// grokit run and grokit logits: thin fronts over runner::Engine.
#include <cxxopts.hpp>

#include <cstdio>
#include <fstream>
#include <iostream>
#include <optional>

#include "cli/cli.h"
#include "common/npy.h"
#include "runner/runner.h"
#include "runner/tokenizer.h"

namespace grokit::cli {

namespace {

// One continuation per line: control characters, backslashes and line breaks escaped,
// every other byte (UTF-8 included) as it is.
std::string escape_line(const std::string& s) {
  std::string out;
  out.reserve(s.size());
  for (unsigned char c : s) {
    switch (c) {
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      default:
        if (c < 0x20 || c == 0x7f) {
          char buf[8];
          std::snprintf(buf, sizeof buf, "\\x%02x", c);
          out += buf;
        } else {
          out += static_cast<char>(c);
        }
    }
  }
  return out;
}

int usage_error(const cxxopts::Options& opts, const std::string& msg) {
  std::fprintf(stderr, "%s: %s\n\n%s", opts.program().c_str(), msg.c_str(), opts.help().c_str());
  return kExitUsage;
}

int fail(const char* program, const Error& e) {
  std::fprintf(stderr, "%s: error: %s\n", program, e.message.c_str());
  return kExitFailure;
}

// An output never replaces one of the run's inputs, --force or not: a file of the model
// (manifest, shards, tokenizer) or another input file the command reads.
Status refuse_overwriting_inputs(const std::string& out, const format::Model& model,
                                 const std::vector<std::string>& other_inputs) {
  std::vector<std::string> inputs = other_inputs;
  inputs.push_back(path_join(model.dir(), format::kManifestFile));
  for (uint32_t r = 0; r < model.manifest().tp; ++r) inputs.push_back(model.shard_path(r));
  if (model.manifest().tokenizer) inputs.push_back(path_join(model.dir(), model.manifest().tokenizer->name));
  for (const auto& in : inputs) {
    if (in.empty() || !same_file(out, in)) continue;
    if (in == out) return make_error(out, ": is an input of this run; choose another output");
    return make_error(out, ": is an input of this run (as ", in, "); choose another output");
  }
  return {};
}

void add_engine_options(cxxopts::Options& opts) {
  opts.add_options()
      ("threads", "threads in all (0: every core)", cxxopts::value<unsigned>()->default_value("0"))
      ("no-verify", "skip recomputing the weights' checksums while loading (default: off)",
       cxxopts::value<bool>()->default_value("false")->implicit_value("true"))
      ("no-progress", "no progress bar (default: off)", cxxopts::value<bool>()->default_value("false")->implicit_value("true"))
      ("device", "cpu; cuda (the GPUs, see 'grokit devices'); host (the CUDA path's engine on the CPU twins of its "
       "ops, for testing)", cxxopts::value<std::string>()->default_value("cpu"))
      ("gpus", "device indices for this host's ranks, e.g. 0,1,2,3; empty: all of them (fewer devices than "
       "ranks: ranks share devices)", cxxopts::value<std::string>()->default_value(""))
      ("comm", "device collectives: auto (NCCL with one device per rank, else in-process), nccl, local",
       cxxopts::value<std::string>()->default_value("auto"))
      ("no-graphs", "run decode steps op by op instead of replaying CUDA graphs (default: off)",
       cxxopts::value<bool>()->default_value("false")->implicit_value("true"))
      ("loader", "how shards reach the GPUs: staged (pinned double-buffered reads), mapped (the page cache registered "
       "with the GPU and copied from directly, where the driver allows it), cufile (GPUDirect Storage, where "
       "installed)", cxxopts::value<std::string>()->default_value("staged"))
      ("hosts", "several hosts: the leader's address host:port; empty: one host",
       cxxopts::value<std::string>()->default_value(""))
      ("host-rank", "this host's index among --host-count hosts; 0 is the leader", cxxopts::value<int>()->default_value("0"))
      ("host-count", "hosts in all; each drives tensor_parallel / host-count ranks", cxxopts::value<int>()->default_value("1"))
      ("host-join-timeout", "seconds the leader waits for every host to join, and a host for the leader",
       cxxopts::value<int>()->default_value("120"))
      ("profile", "at the end, print on stderr where the forward steps went, op by op, with the weight products' "
       "GB/s (rank 0; --device cpu) (default: off)", cxxopts::value<bool>()->default_value("false")->implicit_value("true"));
}

// --profile: the table on stderr (the engine gives none for the device engine).
void report_profile(const runner::Engine& engine, const cxxopts::ParseResult& r, const char* program) {
  if (!r["profile"].as<bool>()) return;
  const std::vector<runner::OpProfile> prof = engine.profile();
  if (prof.empty()) {
    std::fprintf(stderr, "%s: --profile: no op times (the CPU engine keeps them; --device %s runs its ops "
                 "asynchronously)\n", program, r["device"].as<std::string>().c_str());
    return;
  }
  std::fprintf(stderr, "%s: profile (rank 0, totals of the run):\n", program);
  print_profile(stderr, prof, 1.0, "ms");
}

Result<std::vector<int>> parse_gpus(const std::string& list) {
  std::vector<int> out;
  if (list.empty()) return out;
  size_t i = 0;
  while (i <= list.size()) {
    size_t j = list.find(',', i);
    if (j == std::string::npos) j = list.size();
    std::string item = list.substr(i, j - i);
    char* end = nullptr;
    long v = std::strtol(item.c_str(), &end, 10);
    if (item.empty() || end == nullptr || *end != '\0' || v < 0 || v > 1024)
      return make_error("--gpus: '", item, "' is not a device index (give e.g. 0,1,2,3)");
    out.push_back(static_cast<int>(v));
    i = j + 1;
  }
  return out;
}

Result<std::unique_ptr<runner::Engine>> load_engine(const std::string& dir, const cxxopts::ParseResult& r,
                                                    const char* program) {
  runner::EngineOptions eo;
  eo.threads = r["threads"].as<unsigned>();
  eo.verify = !r["no-verify"].as<bool>();
  eo.progress = !r["no-progress"].as<bool>();
  eo.device = r["device"].as<std::string>();
  GROKIT_ASSIGN_OR_RETURN(eo.devices, parse_gpus(r["gpus"].as<std::string>()));
  eo.comm = r["comm"].as<std::string>();
  eo.graphs = !r["no-graphs"].as<bool>();
  eo.loader = r["loader"].as<std::string>();
  eo.hosts = r["hosts"].as<std::string>();
  eo.host_rank = r["host-rank"].as<int>();
  eo.host_count = r["host-count"].as<int>();
  eo.host_join_seconds = r["host-join-timeout"].as<int>();
  eo.profile = r["profile"].as<bool>();
  runner::LoadReport rep;
  GROKIT_ASSIGN_OR_RETURN(auto engine, runner::Engine::load(dir, eo, &rep));
  for (const auto& d : rep.details) std::fprintf(stderr, "%s: %s\n", program, d.c_str());
  std::fprintf(stderr, "%s: loaded %s of weights in %.2f s (TP %d, %u threads per rank, %s kernels%s)\n", program,
               human_bytes(static_cast<double>(rep.bytes)).c_str(), rep.seconds, engine->tensor_parallel(),
               engine->threads_per_rank(), rep.kernel_path.c_str(), eo.verify ? ", checksums verified" : "");
  return engine;
}

// int32 token ids [B, T] (or [T]) from an .npy file.
Result<std::vector<std::vector<int32_t>>> read_token_rows(const std::string& path, bool trim_padding) {
  GROKIT_ASSIGN_OR_RETURN(npy::Array a, npy::Array::open(path));
  const auto& shape = a.shape();
  if (a.header().descr != "<i4" || shape.empty() || shape.size() > 2)
    return make_error(path, ": expected int32 token ids [B, T] / actual ", a.header().descr, " with ", shape.size(),
                      " dimensions");
  int64_t B = shape.size() == 2 ? shape[0] : 1, T = shape.back();
  if (B == 0 || T == 0) return make_error(path, ": no tokens");
  std::vector<std::vector<int32_t>> rows(static_cast<size_t>(B));
  const int32_t* p = a.data<int32_t>();
  for (int64_t b = 0; b < B; ++b) {
    rows[static_cast<size_t>(b)].assign(p + b * T, p + (b + 1) * T);
    if (trim_padding) {
      auto& r = rows[static_cast<size_t>(b)];
      while (!r.empty() && r.back() == 0) r.pop_back();
    }
  }
  return rows;
}

}  // namespace

// ---------------------------------------------------------------------------------
// A follower host (--host-rank > 0): its ranks run the leader's steps until the leader is
// done; the same for every command that runs the model.
int follow_leader(const std::string& dir, const cxxopts::ParseResult& r, const char* prog) {
  auto engine = load_engine(dir, r, prog);
  if (!engine.ok()) return fail(prog, engine.error());
  if (auto s = (*engine)->follow(); !s.ok()) return fail(prog, s.error());
  std::fprintf(stderr, "%s: host %d: the leader finished\n", prog, r["host-rank"].as<int>());
  return kExitOk;
}

int cmd_logits(int argc, char** argv) {
  const char* prog = "grokit logits";
  cxxopts::Options opts(prog,
                        "Run the model over token ids and write float32 logits [B, T, V] for every position "
                        "(streamed to the file: memory does not grow with T x V).");
  opts.positional_help("<model dir>");
  opts.add_options()
      ("tokens", "int32 token ids [B, T] (.npy), 0 = padding on the right (default: none; required)",
       cxxopts::value<std::string>())
      ("out", "output .npy of float32 logits [B, T, V] (default: none; required)", cxxopts::value<std::string>())
      ("dump-layers", "also write DIR/hidden_000.npy (embedding output) .. hidden_L.npy (after each layer), "
                      "float32 [B, T, D], and DIR/experts_000.npy .. experts_{L-1}.npy (each layer's chosen "
                      "experts in choice order, int32 [B, T, top])",
       cxxopts::value<std::string>()->default_value(""))
      ("force", "overwrite existing outputs (default: off)", cxxopts::value<bool>()->default_value("false")->implicit_value("true"));
  add_engine_options(opts);
  ParsedArgs parsed;
  if (auto rc = parse_args(opts, argc, argv, 1, 1, parsed)) return *rc;
  const cxxopts::ParseResult& r = parsed.result;
  const std::vector<std::string>& pos = parsed.positional;
  if (r["host-rank"].as<int>() > 0) {
    if (r.count("tokens") || r.count("out") || !r["dump-layers"].as<std::string>().empty())
      return usage_error(opts, "a follower host (--host-rank > 0) takes no --tokens, --out or --dump-layers: the leader "
                               "has them");
    return follow_leader(pos[0], r, prog);
  }
  if (!r.count("tokens") || !r.count("out")) return usage_error(opts, "--tokens and --out are required");
  const bool force = r["force"].as<bool>();
  auto rows = read_token_rows(r["tokens"].as<std::string>(), false);
  if (!rows.ok()) return fail(prog, rows.error());
  // The tokens and the outputs are checked before the weights load (minutes for Grok-1).
  auto model = format::Model::open(pos[0]);
  if (!model.ok()) return fail(prog, model.error());
  const format::ModelConfig cfg = model->config();
  if (auto s = runner::check_prompts(cfg, *rows, 0); !s.ok()) return fail(prog, s.error());
  const int64_t B = static_cast<int64_t>(rows->size()), T = static_cast<int64_t>((*rows)[0].size());
  std::vector<int64_t> shape{B, T, cfg.vocab_size};
  const std::vector<std::string> inputs{r["tokens"].as<std::string>()};
  if (auto s = refuse_overwriting_inputs(r["out"].as<std::string>(), *model, inputs); !s.ok()) return fail(prog, s.error());
  auto out = npy::Writer::create(r["out"].as<std::string>(), "<f4", shape, force);
  if (!out.ok()) return fail(prog, out.error());
  std::vector<npy::Writer> dumps, routing_dumps;
  std::string dump_dir = r["dump-layers"].as<std::string>();
  if (!dump_dir.empty()) {
    if (auto s = make_directory(dump_dir); !s.ok()) return fail(prog, s.error());
    std::vector<int64_t> hshape{B, T, cfg.emb_size};
    for (int64_t i = 0; i <= cfg.num_layers; ++i) {
      char name[32];
      std::snprintf(name, sizeof name, "hidden_%03ld.npy", static_cast<long>(i));
      if (auto s = refuse_overwriting_inputs(path_join(dump_dir, name), *model, inputs); !s.ok()) return fail(prog, s.error());
      auto w = npy::Writer::create(path_join(dump_dir, name), "<f4", hshape, force);
      if (!w.ok()) return fail(prog, w.error());
      dumps.push_back(std::move(*w));
    }
    std::vector<int64_t> eshape{B, T, cfg.num_selected_experts};
    for (int64_t i = 0; i < cfg.num_layers; ++i) {
      char name[32];
      std::snprintf(name, sizeof name, "experts_%03ld.npy", static_cast<long>(i));
      if (auto s = refuse_overwriting_inputs(path_join(dump_dir, name), *model, inputs); !s.ok()) return fail(prog, s.error());
      auto w = npy::Writer::create(path_join(dump_dir, name), "<i4", eshape, force);
      if (!w.ok()) return fail(prog, w.error());
      routing_dumps.push_back(std::move(*w));
    }
  }
  auto engine = load_engine(pos[0], r, prog);
  if (!engine.ok()) return fail(prog, engine.error());
  runner::Engine& eng = **engine;
  runner::StepTaps taps;
  taps.hidden = [&](int index, size_t, int64_t, int64_t n, const float* x) {
    return dumps[static_cast<size_t>(index)].write(x, sizeof(float) * static_cast<size_t>(n * cfg.emb_size));
  };
  taps.routing = [&](int layer, size_t, int64_t, int64_t n, const int32_t* experts) {
    return routing_dumps[static_cast<size_t>(layer)].write(
        experts, sizeof(int32_t) * static_cast<size_t>(n * cfg.num_selected_experts));
  };
  auto t0 = std::chrono::steady_clock::now();
  Progress progress("logits", static_cast<uint64_t>(B * T), !r["no-progress"].as<bool>());
  for (int64_t b = 0; b < B; ++b) {
    auto slot = eng.open_sequence(T);
    if (!slot.ok()) return fail(prog, slot.error());
    runner::StepRow row{*slot, (*rows)[static_cast<size_t>(b)], runner::StepRow::Logits::kAll};
    Status s = eng.step(std::span<const runner::StepRow>(&row, 1),
                        [&](size_t, int64_t, const float* logits) {
                          progress.add(1);
                          return out->write(logits, sizeof(float) * static_cast<size_t>(cfg.vocab_size));
                        },
                        dumps.empty() ? nullptr : &taps);
    eng.close_sequence(*slot);
    if (!s.ok()) return fail(prog, s.error());
  }
  progress.finish();
  for (auto* group : {&dumps, &routing_dumps}) {
    for (auto& d : *group) {
      if (auto s = d.finish(); !s.ok()) return fail(prog, s.error());
    }
  }
  if (auto s = out->finish(); !s.ok()) return fail(prog, s.error());
  double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::fprintf(stderr, "%s: %ld x %ld positions in %.2f s (%.1f tok/s) -> %s\n", prog, static_cast<long>(B),
               static_cast<long>(T), secs, static_cast<double>(B * T) / std::max(secs, 1e-9), r["out"].as<std::string>().c_str());
  report_profile(eng, r, prog);
  return kExitOk;
}

// ---------------------------------------------------------------------------------
int cmd_run(int argc, char** argv) {
  const char* prog = "grokit run";
  cxxopts::Options opts(prog,
                        "Generate text. One --prompt streams its continuation to stdout; --prompt-file runs "
                        "one prompt per line as a batch and prints the continuations, one line each, in the "
                        "prompts' order.");
  opts.positional_help("<model dir>");
  opts.add_options()
      ("prompt", "the prompt text (default: none; give one of --prompt, --prompt-file, --tokens-in)",
       cxxopts::value<std::string>())
      ("prompt-file", "a file of prompts ('-': standard input), one per line (no blank line between "
       "them), run as one batch; each continuation is printed on one line with \\n, \\r, \\t, \\\\ and "
       "\\xNN escapes (default: none)", cxxopts::value<std::string>())
      ("tokens-in", "prompts as int32 token ids [B, T] (.npy, 0-padded on the right) instead of text (default: none)",
       cxxopts::value<std::string>())
      ("tokenizer", "a SentencePiece model to use instead of the model's own tokenizer.model (for a model "
       "converted without --tokenizer)", cxxopts::value<std::string>()->default_value(""))
      ("tokens-out", "write the generated ids as int32 [B, max-tokens] (.npy, 0 after the end)",
       cxxopts::value<std::string>()->default_value(""))
      ("max-tokens", "tokens to generate per prompt", cxxopts::value<int64_t>()->default_value("64"))
      ("temperature", "sampling temperature; 0 is greedy", cxxopts::value<float>()->default_value("1.0"))
      ("top-p", "nucleus sampling: keep the top tokens whose mass reaches p (the official rule)",
       cxxopts::value<float>()->default_value("1.0"))
      ("top-k", "keep only the k most likely tokens (0: off)", cxxopts::value<int>()->default_value("0"))
      ("seed", "random seed (same seed, same text)", cxxopts::value<uint64_t>()->default_value("0"))
      ("ignore-eos", "keep generating past the end-of-sequence token (default: off)",
       cxxopts::value<bool>()->default_value("false")->implicit_value("true"))
      ("force", "overwrite --tokens-out (default: off)", cxxopts::value<bool>()->default_value("false")->implicit_value("true"));
  add_engine_options(opts);
  ParsedArgs parsed;
  if (auto rc = parse_args(opts, argc, argv, 1, 1, parsed)) return *rc;
  const cxxopts::ParseResult& r = parsed.result;
  const std::vector<std::string>& pos = parsed.positional;
  int sources = static_cast<int>(r.count("prompt") + r.count("prompt-file") + r.count("tokens-in"));
  if (r["host-rank"].as<int>() > 0) {
    if (sources != 0) return usage_error(opts, "a follower host (--host-rank > 0) takes no prompts: the leader has them");
    return follow_leader(pos[0], r, prog);
  }
  if (sources != 1) return usage_error(opts, "give exactly one of --prompt, --prompt-file, --tokens-in");
  runner::GenerateOptions go;
  go.max_tokens = r["max-tokens"].as<int64_t>();
  go.sampling.temperature = r["temperature"].as<float>();
  go.sampling.top_p = r["top-p"].as<float>();
  go.sampling.top_k = r["top-k"].as<int>();
  go.sampling.seed = r["seed"].as<uint64_t>();
  go.stop_at_eos = !r["ignore-eos"].as<bool>();
  if (go.max_tokens < 1) return usage_error(opts, "--max-tokens must be at least 1");
  if (!(go.sampling.temperature >= 0) || !(go.sampling.top_p > 0 && go.sampling.top_p <= 1) || go.sampling.top_k < 0)
    return usage_error(opts, "--temperature must be >= 0, --top-p in (0, 1], --top-k >= 0");

  // The tokenizer travels with the model; needed for text in or out.
  std::optional<runner::Tokenizer> tok;
  const std::string tok_flag = r["tokenizer"].as<std::string>();
  const std::string tok_path = tok_flag.empty() ? path_join(pos[0], format::kTokenizerFile) : tok_flag;
  if (!tok_flag.empty() || path_exists(tok_path)) {
    auto t = runner::Tokenizer::load(tok_path);
    if (!t.ok()) return fail(prog, t.error());
    tok.emplace(std::move(*t));
  }
  // The input is checked against the config before the weights load (minutes for Grok-1).
  auto model = format::Model::open(pos[0]);
  if (!model.ok()) return fail(prog, model.error());
  const format::ModelConfig& cfg = model->config();
  if (tok && !tok_flag.empty() && tok->vocab_size() > cfg.vocab_size)
    return fail(prog, make_error(tok_path, ": ", tok->vocab_size(), " pieces, more than the model's vocabulary of ",
                                 cfg.vocab_size, " (another model's tokenizer?)"));
  std::vector<std::vector<int32_t>> prompts;
  if (r.count("tokens-in")) {
    auto rows = read_token_rows(r["tokens-in"].as<std::string>(), true);
    if (!rows.ok()) return fail(prog, rows.error());
    prompts = std::move(*rows);
  } else {
    if (!tok) return fail(prog, make_error(pos[0], ": the model has no tokenizer.model; give one with --tokenizer FILE, or token ids with --tokens-in"));
    std::vector<std::string> texts;
    if (r.count("prompt")) {
      texts.push_back(r["prompt"].as<std::string>());
    } else {
      const std::string file = r["prompt-file"].as<std::string>();
      std::ifstream opened;
      if (file != "-") {
        opened.open(file);
        if (!opened) return fail(prog, make_error(file, ": cannot read"));
      }
      std::istream& in = file == "-" ? std::cin : opened;
      const std::string name = file == "-" ? "standard input" : file;
      // Output line i answers input line i: a blank line between prompts is refused
      // (skipping it would shift every later answer); blank lines at the end are not prompts.
      int64_t line_no = 0, first_blank = 0;
      for (std::string line; std::getline(in, line);) {
        ++line_no;
        if (!line.empty() && line.back() == '\r') line.pop_back();  // CRLF files
        if (line.empty()) {
          if (first_blank == 0) first_blank = line_no;
          continue;
        }
        if (first_blank != 0)
          return fail(prog, make_error(name, " line ", first_blank,
                                       ": empty, between prompts (one prompt per line; line i of the output answers "
                                       "prompt i)"));
        texts.push_back(line);
      }
      if (in.bad()) return fail(prog, make_error(name, ": read error"));
      if (texts.empty()) return fail(prog, make_error(name, ": no prompts"));
    }
    for (const auto& t : texts) {
      auto ids = tok->encode(t);
      if (!ids.ok()) return fail(prog, ids.error());
      prompts.push_back(std::move(*ids));
    }
  }
  if (auto s = runner::check_prompts(cfg, prompts, go.max_tokens); !s.ok()) return fail(prog, s.error());
  std::string tokens_out = r["tokens-out"].as<std::string>();
  std::optional<npy::Writer> ids_writer;
  if (!tokens_out.empty()) {
    const std::vector<std::string> inputs{r.count("tokens-in") ? r["tokens-in"].as<std::string>() : "",
                                          r.count("prompt-file") ? r["prompt-file"].as<std::string>() : "", tok_path};
    if (auto s = refuse_overwriting_inputs(tokens_out, *model, inputs); !s.ok()) return fail(prog, s.error());
    std::vector<int64_t> shape{static_cast<int64_t>(prompts.size()), go.max_tokens};
    auto w = npy::Writer::create(tokens_out, "<i4", shape, r["force"].as<bool>());
    if (!w.ok()) return fail(prog, w.error());
    ids_writer.emplace(std::move(*w));
  }
  auto engine = load_engine(pos[0], r, prog);
  if (!engine.ok()) return fail(prog, engine.error());

  const bool stream = prompts.size() == 1 && tok.has_value();
  std::optional<runner::StreamDecoder> decoder;
  if (stream) decoder.emplace(*tok);
  auto on_token = [&](size_t, int32_t id) {
    if (!stream) return;
    std::string text = decoder->push(id);
    std::fwrite(text.data(), 1, text.size(), stdout);
    std::fflush(stdout);
  };
  runner::GenerateStats st;
  auto out = runner::generate(**engine, prompts, go, on_token, &st);
  if (!out.ok()) return fail(prog, out.error());
  if (stream) {
    std::string rest = decoder->finish();
    std::fwrite(rest.data(), 1, rest.size(), stdout);
    std::fputc('\n', stdout);
    std::fflush(stdout);  // the text ends before the summary on a shared terminal
  } else {
    for (size_t i = 0; i < out->size(); ++i) {
      const auto& ids = (*out)[i];
      if (tok) {
        std::string line = escape_line(tok->decode(ids));
        line += '\n';
        std::fwrite(line.data(), 1, line.size(), stdout);
      } else {
        for (size_t k = 0; k < ids.size(); ++k) std::printf("%s%d", k ? " " : "", ids[k]);
        std::printf("\n");
      }
    }
  }
  if (ids_writer) {
    std::vector<int32_t> row(static_cast<size_t>(go.max_tokens));
    for (const auto& ids : *out) {
      std::fill(row.begin(), row.end(), 0);
      std::copy(ids.begin(), ids.end(), row.begin());
      if (auto s = ids_writer->write(row.data(), row.size() * sizeof(int32_t)); !s.ok()) return fail(prog, s.error());
    }
    if (auto s = ids_writer->finish(); !s.ok()) return fail(prog, s.error());
  }
  int64_t generated = 0;
  for (const auto& ids : *out) generated += static_cast<int64_t>(ids.size());
  std::fprintf(stderr,
               "%s: prompt %ld tokens at %.1f tok/s; generated %ld tokens, %ld in decode steps at %.2f tok/s; "
               "time to first token %.0f ms; KV cache %s per rank\n",
               prog, static_cast<long>(st.prompt_tokens), static_cast<double>(st.prompt_tokens) / std::max(st.prefill_seconds, 1e-9),
               static_cast<long>(generated), static_cast<long>(st.generated_tokens),
               static_cast<double>(st.generated_tokens) / std::max(st.decode_seconds, 1e-9), st.first_token_seconds * 1000,
               human_bytes(static_cast<double>(st.kv_bytes)).c_str());
  report_profile(**engine, r, prog);
  return kExitOk;
}

}  // namespace grokit::cli
