#include "kv/page_pool.h"

#include <cassert>

#include "util/error.h"

namespace headroom {

PagePool::PagePool(Backend& be, const KVLayout& layout) : be_(be), layout_(layout) {
  if (layout.page_size < 1 || layout.head_dim < 1 || layout.device_pages < 0 || layout.host_pages < 0)
    fail("KV pool: bad layout (page size {}, head_dim {}, {} + {} pages)", layout.page_size, layout.head_dim,
         layout.device_pages, layout.host_pages);
  store_ = be.kv_create(layout);
  const size_t n = size_t(layout.total_pages());
  meta_.resize(n);
  pos_.assign(n * size_t(layout.page_size), -1);
  scores_.assign(layout.slot_scores ? n * size_t(layout.page_size) : 0, 0.0f);
  for (int32_t id = layout.device_pages; id-- > 0;) device_free_.push_back(id);
  for (int32_t id = layout.total_pages(); id-- > layout.device_pages;) host_free_.push_back(id);
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

int32_t PagePool::alloc() {
  const int32_t id = take(device_free_);
  if (id >= 0) queue_.push_back({Op::Reset, id, 0});
  return id;
}

void PagePool::retain(int32_t id) { ++meta_[size_t(id)].refs; }

void PagePool::release(int32_t id) {
  Meta& m = meta_[size_t(id)];
  assert(m.refs > 0);
  if (--m.refs > 0) return;
  (on_host(id) ? host_free_ : device_free_).push_back(id);
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
  const int32_t nid = move(id, host_free_);
  if (nid < 0)
    fail("KV host tier full: all {} host pages are in use (the pool was sized for fewer offloaded pages)",
         layout_.host_pages);
  ++moves_out_;
  return nid;
}

int32_t PagePool::fetch(int32_t id) {
  if (!on_host(id)) return id;
  const int32_t nid = move(id, device_free_);
  if (nid >= 0) ++moves_in_;
  return nid;
}

void PagePool::read_scores(std::span<const int32_t> ids) {
  if (ids.empty() || scores_.empty()) return;
  flush();  // the scores of pages whose slots were moved must be read after the move
  std::vector<float> buf(ids.size() * size_t(layout_.page_size));
  be_.kv_read_scores(*store_, ids, buf.data());
  for (size_t i = 0; i < ids.size(); ++i)
    std::copy_n(buf.begin() + ptrdiff_t(i * size_t(layout_.page_size)), layout_.page_size,
                scores_.begin() + ptrdiff_t(size_t(ids[i]) * size_t(layout_.page_size)));
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
  be_.kv_read_page(*store_, id, k, v, pos);
}

void PagePool::flush() {
  std::vector<int32_t> resets;
  std::vector<PageCopy> pages;
  std::vector<SlotCopy> slots;
  auto issue = [&] {
    if (!resets.empty()) be_.kv_reset(*store_, resets);
    if (!pages.empty()) be_.kv_copy_pages(*store_, pages);
    if (!slots.empty()) be_.kv_copy_slots(*store_, slots);
    resets.clear();
    pages.clear();
    slots.clear();
  };
  Op::Kind last = Op::Reset;
  for (const Op& op : queue_) {
    if (op.kind != last) issue();  // keep the order between kinds
    last = op.kind;
    switch (op.kind) {
      case Op::Reset: resets.push_back(op.a); break;
      case Op::CopyPage: pages.push_back({op.a, op.b}); break;
      case Op::CopySlot: slots.push_back({op.a, op.b}); break;
    }
  }
  issue();
  queue_.clear();
}

}  // namespace headroom
