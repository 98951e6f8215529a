// CPU backend: the Backend implementation tying the kernels together, and make_cpu_backend.
//
// A CpuBackend is used by one caller thread at a time (it owns scratch buffers and a thread pool); the
// library prints nothing and reports bad arguments with headroom::Error.
#include <cstdio>
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <numeric>
#include <vector>

#include "backend/backend.h"
#include "backend/cpu/attention.h"
#include "backend/cpu/kv_store.h"
#include "backend/cpu/matmul.h"
#include "backend/cpu/ops.h"
#include "backend/cpu/thread_pool.h"
#include "util/error.h"

namespace headroom {

namespace {

class CpuBackend final : public Backend {
 public:
  explicit CpuBackend(int threads) : pool_(threads) {}

  const char* name() const override { return "cpu"; }
  int threads() const override { return pool_.size(); }
  bool host_memory() const override { return true; }

  void matmul(const WeightView& w, const float* x, int64_t n, float* y) override {
    cpu::matmul(pool_, mm_, w, x, n, y);
  }
  // The fused matmuls as their definitions (backend.h), with the input's Q8_0 quantization shared.
  void matmul_group(std::span<const MatmulPart> parts, const float* x, int64_t n) override {
    std::vector<const WeightView*> ws;
    std::vector<float*> ys;
    for (const MatmulPart& p : parts) ws.push_back(&p.w), ys.push_back(p.y);
    cpu::matmul_shared(pool_, mm_, ws, ys, x, n);
  }
  void matmul_swiglu(const WeightView& gate, const WeightView& up, const float* x, int64_t n, float* out,
                     float* up_out) override {
    if (gate.rows != up.rows || gate.cols != up.cols)
      fail("cpu backend: matmul_swiglu: gate {} x {} and up {} x {} differ", gate.rows, gate.cols, up.rows, up.cols);
    const WeightView* ws[] = {&gate, &up};
    float* ys[] = {out, up_out};
    cpu::matmul_shared(pool_, mm_, ws, ys, x, n);
    swiglu(out, up_out, n * gate.rows, out);
  }

  void embed(const WeightView& w, const int32_t* ids, int64_t n, float* out) override {
    const size_t stride = cpu::weight_row_stride(w, "embed");
    if (n < 0) fail("cpu backend: embed: negative count {}", n);
    for (int64_t i = 0; i < n; ++i)
      if (ids[i] < 0 || ids[i] >= w.rows) fail("cpu backend: embed: token id {} out of range [0, {})", ids[i], w.rows);
    const auto* base = static_cast<const uint8_t*>(w.data);
    auto rows = [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) dequantize_row(w.type, base + size_t(ids[i]) * stride, out + i * w.cols, w.cols);
    };
    constexpr int64_t kPerTask = 8;
    if (n < 2 * kPerTask) {
      rows(0, n);
    } else {
      pool_.parallel_for((n + kPerTask - 1) / kPerTask,
                         [&](int64_t t, int) { rows(t * kPerTask, std::min(n, (t + 1) * kPerTask)); });
    }
  }

  void rmsnorm(const float* x, const float* weight, int64_t n, int64_t dim, float eps, float* out) override {
    cpu::rmsnorm(pool_, x, weight, n, dim, eps, out);
  }

  void rope(float* x, int64_t n, int64_t n_heads, int64_t head_dim, const int32_t* pos,
            const RopeParams& p) override {
    rope_.apply(pool_, x, n, n_heads, head_dim, pos, p);
  }

  void swiglu(const float* gate, const float* up, int64_t count, float* out) override {
    cpu::swiglu(pool_, gate, up, count, out);
  }

  void add(float* x, const float* y, int64_t count) override { cpu::add(pool_, x, y, count); }

  void add_bias(float* x, const float* b, int64_t n, int64_t dim) override { cpu::add_bias(pool_, x, b, n, dim); }

  // ---- memory: host memory; ops run synchronously on the caller, so upload/download are copies ----------
  void* alloc(size_t bytes) override {
    const size_t n = (std::max<size_t>(bytes, 1) + 63) & ~size_t(63);
    void* p = std::aligned_alloc(64, n);
    if (!p) fail("cpu backend: cannot allocate {} bytes", bytes);
    return p;
  }
  void free(void* p) override { std::free(p); }
  void upload(void* dst, const void* src, size_t bytes) override {
    if (bytes) std::memcpy(dst, src, bytes);
  }
  void download(void* dst, const void* src, size_t bytes) override {
    if (bytes) std::memcpy(dst, src, bytes);
  }
  void synchronize() override {}
  void scatter_i32(int32_t* dst, size_t dst_len, std::span<const int32_t> pairs) override {
    check_scatter_pairs(dst_len, pairs);
    for (size_t i = 0; i < pairs.size(); i += 2) dst[pairs[i]] = pairs[i + 1];
  }

  // ---- KV ------------------------------------------------------------------------------------------------
  std::unique_ptr<KVStore> kv_create(const KVLayout& layout) override {
    return std::make_unique<cpu::CpuKVStore>(layout);
  }

  void kv_reset(KVStore& kv, std::span<const int32_t> ids) override {
    cpu::CpuKVStore& st = store(kv);
    for (int32_t id : ids) st.check_id(id, "kv_reset");
    for (int32_t id : ids) st.reset(id);
  }

  void kv_copy_pages(KVStore& kv, std::span<const PageCopy> copies) override {
    cpu::CpuKVStore& st = store(kv);
    for (const PageCopy& c : copies) {
      st.check_id(c.src, "kv_copy_pages");
      st.check_id(c.dst, "kv_copy_pages");
    }
    const size_t P = size_t(st.page_size()), kvb = P * size_t(st.row_bytes()), D = size_t(st.head_dim());
    for (const PageCopy& c : copies) {
      if (c.src == c.dst) continue;
      std::memcpy(st.k(c.dst), st.k(c.src), kvb);
      std::memcpy(st.v(c.dst), st.v(c.src), kvb);
      std::memcpy(st.pos(c.dst), st.pos(c.src), P * 4);
      if (st.scores(c.src)) std::memcpy(st.scores(c.dst), st.scores(c.src), P * 4);
      if (st.kmin(c.src)) std::memcpy(st.kmin(c.dst), st.kmin(c.src), 2 * D * 4);
    }
  }

  // Copies K row, V row, position and score. The destination page's key bounds are widened to cover the
  // copied key (so they stay bounds of the page's keys when compaction moves a token across pages); the
  // source page's bounds are left as they are (still bounds of what it holds).
  void kv_copy_slots(KVStore& kv, std::span<const SlotCopy> copies) override {
    cpu::CpuKVStore& st = store(kv);
    for (const SlotCopy& c : copies) {
      if (c.src != -1) st.check_slot(c.src, "kv_copy_slots");
      st.check_slot(c.dst, "kv_copy_slots");
    }
    const int P = st.page_size(), D = st.head_dim();
    const size_t rb = size_t(st.row_bytes());
    kv_tmp_.resize(size_t(D));
    for (const SlotCopy& c : copies) {
      if (c.src == c.dst) continue;
      if (c.src == -1) {  // empties the slot
        st.pos(c.dst / P)[c.dst % P] = -1;
        if (float* sc = st.scores(c.dst / P)) sc[c.dst % P] = 0.0f;
        continue;
      }
      const int32_t si = c.src / P, ss = c.src % P, di = c.dst / P, ds = c.dst % P;
      std::memcpy(st.k(di) + size_t(ds) * rb, st.k(si) + size_t(ss) * rb, rb);
      std::memcpy(st.v(di) + size_t(ds) * rb, st.v(si) + size_t(ss) * rb, rb);
      st.pos(di)[ds] = st.pos(si)[ss];
      if (float* sc = st.scores(si)) st.scores(di)[ds] = sc[ss];
      if (st.kmin(di) && st.pos(si)[ss] >= 0) {
        cpu::kv_decode_row(st.type(), st.k(si) + size_t(ss) * rb, D, kv_tmp_.data());
        widen_bounds(st, di, kv_tmp_.data());
      }
    }
  }

  // Also zeroes the slot's score: a new token has gathered no attention yet.
  void kv_store(KVStore& kv, const float* k, const float* v, int64_t n_rows, int n_kv_heads, const int32_t* slots,
                const int32_t* pos) override {
    cpu::CpuKVStore& st = store(kv);
    if (n_rows < 0 || n_kv_heads <= 0) fail("cpu backend: kv_store: bad shape ({} rows, {} KV heads)", n_rows, n_kv_heads);
    const int64_t n = n_rows * n_kv_heads;
    for (int64_t i = 0; i < n; ++i)
      if (slots[i] != -1) st.check_slot(slots[i], "kv_store");
    const int P = st.page_size(), D = st.head_dim();
    const size_t rb = size_t(st.row_bytes());
    kv_tmp_.resize(size_t(D));
    for (int64_t i = 0; i < n; ++i) {
      const int32_t g = slots[i];
      if (g == -1) continue;
      const int32_t id = g / P, s = g % P;
      uint8_t* kd = st.k(id) + size_t(s) * rb;
      cpu::kv_encode_row(st.type(), k + i * D, D, kd);
      cpu::kv_encode_row(st.type(), v + i * D, D, st.v(id) + size_t(s) * rb);
      st.pos(id)[s] = pos[i / n_kv_heads];
      if (float* sc = st.scores(id)) sc[s] = 0.0f;
      if (st.kmin(id)) {
        cpu::kv_decode_row(st.type(), kd, D, kv_tmp_.data());  // the stored values
        widen_bounds(st, id, kv_tmp_.data());
      }
    }
  }

  void kv_read_scores(KVStore& kv, std::span<const int32_t> ids, float* out) override {
    cpu::CpuKVStore& st = store(kv);
    if (!st.layout().slot_scores) fail("cpu backend: kv_read_scores: the store keeps no slot scores");
    const size_t P = size_t(st.page_size());
    for (int32_t id : ids) st.check_id(id, "kv_read_scores");
    for (size_t i = 0; i < ids.size(); ++i) std::memcpy(out + i * P, st.scores(ids[i]), P * 4);
  }

  void kv_read_page(KVStore& kv, int32_t id, float* k, float* v, int32_t* pos) override {
    cpu::CpuKVStore& st = store(kv);
    st.check_id(id, "kv_read_page");
    const int P = st.page_size(), D = st.head_dim();
    const size_t rb = size_t(st.row_bytes());
    for (int s = 0; s < P; ++s) {
      if (k) cpu::kv_decode_row(st.type(), st.k(id) + size_t(s) * rb, D, k + size_t(s) * size_t(D));
      if (v) cpu::kv_decode_row(st.type(), st.v(id) + size_t(s) * rb, D, v + size_t(s) * size_t(D));
    }
    if (pos) std::memcpy(pos, st.pos(id), size_t(P) * 4);
  }

  void select_pages(KVStore& kv, const AttnBatch& b) override {
    cpu::CpuKVStore& st = store(kv);
    for (int32_t ji = 0; ji < b.n_jobs; ++ji) {
      AttnJob& j = b.jobs[ji];
      if (j.select_k <= 0 || j.n_rows <= 0) continue;
      if (!st.layout().page_minmax) fail("cpu backend: select_pages: the store keeps no key bounds");
      if (j.cand0 < 0 || j.n_cand < 0 || j.page0 < 0 || int64_t(j.cand0) + j.n_cand > j.n_pages)
        fail("cpu backend: select_pages: job {}: candidates [{}, +{}) outside its {} pages", ji, j.cand0, j.n_cand,
             j.n_pages);
      if (j.n_cand <= j.select_k) continue;
      check_job_shape(st, b, j, ji, "select_pages");
      int32_t* cand = b.page_ids + j.page0 + j.cand0;
      for (int32_t c = 0; c < j.n_cand; ++c) st.check_id(cand[c], "select_pages");
      const int D = b.head_dim, G = b.n_group;
      const float* q = b.q + int64_t(j.row0 + j.n_rows - 1) * b.q_stride + int64_t(j.kv_head) * G * D;
      sel_score_.resize(size_t(j.n_cand));
      constexpr int kPerTask = 16;
      const int64_t n_tasks = (j.n_cand + kPerTask - 1) / kPerTask;
      auto score_range = [&](int64_t t, int) {
        const int32_t c1 = std::min<int32_t>(j.n_cand, int32_t((t + 1) * kPerTask));
        for (int32_t c = int32_t(t * kPerTask); c < c1; ++c) sel_score_[size_t(c)] = quest_score(st, cand[c], q, G, D);
      };
      if (int64_t(j.n_cand) * G * D < 32768) {
        for (int64_t t = 0; t < n_tasks; ++t) score_range(t, 0);
      } else {
        pool_.parallel_for(n_tasks, score_range);
      }
      // The select_k best (ties: the earlier page), kept in their original order.
      sel_order_.resize(size_t(j.n_cand));
      std::iota(sel_order_.begin(), sel_order_.end(), 0);
      std::stable_sort(sel_order_.begin(), sel_order_.end(),
                       [&](int32_t a, int32_t c) { return sel_score_[size_t(a)] > sel_score_[size_t(c)]; });
      sel_order_.resize(size_t(j.select_k));
      std::sort(sel_order_.begin(), sel_order_.end());
      sel_ids_.clear();
      for (int32_t c : sel_order_) sel_ids_.push_back(cand[c]);
      int32_t* after = cand + j.n_cand;
      const int32_t n_after = j.n_pages - j.cand0 - j.n_cand;
      std::copy(sel_ids_.begin(), sel_ids_.end(), cand);
      std::copy(after, after + n_after, cand + j.select_k);  // moves down (forward copy is safe)
      j.n_pages -= j.n_cand - j.select_k;
    }
  }

  void attention(KVStore& kv, const AttnBatch& b) override {
    cpu::CpuKVStore& st = store(kv);
    if (b.n_jobs < 0) fail("cpu backend: attention: {} jobs", b.n_jobs);
    if (b.head_dim != st.head_dim())
      fail("cpu backend: attention: head_dim {} but the store holds rows of {}", b.head_dim, st.head_dim());
    size_t n_pages = 0;
    for (int32_t ji = 0; ji < b.n_jobs; ++ji) {
      const AttnJob& j = b.jobs[ji];
      if (j.n_rows == 0) continue;
      check_job_shape(st, b, j, ji, "attention");
      if (j.score && !st.layout().slot_scores) fail("cpu backend: attention: job {} scores, but the store keeps no slot scores", ji);
      for (int32_t p = 0; p < j.n_pages; ++p) st.check_id(b.page_ids[j.page0 + p], "attention");
      n_pages += size_t(j.n_pages);
    }
    kpages_.clear();
    kpages_.reserve(n_pages);  // the spans below point into it
    kjobs_.clear();
    for (int32_t ji = 0; ji < b.n_jobs; ++ji) {
      const AttnJob& j = b.jobs[ji];
      if (j.n_rows == 0) continue;
      const size_t first = kpages_.size();
      for (int32_t p = 0; p < j.n_pages; ++p) {
        const int32_t id = b.page_ids[j.page0 + p];
        kpages_.push_back({st.k(id), st.v(id), st.pos(id), j.score ? st.scores(id) : nullptr, st.page_size()});
      }
      cpu::KernelJob kj;
      kj.n_rows = j.n_rows;
      kj.q = b.q + int64_t(j.row0) * b.q_stride;
      kj.q_stride = b.q_stride;
      kj.q_pos = b.q_pos + j.row0;
      kj.head0 = j.kv_head * b.n_group;
      kj.n_group = b.n_group;
      kj.head_dim = b.head_dim;
      kj.scale = b.scale;
      kj.sinks = j.sinks;
      kj.window = j.window;
      kj.pages = std::span<const cpu::KernelPage>(kpages_.data() + first, size_t(j.n_pages));
      kj.out = b.out + int64_t(j.row0) * b.out_stride;
      kj.out_stride = b.out_stride;
      kjobs_.push_back(kj);
    }
    cpu::attention(pool_, attn_, st.type(), kjobs_);
  }

 private:
  static cpu::CpuKVStore& store(KVStore& kv) {
    auto* st = dynamic_cast<cpu::CpuKVStore*>(&kv);
    if (!st) fail("cpu backend: a KV store of another backend");
    return *st;
  }

  static void check_job_shape(const cpu::CpuKVStore& st, const AttnBatch& b, const AttnJob& j, int32_t ji, const char* op) {
    if (j.n_rows < 0 || j.row0 < 0 || j.kv_head < 0 || j.page0 < 0 || j.n_pages < 0 || b.n_group <= 0)
      fail("cpu backend: {}: job {} has a bad shape (row0 {}, rows {}, kv_head {}, page0 {}, pages {})", op, ji, j.row0,
           j.n_rows, j.kv_head, j.page0, j.n_pages);
    if (!b.q || !b.q_pos || !b.out || (j.n_pages > 0 && !b.page_ids))
      fail("cpu backend: {}: batch without q, q_pos, out or page ids", op);
  }

  static void widen_bounds(cpu::CpuKVStore& st, int32_t id, const float* key) {
    float* mn = st.kmin(id);
    float* mx = st.kmax(id);
    for (int d = 0; d < st.head_dim(); ++d) {
      mn[d] = std::min(mn[d], key[d]);
      mx[d] = std::max(mx[d], key[d]);
    }
  }

  // Quest's bound of page id for the group's query heads q (G heads of D floats): sum over heads and dims
  // of max(q*kmin, q*kmax), in float, in a fixed order (lanes of kVL dims, then their sum, heads in order).
  // An empty page (no key yet) scores -inf; NaN scores count as -inf.
  static float quest_score(const cpu::CpuKVStore& st, int32_t id, const float* q, int G, int D) {
    const float* mn = st.kmin(id);
    const float* mx = st.kmax(id);
    if (!(mn[0] <= mx[0])) return -std::numeric_limits<float>::infinity();
    float total = 0.0f;
    for (int h = 0; h < G; ++h) {
      const float* qh = q + size_t(h) * size_t(D);
      cpu::VecF acc = cpu::vzero();
      int d = 0;
      for (; d + cpu::kVL <= D; d += cpu::kVL) {
        const cpu::VecF qv = cpu::vload(qh + d);
        acc = cpu::vadd(acc, vmax(cpu::vmul(qv, cpu::vload(mn + d)), cpu::vmul(qv, cpu::vload(mx + d))));
      }
      float head = cpu::vsum(acc);
      for (; d < D; ++d) head += std::max(qh[d] * mn[d], qh[d] * mx[d]);
      total += head;
    }
    return total == total ? total : -std::numeric_limits<float>::infinity();
  }
  static cpu::VecF vmax(cpu::VecF a, cpu::VecF b) {
#if defined(HR_AVX512)
    return _mm512_max_ps(a, b);
#elif defined(HR_AVX2)
    return _mm256_max_ps(a, b);
#else
    return std::max(a, b);
#endif
  }

  cpu::ThreadPool pool_;
  cpu::MatmulScratch mm_;
  cpu::AttnScratch attn_;
  cpu::Rope rope_;
  std::vector<cpu::KernelPage> kpages_;
  std::vector<cpu::KernelJob> kjobs_;
  std::vector<float> kv_tmp_, sel_score_;
  std::vector<int32_t> sel_order_, sel_ids_;
};

}  // namespace

std::unique_ptr<Backend> make_cpu_backend(int threads) {
  if (threads <= 0) threads = cpu::physical_core_count();
  return std::make_unique<CpuBackend>(threads);
}

}  // namespace headroom

namespace headroom {

int64_t Backend::free_memory() const {
  // MemAvailable from /proc/meminfo (the kernel's estimate of what can be allocated without swapping).
  if (FILE* f = std::fopen("/proc/meminfo", "r")) {
    char line[256];
    long long kb = -1;
    while (std::fgets(line, sizeof line, f))
      if (std::sscanf(line, "MemAvailable: %lld kB", &kb) == 1) break;
    std::fclose(f);
    if (kb > 0) return int64_t(kb) * 1024;
  }
  return int64_t(4) << 30;  // unknown: assume 4 GiB
}

}  // namespace headroom

namespace headroom {

void Backend::check_scatter_pairs(size_t dst_len, std::span<const int32_t> pairs) const {
  if (pairs.size() % 2) fail("{} backend: scatter_i32: {} values are not (index, value) pairs", name(), pairs.size());
  for (size_t i = 0; i < pairs.size(); i += 2)
    if (pairs[i] < 0 || size_t(pairs[i]) >= dst_len)
      fail("{} backend: scatter_i32: index {} outside the table of {}", name(), pairs[i], dst_len);
}

void Backend::scatter_i32(int32_t* dst, size_t dst_len, std::span<const int32_t> pairs) {
  check_scatter_pairs(dst_len, pairs);
  std::vector<int32_t> table(dst_len);
  download(table.data(), dst, dst_len * sizeof(int32_t));
  for (size_t i = 0; i < pairs.size(); i += 2) table[size_t(pairs[i])] = pairs[i + 1];
  upload(dst, table.data(), dst_len * sizeof(int32_t));
}

void Backend::graph_begin() { fail("backend {}: no graphs", name()); }
std::unique_ptr<StepGraph> Backend::graph_end() { fail("backend {}: no graphs", name()); }
bool Backend::graph_launch(StepGraph&) { fail("backend {}: no graphs", name()); }

}  // namespace headroom

namespace headroom {

// The fused ops' definitions (backend.h): the ops they fuse, in order. The CPU backend runs these.
void Backend::add_rmsnorm(float* x, const float* y, const float* weight, int64_t n, int64_t dim, float eps, float* out) {
  add(x, y, n * dim);
  rmsnorm(x, weight, n, dim, eps, out);
}

void Backend::matmul_group(std::span<const MatmulPart> parts, const float* x, int64_t n) {
  for (const MatmulPart& p : parts) matmul(p.w, x, n, p.y);
}

void Backend::matmul_swiglu(const WeightView& gate, const WeightView& up, const float* x, int64_t n, float* out,
                            float* up_out) {
  if (gate.rows != up.rows || gate.cols != up.cols)
    fail("backend {}: matmul_swiglu: gate {} x {} and up {} x {} differ", name(), gate.rows, gate.cols, up.rows, up.cols);
  matmul(gate, x, n, out);
  matmul(up, x, n, up_out);
  swiglu(out, up_out, n * gate.rows, out);
}

void Backend::rope_store(KVStore& kv, const AttnRows& r, const int32_t* slots, const RopeParams& p) {
  rope(r.q, r.n, r.n_head, r.head_dim, r.pos, p);
  rope(r.k, r.n, r.n_kv_heads, r.head_dim, r.pos, p);
  kv_store(kv, r.k, r.v, r.n, r.n_kv_heads, slots, r.pos);
}

}  // namespace headroom
