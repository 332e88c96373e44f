// The grokit command line: a thin front over the libraries. Each command parses its
// flags, calls one library function and prints: payload on stdout, progress and a
// one-line summary on stderr. Exit codes: 0 success, 1 failure, 2 bad usage.
#pragma once

#include <cxxopts.hpp>

#include <cstdio>

#include <optional>
#include <string>
#include <vector>

#include "runner/runner.h"

namespace grokit::cli {

struct Command {
  const char* name;
  const char* summary;
  int (*run)(int argc, char** argv);  // argv[0] is "grokit <name>"
};

int cmd_convert(int argc, char** argv);
int cmd_inspect(int argc, char** argv);
int cmd_verify(int argc, char** argv);
int cmd_validate(int argc, char** argv);
int cmd_devices(int argc, char** argv);
int cmd_run(int argc, char** argv);
int cmd_logits(int argc, char** argv);
int cmd_bench(int argc, char** argv);
int cmd_quantize(int argc, char** argv);
int cmd_bench_device(int argc, char** argv);

// Every command's parsing: adds --help and the positional arguments, parses; a bad flag
// or a count of positionals outside [min_pos, max_pos] prints the message and the help on
// stderr, --help prints the help on stdout. Returns the exit code to end with, or nullopt
// to go on.
struct ParsedArgs {
  cxxopts::ParseResult result;
  std::vector<std::string> positional;
};
std::optional<int> parse_args(cxxopts::Options& opts, int argc, char** argv, size_t min_pos, size_t max_pos,
                              ParsedArgs& out);

// The ops' times of Engine::profile as a table: each op's time divided by `per` (1: the
// totals; the step count: a mean step), its share, and for the weight products the GB/s.
void print_profile(std::FILE* f, const std::vector<runner::OpProfile>& prof, double per, const char* unit);

// Host memory read bandwidth in bytes/s: `threads` threads summing a `bytes` buffer.
double measure_read_bandwidth(unsigned threads, uint64_t bytes);

inline constexpr int kExitOk = 0;
inline constexpr int kExitFailure = 1;
inline constexpr int kExitUsage = 2;

}  // namespace grokit::cli
