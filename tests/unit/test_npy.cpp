// Tests of the .npy reader and writer (common/npy.h): round trips for every accepted
// dtype, headers byte for byte against numpy.save, the header dict variants numpy and
// other writers produce, one hand-made bad file per failure class, and the writer's
// refusals and clean-up.
#include <gtest/gtest.h>
#include <stdlib.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <numeric>
#include <string>
#include <string_view>
#include <vector>

#include "common/common.h"
#include "common/npy.h"
#include "tests/unit/temp_dir.h"

namespace grokit::npy {
namespace {

using namespace std::string_view_literals;

// ---------------------------------------------------------------------------------
// Helpers.
struct TempDir : grokit::testing::TempDir {
  TempDir() : grokit::testing::TempDir("npy") {}
};

void write_file(const std::string& path, std::string_view bytes) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  ASSERT_TRUE(f.good()) << path;
}

std::string read_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
}

// An .npy file by hand: the magic, a version, the header length, `dict` padded with
// spaces and a '\n' to `align` bytes, then `data_bytes` zero bytes.
std::string npy_file(std::string_view dict, uint64_t data_bytes, int major = 1, uint64_t align = 64) {
  const uint64_t prefix = major == 1 ? 10 : 12;
  std::string header(dict);
  while ((prefix + header.size() + 1) % align != 0) header += ' ';
  header += '\n';
  std::string out("\x93NUMPY", 6);
  out += static_cast<char>(major);
  out += '\0';
  if (major == 1) {
    out += static_cast<char>(header.size() & 0xff);
    out += static_cast<char>(header.size() >> 8);
  } else {
    for (int i = 0; i < 4; ++i) out += static_cast<char>((header.size() >> (8 * i)) & 0xff);
  }
  out += header;
  out.append(data_bytes, '\0');
  return out;
}

Result<Header> parse(std::string_view bytes) {
  return parse_header(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size(), "x.npy");
}

// Expects parse to fail with a message that contains each of `parts`.
void expect_error(std::string_view bytes, std::initializer_list<std::string_view> parts) {
  auto h = parse(bytes);
  ASSERT_FALSE(h.ok()) << "parsed a bad file";
  EXPECT_NE(h.error().message.find("x.npy"), std::string::npos) << h.error().message;
  for (auto p : parts) EXPECT_NE(h.error().message.find(p), std::string::npos) << h.error().message << "\n  lacks: " << p;
}

// ---------------------------------------------------------------------------------
// Headers byte for byte: what numpy 1.26 np.save writes for the same dtype and shape
// (np.lib.format._write_array_header; the dict, 21 - len(str(shape[0])) spare spaces,
// then spaces and '\n' up to a multiple of 64).
constexpr std::string_view kNumpyF32_2x3x4 =
    "\x93NUMPY\x01\x00\x76\x00"
    "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3, 4), }  "
    "                                                     \n"sv;
constexpr std::string_view kNumpyI32_5 =
    "\x93NUMPY\x01\x00\x76\x00"
    "{'descr': '<i4', 'fortran_order': False, 'shape': (5,), }       "
    "                                                     \n"sv;
constexpr std::string_view kNumpyU8_scalar =
    "\x93NUMPY\x01\x00\x76\x00"
    "{'descr': '|u1', 'fortran_order': False, 'shape': (), }         "
    "                                                     \n"sv;
constexpr std::string_view kNumpyI8_27d =  // 27 dimensions: the header takes 192 bytes
    "\x93NUMPY\x01\x00\xb6\x00"
    "{'descr': '|i1', 'fortran_order': False, 'shape': (3, 1, 1, 1, 1"
    ", 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1,"
    " 1), }                                               \n"sv;

TEST(NpyWriter, HeadersMatchNumpyByteForByte) {
  TempDir dir;
  struct Case {
    std::string_view expected;
    const char* descr;
    std::vector<int64_t> shape;
  };
  std::vector<int64_t> dims27(27, 1);
  dims27[0] = 3;
  const Case cases[] = {{kNumpyF32_2x3x4, "<f4", {2, 3, 4}},
                        {kNumpyI32_5, "<i4", {5}},
                        {kNumpyU8_scalar, "|u1", {}},
                        {kNumpyI8_27d, "|i1", dims27}};
  for (const auto& c : cases) {
    ASSERT_EQ(c.expected.size() % 64, 0u);
    uint64_t count = 1, esize = c.descr[2] - '0';
    for (int64_t d : c.shape) count *= static_cast<uint64_t>(d);
    std::vector<uint8_t> data(count * esize);
    std::iota(data.begin(), data.end(), uint8_t{7});
    std::string path = dir.file("h" + std::to_string(&c - cases) + ".npy");
    ASSERT_TRUE(write_array(path, c.descr, c.shape, data.data(), false).ok());
    std::string bytes = read_file(path);
    ASSERT_EQ(bytes.size(), c.expected.size() + data.size());
    EXPECT_EQ(bytes.substr(0, c.expected.size()), c.expected) << c.descr;
    EXPECT_EQ(0, std::memcmp(bytes.data() + c.expected.size(), data.data(), data.size()));
    // and the reader agrees
    auto h = parse(bytes);
    ASSERT_TRUE(h.ok()) << h.error().message;
    EXPECT_EQ(h->data_offset, c.expected.size());
    EXPECT_EQ(h->shape, c.shape);
    EXPECT_EQ(h->element_count(), count);
  }
}

// ---------------------------------------------------------------------------------
// Round trips.
template <class T>
void round_trip(const TempDir& dir, const char* descr, std::vector<int64_t> shape, const std::string& tag) {
  uint64_t count = 1;
  for (int64_t d : shape) count *= static_cast<uint64_t>(d);
  std::vector<T> values(count);
  for (uint64_t i = 0; i < count; ++i) values[i] = static_cast<T>(static_cast<int64_t>(i * 37 % 251) - 100);
  std::string path = dir.file(std::string("rt_") + descr[1] + descr[2] + "_" + tag + ".npy");
  // Stream it in uneven pieces.
  auto w = Writer::create(path, descr, shape, false);
  ASSERT_TRUE(w.ok()) << w.error().message;
  EXPECT_EQ(w->bytes_expected(), count * sizeof(T));
  const auto* p = reinterpret_cast<const uint8_t*>(values.data());
  uint64_t done = 0, piece = 1;
  while (done < count * sizeof(T)) {
    uint64_t n = std::min(piece, count * sizeof(T) - done);
    ASSERT_TRUE(w->write(p + done, n).ok());
    done += n;
    piece = piece * 3 + 1;
  }
  EXPECT_FALSE(path_exists(path)) << "visible before finish()";
  ASSERT_TRUE(w->finish().ok());
  EXPECT_FALSE(path_exists(path + ".tmp"));
  auto a = Array::open(path);
  ASSERT_TRUE(a.ok()) << a.error().message;
  EXPECT_EQ(a->header().descr, descr);
  EXPECT_EQ(a->shape(), shape);
  EXPECT_EQ(a->header().element_size, sizeof(T));
  EXPECT_EQ(a->header().data_offset % 64, 0u);
  EXPECT_TRUE(a->expect(descr, shape.size()).ok());
  if (count > 0) {
    EXPECT_EQ(0, std::memcmp(a->data<T>(), values.data(), count * sizeof(T))) << descr;
  }
}

TEST(NpyRoundTrip, EveryDtypeAndRank) {
  TempDir dir;
  const std::vector<std::vector<int64_t>> shapes = {{}, {5}, {2, 3, 4}, {0, 7}, {1, 1, 1000}};
  for (size_t k = 0; k < shapes.size(); ++k) {
    const auto& s = shapes[k];
    const std::string tag = std::to_string(k);
    SCOPED_TRACE(::testing::PrintToString(s));
    round_trip<float>(dir, "<f4", s, tag);
    round_trip<int32_t>(dir, "<i4", s, tag);
    round_trip<int64_t>(dir, "<i8", s, tag);
    round_trip<uint16_t>(dir, "<u2", s, tag);
    round_trip<int8_t>(dir, "|i1", s, tag);
    round_trip<uint8_t>(dir, "|u1", s, tag);
  }
  EXPECT_EQ(dir.listing().size(), shapes.size() * 6) << "no .tmp files left";
}

TEST(NpyArray, ExpectNamesExpectedAndActual) {
  TempDir dir;
  int32_t v[10] = {};
  std::vector<int64_t> shape{2, 5};
  ASSERT_TRUE(write_array(dir.file("a.npy"), "<i4", shape, v, false).ok());
  auto a = Array::open(dir.file("a.npy"));
  ASSERT_TRUE(a.ok());
  auto s = a->expect("<f4", 3);
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.error().message.find("expected <f4 with 3 dimensions / actual <i4 [2, 5]"), std::string::npos)
      << s.error().message;
}

// ---------------------------------------------------------------------------------
// Header variants a reader must accept.
TEST(NpyHeader, AcceptsTheVariantsWritersProduce) {
  struct Case {
    std::string dict;
    std::vector<int64_t> shape;
  };
  const Case cases[] = {
      {"{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }", {2, 3}},    // numpy
      {"{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3)}", {2, 3}},      // no trailing comma
      {"{'descr':'<f4','fortran_order':False,'shape':(2,3),}", {2, 3}},           // no spaces
      {"{\"descr\": \"<f4\", \"fortran_order\": False, \"shape\": (2, 3)}", {2, 3}},  // double quotes
      {"{'shape': (2, 3,), 'fortran_order': False, 'descr': '<f4'}", {2, 3}},     // any order, tuple comma
      {"{'descr': '<f4', 'fortran_order': False, 'shape': (6,), }", {6}},         // 1-d
      {"{'descr': '<f4', 'fortran_order': False, 'shape': (), }", {}},            // 0-d
      {"{ 'descr' : '<f4' ,\n 'fortran_order' : False ,\t'shape' : ( 2 , 3 ) }", {2, 3}},
  };
  for (const auto& c : cases) {
    uint64_t count = 1;
    for (int64_t d : c.shape) count *= static_cast<uint64_t>(d);
    auto h = parse(npy_file(c.dict, count * 4));
    ASSERT_TRUE(h.ok()) << c.dict << ": " << h.error().message;
    EXPECT_EQ(h->shape, c.shape) << c.dict;
    EXPECT_EQ(h->descr, "<f4");
  }
  // Version 2.0 (a 4-byte header length) and the 16-byte alignment of old numpy.
  auto v2 = parse(npy_file("{'descr': '<i8', 'fortran_order': False, 'shape': (3,), }", 24, 2));
  ASSERT_TRUE(v2.ok()) << v2.error().message;
  EXPECT_EQ(v2->data_offset, 128u);
  auto old = parse(npy_file("{'descr': '<i8', 'fortran_order': False, 'shape': (3,), }", 24, 1, 16));
  ASSERT_TRUE(old.ok()) << old.error().message;
  EXPECT_EQ(old->data_offset % 16, 0u);
}

// ---------------------------------------------------------------------------------
// One bad file per failure class.
const std::string kGoodDict = "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }";

TEST(NpyHeader, RejectsBadMagic) {
  std::string f = npy_file(kGoodDict, 24);
  f[1] = 'M';
  expect_error(f, {"not an .npy file"});
  expect_error("\x93NUM"sv, {"not an .npy file"});  // shorter than any header
  expect_error(""sv, {"not an .npy file"});
}

TEST(NpyHeader, RejectsVersion3) {
  std::string f = npy_file(kGoodDict, 24);
  f[6] = 3;
  expect_error(f, {"version 3.0", "not supported"});
  f[6] = 1;
  f[7] = 1;
  expect_error(f, {"version 1.1"});
}

TEST(NpyHeader, RejectsHeaderLengthPastTheEnd) {
  std::string f = npy_file(kGoodDict, 0);
  f[8] = '\xff';
  f[9] = '\x7f';
  expect_error(f, {"runs past the end", "32767"});
  std::string v2 = npy_file(kGoodDict, 0, 2);
  v2[11] = '\x10';
  expect_error(v2, {"runs past the end"});
  expect_error(v2.substr(0, 11), {"too short"});
}

TEST(NpyHeader, RejectsBadDictSyntax) {
  const std::pair<std::string, std::string_view> cases[] = {
      {"'descr': '<f4', 'fortran_order': False, 'shape': (2, 3)", "expected '{'"},
      {"{'descr' '<f4', 'fortran_order': False, 'shape': (2, 3)}", "expected ':'"},
      {"{'descr': '<f4' 'fortran_order': False, 'shape': (2, 3)}", "expected ',' or '}'"},
      {"{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3)", "expected ',' or '}'"},
      {"{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3)} x", "after the header dict"},
      {"{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), 'extra': 1}", "unexpected key 'extra'"},
      {"{'descr': '<f4', 'descr': '<f4', 'fortran_order': False, 'shape': (2, 3)}", "duplicate key 'descr'"},
      {"{'descr': '<f4', 'shape': (2, 3)}", "lacks 'fortran_order'"},
      {"{'descr': '<f4', 'fortran_order': 0, 'shape': (2, 3)}", "True or False"},
      {"{'descr': '<f4', 'fortran_order': Falsey, 'shape': (2, 3)}", "True or False"},
      {"{'descr': <f4, 'fortran_order': False, 'shape': (2, 3)}", "quoted string"},
      {"{'descr': '<f4, 'fortran_order': False, 'shape': (2, 3)}", "expected ',' or '}'"},
      {"{'descr': '<f\\4', 'fortran_order': False, 'shape': (2, 3)}", "escapes"},
      {"{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (2, 3)}", "quoted string"},
      {"{'descr': '<f4', 'fortran_order': False, 'shape': [2, 3]}", "tuple"},
      {"{'descr': '<f4', 'fortran_order': False, 'shape': (6)}", "not a tuple"},
      {"{'descr': '<f4', 'fortran_order': False, 'shape': (2,, 3)}", "integer"},
      {"{'descr': '<f4', 'fortran_order': False, 'shape': (2.0, 3)}", "integer"},
      {"{'descr': '<f4', 'fortran_order': False, 'shape': (02, 3)}", "leading zero"},
      {"{'descr': '<f4', 'fortran_order': False, 'shape': (2 3)}", "expected ',' or ')'"},
      {"{}", "lacks 'descr'"},
  };
  for (const auto& [dict, what] : cases) {
    SCOPED_TRACE(dict);
    expect_error(npy_file(dict, 24), {"bad .npy header at byte", what});
  }
}

TEST(NpyHeader, RejectsFortranOrder) {
  expect_error(npy_file("{'descr': '<f4', 'fortran_order': True, 'shape': (2, 3), }", 24), {"fortran_order is True"});
}

TEST(NpyHeader, RejectsBigEndianAndUnlistedDtypes) {
  expect_error(npy_file("{'descr': '>f4', 'fortran_order': False, 'shape': (2, 3), }", 24), {"'>f4' is not accepted"});
  expect_error(npy_file("{'descr': '<f8', 'fortran_order': False, 'shape': (2, 3), }", 48), {"'<f8' is not accepted"});
  expect_error(npy_file("{'descr': '<i1', 'fortran_order': False, 'shape': (2, 3), }", 6), {"'<i1' is not accepted"});
}

TEST(NpyHeader, RejectsNegativeDimension) {
  expect_error(npy_file("{'descr': '<f4', 'fortran_order': False, 'shape': (2, -3), }", 24), {"negative dimension -3"});
}

TEST(NpyHeader, RejectsShapeOverflow) {
  // Each dimension fits in int64; their product does not fit in 64 bits.
  expect_error(npy_file("{'descr': '<f4', 'fortran_order': False, 'shape': (4294967296, 4294967296, 2), }", 0),
               {"more elements than 2^64"});
  // The element count fits; the byte count does not.
  expect_error(npy_file("{'descr': '<f4', 'fortran_order': False, 'shape': (4611686018427387904,), }", 0),
               {"needs more than 2^64 bytes"});
  // A dimension past int64.
  expect_error(npy_file("{'descr': '<f4', 'fortran_order': False, 'shape': (99999999999999999999999,), }", 0),
               {"is too large"});
  // A file claiming more dimensions than numpy allows.
  std::string many = "{'descr': '<f4', 'fortran_order': False, 'shape': (";
  for (int i = 0; i < 65; ++i) many += "1, ";
  many += "), }";
  expect_error(npy_file(many, 4), {"more than 64 dimensions"});
}

TEST(NpyHeader, RejectsTruncatedData) {
  std::string f = npy_file(kGoodDict, 23);
  expect_error(f, {"truncated", "needs 24 bytes", "holds 23", "after byte 128", "151 bytes in all"});
}

TEST(NpyHeader, RejectsTrailingData) {
  std::string f = npy_file(kGoodDict, 25);
  expect_error(f, {"1 bytes of trailing data", "needs 24 bytes", "holds 25"});
}

TEST(NpyHeader, RejectsMisalignedData) {
  // A hand-made header whose data starts at an offset that is not a multiple of 8.
  std::string dict = "{'descr': '<i8', 'fortran_order': False, 'shape': (1,), }";
  while ((10 + dict.size() + 1) % 8 != 4) dict += ' ';
  std::string f = npy_file(dict, 8, 1, 4);
  ASSERT_EQ((f.size() - 8) % 8, 4u);
  expect_error(f, {"data offset", "not a multiple of the element size 8"});
}

TEST(NpyArray, OpenNamesTheFile) {
  TempDir dir;
  write_file(dir.file("bad.npy"), npy_file(kGoodDict, 3));
  auto a = Array::open(dir.file("bad.npy"));
  ASSERT_FALSE(a.ok());
  EXPECT_NE(a.error().message.find(dir.file("bad.npy")), std::string::npos) << a.error().message;
  auto missing = Array::open(dir.file("missing.npy"));
  ASSERT_FALSE(missing.ok());
  EXPECT_NE(missing.error().message.find("missing.npy"), std::string::npos);
}

// ---------------------------------------------------------------------------------
// The writer's refusals and clean-up.
TEST(NpyWriter, RefusesToOverwriteUnlessAsked) {
  TempDir dir;
  const std::string path = dir.file("out.npy");
  write_file(path, "precious");
  float v[2] = {1, 2};
  std::vector<int64_t> shape{2};
  auto s = write_array(path, "<f4", shape, v, false);
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.error().message.find("refusing to overwrite"), std::string::npos) << s.error().message;
  EXPECT_EQ(read_file(path), "precious");
  EXPECT_EQ(dir.listing(), std::vector<std::string>{"out.npy"});
  ASSERT_TRUE(write_array(path, "<f4", shape, v, true).ok());
  auto a = Array::open(path);
  ASSERT_TRUE(a.ok());
  EXPECT_EQ(a->data<float>()[1], 2.0f);
}

TEST(NpyWriter, RefusesAPathThatAppearsWhileWriting) {
  TempDir dir;
  const std::string path = dir.file("out.npy");
  std::vector<int64_t> shape{1};
  auto w = Writer::create(path, "<i4", shape, false);
  ASSERT_TRUE(w.ok());
  int32_t v = 5;
  ASSERT_TRUE(w->write(&v, 4).ok());
  write_file(path, "someone else's");
  auto s = w->finish();
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(read_file(path), "someone else's");
  EXPECT_FALSE(path_exists(path + ".tmp"));
}

TEST(NpyWriter, FinishWithTooFewBytesFailsAndLeavesNoFile) {
  TempDir dir;
  const std::string path = dir.file("short.npy");
  std::vector<int64_t> shape{2, 3};
  auto w = Writer::create(path, "<f4", shape, false);
  ASSERT_TRUE(w.ok()) << w.error().message;
  float v[5] = {};
  ASSERT_TRUE(w->write(v, sizeof v).ok());
  auto s = w->finish();
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.error().message.find("20 bytes of data written, the shape needs 24"), std::string::npos)
      << s.error().message;
  EXPECT_TRUE(dir.listing().empty());
  EXPECT_FALSE(w->finish().ok());
}

TEST(NpyWriter, RefusesMoreBytesThanTheShape) {
  TempDir dir;
  std::vector<int64_t> shape{2};
  auto w = Writer::create(dir.file("long.npy"), "<u2", shape, false);
  ASSERT_TRUE(w.ok());
  uint16_t v[3] = {};
  auto s = w->write(v, sizeof v);
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.error().message.find("more than the 4 bytes"), std::string::npos) << s.error().message;
  ASSERT_TRUE(w->write(v, 4).ok());
  ASSERT_TRUE(w->finish().ok());
  EXPECT_FALSE(w->write(v, 0).ok()) << "write after finish";
}

TEST(NpyWriter, DestroyedUnfinishedLeavesNoFile) {
  TempDir dir;
  const std::string path = dir.file("abandoned.npy");
  {
    std::vector<int64_t> shape{4};
    auto w = Writer::create(path, "<i8", shape, false);
    ASSERT_TRUE(w.ok());
    int64_t v[2] = {1, 2};
    ASSERT_TRUE(w->write(v, sizeof v).ok());
    EXPECT_TRUE(path_exists(path + ".tmp"));
    Writer moved = std::move(*w);  // the moved-from writer owns nothing
  }
  EXPECT_TRUE(dir.listing().empty());
}

TEST(NpyWriter, RejectsBadDtypeAndShape) {
  TempDir dir;
  std::vector<int64_t> neg{2, -1};
  auto w1 = Writer::create(dir.file("a.npy"), "<f8", std::vector<int64_t>{2}, false);
  ASSERT_FALSE(w1.ok());
  EXPECT_NE(w1.error().message.find("not accepted"), std::string::npos);
  auto w2 = Writer::create(dir.file("a.npy"), "<f4", neg, false);
  ASSERT_FALSE(w2.ok());
  EXPECT_NE(w2.error().message.find("negative dimension"), std::string::npos);
  std::vector<int64_t> huge{int64_t{1} << 62, 8};
  EXPECT_FALSE(Writer::create(dir.file("a.npy"), "<f4", huge, false).ok());
  EXPECT_TRUE(dir.listing().empty());
}

}  // namespace
}  // namespace grokit::npy
