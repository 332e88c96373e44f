#include "validate/validate.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <limits>
#include <mutex>

#include "common/npy.h"
#include "convert/convert.h"

namespace grokit::validate {

using format::DType;
using format::IndexEntry;

namespace {
double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}
}  // namespace

Result<VerifyReport> verify_model(const std::string& model_dir, unsigned threads, bool progress) {
  auto t0 = std::chrono::steady_clock::now();
  GROKIT_ASSIGN_OR_RETURN(format::Model model, format::Model::open(model_dir));
  const auto& m = model.manifest();
  VerifyReport rep;
  std::vector<format::ShardReader> shards;
  for (uint32_t r = 0; r < m.tp; ++r) {
    GROKIT_ASSIGN_OR_RETURN(format::ShardReader s, model.open_shard(r));
    if (auto p = s.verify_padding(); !p.ok()) rep.bad.push_back({"(padding)", r, p.error().message});
    shards.push_back(std::move(s));
  }
  if (m.tokenizer) {
    std::string p = path_join(model_dir, m.tokenizer->name);
    GROKIT_ASSIGN_OR_RETURN(std::string bytes, read_small_file(p, 256u << 20));
    if (xxh3_64(bytes.data(), bytes.size()) != m.tokenizer->xxh3)
      rep.bad.push_back({m.tokenizer->name, 0, p + ": tokenizer checksum mismatch"});
  }
  // Biggest tensors first so the threads finish together.
  std::vector<std::pair<uint32_t, const IndexEntry*>> work;
  uint64_t total = 0;
  for (uint32_t r = 0; r < m.tp; ++r) {
    for (const auto& e : shards[r].entries()) {
      work.emplace_back(r, &e);
      total += e.stored_size;
    }
  }
  std::stable_sort(work.begin(), work.end(), [](auto& a, auto& b) { return a.second->stored_size > b.second->stored_size; });
  Progress prog("verify", total, progress);
  std::mutex mu;
  parallel_for(work.size(), threads, [&](size_t k) {
    auto [r, e] = work[k];
    Status s = shards[r].verify(*e);
    prog.add(e->stored_size);
    if (!s.ok()) {
      std::lock_guard<std::mutex> lock(mu);
      rep.bad.push_back({e->name, r, s.error().message});
    }
  });
  prog.finish();
  rep.tensors_checked = work.size();
  rep.bytes_checked = total;
  rep.seconds = seconds_since(t0);
  std::sort(rep.bad.begin(), rep.bad.end(), [](auto& a, auto& b) { return std::tie(a.rank, a.tensor) < std::tie(b.rank, b.tensor); });
  return rep;
}

namespace {

// Compares a local slice (stored contiguously) with the matching region of a source
// array, one innermost run at a time. `expect(src_element_ptr)` -> the stored value's
// bytes; mismatches are counted and the first one located.
struct Mismatch {
  uint64_t count = 0;
  uint64_t first = 0;  // flat index into the local slice
};

template <class StoredT, class Convert>
Mismatch compare_slice(const uint8_t* src, size_t src_elem, const std::vector<int64_t>& src_shape,
                       const uint8_t* stored, const std::vector<int64_t>& local_shape, int32_t axis, int64_t start,
                       Convert convert) {
  Mismatch mm;
  const size_t n = local_shape.size();
  const int64_t run = local_shape[n - 1];
  uint64_t rows = 1;
  for (size_t d = 0; d + 1 < n; ++d) rows *= static_cast<uint64_t>(local_shape[d]);
  std::vector<int64_t> idx(n, 0);
  const auto* out = reinterpret_cast<const StoredT*>(stored);
  for (uint64_t row = 0; row < rows; ++row) {
    // Decompose the row number into a local multi-index, then map it to the source.
    uint64_t rem = row;
    for (size_t d = n - 1; d-- > 0;) {
      idx[d] = static_cast<int64_t>(rem % static_cast<uint64_t>(local_shape[d]));
      rem /= static_cast<uint64_t>(local_shape[d]);
    }
    uint64_t src_off = 0;
    for (size_t d = 0; d + 1 < n; ++d) {
      int64_t g = idx[d] + (static_cast<int32_t>(d) == axis ? start : 0);
      src_off = src_off * static_cast<uint64_t>(src_shape[d]) + static_cast<uint64_t>(g);
    }
    src_off = src_off * static_cast<uint64_t>(src_shape[n - 1]) + (axis == static_cast<int32_t>(n - 1) ? static_cast<uint64_t>(start) : 0);
    const uint8_t* s = src + src_off * src_elem;
    const StoredT* o = out + row * static_cast<uint64_t>(run);
    // Bit-identical copies: compare the run at once, element by element only on a difference.
    if (sizeof(StoredT) == src_elem && std::memcmp(s, o, static_cast<size_t>(run) * src_elem) == 0) continue;
    for (int64_t k = 0; k < run; ++k) {
      if (convert(s + static_cast<uint64_t>(k) * src_elem) != o[k]) {
        if (mm.count++ == 0) mm.first = row * static_cast<uint64_t>(run) + static_cast<uint64_t>(k);
      }
    }
  }
  return mm;
}

std::string index_text(uint64_t flat, const std::vector<int64_t>& shape) {
  std::vector<int64_t> idx(shape.size());
  for (size_t d = shape.size(); d-- > 0;) {
    idx[d] = static_cast<int64_t>(flat % static_cast<uint64_t>(shape[d]));
    flat /= static_cast<uint64_t>(shape[d]);
  }
  std::string s = "[";
  for (size_t d = 0; d < idx.size(); ++d) s += (d ? ", " : "") + std::to_string(idx[d]);
  return s + "]";
}

Status check_entry(const convert::ReleaseTensor& src, const IndexEntry& e, const uint8_t* stored, uint64_t* elements) {
  auto report = [&](const char* part, const Mismatch& mm, const std::vector<int64_t>& shape) -> Status {
    if (mm.count == 0) return {};
    return make_error(part, ": ", mm.count, " elements differ from the source; first at local index ",
                      index_text(mm.first, shape));
  };
  if (e.dtype == DType::kQ8RowBlock) {
    if (!src.quantized) return make_error("stored as int8 with scales but the source is a plain array");
    const size_t n = e.shape.size();
    auto same_i8 = [](const uint8_t* p) { return static_cast<int8_t>(*p); };
    GROKIT_TRY(report("codes", compare_slice<int8_t>(src.weight.data, 1, src.weight.shape, stored, e.shape, e.split_axis,
                                                     e.split_start, same_i8), e.shape));
    uint64_t codes = 1;
    for (int64_t d : e.shape) codes *= static_cast<uint64_t>(d);
    uint64_t scales_at = format::q8_scales_offset(e.shape);
    for (uint64_t k = codes; k < scales_at; ++k) {
      if (stored[k] != 0) return make_error("padding byte ", k, " between codes and scales is not zero");
    }
    std::vector<int64_t> local_scales = e.shape;
    local_scales[n - 2] = e.param;
    int32_t axis = e.split_axis;
    int64_t start = e.split_start;
    if (axis == static_cast<int32_t>(n) - 2) {
      int64_t global_blocks = src.scales.shape[n - 2];
      start = e.split_start / (e.global_shape[n - 2] / global_blocks);
    }
    auto same_u16 = [](const uint8_t* p) { return load_le<uint16_t>(p); };
    GROKIT_TRY(report("scales", compare_slice<uint16_t>(src.scales.data, 2, src.scales.shape, stored + scales_at,
                                                        local_scales, axis, start, same_u16), local_scales));
    *elements += codes;
    return {};
  }
  if (src.quantized) return make_error("stored as a plain array but the source is a QuantizedWeight8bit");
  uint64_t count = 1;
  for (int64_t d : e.shape) count *= static_cast<uint64_t>(d);
  *elements += count;
  if (e.dtype == DType::kBF16) {
    auto to_bf16 = [](const uint8_t* p) { return f32_to_bf16_bits(load_le<float>(p)); };
    return report("bf16 values", compare_slice<uint16_t>(src.array.data, 4, src.array.shape, stored, e.shape,
                                                         e.split_axis, e.split_start, to_bf16), e.shape);
  }
  if (e.dtype == DType::kF32) {
    auto bits = [](const uint8_t* p) { return load_le<uint32_t>(p); };
    return report("fp32 values", compare_slice<uint32_t>(src.array.data, 4, src.array.shape, stored, e.shape,
                                                         e.split_axis, e.split_start, bits), e.shape);
  }
  return make_error("dtype ", format::dtype_name(e.dtype), " is not produced by convert");
}

}  // namespace

Result<TensorValidateReport> validate_tensors(const std::string& ckpt_dir, const std::string& model_dir,
                                              unsigned threads, bool progress) {
  auto t0 = std::chrono::steady_clock::now();
  GROKIT_ASSIGN_OR_RETURN(format::Model model, format::Model::open(model_dir));
  const auto& m = model.manifest();
  // A requantized model differs from its source by design: say so once, instead of a
  // mismatch per tensor (and before the whole checkpoint is read).
  if (m.scheme != "int8")
    return make_error(model_dir, ": its weights are requantized (scheme '", m.scheme,
                      "'), so they cannot equal the source bit for bit; validate the int8 model that convert "
                      "wrote, and compare this one by its logits (grokit validate logits) and its quantize report");
  GROKIT_ASSIGN_OR_RETURN(convert::Checkpoint ck, convert::index_checkpoint(ckpt_dir, m.config, threads));
  if (ck.config.to_json() != m.config.to_json())
    return make_error(model_dir, ": the model's config differs from the shapes found in ", ckpt_dir);
  std::vector<format::ShardReader> shards;
  for (uint32_t r = 0; r < m.tp; ++r) {
    GROKIT_ASSIGN_OR_RETURN(format::ShardReader s, model.open_shard(r));
    shards.push_back(std::move(s));
  }
  TensorValidateReport rep;
  rep.source_bytes = ck.total_bytes;
  Progress prog("validate", ck.total_bytes, progress);
  std::mutex mu;
  std::atomic<uint64_t> elements{0}, entries{0};
  std::vector<size_t> order(ck.tensors.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) { return ck.tensors[a].size > ck.tensors[b].size; });
  parallel_for(order.size(), threads, [&](size_t k) {
    const convert::SourceTensor& st = ck.tensors[order[k]];
    auto add_issue = [&](uint32_t r, std::string msg) {
      std::lock_guard<std::mutex> lock(mu);
      rep.bad.push_back({st.spec.name, r, std::move(msg)});
    };
    MappedFile mf;
    auto src = convert::read_release_tensor(st.path, mf);
    if (!src.ok()) return add_issue(0, src.error().message);
    for (uint32_t r = 0; r < m.tp; ++r) {
      const IndexEntry* e = shards[r].find(st.spec.name);
      if (e == nullptr) {
        add_issue(r, "missing from " + shards[r].path());
        continue;
      }
      std::vector<uint8_t> buf;
      const uint8_t* stored = shards[r].stored(*e);
      if (e->compression != 0) {
        if (auto s = shards[r].read(*e, buf); !s.ok()) {
          add_issue(r, s.error().message);
          continue;
        }
        stored = buf.data();
      }
      uint64_t n = 0;
      if (auto s = check_entry(*src, *e, stored, &n); !s.ok()) add_issue(r, s.error().message);
      elements.fetch_add(n);
      entries.fetch_add(1);
    }
    prog.add(st.size);
  });
  prog.finish();
  // Every stored tensor must have a source: no extra entries.
  for (uint32_t r = 0; r < m.tp; ++r) {
    if (shards[r].entries().size() != ck.tensors.size())
      rep.bad.push_back({"(index)", r, str_cat(shards[r].path(), ": holds ", shards[r].entries().size(),
                                               " tensors, the source has ", ck.tensors.size())});
  }
  rep.tensors_checked = entries.load();
  rep.elements_checked = elements.load();
  rep.seconds = seconds_since(t0);
  std::sort(rep.bad.begin(), rep.bad.end(), [](auto& a, auto& b) { return std::tie(a.rank, a.tensor) < std::tie(b.rank, b.tensor); });
  return rep;
}

// ---------------------------------------------------------------------------------
// Logits parity.
namespace {

std::string dims_text(const std::vector<int64_t>& s) {
  std::string r = "[";
  for (size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
  return r + "]";
}

// What one position yields; reduced in position order afterwards.
struct PositionResult {
  double kl = 0, max_abs = 0, nll_ref = 0, nll_cand = 0;
  bool compared = false, near_tie = false, agree = false, has_nll = false;
  // A non-finite value: which file (0 reference, 1 candidate) and vocabulary index.
  int bad_file = -1;
  int64_t bad_index = 0;
  float bad_value = 0;
};

bool is_finite_bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  return (u & 0x7f800000u) != 0x7f800000u;
}

// The work of one position: two passes over each row, float64 accumulation.
void compare_position(const float* r, const float* c, int64_t vocab, int32_t next_token, double near_tie_margin,
                      PositionResult* out) {
  out->compared = true;
  double r1 = -std::numeric_limits<double>::infinity(), r2 = r1, c1 = r1, max_abs = 0;
  int64_t ri = 0, ci = 0;
  for (int64_t v = 0; v < vocab; ++v) {
    const float xr = r[v], xc = c[v];
    if (!is_finite_bits(xr) || !is_finite_bits(xc)) {
      out->bad_file = is_finite_bits(xr) ? 1 : 0;
      out->bad_index = v;
      out->bad_value = is_finite_bits(xr) ? xc : xr;
      return;
    }
    const double dr = xr, dc = xc;
    if (dr > r1) {
      r2 = r1;
      r1 = dr;
      ri = v;
    } else if (dr > r2) {
      r2 = dr;
    }
    if (dc > c1) {
      c1 = dc;
      ci = v;
    }
    max_abs = std::max(max_abs, std::fabs(dr - dc));
  }
  // KL = sum p_r (x_r - x_c) + (m_c - m_r) + log S_c - log S_r, with
  // S = sum exp(x - m) and p_r = exp(x_r - m_r) / S_r.
  double sr = 0, sc = 0, w = 0;
  for (int64_t v = 0; v < vocab; ++v) {
    const double dr = r[v], dc = c[v];
    const double er = std::exp(dr - r1);
    sr += er;
    sc += std::exp(dc - c1);
    w += er * (dr - dc);
  }
  const double log_sr = std::log(sr), log_sc = std::log(sc);
  out->kl = std::max(0.0, w / sr + (c1 - r1) + (log_sc - log_sr));
  out->max_abs = max_abs;
  out->agree = ri == ci;
  out->near_tie = (r1 - r2) < near_tie_margin;  // r2 = -inf when vocab is 1: never a near tie
  if (next_token > 0) {
    out->has_nll = true;
    out->nll_ref = r1 + log_sr - static_cast<double>(r[next_token]);
    out->nll_cand = c1 + log_sc - static_cast<double>(c[next_token]);
  }
}

// numpy.percentile's default (linear interpolation between closest ranks).
double percentile(std::vector<double> v, double q) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const double idx = q / 100.0 * static_cast<double>(v.size() - 1);
  const size_t lo = static_cast<size_t>(std::floor(idx));
  const size_t hi = std::min(lo + 1, v.size() - 1);
  const double t = idx - static_cast<double>(lo);
  return v[lo] + (v[hi] - v[lo]) * t;
}

void add_check(LogitsReport& rep, const char* name, const std::optional<double>& th, double value, bool at_least) {
  if (!th) return;
  LogitsCheck c;
  c.name = name;
  c.value = value;
  c.threshold = *th;
  c.at_least = at_least;
  c.pass = at_least ? value >= *th : value <= *th;  // NaN fails
  rep.checks.push_back(c);
}

}  // namespace

Result<LogitsReport> compare_logits(const std::string& reference, const std::string& candidate,
                                    const std::string& tokens, const LogitsThresholds& thresholds, unsigned threads,
                                    bool progress) {
  auto t0 = std::chrono::steady_clock::now();
  GROKIT_CHECK(threads >= 1);
  if (!(thresholds.near_tie_margin >= 0)) return make_error("the near-tie margin must be >= 0");
  if (thresholds.max_ppl_ratio && tokens.empty())
    return make_error("a perplexity-ratio threshold needs a tokens file");
  GROKIT_ASSIGN_OR_RETURN(npy::Array ref, npy::Array::open(reference));
  GROKIT_ASSIGN_OR_RETURN(npy::Array cand, npy::Array::open(candidate));
  for (const npy::Array* a : {&ref, &cand}) {
    if (a->header().descr != "<f4" || (a->shape().size() != 2 && a->shape().size() != 3))
      return make_error(a->path(), ": expected float32 logits ('<f4' [B, T, V] or [N, V]) / actual ",
                        a->header().descr, " ", dims_text(a->shape()));
  }
  if (ref.shape() != cand.shape())
    return make_error("logits shapes differ: reference ", dims_text(ref.shape()), " / candidate ",
                      dims_text(cand.shape()), " (", reference, ", ", candidate, ")");
  LogitsReport rep;
  rep.thresholds = thresholds;
  rep.shape = ref.shape();
  const bool three_d = rep.shape.size() == 3;
  rep.batch = three_d ? rep.shape[0] : 1;
  rep.seq = three_d ? rep.shape[1] : rep.shape[0];
  rep.vocab = rep.shape.back();
  const int64_t B = rep.batch, T = rep.seq, V = rep.vocab;
  const uint64_t n_pos = static_cast<uint64_t>(B) * static_cast<uint64_t>(T);  // bounded by the checked file size
  auto pos_text = [&](uint64_t p) {
    return three_d ? str_cat("[", p / static_cast<uint64_t>(T), ", ", p % static_cast<uint64_t>(T), "]")
                   : str_cat("[", p, "]");
  };

  // Tokens: checked whole up front (B * T int32, small next to the logits).
  std::optional<npy::Array> tok;
  const int32_t* tk = nullptr;
  if (!tokens.empty()) {
    GROKIT_ASSIGN_OR_RETURN(npy::Array t, npy::Array::open(tokens));
    const auto& ts = t.shape();
    const bool fits = three_d ? ts == std::vector<int64_t>{B, T}
                              : (ts == std::vector<int64_t>{T} || ts == std::vector<int64_t>{1, T});
    if (t.header().descr != "<i4" || !fits)
      return make_error(tokens, ": expected int32 tokens ('<i4' ", three_d ? dims_text({B, T}) : dims_text({T}),
                        " for logits ", dims_text(rep.shape), ") / actual ", t.header().descr, " ", dims_text(ts));
    tok = std::move(t);
    tk = tok->data<int32_t>();
    for (uint64_t p = 0; p < n_pos; ++p) {
      if (tk[p] < 0 || tk[p] >= V)
        return make_error(tokens, ": token ", tk[p], " at ", pos_text(p), " is outside the vocabulary [0, ", V, ")");
      if (tk[p] != 0 && p % static_cast<uint64_t>(T) != 0 && tk[p - 1] == 0)
        return make_error(tokens, ": token ", tk[p], " at ", pos_text(p),
                          " follows padding (0); padding must be on the right");
    }
  }

  const float* rd = ref.data<float>();
  const float* cd = cand.data<float>();
  const uint64_t row_bytes = static_cast<uint64_t>(V) * 4;
  // Blocks of positions: about 64 MiB of each file, and enough positions for the threads.
  const uint64_t block = std::max<uint64_t>(
      {uint64_t{4} * threads, row_bytes ? (uint64_t{64} << 20) / row_bytes : 1, uint64_t{1}});
  std::vector<PositionResult> res;
  std::vector<double> kls;
  double sum_kl = 0, nll_ref = 0, nll_cand = 0;
  std::vector<LogitsPosition> worst;
  ref.file().advise_sequential();
  cand.file().advise_sequential();
  Progress prog("validate logits", n_pos * row_bytes * 2, progress);
  for (uint64_t start = 0; start < n_pos; start += block) {
    const uint64_t n = std::min(block, n_pos - start);
    res.assign(n, PositionResult{});
    parallel_for(n, threads, [&](size_t i) {
      const uint64_t p = start + i;
      int32_t next = 0;
      if (tk != nullptr) {
        if (tk[p] == 0) return;  // padding
        if ((p + 1) % static_cast<uint64_t>(T) != 0) next = tk[p + 1];
      }
      compare_position(rd + p * static_cast<uint64_t>(V), cd + p * static_cast<uint64_t>(V), V, next,
                       thresholds.near_tie_margin, &res[i]);
    });
    for (uint64_t i = 0; i < n; ++i) {
      const PositionResult& r = res[i];
      const uint64_t p = start + i;
      if (!r.compared) {
        ++rep.padding;
        continue;
      }
      if (r.bad_file >= 0)
        return make_error(r.bad_file == 0 ? reference : candidate, ": non-finite logit ", r.bad_value, " at position ",
                          pos_text(p), ", vocabulary index ", r.bad_index, " (first such position)");
      ++rep.positions;
      kls.push_back(r.kl);
      sum_kl += r.kl;
      rep.max_kl = std::max(rep.max_kl, r.kl);
      rep.max_abs_diff = std::max(rep.max_abs_diff, r.max_abs);
      if (r.near_tie) {
        ++rep.near_ties;
        rep.near_tie_agree += r.agree;
      } else {
        ++rep.decisive;
        rep.decisive_agree += r.agree;
      }
      if (r.has_nll) {
        ++rep.predictions;
        nll_ref += r.nll_ref;
        nll_cand += r.nll_cand;
      }
      // Keep the 5 largest KLs; an equal KL later in order does not displace an earlier one.
      if (worst.size() < 5 || r.kl > worst.back().kl) {
        LogitsPosition lp{three_d ? static_cast<int64_t>(p / static_cast<uint64_t>(T)) : 0,
                          static_cast<int64_t>(p % static_cast<uint64_t>(T)), r.kl};
        auto it = std::upper_bound(worst.begin(), worst.end(), lp,
                                   [](const LogitsPosition& a, const LogitsPosition& b) { return a.kl > b.kl; });
        worst.insert(it, lp);
        if (worst.size() > 5) worst.pop_back();
      }
    }
    // Done with these rows: drop their pages from this process.
    const uint64_t off = start * row_bytes, len = n * row_bytes;
    ref.file().advise_dontneed(ref.header().data_offset + off, len);
    cand.file().advise_dontneed(cand.header().data_offset + off, len);
    prog.add(2 * len);
  }
  prog.finish();
  if (rep.positions == 0)
    return make_error("no position to compare in ", reference, " ", dims_text(rep.shape),
                      tk != nullptr ? " (every token is padding)" : "");
  rep.bytes_read = rep.positions * row_bytes * 2;
  rep.mean_kl = sum_kl / static_cast<double>(rep.positions);
  rep.p99_kl = percentile(std::move(kls), 99);
  rep.worst = std::move(worst);
  rep.top1_agreement = rep.decisive ? static_cast<double>(rep.decisive_agree) / static_cast<double>(rep.decisive) : 1.0;
  rep.near_tie_agreement =
      rep.near_ties ? static_cast<double>(rep.near_tie_agree) / static_cast<double>(rep.near_ties) : 1.0;
  if (rep.predictions > 0) {
    rep.has_perplexity = true;
    rep.ppl_reference = std::exp(nll_ref / static_cast<double>(rep.predictions));
    rep.ppl_candidate = std::exp(nll_cand / static_cast<double>(rep.predictions));
    rep.ppl_ratio = rep.ppl_candidate / rep.ppl_reference;
  }
  const double nan = std::numeric_limits<double>::quiet_NaN();
  add_check(rep, "max_kl", thresholds.max_kl, rep.max_kl, false);
  add_check(rep, "min_top1", thresholds.min_top1, rep.top1_agreement, true);
  add_check(rep, "max_mean_kl", thresholds.max_mean_kl, rep.mean_kl, false);
  add_check(rep, "max_p99_kl", thresholds.max_p99_kl, rep.p99_kl, false);
  add_check(rep, "max_abs_diff", thresholds.max_abs_diff, rep.max_abs_diff, false);
  add_check(rep, "max_ppl_ratio", thresholds.max_ppl_ratio,
            rep.has_perplexity ? std::fabs(rep.ppl_ratio - 1.0) : nan, false);
  rep.pass = std::all_of(rep.checks.begin(), rep.checks.end(), [](const LogitsCheck& c) { return c.pass; });
  rep.seconds = seconds_since(t0);
  return rep;
}

}  // namespace grokit::validate
