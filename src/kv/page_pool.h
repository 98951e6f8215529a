// PagePool: fixed-size KV pages shared by every (sequence, layer, KV head) of the process.
//
// A page holds K and V rows (head_dim floats each) for `page_size` token slots of ONE KV head, plus per-slot
// metadata (absolute position, accumulated attention score) and per-page key summaries (elementwise min and
// max of its keys, for Quest-style page scoring). Pages live in one of two tiers:
//   device tier: the budgeted memory attention reads (on CUDA: GPU memory; on CPU: the main arena);
//   host tier:   cold pages moved out of the device tier (on CUDA: pinned host memory). On CPU both are RAM,
//                so what matters is the accounting and the move path, which are the same code.
// The device tier has a hard capacity in pages (from --kv-budget); alloc() returns -1 when it is exhausted.
// Pages are reference counted so that sequences can share a prefix later.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

namespace headroom {

class PagePool {
 public:
  PagePool(int page_size, int head_dim, int64_t device_capacity_pages);

  int page_size() const { return page_size_; }
  int head_dim() const { return head_dim_; }
  int64_t page_bytes() const { return 2LL * page_size_ * head_dim_ * int64_t(sizeof(float)); }  // K + V

  // A page with every slot empty (pos -1, score 0, used 0, min +inf, max -inf), refcount 1, on the device.
  // Returns -1 if the device tier is full.
  int32_t alloc();
  void retain(int32_t id);
  void release(int32_t id);  // frees the page when the count drops to 0

  float* k(int32_t id) { return data(id); }
  float* v(int32_t id) { return data(id) + int64_t(page_size_) * head_dim_; }
  int32_t* pos(int32_t id) { return &meta_[id].pos[0]; }
  float* score(int32_t id) { return &meta_[id].score[0]; }
  float* kmin(int32_t id) { return &meta_[id].kmin[0]; }
  float* kmax(int32_t id) { return &meta_[id].kmax[0]; }
  int& used(int32_t id) { return meta_[id].used; }  // slots filled (0..page_size), filled in order

  // Tier moves. offload: device -> host (always succeeds; a page already there stays). fetch: host -> device
  // (true at once for a device page); false if the device is full.
  bool on_host(int32_t id) const { return meta_[id].host_slot >= 0; }
  void offload(int32_t id);
  bool fetch(int32_t id);

  int64_t device_capacity() const { return capacity_; }
  int64_t device_pages() const { return device_in_use_; }
  int64_t host_pages() const { return host_in_use_; }
  int64_t peak_device_pages() const { return peak_device_; }
  int64_t peak_host_pages() const { return peak_host_; }
  void reset_peak() { peak_device_ = device_in_use_; peak_host_ = host_in_use_; }
  int64_t device_bytes() const { return device_in_use_ * page_bytes(); }
  int64_t host_bytes() const { return host_in_use_ * page_bytes(); }
  int64_t device_moves_out() const { return moves_out_; }
  int64_t device_moves_in() const { return moves_in_; }

 private:
  struct Meta {
    int32_t refs = 0;
    int32_t device_slot = -1;
    int32_t host_slot = -1;
    int used = 0;
    std::vector<int32_t> pos;
    std::vector<float> score, kmin, kmax;
  };
  // An arena of page-sized slots grown in chunks; slots are recycled through a free list.
  struct Arena {
    int64_t slot_floats = 0;
    std::vector<std::unique_ptr<float[]>> chunks;
    std::vector<int32_t> free_slots;
    int32_t n_slots = 0;
    int32_t take();
    void give(int32_t s) { free_slots.push_back(s); }
    float* at(int32_t s);
  };
  float* data(int32_t id);

  int page_size_, head_dim_;
  int64_t capacity_;
  std::vector<Meta> meta_;
  std::vector<int32_t> free_ids_;
  Arena device_, host_;
  int64_t device_in_use_ = 0, host_in_use_ = 0, peak_device_ = 0, peak_host_ = 0, moves_out_ = 0, moves_in_ = 0;
};

}  // namespace headroom
