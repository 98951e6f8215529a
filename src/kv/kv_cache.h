// KVCache: the paged, head-aware KV cache of ONE sequence. Every (layer, KV head) has its own page list and
// its own Policy; pages come from a PagePool shared by all sequences. Once per step, on host metadata only:
//   plan_step()    every head's policy acts on the last step, the step's new rows get their slots (after a
//                  check that the device tier has the pages: never a half-written step), and every head of
//                  every layer gets its attention job and page list in the step's tables (KVStep);
//   (the runner uploads the tables once and runs the layers: kv_store at the slots, select_pages, attention)
//   finish_step()  with the pages the jobs finally read, each policy gives back / offloads.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "backend/backend.h"
#include "kv/budget.h"
#include "kv/head_map.h"
#include "kv/page_pool.h"
#include "kv/policy.h"
#include "model/config.h"
#include "util/error.h"

namespace headroom {

// Thrown when the device tier cannot take another page; the request ends with this reason.
class BudgetExhausted : public Error {
 public:
  using Error::Error;
};

// Per-head policy specs for a uniform policy under a budget (the policy's descriptor decides). Throws Error
// if the budget is too small for the policy, naming `cause`: where tokens_per_head came from (e.g.
// "--kv-budget 25% of a 512-token context").
PolicySpec uniform_spec(PolicyKind kind, int64_t tokens_per_head, int page_size, const std::string& cause = "--kv-budget");

// Device pages a set of heads needs at most (steady state plus one prefill chunk in flight per head). Throws
// Error naming the context, --page-size or --chunk if one is out of range.
int64_t pages_needed(const std::vector<PolicySpec>& specs, int64_t n_ctx, int page_size, int chunk);
// Host-tier pages the heads that may park pages there need at most.
int64_t host_pages_needed(const std::vector<PolicySpec>& specs, int64_t n_ctx, int page_size);

// The step's tables, built on the host by every sequence's cache and uploaded once per step.
struct KVStep {
  int n_layer = 0, n_kv = 0, n_rows = 0;
  std::vector<int32_t> slots;              // [layer][row][kv_head]: global slot of the row's K/V (-1: none)
  std::vector<std::vector<AttnJob>> jobs;  // [layer][job]
  std::vector<int32_t> page_ids;           // the jobs' page lists (AttnJob::page0, n_pages)
  bool selects = false;                    // some job selects pages on the backend (read back after the step)
  void begin(int layers, int kv_heads, int rows);
  int32_t* layer_slots(int layer) { return slots.data() + size_t(layer) * size_t(n_rows) * size_t(n_kv); }
};

class KVCache {
 public:
  KVCache(const ModelConfig& cfg, PagePool& pool, const std::vector<PolicySpec>& specs);
  ~KVCache();
  KVCache(const KVCache&) = delete;
  KVCache& operator=(const KVCache&) = delete;

  // Plans this sequence's rows [row0, row0 + s.n_rows) of the step. Throws BudgetExhausted, before anything
  // of the step is written, if the device tier cannot take the new rows.
  void plan_step(KVStep& step, int row0, const StepInfo& s);
  // After the step ran; `step` holds the final page lists (read back if step.selects).
  void finish_step(const KVStep& step, const StepInfo& s);
  // Device pages the step's new rows would take (nano-vllm's can_append), with nothing changed.
  int64_t pages_for(int n_rows) const;
  void clear();  // give every page back

  int n_layer() const { return n_layer_; }
  int n_head_kv() const { return n_kv_; }
  const HeadCache& head(int layer, int h) const { return heads_[size_t(layer) * n_kv_ + h]; }
  const Policy& policy(int layer, int h) const { return *policies_[size_t(layer) * n_kv_ + h]; }
  PagePool& pool() { return pool_; }
  int64_t pages_held() const;  // device + host pages of this sequence
  int64_t tokens_appended() const { return appended_; }

 private:
  int n_layer_, n_kv_, head_dim_;
  PagePool& pool_;
  std::vector<HeadCache> heads_;
  std::vector<std::unique_ptr<Policy>> policies_;
  std::vector<size_t> first_job_;  // [layer]: this sequence's first job in the step's tables
  int64_t appended_ = 0;
};

}  // namespace headroom
