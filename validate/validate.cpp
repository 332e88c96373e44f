#include "validate/validate.h"

#include <algorithm>
#include <chrono>
#include <mutex>

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

}  // namespace grokit::validate
