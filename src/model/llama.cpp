// The Llama-family forward pass (llama, qwen2, mistral), written once against Backend&.
//
// For a step of n rows: chunks of prompts and decode tokens of any number of sequences, each at its positions:
//
//   every kv.plan_step: slots for its new rows, every head's pages and rule (host metadata, then one upload)
//   x = embed(tokens)                                    [n, n_embd]
//   for each layer:
//     xn = rmsnorm(x) * attn_norm
//     q, k, v = xn·Wqᵀ (+bq), xn·Wkᵀ (+bk), xn·Wvᵀ (+bv)  [n, n_head*hd], [n, n_kv*hd] x2
//     rope(q), rope(k)                                   adjacent pairs (llama) or NEOX halves (qwen2)
//     kv_store(k, v at the layer's slots)                into this sequence's per-head pages
//     select_pages (topk heads), attention               over the pages each head's policy chose
//     x += att·Woᵀ
//     xn = rmsnorm(x) * ffn_norm
//     x += (silu(xn·Wgateᵀ) * (xn·Wupᵀ))·Wdownᵀ
//   logits = rmsnorm(x) * output_norm · Woutᵀ            the rows the sequences ask for (their last, or all)
//   download logits; every kv.finish_step                (the step's one synchronisation)
//
// Everything from the embedding to the logits matmul is device work (device_step); a decode step whose shape
// was seen before replays it as a recorded graph where the backend has graphs (CUDA).
//
// Tensor parallel (docs/tensor-parallel.md): the host plans a step once; every rank then runs the same
// device_step with its own weight slices (its KV heads' q/k/v rows and attn_output columns, its share of the
// MLP's columns, its rows of the vocabulary), its own tables (its heads' jobs, pages and slots) and its own
// part of the KV pool. The ranks meet in three all-reduces: after the embedding (each token's row comes from
// the one rank holding it, the others add zeros), after the attention output projection and after the MLP
// down projection. The logits columns are gathered on the host.
#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <exception>

#include "backend/comm.h"
#include "backend/registry.h"
#include "kv/placement.h"
#include "model/model.h"
#include "model/slice.h"
#include "util/error.h"

namespace headroom {

// The fused ops the forward pass uses (the results are the same bits either way). HEADROOM_FUSE (for A/B
// measurements): unset, the default set; 0 none; all (or 1) every one; or the names of those to use, e.g. qkv,rope.
// add_rmsnorm is off by default: on the H200 (8B F16 tg64, 2026-12-01) the forward ran 197.5 tok/s without it
// and 192 with it (not profiled; a guess: its one-block kernel's loop stores x, which keeps the compiler from
// issuing the next loads early, where the add kernel had a block per 256 elements).
struct FusedOps {
  bool norm = false;  // add_rmsnorm: each residual add with the norm after it
  bool qkv = true;    // matmul_group: q, k, v
  bool mlp = true;    // matmul_swiglu: gate, up, SwiGLU
  bool rope = true;   // rope_store: RoPE of q and k with the KV store
};
static const FusedOps& fused_ops() {
  static const FusedOps f = [] {
    const char* e = std::getenv("HEADROOM_FUSE");
    if (!e || !*e) return FusedOps{};
    if (std::strcmp(e, "all") == 0 || std::strcmp(e, "1") == 0) return FusedOps{true, true, true, true};
    const std::string v = std::string(",") + e + ",";
    auto has = [&](const char* name) { return v.find(std::string(",") + name + ",") != std::string::npos; };
    return FusedOps{has("norm"), has("qkv"), has("mlp"), has("rope")};
  }();
  return f;
}

// ---- weight slices (model/slice.h) ----------------------------------------------------------------------

// One rank: its backend, its weight slices and activations, and its copy of the step's tables.
struct Runner::Rank {
  int rank = 0;
  Backend* be = nullptr;
  Communicator* comm = nullptr;               // null: a single rank
  std::vector<std::vector<int32_t>> heads;     // [layer]: its KV heads (model indices), ascending
  std::vector<std::vector<int32_t>> local_of;  // [layer][kv head]: its index among the rank's heads, or -1
  int64_t f0 = 0, f1 = 0, v0 = 0, v1 = 0;      // its MLP columns [f0, f1) and vocabulary rows [v0, v1)
  Owned owned;                                 // host copies of gathered slices (the CPU reads them in place)
  int64_t weight_bytes = 0;
  RopeParams rope;
  std::vector<LayerWeights> w;                 // the backend's copies of its slices
  WeightView tok_embd, output;
  const float* output_norm = nullptr;
  DeviceArray<float> x, xn, q, k, v, att, gate, up, logits_dev;
  DeviceArray<int32_t> tokens_dev, pos_dev, slots_dev, page_ids_dev;
  DeviceArray<AttnJob> jobs_dev;
  // The step's tables, this rank's part, in its store's page ids.
  KVStore* store = nullptr;
  std::vector<AttnJob> jobs_host;
  std::vector<std::pair<int, size_t>> job_src;  // [job]: (layer, index in the step's jobs of the layer)
  std::vector<int32_t> page_ids_host, slots_host, tokens_host;  // (page_ids_host: several ranks, in local ids)
  // Its device page table holds the step table's contents (KVStep) as of the last upload; a step planned but
  // not uploaded (it failed in between) leaves it stale: the next upload is whole.
  bool table_current = false, upload_pending = false;
  std::vector<int32_t> table_pairs;  // (index, id) pairs of the entries a step wrote, for scatter_i32
  std::vector<size_t> layer_job0, slot0;
  std::vector<int32_t> layer_max_rows, layer_decode_jobs, layer_max_pages;
  std::vector<float> logits_host, q_host, att_host;
  std::vector<RecordedStep> graphs;  // oldest first
};

Runner::Runner(const Model& m, Backend& be, int max_batch) : Runner(m, std::vector<Backend*>{&be}, nullptr, max_batch) {}

Runner::Runner(const Model& m, const std::vector<Backend*>& ranks, const TPPlan& plan, int max_batch)
    : Runner(m, ranks, &plan, max_batch) {}

Runner::~Runner() = default;

Runner::Runner(const Model& m, const std::vector<Backend*>& backends, const TPPlan* plan, int max_batch)
    : m_(m), max_batch_(std::max(1, max_batch)) {
  const ModelConfig& c = m.config();
  const int R = int(backends.size());
  if (R < 1) fail("runner: no backend");
  if (plan && (plan->world != R || plan->n_layer != c.n_layer || plan->n_kv != c.n_head_kv))
    fail("runner: a tensor-parallel plan for {} ranks, {} layers and {} KV heads, not {}, {} and {}", plan->world,
         plan->n_layer, plan->n_kv, R, c.n_layer, c.n_head_kv);
  if (!plan && R != 1) fail("runner: {} backends need a tensor-parallel plan", R);
  comms_ = make_comm_group(backends);  // none for one rank (unless HEADROOM_TP_COMM=nccl: its world-1 check)
  if (R > 1) workers_ = std::make_unique<RankWorkers>(R);
  const size_t B = size_t(max_batch_);
  const int64_t HD = c.head_dim, G = c.n_group();
  // The MLP splits in whole blocks of every layer's ffn_down type (block sizes are powers of two: the largest).
  int64_t blk = 1;
  for (const LayerWeights& L : m.layers) blk = std::max(blk, gguf::type_traits(L.down.type)->block_elems);
  const int64_t units = c.n_ff / blk;
  if (units < R)
    fail("--tensor-parallel {}: the MLP's {} columns are {} blocks of {}, fewer than the ranks", R, c.n_ff, units, blk);
  for (int r = 0; r < R; ++r) {
    auto rk = std::make_unique<Rank>();
    Backend& be = *backends[size_t(r)];
    rk->rank = r;
    rk->be = &be;
    rk->comm = comms_.empty() ? nullptr : comms_[size_t(r)].get();
    // Its share: KV heads from the plan, the MLP in whole blocks of ffn_down's type, the vocabulary evenly.
    rk->f0 = units * r / R * blk;
    rk->f1 = units * (r + 1) / R * blk;
    if (r == R - 1) rk->f1 = c.n_ff;
    rk->v0 = int64_t(c.n_vocab) * r / R;
    rk->v1 = int64_t(c.n_vocab) * (r + 1) / R;
    size_t max_kv = 0, all_kv = 0;
    for (int l = 0; l < c.n_layer; ++l) {
      std::vector<int32_t> h;
      if (plan) h = plan->heads(r, l);
      else for (int k = 0; k < c.n_head_kv; ++k) h.push_back(k);
      if (h.empty()) fail("runner: tensor-parallel rank {} has no KV head in layer {}", r, l);
      std::vector<int32_t> loc(size_t(c.n_head_kv), -1);
      for (size_t j = 0; j < h.size(); ++j) loc[size_t(h[j])] = int32_t(j);
      max_kv = std::max(max_kv, h.size());
      all_kv += h.size();
      rk->heads.push_back(std::move(h));
      rk->local_of.push_back(std::move(loc));
    }
    rk->x = DeviceArray<float>(be, B * c.n_embd);
    rk->xn = DeviceArray<float>(be, B * c.n_embd);
    rk->q = DeviceArray<float>(be, B * max_kv * G * HD);
    rk->k = DeviceArray<float>(be, B * max_kv * HD);
    rk->v = DeviceArray<float>(be, B * max_kv * HD);
    rk->att = DeviceArray<float>(be, B * max_kv * G * HD);
    rk->gate = DeviceArray<float>(be, B * size_t(rk->f1 - rk->f0));
    rk->up = DeviceArray<float>(be, B * size_t(rk->f1 - rk->f0));
    rk->tokens_dev = DeviceArray<int32_t>(be, B);
    rk->pos_dev = DeviceArray<int32_t>(be, B);
    rk->slots_dev = DeviceArray<int32_t>(be, B * all_kv);
    rk->rope.n_rot = c.n_rot;
    rk->rope.neox = c.rope_neox;
    rk->rope.theta_base = c.rope_theta;
    rk->rope.freq_scale = c.rope_scaling == RopeScaling::Linear ? 1.0f / c.rope_scale_factor : 1.0f;
    rk->rope.freq_factors = m.rope_freqs ? be.upload_f32(m.rope_freqs, c.n_rot / 2) : nullptr;
    // Embedding: one rank holds every row as is; a rank of several, its rows [v0, v1) and a zero row after them
    // that the tokens of the other ranks' rows look up (so the all-reduce after the embedding adds one row).
    WeightView embd = m.tok_embd;
    if (R > 1) {
      const size_t rb = m.tok_embd.row_bytes, rows = size_t(rk->v1 - rk->v0);
      uint8_t* dst = own(rk->owned, (rows + 1) * rb);
      std::memcpy(dst, static_cast<const uint8_t*>(m.tok_embd.data) + size_t(rk->v0) * rb, rows * rb);
      std::memset(dst + rows * rb, 0, rb);  // zero bytes are 0.0 in every weight type (a Q8_0 block's d = 0)
      embd.data = dst;
      embd.rows = int64_t(rows) + 1;
    }
    WeightView out;
    if (c.tied_output) {
      out = embd;
      out.rows = rk->v1 - rk->v0;
    } else {
      out = slice_rows(m.output, {{rk->v0, rk->v1}}, rk->owned);
    }
    rk->tok_embd = be.upload_weight(embd);
    if (c.tied_output && R == 1) {  // the output head is the embedding: one copy on the backend
      rk->output = rk->tok_embd;
    } else {  // (a rank's tied head is its embedding rows without the zero row: a weight of its own shape)
      rk->output = be.upload_weight(out);
    }
    rk->output_norm = be.upload_f32(m.output_norm, c.n_embd);
    rk->weight_bytes = int64_t(embd.rows) * int64_t(embd.row_bytes) +
                       (c.tied_output ? 0 : int64_t(out.rows) * int64_t(out.row_bytes));
    const Ranges ff = {{rk->f0, rk->f1}};
    for (int l = 0; l < c.n_layer; ++l) {
      const LayerWeights& L = m.layers[size_t(l)];
      Ranges qr, kr;  // its query heads' rows (= attn_output columns) and its KV heads' rows
      for (int32_t h : rk->heads[size_t(l)]) {
        add_range(qr, h * G * HD, (h + 1) * G * HD);
        add_range(kr, h * HD, (h + 1) * HD);
      }
      LayerWeights s;
      s.wq = slice_rows(L.wq, qr, rk->owned);
      s.wk = slice_rows(L.wk, kr, rk->owned);
      s.wv = slice_rows(L.wv, kr, rk->owned);
      s.wo = slice_cols(L.wo, qr, rk->owned);
      s.gate = slice_rows(L.gate, ff, rk->owned);
      s.up = slice_rows(L.up, ff, rk->owned);
      s.down = slice_cols(L.down, ff, rk->owned);
      LayerWeights d;
      d.attn_norm = be.upload_f32(L.attn_norm, c.n_embd);
      d.ffn_norm = be.upload_f32(L.ffn_norm, c.n_embd);
      for (auto [dst, src] : {std::pair{&d.wq, &s.wq}, {&d.wk, &s.wk}, {&d.wv, &s.wv}, {&d.wo, &s.wo},
                              {&d.gate, &s.gate}, {&d.up, &s.up}, {&d.down, &s.down}}) {
        *dst = be.upload_weight(*src);
        rk->weight_bytes += int64_t(src->rows) * int64_t(src->row_bytes);
      }
      if (L.bq) {
        d.bq = be.upload_f32(R == 1 ? L.bq : slice_f32(L.bq, qr, rk->owned), total(qr));
        d.bk = be.upload_f32(R == 1 ? L.bk : slice_f32(L.bk, kr, rk->owned), total(kr));
        d.bv = be.upload_f32(R == 1 ? L.bv : slice_f32(L.bv, kr, rk->owned), total(kr));
      }
      rk->w.push_back(d);
    }
    ranks_.push_back(std::move(rk));
  }
}

Backend& Runner::backend() { return *ranks_[0]->be; }

int64_t Runner::rank_weight_bytes(int r) const { return ranks_[size_t(r)]->weight_bytes; }

int Runner::recorded_graphs() const {
  return int(std::count_if(ranks_[0]->graphs.begin(), ranks_[0]->graphs.end(),
                           [](const RecordedStep& g) { return g.graph != nullptr; }));
}

std::span<const float> Runner::prefill(KVCache& kv, std::span<const int32_t> tokens, int32_t pos0, bool all_logits,
                                       AttentionObserver* obs) {
  const int64_t V = m_.config().n_vocab, n = int64_t(tokens.size());
  if (n == 0) fail("prefill: no tokens");
  prefill_logits_.resize(size_t(all_logits ? n : 1) * V);
  for (int64_t i = 0; i < n; i += max_batch_) {
    const int len = int(std::min<int64_t>(max_batch_, n - i));
    const bool last = i + len == n;
    SeqRows s{&kv, tokens.subspan(size_t(i), size_t(len)), pos0 + int32_t(i), true, last,
              all_logits ? SeqRows::Logits::All : last ? SeqRows::Logits::Last : SeqRows::Logits::None};
    std::span<const float> l = step(std::span<const SeqRows>(&s, 1), obs);
    std::copy(l.begin(), l.end(), prefill_logits_.begin() + (all_logits ? i * V : 0));
  }
  return prefill_logits_;
}

std::span<const float> Runner::decode(KVCache& kv, int32_t token, int32_t pos) {
  SeqRows s{&kv, std::span<const int32_t>(&token, 1), pos, false, false, SeqRows::Logits::Last};
  return step(std::span<const SeqRows>(&s, 1));
}

std::span<const float> Runner::step(std::span<const SeqRows> seqs, AttentionObserver* obs) {
  const ModelConfig& c = m_.config();
  const int64_t V = c.n_vocab;
  const int R = world();
  if (seqs.empty()) fail("step: no sequences");
  if (obs && seqs.size() != 1) fail("step: an attention observer needs a step of one sequence");
  if (obs && R > 1) fail("step: an attention observer needs one rank (no --tensor-parallel)");
  if (broken_) fail("step: a tensor-parallel rank failed in an earlier step; this runner cannot step again");

  // The rows of all sequences, in order; each sequence's policies act on its last step first.
  int n = 0, n_logits = 0;
  tokens_.clear();
  pos_.clear();
  infos_.clear();
  for (const SeqRows& s : seqs) {
    if (s.tokens.empty()) fail("step: a sequence with no rows");
    if (!s.prefill && s.tokens.size() != 1) fail("step: a decode step feeds one token, not {}", s.tokens.size());
    for (size_t i = 0; i < s.tokens.size(); ++i) {
      const int32_t t = s.tokens[i];
      if (t < 0 || t >= V) fail("token id {} out of range (vocab {})", t, V);
      tokens_.push_back(t);
      pos_.push_back(s.pos0 + int32_t(i));
    }
    infos_.push_back(StepInfo{s.pos0, int(s.tokens.size()), s.prefill, s.prefill && s.last_chunk});
    n += int(s.tokens.size());
    n_logits += s.logit_rows();
  }
  if (n > max_batch_) fail("step: {} rows, more than the runner's {} (raise --chunk or lower --parallel)", n, max_batch_);
  // Check every sequence before any is written (a batch is planned whole or not at all).
  PagePool& pool = seqs[0].kv->pool();
  if (pool.n_parts() != R)
    fail("step: a runner of {} tensor-parallel ranks needs a KV pool split into {} parts, not {}", R, R, pool.n_parts());
  int64_t need = 0;
  for (size_t i = 0; i < seqs.size(); ++i) {
    KVCache& kv = *seqs[i].kv;
    if (&kv.pool() != &pool) fail("step: the sequences of a step must share one page pool");
    kv.prepare(infos_[i]);
    if (std::string why = kv.over_budget(infos_[i].n_rows); !why.empty()) throw BudgetExhausted(why);
    need += kv.pages_for(infos_[i].n_rows);
  }
  if (seqs.size() > 1 && need > pool.device_free())  // (one sequence: plan_step says it in its own words)
    throw BudgetExhausted(fmt::format("KV pool exhausted: the step needs {} more device pages, {} of {} are free",
                                      need, pool.device_free(), pool.device_capacity()));

  // The step's tables, on the host (one plan for all ranks; each rank takes its part in rank_step).
  for (auto& rk : ranks_) {
    if (rk->upload_pending) rk->table_current = false;
    rk->upload_pending = true;
  }
  step_.begin(c.n_layer, c.n_head_kv, n);
  for (int i = 0, row0 = 0; i < int(seqs.size()); row0 += infos_[size_t(i)].n_rows, ++i)
    seqs[size_t(i)].kv->plan_step(step_, row0, infos_[size_t(i)]);
  pool.flush();

  logits_.resize(size_t(n_logits) * size_t(V));
  if (R == 1) {
    rank_step(*ranks_[0], seqs, n, n_logits, obs, logits_.data());
  } else {
    // The ranks run together (they meet in the all-reduces): rank 0 on this thread, the others on their own.
    std::vector<std::exception_ptr> errors(static_cast<size_t>(R));
    auto run = [&](int r) {
      try {
        Rank& rk = *ranks_[size_t(r)];
        rk.logits_host.resize(size_t(n_logits) * size_t(rk.v1 - rk.v0));
        rank_step(rk, seqs, n, n_logits, nullptr, rk.logits_host.data());
      } catch (...) {
        errors[size_t(r)] = std::current_exception();
        ranks_[size_t(r)]->comm->abandon();  // the other ranks must not wait for it at the next all-reduce
      }
    };
    workers_->run(run);
    // The error to report: the first rank's own, not one of the others' GroupLeft that it caused.
    std::exception_ptr first, own;
    for (const std::exception_ptr& e : errors) {
      if (!e) continue;
      if (!first) first = e;
      try {
        std::rethrow_exception(e);
      } catch (const GroupLeft&) {
      } catch (...) {
        if (!own) own = e;
      }
    }
    if (first) {
      broken_ = true;  // a rank left the group: the runner cannot step again
      std::rethrow_exception(own ? own : first);
    }
    for (const auto& rk : ranks_) {  // the logits' columns, gathered
      const size_t w = size_t(rk->v1 - rk->v0);
      for (int i = 0; i < n_logits; ++i)
        std::copy_n(rk->logits_host.begin() + ptrdiff_t(size_t(i) * w), w,
                    logits_.begin() + ptrdiff_t(size_t(i) * size_t(V) + size_t(rk->v0)));
    }
  }
  // What select_pages chose, for the policies that act on it next step: every rank's jobs and pages back into
  // the step's tables (in the pool's global ids).
  if (step_.selects) {
    const bool whole = R == 1;  // the rank's page ids are the step's (see rank_step)
    for (const auto& rk : ranks_) {
      std::vector<int32_t>& ids = whole ? step_.page_ids : rk->page_ids_host;
      rk->be->download(rk->jobs_host.data(), rk->jobs_dev.get(), rk->jobs_host.size() * sizeof(AttnJob));
      rk->be->download(ids.data(), rk->page_ids_dev.get(), ids.size() * sizeof(int32_t));
      for (size_t j = 0; j < rk->jobs_host.size(); ++j) {
        const auto [l, gi] = rk->job_src[j];
        AttnJob& g = step_.jobs[size_t(l)][gi];
        AttnJob t = rk->jobs_host[j];
        for (int32_t i = 0; i < t.n_pages && !whole && t.select_k > 0; ++i)  // (the rank's table: the same layout)
          step_.page_ids[size_t(g.page0 + i)] = pool.global_id(rk->rank, rk->page_ids_host[size_t(t.page0 + i)]);
        t.kv_head = g.kv_head;
        g = t;
      }
    }
  }
  for (size_t i = 0; i < seqs.size(); ++i) seqs[i].kv->finish_step(step_, infos_[i]);
  return logits_;
}

void Runner::rank_step(Rank& rk, std::span<const SeqRows> seqs, int n, int n_logits, AttentionObserver* obs,
                       float* logits) {
  const ModelConfig& c = m_.config();
  const PagePool& pool = seqs[0].kv->pool();
  Backend& be = *rk.be;
  rk.store = &seqs[0].kv->pool().store(rk.rank);
  // This rank's part of the tables: its heads' slots and jobs. Its page table has the step table's layout
  // (the jobs' page0 as they are); a single rank holds it in the pool's own ids, several ranks each in their
  // store's ids (an entry of another rank's head is not read).
  const bool whole = world() == 1;
  rk.jobs_host.clear();
  rk.job_src.clear();
  rk.slots_host.clear();
  rk.layer_job0.assign(size_t(c.n_layer) + 1, 0);
  rk.slot0.assign(size_t(c.n_layer), 0);
  rk.layer_max_rows.assign(size_t(c.n_layer), 0);
  rk.layer_decode_jobs.assign(size_t(c.n_layer), 0);
  rk.layer_max_pages.assign(size_t(c.n_layer), 0);
  for (int l = 0; l < c.n_layer; ++l) {
    const std::vector<int32_t>& heads = rk.heads[size_t(l)];
    const size_t layer_slots = size_t(l) * size_t(n) * size_t(c.n_head_kv);
    rk.slot0[size_t(l)] = whole ? layer_slots : rk.slots_host.size();
    const int32_t* slots = step_.slots.data() + layer_slots;
    for (int r = 0; r < n && !whole; ++r)
      for (int32_t h : heads) {
        const int32_t s = slots[size_t(r) * size_t(c.n_head_kv) + size_t(h)];
        rk.slots_host.push_back(s < 0 ? -1 : pool.local_slot(s));
      }
    rk.layer_job0[size_t(l)] = rk.jobs_host.size();
    const std::vector<AttnJob>& jobs = step_.jobs[size_t(l)];
    for (size_t gi = 0; gi < jobs.size(); ++gi) {
      const int32_t local = rk.local_of[size_t(l)][size_t(jobs[gi].kv_head)];
      if (local < 0) continue;
      AttnJob j = jobs[gi];
      j.kv_head = local;
      rk.layer_max_rows[size_t(l)] = std::max(rk.layer_max_rows[size_t(l)], j.n_rows);
      rk.layer_decode_jobs[size_t(l)] += j.n_rows < 4 ? 1 : 0;
      rk.layer_max_pages[size_t(l)] = std::max(rk.layer_max_pages[size_t(l)], j.n_pages);
      rk.jobs_host.push_back(j);
      rk.job_src.emplace_back(l, gi);
    }
    // An upper bound, rounded up to a power of two so that a growing sequence rarely changes it (a recorded
    // graph's grids are sized from it).
    rk.layer_max_pages[size_t(l)] = int32_t(std::bit_ceil(uint32_t(rk.layer_max_pages[size_t(l)])));
  }
  rk.layer_job0[size_t(c.n_layer)] = rk.jobs_host.size();
  // Token ids: a rank of several looks up its own rows, and its zero row (index v1 - v0) for the others'.
  rk.tokens_host.resize(size_t(n));
  for (int i = 0; i < n; ++i) {
    const int32_t t = tokens_[size_t(i)];
    rk.tokens_host[size_t(i)] = world() == 1 ? t : t >= rk.v0 && t < rk.v1 ? int32_t(t - rk.v0) : int32_t(rk.v1 - rk.v0);
  }
  const std::vector<int32_t>& slot_table = whole ? step_.slots : rk.slots_host;
  rk.jobs_dev.reserve(be, std::max<size_t>(1, rk.jobs_host.size()));
  rk.tokens_dev.upload(rk.tokens_host.data(), size_t(n));
  rk.pos_dev.upload(pos_.data(), size_t(n));
  rk.slots_dev.upload(slot_table.data(), slot_table.size());
  rk.jobs_dev.upload(rk.jobs_host.data(), rk.jobs_host.size());
  upload_page_table(rk, pool);
  const size_t Vr = size_t(rk.v1 - rk.v0);
  if (n_logits > 0) rk.logits_dev.reserve(be, size_t(n_logits) * Vr);

  // The device work, from the embedding to the logits matmul. A decode step of a shape seen before replays
  // the graph recorded for it (backends with graphs: CUDA; with several ranks only when the communicator's
  // all-reduce can be recorded too: NCCL).
  bool decode_only = !obs && (!rk.comm || rk.comm->capturable());
  for (const StepInfo& i : infos_) decode_only = decode_only && !i.prefill;
  if (decode_only && be.graphs()) {
    std::vector<int64_t> key = graph_key(rk, seqs, n, n_logits);
    auto& graphs = rk.graphs;
    auto hit = std::find_if(graphs.begin(), graphs.end(), [&](const RecordedStep& g) { return g.key == key; });
    if (hit != graphs.end() && hit->graph && be.graph_launch(*hit->graph)) {
      // replayed
    } else if (hit != graphs.end() && hit->graph) {  // stale: run it again, record it next time
      hit->graph.reset();
      device_step(rk, seqs, n, n_logits, nullptr);
    } else if (hit != graphs.end()) {  // seen once (its scratch is sized): record it now
      be.graph_begin();
      try {
        device_step(rk, seqs, n, n_logits, nullptr);
      } catch (...) {
        try {
          be.graph_end();  // ends the recording; the step's own error is the one to report
        } catch (...) {
        }
        throw;
      }
      hit->graph = be.graph_end();
      if (!be.graph_launch(*hit->graph)) fail("step: a graph went stale as it was recorded");
    } else {
      device_step(rk, seqs, n, n_logits, nullptr);
      if (graphs.size() >= kMaxGraphs) graphs.erase(graphs.begin());
      graphs.push_back(RecordedStep{std::move(key), nullptr});
    }
  } else {
    device_step(rk, seqs, n, n_logits, obs);
  }
  if (n_logits > 0) be.download(logits, rk.logits_dev.get(), size_t(n_logits) * Vr * sizeof(float));
  else be.synchronize();
}

// The page table goes up in place: the entries the step wrote, as (index, id) pairs that scatter_i32 puts in
// place (in steady state a decode step writes none, or one per head whose page just filled), or the whole
// table where the device copy is new, has grown (its contents lost), is stale, or most of it was written.
void Runner::upload_page_table(Rank& rk, const PagePool& pool) {
  Backend& be = *rk.be;
  const std::vector<int32_t>& table = step_.page_ids;
  const bool whole = world() == 1;
  if (rk.page_ids_dev.size() < std::max<size_t>(1, table.size())) {
    rk.page_ids_dev.reserve(be, std::max<size_t>(1, table.size()));
    rk.table_current = false;
  }
  // An id as the rank's store knows it (another part's id is an entry the rank does not read: any value).
  auto local = [&](int32_t id) { return whole || id < 0 ? id : pool.local_id(id); };
  const bool all = !rk.table_current || step_.n_written * 4 > int64_t(table.size());
  if (all) {
    if (whole) {
      rk.page_ids_dev.upload(table.data(), table.size());
    } else {
      rk.page_ids_host.resize(table.size());
      for (size_t i = 0; i < table.size(); ++i) rk.page_ids_host[i] = local(table[i]);
      rk.page_ids_dev.upload(rk.page_ids_host.data(), table.size());
    }
  } else if (step_.n_written > 0) {
    rk.table_pairs.clear();
    if (!whole) rk.page_ids_host.resize(table.size());
    for (const auto& [lo, hi] : step_.written)
      for (int64_t i = lo; i < hi; ++i) {
        const int32_t id = table[size_t(i)];
        if (!whole && id >= 0 && pool.part_of(id) != rk.rank) continue;  // another rank's head
        const int32_t v = local(id);
        if (!whole) rk.page_ids_host[size_t(i)] = v;
        rk.table_pairs.push_back(int32_t(i));
        rk.table_pairs.push_back(v);
      }
    be.scatter_i32(rk.page_ids_dev.get(), rk.page_ids_dev.size(), rk.table_pairs);
  }
  rk.table_current = true;
  rk.upload_pending = false;
}

// What a recorded step depends on besides memory contents: its shape and every table's address.
std::vector<int64_t> Runner::graph_key(const Rank& rk, std::span<const SeqRows> seqs, int n, int n_logits) const {
  std::vector<int64_t> k = {n, n_logits, step_.selects ? 1 : 0,
                            int64_t(reinterpret_cast<uintptr_t>(rk.store)),
                            int64_t(reinterpret_cast<uintptr_t>(rk.jobs_dev.get())),
                            int64_t(reinterpret_cast<uintptr_t>(rk.page_ids_dev.get())),
                            int64_t(reinterpret_cast<uintptr_t>(rk.logits_dev.get()))};
  for (const SeqRows& s : seqs) k.push_back(s.logit_rows());
  for (size_t l = 0; l + 1 < rk.layer_job0.size(); ++l) {
    k.push_back(int64_t(rk.layer_job0[l + 1] - rk.layer_job0[l]));
    k.push_back(rk.layer_max_rows[l]);
    k.push_back(rk.layer_decode_jobs[l]);
    k.push_back(rk.layer_max_pages[l]);
  }
  return k;
}

void Runner::device_step(Rank& rk, std::span<const SeqRows> seqs, int n, int n_logits, AttentionObserver* obs) {
  const ModelConfig& c = m_.config();
  const int64_t D = c.n_embd, HD = c.head_dim;
  const float scale = 1.0f / std::sqrt(float(HD));
  Backend& be = *rk.be;
  KVStore& store = *rk.store;
  KVCache& kv = *seqs[0].kv;  // for the observer
  // The sum over the ranks (a no-op for one rank).
  auto all_reduce = [&](float* buf, int64_t count) {
    if (rk.comm) rk.comm->all_reduce_sum(be, buf, count);
  };

  float* x = rk.x.get();
  float* xn = rk.xn.get();
  float* q = rk.q.get();
  float* att = rk.att.get();
  be.embed(rk.tok_embd, rk.tokens_dev.get(), n, x);
  all_reduce(x, int64_t(n) * D);  // vocabulary split: each row from its rank, zeros from the others

  // Fused ops (backend.h) cut the launches per layer: q/k/v as one grouped matmul, RoPE with the KV store,
  // gate/up with SwiGLU, and (HEADROOM_FUSE=all) each residual add with the norm after it. The same bits.
  const FusedOps& fuse = fused_ops();
  if (fuse.norm) be.rmsnorm(x, rk.w[0].attn_norm, n, D, c.rms_eps, xn);
  for (int l = 0; l < c.n_layer; ++l) {
    const LayerWeights& L = rk.w[size_t(l)];
    const int n_kv = int(rk.heads[size_t(l)].size()), n_head = n_kv * c.n_group();  // this rank's heads
    const int64_t QD = int64_t(n_head) * HD, KVD = int64_t(n_kv) * HD;
    const int32_t* slots = rk.slots_dev.get() + rk.slot0[size_t(l)];

    // Attention block (xn = rmsnorm(x) * attn_norm: the step's first, or fused with the previous layer's add).
    if (!fuse.norm) be.rmsnorm(x, L.attn_norm, n, D, c.rms_eps, xn);
    if (fuse.qkv) {
      const MatmulPart qkv[] = {{L.wq, q}, {L.wk, rk.k.get()}, {L.wv, rk.v.get()}};
      be.matmul_group(qkv, xn, n);
    } else {
      be.matmul(L.wq, xn, n, q);
      be.matmul(L.wk, xn, n, rk.k.get());
      be.matmul(L.wv, xn, n, rk.v.get());
    }
    if (L.bq) {
      be.add_bias(q, L.bq, n, QD);
      be.add_bias(rk.k.get(), L.bk, n, KVD);
      be.add_bias(rk.v.get(), L.bv, n, KVD);
    }
    if (fuse.rope) {
      be.rope_store(store, AttnRows{q, rk.k.get(), rk.v.get(), n, n_head, n_kv, HD, rk.pos_dev.get()}, slots, rk.rope);
    } else {
      be.rope(q, n, n_head, HD, rk.pos_dev.get(), rk.rope);
      be.rope(rk.k.get(), n, n_kv, HD, rk.pos_dev.get(), rk.rope);
      be.kv_store(store, rk.k.get(), rk.v.get(), n, n_kv, slots, rk.pos_dev.get());
    }
    if (obs) {
      rk.q_host.resize(size_t(n) * size_t(QD));
      be.download(rk.q_host.data(), q, rk.q_host.size() * sizeof(float));
      obs->on_attention(l, n, pos_.data(), rk.q_host.data(), kv);
    }
    AttnBatch b;
    b.q = q;
    b.q_stride = QD;
    b.q_pos = rk.pos_dev.get();
    b.out = att;
    b.out_stride = QD;
    b.n_group = c.n_group();
    b.head_dim = int(HD);
    b.scale = scale;
    b.jobs = rk.jobs_dev.get() + rk.layer_job0[size_t(l)];
    b.n_jobs = int32_t(rk.layer_job0[size_t(l) + 1] - rk.layer_job0[size_t(l)]);
    b.page_ids = rk.page_ids_dev.get();
    b.max_rows = rk.layer_max_rows[size_t(l)];
    b.n_decode_jobs = rk.layer_decode_jobs[size_t(l)];
    b.max_pages = rk.layer_max_pages[size_t(l)];
    if (step_.selects) be.select_pages(store, b);
    be.attention(store, b);
    if (obs) {
      rk.att_host.resize(size_t(n) * size_t(QD));
      be.download(rk.att_host.data(), att, rk.att_host.size() * sizeof(float));
      obs->on_attention_out(l, n, rk.att_host.data());
    }
    be.matmul(L.wo, att, n, xn);
    all_reduce(xn, int64_t(n) * D);  // the attention output: the sum over the ranks' heads

    // Feed-forward block (SwiGLU).
    const int64_t FF = rk.f1 - rk.f0;  // this rank's columns
    if (fuse.norm) {
      be.add_rmsnorm(x, xn, L.ffn_norm, n, D, c.rms_eps, xn);
    } else {
      be.add(x, xn, int64_t(n) * D);
      be.rmsnorm(x, L.ffn_norm, n, D, c.rms_eps, xn);
    }
    if (fuse.mlp) {
      be.matmul_swiglu(L.gate, L.up, xn, n, rk.gate.get(), rk.up.get());
    } else {
      be.matmul(L.gate, xn, n, rk.gate.get());
      be.matmul(L.up, xn, n, rk.up.get());
      be.swiglu(rk.gate.get(), rk.up.get(), int64_t(n) * FF, rk.gate.get());
    }
    be.matmul(L.down, rk.gate.get(), n, xn);
    all_reduce(xn, int64_t(n) * D);  // the MLP output: the sum over the ranks' columns
    if (fuse.norm && l + 1 < c.n_layer) be.add_rmsnorm(x, xn, rk.w[size_t(l) + 1].attn_norm, n, D, c.rms_eps, xn);
    else be.add(x, xn, int64_t(n) * D);  // the last layer's: the output norm takes only the logit rows
  }

  // Logits of the rows the sequences asked for (this rank's vocabulary columns): their final norms gathered
  // into xn, then one matmul.
  if (n_logits > 0) {
    int out_row = 0, row0 = 0;
    for (const SeqRows& s : seqs) {
      const int rows = s.logit_rows(), first = row0 + int(s.tokens.size()) - rows;
      if (rows > 0) be.rmsnorm(x + int64_t(first) * D, rk.output_norm, rows, D, c.rms_eps, xn + int64_t(out_row) * D);
      out_row += rows;
      row0 += int(s.tokens.size());
    }
    be.matmul(rk.output, xn, n_logits, rk.logits_dev.get());
  }
}

}  // namespace headroom
