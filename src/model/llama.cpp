// The Llama-family forward pass (llama, qwen2, mistral), written once against Backend&.
//
// For a chunk of n tokens of one sequence at positions pos0 .. pos0+n-1:
//
//   x = embed(tokens)                                    [n, n_embd]
//   for each layer:
//     xn = rmsnorm(x) * attn_norm
//     q, k, v = xn·Wqᵀ (+bq), xn·Wkᵀ (+bk), xn·Wvᵀ (+bv)  [n, n_head*hd], [n, n_kv*hd] x2
//     rope(q), rope(k)                                   adjacent pairs (llama) or NEOX halves (qwen2)
//     kv.append(k, v)                                    into this sequence's per-head pages
//     att = attention(q over the pages each head's policy chooses)    causal, exact
//     x += att·Woᵀ
//     xn = rmsnorm(x) * ffn_norm
//     x += (silu(xn·Wgateᵀ) * (xn·Wupᵀ))·Wdownᵀ
//   logits = rmsnorm(x) * output_norm · Woutᵀ            last row only, unless all rows are asked for
#include <algorithm>
#include <cmath>

#include "model/model.h"
#include "util/error.h"

namespace headroom {

Runner::Runner(const Model& m, Backend& be, int max_batch) : m_(m), be_(be), max_batch_(std::max(1, max_batch)) {
  const ModelConfig& c = m.config();
  const size_t B = size_t(max_batch_);
  x_.resize(B * c.n_embd);
  xn_.resize(B * c.n_embd);
  q_.resize(B * c.n_head * c.head_dim);
  k_.resize(B * c.kv_dim());
  v_.resize(B * c.kv_dim());
  att_.resize(B * c.n_head * c.head_dim);
  gate_.resize(B * c.n_ff);
  up_.resize(B * c.n_ff);
  pos_.resize(B);
  rope_.n_rot = c.n_rot;
  rope_.neox = c.rope_neox;
  rope_.theta_base = c.rope_theta;
  rope_.freq_scale = c.rope_scaling == RopeScaling::Linear ? 1.0f / c.rope_scale_factor : 1.0f;
  rope_.freq_factors = m.rope_freqs;
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
  if (prefill) kv.begin_prefill();
  for (int64_t i = 0; i < n; i += max_batch_) {
    const int len = int(std::min<int64_t>(max_batch_, n - i));
    const bool last = i + len == n;
    float* out = all_logits ? logits_.data() + i * V : (last ? logits_.data() : nullptr);
    forward_chunk(kv, tokens.data() + i, len, pos0 + int32_t(i), out, all_logits, obs);
  }
  if (prefill) kv.end_prefill(pos0 + int32_t(n));
  return logits_;
}

void Runner::forward_chunk(KVCache& kv, const int32_t* tokens, int n, int32_t pos0, float* logits_out,
                           bool all_logits, AttentionObserver* obs) {
  const ModelConfig& c = m_.config();
  const int64_t D = c.n_embd, HD = c.head_dim, QD = int64_t(c.n_head) * HD, KVD = c.kv_dim();
  const float scale = 1.0f / std::sqrt(float(HD));
  for (int i = 0; i < n; ++i) pos_[i] = pos0 + i;
  float* x = x_.data();
  float* xn = xn_.data();

  be_.embed(m_.tok_embd, tokens, n, x);

  for (int l = 0; l < c.n_layer; ++l) {
    const LayerWeights& L = m_.layers[l];

    // Attention block.
    be_.rmsnorm(x, L.attn_norm, n, D, c.rms_eps, xn);
    be_.matmul(L.wq, xn, n, q_.data());
    be_.matmul(L.wk, xn, n, k_.data());
    be_.matmul(L.wv, xn, n, v_.data());
    if (L.bq) {
      be_.add_bias(q_.data(), L.bq, n, QD);
      be_.add_bias(k_.data(), L.bk, n, KVD);
      be_.add_bias(v_.data(), L.bv, n, KVD);
    }
    be_.rope(q_.data(), n, c.n_head, HD, pos_.data(), rope_);
    be_.rope(k_.data(), n, c.n_head_kv, HD, pos_.data(), rope_);
    kv.append(l, n, pos_.data(), k_.data(), v_.data());
    if (obs) obs->on_attention(l, n, pos_.data(), q_.data(), kv);
    be_.attention(kv.plan(l, n, pos_.data(), q_.data(), QD, att_.data(), QD, scale));
    if (obs) obs->on_attention_out(l, n, att_.data());
    kv.after_step(l, pos0 + n);
    be_.matmul(L.wo, att_.data(), n, xn);
    be_.add(x, xn, int64_t(n) * D);

    // Feed-forward block (SwiGLU).
    be_.rmsnorm(x, L.ffn_norm, n, D, c.rms_eps, xn);
    be_.matmul(L.gate, xn, n, gate_.data());
    be_.matmul(L.up, xn, n, up_.data());
    be_.swiglu(gate_.data(), up_.data(), int64_t(n) * c.n_ff, gate_.data());
    be_.matmul(L.down, gate_.data(), n, xn);
    be_.add(x, xn, int64_t(n) * D);
  }

  if (!logits_out) return;
  // Logits: every row, or only the last one.
  const int first = all_logits ? 0 : n - 1;
  const int rows = n - first;
  be_.rmsnorm(x + int64_t(first) * D, m_.output_norm, rows, D, c.rms_eps, xn);
  be_.matmul(m_.output, xn, rows, logits_out);
}

}  // namespace headroom
