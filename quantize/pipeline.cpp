// The quantize pipeline: read a sharded int8 model, requantize whole matrices, write a
// sharded model of any TP degree, report every tensor's error.
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <functional>
#include <nlohmann/json.hpp>
#include <thread>

#include "quantize/quantize.h"

namespace grokit::quantize {

using format::DType;
using format::IndexEntry;
using format::ShardHeader;
using format::TensorKind;
using format::TensorSpec;

const char* scheme_name(Scheme s) {
  switch (s) {
    case Scheme::kInt8: return "int8";
    case Scheme::kInt4: return "int4";
    case Scheme::kFp8: return "fp8";
    case Scheme::kBf16: return "bf16";
  }
  return "?";
}
std::optional<Scheme> parse_scheme(std::string_view n) {
  for (Scheme s : {Scheme::kInt8, Scheme::kInt4, Scheme::kFp8, Scheme::kBf16}) {
    if (n == scheme_name(s)) return s;
  }
  return std::nullopt;
}
DType scheme_dtype(Scheme s) {
  switch (s) {
    case Scheme::kInt8: return DType::kQ8RowBlock;
    case Scheme::kInt4: return DType::kQ4Group;
    case Scheme::kFp8: return DType::kF8Column;
    case Scheme::kBf16: return DType::kBF16;
  }
  return DType::kQ8RowBlock;
}

bool glob_match(std::string_view p, std::string_view s) {
  // Iterative matcher with one backtrack point for '*'.
  size_t pi = 0, si = 0, star = std::string_view::npos, mark = 0;
  while (si < s.size()) {
    if (pi < p.size() && (p[pi] == '?' || p[pi] == s[si])) {
      ++pi;
      ++si;
    } else if (pi < p.size() && p[pi] == '*') {
      star = pi++;
      mark = si;
    } else if (star != std::string_view::npos) {
      pi = star + 1;
      si = ++mark;
    } else {
      return false;
    }
  }
  while (pi < p.size() && p[pi] == '*') ++pi;
  return pi == p.size();
}

namespace {

constexpr const char* kStateDir = ".grokit-quantize";
constexpr int64_t kRowBlock = 256;       // rows of a matrix handled at a time (bounded memory)
constexpr int64_t kItemBytes = 1 << 20;  // int8 bytes per row-block item, about (see ordered())

// ---------------------------------------------------------------------------------
// One logical tensor of the input, spread over its ranks: gathers any region of it.
class InputTensor {
 public:
  struct Part {
    const format::ShardReader* shard;
    const IndexEntry* entry;
  };
  InputTensor(const TensorSpec& spec, std::vector<Part> parts) : spec_(spec), parts_(std::move(parts)) {}
  const TensorSpec& spec() const { return spec_; }

  // Rows [k0, k1) x columns [c0, c1) of expert e's int8 codes into out (row stride c1 - c0).
  void codes(int64_t e, int64_t k0, int64_t k1, int64_t c0, int64_t c1, int8_t* out) const {
    const int64_t width = c1 - c0;
    for (int64_t k = k0; k < k1; ++k) {
      for (int64_t c = c0; c < c1;) {
        const Part& p = find(k, c, /*scale=*/false);
        const IndexEntry& en = *p.entry;
        const int64_t R = en.shape[en.shape.size() - 2], C = en.shape.back();
        const int64_t r0 = row_origin(en), cstart = col_origin(en);
        const int64_t n = std::min(c1, cstart + C) - c;
        const int8_t* src = reinterpret_cast<const int8_t*>(p.shard->stored(en)) + (e * R + (k - r0)) * C + (c - cstart);
        std::memcpy(out + (k - k0) * width + (c - c0), src, static_cast<size_t>(n));
        c += n;
      }
    }
  }
  // Rows [k0, k1) x columns [c0, c1) of expert e's codes where they lie in one input
  // rank's payload: a pointer into the mapped shard and its row stride (*ld), with no
  // copy; nullptr where the region spans ranks (then codes() gathers it).
  const int8_t* codes_view(int64_t e, int64_t k0, int64_t k1, int64_t c0, int64_t c1, int64_t* ld) const {
    const Part& p = find(k0, c0, /*scale=*/false);
    const IndexEntry& en = *p.entry;
    const int64_t R = en.shape[en.shape.size() - 2], C = en.shape.back();
    const int64_t r0 = row_origin(en), cstart = col_origin(en);
    if (k1 > r0 + R || c1 > cstart + C) return nullptr;
    *ld = C;
    return reinterpret_cast<const int8_t*>(p.shard->stored(en)) + (e * R + (k0 - r0)) * C + (c0 - cstart);
  }
  // Scale row b (a global block) of expert e, columns [c0, c1), as bf16 bits.
  void scales(int64_t e, int64_t b, int64_t c0, int64_t c1, uint16_t* out) const {
    for (int64_t c = c0; c < c1;) {
      const Part& p = find(b, c, /*scale=*/true);
      const IndexEntry& en = *p.entry;
      const int64_t C = en.shape.back(), Bl = en.param, cstart = col_origin(en);
      const int64_t b0 = block_origin(en);
      const int64_t n = std::min(c1, cstart + C) - c;
      const auto* sc = reinterpret_cast<const uint16_t*>(p.shard->stored(en) + format::q8_scales_offset(en.shape));
      std::memcpy(out + (c - c0), sc + (e * Bl + (b - b0)) * C + (c - cstart), sizeof(uint16_t) * static_cast<size_t>(n));
      c += n;
    }
  }
  // Rows [r0, r1) of a plain (non-quantized) tensor, as stored (bytes per row = row_bytes).
  void plain_rows(int64_t r0, int64_t r1, uint8_t* out, uint64_t row_bytes) const {
    for (int64_t r = r0; r < r1;) {
      const Part* hit = nullptr;
      for (const auto& p : parts_) {
        const IndexEntry& en = *p.entry;
        int64_t s = en.split_axis == 0 ? en.split_start : 0, len = en.shape[0];
        if (r >= s && r < s + len) {
          hit = &p;
          break;
        }
      }
      GROKIT_CHECK_MSG(hit != nullptr, spec_.name);
      const IndexEntry& en = *hit->entry;
      int64_t s = en.split_axis == 0 ? en.split_start : 0;
      int64_t n = std::min(r1, s + en.shape[0]) - r;
      std::memcpy(out + static_cast<uint64_t>(r - r0) * row_bytes,
                  hit->shard->stored(en) + static_cast<uint64_t>(r - s) * row_bytes, static_cast<size_t>(n) * row_bytes);
      r += n;
    }
  }

 private:
  // Global row / column / block where a part's slice starts.
  int64_t row_origin(const IndexEntry& e) const {
    return e.split_axis == static_cast<int32_t>(e.shape.size()) - 2 ? e.split_start : 0;
  }
  int64_t col_origin(const IndexEntry& e) const {
    return e.split_axis == static_cast<int32_t>(e.shape.size()) - 1 ? e.split_start : 0;
  }
  int64_t block_origin(const IndexEntry& e) const {
    if (e.split_axis != static_cast<int32_t>(e.shape.size()) - 2) return 0;
    const int64_t K = e.global_shape[e.shape.size() - 2];
    return e.split_start / (K / static_cast<int64_t>(spec_.blocks));
  }
  // The part holding (row or block `k`, column c).
  const Part& find(int64_t k, int64_t c, bool scale) const {
    for (const auto& p : parts_) {
      const IndexEntry& en = *p.entry;
      const int64_t C = en.shape.back(), cs = col_origin(en);
      if (c < cs || c >= cs + C) continue;
      if (scale) {
        const int64_t b0 = block_origin(en);
        if (k >= b0 && k < b0 + static_cast<int64_t>(en.param)) return p;
      } else {
        const int64_t r0 = row_origin(en), R = en.shape[en.shape.size() - 2];
        if (k >= r0 && k < r0 + R) return p;
      }
    }
    GROKIT_CHECK_MSG(false, str_cat(spec_.name, ": no input rank holds ", scale ? "block " : "row ", k, ", column ", c));
    return parts_[0];
  }
  TensorSpec spec_;
  std::vector<Part> parts_;
};

// ---------------------------------------------------------------------------------
struct Plan {
  format::ModelConfig cfg;
  int tp = 1;
  std::vector<TensorSpec> specs;                 // logical tensors, model order
  std::vector<Scheme> schemes;                   // per spec (weights only meaningful)
  std::vector<bool> is_weight;
  std::vector<std::vector<format::ShardSlice>> slices;  // [tensor][rank]
  std::vector<ShardHeader> headers;
  std::vector<std::vector<IndexEntry>> entries;  // [rank][tensor]
  std::string scheme_desc;
  uint64_t model_id = 0;
};

std::string describe_scheme(const QuantizeOptions& o) {
  std::string s = scheme_name(o.scheme);
  if (o.scheme == Scheme::kInt4) s += str_cat("-g", o.group_size, o.search ? "" : "-rtn");
  for (const auto& ov : o.overrides) s += str_cat(" ", ov.pattern, "=", scheme_name(ov.scheme));
  return s;
}

Result<Plan> make_plan(const format::Model& in, const QuantizeOptions& o) {
  Plan p;
  p.cfg = in.config();
  p.tp = o.tp == 0 ? static_cast<int>(in.manifest().tp) : o.tp;
  GROKIT_TRY(format::check_tensor_parallel(p.cfg, p.tp));
  p.specs = format::model_tensors(p.cfg);
  p.scheme_desc = describe_scheme(o);
  p.model_id = format::compute_model_id(p.cfg, static_cast<uint32_t>(p.tp), p.scheme_desc);
  p.entries.resize(static_cast<size_t>(p.tp));
  p.headers.resize(static_cast<size_t>(p.tp));
  // A pattern that matches no weight matrix is a typo, not a no-op.
  for (const auto& ov : o.overrides) {
    bool hit = false;
    for (const auto& spec : p.specs) hit = hit || (spec.dtype == DType::kQ8RowBlock && glob_match(ov.pattern, spec.name));
    if (!hit)
      return make_error("--override '", ov.pattern, "' matches no weight matrix (names look like layer.0.attn.query, ",
                        "layer.0.moe.down; see grokit inspect)");
  }
  for (const auto& spec : p.specs) {
    const bool weight = spec.dtype == DType::kQ8RowBlock;
    Scheme sc = o.scheme;
    if (weight) {
      for (const auto& ov : o.overrides) {
        if (glob_match(ov.pattern, spec.name)) {
          sc = ov.scheme;
          break;
        }
      }
    }
    p.is_weight.push_back(weight);
    p.schemes.push_back(sc);
    TensorSpec out = spec;
    if (weight) out.dtype = scheme_dtype(sc);
    std::vector<format::ShardSlice> sl;
    const int64_t K = spec.shape.size() >= 2 ? spec.shape[spec.shape.size() - 2] : 0;
    for (int r = 0; r < p.tp; ++r) {
      format::ShardSlice s = format::shard_slice(spec, p.cfg, p.tp, r);  // q8rb rules: the blocks
      IndexEntry e;
      e.name = spec.name;
      e.dtype = out.dtype;
      e.shape = s.shape;
      e.global_shape = spec.shape;
      e.split_axis = s.axis;
      e.split_start = s.axis < 0 ? 0 : s.start;
      if (weight) {
        const bool row_split = s.axis == static_cast<int32_t>(spec.shape.size()) - 2;
        const int64_t rows = s.shape[s.shape.size() - 2];
        switch (sc) {
          case Scheme::kInt8: e.param = s.blocks; break;
          case Scheme::kInt4:
            e.param = static_cast<uint32_t>(o.group_size);
            if (K % 32 != 0 || rows % o.group_size != 0) {
              std::string fits;
              for (int64_t g : {32, 64, 128}) {
                if (K % 32 == 0 && rows % g == 0) fits += str_cat(fits.empty() ? "" : " or ", g);
              }
              const std::string advice =
                  fits.empty() ? str_cat("no group size does; keep it in another scheme, e.g. --override '", spec.name,
                                         "=int8'", row_split && p.tp > 1 ? ", or choose a smaller TP degree" : "")
                               : str_cat("choose --group-size ", fits, row_split && p.tp > 1 ? ", or a smaller TP degree" : "");
              return make_error(spec.name, ": ", row_split && p.tp > 1 ? str_cat("each of the ", p.tp, " ranks holds ") : std::string(),
                                rows, " rows, which int4 groups of ", o.group_size, " rows do not divide (", advice, ")");
            }
            break;
          case Scheme::kFp8:
            if (K % 32 != 0 || rows % 32 != 0)
              return make_error(spec.name, ": ", rows,
                                " rows per rank are not a multiple of 32, as fp8's 32-row chunks need (keep it in "
                                "another scheme, e.g. --override '", spec.name, "=int8'",
                                row_split && p.tp > 1 ? ", or choose a smaller TP degree)" : ")");
            break;
          case Scheme::kBf16: break;
        }
      }
      auto size = format::payload_size(e.dtype, e.shape, e.param);
      GROKIT_CHECK_MSG(size.has_value(), spec.name);
      e.size = e.stored_size = *size;
      p.entries[static_cast<size_t>(r)].push_back(std::move(e));
      sl.push_back(std::move(s));
    }
    p.slices.push_back(std::move(sl));
  }
  for (int r = 0; r < p.tp; ++r) {
    ShardHeader& h = p.headers[static_cast<size_t>(r)];
    h.rank = static_cast<uint32_t>(r);
    h.rank_count = static_cast<uint32_t>(p.tp);
    h.model_id = p.model_id;
    format::layout_shard(p.entries[static_cast<size_t>(r)], h);
  }
  return p;
}

// ---------------------------------------------------------------------------------
class Quantizer {
 public:
  explicit Quantizer(const QuantizeOptions& o) : o_(o) {}
  Result<QuantizeReport> run();

 private:
  Status prepare_output();
  Status remove_state_dir();
  // One item's output: payload bytes, their error stats, and the input bytes they cover.
  struct ItemOut {
    // Aligned, so that with direct I/O a payload of whole blocks goes to disk from here.
    std::vector<uint8_t, AlignedAllocator<uint8_t, OutputFile::kDirectIoAlign>> bytes;
    ErrorStats stats;
    uint64_t input_bytes = 0;
  };
  Status process(size_t t, uint8_t* staging, size_t staging_bytes);
  Status ordered(size_t n, size_t item_bytes, const std::function<void(size_t, ItemOut&)>& compute,
                 format::PayloadWriter& w, ErrorStats& st);
  void parallel_items(size_t n, const std::function<void(size_t)>& fn) { pool_->run(n, fn); }
  Status write_weight(size_t t, size_t r, format::PayloadWriter& w, ErrorStats& st);
  Status write_plain(size_t t, size_t r, format::PayloadWriter& w);

  const QuantizeOptions& o_;
  std::optional<format::Model> in_;
  std::string tokenizer_;  // the input's tokenizer bytes, checked against its manifest
  std::vector<format::ShardReader> in_shards_;
  std::vector<InputTensor> inputs_;
  Plan plan_;
  std::string state_dir_;
  std::vector<OutputFile> files_;
  std::vector<std::vector<uint64_t>> sums_;  // [rank][tensor]
  QuantizeReport report_;
  std::unique_ptr<Progress> progress_;
  std::unique_ptr<ThreadPool> pool_;
  std::vector<ItemOut> slots_;       // ordered()'s item outputs
  std::vector<uint8_t> plain_rows_;  // write_plain()'s buffer
};

// A per-thread scratch buffer (slot 0..2) of at least n elements of T.
template <class T>
T* scratch(int slot, size_t n) {
  thread_local std::vector<T> buffers[3];
  std::vector<T>& b = buffers[slot];
  if (b.size() < n) b.resize(n);
  return b.data();
}

Status Quantizer::remove_state_dir() { return remove_directory_files(state_dir_); }

Status Quantizer::prepare_output() {
  const std::string& out = o_.out_dir;
  if (!path_exists(out)) {
    if (!is_directory(path_dirname(out))) return make_error(path_dirname(out), ": the parent of the output directory does not exist");
    return o_.dry_run ? Status{} : make_directory(out);
  }
  if (!is_directory(out)) return make_error(out, ": exists and is not a directory");
  const std::vector<std::string> names = list_directory(out);
  if (names.empty()) return {};
  if (!o_.force) {
    if (std::find(names.begin(), names.end(), kStateDir) != names.end())
      return make_error(out, ": holds an interrupted quantization (", kStateDir, "); pass --force to start over");
    return make_error(out, ": not empty; refusing to overwrite it (pass --force to replace a grokit model there)");
  }
  for (const auto& n : names) {
    bool mine = n == format::kManifestFile || n == format::kTokenizerFile || n == kStateDir ||
                format::is_shard_file_name(n);
    if (!mine) return make_error(out, ": holds '", n, "', which is not part of a grokit model; choose another directory");
  }
  if (o_.dry_run) return {};
  for (const auto& n : names) {
    if (n != kStateDir) GROKIT_TRY(remove_file(path_join(out, n)));
  }
  return remove_state_dir();
}

// Items [0, n) of one payload: compute(i, out) runs on the pool, and the items' bytes are
// appended (and their stats merged) in item order (run_in_order), so the payload, its
// checksum and the report do not depend on the thread count. A barrier per window of
// items, as before, left a core idle for about one item per window.
Status Quantizer::ordered(size_t n, size_t item_bytes, const std::function<void(size_t, ItemOut&)>& compute,
                          format::PayloadWriter& w, ErrorStats& st) {
  const size_t threads = std::max(1u, o_.threads);
  const size_t slots = std::clamp<size_t>((256u << 20) / std::max<size_t>(item_bytes, 1), 2 * threads, 8 * threads);
  // The slots live as long as the run: their buffers are reused, tensor after tensor.
  if (slots_.size() < slots) slots_.resize(slots);
  return run_in_order(
      *pool_, n, slots,
      [&](size_t i, size_t slot) {
        ItemOut& o = slots_[slot];
        o.bytes.clear();
        o.stats = ErrorStats{};
        o.input_bytes = 0;
        compute(i, o);
      },
      [&](size_t, size_t slot) -> Status {
        const ItemOut& o = slots_[slot];
        GROKIT_TRY(w.append(o.bytes.data(), o.bytes.size()));
        st.merge(o.stats);
        progress_->add(o.input_bytes);
        return {};
      });
}

// A weight matrix's payload for output rank r, in the order its layout stores it.
Status Quantizer::write_weight(size_t t, size_t r, format::PayloadWriter& w, ErrorStats& st) {
  const InputTensor& in = inputs_[t];
  const TensorSpec& spec = plan_.specs[t];
  const IndexEntry& en = plan_.entries[r][t];
  const format::ShardSlice& sl = plan_.slices[t][r];
  const size_t nd = spec.shape.size();
  const int64_t E = nd == 3 ? spec.shape[0] : 1, K = spec.shape[nd - 2], N = spec.shape[nd - 1];
  const int64_t B = spec.blocks;
  const bool row_split = sl.axis == static_cast<int32_t>(nd) - 2, col_split = sl.axis == static_cast<int32_t>(nd) - 1;
  const int64_t k_begin = row_split ? sl.start : 0, k_end = row_split ? sl.start + sl.length : K;
  const int64_t c0 = col_split ? sl.start : 0, c1 = col_split ? sl.start + sl.length : N, width = c1 - c0;
  const int64_t rows = k_end - k_begin;
  const Scheme sc = plan_.schemes[t];
  // Expert e's scale rows for columns [a, b) into a per-thread buffer, row stride b - a
  // (Int8Source::scales_ld).
  auto expert_scales = [&](int64_t e, int64_t a, int64_t b) {
    uint16_t* p = scratch<uint16_t>(1, static_cast<size_t>(B * (b - a)));
    for (int64_t bl = 0; bl < B; ++bl) in.scales(e, bl, a, b, p + bl * (b - a));
    return p;
  };
  // Rows [k0, k1) x columns [a, b) of expert e's codes, row stride *ld: in place in the
  // mapped input where one rank holds them all (the usual case), else gathered into
  // per-thread scratch.
  auto codes_of = [&](int64_t e, int64_t k0, int64_t k1, int64_t a, int64_t b, int64_t* ld) -> const int8_t* {
    if (const int8_t* view = in.codes_view(e, k0, k1, a, b, ld)) return view;
    int8_t* buf = scratch<int8_t>(0, static_cast<size_t>((k1 - k0) * (b - a)));
    in.codes(e, k0, k1, a, b, buf);
    *ld = b - a;
    return buf;
  };
  auto source = [&](int64_t e, int64_t k0, int64_t k1) {
    int64_t ld = 0;
    const int8_t* codes = codes_of(e, k0, k1, c0, c1, &ld);
    return Int8Source{codes, expert_scales(e, c0, c1), k1 - k0, width, ld, B, k0, K, width};
  };
  // Items of the rank's rows, expert after expert: 32 to 256 rows (a multiple of 32, as
  // f8col needs), about kItemBytes of codes, so that many threads' windows stay small.
  const int64_t item_rows = std::clamp<int64_t>(kItemBytes / std::max<int64_t>(width, 1) / 32 * 32, 32, kRowBlock);
  const int64_t blocks_per_expert = (rows + item_rows - 1) / item_rows;
  auto row_block = [&](size_t i, int64_t* e, int64_t* k0, int64_t* k1) {
    *e = static_cast<int64_t>(i) / blocks_per_expert;
    *k0 = k_begin + (static_cast<int64_t>(i) % blocks_per_expert) * item_rows;
    *k1 = std::min(k_end, *k0 + item_rows);
  };
  const size_t row_items = static_cast<size_t>(E * blocks_per_expert);
  switch (sc) {
    case Scheme::kInt8: {
      // The release's codes and scales, bit for bit: codes of every expert, pad, scales.
      GROKIT_TRY(ordered(
          row_items, static_cast<size_t>(item_rows * width),
          [&](size_t i, ItemOut& o) {
            int64_t e, k0, k1;
            row_block(i, &e, &k0, &k1);
            o.bytes.resize(static_cast<size_t>((k1 - k0) * width));
            in.codes(e, k0, k1, c0, c1, reinterpret_cast<int8_t*>(o.bytes.data()));
            o.input_bytes = o.bytes.size();
          },
          w, st));
      GROKIT_TRY(w.zeros(format::q8_scales_offset(en.shape) - w.written()));
      std::vector<uint16_t> scales(static_cast<size_t>(width));
      for (int64_t e = 0; e < E; ++e) {
        for (uint32_t b = 0; b < sl.blocks; ++b) {
          in.scales(e, sl.block_start + b, c0, c1, scales.data());
          GROKIT_TRY(w.append(scales.data(), sizeof(uint16_t) * static_cast<size_t>(width)));
        }
      }
      return {};
    }
    case Scheme::kInt4: {
      // One item per group of rows (plan_ checked that G divides the rank's rows).
      const int64_t G = o_.group_size, groups = rows / G;
      const size_t gbytes = format::q4g_group_bytes(G, width);
      return ordered(
          static_cast<size_t>(E * groups), gbytes,
          [&](size_t i, ItemOut& o) {
            const int64_t e = static_cast<int64_t>(i) / groups, k0 = k_begin + (static_cast<int64_t>(i) % groups) * G;
            const Int8Source s = source(e, k0, k0 + G);
            o.bytes.resize(gbytes);
            quantize_q4g(s, G, o_.search, o.bytes.data(), &o.stats);
            o.input_bytes = static_cast<uint64_t>(G * width);
          },
          w, st);
    }
    case Scheme::kFp8: {
      // Column scales over all K rows of each expert (every rank of a row split holds the
      // same ones), one item per expert and window of columns.
      constexpr int64_t kColumns = 1024;
      const int64_t windows = (width + kColumns - 1) / kColumns;
      std::vector<uint16_t> col_scales(static_cast<size_t>(E * width));
      parallel_items(static_cast<size_t>(E * windows), [&](size_t i) {
        const int64_t e = static_cast<int64_t>(i) / windows, a = c0 + (static_cast<int64_t>(i) % windows) * kColumns;
        const int64_t b = std::min(c1, a + kColumns);
        float* absmax = scratch<float>(2, static_cast<size_t>(b - a));
        std::fill(absmax, absmax + (b - a), 0.0f);
        const uint16_t* scales = expert_scales(e, a, b);
        for (int64_t k0 = 0; k0 < K; k0 += kRowBlock) {
          const int64_t k1 = std::min(K, k0 + kRowBlock);
          int64_t ld = 0;
          const int8_t* codes = codes_of(e, k0, k1, a, b, &ld);
          column_absmax(Int8Source{codes, scales, k1 - k0, b - a, ld, B, k0, K, b - a}, absmax);
        }
        f8_column_scales(absmax, b - a, col_scales.data() + e * width + (a - c0));
      });
      const size_t tail = format::f8col_matrix_bytes(32, width) - static_cast<size_t>(32 * width);
      return ordered(
          row_items, static_cast<size_t>(item_rows * width),
          [&](size_t i, ItemOut& o) {
            int64_t e, k0, k1;
            row_block(i, &e, &k0, &k1);
            const size_t code_bytes = static_cast<size_t>((k1 - k0) * width);
            o.bytes.resize(code_bytes + tail);
            const Int8Source s = source(e, k0, k1);
            quantize_f8col(s, col_scales.data() + e * width, o.bytes.data(), &o.stats);
            // The codes; the column scales (with their padding) follow the expert's last block.
            if (k1 != k_end) o.bytes.resize(code_bytes);
            o.input_bytes = code_bytes;
          },
          w, st);
    }
    case Scheme::kBf16: {
      return ordered(
          row_items, static_cast<size_t>(2 * item_rows * width),
          [&](size_t i, ItemOut& o) {
            int64_t e, k0, k1;
            row_block(i, &e, &k0, &k1);
            o.bytes.resize(static_cast<size_t>(2 * (k1 - k0) * width));
            const Int8Source s = source(e, k0, k1);
            dequantize_bf16(s, reinterpret_cast<uint16_t*>(o.bytes.data()), &o.stats);
            o.input_bytes = static_cast<uint64_t>((k1 - k0) * width);
          },
          w, st);
    }
  }
  return {};
}

// Norms, router, embedding: the input's values, resliced for the output's ranks.
Status Quantizer::write_plain(size_t t, size_t r, format::PayloadWriter& w) {
  const InputTensor& in = inputs_[t];
  const TensorSpec& spec = plan_.specs[t];
  const format::ShardSlice& sl = plan_.slices[t][r];
  const uint64_t elem = spec.dtype == DType::kBF16 ? 2 : 4;
  uint64_t row_bytes = elem;
  for (size_t d = 1; d < spec.shape.size(); ++d) row_bytes *= static_cast<uint64_t>(spec.shape[d]);
  const int64_t r0 = sl.axis == 0 ? sl.start : 0, r1 = sl.axis == 0 ? sl.start + sl.length : spec.shape[0];
  const int64_t step = std::max<int64_t>(1, static_cast<int64_t>((8u << 20) / row_bytes));
  std::vector<uint8_t>& buf = plain_rows_;
  buf.resize(std::max(buf.size(), static_cast<size_t>(std::min(step, r1 - r0)) * row_bytes));
  for (int64_t a = r0; a < r1; a += step) {
    int64_t b = std::min(r1, a + step);
    in.plain_rows(a, b, buf.data(), row_bytes);
    GROKIT_TRY(w.append(buf.data(), static_cast<size_t>(b - a) * row_bytes));
  }
  return {};
}

Status Quantizer::process(size_t t, uint8_t* staging, size_t staging_bytes) {
  TensorReport& rep = report_.tensors[t];
  for (size_t r = 0; r < plan_.entries.size(); ++r) {
    const IndexEntry& en = plan_.entries[r][t];
    format::PayloadWriter w(&files_[r], plan_.headers[r].data_offset + en.offset, staging, staging_bytes);
    ErrorStats st;
    if (plan_.is_weight[t]) GROKIT_TRY(write_weight(t, r, w, st));
    else GROKIT_TRY(write_plain(t, r, w));
    GROKIT_TRY(w.flush());
    GROKIT_CHECK_MSG(w.written() == en.size, str_cat(en.name, ": wrote ", w.written(), " of ", en.size, " bytes"));
    sums_[r][t] = w.digest();
    rep.bytes_out += en.size;
    // Every rank sees its own slice of the matrix; a row split sees each element once,
    // a column split too, a replicated kv head twice: count the first rank's share of
    // each region only once by keeping the stats of the ranks that hold new elements.
    const format::ShardSlice& sl = plan_.slices[t][r];
    bool duplicate = false;
    for (size_t q = 0; q < r && sl.axis >= 0; ++q) {
      const auto& o = plan_.slices[t][q];
      duplicate = duplicate || (o.axis == sl.axis && o.start == sl.start);
    }
    if (sl.axis < 0 && r > 0) duplicate = true;
    if (!duplicate) rep.stats.merge(st);
  }
  return {};
}

Result<QuantizeReport> Quantizer::run() {
  auto t0 = std::chrono::steady_clock::now();
  GROKIT_ASSIGN_OR_RETURN(format::Model model, format::Model::open(o_.in_dir));
  in_.emplace(std::move(model));
  const auto& m = in_->manifest();
  // --force clears the output directory first: never the input itself (or a link to it).
  if (same_file(o_.out_dir, o_.in_dir))
    return make_error(o_.out_dir, ": is the input model's own directory; write the requantized model to another one");
  if (m.scheme != "int8")
    return make_error(o_.in_dir, ": its weights are already requantized (scheme '", m.scheme,
                      "'); quantize the int8 model that convert wrote");
  // Every input is read and checked before the output is touched.
  if (m.tokenizer) {
    const std::string p = path_join(o_.in_dir, m.tokenizer->name);
    GROKIT_ASSIGN_OR_RETURN(tokenizer_, read_small_file(p, 256u << 20));
    if (tokenizer_.size() != m.tokenizer->size || xxh3_64(tokenizer_.data(), tokenizer_.size()) != m.tokenizer->xxh3)
      return make_error(p, ": does not match the checksum its manifest records (", tokenizer_.size(), " bytes)");
  }
  if (o_.scheme == Scheme::kInt4 && o_.group_size != 32 && o_.group_size != 64 && o_.group_size != 128)
    return make_error("--group-size must be 32, 64 or 128 (got ", o_.group_size, ")");
  GROKIT_ASSIGN_OR_RETURN(plan_, make_plan(*in_, o_));
  for (uint32_t r = 0; r < m.tp; ++r) {
    GROKIT_ASSIGN_OR_RETURN(format::ShardReader s, in_->open_shard(r));
    in_shards_.push_back(std::move(s));
  }
  for (const auto& spec : plan_.specs) {
    std::vector<InputTensor::Part> parts;
    for (const auto& s : in_shards_) {
      const IndexEntry* e = s.find(spec.name);
      if (e == nullptr) return make_error(s.path(), ": tensor '", spec.name, "' is missing");
      if (e->compression != 0) return make_error(s.path(), ": tensor '", spec.name, "' is compressed; quantize an uncompressed model");
      parts.push_back({&s, e});
    }
    inputs_.emplace_back(spec, std::move(parts));
  }
  report_.scheme = plan_.scheme_desc;
  report_.tp = plan_.tp;
  for (size_t t = 0; t < plan_.specs.size(); ++t) {
    TensorReport tr;
    tr.name = plan_.specs[t].name;
    tr.kind = format::tensor_kind_name(plan_.specs[t].kind);
    tr.shape = plan_.specs[t].shape;
    tr.quantized = plan_.is_weight[t] && plan_.schemes[t] != Scheme::kInt8;
    tr.scheme = plan_.is_weight[t] ? scheme_name(plan_.schemes[t]) : format::dtype_name(plan_.specs[t].dtype);
    for (const auto& s : in_shards_) tr.bytes_in += s.find(tr.name)->size;
    report_.bytes_in += tr.bytes_in;
    report_.tensors.push_back(std::move(tr));
  }
  if (o_.dry_run) return report_;

  state_dir_ = path_join(o_.out_dir, kStateDir);
  GROKIT_TRY(prepare_output());
  GROKIT_TRY(make_directory(state_dir_));
  uint64_t need = 0;
  for (const auto& h : plan_.headers) need += h.file_size;
  GROKIT_ASSIGN_OR_RETURN(uint64_t free, free_disk_bytes(o_.out_dir));
  if (free < need)
    return make_error(o_.out_dir, ": not enough free space: needs ", human_bytes(static_cast<double>(need)), ", ",
                      human_bytes(static_cast<double>(free)), " available");
  files_.resize(plan_.headers.size());
  sums_.assign(plan_.headers.size(), std::vector<uint64_t>(plan_.specs.size()));
  std::vector<std::string> partial(plan_.headers.size());
  for (size_t r = 0; r < files_.size(); ++r) {
    partial[r] = path_join(state_dir_, format::shard_file_name(static_cast<uint32_t>(r), static_cast<uint32_t>(plan_.tp)));
    GROKIT_ASSIGN_OR_RETURN(files_[r], OutputFile::open(partial[r], OutputFile::Mode::kCreateOrTruncate));
    if (o_.direct_io) files_[r].enable_direct_io();
    GROKIT_TRY(files_[r].reserve(plan_.headers[r].file_size));
  }

  uint64_t work = 0;
  for (size_t t = 0; t < plan_.specs.size(); ++t) {
    if (!plan_.is_weight[t]) continue;
    uint64_t n = 1;
    for (int64_t d : plan_.specs[t].shape) n *= static_cast<uint64_t>(d);
    work += n * static_cast<uint64_t>(plan_.tp);  // every rank's share is processed
  }
  progress_ = std::make_unique<Progress>("quantize", work, o_.progress);
  std::atomic<uint64_t> peak{rss_anon_bytes()};
  std::atomic<bool> sampling{true};
  std::thread sampler([&] {
    while (sampling.load()) {
      peak.store(std::max(peak.load(), rss_anon_bytes()));
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
  });
  // Tensors one after another, each spread over the pool (ordered()), so that a model
  // of a few large matrices keeps every thread busy.
  // With direct I/O the task that writes mostly waits on the disk: one more thread keeps
  // every core computing meanwhile.
  bool direct = !files_.empty();
  for (const auto& f : files_) direct = direct && f.direct_io();
  pool_ = std::make_unique<ThreadPool>(std::max(1u, o_.threads) + (direct ? 1 : 0));
  std::optional<Error> first;
  {
    // Aligned for direct I/O (PayloadWriter).
    constexpr size_t kStaging = 8u << 20;
    AlignedBuffer staging(kStaging, OutputFile::kDirectIoAlign);
    for (size_t t = 0; t < plan_.specs.size() && !first; ++t) {
      Status s = process(t, staging.data(), staging.size());
      if (!s.ok()) first = s.take_error();
    }
  }
  pool_.reset();
  progress_->finish();
  sampling.store(false);
  sampler.join();
  report_.peak_rss_anon = peak.load();
  if (first) return *first;

  for (size_t r = 0; r < files_.size(); ++r) {
    auto& entries = plan_.entries[r];
    for (size_t t = 0; t < entries.size(); ++t) entries[t].xxh3 = sums_[r][t];
    GROKIT_TRY(format::write_shard_tail(files_[r], plan_.headers[r], entries));
    GROKIT_TRY(files_[r].close());
    GROKIT_TRY(rename_file(partial[r], path_join(o_.out_dir, path_basename(partial[r]))));
    report_.bytes_out += plan_.headers[r].file_size;
  }
  GROKIT_TRY(fsync_directory(o_.out_dir));
  format::Manifest out;
  out.config = plan_.cfg;
  out.tp = static_cast<uint32_t>(plan_.tp);
  out.tensor_count = plan_.specs.size();
  out.model_id = plan_.model_id;
  out.scheme = plan_.scheme_desc;
  out.producer = "grokit quantize 0.1.0";
  out.config_source = m.config_source;
  out.source = m.source;
  out.source_files = m.source_files;
  for (size_t r = 0; r < plan_.headers.size(); ++r)
    out.shards.push_back({format::shard_file_name(static_cast<uint32_t>(r), static_cast<uint32_t>(plan_.tp)),
                          static_cast<uint32_t>(r), plan_.headers[r].file_size, plan_.entries[r].size(),
                          plan_.headers[r].index_xxh3});
  if (m.tokenizer) {
    GROKIT_TRY(write_file_atomic(path_join(o_.out_dir, format::kTokenizerFile), tokenizer_));
    out.tokenizer = *m.tokenizer;
  }
  GROKIT_TRY(write_file_atomic(path_join(o_.out_dir, format::kManifestFile), out.to_json()));
  GROKIT_TRY(remove_state_dir());
  GROKIT_TRY(fsync_directory(o_.out_dir));

  // Flag the tensors well above the median error of their kind.
  std::map<std::string, std::vector<double>> by_kind;
  for (const auto& t : report_.tensors) {
    if (t.quantized) by_kind[t.kind].push_back(t.stats.relative_rmse());
  }
  for (auto& t : report_.tensors) {
    if (!t.quantized) continue;
    auto v = by_kind[t.kind];
    std::sort(v.begin(), v.end());
    double median = v[v.size() / 2];
    t.flagged = t.stats.relative_rmse() > 1.5 * median;
  }
  report_.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return report_;
}

std::string shape_text(const std::vector<int64_t>& s) {
  std::string r = "[";
  for (size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
  return r + "]";
}

}  // namespace

Result<QuantizeReport> quantize_model(const QuantizeOptions& options) {
  Quantizer q(options);
  return q.run();
}

std::string report_table(const QuantizeReport& r) {
  std::string out = str_cat("scheme ", r.scheme, ", TP ", r.tp, "\n");
  char line[512];
  std::snprintf(line, sizeof line, "%-24s %-6s %-18s %10s %10s %9s %9s %8s %9s %8s %5s\n", "tensor", "scheme", "shape",
                "bytes in", "bytes out", "rel.RMSE", "RTN", "cosine", "max/step", "clipped", "nan");
  out += line;
  for (const auto& t : r.tensors) {
    if (!t.quantized) continue;
    const ErrorStats& s = t.stats;
    std::string rtn = t.scheme == "int4" ? str_cat(s.rtn_relative_rmse()) : std::string("-");
    char rtn_buf[32];
    if (t.scheme == "int4") std::snprintf(rtn_buf, sizeof rtn_buf, "%.5f", s.rtn_relative_rmse());
    else std::snprintf(rtn_buf, sizeof rtn_buf, "-");
    std::snprintf(line, sizeof line, "%-24s %-6s %-18s %10llu %10llu %9.5f %9s %8.6f %9.3f %8.2e %5llu%s\n",
                  t.name.c_str(), t.scheme.c_str(), shape_text(t.shape).c_str(),
                  static_cast<unsigned long long>(t.bytes_in), static_cast<unsigned long long>(t.bytes_out),
                  s.relative_rmse(), rtn_buf, s.cosine(), s.max_error_steps(), s.clipped_fraction(),
                  static_cast<unsigned long long>(s.nonfinite()), t.flagged ? "  FLAGGED" : "");
    out += line;
  }
  return out;
}

std::string report_json(const QuantizeReport& r) {
  nlohmann::ordered_json j;
  j["scheme"] = r.scheme;
  j["tensor_parallel"] = r.tp;
  j["bytes_in"] = r.bytes_in;
  j["bytes_out"] = r.bytes_out;
  j["seconds"] = r.seconds;
  auto arr = nlohmann::ordered_json::array();
  for (const auto& t : r.tensors) {
    nlohmann::ordered_json o;
    o["name"] = t.name;
    o["kind"] = t.kind;
    o["scheme"] = t.scheme;
    o["shape"] = t.shape;
    o["quantized"] = t.quantized;
    o["bytes_in"] = t.bytes_in;
    o["bytes_out"] = t.bytes_out;
    if (t.quantized) {
      const ErrorStats& s = t.stats;
      o["relative_rmse"] = s.relative_rmse();
      if (t.scheme == "int4") {
        o["rtn_relative_rmse"] = s.rtn_relative_rmse();
        o["search_gain"] = s.rtn_relative_rmse() > 0 ? 1.0 - s.relative_rmse() / s.rtn_relative_rmse() : 0.0;
      }
      o["cosine"] = s.cosine();
      o["max_error_steps"] = s.max_error_steps();
      o["clipped_fraction"] = s.clipped_fraction();
      o["nonfinite"] = s.nonfinite();
      o["flagged"] = t.flagged;
    }
    arr.push_back(o);
  }
  j["tensors"] = arr;
  return j.dump(2) + "\n";
}

}  // namespace grokit::quantize
