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
#include <algorithm>
#include <bit>
#include <cmath>

#include "model/model.h"
#include "util/error.h"

namespace headroom {

Runner::Runner(const Model& m, Backend& be, int max_batch) : m_(m), be_(be), max_batch_(std::max(1, max_batch)) {
  const ModelConfig& c = m.config();
  const size_t B = size_t(max_batch_);
  x_ = DeviceArray<float>(be, B * c.n_embd);
  xn_ = DeviceArray<float>(be, B * c.n_embd);
  q_ = DeviceArray<float>(be, B * c.n_head * c.head_dim);
  k_ = DeviceArray<float>(be, B * c.kv_dim());
  v_ = DeviceArray<float>(be, B * c.kv_dim());
  att_ = DeviceArray<float>(be, B * c.n_head * c.head_dim);
  gate_ = DeviceArray<float>(be, B * c.n_ff);
  up_ = DeviceArray<float>(be, B * c.n_ff);
  tokens_dev_ = DeviceArray<int32_t>(be, B);
  pos_dev_ = DeviceArray<int32_t>(be, B);
  slots_dev_ = DeviceArray<int32_t>(be, B * size_t(c.n_layer) * size_t(c.n_head_kv));
  rope_.n_rot = c.n_rot;
  rope_.neox = c.rope_neox;
  rope_.theta_base = c.rope_theta;
  rope_.freq_scale = c.rope_scaling == RopeScaling::Linear ? 1.0f / c.rope_scale_factor : 1.0f;
  rope_.freq_factors = m.rope_freqs ? be.upload_f32(m.rope_freqs, c.n_rot / 2) : nullptr;
  tok_embd_ = be.upload_weight(m.tok_embd);
  output_ = be.upload_weight(m.output);
  output_norm_ = be.upload_f32(m.output_norm, c.n_embd);
  for (const LayerWeights& L : m.layers) {
    LayerWeights d;
    d.attn_norm = be.upload_f32(L.attn_norm, c.n_embd);
    d.ffn_norm = be.upload_f32(L.ffn_norm, c.n_embd);
    d.wq = be.upload_weight(L.wq);
    d.wk = be.upload_weight(L.wk);
    d.wv = be.upload_weight(L.wv);
    d.wo = be.upload_weight(L.wo);
    d.gate = be.upload_weight(L.gate);
    d.up = be.upload_weight(L.up);
    d.down = be.upload_weight(L.down);
    if (L.bq) {
      d.bq = be.upload_f32(L.bq, int64_t(c.n_head) * c.head_dim);
      d.bk = be.upload_f32(L.bk, c.kv_dim());
      d.bv = be.upload_f32(L.bv, c.kv_dim());
    }
    w_.push_back(d);
  }
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
  if (seqs.empty()) fail("step: no sequences");
  if (obs && seqs.size() != 1) fail("step: an attention observer needs a step of one sequence");

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

  // The step's tables, on the host, then uploaded once.
  step_.begin(c.n_layer, c.n_head_kv, n);
  for (int i = 0, row0 = 0; i < int(seqs.size()); row0 += infos_[size_t(i)].n_rows, ++i)
    seqs[size_t(i)].kv->plan_step(step_, row0, infos_[size_t(i)]);
  pool.flush();
  jobs_host_.clear();
  layer_job0_.assign(size_t(c.n_layer) + 1, 0);
  layer_max_rows_.assign(size_t(c.n_layer), 0);
  layer_decode_jobs_.assign(size_t(c.n_layer), 0);
  layer_max_pages_.assign(size_t(c.n_layer), 0);
  for (int l = 0; l < c.n_layer; ++l) {
    layer_job0_[size_t(l)] = jobs_host_.size();
    for (const AttnJob& j : step_.jobs[size_t(l)]) {
      layer_max_rows_[size_t(l)] = std::max(layer_max_rows_[size_t(l)], j.n_rows);
      layer_decode_jobs_[size_t(l)] += j.n_rows < 4 ? 1 : 0;
      layer_max_pages_[size_t(l)] = std::max(layer_max_pages_[size_t(l)], j.n_pages);
    }
    // An upper bound, rounded up to a power of two so that a growing sequence rarely changes it (a recorded
    // graph's grids are sized from it).
    layer_max_pages_[size_t(l)] = int32_t(std::bit_ceil(uint32_t(layer_max_pages_[size_t(l)])));
    jobs_host_.insert(jobs_host_.end(), step_.jobs[size_t(l)].begin(), step_.jobs[size_t(l)].end());
  }
  layer_job0_[size_t(c.n_layer)] = jobs_host_.size();
  jobs_dev_.reserve(be_, jobs_host_.size());
  page_ids_dev_.reserve(be_, std::max<size_t>(1, step_.page_ids.size()));
  tokens_dev_.upload(tokens_.data(), size_t(n));
  pos_dev_.upload(pos_.data(), size_t(n));
  slots_dev_.upload(step_.slots.data(), step_.slots.size());
  jobs_dev_.upload(jobs_host_.data(), jobs_host_.size());
  page_ids_dev_.upload(step_.page_ids.data(), step_.page_ids.size());
  if (n_logits > 0) logits_dev_.reserve(be_, size_t(n_logits) * size_t(V));

  // The device work, from the embedding to the logits matmul. A decode step of a shape seen before replays
  // the graph recorded for it (backends with graphs: CUDA), which saves the per-op launch cost.
  bool decode_only = !obs;
  for (const StepInfo& i : infos_) decode_only = decode_only && !i.prefill;
  if (decode_only && be_.graphs()) {
    std::vector<int64_t> key = graph_key(seqs, n, n_logits);
    auto hit = std::find_if(graphs_.begin(), graphs_.end(), [&](const RecordedStep& g) { return g.key == key; });
    if (hit != graphs_.end() && hit->graph && be_.graph_launch(*hit->graph)) {
      // replayed
    } else if (hit != graphs_.end() && hit->graph) {  // stale: run it again, record it next time
      hit->graph.reset();
      device_step(seqs, n, n_logits, nullptr);
    } else if (hit != graphs_.end()) {  // seen once (its scratch is sized): record it now
      be_.graph_begin();
      try {
        device_step(seqs, n, n_logits, nullptr);
      } catch (...) {
        try {
          be_.graph_end();  // ends the recording; the step's own error is the one to report
        } catch (...) {
        }
        throw;
      }
      hit->graph = be_.graph_end();
      if (!be_.graph_launch(*hit->graph)) fail("step: a graph went stale as it was recorded");
    } else {
      device_step(seqs, n, n_logits, nullptr);
      if (graphs_.size() >= kMaxGraphs) graphs_.erase(graphs_.begin());
      graphs_.push_back(RecordedStep{std::move(key), nullptr});
    }
  } else {
    device_step(seqs, n, n_logits, obs);
  }

  if (n_logits > 0) {
    logits_.resize(size_t(n_logits) * size_t(V));
    be_.download(logits_.data(), logits_dev_.get(), logits_.size() * sizeof(float));
  } else {
    logits_.clear();
    be_.synchronize();
  }
  // What select_pages chose, for the policies that act on it next step.
  if (step_.selects) {
    be_.download(jobs_host_.data(), jobs_dev_.get(), jobs_host_.size() * sizeof(AttnJob));
    be_.download(step_.page_ids.data(), page_ids_dev_.get(), step_.page_ids.size() * sizeof(int32_t));
    for (int l = 0; l < c.n_layer; ++l)
      std::copy(jobs_host_.begin() + ptrdiff_t(layer_job0_[size_t(l)]),
                jobs_host_.begin() + ptrdiff_t(layer_job0_[size_t(l) + 1]), step_.jobs[size_t(l)].begin());
  }
  for (size_t i = 0; i < seqs.size(); ++i) seqs[i].kv->finish_step(step_, infos_[i]);
  return logits_;
}

// What a recorded step depends on besides memory contents: its shape and every table's address.
std::vector<int64_t> Runner::graph_key(std::span<const SeqRows> seqs, int n, int n_logits) const {
  std::vector<int64_t> k = {n, n_logits, step_.selects ? 1 : 0,
                            int64_t(reinterpret_cast<uintptr_t>(&seqs[0].kv->pool().store())),
                            int64_t(reinterpret_cast<uintptr_t>(jobs_dev_.get())),
                            int64_t(reinterpret_cast<uintptr_t>(page_ids_dev_.get())),
                            int64_t(reinterpret_cast<uintptr_t>(logits_dev_.get()))};
  for (const SeqRows& s : seqs) k.push_back(s.logit_rows());
  for (size_t l = 0; l + 1 < layer_job0_.size(); ++l) {
    k.push_back(int64_t(layer_job0_[l + 1] - layer_job0_[l]));
    k.push_back(layer_max_rows_[l]);
    k.push_back(layer_decode_jobs_[l]);
    k.push_back(layer_max_pages_[l]);
  }
  return k;
}

void Runner::device_step(std::span<const SeqRows> seqs, int n, int n_logits, AttentionObserver* obs) {
  const ModelConfig& c = m_.config();
  const int64_t D = c.n_embd, HD = c.head_dim, QD = int64_t(c.n_head) * HD, KVD = c.kv_dim();
  const float scale = 1.0f / std::sqrt(float(HD));
  KVStore& store = seqs[0].kv->pool().store();
  KVCache& kv = *seqs[0].kv;  // for the observer

  float* x = x_.get();
  float* xn = xn_.get();
  float* q = q_.get();
  float* att = att_.get();
  be_.embed(tok_embd_, tokens_dev_.get(), n, x);

  for (int l = 0; l < c.n_layer; ++l) {
    const LayerWeights& L = w_[size_t(l)];

    // Attention block.
    be_.rmsnorm(x, L.attn_norm, n, D, c.rms_eps, xn);
    be_.matmul(L.wq, xn, n, q);
    be_.matmul(L.wk, xn, n, k_.get());
    be_.matmul(L.wv, xn, n, v_.get());
    if (L.bq) {
      be_.add_bias(q, L.bq, n, QD);
      be_.add_bias(k_.get(), L.bk, n, KVD);
      be_.add_bias(v_.get(), L.bv, n, KVD);
    }
    be_.rope(q, n, c.n_head, HD, pos_dev_.get(), rope_);
    be_.rope(k_.get(), n, c.n_head_kv, HD, pos_dev_.get(), rope_);
    be_.kv_store(store, k_.get(), v_.get(), n, c.n_head_kv, slots_dev_.get() + size_t(l) * size_t(n) * c.n_head_kv,
                 pos_dev_.get());
    if (obs) {
      q_host_.resize(size_t(n) * size_t(QD));
      be_.download(q_host_.data(), q, q_host_.size() * sizeof(float));
      obs->on_attention(l, n, pos_.data(), q_host_.data(), kv);
    }
    AttnBatch b;
    b.q = q;
    b.q_stride = QD;
    b.q_pos = pos_dev_.get();
    b.out = att;
    b.out_stride = QD;
    b.n_group = c.n_group();
    b.head_dim = int(HD);
    b.scale = scale;
    b.jobs = jobs_dev_.get() + layer_job0_[size_t(l)];
    b.n_jobs = int32_t(layer_job0_[size_t(l) + 1] - layer_job0_[size_t(l)]);
    b.page_ids = page_ids_dev_.get();
    b.max_rows = layer_max_rows_[size_t(l)];
    b.n_decode_jobs = layer_decode_jobs_[size_t(l)];
    b.max_pages = layer_max_pages_[size_t(l)];
    if (step_.selects) be_.select_pages(store, b);
    be_.attention(store, b);
    if (obs) {
      att_host_.resize(size_t(n) * size_t(QD));
      be_.download(att_host_.data(), att, att_host_.size() * sizeof(float));
      obs->on_attention_out(l, n, att_host_.data());
    }
    be_.matmul(L.wo, att, n, xn);
    be_.add(x, xn, int64_t(n) * D);

    // Feed-forward block (SwiGLU).
    be_.rmsnorm(x, L.ffn_norm, n, D, c.rms_eps, xn);
    be_.matmul(L.gate, xn, n, gate_.get());
    be_.matmul(L.up, xn, n, up_.get());
    be_.swiglu(gate_.get(), up_.get(), int64_t(n) * c.n_ff, gate_.get());
    be_.matmul(L.down, gate_.get(), n, xn);
    be_.add(x, xn, int64_t(n) * D);
  }

  // Logits of the rows the sequences asked for: their final norms gathered into xn, then one matmul.
  if (n_logits > 0) {
    int out_row = 0, row0 = 0;
    for (const SeqRows& s : seqs) {
      const int rows = s.logit_rows(), first = row0 + int(s.tokens.size()) - rows;
      if (rows > 0) be_.rmsnorm(x + int64_t(first) * D, output_norm_, rows, D, c.rms_eps, xn + int64_t(out_row) * D);
      out_row += rows;
      row0 += int(s.tokens.size());
    }
    be_.matmul(output_, xn, n_logits, logits_dev_.get());
  }
}

}  // namespace headroom
