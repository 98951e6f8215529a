// `full`: the head attends every token it has seen.
#include "kv/policy.h"

namespace headroom {

namespace {
class FullPolicy final : public Policy {
 public:
  using Policy::Policy;
  PolicyKind kind() const override { return PolicyKind::Full; }
  void select(HeadCache& h, PagePool& pool, const QueryView&, std::vector<AttnPage>& pages, int32_t& sinks,
              int32_t& window) override {
    for (int32_t id : h.pages) pages.push_back(view(pool, id));
    sinks = window = 0;
  }
  int64_t max_tokens(int64_t n_ctx, int) const override { return n_ctx; }
};
}  // namespace

std::unique_ptr<Policy> make_full_policy(const PolicySpec& s) { return std::make_unique<FullPolicy>(s); }

}  // namespace headroom
