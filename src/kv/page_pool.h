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

  const KVLayout& layout() const { return layout_; }
  int page_size() const { return layout_.page_size; }
  int head_dim() const { return layout_.head_dim; }
  Backend& backend() { return be_; }
  KVStore& store() { return *store_; }

  // An empty page (pos -1 everywhere), refcount 1, on the device; -1 if the device tier is full.
  int32_t alloc();
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
  int64_t device_free() const { return int64_t(device_free_.size()); }
  int64_t device_pages() const { return layout_.device_pages - device_free(); }
  int64_t host_pages() const { return layout_.host_pages - int64_t(host_free_.size()); }
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
  int32_t take(std::vector<int32_t>& free_list);
  int32_t move(int32_t id, std::vector<int32_t>& to);
  void note_peaks();

  Backend& be_;
  KVLayout layout_;
  std::unique_ptr<KVStore> store_;
  std::vector<Meta> meta_;
  std::vector<int32_t> pos_;
  std::vector<float> scores_;
  std::vector<int32_t> device_free_, host_free_;  // stacks: the lowest ids come out first
  std::vector<Op> queue_;
  int64_t peak_device_ = 0, peak_host_ = 0, moves_out_ = 0, moves_in_ = 0;
};

}  // namespace headroom
