// `topk` (Quest): every page keeps the elementwise min and max of its keys. At a decode step the score of a
// page for this KV head is  sum over the group's query heads h of  sum_d max(q_hd * min_d, q_hd * max_d),
// an upper bound of the largest q·k in the page. The head attends the top `topk_pages` pages by score plus
// the sink page and the `recent_pages` most recent pages, exactly. Prefill attends everything (as Quest does).
// With `offload` set only the pages in use stay on the device: at a decode step the unchosen pages go to the
// host tier before the chosen ones are fetched back; while a prompt is prefilled every page but the sink and
// recent ones is parked there after each chunk, and the next chunks read it in place.
#include <algorithm>
#include <numeric>

#include "kv/policy.h"
#include "util/error.h"

namespace headroom {

namespace {
class TopKPolicy final : public Policy {
 public:
  using Policy::Policy;
  PolicyKind kind() const override { return PolicyKind::TopK; }

  void select(HeadCache& h, PagePool& pool, const QueryView& q, std::vector<AttnPage>& pages, int32_t& sinks,
              int32_t& window) override {
    sinks = window = 0;
    const size_t n = h.pages.size();
    h.selected.assign(n, 0);
    const size_t recent_from = n > size_t(spec_.recent_pages) ? n - spec_.recent_pages : 0;
    if (q.n_rows > 1 || n <= size_t(1 + spec_.recent_pages + spec_.topk_pages)) {
      std::fill(h.selected.begin(), h.selected.end(), 1);
    } else {
      h.selected[0] = 1;
      for (size_t i = recent_from; i < n; ++i) h.selected[i] = 1;
      scores_.assign(n, 0.0f);
      for (size_t i = 1; i < recent_from; ++i) scores_[i] = page_score(pool, h.pages[i], q);
      order_.resize(recent_from > 1 ? recent_from - 1 : 0);
      std::iota(order_.begin(), order_.end(), size_t{1});
      const size_t k = std::min(order_.size(), size_t(spec_.topk_pages));
      std::partial_sort(order_.begin(), order_.begin() + k, order_.end(),
                        [&](size_t a, size_t b) { return scores_[a] > scores_[b] || (scores_[a] == scores_[b] && a < b); });
      for (size_t j = 0; j < k; ++j) h.selected[order_[j]] = 1;
    }
    // Unchosen pages leave the device before chosen ones come back, so a step never holds more than it attends.
    if (spec_.offload)
      for (size_t i = 0; i < n; ++i)
        if (!h.selected[i]) pool.offload(h.pages[i]);
    for (size_t i = 0; i < n; ++i) {
      if (!h.selected[i]) continue;
      // Prefill reads parked pages where they are (on a GPU: pinned host memory over the bus).
      if (!q.prefill && pool.on_host(h.pages[i]) && !pool.fetch(h.pages[i]))
        fail("KV budget exhausted: no device page free to fetch a chosen page back from the host tier "
             "({} pages in use); raise --kv-budget", pool.device_pages());
      pages.push_back(view(pool, h.pages[i]));
    }
  }

  void after_step(HeadCache& h, PagePool& pool, int32_t, bool prefill) override {
    if (!spec_.offload || !prefill) return;
    // Park all but the sink page and the recent pages (the tail page is among them) until decoding chooses.
    const size_t n = h.pages.size();
    for (size_t i = 1; i + size_t(spec_.recent_pages) < n; ++i) pool.offload(h.pages[i]);
  }

  // Without offload every page stays on the device. With it, a decode step holds the sink page, the recent
  // pages and the chosen ones; a prefill chunk adds its own pages to the sink and recent ones.
  int64_t max_tokens(int64_t n_ctx, int page_size) const override {
    if (!spec_.offload) return n_ctx;
    return std::min<int64_t>(n_ctx, int64_t(1 + spec_.recent_pages + spec_.topk_pages) * page_size);
  }

 private:
  static float page_score(PagePool& pool, int32_t id, const QueryView& q) {
    const float* mn = pool.kmin(id);
    const float* mx = pool.kmax(id);
    float s = 0;
    const float* row = q.q + int64_t(q.n_rows - 1) * q.stride;
    for (int g = 0; g < q.n_group; ++g) {
      const float* qh = row + int64_t(q.head0 + g) * q.head_dim;
      for (int d = 0; d < q.head_dim; ++d) s += std::max(qh[d] * mn[d], qh[d] * mx[d]);
    }
    return s;
  }
  std::vector<float> scores_;
  std::vector<size_t> order_;
};
}  // namespace

std::unique_ptr<Policy> make_topk_policy(const PolicySpec& s) { return std::make_unique<TopKPolicy>(s); }

}  // namespace headroom
