// From the user's KV flags (--kv-policy, --kv-budget, --head-map, --page-size) to per-head policy specs and a
// page pool capacity. Shared by run, bench, eval, profile and serve.
#pragma once

#include <string>
#include <vector>

#include "kv/kv_cache.h"
#include "model/model.h"

namespace headroom {

struct KVOptions {
  std::string policy = "full";   // full | streaming | topk | evict | auto (auto = the --head-map)
  std::string budget;            // "" = the full cache for the context
  std::string head_map;          // JSON from `headroom profile`
  int page_size = 32;
  int chunk = 512;               // prefill chunk (tokens per forward call)
  std::string kv_type = "f16";   // stored K/V type: f16 | bf16 | f32 | q8_0 (KVType)
  std::string cache_type_k, cache_type_v;  // llama.cpp's names; when given they override kv_type (and must agree)
  std::string kv_pool;           // --kv-pool: bytes all sequences share ("" = what memory allows)
  std::string prefill;           // streaming heads during prefill: window | full | offload (PrefillMode);
                                 // "" = what the head map says (window for a uniform policy)
};

struct KVSetup {
  std::vector<PolicySpec> specs;  // [layer * n_head_kv + kv_head]
  KVLayout layout;                // the pool's store: type, page shape, tier capacities, policy metadata
  int64_t capacity_pages = 0;     // device tier capacity of the pool (= layout.device_pages)
  int64_t tokens_per_head = 0;    // what the budget allows per head
  std::string summary;            // one line for the log
  int64_t n_ctx = 0;              // the context it was planned for
  bool per_head = false;          // the specs differ per head (a head map, eval's configurations): tensor
                                  // parallelism places the heads by their bytes, unevenly if need be
};

// The pool that `parallel` sequences of one setup share.
struct PoolPlan {
  KVLayout layout;          // device pages: the pool; host pages: what the policies park, plus preemption room
  bool capped = false;      // the default pool was cut to the memory there is
  std::string summary;      // one line for the log
};
// Device pages: --kv-pool (bytes, "" = every sequence's whole capacity, at most half of `free_memory`).
// Host pages: what the setup's policies park per sequence, and (parallel > 1) room to park every device page.
// Throws Error with one line for a bad --kv-pool.
PoolPlan plan_pool(const KVSetup& s, int parallel, const std::string& kv_pool, int64_t free_memory);

// Throws Error with one line for bad flags, a head map for another model, or a budget too small.
KVSetup plan_kv(const Model& m, const KVOptions& o, int64_t n_ctx, int n_seqs = 1);

// The same for per-head specs chosen by the caller (eval's profile/random configurations): capacity is what
// the specs need for n_ctx, with one prefill chunk in flight per head.
KVSetup plan_kv_specs(const Model& m, std::vector<PolicySpec> specs, const KVOptions& o, int64_t n_ctx,
                      const std::string& what);

}  // namespace headroom
