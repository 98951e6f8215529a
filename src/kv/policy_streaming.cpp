// `streaming` (StreamingLLM; DuoAttention's streaming heads): the first `sinks` tokens plus the last `window`
// tokens. Pages whose every token has fallen out of the window (and holds no sink) are given back at once.
// While a prompt is prefilled the head follows its PrefillMode (policy.h): the window from the start, or the
// whole prompt with its old pages kept on the device (full) or parked in the host tier (offload) until the
// prefill ends.
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
    // Host-tier pages (offload prefill) are read where they are: on CPU the tiers are the same memory; on a GPU
    // the host tier is pinned memory the kernel reads over the bus.
    for (int32_t id : h.pages) pages.push_back(view(pool, id));
    const bool whole_prompt = spec_.prefill != PrefillMode::Window && q.prefill;
    sinks = whole_prompt ? 0 : spec_.sinks;
    window = whole_prompt ? 0 : spec_.window;
  }

  void after_step(HeadCache& h, PagePool& pool, int32_t next_pos, bool prefill) override {
    if (prefill && spec_.prefill == PrefillMode::Full) return;  // the prompt's pages stay until the prefill ends
    const bool park = prefill && spec_.prefill == PrefillMode::Offload;
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
      const int32_t id = h.pages[i];
      if (keep(id)) {
        h.pages[w++] = id;
      } else if (park) {  // still read by the rest of the prompt: to the host tier until the prefill ends
        pool.offload(id);
        h.pages[w++] = id;
      } else {
        h.tokens -= pool.used(id);
        pool.release(id);
      }
    }
    h.pages.resize(w);
  }

  int64_t max_tokens(int64_t n_ctx, int page_size) const override {
    if (spec_.prefill == PrefillMode::Full) return n_ctx;  // the whole prompt is held until its prefill ends
    return std::min<int64_t>(streaming_max_pages(spec_.window, page_size) * page_size, n_ctx);
  }
};
}  // namespace

std::unique_ptr<Policy> make_streaming_policy(const PolicySpec& s) { return std::make_unique<StreamingPolicy>(s); }

}  // namespace headroom
