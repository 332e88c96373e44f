// The conversion engine: plan, stream, journal, finalize.
#include "convert/convert.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zstd.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <memory>
#include <mutex>
#include <thread>

namespace grokit::convert {

using format::DType;
using format::IndexEntry;
using format::ShardHeader;
using format::ShardSlice;
using format::TensorSpec;

namespace {

constexpr uint32_t kJournalMagic = 0x4a4b5247;  // "GRKJ"
constexpr uint32_t kJournalHeaderMagic = 0x484b5247;  // "GRKH"

// ---------------------------------------------------------------------------------
// The plan: every rank's index with final offsets, fixed before any byte is written.
struct RankPlan {
  ShardHeader header;
  std::vector<IndexEntry> entries;  // in source order
  std::string partial_path, final_path;
};

struct Plan {
  format::ModelConfig cfg;
  int tp = 1;
  uint64_t model_id = 0;
  std::vector<std::vector<ShardSlice>> slices;  // [tensor][rank]
  std::vector<RankPlan> ranks;
  uint64_t hash = 0;
};

Plan make_plan(const Checkpoint& ck, const ConvertOptions& o, const std::string& state_dir) {
  Plan p;
  p.cfg = ck.config;
  p.tp = o.tp;
  p.model_id = format::compute_model_id(p.cfg, static_cast<uint32_t>(o.tp), "int8");
  p.ranks.resize(static_cast<size_t>(o.tp));
  p.slices.resize(ck.tensors.size());
  for (size_t i = 0; i < ck.tensors.size(); ++i) {
    const TensorSpec& spec = ck.tensors[i].spec;
    for (int r = 0; r < o.tp; ++r) {
      ShardSlice s = format::shard_slice(spec, p.cfg, o.tp, r);
      IndexEntry e;
      e.name = spec.name;
      e.dtype = spec.dtype;
      e.param = spec.dtype == DType::kQ8RowBlock ? s.blocks : 0;
      e.shape = s.shape;
      e.global_shape = spec.shape;
      e.split_axis = s.axis;
      e.split_start = s.axis < 0 ? 0 : s.start;
      auto size = format::payload_size(e.dtype, e.shape, e.param);
      GROKIT_CHECK_MSG(size.has_value(), spec.name);
      e.size = e.stored_size = *size;
      p.ranks[static_cast<size_t>(r)].entries.push_back(std::move(e));
      p.slices[i].push_back(std::move(s));
    }
  }
  std::string key;
  for (int r = 0; r < o.tp; ++r) {
    RankPlan& rp = p.ranks[static_cast<size_t>(r)];
    rp.header.rank = static_cast<uint32_t>(r);
    rp.header.rank_count = static_cast<uint32_t>(o.tp);
    rp.header.model_id = p.model_id;
    format::layout_shard(rp.entries, rp.header);
    std::string name = format::shard_file_name(rp.header.rank, rp.header.rank_count);
    rp.partial_path = path_join(state_dir, name);
    rp.final_path = path_join(o.out_dir, name);
    key += format::serialize_header(rp.header) + format::serialize_index(rp.entries);
  }
  for (const auto& t : ck.tensors) key += str_cat(path_basename(t.path), ":", t.size, ";");
  key += o.compress ? str_cat("zstd=", o.zstd_level) : std::string("raw");
  p.hash = xxh3_64(key.data(), key.size());
  return p;
}

// ---------------------------------------------------------------------------------
// The journal: one record per finished source tensor, with each rank's checksum. A
// record is trusted only after the data it describes hashes to the same value again.
class Journal {
 public:
  static Result<Journal> open(const std::string& path, uint64_t plan_hash, int tp, bool keep,
                              std::vector<std::optional<std::vector<uint64_t>>>& done) {
    Journal j;
    j.tp_ = tp;
    if (keep && path_exists(path)) {
      GROKIT_ASSIGN_OR_RETURN(std::string text, read_small_file(path, 1u << 30));
      const auto* p = reinterpret_cast<const uint8_t*>(text.data());
      // A run killed while it rewrote the journal leaves it short or torn: keep nothing
      // then (every tensor is redone), which is always correct.
      bool readable = text.size() >= 24 && load_le<uint32_t>(p) == kJournalHeaderMagic &&
                      load_le<uint64_t>(p + 16) == xxh3_64(p, 16);
      if (!readable) {
        std::fprintf(stderr, "resume: the journal is torn; redoing every tensor\n");
        text.clear();
      }
      if (readable && load_le<uint64_t>(p + 8) != plan_hash)
        return make_error(path_dirname(path), ": the interrupted conversion was made with other options or another "
                          "source (TP degree, config, compression); resume with the same ones or start over with --force");
      size_t rec = 16 + 8 * static_cast<size_t>(tp) + 8;
      for (size_t pos = 24; pos + rec <= text.size(); pos += rec) {
        const uint8_t* r = p + pos;
        if (load_le<uint32_t>(r) != kJournalMagic || load_le<uint64_t>(r + rec - 8) != xxh3_64(r, rec - 8)) break;
        uint32_t index = load_le<uint32_t>(r + 4);
        if (index >= done.size() || load_le<uint32_t>(r + 8) != static_cast<uint32_t>(tp)) break;
        std::vector<uint64_t> sums(static_cast<size_t>(tp));
        for (int k = 0; k < tp; ++k) sums[static_cast<size_t>(k)] = load_le<uint64_t>(r + 16 + 8 * k);
        done[index] = std::move(sums);
      }
    }
    // Rewrite the journal with the header and the records kept so far.
    GROKIT_ASSIGN_OR_RETURN(j.file_, OutputFile::open(path, OutputFile::Mode::kCreateOrTruncate));
    uint8_t h[24];
    store_le<uint32_t>(h, kJournalHeaderMagic);
    store_le<uint32_t>(h + 4, 1);
    store_le<uint64_t>(h + 8, plan_hash);
    store_le<uint64_t>(h + 16, xxh3_64(h, 16));
    GROKIT_TRY(j.file_.pwrite_all(0, h, sizeof h));
    j.end_ = sizeof h;
    return j;
  }

  Status append(uint32_t index, const std::vector<uint64_t>& sums) {
    std::vector<uint8_t> r(16 + 8 * sums.size() + 8);
    store_le<uint32_t>(r.data(), kJournalMagic);
    store_le<uint32_t>(r.data() + 4, index);
    store_le<uint32_t>(r.data() + 8, static_cast<uint32_t>(sums.size()));
    for (size_t k = 0; k < sums.size(); ++k) store_le<uint64_t>(r.data() + 16 + 8 * k, sums[k]);
    store_le<uint64_t>(r.data() + r.size() - 8, xxh3_64(r.data(), r.size() - 8));
    std::lock_guard<std::mutex> lock(*mu_);
    GROKIT_TRY(file_.pwrite_all(end_, r.data(), r.size()));
    end_ += r.size();
    return {};
  }

 private:
  OutputFile file_;
  uint64_t end_ = 0;
  int tp_ = 1;
  std::unique_ptr<std::mutex> mu_ = std::make_unique<std::mutex>();
};

// ---------------------------------------------------------------------------------
using SliceWriter = format::PayloadWriter;

// Calls fn(element offset, element count) for each contiguous run of the slice
// [start, start+length) along `axis` of a C-order array (axis -1: the whole array).
template <class Fn>
Status for_each_run(const std::vector<int64_t>& shape, int32_t axis, int64_t start, int64_t length, Fn&& fn) {
  uint64_t total = 1;
  for (int64_t d : shape) total *= static_cast<uint64_t>(d);
  if (axis < 0) return fn(0, total);
  uint64_t outer = 1, inner = 1;
  for (int32_t d = 0; d < axis; ++d) outer *= static_cast<uint64_t>(shape[static_cast<size_t>(d)]);
  for (size_t d = static_cast<size_t>(axis) + 1; d < shape.size(); ++d) inner *= static_cast<uint64_t>(shape[d]);
  uint64_t dim = static_cast<uint64_t>(shape[static_cast<size_t>(axis)]);
  for (uint64_t o = 0; o < outer; ++o) {
    GROKIT_TRY(fn((o * dim + static_cast<uint64_t>(start)) * inner, static_cast<uint64_t>(length) * inner));
  }
  return {};
}

struct RankSlice {
  int32_t axis;
  int64_t start, length;
};

// Copies one array's per-rank slices, reading the source once in order: for each outer
// index, every rank takes its run before the next outer index is read.
Status copy_slices(const convert::ArrayView& a, const std::vector<RankSlice>& slices,
                   std::vector<SliceWriter>& writers, bool to_bf16) {
  const uint64_t es = element_size(a.type);
  const int32_t axis = slices[0].axis;
  if (axis < 0) {
    for (auto& w : writers) {
      GROKIT_TRY(to_bf16 ? w.append_bf16_of_f32(reinterpret_cast<const float*>(a.data), a.nbytes / 4)
                         : w.append(a.data, a.nbytes));
    }
    return {};
  }
  uint64_t outer = 1, inner = 1;
  for (int32_t d = 0; d < axis; ++d) outer *= static_cast<uint64_t>(a.shape[static_cast<size_t>(d)]);
  for (size_t d = static_cast<size_t>(axis) + 1; d < a.shape.size(); ++d) inner *= static_cast<uint64_t>(a.shape[d]);
  const uint64_t dim = static_cast<uint64_t>(a.shape[static_cast<size_t>(axis)]);
  for (uint64_t o = 0; o < outer; ++o) {
    for (size_t r = 0; r < writers.size(); ++r) {
      const RankSlice& s = slices[r];
      uint64_t off = (o * dim + static_cast<uint64_t>(s.start)) * inner, count = static_cast<uint64_t>(s.length) * inner;
      const uint8_t* src = a.data + off * es;
      GROKIT_TRY(to_bf16 ? writers[r].append_bf16_of_f32(reinterpret_cast<const float*>(src), count)
                         : writers[r].append(src, count * es));
    }
  }
  return {};
}

void drop_page_cache(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return;
  posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
  ::close(fd);
}

// ---------------------------------------------------------------------------------
class Converter {
 public:
  Converter(const ConvertOptions& o) : o_(o) {}
  Result<ConvertReport> run();

 private:
  Status prepare_output_dir(bool& already_complete);
  Status check_free_space();
  Status open_partials(bool keep);
  Status recheck_kept();
  Status convert_tensor(size_t i, uint8_t* staging);
  Status finalize_raw(RankPlan& rp, OutputFile& f);
  Status finalize_compressed(RankPlan& rp);
  Status read_tokenizer();
  Status write_tokenizer(format::Manifest& m);
  Status remove_state_dir();

  const ConvertOptions& o_;
  std::string state_dir_;
  Checkpoint ck_;
  Plan plan_;
  ConvertReport report_;
  std::vector<OutputFile> files_;
  std::vector<std::optional<std::vector<uint64_t>>> done_;  // per tensor: rank checksums
  std::optional<Journal> journal_;
  std::unique_ptr<Progress> progress_;
  std::atomic<uint64_t> written_{0};
  std::optional<std::string> tokenizer_;  // its bytes, read before the output is touched
};

Status Converter::prepare_output_dir(bool& already_complete) {
  already_complete = false;
  const std::string& out = o_.out_dir;
  if (!path_exists(out)) {
    if (!is_directory(path_dirname(out))) return make_error(path_dirname(out), ": the parent of the output directory does not exist");
    if (o_.dry_run) return {};
    return make_directory(out);
  }
  if (!is_directory(out)) return make_error(out, ": exists and is not a directory");
  bool has_manifest = path_exists(path_join(out, format::kManifestFile));
  bool has_state = path_exists(state_dir_);
  std::vector<std::string> ours, foreign;
  for (auto& n : list_directory(out)) {
    bool mine = n == format::kManifestFile || n == format::kTokenizerFile || n == kStateDir ||
                n == std::string(format::kManifestFile) + ".tmp" || n == std::string(format::kTokenizerFile) + ".tmp" ||
                format::is_shard_file_name(n);
    (mine ? ours : foreign).push_back(std::move(n));
  }
  if (!foreign.empty())
    return make_error(out, ": not empty and not a grokit output (holds '", foreign[0], "'", foreign.size() > 1 ? ", ..." : "",
                      "); choose a new or empty directory");
  if (o_.force) {
    if (o_.dry_run) return {};
    for (const auto& n : ours) {
      if (n == kStateDir) continue;
      GROKIT_TRY(remove_file(path_join(out, n)));
    }
    return remove_state_dir();
  }
  if (has_manifest) {
    if (o_.resume) {
      already_complete = true;
      return {};
    }
    return make_error(out, ": already holds a converted model; refusing to overwrite it (pass --force to replace it)");
  }
  if ((has_state || !ours.empty()) && !o_.resume)
    return make_error(out, ": holds an interrupted conversion; pass --resume to continue it or --force to start over");
  return {};
}

Status Converter::remove_state_dir() {
  if (!path_exists(state_dir_)) return {};
  GROKIT_TRY(remove_directory_files(state_dir_));
  return fsync_directory(o_.out_dir);
}

Status Converter::check_free_space() {
  uint64_t need = 0;
  for (const auto& rp : plan_.ranks) {
    uint64_t have = 0;
    struct stat st {};
    if (::stat(rp.partial_path.c_str(), &st) == 0) have = static_cast<uint64_t>(st.st_blocks) * 512;
    uint64_t want = rp.header.file_size * (o_.compress ? 2 : 1);
    need += want > have ? want - have : 0;
  }
  auto free = free_disk_bytes(o_.out_dir);
  if (!free.ok()) return free.take_error();
  if (*free < need)
    return make_error(o_.out_dir, ": not enough free space: the conversion needs ", human_bytes(static_cast<double>(need)),
                      " more, ", human_bytes(static_cast<double>(*free)), " are available");
  return {};
}

Status Converter::open_partials(bool keep) {
  files_.resize(plan_.ranks.size());
  for (size_t r = 0; r < plan_.ranks.size(); ++r) {
    RankPlan& rp = plan_.ranks[r];
    // A final-named shard without a manifest was renamed just before an interruption.
    if (path_exists(rp.final_path)) {
      if (keep && !o_.compress && !path_exists(rp.partial_path)) GROKIT_TRY(rename_file(rp.final_path, rp.partial_path));
      else GROKIT_TRY(remove_file(rp.final_path));
    }
    bool exists = keep && path_exists(rp.partial_path);
    GROKIT_ASSIGN_OR_RETURN(files_[r], OutputFile::open(rp.partial_path, exists ? OutputFile::Mode::kOpenExisting
                                                                                 : OutputFile::Mode::kCreateOrTruncate));
    if (o_.direct_io) files_[r].enable_direct_io();
    GROKIT_ASSIGN_OR_RETURN(uint64_t size, files_[r].size());
    if (size != rp.header.file_size) {
      if (size != 0) GROKIT_TRY(files_[r].truncate(0));
      // Reserve the space now: a full disk fails here, before data is written.
      GROKIT_TRY(files_[r].reserve(rp.header.file_size));
      for (auto& d : done_) {
        if (d) d.reset();  // a shard that had to be recreated keeps nothing
      }
    }
  }
  return {};
}

Status Converter::recheck_kept() {
  std::vector<size_t> kept;
  for (size_t i = 0; i < done_.size(); ++i) {
    if (done_[i]) kept.push_back(i);
  }
  if (kept.empty()) return {};
  std::atomic<size_t> bad{0};
  parallel_for(kept.size(), o_.threads, [&](size_t k) {
    size_t i = kept[k];
    std::vector<uint8_t> buf;
    for (size_t r = 0; r < plan_.ranks.size(); ++r) {
      const RankPlan& rp = plan_.ranks[r];
      const IndexEntry& e = rp.entries[i];
      Xxh3Stream h;
      buf.resize(std::min<uint64_t>(e.stored_size, 8u << 20));
      bool ok = true;
      for (uint64_t off = 0; off < e.stored_size && ok;) {
        size_t n = static_cast<size_t>(std::min<uint64_t>(buf.size(), e.stored_size - off));
        ok = files_[r].pread_all(rp.header.data_offset + e.offset + off, buf.data(), n).ok();
        h.update(buf.data(), n);
        off += n;
      }
      if (!ok || h.digest() != (*done_[i])[r]) {
        done_[i].reset();
        bad.fetch_add(1);
        return;
      }
    }
  });
  report_.tensors_resumed = kept.size() - bad.load();
  std::fprintf(stderr, "resume: %zu tensors kept after re-checking their checksums, %zu to redo\n",
               report_.tensors_resumed, done_.size() - report_.tensors_resumed);
  return {};
}

Status Converter::convert_tensor(size_t i, uint8_t* staging) {
  const SourceTensor& st = ck_.tensors[i];
  MappedFile m;
  GROKIT_ASSIGN_OR_RETURN(ReleaseTensor t, read_release_tensor(st.path, m));
  GROKIT_TRY(check_source_tensor(t, st.spec, ck_.config, st.path));
  m.advise_sequential();
  const size_t tp = plan_.ranks.size();
  const size_t cap = std::max<size_t>(64u << 10, o_.staging_bytes / tp / 4096 * 4096);
  std::vector<SliceWriter> writers;
  writers.reserve(tp);
  for (size_t r = 0; r < tp; ++r) {
    const RankPlan& rp = plan_.ranks[r];
    writers.emplace_back(&files_[r], rp.header.data_offset + rp.entries[i].offset, staging + r * cap, cap);
  }
  const auto& slices = plan_.slices[i];
  std::vector<RankSlice> rs;
  for (const auto& s : slices) rs.push_back({s.axis, s.start, s.length});
  if (st.spec.dtype == DType::kQ8RowBlock) {
    GROKIT_TRY(copy_slices(t.weight, rs, writers, false));
    // Scales follow the codes at a 64-byte boundary. Row splits take their scale blocks.
    const int32_t row_axis = static_cast<int32_t>(st.spec.shape.size()) - 2;
    std::vector<RankSlice> ss;
    for (const auto& s : slices) {
      if (s.axis == row_axis) ss.push_back({row_axis, s.block_start, s.blocks});
      else ss.push_back({s.axis, s.start, s.length});
    }
    for (size_t r = 0; r < tp; ++r) {
      uint64_t codes = writers[r].written();
      GROKIT_TRY(writers[r].zeros(align_up(codes, 64) - codes));
    }
    GROKIT_TRY(copy_slices(t.scales, ss, writers, false));
  } else {
    GROKIT_TRY(copy_slices(t.array, rs, writers, st.spec.dtype == DType::kBF16));
  }
  std::vector<uint64_t> sums(tp);
  uint64_t bytes = 0;
  for (size_t r = 0; r < tp; ++r) {
    GROKIT_TRY(writers[r].flush());
    GROKIT_CHECK_MSG(writers[r].written() == plan_.ranks[r].entries[i].size, st.spec.name);
    sums[r] = writers[r].digest();
    bytes += writers[r].written();
  }
  written_.fetch_add(bytes);
  m = MappedFile();
  drop_page_cache(st.path);  // a 318 GB pass should not evict everything else
  GROKIT_TRY(journal_->append(static_cast<uint32_t>(i), sums));
  done_[i] = std::move(sums);
  progress_->add(st.size);
  return {};
}

Status Converter::finalize_raw(RankPlan& rp, OutputFile& f) {
  GROKIT_TRY(format::write_shard_tail(f, rp.header, rp.entries));
  GROKIT_TRY(f.close());
  return rename_file(rp.partial_path, rp.final_path);
}

Status Converter::finalize_compressed(RankPlan& rp) {
  // The raw shard is complete in the state directory; compress it tensor by tensor into
  // a new file. Single-threaded zstd per tensor is deterministic.
  GROKIT_ASSIGN_OR_RETURN(MappedFile raw, MappedFile::open(rp.partial_path));
  std::string tmp = rp.partial_path + ".zst";
  GROKIT_ASSIGN_OR_RETURN(OutputFile out, OutputFile::open(tmp, OutputFile::Mode::kCreateOrTruncate));
  std::vector<IndexEntry> entries = rp.entries;
  ShardHeader h = rp.header;
  h.index_size = format::serialize_index(entries).size();
  h.data_offset = align_up(h.index_offset + h.index_size, h.alignment);
  ZSTD_CCtx* cctx = ZSTD_createCCtx();
  GROKIT_CHECK(cctx != nullptr);
  std::vector<uint8_t> obuf(ZSTD_CStreamOutSize() * 16);
  uint64_t pos = 0;
  Status status;
  for (size_t i = 0; i < entries.size() && status.ok(); ++i) {
    IndexEntry& e = entries[i];
    const uint8_t* src = raw.data() + rp.header.data_offset + rp.entries[i].offset;
    pos = align_up(pos, h.alignment);
    e.offset = pos;
    e.compression = 1;
    ZSTD_CCtx_reset(cctx, ZSTD_reset_session_and_parameters);
    ZSTD_CCtx_setParameter(cctx, ZSTD_c_compressionLevel, o_.zstd_level);
    ZSTD_CCtx_setParameter(cctx, ZSTD_c_checksumFlag, 0);
    ZSTD_CCtx_setPledgedSrcSize(cctx, e.size);
    ZSTD_inBuffer in{src, e.size, 0};
    Xxh3Stream hash;
    uint64_t stored = 0;
    for (bool done = false; !done && status.ok();) {
      ZSTD_outBuffer ob{obuf.data(), obuf.size(), 0};
      size_t rem = ZSTD_compressStream2(cctx, &ob, &in, ZSTD_e_end);
      if (ZSTD_isError(rem)) {
        status = make_error(rp.partial_path, ": zstd: ", ZSTD_getErrorName(rem));
        break;
      }
      hash.update(obuf.data(), ob.pos);
      status = out.pwrite_all(h.data_offset + pos + stored, obuf.data(), ob.pos);
      stored += ob.pos;
      done = rem == 0;
    }
    e.stored_size = stored;
    e.xxh3 = hash.digest();
    pos += stored;
  }
  ZSTD_freeCCtx(cctx);
  GROKIT_TRY(std::move(status));
  h.data_size = pos;
  h.file_size = h.data_offset + h.data_size;
  GROKIT_TRY(out.truncate(h.file_size));
  GROKIT_TRY(format::write_shard_tail(out, h, entries));
  GROKIT_TRY(out.close());
  GROKIT_TRY(rename_file(tmp, rp.final_path));
  rp.header = h;
  rp.entries = std::move(entries);
  return {};
}

// Read first, so that a wrong --tokenizer stops the run before it clears an output or
// converts for an hour, and a tokenizer kept in the output directory survives --force.
Status Converter::read_tokenizer() {
  std::optional<std::string> path = o_.tokenizer_file;
  if (!path) {
    std::string beside = path_join(path_dirname(o_.ckpt_dir), format::kTokenizerFile);
    if (path_exists(beside)) path = beside;
  }
  if (!path) {
    report_.tokenizer_source = "none (pass --tokenizer; the model cannot take text prompts without one)";
    return {};
  }
  GROKIT_ASSIGN_OR_RETURN(std::string bytes, read_small_file(*path, 256u << 20));
  if (bytes.empty()) return make_error(*path, ": empty tokenizer file");
  tokenizer_ = std::move(bytes);
  report_.tokenizer_source = *path;
  return {};
}

Status Converter::write_tokenizer(format::Manifest& m) {
  if (!tokenizer_) return {};
  GROKIT_TRY(write_file_atomic(path_join(o_.out_dir, format::kTokenizerFile), *tokenizer_));
  m.tokenizer = format::FileInfo{format::kTokenizerFile, tokenizer_->size(), xxh3_64(tokenizer_->data(), tokenizer_->size()), ""};
  return {};
}

Result<ConvertReport> Converter::run() {
  auto t0 = std::chrono::steady_clock::now();
  if (o_.threads == 0) return make_error("--threads must be at least 1");
  state_dir_ = path_join(o_.out_dir, kStateDir);
  GROKIT_ASSIGN_OR_RETURN(LoadedConfig lc, load_config(o_.ckpt_dir, o_.config_file));
  report_.config_source = lc.source;
  const bool lc_is_file = path_exists(lc.source);
  std::fprintf(stderr, "config: %s\n", lc.source.c_str());

  GROKIT_TRY(read_tokenizer());
  bool already_complete = false;
  GROKIT_TRY(prepare_output_dir(already_complete));
  if (already_complete) {
    GROKIT_ASSIGN_OR_RETURN(format::Model model, format::Model::open(o_.out_dir));
    if (model.manifest().tp != static_cast<uint32_t>(o_.tp))
      return make_error(o_.out_dir, ": already holds a complete TP-", model.manifest().tp, " model");
    std::fprintf(stderr, "%s: already complete; nothing to resume\n", o_.out_dir.c_str());
    GROKIT_TRY(remove_state_dir());
    return report_;
  }

  GROKIT_ASSIGN_OR_RETURN(ck_, index_checkpoint(o_.ckpt_dir, lc.config, o_.threads));
  GROKIT_TRY(check_tensor_parallel(ck_.config, o_.tp));  // with the sizes read from the shapes
  plan_ = make_plan(ck_, o_, state_dir_);
  report_.tensors = ck_.tensors.size();
  report_.anon_bound = static_cast<uint64_t>(o_.threads) * o_.staging_bytes + (64u << 20);
  uint64_t total_out = 0;
  for (const auto& rp : plan_.ranks) total_out += rp.header.file_size;
  std::fprintf(stderr, "plan: %zu tensors (%s) -> %d shards of about %s each\n", ck_.tensors.size(),
               human_bytes(static_cast<double>(ck_.total_bytes)).c_str(), o_.tp,
               human_bytes(static_cast<double>(total_out) / o_.tp).c_str());
  if (o_.dry_run) return report_;

  GROKIT_TRY(make_directory(state_dir_));
  done_.assign(ck_.tensors.size(), std::nullopt);
  {
    GROKIT_ASSIGN_OR_RETURN(Journal j, Journal::open(path_join(state_dir_, "journal"), plan_.hash, o_.tp, o_.resume, done_));
    journal_.emplace(std::move(j));
  }
  GROKIT_TRY(check_free_space());
  GROKIT_TRY(open_partials(o_.resume));
  GROKIT_TRY(recheck_kept());
  for (size_t i = 0; i < done_.size(); ++i) {
    if (done_[i]) GROKIT_TRY(journal_->append(static_cast<uint32_t>(i), *done_[i]));
  }

  // Peak anonymous memory, sampled while the conversion runs.
  std::atomic<bool> sampling{true};
  std::atomic<uint64_t> peak{rss_anon_bytes()};
  std::thread sampler([&] {
    while (sampling.load()) {
      uint64_t v = rss_anon_bytes();
      if (v > peak.load()) peak.store(v);
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
  });

  uint64_t todo_bytes = 0;
  std::vector<size_t> todo;
  for (size_t i = 0; i < done_.size(); ++i) {
    if (!done_[i]) {
      todo.push_back(i);
      todo_bytes += ck_.tensors[i].size;
    }
  }
  progress_ = std::make_unique<Progress>("convert", todo_bytes, o_.progress);
  std::atomic<bool> failed{false};
  std::mutex err_mu;
  std::optional<Error> first_error;
  const unsigned workers = std::max(1u, std::min<unsigned>(o_.threads, static_cast<unsigned>(std::max<size_t>(todo.size(), 1))));
  std::vector<AlignedBuffer> staging(workers);  // aligned for direct I/O (PayloadWriter)
  std::atomic<size_t> next{0};
  std::vector<std::thread> pool;
  for (unsigned w = 0; w < workers; ++w) {
    pool.emplace_back([&, w] {
      staging[w] = AlignedBuffer(o_.staging_bytes + (64u << 10) * plan_.ranks.size(), OutputFile::kDirectIoAlign);
      for (size_t k = next.fetch_add(1); k < todo.size() && !failed.load(); k = next.fetch_add(1)) {
        Status s = convert_tensor(todo[k], staging[w].data());
        if (!s.ok()) {
          std::lock_guard<std::mutex> lock(err_mu);
          if (!first_error) first_error = s.take_error();
          failed.store(true);
        }
      }
      staging[w] = AlignedBuffer();
    });
  }
  for (auto& t : pool) t.join();
  progress_->finish();
  sampling.store(false);
  sampler.join();
  report_.peak_rss_anon = peak.load();
  report_.bytes_read = todo_bytes;
  if (first_error) return *first_error;

  // Finalize: checksums into the index, header last, fsync, then rename into place.
  for (size_t r = 0; r < plan_.ranks.size(); ++r) {
    RankPlan& rp = plan_.ranks[r];
    for (size_t i = 0; i < rp.entries.size(); ++i) rp.entries[i].xxh3 = (*done_[i])[r];
  }
  std::vector<Status> results(plan_.ranks.size());
  if (o_.compress) {
    for (size_t r = 0; r < plan_.ranks.size(); ++r) {
      GROKIT_TRY(files_[r].sync());
      GROKIT_TRY(files_[r].close());
    }
    parallel_for(plan_.ranks.size(), o_.threads, [&](size_t r) { results[r] = finalize_compressed(plan_.ranks[r]); });
  } else {
    parallel_for(plan_.ranks.size(), o_.threads, [&](size_t r) { results[r] = finalize_raw(plan_.ranks[r], files_[r]); });
  }
  for (auto& s : results) GROKIT_TRY(std::move(s));
  GROKIT_TRY(fsync_directory(o_.out_dir));

  format::Manifest m;
  m.config = ck_.config;
  m.tp = static_cast<uint32_t>(o_.tp);
  m.tensor_count = ck_.tensors.size();
  m.model_id = plan_.model_id;
  m.scheme = "int8";
  m.producer = "grokit convert 0.1.0";
  m.config_source = lc_is_file ? path_basename(lc.source) : "built-in Grok-1";
  m.source = path_basename(o_.ckpt_dir);
  for (const auto& rp : plan_.ranks) {
    m.shards.push_back({path_basename(rp.final_path), rp.header.rank, rp.header.file_size, rp.entries.size(),
                        rp.header.index_xxh3});
    report_.bytes_written += rp.header.file_size;
  }
  for (const auto& t : ck_.tensors) m.source_files.push_back({path_basename(t.path), t.size, 0, t.spec.name});
  GROKIT_TRY(write_tokenizer(m));
  // The manifest is the commit point: once it exists, the model is complete.
  GROKIT_TRY(write_file_atomic(path_join(o_.out_dir, format::kManifestFile), m.to_json()));
  GROKIT_TRY(remove_state_dir());
  report_.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return report_;
}

}  // namespace

Result<ConvertReport> convert_checkpoint(const ConvertOptions& options) {
  Converter c(options);
  return c.run();
}

}  // namespace grokit::convert
