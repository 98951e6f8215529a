// A KV policy answers one question for one (sequence, layer, KV head): which cached tokens does this head
// attend at this step. It may also give pages back (streaming), evict tokens (evict) or move cold pages to
// the host tier (topk). Attention over what it chooses is exact (see AttnJob in backend/backend.h).
// One policy per file: policy_full.cpp, policy_streaming.cpp, policy_topk.cpp, policy_evict.cpp.
#pragma once

#include <climits>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "kv/page_pool.h"

namespace headroom {

enum class PolicyKind { Full, Streaming, TopK, Evict };

// What a streaming head attends while a prompt is prefilled (decoding always uses sinks + window).
enum class PrefillMode {
  Window,   // sinks + window from the first prompt token on (StreamingLLM, DuoAttention's chunked prefill).
            // Device peak: the window plus one chunk.
  Full,     // the whole prompt, all of its pages on the device until the prefill ends, then cut to sinks +
            // window (RazorAttention). Device peak: the whole prompt.
  Offload,  // the whole prompt, but pages that leave the window move to the host tier during the prefill (the
            // chunks read them there) and are dropped when it ends. Device peak: the window plus one chunk;
            // host peak: the rest of the prompt, until the prefill ends.
};
const char* prefill_mode_name(PrefillMode m);
PrefillMode parse_prefill_mode(const std::string& s);  // throws Error naming the valid choices
const char* policy_name(PolicyKind k);
PolicyKind parse_policy_kind(const std::string& s);  // throws Error naming the valid choices

// Parameters of one head's policy (the unused ones are ignored by each kind).
struct PolicySpec {
  PolicyKind kind = PolicyKind::Full;
  int sinks = 4;          // streaming, topk, evict: first tokens always kept
  int window = 252;       // streaming: recent tokens; evict: recent tokens always kept
  int topk_pages = 8;     // topk: pages chosen by score at each decode step (besides sink and recent pages)
  int recent_pages = 2;   // topk: most recent pages always attended
  int budget = 1024;      // evict: tokens held at most
  bool offload = false;   // topk: keep only the chosen (decode) or sink + recent (prefill) pages on the device,
                          // the rest in the host tier
  PrefillMode prefill = PrefillMode::Window;  // streaming: see PrefillMode
};

// The cache of one (sequence, layer, KV head): its pages in order of first position.
struct HeadCache {
  std::vector<int32_t> pages;
  std::vector<uint8_t> selected;  // topk: which pages the last decode step chose (parallel to pages)
  int64_t tokens = 0;             // tokens currently held
};

// What a policy may look at to choose: the query rows of this head's GQA group.
struct QueryView {
  const float* q = nullptr;   // q + r*stride + h*head_dim, h in [head0, head0+n_group)
  int64_t stride = 0;
  int head0 = 0, n_group = 1, head_dim = 0;
  int n_rows = 0;
  const int32_t* pos = nullptr;
  bool prefill = false;       // rows of a prompt being prefilled (set by KVCache::begin_prefill)
};

class Policy {
 public:
  explicit Policy(const PolicySpec& s) : spec_(s) {}
  virtual ~Policy() = default;
  virtual PolicyKind kind() const = 0;
  const PolicySpec& spec() const { return spec_; }

  // Fill `pages` with the pages to read and set the sinks/window rule for this step.
  virtual void select(HeadCache& h, PagePool& pool, const QueryView& q, std::vector<AttnPage>& pages,
                      int32_t& sinks, int32_t& window) = 0;
  // After the step's attention: give back / evict / offload what is no longer needed. next_pos is the
  // position of the next token this sequence will see; prefill tells whether more prompt chunks follow.
  virtual void after_step(HeadCache& h, PagePool& pool, int32_t next_pos, bool prefill) {}
  // Most tokens this head holds on the device in steady state for a context of n_ctx (budget planning).
  virtual int64_t max_tokens(int64_t n_ctx, int page_size) const = 0;

 protected:
  static AttnPage view(PagePool& pool, int32_t id, bool with_scores = false);
  PolicySpec spec_;
};

std::unique_ptr<Policy> make_policy(const PolicySpec& s);

// Pages a streaming head holds at most in steady state: the page with the sinks, plus the pages that cover
// the window's window-1 past positions (at most ceil((window-1)/page)+1 when they straddle page edges;
// the page being filled is among them).
inline int64_t streaming_max_pages(int window, int page_size) {
  return 2 + (int64_t(window) - 1 + page_size - 1) / page_size;
}

}  // namespace headroom
