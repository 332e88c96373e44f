// Tests of the SentencePiece tokenizer and the streaming decoder (runner/tokenizer.h).
// A small Grok-1-like model is trained by scripts/make_tokenizer.py into a temporary
// directory; the real Grok-1 tokenizer is used where ../shared/grok-1/tokenizer.model
// exists beside the repository (the tests that need it skip otherwise).
#include <gtest/gtest.h>
#include <stdlib.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "common/common.h"
#include "runner/tokenizer.h"

#ifndef GROKIT_SOURCE_DIR
#error "GROKIT_SOURCE_DIR must be defined (tests/CMakeLists.txt)"
#endif

namespace grokit::runner {
namespace {

const std::string kSourceDir = GROKIT_SOURCE_DIR;
const std::string kGrokTokenizer = kSourceDir + "/../shared/grok-1/tokenizer.model";
constexpr const char* kPrompt = "The answer to life the universe and everything is of course";
constexpr const char* kReplacement = "\xEF\xBF\xBD";

// ---------------------------------------------------------------------------------
// Helpers.

// Strict UTF-8 (RFC 3629): no overlong forms, no surrogates, nothing above U+10FFFF.
bool valid_utf8(std::string_view s) {
  size_t i = 0;
  while (i < s.size()) {
    auto c = static_cast<uint8_t>(s[i]);
    size_t len;
    uint32_t cp;
    if (c < 0x80) {
      ++i;
      continue;
    } else if (c >= 0xC2 && c <= 0xDF) {
      len = 2, cp = c & 0x1Fu;
    } else if (c >= 0xE0 && c <= 0xEF) {
      len = 3, cp = c & 0x0Fu;
    } else if (c >= 0xF0 && c <= 0xF4) {
      len = 4, cp = c & 0x07u;
    } else {
      return false;
    }
    if (i + len > s.size()) return false;
    for (size_t k = 1; k < len; ++k) {
      auto t = static_cast<uint8_t>(s[i + k]);
      if ((t & 0xC0) != 0x80) return false;
      cp = (cp << 6) | (t & 0x3Fu);
    }
    if ((len == 3 && cp < 0x800) || (len == 4 && (cp < 0x10000 || cp > 0x10FFFF))) return false;
    if (cp >= 0xD800 && cp < 0xE000) return false;
    i += len;
  }
  return true;
}

TEST(Utf8Validator, AcceptsAndRejects) {
  EXPECT_TRUE(valid_utf8("abc é Ω 日本 😀"));
  EXPECT_TRUE(valid_utf8(""));
  EXPECT_FALSE(valid_utf8("\xE2\x82"));          // truncated
  EXPECT_FALSE(valid_utf8("\x82"));              // lone continuation
  EXPECT_FALSE(valid_utf8("\xC0\xAF"));          // overlong
  EXPECT_FALSE(valid_utf8("\xED\xA0\x80"));      // surrogate
  EXPECT_FALSE(valid_utf8("\xF4\x90\x80\x80"));  // above U+10FFFF
}

std::string shell_quote(const std::string& s) {
  std::string out = "'";
  for (char c : s) out += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return out + "'";
}

std::string make_temp_dir() {
  const char* env = std::getenv("TMPDIR");
  std::string tmpl = std::string(env != nullptr && *env != '\0' ? env : "/tmp") + "/grokit_test_tokenizer_XXXXXX";
  std::vector<char> buf(tmpl.begin(), tmpl.end());
  buf.push_back('\0');
  char* p = mkdtemp(buf.data());
  return p == nullptr ? std::string() : std::string(p);
}

void write_file(const std::string& path, const std::string& bytes) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  ASSERT_TRUE(f.good()) << path;
}

// The id of a piece, by scanning the vocabulary (-1 when absent).
int32_t find_piece(const Tokenizer& tok, const std::string& piece) {
  for (int32_t id = 0; id < tok.vocab_size(); ++id)
    if (tok.piece(id) == piece) return id;
  return -1;
}
int32_t byte_piece(const Tokenizer& tok, uint8_t b) {
  char name[8];
  std::snprintf(name, sizeof name, "<0x%02X>", b);
  return find_piece(tok, name);
}

// Text the tests round-trip: ASCII, accented Latin, Greek, CJK, emoji (including ones
// outside the BMP and with modifiers), mixed whitespace, and a mix of everything.
const std::vector<std::string>& samples() {
  static const std::vector<std::string> s = {
      "The quick brown fox jumps over the lazy dog.",
      "Héllo wörld! Ça va? Ñandú, Grüße aus München, São Paulo, naïve façade.",
      "Ελληνικά: Η γλώσσα είναι όμορφη και πολύ παλιά.",
      "日本語のテキストと中文的句子，还有한국어도。",
      "Emoji: 😀🎉🚀 👍🏽 ❤️ 🦜 𝄞 €",
      "  two leading spaces,\ttabs\t\tand\nnew\n\nlines, trailing spaces  \n",
      " x",
      "mixed: price 42 €, naïve café in 東京 🌍 (Αθήνα) done.",
      "",
  };
  return s;
}

// Pushes ids one at a time; checks each piece is valid UTF-8 and that all pieces plus
// finish() equal decode(ids).
void expect_stream_matches(const Tokenizer& tok, const std::vector<int32_t>& ids, const std::string& what) {
  StreamDecoder dec(tok);
  std::string all;
  for (size_t i = 0; i < ids.size(); ++i) {
    std::string piece = dec.push(ids[i]);
    EXPECT_TRUE(valid_utf8(piece)) << what << ": push #" << i << " (id " << ids[i] << ") returned invalid UTF-8";
    all += piece;
  }
  std::string rest = dec.finish();
  EXPECT_TRUE(valid_utf8(rest)) << what << ": finish() returned invalid UTF-8";
  all += rest;
  EXPECT_EQ(all, tok.decode(ids)) << what;
}

void expect_round_trips(const Tokenizer& tok) {
  for (const std::string& s : samples()) {
    auto ids = tok.encode(s);
    ASSERT_TRUE(ids.ok()) << ids.error().message;
    for (int32_t id : *ids) {
      EXPECT_GE(id, 0);
      EXPECT_LT(id, tok.vocab_size());
    }
    EXPECT_EQ(tok.decode(*ids), s) << "round trip of '" << s << "'";
    expect_stream_matches(tok, *ids, "stream of '" + s + "'");
  }
}

// A "€" in the middle of text, as byte pieces: nothing comes out until its last byte.
void expect_byte_fallback_held(const Tokenizer& tok) {
  int32_t e2 = byte_piece(tok, 0xE2), x82 = byte_piece(tok, 0x82), xac = byte_piece(tok, 0xAC);
  ASSERT_GE(e2, 0);
  ASSERT_GE(x82, 0);
  ASSERT_GE(xac, 0);
  auto head = tok.encode("price:");
  ASSERT_TRUE(head.ok()) << head.error().message;
  StreamDecoder dec(tok);
  std::string out;
  for (int32_t id : *head) out += dec.push(id);
  EXPECT_EQ(dec.push(e2), "");
  EXPECT_EQ(dec.push(x82), "");
  out += dec.push(xac);
  EXPECT_EQ(out.substr(out.size() - 3), "€") << out;
  out += dec.finish();
  std::vector<int32_t> ids = *head;
  ids.insert(ids.end(), {e2, x82, xac});
  EXPECT_EQ(out, tok.decode(ids));
  EXPECT_EQ(out, "price:€");

  // At the very start of the text (no '▁' piece before it) too.
  StreamDecoder first(tok);
  EXPECT_EQ(first.push(e2), "");
  EXPECT_EQ(first.push(x82), "");
  EXPECT_EQ(first.push(xac), "€");
  EXPECT_EQ(first.finish(), "");
}

// Ill-formed byte sequences and odd ids: the stream still equals decode().
void expect_ill_formed_streams(const Tokenizer& tok) {
  int32_t e2 = byte_piece(tok, 0xE2), x82 = byte_piece(tok, 0x82), x41 = byte_piece(tok, 0x41);
  int32_t f0 = byte_piece(tok, 0xF0), x9f = byte_piece(tok, 0x9F), xed = byte_piece(tok, 0xED);
  int32_t xa0 = byte_piece(tok, 0xA0), xc0 = byte_piece(tok, 0xC0);
  auto word = tok.encode("word");
  ASSERT_TRUE(word.ok());
  int32_t w = word->back();
  int32_t eos = tok.eos_id(), pad = tok.pad_id(), v = tok.vocab_size();
  const std::vector<std::vector<int32_t>> cases = {
      {w, e2, x82},              // truncated at the end: U+FFFD per byte from finish()
      {e2, x41, w},              // invalid continuation
      {w, e2, x82, w, e2},       // truncated, then more text
      {f0, x9f, e2, x82},        // a 4-byte lead cut short by a 3-byte lead
      {xed, xa0, x82, w},        // a surrogate
      {xc0, x82, w},             // an overlong form
      {pad, pad, w, eos, w},     // control pieces
      {pad, eos},                // only control pieces
      {w, -1, w, v, e2, v + 7},  // out-of-range ids
      {e2, -5, x82},             // an out-of-range id inside a byte sequence
      {-1},
  };
  for (size_t i = 0; i < cases.size(); ++i) expect_stream_matches(tok, cases[i], "case " + std::to_string(i));
  std::string t = tok.decode(std::vector<int32_t>{w, e2, x82});
  EXPECT_EQ(t.substr(t.size() - 6), std::string(kReplacement) + kReplacement);
  EXPECT_EQ(tok.decode(std::vector<int32_t>{-1, v, 1 << 30}), std::string(kReplacement) + kReplacement + kReplacement);
  EXPECT_EQ(tok.piece(-1), "");
  EXPECT_EQ(tok.piece(v), "");
}

// Random id sequences, rich in byte pieces, control pieces and out-of-range ids.
void expect_random_streams_match(const Tokenizer& tok, int count) {
  std::mt19937 rng(1234);
  std::vector<int32_t> bytes(256);
  for (int b = 0; b < 256; ++b) bytes[b] = byte_piece(tok, static_cast<uint8_t>(b));
  auto pick = [&](int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); };
  for (int n = 0; n < count; ++n) {
    std::vector<int32_t> ids;
    int len = pick(1, 40);
    for (int i = 0; i < len; ++i) {
      int r = pick(0, 99);
      if (r < 15) ids.push_back(bytes[pick(0x80, 0xBF)]);        // continuation
      else if (r < 30) ids.push_back(bytes[pick(0xC0, 0xFF)]);   // lead (or invalid)
      else if (r < 35) ids.push_back(bytes[pick(0, 0x7F)]);
      else if (r < 40) ids.push_back(pick(0, 3));                // specials
      else if (r < 42) ids.push_back(pick(0, 1) ? -1 : tok.vocab_size() + pick(0, 9));
      else ids.push_back(pick(0, tok.vocab_size() - 1));
    }
    expect_stream_matches(tok, ids, "random sequence " + std::to_string(n));
    if (::testing::Test::HasFailure()) return;
  }
}

// ---------------------------------------------------------------------------------
// The small tokenizer trained by scripts/make_tokenizer.py.
class SmallTokenizer : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = make_temp_dir();
    ASSERT_FALSE(dir_.empty()) << "mkdtemp: " << std::strerror(errno);
    std::string cmd = "python3 " + shell_quote(kSourceDir + "/scripts/make_tokenizer.py") + " " +
                      shell_quote(dir_ + "/t") + " --vocab-size 512";
    int rc = std::system(cmd.c_str());
    ASSERT_EQ(rc, 0) << cmd;
    auto tok = Tokenizer::load(dir_ + "/t.model");
    ASSERT_TRUE(tok.ok()) << tok.error().message;
    tok_ = std::make_unique<Tokenizer>(std::move(tok).value());
  }
  static void TearDownTestSuite() {
    tok_.reset();
    std::error_code ec;
    if (!dir_.empty()) std::filesystem::remove_all(dir_, ec);
  }
  void SetUp() override { ASSERT_NE(tok_, nullptr) << "the small tokenizer was not built"; }

  static std::string dir_;
  static std::unique_ptr<Tokenizer> tok_;
};
std::string SmallTokenizer::dir_;
std::unique_ptr<Tokenizer> SmallTokenizer::tok_;

TEST_F(SmallTokenizer, SpecialIdsAndVocabulary) {
  EXPECT_EQ(tok_->vocab_size(), 512);
  EXPECT_EQ(tok_->pad_id(), 0);
  EXPECT_EQ(tok_->bos_id(), 1);
  EXPECT_EQ(tok_->eos_id(), 2);
  EXPECT_EQ(tok_->unk_id(), 3);
  EXPECT_EQ(tok_->piece(0), "[PAD]");
  EXPECT_EQ(tok_->piece(2), "[EOS]");
  EXPECT_TRUE(tok_->is_control(2));
  EXPECT_FALSE(tok_->is_control(3));
  EXPECT_EQ(byte_piece(*tok_, 0x00), 4);  // byte pieces follow the specials
  EXPECT_TRUE(tok_->is_byte(4));
  EXPECT_EQ(byte_piece(*tok_, 0xFF), 259);
}

TEST_F(SmallTokenizer, EncodeAddsNoBosOrEos) {
  auto ids = tok_->encode("the answer");
  ASSERT_TRUE(ids.ok());
  ASSERT_FALSE(ids->empty());
  EXPECT_NE(ids->front(), tok_->bos_id());
  EXPECT_NE(ids->back(), tok_->eos_id());
  auto none = tok_->encode("");
  ASSERT_TRUE(none.ok());
  EXPECT_TRUE(none->empty());
}

TEST_F(SmallTokenizer, EuroIsByteFallback) {
  auto ids = tok_->encode("€");
  ASSERT_TRUE(ids.ok());
  int bytes = 0;
  for (int32_t id : *ids) bytes += tok_->is_byte(id) ? 1 : 0;
  EXPECT_EQ(bytes, 3) << "the corpus of make_tokenizer.py must not contain U+20AC";
}

TEST_F(SmallTokenizer, RoundTripsAndStreams) { expect_round_trips(*tok_); }
TEST_F(SmallTokenizer, StreamHoldsByteFallbackUntilComplete) { expect_byte_fallback_held(*tok_); }
TEST_F(SmallTokenizer, IllFormedStreamsMatchDecode) { expect_ill_formed_streams(*tok_); }
TEST_F(SmallTokenizer, RandomStreamsMatchDecode) { expect_random_streams_match(*tok_, 3000); }

TEST_F(SmallTokenizer, LeadingSpaceOfLaterPiecesIsKept) {
  auto ids = tok_->encode("hello world again");
  ASSERT_TRUE(ids.ok());
  StreamDecoder dec(*tok_);
  std::string out;
  for (int32_t id : *ids) out += dec.push(id);
  out += dec.finish();
  EXPECT_EQ(out, "hello world again");
}

TEST_F(SmallTokenizer, DecoderIsReusableAfterFinishAndOutlivesTokenizer) {
  auto ids = tok_->encode("hello world");
  ASSERT_TRUE(ids.ok());
  std::unique_ptr<StreamDecoder> dec;
  {
    Tokenizer copy = *tok_;
    Tokenizer moved = std::move(copy);
    dec = std::make_unique<StreamDecoder>(moved);
  }
  for (int round = 0; round < 2; ++round) {
    std::string out;
    for (int32_t id : *ids) out += dec->push(id);
    out += dec->finish();
    EXPECT_EQ(out, "hello world") << "round " << round;
  }
}

TEST_F(SmallTokenizer, ArbitraryBytesEncodeWithoutCrashing) {
  std::string junk("a\0b\xFF\xFE\xE2\x82 \xC0\xAF\xED\xA0\x80 end", 17);
  auto ids = tok_->encode(junk);
  ASSERT_TRUE(ids.ok()) << ids.error().message;
  std::string back = tok_->decode(*ids);
  EXPECT_TRUE(valid_utf8(back));
  expect_stream_matches(*tok_, *ids, "junk");
}

TEST_F(SmallTokenizer, ScriptOutputIsDeterministic) {
  std::string cmd = "python3 " + shell_quote(kSourceDir + "/scripts/make_tokenizer.py") + " " +
                    shell_quote(dir_ + "/again") + " --vocab-size 512";
  ASSERT_EQ(std::system(cmd.c_str()), 0) << cmd;
  auto a = read_small_file(dir_ + "/t.model", 1 << 20);
  auto b = read_small_file(dir_ + "/again.model", 1 << 20);
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_TRUE(*a == *b) << "two runs of make_tokenizer.py wrote different models";
}

TEST_F(SmallTokenizer, TruncatedModelsFailCleanly) {
  // Prefixes of a real model: each fails with a message or loads a model that works.
  auto bytes = read_small_file(dir_ + "/t.model", 1 << 20);
  ASSERT_TRUE(bytes.ok());
  for (size_t len = 1; len < bytes->size(); len += len < 64 ? 1 : 97) {
    auto tok = Tokenizer::load_from_bytes(std::string_view(*bytes).substr(0, len), "prefix");
    if (!tok.ok()) {
      EXPECT_NE(tok.error().message.find("prefix"), std::string::npos) << tok.error().message;
      continue;
    }
    auto ids = tok->encode("hello €");
    if (ids.ok()) expect_stream_matches(*tok, *ids, "prefix of " + std::to_string(len) + " bytes");
  }
}

// ---------------------------------------------------------------------------------
// The real Grok-1 tokenizer.
class GrokTokenizer : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    if (!path_exists(kGrokTokenizer)) return;
    auto tok = Tokenizer::load(kGrokTokenizer);
    ASSERT_TRUE(tok.ok()) << tok.error().message;
    tok_ = std::make_unique<Tokenizer>(std::move(tok).value());
  }
  static void TearDownTestSuite() { tok_.reset(); }
  void SetUp() override {
    if (!path_exists(kGrokTokenizer)) GTEST_SKIP() << "the Grok-1 tokenizer is not at " << kGrokTokenizer;
    ASSERT_NE(tok_, nullptr);
  }
  static std::unique_ptr<Tokenizer> tok_;
};
std::unique_ptr<Tokenizer> GrokTokenizer::tok_;

TEST_F(GrokTokenizer, SpecialIdsAndVocabulary) {
  EXPECT_EQ(tok_->vocab_size(), 131072);
  EXPECT_EQ(tok_->pad_id(), 0);
  EXPECT_EQ(tok_->bos_id(), 1);
  EXPECT_EQ(tok_->eos_id(), 2);
  EXPECT_EQ(tok_->unk_id(), 3);
  EXPECT_EQ(tok_->piece(0), "[PAD]");
  EXPECT_EQ(tok_->piece(2), "[EOS]");
}

TEST_F(GrokTokenizer, ReferencePrompt) {
  auto ids = tok_->encode(kPrompt);
  ASSERT_TRUE(ids.ok()) << ids.error().message;
  // What the official runner's tokenizer.encode gives (spm_encode --output_format=id).
  const std::vector<int32_t> expected = {422, 3033, 356, 1180, 333, 9072, 360, 2175, 391, 359, 1805};
  EXPECT_EQ(*ids, expected);
  EXPECT_EQ(tok_->decode(*ids), kPrompt);
  expect_stream_matches(*tok_, *ids, "reference prompt");
}

TEST_F(GrokTokenizer, RoundTripsAndStreams) { expect_round_trips(*tok_); }
TEST_F(GrokTokenizer, StreamHoldsByteFallbackUntilComplete) { expect_byte_fallback_held(*tok_); }
TEST_F(GrokTokenizer, IllFormedStreamsMatchDecode) { expect_ill_formed_streams(*tok_); }
TEST_F(GrokTokenizer, RandomStreamsMatchDecode) { expect_random_streams_match(*tok_, 1000); }

TEST_F(GrokTokenizer, RareCharacterIsByteFallback) {
  auto ids = tok_->encode("𝄞");  // U+1D11E: not in Grok-1's vocabulary
  ASSERT_TRUE(ids.ok());
  std::vector<int32_t> bytes;
  for (int32_t id : *ids)
    if (tok_->is_byte(id)) bytes.push_back(id);
  ASSERT_EQ(bytes.size(), 4u);
  StreamDecoder dec(*tok_);
  std::string out;
  for (size_t i = 0; i < ids->size(); ++i) {
    std::string piece = dec.push((*ids)[i]);
    if (i + 1 < ids->size()) {
      EXPECT_EQ(piece, "") << "push #" << i;
    }
    out += piece;
  }
  EXPECT_EQ(out, "𝄞");
  EXPECT_EQ(dec.finish(), "");
}

// ---------------------------------------------------------------------------------
// Errors: clear messages, no crash, no exception.
TEST(TokenizerErrors, MissingFile) {
  auto tok = Tokenizer::load("/nonexistent/grokit/tokenizer.model");
  ASSERT_FALSE(tok.ok());
  EXPECT_NE(tok.error().message.find("/nonexistent/grokit/tokenizer.model"), std::string::npos) << tok.error().message;
  EXPECT_NE(tok.error().message.find("not found"), std::string::npos) << tok.error().message;
}

TEST(TokenizerErrors, NotAModel) {
  std::string dir = make_temp_dir();
  ASSERT_FALSE(dir.empty());
  struct Cleanup {
    std::string d;
    ~Cleanup() {
      std::error_code ec;
      std::filesystem::remove_all(d, ec);
    }
  } cleanup{dir};

  std::string text = dir + "/text.model";
  write_file(text, "this is not a SentencePiece model\n");
  auto t1 = Tokenizer::load(text);
  ASSERT_FALSE(t1.ok());
  EXPECT_NE(t1.error().message.find(text), std::string::npos) << t1.error().message;
  EXPECT_NE(t1.error().message.find("not a SentencePiece model"), std::string::npos) << t1.error().message;

  std::string empty = dir + "/empty.model";
  write_file(empty, "");
  auto t2 = Tokenizer::load(empty);
  ASSERT_FALSE(t2.ok());
  EXPECT_NE(t2.error().message.find("empty"), std::string::npos) << t2.error().message;

  auto t3 = Tokenizer::load(dir);  // a directory
  ASSERT_FALSE(t3.ok());
  EXPECT_NE(t3.error().message.find(dir), std::string::npos) << t3.error().message;

  std::mt19937 rng(7);
  std::string noise(4096, '\0');
  for (char& c : noise) c = static_cast<char>(rng());
  std::string random = dir + "/random.model";
  write_file(random, noise);
  auto t4 = Tokenizer::load(random);
  EXPECT_FALSE(t4.ok());
  auto t5 = Tokenizer::load_from_bytes(noise, "noise");
  EXPECT_FALSE(t5.ok());
}

}  // namespace
}  // namespace grokit::runner
