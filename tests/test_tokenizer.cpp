// Tokenizers: llama.cpp's tokenizer test vectors for every bundled vocab (found at run time), the golden
// prompts of every bundled model, round trips, special tokens, streaming decode, bad vocabularies, speed.
#include <gtest/gtest.h>

#include <algorithm>
#include <cctype>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <mutex>
#include <nlohmann/json.hpp>
#include <random>
#include <sstream>

#include "gguf/gguf.h"
#include "test_util.h"
#include "tokenizer/tokenizer.h"
#include "util/error.h"

using namespace headroom;
namespace fs = std::filesystem;

namespace {

std::string read_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error("cannot open " + path);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

// Tokenizers are loaded once per file and shared by the tests (encode/decode are const and thread-safe).
const Tokenizer& load(const std::string& path) {
  static std::mutex mu;
  static std::map<std::string, std::unique_ptr<Tokenizer>> cache;
  std::lock_guard<std::mutex> lock(mu);
  auto& t = cache[path];
  if (!t) {
    auto f = gguf::File::open(path);
    t = Tokenizer::from_gguf(*f);
  }
  return *t;
}

std::vector<std::string> vocab_files() {
  std::vector<std::string> out;
  const fs::path dir = test::shared("testdata/vocab");
  if (!fs::exists(dir)) return out;
  for (const auto& e : fs::directory_iterator(dir))
    if (e.path().extension() == ".gguf") out.push_back(e.path().string());
  std::sort(out.begin(), out.end());
  return out;
}

// "ggml-vocab-llama-spm.gguf" -> "llama_spm" (a valid test name).
std::string family_of(const std::string& path) {
  std::string s = fs::path(path).stem().string();
  if (s.rfind("ggml-vocab-", 0) == 0) s = s.substr(11);
  for (char& c : s)
    if (!isalnum(static_cast<unsigned char>(c))) c = '_';
  return s;
}

struct Case {
  std::string text;
  std::vector<int32_t> ids;
};

// The .inp file is the test strings, each followed by "\n__ggml_vocab_test__\n" (so splitting leaves an empty
// last piece, which is not a case); the .out file has one line of ids per string (llama.cpp's
// tests/test-tokenizer-0.cpp reads them the same way).
std::vector<Case> read_cases(const std::string& gguf_path) {
  const std::string inp = read_file(gguf_path + ".inp");
  const std::string sep = "\n__ggml_vocab_test__\n";
  std::vector<std::string> texts;
  for (size_t pos = 0; pos < inp.size();) {
    const size_t next = inp.find(sep, pos);
    if (next == std::string::npos) {
      texts.push_back(inp.substr(pos));
      break;
    }
    texts.push_back(inp.substr(pos, next - pos));
    pos = next + sep.size();
  }
  std::vector<Case> cases;
  std::istringstream out(read_file(gguf_path + ".out"));
  std::string line;
  size_t i = 0;
  while (std::getline(out, line)) {
    if (i >= texts.size()) throw std::runtime_error(gguf_path + ": more .out lines than .inp cases");
    Case c{texts[i++], {}};
    std::istringstream ls(line);
    for (int32_t id; ls >> id;) c.ids.push_back(id);
    cases.push_back(std::move(c));
  }
  if (i != texts.size()) throw std::runtime_error(gguf_path + ": fewer .out lines than .inp cases");
  return cases;
}

std::string show(const std::vector<int32_t>& ids) {
  std::string s;
  for (int32_t id : ids) s += " " + std::to_string(id);
  return s;
}

// ---- llama.cpp's test vectors, every vocab file ----

class TokenizerVocab : public ::testing::TestWithParam<std::string> {};

TEST_P(TokenizerVocab, MatchesLlamaCppTestVectors) {
  const std::string path = GetParam();
  const Tokenizer& tok = load(path);
  const std::vector<Case> cases = read_cases(path);
  ASSERT_FALSE(cases.empty());
  int passed = 0, round_trips = 0;
  for (size_t i = 0; i < cases.size(); ++i) {
    const Case& c = cases[i];
    // As test-tokenizer-0: no BOS, special tokens in the text not parsed (user-defined ones still are).
    const std::vector<int32_t> ids = tok.encode(c.text, /*add_bos=*/false, /*parse_special=*/false);
    EXPECT_EQ(ids, c.ids) << family_of(path) << " case " << i << " '" << c.text << "'\n  got:     " << show(ids)
                          << "\n  expected:" << show(c.ids);
    if (ids == c.ids) ++passed;
    // Every case round-trips: the texts are valid UTF-8, no family here normalizes (llama.cpp does not apply
    // Qwen2's NFC normalizer either, and these texts are NFC already), and decode() does not clean up spaces.
    const std::string back = tok.decode(ids);
    EXPECT_EQ(back, c.text) << family_of(path) << " case " << i << " does not round-trip";
    if (back == c.text) ++round_trips;
  }
  std::cout << "[ vocab    ] " << family_of(path) << ": " << passed << "/" << cases.size() << " cases match, "
            << round_trips << "/" << cases.size() << " round-trip\n";
}

INSTANTIATE_TEST_SUITE_P(Files, TokenizerVocab, ::testing::ValuesIn(vocab_files()),
                         [](const ::testing::TestParamInfo<std::string>& p) { return family_of(p.param); });
GTEST_ALLOW_UNINSTANTIATED_PARAMETERIZED_TEST(TokenizerVocab);

TEST(TokenizerVocabFiles, AllFamiliesPresent) {
  // The vectors above cover these families; a new file is picked up by the glob without a code change.
  std::vector<std::string> fams;
  for (const auto& f : vocab_files()) fams.push_back(family_of(f));
  for (const char* want :
       {"llama_spm", "phi_3", "gpt_2", "llama_bpe", "qwen2", "deepseek_llm", "deepseek_coder", "falcon", "starcoder"})
    EXPECT_NE(std::find(fams.begin(), fams.end(), want), fams.end()) << want;
}

// ---- golden prompts of the bundled models ----

TEST(TokenizerGolden, PromptsTokenizeToGoldenIds) {
  int checked = 0;
  for (const auto& e : fs::directory_iterator(test::shared("golden"))) {
    if (e.path().extension() != ".json") continue;
    const auto j = nlohmann::json::parse(read_file(e.path().string()));
    const Tokenizer& tok = load(test::shared(j.at("model").get<std::string>()));
    for (const auto& c : j.at("cases")) {
      if (c.at("prompt").is_null()) continue;
      const std::string prompt = c.at("prompt").get<std::string>();
      const auto want = c.at("prompt_ids").get<std::vector<int32_t>>();
      EXPECT_EQ(tok.encode(prompt, tok.add_bos()), want) << e.path().filename() << ": '" << prompt << "'";
      ++checked;
    }
  }
  std::cout << "[ golden   ] " << checked << " prompts checked\n";
  EXPECT_GT(checked, 10);
}

// ---- details ----

const std::string& vocab(const char* name) {
  static std::map<std::string, std::string> paths;
  auto& p = paths[name];
  if (p.empty()) p = test::shared(std::string("testdata/vocab/ggml-vocab-") + name + ".gguf");
  return p;
}

TEST(TokenizerMeta, DefaultsAndSpecialIds) {
  const Tokenizer& spm = load(vocab("llama-spm"));
  EXPECT_EQ(spm.model_kind(), "llama");
  EXPECT_EQ(spm.n_vocab(), 32000);
  EXPECT_EQ(spm.bos(), 1);
  EXPECT_EQ(spm.eos(), 2);
  EXPECT_EQ(spm.unk(), 0);
  EXPECT_TRUE(spm.add_bos());
  EXPECT_TRUE(spm.add_space_prefix());
  EXPECT_TRUE(spm.is_eog(2));
  EXPECT_FALSE(spm.is_eog(1));
  EXPECT_EQ(spm.raw_piece(1), "<s>");

  const Tokenizer& l3 = load(vocab("llama-bpe"));
  EXPECT_EQ(l3.model_kind(), "gpt2");
  EXPECT_EQ(l3.pre(), "llama-bpe");
  EXPECT_TRUE(l3.add_bos());
  EXPECT_EQ(l3.bos(), 128000);
  EXPECT_TRUE(l3.is_eog(128009));  // <|eot_id|>
  EXPECT_TRUE(l3.is_eog(128001));
  EXPECT_FALSE(l3.chat_template().empty());

  const Tokenizer& qw = load(vocab("qwen2"));
  EXPECT_FALSE(qw.add_bos());
  EXPECT_EQ(qw.eos(), 151645);
  EXPECT_TRUE(qw.is_eog(151645));  // <|im_end|>
  EXPECT_TRUE(qw.is_eog(151643));  // <|endoftext|>
  EXPECT_FALSE(qw.is_eog(151644));
  EXPECT_FALSE(qw.add_space_prefix());

  const Tokenizer& gpt2 = load(vocab("gpt-2"));
  EXPECT_FALSE(gpt2.add_bos());  // gpt-2 family default, no key in the file
  EXPECT_EQ(gpt2.bos(), 50256);

  const Tokenizer& phi = load(vocab("phi-3"));
  EXPECT_TRUE(phi.is_eog(32007));  // <|end|>
  EXPECT_EQ(phi.eot(), 32007);

  EXPECT_EQ(load(vocab("deepseek-llm")).eot(), 100001);  // <｜end▁of▁sentence｜>
}

TEST(TokenizerSpecial, ParseSpecialMatchesControlTokens) {
  const Tokenizer& l3 = load(vocab("llama-bpe"));
  const auto with = l3.encode("<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>", false, true);
  ASSERT_GE(with.size(), 5u);
  EXPECT_EQ(with.front(), 128006);
  EXPECT_EQ(with.back(), 128009);
  EXPECT_EQ(std::count(with.begin(), with.end(), 128007), 1);
  const auto without = l3.encode("<|eot_id|>", false, false);
  EXPECT_TRUE(std::find(without.begin(), without.end(), 128009) == without.end());
  EXPECT_EQ(l3.decode(without), "<|eot_id|>");
  // Control tokens print only when asked.
  EXPECT_EQ(l3.decode(with, false), "user\n\nHi");
  EXPECT_EQ(l3.decode(with, true), "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>");
  EXPECT_EQ(l3.token_to_piece(128009), "");
  EXPECT_EQ(l3.token_to_piece(128009, true), "<|eot_id|>");

  const Tokenizer& qw = load(vocab("qwen2"));
  const auto chat = qw.encode("<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n", false, true);
  EXPECT_EQ(chat.front(), 151644);
  EXPECT_EQ(std::count(chat.begin(), chat.end(), 151645), 1);
  // User-defined tokens (<think>) are matched even without parse_special, as in HF and llama.cpp.
  const auto think = qw.encode("<think>x", false, false);
  EXPECT_EQ(think.front(), 151667);

  // SPM: a space is prefixed to the text after a special token; BOS is just an id.
  const Tokenizer& spm = load(vocab("llama-spm"));
  EXPECT_EQ(spm.encode("<s>Hello", false, true), spm.encode("Hello", true, true));
  EXPECT_EQ(spm.decode(spm.encode("Hello world", true)), "Hello world");
  EXPECT_EQ(spm.decode(spm.encode("Hello world", true), true), "<s> Hello world");

  // phi-3: its special tokens eat the whitespace after them (rstrip), as llama.cpp and HF do.
  const Tokenizer& phi = load(vocab("phi-3"));
  EXPECT_EQ(phi.encode("<|user|>\nHi", false, true), phi.encode("<|user|>Hi", false, true));
}

TEST(TokenizerSpm, UnknownCharactersWithoutByteTokensGiveUnk) {
  // TinyStories-656K has no <0xXX> tokens: a character outside the vocab becomes <unk>, once per character.
  const Tokenizer& tok = load(test::shared("models/tinystories-656k-q8_0.gguf"));
  const auto ids = tok.encode(
      "a\xE2\x82\xAC"
      "b",
      false);  // "a€b"
  EXPECT_EQ(std::count(ids.begin(), ids.end(), tok.unk()), 1) << show(ids);
}

TEST(TokenizerRoundTrip, HaystackAndInvalidUtf8) {
  const std::string hay = read_file(test::shared("corpus/haystack.txt")).substr(0, 20000);
  for (const auto& path : vocab_files()) {
    const Tokenizer& tok = load(path);
    EXPECT_EQ(tok.decode(tok.encode(hay, false, false)), hay) << family_of(path);
  }
  // Invalid UTF-8 never crashes; it decodes to U+FFFD, one per bad byte, for both kinds of tokenizer.
  const std::string bad = "ok \xFF\xC3(\xE4\xB8 end \xF0\x9F\x98";
  const std::string want =
      "ok \xEF\xBF\xBD\xEF\xBF\xBD(\xEF\xBF\xBD\xEF\xBF\xBD end \xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD";
  for (const char* name : {"llama-spm", "gpt-2", "qwen2", "deepseek-llm", "falcon"}) {
    const Tokenizer& tok = load(vocab(name));
    EXPECT_EQ(tok.decode(tok.encode(bad, false, false)), want) << name;
  }
}

TEST(TokenizerRoundTrip, RandomBytesNeverCrash) {
  std::mt19937 rng(42);
  for (const char* name : {"llama-spm", "gpt-2", "qwen2", "llama-bpe", "deepseek-coder", "starcoder", "phi-3"}) {
    const Tokenizer& tok = load(vocab(name));
    for (int i = 0; i < 50; ++i) {
      std::string s(rng() % 64, '\0');
      for (char& c : s) c = static_cast<char>(rng());
      const auto ids = tok.encode(s, false, i % 2 == 0);
      for (int32_t id : ids) ASSERT_TRUE(id >= 0 && id < tok.n_vocab()) << name;
      (void)tok.decode(ids, true);
    }
  }
}

// ---- streaming ----

std::string stream_all(const Tokenizer& tok, const std::vector<int32_t>& ids, bool special, int* held = nullptr) {
  StreamDecoder sd(tok, special);
  std::string out;
  for (int32_t id : ids) {
    const std::string s = sd.push(id);
    if (held && s.empty() && !tok.token_to_piece(id, special).empty()) ++*held;
    out += s;
  }
  return out + sd.flush();
}

TEST(TokenizerStream, MultiByteTextEqualsDecode) {
  // CJK and emoji that the vocabs spell with several byte tokens, so pieces end mid-character.
  const std::string text =
      " Hello 我想在apple工作 🦙🚀😶\u200d🌫\ufe0f ✅ កាន់តែ нещо Cửa Việt\n\t end";
  for (const char* name : {"llama-spm", "phi-3", "gpt-2", "qwen2", "llama-bpe", "deepseek-llm", "starcoder"}) {
    const Tokenizer& tok = load(vocab(name));
    const auto ids = tok.encode(text, tok.add_bos());
    int held = 0;
    for (bool special : {false, true}) {
      EXPECT_EQ(stream_all(tok, ids, special, &held), tok.decode(ids, special)) << name;
    }
    EXPECT_EQ(tok.decode(ids), text) << name;
    EXPECT_GT(held, 0) << name << ": no piece ended inside a character; the test text is too easy";
  }
}

TEST(TokenizerStream, ContinuationKeepsLeadingSpace) {
  // Generated tokens continue the prompt: " time" must stay " time", whole or streamed.
  const Tokenizer& spm = load(vocab("llama-spm"));
  const auto prompt = spm.encode("Once upon a", true);
  const auto all = spm.encode("Once upon a time, there", true);
  ASSERT_TRUE(std::equal(prompt.begin(), prompt.end(), all.begin()));
  const std::vector<int32_t> cont(all.begin() + static_cast<long>(prompt.size()), all.end());
  EXPECT_EQ(spm.decode(cont, false, /*continuation=*/true), " time, there");
  EXPECT_EQ(spm.decode(cont), "time, there");
  StreamDecoder sd(spm, false, /*continuation=*/true);
  std::string streamed;
  for (int32_t id : cont) streamed += sd.push(id);
  EXPECT_EQ(streamed + sd.flush(), " time, there");
}

TEST(TokenizerStream, InvalidSequencesMatchDecode) {
  const Tokenizer& spm = load(vocab("llama-spm"));
  // <0xE4> <0xB8> is the start of a 3-byte character that never completes.
  const int32_t e4 = 3 + 0xE4, b8 = 3 + 0xB8, a = spm.encode("a", false).back();
  for (const std::vector<int32_t>& ids :
       std::vector<std::vector<int32_t>>{{e4, b8, a}, {e4, b8}, {b8, e4, e4, b8, 3 + 0xAD}}) {
    EXPECT_EQ(stream_all(spm, ids, false), spm.decode(ids));
  }
  EXPECT_EQ(spm.decode(std::vector<int32_t>{e4, b8, a}), "\xEF\xBF\xBD\xEF\xBF\xBD a");  // a is "▁a"
  EXPECT_EQ(spm.decode(std::vector<int32_t>{e4, b8, 3 + 0xAD}), "\xE4\xB8\xAD");         // 中
  StreamDecoder sd(spm);
  EXPECT_EQ(sd.push(e4), "");
  EXPECT_EQ(sd.push(b8), "");
  EXPECT_EQ(sd.push(3 + 0xAD), "\xE4\xB8\xAD");
  EXPECT_EQ(sd.flush(), "");
}

TEST(TokenizerStream, OutOfRangeIdsPrintNothing) {
  const Tokenizer& qw = load(vocab("qwen2"));
  EXPECT_EQ(qw.token_to_piece(-1), "");
  EXPECT_EQ(qw.token_to_piece(qw.n_vocab() + 100), "");  // model vocab padded past the tokenizer's
  EXPECT_EQ(qw.raw_piece(qw.n_vocab()), "");
  EXPECT_FALSE(qw.is_eog(-5));
}

// ---- bad vocabularies ----

struct VocabSpec {
  std::string model = "llama";
  std::vector<std::string> tokens = {"<unk>", "<s>", "</s>", "a", "b", "ab"};
  bool with_tokens = true;
  std::vector<float> scores = {0, 0, 0, -1, -2, -3};
  std::vector<int32_t> types = {2, 3, 3, 1, 1, 1};
  std::vector<std::string> merges;
  std::string pre;
  int64_t bos = 1;
  bool add_bos = true;
};

std::string load_error(const VocabSpec& s) {
  gguf::Writer w;
  w.add("general.architecture", gguf::Value::of_str("llama"));
  if (!s.model.empty()) w.add("tokenizer.ggml.model", gguf::Value::of_str(s.model));
  if (!s.pre.empty()) w.add("tokenizer.ggml.pre", gguf::Value::of_str(s.pre));
  if (s.with_tokens) w.add("tokenizer.ggml.tokens", gguf::Value::of_str_arr(s.tokens));
  if (!s.scores.empty()) w.add("tokenizer.ggml.scores", gguf::Value::of_f32_arr(s.scores));
  if (!s.types.empty()) w.add("tokenizer.ggml.token_type", gguf::Value::of_i32_arr(s.types));
  if (!s.merges.empty()) w.add("tokenizer.ggml.merges", gguf::Value::of_str_arr(s.merges));
  if (s.bos >= 0) w.add("tokenizer.ggml.bos_token_id", gguf::Value::of_u32(static_cast<uint32_t>(s.bos)));
  w.add("tokenizer.ggml.add_bos_token", gguf::Value::of_bool(s.add_bos));
  const std::vector<uint8_t> bytes = w.to_bytes();
  try {
    auto f = gguf::File::parse(bytes.data(), bytes.size(), "bad.gguf");
    auto tok = Tokenizer::from_gguf(*f);
    (void)tok->decode(tok->encode("ab ba", true));
  } catch (const Error& e) {
    const std::string msg = e.what();
    EXPECT_EQ(msg.find('\n'), std::string::npos) << msg;
    return msg;
  }
  return "";
}

TEST(TokenizerBadVocab, GoodSpecLoads) {
  EXPECT_EQ(load_error(VocabSpec{}), "");
  VocabSpec bpe;
  bpe.model = "gpt2";
  bpe.pre = "gpt-2";
  bpe.scores.clear();
  bpe.merges = {"a b"};
  bpe.add_bos = false;
  EXPECT_EQ(load_error(bpe), "");
}

TEST(TokenizerBadVocab, ErrorsNameTheProblem) {
  auto expect_err = [](VocabSpec s, const char* needle) {
    const std::string msg = load_error(s);
    EXPECT_NE(msg.find(needle), std::string::npos) << "message: '" << msg << "', wanted '" << needle << "'";
  };
  VocabSpec s;
  s.with_tokens = false;
  expect_err(s, "tokenizer.ggml.tokens");
  s = {};
  s.tokens.clear();
  s.scores.clear();
  s.types.clear();
  expect_err(s, "tokenizer.ggml.tokens is empty");
  s = {};
  s.scores.pop_back();
  expect_err(s, "tokenizer.ggml.scores has 5 entries");
  s = {};
  s.types.push_back(1);
  expect_err(s, "tokenizer.ggml.token_type has 7 entries");
  s = {};
  s.bos = 99;
  expect_err(s, "bos_token_id = 99 is out of range");
  s = {};
  s.model = "";
  expect_err(s, "tokenizer.ggml.model");
  s = {};
  s.model = "bert";
  expect_err(s, "unsupported tokenizer model 'bert'");
  s = {};
  s.tokens[4] = "a";
  expect_err(s, "duplicate token");
  VocabSpec b;
  b.model = "gpt2";
  b.pre = "gpt-2";
  b.add_bos = false;
  expect_err(b, "tokenizer.ggml.merges is missing");
  b.merges = {"ab"};
  expect_err(b, "tokenizer.ggml.merges[0]");
  b.merges = {"a b"};
  b.pre = "klingon-v2";
  expect_err(b, "unsupported pre-tokenizer 'klingon-v2'");
  b.pre = "gpt-2";
  b.bos = -1;  // no id in the file, and the default (11) is outside this 6-token vocab
  b.add_bos = true;
  expect_err(b, "add_bos_token is true, but there is no BOS token");
}

TEST(TokenizerBadVocab, NoneIdMeansNoToken) {
  // stories260K writes 0xFFFFFFFF for "no padding token": that is not an error.
  const Tokenizer& tok = load(test::shared("models/stories260K.gguf"));
  EXPECT_EQ(tok.bos(), 1);
  EXPECT_TRUE(tok.add_bos());
}

// ---- speed ----

TEST(TokenizerSpeed, EncodeAndLoad) {
  const std::string hay = read_file(test::shared("corpus/haystack.txt"));
  const Tokenizer& spm = load(vocab("llama-spm"));
  // About 4096 tokens of English.
  std::string text = hay.substr(0, 16000);
  auto t0 = std::chrono::steady_clock::now();
  const auto ids = spm.encode(text, true);
  const double spm_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();

  const Tokenizer& qw = load(vocab("qwen2"));
  t0 = std::chrono::steady_clock::now();
  const auto qids = qw.encode(text, false);
  const double bpe_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();

  t0 = std::chrono::steady_clock::now();
  {
    auto f = gguf::File::open(vocab("qwen2"));
    auto tok = Tokenizer::from_gguf(*f);
  }
  const double load_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  std::cout << "[ speed    ] llama-spm: " << ids.size() << " tokens in " << spm_ms << " ms; qwen2: " << qids.size()
            << " tokens in " << bpe_ms << " ms; qwen2 vocab load (file + tokenizer): " << load_ms << " ms\n";
  EXPECT_GT(ids.size(), 3000u);
  EXPECT_LT(spm_ms, 250.0);
  EXPECT_LT(bpe_ms, 250.0);
  EXPECT_LT(load_ms, 2000.0);
}

}  // namespace
