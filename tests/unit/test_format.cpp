// Tests of the shard file format, its validating reader, the manifest and the model
// directory (format/format.h). Shard files are built in a temporary directory with
// serialize_header / serialize_index / layout_shard, then corrupted by hand, one
// failure class per test.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zstd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <new>
#include <stdexcept>
#include <string>
#include <vector>

#include "common/common.h"
#include "format/format.h"
#include "tests/unit/temp_dir.h"

namespace grokit::format {
namespace {

using Buf = std::vector<uint8_t>;

// ---------------------------------------------------------------------------------
// Helpers.
struct TempDir : grokit::testing::TempDir {
  TempDir() : grokit::testing::TempDir("format") {}
};

void write_file(const std::string& path, const std::string& bytes) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  ASSERT_TRUE(f.good()) << path;
}

Buf pattern_bytes(size_t n, uint8_t seed) {
  Buf b(n);
  for (size_t i = 0; i < n; ++i) b[i] = static_cast<uint8_t>(seed + i * 31 + (i >> 8));
  return b;
}
Buf f32_bytes(const std::vector<float>& v) {
  Buf b(v.size() * 4);
  std::memcpy(b.data(), v.data(), b.size());
  return b;
}
uint64_t xxh(const Buf& b) { return xxh3_64(b.data(), b.size()); }
uint64_t xxh(const std::string& s) { return xxh3_64(s.data(), s.size()); }

bool contains(const std::string& s, const std::string& frag) { return s.find(frag) != std::string::npos; }

#define EXPECT_ERROR_HAS(result, ...)                                                      \
  do {                                                                                     \
    const auto& r_ = (result);                                                             \
    ASSERT_FALSE(r_.ok()) << "accepted input that should be refused";                      \
    for (const std::string& frag_ : std::vector<std::string>{__VA_ARGS__})                 \
      EXPECT_TRUE(contains(r_.error().message, frag_))                                     \
          << "message: " << r_.error().message << "\nlacks: " << frag_;                   \
  } while (0)

// A shard under construction: entries with their stored bytes, then layout, then the
// file's bytes. Tests change fields between the steps to make one thing wrong.
struct ShardBuilder {
  ShardHeader h;
  std::vector<IndexEntry> entries;
  std::vector<Buf> data;  // stored bytes per entry
  bool fix_index_sum = true;
  bool fix_index_size = true;

  IndexEntry& add(const std::string& name, DType dt, std::vector<int64_t> shape, Buf bytes, uint32_t param = 0) {
    IndexEntry e;
    e.name = name;
    e.dtype = dt;
    e.param = param;
    e.shape = shape;
    e.global_shape = shape;
    e.size = e.stored_size = bytes.size();
    e.xxh3 = xxh(bytes);
    entries.push_back(e);
    data.push_back(std::move(bytes));
    return entries.back();
  }
  IndexEntry& add_zstd(const std::string& name, DType dt, std::vector<int64_t> shape, const Buf& raw) {
    Buf z(ZSTD_compressBound(raw.size()));
    size_t n = ZSTD_compress(z.data(), z.size(), raw.data(), raw.size(), 3);
    EXPECT_FALSE(ZSTD_isError(n));
    z.resize(n);
    IndexEntry& e = add(name, dt, std::move(shape), z);
    e.compression = 1;
    e.size = raw.size();
    return e;
  }
  void layout() { layout_shard(entries, h); }
  std::string index_bytes() const { return serialize_index(entries); }
  // The whole file. `raw_index` replaces the serialized index (its size is recorded).
  std::string bytes(const std::string* raw_index = nullptr) {
    std::string index = raw_index != nullptr ? *raw_index : serialize_index(entries);
    if (raw_index != nullptr || fix_index_size) h.index_size = index.size();
    if (fix_index_sum) h.index_xxh3 = xxh(index);
    std::string out(h.file_size, '\0');
    std::string header = serialize_header(h);
    std::memcpy(out.data(), header.data(), header.size());
    if (128 + index.size() <= out.size()) std::memcpy(out.data() + 128, index.data(), index.size());
    for (size_t i = 0; i < entries.size(); ++i) {
      uint64_t at;
      if (!checked_add(h.data_offset, entries[i].offset, &at) || at >= out.size()) continue;
      size_t n = std::min<uint64_t>(data[i].size(), out.size() - at);
      std::memcpy(out.data() + at, data[i].data(), n);
    }
    return out;
  }
};

// The index layout written by hand (SPEC §3.2), for entries serialize_index refuses to
// write (ndim 0, ndim 9, empty names).
struct RawEntry {
  std::string name;
  uint32_t dtype = 0, param = 0;
  uint32_t ndim = 1;
  int32_t split_axis = -1;
  uint32_t compression = 0;
  std::vector<int64_t> shape, global_shape;
  int64_t split_start = 0;
  uint64_t offset = 0, stored_size = 0, size = 0, xxh3 = 0;
};
std::string raw_index(const std::vector<RawEntry>& es) {
  std::string s;
  auto put = [&](auto v) {
    char b[sizeof v];
    std::memcpy(b, &v, sizeof v);
    s.append(b, sizeof v);
  };
  for (const auto& e : es) {
    put(static_cast<uint32_t>(e.name.size()));
    s += e.name;
    put(e.dtype);
    put(e.param);
    put(e.ndim);
    put(e.split_axis);
    put(e.compression);
    for (int64_t d : e.shape) put(d);
    for (int64_t d : e.global_shape) put(d);
    put(e.split_start);
    put(e.offset);
    put(e.stored_size);
    put(e.size);
    put(e.xxh3);
  }
  return s;
}

// The standard test shard: five raw tensors of every stored kind, one zstd tensor.
struct StdShard {
  ShardBuilder s;
  Buf a, b, c, q, q2, zraw;
  StdShard() {
    a = f32_bytes({1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27,
                   28, 29, 30, 31, 32});
    b = pattern_bytes(16 * 2, 3);
    c = pattern_bytes(15, 7);
    // q8 [2, 8, 16] with 2 blocks: 256 code bytes, then bf16 scales [2, 2, 16] at 256.
    q = pattern_bytes(256 + 2 * 2 * 16 * 2, 11);
    // q8 [12, 5] with 3 blocks: 60 code bytes, pad to 64, then scales [3, 5].
    q2 = pattern_bytes(64 + 3 * 5 * 2, 13);
    zraw.resize(4096 * 4);
    for (size_t i = 0; i < zraw.size(); ++i) zraw[i] = static_cast<uint8_t>((i / 64) % 5);
    s.h.rank = 0;
    s.h.rank_count = 1;
    s.h.model_id = 0x1234567890abcdefull;
    s.add("a", DType::kF32, {4, 8}, a);
    s.add("b", DType::kBF16, {16}, b);
    s.add("layer.0.c", DType::kI8, {3, 5}, c);
    s.add("layer.0.q", DType::kQ8RowBlock, {2, 8, 16}, q, 2);
    s.add("q2", DType::kQ8RowBlock, {12, 5}, q2, 3);
    s.add_zstd("z", DType::kF32, {4096}, zraw);
    s.layout();
  }
};

Result<ShardReader> open_bytes(const TempDir& d, const std::string& bytes, const std::string& name = "s.gkt") {
  write_file(d.file(name), bytes);
  return ShardReader::open(d.file(name));
}

// =================================================================================
// Layout and the happy path.

TEST(ShardFormat, SerializedIndexMatchesTheSpecLayout) {
  IndexEntry e;
  e.name = "layer.1.attn.query";
  e.dtype = DType::kQ8RowBlock;
  e.param = 1;
  e.shape = {64, 16};
  e.global_shape = {64, 32};
  e.split_axis = 1;
  e.split_start = 16;
  e.offset = 8192;
  e.stored_size = e.size = 1056;
  e.xxh3 = 0xfeedfacecafebeefull;
  RawEntry r;
  r.name = e.name;
  r.dtype = 16;
  r.param = 1;
  r.ndim = 2;
  r.split_axis = 1;
  r.shape = {64, 16};
  r.global_shape = {64, 32};
  r.split_start = 16;
  r.offset = 8192;
  r.stored_size = r.size = 1056;
  r.xxh3 = e.xxh3;
  EXPECT_EQ(serialize_index({e}), raw_index({r}));
  EXPECT_EQ(payload_size(DType::kQ8RowBlock, std::vector<int64_t>{64, 16}, 1), 1024u + 32u);
}

TEST(ShardFormat, HeaderRoundTrip) {
  ShardHeader h;
  h.rank = 3;
  h.rank_count = 8;
  h.model_id = 0x0102030405060708ull;
  h.tensor_count = 2;
  h.index_size = 200;
  h.data_offset = 4096;
  h.data_size = 8192;
  h.file_size = 4096 + 8192;
  h.index_xxh3 = 0xabcdef;
  std::string b = serialize_header(h);
  ASSERT_EQ(b.size(), kShardHeaderSize);
  EXPECT_EQ(0, std::memcmp(b.data(), "GROKITSH", 8));
  EXPECT_EQ(load_le<uint64_t>(b.data() + 120), xxh3_64(b.data(), 120));
  std::string file(h.file_size, '\0');
  std::memcpy(file.data(), b.data(), b.size());
  auto r = parse_header(reinterpret_cast<const uint8_t*>(file.data()), file.size(), "f");
  ASSERT_TRUE(r.ok()) << r.error().message;
  EXPECT_EQ(r->rank, 3u);
  EXPECT_EQ(r->rank_count, 8u);
  EXPECT_EQ(r->model_id, h.model_id);
  EXPECT_EQ(r->tensor_count, 2u);
  EXPECT_EQ(r->index_size, 200u);
  EXPECT_EQ(r->data_offset, 4096u);
  EXPECT_EQ(r->data_size, 8192u);
  EXPECT_EQ(r->index_xxh3, 0xabcdefu);
  EXPECT_EQ(shard_file_name(3, 8), "shard-00003-of-00008.gkt");
}

TEST(ShardReaderTest, OpensAndViewsEveryKind) {
  TempDir d;
  StdShard t;
  std::string bytes = t.s.bytes();
  auto r = open_bytes(d, bytes);
  ASSERT_TRUE(r.ok()) << r.error().message;
  const ShardHeader& h = r->header();
  EXPECT_EQ(h.tensor_count, 6u);
  EXPECT_EQ(h.model_id, 0x1234567890abcdefull);
  EXPECT_EQ(h.file_size, bytes.size());
  EXPECT_EQ(h.data_offset % kMinAlignment, 0u);
  ASSERT_EQ(r->entries().size(), 6u);
  for (const auto& e : r->entries()) EXPECT_EQ(e.offset % kMinAlignment, 0u) << e.name;
  const uint8_t* base = r->file().data() + h.data_offset;

  auto va = r->view("a", DType::kF32, std::vector<int64_t>{4, 8});
  ASSERT_TRUE(va.ok()) << va.error().message;
  EXPECT_EQ(va->data, base + r->find("a")->offset);  // into the map, no copy
  EXPECT_EQ(va->size, 128u);
  EXPECT_EQ(va->entry, r->find("a"));
  EXPECT_EQ(va->as<float>()[0], 1.0f);
  EXPECT_EQ(va->as<float>()[31], 32.0f);

  auto vb = r->view("b", DType::kBF16, std::vector<int64_t>{16});
  ASSERT_TRUE(vb.ok()) << vb.error().message;
  EXPECT_EQ(0, std::memcmp(vb->data, t.b.data(), t.b.size()));
  auto vc = r->view("layer.0.c", DType::kI8, std::vector<int64_t>{3, 5});
  ASSERT_TRUE(vc.ok()) << vc.error().message;
  EXPECT_EQ(vc->data, base + r->find("layer.0.c")->offset);
  EXPECT_EQ(0, std::memcmp(vc->data, t.c.data(), 15));

  auto q = r->q8("layer.0.q", std::vector<int64_t>{2, 8, 16});
  ASSERT_TRUE(q.ok()) << q.error().message;
  const uint8_t* qbase = base + r->find("layer.0.q")->offset;
  EXPECT_EQ(reinterpret_cast<const uint8_t*>(q->codes), qbase);
  EXPECT_EQ(reinterpret_cast<const uint8_t*>(q->scales), qbase + 256);
  EXPECT_EQ(q->experts, 2);
  EXPECT_EQ(q->rows, 8);
  EXPECT_EQ(q->cols, 16);
  EXPECT_EQ(q->blocks, 2u);
  EXPECT_EQ(0, std::memcmp(q->scales, t.q.data() + 256, 128));

  auto q2 = r->q8("q2", std::vector<int64_t>{12, 5});
  ASSERT_TRUE(q2.ok()) << q2.error().message;
  const uint8_t* q2base = base + r->find("q2")->offset;
  EXPECT_EQ(reinterpret_cast<const uint8_t*>(q2->codes), q2base);
  EXPECT_EQ(reinterpret_cast<const uint8_t*>(q2->scales), q2base + 64);  // codes padded to 64 bytes
  EXPECT_EQ(q2->experts, 1);
  EXPECT_EQ(q2->rows, 12);
  EXPECT_EQ(q2->cols, 5);
  EXPECT_EQ(q2->blocks, 3u);
  EXPECT_EQ(q8_scales_offset(std::vector<int64_t>{12, 5}), 64u);

  for (const auto& e : r->entries()) {
    Status s = r->verify(e);
    EXPECT_TRUE(s.ok()) << e.name << ": " << s.error().message;
  }
  std::vector<uint8_t> out;
  ASSERT_TRUE(r->read(*r->find("layer.0.c"), out).ok());
  EXPECT_EQ(out, t.c);
}

TEST(ShardReaderTest, ZstdEntryRoundTrips) {
  TempDir d;
  StdShard t;
  auto r = open_bytes(d, t.s.bytes());
  ASSERT_TRUE(r.ok()) << r.error().message;
  const IndexEntry* z = r->find("z");
  ASSERT_NE(z, nullptr);
  EXPECT_EQ(z->compression, 1u);
  EXPECT_LT(z->stored_size, z->size);
  EXPECT_TRUE(r->verify(*z).ok());
  std::vector<uint8_t> out;
  Status s = r->read(*z, out);
  ASSERT_TRUE(s.ok()) << s.error().message;
  EXPECT_EQ(out, t.zraw);
  // A compressed tensor cannot be mapped.
  EXPECT_ERROR_HAS(r->view("z", DType::kF32, std::vector<int64_t>{4096}), "'z'", "zstd-compressed");
}

TEST(ShardReaderTest, CorruptZstdStreamIsAnError) {
  TempDir d;
  StdShard t;
  // Keep only the first 8 bytes of the zstd frame, with a matching checksum, so that
  // only zstd can notice.
  size_t zi = 5;
  Buf cut(t.s.data[zi].begin(), t.s.data[zi].begin() + 8);
  t.s.data[zi] = cut;
  t.s.entries[zi].stored_size = cut.size();
  t.s.entries[zi].xxh3 = xxh(cut);
  t.s.layout();
  auto r = open_bytes(d, t.s.bytes());
  ASSERT_TRUE(r.ok()) << r.error().message;
  std::vector<uint8_t> out;
  EXPECT_ERROR_HAS(r->read(*r->find("z"), out), "'z'", "zstd");
}

// A compressed entry's size is checked only against its dtype and shape (up to 2^58
// bytes); read() must compare it with the zstd frame's declared content size before it
// allocates, so a small hostile shard gets an error, not a huge allocation or an exception.
TEST(ShardReaderTest, ReadOfACompressedEntryWithAHugeDeclaredSizeIsAnError) {
  TempDir d;
  ShardBuilder s;
  Buf raw(4096, 1);
  IndexEntry& e = s.add_zstd("z", DType::kI8, {1, 4096}, raw);
  // Claim 2^56 bytes: i8 [2^16, 2^40].
  e.shape = e.global_shape = {int64_t{1} << 16, int64_t{1} << 40};
  e.size = uint64_t{1} << 56;
  s.layout();
  auto r = open_bytes(d, s.bytes());
  ASSERT_TRUE(r.ok()) << r.error().message;
  std::vector<uint8_t> out;
  bool threw = false;
  Status st;
  try {
    st = r->read(*r->find("z"), out);
  } catch (const std::bad_alloc&) {
    threw = true;
  } catch (const std::length_error&) {
    threw = true;
  }
  EXPECT_FALSE(threw) << "read() threw instead of returning an error";
  if (!threw) {
    EXPECT_FALSE(st.ok());
  }
}

TEST(ShardReaderTest, LargerAlignmentAndExpectations) {
  TempDir d;
  ShardBuilder s;
  s.h.alignment = 65536;
  s.h.rank = 2;
  s.h.rank_count = 4;
  s.h.model_id = 77;
  s.add("x", DType::kF32, {3}, f32_bytes({1, 2, 3}));
  s.add("y", DType::kF32, {2}, f32_bytes({4, 5}));
  s.layout();
  std::string bytes = s.bytes();
  EXPECT_EQ(s.h.data_offset, 65536u);
  EXPECT_EQ(s.entries[1].offset, 65536u);
  write_file(d.file("s.gkt"), bytes);
  ShardReader::Expect ok;
  ok.rank = 2;
  ok.rank_count = 4;
  ok.model_id = 77;
  ok.file_size = bytes.size();
  ok.index_xxh3 = s.h.index_xxh3;
  auto r = ShardReader::open(d.file("s.gkt"), ok);
  ASSERT_TRUE(r.ok()) << r.error().message;
  auto v = r->view("y", DType::kF32, std::vector<int64_t>{2});
  ASSERT_TRUE(v.ok());
  EXPECT_EQ(v->as<float>()[1], 5.0f);

  auto expect_refused = [&](ShardReader::Expect e, const std::string& frag) {
    EXPECT_ERROR_HAS(ShardReader::open(d.file("s.gkt"), e), d.file("s.gkt"), frag);
  };
  ShardReader::Expect e1 = ok;
  e1.rank = 1;
  expect_refused(e1, "holds rank 2, expected rank 1");
  ShardReader::Expect e2 = ok;
  e2.rank_count = 8;
  expect_refused(e2, "TP-4 model, expected TP 8");
  ShardReader::Expect e3 = ok;
  e3.model_id = 78;
  expect_refused(e3, "model id 000000000000004d differs");
  ShardReader::Expect e4 = ok;
  e4.file_size = 12;
  expect_refused(e4, "the manifest records 12");
  ShardReader::Expect e5 = ok;
  e5.index_xxh3 = 5;
  expect_refused(e5, "index checksum");
}

// =================================================================================
// One corrupt file per failure class.

TEST(ShardCorrupt, BadMagic) {
  TempDir d;
  StdShard t;
  std::string b = t.s.bytes();
  std::memcpy(b.data(), "PK\x03\x04ZIP!", 8);
  EXPECT_ERROR_HAS(open_bytes(d, b), "s.gkt: byte 0: bad magic");
}

TEST(ShardCorrupt, FutureVersion) {
  TempDir d;
  StdShard t;
  t.s.h.version = kFormatVersion + 1;  // serialize_header recomputes the checksum
  EXPECT_ERROR_HAS(open_bytes(d, t.s.bytes()), "byte 8", "format version 2 is not supported",
                   "reads version 1");
  t.s.h.version = 0;
  EXPECT_ERROR_HAS(open_bytes(d, t.s.bytes()), "format version 0 is not supported");
}

TEST(ShardCorrupt, HeaderChecksumMismatch) {
  TempDir d;
  StdShard t;
  std::string b = t.s.bytes();
  b[24] ^= 0x01;  // one bit of the model id
  EXPECT_ERROR_HAS(open_bytes(d, b), "byte 120", "header checksum mismatch");
}

TEST(ShardCorrupt, TruncatedFiles) {
  TempDir d;
  StdShard t;
  std::string b = t.s.bytes();
  EXPECT_ERROR_HAS(open_bytes(d, b.substr(0, 100)), "100 bytes, shorter than the 128-byte shard header");
  EXPECT_ERROR_HAS(open_bytes(d, std::string()), "0 bytes, shorter than the 128-byte shard header");
  std::string cut = b.substr(0, b.size() - 10);
  EXPECT_ERROR_HAS(open_bytes(d, cut),
                   "the header records a file of " + std::to_string(b.size()) + " bytes but the file has " +
                       std::to_string(cut.size()) + " (truncated)");
  // Cut inside the index.
  EXPECT_ERROR_HAS(open_bytes(d, b.substr(0, 200)), "(truncated)");
  EXPECT_ERROR_HAS(open_bytes(d, b + "xx"), "(trailing data)");
}

TEST(ShardCorrupt, IndexChecksumMismatch) {
  TempDir d;
  StdShard t;
  std::string b = t.s.bytes();
  b[128 + 4] = 'x';  // first tensor's name: "a" -> "x"
  EXPECT_ERROR_HAS(open_bytes(d, b), "tensor index checksum mismatch", hex64(t.s.h.index_xxh3));
}

TEST(ShardCorrupt, EntryRunsPastTheDataSection) {
  TempDir d;
  StdShard t;
  IndexEntry& e = t.s.entries[4];  // q2, the last raw one before z
  e.offset = align_up(t.s.h.data_size, 4096);
  EXPECT_ERROR_HAS(open_bytes(d, t.s.bytes()), "index entry 4", "'q2'", "run past the data section");
  // offset + stored_size wraps around 2^64.
  StdShard t2;
  t2.s.entries[0].offset = ~uint64_t{0} - 4095;
  EXPECT_ERROR_HAS(open_bytes(d, t2.s.bytes()), "'a'", "run past the data section");
}

TEST(ShardCorrupt, OverlappingTensors) {
  TempDir d;
  StdShard t;
  t.s.entries[2].offset = t.s.entries[1].offset;  // layer.0.c over b
  EXPECT_ERROR_HAS(open_bytes(d, t.s.bytes()), "overlap", "'b'", "'layer.0.c'");
  // A large tensor that covers the next one's aligned start.
  StdShard t2;
  t2.s.entries[0].offset = 0;
  t2.s.entries[1].offset = 0 + 4096;
  t2.s.entries[0].shape = t2.s.entries[0].global_shape = {2048};
  t2.s.entries[0].size = t2.s.entries[0].stored_size = 8192;
  EXPECT_ERROR_HAS(open_bytes(d, t2.s.bytes()), "overlap", "'a'", "'b'");
}

TEST(ShardCorrupt, DuplicateNames) {
  TempDir d;
  StdShard t;
  t.s.entries[4].name = "layer.0.c";
  EXPECT_ERROR_HAS(open_bytes(d, t.s.bytes()), "tensor 'layer.0.c' appears twice in the index");
}

TEST(ShardCorrupt, WrongPayloadSizeForDtypeAndShape) {
  TempDir d;
  StdShard t;
  t.s.entries[0].size = t.s.entries[0].stored_size = 124;
  EXPECT_ERROR_HAS(open_bytes(d, t.s.bytes()), "'a'", "size 124 bytes does not match f32 [4, 8] (128 bytes)");
  // q8 whose row count does not split into its blocks.
  StdShard t2;
  t2.s.entries[4].param = 5;
  EXPECT_ERROR_HAS(open_bytes(d, t2.s.bytes()), "'q2'", "dtype q8rb with parameter 5 does not fit shape [12, 5]");
  // A raw tensor whose stored size differs from its size.
  StdShard t3;
  t3.s.entries[1].stored_size = 64;
  EXPECT_ERROR_HAS(open_bytes(d, t3.s.bytes()), "'b'", "raw tensor with stored size 64 != size 32");
}

TEST(ShardCorrupt, UnknownDtypeCode) {
  TempDir d;
  StdShard t;
  t.s.entries[1].dtype = static_cast<DType>(99);
  EXPECT_ERROR_HAS(open_bytes(d, t.s.bytes()), "index entry 1", "'b'", "unknown dtype code 99");
  // A reserved scheme without a defined layout is refused too.
  StdShard t2;
  t2.s.entries[1].dtype = DType::kQ4Group;
  EXPECT_ERROR_HAS(open_bytes(d, t2.s.bytes()), "'b'", "q4g");
}

TEST(ShardCorrupt, DimensionCountZeroAndNine) {
  TempDir d;
  for (uint32_t ndim : {0u, 9u}) {
    ShardBuilder s;
    s.add("t", DType::kI8, {4096}, Buf(4096, 1));
    s.layout();
    RawEntry r;
    r.name = "t";
    r.dtype = 2;
    r.ndim = ndim;
    r.shape.assign(ndim, 1);
    r.global_shape.assign(ndim, 1);
    r.stored_size = r.size = 1;
    std::string idx = raw_index({r});
    idx.resize(std::max<size_t>(idx.size(), 81), '\0');  // room for one entry as the header's count needs
    EXPECT_ERROR_HAS(open_bytes(d, s.bytes(&idx)), "'t'", std::to_string(ndim) + " dimensions (1 to 8 allowed)");
  }
}

TEST(ShardCorrupt, BadNames) {
  TempDir d;
  for (std::string name : {std::string("../x"), std::string("a/b"), std::string("a b"), std::string("x\n")}) {
    StdShard t;
    t.s.entries[0].name = name;
    EXPECT_ERROR_HAS(open_bytes(d, t.s.bytes()), "tensor name has invalid characters");
  }
  ShardBuilder s;
  s.add("t", DType::kI8, {16}, Buf(16, 1));
  s.layout();
  RawEntry r;
  r.name = "";
  r.shape = r.global_shape = {16};
  r.dtype = 2;
  r.stored_size = r.size = 16;
  std::string idx = raw_index({r});
  idx.resize(81, '\0');  // the smallest entry a name allows, so the header's count fits
  EXPECT_ERROR_HAS(open_bytes(d, s.bytes(&idx)), "name length 0 is out of range");
}

TEST(ShardCorrupt, MisalignedOffset) {
  TempDir d;
  StdShard t;
  t.s.entries[3].offset += 64;
  EXPECT_ERROR_HAS(open_bytes(d, t.s.bytes()), "'layer.0.q'",
                   "offset " + std::to_string(t.s.entries[3].offset) + " is not aligned to 4096");
}

TEST(ShardCorrupt, SliceOutsideTheGlobalShape) {
  TempDir d;
  StdShard t;
  IndexEntry& e = t.s.entries[0];  // a: f32 [4, 8]
  e.split_axis = 0;
  e.global_shape = {8, 8};
  e.split_start = 6;
  EXPECT_ERROR_HAS(open_bytes(d, t.s.bytes()), "'a'", "slice [6, +4) lies outside dimension 0 of [8, 8]");
  e.split_start = -1;
  EXPECT_ERROR_HAS(open_bytes(d, t.s.bytes()), "'a'", "slice [-1, +4)");
  // The slice itself is fine at 4: the file opens.
  e.split_start = 4;
  ASSERT_TRUE(open_bytes(d, t.s.bytes()).ok());
  // A dimension that is not split must match the global shape.
  e.global_shape = {8, 16};
  EXPECT_ERROR_HAS(open_bytes(d, t.s.bytes()), "'a'", "local shape [4, 8] does not match the whole tensor [8, 16]");
  // An axis out of range; an unsplit tensor with a start.
  e.global_shape = {8, 8};
  e.split_axis = 2;
  EXPECT_ERROR_HAS(open_bytes(d, t.s.bytes()), "'a'", "split axis 2 is invalid");
  e.split_axis = -1;
  e.global_shape = e.shape;
  e.split_start = 3;
  EXPECT_ERROR_HAS(open_bytes(d, t.s.bytes()), "'a'", "an unsplit tensor has split start 3");
  // Zero and negative dimensions.
  e.split_start = 0;
  e.shape = e.global_shape = {4, 0};
  EXPECT_ERROR_HAS(open_bytes(d, t.s.bytes()), "'a'", "dimension 1 is out of range");
}

TEST(ShardCorrupt, UnknownCompression) {
  TempDir d;
  StdShard t;
  t.s.entries[5].compression = 2;
  EXPECT_ERROR_HAS(open_bytes(d, t.s.bytes()), "'z'", "unknown compression 2");
  StdShard t2;
  t2.s.entries[5].stored_size = 0;
  EXPECT_ERROR_HAS(open_bytes(d, t2.s.bytes()), "'z'", "compressed tensor with no stored bytes");
}

TEST(ShardCorrupt, DataChecksumMismatchNamesTheTensor) {
  TempDir d;
  StdShard t;
  std::string b = t.s.bytes();
  b[t.s.h.data_offset + t.s.entries[2].offset + 3] ^= 0x40;
  auto r = open_bytes(d, b);
  ASSERT_TRUE(r.ok()) << r.error().message;  // data is checked by verify(), not open()
  EXPECT_TRUE(r->verify(*r->find("a")).ok());
  EXPECT_ERROR_HAS(r->verify(*r->find("layer.0.c")), "s.gkt", "tensor 'layer.0.c'", "checksum mismatch",
                   hex64(t.s.entries[2].xxh3));
  // The compressed one is checked over its stored bytes.
  std::string b2 = t.s.bytes();
  b2[t.s.h.data_offset + t.s.entries[5].offset] ^= 0x01;
  auto r2 = open_bytes(d, b2, "s2.gkt");
  ASSERT_TRUE(r2.ok()) << r2.error().message;
  EXPECT_ERROR_HAS(r2->verify(*r2->find("z")), "tensor 'z'", "checksum mismatch");
}

TEST(ShardCorrupt, ViewWithTheWrongDtypeOrShape) {
  TempDir d;
  StdShard t;
  auto r = open_bytes(d, t.s.bytes());
  ASSERT_TRUE(r.ok()) << r.error().message;
  EXPECT_ERROR_HAS(r->view("a", DType::kBF16, std::vector<int64_t>{4, 8}), "tensor 'a'",
                   "expected bf16 [4, 8] / actual f32 [4, 8]");
  EXPECT_ERROR_HAS(r->view("a", DType::kF32, std::vector<int64_t>{8, 4}), "tensor 'a'",
                   "expected f32 [8, 4] / actual f32 [4, 8]");
  EXPECT_ERROR_HAS(r->view("a", DType::kF32, std::vector<int64_t>{32}), "expected f32 [32] / actual f32 [4, 8]");
  EXPECT_ERROR_HAS(r->view("a", DType::kF32, std::vector<int64_t>{4, 8, 1}), "expected f32 [4, 8, 1]");
  EXPECT_ERROR_HAS(r->q8("layer.0.q", std::vector<int64_t>{2, 16, 8}),
                   "expected q8rb [2, 16, 8] / actual q8rb [2, 8, 16]");
  EXPECT_ERROR_HAS(r->q8("a", std::vector<int64_t>{4, 8}), "expected q8rb [4, 8] / actual f32 [4, 8]");
}

TEST(ShardCorrupt, TensorNotFound) {
  TempDir d;
  StdShard t;
  auto r = open_bytes(d, t.s.bytes());
  ASSERT_TRUE(r.ok()) << r.error().message;
  EXPECT_EQ(r->find("layer.0"), nullptr);
  EXPECT_EQ(r->find("A"), nullptr);
  EXPECT_ERROR_HAS(r->view("layer.1.c", DType::kI8, std::vector<int64_t>{3, 5}), "s.gkt", "tensor 'layer.1.c' not found");
  EXPECT_ERROR_HAS(r->q8("nope", std::vector<int64_t>{2, 2}), "tensor 'nope' not found");
}

TEST(ShardCorrupt, HugeTensorCount) {
  TempDir d;
  StdShard t;
  t.s.h.tensor_count = uint64_t{1} << 62;
  EXPECT_ERROR_HAS(open_bytes(d, t.s.bytes()), "header claims 4611686018427387904 tensors",
                   "the index has room for at most");
  // Fewer than the index holds: bytes left over.
  StdShard t2;
  t2.s.h.tensor_count = 5;
  EXPECT_ERROR_HAS(open_bytes(d, t2.s.bytes()), "bytes after its last entry");
}

TEST(ShardCorrupt, OtherHeaderFields) {
  TempDir d;
  auto refused = [&](auto mutate, const std::string& frag) {
    StdShard t;
    mutate(t.s);
    EXPECT_ERROR_HAS(open_bytes(d, t.s.bytes()), frag);
  };
  refused([](ShardBuilder& s) { s.h.rank = 1; }, "rank 1 of 1 is invalid");
  refused([](ShardBuilder& s) { s.h.rank_count = 0; }, "rank 0 of 0 is invalid");
  refused([](ShardBuilder& s) { s.h.rank_count = 5000; }, "rank 0 of 5000 is invalid");
  refused([](ShardBuilder& s) { s.h.alignment = 4097; }, "byte 80: alignment 4097 is not a power of two");
  refused([](ShardBuilder& s) { s.h.alignment = 2048; }, "alignment 2048");
  refused([](ShardBuilder& s) { s.h.flags = 4; }, "byte 84: unknown flags 4");
  refused([](ShardBuilder& s) { s.h.index_offset = 256; }, "index offset 256, expected 128");
  refused(
      [](ShardBuilder& s) {
        s.fix_index_size = false;
        s.h.index_size = ~uint64_t{0} - 64;
      },
      "runs past the end of the file");
  refused([](ShardBuilder& s) { s.h.data_offset += 64; }, "is unaligned or overlaps the index");
  refused([](ShardBuilder& s) { s.h.data_size -= 1; }, "does not end at the end of the file");
  // Header size field, and a reserved byte, each with a recomputed header checksum.
  StdShard t;
  std::string b = t.s.bytes();
  std::string c = b;
  store_le<uint32_t>(b.data() + 12, 64);
  store_le<uint64_t>(b.data() + 120, xxh3_64(b.data(), 120));
  EXPECT_ERROR_HAS(open_bytes(d, b), "byte 12: header size 64, expected 128");
  c[100] = 1;
  store_le<uint64_t>(c.data() + 120, xxh3_64(c.data(), 120));
  EXPECT_ERROR_HAS(open_bytes(d, c), "byte 100: reserved header byte is not zero");
}

TEST(ShardCorrupt, NotAFile) {
  TempDir d;
  EXPECT_ERROR_HAS(ShardReader::open(d.file("missing.gkt")), "missing.gkt", "cannot open");
  EXPECT_ERROR_HAS(ShardReader::open(d.path()), "not a regular file");
}

// =================================================================================
// PayloadWriter: direct I/O and the page cache write the same shard.

// Four payloads with ragged ends, written through every path of the writer: small
// appends through the staging buffer, large runs from aligned and from unaligned memory,
// zeros, bf16 of f32. Returns the file's bytes; *direct says whether it went direct.
static std::string write_ragged_shard(const std::string& path, bool use_direct, bool* direct) {
  std::vector<IndexEntry> entries;
  for (auto [name, n] :
       {std::pair<const char*, int64_t>{"a", 5000}, {"b", 3 * 8192 + 17}, {"c", 100}, {"d", 3 * 65536 + 5}}) {
    IndexEntry e;
    e.name = name;
    e.dtype = DType::kI8;
    e.shape = e.global_shape = {n};
    e.stored_size = e.size = static_cast<uint64_t>(n);
    entries.push_back(e);
  }
  ShardHeader h;
  layout_shard(entries, h);
  auto f = OutputFile::open(path, OutputFile::Mode::kCreateExclusive);
  EXPECT_TRUE(f.ok()) << f.error().message;
  if (!f.ok()) return {};
  *direct = use_direct && f->enable_direct_io();
  AlignedBuffer staging(8192, OutputFile::kDirectIoAlign), big_staging(1 << 20, OutputFile::kDirectIoAlign);
  AlignedBuffer source(3 * 65536 + 4096, OutputFile::kDirectIoAlign);
  for (size_t i = 0; i < source.size(); ++i) source.data()[i] = static_cast<uint8_t>(i * 7 + 3);
  for (size_t i = 0; i < entries.size(); ++i) {
    const AlignedBuffer& st = i == 3 ? big_staging : staging;
    PayloadWriter w(&*f, h.data_offset + entries[i].offset, st.data(), st.size());
    const uint64_t n = entries[i].size;
    if (i == 0) {  // small pieces, then bf16 of f32, then zeros
      for (size_t k = 0; k < 4000; k += 1000) EXPECT_TRUE(w.append(source.data() + k, 1000).ok());
      std::vector<float> v(250);
      for (size_t k = 0; k < v.size(); ++k) v[k] = 0.37f * static_cast<float>(k) - 40.0f;
      EXPECT_TRUE(w.append_bf16_of_f32(v.data(), v.size()).ok());
      EXPECT_TRUE(w.zeros(n - w.written()).ok());
    } else if (i == 1) {  // a large aligned run, then a large unaligned one
      EXPECT_TRUE(w.append(source.data(), 2 * 8192).ok());
      EXPECT_TRUE(w.append(source.data() + 1, n - 2 * 8192).ok());
    } else if (i == 2) {
      EXPECT_TRUE(w.append(source.data() + 5, n).ok());
    } else {  // whole aligned blocks smaller than the staging buffer, then a ragged rest
      EXPECT_TRUE(w.append(source.data(), 2 * 65536).ok());
      EXPECT_TRUE(w.append(source.data() + 3, n - 2 * 65536).ok());
    }
    EXPECT_TRUE(w.flush().ok());
    EXPECT_EQ(w.written(), n) << entries[i].name;
    entries[i].xxh3 = w.digest();
  }
  Status s = write_shard_tail(*f, h, entries);
  EXPECT_TRUE(s.ok()) << s.error().message;
  if (*direct) {
    EXPECT_TRUE(f->direct_io()) << "the kernel refused an aligned direct write";
  }
  EXPECT_TRUE(f->close().ok());
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

TEST(PayloadWriterTest, DirectIoAndThePageCacheWriteTheSameShard) {
  TempDir d;
  bool direct = false, buffered = false;
  const std::string a = write_ragged_shard(d.file("direct.gkt"), true, &direct);
  const std::string b = write_ragged_shard(d.file("buffered.gkt"), false, &buffered);
  EXPECT_FALSE(buffered);
  std::printf("direct I/O on %s: %s\n", d.path().c_str(), direct ? "used" : "refused by the file system");
  ASSERT_FALSE(b.empty());
  EXPECT_EQ(a.size(), b.size());  // the padded tail of the last payload was cut back
  EXPECT_TRUE(a == b);
  for (const char* name : {"direct.gkt", "buffered.gkt"}) {
    auto r = ShardReader::open(d.file(name));
    ASSERT_TRUE(r.ok()) << r.error().message;
    EXPECT_EQ(r->header().file_size, b.size());
    for (const auto& e : r->entries()) {
      Status s = r->verify(e);
      EXPECT_TRUE(s.ok()) << name << " " << e.name << ": " << s.error().message;
    }
    Status p = r->verify_padding();
    EXPECT_TRUE(p.ok()) << name << ": " << p.error().message;
  }
}

TEST(PayloadWriterTest, UnalignedDirectWritesGoThroughThePageCache) {
  TempDir d;
  auto f = OutputFile::open(d.file("x"), OutputFile::Mode::kCreateExclusive);
  ASSERT_TRUE(f.ok()) << f.error().message;
  const bool direct = f->enable_direct_io();
  AlignedBuffer buf(3 * 4096, OutputFile::kDirectIoAlign);
  for (size_t i = 0; i < buf.size(); ++i) buf.data()[i] = static_cast<uint8_t>(i ^ (i >> 8));
  // An unaligned address, offset and size each: written all the same, direct I/O kept.
  ASSERT_TRUE(f->pwrite_direct(0, buf.data(), 4096).ok());
  ASSERT_TRUE(f->pwrite_direct(4096, buf.data() + 1, 4096).ok());
  ASSERT_TRUE(f->pwrite_direct(8193, buf.data() + 4096, 100).ok());
  ASSERT_TRUE(f->pwrite_direct(8192, buf.data() + 8192, 1).ok());
  EXPECT_EQ(f->direct_io(), direct);
  ASSERT_TRUE(f->close().ok());
  std::ifstream in(d.file("x"), std::ios::binary);
  std::string got(std::istreambuf_iterator<char>(in), {});
  ASSERT_EQ(got.size(), 8293u);
  EXPECT_EQ(0, std::memcmp(got.data(), buf.data(), 4096));
  EXPECT_EQ(0, std::memcmp(got.data() + 4096, buf.data() + 1, 4096));
  EXPECT_EQ(static_cast<uint8_t>(got[8192]), buf.data()[8192]);
  EXPECT_EQ(0, std::memcmp(got.data() + 8193, buf.data() + 4096, 100));
}

// =================================================================================
// Offsets past 4 GiB, in a sparse file.

TEST(ShardReaderTest, TensorPastFourGiBInASparseFile) {
  TempDir d;
  ShardBuilder s;
  const uint64_t big = (uint64_t{5} << 30) + 12345;  // never written: a hole
  IndexEntry e;
  e.name = "big";
  e.dtype = DType::kI8;
  e.shape = e.global_shape = {static_cast<int64_t>(big)};
  e.size = e.stored_size = big;
  e.xxh3 = 0;
  s.entries.push_back(e);
  s.data.push_back({});
  std::vector<float> far(1024);
  for (size_t i = 0; i < far.size(); ++i) far[i] = static_cast<float>(i) * 0.5f - 7.0f;
  s.add("far", DType::kF32, {1024}, f32_bytes(far));
  s.layout();
  const IndexEntry& fe = s.entries[1];
  ASSERT_GT(fe.offset, uint64_t{1} << 32);
  ASSERT_GT(s.h.data_offset + fe.offset, uint64_t{5} << 30);
  std::string index = s.index_bytes();
  s.h.index_xxh3 = xxh(index);
  std::string header = serialize_header(s.h);

  std::string path = d.file("sparse.gkt");
  int fd = ::open(path.c_str(), O_CREAT | O_RDWR | O_TRUNC | O_CLOEXEC, 0644);
  ASSERT_GE(fd, 0) << std::strerror(errno);
  if (::ftruncate(fd, static_cast<off_t>(s.h.file_size)) != 0) {
    int err = errno;
    ::close(fd);
    GTEST_SKIP() << "the filesystem of " << d.path() << " refuses a sparse file of " << s.h.file_size
                 << " bytes: " << std::strerror(err);
  }
  auto pw = [&](const void* p, size_t n, uint64_t off) {
    return ::pwrite(fd, p, n, static_cast<off_t>(off)) == static_cast<ssize_t>(n);
  };
  const Buf& fb = s.data[1];
  bool ok = pw(header.data(), header.size(), 0) && pw(index.data(), index.size(), 128) &&
            pw(fb.data(), fb.size(), s.h.data_offset + fe.offset);
  struct stat st {};
  ::fstat(fd, &st);
  ::close(fd);
  ASSERT_TRUE(ok) << std::strerror(errno);
  ASSERT_EQ(static_cast<uint64_t>(st.st_size), s.h.file_size);
  if (static_cast<uint64_t>(st.st_blocks) * 512 > (uint64_t{64} << 20))
    GTEST_SKIP() << "the filesystem allocated " << st.st_blocks * 512 << " bytes: it does not keep holes";

  auto r = ShardReader::open(path);
  ASSERT_TRUE(r.ok()) << r.error().message;
  EXPECT_EQ(r->header().file_size, s.h.file_size);
  const IndexEntry* f = r->find("far");
  ASSERT_NE(f, nullptr);
  EXPECT_EQ(f->offset, fe.offset);
  auto v = r->view("far", DType::kF32, std::vector<int64_t>{1024});
  ASSERT_TRUE(v.ok()) << v.error().message;
  EXPECT_EQ(v->data, r->file().data() + s.h.data_offset + fe.offset);
  EXPECT_EQ(0, std::memcmp(v->data, far.data(), 4096));
  Status vs = r->verify(*f);
  EXPECT_TRUE(vs.ok()) << vs.error().message;
  // The hole is viewable too (not read here).
  auto vb = r->view("big", DType::kI8, std::vector<int64_t>{static_cast<int64_t>(big)});
  ASSERT_TRUE(vb.ok()) << vb.error().message;
  EXPECT_EQ(vb->size, big);
  EXPECT_EQ(vb->data, r->file().data() + s.h.data_offset);
}

// =================================================================================
// The manifest and the model directory.

ModelConfig tiny_config() {
  ModelConfig c;
  c.vocab_size = 256;
  c.emb_size = 64;
  c.key_size = 16;
  c.num_q_heads = 4;
  c.num_kv_heads = 2;
  c.num_layers = 2;
  c.widening_factor = 2.0;
  c.num_experts = 4;
  c.num_selected_experts = 2;
  c.attn_output_scale_blocks = 2;
  c.moe_down_scale_blocks = 2;
  c.sequence_len = 128;
  return c;
}

Manifest tiny_manifest(uint32_t tp) {
  Manifest m;
  m.config = tiny_config();
  m.tp = tp;
  m.scheme = "int8";
  m.model_id = compute_model_id(m.config, tp, m.scheme);
  m.tensor_count = 2;
  m.producer = "grokit test";
  m.source = "ckpt-0";
  m.config_source = "test";
  for (uint32_t r = 0; r < tp; ++r) {
    ShardInfo s;
    s.file = shard_file_name(r, tp);
    s.rank = r;
    s.size = 8192 + r;
    s.tensor_count = 2;
    s.index_xxh3 = 0x1111 * (r + 1);
    m.shards.push_back(s);
  }
  FileInfo tok;
  tok.name = kTokenizerFile;
  tok.size = 10;
  tok.xxh3 = 0xabc;
  m.tokenizer = tok;
  m.source_files.push_back({"tensor00000_000", 123, 0, "embedding"});
  return m;
}

bool replace_once(std::string& s, const std::string& from, const std::string& to) {
  size_t p = s.find(from);
  if (p == std::string::npos) return false;
  s.replace(p, from.size(), to);
  return true;
}

TEST(ManifestTest, RoundTrip) {
  Manifest m = tiny_manifest(2);
  std::string j = m.to_json();
  auto r = Manifest::from_json(j, "manifest.json");
  ASSERT_TRUE(r.ok()) << r.error().message;
  EXPECT_EQ(r->format_version, kFormatVersion);
  EXPECT_EQ(r->tp, 2u);
  EXPECT_EQ(r->model_id, m.model_id);
  EXPECT_EQ(r->scheme, "int8");
  EXPECT_EQ(r->alignment, kMinAlignment);
  EXPECT_EQ(r->tensor_count, 2u);
  EXPECT_EQ(r->producer, "grokit test");
  EXPECT_EQ(r->source, "ckpt-0");
  EXPECT_EQ(r->config_source, "test");
  EXPECT_EQ(r->config.to_json(), m.config.to_json());
  EXPECT_EQ(r->config.num_layers, 2);
  EXPECT_EQ(r->config.ffn(), m.config.ffn());
  ASSERT_EQ(r->shards.size(), 2u);
  for (uint32_t i = 0; i < 2; ++i) {
    EXPECT_EQ(r->shards[i].file, shard_file_name(i, 2));
    EXPECT_EQ(r->shards[i].rank, i);
    EXPECT_EQ(r->shards[i].size, 8192u + i);
    EXPECT_EQ(r->shards[i].index_xxh3, 0x1111u * (i + 1));
  }
  ASSERT_TRUE(r->tokenizer.has_value());
  EXPECT_EQ(r->tokenizer->size, 10u);
  EXPECT_EQ(r->tokenizer->xxh3, 0xabcu);
  ASSERT_EQ(r->source_files.size(), 1u);
  EXPECT_EQ(r->source_files[0].name, "tensor00000_000");
  EXPECT_EQ(r->source_files[0].size, 123u);
  EXPECT_EQ(r->source_files[0].tensor, "embedding");
  EXPECT_EQ(r->to_json(), j);  // canonical
  // Without a tokenizer.
  m.tokenizer.reset();
  auto r2 = Manifest::from_json(m.to_json(), "manifest.json");
  ASSERT_TRUE(r2.ok()) << r2.error().message;
  EXPECT_FALSE(r2->tokenizer.has_value());
}

TEST(ManifestTest, ModelIdIsStableAndSensitive) {
  ModelConfig c = tiny_config();
  uint64_t id = compute_model_id(c, 2, "int8");
  EXPECT_EQ(id, compute_model_id(c, 2, "int8"));
  EXPECT_NE(id, compute_model_id(c, 4, "int8"));
  EXPECT_NE(id, compute_model_id(c, 2, "int4"));
  ModelConfig c2 = c;
  c2.rope_base = 10001.0;
  EXPECT_NE(id, compute_model_id(c2, 2, "int8"));
  // An explicit ffn_size equal to the derived one is the same model.
  ModelConfig c3 = c;
  c3.ffn_size = c.ffn();
  EXPECT_EQ(id, compute_model_id(c3, 2, "int8"));
}

TEST(ManifestTest, EditedConfigIsAModelIdMismatch) {
  std::string j = tiny_manifest(2).to_json();
  ASSERT_TRUE(replace_once(j, "\"num_layers\": 2", "\"num_layers\": 3"));
  EXPECT_ERROR_HAS(Manifest::from_json(j, "m.json"), "m.json", "model_id does not match the config");
  std::string j2 = tiny_manifest(2).to_json();
  ASSERT_TRUE(replace_once(j2, "\"scheme\": \"int8\"", "\"scheme\": \"int4\""));
  EXPECT_ERROR_HAS(Manifest::from_json(j2, "m.json"), "model_id does not match");
}

TEST(ManifestTest, WrongShardFileName) {
  for (const char* bad : {"../x", "/etc/passwd", "shard-00000-of-00004.gkt", "shard-00001-of-00002.gkt"}) {
    std::string j = tiny_manifest(2).to_json();
    ASSERT_TRUE(replace_once(j, "\"shard-00000-of-00002.gkt\"", std::string("\"") + bad + "\""));
    EXPECT_ERROR_HAS(Manifest::from_json(j, "m.json"),
                     std::string("shards[0] names file '") + bad + "', expected 'shard-00000-of-00002.gkt'");
  }
  std::string j = tiny_manifest(2).to_json();
  ASSERT_TRUE(replace_once(j, "\"file\": \"tokenizer.model\"", "\"file\": \"../tokenizer.model\""));
  EXPECT_ERROR_HAS(Manifest::from_json(j, "m.json"), "tokenizer file must be 'tokenizer.model'");
}

TEST(ManifestTest, TensorParallelDegreeAndShardCountDisagree) {
  Manifest m = tiny_manifest(2);
  m.shards.pop_back();
  EXPECT_ERROR_HAS(Manifest::from_json(m.to_json(), "m.json"), "1 shards listed for TP 2");
  Manifest m2 = tiny_manifest(2);
  m2.shards.push_back(m2.shards.back());
  EXPECT_ERROR_HAS(Manifest::from_json(m2.to_json(), "m.json"), "3 shards listed for TP 2");
  Manifest m3 = tiny_manifest(2);
  std::swap(m3.shards[0], m3.shards[1]);
  EXPECT_ERROR_HAS(Manifest::from_json(m3.to_json(), "m.json"), "shards[0] has rank 1");
  Manifest m4 = tiny_manifest(1);
  m4.tp = 0;
  m4.model_id = compute_model_id(m4.config, 0, "int8");
  EXPECT_ERROR_HAS(Manifest::from_json(m4.to_json(), "m.json"), "tensor_parallel 0 is out of range");
}

TEST(ManifestTest, ShardTensorCountAndAlignment) {
  Manifest m = tiny_manifest(2);
  m.shards[1].tensor_count = 3;
  EXPECT_ERROR_HAS(Manifest::from_json(m.to_json(), "m.json"), "shards[1] holds 3 tensors, the model 2");
  for (uint32_t a : {0u, 100u, 2048u, 12288u}) {
    Manifest m2 = tiny_manifest(1);
    m2.alignment = a;
    EXPECT_ERROR_HAS(Manifest::from_json(m2.to_json(), "m.json"),
                     "alignment " + std::to_string(a) + " is not a power of two");
  }
  Manifest m3 = tiny_manifest(1);
  m3.alignment = 65536;
  auto r = Manifest::from_json(m3.to_json(), "m.json");
  ASSERT_TRUE(r.ok()) << r.error().message;
  EXPECT_EQ(r->alignment, 65536u);
}

TEST(ManifestTest, FutureFormatVersion) {
  Manifest m = tiny_manifest(1);
  m.format_version = kFormatVersion + 1;
  EXPECT_ERROR_HAS(Manifest::from_json(m.to_json(), "m.json"), "m.json", "format version 2 is not supported");
  m.format_version = 0;
  EXPECT_ERROR_HAS(Manifest::from_json(m.to_json(), "m.json"), "format version 0 is not supported");
}

TEST(ManifestTest, MalformedDocuments) {
  EXPECT_ERROR_HAS(Manifest::from_json("{", "m.json"), "m.json: not a JSON object");
  EXPECT_ERROR_HAS(Manifest::from_json("[1]", "m.json"), "not a JSON object");
  std::string j = tiny_manifest(1).to_json();
  std::string a = j;
  ASSERT_TRUE(replace_once(a, "\"format\": \"grokit-model\"", "\"format\": \"other\""));
  EXPECT_ERROR_HAS(Manifest::from_json(a, "m.json"), "format 'other' is not grokit-model");
  std::string b = j;
  ASSERT_TRUE(replace_once(b, "\"tensor_parallel\": 1", "\"tensor_parallel\": \"1\""));
  EXPECT_ERROR_HAS(Manifest::from_json(b, "m.json"), "key 'tensor_parallel' has the wrong type");
  std::string c = j;
  ASSERT_TRUE(replace_once(c, "\"tensor_parallel\": 1", "\"tensor_parallel\": -1"));
  EXPECT_ERROR_HAS(Manifest::from_json(c, "m.json"), "key 'tensor_parallel' has the wrong type");
  std::string e = j;
  ASSERT_TRUE(replace_once(e, "\"producer\"", "\"produced_by\""));
  EXPECT_ERROR_HAS(Manifest::from_json(e, "m.json"), "missing key 'producer'");
  std::string f = j;
  ASSERT_TRUE(replace_once(f, hex64(compute_model_id(tiny_config(), 1, "int8")), "XYZ"));
  EXPECT_ERROR_HAS(Manifest::from_json(f, "m.json"), "key 'model_id' is not 16 hex digits");
  std::string g = j;
  ASSERT_TRUE(replace_once(g, "\"num_layers\": 2", "\"num_layerz\": 2"));
  EXPECT_ERROR_HAS(Manifest::from_json(g, "m.json"), "m.json config", "unknown config key 'num_layerz'");
}

// A complete tiny model directory: two shards, a tokenizer and the manifest.
struct TinyModel {
  TempDir dir;
  Manifest m;
  std::vector<std::string> shard_bytes;
  explicit TinyModel(uint32_t tp = 2, bool write_manifest = true) {
    m = tiny_manifest(tp);
    for (uint32_t r = 0; r < tp; ++r) {
      ShardBuilder s;
      s.h.rank = r;
      s.h.rank_count = tp;
      s.h.model_id = m.model_id;
      s.add("final_norm", DType::kF32, {64}, pattern_bytes(256, static_cast<uint8_t>(r)));
      s.add("layer.0.attn.norm_in", DType::kF32, {64}, pattern_bytes(256, static_cast<uint8_t>(r + 9)));
      s.layout();
      std::string b = s.bytes();
      write_file(dir.file(shard_file_name(r, tp)), b);
      m.shards[r].size = b.size();
      m.shards[r].index_xxh3 = s.h.index_xxh3;
      m.shards[r].tensor_count = 2;
      shard_bytes.push_back(b);
    }
    write_file(dir.file(kTokenizerFile), "0123456789");
    if (write_manifest) save();
  }
  void save() { write_file(dir.file(kManifestFile), m.to_json()); }
};

TEST(ModelDirTest, OpensACompleteDirectory) {
  TinyModel t;
  auto model = Model::open(t.dir.path());
  ASSERT_TRUE(model.ok()) << model.error().message;
  EXPECT_EQ(model->manifest().tp, 2u);
  EXPECT_EQ(model->config().num_layers, 2);
  EXPECT_EQ(model->shard_path(1), t.dir.file("shard-00001-of-00002.gkt"));
  for (uint32_t r = 0; r < 2; ++r) {
    auto s = model->open_shard(r);
    ASSERT_TRUE(s.ok()) << s.error().message;
    EXPECT_EQ(s->header().rank, r);
    auto v = s->view("final_norm", DType::kF32, std::vector<int64_t>{64});
    ASSERT_TRUE(v.ok()) << v.error().message;
    EXPECT_EQ(v->data[0], static_cast<uint8_t>(r));
  }
  EXPECT_ERROR_HAS(model->open_shard(2), "rank 2 out of range for TP 2");
}

TEST(ModelDirTest, ShardsWithoutManifestAreAnIncompleteConversion) {
  TinyModel t(2, /*write_manifest=*/false);
  EXPECT_ERROR_HAS(Model::open(t.dir.path()), t.dir.path(), "no manifest.json", "incomplete conversion");
  TempDir d2;
  ASSERT_EQ(::mkdir(d2.file(".grokit-convert").c_str(), 0755), 0);
  EXPECT_ERROR_HAS(Model::open(d2.path()), "incomplete conversion");
  // Any shard file, whatever its rank and degree.
  TempDir d3;
  write_file(d3.file("shard-00002-of-00003.gkt"), "x");
  EXPECT_ERROR_HAS(Model::open(d3.path()), "incomplete conversion");
  // quantize's state, with or without shards renamed into place.
  TempDir d5;
  ASSERT_EQ(::mkdir(d5.file(".grokit-quantize").c_str(), 0755), 0);
  EXPECT_ERROR_HAS(Model::open(d5.path()), d5.path(), "no manifest.json", "incomplete quantization",
                   "'grokit quantize' again with --force");
  write_file(d5.file("shard-00000-of-00001.gkt"), "x");
  EXPECT_ERROR_HAS(Model::open(d5.path()), "incomplete quantization");
  // Other files alone are not a conversion.
  TempDir d4;
  write_file(d4.file("tokenizer.model"), "x");
  write_file(d4.file("shard.txt"), "x");
  EXPECT_ERROR_HAS(Model::open(d4.path()), "not a grokit model directory");
}

TEST(ModelDirTest, EmptyOrMissingDirectory) {
  TempDir d;
  EXPECT_ERROR_HAS(Model::open(d.path()), d.path(), "no manifest.json: not a grokit model directory");
  EXPECT_ERROR_HAS(Model::open(d.file("nope")), "not a directory");
  write_file(d.file("f"), "x");
  EXPECT_ERROR_HAS(Model::open(d.file("f")), "not a directory");
}

TEST(ModelDirTest, ShardSizeDiffersFromTheManifest) {
  TinyModel t;
  // One byte more on disk than the manifest records.
  write_file(t.dir.file("shard-00001-of-00002.gkt"), t.shard_bytes[1] + "x");
  EXPECT_ERROR_HAS(Model::open(t.dir.path()), "shard-00001-of-00002.gkt",
                   std::to_string(t.shard_bytes[1].size() + 1) + " bytes, the manifest records " +
                       std::to_string(t.shard_bytes[1].size()));
  // Shorter: truncated.
  write_file(t.dir.file("shard-00001-of-00002.gkt"), t.shard_bytes[1].substr(0, 1000));
  EXPECT_ERROR_HAS(Model::open(t.dir.path()), "1000 bytes, the manifest records", "(truncated)");
  // Missing.
  ASSERT_EQ(::unlink(t.dir.file("shard-00001-of-00002.gkt").c_str()), 0);
  EXPECT_ERROR_HAS(Model::open(t.dir.path()), "shard 1 (shard-00001-of-00002.gkt) is missing");
}

TEST(ModelDirTest, TokenizerSizeAndShardIdentityAreChecked) {
  {
    TinyModel t;
    write_file(t.dir.file(kTokenizerFile), "short");
    EXPECT_ERROR_HAS(Model::open(t.dir.path()), "tokenizer.model", "5 bytes, the manifest records 10");
  }
  {
    // A shard from another model: same size, other model id.
    TinyModel t;
    ModelConfig other = tiny_config();
    other.rope_base = 20000.0;
    ShardBuilder s;
    s.h.rank = 0;
    s.h.rank_count = 2;
    s.h.model_id = compute_model_id(other, 2, "int8");
    s.add("final_norm", DType::kF32, {64}, pattern_bytes(256, 0));
    s.add("layer.0.attn.norm_in", DType::kF32, {64}, pattern_bytes(256, 9));
    s.layout();
    std::string b = s.bytes();
    ASSERT_EQ(b.size(), t.shard_bytes[0].size());
    write_file(t.dir.file("shard-00000-of-00002.gkt"), b);
    auto model = Model::open(t.dir.path());
    ASSERT_TRUE(model.ok()) << model.error().message;
    EXPECT_ERROR_HAS(model->open_shard(0), "shard-00000-of-00002.gkt", "differs from the manifest's",
                     "a shard of another model?");
  }
  {
    // Manifest records another tensor count / index checksum / alignment.
    TinyModel t;
    t.m.tensor_count = 3;
    for (auto& sh : t.m.shards) sh.tensor_count = 3;
    t.save();
    auto model = Model::open(t.dir.path());
    ASSERT_TRUE(model.ok()) << model.error().message;
    EXPECT_ERROR_HAS(model->open_shard(0), "2 tensors, the manifest records 3");
    t.m.tensor_count = 2;
    for (auto& sh : t.m.shards) sh.tensor_count = 2;
    t.m.shards[1].index_xxh3 ^= 1;
    t.save();
    auto model2 = Model::open(t.dir.path());
    ASSERT_TRUE(model2.ok()) << model2.error().message;
    EXPECT_ERROR_HAS(model2->open_shard(1), "index checksum", "differs from the manifest's");
    EXPECT_TRUE(model2->open_shard(0).ok());
    t.m.shards[1].index_xxh3 ^= 1;
    t.m.alignment = 8192;
    t.save();
    auto model3 = Model::open(t.dir.path());
    ASSERT_TRUE(model3.ok()) << model3.error().message;
    EXPECT_ERROR_HAS(model3->open_shard(0), "alignment 4096, the manifest records 8192");
  }
}

}  // namespace
}  // namespace grokit::format
