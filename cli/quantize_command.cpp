// grokit quantize: a thin front over quantize::quantize_model.
#include <cxxopts.hpp>

#include <cstdio>

#include "cli/cli.h"
#include "quantize/quantize.h"

namespace grokit::cli {

int cmd_quantize(int argc, char** argv) {
  const char* prog = "grokit quantize";
  cxxopts::Options opts(prog,
                        "Requantize the weight matrices of a converted (int8) model and report every tensor's error "
                        "against the int8 weights. Norms, router and the embedding keep their precision (fp32, "
                        "fp32, bf16); --override applies to weight matrices only.");
  opts.positional_help("<model dir> <out dir>");
  opts.add_options()
      ("scheme", "int4 (groups of --group-size rows, searched scales), fp8 (E4M3, a scale per column), bf16 "
       "(dequantized), or int8 (the release's codes, bit-exact)", cxxopts::value<std::string>()->default_value("int4"))
      ("group-size", "int4 group size in rows: 32, 64 or 128", cxxopts::value<int64_t>()->default_value("128"))
      ("no-search", "int4: plain round-to-nearest with absmax scales instead of the scale search (default: off)",
       cxxopts::value<bool>()->default_value("false")->implicit_value("true"))
      ("override", "PATTERN=SCHEME for the weights whose names match the glob, e.g. 'layer.*.attn.*=int8' "
       "(repeatable; the first match wins) (default: none)", cxxopts::value<std::vector<std::string>>())
      ("tp", "tensor-parallel degree of the output (0: the input's)", cxxopts::value<int>()->default_value("0"))
      ("threads", "worker threads, default every core (each tensor is spread over them; the output does not "
       "depend on the count)", cxxopts::value<unsigned>()->default_value(std::to_string(hardware_threads())))
      ("json", "print the report as JSON instead of a table (default: off)",
       cxxopts::value<bool>()->default_value("false")->implicit_value("true"))
      ("force", "replace a grokit model in <out dir> (default: off)",
       cxxopts::value<bool>()->default_value("false")->implicit_value("true"))
      ("dry-run", "check and plan; write nothing (default: off)",
       cxxopts::value<bool>()->default_value("false")->implicit_value("true"))
      ("no-direct-io", "write the shards through the page cache (default: off: direct I/O where the file "
       "system allows it, so a large output neither costs a copy nor evicts other files)",
       cxxopts::value<bool>()->default_value("false")->implicit_value("true"))
      ("no-progress", "no progress bar (default: off)", cxxopts::value<bool>()->default_value("false")->implicit_value("true"))
;
  ParsedArgs parsed;
  if (auto rc = parse_args(opts, argc, argv, 2, 2, parsed)) return *rc;
  const cxxopts::ParseResult& r = parsed.result;
  const std::vector<std::string>& pos = parsed.positional;
  auto usage = [&](const std::string& msg) {
    std::fprintf(stderr, "%s: %s\n\n%s", prog, msg.c_str(), opts.help().c_str());
    return kExitUsage;
  };
  quantize::QuantizeOptions o;
  o.in_dir = pos[0];
  o.out_dir = pos[1];
  auto scheme = quantize::parse_scheme(r["scheme"].as<std::string>());
  if (!scheme) return usage("--scheme must be int4, fp8, bf16 or int8");
  o.scheme = *scheme;
  o.group_size = r["group-size"].as<int64_t>();
  if (o.group_size != 32 && o.group_size != 64 && o.group_size != 128) return usage("--group-size must be 32, 64 or 128");
  o.search = !r["no-search"].as<bool>();
  if (r.count("override")) {
    for (const auto& ov : r["override"].as<std::vector<std::string>>()) {
      auto eq = ov.rfind('=');
      auto sc = eq == std::string::npos ? std::nullopt : quantize::parse_scheme(ov.substr(eq + 1));
      if (eq == std::string::npos || eq == 0 || !sc) return usage("--override takes PATTERN=SCHEME, got '" + ov + "'");
      o.overrides.push_back({ov.substr(0, eq), *sc});
    }
  }
  o.tp = r["tp"].as<int>();
  if (o.tp != 0 && o.tp != 1 && o.tp != 2 && o.tp != 4 && o.tp != 8 && o.tp != 16)
    return usage("--tp must be 0 (the input's), 1, 2, 4, 8 or 16");
  o.threads = r["threads"].as<unsigned>();
  if (o.threads == 0 || o.threads > 256) return usage("--threads must be 1..256");
  o.force = r["force"].as<bool>();
  o.dry_run = r["dry-run"].as<bool>();
  o.progress = !r["no-progress"].as<bool>();
  o.direct_io = !r["no-direct-io"].as<bool>();
  auto rep = quantize::quantize_model(o);
  if (!rep.ok()) return std::fprintf(stderr, "%s: error: %s\n", prog, rep.error().message.c_str()), kExitFailure;
  if (o.dry_run) {
    std::fprintf(stderr, "%s: dry run: %zu tensors planned as %s at TP %d; nothing written\n", prog, rep->tensors.size(),
                 rep->scheme.c_str(), rep->tp);
    return kExitOk;
  }
  std::string text = r["json"].as<bool>() ? quantize::report_json(*rep) : quantize::report_table(*rep);
  std::fwrite(text.data(), 1, text.size(), stdout);
  size_t flagged = 0;
  for (const auto& t : rep->tensors) flagged += t.flagged ? 1 : 0;
  double s = std::max(rep->seconds, 1e-9);
  std::fprintf(stderr, "%s: %zu tensors as %s, %s -> %s in %.2f s (%.2f GB/s of input); %zu flagged; peak RssAnon %s\n",
               prog, rep->tensors.size(), rep->scheme.c_str(), human_bytes(static_cast<double>(rep->bytes_in)).c_str(),
               human_bytes(static_cast<double>(rep->bytes_out)).c_str(), rep->seconds,
               static_cast<double>(rep->bytes_in) / s / 1e9, flagged, human_bytes(static_cast<double>(rep->peak_rss_anon)).c_str());
  return kExitOk;
}

}  // namespace grokit::cli
