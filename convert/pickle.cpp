#include "convert/pickle.h"

#include <array>
#include <string_view>
#include <unordered_map>

namespace grokit::convert {

const char* element_type_name(ElementType t) {
  switch (t) {
    case ElementType::kF32: return "float32";
    case ElementType::kI8: return "int8";
    case ElementType::kBF16: return "bfloat16";
  }
  return "?";
}
uint64_t element_size(ElementType t) {
  switch (t) {
    case ElementType::kF32: return 4;
    case ElementType::kI8: return 1;
    case ElementType::kBF16: return 2;
  }
  return 0;
}
uint64_t ArrayView::element_count() const {
  uint64_t n = 1;
  for (int64_t d : shape) n *= static_cast<uint64_t>(d);
  return n;
}
std::string ArrayView::describe() const {
  std::string s = std::string(element_type_name(type)) + "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

namespace {

// The callables a release pickle may name. Everything else is refused.
enum class Callable : uint8_t { kReconstruct, kNdarray, kDtype, kBfloat16, kQuantizedWeight8bit, kCodecsEncode, kFromBuffer };

struct AllowedGlobal {
  std::string_view module, name;
  Callable callable;
};
constexpr std::array<AllowedGlobal, 9> kAllowedGlobals{{
    {"numpy.core.multiarray", "_reconstruct", Callable::kReconstruct},
    {"numpy._core.multiarray", "_reconstruct", Callable::kReconstruct},  // numpy 2
    {"numpy", "ndarray", Callable::kNdarray},
    {"numpy", "dtype", Callable::kDtype},
    {"ml_dtypes", "bfloat16", Callable::kBfloat16},
    {"__main__", "QuantizedWeight8bit", Callable::kQuantizedWeight8bit},
    {"_codecs", "encode", Callable::kCodecsEncode},                     // bytes at protocol 2
    {"numpy.core.numeric", "_frombuffer", Callable::kFromBuffer},       // arrays at protocol 5
    {"numpy._core.numeric", "_frombuffer", Callable::kFromBuffer},
}};

const char* callable_name(Callable c) {
  for (const auto& g : kAllowedGlobals) {
    if (g.callable == c) return g.name.data();  // the names are NUL-terminated literals
  }
  return "?";
}

struct Node;
using NodeRef = std::shared_ptr<Node>;

enum class Kind : uint8_t {
  kNone, kBool, kInt, kStr, kBytes, kTuple, kList, kDict, kGlobal,
  kArray,      // result of _reconstruct / _frombuffer; filled by BUILD
  kDtype,      // result of numpy.dtype(...)
  kQuantized,  // QuantizedWeight8bit(); filled by BUILD
};

struct Node {
  Kind kind = Kind::kNone;
  int64_t i = 0;                 // kInt, kBool
  std::string_view text;         // kStr (view into the pickle)
  const uint8_t* bytes = nullptr;// kBytes
  uint64_t nbytes = 0;
  uint64_t bytes_offset = 0;     // position of a kBytes payload in the file
  std::shared_ptr<const std::vector<uint8_t>> owned;  // decoded kBytes
  std::vector<NodeRef> items;    // kTuple, kList; kDict as key,value pairs
  Callable callable{};           // kGlobal
  uint32_t depth = 1;
  // A container placed inside another is frozen: growing it afterwards (reached again
  // through the memo) would change its ancestors' depth, or make a cycle.
  bool frozen = false;
  // kDtype
  ElementType etype{};
  bool dtype_built = false;
  // kArray / kQuantized
  bool built = false;
  ArrayView array;
  ArrayView weight, scales;
};

const char* kind_name(Kind k) {
  switch (k) {
    case Kind::kNone: return "None";
    case Kind::kBool: return "bool";
    case Kind::kInt: return "int";
    case Kind::kStr: return "str";
    case Kind::kBytes: return "bytes";
    case Kind::kTuple: return "tuple";
    case Kind::kList: return "list";
    case Kind::kDict: return "dict";
    case Kind::kGlobal: return "global";
    case Kind::kArray: return "ndarray";
    case Kind::kDtype: return "dtype";
    case Kind::kQuantized: return "QuantizedWeight8bit";
  }
  return "?";
}

class Machine {
 public:
  Machine(const uint8_t* data, uint64_t size, const std::string& name, const PickleLimits& limits)
      : data_(data), size_(size), name_(name), limits_(limits) {}

  Result<ReleaseTensor> run();

 private:
  template <class... Args>
  Error fail(uint64_t at, const Args&... args) const {
    return make_error(name_, ": byte ", at, ": ", args...);
  }

  // Reads n bytes at pos_, honouring frame boundaries; returns nullptr on error (err_ set).
  const uint8_t* take(uint64_t n);
  Status push(NodeRef n);
  Result<NodeRef> pop();
  Result<NodeRef> top();
  Result<std::vector<NodeRef>> pop_to_mark();
  NodeRef make(Kind k);
  Result<NodeRef> make_container(Kind k, std::vector<NodeRef> items);
  Status memo_put(uint64_t index, const NodeRef& n);
  Result<NodeRef> memo_get(uint64_t index);
  Result<NodeRef> resolve_global(std::string_view module, std::string_view name);
  Status reduce(const NodeRef& fn, const NodeRef& args);
  Status build(const NodeRef& obj, const NodeRef& state);
  Result<ArrayView> array_from_state(const NodeRef& state);
  Result<std::vector<int64_t>> shape_from(const NodeRef& n, const char* what);
  Result<ArrayView> finish_array(ElementType t, std::vector<int64_t> shape, const NodeRef& bytes);

  const uint8_t* data_;
  uint64_t size_;
  const std::string& name_;
  PickleLimits limits_;
  uint64_t pos_ = 0;
  uint64_t op_pos_ = 0;        // offset of the opcode being run
  uint64_t frame_end_ = 0;     // 0: not inside a frame
  std::optional<Error> err_;
  std::vector<NodeRef> stack_;
  std::vector<size_t> marks_;
  std::unordered_map<uint64_t, NodeRef> memo_;
  uint64_t objects_ = 0;
};

const uint8_t* Machine::take(uint64_t n) {
  if (frame_end_ != 0 && pos_ < frame_end_) {
    if (n > frame_end_ - pos_) {
      err_ = fail(op_pos_, "needs ", n, " bytes but the frame ends at byte ", frame_end_,
                  " (a truncated or lying FRAME)");
      return nullptr;
    }
  }
  if (n > size_ - pos_) {
    err_ = fail(op_pos_, "needs ", n, " bytes but only ", size_ - pos_, " remain in the file (truncated)");
    return nullptr;
  }
  const uint8_t* p = data_ + pos_;
  pos_ += n;
  if (frame_end_ != 0 && pos_ >= frame_end_) frame_end_ = 0;
  return p;
}

NodeRef Machine::make(Kind k) {
  auto n = std::make_shared<Node>();
  n->kind = k;
  ++objects_;
  return n;
}

Status Machine::push(NodeRef n) {
  if (objects_ > limits_.max_objects) return fail(op_pos_, "more than ", limits_.max_objects, " objects");
  if (stack_.size() >= limits_.max_stack) return fail(op_pos_, "stack deeper than ", limits_.max_stack);
  stack_.push_back(std::move(n));
  return {};
}

Result<NodeRef> Machine::pop() {
  size_t floor = marks_.empty() ? 0 : marks_.back();
  if (stack_.size() <= floor) return fail(op_pos_, "stack underflow");
  NodeRef n = std::move(stack_.back());
  stack_.pop_back();
  return n;
}

Result<NodeRef> Machine::top() {
  size_t floor = marks_.empty() ? 0 : marks_.back();
  if (stack_.size() <= floor) return fail(op_pos_, "stack underflow");
  return stack_.back();
}

Result<std::vector<NodeRef>> Machine::pop_to_mark() {
  if (marks_.empty()) return fail(op_pos_, "no MARK on the stack");
  size_t m = marks_.back();
  marks_.pop_back();
  std::vector<NodeRef> items(std::make_move_iterator(stack_.begin() + static_cast<std::ptrdiff_t>(m)),
                             std::make_move_iterator(stack_.end()));
  stack_.resize(m);
  return items;
}

Result<NodeRef> Machine::make_container(Kind k, std::vector<NodeRef> items) {
  uint32_t depth = 1;
  for (auto& it : items) depth = std::max(depth, it->depth + 1);
  if (depth > limits_.max_depth) return fail(op_pos_, "containers nested deeper than ", limits_.max_depth);
  for (auto& it : items) it->frozen = true;
  NodeRef n = make(k);
  n->items = std::move(items);
  n->depth = depth;
  return n;
}

Status Machine::memo_put(uint64_t index, const NodeRef& n) {
  if (memo_.size() >= limits_.max_memo && memo_.find(index) == memo_.end())
    return fail(op_pos_, "memo holds more than ", limits_.max_memo, " entries");
  memo_[index] = n;
  return {};
}

Result<NodeRef> Machine::memo_get(uint64_t index) {
  auto it = memo_.find(index);
  if (it == memo_.end()) return fail(op_pos_, "memo key ", index, " was never stored");
  return it->second;
}

Result<NodeRef> Machine::resolve_global(std::string_view module, std::string_view name) {
  for (const auto& g : kAllowedGlobals) {
    if (g.module == module && g.name == name) {
      NodeRef n = make(Kind::kGlobal);
      n->callable = g.callable;
      return n;
    }
  }
  return fail(op_pos_, "refusing global '", module, ".", name,
              "': a release pickle names only numpy array, numpy.dtype, ml_dtypes.bfloat16 and "
              "__main__.QuantizedWeight8bit");
}

Result<std::vector<int64_t>> Machine::shape_from(const NodeRef& n, const char* what) {
  if (n->kind != Kind::kTuple && n->kind != Kind::kList)
    return fail(op_pos_, what, " must be a tuple, found ", kind_name(n->kind));
  if (n->items.size() > 8) return fail(op_pos_, what, " has ", n->items.size(), " dimensions (at most 8)");
  std::vector<int64_t> shape;
  for (auto& d : n->items) {
    if (d->kind != Kind::kInt || d->i < 0) return fail(op_pos_, what, " holds a non-negative integer per dimension");
    shape.push_back(d->i);
  }
  return shape;
}

Result<ArrayView> Machine::finish_array(ElementType t, std::vector<int64_t> shape, const NodeRef& bytes) {
  if (bytes->kind != Kind::kBytes) return fail(op_pos_, "array payload must be bytes, found ", kind_name(bytes->kind));
  uint64_t count = 1;
  for (int64_t d : shape) {
    if (!checked_mul(count, static_cast<uint64_t>(d), &count)) return fail(op_pos_, "array shape overflows");
  }
  uint64_t expect;
  if (!checked_mul(count, element_size(t), &expect)) return fail(op_pos_, "array size overflows");
  ArrayView a;
  a.type = t;
  a.shape = std::move(shape);
  if (bytes->nbytes != expect)
    return fail(op_pos_, "array ", a.describe(), " needs ", expect, " bytes of data but its payload holds ",
                bytes->nbytes);
  a.data = bytes->bytes;
  a.nbytes = bytes->nbytes;
  a.file_offset = bytes->bytes_offset;
  a.owned = bytes->owned;
  return a;
}

Result<ArrayView> Machine::array_from_state(const NodeRef& state) {
  // (version, shape, dtype, is_fortran, raw bytes)
  if (state->kind != Kind::kTuple || state->items.size() != 5)
    return fail(op_pos_, "ndarray state must be a 5-tuple (version, shape, dtype, fortran, data)");
  const auto& it = state->items;
  if (it[0]->kind != Kind::kInt || it[0]->i != 1) return fail(op_pos_, "unsupported ndarray state version");
  GROKIT_ASSIGN_OR_RETURN(auto shape, shape_from(it[1], "ndarray shape"));
  if (it[2]->kind != Kind::kDtype || !it[2]->dtype_built) return fail(op_pos_, "ndarray dtype is not a built numpy.dtype");
  if (it[3]->kind != Kind::kBool) return fail(op_pos_, "ndarray fortran flag must be a bool");
  if (it[3]->i != 0 && shape.size() > 1) return fail(op_pos_, "Fortran-order arrays are not supported");
  return finish_array(it[2]->etype, std::move(shape), it[4]);
}

Status Machine::reduce(const NodeRef& fn, const NodeRef& args) {
  if (fn->kind != Kind::kGlobal) return fail(op_pos_, "REDUCE of a ", kind_name(fn->kind), ", not a known callable");
  if (args->kind != Kind::kTuple) return fail(op_pos_, "REDUCE arguments must be a tuple");
  const auto& a = args->items;
  switch (fn->callable) {
    case Callable::kReconstruct: {
      // _reconstruct(numpy.ndarray, (0,), b'b'): an empty array awaiting BUILD.
      if (a.size() != 3 || a[0]->kind != Kind::kGlobal || a[0]->callable != Callable::kNdarray)
        return fail(op_pos_, "_reconstruct must be called as _reconstruct(numpy.ndarray, (0,), b'b')");
      return push(make(Kind::kArray));
    }
    case Callable::kDtype: {
      // numpy.dtype('f4' | 'i1' | ml_dtypes.bfloat16, False, True)
      if (a.empty() || a.size() > 3) return fail(op_pos_, "numpy.dtype called with ", a.size(), " arguments");
      NodeRef d = make(Kind::kDtype);
      if (a[0]->kind == Kind::kStr) {
        std::string_view s = a[0]->text;
        if (!s.empty() && (s[0] == '<' || s[0] == '|' || s[0] == '=')) s.remove_prefix(1);
        if (s == "f4" || s == "float32") d->etype = ElementType::kF32;
        else if (s == "i1" || s == "int8") d->etype = ElementType::kI8;
        else return fail(op_pos_, "unsupported dtype '", a[0]->text, "' (the release holds float32, int8 and bfloat16)");
      } else if (a[0]->kind == Kind::kGlobal && a[0]->callable == Callable::kBfloat16) {
        d->etype = ElementType::kBF16;
      } else {
        return fail(op_pos_, "numpy.dtype of a ", kind_name(a[0]->kind));
      }
      return push(d);
    }
    case Callable::kCodecsEncode: {
      // _codecs.encode(text, 'latin1'): protocol 2's way of writing bytes.
      if (a.size() != 2 || a[0]->kind != Kind::kStr || a[1]->kind != Kind::kStr ||
          (a[1]->text != "latin1" && a[1]->text != "latin-1"))
        return fail(op_pos_, "_codecs.encode must be called as encode(str, 'latin1')");
      auto out = std::make_shared<std::vector<uint8_t>>();
      out->reserve(a[0]->text.size());
      std::string_view t = a[0]->text;
      for (size_t i = 0; i < t.size(); ++i) {
        auto c = static_cast<uint8_t>(t[i]);
        if (c < 0x80) {
          out->push_back(c);
        } else if ((c == 0xc2 || c == 0xc3) && i + 1 < t.size() && (static_cast<uint8_t>(t[i + 1]) & 0xc0) == 0x80) {
          out->push_back(static_cast<uint8_t>(((c & 0x1f) << 6) | (static_cast<uint8_t>(t[i + 1]) & 0x3f)));
          ++i;
        } else {
          return fail(op_pos_, "latin1 text holds a character above U+00FF or invalid UTF-8");
        }
      }
      NodeRef b = make(Kind::kBytes);
      b->bytes = out->data();
      b->nbytes = out->size();
      b->owned = std::move(out);
      return push(b);
    }
    case Callable::kFromBuffer: {
      // _frombuffer(buffer, dtype, shape, order)
      if (a.size() != 4 || a[1]->kind != Kind::kDtype || !a[1]->dtype_built || a[3]->kind != Kind::kStr)
        return fail(op_pos_, "_frombuffer must be called as _frombuffer(bytes, dtype, shape, order)");
      GROKIT_ASSIGN_OR_RETURN(auto shape, shape_from(a[2], "_frombuffer shape"));
      if (a[3]->text != "C" && !(a[3]->text == "F" && shape.size() <= 1))
        return fail(op_pos_, "Fortran-order arrays are not supported");
      NodeRef arr = make(Kind::kArray);
      GROKIT_ASSIGN_OR_RETURN(arr->array, finish_array(a[1]->etype, std::move(shape), a[0]));
      arr->built = true;
      return push(arr);
    }
    default:
      return fail(op_pos_, "REDUCE may not call ", callable_name(fn->callable));
  }
}

Status Machine::build(const NodeRef& obj, const NodeRef& state) {
  switch (obj->kind) {
    case Kind::kDtype: {
      // (3, byteorder, subarray, names, fields, elsize, alignment, flags)
      if (obj->dtype_built) return fail(op_pos_, "dtype built twice");
      if (state->kind != Kind::kTuple || state->items.size() < 6) return fail(op_pos_, "malformed dtype state");
      const auto& it = state->items;
      if (it[1]->kind != Kind::kStr) return fail(op_pos_, "dtype byte order must be a str");
      if (it[1]->text == ">") return fail(op_pos_, "big-endian arrays are not supported");
      if (it[1]->text != "<" && it[1]->text != "|" && it[1]->text != "=")
        return fail(op_pos_, "unknown dtype byte order '", it[1]->text, "'");
      for (int k = 2; k <= 4; ++k) {
        if (it[static_cast<size_t>(k)]->kind != Kind::kNone) return fail(op_pos_, "structured or sub-array dtypes are not supported");
      }
      obj->dtype_built = true;
      return {};
    }
    case Kind::kArray: {
      if (obj->built) return fail(op_pos_, "ndarray built twice");
      GROKIT_ASSIGN_OR_RETURN(obj->array, array_from_state(state));
      obj->built = true;
      return {};
    }
    case Kind::kQuantized: {
      if (obj->built) return fail(op_pos_, "QuantizedWeight8bit built twice");
      NodeRef dict = state;
      // A dataclass with slots pickles as (None, slots-dict); accept either shape.
      if (state->kind == Kind::kTuple && state->items.size() == 2 && state->items[0]->kind == Kind::kNone)
        dict = state->items[1];
      if (dict->kind != Kind::kDict) return fail(op_pos_, "QuantizedWeight8bit state must be a dict");
      NodeRef w, s;
      for (size_t k = 0; k + 1 < dict->items.size(); k += 2) {
        const NodeRef& key = dict->items[k];
        const NodeRef& val = dict->items[k + 1];
        if (key->kind != Kind::kStr) return fail(op_pos_, "QuantizedWeight8bit field name must be a str");
        if (key->text == "weight") w = val;
        else if (key->text == "scales") s = val;
        else return fail(op_pos_, "QuantizedWeight8bit has an unknown field '", key->text, "'");
      }
      if (!w || !s) return fail(op_pos_, "QuantizedWeight8bit lacks 'weight' or 'scales'");
      if (w->kind != Kind::kArray || !w->built || s->kind != Kind::kArray || !s->built)
        return fail(op_pos_, "QuantizedWeight8bit fields must be arrays");
      obj->weight = w->array;
      obj->scales = s->array;
      obj->built = true;
      return {};
    }
    default:
      return fail(op_pos_, "BUILD on a ", kind_name(obj->kind));
  }
}

Result<ReleaseTensor> Machine::run() {
  if (size_ == 0) return make_error(name_, ": empty file (0 bytes): not a pickle");
  uint64_t ops = 0;
  while (true) {
    if (pos_ >= size_) return fail(pos_, "file ends before the STOP opcode (truncated)");
    if (++ops > limits_.max_ops) return fail(pos_, "more than ", limits_.max_ops, " opcodes");
    op_pos_ = pos_;
    const uint8_t* opp = take(1);
    if (opp == nullptr) return *err_;
    uint8_t op = *opp;
#define TAKE(var, n)                       \
  const uint8_t* var = take(n);            \
  if ((var) == nullptr) return *err_
    switch (op) {
      case 0x80: {  // PROTO
        TAKE(p, 1);
        if (*p < 2 || *p > 5) return fail(op_pos_, "unsupported pickle protocol ", int{*p}, " (2 to 5 are read)");
        break;
      }
      case 0x95: {  // FRAME
        TAKE(p, 8);
        uint64_t n = load_le<uint64_t>(p);
        if (frame_end_ != 0) return fail(op_pos_, "a new FRAME begins before the current frame ends");
        if (n > size_ - pos_)
          return fail(op_pos_, "FRAME declares ", n, " bytes but only ", size_ - pos_, " remain (truncated or lying FRAME)");
        frame_end_ = n == 0 ? 0 : pos_ + n;
        break;
      }
      case '.': {  // STOP
        if (frame_end_ != 0) return fail(op_pos_, "STOP inside a frame that declares more bytes");
        if (!marks_.empty()) return fail(op_pos_, "STOP with an open MARK");
        if (stack_.size() != 1) return fail(op_pos_, "STOP with ", stack_.size(), " values on the stack (expected 1)");
        if (pos_ != size_)
          return fail(pos_, size_ - pos_, " bytes of trailing data after STOP");
        NodeRef r = stack_.back();
        ReleaseTensor t;
        if (r->kind == Kind::kArray && r->built) {
          t.array = r->array;
        } else if (r->kind == Kind::kQuantized && r->built) {
          t.quantized = true;
          t.weight = r->weight;
          t.scales = r->scales;
        } else {
          return fail(op_pos_, "the pickle holds a ", kind_name(r->kind), ", not an array or QuantizedWeight8bit");
        }
        return t;
      }
      case '(':  // MARK
        if (marks_.size() >= limits_.max_marks) return fail(op_pos_, "MARKs nested deeper than ", limits_.max_marks);
        marks_.push_back(stack_.size());
        break;
      case '0': {  // POP
        GROKIT_ASSIGN_OR_RETURN(auto n, pop());
        (void)n;
        break;
      }
      case 'N': GROKIT_TRY(push(make(Kind::kNone))); break;
      case 0x88:
      case 0x89: {  // NEWTRUE / NEWFALSE
        NodeRef n = make(Kind::kBool);
        n->i = op == 0x88;
        GROKIT_TRY(push(n));
        break;
      }
      case 'K':
      case 'M':
      case 'J': {  // BININT1 / BININT2 / BININT
        NodeRef n = make(Kind::kInt);
        if (op == 'K') { TAKE(p, 1); n->i = *p; }
        else if (op == 'M') { TAKE(p, 2); n->i = load_le<uint16_t>(p); }
        else { TAKE(p, 4); n->i = load_le<int32_t>(p); }
        GROKIT_TRY(push(n));
        break;
      }
      case 0x8a: {  // LONG1
        TAKE(p, 1);
        uint8_t n = *p;
        if (n > 8) return fail(op_pos_, "integer of ", int{n}, " bytes is too large");
        TAKE(q, n);
        uint64_t v = 0;
        for (int k = n - 1; k >= 0; --k) v = v << 8 | q[k];
        if (n > 0 && n < 8 && (q[n - 1] & 0x80)) v |= ~uint64_t{0} << (8 * n);  // sign-extend
        NodeRef node = make(Kind::kInt);
        node->i = static_cast<int64_t>(v);
        GROKIT_TRY(push(node));
        break;
      }
      case 0x8c:    // SHORT_BINUNICODE
      case 'X':     // BINUNICODE
      case 0x8d: {  // BINUNICODE8
        uint64_t n;
        if (op == 0x8c) { TAKE(p, 1); n = *p; }
        else if (op == 'X') { TAKE(p, 4); n = load_le<uint32_t>(p); }
        else { TAKE(p, 8); n = load_le<uint64_t>(p); }
        TAKE(s, n);
        NodeRef node = make(Kind::kStr);
        node->text = std::string_view(reinterpret_cast<const char*>(s), n);
        GROKIT_TRY(push(node));
        break;
      }
      case 'C':     // SHORT_BINBYTES
      case 'B':     // BINBYTES
      case 0x8e:    // BINBYTES8
      case 0x96: {  // BYTEARRAY8
        uint64_t n;
        if (op == 'C') { TAKE(p, 1); n = *p; }
        else if (op == 'B') { TAKE(p, 4); n = load_le<uint32_t>(p); }
        else { TAKE(p, 8); n = load_le<uint64_t>(p); }
        uint64_t at = pos_;
        TAKE(s, n);
        NodeRef node = make(Kind::kBytes);
        node->bytes = s;
        node->nbytes = n;
        node->bytes_offset = at;
        GROKIT_TRY(push(node));
        break;
      }
      case ')': {
        GROKIT_ASSIGN_OR_RETURN(auto t, make_container(Kind::kTuple, {}));
        GROKIT_TRY(push(t));
        break;
      }
      case 't': {  // TUPLE
        GROKIT_ASSIGN_OR_RETURN(auto items, pop_to_mark());
        GROKIT_ASSIGN_OR_RETURN(auto t, make_container(Kind::kTuple, std::move(items)));
        GROKIT_TRY(push(t));
        break;
      }
      case 0x85:
      case 0x86:
      case 0x87: {  // TUPLE1..3
        size_t n = static_cast<size_t>(op - 0x84);
        std::vector<NodeRef> items(n);
        for (size_t k = n; k-- > 0;) {
          GROKIT_ASSIGN_OR_RETURN(items[k], pop());
        }
        GROKIT_ASSIGN_OR_RETURN(auto t, make_container(Kind::kTuple, std::move(items)));
        GROKIT_TRY(push(t));
        break;
      }
      case ']':
      case '}': {  // EMPTY_LIST / EMPTY_DICT
        GROKIT_ASSIGN_OR_RETURN(auto c, make_container(op == ']' ? Kind::kList : Kind::kDict, {}));
        GROKIT_TRY(push(c));
        break;
      }
      case 'a':
      case 'e': {  // APPEND / APPENDS
        std::vector<NodeRef> items;
        if (op == 'a') {
          GROKIT_ASSIGN_OR_RETURN(auto v, pop());
          items.push_back(std::move(v));
        } else {
          GROKIT_ASSIGN_OR_RETURN(items, pop_to_mark());
        }
        GROKIT_ASSIGN_OR_RETURN(auto list, top());
        if (list->kind != Kind::kList) return fail(op_pos_, "APPEND to a ", kind_name(list->kind));
        if (list->frozen) return fail(op_pos_, "APPEND to a list that is already inside another container");
        if (list->items.size() + items.size() > limits_.max_stack) return fail(op_pos_, "list with too many items");
        for (auto& v : items) {
          if (v == list) return fail(op_pos_, "a list appended to itself");
          if (v->depth + 1 > limits_.max_depth) return fail(op_pos_, "containers nested deeper than ", limits_.max_depth);
          v->frozen = true;
          list->depth = std::max(list->depth, v->depth + 1);
          list->items.push_back(std::move(v));
        }
        break;
      }
      case 's':
      case 'u': {  // SETITEM / SETITEMS
        std::vector<NodeRef> items;
        if (op == 's') {
          GROKIT_ASSIGN_OR_RETURN(auto v, pop());
          GROKIT_ASSIGN_OR_RETURN(auto k, pop());
          items = {k, v};
        } else {
          GROKIT_ASSIGN_OR_RETURN(items, pop_to_mark());
          if (items.size() % 2 != 0) return fail(op_pos_, "SETITEMS with an odd number of values");
        }
        GROKIT_ASSIGN_OR_RETURN(auto dict, top());
        if (dict->kind != Kind::kDict) return fail(op_pos_, "SETITEM on a ", kind_name(dict->kind));
        if (dict->frozen) return fail(op_pos_, "SETITEM on a dict that is already inside another container");
        if (dict->items.size() + items.size() > 64) return fail(op_pos_, "dict with too many items");
        for (auto& v : items) {
          if (v == dict) return fail(op_pos_, "a dict stored in itself");
          if (v->depth + 1 > limits_.max_depth) return fail(op_pos_, "containers nested deeper than ", limits_.max_depth);
          v->frozen = true;
          dict->depth = std::max(dict->depth, v->depth + 1);
          dict->items.push_back(std::move(v));
        }
        break;
      }
      case 'c': {  // GLOBAL "module\nname\n"
        auto read_line = [&]() -> std::optional<std::string_view> {
          uint64_t limit = std::min<uint64_t>(size_ - pos_, 256);
          if (frame_end_ != 0) limit = std::min(limit, frame_end_ - pos_);
          for (uint64_t k = 0; k < limit; ++k) {
            if (data_[pos_ + k] == '\n') {
              std::string_view s(reinterpret_cast<const char*>(data_ + pos_), k);
              if (take(k + 1) == nullptr) return std::nullopt;
              return s;
            }
          }
          err_ = fail(op_pos_, "GLOBAL name not terminated within 256 bytes");
          return std::nullopt;
        };
        auto module = read_line();
        if (!module) return *err_;
        auto name = read_line();
        if (!name) return *err_;
        GROKIT_ASSIGN_OR_RETURN(auto g, resolve_global(*module, *name));
        GROKIT_TRY(push(g));
        break;
      }
      case 0x93: {  // STACK_GLOBAL
        GROKIT_ASSIGN_OR_RETURN(auto name, pop());
        GROKIT_ASSIGN_OR_RETURN(auto module, pop());
        if (module->kind != Kind::kStr || name->kind != Kind::kStr)
          return fail(op_pos_, "STACK_GLOBAL needs two strings");
        GROKIT_ASSIGN_OR_RETURN(auto g, resolve_global(module->text, name->text));
        GROKIT_TRY(push(g));
        break;
      }
      case 'R': {  // REDUCE
        GROKIT_ASSIGN_OR_RETURN(auto args, pop());
        GROKIT_ASSIGN_OR_RETURN(auto fn, pop());
        GROKIT_TRY(reduce(fn, args));
        break;
      }
      case 0x81: {  // NEWOBJ
        GROKIT_ASSIGN_OR_RETURN(auto args, pop());
        GROKIT_ASSIGN_OR_RETURN(auto cls, pop());
        if (cls->kind != Kind::kGlobal || cls->callable != Callable::kQuantizedWeight8bit)
          return fail(op_pos_, "NEWOBJ may only create __main__.QuantizedWeight8bit");
        if (args->kind != Kind::kTuple || !args->items.empty())
          return fail(op_pos_, "QuantizedWeight8bit is created with no arguments");
        GROKIT_TRY(push(make(Kind::kQuantized)));
        break;
      }
      case 'b': {  // BUILD
        GROKIT_ASSIGN_OR_RETURN(auto state, pop());
        GROKIT_ASSIGN_OR_RETURN(auto obj, top());
        GROKIT_TRY(build(obj, state));
        break;
      }
      case 0x94: {  // MEMOIZE
        GROKIT_ASSIGN_OR_RETURN(auto n, top());
        GROKIT_TRY(memo_put(memo_.size(), n));
        break;
      }
      case 'q':
      case 'r': {  // BINPUT / LONG_BINPUT
        uint64_t idx;
        if (op == 'q') { TAKE(p, 1); idx = *p; }
        else { TAKE(p, 4); idx = load_le<uint32_t>(p); }
        GROKIT_ASSIGN_OR_RETURN(auto n, top());
        GROKIT_TRY(memo_put(idx, n));
        break;
      }
      case 'h':
      case 'j': {  // BINGET / LONG_BINGET
        uint64_t idx;
        if (op == 'h') { TAKE(p, 1); idx = *p; }
        else { TAKE(p, 4); idx = load_le<uint32_t>(p); }
        GROKIT_ASSIGN_OR_RETURN(auto n, memo_get(idx));
        GROKIT_TRY(push(n));
        break;
      }
      case 0x97:
      case 0x98:
        return fail(op_pos_, "out-of-band buffers (protocol 5 NEXT_BUFFER/READONLY_BUFFER) are not supported");
      default: {
        char hex[8];
        std::snprintf(hex, sizeof hex, "0x%02x", op);
        return fail(op_pos_, "opcode ", hex, " is not allowed in a release pickle");
      }
    }
#undef TAKE
  }
}

}  // namespace

Result<ReleaseTensor> parse_release_pickle(const uint8_t* data, uint64_t size, const std::string& name,
                                           const PickleLimits& limits) {
  Machine m(data, size, name, limits);
  return m.run();
}

}  // namespace grokit::convert
