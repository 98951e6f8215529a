// Tensor-parallel placement of KV heads on ranks (docs/tensor-parallel.md).
//
// Every layer's KV heads are split over the ranks; a rank holds the KV heads given to it, their query groups,
// the matching q/k/v rows and attn_output columns, and the KV pages of those heads only. Without a head map
// the split is contiguous and even (the ranks must divide the KV heads). With one (per-head policies), the
// heads are placed so that every rank holds about the same KV bytes and reads about the same per decode step:
// layer by layer, the layer's heads sorted by held bytes (then read bytes, then index), each goes to the rank
// with the fewest bytes held so far over all layers (ties: fewest read bytes, then fewest heads, then the lower
// rank), every rank keeping at least one KV head of every layer.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "kv/policy.h"
#include "model/config.h"

namespace headroom {

struct TPPlan {
  int world = 1;
  int n_layer = 0, n_kv = 0;
  bool balanced = false;               // placed by the head map's bytes (else contiguous)
  std::vector<int8_t> rank_of;         // [layer * n_kv + kv_head]
  std::vector<int64_t> held_bytes;     // [rank]: K+V one sequence's heads of the rank hold at most (at n_ctx)
  std::vector<int64_t> read_bytes;     // [rank]: K+V they read per decode step (at n_ctx)
  std::vector<int32_t> head_count;     // [rank]: KV heads over all layers

  // The KV heads of `layer` on `rank`, ascending.
  std::vector<int32_t> heads(int rank, int layer) const;
  // One line per rank: heads per layer and bytes (the placement printed at start), e.g.
  // "tp rank 0: 8 KV heads (L0 0 | L1 1 ...), holds 12.0 MiB, reads 6.0 MiB per step".
  std::vector<std::string> describe() const;
};

// Checks `world` against the model (one line naming the flag): at least 1, at most the KV heads of a layer,
// and dividing them unless `uneven_ok` (a head map).
void check_tensor_parallel(const ModelConfig& c, int world, bool uneven_ok);

// specs: [layer * n_kv + kv_head]; kv_row_bytes: one stored K (or V) row of one head. `balanced` chooses the
// head-map placement (else contiguous). Throws Error (one line) through check_tensor_parallel.
TPPlan place_heads(const ModelConfig& c, const std::vector<PolicySpec>& specs, int world, bool balanced, int64_t n_ctx,
                   int page_size, int chunk, int64_t kv_row_bytes);

// Splits a pool's tiers over the ranks in proportion to the pages their heads need (rounded up, so every part
// holds at least its share): the device tier by the device need; the host tier by the larger of the host need
// (what policies park) and the device need (room to park a preempted sequence). Returns [rank] pages.
void split_pool_pages(const TPPlan& p, const std::vector<PolicySpec>& specs, int64_t n_ctx, int page_size, int chunk,
                      int64_t device_pages, int64_t host_pages, std::vector<int32_t>& device,
                      std::vector<int32_t>& host);

}  // namespace headroom
