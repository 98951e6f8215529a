// `full`: the head attends every token it has seen.
#include <nlohmann/json.hpp>

#include "kv/policy.h"
#include "util/parse.h"

namespace headroom {

namespace {
class FullPolicy final : public Policy {
 public:
  using Policy::Policy;
  void plan(const HeadCache&, const PagePool&, const StepInfo&, AttnJob&) const override {}
  int64_t max_tokens(int64_t n_ctx, int) const override { return n_ctx; }
};
}  // namespace

extern const PolicyDescriptor kFullPolicy{
    PolicyKind::Full, "full", "every token, every page",
    make_policy_as<FullPolicy>,
    [](int64_t, int, const std::string&) { return PolicySpec{}; },
    [](const PolicySpec&, nlohmann::json&) {},
    [](const nlohmann::json&, PolicySpec&, const JsonPlace&) {},
    false, false, [](const PolicySpec&) { return false; }};

}  // namespace headroom
