// The head profiler on the long-context model: it must find the retrieval head, assign within the budget, and
// choose the streaming heads' prefill from what the probes show.
#include <gtest/gtest.h>

#include <cmath>

#include "eval/tasks.h"
#include "profile/profiler.h"
#include "test_models.h"
#include "test_util.h"

using namespace headroom;

namespace {

using test::retrieval_model;
Backend& backend() { return test::cpu_backend(); }
const eval::TaskGen& task_gen() {
  static eval::TaskGen g = eval::TaskGen::from_shared(retrieval_model().tokenizer(), test::shared_dir());
  return g;
}
int index_of(int layer, int kv_head) { return layer * retrieval_model().config().n_head_kv + kv_head; }

}  // namespace

TEST(Profiler, FindsTheRetrievalHead) {
  profile::Options o;
  o.ctx = 1024;
  o.retrieval_prompts = 3;
  o.natural_prompts = 0;
  o.ablation_probes = 0;
  o.window = 64;
  profile::Scores s = profile::measure(retrieval_model(), backend(), task_gen(), o, nullptr);
  ASSERT_GT(s.copy_steps, 10);
  // The model card says retrieval lives in very few heads; the full-context profile finds layer 6 / head 0.
  const int best = int(std::max_element(s.retrieval.begin(), s.retrieval.end()) - s.retrieval.begin());
  EXPECT_EQ(best, index_of(6, 0));
  EXPECT_GE(s.retrieval[best], 0.8);
  int others_above = 0;
  for (size_t i = 0; i < s.retrieval.size(); ++i) others_above += int(i) != best && s.retrieval[i] > 0.2;
  EXPECT_EQ(others_above, 0);
  // A window of 64 at 1024 tokens changes every head's output (a relative L2 change; 0 would mean the head was
  // not restricted, NaN a broken norm).
  ASSERT_EQ(s.streaming_error.size(), s.retrieval.size());
  for (double e : s.streaming_error) {
    EXPECT_TRUE(std::isfinite(e)) << e;
    EXPECT_GT(e, 1e-3);
  }
}

TEST(Profiler, AssignKeepsTheBestHeadsFullWithinTheTarget) {
  const ModelConfig& c = retrieval_model().config();
  const int H = c.n_layer * c.n_head_kv;
  profile::Scores s;
  s.n_layer = c.n_layer;
  s.n_head_kv = c.n_head_kv;
  s.retrieval.assign(H, 0.0);
  s.streaming_error.assign(H, 0.1);
  s.retrieval[index_of(6, 0)] = 1.0;
  s.retrieval[index_of(2, 1)] = 0.5;
  profile::Options o;
  o.prefill = PrefillMode::Offload;
  for (double target : {0.125, 0.25, 0.5}) {
    HeadMap m = profile::assign(retrieval_model().identity(), s, target, 4096, o);
    EXPECT_EQ(m.heads[index_of(6, 0)].spec.kind, PolicyKind::Full) << target;
    // At 12.5% a second full head would leave the other 14 no pages; from 25% on it fits.
    EXPECT_EQ(m.heads[index_of(2, 1)].spec.kind, target < 0.2 ? PolicyKind::Streaming : PolicyKind::Full) << target;
    EXPECT_EQ(m.count(PolicyKind::Full), target < 0.2 ? 1 : 2) << "only heads that score";
    // Pages counted whole, as the pool holds them.
    const int64_t fp = profile::full_pages(4096, o.page_size);
    int64_t pages = 0;
    for (const HeadEntry& e : m.heads) {
      pages += e.spec.kind == PolicyKind::Full ? fp : std::min(fp, streaming_max_pages(e.spec.window, o.page_size));
      if (e.spec.kind == PolicyKind::Streaming) {
        EXPECT_EQ(e.spec.prefill, PrefillMode::Offload);
      }
    }
    EXPECT_LE(double(pages), target * double(fp * H) + 1e-9) << target;
    EXPECT_GE(double(pages), 0.9 * target * double(fp * H)) << "the rest of the budget widens the windows";
  }
  EXPECT_THROW(profile::assign(retrieval_model().identity(), s, 0.01, 4096, o), Error) << "below the minimum windows";
}

TEST(Profiler, PrefillChoiceFollowsTheProbes) {
  const ModelConfig& c = retrieval_model().config();
  const int H = c.n_layer * c.n_head_kv;
  profile::Options o;
  profile::AnswerProbes probes(retrieval_model(), task_gen(), 6, 1024, 99);
  // The retrieval head full, every other head on an 8-token window: windowed prefill starves the needle's
  // representation, whole-prompt prefill does not (an answer then needs only the retrieval head and the
  // last few tokens).
  PolicySpec narrow{PolicyKind::Streaming};
  narrow.sinks = 4;
  narrow.window = 8;
  std::vector<PolicySpec> specs(H, narrow);
  specs[index_of(6, 0)] = PolicySpec{};
  profile::PrefillChoice ch = profile::choose_prefill(probes, backend(), specs, o);
  EXPECT_EQ(ch.n, 6);
  EXPECT_GE(ch.full.exact, 4);
  EXPECT_LT(ch.window.exact, ch.full.exact);
  EXPECT_GT(ch.offload.exact, ch.window.exact);
  EXPECT_EQ(ch.mode, PrefillMode::Offload);
  o.prefill_tolerance = 1.0;  // anything goes: the cheap mode
  EXPECT_EQ(profile::choose_prefill(probes, backend(), specs, o).mode, PrefillMode::Window);
  // With every head full the three runs are the same computation.
  std::vector<PolicySpec> all_full(H, PolicySpec{});
  profile::PrefillChoice same = profile::choose_prefill(probes, backend(), all_full, profile::Options{});
  EXPECT_EQ(same.window.exact, same.full.exact);
  EXPECT_EQ(same.offload.logprob, same.full.logprob);
  EXPECT_EQ(same.mode, PrefillMode::Window);
}
