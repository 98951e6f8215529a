// Hostile files and paths, through the headroom binary (tests/hostile.h): crafted GGUFs (a chat template that
// overflowed std::regex's stack, u64 metadata above INT64_MAX, array counts that overflow, large arrays that
// used to cost 100x their size in memory), FIFOs and directories where a file is expected, a prompt file over
// its cap. Every row must end as an exit code with one error line (or, for the valid files, exit 0) within
// its time and memory limits: never a signal, a hang or a blow-up.
#include <gtest/gtest.h>

#include <sys/stat.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>

#include "gguf/gguf.h"
#include "hostile.h"
#include "test_util.h"
#include "util/error.h"

using namespace headroom;
using headroom::test::HostileRow;

namespace {

std::string dir() { return test::scratch_dir("hostile-files"); }
std::string model() { return test::shared("models/stories260K.gguf"); }

// A copy of the small bundled model with some metadata replaced or added.
std::string model_variant(const std::string& name, const std::map<std::string, gguf::Value>& overrides) {
  const std::string path = dir() + "/" + name;
  auto src = gguf::File::open(model());
  gguf::Writer w;
  for (const auto& [k, v] : src->metadata()) w.add(k, overrides.count(k) ? overrides.at(k) : v);
  for (const auto& [k, v] : overrides) w.add(k, v);  // keys the model lacks (the rest are replaced in place)
  for (const gguf::Tensor& t : src->tensors())
    w.add_tensor(t.name, t.type, std::vector<int64_t>(t.ne, t.ne + t.n_dims),
                 std::vector<uint8_t>(t.data, t.data + t.n_bytes));
  w.write(path);
  return path;
}

// Raw GGUF bytes, for what the writer cannot produce (lying counts) or would hold in memory (huge arrays).
struct Raw {
  std::string bytes;
  template <typename T>
  Raw& put(T v) {
    bytes.append(reinterpret_cast<const char*>(&v), sizeof v);
    return *this;
  }
  Raw& str(const std::string& s) {
    put<uint64_t>(s.size());
    bytes += s;
    return *this;
  }
  // GGUF v3 header with no tensors and n_kv metadata entries.
  static Raw header(uint64_t n_kv) {
    Raw r;
    r.put<uint32_t>(0x46554747).put<uint32_t>(3).put<uint64_t>(0).put<uint64_t>(n_kv);
    return r;
  }
  std::string save(const std::string& name) const {
    const std::string path = dir() + "/" + name;
    std::ofstream(path, std::ios::binary).write(bytes.data(), std::streamsize(bytes.size()));
    return path;
  }
};

constexpr uint32_t kArray = 9, kU8 = 0, kI32 = 5, kStr = 8, kU64 = 10;

// One metadata key holding an array of n elements of `elem`, each element `elem_bytes` (written in pieces).
std::string big_array_file(const std::string& name, uint32_t elem, uint64_t n, const std::string& elem_bytes) {
  Raw r = Raw::header(1);
  r.str("big.array").put<uint32_t>(kArray).put<uint32_t>(elem).put<uint64_t>(n);
  const std::string path = dir() + "/" + name;
  std::ofstream f(path, std::ios::binary);
  f.write(r.bytes.data(), std::streamsize(r.bytes.size()));
  std::string piece;
  for (int k = 0; k < 4096; ++k) piece += elem_bytes;
  for (uint64_t done = 0; done < n; done += 4096)
    f.write(piece.data(), std::streamsize(std::min<uint64_t>(4096, n - done) * elem_bytes.size()));
  return path;
}

std::string fifo(const std::string& name) {
  const std::string path = dir() + "/" + name;
  ::unlink(path.c_str());
  EXPECT_EQ(::mkfifo(path.c_str(), 0600), 0) << std::strerror(errno);
  return path;
}

// The Llama-3.1 header marker and a date_string of n characters, the form that overflowed std::regex.
std::string long_date_template(size_t n) {
  return "<|start_header_id|>{{- 'Cutting Knowledge Date: December 2023' }}{%- set date_string = \"" +
         std::string(n, 'x') + "\" %}";
}

}  // namespace

TEST(Hostile, FilesAndPaths) {
  const std::string m = model();
  const std::string tmpl40k = model_variant("template-40k.gguf", {{"tokenizer.chat_template", gguf::Value::of_str(long_date_template(40000))}});
  const std::string huge_ctx = model_variant("huge-u64.gguf", {{"llama.context_length", gguf::Value::of_u64((1ull << 63) + 5)}});
  const std::string huge_align =
      model_variant("huge-align.gguf", {{"general.alignment", gguf::Value::of_u64(~0ull)}});
  const std::string f1 = fifo("model.fifo"), f2 = fifo("headmap.fifo"), f3 = fifo("prompt.fifo");
  const std::string d = dir() + "/a-directory";
  std::filesystem::create_directories(d);
  const std::string big_prompt = dir() + "/big-prompt.txt";
  std::ofstream(big_prompt).put('x');
  std::filesystem::resize_file(big_prompt, (uint64_t(64) << 20) + 1);  // sparse: no disk, no time

  // Array counts whose byte size overflows 64 bits (u64 elements: 2^61 * 8; strings: 2^62 * 8; nested: * 12).
  auto overflow_file = [](const std::string& name, uint32_t elem, uint64_t n) {
    Raw r = Raw::header(1);
    r.str("lying.count").put<uint32_t>(kArray).put<uint32_t>(elem).put<uint64_t>(n).put<uint64_t>(0);
    return r.save(name);
  };
  const std::string ov_u64 = overflow_file("overflow-u64.gguf", kU64, 1ull << 61);
  const std::string ov_str = overflow_file("overflow-str.gguf", kStr, 1ull << 62);
  const std::string ov_arr = overflow_file("overflow-arr.gguf", kArray, (1ull << 62) + (1ull << 61));

  const std::vector<HostileRow> rows = {
      // 1. the chat template: runs to its end (the context is too small for the 40k-character date).
      {"run --chat, 40k-char date_string", {"run", "-m", tmpl40k, "--chat", "-p", "hi", "-n", "1", "-c", "256"}, 1,
       "prompt is [0-9]+ tokens, longer than the context of 256 tokens"},
      // 2. FIFOs and directories where a file belongs.
      {"FIFO as model (inspect)", {"inspect", f1}, 1, "model\\.fifo: the GGUF file is a FIFO, not a regular file"},
      {"FIFO as model (run)", {"run", "-m", f1, "-p", "hi"}, 1, "model\\.fifo: the GGUF file is a FIFO"},
      {"FIFO as head map", {"run", "-m", m, "-p", "hi", "-n", "1", "--head-map", f2}, 1,
       "headmap\\.fifo: the head map is a FIFO, not a regular file"},
      {"FIFO as prompt file", {"run", "-m", m, "-f", f3, "-n", "1"}, 1,
       "prompt\\.fifo: the prompt file is a FIFO, not a regular file"},
      {"directory as model (inspect)", {"inspect", d}, 1, "a-directory: the GGUF file is a directory"},
      {"directory as model (run)", {"run", "-m", d, "-p", "hi"}, 1, "a-directory: the GGUF file is a directory"},
      {"directory as prompt file", {"run", "-m", m, "-f", d}, 1, "a-directory: the prompt file is a directory"},
      {"directory as head map", {"run", "-m", m, "-p", "hi", "--head-map", d}, 1,
       "a-directory: the head map is a directory"},
      {"missing prompt file", {"run", "-m", m, "-f", dir() + "/nope.txt"}, 1,
       "nope\\.txt: cannot open prompt file: No such file"},
      {"prompt file over 64 MiB", {"run", "-m", m, "-f", big_prompt}, 1,
       "big-prompt\\.txt: the prompt file is 67108865 bytes, more than the 64 MiB limit", 200},
      // 4. u64 above INT64_MAX: the message names file and key (inspect prints the value, then loads the config).
      {"u64 context length (inspect)", {"inspect", huge_ctx}, 1,
       "huge-u64\\.gguf: metadata 'llama\\.context_length': integer value 9223372036854775813 is too large"},
      {"u64 context length (run)", {"run", "-m", huge_ctx, "-p", "hi"}, 1,
       "huge-u64\\.gguf: metadata 'llama\\.context_length': integer value 9223372036854775813 is too large"},
      {"u64 alignment (inspect)", {"inspect", huge_align}, 1,
       "huge-align\\.gguf: metadata 'general\\.alignment': integer value 18446744073709551615 is too large"},
      // 3. array counts that would overflow.
      {"u64 array count * 8 overflows", {"inspect", ov_u64}, 1,
       "overflow-u64\\.gguf: metadata 'lying\\.count' claims 2305843009213693952 array elements"},
      {"string array count * 8 overflows", {"inspect", ov_str}, 1,
       "overflow-str\\.gguf: metadata 'lying\\.count' claims 4611686018427387904 array elements"},
      {"nested array count * 12 overflows", {"run", "-m", ov_arr, "-p", "hi"}, 1,
       "overflow-arr\\.gguf: metadata 'lying\\.count' claims 6917529027641081856 array elements"},
  };
  for (const HostileRow& row : rows) test::check_hostile_row(row);

  // The 40k-character template is recognised by inspect, which exits 0.
  test::check_success_row({"inspect, 40k-char date_string", {"inspect", tmpl40k}, 0, "chat template: llama3", 200});
}

// 3. Memory: inspecting a file of N bytes costs O(N) with a small constant (peak RSS of the child).
TEST(Hostile, LargeMetadataArrays) {
  const std::string u8_64m = big_array_file("u8-64m.gguf", kU8, uint64_t(64) << 20, std::string(1, '\x07'));
  const std::string i32_64m = big_array_file("i32-64m.gguf", kI32, uint64_t(16) << 20, std::string("\x01\x00\x00\x00", 4));
  const std::string u8_4m = big_array_file("u8-4m.gguf", kU8, uint64_t(4) << 20, std::string(1, '\x07'));
  // 2M strings of 8 bytes (32 MiB): a vocabulary-like array, well inside the metadata cap.
  const std::string str_2m = big_array_file("str-2m.gguf", kStr, uint64_t(2) << 20, Raw().str("abcdefgh").bytes);
  // 8M empty strings (64 MiB): their offsets alone pass the 64 MiB metadata cap.
  const std::string str_8m = big_array_file("str-8m.gguf", kStr, uint64_t(8) << 20, Raw().str("").bytes);
  // 4M empty nested arrays (48 MiB): a Value each would cost ~10x the file.
  const std::string nested_4m =
      big_array_file("nested-4m.gguf", kArray, uint64_t(4) << 20, Raw().put<uint32_t>(kU8).put<uint64_t>(0).bytes);

  test::check_success_row({"64 MiB u8 array", {"inspect", u8_64m}, 0, "big\\.array +\\[67108864 x u8\\] \\[7, 7, 7, 7, 7, 7, \\.\\.\\.\\]", 100});
  test::check_success_row({"64 MiB i32 array", {"inspect", i32_64m}, 0, "\\[16777216 x i32\\] \\[1, 1, 1, 1, 1, 1, \\.\\.\\.\\]", 100});
  test::check_success_row({"4 MiB u8 array", {"inspect", u8_4m}, 0, "\\[4194304 x u8\\]", 40});
  test::check_success_row({"2M-string array", {"inspect", str_2m}, 0, "\\[2097152 x str\\] \\[\"abcdefgh\", ", 120});
  const std::vector<HostileRow> rows = {
      {"8M empty strings", {"inspect", str_8m}, 1,
       "str-8m\\.gguf: metadata 'big\\.array' takes the metadata past 64 MiB of memory", 200},
      {"4M nested arrays", {"inspect", nested_4m}, 1,
       "nested-4m\\.gguf: metadata 'big\\.array' takes the metadata past 64 MiB of memory", 200},
  };
  for (const HostileRow& row : rows) test::check_hostile_row(row);
}

// 4. inspect escapes control characters in metadata strings instead of printing them raw.
TEST(Hostile, InspectEscapesControlCharacters) {
  const std::string path = model_variant("control-chars.gguf", {{"general.name", gguf::Value::of_str("a\x1b[2Jb\rc\x07")}});
  test::ChildResult r = test::run_child({"inspect", path}, 20);
  ASSERT_TRUE(r.exited) << r.out;
  EXPECT_EQ(r.code, 0) << r.out;
  EXPECT_EQ(r.out.find('\x1b'), std::string::npos) << r.out;
  EXPECT_EQ(r.out.find('\x07'), std::string::npos) << r.out;
  EXPECT_EQ(r.out.find('\r'), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("\"a\\x1b[2Jb\\rc\\x07\""), std::string::npos) << r.out;  // the metadata line
  EXPECT_NE(r.out.find("model: llama a\\x1b[2Jb\\rc\\x07,"), std::string::npos) << r.out;  // the model line
}
