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
//
// The page table persists from step to step (the device copy is updated in place): a sequence planned in
// consecutive steps keeps its region of it, one segment per (layer, KV head) with room to grow, and a step
// writes there only what changed since (in steady state the id of each page just begun: most decode steps
// write nothing). Every entry written is recorded in `written`, so that the runner uploads those alone. A
// region not planned in a step is given back at the next begin(); a new region takes the first free range
// that fits or the table's end, and the table is laid out anew when it is mostly holes.
struct KVStep {
  int n_layer = 0, n_kv = 0, n_rows = 0;
  std::vector<int32_t> slots;              // [layer][row][kv_head]: global slot of the row's K/V (-1: none)
  std::vector<std::vector<AttnJob>> jobs;  // [layer][job]
  std::vector<int32_t> page_ids;           // the page table: the jobs' page lists (AttnJob::page0, n_pages)
  bool selects = false;                    // some job selects pages on the backend (read back after the step)
  std::vector<std::pair<int64_t, int64_t>> written;  // [lo, hi) of page_ids written this step, in order
  int64_t n_written = 0;                   // entries in `written`

  KVStep();
  void begin(int layers, int kv_heads, int rows);
  int32_t* layer_slots(int layer) { return slots.data() + size_t(layer) * size_t(n_rows) * size_t(n_kv); }
  // The offset of `owner`'s region of `size` entries for this step. kept: it is the region the owner had in
  // the previous step, at the same place and size (what was written there stands).
  int64_t region(uint64_t owner, int64_t size, bool& kept);
  // page_ids[at, at + n) = ids, recorded in `written`.
  void write(int64_t at, const int32_t* ids, int64_t n);
  // Tells apart two tables (a cache planned into another step's table writes its region whole).
  uint64_t serial() const { return serial_; }
  int64_t live_entries() const { return live_; }  // in regions (the rest of page_ids is free)

 private:
  struct Region {
    uint64_t owner;
    int64_t off, size;
    bool seen;
  };
  void give_back(int64_t off, int64_t size);
  std::vector<Region> regions_;
  std::vector<std::pair<int64_t, int64_t>> free_;  // free ranges [off, off + size) below page_ids.size(), sorted
  int64_t live_ = 0;
  uint64_t serial_;
};

class KVCache {
 public:
  // max_device_pages: this sequence's own budget in device pages (-1: only the pool limits it).
  KVCache(const ModelConfig& cfg, PagePool& pool, const std::vector<PolicySpec>& specs, int64_t max_device_pages = -1);
  ~KVCache();
  KVCache(const KVCache&) = delete;
  KVCache& operator=(const KVCache&) = delete;

  // A step in three parts, so that a batch of sequences is checked before any of them is written:
  //   prepare    every head's policy acts on the last step (evict's scores, moves, window cuts);
  //   need/fits  the device pages the step's rows take (after prepare: exact);
  //   plan_step  the rows' slots and the heads' jobs, appended to the step's tables at rows row0...
  // plan_step prepares first if prepare was not called for this step, and throws BudgetExhausted, before
  // anything of the step is written, if the rows break this sequence's budget or the pool's free pages.
  void prepare(const StepInfo& s);
  void plan_step(KVStep& step, int row0, const StepInfo& s);
  // After the step ran; `step` holds the final page lists (read back if step.selects).
  void finish_step(const KVStep& step, const StepInfo& s);
  // Device pages the step's new rows would take (nano-vllm's can_append), with nothing changed.
  int64_t pages_for(int n_rows) const;
  // The same per part of the pool (tensor-parallel ranks; one entry for an unsplit pool).
  std::vector<int64_t> pages_for_parts(int n_rows) const;
  // "" if n_rows more rows stay within this sequence's own budget, else why not (one line).
  std::string over_budget(int n_rows) const;
  void clear();  // give every page back
  // Rolls the sequence back to its first n_pos positions: every slot at a position >= n_pos is emptied and
  // pages left empty go back (bench's repetitions over one prefilled depth). Exact where the policies kept
  // everything before the cut (full, topk); a streaming or evict head keeps what it held of [0, n_pos).
  void truncate(int32_t n_pos);

  // Preemption: park moves every device page of the sequence to the host tier (queued copies; false, with
  // nothing moved, if the host tier has no room); unpark brings the parked pages back (false if the device
  // tier has no room for all of them).
  bool park();
  bool can_park() const;  // park() would succeed: the host tier (every rank's part of it) has room
  bool unpark();
  bool parked() const { return parked_; }
  int64_t parked_pages() const;
  // Per part of the pool (tensor-parallel ranks; one entry for an unsplit pool): device pages held, parked.
  std::vector<int64_t> device_pages_by_part() const;
  std::vector<int64_t> parked_pages_by_part() const;

  int n_layer() const { return n_layer_; }
  int n_head_kv() const { return n_kv_; }
  const HeadCache& head(int layer, int h) const { return heads_[size_t(layer) * n_kv_ + h]; }
  const Policy& policy(int layer, int h) const { return *policies_[size_t(layer) * n_kv_ + h]; }
  PagePool& pool() { return pool_; }
  int64_t pages_held() const;         // device + host pages of this sequence
  int64_t device_pages_held() const;  // device pages of this sequence
  int64_t device_pages_held(int part) const;  // ... of the heads on one part of the pool (a tensor-parallel rank)
  int64_t peak_device_pages() const { return peak_device_; }
  int64_t peak_host_pages() const { return peak_host_; }
  int64_t max_device_pages() const { return max_device_; }
  // Bytes in the stored type, of this sequence: K + V on the device and in the host tier, and the metadata
  // its policies keep for its device pages.
  int64_t device_bytes() const { return device_pages_held() * pool_.layout().kv_page_bytes(); }
  int64_t host_bytes() const { return (pages_held() - device_pages_held()) * pool_.layout().kv_page_bytes(); }
  int64_t device_meta_bytes() const { return device_pages_held() * meta_page_bytes_; }
  int64_t tokens_appended() const { return appended_; }

 private:
  void note_peaks();
  int n_layer_, n_kv_, head_dim_;
  PagePool& pool_;
  std::vector<HeadCache> heads_;
  std::vector<std::unique_ptr<Policy>> policies_;
  std::vector<size_t> first_job_;  // [layer]: this sequence's first job in the step's tables
  // Its region of the step's page table (KVStep): the table it was last written to, its size and each head's
  // segment capacity; and per head the entries [lo, hi) of its segment that select_pages may have rewritten
  // in place (written again at the next step).
  uint64_t serial_;
  uint64_t table_serial_ = 0;
  int64_t region_size_ = 0;
  std::vector<int32_t> seg_cap_;
  std::vector<std::pair<int32_t, int32_t>> selected_range_;
  int64_t appended_ = 0;
  int64_t max_device_ = -1;
  int64_t meta_page_bytes_ = 0;
  int64_t peak_device_ = 0, peak_host_ = 0;
  bool prepared_ = false, parked_ = false;
  std::vector<std::vector<uint8_t>> parked_at_;  // [head][page index]: moved to the host tier by park()
};

}  // namespace headroom
