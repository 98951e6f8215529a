// `streaming` (StreamingLLM; DuoAttention's streaming heads): the first `sinks` tokens plus the last `window`
// tokens. Pages whose every token has fallen out of the window (and holds no sink) are given back at once.
#include <algorithm>

#include "kv/policy.h"

namespace headroom {

namespace {
class StreamingPolicy final : public Policy {
 public:
  using Policy::Policy;
  PolicyKind kind() const override { return PolicyKind::Streaming; }

  void select(HeadCache& h, PagePool& pool, const QueryView& q, std::vector<AttnPage>& pages, int32_t& sinks,
              int32_t& window) override {
    for (int32_t id : h.pages) pages.push_back(view(pool, id));
    const bool full_now = spec_.prefill_full && q.prefill;
    sinks = full_now ? 0 : spec_.sinks;
    window = full_now ? 0 : spec_.window;
  }

  void after_step(HeadCache& h, PagePool& pool, int32_t next_pos, bool prefill) override {
    if (spec_.prefill_full && prefill) return;  // the prompt's pages stay until the prefill ends
    // A token at position p is still needed by a query at q >= next_pos iff p < sinks or p > q - window.
    const int32_t oldest_needed = next_pos - spec_.window + 1;
    auto keep = [&](int32_t id) {
      const int32_t* pos = pool.pos(id);
      for (int s = 0; s < pool.used(id); ++s)
        if (pos[s] >= 0 && (pos[s] < spec_.sinks || pos[s] >= oldest_needed)) return true;
      return pool.used(id) < pool.page_size();  // the tail page is still being filled
    };
    size_t w = 0;
    for (size_t i = 0; i < h.pages.size(); ++i) {
      if (keep(h.pages[i])) {
        h.pages[w++] = h.pages[i];
      } else {
        h.tokens -= pool.used(h.pages[i]);
        pool.release(h.pages[i]);
      }
    }
    h.pages.resize(w);
  }

  int64_t max_tokens(int64_t n_ctx, int page_size) const override {
    if (spec_.prefill_full) return n_ctx;  // the whole prompt is held until its prefill ends
    return std::min<int64_t>(streaming_max_pages(spec_.window, page_size) * page_size, n_ctx);
  }
};
}  // namespace

std::unique_ptr<Policy> make_streaming_policy(const PolicySpec& s) { return std::make_unique<StreamingPolicy>(s); }

}  // namespace headroom
