// Shard files: header, tensor index, and the validating memory-mapped reader.
#include <fcntl.h>
#include <zstd.h>

#include <algorithm>
#include <cstdio>

#include "format/format.h"

namespace grokit::format {

namespace {
struct DTypeName { DType t; const char* name; };
constexpr DTypeName kDTypeNames[] = {
    {DType::kF32, "f32"},          {DType::kBF16, "bf16"},          {DType::kI8, "i8"},
    {DType::kF8E4M3, "f8e4m3"},    {DType::kQ8RowBlock, "q8rb"},    {DType::kQ4Group, "q4g"},
    {DType::kF8Column, "f8col"},
};

std::string shape_str(std::span<const int64_t> s) {
  std::string r = "[";
  for (size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
  return r + "]";
}

bool valid_name_char(char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' || c == '_' ||
         c == '-';
}
}  // namespace

const char* dtype_name(DType t) {
  for (const auto& d : kDTypeNames) {
    if (d.t == t) return d.name;
  }
  return "unknown";
}
std::optional<DType> dtype_from_name(std::string_view name) {
  for (const auto& d : kDTypeNames) {
    if (name == d.name) return d.t;
  }
  return std::nullopt;
}
bool dtype_known(uint32_t code) {
  for (const auto& d : kDTypeNames) {
    if (static_cast<uint32_t>(d.t) == code) return true;
  }
  return false;
}

uint64_t q8_scales_offset(std::span<const int64_t> shape) {
  uint64_t n = 1;
  for (int64_t d : shape) n *= static_cast<uint64_t>(d);
  return align_up(n, 64);
}

std::optional<uint64_t> payload_size(DType t, std::span<const int64_t> shape, uint32_t param) {
  uint64_t n = 1;
  for (int64_t d : shape) {
    if (d < 0 || !checked_mul(n, static_cast<uint64_t>(d), &n)) return std::nullopt;
  }
  if (n > (uint64_t{1} << 56)) return std::nullopt;
  switch (t) {
    case DType::kF32: return n * 4;
    case DType::kBF16: return n * 2;
    case DType::kI8:
    case DType::kF8E4M3: return n;
    case DType::kQ8RowBlock: {
      // codes [.., K, N], 64-byte pad, bf16 scales [.., B, N]
      if (shape.size() < 2 || param == 0) return std::nullopt;
      uint64_t k = static_cast<uint64_t>(shape[shape.size() - 2]);
      if (k % param != 0) return std::nullopt;
      uint64_t cols = static_cast<uint64_t>(shape.back());
      uint64_t lead = k == 0 || cols == 0 ? 0 : n / k / cols;
      uint64_t scales = lead * param * cols * 2;
      return align_up(n, 64) + scales;
    }
    case DType::kQ4Group:
    case DType::kF8Column: {
      if (shape.size() < 2) return std::nullopt;
      int64_t K = shape[shape.size() - 2], N = shape.back();
      if (K <= 0 || N <= 0 || K % 32 != 0) return std::nullopt;
      uint64_t lead = n / static_cast<uint64_t>(K) / static_cast<uint64_t>(N);
      if (t == DType::kF8Column) return param == 0 ? std::optional<uint64_t>(lead * f8col_matrix_bytes(K, N)) : std::nullopt;
      if ((param != 32 && param != 64 && param != 128) || K % param != 0) return std::nullopt;
      return lead * static_cast<uint64_t>(K / param) * q4g_group_bytes(param, N);
    }
  }
  return std::nullopt;
}

std::string shard_file_name(uint32_t rank, uint32_t rank_count) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "shard-%05u-of-%05u.gkt", rank, rank_count);
  return buf;
}
bool is_shard_file_name(const std::string& n) {
  return n.rfind("shard-", 0) == 0 && n.size() > 4 && n.compare(n.size() - 4, 4, ".gkt") == 0;
}

// ---------------------------------------------------------------------------------
// Header: fixed 128 bytes; the last 8 are the XXH3-64 of the first 120.
std::string serialize_header(const ShardHeader& h) {
  std::string b(kShardHeaderSize, '\0');
  char* p = b.data();
  std::memcpy(p, kShardMagic, 8);
  store_le<uint32_t>(p + 8, h.version);
  store_le<uint32_t>(p + 12, kShardHeaderSize);
  store_le<uint32_t>(p + 16, h.rank);
  store_le<uint32_t>(p + 20, h.rank_count);
  store_le<uint64_t>(p + 24, h.model_id);
  store_le<uint64_t>(p + 32, h.tensor_count);
  store_le<uint64_t>(p + 40, h.index_offset);
  store_le<uint64_t>(p + 48, h.index_size);
  store_le<uint64_t>(p + 56, h.data_offset);
  store_le<uint64_t>(p + 64, h.data_size);
  store_le<uint64_t>(p + 72, h.file_size);
  store_le<uint32_t>(p + 80, h.alignment);
  store_le<uint32_t>(p + 84, h.flags);
  store_le<uint64_t>(p + 88, h.index_xxh3);
  store_le<uint64_t>(p + 120, xxh3_64(p, 120));
  return b;
}

Result<ShardHeader> parse_header(const uint8_t* p, uint64_t size, const std::string& file) {
  auto bad = [&](uint64_t at, auto... what) { return make_error(file, ": byte ", at, ": ", what...); };
  if (size < kShardHeaderSize)
    return make_error(file, ": ", size, " bytes, shorter than the ", kShardHeaderSize, "-byte shard header (truncated?)");
  if (std::memcmp(p, kShardMagic, 8) != 0) return bad(0, "bad magic: not a grokit shard file");
  ShardHeader h;
  h.version = load_le<uint32_t>(p + 8);
  // A corrupt header must not pass for a newer version: check the sum first.
  uint64_t stored_sum = load_le<uint64_t>(p + 120), sum = xxh3_64(p, 120);
  bool sum_ok = stored_sum == sum;
  if (sum_ok && (h.version == 0 || h.version > kFormatVersion))
    return bad(8, "format version ", h.version, " is not supported (this grokit reads version ", kFormatVersion, ")");
  if (!sum_ok)
    return bad(120, "header checksum mismatch (stored ", hex64(stored_sum), ", computed ", hex64(sum), "): corrupt header");
  uint32_t header_size = load_le<uint32_t>(p + 12);
  if (header_size != kShardHeaderSize) return bad(12, "header size ", header_size, ", expected ", kShardHeaderSize);
  h.rank = load_le<uint32_t>(p + 16);
  h.rank_count = load_le<uint32_t>(p + 20);
  h.model_id = load_le<uint64_t>(p + 24);
  h.tensor_count = load_le<uint64_t>(p + 32);
  h.index_offset = load_le<uint64_t>(p + 40);
  h.index_size = load_le<uint64_t>(p + 48);
  h.data_offset = load_le<uint64_t>(p + 56);
  h.data_size = load_le<uint64_t>(p + 64);
  h.file_size = load_le<uint64_t>(p + 72);
  h.alignment = load_le<uint32_t>(p + 80);
  h.flags = load_le<uint32_t>(p + 84);
  h.index_xxh3 = load_le<uint64_t>(p + 88);
  if (h.rank_count == 0 || h.rank_count > 4096 || h.rank >= h.rank_count)
    return bad(16, "rank ", h.rank, " of ", h.rank_count, " is invalid");
  if (h.alignment < kMinAlignment || (h.alignment & (h.alignment - 1)) != 0 || h.alignment > (1u << 30))
    return bad(80, "alignment ", h.alignment, " is not a power of two from 4096 to 2^30");
  if (h.flags != 0) return bad(84, "unknown flags ", h.flags);
  for (int k = 96; k < 120; ++k) {
    if (p[k] != 0) return bad(k, "reserved header byte is not zero");
  }
  if (h.file_size != size)
    return bad(72, "the header records a file of ", h.file_size, " bytes but the file has ", size,
               h.file_size > size ? " (truncated)" : " (trailing data)");
  uint64_t index_end, data_end;
  if (h.index_offset != kShardHeaderSize) return bad(40, "index offset ", h.index_offset, ", expected ", kShardHeaderSize);
  if (!checked_add(h.index_offset, h.index_size, &index_end) || index_end > size)
    return bad(48, "index of ", h.index_size, " bytes runs past the end of the file");
  if (h.data_offset % h.alignment != 0 || h.data_offset < index_end)
    return bad(56, "data offset ", h.data_offset, " is unaligned or overlaps the index");
  if (!checked_add(h.data_offset, h.data_size, &data_end) || data_end != size)
    return bad(64, "data section [", h.data_offset, ", +", h.data_size, ") does not end at the end of the file (", size, ")");
  return h;
}

// ---------------------------------------------------------------------------------
// Index: packed little-endian entries (SPEC.md §3.2).
namespace {
class Writer {
 public:
  template <class T>
  void put(T v) {
    char b[sizeof(T)];
    store_le<T>(b, v);
    s.append(b, sizeof(T));
  }
  std::string s;
};
}  // namespace

std::string serialize_index(const std::vector<IndexEntry>& entries) {
  Writer w;
  for (const auto& e : entries) {
    GROKIT_CHECK(!e.name.empty() && e.name.size() <= kMaxNameLength);
    GROKIT_CHECK(e.shape.size() == e.global_shape.size() && !e.shape.empty() && e.shape.size() <= kMaxDims);
    w.put<uint32_t>(static_cast<uint32_t>(e.name.size()));
    w.s += e.name;
    w.put<uint32_t>(static_cast<uint32_t>(e.dtype));
    w.put<uint32_t>(e.param);
    w.put<uint32_t>(static_cast<uint32_t>(e.shape.size()));
    w.put<int32_t>(e.split_axis);
    w.put<uint32_t>(e.compression);
    for (int64_t d : e.shape) w.put<int64_t>(d);
    for (int64_t d : e.global_shape) w.put<int64_t>(d);
    w.put<int64_t>(e.split_start);
    w.put<uint64_t>(e.offset);
    w.put<uint64_t>(e.stored_size);
    w.put<uint64_t>(e.size);
    w.put<uint64_t>(e.xxh3);
  }
  return w.s;
}

Result<std::vector<IndexEntry>> parse_index(const uint8_t* data, uint64_t size, const ShardHeader& h,
                                            const std::string& file) {
  GROKIT_CHECK(h.index_offset + h.index_size <= size);
  const uint8_t* p = data + h.index_offset;
  const uint64_t n = h.index_size;
  uint64_t sum = xxh3_64(p, n);
  if (sum != h.index_xxh3)
    return make_error(file, ": tensor index checksum mismatch (header records ", hex64(h.index_xxh3), ", computed ",
                      hex64(sum), "): the index is corrupt");
  constexpr uint64_t kMinEntry = 4 + 1 + 4 * 5 + 8 * 2 + 8 * 5;
  if (h.tensor_count > n / kMinEntry)
    return make_error(file, ": header claims ", h.tensor_count, " tensors but the index has room for at most ", n / kMinEntry);
  std::vector<IndexEntry> out;
  out.reserve(h.tensor_count);
  uint64_t pos = 0;
  auto need = [&](uint64_t k) { return k <= n - pos; };
  auto fail = [&](uint64_t at, auto... what) {
    return make_error(file, ": byte ", h.index_offset + at, ": index entry ", out.size(), ": ", what...);
  };
  for (uint64_t i = 0; i < h.tensor_count; ++i) {
    uint64_t entry_at = pos;
    if (!need(4)) return fail(pos, "truncated");
    uint32_t name_len = load_le<uint32_t>(p + pos);
    pos += 4;
    if (name_len == 0 || name_len > kMaxNameLength) return fail(entry_at, "name length ", name_len, " is out of range");
    if (!need(name_len + 20)) return fail(pos, "truncated");
    IndexEntry e;
    e.name.assign(reinterpret_cast<const char*>(p + pos), name_len);
    if (!std::all_of(e.name.begin(), e.name.end(), valid_name_char)) return fail(pos, "tensor name has invalid characters");
    pos += name_len;
    uint32_t dtype = load_le<uint32_t>(p + pos);
    e.param = load_le<uint32_t>(p + pos + 4);
    uint32_t ndim = load_le<uint32_t>(p + pos + 8);
    e.split_axis = load_le<int32_t>(p + pos + 12);
    e.compression = load_le<uint32_t>(p + pos + 16);
    pos += 20;
    auto ctx = [&](auto... what) { return fail(entry_at, "'", e.name, "': ", what...); };
    if (!dtype_known(dtype)) return ctx("unknown dtype code ", dtype);
    e.dtype = static_cast<DType>(dtype);
    if (ndim == 0 || ndim > kMaxDims) return ctx(ndim, " dimensions (1 to ", kMaxDims, " allowed)");
    if (!need(uint64_t{ndim} * 16 + 40)) return fail(pos, "truncated");
    for (uint32_t d = 0; d < ndim; ++d) e.shape.push_back(load_le<int64_t>(p + pos + 8 * d));
    pos += 8 * ndim;
    for (uint32_t d = 0; d < ndim; ++d) e.global_shape.push_back(load_le<int64_t>(p + pos + 8 * d));
    pos += 8 * ndim;
    e.split_start = load_le<int64_t>(p + pos);
    e.offset = load_le<uint64_t>(p + pos + 8);
    e.stored_size = load_le<uint64_t>(p + pos + 16);
    e.size = load_le<uint64_t>(p + pos + 24);
    e.xxh3 = load_le<uint64_t>(p + pos + 32);
    pos += 40;
    for (uint32_t d = 0; d < ndim; ++d) {
      if (e.shape[d] <= 0 || e.global_shape[d] <= 0 || e.global_shape[d] > (int64_t{1} << 40))
        return ctx("dimension ", d, " is out of range");
    }
    if (e.split_axis < -1 || e.split_axis >= static_cast<int32_t>(ndim)) return ctx("split axis ", e.split_axis, " is invalid");
    for (uint32_t d = 0; d < ndim; ++d) {
      bool split = static_cast<int32_t>(d) == e.split_axis;
      if (!split && e.shape[d] != e.global_shape[d])
        return ctx("local shape ", shape_str(e.shape), " does not match the whole tensor ", shape_str(e.global_shape));
      if (split && (e.split_start < 0 || e.split_start > e.global_shape[d] - e.shape[d]))
        return ctx("slice [", e.split_start, ", +", e.shape[d], ") lies outside dimension ", d, " of ", shape_str(e.global_shape));
    }
    if (e.split_axis == -1 && e.split_start != 0) return ctx("an unsplit tensor has split start ", e.split_start);
    auto expect = payload_size(e.dtype, e.shape, e.param);
    if (!expect) return ctx("dtype ", dtype_name(e.dtype), " with parameter ", e.param, " does not fit shape ", shape_str(e.shape));
    if (e.size != *expect)
      return ctx("size ", e.size, " bytes does not match ", dtype_name(e.dtype), " ", shape_str(e.shape), " (", *expect, " bytes)");
    if (e.compression > 1) return ctx("unknown compression ", e.compression);
    if (e.compression == 0 && e.stored_size != e.size) return ctx("raw tensor with stored size ", e.stored_size, " != size ", e.size);
    if (e.compression == 1 && e.stored_size == 0) return ctx("compressed tensor with no stored bytes");
    uint64_t end;
    if (e.offset % h.alignment != 0) return ctx("offset ", e.offset, " is not aligned to ", h.alignment);
    if (!checked_add(e.offset, e.stored_size, &end) || end > h.data_size)
      return ctx("bytes [", e.offset, ", +", e.stored_size, ") run past the data section (", h.data_size, " bytes)");
    out.push_back(std::move(e));
  }
  if (pos != n) return make_error(file, ": index has ", n - pos, " bytes after its last entry");
  // No two tensors may share a name or a byte.
  std::vector<const IndexEntry*> by_offset;
  for (const auto& e : out) by_offset.push_back(&e);
  std::sort(by_offset.begin(), by_offset.end(), [](auto* a, auto* b) { return a->offset < b->offset; });
  for (size_t i = 1; i < by_offset.size(); ++i) {
    if (by_offset[i]->offset < by_offset[i - 1]->offset + by_offset[i - 1]->stored_size)
      return make_error(file, ": tensors '", by_offset[i - 1]->name, "' and '", by_offset[i]->name, "' overlap");
  }
  std::vector<std::string_view> names;
  for (const auto& e : out) names.push_back(e.name);
  std::sort(names.begin(), names.end());
  for (size_t i = 1; i < names.size(); ++i) {
    if (names[i] == names[i - 1]) return make_error(file, ": tensor '", names[i], "' appears twice in the index");
  }
  return out;
}

void layout_shard(std::vector<IndexEntry>& entries, ShardHeader& h) {
  h.tensor_count = entries.size();
  h.index_offset = kShardHeaderSize;
  h.index_size = serialize_index(entries).size();  // fixed-width fields: independent of offsets
  h.data_offset = align_up(h.index_offset + h.index_size, h.alignment);
  uint64_t pos = 0;
  for (auto& e : entries) {
    pos = align_up(pos, h.alignment);
    e.offset = pos;
    pos += e.stored_size;
  }
  h.data_size = pos;
  h.file_size = h.data_offset + h.data_size;
}

// ---------------------------------------------------------------------------------
PayloadWriter::PayloadWriter(const OutputFile* file, uint64_t offset, uint8_t* staging, size_t capacity)
    : file_(file), start_(offset), pos_(offset), buf_(staging), cap_(capacity) {}

bool PayloadWriter::direct_run(const uint8_t* p, size_t n) const {
  constexpr size_t a = OutputFile::kDirectIoAlign;
  return file_->direct_io() && pos_ % a == 0 && n % a == 0 && reinterpret_cast<uintptr_t>(p) % a == 0;
}

Status PayloadWriter::append(const void* data, size_t n) {
  const auto* p = static_cast<const uint8_t*>(data);
  // A run goes straight from the caller's memory when it is large (through the page
  // cache) or, with direct I/O, of whole aligned blocks (64 KiB at least); else it is
  // copied into the staging buffer.
  if (used_ == 0 && (file_->direct_io() ? n >= (64u << 10) && direct_run(p, n) : n >= cap_)) return write_out(p, n);
  while (n > 0) {
    size_t k = std::min(n, cap_ - used_);
    std::memcpy(buf_ + used_, p, k);
    used_ += k;
    p += k;
    n -= k;
    if (used_ == cap_) GROKIT_TRY(flush());
  }
  return {};
}

Status PayloadWriter::append_bf16_of_f32(const float* values, size_t count) {
  while (count > 0) {
    size_t room = (cap_ - used_) / 2;
    if (room == 0) {
      GROKIT_TRY(flush());
      continue;
    }
    size_t k = std::min(count, room);
    auto* out = reinterpret_cast<uint16_t*>(buf_ + used_);
    for (size_t i = 0; i < k; ++i) out[i] = f32_to_bf16_bits(load_le<float>(values + i));
    used_ += 2 * k;
    values += k;
    count -= k;
  }
  return {};
}

Status PayloadWriter::zeros(size_t n) {
  while (n > 0) {
    size_t k = std::min(n, cap_ - used_);
    std::memset(buf_ + used_, 0, k);
    used_ += k;
    n -= k;
    if (used_ == cap_) GROKIT_TRY(flush());
  }
  return {};
}

Status PayloadWriter::flush() {
  if (used_ == 0) return {};
  size_t n = used_;
  used_ = 0;
  constexpr size_t a = OutputFile::kDirectIoAlign;
  const size_t padded = align_up(n, a);
  if (n % a != 0 && padded <= cap_ && direct_run(buf_, padded)) {
    // The tail as a whole block: zeros past the payload, which is hashed without them.
    std::memset(buf_ + n, 0, padded - n);
    hash_.update(buf_, n);
    GROKIT_TRY(file_->pwrite_direct(pos_, buf_, padded));
    pos_ += n;
    return {};
  }
  return write_out(buf_, n);
}

Status PayloadWriter::write_out(const uint8_t* p, size_t n) {
  hash_.update(p, n);
  if (direct_run(p, n)) {
    GROKIT_TRY(file_->pwrite_direct(pos_, p, n));
  } else {
    GROKIT_TRY(file_->pwrite_all(pos_, p, n));
    sync_file_range(file_->fd(), static_cast<off_t>(pos_), static_cast<off_t>(n), SYNC_FILE_RANGE_WRITE);
  }
  pos_ += n;
  return {};
}

Status write_shard_tail(const OutputFile& file, ShardHeader& header, const std::vector<IndexEntry>& entries) {
  std::string index = serialize_index(entries);
  header.index_xxh3 = xxh3_64(index.data(), index.size());
  std::string bytes = serialize_header(header);
  GROKIT_TRY(file.pwrite_all(header.index_offset, index.data(), index.size()));
  GROKIT_TRY(file.pwrite_all(0, bytes.data(), bytes.size()));
  GROKIT_TRY(file.truncate(header.file_size));  // a direct write's padded tail may reach past it
  return file.sync();
}

// ---------------------------------------------------------------------------------
Result<ShardReader> ShardReader::open(const std::string& path, const Expect& expect) {
  ShardReader r;
  GROKIT_ASSIGN_OR_RETURN(r.file_, MappedFile::open(path));
  GROKIT_ASSIGN_OR_RETURN(r.header_, parse_header(r.file_.data(), r.file_.size(), path));
  const ShardHeader& h = r.header_;
  if (expect.rank && *expect.rank != h.rank) return make_error(path, ": holds rank ", h.rank, ", expected rank ", *expect.rank);
  if (expect.rank_count && *expect.rank_count != h.rank_count)
    return make_error(path, ": belongs to a TP-", h.rank_count, " model, expected TP ", *expect.rank_count);
  if (expect.model_id && *expect.model_id != h.model_id)
    return make_error(path, ": model id ", hex64(h.model_id), " differs from the manifest's ", hex64(*expect.model_id),
                      " (a shard of another model?)");
  if (expect.file_size && *expect.file_size != h.file_size)
    return make_error(path, ": ", h.file_size, " bytes, the manifest records ", *expect.file_size);
  if (expect.index_xxh3 && *expect.index_xxh3 != h.index_xxh3)
    return make_error(path, ": index checksum ", hex64(h.index_xxh3), " differs from the manifest's ", hex64(*expect.index_xxh3));
  GROKIT_ASSIGN_OR_RETURN(r.entries_, parse_index(r.file_.data(), r.file_.size(), h, path));
  for (size_t i = 0; i < r.entries_.size(); ++i) r.by_name_.emplace(r.entries_[i].name, i);
  return r;
}

const IndexEntry* ShardReader::find(std::string_view name) const {
  auto it = by_name_.find(name);
  return it == by_name_.end() ? nullptr : &entries_[it->second];
}

Result<TensorView> ShardReader::view(std::string_view name, DType dtype, std::span<const int64_t> shape) const {
  const IndexEntry* e = find(name);
  if (e == nullptr) return make_error(path(), ": tensor '", name, "' not found");
  bool shape_ok = std::equal(shape.begin(), shape.end(), e->shape.begin(), e->shape.end());
  if (e->dtype != dtype || !shape_ok)
    return make_error(path(), ": tensor '", name, "': expected ", dtype_name(dtype), " ", shape_str(shape), " / actual ",
                      dtype_name(e->dtype), " ", shape_str(e->shape));
  if (e->compression != 0)
    return make_error(path(), ": tensor '", name, "' is zstd-compressed and cannot be mapped; decompress the model first");
  return TensorView{e, stored(*e), e->size};
}

Result<Q8View> ShardReader::q8(std::string_view name, std::span<const int64_t> shape) const {
  GROKIT_ASSIGN_OR_RETURN(TensorView v, view(name, DType::kQ8RowBlock, shape));
  Q8View q;
  q.rows = shape[shape.size() - 2];
  q.cols = shape.back();
  q.experts = shape.size() == 3 ? shape[0] : 1;
  q.blocks = v.entry->param;
  if (q.rows % q.blocks != 0)
    return make_error(path(), ": tensor '", name, "': ", q.rows, " rows do not split into ", q.blocks, " scale blocks");
  q.codes = reinterpret_cast<const int8_t*>(v.data);
  q.scales = reinterpret_cast<const uint16_t*>(v.data + q8_scales_offset(shape));
  return q;
}

WeightView WeightView::expert(int64_t e) const {
  GROKIT_CHECK(e >= 0 && e < experts);
  WeightView w = *this;
  w.experts = 1;
  if (dtype == DType::kQ8RowBlock) {
    w.q8.codes = q8.codes + e * rows * cols;
    w.q8.scales = q8.scales + e * static_cast<int64_t>(q8.blocks) * cols;
    w.q8.experts = 1;
  } else {
    w.data = data + static_cast<uint64_t>(e) * matrix_bytes;
  }
  return w;
}

Result<WeightView> ShardReader::weight(std::string_view name, std::span<const int64_t> shape) const {
  const IndexEntry* e = find(name);
  if (e == nullptr) return make_error(path(), ": tensor '", name, "' not found");
  if (shape.size() < 2 || shape.size() > 3) return make_error(path(), ": tensor '", name, "': not a weight matrix shape");
  WeightView w;
  w.dtype = e->dtype;
  w.rows = shape[shape.size() - 2];
  w.cols = shape.back();
  w.experts = shape.size() == 3 ? shape[0] : 1;
  w.param = e->param;
  switch (e->dtype) {
    case DType::kQ8RowBlock: {
      GROKIT_ASSIGN_OR_RETURN(w.q8, q8(name, shape));
      return w;
    }
    case DType::kQ4Group:
    case DType::kF8Column:
    case DType::kBF16: {
      GROKIT_ASSIGN_OR_RETURN(TensorView v, view(name, e->dtype, shape));
      w.data = v.data;
      w.matrix_bytes = v.size / static_cast<uint64_t>(w.experts);
      return w;
    }
    default:
      return make_error(path(), ": tensor '", name, "': dtype ", dtype_name(e->dtype), " is not a weight scheme");
  }
}

Status ShardReader::verify(const IndexEntry& e) const {
  uint64_t sum = xxh3_64(stored(e), e.stored_size);
  if (sum != e.xxh3)
    return make_error(path(), ": tensor '", e.name, "' (rank ", header_.rank, ", bytes ", header_.data_offset + e.offset,
                      "..", header_.data_offset + e.offset + e.stored_size, "): checksum mismatch (index records ",
                      hex64(e.xxh3), ", data hashes to ", hex64(sum), ")");
  return {};
}

Status ShardReader::verify_padding() const {
  auto zero = [&](uint64_t from, uint64_t to, const std::string& after) -> Status {
    for (uint64_t k = from; k < to; ++k) {
      if (file_.data()[k] != 0)
        return make_error(path(), ": byte ", k, ": padding after ", after, " is not zero (corrupt file)");
    }
    return {};
  };
  GROKIT_TRY(zero(header_.index_offset + header_.index_size, header_.data_offset, "the index"));
  std::vector<const IndexEntry*> by_offset;
  for (const auto& e : entries_) by_offset.push_back(&e);
  std::sort(by_offset.begin(), by_offset.end(), [](auto* a, auto* b) { return a->offset < b->offset; });
  uint64_t pos = 0;
  std::string prev = "the index";
  for (const IndexEntry* e : by_offset) {
    GROKIT_TRY(zero(header_.data_offset + pos, header_.data_offset + e->offset, prev));
    pos = e->offset + e->stored_size;
    prev = "tensor '" + e->name + "'";
  }
  return zero(header_.data_offset + pos, header_.file_size, prev);
}

Status ShardReader::read(const IndexEntry& e, std::vector<uint8_t>& out) const {
  if (e.compression != 0) {
    // The frame must declare exactly the size the index records, before any allocation.
    unsigned long long declared = ZSTD_getFrameContentSize(stored(e), e.stored_size);
    if (declared == ZSTD_CONTENTSIZE_ERROR || declared == ZSTD_CONTENTSIZE_UNKNOWN || declared != e.size)
      return make_error(path(), ": tensor '", e.name, "': the zstd frame does not declare the ", e.size,
                        " bytes the index records");
  }
  try {
    out.resize(e.size);
  } catch (const std::bad_alloc&) {
    return make_error(path(), ": tensor '", e.name, "': cannot allocate ", e.size, " bytes to read it");
  }
  if (e.compression == 0) {
    std::memcpy(out.data(), stored(e), e.size);
    return {};
  }
  size_t r = ZSTD_decompress(out.data(), out.size(), stored(e), e.stored_size);
  if (ZSTD_isError(r)) return make_error(path(), ": tensor '", e.name, "': zstd: ", ZSTD_getErrorName(r));
  if (r != e.size) return make_error(path(), ": tensor '", e.name, "': decompressed to ", r, " bytes, expected ", e.size);
  return {};
}

}  // namespace grokit::format
