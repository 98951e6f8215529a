#include "kv/policy.h"

#include <nlohmann/json.hpp>

#include "util/error.h"

namespace headroom {

extern const PolicyDescriptor kFullPolicy, kStreamingPolicy, kTopKPolicy, kEvictPolicy;

namespace {
// The registry, in PolicyKind order.
const PolicyDescriptor* const kPolicies[] = {&kFullPolicy, &kStreamingPolicy, &kTopKPolicy, &kEvictPolicy};

struct PrefillModeInfo {
  PrefillMode mode;
  const char* name;
};
constexpr PrefillModeInfo kPrefillModes[] = {
    {PrefillMode::Window, "window"}, {PrefillMode::Full, "full"}, {PrefillMode::Offload, "offload"}};
}  // namespace

const PolicyDescriptor& policy_descriptor(PolicyKind k) {
  for (const PolicyDescriptor* d : kPolicies)
    if (d->kind == k) return *d;
  fail("unknown policy kind {}", int(k));
}

const char* policy_name(PolicyKind k) { return policy_descriptor(k).name; }

std::string policy_names(const char* sep) {
  std::string s;
  for (const PolicyDescriptor* d : kPolicies) s += (s.empty() ? "" : sep) + std::string(d->name);
  return s;
}

PolicyKind parse_policy_kind(const std::string& s) {
  for (const PolicyDescriptor* d : kPolicies)
    if (s == d->name) return d->kind;
  fail("unknown KV policy '{}' (choose {})", s, policy_names());
}

std::unique_ptr<Policy> make_policy(const PolicySpec& s) { return policy_descriptor(s.kind).make(s); }

const char* prefill_mode_name(PrefillMode m) {
  for (const PrefillModeInfo& i : kPrefillModes)
    if (i.mode == m) return i.name;
  return "?";
}

PrefillMode parse_prefill_mode(const std::string& s) {
  for (const PrefillModeInfo& i : kPrefillModes)
    if (s == i.name) return i.mode;
  fail("unknown prefill mode '{}' (choose window, full, offload)", s);
}

bool page_in_window(const PagePool& pool, int32_t id, int sinks, int window, int32_t next_pos) {
  // A token at position p is still needed by a query at q >= next_pos iff p < sinks or p > q - window.
  const int32_t oldest_needed = next_pos - window + 1;
  const int32_t* pos = pool.pos(id);
  for (int s = 0; s < pool.used(id); ++s)
    if (pos[s] >= 0 && (pos[s] < sinks || pos[s] >= oldest_needed)) return true;
  return pool.used(id) < pool.page_size();  // the tail page is still being filled
}

void compact_pages(HeadCache& h, PagePool& pool) {
  const int ps = pool.page_size();
  size_t wp = 0;
  int ws = 0;
  int64_t live = 0;
  for (size_t rp = 0; rp < h.pages.size(); ++rp) {
    const int32_t src = h.pages[rp];
    const int n_used = pool.used(src);
    for (int rs = 0; rs < n_used; ++rs) {
      if (pool.pos(src)[rs] < 0) continue;
      const int32_t dst = h.pages[wp];
      if (dst != src || ws != rs) pool.move_slot(src, rs, dst, ws);
      ++live;
      if (++ws == ps) {
        ++wp;
        ws = 0;
      }
    }
  }
  // Full pages keep all their slots; the page being written keeps ws; later pages are released.
  for (size_t i = 0; i < wp; ++i) pool.truncate(h.pages[i], ps);
  const size_t keep = wp + (ws > 0 ? 1 : 0);
  if (ws > 0) pool.truncate(h.pages[wp], ws);
  for (size_t i = keep; i < h.pages.size(); ++i) pool.release(h.pages[i]);
  h.pages.resize(keep);
  h.tokens = live;
}

void set_policy_metadata(KVLayout& l, const std::vector<PolicySpec>& specs) {
  l.page_minmax = l.slot_scores = false;
  for (const PolicySpec& s : specs) {
    l.page_minmax |= policy_descriptor(s.kind).page_minmax;
    l.slot_scores |= policy_descriptor(s.kind).slot_scores;
  }
}

}  // namespace headroom
