// The Llama-family forward pass (llama, qwen2, mistral), written once against Backend&.
//
// For a chunk of n tokens of one sequence at positions pos0 .. pos0+n-1:
//
//   kv.plan_step: slots for the new rows, every head's pages and rule       (host metadata, then one upload)
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
//   logits = rmsnorm(x) * output_norm · Woutᵀ            last row only, unless all rows are asked for
//   download logits; kv.finish_step                      (the step's one synchronisation)
#include <algorithm>
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

std::span<const float> Runner::forward(KVCache& kv, std::span<const int32_t> tokens, int32_t pos0, bool all_logits,
                                       AttentionObserver* obs) {
  const int64_t V = m_.config().n_vocab;
  const int64_t n = int64_t(tokens.size());
  if (n == 0) fail("forward: no tokens");
  for (int32_t t : tokens)
    if (t < 0 || t >= V) fail("token id {} out of range (vocab {})", t, V);
  logits_.resize(size_t(all_logits ? n : 1) * V);
  const bool prefill = n > 1;  // a prompt (or a part of one); single tokens are decode steps
  for (int64_t i = 0; i < n; i += max_batch_) {
    const int len = int(std::min<int64_t>(max_batch_, n - i));
    const bool last = i + len == n;
    float* out = all_logits ? logits_.data() + i * V : (last ? logits_.data() : nullptr);
    StepInfo s{pos0 + int32_t(i), len, prefill, prefill && last};
    step(kv, tokens.data() + i, s, out, all_logits, obs);
  }
  return logits_;
}

void Runner::step(KVCache& kv, const int32_t* tokens, const StepInfo& s, float* logits_out, bool all_logits,
                  AttentionObserver* obs) {
  const ModelConfig& c = m_.config();
  const int n = s.n_rows;
  const int64_t D = c.n_embd, HD = c.head_dim, QD = int64_t(c.n_head) * HD, KVD = c.kv_dim();
  const float scale = 1.0f / std::sqrt(float(HD));

  // The step's tables, on the host, then uploaded once.
  step_.begin(c.n_layer, c.n_head_kv, n);
  kv.plan_step(step_, 0, s);
  kv.pool().flush();
  pos_.resize(size_t(n));
  for (int i = 0; i < n; ++i) pos_[size_t(i)] = s.pos0 + i;
  jobs_host_.clear();
  layer_job0_.assign(size_t(c.n_layer) + 1, 0);
  for (int l = 0; l < c.n_layer; ++l) {
    layer_job0_[size_t(l)] = jobs_host_.size();
    jobs_host_.insert(jobs_host_.end(), step_.jobs[size_t(l)].begin(), step_.jobs[size_t(l)].end());
  }
  layer_job0_[size_t(c.n_layer)] = jobs_host_.size();
  jobs_dev_.reserve(be_, jobs_host_.size());
  page_ids_dev_.reserve(be_, std::max<size_t>(1, step_.page_ids.size()));
  tokens_dev_.upload(tokens, size_t(n));
  pos_dev_.upload(pos_.data(), size_t(n));
  slots_dev_.upload(step_.slots.data(), step_.slots.size());
  jobs_dev_.upload(jobs_host_.data(), jobs_host_.size());
  page_ids_dev_.upload(step_.page_ids.data(), step_.page_ids.size());
  KVStore& store = kv.pool().store();

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

  if (logits_out) {
    // Logits: every row, or only the last one.
    const int first = all_logits ? 0 : n - 1;
    const int rows = n - first;
    logits_dev_.reserve(be_, size_t(rows) * size_t(c.n_vocab));
    be_.rmsnorm(x + int64_t(first) * D, output_norm_, rows, D, c.rms_eps, xn);
    be_.matmul(output_, xn, rows, logits_dev_.get());
    be_.download(logits_out, logits_dev_.get(), size_t(rows) * size_t(c.n_vocab) * sizeof(float));
  } else {
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
  kv.finish_step(step_, s);
}

}  // namespace headroom
