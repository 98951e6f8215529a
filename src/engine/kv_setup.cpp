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

// The store's layout for these specs: the KV type, and the metadata arrays the policies in use need.
KVLayout layout_for(const Model& m, const KVOptions& o, const std::vector<PolicySpec>& specs) {
  const ModelConfig& c = m.config();
  if (o.page_size < 1 || o.page_size > 4096) fail("--page-size {} out of range (1..4096)", o.page_size);
  KVLayout l;
  std::string type = o.kv_type;
  const char* flag = "--kv-type";
  if (!o.cache_type_k.empty() || !o.cache_type_v.empty()) {
    const KVType k = o.cache_type_k.empty() ? parse_kv_type(o.kv_type) : parse_kv_type(o.cache_type_k, "--cache-type-k");
    const KVType v = o.cache_type_v.empty() ? parse_kv_type(o.kv_type) : parse_kv_type(o.cache_type_v, "--cache-type-v");
    if (k != v)
      fail("--cache-type-k {} and --cache-type-v {} differ: headroom stores K and V in one type", kv_type_name(k),
           kv_type_name(v));
    type = kv_type_name(k);
    flag = o.cache_type_k.empty() ? "--cache-type-v" : "--cache-type-k";
  }
  l.type = parse_kv_type(type, flag);
  if (std::string why = kv_type_fits(l.type, c.head_dim); !why.empty()) fail("{} {}: {}", flag, type, why);
  l.page_size = o.page_size;
  l.head_dim = c.head_dim;
  set_policy_metadata(l, specs);
  return l;
}

void set_capacity(KVSetup& s, int64_t device, int64_t host) {
  if (device > INT32_MAX / 2 || host > INT32_MAX / 2 || device + host > INT32_MAX / 2)
    fail("KV pool of {} device + {} host pages is beyond what page ids address (lower -c or --kv-budget)", device, host);
  s.capacity_pages = device;
  s.layout.device_pages = int32_t(device);
  s.layout.host_pages = int32_t(host);
}

std::string mib(double bytes) { return fmt::format("{:.1f} MiB", bytes / (1024.0 * 1024)); }
}  // namespace

KVSetup plan_kv(const Model& m, const KVOptions& o, int64_t n_ctx, int n_seqs) {
  const ModelConfig& c = m.config();
  pages_needed({}, n_ctx, o.page_size, o.chunk);  // range-checks the context, --page-size and --chunk first
  KVSetup s;
  s.n_ctx = n_ctx;
  s.per_head = !o.head_map.empty();
  KVBudget budget = o.budget.empty() ? KVBudget{} : KVBudget::parse(o.budget);
  // What the budget's size depends on, for the messages when it is too small.
  const std::string cause = budget.kind == KVBudget::Kind::Percent
                                ? fmt::format("--kv-budget {} of a {}-token context", o.budget, n_ctx)
                                : fmt::format("--kv-budget {}", o.budget);
  const size_t n_heads = size_t(c.n_layer) * c.n_head_kv;
  // Byte and % budgets count what is stored per token: K + V in the KV type and the policies' metadata.
  auto tokens_per_head = [&](const KVBudget& b, const KVLayout& l) {
    return b.tokens_per_head(n_ctx, double(n_heads) * double(l.page_bytes()) / o.page_size,
                             double(n_heads) * double(l.kv_page_bytes()) / o.page_size);
  };
  std::string what;
  if (!o.head_map.empty()) {
    if (o.policy != "auto" && o.policy != "full")
      fail("--head-map chooses the policy of every head; drop --kv-policy {} (or use --kv-policy auto)", o.policy);
    ModelIdentity id = m.identity();
    HeadMap map = HeadMap::load(o.head_map, &id);
    s.specs = map.specs();
    what = fmt::format("head map {} ({} full, {} streaming, {} topk, {} evict)", o.head_map, map.count(PolicyKind::Full),
                       map.count(PolicyKind::Streaming), map.count(PolicyKind::TopK), map.count(PolicyKind::Evict));
    s.layout = layout_for(m, o, s.specs);
    s.tokens_per_head = tokens_per_head(budget, s.layout);
  } else {
    if (o.policy == "auto") fail("--kv-policy auto needs --head-map FILE (make one with `headroom profile`)");
    PolicyKind kind = parse_policy_kind(o.policy);
    if (kind != PolicyKind::Full && budget.kind == KVBudget::Kind::None)
      fail("--kv-policy {} needs --kv-budget (tokens per head like 512, bytes like 64MiB, or a share like 25%)", o.policy);
    PolicySpec probe;
    probe.kind = kind;
    s.layout = layout_for(m, o, {probe});
    s.tokens_per_head = tokens_per_head(budget, s.layout);
    s.specs.assign(n_heads, uniform_spec(kind, s.tokens_per_head, o.page_size, cause));
    what = fmt::format("{} for all {} heads", o.policy, n_heads);
  }
  apply_prefill_mode(o, s.specs);
  int64_t needed = pages_needed(s.specs, n_ctx, o.page_size, o.chunk) * n_seqs;
  int64_t device = needed;
  if (budget.kind != KVBudget::Kind::None) {
    bool uniform_full = o.head_map.empty() && o.policy == "full";
    if (uniform_full || budget.kind == KVBudget::Kind::Bytes) {
      int64_t allowed = budget.kind == KVBudget::Kind::Bytes
                            ? int64_t(budget.value / double(s.layout.page_bytes()))
                            : int64_t(n_heads) * ((s.tokens_per_head + o.page_size - 1) / o.page_size) * n_seqs;
      device = std::min(needed, allowed);
    }
  }
  if (device < int64_t(n_heads))
    fail("{} is too small: it holds {} pages of {} tokens (--page-size) but every one of the {} KV heads needs at "
         "least one", cause, device, o.page_size, n_heads);
  set_capacity(s, device, host_pages_needed(s.specs, n_ctx, o.page_size) * n_seqs);
  s.summary = fmt::format("KV: {}, {} cache, budget {}, page {} tokens, device capacity {} pages ({} K+V, {} metadata)",
                          what, kv_type_name(s.layout.type), budget.to_string(), o.page_size, s.capacity_pages,
                          mib(double(s.capacity_pages * s.layout.kv_page_bytes())),
                          mib(double(s.capacity_pages * s.layout.meta_page_bytes())));
  return s;
}

KVSetup plan_kv_specs(const Model& m, std::vector<PolicySpec> specs, const KVOptions& o, int64_t n_ctx,
                      const std::string& what) {
  const ModelConfig& c = m.config();
  if (specs.size() != size_t(c.n_layer) * c.n_head_kv) fail("{}: {} head specs for {} heads", what, specs.size(), size_t(c.n_layer) * c.n_head_kv);
  KVSetup s;
  s.n_ctx = n_ctx;
  s.per_head = true;
  s.specs = std::move(specs);
  apply_prefill_mode(o, s.specs);
  s.layout = layout_for(m, o, s.specs);
  s.tokens_per_head = n_ctx;
  set_capacity(s, pages_needed(s.specs, n_ctx, o.page_size, o.chunk), host_pages_needed(s.specs, n_ctx, o.page_size));
  s.summary = fmt::format("KV: {}, {} cache, page {} tokens, device capacity {} pages", what,
                          kv_type_name(s.layout.type), o.page_size, s.capacity_pages);
  return s;
}

PoolPlan plan_pool(const KVSetup& s, int parallel, const std::string& kv_pool, int64_t free_memory) {
  if (parallel < 1) fail("--parallel {} is out of range (at least 1)", parallel);
  PoolPlan p;
  p.layout = s.layout;
  const int64_t page = s.layout.page_bytes();
  int64_t device = s.capacity_pages * parallel;
  if (!kv_pool.empty()) {
    const KVBudget b = KVBudget::parse(kv_pool, "--kv-pool");
    if (b.kind != KVBudget::Kind::Bytes) fail("--kv-pool {:?}: give bytes, like 4GiB or 512MiB", kv_pool);
    device = int64_t(b.value / double(page));
    if (device < 1) fail("--kv-pool {} is smaller than one KV page ({} bytes)", kv_pool, page);
  } else if (const int64_t fit = free_memory / 2 / page; device > fit && parallel > 1) {
    device = std::max<int64_t>(fit, s.capacity_pages);
    p.capped = true;
  }
  const int64_t host = s.layout.host_pages * int64_t(parallel) + (parallel > 1 ? device : 0);
  if (device > INT32_MAX / 2 || host > INT32_MAX / 2 || device + host > INT32_MAX / 2)
    fail("KV pool of {} device + {} host pages is beyond what page ids address (lower --kv-pool, -c or --parallel)",
         device, host);
  p.layout.device_pages = int32_t(device);
  p.layout.host_pages = int32_t(host);
  p.summary = fmt::format("KV pool: {} pages ({}) for {} sequence{}{}", device, mib(double(device * page)), parallel,
                          parallel == 1 ? "" : "s", p.capped ? ", cut to half the free memory" : "");
  return p;
}

}  // namespace headroom
