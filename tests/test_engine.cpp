// The engine loop on real models: batch invariance (a sequence's logits are bitwise the same alone and in a
// batch of any size and mix, at the same thread count) on every bundled model, preemption that parks and
// resumes without changing a bit, waves, and rejection of what can never fit.
#include <gtest/gtest.h>

#include <cstring>
#include <map>
#include <random>

#include "engine/stack.h"
#include "test_models.h"

namespace headroom::test {
namespace {

const char* const kModels[] = {
    "models/retrieval-14m-q8_0.gguf",          "models/stories260K.gguf",
    "models/tinystories-656k-q8_0.gguf",       "models/arch/rand-llama-f16.gguf",
    "models/arch/rand-llama-linear-f16.gguf",  "models/arch/rand-llama-tied-f32.gguf",
    "models/arch/rand-llama3-ropefreqs-q8_0.gguf", "models/arch/rand-qwen2-bias-bf16.gguf",
};

std::vector<int32_t> random_ids(const Model& m, int n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int32_t> d(0, m.config().n_vocab - 1);
  std::vector<int32_t> v(static_cast<size_t>(n), 0);
  for (int32_t& x : v) x = d(rng);
  return v;
}

// What one sequence saw: every logits row, in order, and the tokens it generated.
struct Trace {
  std::vector<std::vector<float>> logits;
  std::vector<int32_t> tokens;
  FinishReason finish = FinishReason::None;
  bool operator==(const Trace& o) const {
    if (logits.size() != o.logits.size() || tokens != o.tokens || finish != o.finish) return false;
    for (size_t i = 0; i < logits.size(); ++i)
      if (logits[i].size() != o.logits[i].size() ||
          std::memcmp(logits[i].data(), o.logits[i].data(), logits[i].size() * sizeof(float)) != 0)
        return false;
    return true;
  }
};

struct Job {
  std::vector<int32_t> prompt;
  int n_predict;
  int add_at_step;  // staggered arrival
};

// Runs the jobs through one engine with `parallel` slots; returns each job's trace.
std::vector<Trace> run_jobs(const Model& m, const KVOptions& kvo, const std::vector<Job>& jobs, int parallel,
                            const std::string& kv_pool = "", std::vector<std::string>* notices = nullptr) {
  EngineStack st(m, cpu_backend(), plan_kv(m, kvo, 512), parallel, kvo.chunk, kv_pool);
  Engine& e = *st.engine;
  std::vector<Trace> out(jobs.size());
  e.on_logits = [&](Sequence& s, std::span<const float> row) {
    out[size_t(s.req.tag)].logits.emplace_back(row.begin(), row.end());
  };
  e.on_finish = [&](Sequence& s) {
    Trace& t = out[size_t(s.req.tag)];
    t.tokens.assign(s.tokens.begin() + s.n_prompt, s.tokens.end());
    t.finish = s.finish;
  };
  if (notices) e.on_notice = [&](const std::string& n) { notices->push_back(n); };
  size_t added = 0;
  for (int step = 0; added < jobs.size() || !e.scheduler().idle(); ++step) {
    for (size_t i = 0; i < jobs.size(); ++i)
      if (jobs[i].add_at_step == step) {
        Request q = st.request(jobs[i].prompt);
        q.sampling.temp = 0;
        q.n_predict = jobs[i].n_predict;
        q.ignore_eos = true;
        q.tag = int64_t(i);
        e.add(std::move(q));
        ++added;
      }
    e.step();
  }
  return out;
}

KVOptions kv_options(const std::string& policy = "full", const std::string& budget = "") {
  KVOptions o;
  o.page_size = 16;
  o.chunk = 32;
  o.policy = policy;
  o.budget = budget;
  return o;
}

TEST(BatchInvariance, EveryBundledModel) {
  for (const char* rel : kModels) {
    SCOPED_TRACE(rel);
    auto m = Model::load(shared(rel));
    // A mix: long and short prompts (several chunks, one chunk, one token), arriving at different steps.
    std::vector<Job> jobs = {{random_ids(*m, 70, 1), 6, 0}, {random_ids(*m, 130, 2), 4, 0},
                             {random_ids(*m, 1, 3), 8, 2},  {random_ids(*m, 33, 4), 5, 3},
                             {random_ids(*m, 9, 5), 7, 5}};
    const KVOptions kvo = kv_options();
    std::vector<Trace> alone;
    for (const Job& j : jobs) alone.push_back(run_jobs(*m, kvo, {Job{j.prompt, j.n_predict, 0}}, 1)[0]);
    for (int parallel : {2, 3, 5}) {
      std::vector<Trace> together = run_jobs(*m, kvo, jobs, parallel);
      for (size_t i = 0; i < jobs.size(); ++i) {
        ASSERT_EQ(together[i].logits.size(), size_t(jobs[i].n_predict));
        EXPECT_TRUE(together[i] == alone[i]) << "job " << i << " at --parallel " << parallel;
      }
    }
  }
}

TEST(BatchInvariance, PoliciesThatChooseOnTheBackend) {
  const Model& m = retrieval_model();
  std::vector<Job> jobs = {{random_ids(m, 300, 7), 12, 0}, {random_ids(m, 200, 8), 12, 0}, {random_ids(m, 90, 9), 12, 1}};
  for (auto [policy, budget] : {std::pair{"topk", "160"}, std::pair{"streaming", "96"}, std::pair{"evict", "128"}}) {
    SCOPED_TRACE(policy);
    const KVOptions kvo = kv_options(policy, budget);
    std::vector<Trace> together = run_jobs(m, kvo, jobs, 3);
    for (size_t i = 0; i < jobs.size(); ++i) {
      Trace alone = run_jobs(m, kvo, {Job{jobs[i].prompt, jobs[i].n_predict, 0}}, 1)[0];
      EXPECT_TRUE(together[i] == alone) << "job " << i;
    }
  }
}

TEST(Engine, PreemptionParksAndResumesWithoutChangingABit) {
  const Model& m = retrieval_model();
  const KVOptions kvo = kv_options();
  const int heads = m.config().n_layer * m.config().n_head_kv;
  // Two prompts of 40 tokens (3 pages per head each) in a pool of 7 pages per head: when both grow past 48
  // tokens the newest is parked in the host tier until the other is done.
  std::vector<Job> jobs = {{random_ids(m, 40, 11), 30, 0}, {random_ids(m, 40, 12), 30, 0}};
  KVSetup probe = plan_kv(m, kvo, 512);
  const std::string pool = fmt::format("{}b", int64_t(7) * heads * probe.layout.page_bytes());
  std::vector<std::string> notices;
  std::vector<Trace> tight = run_jobs(m, kvo, jobs, 2, pool, &notices);
  bool preempted = false;
  for (const std::string& n : notices) preempted |= n.find("preempted") != std::string::npos;
  EXPECT_TRUE(preempted) << "the pool was meant to run out";
  for (size_t i = 0; i < jobs.size(); ++i) {
    Trace alone = run_jobs(m, kvo, {jobs[i]}, 1)[0];
    EXPECT_EQ(tight[i].finish, FinishReason::Length);
    EXPECT_TRUE(tight[i] == alone) << "job " << i;
  }
}

TEST(Engine, WavesAndWhatCanNeverFit) {
  const Model& m = retrieval_model();
  const KVOptions kvo = kv_options();
  const int heads = m.config().n_layer * m.config().n_head_kv;
  KVSetup probe = plan_kv(m, kvo, 512);
  // A pool of 6 pages per head: one 60-token prompt (4 pages) at a time; a 200-token prompt never fits.
  const std::string pool = fmt::format("{}b", int64_t(6) * heads * probe.layout.page_bytes());
  std::vector<Job> jobs = {{random_ids(m, 60, 21), 4, 0}, {random_ids(m, 200, 22), 4, 0}, {random_ids(m, 60, 23), 4, 0},
                           {random_ids(m, 60, 24), 4, 0}};
  std::vector<std::string> notices;
  std::vector<Trace> t = run_jobs(m, kvo, jobs, 4, pool, &notices);
  EXPECT_EQ(t[0].finish, FinishReason::Length);
  EXPECT_EQ(t[1].finish, FinishReason::Pool);
  EXPECT_TRUE(t[1].logits.empty());
  EXPECT_EQ(t[2].finish, FinishReason::Length);
  EXPECT_EQ(t[3].finish, FinishReason::Length);
  bool waves = false;
  for (const std::string& n : notices) waves |= n.find("waves") != std::string::npos;
  EXPECT_TRUE(waves);
  EXPECT_TRUE(t[2] == run_jobs(m, kvo, {jobs[2]}, 1)[0]);
}

}  // namespace
}  // namespace headroom::test
