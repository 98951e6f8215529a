// GGUF (versions 2 and 3) reader and writer.
//
// The reader memory-maps the file and validates everything before use: every count, string length, array
// length, tensor dimension, offset and size is checked with overflow-safe arithmetic against the file size.
// A truncated, garbage or hostile file gives a headroom::Error whose message is one line naming the file and
// what is wrong. Tensor data is never copied: Tensor::data points into the mapping.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace headroom::gguf {

// ggml tensor types (the numbering is GGUF's).
enum class DType : uint32_t {
  F32 = 0, F16 = 1, Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8, Q8_1 = 9,
  Q2_K = 10, Q3_K = 11, Q4_K = 12, Q5_K = 13, Q6_K = 14, Q8_K = 15, BF16 = 30,
};

struct TypeTraits {
  const char* name;
  int64_t block_elems;   // elements per block (1 for plain floats)
  int64_t block_bytes;   // bytes per block
};
// nullptr for types headroom cannot size (the reader refuses tensors of those types).
const TypeTraits* type_traits(DType t);
const char* type_name(DType t);  // "f32", "q8_0", ... or "type#N"

// general.file_type holds llama.cpp's llama_ftype (what most of the weights are), not a DType.
const char* file_type_name(uint32_t ftype);  // as llama.cpp names it: "Q8_0", "Q4_K - Medium", ...; nullptr if unknown
// The llama_ftype of a file whose weights are all of type t; nullopt where llama.cpp has none for it.
std::optional<uint32_t> file_type_of(DType t);

enum class ValueType : uint32_t {
  UINT8 = 0, INT8 = 1, UINT16 = 2, INT16 = 3, UINT32 = 4, INT32 = 5, FLOAT32 = 6, BOOL = 7,
  STRING = 8, ARRAY = 9, UINT64 = 10, INT64 = 11, FLOAT64 = 12,
};
const char* value_type_name(ValueType t);

// A metadata value. Scalars live in one of u/i/f/b/s by kind. Arrays are compact: their elements stay in the
// bytes GGUF encodes them in (for a File, a view into its mapping, valid while the File lives; for a Value
// built with of_arr, bytes the Value shares among its copies), read with the *_at accessors. String arrays
// keep one offset per element; only arrays of arrays hold a Value per element.
struct Value {
  ValueType type = ValueType::UINT32;
  uint64_t u = 0;        // UINT8/16/32/64
  int64_t i = 0;         // INT8/16/32/64
  double f = 0;          // FLOAT32/64
  bool b = false;        // BOOL
  std::string s;         // STRING
  ValueType elem_type = ValueType::UINT8;  // ARRAY

  bool is_int() const;
  bool is_float() const { return type == ValueType::FLOAT32 || type == ValueType::FLOAT64; }
  // Numeric conversions; throw headroom::Error if the value is not numeric (or a u64 above INT64_MAX for
  // as_int). The message names neither file nor key: File's getters add both.
  int64_t as_int() const;
  double as_double() const;
  // For `inspect`: one line, control characters escaped, long strings cut, arrays as "[N x type] [first
  // max_items elements, ...]".
  std::string to_string(size_t max_items = 8) const;

  // Arrays: element count and elements (k < size(); the element type must fit the accessor, else Error).
  uint64_t size() const { return n_; }
  std::string_view str_at(uint64_t k) const;   // STRING elements
  int64_t int_at(uint64_t k) const;            // integer or bool elements (as_int's rules)
  double float_at(uint64_t k) const;           // any numeric elements
  const Value& array_at(uint64_t k) const;     // ARRAY elements
  Value at(uint64_t k) const;                  // any element, as a Value of its own
  // The elements of a scalar or string array exactly as GGUF encodes them (what the writer writes).
  std::string_view encoded() const { return {reinterpret_cast<const char*>(raw_), raw_size_}; }

  static Value of_u32(uint32_t v);
  static Value of_i32(int32_t v);
  static Value of_u64(uint64_t v);
  static Value of_f32(float v);
  static Value of_bool(bool v);
  static Value of_str(std::string v);
  static Value of_arr(ValueType elem, const std::vector<Value>& items);  // items all of type elem
  static Value of_str_arr(const std::vector<std::string>& v);
  static Value of_f32_arr(const std::vector<float>& v);
  static Value of_i32_arr(const std::vector<int32_t>& v);
  // An array over GGUF-encoded elements someone else keeps alive (the reader's view into a mapping).
  // str_offsets: for STRING elements, where each element's length prefix starts in `raw`.
  static Value view_arr(ValueType elem, uint64_t n, const uint8_t* raw, uint64_t raw_size,
                        std::vector<uint64_t> str_offsets);
  static Value nested_arr(std::vector<Value> items);  // an array of arrays

 private:
  const uint8_t* elem_ptr(uint64_t k, const char* want) const;
  uint64_t n_ = 0;
  const uint8_t* raw_ = nullptr;
  uint64_t raw_size_ = 0;
  std::vector<uint64_t> str_offsets_;
  std::vector<Value> items_;                         // ARRAY elements
  std::shared_ptr<const std::vector<uint8_t>> own_;  // raw_'s storage when built in memory
};

struct Tensor {
  std::string name;
  DType type = DType::F32;
  int n_dims = 0;
  int64_t ne[4] = {1, 1, 1, 1};  // ne[0] is the contiguous (row) dimension, as in ggml
  uint64_t offset = 0;           // relative to the data section
  uint64_t n_bytes = 0;
  const uint8_t* data = nullptr; // into the mapping
  int64_t n_elements() const { return ne[0] * ne[1] * ne[2] * ne[3]; }
  std::string shape_string() const;  // "[256, 768]"
};

class File {
 public:
  // Opens and validates; throws headroom::Error with one line on any problem.
  static std::unique_ptr<File> open(const std::string& path);
  // Parses an in-memory image (used by the fuzz target and tests). The buffer must outlive the File.
  static std::unique_ptr<File> parse(const uint8_t* data, size_t size, const std::string& label);
  ~File();
  File(const File&) = delete;
  File& operator=(const File&) = delete;

  const std::string& path() const { return path_; }
  uint32_t version() const { return version_; }
  uint64_t file_size() const { return size_; }
  uint64_t alignment() const { return alignment_; }
  uint64_t data_offset() const { return data_offset_; }

  // Metadata in file order, and by key.
  const std::vector<std::pair<std::string, Value>>& metadata() const { return kv_; }
  const Value* find(std::string_view key) const;
  bool has(std::string_view key) const { return find(key) != nullptr; }
  // Typed getters: throw a one-line Error if the key is missing or of the wrong type.
  std::string get_str(std::string_view key) const;
  int64_t get_int(std::string_view key) const;
  double get_float(std::string_view key) const;
  bool get_bool(std::string_view key) const;
  // With defaults when missing (still throw when present but of the wrong type).
  std::string get_str(std::string_view key, const std::string& def) const;
  int64_t get_int(std::string_view key, int64_t def) const;
  double get_float(std::string_view key, double def) const;
  bool get_bool(std::string_view key, bool def) const;
  // Arrays of strings / numbers (throw if missing, not an array, or of another element type).
  std::vector<std::string> get_str_arr(std::string_view key) const;
  std::vector<float> get_f32_arr(std::string_view key) const;
  std::vector<int32_t> get_i32_arr(std::string_view key) const;

  const std::vector<Tensor>& tensors() const { return tensors_; }
  const Tensor* find_tensor(std::string_view name) const;
  const Tensor& tensor(std::string_view name) const;  // throws if missing

 private:
  File() = default;
  void parse_all();
  std::string path_;
  const uint8_t* base_ = nullptr;
  uint64_t size_ = 0;
  void* map_ = nullptr;  // non-null when we own an mmap
  uint32_t version_ = 0;
  uint64_t alignment_ = 32;
  uint64_t data_offset_ = 0;
  std::vector<std::pair<std::string, Value>> kv_;
  std::map<std::string, size_t, std::less<>> kv_index_;
  std::vector<Tensor> tensors_;
  std::map<std::string, size_t, std::less<>> tensor_index_;
};

// Writes GGUF v3 files. Tensor data is copied into the writer; dims are ggml-ordered (ne[0] first).
class Writer {
 public:
  void set_alignment(uint64_t a) { alignment_ = a; }
  void add(const std::string& key, Value v);
  void add_tensor(const std::string& name, DType type, std::vector<int64_t> ne, std::vector<uint8_t> data);
  // A tensor whose bytes are produced while writing (for models too large to hold twice in memory):
  // gen(dst, n_bytes) fills the tensor's data, possibly in several calls of consecutive pieces.
  using Generator = std::function<void(uint8_t* dst, size_t n_bytes)>;
  void add_tensor(const std::string& name, DType type, std::vector<int64_t> ne, Generator gen);
  std::vector<uint8_t> to_bytes() const;
  void write(const std::string& path) const;  // throws Error on I/O failure

 private:
  std::vector<uint8_t> header_bytes() const;
  uint64_t alignment_ = 32;
  std::vector<std::pair<std::string, Value>> kv_;
  struct T {
    std::string name; DType type; std::vector<int64_t> ne; std::vector<uint8_t> data; Generator gen; uint64_t n_bytes = 0;
  };
  std::vector<T> tensors_;
};

// Bytes a tensor of `n_elements` (row length ne0) takes in type t; nullopt if not representable.
std::optional<uint64_t> tensor_bytes(DType t, const int64_t ne[4]);

}  // namespace headroom::gguf
