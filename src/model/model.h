// Model: a loaded GGUF model — config, tokenizer and weights (views into the mmapped file) — and Runner, the
// forward pass over a Backend (implemented in llama.cpp, which reads top to bottom).
#pragma once

#include <memory>
#include <span>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "gguf/gguf.h"
#include "kv/head_map.h"
#include "kv/kv_cache.h"
#include "model/config.h"
#include "tokenizer/tokenizer.h"

namespace headroom {

struct LayerWeights {
  const float* attn_norm = nullptr;
  WeightView wq, wk, wv, wo;
  const float* bq = nullptr;  // qwen2 biases, else null
  const float* bk = nullptr;
  const float* bv = nullptr;
  const float* ffn_norm = nullptr;
  WeightView gate, up, down;
};

class Model {
 public:
  // Loads and validates everything; throws a one-line Error for anything missing or unsupported.
  static std::unique_ptr<Model> load(const std::string& path);

  const ModelConfig& config() const { return cfg_; }
  const Tokenizer& tokenizer() const { return *tok_; }
  const gguf::File& file() const { return *file_; }
  ModelIdentity identity() const { return ModelIdentity::of(cfg_, *file_); }
  int64_t n_params() const;
  int64_t weight_bytes() const;

  WeightView tok_embd, output;
  const float* output_norm = nullptr;
  const float* rope_freqs = nullptr;
  std::vector<LayerWeights> layers;

 private:
  const float* f32_vector(const std::string& name, int64_t n);
  std::unique_ptr<gguf::File> file_;
  ModelConfig cfg_;
  std::unique_ptr<Tokenizer> tok_;
  std::vector<std::vector<float>> owned_;  // small tensors converted to F32
};

// Lets the head profiler see every layer's attention inputs. The runner reads them back from the backend for
// it (a synchronisation per layer: inspection only). q has n rows of n_head*head_dim floats (RoPE applied),
// and kv already holds this step's keys and values.
class AttentionObserver {
 public:
  virtual ~AttentionObserver() = default;
  virtual void on_attention(int layer, int n, const int32_t* pos, const float* q, KVCache& kv) = 0;
  // Called after attention with the output rows (n rows of n_head*head_dim).
  virtual void on_attention_out(int layer, int n, const float* out) {}
};

// The forward pass for one model on one backend. Activations, the step's tables and the logits live in
// backend memory; per step the runner uploads the token ids, positions, slot mapping, jobs and page ids
// once, runs every layer, and downloads the logits (the step's one synchronisation).
class Runner {
 public:
  Runner(const Model& m, Backend& be, int max_batch = 512);
  // Feeds tokens at positions pos0, pos0+1, ... of the sequence whose cache is kv (in chunks of max_batch).
  // Returns the logits of the last token, or of every token if all_logits (n * n_vocab floats).
  std::span<const float> forward(KVCache& kv, std::span<const int32_t> tokens, int32_t pos0, bool all_logits = false,
                                 AttentionObserver* obs = nullptr);
  int max_batch() const { return max_batch_; }
  Backend& backend() { return be_; }

 private:
  void step(KVCache& kv, const int32_t* tokens, const StepInfo& s, float* logits_out, bool all_logits,
            AttentionObserver* obs);
  const Model& m_;
  Backend& be_;
  int max_batch_;
  RopeParams rope_;
  std::vector<LayerWeights> w_;  // the backend's copies of the weights
  WeightView tok_embd_, output_;
  const float* output_norm_ = nullptr;
  DeviceArray<float> x_, xn_, q_, k_, v_, att_, gate_, up_, logits_dev_;
  DeviceArray<int32_t> tokens_dev_, pos_dev_, slots_dev_, page_ids_dev_;
  DeviceArray<AttnJob> jobs_dev_;
  KVStep step_;
  std::vector<AttnJob> jobs_host_;
  std::vector<size_t> layer_job0_;
  std::vector<int32_t> pos_;
  std::vector<float> logits_, q_host_, att_host_;
};

}  // namespace headroom
