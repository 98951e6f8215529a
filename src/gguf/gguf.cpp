// GGUF reader and writer. See gguf.h. Every read goes through Cursor, which checks bounds with
// overflow-safe arithmetic; every size computed from file data goes through checked_mul/checked_add.
#include "gguf/gguf.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cassert>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <algorithm>
#include <limits>

#include "util/error.h"
#include "util/escape.h"
#include "util/file.h"

namespace headroom::gguf {

namespace {

constexpr uint32_t kMagic = 0x46554747;  // "GGUF" little-endian
constexpr int kMaxArrayDepth = 8;
constexpr int kMaxDims = 4;
// What a file's metadata may cost in memory beyond the file's own bytes (keys, string values, one offset per
// string array element, one Value per key and per nested array), and the same again for the tensor infos.
// A real model's metadata costs a few MiB (a 256k-token vocabulary: 2 MiB of offsets) and its tensor list
// well under 64 MiB (300k tensors); the caps only stop hostile files.
constexpr uint64_t kMaxHeaderMemory = uint64_t(64) << 20;

bool checked_mul(uint64_t a, uint64_t b, uint64_t* out) { return !__builtin_mul_overflow(a, b, out); }
bool checked_add(uint64_t a, uint64_t b, uint64_t* out) { return !__builtin_add_overflow(a, b, out); }

// Size of a scalar value type in the file; 0 for STRING/ARRAY (variable) and unknown types.
uint64_t scalar_size(ValueType t) {
  switch (t) {
    case ValueType::UINT8: case ValueType::INT8: case ValueType::BOOL: return 1;
    case ValueType::UINT16: case ValueType::INT16: return 2;
    case ValueType::UINT32: case ValueType::INT32: case ValueType::FLOAT32: return 4;
    case ValueType::UINT64: case ValueType::INT64: case ValueType::FLOAT64: return 8;
    default: return 0;
  }
}

bool is_int_type(ValueType t) {
  switch (t) {
    case ValueType::UINT8: case ValueType::UINT16: case ValueType::UINT32: case ValueType::UINT64:
    case ValueType::INT8: case ValueType::INT16: case ValueType::INT32: case ValueType::INT64: return true;
    default: return false;
  }
}

bool has_control(std::string_view s) {
  return std::any_of(s.begin(), s.end(), [](char ch) { return static_cast<unsigned char>(ch) < 0x20 || ch == 0x7f; });
}

bool valid_value_type(uint32_t t) { return t <= static_cast<uint32_t>(ValueType::FLOAT64); }

class Cursor {
 public:
  Cursor(const uint8_t* base, uint64_t size, const std::string& label) : base_(base), size_(size), label_(label) {}
  uint64_t pos() const { return pos_; }
  uint64_t remaining() const { return size_ - pos_; }

  void need(uint64_t n, const char* what) const {
    if (n > remaining())
      fail("{}: truncated file: {} needs {} bytes at offset {}, but only {} remain", label_, what, n, pos_,
           remaining());
  }
  template <typename T>
  T read(const char* what) {
    need(sizeof(T), what);
    T v;
    std::memcpy(&v, base_ + pos_, sizeof(T));
    pos_ += sizeof(T);
    return v;
  }
  const uint8_t* here() const { return base_ + pos_; }
  void skip(uint64_t n, const char* what) {
    need(n, what);
    pos_ += n;
  }
  std::string read_string(const char* what) {
    uint64_t len = read<uint64_t>(what);
    if (len > remaining())
      fail("{}: {} has length {} at offset {}, past end of file ({} bytes)", label_, what, len, pos_ - 8, size_);
    std::string s(reinterpret_cast<const char*>(base_ + pos_), len);
    pos_ += len;
    return s;
  }

 private:
  const uint8_t* base_;
  uint64_t size_;
  uint64_t pos_ = 0;
  const std::string& label_;
};

// Charges what the header costs in memory as it is read; past kMaxHeaderMemory, an error naming the metadata
// key or tensor that went past it. One budget for the metadata, one for the tensor infos.
class Budget {
 public:
  // item: what a name names ("metadata", "tensor"); whole: what the cap is on ("metadata", "tensor list").
  Budget(const char* item, const char* whole) : item_(item), whole_(whole) {}
  void charge(uint64_t bytes, const std::string& label, const std::string& name) {
    if (bytes > left_)
      fail("{}: {} '{}' takes the {} past {} MiB of memory (a hostile or broken file)", label, item_, name, whole_,
           kMaxHeaderMemory >> 20);
    left_ -= bytes;
  }

 private:
  const char* item_;
  const char* whole_;
  uint64_t left_ = kMaxHeaderMemory;
};

Value read_value(Cursor& c, ValueType type, const std::string& key, const std::string& label, int depth,
                 Budget& budget) {
  budget.charge(sizeof(Value), label, key);
  Value v;
  v.type = type;
  switch (type) {
    case ValueType::UINT8: v.u = c.read<uint8_t>("metadata value"); break;
    case ValueType::UINT16: v.u = c.read<uint16_t>("metadata value"); break;
    case ValueType::UINT32: v.u = c.read<uint32_t>("metadata value"); break;
    case ValueType::UINT64: v.u = c.read<uint64_t>("metadata value"); break;
    case ValueType::INT8: v.i = c.read<int8_t>("metadata value"); break;
    case ValueType::INT16: v.i = c.read<int16_t>("metadata value"); break;
    case ValueType::INT32: v.i = c.read<int32_t>("metadata value"); break;
    case ValueType::INT64: v.i = c.read<int64_t>("metadata value"); break;
    case ValueType::FLOAT32: v.f = c.read<float>("metadata value"); break;
    case ValueType::FLOAT64: v.f = c.read<double>("metadata value"); break;
    case ValueType::BOOL: {
      uint8_t b = c.read<uint8_t>("metadata value");
      if (b > 1) fail("{}: metadata '{}' has invalid bool byte {}", label, key, b);
      v.b = b != 0;
      break;
    }
    case ValueType::STRING:
      v.s = c.read_string("metadata string");
      budget.charge(v.s.size(), label, key);
      break;
    case ValueType::ARRAY: {
      if (depth >= kMaxArrayDepth) fail("{}: metadata '{}' nests arrays deeper than {}", label, key, kMaxArrayDepth);
      uint32_t et = c.read<uint32_t>("array element type");
      if (!valid_value_type(et)) fail("{}: metadata '{}' has array of unknown type {}", label, key, et);
      const auto elem = static_cast<ValueType>(et);
      uint64_t n = c.read<uint64_t>("array length");
      // Each element takes at least 1 byte (scalar) or 8 bytes (string length) or 12 (nested array header).
      uint64_t min_each = scalar_size(elem);
      if (min_each == 0) min_each = elem == ValueType::STRING ? 8 : 12;
      uint64_t min_total;
      if (!checked_mul(n, min_each, &min_total) || min_total > c.remaining())
        fail("{}: metadata '{}' claims {} array elements, more than the {} bytes left in the file", label, key, n,
             c.remaining());
      if (elem == ValueType::ARRAY) {
        std::vector<Value> items;
        items.reserve(n);
        for (uint64_t k = 0; k < n; ++k) items.push_back(read_value(c, elem, key, label, depth + 1, budget));
        v = Value::nested_arr(std::move(items));
      } else if (elem == ValueType::STRING) {
        budget.charge(n * sizeof(uint64_t), label, key);
        const uint8_t* start = c.here();
        const uint64_t start_pos = c.pos();
        std::vector<uint64_t> offsets(n);
        for (uint64_t k = 0; k < n; ++k) {
          offsets[k] = c.pos() - start_pos;
          uint64_t len = c.read<uint64_t>("metadata string");
          if (len > c.remaining())
            fail("{}: metadata '{}' element {} has length {} at offset {}, past end of file", label, key, k, len,
                 c.pos() - 8);
          c.skip(len, "metadata string");
        }
        v = Value::view_arr(elem, n, start, c.pos() - start_pos, std::move(offsets));
      } else {
        const uint8_t* start = c.here();
        c.skip(min_total, "array elements");
        if (elem == ValueType::BOOL)
          for (uint64_t k = 0; k < n; ++k)
            if (start[k] > 1) fail("{}: metadata '{}' element {} has invalid bool byte {}", label, key, k, start[k]);
        v = Value::view_arr(elem, n, start, min_total, {});
      }
      break;
    }
    default: fail("{}: metadata '{}' has unknown value type {}", label, key, static_cast<uint32_t>(type));
  }
  return v;
}

}  // namespace

const TypeTraits* type_traits(DType t) {
  static const TypeTraits f32{"f32", 1, 4}, f16{"f16", 1, 2}, bf16{"bf16", 1, 2}, q4_0{"q4_0", 32, 18},
      q4_1{"q4_1", 32, 20}, q5_0{"q5_0", 32, 22}, q5_1{"q5_1", 32, 24}, q8_0{"q8_0", 32, 34},
      q8_1{"q8_1", 32, 36}, q2_k{"q2_K", 256, 84}, q3_k{"q3_K", 256, 110}, q4_k{"q4_K", 256, 144},
      q5_k{"q5_K", 256, 176}, q6_k{"q6_K", 256, 210}, q8_k{"q8_K", 256, 292};
  switch (t) {
    case DType::F32: return &f32;
    case DType::F16: return &f16;
    case DType::BF16: return &bf16;
    case DType::Q4_0: return &q4_0;
    case DType::Q4_1: return &q4_1;
    case DType::Q5_0: return &q5_0;
    case DType::Q5_1: return &q5_1;
    case DType::Q8_0: return &q8_0;
    case DType::Q8_1: return &q8_1;
    case DType::Q2_K: return &q2_k;
    case DType::Q3_K: return &q3_k;
    case DType::Q4_K: return &q4_k;
    case DType::Q5_K: return &q5_k;
    case DType::Q6_K: return &q6_k;
    case DType::Q8_K: return &q8_k;
  }
  return nullptr;
}

const char* type_name(DType t) {
  if (const TypeTraits* tt = type_traits(t)) return tt->name;
  static thread_local char buf[32];
  std::snprintf(buf, sizeof buf, "type#%u", static_cast<uint32_t>(t));
  return buf;
}

namespace {
// llama.cpp's llama_ftype (include/llama.h) and its names (llama_model_ftype_name). `uniform`: the file type
// of a file whose weights are all of `type` (the K-quant _S variants; _M and _L mix in bigger types).
struct FileType {
  uint32_t id;
  const char* name;
  DType type;
  bool uniform;
};
constexpr FileType kFileTypes[] = {
    {0, "all F32", DType::F32, true},          {1, "F16", DType::F16, true},
    {2, "Q4_0", DType::Q4_0, true},            {3, "Q4_1", DType::Q4_1, true},
    {7, "Q8_0", DType::Q8_0, true},            {8, "Q5_0", DType::Q5_0, true},
    {9, "Q5_1", DType::Q5_1, true},            {10, "Q2_K - Medium", DType::Q2_K, false},
    {11, "Q3_K - Small", DType::Q3_K, true},   {12, "Q3_K - Medium", DType::Q3_K, false},
    {13, "Q3_K - Large", DType::Q3_K, false},  {14, "Q4_K - Small", DType::Q4_K, true},
    {15, "Q4_K - Medium", DType::Q4_K, false}, {16, "Q5_K - Small", DType::Q5_K, true},
    {17, "Q5_K - Medium", DType::Q5_K, false}, {18, "Q6_K", DType::Q6_K, true},
    {32, "BF16", DType::BF16, true},
};
}  // namespace

const char* file_type_name(uint32_t ftype) {
  for (const FileType& t : kFileTypes)
    if (t.id == ftype) return t.name;
  return nullptr;
}

std::optional<uint32_t> file_type_of(DType type) {
  for (const FileType& t : kFileTypes)
    if (t.type == type && t.uniform) return t.id;
  return std::nullopt;
}

const char* value_type_name(ValueType t) {
  static const char* names[] = {"u8", "i8", "u16", "i16", "u32", "i32", "f32", "bool", "str", "arr", "u64", "i64", "f64"};
  auto i = static_cast<uint32_t>(t);
  return i < 13 ? names[i] : "?";
}

std::optional<uint64_t> tensor_bytes(DType t, const int64_t ne[4]) {
  const TypeTraits* tt = type_traits(t);
  if (!tt) return std::nullopt;
  for (int i = 0; i < 4; ++i)
    if (ne[i] < 0) return std::nullopt;
  if (ne[0] % tt->block_elems != 0) return std::nullopt;
  uint64_t bytes = static_cast<uint64_t>(ne[0] / tt->block_elems);
  if (!checked_mul(bytes, tt->block_bytes, &bytes)) return std::nullopt;
  for (int i = 1; i < 4; ++i)
    if (!checked_mul(bytes, static_cast<uint64_t>(ne[i]), &bytes)) return std::nullopt;
  return bytes;
}

// ---- Value ----

bool Value::is_int() const { return is_int_type(type); }

int64_t Value::as_int() const {
  switch (type) {
    case ValueType::UINT8: case ValueType::UINT16: case ValueType::UINT32: return static_cast<int64_t>(u);
    case ValueType::UINT64:
      if (u > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()))
        fail("integer value {} is too large (more than {})", u, std::numeric_limits<int64_t>::max());
      return static_cast<int64_t>(u);
    case ValueType::INT8: case ValueType::INT16: case ValueType::INT32: case ValueType::INT64: return i;
    case ValueType::BOOL: return b ? 1 : 0;
    default: fail("expected an integer, found {}", value_type_name(type));
  }
}

double Value::as_double() const {
  if (is_float()) return f;
  if (type == ValueType::UINT64) return static_cast<double>(u);
  return static_cast<double>(as_int());
}

namespace {
// One scalar element of an array, decoded from its GGUF bytes.
Value decode_scalar(ValueType t, const uint8_t* p) {
  auto get = [p](auto x) {
    std::memcpy(&x, p, sizeof x);
    return x;
  };
  Value v;
  v.type = t;
  switch (t) {
    case ValueType::UINT8: v.u = get(uint8_t{}); break;
    case ValueType::UINT16: v.u = get(uint16_t{}); break;
    case ValueType::UINT32: v.u = get(uint32_t{}); break;
    case ValueType::UINT64: v.u = get(uint64_t{}); break;
    case ValueType::INT8: v.i = get(int8_t{}); break;
    case ValueType::INT16: v.i = get(int16_t{}); break;
    case ValueType::INT32: v.i = get(int32_t{}); break;
    case ValueType::INT64: v.i = get(int64_t{}); break;
    case ValueType::FLOAT32: v.f = get(float{}); break;
    case ValueType::FLOAT64: v.f = get(double{}); break;
    case ValueType::BOOL: v.b = get(uint8_t{}) != 0; break;
    default: break;
  }
  return v;
}

// Appends a scalar or string value as GGUF encodes it.
void encode_scalar(std::vector<uint8_t>& out, const Value& v) {
  auto put = [&out](auto x) {
    const auto* p = reinterpret_cast<const uint8_t*>(&x);
    out.insert(out.end(), p, p + sizeof x);
  };
  switch (v.type) {
    case ValueType::UINT8: put(static_cast<uint8_t>(v.u)); break;
    case ValueType::UINT16: put(static_cast<uint16_t>(v.u)); break;
    case ValueType::UINT32: put(static_cast<uint32_t>(v.u)); break;
    case ValueType::UINT64: put(v.u); break;
    case ValueType::INT8: put(static_cast<int8_t>(v.i)); break;
    case ValueType::INT16: put(static_cast<int16_t>(v.i)); break;
    case ValueType::INT32: put(static_cast<int32_t>(v.i)); break;
    case ValueType::INT64: put(v.i); break;
    case ValueType::FLOAT32: put(static_cast<float>(v.f)); break;
    case ValueType::FLOAT64: put(v.f); break;
    case ValueType::BOOL: put(static_cast<uint8_t>(v.b ? 1 : 0)); break;
    case ValueType::STRING:
      put(static_cast<uint64_t>(v.s.size()));
      out.insert(out.end(), v.s.begin(), v.s.end());
      break;
    case ValueType::ARRAY: assert(false && "encode_scalar: arrays are encoded by the writer"); break;
  }
}
}  // namespace

// Where element k starts in raw_; `want` names the caller's kind of element ("strings" for str_at).
const uint8_t* Value::elem_ptr(uint64_t k, const char* want) const {
  if (type != ValueType::ARRAY) fail("expected an array, found {}", value_type_name(type));
  if (k >= n_) fail("array index {} out of range (array has {} elements)", k, n_);
  const bool strings = std::string_view(want) == "strings";
  if (elem_type == ValueType::ARRAY || strings != (elem_type == ValueType::STRING))
    fail("expected an array of {}, found an array of {}", want, value_type_name(elem_type));
  return strings ? raw_ + str_offsets_[k] : raw_ + k * scalar_size(elem_type);
}

std::string_view Value::str_at(uint64_t k) const {
  const uint8_t* p = elem_ptr(k, "strings");
  uint64_t len;
  std::memcpy(&len, p, sizeof len);
  return {reinterpret_cast<const char*>(p + sizeof len), len};
}
int64_t Value::int_at(uint64_t k) const { return decode_scalar(elem_type, elem_ptr(k, "integers")).as_int(); }
double Value::float_at(uint64_t k) const { return decode_scalar(elem_type, elem_ptr(k, "numbers")).as_double(); }
const Value& Value::array_at(uint64_t k) const {
  if (type != ValueType::ARRAY || elem_type != ValueType::ARRAY)
    fail("expected an array of arrays, found {}", type == ValueType::ARRAY ? value_type_name(elem_type) : value_type_name(type));
  if (k >= n_) fail("array index {} out of range (array has {} elements)", k, n_);
  return items_[k];
}
Value Value::at(uint64_t k) const {
  if (type == ValueType::ARRAY && elem_type == ValueType::ARRAY) return array_at(k);
  if (type == ValueType::ARRAY && elem_type == ValueType::STRING) return of_str(std::string(str_at(k)));
  return decode_scalar(elem_type, elem_ptr(k, "scalars"));
}

std::string Value::to_string(size_t max_items) const {
  switch (type) {
    case ValueType::STRING: {
      constexpr size_t kMax = 60;  // bytes shown, then "..."
      std::string_view sv = s;
      if (sv.size() > kMax) {
        size_t cut = kMax - 3;
        while (cut > 0 && (static_cast<unsigned char>(sv[cut]) & 0xC0) == 0x80) --cut;  // not inside a UTF-8 char
        return fmt::format("\"{}...\"", escape_control(sv.substr(0, cut)));
      }
      return fmt::format("\"{}\"", escape_control(sv));
    }
    case ValueType::BOOL: return b ? "true" : "false";
    case ValueType::FLOAT32: case ValueType::FLOAT64: return fmt::format("{:g}", f);
    case ValueType::UINT8: case ValueType::UINT16: case ValueType::UINT32: case ValueType::UINT64:
      return std::to_string(u);
    case ValueType::INT8: case ValueType::INT16: case ValueType::INT32: case ValueType::INT64:
      return std::to_string(i);
    case ValueType::ARRAY: {
      std::string out = fmt::format("[{} x {}]", n_, value_type_name(elem_type));
      if (n_ > 0 && max_items > 0) {
        out += " [";
        // Nested arrays show only their summary, so the line stays short at any depth.
        const size_t inner = elem_type == ValueType::ARRAY ? 0 : max_items;
        for (uint64_t k = 0; k < n_ && k < max_items; ++k) out += (k ? ", " : "") + at(k).to_string(inner);
        out += n_ > max_items ? ", ...]" : "]";
      }
      return out;
    }
  }
  return "?";
}

Value Value::of_u32(uint32_t v) { Value x; x.type = ValueType::UINT32; x.u = v; return x; }
Value Value::of_i32(int32_t v) { Value x; x.type = ValueType::INT32; x.i = v; return x; }
Value Value::of_u64(uint64_t v) { Value x; x.type = ValueType::UINT64; x.u = v; return x; }
Value Value::of_f32(float v) { Value x; x.type = ValueType::FLOAT32; x.f = v; return x; }
Value Value::of_bool(bool v) { Value x; x.type = ValueType::BOOL; x.b = v; return x; }
Value Value::of_str(std::string v) { Value x; x.type = ValueType::STRING; x.s = std::move(v); return x; }
Value Value::of_arr(ValueType elem, const std::vector<Value>& items) {
  if (elem == ValueType::ARRAY) return nested_arr(items);
  auto bytes = std::make_shared<std::vector<uint8_t>>();
  std::vector<uint64_t> offsets;
  for (const Value& e : items) {
    assert(e.type == elem);
    if (elem == ValueType::STRING) offsets.push_back(bytes->size());
    encode_scalar(*bytes, e);
  }
  Value x = view_arr(elem, items.size(), bytes->data(), bytes->size(), std::move(offsets));
  x.own_ = std::move(bytes);
  return x;
}
Value Value::of_str_arr(const std::vector<std::string>& v) {
  std::vector<Value> items; items.reserve(v.size());
  for (const auto& s : v) items.push_back(of_str(s));
  return of_arr(ValueType::STRING, items);
}
Value Value::of_f32_arr(const std::vector<float>& v) {
  std::vector<Value> items; items.reserve(v.size());
  for (float s : v) items.push_back(of_f32(s));
  return of_arr(ValueType::FLOAT32, items);
}
Value Value::of_i32_arr(const std::vector<int32_t>& v) {
  std::vector<Value> items; items.reserve(v.size());
  for (int32_t s : v) items.push_back(of_i32(s));
  return of_arr(ValueType::INT32, items);
}
Value Value::view_arr(ValueType elem, uint64_t n, const uint8_t* raw, uint64_t raw_size,
                      std::vector<uint64_t> str_offsets) {
  Value x;
  x.type = ValueType::ARRAY;
  x.elem_type = elem;
  x.n_ = n;
  x.raw_ = raw;
  x.raw_size_ = raw_size;
  x.str_offsets_ = std::move(str_offsets);
  return x;
}
Value Value::nested_arr(std::vector<Value> items) {
  Value x;
  x.type = ValueType::ARRAY;
  x.elem_type = ValueType::ARRAY;
  x.n_ = items.size();
  x.items_ = std::move(items);
  return x;
}

std::string Tensor::shape_string() const {
  std::string s = "[";
  for (int d = 0; d < n_dims; ++d) s += (d ? ", " : "") + std::to_string(ne[d]);
  return s + "]";
}

// ---- File ----

std::unique_ptr<File> File::open(const std::string& path) {
  check_regular_file(path, "GGUF file");  // before open: opening a FIFO would wait for a writer
  int fd = ::open(path.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC);
  if (fd < 0) fail("{}: cannot open: {}", path, std::strerror(errno));
  struct stat st {};
  if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    fail("{}: not a regular file", path);
  }
  std::unique_ptr<File> f(new File());
  f->path_ = path;
  f->size_ = static_cast<uint64_t>(st.st_size);
  if (f->size_ > 0) {
    void* m = mmap(nullptr, f->size_, PROT_READ, MAP_PRIVATE, fd, 0);
    if (m == MAP_FAILED) {
      ::close(fd);
      fail("{}: mmap failed: {}", path, std::strerror(errno));
    }
    f->map_ = m;
    f->base_ = static_cast<const uint8_t*>(m);
  }
  ::close(fd);
  f->parse_all();
  return f;
}

std::unique_ptr<File> File::parse(const uint8_t* data, size_t size, const std::string& label) {
  std::unique_ptr<File> f(new File());
  f->path_ = label;
  f->base_ = data;
  f->size_ = size;
  f->parse_all();
  return f;
}

File::~File() {
  if (map_) munmap(map_, size_);
}

void File::parse_all() {
  const std::string& label = path_;
  Cursor c(base_, size_, label);
  if (size_ < 4) fail("{}: not a GGUF file (only {} bytes)", label, size_);
  uint32_t magic = c.read<uint32_t>("magic");
  if (magic != kMagic) fail("{}: not a GGUF file (bad magic 0x{:08x})", label, magic);
  version_ = c.read<uint32_t>("version");
  if (version_ == 1) fail("{}: GGUF version 1 is not supported (only versions 2 and 3)", label);
  if (version_ != 2 && version_ != 3) fail("{}: unsupported GGUF version {} (only versions 2 and 3)", label, version_);
  uint64_t n_tensors = c.read<uint64_t>("tensor count");
  uint64_t n_kv = c.read<uint64_t>("metadata count");
  // Each kv pair needs >= 8 (key length) + 4 (type) + 1 bytes; each tensor info >= 8 + 4 + 4 + 8 bytes.
  uint64_t min_bytes;
  if (!checked_mul(n_kv, 13, &min_bytes) || min_bytes > c.remaining())
    fail("{}: header claims {} metadata entries, more than the file can hold ({} bytes)", label, n_kv, size_);
  if (!checked_mul(n_tensors, 24, &min_bytes) || min_bytes > c.remaining())
    fail("{}: header claims {} tensors, more than the file can hold ({} bytes)", label, n_tensors, size_);

  // No reserve(n_kv): the count is the file's claim, and each entry costs more memory than file bytes.
  Budget budget("metadata", "metadata");
  for (uint64_t k = 0; k < n_kv; ++k) {
    std::string key = c.read_string("metadata key");
    if (key.empty()) fail("{}: metadata entry {} has an empty key", label, k);
    // GGUF keys are ASCII of at most 65535 bytes; refusing control bytes keeps every message naming a key
    // one printable line.
    if (key.size() > 65535) fail("{}: metadata entry {} has a key of {} bytes (at most 65535)", label, k, key.size());
    if (has_control(key))
      fail("{}: metadata entry {} has a key with control characters: '{}'", label, k, escape_control(key));
    budget.charge(sizeof(kv_[0]) + 2 * key.size() + 64, label, key);  // the entry, the key twice, the index node
    uint32_t t = c.read<uint32_t>("metadata type");
    if (!valid_value_type(t)) fail("{}: metadata '{}' has unknown value type {}", label, key, t);
    Value v = read_value(c, static_cast<ValueType>(t), key, label, 0, budget);
    if (kv_index_.count(key)) fail("{}: duplicate metadata key '{}'", label, key);
    kv_index_.emplace(key, kv_.size());
    kv_.emplace_back(std::move(key), std::move(v));
  }

  if (const Value* a = find("general.alignment")) {
    if (!a->is_int()) fail("{}: general.alignment must be an integer, found {}", label, value_type_name(a->type));
    int64_t al = get_int("general.alignment");
    if (al <= 0 || (al & (al - 1)) != 0 || al > (1 << 20))
      fail("{}: general.alignment {} is not a power of two in [1, 1048576]", label, al);
    alignment_ = static_cast<uint64_t>(al);
  }

  Budget tensor_budget("tensor", "tensor list");
  for (uint64_t ti = 0; ti < n_tensors; ++ti) {
    Tensor t;
    t.name = c.read_string("tensor name");
    if (t.name.empty() || t.name.size() > 1024) fail("{}: tensor {} has an invalid name length {}", label, ti, t.name.size());
    if (has_control(t.name))
      fail("{}: tensor {} has a name with control characters: '{}'", label, ti, escape_control(t.name));
    tensor_budget.charge(sizeof(Tensor) + 2 * t.name.size() + 64, label, t.name);
    uint32_t nd = c.read<uint32_t>("tensor dimension count");
    if (nd == 0 || nd > kMaxDims) fail("{}: tensor '{}' has {} dimensions (1 to {} allowed)", label, t.name, nd, kMaxDims);
    t.n_dims = static_cast<int>(nd);
    for (uint32_t d = 0; d < nd; ++d) {
      uint64_t dim = c.read<uint64_t>("tensor dimension");
      if (dim == 0 || dim > (uint64_t{1} << 40))
        fail("{}: tensor '{}' dimension {} is {} (must be 1 .. 2^40)", label, t.name, d, dim);
      t.ne[d] = static_cast<int64_t>(dim);
    }
    uint32_t type = c.read<uint32_t>("tensor type");
    t.type = static_cast<DType>(type);
    const TypeTraits* tt = type_traits(t.type);
    if (!tt) fail("{}: tensor '{}' has unsupported type {}", label, t.name, type);
    if (t.ne[0] % tt->block_elems != 0)
      fail("{}: tensor '{}' row length {} is not a multiple of the {} block size {}", label, t.name, t.ne[0], tt->name,
           tt->block_elems);
    auto bytes = tensor_bytes(t.type, t.ne);
    if (!bytes) fail("{}: tensor '{}' of shape {} is too large", label, t.name, t.shape_string());
    t.n_bytes = *bytes;
    t.offset = c.read<uint64_t>("tensor offset");
    if (t.offset % alignment_ != 0)
      fail("{}: tensor '{}' offset {} is not a multiple of the alignment {}", label, t.name, t.offset, alignment_);
    if (tensor_index_.count(t.name)) fail("{}: duplicate tensor name '{}'", label, t.name);
    tensor_index_.emplace(t.name, tensors_.size());
    tensors_.push_back(std::move(t));
  }

  // Data section starts at the next multiple of the alignment.
  uint64_t pos = c.pos();
  uint64_t data = (pos + alignment_ - 1) / alignment_ * alignment_;
  if (n_tensors > 0 && data > size_)
    fail("{}: data section would start at byte {}, past end of file ({})", label, data, size_);
  data_offset_ = data;
  for (Tensor& t : tensors_) {
    uint64_t start, end;
    if (!checked_add(data_offset_, t.offset, &start) || !checked_add(start, t.n_bytes, &end) || end > size_)
      fail("{}: tensor '{}' data ends at byte {}, past end of file ({})", label, t.name,
           checked_add(data_offset_, t.offset, &start) && checked_add(start, t.n_bytes, &end) ? fmt::format("{}", end)
                                                                                             : std::string("(overflow)"),
           size_);
    t.data = base_ + start;
  }
}

const Value* File::find(std::string_view key) const {
  auto it = kv_index_.find(key);
  return it == kv_index_.end() ? nullptr : &kv_[it->second].second;
}

namespace {
[[noreturn]] void missing(const std::string& path, std::string_view key) {
  fail("{}: required metadata key '{}' is missing", path, key);
}
[[noreturn]] void wrong_type(const std::string& path, std::string_view key, const char* want, ValueType got) {
  fail("{}: metadata '{}' should be {}, found {}", path, key, want, value_type_name(got));
}
}  // namespace

std::string File::get_str(std::string_view key) const {
  const Value* v = find(key);
  if (!v) missing(path_, key);
  if (v->type != ValueType::STRING) wrong_type(path_, key, "a string", v->type);
  return v->s;
}
int64_t File::get_int(std::string_view key) const {
  const Value* v = find(key);
  if (!v) missing(path_, key);
  if (!v->is_int()) wrong_type(path_, key, "an integer", v->type);
  try {
    return v->as_int();
  } catch (const Error& e) {
    fail("{}: metadata '{}': {}", path_, key, e.what());
  }
}
double File::get_float(std::string_view key) const {
  const Value* v = find(key);
  if (!v) missing(path_, key);
  if (!v->is_float() && !v->is_int()) wrong_type(path_, key, "a number", v->type);
  return v->as_double();
}
bool File::get_bool(std::string_view key) const {
  const Value* v = find(key);
  if (!v) missing(path_, key);
  if (v->type != ValueType::BOOL) wrong_type(path_, key, "a bool", v->type);
  return v->b;
}
std::string File::get_str(std::string_view key, const std::string& def) const { return has(key) ? get_str(key) : def; }
int64_t File::get_int(std::string_view key, int64_t def) const { return has(key) ? get_int(key) : def; }
double File::get_float(std::string_view key, double def) const { return has(key) ? get_float(key) : def; }
bool File::get_bool(std::string_view key, bool def) const { return has(key) ? get_bool(key) : def; }

std::vector<std::string> File::get_str_arr(std::string_view key) const {
  const Value* v = find(key);
  if (!v) missing(path_, key);
  if (v->type != ValueType::ARRAY || v->elem_type != ValueType::STRING) wrong_type(path_, key, "an array of strings", v->type);
  std::vector<std::string> out;
  out.reserve(v->size());
  for (uint64_t k = 0; k < v->size(); ++k) out.emplace_back(v->str_at(k));
  return out;
}
std::vector<float> File::get_f32_arr(std::string_view key) const {
  const Value* v = find(key);
  if (!v) missing(path_, key);
  if (v->type != ValueType::ARRAY || !(v->elem_type == ValueType::FLOAT32 || v->elem_type == ValueType::FLOAT64))
    wrong_type(path_, key, "an array of floats", v->type);
  std::vector<float> out;
  out.reserve(v->size());
  for (uint64_t k = 0; k < v->size(); ++k) out.push_back(static_cast<float>(v->float_at(k)));
  return out;
}
std::vector<int32_t> File::get_i32_arr(std::string_view key) const {
  const Value* v = find(key);
  if (!v) missing(path_, key);
  if (v->type != ValueType::ARRAY || (v->size() > 0 && !is_int_type(v->elem_type)))
    wrong_type(path_, key, "an array of integers", v->type);
  std::vector<int32_t> out;
  out.reserve(v->size());
  for (uint64_t k = 0; k < v->size(); ++k) {
    int64_t x;
    try {
      x = v->int_at(k);
    } catch (const Error& e) {
      fail("{}: metadata '{}' element {}: {}", path_, key, k, e.what());
    }
    if (x < INT32_MIN || x > INT32_MAX) fail("{}: metadata '{}' has value {} out of int32 range", path_, key, x);
    out.push_back(static_cast<int32_t>(x));
  }
  return out;
}

const Tensor* File::find_tensor(std::string_view name) const {
  auto it = tensor_index_.find(name);
  return it == tensor_index_.end() ? nullptr : &tensors_[it->second];
}
const Tensor& File::tensor(std::string_view name) const {
  const Tensor* t = find_tensor(name);
  if (!t) fail("{}: tensor '{}' is missing", path_, name);
  return *t;
}

// ---- Writer ----

void Writer::add(const std::string& key, Value v) {
  for (auto& [k, old] : kv_)
    if (k == key) {
      old = std::move(v);
      return;
    }
  kv_.emplace_back(key, std::move(v));
}

void Writer::add_tensor(const std::string& name, DType type, std::vector<int64_t> ne, std::vector<uint8_t> data) {
  uint64_t n = data.size();
  tensors_.push_back({name, type, std::move(ne), std::move(data), nullptr, n});
}

void Writer::add_tensor(const std::string& name, DType type, std::vector<int64_t> ne, Generator gen) {
  int64_t dims[4] = {1, 1, 1, 1};
  for (size_t i = 0; i < ne.size() && i < 4; ++i) dims[i] = ne[i];
  auto bytes = tensor_bytes(type, dims);
  if (!bytes) fail("writer: tensor '{}' has an invalid shape for {}", name, type_name(type));
  tensors_.push_back({name, type, std::move(ne), {}, std::move(gen), *bytes});
}

namespace {
template <typename T>
void put(std::vector<uint8_t>& out, T v) {
  const auto* p = reinterpret_cast<const uint8_t*>(&v);
  out.insert(out.end(), p, p + sizeof(T));
}
void put_str(std::vector<uint8_t>& out, const std::string& s) {
  put<uint64_t>(out, s.size());
  out.insert(out.end(), s.begin(), s.end());
}
void put_value(std::vector<uint8_t>& out, const Value& v) {
  if (v.type != ValueType::ARRAY) return encode_scalar(out, v);
  put<uint32_t>(out, static_cast<uint32_t>(v.elem_type));
  put<uint64_t>(out, v.size());
  if (v.elem_type == ValueType::ARRAY) {
    for (uint64_t k = 0; k < v.size(); ++k) put_value(out, v.array_at(k));
  } else {
    const std::string_view bytes = v.encoded();
    out.insert(out.end(), bytes.begin(), bytes.end());
  }
}
}  // namespace

std::vector<uint8_t> Writer::header_bytes() const {
  std::vector<uint8_t> out;
  put<uint32_t>(out, kMagic);
  put<uint32_t>(out, 3);
  put<uint64_t>(out, tensors_.size());
  bool has_align = false;
  for (auto& [k, v] : kv_) has_align |= k == "general.alignment";
  const bool add_align = !has_align && alignment_ != 32;
  put<uint64_t>(out, kv_.size() + (add_align ? 1 : 0));
  for (auto& [k, v] : kv_) {
    put_str(out, k);
    put<uint32_t>(out, static_cast<uint32_t>(v.type));
    put_value(out, v);
  }
  if (add_align) {
    put_str(out, "general.alignment");
    put<uint32_t>(out, static_cast<uint32_t>(ValueType::UINT32));
    put<uint32_t>(out, static_cast<uint32_t>(alignment_));
  }
  uint64_t offset = 0;
  for (const T& t : tensors_) {
    put_str(out, t.name);
    put<uint32_t>(out, static_cast<uint32_t>(t.ne.size()));
    for (int64_t d : t.ne) put<uint64_t>(out, static_cast<uint64_t>(d));
    put<uint32_t>(out, static_cast<uint32_t>(t.type));
    put<uint64_t>(out, offset);
    offset += (t.n_bytes + alignment_ - 1) / alignment_ * alignment_;
  }
  out.resize((out.size() + alignment_ - 1) / alignment_ * alignment_, 0);
  return out;
}

std::vector<uint8_t> Writer::to_bytes() const {
  std::vector<uint8_t> out = header_bytes();
  for (const T& t : tensors_) {
    size_t at = out.size();
    out.resize(at + t.n_bytes);
    if (t.gen) t.gen(out.data() + at, t.n_bytes);
    else std::copy(t.data.begin(), t.data.end(), out.begin() + at);
    out.resize((out.size() + alignment_ - 1) / alignment_ * alignment_, 0);
  }
  return out;
}

void Writer::write(const std::string& path) const {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  if (!f) fail("{}: cannot open for writing: {}", path, std::strerror(errno));
  std::vector<uint8_t> buf = header_bytes();
  f.write(reinterpret_cast<const char*>(buf.data()), std::streamsize(buf.size()));
  for (const T& t : tensors_) {
    if (t.gen) {
      // Pieces of about 64 MiB, cut at block boundaries so the generator sees whole blocks.
      const uint64_t bb = uint64_t(type_traits(t.type)->block_bytes);
      const uint64_t kPiece = (uint64_t(64) << 20) / bb * bb;
      for (uint64_t done = 0; done < t.n_bytes; done += kPiece) {
        size_t n = size_t(std::min<uint64_t>(kPiece, t.n_bytes - done));
        buf.resize(n);
        t.gen(buf.data(), n);
        f.write(reinterpret_cast<const char*>(buf.data()), std::streamsize(n));
      }
    } else {
      f.write(reinterpret_cast<const char*>(t.data.data()), std::streamsize(t.data.size()));
    }
    uint64_t pad = (alignment_ - t.n_bytes % alignment_) % alignment_;
    static const char zeros[4096] = {};
    f.write(zeros, std::streamsize(pad));
  }
  if (!f) fail("{}: write failed: {}", path, std::strerror(errno));
}

}  // namespace headroom::gguf
