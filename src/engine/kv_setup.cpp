#include "engine/kv_setup.h"

#include <algorithm>

#include "util/error.h"

namespace headroom {

namespace {
void apply_prefill_mode(const KVOptions& o, std::vector<PolicySpec>& specs) {
  if (o.prefill.empty()) return;
  const PrefillMode mode = parse_prefill_mode(o.prefill);
  for (PolicySpec& p : specs) p.prefill = mode;
}
}  // namespace

KVSetup plan_kv(const Model& m, const KVOptions& o, int64_t n_ctx, int n_seqs) {
  const ModelConfig& c = m.config();
  pages_needed({}, n_ctx, o.page_size, o.chunk);  // range-checks the context, --page-size and --chunk first
  KVSetup s;
  KVBudget budget = o.budget.empty() ? KVBudget{} : KVBudget::parse(o.budget);
  s.tokens_per_head = budget.tokens_per_head(c, n_ctx);
  // What the budget's size depends on, for the messages when it is too small.
  const std::string cause = budget.kind == KVBudget::Kind::Percent
                                ? fmt::format("--kv-budget {} of a {}-token context", o.budget, n_ctx)
                                : fmt::format("--kv-budget {}", o.budget);
  const size_t n_heads = size_t(c.n_layer) * c.n_head_kv;
  std::string what;
  if (!o.head_map.empty()) {
    if (o.policy != "auto" && o.policy != "full")
      fail("--head-map chooses the policy of every head; drop --kv-policy {} (or use --kv-policy auto)", o.policy);
    ModelIdentity id = m.identity();
    HeadMap map = HeadMap::load(o.head_map, &id);
    for (const HeadEntry& e : map.heads) s.specs.push_back(e.spec);
    what = fmt::format("head map {} ({} full, {} streaming, {} topk, {} evict)", o.head_map, map.count(PolicyKind::Full),
                       map.count(PolicyKind::Streaming), map.count(PolicyKind::TopK), map.count(PolicyKind::Evict));
  } else {
    if (o.policy == "auto") fail("--kv-policy auto needs --head-map FILE (make one with `headroom profile`)");
    PolicyKind kind = parse_policy_kind(o.policy);
    if (kind != PolicyKind::Full && budget.kind == KVBudget::Kind::None)
      fail("--kv-policy {} needs --kv-budget (tokens per head like 512, bytes like 64MiB, or a share like 25%)", o.policy);
    const bool offload = kind == PolicyKind::TopK;
    s.specs.assign(n_heads, uniform_spec(kind, s.tokens_per_head, o.page_size, offload, cause));
    what = fmt::format("{} for all {} heads", o.policy, n_heads);
  }
  apply_prefill_mode(o, s.specs);
  int64_t needed = pages_needed(s.specs, n_ctx, o.page_size, o.chunk) * n_seqs;
  s.capacity_pages = needed;
  if (budget.kind != KVBudget::Kind::None) {
    bool uniform_full = o.head_map.empty() && o.policy == "full";
    if (uniform_full || budget.kind == KVBudget::Kind::Bytes) {
      int64_t allowed = budget.kind == KVBudget::Kind::Bytes
                            ? int64_t(budget.value) / (2LL * o.page_size * c.head_dim * int64_t(sizeof(float)))
                            : int64_t(n_heads) * ((s.tokens_per_head + o.page_size - 1) / o.page_size) * n_seqs;
      s.capacity_pages = std::min(needed, allowed);
    }
  }
  if (s.capacity_pages < int64_t(n_heads))
    fail("{} is too small: it holds {} pages of {} tokens (--page-size) but every one of the {} KV heads needs at "
         "least one", cause, s.capacity_pages, o.page_size, n_heads);
  const double page_kib = 2.0 * o.page_size * c.head_dim * sizeof(float) / 1024.0;
  s.summary = fmt::format("KV: {}, budget {}, page {} tokens, device capacity {} pages ({:.1f} MiB)", what,
                          budget.to_string(), o.page_size, s.capacity_pages, s.capacity_pages * page_kib / 1024.0);
  return s;
}

KVSetup plan_kv_specs(const Model& m, std::vector<PolicySpec> specs, const KVOptions& o, int64_t n_ctx,
                      const std::string& what) {
  const ModelConfig& c = m.config();
  if (specs.size() != size_t(c.n_layer) * c.n_head_kv) fail("{}: {} head specs for {} heads", what, specs.size(), size_t(c.n_layer) * c.n_head_kv);
  KVSetup s;
  s.specs = std::move(specs);
  apply_prefill_mode(o, s.specs);
  s.tokens_per_head = n_ctx;
  s.capacity_pages = pages_needed(s.specs, n_ctx, o.page_size, o.chunk);
  s.summary = fmt::format("KV: {}, page {} tokens, device capacity {} pages", what, o.page_size, s.capacity_pages);
  return s;
}

}  // namespace headroom
