// The op interface every backend implements (CPU now, CUDA next). The model (src/model/llama.cpp) is
// written once against Backend&; tests/test_backend_ops.cpp checks every op of every backend against the
// CPU reference on random inputs.
//
// Conventions: activations are float32, row-major, one row per token. A weight matrix W has `rows` output
// features and `cols` input features and is stored row-major in its file type (ggml layout: ne[0] = cols).
#pragma once

#include <cstddef>
#include <algorithm>
#include <cstdint>
#include <memory>
#include <span>

#include "backend/kv_layout.h"
#include "gguf/gguf.h"

namespace headroom {

using gguf::DType;

// A 2-D weight in its stored type, pointing into the mmapped file (or any buffer that outlives the call).
struct WeightView {
  DType type = DType::F32;
  const void* data = nullptr;
  int64_t rows = 0;       // output features (ggml ne[1])
  int64_t cols = 0;       // input features (ggml ne[0])
  size_t row_bytes = 0;   // bytes per stored row
};

struct RopeParams {
  int n_rot = 0;                 // rotated dims per head (== head_dim for every model we load)
  bool neox = false;             // false: GGML "normal" adjacent pairs (x[2i], x[2i+1]) as `llama`;
                                 // true: NEOX halves (x[i], x[i + n_rot/2]) as `qwen2`
  float theta_base = 10000.0f;
  float freq_scale = 1.0f;       // linear scaling: position * freq_scale (1 / factor)
  const float* freq_factors = nullptr;  // Llama-3.1 `rope_freqs.weight` (n_rot/2 values): theta_i /= f_i
};

// ---- KV storage and paged attention ----------------------------------------------------------------------
//
// The backend owns the KV pages (KVStore, layout in backend/kv_layout.h). Nobody else sees their memory:
// K/V rows go in with kv_store() at slots the caller's page tables chose, tier moves and evict's compaction
// are copy ops, and attention reads pages by id. Every index array an op reads during the forward pass
// (slot mapping, jobs, page ids, positions) lives in backend memory (alloc + upload, once per step), so a
// decode step runs from embedding to logits without a host synchronisation.

// A backend's page arrays (both tiers). Opaque: only the backend that made it reads its memory.
class KVStore {
 public:
  explicit KVStore(const KVLayout& l) : layout_(l) {}
  virtual ~KVStore() = default;
  const KVLayout& layout() const { return layout_; }

 protected:
  KVLayout layout_;
};

// A page copy (tier moves: device <-> host) or a slot copy (evict's compaction); ids / global slots.
struct PageCopy {
  int32_t src, dst;
};
struct SlotCopy {
  int32_t src, dst;  // page_id * page_size + slot; src -1 empties dst (pos -1, score 0)
};

// One attention job: the query rows [row0, row0 + n_rows) of one sequence, query heads
// [kv_head * n_group, (kv_head + 1) * n_group), over the pages page_ids[page0 .. page0 + n_pages).
// Query row r (position q_pos[r]) attends slot s iff pos[s] >= 0 && pos[s] <= q_pos[r] && the rule allows
// it: window == 0 means no restriction; otherwise pos[s] < sinks || pos[s] > q_pos[r] - window. The result
// is exact softmax attention over exactly those slots (a row with no allowed slot gets zeros).
// POD: it lives in backend memory, in the step's job table.
struct AttnJob {
  int32_t row0 = 0, n_rows = 0;
  int32_t kv_head = 0;
  int32_t page0 = 0, n_pages = 0;
  int32_t sinks = 0, window = 0;
  // Quest selection (select_pages): if select_k > 0, the n_cand pages at [page0 + cand0, ...) are
  // candidates, of which the select_k best are kept. Otherwise ignored.
  int32_t cand0 = 0, n_cand = 0, select_k = 0;
  int32_t score = 0;  // 1: add each slot's attention probability (summed over rows and heads) to its score
};

// One layer's attention over all jobs of a step. Every pointer is backend memory.
struct AttnBatch {
  const float* q = nullptr;      // q + r*q_stride + h*head_dim: query head h of step row r (RoPE applied)
  int64_t q_stride = 0;
  const int32_t* q_pos = nullptr;  // [step rows]
  float* out = nullptr;          // out + r*out_stride + h*head_dim
  int64_t out_stride = 0;
  int n_group = 1;               // query heads per KV head
  int head_dim = 0;
  float scale = 1.0f;
  AttnJob* jobs = nullptr;       // select_pages may rewrite n_pages and the candidates' page ids
  int32_t n_jobs = 0;
  // Host-known shape of the step (lets a GPU backend size its grids without reading the job table): the most
  // rows of any job, the number of jobs with fewer than 4 rows (decode jobs), and an upper bound on any job's
  // n_pages (before select_pages, which only lowers it). 0 / -1: unknown. A backend that captures a graph
  // should size from a rounded-up max_pages (e.g. the next power of two) so that growth rarely changes the grid.
  int32_t max_rows = 0;
  int32_t n_decode_jobs = -1;
  int32_t max_pages = 0;
  int32_t* page_ids = nullptr;
};

// ---- fused ops ------------------------------------------------------------------------------------------
// A weight of a grouped matmul and where its product goes: y[n][w.rows].
struct MatmulPart {
  WeightView w;
  float* y = nullptr;
};

// A step's new attention rows, before RoPE: q [n][n_head * head_dim], k and v [n][n_kv_heads * head_dim]; row
// r is at position pos[r]. Backend memory.
struct AttnRows {
  float* q = nullptr;
  float* k = nullptr;
  const float* v = nullptr;
  int64_t n = 0;
  int n_head = 0, n_kv_heads = 0;
  int64_t head_dim = 0;
  const int32_t* pos = nullptr;
};

// A recorded sequence of ops (a CUDA graph): replayed with the arguments it was recorded with. Opaque.
class StepGraph {
 public:
  virtual ~StepGraph() = default;
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual const char* name() const = 0;
  virtual int threads() const = 0;

  // y[n][w.rows] = x[n][w.cols] · Wᵀ. Supported weight types: F32, F16, BF16, Q8_0, Q4_0, Q4_K, Q6_K (CPU:
  // Q8_0 quantizes x to Q8_0 blocks and multiplies in int8; the other types multiply in float).
  virtual void matmul(const WeightView& w, const float* x, int64_t n, float* y) = 0;
  // out[i] = dequantized row ids[i] of w (token embedding lookup).
  virtual void embed(const WeightView& w, const int32_t* ids, int64_t n, float* out) = 0;
  // out[r] = x[r] / sqrt(mean(x[r]^2) + eps) * weight, for n rows of dim floats. out may alias x.
  virtual void rmsnorm(const float* x, const float* weight, int64_t n, int64_t dim, float eps, float* out) = 0;
  // In place: x holds n rows of n_heads * head_dim; row r is rotated for position pos[r].
  virtual void rope(float* x, int64_t n, int64_t n_heads, int64_t head_dim, const int32_t* pos,
                    const RopeParams& p) = 0;
  // out[i] = silu(gate[i]) * up[i], for count floats. out may alias gate.
  virtual void swiglu(const float* gate, const float* up, int64_t count, float* out) = 0;
  // x[i] += y[i] for count floats.
  virtual void add(float* x, const float* y, int64_t count) = 0;
  // x[r][j] += b[j] for n rows of dim floats (attention biases of qwen2).
  virtual void add_bias(float* x, const float* b, int64_t n, int64_t dim) = 0;

  // ---- fused ops: each is defined as the composition of the ops above that its default runs; a backend
  // that overrides one (fewer launches on a GPU) gives the same results, bitwise where it keeps the order of
  // the arithmetic (CUDA does for all four).
  // x += y, then out = rmsnorm(x) * weight (the residual add and the next norm). out may alias y.
  virtual void add_rmsnorm(float* x, const float* y, const float* weight, int64_t n, int64_t dim, float eps, float* out);
  // Every part's y = x · wᵀ (weights sharing one input: q/k/v).
  virtual void matmul_group(std::span<const MatmulPart> parts, const float* x, int64_t n);
  // out[n][gate.rows] = silu(x · gateᵀ) * (x · upᵀ); up_out [n][up.rows] is scratch that may be written.
  virtual void matmul_swiglu(const WeightView& gate, const WeightView& up, const float* x, int64_t n, float* out,
                             float* up_out);
  // rope(q), rope(k), then kv_store(k, v) at the slots (slots[r * n_kv_heads + h], as kv_store).
  virtual void rope_store(KVStore& kv, const AttnRows& rows, const int32_t* slots, const RopeParams& p);

  // ---- memory ---------------------------------------------------------------------------------------------
  // Backend memory for activations and step tables (device memory on a GPU; callers never dereference it).
  // alloc returns 64-byte aligned memory; upload is ordered with the ops (async on a GPU); download waits
  // for every op before it (a host synchronisation) and synchronize() waits for all work.
  virtual void* alloc(size_t bytes) = 0;
  virtual void free(void* p) = 0;
  virtual void upload(void* dst, const void* src, size_t bytes) = 0;
  virtual void download(void* dst, const void* src, size_t bytes) = 0;
  virtual void synchronize() = 0;
  // dst[pairs[2i]] = pairs[2i + 1] for every pair (index, value), the indices distinct: an in-place update
  // of a table of dst_len int32s in backend memory (the step's page table). Throws Error, writing nothing, if
  // an index is outside the table. pairs: host memory, free to reuse when this returns; ordered with the ops
  // like upload. The default downloads the table, patches it and uploads it.
  virtual void scatter_i32(int32_t* dst, size_t dst_len, std::span<const int32_t> pairs);
  // scatter_i32's check, for every backend: throws Error (naming the backend) unless `pairs` are whole
  // (index, value) pairs with every index inside a table of dst_len.
  void check_scatter_pairs(size_t dst_len, std::span<const int32_t> pairs) const;
  // True when alloc()'s memory is host memory another thread may read and write directly (the CPU).
  virtual bool host_memory() const { return false; }
  // Bytes of memory the backend could still give the KV cache (the CPU: the system's available memory).
  virtual int64_t free_memory() const;
  // Weights: the backend's copy of a weight (uploaded once; the CPU backend reads the mapping in place).
  virtual WeightView upload_weight(const WeightView& host) { return host; }
  virtual const float* upload_f32(const float* host, int64_t n) { return host; }

  // ---- KV ------------------------------------------------------------------------------------------------
  // A store with the layout's page arrays; every page starts empty. Throws Error (one line) if the backend
  // cannot store the type or the memory is not there.
  virtual std::unique_ptr<KVStore> kv_create(const KVLayout& layout) = 0;
  // Empties pages (every slot pos -1, score 0, key min +inf / max -inf). ids: host memory.
  virtual void kv_reset(KVStore& kv, std::span<const int32_t> ids) = 0;
  // Copies whole pages (K, V, pos, scores, key bounds) between any ids; host memory spans, run in order.
  virtual void kv_copy_pages(KVStore& kv, std::span<const PageCopy> copies) = 0;
  virtual void kv_copy_slots(KVStore& kv, std::span<const SlotCopy> copies) = 0;
  // Writes n_rows rows of K and V (n_kv_heads * head_dim floats each, RoPE applied to K): row r, KV head h
  // goes to global slot slots[r * n_kv_heads + h] (skipped if -1), with position pos[r], converted to the
  // store's type; updates the page's key min/max. k, v, slots, pos: backend memory.
  virtual void kv_store(KVStore& kv, const float* k, const float* v, int64_t n_rows, int n_kv_heads,
                        const int32_t* slots, const int32_t* pos) = 0;
  // Reads back (synchronises): scores of pages [n][page_size]; or one page as float K, V and positions.
  virtual void kv_read_scores(KVStore& kv, std::span<const int32_t> ids, float* out) = 0;
  virtual void kv_read_page(KVStore& kv, int32_t id, float* k, float* v, int32_t* pos) = 0;

  // For every job with select_k > 0: scores its candidate pages with Quest's bound for the job's last
  // query row, sum over the group's heads h and dims d of max(q_hd * kmin_d, q_hd * kmax_d), keeps the
  // select_k best (ties: the earlier page), moves them, in their original order, to the front of the
  // candidate range, shifts the pages after the range down behind them and sets n_pages to match. It writes
  // no page id outside [page0 + cand0, page0 + the new n_pages) (the table is updated in place: KVStep).
  virtual void select_pages(KVStore& kv, const AttnBatch& b) = 0;
  // Runs every job of the batch (jobs write disjoint outputs; jobs with `score` own their pages).
  virtual void attention(KVStore& kv, const AttnBatch& b) = 0;

  // ---- graphs (optional) -----------------------------------------------------------------------------------
  // A backend that can record ops and replay them (CUDA graphs) says so here. Between graph_begin() and
  // graph_end() the compute ops (matmul .. attention; not memory, KV copies or reads) are recorded, not run;
  // graph_launch() runs them again with the same arguments, reading whatever the pointed-to memory holds then
  // (the runner re-uploads the step's tables before each launch). Ops called for the first time with a shape
  // may grow scratch memory: run a shape once eagerly before recording it. graph_launch returns false, running
  // nothing, if the graph is stale (scratch it uses has moved since): run the ops again and re-record.
  virtual bool graphs() const { return false; }
  virtual void graph_begin();
  virtual std::unique_ptr<StepGraph> graph_end();
  virtual bool graph_launch(StepGraph& g);
};

// Owns n elements of T in a backend's memory.
template <typename T>
class DeviceArray {
 public:
  DeviceArray() = default;
  DeviceArray(Backend& be, size_t n) : be_(&be), n_(n), p_(static_cast<T*>(be.alloc(n * sizeof(T)))) {}
  DeviceArray(DeviceArray&& o) noexcept { swap(o); }
  DeviceArray& operator=(DeviceArray&& o) noexcept {
    swap(o);
    return *this;
  }
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;
  ~DeviceArray() {
    if (p_) be_->free(p_);
  }
  // Grows (contents lost) to hold at least n elements.
  void reserve(Backend& be, size_t n) {
    if (n <= n_ && p_) return;
    DeviceArray bigger(be, std::max(n, n_ * 2));
    swap(bigger);
  }
  void upload(const T* src, size_t n) { be_->upload(p_, src, n * sizeof(T)); }
  T* get() const { return p_; }
  size_t size() const { return n_; }

 private:
  void swap(DeviceArray& o) {
    std::swap(be_, o.be_);
    std::swap(n_, o.n_);
    std::swap(p_, o.p_);
  }
  Backend* be_ = nullptr;
  size_t n_ = 0;
  T* p_ = nullptr;
};

// threads <= 0: one per physical core.
std::unique_ptr<Backend> make_cpu_backend(int threads);

// Dequantizes one row of a weight to float (reference path; used by tests and slow paths).
void dequantize_row(DType type, const void* src, float* dst, int64_t n);
// Bytes of one stored row of n elements (n must be a multiple of the block size).
size_t row_bytes(DType type, int64_t n);

}  // namespace headroom
