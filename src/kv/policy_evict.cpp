// `evict` (H2O / Scissorhands): every slot accumulates the attention probability it receives (summed over the
// group's query heads, from the attention kernel). When the head holds more than `budget` tokens, the tokens
// with the smallest accumulated attention are evicted, except the first `sinks` tokens and the most recent
// `window` tokens. The head's pages are then compacted, and emptied pages are given back.
#include <algorithm>
#include <cstring>

#include "kv/policy.h"

namespace headroom {

namespace {
class EvictPolicy final : public Policy {
 public:
  using Policy::Policy;
  PolicyKind kind() const override { return PolicyKind::Evict; }

  void select(HeadCache& h, PagePool& pool, const QueryView&, std::vector<AttnPage>& pages, int32_t& sinks,
              int32_t& window) override {
    for (int32_t id : h.pages) pages.push_back(view(pool, id, /*with_scores=*/true));
    sinks = window = 0;
  }

  void after_step(HeadCache& h, PagePool& pool, int32_t next_pos, bool) override {
    const int64_t excess = h.tokens - spec_.budget;
    if (excess <= 0) return;
    const int32_t recent_from = next_pos - spec_.window;
    cands_.clear();
    for (size_t i = 0; i < h.pages.size(); ++i) {
      const int32_t id = h.pages[i];
      const int32_t* pos = pool.pos(id);
      const float* sc = pool.score(id);
      for (int s = 0; s < pool.used(id); ++s)
        if (pos[s] >= spec_.sinks && pos[s] < recent_from) cands_.push_back({sc[s], int32_t(i), s});
    }
    const size_t k = std::min<size_t>(cands_.size(), size_t(excess));
    std::partial_sort(cands_.begin(), cands_.begin() + k, cands_.end(), [](const Cand& a, const Cand& b) {
      return a.score < b.score || (a.score == b.score && (a.page < b.page || (a.page == b.page && a.slot < b.slot)));
    });
    for (size_t j = 0; j < k; ++j) pool.pos(h.pages[cands_[j].page])[cands_[j].slot] = -1;
    compact(h, pool);
  }

  int64_t max_tokens(int64_t n_ctx, int page_size) const override {
    return std::min<int64_t>(n_ctx, (spec_.budget + page_size - 1) / page_size * page_size + page_size);
  }

 private:
  // Moves every live slot to the front of the page list, in order, and releases pages left empty.
  static void compact(HeadCache& h, PagePool& pool) {
    const int ps = pool.page_size(), hd = pool.head_dim();
    size_t wp = 0;
    int ws = 0;
    int64_t live = 0;
    for (size_t rp = 0; rp < h.pages.size(); ++rp) {
      const int32_t src = h.pages[rp];
      const int n_used = pool.used(src);
      for (int rs = 0; rs < n_used; ++rs) {
        if (pool.pos(src)[rs] < 0) continue;
        const int32_t dst = h.pages[wp];
        if (dst != src || ws != rs) {
          std::memcpy(pool.k(dst) + int64_t(ws) * hd, pool.k(src) + int64_t(rs) * hd, hd * sizeof(float));
          std::memcpy(pool.v(dst) + int64_t(ws) * hd, pool.v(src) + int64_t(rs) * hd, hd * sizeof(float));
          pool.pos(dst)[ws] = pool.pos(src)[rs];
          pool.score(dst)[ws] = pool.score(src)[rs];
        }
        ++live;
        if (++ws == ps) {
          pool.used(h.pages[wp]) = ps;
          ++wp;
          ws = 0;
        }
      }
    }
    // The page being written (if partly filled) keeps ws slots; later pages are emptied and released.
    size_t keep = wp + (ws > 0 ? 1 : 0);
    if (ws > 0) {
      const int32_t id = h.pages[wp];
      pool.used(id) = ws;
      for (int s = ws; s < ps; ++s) pool.pos(id)[s] = -1;
    }
    for (size_t i = keep; i < h.pages.size(); ++i) pool.release(h.pages[i]);
    h.pages.resize(keep);
    h.tokens = live;
  }
  struct Cand { float score; int32_t page, slot; };
  std::vector<Cand> cands_;
};
}  // namespace

std::unique_ptr<Policy> make_evict_policy(const PolicySpec& s) { return std::make_unique<EvictPolicy>(s); }

}  // namespace headroom
