// Text <-> token ids with a SentencePiece model (Grok-1's tokenizer.model).
//
// Tokenizer wraps sentencepiece::SentencePieceProcessor the way the official Grok-1 runner
// uses it: encode(prompt) adds no BOS/EOS, decode(ids) is SentencePiece's decode. Nothing
// thrown by the library crosses this interface: failures are Error values.
//
// Ids outside [0, vocab_size()) never crash anything: decode() turns each one into U+FFFD
// (the replacement character), piece() returns an empty string for it.
//
// StreamDecoder turns ids generated one at a time into text that can be printed at once.
// Its pieces concatenate to exactly decode(all ids):
//   * a character split over byte-fallback pieces (<0xE2><0x82><0xAC> for "€") is held
//     back until its last byte arrives; no push() result ever ends inside a character;
//   * SentencePiece drops the leading '▁' of the first piece of a text; the decoder keeps
//     track of whether text has been produced yet, so a later "▁word" still gets its space.
// Each push() decodes only the ids not yet turned into text: once some text has come out,
// that is at most the pending bytes of one character plus the new id (with one "anchor"
// piece in front, see tokenizer.cpp), so the work per token is O(1). Before any text, the
// ids so far are kept (a leading '▁' piece, byte pieces); leading control pieces are not.
// Assumes, as Grok-1's model and scripts/make_tokenizer.py's do, no denormalizer rules
// (decode then being a concatenation of piece surfaces); with one, it is best effort.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "common/common.h"

namespace grokit::runner {

class Tokenizer {
 public:
  // Loads a SentencePiece model file. Errors name the path: missing, not a regular file,
  // or not a SentencePiece model (with the library's reason).
  static Result<Tokenizer> load(const std::string& path);
  // Same, from the bytes of a model file; `name` is used in error messages.
  static Result<Tokenizer> load_from_bytes(std::string_view bytes, const std::string& name);

  // Shares the loaded model (it is immutable); a moved-from Tokenizer must not be used.
  Tokenizer(const Tokenizer&) = default;
  Tokenizer& operator=(const Tokenizer&) = default;
  Tokenizer(Tokenizer&&) noexcept = default;
  Tokenizer& operator=(Tokenizer&&) noexcept = default;
  ~Tokenizer();

  // The ids of `text`, with no BOS or EOS (as the official runner's tokenizer.encode).
  // Arbitrary bytes are accepted (invalid UTF-8 is the library's business: it encodes it
  // as byte pieces or U+FFFD; it never fails for it).
  Result<std::vector<int32_t>> encode(std::string_view text) const;
  // The text of `ids`: control pieces ([PAD], [BOS], [EOS]) decode to nothing, byte pieces
  // that do not form valid UTF-8 to one U+FFFD per byte, out-of-range ids to one U+FFFD.
  std::string decode(std::span<const int32_t> ids) const;

  int32_t vocab_size() const;
  // Special ids, -1 where the model defines none.
  int32_t eos_id() const;
  int32_t pad_id() const;
  int32_t bos_id() const;
  int32_t unk_id() const;
  // The piece of `id` as stored in the model ("▁the", "<0xE2>", "[EOS]"); "" when
  // `id` is out of range.
  std::string piece(int32_t id) const;
  bool is_byte(int32_t id) const;     // a byte-fallback piece <0xNN>
  bool is_control(int32_t id) const;  // [PAD], [BOS], [EOS] and other control pieces

  struct Impl;

 private:
  explicit Tokenizer(std::shared_ptr<const Impl> impl);
  friend class StreamDecoder;
  std::shared_ptr<const Impl> impl_;
};

class StreamDecoder {
 public:
  // Shares the tokenizer's model; the Tokenizer object itself may go away.
  explicit StreamDecoder(const Tokenizer& tokenizer);
  ~StreamDecoder();
  StreamDecoder(StreamDecoder&&) noexcept;
  StreamDecoder& operator=(StreamDecoder&&) noexcept;
  StreamDecoder(const StreamDecoder&) = delete;
  StreamDecoder& operator=(const StreamDecoder&) = delete;

  // The text that became final with `id`: valid UTF-8, possibly empty, never repeated.
  std::string push(int32_t id);
  // What is left: the bytes of an unfinished character at the very end become U+FFFD,
  // one per byte, as decode() makes them. The decoder is then ready for a new text.
  std::string finish();

 private:
  std::string decode_pending(size_t count) const;

  std::shared_ptr<const Tokenizer::Impl> impl_;
  std::vector<int32_t> pending_;  // ids not yet turned into text
  bool has_text_ = false;         // decode(all ids so far) is not empty
};

}  // namespace grokit::runner
