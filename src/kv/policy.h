// A KV policy decides, for one (sequence, layer, KV head), what the head keeps and what it attends. It plans
// on host metadata only (page ids, fill counts, the positions mirror of PagePool); anything that depends on
// this step's queries runs inside the layer as a backend op that the plan asks for (Quest's page selection,
// evict's score accumulation), and what those ops decide is acted on at the next step.
//
// Per step, for each head:
//   before_step  act on the last step: evict's excess tokens, topk's moves (unchosen pages to the host tier);
//   (the cache appends this step's rows, checking first that the device tier has the pages)
//   prefetch     topk: bring the pages the last step chose back to the device, if there is room;
//   plan         the attention job's rule (it reads the head's pages, in position order);
//   after_step   after the step ran, with the pages the job finally read: give back / offload.
//
// One file per policy (policy_full.cpp, policy_streaming.cpp, policy_topk.cpp, policy_evict.cpp), each with a
// PolicyDescriptor; policy.cpp lists them. Adding a policy is one new file plus one line there (and its kind).
#pragma once

#include <algorithm>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include <nlohmann/json_fwd.hpp>

#include "backend/backend.h"
#include "kv/page_pool.h"
#include "util/json_read.h"

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

// One head's page ids, in order of first position. Reading is a vector's; every change goes through the
// methods below, which lower `synced()`: the first index that may differ from the copy the step's page table
// holds (KVStep). The cache writes only the entries from there on at the next step (an append-only full head
// writes one id per page it fills; most steps none), then calls mark_synced().
class PageList {
 public:
  size_t size() const { return v_.size(); }
  bool empty() const { return v_.empty(); }
  int32_t operator[](size_t i) const { return v_[i]; }
  int32_t back() const { return v_.back(); }
  const int32_t* data() const { return v_.data(); }
  std::vector<int32_t>::const_iterator begin() const { return v_.begin(); }
  std::vector<int32_t>::const_iterator end() const { return v_.end(); }

  void push_back(int32_t id) { v_.push_back(id); }
  void set(size_t i, int32_t id) {
    if (v_[i] == id) return;
    v_[i] = id;
    synced_ = std::min(synced_, i);
  }
  void set_back(int32_t id) { set(v_.size() - 1, id); }
  void resize(size_t n) {
    v_.resize(n);
    synced_ = std::min(synced_, n);
  }
  void assign(std::vector<int32_t> ids) {
    v_ = std::move(ids);
    synced_ = 0;
  }
  size_t synced() const { return std::min(synced_, v_.size()); }
  void mark_synced() { synced_ = v_.size(); }

 private:
  std::vector<int32_t> v_;
  size_t synced_ = 0;
};

// The cache of one (sequence, layer, KV head): its pages in order of first position.
struct HeadCache {
  PageList pages;
  std::vector<uint8_t> selected;  // topk: which pages the last decode step read (parallel to pages)
  int64_t tokens = 0;             // tokens currently held
};

// The step as a policy sees it: the rows this sequence adds at positions [pos0, pos0 + n_rows).
struct StepInfo {
  int32_t pos0 = 0;
  int n_rows = 0;
  bool prefill = false;     // rows of a prompt
  bool last_chunk = false;  // ... and the prompt ends with them
  int32_t next_pos() const { return pos0 + n_rows; }
  bool more_prompt() const { return prefill && !last_chunk; }
};

class Policy {
 public:
  explicit Policy(const PolicySpec& s) : spec_(s) {}
  virtual ~Policy() = default;
  const PolicySpec& spec() const { return spec_; }

  // Evict: true if before_step needs the pages' accumulated scores (PagePool::read_scores, batched).
  virtual bool needs_scores(const HeadCache& h) const { return false; }
  virtual void before_step(HeadCache& h, PagePool& pool, const StepInfo& s) {}
  virtual void prefetch(HeadCache& h, PagePool& pool, const StepInfo& s) {}
  // Fills the job's rule and selection fields. Rows, head and pages are the cache's: a job reads the head's
  // whole page list (h.pages, in the step's page table), which the rule (sinks + window) or the selection
  // (select_k of the candidates) narrows.
  virtual void plan(const HeadCache& h, const PagePool& pool, const StepInfo& s, AttnJob& job) const = 0;
  // `read` is the job's final page list (after select_pages).
  virtual void after_step(HeadCache& h, PagePool& pool, const StepInfo& s, std::span<const int32_t> read) {}
  // Most tokens this head holds on the device in steady state for a context of n_ctx (budget planning).
  virtual int64_t max_tokens(int64_t n_ctx, int page_size) const = 0;

 protected:
  PolicySpec spec_;
};

// Everything the rest of the program knows about one kind of policy.
struct PolicyDescriptor {
  PolicyKind kind;
  const char* name;
  const char* help;  // one line for --help
  std::unique_ptr<Policy> (*make)(const PolicySpec& s);
  // The spec for every head under a uniform budget of `tokens` per head (throws Error, one line, naming
  // `what` (the flag or entry that set the budget), if it cannot work at that size).
  PolicySpec (*uniform)(int64_t tokens, int page_size, const std::string& what);
  // Head-map JSON: writes / reads the kind's parameters of one entry (reading range-checks each field).
  void (*to_json)(const PolicySpec& s, nlohmann::json& j);
  void (*from_json)(const nlohmann::json& j, PolicySpec& s, const JsonPlace& at);
  bool page_minmax;  // needs Quest key bounds per page
  bool slot_scores;  // needs accumulated attention per slot
  bool (*may_offload)(const PolicySpec& s);  // may park pages in the host tier
};

const PolicyDescriptor& policy_descriptor(PolicyKind k);
const char* policy_name(PolicyKind k);
PolicyKind parse_policy_kind(const std::string& s);  // throws Error naming the valid choices
std::string policy_names(const char* sep = ", ");    // "full, streaming, topk, evict"
std::unique_ptr<Policy> make_policy(const PolicySpec& s);
// A descriptor's `make` for a policy class P.
template <typename P>
std::unique_ptr<Policy> make_policy_as(const PolicySpec& s) {
  return std::make_unique<P>(s);
}

// Pages a streaming head holds at most in steady state: the pages with the sinks (ceil(sinks/page), at least
// one), plus the pages that cover the window's window-1 past positions (at most ceil((window-1)/page)+1 when
// they straddle page edges; the page being filled is among them).
inline int64_t streaming_max_pages(int window, int page_size, int sinks = 1) {
  const int64_t sink_pages = std::max<int64_t>(1, (int64_t(sinks) + page_size - 1) / page_size);
  return sink_pages + 1 + (int64_t(window) - 1 + page_size - 1) / page_size;
}

// Sets the layout's metadata arrays to what the policies of `specs` need (Quest key bounds, slot scores).
void set_policy_metadata(KVLayout& l, const std::vector<PolicySpec>& specs);

// Shared pieces any policy may use.
// Keeps the pages `keep(id)` says yes to, in order; the others go to `drop(id)` (or stay, if it returns true).
template <typename Keep, typename Drop>
void filter_pages(HeadCache& h, Keep&& keep, Drop&& drop) {
  size_t w = 0;
  for (size_t i = 0; i < h.pages.size(); ++i) {
    const int32_t id = h.pages[i];
    if (keep(id)) h.pages.set(w++, id);
    else if (int32_t stay = drop(id); stay >= 0) h.pages.set(w++, stay);
  }
  h.pages.resize(w);
}
// True if page id holds a token still needed by queries at positions >= next_pos under sinks + window, or
// is still being filled.
bool page_in_window(const PagePool& pool, int32_t id, int sinks, int window, int32_t next_pos);
// Moves every live slot (pos >= 0) to the front of the head's pages, in order, and releases emptied pages.
void compact_pages(HeadCache& h, PagePool& pool);

}  // namespace headroom
