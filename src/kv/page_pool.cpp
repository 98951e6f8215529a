#include "kv/page_pool.h"

#include <cassert>

#include "util/error.h"

namespace headroom {

PagePool::PagePool(Backend& be, const KVLayout& layout)
    : PagePool(std::vector<Backend*>{&be}, layout, {}, {layout.device_pages}, {layout.host_pages}) {}

PagePool::PagePool(const std::vector<Backend*>& backends, const KVLayout& layout, std::vector<int8_t> head_part,
                   const std::vector<int32_t>& device, const std::vector<int32_t>& host)
    : layout_(layout), head_part_(std::move(head_part)) {
  if (layout.page_size < 1 || layout.head_dim < 1 || layout.device_pages < 0 || layout.host_pages < 0)
    fail("KV pool: bad layout (page size {}, head_dim {}, {} + {} pages)", layout.page_size, layout.head_dim,
         layout.device_pages, layout.host_pages);
  const size_t R = backends.size();
  if (R < 1 || device.size() != R || host.size() != R) fail("KV pool: {} parts with {} and {} page counts", R, device.size(), host.size());
  int64_t D = 0, H = 0;
  for (size_t r = 0; r < R; ++r) {
    if (device[r] < 0 || host[r] < 0) fail("KV pool: part {} has a negative page count", r);
    D += device[r];
    H += host[r];
  }
  if (D != layout.device_pages || H != layout.host_pages)
    fail("KV pool: the parts hold {} + {} pages, the layout {} + {}", D, H, layout.device_pages, layout.host_pages);
  for (int8_t p : head_part_)
    if (p < 0 || size_t(p) >= R) fail("KV pool: a head is placed on part {} of {}", p, R);
  const size_t n = size_t(layout.total_pages());
  part_of_.resize(n);
  local_.resize(n);
  parts_.resize(R);
  int32_t dev0 = 0, host0 = layout.device_pages;
  for (size_t r = 0; r < R; ++r) {
    Part& p = parts_[r];
    p.be = backends[r];
    p.layout = layout;
    p.layout.device_pages = device[r];
    p.layout.host_pages = host[r];
    p.dev0 = dev0;
    p.host0 = host0;
    p.store = p.be->kv_create(p.layout);
    for (int32_t i = 0; i < device[r]; ++i) {
      part_of_[size_t(dev0 + i)] = int8_t(r);
      local_[size_t(dev0 + i)] = i;
    }
    for (int32_t i = 0; i < host[r]; ++i) {
      part_of_[size_t(host0 + i)] = int8_t(r);
      local_[size_t(host0 + i)] = device[r] + i;
    }
    for (int32_t i = device[r]; i-- > 0;) p.device_free.push_back(dev0 + i);
    for (int32_t i = host[r]; i-- > 0;) p.host_free.push_back(host0 + i);
    dev0 += device[r];
    host0 += host[r];
  }
  meta_.resize(n);
  pos_.assign(n * size_t(layout.page_size), -1);
  scores_.assign(layout.slot_scores ? n * size_t(layout.page_size) : 0, 0.0f);
}

int64_t PagePool::device_free() const {
  int64_t n = 0;
  for (const Part& p : parts_) n += int64_t(p.device_free.size());
  return n;
}

int64_t PagePool::host_pages() const {
  int64_t n = 0;
  for (const Part& p : parts_) n += int64_t(p.host_free.size());
  return layout_.host_pages - n;
}

int32_t PagePool::take(std::vector<int32_t>& free_list) {
  if (free_list.empty()) return -1;
  const int32_t id = free_list.back();
  free_list.pop_back();
  Meta& m = meta_[size_t(id)];
  assert(m.refs == 0);
  m.refs = 1;
  m.used = 0;
  std::fill_n(pos_.begin() + ptrdiff_t(id) * layout_.page_size, layout_.page_size, -1);
  if (!scores_.empty()) std::fill_n(scores_.begin() + ptrdiff_t(id) * layout_.page_size, layout_.page_size, 0.0f);
  note_peaks();
  return id;
}

void PagePool::note_peaks() {
  peak_device_ = std::max(peak_device_, device_pages());
  peak_host_ = std::max(peak_host_, host_pages());
}

int32_t PagePool::alloc(int part) {
  const int32_t id = take(parts_[size_t(part)].device_free);
  if (id >= 0) queue_.push_back({Op::Reset, id, 0});
  return id;
}

void PagePool::retain(int32_t id) { ++meta_[size_t(id)].refs; }

void PagePool::release(int32_t id) {
  Meta& m = meta_[size_t(id)];
  assert(m.refs > 0);
  if (--m.refs > 0) return;
  (on_host(id) ? parts_[size_t(part_of(id))].host_free : parts_[size_t(part_of(id))].device_free).push_back(id);
}

int32_t PagePool::assign_slot(int32_t id, int32_t p) {
  Meta& m = meta_[size_t(id)];
  assert(m.used < layout_.page_size);
  const int slot = m.used++;
  pos_[size_t(id) * size_t(layout_.page_size) + size_t(slot)] = p;
  return id * layout_.page_size + slot;
}

int32_t PagePool::move(int32_t id, std::vector<int32_t>& to) {
  assert(meta_[size_t(id)].refs == 1);  // a shared page would need every holder's list updated
  const int32_t nid = take(to);
  if (nid < 0) return -1;
  const size_t ps = size_t(layout_.page_size);
  meta_[size_t(nid)].used = meta_[size_t(id)].used;
  std::copy_n(pos_.begin() + ptrdiff_t(size_t(id) * ps), ps, pos_.begin() + ptrdiff_t(size_t(nid) * ps));
  if (!scores_.empty())
    std::copy_n(scores_.begin() + ptrdiff_t(size_t(id) * ps), ps, scores_.begin() + ptrdiff_t(size_t(nid) * ps));
  queue_.push_back({Op::CopyPage, id, nid});
  release(id);
  note_peaks();
  return nid;
}

int32_t PagePool::offload(int32_t id) {
  if (on_host(id)) return id;
  const int32_t nid = move(id, parts_[size_t(part_of(id))].host_free);
  if (nid < 0)
    fail("KV host tier full: all {} host pages are in use (the pool was sized for fewer offloaded pages)",
         layout_.host_pages);
  ++moves_out_;
  return nid;
}

int32_t PagePool::fetch(int32_t id) {
  if (!on_host(id)) return id;
  const int32_t nid = move(id, parts_[size_t(part_of(id))].device_free);
  if (nid >= 0) ++moves_in_;
  return nid;
}

void PagePool::read_scores(std::span<const int32_t> ids) {
  if (ids.empty() || scores_.empty()) return;
  flush();  // the scores of pages whose slots were moved must be read after the move
  const size_t ps = size_t(layout_.page_size);
  std::vector<int32_t> local, global;
  std::vector<float> buf;
  for (size_t r = 0; r < parts_.size(); ++r) {  // each part's ids from its own store
    local.clear();
    global.clear();
    for (int32_t id : ids)
      if (part_of(id) == int(r)) {
        local.push_back(local_id(id));
        global.push_back(id);
      }
    if (local.empty()) continue;
    buf.resize(local.size() * ps);
    parts_[r].be->kv_read_scores(*parts_[r].store, local, buf.data());
    for (size_t i = 0; i < global.size(); ++i)
      std::copy_n(buf.begin() + ptrdiff_t(i * ps), ps, scores_.begin() + ptrdiff_t(size_t(global[i]) * ps));
  }
}

void PagePool::move_slot(int32_t src_id, int src_slot, int32_t dst_id, int dst_slot) {
  const size_t ps = size_t(layout_.page_size);
  pos_[size_t(dst_id) * ps + size_t(dst_slot)] = pos_[size_t(src_id) * ps + size_t(src_slot)];
  if (!scores_.empty()) scores_[size_t(dst_id) * ps + size_t(dst_slot)] = scores_[size_t(src_id) * ps + size_t(src_slot)];
  queue_.push_back({Op::CopySlot, src_id * layout_.page_size + src_slot, dst_id * layout_.page_size + dst_slot});
}

void PagePool::truncate(int32_t id, int keep) {
  Meta& m = meta_[size_t(id)];
  const size_t ps = size_t(layout_.page_size);
  for (int s = keep; s < m.used; ++s) {
    pos_[size_t(id) * ps + size_t(s)] = -1;
    if (!scores_.empty()) scores_[size_t(id) * ps + size_t(s)] = 0.0f;
    queue_.push_back({Op::CopySlot, -1, id * layout_.page_size + s});  // src -1: empty the slot
  }
  m.used = std::min(m.used, keep);
}

void PagePool::read_page(int32_t id, float* k, float* v, int32_t* pos) {
  flush();
  Part& p = parts_[size_t(part_of(id))];
  p.be->kv_read_page(*p.store, local_id(id), k, v, pos);
}

void PagePool::flush() {
  std::vector<int32_t> resets;
  std::vector<PageCopy> pages;
  std::vector<SlotCopy> slots;
  // Every part's ops in their order, on its own store with its local ids (a page and its copies stay in one
  // part, so the order between parts does not matter).
  for (size_t r = 0; r < parts_.size(); ++r) {
    Part& part = parts_[r];
    auto issue = [&] {
      if (!resets.empty()) part.be->kv_reset(*part.store, resets);
      if (!pages.empty()) part.be->kv_copy_pages(*part.store, pages);
      if (!slots.empty()) part.be->kv_copy_slots(*part.store, slots);
      resets.clear();
      pages.clear();
      slots.clear();
    };
    Op::Kind last = Op::Reset;
    for (const Op& op : queue_) {
      const int32_t owner = op.kind == Op::CopySlot ? op.b / layout_.page_size : op.b;
      if (part_of(op.kind == Op::Reset ? op.a : owner) != int(r)) continue;
      if (op.kind != last) issue();  // keep the order between kinds
      last = op.kind;
      switch (op.kind) {
        case Op::Reset: resets.push_back(local_id(op.a)); break;
        case Op::CopyPage: pages.push_back({local_id(op.a), local_id(op.b)}); break;
        case Op::CopySlot: slots.push_back({op.a < 0 ? -1 : local_slot(op.a), local_slot(op.b)}); break;
      }
    }
    issue();
  }
  queue_.clear();
}

}  // namespace headroom
