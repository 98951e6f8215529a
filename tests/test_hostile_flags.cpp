// Hostile flag values, budget strings and head maps: each is refused by one line naming the flag (or the head
// map's file, entry and key) and its allowed range, before it can read out of bounds, overflow into nonsense,
// run with a meaningless value or take memory without bound. One row per hostile command (tests/hostile.h).
#include <gtest/gtest.h>

#include <fstream>
#include <functional>

#include <nlohmann/json.hpp>

#include "hostile.h"
#include "test_models.h"

using headroom::test::HostileRow;

namespace {

std::string model() { return headroom::test::shared("models/retrieval-14m-q8_0.gguf"); }
std::string scratch() { return headroom::test::scratch_dir("hostile-flags"); }

// `args` after "CMD -m MODEL".
std::vector<std::string> cmd(const std::string& c, std::vector<std::string> args) {
  std::vector<std::string> out = {c, "-m", model()};
  out.insert(out.end(), args.begin(), args.end());
  return out;
}
std::vector<std::string> run(std::vector<std::string> args) {
  args.insert(args.begin(), {"-p", "hi", "-n", "1"});
  return cmd("run", args);
}

// A valid head map for the bundled model (streaming everywhere, head 3 full) with `edit` applied to its JSON.
std::string head_map(const std::string& name, const std::function<void(nlohmann::json&)>& edit) {
  using namespace headroom;
  HeadMap m = HeadMap::uniform(test::retrieval_model().identity(), PolicySpec{PolicyKind::Streaming});
  m.heads[3].spec = PolicySpec{PolicyKind::Evict};
  nlohmann::json j = nlohmann::json::parse(m.to_json());
  edit(j);
  const std::string path = scratch() + "/" + name + ".json";
  std::ofstream(path) << j.dump(1);
  return path;
}
std::vector<std::string> with_map(const std::string& name, const std::function<void(nlohmann::json&)>& edit) {
  return run({"--kv-policy", "auto", "--head-map", head_map(name, edit)});
}

void check_all(const std::vector<HostileRow>& rows) {
  for (const HostileRow& row : rows) headroom::test::check_hostile_row(row);
}

}  // namespace

// Negative sizes reached a buffer: `bench -n -3 -d 10` read heap bytes as token ids.
TEST(HostileFlags, BenchSizesOutOfBounds) {
  check_all({
      {"bench -n -3", cmd("bench", {"-n", "-3", "-d", "10"}), 2, R"(--n-gen: -3 is out of range \(0\.\.16777216\))"},
      {"bench -p -5", cmd("bench", {"-p", "-5"}), 2, R"(--n-prompt: -5 is out of range \(0\.\.16777216\))"},
      {"bench -p huge", cmd("bench", {"-p", "99999999999"}), 2, R"(--n-prompt: .* is out of range)"},
      {"bench -d -1", cmd("bench", {"-d", "-1"}), 1, R"(-d expects a comma-separated list of whole numbers in 0\.\.16777216; "-1")"},
      {"bench -d 10,-4", cmd("bench", {"-d", "10,-4", "-p", "8", "-n", "8"}), 1, R"(-d expects .*"-4")"},
      {"bench -d 1.5", cmd("bench", {"-d", "1.5"}), 1, R"(-d expects .*"1\.5")"},
      {"bench -d past the largest context", cmd("bench", {"-d", "16777216", "-p", "8"}), 1,
       R"(-d 16777216 plus the larger of -p 8 and -n 128 is beyond the largest context)"},
      {"bench -r 0", cmd("bench", {"-r", "0"}), 2, R"(--repetitions: 0 is out of range \(1\.\.1000\))"},
  });
}

// Values that overflowed into negative page counts or nonsense sizes.
TEST(HostileFlags, Overflow) {
  check_all({
      {"--kv-budget 1e20 tokens", run({"--kv-budget", "99999999999999999999"}), 1, R"(invalid --kv-budget "99999999999999999999" .*1\.\.2147483647)"},
      {"--kv-budget over int32 tokens", run({"--kv-budget", "2147483648"}), 1, R"(invalid --kv-budget "2147483648")"},
      {"--kv-budget over 4 EiB", run({"--kv-budget", "99999999999GiB"}), 1, R"(invalid --kv-budget "99999999999GiB" .*4 EiB)"},
      {"--kv-budget 40 digits", run({"--kv-budget", std::string(40, '9') + "%"}), 1, R"(invalid --kv-budget)"},
      {"-n 1e20", run({"-n", "99999999999999999999"}), 2, R"(--n-predict: 1e\+20 is out of range \(-1\.\.16777216\))"},
      {"-c over the largest context", run({"-c", "16777217"}), 1, R"(invalid -c "16777217" .*0\.\.16777216)"},
      {"-c 1e9", run({"-c", "1e9"}), 1, R"(invalid -c "1e9")"},
      {"eval --ctx nan", cmd("eval", {"--ctx", "nan"}), 1, R"(invalid --ctx "nan" .*64\.\.16777216)"},
      {"eval --ctx inf", cmd("eval", {"--ctx", "1k,inf"}), 1, R"(invalid --ctx "inf")"},
      {"eval --ctx 1e20", cmd("eval", {"--ctx", "99999999999999999999k"}), 1, R"(invalid --ctx "99999999999999999999k")"},
      {"eval --ctx 4.5", cmd("eval", {"--ctx", "100.5"}), 1, R"(invalid --ctx "100\.5" \(a whole number)"},
      {"run --chunk -100000", run({"--chunk", "-100000"}), 2, R"(--chunk: -100000 is out of range \(1\.\.65536\))"},
      {"eval --chunk -100000", cmd("eval", {"--chunk", "-100000"}), 2, R"(--chunk: -100000 is out of range \(1\.\.65536\))"},
      {"bench --chunk 1e12", cmd("bench", {"--chunk", "1000000000000"}), 2, R"(--chunk: 1000000000000 is out of range \(1\.\.65536\))"},
      {"head map budget int max", with_map("budget-max", [](auto& j) { j["heads"][3]["budget"] = 2147483647; }), 1,
       R"(budget-max\.json: heads\[3\] "budget": 2147483647 is out of range \(1\.\.16777216\))"},
      {"head map layer 1e20", with_map("layer-1e20", [](auto& j) { j["heads"][0]["layer"] = 1e20; }), 1,
       R"(layer-1e20\.json: heads\[0\] "layer": 1e\+20 is not a whole number \(0\.\.7\))"},
      {"head map layer over uint64", with_map("layer-u64", [](auto& j) { j["heads"][2]["layer"] = 18446744073709551615ull; }), 1,
       R"(heads\[2\] "layer": 18446744073709551615 is out of range \(0\.\.7\))"},
      {"head map window -5", with_map("window-neg", [](auto& j) { j["heads"][1]["window"] = -5; }), 1,
       R"(heads\[1\] "window": -5 is out of range \(1\.\.16777216\))"},
      {"head map n_layer huge", with_map("n-layer", [](auto& j) { j["model"]["n_layer"] = 4000000000ll; }), 1,
       R"(n-layer\.json: model "n_layer": 4000000000 is out of range \(1\.\.4096\))"},
      {"head map score a string", with_map("score", [](auto& j) { j["heads"][5]["retrieval_score"] = "high"; }), 1,
       R"(heads\[5\] "retrieval_score": "high" is not a number)"},
      {"head map policy with a newline", with_map("policy-nl", [](auto& j) { j["heads"][4]["policy"] = "full\nerror: x"; }), 1,
       R"(heads\[4\] "policy": .* contains a control character)"},
      {"head map heads not an array", with_map("heads-obj", [](auto& j) { j["heads"] = {{"a", 1}}; }), 1,
       R"(heads-obj\.json: the top level "heads": an object is not an array)"},
  });
}

// Memory without bound: `--depths 0:100:1e-300` took 1.5 GB in 0.6 s.
TEST(HostileFlags, DepthsAreCapped) {
  check_all({
      {"--depths 0:100:1e-300", cmd("eval", {"--depths", "0:100:1e-300"}), 1, R"(invalid --depths "0:100:1e-300")", 300, 10},
      {"--depths 0:100:0.00001", cmd("eval", {"--depths", "0:100:0.00001"}), 1,
       R"(invalid --depths "0:100:0\.00001": the range has 10000001 depths .*at most 1001)", 300, 10},
      {"--depths 0:100:0.000000000000000000000000001", cmd("eval", {"--depths", "0:100:0.000000000000000000000000001"}), 1,
       R"(invalid --depths .*at most 1001)", 300, 10},
      {"--depths list too long", cmd("eval", {"--depths", [] {
         std::string s = "1";
         for (int i = 0; i < 2000; ++i) s += ",1";
         return s;
       }()}), 1, R"(invalid --depths .*too many depths)", 300, 10},
      {"--depths nan", cmd("eval", {"--depths", "nan,50"}), 1, R"(invalid --depths "nan,50": "nan" is not a number)"},
      {"--depths 101", cmd("eval", {"--depths", "10,101"}), 1, R"(invalid --depths "10,101": 101 is above 100)"},
      {"--depths reversed", cmd("eval", {"--depths", "50:10:5"}), 1, R"(START is above END)"},
      {"--depths zero step", cmd("eval", {"--depths", "0:100:0"}), 1, R"(STEP must be above 0)"},
      {"--depths two parts", cmd("eval", {"--depths", "0:100"}), 1, R"(a range has three parts)"},
  });
}

// Values that made no sense but were accepted.
TEST(HostileFlags, RunSilentAcceptance) {
  check_all({
      {"-t -3", run({"-t", "-3"}), 2, R"(--threads: -3 is out of range \(0\.\.512\))"},
      {"-t 1000", run({"-t", "1000"}), 2, R"(--threads: 1000 is out of range \(0\.\.512\))"},
      {"--top-p 2", run({"--top-p", "2"}), 2, R"(--top-p: 2 is out of range \(0\.\.1\))"},
      {"--top-k -5", run({"--top-k", "-5"}), 2, R"(--top-k: -5 is out of range \(0\.\.2147483647\))"},
      {"--temp nan", run({"--temp", "nan"}), 2, R"(--temp: nan is out of range \(0\.\.100\))"},
      {"--temp -1", run({"--temp", "-1"}), 2, R"(--temp: -1 is out of range)"},
      {"--temp inf", run({"--temp", "inf"}), 2, R"(--temp: inf is out of range)"},
      {"--min-p 2", run({"--min-p", "2"}), 2, R"(--min-p: 2 is out of range \(0\.\.1\))"},
      {"--repeat-penalty -1", run({"--repeat-penalty", "-1"}), 2, R"(--repeat-penalty: -1 is out of range \(above 0, at most 100\))"},
      {"--repeat-penalty 0", run({"--repeat-penalty", "0"}), 2, R"(--repeat-penalty: 0 is out of range)"},
      {"--presence-penalty 5", run({"--presence-penalty", "5"}), 2, R"(--presence-penalty: 5 is out of range \(-2\.\.2\))"},
      {"--frequency-penalty nan", run({"--frequency-penalty", "nan"}), 2, R"(--frequency-penalty: nan is out of range)"},
      {"--repeat-last-n -2", run({"--repeat-last-n", "-2"}), 2, R"(--repeat-last-n: -2 is out of range)"},
      {"-c -5", run({"-c", "-5"}), 1, R"(invalid -c "-5" .*0\.\.16777216)"},
      {"-n -2", run({"-n", "-2"}), 2, R"(--n-predict: -2 is out of range \(-1\.\.16777216\))"},
      {"--seed -1", run({"--seed", "-1"}), 2, R"(--seed: "-1" is not a whole number in 0\.\.18446744073709551615)"},
      {"--seed 1.5", run({"--seed", "1.5"}), 2, R"(--seed: "1\.5" is not a whole number)"},
      {"--seed over uint64", run({"--seed", "18446744073709551616"}), 2, R"(--seed: .* is not a whole number)"},
      {"--page-size 0", run({"--page-size", "0"}), 2, R"(--page-size: 0 is out of range \(1\.\.4096\))"},
      {"--page-size 100000", run({"--page-size", "100000"}), 2, R"(--page-size: 100000 is out of range \(1\.\.4096\))"},
      {"--kv-budget 1.5.3%", run({"--kv-budget", "1.5.3%"}), 1, R"(invalid --kv-budget "1\.5\.3%")"},
      {"--kv-budget 0", run({"--kv-budget", "0"}), 1, R"(invalid --kv-budget "0")"},
      {"--kv-budget 101%", run({"--kv-budget", "101%"}), 1, R"(invalid --kv-budget "101%")"},
      {"--kv-budget 1e3", run({"--kv-budget", "1e3"}), 1, R"(invalid --kv-budget "1e3")"},
      {"--kv-budget .5", run({"--kv-budget", ".5%"}), 1, R"(invalid --kv-budget "\.5%")"},
      {"--kv-budget 0.1B", run({"--kv-budget", "0.1B"}), 1, R"(invalid --kv-budget "0\.1B")"},
      {"-f a folder", cmd("run", {"-f", scratch()}), 1, R"(the prompt file is a directory, not a regular file)"},
  });
}

TEST(HostileFlags, BenchEvalProfileSilentAcceptance) {
  check_all({
      {"bench -t 1000", cmd("bench", {"-t", "1000"}), 1, R"(-t expects a comma-separated list of whole numbers in 0\.\.512; "1000")"},
      {"bench -t 1,-3", cmd("bench", {"-t", "1,-3"}), 1, R"(-t expects .*"-3")"},
      {"bench --page-size 0", cmd("bench", {"--page-size", "0"}), 2, R"(--page-size: 0 is out of range)"},
      {"bench --kv-budget 12.x", cmd("bench", {"--kv-budget", "12.x"}), 1, R"(invalid --kv-budget "12\.x")"},
      {"eval -t 1000", cmd("eval", {"-t", "1000"}), 2, R"(--threads: 1000 is out of range \(0\.\.512\))"},
      {"eval --samples 0", cmd("eval", {"--samples", "0"}), 2, R"(--samples: 0 is out of range \(1\.\.100000\))"},
      {"eval --seed -1", cmd("eval", {"--seed", "-1"}), 2, R"(--seed: "-1" is not a whole number)"},
      {"eval --page-size -1", cmd("eval", {"--page-size", "-1"}), 2, R"(--page-size: -1 is out of range)"},
      {"eval --budget 1.5.3%", cmd("eval", {"--budget", "25%,1.5.3%"}), 1, R"(invalid --budget "1\.5\.3%")"},
      {"eval --ctx 32", cmd("eval", {"--ctx", "1k,32"}), 1, R"(invalid --ctx "32" .*64\.\.16777216)"},
      {"eval --policy bogus", cmd("eval", {"--policy", "full,bogus"}), 2, R"(--policy: bogus not in)"},
      {"eval --tasks bogus", cmd("eval", {"--tasks", "niah,bogus"}), 1, R"(unknown task 'bogus')"},
      {"profile -t -1", cmd("profile", {"-t", "-1"}), 2, R"(--threads: -1 is out of range \(0\.\.512\))"},
      {"profile --probes 0", cmd("profile", {"--probes", "0"}), 2, R"(--probes: 0 is out of range \(1\.\.100000\))"},
      {"profile --natural -1", cmd("profile", {"--natural", "-1"}), 2, R"(--natural: -1 is out of range)"},
      {"profile --ablation -1", cmd("profile", {"--ablation", "-1"}), 2, R"(--ablation: -1 is out of range)"},
      {"profile --sinks -1", cmd("profile", {"--sinks", "-1"}), 2, R"(--sinks: -1 is out of range \(0\.\.4096\))"},
      {"profile --window 8", cmd("profile", {"--window", "8"}), 2, R"(--window: 8 is out of range \(16\.\.16777216\))"},
      {"profile --prefill-tolerance 2", cmd("profile", {"--prefill-tolerance", "2"}), 2, R"(--prefill-tolerance: 2 is out of range \(0\.\.1\))"},
      {"profile --prefill-tolerance nan", cmd("profile", {"--prefill-tolerance", "nan"}), 2, R"(--prefill-tolerance: nan is out of range)"},
      {"profile --prefill-probes 0", cmd("profile", {"--prefill-probes", "0"}), 2, R"(--prefill-probes: 0 is out of range)"},
      {"profile --target-budget 1024", cmd("profile", {"--target-budget", "1024"}), 1, R"(--target-budget "1024" must be a percentage)"},
      {"profile --target-budget 150%", cmd("profile", {"--target-budget", "150%"}), 1, R"(invalid --target-budget "150%")"},
      {"profile --ctx 32", cmd("profile", {"--ctx", "32", "-o", scratch() + "/p.json"}), 1, R"(--ctx 32 is out of range \(0 for the trained context, or 64\.\.16777216\))"},
      {"profile --ctx nan", cmd("profile", {"--ctx", "nan"}), 1, R"(invalid --ctx "nan")"},
      {"profile --seed -1", cmd("profile", {"--seed", "-1"}), 2, R"(--seed: "-1" is not a whole number)"},
      {"profile --page-size 0", cmd("profile", {"--page-size", "0"}), 2, R"(--page-size: 0 is out of range)"},
  });
}

// Messages that blamed --kv-budget (or came after all the compute) now name the actual cause, early.
TEST(HostileFlags, MessagesNameTheirCause) {
  const std::string file = scratch() + "/a-file";
  std::ofstream(file) << "x";
  check_all({
      {"share of a short context", run({"-c", "64", "--kv-policy", "streaming", "--kv-budget", "25%"}), 1,
       R"(--kv-budget 25% of a 64-token context is 15 tokens per head, 0 pages of 32 \(--page-size\); streaming needs at least 3)"},
      {"topk under the page size", run({"--kv-policy", "topk", "--kv-budget", "100", "--page-size", "64"}), 1,
       R"(--kv-budget 100 is 100 tokens per head, 1 pages of 64 \(--page-size\); topk needs at least 4)"},
      {"evict too small", run({"--kv-policy", "evict", "--kv-budget", "20"}), 1, R"(--kv-budget 20 is 20 tokens per head, too small for evict)"},
      {"bytes under one page per head", run({"--kv-budget", "1KiB"}), 1,
       R"(--kv-budget 1KiB is too small: it holds 0 pages of 32 tokens \(--page-size\))"},
      {"--chunk 0", run({"--chunk", "0"}), 2, R"(--chunk: 0 is out of range \(1\.\.65536\))"},
      {"eval --ctx 10", cmd("eval", {"--ctx", "10"}), 1, R"(invalid --ctx "10")"},
      {"eval -o /proc/x", cmd("eval", {"-o", "/proc/x"}), 1, R"(-o "/proc/x": cannot create the folder)", 0, 3},
      {"eval -o a file", cmd("eval", {"-o", file}), 1, R"(-o ".*a-file": cannot create the folder)", 0, 3},
      {"profile -o /proc/x", cmd("profile", {"-o", "/proc/x/heads.json"}), 1, R"(-o "/proc/x/heads\.json": cannot write there)", 0, 3},
      {"profile --png /proc/x", cmd("profile", {"-o", scratch() + "/h.json", "--png", "/proc/x/h.png"}), 1,
       R"(--png "/proc/x/h\.png": cannot write there)", 0, 3},
      {"profile -o a folder", cmd("profile", {"-o", scratch()}), 1, R"(-o ".*": cannot write there)", 0, 3},
  });
}

// -c above the trained context (4096) is allowed with one warning; -c 0 and -t 0 keep their meaning.
TEST(HostileFlags, ContextBeyondTrainedWarnsOnceAndRuns) {
  auto warnings = [](const std::string& out) {
    size_t n = 0;
    for (size_t at = out.find("warning: "); at != std::string::npos; at = out.find("warning: ", at + 1))
      if (at == 0 || out[at - 1] == '\n') ++n;
    return n;
  };
  headroom::test::ChildResult r = headroom::test::run_child(run({"-c", "8k", "--temp", "0"}), 60);
  ASSERT_TRUE(r.exited) << r.out;
  EXPECT_EQ(r.code, 0) << r.out;
  EXPECT_EQ(warnings(r.out), 1u) << r.out;
  EXPECT_NE(r.out.find("warning: a context of 8192 tokens is beyond the model's trained context of 4096"), std::string::npos) << r.out;
  EXPECT_EQ(r.out.find("error: "), std::string::npos) << r.out;

  r = headroom::test::run_child(run({"-c", "0", "-t", "0", "--temp", "0"}), 60);
  EXPECT_EQ(r.code, 0) << r.out;
  EXPECT_EQ(warnings(r.out), 0u) << r.out;

  // The crafted head map base the Overflow rows edit is itself valid.
  r = headroom::test::run_child(with_map("valid", [](auto&) {}), 60);
  EXPECT_EQ(r.code, 0) << r.out;
  EXPECT_EQ(r.out.find("error: "), std::string::npos) << r.out;
}

// Many sequences: --parallel, the prompts file, --kv-pool.
TEST(HostileFlags, ParallelPromptsAndPool) {
  const std::string dir = scratch();
  auto file = [&](const std::string& name, const std::string& text) {
    const std::string path = dir + "/" + name;
    std::ofstream(path, std::ios::binary) << text;
    return path;
  };
  auto prompts = [&](const std::string& path, std::vector<std::string> more = {}) {
    std::vector<std::string> a = cmd("run", {"--prompts", path, "-n", "2"});
    a.insert(a.end(), more.begin(), more.end());
    return a;
  };
  check_all({
      {"run --parallel 0", run({"--parallel", "0"}), 2, R"(--parallel: 0 is out of range \(1\.\.4096\))"},
      {"run -np 0", run({"-np", "0"}), 2, R"(--parallel: 0 is out of range)"},
      {"eval --parallel 0", cmd("eval", {"--parallel", "0"}), 2, R"(--parallel: 0 is out of range)"},
      {"bench --parallel 4,0", cmd("bench", {"--parallel", "4,0"}), 1, R"(--parallel expects .*"0")"},
      {"prompts: a number line", prompts(file("num.jsonl", "\"a\"\n42\n")), 1,
       R"(line 2 is JSON but not a string)"},
      {"prompts: not JSON", prompts(file("bare.jsonl", "hello there\n")), 1, R"(line 1 is not JSON)"},
      {"prompts: invalid UTF-8", prompts(file("utf8.jsonl", "\"ok\"\n\"bad \xC3\x28 byte\"\n")), 1,
       R"(line 2 is not valid UTF-8)"},
      {"prompts: empty file", prompts(file("empty.jsonl", "\n\n")), 1, R"(no prompts in the file)"},
      {"prompts: a directory", prompts(dir), 1, R"(prompts file)"},
      {"prompts and -p", prompts(file("one.jsonl", "\"a\"\n"), {"-p", "x"}), 1, R"(give one of -p, -f and --prompts)"},
      {"--kv-pool tokens", run({"--kv-pool", "1024"}), 2, R"(give bytes, like 4GiB)"},
      {"--kv-pool 0", run({"--kv-pool", "0b"}), 2, R"(--kv-pool: "0b": give bytes)"},
      {"--kv-pool below a page", run({"--kv-pool", "10b"}), 1, R"(--kv-pool 10b is smaller than one KV page)"},
  });
}

// Prompts that do not fit the pool at once run in waves (one notice); the one that can never fit fails with
// its reason while the others finish.
TEST(HostileFlags, PoolTooSmallForAllRunsInWavesAndRejectsOnlyTheMisfit) {
  const std::string path = scratch() + "/waves.jsonl";
  std::string big = "\"";
  for (int i = 0; i < 300; ++i) big += "word ";
  big += "\"\n";
  std::ofstream(path) << "\"Once upon a time\"\n" << big << "\"The cat sat\"\n\"A dog ran\"\n";
  // 16 heads x 2 pages of 32 tokens (F16, head_dim 64: 8 KiB K+V + positions per page) = about 260 KiB.
  headroom::test::ChildResult r = headroom::test::run_child(
      cmd("run", {"--prompts", path, "-n", "4", "--temp", "0", "--kv-pool", "300KiB"}), 60);
  ASSERT_TRUE(r.exited) << r.out;
  EXPECT_EQ(r.code, 0) << r.out;
  EXPECT_NE(r.out.find("run in waves"), std::string::npos) << r.out;
  EXPECT_EQ(r.out.find("run in waves"), r.out.rfind("run in waves")) << "one notice";
  EXPECT_NE(r.out.find("[2] stopped: its prompt of"), std::string::npos) << r.out;
  for (const char* ok : {"[1] load", "[3] load", "[4] load"}) {
    const size_t at = r.out.find(ok);
    ASSERT_NE(at, std::string::npos) << ok << "\n" << r.out;
    EXPECT_NE(r.out.find("stop: length", at), std::string::npos) << ok;
  }
}
