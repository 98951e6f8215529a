// `streaming` (StreamingLLM; DuoAttention's streaming heads): the first `sinks` tokens plus the last `window`
// tokens. Pages whose every token has fallen out of the window (and holds no sink) are given back after the
// step. While a prompt is prefilled the head follows its PrefillMode (policy.h): the window from the start,
// or the whole prompt with its old pages kept on the device (full) or parked in the host tier (offload) until
// the prefill ends. Host-tier pages are read where they are (on a GPU: pinned memory over the bus).
#include <algorithm>

#include <nlohmann/json.hpp>

#include "kv/policy.h"
#include "util/error.h"
#include "util/parse.h"

namespace headroom {

namespace {
class StreamingPolicy final : public Policy {
 public:
  using Policy::Policy;

  void plan(const HeadCache&, const PagePool&, const StepInfo& s, AttnJob& job) const override {
    const bool whole_prompt = spec_.prefill != PrefillMode::Window && s.prefill;
    job.sinks = whole_prompt ? 0 : spec_.sinks;
    job.window = whole_prompt ? 0 : spec_.window;
  }

  void after_step(HeadCache& h, PagePool& pool, const StepInfo& s, std::span<const int32_t>) override {
    if (s.more_prompt() && spec_.prefill == PrefillMode::Full) return;  // kept until the prefill ends
    const bool park = s.more_prompt() && spec_.prefill == PrefillMode::Offload;
    filter_pages(
        h, [&](int32_t id) { return page_in_window(pool, id, spec_.sinks, spec_.window, s.next_pos()); },
        [&](int32_t id) -> int32_t {
          if (park) return pool.offload(id);  // still read by the rest of the prompt, from the host tier
          h.tokens -= pool.used(id);
          pool.release(id);
          return -1;
        });
  }

  int64_t max_tokens(int64_t n_ctx, int page_size) const override {
    if (spec_.prefill == PrefillMode::Full) return n_ctx;  // the whole prompt is held until its prefill ends
    return std::min<int64_t>(streaming_max_pages(spec_.window, page_size, spec_.sinks) * page_size, n_ctx);
  }
};

// The largest window whose pages (counted whole) fit in the budget: window = (pages - 2) * page + 1.
PolicySpec uniform(int64_t t, int page_size, const std::string& what) {
  PolicySpec s;
  s.kind = PolicyKind::Streaming;
  const int64_t pages = t / page_size;
  if (pages < 3)
    fail("{} is {} tokens per head, {} pages of {} (--page-size); streaming needs at least 3 (sinks, window, tail)",
         what, t, pages, page_size);
  s.window = int(std::min<int64_t>((pages - 2) * page_size + 1, kMaxContext));
  return s;
}
}  // namespace

extern const PolicyDescriptor kStreamingPolicy{
    PolicyKind::Streaming, "streaming", "sinks + a recent window (StreamingLLM)",
    make_policy_as<StreamingPolicy>,
    uniform,
    [](const PolicySpec& s, nlohmann::json& x) {
      x["sinks"] = s.sinks;
      x["window"] = s.window;
      if (s.prefill != PrefillMode::Window) x["prefill"] = prefill_mode_name(s.prefill);
    },
    [](const nlohmann::json& x, PolicySpec& s, const JsonPlace& at) {
      s.sinks = int(json_int(x, at, "sinks", {0, double(kMaxContext)}, s.sinks));
      s.window = int(json_int(x, at, "window", {1, double(kMaxContext)}, s.window));
      const std::string mode = json_string(x, at, "prefill", "window");
      try {
        s.prefill = parse_prefill_mode(mode);
      } catch (const Error& e) {
        fail("{}: {} \"prefill\": {}", at.file, at.where, e.what());
      }
    },
    false, false, [](const PolicySpec& s) { return s.prefill == PrefillMode::Offload; }};

}  // namespace headroom
