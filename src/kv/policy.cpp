#include "kv/policy.h"

#include "util/error.h"

namespace headroom {

std::unique_ptr<Policy> make_full_policy(const PolicySpec& s);
std::unique_ptr<Policy> make_streaming_policy(const PolicySpec& s);
std::unique_ptr<Policy> make_topk_policy(const PolicySpec& s);
std::unique_ptr<Policy> make_evict_policy(const PolicySpec& s);

const char* policy_name(PolicyKind k) {
  switch (k) {
    case PolicyKind::Full: return "full";
    case PolicyKind::Streaming: return "streaming";
    case PolicyKind::TopK: return "topk";
    case PolicyKind::Evict: return "evict";
  }
  return "?";
}

PolicyKind parse_policy_kind(const std::string& s) {
  if (s == "full") return PolicyKind::Full;
  if (s == "streaming") return PolicyKind::Streaming;
  if (s == "topk") return PolicyKind::TopK;
  if (s == "evict") return PolicyKind::Evict;
  fail("unknown KV policy '{}' (choose full, streaming, topk, evict)", s);
}

const char* prefill_mode_name(PrefillMode m) {
  switch (m) {
    case PrefillMode::Window: return "window";
    case PrefillMode::Full: return "full";
    case PrefillMode::Offload: return "offload";
  }
  return "?";
}

PrefillMode parse_prefill_mode(const std::string& s) {
  if (s == "window") return PrefillMode::Window;
  if (s == "full") return PrefillMode::Full;
  if (s == "offload") return PrefillMode::Offload;
  fail("unknown prefill mode '{}' (choose window, full, offload)", s);
}

AttnPage Policy::view(PagePool& pool, int32_t id, bool with_scores) {
  AttnPage p;
  p.k = pool.k(id);
  p.v = pool.v(id);
  p.pos = pool.pos(id);
  p.score_acc = with_scores ? pool.score(id) : nullptr;
  p.n_slots = pool.used(id);
  return p;
}

std::unique_ptr<Policy> make_policy(const PolicySpec& s) {
  switch (s.kind) {
    case PolicyKind::Full: return make_full_policy(s);
    case PolicyKind::Streaming: return make_streaming_policy(s);
    case PolicyKind::TopK: return make_topk_policy(s);
    case PolicyKind::Evict: return make_evict_policy(s);
  }
  fail("bad policy kind");
}

}  // namespace headroom
