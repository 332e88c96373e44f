#include "common/npy.h"

#include <array>
#include <cctype>
#include <utility>

namespace grokit::npy {

namespace {

constexpr char kMagic[] = "\x93NUMPY";
constexpr uint64_t kMagicLen = 6;
constexpr uint64_t kAlign = 64;       // numpy's ARRAY_ALIGN: data starts on a 64-byte boundary
constexpr size_t kMaxDims = 64;       // numpy 2's NPY_MAXDIMS; bounds a hostile header's tuple
constexpr size_t kGrowthDigits = 21;  // numpy's GROWTH_AXIS_MAX_DIGITS: spare room after the dict

struct DType {
  std::string_view descr;
  uint64_t size;
};
constexpr std::array<DType, 6> kDTypes{{{"<f4", 4}, {"<i4", 4}, {"<i8", 8}, {"<u2", 2}, {"|i1", 1}, {"|u1", 1}}};

uint64_t descr_size(std::string_view descr) {
  for (const auto& d : kDTypes)
    if (d.descr == descr) return d.size;
  return 0;
}

std::string accepted_list() {
  std::string s;
  for (const auto& d : kDTypes) s += (s.empty() ? "'" : ", '") + std::string(d.descr) + "'";
  return s;
}

std::string shape_text(std::span<const int64_t> shape) {
  std::string r = "[";
  for (size_t i = 0; i < shape.size(); ++i) r += (i ? ", " : "") + std::to_string(shape[i]);
  return r + "]";
}

// A strict parser for the header dict, a Python literal such as
//   {'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }
// Keys in any order, each exactly once; whitespace between tokens; an optional trailing
// comma in the dict and the tuple; a 1-tuple needs its comma, as in Python. Strings
// have no escapes (no accepted descr needs one). Errors give the file byte offset.
class DictParser {
 public:
  DictParser(std::string_view text, uint64_t base, const std::string& file) : s_(text), base_(base), file_(file) {}

  Status parse(std::string* descr, bool* fortran_order, std::vector<int64_t>* shape) {
    bool have_descr = false, have_fortran = false, have_shape = false;
    skip_ws();
    if (!eat('{')) return error("expected '{' to open the header dict");
    skip_ws();
    while (!eat('}')) {
      std::string key;
      GROKIT_TRY(parse_string(&key));
      skip_ws();
      if (!eat(':')) return error("expected ':' after key '", key, "'");
      skip_ws();
      if (key == "descr") {
        if (have_descr) return error("duplicate key 'descr'");
        have_descr = true;
        GROKIT_TRY(parse_string(descr));
      } else if (key == "fortran_order") {
        if (have_fortran) return error("duplicate key 'fortran_order'");
        have_fortran = true;
        GROKIT_TRY(parse_bool(fortran_order));
      } else if (key == "shape") {
        if (have_shape) return error("duplicate key 'shape'");
        have_shape = true;
        GROKIT_TRY(parse_shape(shape));
      } else {
        return error("unexpected key '", key, "' (an .npy header has 'descr', 'fortran_order' and 'shape')");
      }
      skip_ws();
      if (eat(',')) {
        skip_ws();
        continue;
      }
      if (peek() != '}') return error("expected ',' or '}' after the value of '", key, "'");
    }
    skip_ws();
    if (i_ != s_.size()) return error("unexpected bytes after the header dict");
    if (!have_descr || !have_fortran || !have_shape)
      return error("the header dict lacks ", !have_descr ? "'descr'" : !have_fortran ? "'fortran_order'" : "'shape'");
    return {};
  }

 private:
  template <class... Args>
  Error error(const Args&... args) const {
    return make_error(file_, ": bad .npy header at byte ", base_ + i_, ": ", args...);
  }
  int peek() const { return i_ < s_.size() ? static_cast<unsigned char>(s_[i_]) : -1; }
  bool eat(char c) {
    if (i_ < s_.size() && s_[i_] == c) {
      ++i_;
      return true;
    }
    return false;
  }
  void skip_ws() {
    while (i_ < s_.size() && (s_[i_] == ' ' || s_[i_] == '\t' || s_[i_] == '\n' || s_[i_] == '\r')) ++i_;
  }
  bool eat_word(std::string_view w) {
    if (s_.substr(i_, w.size()) != w) return false;
    size_t end = i_ + w.size();
    if (end < s_.size() && (std::isalnum(static_cast<unsigned char>(s_[end])) || s_[end] == '_')) return false;
    i_ = end;
    return true;
  }

  Status parse_string(std::string* out) {
    int q = peek();
    if (q != '\'' && q != '"') return error("expected a quoted string");
    ++i_;
    size_t start = i_;
    while (i_ < s_.size() && s_[i_] != q) {
      if (s_[i_] == '\\') return error("escapes in strings are not accepted");
      if (s_[i_] == '\n') return error("unterminated string");
      ++i_;
    }
    if (i_ == s_.size()) return error("unterminated string");
    *out = std::string(s_.substr(start, i_ - start));
    ++i_;
    return {};
  }

  Status parse_bool(bool* out) {
    if (eat_word("True")) *out = true;
    else if (eat_word("False")) *out = false;
    else return error("expected True or False for 'fortran_order'");
    return {};
  }

  Status parse_int(int64_t* out) {
    size_t at = i_;
    bool negative = eat('-');
    if (negative) skip_ws();  // Python reads "- 3" as -3
    size_t start = i_;
    uint64_t v = 0;
    bool overflow = false;
    while (i_ < s_.size() && s_[i_] >= '0' && s_[i_] <= '9') {
      uint64_t d = static_cast<uint64_t>(s_[i_] - '0');
      if (!checked_mul(v, 10, &v) || !checked_add(v, d, &v)) overflow = true;
      ++i_;
    }
    if (i_ == start) {
      i_ = at;
      return error("expected an integer dimension");
    }
    if (i_ - start > 1 && s_[start] == '0') {
      i_ = start;
      return error("an integer with a leading zero is not a Python literal");
    }
    if (i_ < s_.size() && (std::isalpha(static_cast<unsigned char>(s_[i_])) || s_[i_] == '_' || s_[i_] == '.')) {
      return error("expected an integer dimension");
    }
    if (negative && v != 0) {
      i_ = at;
      return error("negative dimension -", overflow ? std::string("(huge)") : std::to_string(v));
    }
    if (overflow || v > static_cast<uint64_t>(INT64_MAX)) {
      std::string digits(s_.substr(start, std::min<size_t>(i_ - start, 40)));
      i_ = start;
      return error("dimension ", digits, " is too large");
    }
    *out = static_cast<int64_t>(v);
    return {};
  }

  Status parse_shape(std::vector<int64_t>* shape) {
    if (!eat('(')) return error("expected a tuple for 'shape'");
    shape->clear();
    skip_ws();
    if (eat(')')) return {};  // () : a 0-d array
    bool comma_after_last = false;
    while (true) {
      if (shape->size() == kMaxDims) return error("more than ", kMaxDims, " dimensions");
      int64_t d = 0;
      GROKIT_TRY(parse_int(&d));
      shape->push_back(d);
      skip_ws();
      if (eat(',')) {
        comma_after_last = true;
        skip_ws();
        if (eat(')')) break;
        comma_after_last = false;
        continue;
      }
      if (eat(')')) break;
      return error("expected ',' or ')' in the shape tuple");
    }
    if (shape->size() == 1 && !comma_after_last)
      return error("shape (", (*shape)[0], ") is an integer, not a tuple: a 1-tuple is written (", (*shape)[0], ",)");
    return {};
  }

  std::string_view s_;
  uint64_t base_;
  const std::string& file_;
  size_t i_ = 0;
};

// Checks descr and shape and returns the data size, or an error naming `file`.
Result<uint64_t> data_bytes(std::string_view descr, std::span<const int64_t> shape, const std::string& file,
                            uint64_t* element_size) {
  uint64_t esize = descr_size(descr);
  if (esize == 0)
    return make_error(file, ": dtype '", descr, "' is not accepted (accepted: ", accepted_list(),
                      "; little-endian only)");
  if (shape.size() > kMaxDims) return make_error(file, ": ", shape.size(), " dimensions, more than ", kMaxDims);
  uint64_t count = 1;
  for (int64_t d : shape) {
    if (d < 0) return make_error(file, ": negative dimension in shape ", shape_text(shape));
    if (!checked_mul(count, static_cast<uint64_t>(d), &count))
      return make_error(file, ": shape ", shape_text(shape), " has more elements than 2^64");
  }
  uint64_t bytes = 0;
  if (!checked_mul(count, esize, &bytes))
    return make_error(file, ": shape ", shape_text(shape), " of ", descr, " needs more than 2^64 bytes");
  *element_size = esize;
  return bytes;
}

}  // namespace

uint64_t Header::element_count() const {
  uint64_t n = 1;
  for (int64_t d : shape) n *= static_cast<uint64_t>(d);  // checked by parse_header
  return n;
}

Result<Header> parse_header(const uint8_t* data, uint64_t size, const std::string& file) {
  if (size < kMagicLen + 4 || std::memcmp(data, kMagic, kMagicLen) != 0)
    return make_error(file, ": not an .npy file (no \\x93NUMPY magic at byte 0)");
  const uint8_t major = data[6], minor = data[7];
  uint64_t prefix = 0, header_len = 0;
  if (major == 1 && minor == 0) {
    prefix = 10;
    header_len = load_le<uint16_t>(data + 8);
  } else if (major == 2 && minor == 0) {
    prefix = 12;
    if (size < prefix) return make_error(file, ": ", size, " bytes, too short for an .npy 2.0 header");
    header_len = load_le<uint32_t>(data + 8);
  } else {
    return make_error(file, ": .npy format version ", int{major}, ".", int{minor},
                      " is not supported (1.0 and 2.0 are)");
  }
  uint64_t data_offset = prefix + header_len;  // no overflow: both are below 2^33
  if (data_offset > size)
    return make_error(file, ": header of ", header_len, " bytes at byte ", prefix, " runs past the end of the file (",
                      size, " bytes)");
  Header h;
  std::string_view text(reinterpret_cast<const char*>(data + prefix), header_len);
  bool fortran_order = false;
  GROKIT_TRY(DictParser(text, prefix, file).parse(&h.descr, &fortran_order, &h.shape));
  if (fortran_order) return make_error(file, ": fortran_order is True; only C-order arrays are accepted");
  GROKIT_ASSIGN_OR_RETURN(uint64_t bytes, data_bytes(h.descr, h.shape, file, &h.element_size));
  if (data_offset % h.element_size != 0)
    return make_error(file, ": data offset ", data_offset, " is not a multiple of the element size ", h.element_size);
  h.data_offset = data_offset;
  const uint64_t have = size - data_offset;
  if (have < bytes)
    return make_error(file, ": truncated: shape ", shape_text(h.shape), " of ", h.descr, " needs ", bytes,
                      " bytes of data after byte ", data_offset, ", the file holds ", have, " (", size, " bytes in all)");
  if (have > bytes)
    return make_error(file, ": ", have - bytes, " bytes of trailing data: shape ", shape_text(h.shape), " of ",
                      h.descr, " needs ", bytes, " bytes after byte ", data_offset, ", the file holds ", have, " (",
                      size, " bytes in all)");
  return h;
}

// ---------------------------------------------------------------------------------
Result<Array> Array::open(const std::string& path) {
  Array a;
  GROKIT_ASSIGN_OR_RETURN(a.file_, MappedFile::open(path));
  GROKIT_ASSIGN_OR_RETURN(a.header_, parse_header(a.file_.data(), a.file_.size(), path));
  return a;
}

Status Array::expect(std::string_view descr, size_t ndim) const {
  if (header_.descr == descr && header_.shape.size() == ndim) return {};
  return make_error(path(), ": expected ", descr, " with ", ndim, ndim == 1 ? " dimension" : " dimensions",
                    " / actual ", header_.descr, " ", shape_text(header_.shape));
}

// ---------------------------------------------------------------------------------
namespace {

// The header numpy.save writes (version 1.0) for a C-order array.
Result<std::string> header_bytes(std::string_view descr, std::span<const int64_t> shape) {
  std::string shape_repr = "(";
  for (size_t i = 0; i < shape.size(); ++i) shape_repr += (i ? ", " : "") + std::to_string(shape[i]);
  if (shape.size() == 1) shape_repr += ",";
  shape_repr += ")";
  std::string dict = "{'descr': '" + std::string(descr) + "', 'fortran_order': False, 'shape': " + shape_repr + ", }";
  if (!shape.empty()) {
    size_t digits = std::to_string(shape[0]).size();
    dict.append(kGrowthDigits > digits ? kGrowthDigits - digits : 0, ' ');
  }
  const uint64_t hlen = dict.size() + 1;  // + '\n'
  const uint64_t pad = kAlign - (kMagicLen + 4 + hlen) % kAlign;
  if (hlen + pad > UINT16_MAX) return make_error("an .npy 1.0 header of ", hlen + pad, " bytes is too long");
  std::string out(kMagic, kMagicLen);
  out += '\x01';
  out += '\x00';
  char len[2];
  store_le<uint16_t>(len, static_cast<uint16_t>(hlen + pad));
  out.append(len, 2);
  out += dict;
  out.append(pad, ' ');
  out += '\n';
  return out;
}

}  // namespace

Result<Writer> Writer::create(const std::string& path, std::string_view descr, std::span<const int64_t> shape,
                              bool overwrite) {
  uint64_t esize = 0;
  GROKIT_ASSIGN_OR_RETURN(uint64_t bytes, data_bytes(descr, shape, path, &esize));
  GROKIT_ASSIGN_OR_RETURN(std::string header, header_bytes(descr, shape));
  if (!overwrite && path_exists(path)) return make_error(path, ": exists; refusing to overwrite it");
  Writer w;
  w.path_ = path;
  GROKIT_ASSIGN_OR_RETURN(w.file_, OutputFile::open(path + ".tmp", OutputFile::Mode::kCreateOrTruncate));
  w.tmp_ = path + ".tmp";  // from here on ~Writer removes it unless finish() succeeds
  w.overwrite_ = overwrite;
  w.data_offset_ = header.size();
  w.expected_ = bytes;
  GROKIT_TRY(w.file_.pwrite_all(0, header.data(), header.size()));  // on error ~Writer removes the tmp file
  return w;
}

Writer::~Writer() { discard(); }

Writer::Writer(Writer&& o) noexcept
    : path_(std::move(o.path_)), tmp_(std::exchange(o.tmp_, {})), file_(std::move(o.file_)),
      data_offset_(o.data_offset_), expected_(o.expected_), written_(o.written_), finished_(o.finished_),
      overwrite_(o.overwrite_) {}

Writer& Writer::operator=(Writer&& o) noexcept {
  if (this != &o) {
    discard();
    path_ = std::move(o.path_);
    tmp_ = std::exchange(o.tmp_, {});
    file_ = std::move(o.file_);
    data_offset_ = o.data_offset_;
    expected_ = o.expected_;
    written_ = o.written_;
    finished_ = o.finished_;
    overwrite_ = o.overwrite_;
  }
  return *this;
}

void Writer::discard() {
  if (finished_ || tmp_.empty()) return;
  (void)file_.close();
  (void)remove_file(tmp_);
  tmp_.clear();
}

Status Writer::write(const void* data, size_t bytes) {
  if (finished_ || tmp_.empty()) return make_error(path_, ": write after finish()");
  uint64_t end = 0;
  if (!checked_add(written_, bytes, &end) || end > expected_)
    return make_error(path_, ": ", written_, " + ", bytes, " bytes is more than the ", expected_,
                      " bytes the shape needs");
  GROKIT_TRY(file_.pwrite_all(data_offset_ + written_, data, bytes));
  written_ = end;
  return {};
}

Status Writer::finish() {
  if (finished_ || tmp_.empty()) return make_error(path_, ": finish() called twice");
  Status s = [&]() -> Status {
    if (written_ != expected_)
      return make_error(path_, ": ", written_, " bytes of data written, the shape needs ", expected_);
    GROKIT_TRY(file_.sync());
    GROKIT_TRY(file_.close());
    if (!overwrite_ && path_exists(path_)) return make_error(path_, ": appeared while writing; refusing to overwrite it");
    return rename_file(tmp_, path_);
  }();
  if (!s.ok()) {
    discard();
    return s;
  }
  finished_ = true;
  return fsync_directory(path_dirname(path_));
}

Status write_array(const std::string& path, std::string_view descr, std::span<const int64_t> shape, const void* data,
                   bool overwrite) {
  GROKIT_ASSIGN_OR_RETURN(Writer w, Writer::create(path, descr, shape, overwrite));
  GROKIT_TRY(w.write(data, w.bytes_expected()));
  return w.finish();
}

}  // namespace grokit::npy
