// The KV cache's storage layout, shared by every backend: the KV type, the page shape and the byte counts.
// This is the one home of the page-bytes formula; budgets, reports and backends all read it from here.
//
// A backend's KVStore holds two tiers of pages in flat arrays (backend.h):
//   ids [0, device_pages)                            the device tier (GPU memory on CUDA)
//   ids [device_pages, device_pages + host_pages)    the host tier (pinned host memory on CUDA)
// Per page id:  K [page_size][head_dim] and V [page_size][head_dim] in `type`,
//               pos [page_size] int32 (absolute position of the slot's token; -1 = empty or evicted),
//               optionally key min/max [head_dim] float each (Quest page bounds, topk; kept in the device
//               tier for every id) and slot scores [page_size] float (accumulated attention, evict).
// A slot is addressed globally as page_id * page_size + slot.
#pragma once

#include <cstdint>
#include <string>

namespace headroom {

enum class KVType : uint8_t { F32, F16, BF16, Q8_0 };

const char* kv_type_name(KVType t);
// "f32" | "f16" | "bf16" | "q8_0" (case-insensitive); throws Error naming `flag` and the choices.
KVType parse_kv_type(const std::string& s, const char* flag = "--kv-type");
// Bytes of one stored K (or V) row of head_dim elements. Q8_0 stores blocks of 32 (34 bytes each) as
// llama.cpp does, so it needs head_dim % 32 == 0 (kv_type_fits says why not, in one line, or "").
int64_t kv_row_bytes(KVType t, int head_dim);
std::string kv_type_fits(KVType t, int head_dim);

struct KVLayout {
  KVType type = KVType::F16;
  int page_size = 32;
  int head_dim = 0;
  int32_t device_pages = 0;
  int32_t host_pages = 0;
  bool page_minmax = false;  // Quest key bounds per page (topk)
  bool slot_scores = false;  // accumulated attention per slot (evict)

  // K + V of one page in the stored type: what llama.cpp would hold for page_size tokens of one KV head.
  int64_t kv_page_bytes() const { return 2 * int64_t(page_size) * kv_row_bytes(type, head_dim); }
  // Per-page metadata: slot positions, plus key min/max and slot scores when kept.
  int64_t meta_page_bytes() const {
    return int64_t(page_size) * 4 + (page_minmax ? 2 * int64_t(head_dim) * 4 : 0) +
           (slot_scores ? int64_t(page_size) * 4 : 0);
  }
  int64_t page_bytes() const { return kv_page_bytes() + meta_page_bytes(); }
  int32_t total_pages() const { return device_pages + host_pages; }
  bool on_host(int32_t id) const { return id >= device_pages; }
};

}  // namespace headroom
