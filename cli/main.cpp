#include <csignal>
#include <cstdio>
#include <cstring>
#include <string>

#include "cli/cli.h"

using namespace grokit::cli;

static const Command kCommands[] = {
    {"convert", "convert the released ckpt-0 pickles into a sharded grokit model", cmd_convert},
    {"quantize", "requantize a model's weights (int4, fp8, bf16) and report every tensor's error", cmd_quantize},
    {"inspect", "describe a converted model (config, shards, tensors)", cmd_inspect},
    {"verify", "recompute every checksum of a converted model", cmd_verify},
    {"validate", "prove parity: 'validate tensors' against the pickles, 'validate logits' against a reference",
     cmd_validate},
    {"run", "generate text from a prompt (or a batch of prompts)", cmd_run},
    {"logits", "write the logits of every position for token ids (.npy)", cmd_logits},
    {"devices", "list the CUDA devices the CUDA backend sees", cmd_devices},
    {"bench", "decode speed against the measured memory bandwidth (roofline)", cmd_bench},
    {"bench-device", "GPU benchmarks: bandwidths, one real-width layer's decode and prefill, loading", cmd_bench_device},
};

static void usage(FILE* out) {
  std::fprintf(out, "usage: grokit <command> [options]\n\ncommands:\n");
  for (const auto& c : kCommands) std::fprintf(out, "  %-12s %s\n", c.name, c.summary);
  std::fprintf(out, "\n'grokit <command> --help' lists a command's options and their defaults.\n");
}

int main(int argc, char** argv) {
  // Past a file-size limit (ulimit -f), writes must fail with EFBIG, not kill us.
  std::signal(SIGXFSZ, SIG_IGN);
  if (argc < 2) {
    usage(stderr);
    return kExitUsage;
  }
  std::string name = argv[1];
  if (name == "--help" || name == "-h" || name == "help") {
    usage(stdout);
    return kExitOk;
  }
  if (name == "--version") {
    std::printf("grokit 0.1.0\n");
    return kExitOk;
  }
  for (const auto& c : kCommands) {
    if (name == c.name) {
      std::string prog = std::string("grokit ") + c.name;
      argv[1] = prog.data();
      return c.run(argc - 1, argv + 1);
    }
  }
  std::fprintf(stderr, "grokit: unknown command '%s'\n\n", name.c_str());
  usage(stderr);
  return kExitUsage;
}
