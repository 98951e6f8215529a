// GGUF reader/writer: round trips, every real file, and hostile input (truncation, corruption, lies in counts
// and offsets) giving a one-line Error and never a crash. Also writes the fuzz seed corpus.
#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>

#include "gguf/gguf.h"
#include "test_util.h"
#include "util/error.h"

using namespace headroom;
using namespace headroom::gguf;

namespace {

std::vector<uint8_t> small_valid_file(uint64_t alignment = 32) {
  Writer w;
  w.set_alignment(alignment);
  w.add("general.architecture", Value::of_str("llama"));
  w.add("u32", Value::of_u32(7));
  w.add("i32", Value::of_i32(-5));
  w.add("f32", Value::of_f32(1.5f));
  w.add("flag", Value::of_bool(true));
  w.add("u64", Value::of_u64(1ull << 40));
  w.add("strs", Value::of_str_arr({"a", "bc", ""}));
  w.add("nested", Value::of_arr(ValueType::ARRAY, {Value::of_i32_arr({1, 2}), Value::of_i32_arr({3})}));
  std::vector<uint8_t> f32(4 * 8 * 2);
  for (size_t i = 0; i < f32.size(); ++i) f32[i] = uint8_t(i);
  w.add_tensor("a.weight", DType::F32, {8, 2}, f32);
  w.add_tensor("b.weight", DType::Q8_0, {32, 3}, std::vector<uint8_t>(34 * 3, 1));
  w.add_tensor("c.weight", DType::F16, {5}, std::vector<uint8_t>(10, 2));
  return w.to_bytes();
}

std::string expect_error(const std::vector<uint8_t>& bytes) {
  try {
    File::parse(bytes.data(), bytes.size(), "t.gguf");
  } catch (const Error& e) {
    std::string m = e.what();
    EXPECT_EQ(m.find('\n'), std::string::npos) << m;
    EXPECT_EQ(m.rfind("t.gguf: ", 0), 0u) << m;
    return m;
  }
  ADD_FAILURE() << "expected an error";
  return "";
}

// Offset of the first tensor info (right after the metadata) in small_valid_file(): found by re-serialising.
size_t find(const std::vector<uint8_t>& b, const std::string& needle) {
  auto it = std::search(b.begin(), b.end(), needle.begin(), needle.end());
  return size_t(it - b.begin());
}

template <typename T>
void poke(std::vector<uint8_t>& b, size_t at, T v) {
  std::memcpy(b.data() + at, &v, sizeof v);
}

}  // namespace

TEST(Gguf, RoundTripEveryValueType) {
  auto bytes = small_valid_file();
  auto f = File::parse(bytes.data(), bytes.size(), "t.gguf");
  EXPECT_EQ(f->version(), 3u);
  EXPECT_EQ(f->get_str("general.architecture"), "llama");
  EXPECT_EQ(f->get_int("u32"), 7);
  EXPECT_EQ(f->get_int("i32"), -5);
  EXPECT_FLOAT_EQ(float(f->get_float("f32")), 1.5f);
  EXPECT_TRUE(f->get_bool("flag"));
  EXPECT_EQ(f->get_int("u64"), int64_t(1) << 40);
  EXPECT_EQ(f->get_str_arr("strs"), (std::vector<std::string>{"a", "bc", ""}));
  const Value* n = f->find("nested");
  ASSERT_TRUE(n);
  ASSERT_EQ(n->size(), 2u);
  EXPECT_EQ(n->array_at(0).int_at(1), 2);
  EXPECT_EQ(n->array_at(1).size(), 1u);
  ASSERT_EQ(f->tensors().size(), 3u);
  const Tensor& a = f->tensor("a.weight");
  EXPECT_EQ(a.ne[0], 8);
  EXPECT_EQ(a.ne[1], 2);
  EXPECT_EQ(a.n_bytes, 64u);
  EXPECT_EQ(a.data[5], 5);
  EXPECT_EQ(f->tensor("b.weight").n_bytes, 102u);
  EXPECT_EQ((f->tensor("b.weight").data - bytes.data()) % 32, 0);
  EXPECT_EQ(f->get_int("missing", 42), 42);
  EXPECT_THROW(f->get_int("general.architecture"), Error);
  EXPECT_THROW(f->get_str("nope"), Error);
  EXPECT_THROW(f->tensor("nope"), Error);
}

TEST(Gguf, CustomAlignment) {
  auto bytes = small_valid_file(64);
  auto f = File::parse(bytes.data(), bytes.size(), "t.gguf");
  EXPECT_EQ(f->alignment(), 64u);
  for (const Tensor& t : f->tensors()) EXPECT_EQ((t.data - bytes.data()) % 64, 0) << t.name;
}

TEST(Gguf, OpensEveryBundledModel) {
  int n = 0;
  for (auto dir : {"models", "models/arch", "testdata/vocab"})
    for (auto& e : std::filesystem::directory_iterator(test::shared(dir))) {
      if (e.path().extension() != ".gguf") continue;
      auto f = File::open(e.path().string());
      EXPECT_TRUE(f->has("general.architecture")) << e.path();
      ++n;
    }
  EXPECT_GE(n, 15);
  auto f = File::open(test::shared("models/retrieval-14m-q8_0.gguf"));
  EXPECT_EQ(f->get_int("llama.block_count"), 8);
  EXPECT_EQ(f->tensor("token_embd.weight").type, DType::Q8_0);
}

TEST(Gguf, MissingFileAndNotGguf) {
  try {
    File::open("/nonexistent/model.gguf");
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("cannot open"), std::string::npos);
  }
  std::vector<uint8_t> junk = {'h', 'e', 'l', 'l', 'o', ' ', 'w', 'o', 'r', 'l', 'd'};
  EXPECT_NE(expect_error(junk).find("not a GGUF file"), std::string::npos);
  EXPECT_NE(expect_error({}).find("not a GGUF file"), std::string::npos);
}

TEST(Gguf, UnsupportedVersions) {
  auto b = small_valid_file();
  poke<uint32_t>(b, 4, 1);
  EXPECT_NE(expect_error(b).find("version 1 is not supported"), std::string::npos);
  poke<uint32_t>(b, 4, 4);
  EXPECT_NE(expect_error(b).find("unsupported GGUF version 4"), std::string::npos);
  poke<uint32_t>(b, 4, 2);  // v2 has the same layout as v3
  EXPECT_NO_THROW(File::parse(b.data(), b.size(), "t.gguf"));
}

TEST(Gguf, EveryTruncationIsAnError) {
  auto b = small_valid_file();
  // The file's last tensor ends before the final padding; cutting inside the padding is still valid.
  auto full = File::parse(b.data(), b.size(), "t.gguf");
  uint64_t needed = 0;
  for (const Tensor& t : full->tensors()) needed = std::max<uint64_t>(needed, full->data_offset() + t.offset + t.n_bytes);
  for (size_t len = 0; len < needed; ++len) {
    std::vector<uint8_t> cut(b.begin(), b.begin() + len);
    EXPECT_THROW(File::parse(cut.data(), cut.size(), "t.gguf"), Error) << "length " << len;
  }
}

TEST(Gguf, HostileCountsAndOffsets) {
  const auto good = small_valid_file();
  {  // huge metadata count
    auto b = good;
    poke<uint64_t>(b, 16, ~0ull);
    EXPECT_NE(expect_error(b).find("metadata entries"), std::string::npos);
  }
  {  // huge tensor count
    auto b = good;
    poke<uint64_t>(b, 8, 1ull << 60);
    EXPECT_NE(expect_error(b).find("tensors"), std::string::npos);
  }
  {  // a string length pointing past the end of the file
    auto b = good;
    size_t at = find(b, "general.architecture") - 8;
    poke<uint64_t>(b, at, 1ull << 62);
    EXPECT_NE(expect_error(b).find("past end of file"), std::string::npos);
  }
  {  // an array claiming 2^61 elements
    auto b = good;
    size_t at = find(b, "strs") + 4 + 4;  // key, type, element type
    poke<uint64_t>(b, at, 1ull << 61);
    EXPECT_NE(expect_error(b).find("array elements"), std::string::npos);
  }
  {  // tensor data offset past end of file: the message names the tensor and both numbers
    auto b = good;
    size_t at = find(b, "c.weight") + 8 + 4 + 8 + 4;  // name, n_dims, 1 dim, type
    poke<uint64_t>(b, at, 1ull << 20);
    std::string m = expect_error(b);
    EXPECT_NE(m.find("tensor 'c.weight' data ends at byte"), std::string::npos) << m;
    EXPECT_NE(m.find(fmt::format("past end of file ({})", b.size())), std::string::npos) << m;
  }
  {  // offset overflowing uint64
    auto b = good;
    size_t at = find(b, "c.weight") + 8 + 4 + 8 + 4;
    poke<uint64_t>(b, at, ~0ull - 31);
    EXPECT_NE(expect_error(b).find("past end of file"), std::string::npos);
  }
  {  // misaligned offset
    auto b = good;
    size_t at = find(b, "c.weight") + 8 + 4 + 8 + 4;
    poke<uint64_t>(b, at, 3);
    EXPECT_NE(expect_error(b).find("alignment"), std::string::npos);
  }
  {  // too many dimensions
    auto b = good;
    poke<uint32_t>(b, find(b, "a.weight") + 8, 5);
    EXPECT_NE(expect_error(b).find("dimensions"), std::string::npos);
  }
  {  // dims whose product overflows
    auto b = good;
    size_t at = find(b, "a.weight") + 8 + 4;
    poke<uint64_t>(b, at, 1ull << 39);
    poke<uint64_t>(b, at + 8, 1ull << 39);
    EXPECT_THROW(File::parse(b.data(), b.size(), "t.gguf"), Error);
  }
  {  // unknown tensor type
    auto b = good;
    poke<uint32_t>(b, find(b, "c.weight") + 8 + 4 + 8, 999);
    EXPECT_NE(expect_error(b).find("unsupported type 999"), std::string::npos);
  }
  {  // Q8_0 row not a multiple of 32
    auto b = good;
    poke<uint64_t>(b, find(b, "b.weight") + 8 + 4, 33);
    EXPECT_NE(expect_error(b).find("block size"), std::string::npos);
  }
  {  // unknown metadata value type
    auto b = good;
    poke<uint32_t>(b, find(b, "u32") + 3, 77);
    EXPECT_NE(expect_error(b).find("unknown value type"), std::string::npos);
  }
  {  // bad alignment value
    Writer w;
    w.add("general.alignment", Value::of_u32(24));
    auto b = w.to_bytes();
    EXPECT_NE(expect_error(b).find("power of two"), std::string::npos);
  }
  {  // duplicate key
    auto b = good;
    size_t at = find(b, "i32");
    b[at] = 'u';
    b[at + 1] = '3';
    b[at + 2] = '2';
    EXPECT_NE(expect_error(b).find("duplicate metadata key"), std::string::npos);
  }
}

TEST(Gguf, RandomCorruptionNeverCrashes) {
  const auto good = small_valid_file();
  std::mt19937 rng(1234);
  int errors = 0;
  for (int it = 0; it < 3000; ++it) {
    auto b = good;
    int flips = 1 + int(rng() % 4);
    for (int k = 0; k < flips; ++k) b[rng() % b.size()] = uint8_t(rng());
    try {
      auto f = File::parse(b.data(), b.size(), "t.gguf");
      for (const Tensor& t : f->tensors()) ASSERT_LE(t.data + t.n_bytes, b.data() + b.size());
    } catch (const Error&) {
      ++errors;
    }
  }
  EXPECT_GT(errors, 100);
}

// Writes the seed corpus for fuzz/fuzz_gguf.cpp: valid files and broken variants of them.
TEST(Gguf, WritesFuzzCorpus) {
  std::string dir = test::scratch_dir("gguf-corpus");
  auto save = [&](const std::string& name, const std::vector<uint8_t>& b) {
    std::ofstream(dir + "/" + name, std::ios::binary).write(reinterpret_cast<const char*>(b.data()), std::streamsize(b.size()));
  };
  auto good = small_valid_file();
  save("valid.gguf", good);
  save("valid-align64.gguf", small_valid_file(64));
  save("truncated.gguf", std::vector<uint8_t>(good.begin(), good.begin() + good.size() / 2));
  auto b = good;
  poke<uint64_t>(b, find(b, "c.weight") + 8 + 4 + 8 + 4, 1ull << 20);
  save("bad-offset.gguf", b);
  b = good;
  poke<uint32_t>(b, 4, 1);
  save("v1.gguf", b);
  EXPECT_TRUE(std::filesystem::exists(dir + "/valid.gguf"));
}

TEST(Gguf, CompactArraysReadBackAndOutliveTheirBuilders) {
  Writer w;
  w.add("s", Value::of_str_arr({"x", "", "yz"}));
  w.add("b", Value::of_arr(ValueType::BOOL, {Value::of_bool(true), Value::of_bool(false)}));
  w.add("u64", Value::of_u64(~0ull));
  auto bytes = w.to_bytes();
  auto f = File::parse(bytes.data(), bytes.size(), "t.gguf");
  const Value copy = *f->find("s");  // a copy views the same bytes
  EXPECT_EQ(copy.size(), 3u);
  EXPECT_EQ(copy.str_at(2), "yz");
  EXPECT_EQ(copy.str_at(1), "");
  EXPECT_THROW(copy.str_at(3), Error);
  EXPECT_THROW(copy.int_at(0), Error);
  EXPECT_EQ(f->find("b")->int_at(0), 1);
  EXPECT_EQ(f->find("b")->to_string(), "[2 x bool] [true, false]");
  // A u64 above INT64_MAX prints as itself, converts to double, and as an integer is an error naming file and key.
  EXPECT_EQ(f->find("u64")->to_string(), "18446744073709551615");
  EXPECT_DOUBLE_EQ(f->get_float("u64"), 18446744073709551615.0);
  try {
    f->get_int("u64");
    ADD_FAILURE();
  } catch (const Error& e) {
    EXPECT_STREQ(e.what(), "t.gguf: metadata 'u64': integer value 18446744073709551615 is too large (more than 9223372036854775807)");
  }
  // Built in memory, the array keeps its bytes through copies after the builder is gone.
  Value v = [] { return Value::of_str_arr({std::string(100, 'a'), "b"}); }();
  Value w2 = v;
  v = Value::of_u32(1);
  EXPECT_EQ(w2.str_at(0), std::string(100, 'a'));
  EXPECT_EQ(Value::of_i32_arr({-3, 4}).int_at(0), -3);
}

TEST(Gguf, MetadataStringsPrintEscaped) {
  EXPECT_EQ(Value::of_str("a\nb\x1b[31m\\").to_string(), "\"a\\nb\\x1b[31m\\\\\"");
  EXPECT_EQ(Value::of_str(std::string(100, 'x')).to_string(), "\"" + std::string(57, 'x') + "...\"");
  // Keys with control characters are refused (every message naming a key stays one printable line).
  Writer w;
  w.add("bad\nkey", Value::of_u32(1));
  auto b = w.to_bytes();
  EXPECT_NE(expect_error(b).find("key with control characters: 'bad\\nkey'"), std::string::npos);
}

TEST(Gguf, FileTypesAreLlamaCppNumbers) {
  // llama.cpp's llama_ftype, not the tensor type ids (Q8_0 tensors are type 8, a Q8_0 file is ftype 7).
  EXPECT_EQ(file_type_of(DType::F32), 0u);
  EXPECT_EQ(file_type_of(DType::F16), 1u);
  EXPECT_EQ(file_type_of(DType::Q4_0), 2u);
  EXPECT_EQ(file_type_of(DType::Q8_0), 7u);
  EXPECT_EQ(file_type_of(DType::Q6_K), 18u);
  EXPECT_EQ(file_type_of(DType::BF16), 32u);
  EXPECT_STREQ(file_type_name(7), "Q8_0");
  EXPECT_STREQ(file_type_name(15), "Q4_K - Medium");
  EXPECT_EQ(file_type_name(5), nullptr);  // removed from llama.cpp
}
