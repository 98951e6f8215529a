// ModelConfig: the hyper-parameters of a Llama-family model, read from GGUF metadata.
#pragma once

#include "backend/kv_layout.h"

#include <cstdint>
#include <string>

#include "gguf/gguf.h"

namespace headroom {

enum class RopeScaling { None, Linear, Llama3 };

struct ModelConfig {
  std::string arch;          // "llama", "qwen2", "mistral"
  std::string name;          // general.name (may be empty)
  int n_layer = 0;
  int n_embd = 0;
  int n_head = 0;
  int n_head_kv = 0;
  int head_dim = 0;
  int n_ff = 0;
  int n_vocab = 0;
  int n_ctx_train = 0;
  float rms_eps = 1e-5f;
  float rope_theta = 10000.0f;
  int n_rot = 0;
  bool rope_neox = false;    // qwen2: NEOX pairing; llama/mistral: adjacent pairs
  RopeScaling rope_scaling = RopeScaling::None;
  float rope_scale_factor = 1.0f;     // linear: positions divided by this
  bool has_rope_freqs = false;        // Llama-3.1 frequency factors tensor present
  bool tied_output = false;
  bool attn_bias = false;             // q/k/v biases (qwen2)

  int n_group() const { return n_head / n_head_kv; }
  int64_t kv_dim() const { return int64_t(n_head_kv) * head_dim; }
  // Bytes of K+V for one token across all layers and KV heads in the stored type (llama.cpp's figure).
  int64_t kv_bytes_per_token(KVType t) const { return 2LL * n_layer * n_head_kv * kv_row_bytes(t, head_dim); }
};

// Reads and validates the config; throws a one-line Error naming the file and the problem for anything
// missing, inconsistent or unsupported (e.g. yarn RoPE scaling, unknown architecture).
ModelConfig load_config(const gguf::File& f);

}  // namespace headroom
