#include "runner/tokenizer.h"

#include <sentencepiece_processor.h>

#include <cstdio>
#include <exception>
#include <utility>

namespace grokit::runner {

namespace {

constexpr std::string_view kReplacement = "\xEF\xBF\xBD";  // U+FFFD
constexpr uint64_t kMaxModelBytes = uint64_t{1} << 30;     // Grok-1's is 2.2 MB

// How SentencePiece decodes a run of byte pieces (ProcessBytePieces in
// sentencepiece_processor.cc): greedily, one character at a time; a byte that does not
// start a complete, valid sequence (string_util::DecodeUTF8: no overlong forms, no
// surrogates, nothing above U+10FFFF) becomes U+FFFD on its own and the scan goes on at
// the next byte. Returns the length of the character at b[0..n), or 1 for an invalid byte,
// or 0 when b[0..n) is a proper prefix of a valid character (more bytes may complete it).
size_t utf8_scan(const uint8_t* b, size_t n) {
  auto trail = [](uint8_t c) { return (c & 0xC0) == 0x80; };
  uint8_t c0 = b[0];
  if (c0 < 0x80) return 1;
  size_t len = 0;
  uint32_t cp = 0, min_cp = 0;
  if ((c0 & 0xE0) == 0xC0) {
    len = 2, cp = c0 & 0x1Fu, min_cp = 0x80;
  } else if ((c0 & 0xF0) == 0xE0) {
    len = 3, cp = c0 & 0x0Fu, min_cp = 0x800;
  } else if ((c0 & 0xF8) == 0xF0) {
    len = 4, cp = c0 & 0x07u, min_cp = 0x10000;
  } else {
    return 1;  // a continuation byte or 0xF8..0xFF
  }
  size_t have = n < len ? n : len;
  for (size_t i = 1; i < have; ++i) {
    if (!trail(b[i])) return 1;
    cp = (cp << 6) | (b[i] & 0x3Fu);
  }
  if (have == len) {
    bool valid = cp >= min_cp && cp <= 0x10FFFF && !(cp >= 0xD800 && cp < 0xE000);
    return valid ? len : 1;
  }
  // Incomplete: can the bytes so far still start a valid character? Pad the code point
  // with the smallest and the largest continuation and check the range it can reach.
  uint32_t lo = cp, hi = cp;
  for (size_t i = have; i < len; ++i) lo = lo << 6, hi = (hi << 6) | 0x3Fu;
  if (hi < min_cp || lo > 0x10FFFF) return 1;
  if (lo >= 0xD800 && hi < 0xE000) return 1;  // can only be a surrogate
  return 0;
}

}  // namespace

struct Tokenizer::Impl {
  sentencepiece::SentencePieceProcessor sp;
  std::string name;
  int32_t vocab = 0;
  std::vector<int16_t> byte_value;  // per id: 0..255 for a byte piece <0xNN>, else -1
  // A piece that decodes to non-empty text on its own. Decoding [anchor, ids...] and
  // dropping the anchor's text decodes `ids` as they decode after other text: SentencePiece
  // strips the '▁' of a piece only while no text has been produced.
  int32_t anchor = -1;
  std::string anchor_text;

  bool in_range(int32_t id) const { return id >= 0 && id < vocab; }

  std::string decode_raw(const std::vector<int>& ids) const {
    std::string out;
    try {
      if (sp.Decode(ids, &out).ok()) return out;
    } catch (...) {  // NOLINT: nothing the library throws may escape
    }
    // Only an internal failure of the library gets here (all ids are in range).
    std::string bad;
    for (size_t i = 0; i < ids.size(); ++i) bad += kReplacement;
    return bad;
  }

  // Decodes in-range ids; `after_text`: text precedes them (see `anchor`).
  std::string decode_run(std::span<const int32_t> ids, bool after_text) const {
    if (ids.empty()) return {};
    std::vector<int> v;
    v.reserve(ids.size() + 1);
    bool anchored = after_text && anchor >= 0;
    if (anchored) v.push_back(anchor);
    v.insert(v.end(), ids.begin(), ids.end());
    std::string out = decode_raw(v);
    if (!anchored) return out;
    if (out.compare(0, anchor_text.size(), anchor_text) == 0) return out.substr(anchor_text.size());
    // A model whose decoding is not a concatenation of surfaces (a denormalizer): best effort.
    v.erase(v.begin());
    return decode_raw(v);
  }

  // How many trailing ids of `ids` (which starts where SentencePiece's byte scan is at a
  // character boundary) are byte pieces of a character that is not complete yet.
  size_t incomplete_tail(std::span<const int32_t> ids) const {
    size_t start = ids.size();
    while (start > 0 && in_range(ids[start - 1]) && byte_value[ids[start - 1]] >= 0) --start;
    size_t n = ids.size() - start;
    if (n == 0) return 0;
    uint8_t bytes[4];
    size_t off = 0;
    while (off < n) {
      size_t have = n - off < 4 ? n - off : 4;
      for (size_t i = 0; i < have; ++i) bytes[i] = static_cast<uint8_t>(byte_value[ids[start + off + i]]);
      size_t used = utf8_scan(bytes, have);
      if (used == 0) return n - off;
      off += used;
    }
    return 0;
  }
};

Tokenizer::Tokenizer(std::shared_ptr<const Impl> impl) : impl_(std::move(impl)) {}
Tokenizer::~Tokenizer() = default;

Result<Tokenizer> Tokenizer::load(const std::string& path) {
  if (!path_exists(path)) return make_error(path, ": tokenizer model not found");
  auto bytes = read_small_file(path, kMaxModelBytes);
  if (!bytes.ok()) return with_context(bytes.take_error(), "cannot read the tokenizer model");
  return load_from_bytes(*bytes, path);
}

Result<Tokenizer> Tokenizer::load_from_bytes(std::string_view bytes, const std::string& name) {
  if (bytes.empty()) return make_error(name, ": empty file, not a SentencePiece model");
  auto impl = std::make_shared<Impl>();
  impl->name = name;
  try {
    sentencepiece::util::Status st = impl->sp.LoadFromSerializedProto(bytes);
    if (!st.ok()) {
      std::string why = st.message();
      if (why.find("ParseFromArray") != std::string::npos) why = "the bytes do not parse as a ModelProto";
      return make_error(name, ": not a SentencePiece model (", why, ")");
    }
    int n = impl->sp.GetPieceSize();
    if (n <= 0) return make_error(name, ": SentencePiece model without pieces");
    impl->vocab = n;
    impl->byte_value.assign(static_cast<size_t>(n), -1);
    for (int id = 0; id < n; ++id) {
      if (!impl->sp.IsByte(id)) continue;
      const std::string& p = impl->sp.IdToPiece(id);  // "<0xNN>"
      unsigned v = 0;
      if (p.size() != 6 || p.compare(0, 3, "<0x") != 0 || p[5] != '>' ||
          std::sscanf(p.c_str() + 3, "%2X", &v) != 1)
        return make_error(name, ": byte piece ", id, " is '", p, "', not <0xNN>");
      impl->byte_value[id] = static_cast<int16_t>(v);
    }
    for (int id = 0; id < n && impl->anchor < 0; ++id) {
      if (impl->sp.IsByte(id) || impl->sp.IsControl(id)) continue;
      std::string text = impl->decode_raw({id});
      if (!text.empty()) impl->anchor = id, impl->anchor_text = std::move(text);
    }
  } catch (const std::exception& e) {
    return make_error(name, ": cannot load the SentencePiece model: ", e.what());
  } catch (...) {
    return make_error(name, ": cannot load the SentencePiece model (unknown exception)");
  }
  return Tokenizer(std::move(impl));
}

Result<std::vector<int32_t>> Tokenizer::encode(std::string_view text) const {
  GROKIT_CHECK(impl_ != nullptr);
  std::vector<int> ids;
  try {
    sentencepiece::util::Status st = impl_->sp.Encode(text, &ids);
    if (!st.ok()) return make_error(impl_->name, ": cannot encode ", text.size(), " bytes: ", st.ToString());
  } catch (const std::exception& e) {
    return make_error(impl_->name, ": cannot encode ", text.size(), " bytes: ", e.what());
  } catch (...) {
    return make_error(impl_->name, ": cannot encode ", text.size(), " bytes (unknown exception)");
  }
  for (int id : ids) {
    if (!impl_->in_range(id)) return make_error(impl_->name, ": the model produced id ", id, " out of range");
  }
  return std::vector<int32_t>(ids.begin(), ids.end());
}

std::string Tokenizer::decode(std::span<const int32_t> ids) const {
  GROKIT_CHECK(impl_ != nullptr);
  std::string out;
  size_t start = 0;
  for (size_t i = 0; i <= ids.size(); ++i) {
    if (i < ids.size() && impl_->in_range(ids[i])) continue;
    out += impl_->decode_run(ids.subspan(start, i - start), !out.empty());
    if (i < ids.size()) out += kReplacement;
    start = i + 1;
  }
  return out;
}

int32_t Tokenizer::vocab_size() const { return impl_->vocab; }
int32_t Tokenizer::eos_id() const { return impl_->sp.eos_id(); }
int32_t Tokenizer::pad_id() const { return impl_->sp.pad_id(); }
int32_t Tokenizer::bos_id() const { return impl_->sp.bos_id(); }
int32_t Tokenizer::unk_id() const { return impl_->sp.unk_id(); }

std::string Tokenizer::piece(int32_t id) const {
  return impl_->in_range(id) ? impl_->sp.IdToPiece(id) : std::string();
}
bool Tokenizer::is_byte(int32_t id) const { return impl_->in_range(id) && impl_->byte_value[id] >= 0; }
bool Tokenizer::is_control(int32_t id) const { return impl_->in_range(id) && impl_->sp.IsControl(id); }

// ---------------------------------------------------------------------------------
// StreamDecoder. Invariant: the text returned so far is decode(ids before pending_), and
// pending_ starts at a character boundary of SentencePiece's byte scan. Once that text
// is non-empty (has_text_), decode(all ids) = returned text + decode_run(pending_ + rest,
// after_text); before, the ids kept in pending_ are all the ids so far.

StreamDecoder::StreamDecoder(const Tokenizer& tokenizer) : impl_(tokenizer.impl_) {
  GROKIT_CHECK(impl_ != nullptr);
}
StreamDecoder::~StreamDecoder() = default;
StreamDecoder::StreamDecoder(StreamDecoder&&) noexcept = default;
StreamDecoder& StreamDecoder::operator=(StreamDecoder&&) noexcept = default;

std::string StreamDecoder::decode_pending(size_t count) const {
  return impl_->decode_run(std::span<const int32_t>(pending_).first(count), has_text_);
}

std::string StreamDecoder::push(int32_t id) {
  if (!impl_->in_range(id)) {  // as decode(): U+FFFD, which ends any byte sequence
    std::string out = decode_pending(pending_.size()) + std::string(kReplacement);
    pending_.clear();
    has_text_ = true;
    return out;
  }
  pending_.push_back(id);
  size_t ready = pending_.size() - impl_->incomplete_tail(pending_);
  if (ready == 0) return {};
  std::string text = decode_pending(ready);
  if (!has_text_) {
    if (text.empty()) {
      // No text yet: whether the next piece loses its '▁' depends on these ids, so they
      // stay, unless they are all control pieces (those leave the decoder as it started).
      bool all_control = true;
      for (int32_t p : pending_) all_control = all_control && impl_->sp.IsControl(p);
      if (all_control) pending_.clear();
      return {};
    }
    has_text_ = true;
  }
  pending_.erase(pending_.begin(), pending_.begin() + static_cast<std::ptrdiff_t>(ready));
  return text;
}

std::string StreamDecoder::finish() {
  std::string out = decode_pending(pending_.size());
  pending_.clear();
  has_text_ = false;
  return out;
}

}  // namespace grokit::runner
