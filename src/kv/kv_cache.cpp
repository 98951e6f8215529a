#include "kv/kv_cache.h"

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cmath>
#include <limits>

#include "util/parse.h"

namespace headroom {

PolicySpec uniform_spec(PolicyKind kind, int64_t t, int page_size, const std::string& what) {
  return policy_descriptor(kind).uniform(t, page_size, what);
}

int64_t pages_needed(const std::vector<PolicySpec>& specs, int64_t n_ctx, int page_size, int chunk) {
  if (n_ctx < 1 || n_ctx > kMaxContext) fail("a context of {} tokens is out of range (1..{})", n_ctx, kMaxContext);
  if (page_size < 1 || page_size > kMaxPageSize) fail("--page-size {} is out of range (1..{})", page_size, kMaxPageSize);
  if (chunk < 1 || chunk > kMaxChunk) fail("--chunk {} is out of range (1..{})", chunk, kMaxChunk);
  int64_t total = 0;
  for (const PolicySpec& s : specs) {
    auto p = make_policy(s);
    int64_t tokens = std::min<int64_t>(n_ctx, p->max_tokens(n_ctx, page_size) + chunk);
    total += (tokens + page_size - 1) / page_size + 1;
  }
  return total;
}

int64_t host_pages_needed(const std::vector<PolicySpec>& specs, int64_t n_ctx, int page_size) {
  int64_t total = 0;
  for (const PolicySpec& s : specs)
    if (policy_descriptor(s.kind).may_offload(s)) total += (n_ctx + page_size - 1) / page_size + 1;
  return total;
}

namespace {
std::atomic<uint64_t> g_serial{1};  // KVStep and KVCache serials (never 0)
}  // namespace

KVStep::KVStep() : serial_(g_serial++) {}

void KVStep::begin(int layers, int kv_heads, int rows) {
  n_layer = layers;
  n_kv = kv_heads;
  n_rows = rows;
  slots.assign(size_t(layers) * size_t(rows) * size_t(kv_heads), -1);
  jobs.resize(size_t(layers));
  for (auto& j : jobs) j.clear();
  selects = false;
  written.clear();
  n_written = 0;
  // The regions of owners the last step did not plan go back; the table is laid out anew when it is mostly
  // holes (every region is then written whole once).
  for (size_t i = 0; i < regions_.size();) {
    if (regions_[i].seen) {
      regions_[i++].seen = false;
      continue;
    }
    give_back(regions_[i].off, regions_[i].size);
    regions_[i] = regions_.back();
    regions_.pop_back();
  }
  if (int64_t(page_ids.size()) > 2 * live_ + (int64_t(1) << 16)) {
    regions_.clear();
    free_.clear();
    page_ids.clear();
    live_ = 0;
  }
}

void KVStep::give_back(int64_t off, int64_t size) {
  live_ -= size;
  auto at = std::lower_bound(free_.begin(), free_.end(), std::pair<int64_t, int64_t>{off, 0});
  at = free_.insert(at, {off, size});
  if (at + 1 != free_.end() && at->first + at->second == (at + 1)->first) {  // merge with the next range
    at->second += (at + 1)->second;
    free_.erase(at + 1);
  }
  if (at != free_.begin() && (at - 1)->first + (at - 1)->second == at->first) {  // ... and the previous one
    (at - 1)->second += at->second;
    at = free_.erase(at) - 1;
  }
  if (at->first + at->second == int64_t(page_ids.size())) {  // the table's end: it shrinks
    page_ids.resize(size_t(at->first));
    free_.erase(at);
  }
}

int64_t KVStep::region(uint64_t owner, int64_t size, bool& kept) {
  kept = false;
  for (size_t i = 0; i < regions_.size(); ++i) {
    if (regions_[i].owner != owner) continue;
    if (regions_[i].size == size) {
      regions_[i].seen = true;
      kept = true;
      return regions_[i].off;
    }
    give_back(regions_[i].off, regions_[i].size);
    regions_[i] = regions_.back();
    regions_.pop_back();
    break;
  }
  int64_t off = -1;
  for (auto it = free_.begin(); it != free_.end(); ++it)
    if (it->second >= size) {
      off = it->first;
      it->first += size;
      it->second -= size;
      if (it->second == 0) free_.erase(it);
      break;
    }
  if (off < 0) {
    off = int64_t(page_ids.size());
    page_ids.resize(size_t(off + size), -1);
  }
  regions_.push_back(Region{owner, off, size, true});
  live_ += size;
  return off;
}

void KVStep::write(int64_t at, const int32_t* ids, int64_t n) {
  if (n <= 0) return;
  std::copy_n(ids, size_t(n), page_ids.begin() + ptrdiff_t(at));
  if (!written.empty() && written.back().second == at) written.back().second += n;
  else written.emplace_back(at, at + n);
  n_written += n;
}

KVCache::KVCache(const ModelConfig& cfg, PagePool& pool, const std::vector<PolicySpec>& specs, int64_t max_device_pages)
    : n_layer_(cfg.n_layer), n_kv_(cfg.n_head_kv), head_dim_(cfg.head_dim), pool_(pool), max_device_(max_device_pages),
      serial_(g_serial++) {
  if (specs.size() != size_t(n_layer_) * n_kv_)
    fail("KV cache: {} policy specs for {} heads", specs.size(), size_t(n_layer_) * n_kv_);
  if (pool.head_dim() != head_dim_) fail("KV cache: pool head_dim {} != model {}", pool.head_dim(), head_dim_);
  if (pool.n_parts() > 1 && pool.placed_heads() != specs.size())
    fail("KV cache: the pool is split for {} heads, the model has {}", pool.placed_heads(), specs.size());
  heads_.resize(specs.size());
  for (const PolicySpec& s : specs) {
    const PolicyDescriptor& d = policy_descriptor(s.kind);
    if ((d.page_minmax && !pool.layout().page_minmax) || (d.slot_scores && !pool.layout().slot_scores))
      fail("KV cache: the pool keeps no {} for policy {}", d.page_minmax ? "key bounds" : "slot scores", d.name);
    policies_.push_back(make_policy(s));
  }
  first_job_.assign(size_t(n_layer_), 0);
  selected_range_.assign(specs.size(), {0, 0});
  // The metadata this sequence's policies keep (the pool's layout may keep more, for other sequences).
  KVLayout own = pool.layout();
  set_policy_metadata(own, specs);
  meta_page_bytes_ = own.meta_page_bytes();
}

KVCache::~KVCache() { clear(); }

void KVCache::clear() {
  for (HeadCache& h : heads_) {
    for (int32_t id : h.pages) pool_.release(id);
    h = HeadCache{};
  }
  appended_ = 0;
  parked_ = false;
  parked_at_.clear();
  prepared_ = false;
}

void KVCache::truncate(int32_t n_pos) {
  if (parked_) fail("kv cache: truncate of a parked sequence");
  for (HeadCache& h : heads_) {
    std::vector<int32_t> pages;
    std::vector<uint8_t> selected;
    int64_t tokens = 0;
    for (size_t i = 0; i < h.pages.size(); ++i) {
      const int32_t id = h.pages[i];
      const int32_t* pos = pool_.pos(id);
      int keep = 0, held = 0;  // slots [0, keep) stay; held of them hold a token (evict leaves holes, pos -1)
      for (int s = 0; s < pool_.used(id); ++s)
        if (pos[s] >= 0 && pos[s] < n_pos) keep = s + 1;
      for (int s = 0; s < keep; ++s) {
        if (pos[s] >= n_pos) fail("kv cache: truncate: a page whose positions are out of order");
        held += pos[s] >= 0;
      }
      if (keep == 0) {
        pool_.release(id);
        continue;
      }
      pool_.truncate(id, keep);
      pages.push_back(id);
      if (i < h.selected.size()) selected.push_back(h.selected[i]);
      tokens += held;
    }
    h.pages.assign(std::move(pages));
    h.selected = std::move(selected);
    h.tokens = tokens;
  }
  appended_ = std::min<int64_t>(appended_, n_pos);
  prepared_ = false;
}

int64_t KVCache::device_pages_held() const {
  if (pool_.host_pages() == 0) return pages_held();  // nothing is in the host tier (a count per head, not per page)
  int64_t n = 0;
  for (const HeadCache& h : heads_)
    for (int32_t id : h.pages) n += !pool_.on_host(id);
  return n;
}

int64_t KVCache::device_pages_held(int part) const { return device_pages_by_part()[size_t(part)]; }

void KVCache::note_peaks() {
  const int64_t dev = device_pages_held();
  peak_device_ = std::max(peak_device_, dev);
  peak_host_ = std::max(peak_host_, pages_held() - dev);
}

std::string KVCache::over_budget(int n_rows) const {
  if (max_device_ < 0) return "";
  const int64_t need = pages_for(n_rows), held = device_pages_held();
  if (held + need <= max_device_) return "";
  return fmt::format(
      "KV budget exhausted after {} tokens: the next {} need {} more device pages, the sequence holds {} of its {} "
      "({:.1f} MiB); raise --kv-budget or use a streaming/evict policy",
      appended_, n_rows, need, held, max_device_, double(max_device_ * pool_.layout().page_bytes()) / (1024.0 * 1024));
}

std::vector<int64_t> KVCache::device_pages_by_part() const {
  std::vector<int64_t> n(size_t(pool_.n_parts()), 0);
  const bool all_device = pool_.host_pages() == 0;
  for (size_t i = 0; i < heads_.size(); ++i) {
    int64_t& c = n[size_t(pool_.head_part(i))];
    if (all_device) {
      c += int64_t(heads_[i].pages.size());
      continue;
    }
    for (int32_t id : heads_[i].pages) c += !pool_.on_host(id);
  }
  return n;
}

std::vector<int64_t> KVCache::parked_pages_by_part() const {
  std::vector<int64_t> n(size_t(pool_.n_parts()), 0);
  for (size_t i = 0; i < parked_at_.size(); ++i)
    for (uint8_t b : parked_at_[i]) n[size_t(pool_.head_part(i))] += b;
  return n;
}

int64_t KVCache::parked_pages() const {
  int64_t n = 0;
  for (const auto& v : parked_at_)
    for (uint8_t b : v) n += b;
  return n;
}

bool KVCache::can_park() const {
  if (device_pages_held() > pool_.host_capacity() - pool_.host_pages()) return false;
  if (pool_.n_parts() > 1) {  // every rank's part must take its heads' pages
    const std::vector<int64_t> n = device_pages_by_part();
    for (int p = 0; p < pool_.n_parts(); ++p)
      if (n[size_t(p)] > pool_.host_free(p)) return false;
  }
  return true;
}

bool KVCache::park() {
  if (parked_) return true;
  if (!can_park()) return false;
  parked_at_.assign(heads_.size(), {});
  for (size_t i = 0; i < heads_.size(); ++i) {
    HeadCache& h = heads_[i];
    parked_at_[i].assign(h.pages.size(), 0);
    for (size_t j = 0; j < h.pages.size(); ++j)
      if (!pool_.on_host(h.pages[j])) {
        const int32_t nid = pool_.offload(h.pages[j]);
        if (nid < 0) fail("KV cache: the host tier ran out while parking a sequence");  // counted above
        h.pages.set(j, nid);
        parked_at_[i][j] = 1;
      }
  }
  parked_ = true;
  return true;
}

bool KVCache::unpark() {
  if (!parked_) return true;
  if (parked_pages() > pool_.device_free()) return false;
  if (pool_.n_parts() > 1) {
    const std::vector<int64_t> n = parked_pages_by_part();
    for (int p = 0; p < pool_.n_parts(); ++p)
      if (n[size_t(p)] > pool_.device_free(p)) return false;
  }
  for (size_t i = 0; i < heads_.size(); ++i) {
    HeadCache& h = heads_[i];
    for (size_t j = 0; j < h.pages.size() && j < parked_at_[i].size(); ++j)
      if (parked_at_[i][j]) {
        const int32_t nid = pool_.fetch(h.pages[j]);
        if (nid < 0) fail("KV cache: the device tier ran out while resuming a sequence");  // counted above
        h.pages.set(j, nid);
      }
  }
  parked_ = false;
  parked_at_.clear();
  note_peaks();
  return true;
}

int64_t KVCache::pages_held() const {
  int64_t n = 0;
  for (const HeadCache& h : heads_) n += int64_t(h.pages.size());
  return n;
}

int64_t KVCache::pages_for(int n_rows) const {
  int64_t need = 0;
  for (int64_t n : pages_for_parts(n_rows)) need += n;
  return need;
}

std::vector<int64_t> KVCache::pages_for_parts(int n_rows) const {
  const int ps = pool_.page_size();
  std::vector<int64_t> need(size_t(pool_.n_parts()), 0);
  for (size_t i = 0; i < heads_.size(); ++i) {
    const HeadCache& h = heads_[i];
    int64_t& n = need[size_t(pool_.head_part(i))];
    int room = 0;
    if (!h.pages.empty()) {
      const int32_t tail = h.pages.back();
      room = ps - pool_.used(tail);
      if (room > 0 && pool_.on_host(tail)) ++n;  // the tail comes back to be written
    }
    n += (std::max(0, n_rows - room) + ps - 1) / ps;
  }
  return need;
}

void KVCache::prepare(const StepInfo& s) {
  if (prepared_) return;
  const size_t n_heads = heads_.size();
  // What the last step decided: evict's scores (one read for all heads), then every head's before_step.
  std::vector<int32_t> score_ids;
  for (size_t i = 0; i < n_heads; ++i)
    if (policies_[i]->needs_scores(heads_[i])) score_ids.insert(score_ids.end(), heads_[i].pages.begin(), heads_[i].pages.end());
  pool_.read_scores(score_ids);
  for (size_t i = 0; i < n_heads; ++i) policies_[i]->before_step(heads_[i], pool_, s);
  prepared_ = true;
}

void KVCache::plan_step(KVStep& step, int row0, const StepInfo& s) {
  if (parked_) fail("KV cache: a parked sequence was planned into a step");
  prepare(s);
  const size_t n_heads = heads_.size();
  // The new rows' slots, after checking that this sequence's budget and the device tier have every page
  // they need.
  if (std::string why = over_budget(s.n_rows); !why.empty()) throw BudgetExhausted(why);
  const int64_t need = pages_for(s.n_rows);
  if (pool_.n_parts() > 1) {  // tensor parallel: each rank's part of the pool must have its heads' pages
    const std::vector<int64_t> by_part = pages_for_parts(s.n_rows);
    for (int p = 0; p < pool_.n_parts(); ++p)
      if (by_part[size_t(p)] > pool_.device_free(p))
        throw BudgetExhausted(fmt::format(
            "KV budget exhausted after {} tokens: the next {} need {} more device pages on tensor-parallel rank {}, "
            "{} of its {} are free; raise --kv-budget or --kv-pool, or use a streaming/evict policy",
            appended_, s.n_rows, by_part[size_t(p)], p, pool_.device_free(p), pool_.device_capacity(p)));
  }
  if (need > pool_.device_free())
    throw BudgetExhausted(fmt::format(
        "KV budget exhausted after {} tokens: the next {} need {} more device pages, {} of {} are free ({:.1f} MiB "
        "in all); raise --kv-budget or use a streaming/evict policy",
        appended_, s.n_rows, need, pool_.device_free(), pool_.device_capacity(),
        double(pool_.device_capacity() * pool_.layout().page_bytes()) / (1024.0 * 1024)));
  prepared_ = false;
  const int ps = pool_.page_size();
  for (int l = 0; l < n_layer_; ++l) {
    int32_t* slots = step.layer_slots(l);
    for (int h = 0; h < n_kv_; ++h) {
      HeadCache& hc = heads_[size_t(l) * n_kv_ + h];
      if (!hc.pages.empty() && pool_.on_host(hc.pages.back()) && pool_.used(hc.pages.back()) < ps)
        hc.pages.set_back(pool_.fetch(hc.pages.back()));  // counted above
      for (int r = 0; r < s.n_rows; ++r) {
        if (hc.pages.empty() || pool_.used(hc.pages.back()) == ps)
          hc.pages.push_back(pool_.alloc(pool_.head_part(size_t(l) * n_kv_ + h)));
        slots[size_t(row0 + r) * size_t(n_kv_) + size_t(h)] = pool_.assign_slot(hc.pages.back(), s.pos0 + r);
        ++hc.tokens;
      }
    }
  }
  appended_ += s.n_rows;

  // 3. Pages the last step chose come back if there is room.
  for (size_t i = 0; i < n_heads; ++i) policies_[i]->prefetch(heads_[i], pool_, s);

  // 4. The page lists, into this sequence's region of the step's page table: a segment per head, with room
  // to grow by an eighth. Where the region stands from the last step only what changed is written.
  bool relay = seg_cap_.size() != n_heads;
  for (size_t i = 0; i < n_heads && !relay; ++i) relay = heads_[i].pages.size() > size_t(seg_cap_[i]);
  if (relay) {
    seg_cap_.resize(n_heads);
    region_size_ = 0;
    for (size_t i = 0; i < n_heads; ++i) {
      const size_t n = heads_[i].pages.size();
      seg_cap_[i] = int32_t((n + n / 8 + 4 + 3) / 4 * 4);
      region_size_ += seg_cap_[i];
    }
  }
  bool kept = false;
  const int64_t off = step.region(serial_, region_size_, kept);
  kept = kept && !relay && table_serial_ == step.serial();  // (kept: where this table had it last step)
  table_serial_ = step.serial();

  // 5. Every head's job.
  int64_t seg = off;
  for (int l = 0; l < n_layer_; ++l) {
    std::vector<AttnJob>& jobs = step.jobs[size_t(l)];
    first_job_[size_t(l)] = jobs.size();
    for (int h = 0; h < n_kv_; ++h) {
      const size_t i = size_t(l) * n_kv_ + h;
      PageList& pages = heads_[i].pages;
      const int64_t n = int64_t(pages.size());
      if (kept) {  // what select_pages moved last step, then what changed since the table took the list
        const auto [lo, hi] = selected_range_[i];
        const int64_t from = int64_t(pages.synced()), to = std::min<int64_t>(hi, from);
        if (lo < to) step.write(seg + lo, pages.data() + lo, to - lo);
        step.write(seg + from, pages.data() + from, n - from);
      } else {
        step.write(seg, pages.data(), n);
      }
      pages.mark_synced();
      AttnJob j;
      j.row0 = row0;
      j.n_rows = s.n_rows;
      j.kv_head = h;
      j.page0 = int32_t(seg);
      j.n_pages = int32_t(pages.size());
      policies_[i]->plan(heads_[i], pool_, s, j);
      // select_pages rewrites the entries from the candidates' first to the list's new end in place.
      selected_range_[i] = j.select_k > 0 ? std::pair{j.cand0, j.n_pages - (j.n_cand - j.select_k)} : std::pair{0, 0};
      step.selects |= j.select_k > 0;
      jobs.push_back(j);
      seg += seg_cap_[i];
    }
  }
  note_peaks();
}

void KVCache::finish_step(const KVStep& step, const StepInfo& s) {
  for (int l = 0; l < n_layer_; ++l)
    for (int h = 0; h < n_kv_; ++h) {
      const size_t i = size_t(l) * n_kv_ + h;
      const AttnJob& j = step.jobs[size_t(l)][first_job_[size_t(l)] + size_t(h)];
      policies_[i]->after_step(heads_[i], pool_, s,
                               std::span<const int32_t>(step.page_ids.data() + j.page0, size_t(j.n_pages)));
    }
  note_peaks();
}

}  // namespace headroom
