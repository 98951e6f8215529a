// `topk` (Quest): every page keeps the elementwise min and max of its keys (in the device tier, for every
// page wherever its K/V are). At a decode step the head attends the sink page, the `recent_pages` most recent
// pages and the `topk_pages` best of the others by Quest's bound, an upper bound of the largest q·k in the
// page (scored and chosen on the backend inside the layer: select_pages). Prefill attends everything, as
// Quest does.
// With `offload` only the pages in use stay on the device: after a decode step the pages it did not read go
// to the host tier, and at the next step, once its new rows have their pages, the ones it read come back if
// there is room; a chosen page still in the host tier is read where it is. While a prompt is prefilled every
// page but the sink and recent ones is parked there after each chunk, and the next chunks read it in place.
#include <algorithm>

#include <nlohmann/json.hpp>

#include "kv/policy.h"
#include "util/error.h"
#include "util/parse.h"

namespace headroom {

namespace {
class TopKPolicy final : public Policy {
 public:
  using Policy::Policy;

  void before_step(HeadCache& h, PagePool& pool, const StepInfo&) override {
    if (!spec_.offload || h.selected.size() != h.pages.size()) return;
    for (size_t i = 0; i < h.pages.size(); ++i)
      if (!h.selected[i]) h.pages.set(i, pool.offload(h.pages[i]));
  }

  void prefetch(HeadCache& h, PagePool& pool, const StepInfo& s) override {
    if (!spec_.offload || s.prefill || h.selected.size() != h.pages.size()) return;
    for (size_t i = 0; i < h.pages.size(); ++i)
      if (h.selected[i] && pool.on_host(h.pages[i]))
        if (int32_t id = pool.fetch(h.pages[i]); id >= 0) h.pages.set(i, id);
  }

  void plan(const HeadCache& h, const PagePool&, const StepInfo& s, AttnJob& job) const override {
    const size_t n = h.pages.size();
    if (s.prefill || n <= size_t(1 + spec_.recent_pages + spec_.topk_pages)) return;  // everything
    job.cand0 = 1;
    job.n_cand = int32_t(n - 1 - size_t(spec_.recent_pages));
    job.select_k = spec_.topk_pages;
  }

  void after_step(HeadCache& h, PagePool& pool, const StepInfo& s, std::span<const int32_t> read) override {
    h.selected.assign(h.pages.size(), 0);
    for (size_t i = 0, j = 0; i < h.pages.size() && j < read.size(); ++i)  // both in position order
      if (h.pages[i] == read[j]) {
        h.selected[i] = 1;
        ++j;
      }
    if (!spec_.offload || !s.prefill) return;
    // Park all but the sink page and the recent pages (the tail page is among them) until decoding chooses.
    const size_t n = h.pages.size();
    for (size_t i = 1; i + size_t(spec_.recent_pages) < n; ++i) h.pages.set(i, pool.offload(h.pages[i]));
    h.selected.clear();
  }

  // Without offload every page stays on the device. With it, a decode step holds the sink page, the recent
  // pages and the chosen ones; a prefill chunk adds its own pages to the sink and recent ones.
  int64_t max_tokens(int64_t n_ctx, int page_size) const override {
    if (!spec_.offload) return n_ctx;
    return std::min<int64_t>(n_ctx, int64_t(1 + spec_.recent_pages + spec_.topk_pages) * page_size);
  }
};

PolicySpec uniform(int64_t t, int page_size, const std::string& what) {
  PolicySpec s;
  s.kind = PolicyKind::TopK;
  s.offload = true;
  const int64_t pages = t / page_size;
  if (pages < 1 + s.recent_pages + 1)
    fail("{} is {} tokens per head, {} pages of {} (--page-size); topk needs at least {} (sink, {} recent, 1 chosen)",
         what, t, pages, page_size, 2 + s.recent_pages, s.recent_pages);
  s.topk_pages = int(std::min<int64_t>(pages - 1 - s.recent_pages, kMaxContext));
  return s;
}
}  // namespace

extern const PolicyDescriptor kTopKPolicy{
    PolicyKind::TopK, "topk", "sink + recent pages + the best pages by Quest's key bound",
    make_policy_as<TopKPolicy>,
    uniform,
    [](const PolicySpec& s, nlohmann::json& x) {
      x["topk_pages"] = s.topk_pages;
      x["recent_pages"] = s.recent_pages;
      if (s.offload) x["offload"] = 1;
    },
    [](const nlohmann::json& x, PolicySpec& s, const JsonPlace& at) {
      s.topk_pages = int(json_int(x, at, "topk_pages", {1, double(kMaxContext)}, s.topk_pages));
      s.recent_pages = int(json_int(x, at, "recent_pages", {1, double(kMaxContext)}, s.recent_pages));
      s.offload = json_int(x, at, "offload", {0, 1}, s.offload ? 1 : 0) != 0;  // 1: unread pages in the host tier
    },
    true, false, [](const PolicySpec& s) { return s.offload; }};

}  // namespace headroom
