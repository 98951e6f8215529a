// CPU backend: the KV store (backend.h's KVStore) as flat arrays, and the KV type's row codecs.
//
// Memory: per tier (device ids [0, device_pages), host ids [device_pages, total)) one 64-byte aligned
// allocation each for K and V ([page][slot][row_bytes]), pos ([page][slot] int32) and, when the layout keeps
// them, slot scores ([page][slot] float); key bounds ([id][head_dim] min, then max) in one array for every
// id. K and V come from the allocator uninitialized, so capacity that no kv_store ever touches costs no RSS
// (large blocks are fresh mmap pages); the metadata (pos, scores, bounds) is reset on creation (every slot
// pos -1), which is what makes the untouched K/V harmless: attention never lets a pos -1 slot's row reach a
// result. On the CPU both tiers are ordinary RAM: attention reads host-tier ids in place.
//
// Conversions (kv_encode_row / kv_decode_row), the same in every backend:
//   F32  stored as is;   F16  IEEE half, round to nearest even;   BF16  round to nearest even (NaN stays NaN);
//   Q8_0 blocks of 32 exactly as llama.cpp's quantize_row_q8_0_ref: amax = max |x|, d = amax / 127,
//        id = d ? 1/d : 0, q = roundf(x * id) (half away from zero), stored d = fp16(d); value = fp16(d) * q
//        (the product is exact in float: 11-bit by 8-bit).
// Key bounds are updated with the *stored* values (decoded after encoding), so a page's bounds hold exactly
// the keys attention reads.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <memory>

#include "backend/backend.h"

namespace headroom::cpu {

// One row of head_dim floats <-> its stored bytes (kv_row_bytes(t, head_dim) of them).
void kv_encode_row(KVType t, const float* x, int head_dim, uint8_t* dst);
void kv_decode_row(KVType t, const uint8_t* src, int head_dim, float* dst);

class CpuKVStore final : public KVStore {
 public:
  // Throws Error (one line) for a layout the CPU cannot store or memory it cannot get.
  explicit CpuKVStore(const KVLayout& layout);

  int page_size() const { return layout_.page_size; }
  int head_dim() const { return layout_.head_dim; }
  KVType type() const { return layout_.type; }
  int64_t row_bytes() const { return rb_; }
  int32_t total_pages() const { return layout_.total_pages(); }
  int64_t total_slots() const { return int64_t(layout_.total_pages()) * layout_.page_size; }

  // Page id's arrays (id must be valid: check_id).
  uint8_t* k(int32_t id) const { return tier(id).k.get() + size_t(local(id)) * page_kv_bytes(); }
  uint8_t* v(int32_t id) const { return tier(id).v.get() + size_t(local(id)) * page_kv_bytes(); }
  int32_t* pos(int32_t id) const {
    return reinterpret_cast<int32_t*>(tier(id).pos.get()) + size_t(local(id)) * size_t(layout_.page_size);
  }
  float* scores(int32_t id) const {  // null without slot scores
    return layout_.slot_scores ? reinterpret_cast<float*>(tier(id).scores.get()) + size_t(local(id)) * size_t(layout_.page_size)
                               : nullptr;
  }
  float* kmin(int32_t id) const {  // null without key bounds; kmax = kmin + head_dim
    return layout_.page_minmax ? reinterpret_cast<float*>(minmax_.get()) + size_t(id) * 2 * size_t(layout_.head_dim) : nullptr;
  }
  float* kmax(int32_t id) const { return layout_.page_minmax ? kmin(id) + layout_.head_dim : nullptr; }

  // Throws Error naming `op` if id is not a page id of this store (or slot not a global slot).
  void check_id(int32_t id, const char* op) const;
  void check_slot(int64_t slot, const char* op) const;
  // Empties page id: pos -1, score 0, key bounds +inf / -inf.
  void reset(int32_t id);

 private:
  struct Free {
    void operator()(uint8_t* p) const { std::free(p); }
  };
  using Buf = std::unique_ptr<uint8_t, Free>;
  struct Tier {
    Buf k, v, pos, scores;
  };
  static Buf allocate(int64_t pages, int64_t per_page, const KVLayout& l, const char* what);
  size_t page_kv_bytes() const { return size_t(layout_.page_size) * size_t(rb_); }
  const Tier& tier(int32_t id) const { return id < layout_.device_pages ? tiers_[0] : tiers_[1]; }
  int32_t local(int32_t id) const { return id < layout_.device_pages ? id : id - layout_.device_pages; }

  int64_t rb_ = 0;
  Tier tiers_[2];
  Buf minmax_;
};

}  // namespace headroom::cpu
