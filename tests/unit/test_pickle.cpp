// Tests of the safe pickle interpreter (convert/pickle.h) against the encoding of the
// Grok-1 release (spec §2.1).
//
// Pickles are built in C++ by PyPickler, which writes what CPython's pickle writes for
// numpy arrays and QuantizedWeight8bit (memo, frames, large payloads outside frames,
// protocols 2 to 5), and by Pk, a raw opcode-by-opcode writer for hand-made corrupt
// input. A few byte strings produced once by Python are embedded to check the builder
// itself, and the builder is checked against the byte sizes the spec measured for every
// kind of released file.
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <map>
#include <string>
#include <vector>

#include "common/common.h"
#include "convert/pickle.h"

namespace grokit::convert {
namespace {

using Buf = std::vector<uint8_t>;

// ---------------------------------------------------------------------------------
// Raw opcode writer.
struct Pk {
  Buf b;
  uint64_t pos() const { return b.size(); }
  Pk& op(uint8_t o) { b.push_back(o); return *this; }
  template <class T>
  Pk& le(T v) {
    uint8_t t[sizeof(T)];
    std::memcpy(t, &v, sizeof(T));
    b.insert(b.end(), t, t + sizeof(T));
    return *this;
  }
  Pk& raw(std::string_view s) { b.insert(b.end(), s.begin(), s.end()); return *this; }
  Pk& raw(const Buf& s) { b.insert(b.end(), s.begin(), s.end()); return *this; }
  Pk& proto(uint8_t v) { return op(0x80).le<uint8_t>(v); }
  Pk& frame(uint64_t n) { return op(0x95).le<uint64_t>(n); }
  Pk& sbu(std::string_view s) { return op(0x8c).le<uint8_t>(static_cast<uint8_t>(s.size())).raw(s); }
  Pk& binunicode(std::string_view s) { return op('X').le<uint32_t>(static_cast<uint32_t>(s.size())).raw(s); }
  Pk& memoize() { return op(0x94); }
  Pk& stack_global(std::string_view mod, std::string_view name) {
    return sbu(mod).memoize().sbu(name).memoize().op(0x93).memoize();
  }
  Pk& global(std::string_view mod, std::string_view name) {
    return op('c').raw(mod).raw("\n").raw(name).raw("\n");
  }
  Pk& k(uint8_t v) { return op('K').le<uint8_t>(v); }
  Pk& m(uint16_t v) { return op('M').le<uint16_t>(v); }
  Pk& j(int32_t v) { return op('J').le<int32_t>(v); }
  Pk& sbb(const Buf& d) { return op('C').le<uint8_t>(static_cast<uint8_t>(d.size())).raw(d); }
  Pk& bb(const Buf& d) { return op('B').le<uint32_t>(static_cast<uint32_t>(d.size())).raw(d); }
  Pk& mark() { return op('('); }
  Pk& tuple() { return op('t'); }
  Pk& tuple1() { return op(0x85); }
  Pk& tuple2() { return op(0x86); }
  Pk& tuple3() { return op(0x87); }
  Pk& empty_tuple() { return op(')'); }
  Pk& empty_list() { return op(']'); }
  Pk& empty_dict() { return op('}'); }
  Pk& reduce() { return op('R'); }
  Pk& build() { return op('b'); }
  Pk& none() { return op('N'); }
  Pk& t() { return op(0x88); }
  Pk& f() { return op(0x89); }
  Pk& binput(uint8_t i) { return op('q').le<uint8_t>(i); }
  Pk& binget(uint8_t i) { return op('h').le<uint8_t>(i); }
  Pk& stop() { return op('.'); }
};

// ---------------------------------------------------------------------------------
// What CPython's pickle writes for our objects.
enum class DT { kF32, kI8, kBF16 };

struct PyOptions {
  int proto = 4;
  std::string numpy_core = "numpy.core";  // "numpy._core" for numpy 2
  bool explicit_put = false;              // BINPUT/LONG_BINPUT even at protocol 4
  uint32_t memo_base = 0;                 // first memo index (>= 256: LONG_BINPUT/LONG_BINGET)
  bool binbytes8 = false;                 // payloads as BINBYTES8
  int bf16_flags = 64;                    // the dtype flags ml_dtypes writes (64 in the spec)
  bool fortran = false;                   // the ndarray state's is_fortran flag
  std::string dtype_override;             // dtype string instead of 'f4' / 'i1'
  std::string byteorder_override;         // dtype state byte order instead of '<' / '|'
};

class PyPickler {
 public:
  using Options = PyOptions;
  explicit PyPickler(Options o = {}) : o_(std::move(o)), memo_next_(o_.memo_base) {
    out_.push_back(0x80);
    out_.push_back(static_cast<uint8_t>(o_.proto));
    framing_ = o_.proto >= 4;
  }

  // numpy's ndarray.__reduce__: _reconstruct + BUILD. `virtual_len` != 0 stands for a
  // payload of that many bytes that is counted but not stored (for size checks only).
  void ndarray(DT dt, const std::vector<int64_t>& shape, const Buf& payload, uint64_t virtual_len = 0) {
    global(o_.numpy_core + ".multiarray", "_reconstruct");
    global("numpy", "ndarray");
    integer(0);
    tuple_end(1);
    small_bytes("b");
    tuple_end(3);
    tag("reduce");
    w('R');
    memoize("");
    w('(');
    integer(1);
    shape_tuple(shape);
    dtype(dt);
    w(o_.fortran ? 0x88 : 0x89);
    payload_bytes(payload, virtual_len, /*bytearray=*/false);
    w('t');
    memoize("");
    tag("build");
    w('b');
  }

  // numpy's ndarray.__reduce_ex__(5) for builtin dtypes: _frombuffer(buffer, dtype, shape, order).
  void ndarray_frombuffer(DT dt, const std::vector<int64_t>& shape, const Buf& payload, const std::string& order = "C") {
    global(o_.numpy_core + ".numeric", "_frombuffer");
    w('(');
    payload_bytes(payload, 0, /*bytearray=*/true);
    dtype(dt);
    shape_tuple(shape);
    str(order);
    w('t');
    memoize("");
    tag("reduce");
    w('R');
    memoize("");
  }

  // A QuantizedWeight8bit dataclass: NEWOBJ, then BUILD with {'weight': ..., 'scales': ...}.
  template <class W, class S>
  void quantized(W&& weight, S&& scales) {
    global("__main__", "QuantizedWeight8bit");
    w(')');
    w(0x81);
    memoize("");
    w('}');
    memoize("");
    w('(');
    str("weight");
    weight();
    str("scales");
    scales();
    w('u');
    tag("build");
    w('b');
  }

  Buf finish() {
    w('.');
    commit();
    return out_;
  }
  uint64_t total_size() const { return out_.size() + virtual_; }
  // File offsets of the payloads, in order, and of tagged opcodes (last one wins).
  std::vector<uint64_t> payload_offsets;
  std::map<std::string, uint64_t> tags;

 private:
  Buf& cur() { return framing_ ? frame_ : out_; }
  void w(uint8_t c) { cur().push_back(c); }
  void w(const void* p, size_t n) {
    auto* c = static_cast<const uint8_t*>(p);
    cur().insert(cur().end(), c, c + n);
  }
  template <class T>
  void le(T v) { w(&v, sizeof v); }

  // Offsets inside the open frame are known only when the frame is committed.
  struct Pending { bool payload; size_t index; std::string tag; uint64_t rel; };
  void at_here_payload() {
    payload_offsets.push_back(0);
    if (framing_) pending_.push_back({true, payload_offsets.size() - 1, "", frame_.size()});
    else payload_offsets.back() = out_.size() + virtual_;
  }
  void tag(const std::string& t) {
    if (framing_) pending_.push_back({false, 0, t, frame_.size()});
    else tags[t] = out_.size() + virtual_;
  }
  void commit() {
    if (!framing_) return;
    uint64_t base = out_.size() + virtual_;
    if (frame_.size() >= 4) {
      out_.push_back(0x95);
      uint64_t n = frame_.size();
      uint8_t t[8];
      std::memcpy(t, &n, 8);
      out_.insert(out_.end(), t, t + 8);
      base += 9;
    }
    out_.insert(out_.end(), frame_.begin(), frame_.end());
    for (const auto& p : pending_) {
      if (p.payload) payload_offsets[p.index] = base + p.rel;
      else tags[p.tag] = base + p.rel;
    }
    pending_.clear();
    frame_.clear();
  }

  void memoize(const std::string& key) {
    uint32_t idx = memo_next_++;
    if (!key.empty()) memo_[key] = idx;
    if (o_.proto >= 4 && !o_.explicit_put) {
      w(0x94);
    } else if (idx < 256) {
      w('q');
      w(static_cast<uint8_t>(idx));
    } else {
      w('r');
      le<uint32_t>(idx);
    }
  }
  bool get(const std::string& key) {
    auto it = memo_.find(key);
    if (it == memo_.end()) return false;
    if (it->second < 256) {
      w('h');
      w(static_cast<uint8_t>(it->second));
    } else {
      w('j');
      le<uint32_t>(it->second);
    }
    return true;
  }
  void str(const std::string& s, bool unique = false) {
    if (!unique && get("s:" + s)) return;
    if (o_.proto >= 4 && s.size() < 256) {
      w(0x8c);
      w(static_cast<uint8_t>(s.size()));
    } else {
      w('X');
      le<uint32_t>(static_cast<uint32_t>(s.size()));
    }
    w(s.data(), s.size());
    memoize(unique ? "" : "s:" + s);
  }
  void global(const std::string& mod, const std::string& name) {
    std::string key = "g:" + mod + "." + name;
    if (get(key)) return;
    if (o_.proto >= 4) {
      str(mod);
      str(name);
      w(0x93);
    } else {
      w('c');
      w(mod.data(), mod.size());
      w('\n');
      w(name.data(), name.size());
      w('\n');
    }
    memoize(key);
  }
  void integer(int64_t v) {
    if (v >= 0 && v <= 0xff) {
      w('K');
      w(static_cast<uint8_t>(v));
    } else if (v >= 0 && v <= 0xffff) {
      w('M');
      le<uint16_t>(static_cast<uint16_t>(v));
    } else if (v >= INT32_MIN && v <= INT32_MAX) {
      w('J');
      le<int32_t>(static_cast<int32_t>(v));
    } else {
      // LONG1 with the minimal two's-complement length (the shapes here are positive).
      uint8_t t[8];
      std::memcpy(t, &v, 8);
      uint8_t n = 8;
      while (n > 1 && t[n - 1] == 0 && !(t[n - 2] & 0x80)) --n;
      w(0x8a);
      w(n);
      w(t, n);
    }
  }
  void tuple_begin(size_t n) {
    if (n > 3) w('(');
  }
  void tuple_end(size_t n) {
    if (n == 0) {
      w(')');
      return;
    }
    w(n <= 3 ? static_cast<uint8_t>(0x84 + n) : static_cast<uint8_t>('t'));
    memoize("");
  }
  void shape_tuple(const std::vector<int64_t>& shape) {
    tuple_begin(shape.size());
    for (int64_t d : shape) integer(d);
    tuple_end(shape.size());
  }
  void dtype(DT dt) {
    std::string key = dt == DT::kF32 ? "d:f4" : dt == DT::kI8 ? "d:i1" : "d:bf16";
    if (o_.dtype_override.empty() && get(key)) return;
    global("numpy", "dtype");
    if (dt == DT::kBF16) {
      global("ml_dtypes", "bfloat16");
    } else {
      str(!o_.dtype_override.empty() ? o_.dtype_override : dt == DT::kF32 ? "f4" : "i1");
    }
    w(0x89);
    w(0x88);
    tuple_end(3);
    tag("dtype_reduce");
    w('R');
    memoize(o_.dtype_override.empty() ? key : "");
    w('(');
    integer(3);
    str(!o_.byteorder_override.empty() ? o_.byteorder_override : dt == DT::kI8 ? "|" : "<");
    w('N');
    w('N');
    w('N');
    integer(dt == DT::kBF16 ? 2 : -1);
    integer(dt == DT::kBF16 ? 2 : -1);
    integer(dt == DT::kBF16 ? o_.bf16_flags : 0);
    w('t');
    memoize("");
    tag("dtype_build");
    w('b');
  }
  // b'b' and other short constants: memoized by value like CPython's shared objects.
  void small_bytes(const std::string& s) {
    if (get("b:" + s)) return;
    if (o_.proto < 3) {
      codecs_encode(Buf(s.begin(), s.end()), "b:" + s);
      return;
    }
    w('C');
    w(static_cast<uint8_t>(s.size()));
    w(s.data(), s.size());
    memoize("b:" + s);
  }
  // Protocol 2 has no bytes opcodes: _codecs.encode(latin1 text as str, 'latin1').
  void codecs_encode(const Buf& d, const std::string& key) {
    global("_codecs", "encode");
    std::string text;
    for (uint8_t c : d) {
      if (c < 0x80) {
        text += static_cast<char>(c);
      } else {
        text += static_cast<char>(0xc0 | (c >> 6));
        text += static_cast<char>(0x80 | (c & 0x3f));
      }
    }
    str(text, /*unique=*/true);
    str("latin1");
    tuple_end(2);
    w('R');
    memoize(key);
  }
  void payload_bytes(const Buf& d, uint64_t virtual_len, bool bytearray) {
    uint64_t n = virtual_len != 0 ? virtual_len : d.size();
    if (o_.proto < 3) {
      codecs_encode(d, "");
      payload_offsets.push_back(0);  // decoded, not in the file
      return;
    }
    uint8_t hdr[9];
    size_t hn;
    if (bytearray) {
      hdr[0] = 0x96;
      std::memcpy(hdr + 1, &n, 8);
      hn = 9;
    } else if (o_.binbytes8 || n > 0xffffffffu) {
      hdr[0] = 0x8e;
      std::memcpy(hdr + 1, &n, 8);
      hn = 9;
    } else if (n < 256) {
      hdr[0] = 'C';
      hdr[1] = static_cast<uint8_t>(n);
      hn = 2;
    } else {
      hdr[0] = 'B';
      uint32_t n32 = static_cast<uint32_t>(n);
      std::memcpy(hdr + 1, &n32, 4);
      hn = 5;
    }
    if (framing_ && n >= 65536) {
      // Large payloads go outside any frame: the frame ends before the opcode.
      commit();
      out_.insert(out_.end(), hdr, hdr + hn);
      payload_offsets.push_back(out_.size() + virtual_);
      if (virtual_len != 0) virtual_ += virtual_len;
      else out_.insert(out_.end(), d.begin(), d.end());
    } else {
      if (virtual_len != 0) ADD_FAILURE() << "virtual payloads must be >= 64 KiB";
      w(hdr, hn);
      at_here_payload();
      w(d.data(), d.size());
    }
    memoize("");
  }

  Options o_;
  bool framing_ = false;
  Buf out_, frame_;
  uint64_t virtual_ = 0;
  std::map<std::string, uint32_t> memo_;
  uint32_t memo_next_;
  std::vector<Pending> pending_;
};

// ---------------------------------------------------------------------------------
// Helpers.
Buf f32_bytes(const std::vector<float>& v) {
  Buf b(v.size() * 4);
  std::memcpy(b.data(), v.data(), b.size());
  return b;
}
Buf i8_bytes(const std::vector<int8_t>& v) {
  Buf b(v.size());
  std::memcpy(b.data(), v.data(), b.size());
  return b;
}
Buf bf16_bytes(const std::vector<float>& v) {
  Buf b(v.size() * 2);
  for (size_t i = 0; i < v.size(); ++i) {
    uint16_t h = f32_to_bf16_bits(v[i]);
    std::memcpy(b.data() + 2 * i, &h, 2);
  }
  return b;
}
std::vector<float> iota_f32(size_t n, float scale = 0.25f) {
  std::vector<float> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = static_cast<float>(i) * scale - 3.0f;
  return v;
}

Result<ReleaseTensor> parse(const Buf& b, const PickleLimits& limits = {}) {
  return parse_release_pickle(b.data(), b.size(), "t.pkl", limits);
}
Result<ReleaseTensor> parse(const uint8_t* p, size_t n) { return parse_release_pickle(p, n, "t.pkl"); }

std::string at(uint64_t offset) { return "t.pkl: byte " + std::to_string(offset) + ": "; }

// Asserts an error whose message contains every fragment.
#define EXPECT_PICKLE_ERROR(result, ...)                                                   \
  do {                                                                                     \
    const auto& r_ = (result);                                                             \
    ASSERT_FALSE(r_.ok()) << "parsed a pickle that should be refused";                     \
    for (const std::string& frag_ : std::vector<std::string>{__VA_ARGS__})                 \
      EXPECT_NE(r_.error().message.find(frag_), std::string::npos)                         \
          << "message: " << r_.error().message << "\nlacks: " << frag_;                   \
  } while (0)

void expect_f32(const ArrayView& a, const std::vector<int64_t>& shape, const std::vector<float>& values) {
  EXPECT_EQ(a.type, ElementType::kF32);
  EXPECT_EQ(a.shape, shape);
  ASSERT_EQ(a.nbytes, values.size() * 4);
  ASSERT_NE(a.data, nullptr);
  std::vector<float> got(values.size());
  std::memcpy(got.data(), a.data, a.nbytes);
  EXPECT_EQ(got, values);
}

// A 1-D float32 array pickle written the way CPython writes it at protocol 4.
Buf f32_pickle(const std::vector<float>& v, PyPickler::Options o = {}) {
  PyPickler p(std::move(o));
  p.ndarray(DT::kF32, {static_cast<int64_t>(v.size())}, f32_bytes(v));
  return p.finish();
}

// ---------------------------------------------------------------------------------
// Byte strings written once by Python 3 (pickle.dumps, numpy 1.26, ml_dtypes).
// np.array([1.0, -2.0, 3.5], np.float32), protocol 4: payload at byte 142.
// 159 bytes
const uint8_t kPyF32P4[] = {
    0x80, 0x04, 0x95, 0x94, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x8c, 0x15, 0x6e, 0x75, 0x6d,
    0x70, 0x79, 0x2e, 0x63, 0x6f, 0x72, 0x65, 0x2e, 0x6d, 0x75, 0x6c, 0x74, 0x69, 0x61, 0x72, 0x72,
    0x61, 0x79, 0x94, 0x8c, 0x0c, 0x5f, 0x72, 0x65, 0x63, 0x6f, 0x6e, 0x73, 0x74, 0x72, 0x75, 0x63,
    0x74, 0x94, 0x93, 0x94, 0x8c, 0x05, 0x6e, 0x75, 0x6d, 0x70, 0x79, 0x94, 0x8c, 0x07, 0x6e, 0x64,
    0x61, 0x72, 0x72, 0x61, 0x79, 0x94, 0x93, 0x94, 0x4b, 0x00, 0x85, 0x94, 0x43, 0x01, 0x62, 0x94,
    0x87, 0x94, 0x52, 0x94, 0x28, 0x4b, 0x01, 0x4b, 0x03, 0x85, 0x94, 0x68, 0x03, 0x8c, 0x05, 0x64,
    0x74, 0x79, 0x70, 0x65, 0x94, 0x93, 0x94, 0x8c, 0x02, 0x66, 0x34, 0x94, 0x89, 0x88, 0x87, 0x94,
    0x52, 0x94, 0x28, 0x4b, 0x03, 0x8c, 0x01, 0x3c, 0x94, 0x4e, 0x4e, 0x4e, 0x4a, 0xff, 0xff, 0xff,
    0xff, 0x4a, 0xff, 0xff, 0xff, 0xff, 0x4b, 0x00, 0x74, 0x94, 0x62, 0x89, 0x43, 0x0c, 0x00, 0x00,
    0x80, 0x3f, 0x00, 0x00, 0x00, 0xc0, 0x00, 0x00, 0x60, 0x40, 0x94, 0x74, 0x94, 0x62, 0x2e
};

// QuantizedWeight8bit(weight=np.array([[1, -2], [3, -128]], np.int8),
//                     scales=np.array([[1.0, 0.5]], ml_dtypes.bfloat16)), protocol 4, with
// the class registered as __main__.QuantizedWeight8bit. This ml_dtypes writes dtype
// flags 80 (the release's has 64). Weight payload at byte 194, scales at 289.
// 300 bytes
const uint8_t kPyQ8P4[] = {
    0x80, 0x04, 0x95, 0x21, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x8c, 0x08, 0x5f, 0x5f, 0x6d,
    0x61, 0x69, 0x6e, 0x5f, 0x5f, 0x94, 0x8c, 0x13, 0x51, 0x75, 0x61, 0x6e, 0x74, 0x69, 0x7a, 0x65,
    0x64, 0x57, 0x65, 0x69, 0x67, 0x68, 0x74, 0x38, 0x62, 0x69, 0x74, 0x94, 0x93, 0x94, 0x29, 0x81,
    0x94, 0x7d, 0x94, 0x28, 0x8c, 0x06, 0x77, 0x65, 0x69, 0x67, 0x68, 0x74, 0x94, 0x8c, 0x15, 0x6e,
    0x75, 0x6d, 0x70, 0x79, 0x2e, 0x63, 0x6f, 0x72, 0x65, 0x2e, 0x6d, 0x75, 0x6c, 0x74, 0x69, 0x61,
    0x72, 0x72, 0x61, 0x79, 0x94, 0x8c, 0x0c, 0x5f, 0x72, 0x65, 0x63, 0x6f, 0x6e, 0x73, 0x74, 0x72,
    0x75, 0x63, 0x74, 0x94, 0x93, 0x94, 0x8c, 0x05, 0x6e, 0x75, 0x6d, 0x70, 0x79, 0x94, 0x8c, 0x07,
    0x6e, 0x64, 0x61, 0x72, 0x72, 0x61, 0x79, 0x94, 0x93, 0x94, 0x4b, 0x00, 0x85, 0x94, 0x43, 0x01,
    0x62, 0x94, 0x87, 0x94, 0x52, 0x94, 0x28, 0x4b, 0x01, 0x4b, 0x02, 0x4b, 0x02, 0x86, 0x94, 0x68,
    0x09, 0x8c, 0x05, 0x64, 0x74, 0x79, 0x70, 0x65, 0x94, 0x93, 0x94, 0x8c, 0x02, 0x69, 0x31, 0x94,
    0x89, 0x88, 0x87, 0x94, 0x52, 0x94, 0x28, 0x4b, 0x03, 0x8c, 0x01, 0x7c, 0x94, 0x4e, 0x4e, 0x4e,
    0x4a, 0xff, 0xff, 0xff, 0xff, 0x4a, 0xff, 0xff, 0xff, 0xff, 0x4b, 0x00, 0x74, 0x94, 0x62, 0x89,
    0x43, 0x04, 0x01, 0xfe, 0x03, 0x80, 0x94, 0x74, 0x94, 0x62, 0x8c, 0x06, 0x73, 0x63, 0x61, 0x6c,
    0x65, 0x73, 0x94, 0x68, 0x08, 0x68, 0x0b, 0x4b, 0x00, 0x85, 0x94, 0x68, 0x0d, 0x87, 0x94, 0x52,
    0x94, 0x28, 0x4b, 0x01, 0x4b, 0x01, 0x4b, 0x02, 0x86, 0x94, 0x68, 0x12, 0x8c, 0x09, 0x6d, 0x6c,
    0x5f, 0x64, 0x74, 0x79, 0x70, 0x65, 0x73, 0x94, 0x8c, 0x08, 0x62, 0x66, 0x6c, 0x6f, 0x61, 0x74,
    0x31, 0x36, 0x94, 0x93, 0x94, 0x89, 0x88, 0x87, 0x94, 0x52, 0x94, 0x28, 0x4b, 0x03, 0x8c, 0x01,
    0x3c, 0x94, 0x4e, 0x4e, 0x4e, 0x4b, 0x02, 0x4b, 0x02, 0x4b, 0x50, 0x74, 0x94, 0x62, 0x89, 0x43,
    0x04, 0x80, 0x3f, 0x00, 0x3f, 0x94, 0x74, 0x94, 0x62, 0x75, 0x62, 0x2e
};

// np.array([1.0, 2.0], np.float32), protocol 2: GLOBAL opcodes, BINPUT, and the payload
// as _codecs.encode('\x00\x00\x80?\x00\x00\x00@', 'latin1') (0x80 becomes UTF-8 c2 80).
// 215 bytes
const uint8_t kPyF32P2[] = {
    0x80, 0x02, 0x63, 0x6e, 0x75, 0x6d, 0x70, 0x79, 0x2e, 0x63, 0x6f, 0x72, 0x65, 0x2e, 0x6d, 0x75,
    0x6c, 0x74, 0x69, 0x61, 0x72, 0x72, 0x61, 0x79, 0x0a, 0x5f, 0x72, 0x65, 0x63, 0x6f, 0x6e, 0x73,
    0x74, 0x72, 0x75, 0x63, 0x74, 0x0a, 0x71, 0x00, 0x63, 0x6e, 0x75, 0x6d, 0x70, 0x79, 0x0a, 0x6e,
    0x64, 0x61, 0x72, 0x72, 0x61, 0x79, 0x0a, 0x71, 0x01, 0x4b, 0x00, 0x85, 0x71, 0x02, 0x63, 0x5f,
    0x63, 0x6f, 0x64, 0x65, 0x63, 0x73, 0x0a, 0x65, 0x6e, 0x63, 0x6f, 0x64, 0x65, 0x0a, 0x71, 0x03,
    0x58, 0x01, 0x00, 0x00, 0x00, 0x62, 0x71, 0x04, 0x58, 0x06, 0x00, 0x00, 0x00, 0x6c, 0x61, 0x74,
    0x69, 0x6e, 0x31, 0x71, 0x05, 0x86, 0x71, 0x06, 0x52, 0x71, 0x07, 0x87, 0x71, 0x08, 0x52, 0x71,
    0x09, 0x28, 0x4b, 0x01, 0x4b, 0x02, 0x85, 0x71, 0x0a, 0x63, 0x6e, 0x75, 0x6d, 0x70, 0x79, 0x0a,
    0x64, 0x74, 0x79, 0x70, 0x65, 0x0a, 0x71, 0x0b, 0x58, 0x02, 0x00, 0x00, 0x00, 0x66, 0x34, 0x71,
    0x0c, 0x89, 0x88, 0x87, 0x71, 0x0d, 0x52, 0x71, 0x0e, 0x28, 0x4b, 0x03, 0x58, 0x01, 0x00, 0x00,
    0x00, 0x3c, 0x71, 0x0f, 0x4e, 0x4e, 0x4e, 0x4a, 0xff, 0xff, 0xff, 0xff, 0x4a, 0xff, 0xff, 0xff,
    0xff, 0x4b, 0x00, 0x74, 0x71, 0x10, 0x62, 0x89, 0x68, 0x03, 0x58, 0x09, 0x00, 0x00, 0x00, 0x00,
    0x00, 0xc2, 0x80, 0x3f, 0x00, 0x00, 0x00, 0x40, 0x71, 0x11, 0x68, 0x05, 0x86, 0x71, 0x12, 0x52,
    0x71, 0x13, 0x74, 0x71, 0x14, 0x62, 0x2e
};

// np.array([1.0, 2.0], np.float32), protocol 5: _frombuffer with an in-band BYTEARRAY8
// whose payload starts at byte 58.
// 134 bytes
const uint8_t kPyF32P5[] = {
    0x80, 0x05, 0x95, 0x7b, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x8c, 0x12, 0x6e, 0x75, 0x6d,
    0x70, 0x79, 0x2e, 0x63, 0x6f, 0x72, 0x65, 0x2e, 0x6e, 0x75, 0x6d, 0x65, 0x72, 0x69, 0x63, 0x94,
    0x8c, 0x0b, 0x5f, 0x66, 0x72, 0x6f, 0x6d, 0x62, 0x75, 0x66, 0x66, 0x65, 0x72, 0x94, 0x93, 0x94,
    0x28, 0x96, 0x08, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x80, 0x3f, 0x00, 0x00,
    0x00, 0x40, 0x94, 0x8c, 0x05, 0x6e, 0x75, 0x6d, 0x70, 0x79, 0x94, 0x8c, 0x05, 0x64, 0x74, 0x79,
    0x70, 0x65, 0x94, 0x93, 0x94, 0x8c, 0x02, 0x66, 0x34, 0x94, 0x89, 0x88, 0x87, 0x94, 0x52, 0x94,
    0x28, 0x4b, 0x03, 0x8c, 0x01, 0x3c, 0x94, 0x4e, 0x4e, 0x4e, 0x4a, 0xff, 0xff, 0xff, 0xff, 0x4a,
    0xff, 0xff, 0xff, 0xff, 0x4b, 0x00, 0x74, 0x94, 0x62, 0x4b, 0x02, 0x85, 0x94, 0x8c, 0x01, 0x43,
    0x94, 0x74, 0x94, 0x52, 0x94, 0x2e
};

Buf from(const uint8_t* p, size_t n) { return Buf(p, p + n); }
bool contains(const Buf& b, const Buf& pattern) {
  return std::search(b.begin(), b.end(), pattern.begin(), pattern.end()) != b.end();
}

// =================================================================================
// The builder against Python's own bytes.

TEST(PickleBuilder, MatchesPythonProtocol4Float32) {
  Buf b = f32_pickle({1.0f, -2.0f, 3.5f});
  EXPECT_EQ(b, from(kPyF32P4, sizeof kPyF32P4));
}

TEST(PickleBuilder, MatchesPythonProtocol4QuantizedWeight) {
  PyPickler::Options o;
  o.bf16_flags = 80;
  PyPickler p(o);
  p.quantized([&] { p.ndarray(DT::kI8, {2, 2}, i8_bytes({1, -2, 3, -128})); },
              [&] { p.ndarray(DT::kBF16, {1, 2}, bf16_bytes({1.0f, 0.5f})); });
  Buf b = p.finish();
  EXPECT_EQ(b, from(kPyQ8P4, sizeof kPyQ8P4));
  ASSERT_EQ(p.payload_offsets.size(), 2u);
  EXPECT_EQ(p.payload_offsets[0], 194u);
  EXPECT_EQ(p.payload_offsets[1], 289u);
}

TEST(PickleBuilder, MatchesPythonProtocol2And5) {
  PyPickler::Options o2;
  o2.proto = 2;
  EXPECT_EQ(f32_pickle({1.0f, 2.0f}, o2), from(kPyF32P2, sizeof kPyF32P2));
  PyPickler::Options o5;
  o5.proto = 5;
  PyPickler p5(o5);
  p5.ndarray_frombuffer(DT::kF32, {2}, f32_bytes({1.0f, 2.0f}));
  EXPECT_EQ(p5.finish(), from(kPyF32P5, sizeof kPyF32P5));
  EXPECT_EQ(p5.payload_offsets.at(0), 58u);
}

// Spec §2.1: writing the release's arrays at protocol 4 reproduces every measured file
// size to the byte. Large payloads are counted, not stored.
TEST(PickleBuilder, ReproducesTheReleaseFileSizes) {
  auto plain = [](std::vector<int64_t> shape) {
    uint64_t n = 4;
    for (int64_t d : shape) n *= static_cast<uint64_t>(d);
    PyPickler p;
    if (n >= 65536) p.ndarray(DT::kF32, shape, {}, n);
    else p.ndarray(DT::kF32, shape, Buf(n));
    p.finish();
    return std::make_pair(p.total_size(), p.payload_offsets.at(0));
  };
  auto quant = [](std::vector<int64_t> wshape, std::vector<int64_t> sshape) {
    uint64_t wn = 1, sn = 2;
    for (int64_t d : wshape) wn *= static_cast<uint64_t>(d);
    for (int64_t d : sshape) sn *= static_cast<uint64_t>(d);
    PyPickler p;
    p.quantized([&] { p.ndarray(DT::kI8, wshape, {}, wn); },
                [&] {
                  if (sn >= 65536) p.ndarray(DT::kBF16, sshape, {}, sn);
                  else p.ndarray(DT::kBF16, sshape, Buf(sn));
                });
    p.finish();
    return p.total_size();
  };
  auto emb = plain({131072, 6144});
  EXPECT_EQ(emb.first, 3'221'225'637u);
  EXPECT_EQ(emb.second, 151u);  // "data starts at byte 151"
  EXPECT_EQ(quant({8, 6144, 32768}, {8, 1, 32768}), 1'611'137'347u);
  EXPECT_EQ(quant({8, 32768, 6144}, {8, 8, 6144}), 1'611'399'491u);
  EXPECT_EQ(quant({6144, 6144}, {8, 6144}), 37'847'359u);
  EXPECT_EQ(quant({6144, 6144}, {1, 6144}), 37'761'334u);
  EXPECT_EQ(quant({6144, 1024}, {1, 1024}), 6'293'814u);
  EXPECT_EQ(plain({6144, 8}).first, 196'770u);
  EXPECT_EQ(plain({6144}).first, 24'727u);
}

// =================================================================================
// Positive cases.

TEST(PickleParse, PythonFloat32IsAZeroCopyView) {
  Buf b = from(kPyF32P4, sizeof kPyF32P4);
  auto r = parse(b);
  ASSERT_TRUE(r.ok()) << r.error().message;
  EXPECT_FALSE(r->quantized);
  expect_f32(r->array, {3}, {1.0f, -2.0f, 3.5f});
  EXPECT_EQ(r->array.data, b.data() + 142);
  EXPECT_EQ(r->array.file_offset, 142u);
  EXPECT_EQ(r->array.owned, nullptr);
  EXPECT_EQ(r->array.describe(), "float32[3]");
}

TEST(PickleParse, PythonQuantizedWeight) {
  Buf b = from(kPyQ8P4, sizeof kPyQ8P4);
  auto r = parse(b);
  ASSERT_TRUE(r.ok()) << r.error().message;
  ASSERT_TRUE(r->quantized);
  EXPECT_EQ(r->weight.type, ElementType::kI8);
  EXPECT_EQ(r->weight.shape, (std::vector<int64_t>{2, 2}));
  EXPECT_EQ(r->weight.data, b.data() + 194);
  EXPECT_EQ(r->weight.nbytes, 4u);
  const auto* w = reinterpret_cast<const int8_t*>(r->weight.data);
  EXPECT_EQ(w[0], 1);
  EXPECT_EQ(w[1], -2);
  EXPECT_EQ(w[2], 3);
  EXPECT_EQ(w[3], -128);
  EXPECT_EQ(r->scales.type, ElementType::kBF16);
  EXPECT_EQ(r->scales.shape, (std::vector<int64_t>{1, 2}));
  EXPECT_EQ(r->scales.data, b.data() + 289);
  EXPECT_EQ(load_le<uint16_t>(r->scales.data), 0x3f80);      // 1.0
  EXPECT_EQ(load_le<uint16_t>(r->scales.data + 2), 0x3f00);  // 0.5
}

TEST(PickleParse, PythonProtocol2DecodesLatin1Payload) {
  Buf b = from(kPyF32P2, sizeof kPyF32P2);
  auto r = parse(b);
  ASSERT_TRUE(r.ok()) << r.error().message;
  expect_f32(r->array, {2}, {1.0f, 2.0f});
  EXPECT_NE(r->array.owned, nullptr);  // decoded: it cannot point into the file
  EXPECT_EQ(r->array.file_offset, 0u);
}

TEST(PickleParse, PythonProtocol5FromBuffer) {
  Buf b = from(kPyF32P5, sizeof kPyF32P5);
  auto r = parse(b);
  ASSERT_TRUE(r.ok()) << r.error().message;
  expect_f32(r->array, {2}, {1.0f, 2.0f});
  EXPECT_EQ(r->array.data, b.data() + 58);
  EXPECT_EQ(r->array.file_offset, 58u);
}

TEST(PickleParse, Float32OneDimensional) {
  auto v = iota_f32(7);
  PyPickler p;
  p.ndarray(DT::kF32, {7}, f32_bytes(v));
  Buf b = p.finish();
  auto r = parse(b);
  ASSERT_TRUE(r.ok()) << r.error().message;
  expect_f32(r->array, {7}, v);
  EXPECT_EQ(r->array.data, b.data() + p.payload_offsets.at(0));
  EXPECT_EQ(r->array.file_offset, p.payload_offsets.at(0));
}

TEST(PickleParse, Float32TwoDimensionalWithBinbytes) {
  auto v = iota_f32(8 * 40);  // 1280 bytes: BINBYTES inside the frame
  PyPickler p;
  p.ndarray(DT::kF32, {8, 40}, f32_bytes(v));
  Buf b = p.finish();
  ASSERT_EQ(b[p.payload_offsets.at(0) - 5], 'B');
  auto r = parse(b);
  ASSERT_TRUE(r.ok()) << r.error().message;
  expect_f32(r->array, {8, 40}, v);
  EXPECT_EQ(r->array.data, b.data() + p.payload_offsets.at(0));
  EXPECT_EQ(r->array.element_count(), 320u);
}

TEST(PickleParse, HigherRankAndLargeDims) {
  // A 4-D shape is written MARK ... TUPLE; a dimension of 300 as BININT2, 70000 as BININT.
  PyPickler p;
  p.ndarray(DT::kI8, {1, 2, 1, 3}, i8_bytes({1, 2, 3, 4, 5, 6}));
  Buf b = p.finish();
  auto r = parse(b);
  ASSERT_TRUE(r.ok()) << r.error().message;
  EXPECT_EQ(r->array.shape, (std::vector<int64_t>{1, 2, 1, 3}));
  EXPECT_EQ(r->array.data, b.data() + p.payload_offsets.at(0));

  PyPickler q;
  q.ndarray(DT::kI8, {70000, 1}, Buf(70000, 7));
  Buf c = q.finish();
  auto r2 = parse(c);
  ASSERT_TRUE(r2.ok()) << r2.error().message;
  EXPECT_EQ(r2->array.shape, (std::vector<int64_t>{70000, 1}));
  EXPECT_EQ(r2->array.data, c.data() + q.payload_offsets.at(0));
}

TEST(PickleParse, QuantizedInt8AndBf16) {
  std::vector<int8_t> codes(4 * 6);
  for (size_t i = 0; i < codes.size(); ++i) codes[i] = static_cast<int8_t>(static_cast<int>(i) * 11 - 120);
  std::vector<float> sc = {0.5f, 1.0f, 2.0f, -0.25f, 3.0f, 0.125f, 1.5f, 1.0f, 4.0f, 8.0f, 0.0f, -1.0f};
  PyPickler p;
  p.quantized([&] { p.ndarray(DT::kI8, {4, 6}, i8_bytes(codes)); },
              [&] { p.ndarray(DT::kBF16, {2, 6}, bf16_bytes(sc)); });
  Buf b = p.finish();
  auto r = parse(b);
  ASSERT_TRUE(r.ok()) << r.error().message;
  ASSERT_TRUE(r->quantized);
  EXPECT_EQ(r->weight.describe(), "int8[4, 6]");
  EXPECT_EQ(r->scales.describe(), "bfloat16[2, 6]");
  EXPECT_EQ(r->weight.data, b.data() + p.payload_offsets.at(0));
  EXPECT_EQ(r->scales.data, b.data() + p.payload_offsets.at(1));
  EXPECT_EQ(0, std::memcmp(r->weight.data, codes.data(), codes.size()));
  Buf sb = bf16_bytes(sc);
  EXPECT_EQ(0, std::memcmp(r->scales.data, sb.data(), sb.size()));
}

TEST(PickleParse, QuantizedThreeDimensionalLikeTheExperts) {
  // [E, K, N] codes with [E, B, N] scales, as moe/linear_1.
  Buf codes(2 * 8 * 4);
  for (size_t i = 0; i < codes.size(); ++i) codes[i] = static_cast<uint8_t>(i);
  std::vector<float> sc(2 * 4 * 4, 0.5f);
  PyPickler p;
  p.quantized([&] { p.ndarray(DT::kI8, {2, 8, 4}, codes); }, [&] { p.ndarray(DT::kBF16, {2, 4, 4}, bf16_bytes(sc)); });
  Buf b = p.finish();
  auto r = parse(b);
  ASSERT_TRUE(r.ok()) << r.error().message;
  EXPECT_EQ(r->weight.shape, (std::vector<int64_t>{2, 8, 4}));
  EXPECT_EQ(r->scales.shape, (std::vector<int64_t>{2, 4, 4}));
  EXPECT_EQ(r->weight.data, b.data() + p.payload_offsets.at(0));
}

TEST(PickleParse, PayloadOutsideAnyFrame) {
  auto v = iota_f32(128 * 160, 0.5f);  // 81920 bytes >= 64 KiB
  PyPickler p;
  p.ndarray(DT::kF32, {128, 160}, f32_bytes(v));
  Buf b = p.finish();
  uint64_t off = p.payload_offsets.at(0);
  // The layout CPython writes: PROTO, FRAME n ending right before BINBYTES, the payload
  // unframed, then a second FRAME for the rest.
  ASSERT_EQ(b[2], 0x95);
  EXPECT_EQ(load_le<uint64_t>(b.data() + 3) + 11, off - 5);
  EXPECT_EQ(b[off - 5], 'B');
  EXPECT_EQ(b[off + v.size() * 4], 0x95);
  auto r = parse(b);
  ASSERT_TRUE(r.ok()) << r.error().message;
  expect_f32(r->array, {128, 160}, v);
  EXPECT_EQ(r->array.data, b.data() + off);
  EXPECT_EQ(r->array.file_offset, off);
}

TEST(PickleParse, QuantizedWithBothPayloadsUnframed) {
  Buf codes(256 * 512);
  for (size_t i = 0; i < codes.size(); ++i) codes[i] = static_cast<uint8_t>(i * 7);
  std::vector<float> sc(8 * 4096, 0.25f);  // 64 KiB of bf16
  PyPickler p;
  p.quantized([&] { p.ndarray(DT::kI8, {256, 512}, codes); }, [&] { p.ndarray(DT::kBF16, {8, 4096}, bf16_bytes(sc)); });
  Buf b = p.finish();
  auto r = parse(b);
  ASSERT_TRUE(r.ok()) << r.error().message;
  EXPECT_EQ(r->weight.data, b.data() + p.payload_offsets.at(0));
  EXPECT_EQ(r->scales.data, b.data() + p.payload_offsets.at(1));
  EXPECT_EQ(0, std::memcmp(r->weight.data, codes.data(), codes.size()));
}

TEST(PickleParse, Protocol2WithHighLatin1Bytes) {
  // Every byte value 0..255: each >= 0x80 is two UTF-8 bytes in the pickle.
  Buf all(256);
  for (int i = 0; i < 256; ++i) all[static_cast<size_t>(i)] = static_cast<uint8_t>(i);
  PyPickler::Options o;
  o.proto = 2;
  PyPickler p(o);
  p.ndarray(DT::kI8, {16, 16}, all);
  Buf b = p.finish();
  EXPECT_EQ(b[2], 'c');  // GLOBAL
  auto r = parse(b);
  ASSERT_TRUE(r.ok()) << r.error().message;
  EXPECT_EQ(r->array.type, ElementType::kI8);
  EXPECT_EQ(r->array.shape, (std::vector<int64_t>{16, 16}));
  ASSERT_EQ(r->array.nbytes, 256u);
  EXPECT_EQ(0, std::memcmp(r->array.data, all.data(), 256));
  ASSERT_NE(r->array.owned, nullptr);
  EXPECT_EQ(r->array.owned->data(), r->array.data);
}

TEST(PickleParse, Protocol2QuantizedWeight) {
  PyPickler::Options o;
  o.proto = 2;
  PyPickler p(o);
  p.quantized([&] { p.ndarray(DT::kI8, {2, 2}, i8_bytes({-1, -128, 127, 0})); },
              [&] { p.ndarray(DT::kBF16, {1, 2}, bf16_bytes({1.0f, -2.0f})); });
  Buf b = p.finish();
  auto r = parse(b);
  ASSERT_TRUE(r.ok()) << r.error().message;
  ASSERT_TRUE(r->quantized);
  const auto* w = reinterpret_cast<const int8_t*>(r->weight.data);
  EXPECT_EQ(w[0], -1);
  EXPECT_EQ(w[1], -128);
  EXPECT_EQ(w[2], 127);
  EXPECT_EQ(load_le<uint16_t>(r->scales.data + 2), 0xc000);  // -2.0
}

TEST(PickleParse, Protocol3BinbytesWithGlobalOpcodes) {
  PyPickler::Options o;
  o.proto = 3;
  auto v = iota_f32(5);
  PyPickler p(o);
  p.ndarray(DT::kF32, {5}, f32_bytes(v));
  Buf b = p.finish();
  auto r = parse(b);
  ASSERT_TRUE(r.ok()) << r.error().message;
  expect_f32(r->array, {5}, v);
  EXPECT_EQ(r->array.data, b.data() + p.payload_offsets.at(0));
}

TEST(PickleParse, Protocol5FromBufferWithBytearray8) {
  PyPickler::Options o;
  o.proto = 5;
  auto v = iota_f32(3 * 5);
  PyPickler p(o);
  p.ndarray_frombuffer(DT::kF32, {3, 5}, f32_bytes(v));
  Buf b = p.finish();
  ASSERT_EQ(b[p.payload_offsets.at(0) - 9], 0x96);  // BYTEARRAY8
  auto r = parse(b);
  ASSERT_TRUE(r.ok()) << r.error().message;
  expect_f32(r->array, {3, 5}, v);
  EXPECT_EQ(r->array.data, b.data() + p.payload_offsets.at(0));

  // A large one, unframed, and an int8 one inside a quantized weight (bf16 scales keep
  // _reconstruct at protocol 5, as numpy writes them).
  PyPickler p2(o);
  Buf big(100000, 3);
  p2.quantized([&] { p2.ndarray_frombuffer(DT::kI8, {100, 1000}, big); },
               [&] { p2.ndarray(DT::kBF16, {1, 1000}, bf16_bytes(std::vector<float>(1000, 1.0f))); });
  Buf c = p2.finish();
  auto r2 = parse(c);
  ASSERT_TRUE(r2.ok()) << r2.error().message;
  EXPECT_EQ(r2->weight.data, c.data() + p2.payload_offsets.at(0));
  EXPECT_EQ(r2->scales.data, c.data() + p2.payload_offsets.at(1));
}

TEST(PickleParse, Protocol5FortranOrderOneDimensionalIsFine) {
  // numpy writes order 'F' for arrays that are only F-contiguous; for 1-D it is the same.
  PyPickler::Options o;
  o.proto = 5;
  PyPickler p(o);
  p.ndarray_frombuffer(DT::kF32, {4}, f32_bytes({1, 2, 3, 4}), "F");
  const Buf b = p.finish();  // the views point into b: keep it alive
  auto r = parse(b);
  ASSERT_TRUE(r.ok()) << r.error().message;
  expect_f32(r->array, {4}, {1, 2, 3, 4});
}

TEST(PickleParse, Numpy2ModuleNames) {
  PyPickler::Options o;
  o.numpy_core = "numpy._core";
  PyPickler p(o);
  p.quantized([&] { p.ndarray(DT::kI8, {2, 2}, i8_bytes({1, 2, 3, 4})); },
              [&] { p.ndarray(DT::kBF16, {1, 2}, bf16_bytes({1.0f, 1.0f})); });
  Buf b = p.finish();
  std::string s(b.begin(), b.end());
  ASSERT_NE(s.find("numpy._core.multiarray"), std::string::npos);
  auto r = parse(b);
  ASSERT_TRUE(r.ok()) << r.error().message;
  EXPECT_EQ(r->weight.data, b.data() + p.payload_offsets.at(0));

  PyPickler::Options o5 = o;
  o5.proto = 5;
  PyPickler p5(o5);
  p5.ndarray_frombuffer(DT::kF32, {2}, f32_bytes({5, 6}));
  Buf c = p5.finish();
  ASSERT_NE(std::string(c.begin(), c.end()).find("numpy._core.numeric"), std::string::npos);
  auto r5 = parse(c);
  ASSERT_TRUE(r5.ok()) << r5.error().message;
  expect_f32(r5->array, {2}, {5, 6});
}

TEST(PickleParse, BinputAndBingetVariants) {
  // Protocol 4 with BINPUT instead of MEMOIZE, and BINGET for the repeated objects.
  PyPickler::Options o;
  o.explicit_put = true;
  PyPickler p(o);
  p.quantized([&] { p.ndarray(DT::kI8, {2, 3}, i8_bytes({1, 2, 3, 4, 5, 6})); },
              [&] { p.ndarray(DT::kBF16, {1, 3}, bf16_bytes({1, 2, 3})); });
  Buf b = p.finish();
  EXPECT_TRUE(contains(b, {'q', 0}));  // BINPUT 0 for '__main__'
  auto r = parse(b);
  ASSERT_TRUE(r.ok()) << r.error().message;
  EXPECT_EQ(r->weight.data, b.data() + p.payload_offsets.at(0));
  EXPECT_EQ(r->scales.data, b.data() + p.payload_offsets.at(1));
}

TEST(PickleParse, LongBinputAndLongBingetVariants) {
  // Memo indices from 1000: LONG_BINPUT and LONG_BINGET throughout.
  for (int proto : {2, 4}) {
    PyPickler::Options o;
    o.proto = proto;
    o.explicit_put = true;
    o.memo_base = 1000;
    PyPickler p(o);
    p.quantized([&] { p.ndarray(DT::kI8, {1, 2}, i8_bytes({9, -9})); },
                [&] { p.ndarray(DT::kBF16, {1, 2}, bf16_bytes({1, 2})); });
    Buf b = p.finish();
    // LONG_BINPUT 1000 for the first object, LONG_BINGET of the _reconstruct global
    // (memo 1008 at protocol 4, 1004 at protocol 2) for the second array.
    EXPECT_TRUE(contains(b, {'r', 0xe8, 0x03, 0, 0}));
    EXPECT_TRUE(contains(b, {'j', static_cast<uint8_t>(proto == 4 ? 0xf0 : 0xec), 0x03, 0, 0}));
    auto r = parse(b);
    ASSERT_TRUE(r.ok()) << "protocol " << proto << ": " << r.error().message;
    EXPECT_EQ(reinterpret_cast<const int8_t*>(r->weight.data)[1], -9);
  }
}

TEST(PickleParse, Binbytes8Payload) {
  PyPickler::Options o;
  o.binbytes8 = true;
  auto v = iota_f32(4);
  PyPickler p(o);
  p.ndarray(DT::kF32, {4}, f32_bytes(v));
  Buf b = p.finish();
  ASSERT_EQ(b[p.payload_offsets.at(0) - 9], 0x8e);
  auto r = parse(b);
  ASSERT_TRUE(r.ok()) << r.error().message;
  expect_f32(r->array, {4}, v);
  EXPECT_EQ(r->array.data, b.data() + p.payload_offsets.at(0));
}

TEST(PickleParse, DtypeSpellingsAccepted) {
  for (const char* spelling : {"<f4", "=f4", "float32"}) {
    PyPickler::Options o;
    o.dtype_override = spelling;
    const Buf b = f32_pickle({1.5f}, o);  // the views point into b: keep it alive
    auto r = parse(b);
    ASSERT_TRUE(r.ok()) << spelling << ": " << r.error().message;
    expect_f32(r->array, {1}, {1.5f});
  }
}

TEST(PickleParse, UnframedProtocol4AndEmptyFrame) {
  // No FRAME at all (a pickler may omit them) and a FRAME of 0 bytes before the rest.
  PyPickler::Options o;
  o.proto = 3;
  Buf b = f32_pickle({2.0f, 4.0f}, o);
  b[1] = 4;
  auto r = parse(b);
  ASSERT_TRUE(r.ok()) << r.error().message;
  expect_f32(r->array, {2}, {2.0f, 4.0f});
  Buf c(b.begin(), b.begin() + 2);
  Pk z;
  z.frame(0);
  c.insert(c.end(), z.b.begin(), z.b.end());
  c.insert(c.end(), b.begin() + 2, b.end());
  auto r2 = parse(c);
  ASSERT_TRUE(r2.ok()) << r2.error().message;
  EXPECT_EQ(r2->array.data, c.data() + r->array.file_offset + 9);
}

TEST(PickleParse, QuantizedSlotsStateForm) {
  // A dataclass with __slots__ pickles its state as (None, {...}).
  Pk k;
  Buf wpay = i8_bytes({1, 2});
  Buf spay = bf16_bytes({1, 1});
  auto arr = [&](const char* dt, const Buf& pay, int rows, int cols) {
    k.stack_global("numpy.core.multiarray", "_reconstruct").stack_global("numpy", "ndarray");
    k.k(0).tuple1().sbb({'b'}).tuple3().reduce();
    k.mark().k(1).k(static_cast<uint8_t>(rows)).k(static_cast<uint8_t>(cols)).tuple2();
    k.stack_global("numpy", "dtype");
    if (std::string(dt) == "bf16") k.stack_global("ml_dtypes", "bfloat16");
    else k.sbu(dt);
    k.f().t().tuple3().reduce();
    k.mark().k(3).sbu(std::string(dt) == "i1" ? "|" : "<").none().none().none().j(-1).j(-1).k(0).tuple().build();
    k.f().sbb(pay).tuple().build();
  };
  k.proto(4).stack_global("__main__", "QuantizedWeight8bit").empty_tuple().op(0x81);
  k.none().empty_dict().mark().sbu("weight");
  arr("i1", wpay, 1, 2);
  k.sbu("scales");
  arr("bf16", spay, 1, 2);
  k.op('u').tuple2().build().stop();
  auto r = parse(k.b);
  ASSERT_TRUE(r.ok()) << r.error().message;
  EXPECT_TRUE(r->quantized);
  EXPECT_EQ(r->weight.describe(), "int8[1, 2]");
}

// =================================================================================
// Refusals: each one an error (never a crash) that names what and where.

TEST(PickleRefuse, UnknownGlobalViaStackGlobal) {
  Pk k;
  k.proto(4).sbu("os").memoize().sbu("system").memoize();
  uint64_t at_op = k.pos();
  k.op(0x93).memoize().sbu("echo pwned").tuple1().reduce().stop();
  EXPECT_PICKLE_ERROR(parse(k.b), at(at_op), "os.system", "refusing global");
}

TEST(PickleRefuse, UnknownGlobalViaGlobalOpcode) {
  Pk k;
  k.proto(2);
  uint64_t at_op = k.pos();
  k.global("os", "system").binunicode("echo pwned").tuple1().reduce().stop();
  EXPECT_PICKLE_ERROR(parse(k.b), at(at_op), "os.system");
  // posix.system is what os.system pickles as on Linux.
  Pk k2;
  k2.proto(2).global("posix", "system").stop();
  EXPECT_PICKLE_ERROR(parse(k2.b), at(2), "posix.system");
}

TEST(PickleRefuse, BuiltinsEval) {
  Pk k;
  k.proto(4).frame(0);
  uint64_t sg = 0;
  k.sbu("builtins").memoize().sbu("eval").memoize();
  sg = k.pos();
  k.op(0x93).sbu("__import__('os').system('x')").tuple1().reduce().stop();
  EXPECT_PICKLE_ERROR(parse(k.b), at(sg), "builtins.eval");
  Pk k2;
  k2.proto(2).global("__builtin__", "eval").stop();
  EXPECT_PICKLE_ERROR(parse(k2.b), at(2), "__builtin__.eval");
}

TEST(PickleRefuse, AllowedGlobalWithAWrongModuleOrName) {
  // Near misses of allowed names are refused too.
  for (auto [mod, name] : std::vector<std::pair<std::string, std::string>>{
           {"numpy", "_reconstruct"}, {"numpy.core.multiarray", "scalar"}, {"__main__", "Quantized"},
           {"numpy.core.multiarray ", "_reconstruct"}, {"ml_dtypes", "float8_e4m3fn"}}) {
    Pk k;
    k.proto(4).sbu(mod).sbu(name);
    uint64_t sg = k.pos();
    k.op(0x93).stop();
    EXPECT_PICKLE_ERROR(parse(k.b), at(sg), "refusing global '" + mod + "." + name + "'");
  }
}

TEST(PickleRefuse, ReduceOfAnAllowedButWrongCallable) {
  // numpy.ndarray, ml_dtypes.bfloat16 and QuantizedWeight8bit are allowed names, but
  // none of them may be called by REDUCE.
  for (auto [mod, name] : std::vector<std::pair<std::string, std::string>>{
           {"numpy", "ndarray"}, {"ml_dtypes", "bfloat16"}, {"__main__", "QuantizedWeight8bit"}}) {
    Pk k;
    k.proto(4).stack_global(mod, name).k(0).tuple1();
    uint64_t r = k.pos();
    k.reduce().stop();
    // The message names the REDUCE and its byte offset.
    EXPECT_PICKLE_ERROR(parse(k.b), at(r), "REDUCE");
  }
  // _reconstruct called with something other than numpy.ndarray.
  Pk k;
  k.proto(4).stack_global("numpy.core.multiarray", "_reconstruct").stack_global("numpy", "dtype");
  k.k(0).tuple1().sbb({'b'}).tuple3();
  uint64_t r = k.pos();
  k.reduce().stop();
  EXPECT_PICKLE_ERROR(parse(k.b), at(r), "_reconstruct");
  // _codecs.encode with another encoding.
  Pk k2;
  k2.proto(2).global("_codecs", "encode").binunicode("abc").binunicode("utf-16").tuple2();
  uint64_t r2 = k2.pos();
  k2.reduce().stop();
  EXPECT_PICKLE_ERROR(parse(k2.b), at(r2), "_codecs.encode", "latin1");
  // A REDUCE of a value that is not a callable at all.
  Pk k3;
  k3.proto(4).sbu("numpy").empty_tuple();
  uint64_t r3 = k3.pos();
  k3.reduce().stop();
  EXPECT_PICKLE_ERROR(parse(k3.b), at(r3), "REDUCE of a str");
  // NEWOBJ of anything but QuantizedWeight8bit.
  Pk k4;
  k4.proto(4).stack_global("numpy", "ndarray").empty_tuple();
  uint64_t r4 = k4.pos();
  k4.op(0x81).stop();
  EXPECT_PICKLE_ERROR(parse(k4.b), at(r4), "NEWOBJ", "QuantizedWeight8bit");
}

TEST(PickleRefuse, TruncatedFrame) {
  Pk k;
  k.proto(4).op(0x95).raw(std::string("\x10\x00\x00", 3));
  EXPECT_PICKLE_ERROR(parse(k.b), at(2), "needs 8 bytes but only 3 remain");
}

TEST(PickleRefuse, FrameLongerThanTheFile) {
  Buf b = f32_pickle({1, 2});
  // Claim a frame of 1000 bytes where fewer remain.
  store_le<uint64_t>(b.data() + 3, 1000);
  EXPECT_PICKLE_ERROR(parse(b), at(2), "FRAME declares 1000 bytes but only " + std::to_string(b.size() - 11) + " remain");
  // And the largest possible claim.
  store_le<uint64_t>(b.data() + 3, ~uint64_t{0});
  EXPECT_PICKLE_ERROR(parse(b), at(2), "FRAME declares 18446744073709551615 bytes");
}

TEST(PickleRefuse, NewFrameBeforeTheCurrentOneEnds) {
  Pk k;
  k.proto(4).frame(30).frame(5).k(1).stop();
  k.b.resize(11 + 30, '.');
  EXPECT_PICKLE_ERROR(parse(k.b), at(11), "a new FRAME begins before the current frame ends");
}

TEST(PickleRefuse, OpcodeArgumentCrossingTheFrameEnd) {
  // FRAME of 4 bytes: BININT1 1, then a BININT whose opcode and first argument byte lie
  // inside the frame and the rest outside. (An argument wholly after the frame is what
  // Python's own reader accepts too.)
  Pk k;
  k.proto(4).frame(4).k(1);
  uint64_t j = k.pos();
  k.j(7).stop();
  EXPECT_PICKLE_ERROR(parse(k.b), at(j), "needs 4 bytes but the frame ends at byte 15");
}

TEST(PickleRefuse, StopInsideAFrameThatDeclaresMore) {
  Pk k;
  k.proto(4).frame(10).k(1);
  uint64_t s = k.pos();
  k.stop();
  k.b.resize(k.b.size() + 7, 'N');
  EXPECT_PICKLE_ERROR(parse(k.b), at(s), "STOP inside a frame");
}

TEST(PickleRefuse, BinbytesLongerThanTheFile) {
  {
    Pk k;
    k.proto(4);
    uint64_t b = k.pos();
    k.op('B').le<uint32_t>(100).raw("only ten b").stop();
    EXPECT_PICKLE_ERROR(parse(k.b), at(b), "needs 100 bytes but only 11 remain");
  }
  {
    // A 4 GB declaration in a 1 KiB buffer.
    Pk k;
    k.proto(3);
    k.op('B').le<uint32_t>(0xffffffffu);
    k.b.resize(1024, 0);
    EXPECT_PICKLE_ERROR(parse(k.b), at(2), "needs 4294967295 bytes but only 1017 remain");
  }
  {
    // BINBYTES8 of 2^63 bytes, and of 2^64-1 (pos + n would wrap).
    for (uint64_t n : {uint64_t{1} << 63, ~uint64_t{0}}) {
      Pk k;
      k.proto(4);
      k.op(0x8e).le<uint64_t>(n).raw("xyz").stop();
      EXPECT_PICKLE_ERROR(parse(k.b), at(2), "needs " + std::to_string(n) + " bytes but only 4 remain");
    }
  }
  {
    // BYTEARRAY8, BINUNICODE8 and SHORT_BINUNICODE past the end.
    Pk k;
    k.proto(5).op(0x96).le<uint64_t>(uint64_t{1} << 40).stop();
    EXPECT_PICKLE_ERROR(parse(k.b), at(2), "needs 1099511627776 bytes");
    Pk k2;
    k2.proto(4).op(0x8d).le<uint64_t>(uint64_t{1} << 62).stop();
    EXPECT_PICKLE_ERROR(parse(k2.b), at(2), "needs 4611686018427387904 bytes");
    Pk k3;
    k3.proto(4).op(0x8c).le<uint8_t>(200).raw("abc");
    EXPECT_PICKLE_ERROR(parse(k3.b), at(2), "needs 200 bytes but only 3 remain");
  }
  {
    // Inside a frame, the frame's end is the limit.
    Pk k;
    k.proto(4).frame(8);
    uint64_t b = k.pos();
    k.op('B').le<uint32_t>(50).raw("abc").stop();
    EXPECT_PICKLE_ERROR(parse(k.b), at(b), "needs 50 bytes but the frame ends");
  }
}

TEST(PickleRefuse, TrailingGarbageAfterStop) {
  Buf b = f32_pickle({1, 2, 3});
  uint64_t n = b.size();
  b.push_back('x');
  b.push_back('y');
  b.push_back('.');
  EXPECT_PICKLE_ERROR(parse(b), at(n), "3 bytes of trailing data after STOP");
}

TEST(PickleRefuse, ValidPrefixThenGarbageOpcode) {
  Buf b = f32_pickle({1, 2, 3});
  // Replace the final BUILD with 0xff, an opcode that does not exist, and then try the
  // opcodes a release never contains (INST, OBJ, PERSID, EXT1, STRING, ...).
  uint64_t build_at = b.size() - 2;
  ASSERT_EQ(b[build_at], 'b');
  for (uint8_t op : {uint8_t{0xff}, uint8_t{'i'}, uint8_t{'o'}, uint8_t{'P'}, uint8_t{'Q'}, uint8_t{0x82},
                     uint8_t{'S'}, uint8_t{'U'}, uint8_t{'T'}, uint8_t{'d'}, uint8_t{'l'}, uint8_t{'I'},
                     uint8_t{0x8f}, uint8_t{0x90}, uint8_t{0x91}}) {
    Buf c = b;
    c[build_at] = op;
    char hex[8];
    std::snprintf(hex, sizeof hex, "0x%02x", op);
    EXPECT_PICKLE_ERROR(parse(c), at(build_at), std::string("opcode ") + hex + " is not allowed");
  }
}

TEST(PickleRefuse, EmptyAndTinyInput) {
  EXPECT_PICKLE_ERROR(parse(Buf{}), "t.pkl: empty file");
  EXPECT_PICKLE_ERROR(parse(nullptr, 0), "empty file");
  EXPECT_PICKLE_ERROR(parse(Buf{0x80}), at(0), "needs 1 bytes but only 0 remain");
  EXPECT_PICKLE_ERROR(parse(Buf{0x80, 0x04}), at(2), "file ends before the STOP opcode");
  // Every strict prefix of a valid pickle is refused, none crashes.
  Buf b = from(kPyQ8P4, sizeof kPyQ8P4);
  for (size_t n = 1; n < b.size(); ++n) {
    auto r = parse_release_pickle(b.data(), n, "t.pkl");
    EXPECT_FALSE(r.ok()) << "prefix of " << n << " bytes";
  }
}

TEST(PickleRefuse, AMillionMarksInBoundedTime) {
  Buf b{0x80, 0x04};
  b.resize(2 + 1'000'000, '(');
  b.push_back('.');
  auto t0 = std::chrono::steady_clock::now();
  auto r = parse(b);
  double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  EXPECT_PICKLE_ERROR(r, at(2 + 32), "MARKs nested deeper than 32");
  EXPECT_LT(s, 1.0);
}

TEST(PickleRefuse, TupleNestingDeeperThanTheLimit) {
  // K 0, then TUPLE1 over and over: ((((0,),),),) ... The 16th TUPLE1 makes depth 17.
  Buf b{0x80, 0x04, 'K', 0};
  b.resize(b.size() + 1'000'000, 0x85);
  b.push_back('.');
  auto t0 = std::chrono::steady_clock::now();
  auto r = parse(b);
  double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  EXPECT_PICKLE_ERROR(r, at(4 + 15), "containers nested deeper than 16");
  EXPECT_LT(s, 1.0);
  // A lower limit is honoured.
  PickleLimits lim;
  lim.max_depth = 4;
  EXPECT_PICKLE_ERROR(parse(b, lim), at(4 + 3), "containers nested deeper than 4");
}

TEST(PickleRefuse, ListAndDictNestingDeeperThanTheLimit) {
  // [[[[...]]]] built with EMPTY_LIST and APPEND, and {k: {k: ...}} with SETITEM.
  Pk k;
  k.proto(4);
  for (int i = 0; i < 40; ++i) k.empty_list();
  for (int i = 0; i < 39; ++i) k.op('a');
  k.stop();
  EXPECT_PICKLE_ERROR(parse(k.b), "containers nested deeper than 16");
  Pk d;
  d.proto(4);
  for (int i = 0; i < 40; ++i) d.empty_dict().k(1);
  d.empty_dict();
  for (int i = 0; i < 40; ++i) d.op('s');
  d.stop();
  EXPECT_PICKLE_ERROR(parse(d.b), "containers nested deeper than 16");
}

// A list chain built through the memo: the innermost list is kept in memo slot 0 and
// each step appends a fresh list to it (BINGET 0; EMPTY_LIST; BINPUT 0; APPEND; POP).
// With `keep_root` the outermost list is parked in memo slot 1 and popped, so that a
// valid array can follow.
Pk memo_chain(int levels, bool keep_root) {
  Pk k;
  k.proto(4).empty_list();
  if (keep_root) k.binput(1);
  k.binput(0);
  if (keep_root) k.op('0');
  for (int i = 0; i < levels; ++i) k.binget(0).empty_list().binput(0).op('a').op('0');
  return k;
}

// A list that is already inside another one and grows later (reached again through the
// memo) would deepen its ancestors without their recorded depth changing. The reader
// freezes a container once it is nested, so such a chain is refused at its second link.
TEST(PickleRefuse, NestingThroughTheMemoIsBoundedToo) {
  Pk k = memo_chain(40, /*keep_root=*/true);
  PyPickler::Options o;
  o.memo_base = 2;  // MEMOIZE numbers from the memo's size: slots 0 and 1 are taken
  PyPickler p(o);
  p.ndarray(DT::kF32, {2}, f32_bytes({1, 2}));
  Buf body = p.finish();
  k.b.insert(k.b.end(), body.begin() + 2, body.end());  // without its PROTO
  // Sanity: the same array after a flat prefix parses.
  Pk flat;
  flat.proto(4).empty_list().binput(1).binput(0).op('0');
  flat.b.insert(flat.b.end(), body.begin() + 2, body.end());
  ASSERT_TRUE(parse(flat.b).ok()) << parse(flat.b).error().message;
  EXPECT_PICKLE_ERROR(parse(k.b), "APPEND to a list that is already inside another container");
}

// The same chain made as deep as max_objects allows: nodes are shared_ptr<Node> holding
// vector<shared_ptr<Node>>, so a deep chain would recurse once per level when destroyed
// and overflow the stack. It must be refused with an error instead. Run in a child
// process so that a crash fails only this test.
TEST(PickleRefuseDeathTest, DeepChainThroughTheMemoIsRefusedWithoutCrashing) {
  const Buf b = memo_chain(400'000, /*keep_root=*/false).stop().b;
  PickleLimits lim;
  lim.max_objects = 1u << 20;
  lim.max_ops = uint64_t{1} << 23;
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_EXIT(
      {
        auto r = parse(b, lim);  // the Machine and its nodes are destroyed inside
        std::_Exit(r.ok() ? 3 : 0);
      },
      ::testing::ExitedWithCode(0), "")
      << "the parser must refuse a 400000-deep list chain (max_depth 16) with an error, not crash";
}

TEST(PickleRefuse, StackDepthAndOpcodeAndObjectLimits) {
  Pk k;
  k.proto(4);
  for (int i = 0; i < 300; ++i) k.none();
  k.stop();
  EXPECT_PICKLE_ERROR(parse(k.b), at(2 + 256), "stack deeper than 256");
  // Opcode budget: K 0 / POP forever.
  Pk k2;
  k2.proto(4);
  for (int i = 0; i < 1000; ++i) k2.k(0).op('0');
  k2.stop();
  PickleLimits lim;
  lim.max_ops = 100;
  EXPECT_PICKLE_ERROR(parse(k2.b, lim), "more than 100 opcodes");
  PickleLimits lim2;
  lim2.max_objects = 50;
  EXPECT_PICKLE_ERROR(parse(k2.b, lim2), "more than 50 objects");
}

TEST(PickleRefuse, BingetOfAnUnsetKey) {
  Pk k;
  k.proto(4).k(1).binput(3);
  uint64_t g = k.pos();
  k.binget(7).stop();
  EXPECT_PICKLE_ERROR(parse(k.b), at(g), "memo key 7 was never stored");
  Pk k2;
  k2.proto(4);
  k2.op('j').le<uint32_t>(0xffffffffu).stop();
  EXPECT_PICKLE_ERROR(parse(k2.b), at(2), "memo key 4294967295 was never stored");
  // MEMOIZE numbers from the memo's size, so BINGET 0 after MEMOIZE finds it...
  Pk k3;
  k3.proto(4).k(1).memoize().op('0').binget(0).binget(1).stop();
  EXPECT_PICKLE_ERROR(parse(k3.b), at(8), "memo key 1 was never stored");
}

TEST(PickleRefuse, MoreThanMaxMemoEntries) {
  PickleLimits lim;
  lim.max_memo = 16;
  Pk k;
  k.proto(4).k(0);
  for (int i = 0; i < 16; ++i) k.memoize();
  uint64_t m = k.pos();
  k.memoize().stop();
  EXPECT_PICKLE_ERROR(parse(k.b, lim), at(m), "memo holds more than 16 entries");
  // Distinct BINPUT keys count too; rewriting one key does not.
  Pk k2;
  k2.proto(4).k(0);
  for (int i = 0; i < 100; ++i) k2.binput(5);
  for (int i = 0; i < 15; ++i) k2.binput(static_cast<uint8_t>(10 + i));
  uint64_t m2 = k2.pos();
  k2.binput(200).stop();
  EXPECT_PICKLE_ERROR(parse(k2.b, lim), at(m2), "memo holds more than 16 entries");
  // The default limit, with LONG_BINPUT keys all different.
  Pk k3;
  k3.proto(4).k(0);
  for (uint32_t i = 0; i < 5000; ++i) k3.op('r').le<uint32_t>(i * 7919);
  k3.stop();
  EXPECT_PICKLE_ERROR(parse(k3.b), at(4 + 4096 * 5), "memo holds more than 4096 entries");
}

TEST(PickleRefuse, StackUnderflow) {
  Pk k;
  k.proto(4);
  k.tuple1().stop();
  EXPECT_PICKLE_ERROR(parse(k.b), at(2), "stack underflow");
  Pk k2;
  k2.proto(4).op('0').stop();
  EXPECT_PICKLE_ERROR(parse(k2.b), at(2), "stack underflow");
  // A MARK is a floor: TUPLE2 right after MARK may not take what lies below it.
  Pk k3;
  k3.proto(4).k(1).k(2).mark().tuple2().stop();
  EXPECT_PICKLE_ERROR(parse(k3.b), at(7), "stack underflow");
  Pk k4;
  k4.proto(4).k(1).tuple().stop();
  EXPECT_PICKLE_ERROR(parse(k4.b), at(4), "no MARK");
  Pk k5;
  k5.proto(4).k(1).reduce().stop();
  EXPECT_PICKLE_ERROR(parse(k5.b), at(4), "stack underflow");
  Pk k6;
  k6.proto(4).stop();
  EXPECT_PICKLE_ERROR(parse(k6.b), at(2), "STOP with 0 values on the stack");
}

TEST(PickleRefuse, WrongDtypeStrings) {
  for (const char* dt : {"f8", "i2", "u1", "f2", "b1", "O", ">f4", "S4", "float64"}) {
    PyPickler::Options o;
    o.dtype_override = dt;
    PyPickler p(o);
    p.ndarray(DT::kF32, {1}, f32_bytes({1}));
    Buf b = p.finish();
    EXPECT_PICKLE_ERROR(parse(b), at(p.tags.at("dtype_reduce")), std::string("unsupported dtype '") + dt + "'");
  }
}

TEST(PickleRefuse, BigEndianAndUnknownByteOrder) {
  PyPickler::Options o;
  o.byteorder_override = ">";
  PyPickler p(o);
  p.ndarray(DT::kF32, {2}, f32_bytes({1, 2}));
  Buf b = p.finish();
  EXPECT_PICKLE_ERROR(parse(b), at(p.tags.at("dtype_build")), "big-endian");
  PyPickler::Options o2;
  o2.byteorder_override = "?";
  PyPickler p2(o2);
  p2.ndarray(DT::kF32, {2}, f32_bytes({1, 2}));
  Buf c = p2.finish();
  EXPECT_PICKLE_ERROR(parse(c), at(p2.tags.at("dtype_build")), "unknown dtype byte order '?'");
}

TEST(PickleRefuse, PayloadSizeDoesNotMatchShape) {
  PyPickler p;
  p.ndarray(DT::kF32, {3}, f32_bytes({1, 2}));  // 8 bytes for 3 floats
  Buf b = p.finish();
  EXPECT_PICKLE_ERROR(parse(b), at(p.tags.at("build")), "float32[3] needs 12 bytes of data but its payload holds 8");
  PyPickler q;
  q.quantized([&] { q.ndarray(DT::kI8, {2, 3}, i8_bytes({1, 2, 3, 4, 5, 6, 7})); },
              [&] { q.ndarray(DT::kBF16, {1, 3}, bf16_bytes({1, 2, 3})); });
  Buf c = q.finish();
  EXPECT_PICKLE_ERROR(parse(c), "int8[2, 3] needs 6 bytes of data but its payload holds 7");
  // Protocol 5 _frombuffer checks the same.
  PyPickler::Options o5;
  o5.proto = 5;
  PyPickler r5(o5);
  r5.ndarray_frombuffer(DT::kF32, {2, 2}, f32_bytes({1, 2, 3}));
  Buf d = r5.finish();
  EXPECT_PICKLE_ERROR(parse(d), at(r5.tags.at("reduce")), "float32[2, 2] needs 16 bytes");
  // A shape whose element count overflows 64 bits.
  PyPickler big;
  big.ndarray(DT::kF32, {int64_t{1} << 40, int64_t{1} << 40}, f32_bytes({1}));
  EXPECT_PICKLE_ERROR(parse(big.finish()), "overflows");
}

TEST(PickleRefuse, FortranOrder) {
  PyPickler::Options o;
  o.fortran = true;
  PyPickler p(o);
  p.ndarray(DT::kF32, {2, 3}, f32_bytes({1, 2, 3, 4, 5, 6}));
  Buf b = p.finish();
  EXPECT_PICKLE_ERROR(parse(b), at(p.tags.at("build")), "Fortran-order");
  PyPickler::Options o5;
  o5.proto = 5;
  PyPickler q(o5);
  q.ndarray_frombuffer(DT::kF32, {2, 2}, f32_bytes({1, 2, 3, 4}), "F");
  Buf c = q.finish();
  EXPECT_PICKLE_ERROR(parse(c), at(q.tags.at("reduce")), "Fortran-order");
}

TEST(PickleRefuse, UnsupportedProtocol) {
  for (uint8_t v : {uint8_t{0}, uint8_t{1}, uint8_t{6}, uint8_t{255}}) {
    Buf b = f32_pickle({1});
    b[1] = v;
    EXPECT_PICKLE_ERROR(parse(b), at(0), "unsupported pickle protocol " + std::to_string(v));
  }
}

TEST(PickleRefuse, OutOfBandBuffers) {
  for (uint8_t op : {uint8_t{0x97}, uint8_t{0x98}}) {
    Pk k;
    k.proto(5).stack_global("numpy.core.numeric", "_frombuffer").mark();
    uint64_t o = k.pos();
    k.op(op).stop();
    EXPECT_PICKLE_ERROR(parse(k.b), at(o), "out-of-band buffers");
  }
}

TEST(PickleRefuse, StopWithExtraStackItems) {
  // Without frames, so that bytes can be added at the end.
  PyPickler::Options o;
  o.proto = 3;
  Buf c = f32_pickle({1}, o);
  c.pop_back();
  c.push_back('N');
  uint64_t s = c.size();
  c.push_back('.');
  EXPECT_PICKLE_ERROR(parse(c), at(s), "STOP with 2 values on the stack (expected 1)");
  // An open MARK at STOP.
  Buf d = f32_pickle({1}, o);
  d.pop_back();
  d.push_back('(');
  uint64_t s2 = d.size();
  d.push_back('.');
  EXPECT_PICKLE_ERROR(parse(d), at(s2), "STOP with an open MARK");
}

TEST(PickleRefuse, ResultIsNotAnArray) {
  Pk k;
  k.proto(4).k(5);
  EXPECT_PICKLE_ERROR(parse(Pk(k).stop().b), at(4), "holds a int, not an array");
  Pk k2;
  k2.proto(4).sbu("hello").stop();
  EXPECT_PICKLE_ERROR(parse(k2.b), "holds a str");
  Pk k3;
  k3.proto(4).empty_dict().stop();
  EXPECT_PICKLE_ERROR(parse(k3.b), "holds a dict");
  // A dtype, and an ndarray that REDUCE made but BUILD never filled.
  Pk k4;
  k4.proto(4).stack_global("numpy", "dtype").sbu("f4").f().t().tuple3().reduce().stop();
  EXPECT_PICKLE_ERROR(parse(k4.b), "holds a dtype");
  Pk k5;
  k5.proto(4).stack_global("numpy.core.multiarray", "_reconstruct").stack_global("numpy", "ndarray");
  k5.k(0).tuple1().sbb({'b'}).tuple3().reduce().stop();
  EXPECT_PICKLE_ERROR(parse(k5.b), "holds a ndarray");
  // A QuantizedWeight8bit never built, and one missing a field.
  Pk k6;
  k6.proto(4).stack_global("__main__", "QuantizedWeight8bit").empty_tuple().op(0x81).stop();
  EXPECT_PICKLE_ERROR(parse(k6.b), "holds a QuantizedWeight8bit");
  Pk k7;
  k7.proto(4).stack_global("__main__", "QuantizedWeight8bit").empty_tuple().op(0x81);
  k7.empty_dict().sbu("weight").k(1).op('s').build().stop();
  EXPECT_PICKLE_ERROR(parse(k7.b), "lacks 'weight' or 'scales'");
  Pk k8;
  k8.proto(4).stack_global("__main__", "QuantizedWeight8bit").empty_tuple().op(0x81);
  k8.empty_dict().sbu("bias").k(1).op('s').build().stop();
  EXPECT_PICKLE_ERROR(parse(k8.b), "unknown field 'bias'");
}

TEST(PickleRefuse, NegativeDimensionThroughLong1) {
  // LONG1 ff = -1 as a dimension.
  Pk k;
  k.proto(4).stack_global("numpy.core.multiarray", "_reconstruct").stack_global("numpy", "ndarray");
  k.k(0).tuple1().sbb({'b'}).tuple3().reduce();
  k.mark().k(1).op(0x8a).le<uint8_t>(1).le<uint8_t>(0xff).tuple1();
  k.stack_global("numpy", "dtype").sbu("f4").f().t().tuple3().reduce();
  k.mark().k(3).sbu("<").none().none().none().j(-1).j(-1).k(0).tuple().build();
  k.f().sbb({}).tuple();
  uint64_t b = k.pos();
  k.build().stop();
  EXPECT_PICKLE_ERROR(parse(k.b), at(b), "non-negative integer");
}

TEST(PickleRefuse, MutatedPythonBytesNeverCrash) {
  // Every single-byte change of the real QuantizedWeight8bit pickle either parses or
  // fails with a positioned error.
  Buf base = from(kPyQ8P4, sizeof kPyQ8P4);
  int refused = 0;
  for (size_t i = 0; i < base.size(); ++i) {
    for (uint8_t v : {uint8_t{0x00}, uint8_t{0xff}, static_cast<uint8_t>(base[i] ^ 0x01)}) {
      Buf b = base;
      b[i] = v;
      auto r = parse(b);
      if (!r.ok()) {
        ++refused;
        EXPECT_EQ(r.error().message.rfind("t.pkl: ", 0), 0u) << r.error().message;
      }
    }
  }
  EXPECT_GT(refused, 300);
}

}  // namespace
}  // namespace grokit::convert
