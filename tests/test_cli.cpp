// The headroom binary: every user error gives a non-zero exit and one clear line; the main commands work.
#include <gtest/gtest.h>

#include <sys/wait.h>

#include <array>
#include <cstdio>
#include <fstream>

#include "backend/registry.h"
#include "gguf/gguf.h"
#include "test_util.h"

namespace {

struct Result {
  int code;
  std::string out;  // stdout and stderr together
};

Result run(const std::string& args) {
  std::string cmd = headroom::test::headroom_bin() + " " + args + " 2>&1";
  FILE* p = popen(cmd.c_str(), "r");
  Result r{-1, ""};
  if (!p) return r;
  std::array<char, 4096> buf;
  size_t n;
  while ((n = fread(buf.data(), 1, buf.size(), p)) > 0) r.out.append(buf.data(), n);
  int st = pclose(p);
  r.code = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
  return r;
}

std::string model() { return headroom::test::shared("models/retrieval-14m-q8_0.gguf"); }

// The error output is exactly one line starting with "error: " and mentioning `needle`.
void expect_one_line_error(const Result& r, const std::string& needle, int code = 1) {
  EXPECT_EQ(r.code, code) << r.out;
  EXPECT_EQ(r.out.rfind("error: ", 0), 0u) << r.out;
  EXPECT_EQ(std::count(r.out.begin(), r.out.end(), '\n'), 1) << r.out;
  EXPECT_NE(r.out.find(needle), std::string::npos) << r.out;
}

}  // namespace

TEST(Cli, HelpForEveryCommand) {
  for (const char* c : {"", "inspect", "tokenize", "run", "bench", "synth", "profile", "eval"}) {
    Result r = run(std::string(c) + " --help");
    EXPECT_EQ(r.code, 0) << c;
    EXPECT_NE(r.out.find("Usage"), std::string::npos) << c;
  }
}

TEST(Cli, InspectEveryBundledModel) {
  for (const char* m : {"models/retrieval-14m-q8_0.gguf", "models/stories260K.gguf", "models/tinystories-656k-q8_0.gguf",
                        "models/arch/rand-qwen2-bias-bf16.gguf", "models/arch/rand-llama3-ropefreqs-q8_0.gguf"}) {
    Result r = run("inspect " + headroom::test::shared(m));
    EXPECT_EQ(r.code, 0) << m << r.out;
    EXPECT_NE(r.out.find("KV bytes per token"), std::string::npos) << m;
    EXPECT_NE(r.out.find("parameters:"), std::string::npos) << m;
  }
  Result r = run("inspect " + model());
  EXPECT_NE(r.out.find("8 layers, dim 256, 4 heads x 64, 2 KV heads"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("KV bytes per token: 4096 (f16"), std::string::npos) << r.out;  // 2 x 8 layers x 2 heads x 64 x 2 B
}

TEST(Cli, Tokenize) {
  Result r = run("tokenize -m " + model() + " -p 'Hello world'");
  EXPECT_EQ(r.code, 0);
  EXPECT_NE(r.out.find("15043"), std::string::npos) << r.out;  // "▁Hello" in the Llama-2 vocab
  EXPECT_NE(r.out.find("3 tokens"), std::string::npos) << r.out;
}

TEST(Cli, TokenizeEscapesPieces) {
  // Pieces are shown as escape_control writes them: a backslash doubled, control characters as \r or \xHH,
  // so each piece reads back unambiguously and nothing raw reaches the terminal.
  Result r = run("tokenize -m " + model() + R"x( -p "$(printf 'a\\b\r\177')")x");
  EXPECT_EQ(r.code, 0) << r.out;
  EXPECT_NE(r.out.find(R"(  '\\')"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find(R"(  '\r')"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find(R"(  '\x7f')"), std::string::npos) << r.out;
  EXPECT_EQ(r.out.find('\r'), std::string::npos) << "a raw carriage return";
  EXPECT_EQ(r.out.find('\x7f'), std::string::npos) << "a raw DEL";
}

TEST(Cli, BadFiles) {
  expect_one_line_error(run("inspect /nonexistent.gguf"), "cannot open");
  std::string junk = headroom::test::scratch_dir("cli") + "/junk.gguf";
  std::ofstream(junk) << "this is not a model";
  expect_one_line_error(run("inspect " + junk), "not a GGUF file");
  expect_one_line_error(run("run -m " + junk + " -p hi"), "not a GGUF file");
  std::string vocab = headroom::test::shared("testdata/vocab/ggml-vocab-gpt-2.gguf");
  expect_one_line_error(run("run -m " + vocab + " -p hi"), "unsupported architecture 'gpt2'");
}

TEST(Cli, BadFlags) {
  Result r = run("run -m " + model() + " -p hi --temp abc");
  EXPECT_EQ(r.code, 2) << r.out;
  EXPECT_EQ(std::count(r.out.begin(), r.out.end(), '\n'), 1) << r.out;
  EXPECT_EQ(run("frobnicate").code, 2);
  expect_one_line_error(run("run -m " + model() + " -p hi --kv-policy magic"), "unknown KV policy");
  expect_one_line_error(run("run -m " + model() + " -p hi --kv-policy streaming --kv-budget 12XB"), "invalid --kv-budget");
  expect_one_line_error(run("run -m " + model() + " -p hi --kv-policy streaming --kv-budget 40"), "streaming needs at least 3");
  expect_one_line_error(run("run -m " + model() + " -p hi --kv-policy auto"), "needs --head-map");
  expect_one_line_error(run("run -m " + model()), "give a prompt");
  expect_one_line_error(run("bench -m " + model() + " -d 1,x"), "comma-separated");
  expect_one_line_error(run("synth --shape llama9 -o /tmp/x.gguf"), "unknown --shape");
  expect_one_line_error(run("eval -m " + model() + " --tasks bogus"), "unknown task");
  r = run("run -m " + model() + " -p hi --prefill sometimes");
  EXPECT_EQ(r.code, 2) << r.out;
  EXPECT_NE(r.out.find("--prefill"), std::string::npos) << r.out;
}

TEST(Cli, PromptTooLongNamesBothNumbers) {
  Result r = run("run -m " + model() + " -c 8 -p 'one two three four five six seven eight nine ten'");
  expect_one_line_error(r, "longer than the context of 8 tokens");
  EXPECT_NE(r.out.find("prompt is 11 tokens"), std::string::npos) << r.out;
}

TEST(Cli, EdgeCasePrompts) {
  Result r = run("run -m " + model() + " -n 0 -p 'The pass key is'");
  EXPECT_EQ(r.code, 0) << r.out;
  EXPECT_NE(r.out.find("generated 0 tokens"), std::string::npos) << r.out;
  r = run("run -m " + model() + " -n 4 --temp 0 -p ''");  // BOS alone is a valid prompt for this model
  EXPECT_EQ(r.code, 0) << r.out;
  r = run("run -m " + model() + " -n 4 --temp 0 -p \"$(printf 'caf\\303 \\377\\376 ok')\"");
  EXPECT_EQ(r.code, 0) << r.out;
  EXPECT_NE(r.out.find("not valid UTF-8"), std::string::npos) << r.out;
  r = run("run -m " + model() + " -n 4 --chat -p hi");
  EXPECT_EQ(r.code, 0) << r.out;
  EXPECT_NE(r.out.find("no chat template"), std::string::npos) << r.out;
}

TEST(Cli, RunIsDeterministicForASeed) {
  std::string args = "run -m " + model() + " -n 24 --temp 0.9 --seed 11 -p 'The dictionary defines the word'";
  Result a = run(args), b = run(args);
  ASSERT_EQ(a.code, 0);
  auto text = [](const std::string& s) { return s.substr(0, s.find("load ")); };
  EXPECT_EQ(text(a.out), text(b.out));
  Result c = run("run -m " + model() + " -n 24 --temp 0.9 --seed 12 -p 'The dictionary defines the word'");
  EXPECT_NE(text(a.out), text(c.out));
}

TEST(Cli, RunAnswersThePasskeyAndStopsAtStopString) {
  std::string p = "'The pass key is 4821930. Remember it. 4821930 is the pass key.\nWhat is the pass key? The pass key is'";
  Result r = run("run -m " + model() + " -n 12 --temp 0 -p " + p);
  EXPECT_EQ(r.code, 0) << r.out;
  // The answer follows the question (the prompt's own "The pass key is 4821930." does not count).
  EXPECT_NE(r.out.find("What is the pass key? The pass key is 4821930."), std::string::npos) << r.out;
  // -p takes llama.cpp's escapes: the same prompt with \n written as two characters gives the same answer ...
  const std::string escaped = "'The pass key is 4821930. Remember it. 4821930 is the pass key.\\nWhat is the pass key? The pass key is'";
  Result e = run("run -m " + model() + " -n 12 --temp 0 -p " + escaped);
  auto text = [](const std::string& s) { return s.substr(0, s.find("load ")); };
  EXPECT_EQ(text(e.out), text(r.out));
  // ... and --no-escape keeps it literal.
  e = run("run -m " + model() + " -n 1 --temp 0 --no-escape -p " + escaped);
  EXPECT_NE(e.out.find("pass key.\\nWhat"), std::string::npos) << e.out;
  r = run("run -m " + model() + " -n 12 --temp 0 --stop 930 -p " + p);
  EXPECT_NE(r.out.find("stop: stop"), std::string::npos) << r.out;
}

TEST(Cli, BudgetExhaustedEndsWithReason) {
  Result r = run("run -m " + model() + " -n 200 --temp 0 --kv-budget 64 -p 'The dictionary defines the word'");
  EXPECT_EQ(r.code, 0) << r.out;
  EXPECT_NE(r.out.find("stopped: KV budget exhausted"), std::string::npos) << r.out;
}

TEST(Cli, HeadMapForAnotherModelIsRefused) {
  std::string dir = headroom::test::scratch_dir("cli");
  Result r = run("profile -m " + headroom::test::shared("models/stories260K.gguf") +
                 " --ctx 256 --probes 1 --natural 0 --ablation 1 --window 32 --target-budget 50% --prefill window --shared " + headroom::test::shared_dir() +
                 " -o " + dir + "/stories-heads.json");
  ASSERT_EQ(r.code, 0) << r.out;
  r = run("run -m " + model() + " -p hi --head-map " + dir + "/stories-heads.json");
  expect_one_line_error(r, "head map was made for another model");
}

TEST(Cli, SynthWritesLlamaCppFileType) {
  // general.file_type is llama.cpp's llama_ftype: 7 for a Q8_0 file (the Q8_0 tensor type id, 8, reads as
  // Q5_0 there), and inspect names it from the same table.
  const std::string out = headroom::test::scratch_dir("cli") + "/synth-q8_0.gguf";
  Result r = run("synth --shape tiny --type q8_0 --layers 1 --ctx 64 --shared " + headroom::test::shared_dir() + " -o " + out);
  ASSERT_EQ(r.code, 0) << r.out;
  auto f = headroom::gguf::File::open(out);
  EXPECT_EQ(f->get_int("general.file_type"), 7);
  EXPECT_EQ(f->tensor("blk.0.attn_q.weight").type, headroom::gguf::DType::Q8_0);
  r = run("inspect " + out);
  EXPECT_NE(r.out.find("general.file_type                            7 (Q8_0)"), std::string::npos) << r.out;
}

TEST(Cli, KVTypeFlags) {
  const std::string p = " -n 4 --temp 0 -p \"The pass key is 4821930. Remember it.\"";
  expect_one_line_error(run("run -m " + model() + " --kv-type q4_0" + p), "--kv-type 'q4_0' is not a KV type");
  expect_one_line_error(run("run -m " + model() + " -ctk q8_0 -ctv f16" + p), "differ: headroom stores K and V in one type");
  expect_one_line_error(run("run -m " + headroom::test::shared("models/stories260K.gguf") + " --kv-type q8_0" + p),
                        "blocks of 32");
  // llama.cpp's short names work, and the stored type is what the log reports.
  Result r = run("run -m " + model() + " -ctk q8_0 -ctv q8_0" + p);
  EXPECT_EQ(r.code, 0) << r.out;
  EXPECT_NE(r.out.find("q8_0 cache"), std::string::npos) << r.out;
  r = run("run -m " + model() + p);
  EXPECT_EQ(r.code, 0) << r.out;
  EXPECT_NE(r.out.find("f16 cache"), std::string::npos) << "f16 is the default: " << r.out;
}

TEST(Cli, TensorParallelBadRankCountsGiveOneLine) {
  expect_one_line_error(run("run -m " + model() + " -p hi -n 2 --device cpu -tp 3"), "at most 2 ranks");
  expect_one_line_error(run("run -m " + headroom::test::shared("models/stories260K.gguf") + " -p hi -n 2 --device cpu -tp 3"),
                        "does not divide the model's 4 KV heads");
  // CUDA ranks take one GPU each: without a GPU (or a CUDA build) --device cuda says why; with one, -tp 2
  // asks for two.
  if (headroom::cuda_gpus() < 2)
    expect_one_line_error(run("run -m " + model() + " -p hi -n 2 --device cuda -tp 2"),
                          headroom::cuda_gpus() == 0 ? "--device cuda: " : "needs 2 GPUs; this machine has 1");
  expect_one_line_error(run("bench -m " + model() + " -p 0 -n 2 -r 1 --device cpu --tensor-parallel 4"), "at most 2 ranks");
}

TEST(Cli, TensorParallelRunPrintsThePlacementAndTheSameText) {
  const std::string args = "run -m " + model() + " -p \"The pass key is 4821930. Remember it. The pass key is\" -n 12 "
                           "--temp 0 --device cpu -t 2 -c 256";
  Result one = run(args), two = run(args + " -tp 2");
  ASSERT_EQ(one.code, 0) << one.out;
  ASSERT_EQ(two.code, 0) << two.out;
  EXPECT_NE(two.out.find("tp rank 0: 8 KV heads (L0 0 | L1 0"), std::string::npos) << two.out;
  EXPECT_NE(two.out.find("tp rank 1: 8 KV heads"), std::string::npos) << two.out;
  auto text = [](const std::string& out) {
    const size_t b = out.find("The pass key is"), e = out.find("load ", b);
    return b == std::string::npos || e == std::string::npos ? std::string("(none)") : out.substr(b, e - b);
  };
  EXPECT_EQ(text(one.out), text(two.out));
}

TEST(Cli, TensorParallelEvalGivesTheSameAccuracy) {
  const std::string dir = headroom::test::scratch_dir("cli-tp-eval");
  const std::string args = "eval -m " + model() + " --tasks niah,kv --ctx 512 --depths 25,75 --device cpu -t 2 --shared " +
                           headroom::test::shared_dir();
  Result one = run(args + " -o " + dir + "/one"), two = run(args + " -tp 2 -o " + dir + "/two");
  ASSERT_EQ(one.code, 0) << one.out;
  ASSERT_EQ(two.code, 0) << two.out;
  auto table = [](const std::string& out) {
    const size_t b = out.find("| full |");
    return b == std::string::npos ? std::string("(none)") : out.substr(b, out.find('\n', b) - b);
  };
  EXPECT_NE(table(one.out), "(none)") << one.out;
  EXPECT_EQ(table(one.out), table(two.out));
}
