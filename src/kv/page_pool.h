// PagePool: the page ids of one backend KVStore (backend/kv_layout.h) and the host's metadata about them.
//
// The pool never touches KV memory. It hands out page ids in two tiers (device ids [0, device_pages), host
// ids after them), keeps for every id the fill count and a mirror of its slots' positions (written when the
// caller assigns a slot, so policies plan on host metadata only), and queues the backend work its changes
// need — emptying reused pages, tier moves, evict's slot moves — in order, until flush() hands the queue to
// the backend (once per step, before the layers run).
//
// A tier move gives the page a new id (the id is its place); offload()/fetch() return it and the caller
// replaces the old id in its page list. The device tier has a hard capacity (from --kv-budget); alloc()
// returns -1 when it is full. Pages are reference counted so that sequences can share a prefix later.
//
// Tensor parallel (docs/tensor-parallel.md): a pool may be split into parts, one per rank, each with its own
// backend and KVStore. Page ids stay global — the device ids of part r are one contiguous range of
// [0, device_pages), its host ids one range after them — and every (layer, KV head) draws its pages from its
// rank's part (head_part), so a page and its moves stay in one part. A part's store holds only its own ids,
// numbered locally (local_id); the queued work goes to the store of the part that owns each id.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "backend/backend.h"

namespace headroom {

class PagePool {
 public:
  PagePool(Backend& be, const KVLayout& layout);
  // A pool split into parts: backends[r] stores part r, which has device[r] device and host[r] host pages
  // (the layout's counts are their sums); head_part[layer * n_kv + kv_head] is the part of each head.
  PagePool(const std::vector<Backend*>& backends, const KVLayout& layout, std::vector<int8_t> head_part,
           const std::vector<int32_t>& device, const std::vector<int32_t>& host);

  const KVLayout& layout() const { return layout_; }
  int page_size() const { return layout_.page_size; }
  int head_dim() const { return layout_.head_dim; }
  Backend& backend() { return *parts_[0].be; }
  KVStore& store() { return *parts_[0].store; }

  // Parts (1 unless split for tensor parallelism).
  int n_parts() const { return int(parts_.size()); }
  KVStore& store(int part) { return *parts_[size_t(part)].store; }
  // The part of a head (index layer * n_kv + kv_head), and of a page id.
  int head_part(size_t head) const { return head_part_.empty() ? 0 : head_part_[head]; }
  size_t placed_heads() const { return head_part_.size(); }  // 0 for a pool of one part
  int part_of(int32_t id) const { return part_of_[size_t(id)]; }
  // A global page id (or slot id * page_size + slot) as the id its part's store knows; and back.
  int32_t local_id(int32_t id) const { return local_[size_t(id)]; }
  int32_t local_slot(int32_t slot) const {
    return local_id(slot / layout_.page_size) * layout_.page_size + slot % layout_.page_size;
  }
  int32_t global_id(int part, int32_t local) const {
    const Part& p = parts_[size_t(part)];
    return local < p.layout.device_pages ? p.dev0 + local : p.host0 + (local - p.layout.device_pages);
  }
  int64_t device_free(int part) const { return int64_t(parts_[size_t(part)].device_free.size()); }
  int64_t host_free(int part) const { return int64_t(parts_[size_t(part)].host_free.size()); }
  int64_t device_capacity(int part) const { return parts_[size_t(part)].layout.device_pages; }

  // An empty page (pos -1 everywhere), refcount 1, on the device (of `part`); -1 if that tier is full.
  int32_t alloc(int part = 0);
  void retain(int32_t id);
  void release(int32_t id);  // frees the page when the count drops to 0

  bool on_host(int32_t id) const { return layout_.on_host(id); }
  int used(int32_t id) const { return meta_[size_t(id)].used; }  // slots assigned so far (in order)
  const int32_t* pos(int32_t id) const { return &pos_[size_t(id) * size_t(layout_.page_size)]; }
  // Assigns the next slot of page id to a token at position p; returns its global slot id*page_size+slot.
  int32_t assign_slot(int32_t id, int32_t p);

  // Tier moves (queued): the page's new id, or -1 if the other tier is full (the page stays where it is).
  int32_t offload(int32_t id);
  int32_t fetch(int32_t id);

  // Evict: reads the accumulated scores of pages into the host mirror (one synchronisation), then moves
  // live slots (queued slot copies) and empties the slots past `keep` of a page.
  void read_scores(std::span<const int32_t> ids);
  const float* scores(int32_t id) const { return &scores_[size_t(id) * size_t(layout_.page_size)]; }
  void move_slot(int32_t src_id, int src_slot, int32_t dst_id, int dst_slot);
  // Marks a slot evicted in the mirror (pos -1); compact_pages() then closes the gaps on the device too.
  void mark_evicted(int32_t id, int slot) { pos_[size_t(id) * size_t(layout_.page_size) + size_t(slot)] = -1; }
  void truncate(int32_t id, int keep);

  // Reads one page back as float K, V [page_size][head_dim] and positions (synchronises; for inspection).
  void read_page(int32_t id, float* k, float* v, int32_t* pos);

  // Hands the queued work to the backend, in order.
  void flush();

  int64_t device_capacity() const { return layout_.device_pages; }
  int64_t host_capacity() const { return layout_.host_pages; }
  int64_t device_free() const;
  int64_t device_pages() const { return layout_.device_pages - device_free(); }
  int64_t host_pages() const;
  int64_t peak_device_pages() const { return peak_device_; }
  int64_t peak_host_pages() const { return peak_host_; }
  void reset_peak() { peak_device_ = device_pages(); peak_host_ = host_pages(); }
  // Bytes in the stored type: K + V, and the policy metadata (positions, key bounds, scores) separately.
  int64_t device_bytes() const { return device_pages() * layout_.kv_page_bytes(); }
  int64_t host_bytes() const { return host_pages() * layout_.kv_page_bytes(); }
  int64_t device_meta_bytes() const { return device_pages() * layout_.meta_page_bytes(); }
  int64_t page_bytes() const { return layout_.kv_page_bytes(); }
  int64_t device_moves_out() const { return moves_out_; }
  int64_t device_moves_in() const { return moves_in_; }

 private:
  struct Meta {
    int32_t refs = 0;
    int used = 0;
  };
  struct Op {
    enum Kind : uint8_t { Reset, CopyPage, CopySlot } kind;
    int32_t a, b;
  };
  struct Part {
    Backend* be = nullptr;
    KVLayout layout;  // this part's page counts
    int32_t dev0 = 0, host0 = 0;  // its first global device id and host id
    std::unique_ptr<KVStore> store;
    std::vector<int32_t> device_free, host_free;  // stacks: the lowest ids come out first
  };
  int32_t take(std::vector<int32_t>& free_list);
  int32_t move(int32_t id, std::vector<int32_t>& to);
  void note_peaks();

  KVLayout layout_;
  std::vector<Part> parts_;
  std::vector<int8_t> head_part_, part_of_;
  std::vector<int32_t> local_;
  std::vector<Meta> meta_;
  std::vector<int32_t> pos_;
  std::vector<float> scores_;
  std::vector<Op> queue_;
  int64_t peak_device_ = 0, peak_host_ = 0, moves_out_ = 0, moves_in_ = 0;
};

}  // namespace headroom
