// `evict` (H2O / Scissorhands): every slot accumulates the attention probability it receives (summed over the
// group's query heads, by the attention kernel). When the head holds more than `budget` tokens, the tokens
// with the smallest accumulated attention are evicted before the next step, except the first `sinks` tokens
// and the most recent `window` tokens; the head's pages are then compacted and emptied pages given back.
#include <algorithm>

#include <nlohmann/json.hpp>

#include "kv/policy.h"
#include "util/error.h"
#include "util/parse.h"

namespace headroom {

namespace {
class EvictPolicy final : public Policy {
 public:
  using Policy::Policy;

  bool needs_scores(const HeadCache& h) const override { return h.tokens > spec_.budget; }

  void before_step(HeadCache& h, PagePool& pool, const StepInfo& s) override {
    const int64_t excess = h.tokens - spec_.budget;
    if (excess <= 0) return;
    const int32_t recent_from = s.pos0 - spec_.window;  // pos0: the next position this sequence sees
    cands_.clear();
    for (size_t i = 0; i < h.pages.size(); ++i) {
      const int32_t id = h.pages[i];
      const int32_t* pos = pool.pos(id);
      const float* sc = pool.scores(id);
      for (int k = 0; k < pool.used(id); ++k)
        if (pos[k] >= spec_.sinks && pos[k] < recent_from) cands_.push_back({sc[k], int32_t(i), k});
    }
    const size_t k = std::min<size_t>(cands_.size(), size_t(excess));
    std::partial_sort(cands_.begin(), cands_.begin() + ptrdiff_t(k), cands_.end(), [](const Cand& a, const Cand& b) {
      return a.score < b.score || (a.score == b.score && (a.page < b.page || (a.page == b.page && a.slot < b.slot)));
    });
    for (size_t j = 0; j < k; ++j) pool.mark_evicted(h.pages[size_t(cands_[j].page)], cands_[j].slot);
    compact_pages(h, pool);
  }

  void plan(const HeadCache&, const PagePool&, const StepInfo&, AttnJob& job) const override {
    job.score = 1;
  }

  int64_t max_tokens(int64_t n_ctx, int page_size) const override {
    return std::min<int64_t>(n_ctx, (int64_t(spec_.budget) + page_size - 1) / page_size * page_size + page_size);
  }

 private:
  struct Cand {
    float score;
    int32_t page;
    int slot;
  };
  std::vector<Cand> cands_;
};

PolicySpec uniform(int64_t t, int, const std::string& what) {
  PolicySpec s;
  s.kind = PolicyKind::Evict;
  if (t < s.sinks + 32) fail("{} is {} tokens per head, too small for evict (needs >= {})", what, t, s.sinks + 32);
  s.budget = int(std::min<int64_t>(t, kMaxContext));
  s.window = s.budget / 2;
  return s;
}
}  // namespace

extern const PolicyDescriptor kEvictPolicy{
    PolicyKind::Evict, "evict", "the tokens with the most accumulated attention (H2O)",
    make_policy_as<EvictPolicy>,
    uniform,
    [](const PolicySpec& s, nlohmann::json& x) {
      x["budget"] = s.budget;
      x["sinks"] = s.sinks;
      x["window"] = s.window;
    },
    [](const nlohmann::json& x, PolicySpec& s, const JsonPlace& at) {
      s.budget = int(json_int(x, at, "budget", {1, double(kMaxContext)}, s.budget));
      s.sinks = int(json_int(x, at, "sinks", {0, double(kMaxContext)}, s.sinks));
      s.window = int(json_int(x, at, "window", {1, double(kMaxContext)}, s.window));
    },
    false, true, [](const PolicySpec&) { return false; }};

}  // namespace headroom
