#include "kv/page_pool.h"

#include <cassert>
#include <cstring>
#include <limits>

namespace headroom {

namespace {
constexpr int32_t kChunkSlots = 64;
}

int32_t PagePool::Arena::take() {
  if (!free_slots.empty()) {
    int32_t s = free_slots.back();
    free_slots.pop_back();
    return s;
  }
  if (n_slots % kChunkSlots == 0) chunks.emplace_back(new float[kChunkSlots * slot_floats]);
  return n_slots++;
}

float* PagePool::Arena::at(int32_t s) { return chunks[s / kChunkSlots].get() + (s % kChunkSlots) * slot_floats; }

PagePool::PagePool(int page_size, int head_dim, int64_t device_capacity_pages)
    : page_size_(page_size), head_dim_(head_dim), capacity_(device_capacity_pages) {
  device_.slot_floats = host_.slot_floats = 2LL * page_size * head_dim;
}

float* PagePool::data(int32_t id) {
  const Meta& m = meta_[id];
  return m.device_slot >= 0 ? device_.at(m.device_slot) : host_.at(m.host_slot);
}

int32_t PagePool::alloc() {
  if (device_in_use_ >= capacity_) return -1;
  int32_t id;
  if (!free_ids_.empty()) {
    id = free_ids_.back();
    free_ids_.pop_back();
  } else {
    id = static_cast<int32_t>(meta_.size());
    meta_.emplace_back();
  }
  Meta& m = meta_[id];
  m.refs = 1;
  m.device_slot = device_.take();
  m.host_slot = -1;
  m.used = 0;
  m.pos.assign(page_size_, -1);
  m.score.assign(page_size_, 0.0f);
  m.kmin.assign(head_dim_, std::numeric_limits<float>::infinity());
  m.kmax.assign(head_dim_, -std::numeric_limits<float>::infinity());
  ++device_in_use_;
  if (device_in_use_ > peak_device_) peak_device_ = device_in_use_;
  return id;
}

void PagePool::retain(int32_t id) { ++meta_[id].refs; }

void PagePool::release(int32_t id) {
  Meta& m = meta_[id];
  assert(m.refs > 0);
  if (--m.refs > 0) return;
  if (m.device_slot >= 0) {
    device_.give(m.device_slot);
    --device_in_use_;
  }
  if (m.host_slot >= 0) {
    host_.give(m.host_slot);
    --host_in_use_;
  }
  m.device_slot = m.host_slot = -1;
  free_ids_.push_back(id);
}

void PagePool::offload(int32_t id) {
  Meta& m = meta_[id];
  if (m.host_slot >= 0) return;
  m.host_slot = host_.take();
  std::memcpy(host_.at(m.host_slot), device_.at(m.device_slot), page_bytes());
  device_.give(m.device_slot);
  m.device_slot = -1;
  --device_in_use_;
  ++host_in_use_;
  if (host_in_use_ > peak_host_) peak_host_ = host_in_use_;
  ++moves_out_;
}

bool PagePool::fetch(int32_t id) {
  Meta& m = meta_[id];
  if (m.device_slot >= 0) return true;
  if (device_in_use_ >= capacity_) return false;
  m.device_slot = device_.take();
  std::memcpy(device_.at(m.device_slot), host_.at(m.host_slot), page_bytes());
  host_.give(m.host_slot);
  m.host_slot = -1;
  --host_in_use_;
  ++device_in_use_;
  if (device_in_use_ > peak_device_) peak_device_ = device_in_use_;
  ++moves_in_;
  return true;
}

}  // namespace headroom
