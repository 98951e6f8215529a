#include "model/config.h"

#include "util/error.h"

namespace headroom {

ModelConfig load_config(const gguf::File& f) {
  ModelConfig c;
  const std::string& path = f.path();
  c.arch = f.get_str("general.architecture");
  if (c.arch != "llama" && c.arch != "qwen2" && c.arch != "mistral")
    fail("{}: unsupported architecture '{}' (supported: llama, qwen2, mistral)", path, c.arch);
  c.name = f.get_str("general.name", "");
  const std::string p = c.arch + ".";

  auto positive = [&](const std::string& key, int64_t v) {
    if (v <= 0 || v > (int64_t{1} << 24)) fail("{}: {} = {} is out of range", path, key, v);
    return static_cast<int>(v);
  };
  auto per_layer_scalar = [&](const std::string& key) {
    const gguf::Value* v = f.find(key);
    if (v && v->type == gguf::ValueType::ARRAY)
      fail("{}: per-layer arrays for '{}' are not supported", path, key);
  };
  per_layer_scalar(p + "attention.head_count");
  per_layer_scalar(p + "attention.head_count_kv");
  per_layer_scalar(p + "feed_forward_length");

  c.n_embd = positive(p + "embedding_length", f.get_int(p + "embedding_length"));
  c.n_layer = positive(p + "block_count", f.get_int(p + "block_count"));
  c.n_ff = positive(p + "feed_forward_length", f.get_int(p + "feed_forward_length"));
  c.n_head = positive(p + "attention.head_count", f.get_int(p + "attention.head_count"));
  c.n_head_kv = positive(p + "attention.head_count_kv", f.get_int(p + "attention.head_count_kv", c.n_head));
  c.n_ctx_train = positive(p + "context_length", f.get_int(p + "context_length", 2048));
  if (c.n_head % c.n_head_kv != 0)
    fail("{}: head_count {} is not a multiple of head_count_kv {}", path, c.n_head, c.n_head_kv);
  if (c.n_embd % c.n_head != 0 && !f.has(p + "attention.key_length"))
    fail("{}: embedding_length {} is not a multiple of head_count {}", path, c.n_embd, c.n_head);
  c.head_dim = positive(p + "attention.key_length", f.get_int(p + "attention.key_length", c.n_embd / c.n_head));
  int vdim = positive(p + "attention.value_length", f.get_int(p + "attention.value_length", c.head_dim));
  if (vdim != c.head_dim) fail("{}: key_length {} != value_length {} is not supported", path, c.head_dim, vdim);
  if (c.head_dim % 2 != 0) fail("{}: head dimension {} must be even", path, c.head_dim);
  c.rms_eps = static_cast<float>(f.get_float(p + "attention.layer_norm_rms_epsilon", 1e-5));
  if (!(c.rms_eps > 0 && c.rms_eps < 1)) fail("{}: rms epsilon {} out of range", path, c.rms_eps);
  c.rope_theta = static_cast<float>(f.get_float(p + "rope.freq_base", 10000.0));
  if (!(c.rope_theta > 1)) fail("{}: rope.freq_base {} out of range", path, c.rope_theta);
  c.n_rot = positive(p + "rope.dimension_count", f.get_int(p + "rope.dimension_count", c.head_dim));
  if (c.n_rot != c.head_dim) fail("{}: partial RoPE (dimension_count {} < head dim {}) is not supported", path, c.n_rot, c.head_dim);
  c.rope_neox = c.arch == "qwen2";

  std::string scaling = f.get_str(p + "rope.scaling.type", "none");
  double factor = f.get_float(p + "rope.scaling.factor", 0.0);
  if (scaling == "none" && f.has(p + "rope.scale_linear")) {  // older key
    scaling = "linear";
    factor = f.get_float(p + "rope.scale_linear");
  }
  if (scaling == "none" || (scaling == "linear" && factor == 1.0)) {
    c.rope_scaling = RopeScaling::None;
  } else if (scaling == "linear") {
    if (!(factor > 0)) fail("{}: linear RoPE scaling factor {} must be > 0", path, factor);
    c.rope_scaling = RopeScaling::Linear;
    c.rope_scale_factor = static_cast<float>(factor);
  } else if (scaling == "llama3") {
    c.rope_scaling = RopeScaling::Llama3;  // applied through rope_freqs.weight
  } else if (scaling == "yarn" || scaling == "longrope") {
    fail("{}: RoPE scaling '{}' is recognised but not supported yet", path, scaling);
  } else {
    fail("{}: unknown RoPE scaling type '{}'", path, scaling);
  }
  c.has_rope_freqs = f.find_tensor("rope_freqs.weight") != nullptr;
  if (c.rope_scaling == RopeScaling::Llama3 && !c.has_rope_freqs)
    fail("{}: llama3 RoPE scaling needs the rope_freqs.weight tensor, which is missing", path);

  const gguf::Tensor& emb = f.tensor("token_embd.weight");
  if (emb.n_dims != 2 || emb.ne[0] != c.n_embd)
    fail("{}: token_embd.weight has shape {}, expected [{}, vocab]", path, emb.shape_string(), c.n_embd);
  c.n_vocab = static_cast<int>(emb.ne[1]);
  if (f.has(p + "vocab_size")) {
    int64_t vs = f.get_int(p + "vocab_size");
    if (vs != c.n_vocab) fail("{}: {}vocab_size {} != token_embd rows {}", path, p, vs, c.n_vocab);
  }
  c.tied_output = f.find_tensor("output.weight") == nullptr;
  c.attn_bias = f.find_tensor("blk.0.attn_q.bias") != nullptr;
  return c;
}

}  // namespace headroom
