// Model: a loaded GGUF model — config, tokenizer and weights (views into the mmapped file) — and Runner, the
// forward pass over a Backend (implemented in llama.cpp, which reads top to bottom).
#pragma once

#include <algorithm>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "gguf/gguf.h"
#include "kv/head_map.h"
#include "kv/kv_cache.h"
#include "model/config.h"
#include "util/workers.h"
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

// One sequence's rows in a step: a chunk of its prompt, or one decode token.
struct SeqRows {
  KVCache* kv = nullptr;
  std::span<const int32_t> tokens;
  int32_t pos0 = 0;          // position of tokens[0]
  bool prefill = false;      // rows of the prompt (false: one decode row)
  bool last_chunk = false;   // the prompt ends with these rows (ends the prefill for the policies)
  enum class Logits : uint8_t { None, Last, All } logits = Logits::Last;
  int logit_rows() const { return logits == Logits::None ? 0 : logits == Logits::Last ? 1 : int(tokens.size()); }
};

// The forward pass for one model on one backend. Activations, the step's tables and the logits live in
// backend memory; per step the runner uploads the token ids, positions, slot mapping, jobs and page ids
// once, runs every layer with the rows of all the step's sequences together (one matmul per weight, one
// attention call per layer), and downloads the logits (the step's one synchronisation).
//
// Every reduction of a row (matmul, norm, attention over its sequence's pages) is done in an order that does
// not depend on the other rows of the step, so a sequence's logits are bitwise the same alone or in a batch.
class Communicator;
struct TPPlan;

class Runner {
 public:
  // max_batch: the most rows a step may have (all sequences together).
  Runner(const Model& m, Backend& be, int max_batch = 512);
  // Tensor parallel (docs/tensor-parallel.md): rank r runs on ranks[r] with the weight slices of the KV heads
  // plan.rank_of gives it, the MLP columns and vocabulary rows of its share, and the part r of the sequences'
  // pool (which must be split by the same plan). The ranks are threads joined by the in-process communicator;
  // a step runs them together and gathers the logits. world = ranks.size() = plan.world.
  Runner(const Model& m, const std::vector<Backend*>& ranks, const TPPlan& plan, int max_batch = 512);
  ~Runner();
  // One step. Returns the logits rows the sequences asked for, in order (n_vocab floats each). Throws
  // BudgetExhausted, before anything is written, if a sequence's budget or the pool cannot take the rows.
  // An observer sees the attention of a step with one sequence only (and one rank).
  std::span<const float> step(std::span<const SeqRows> seqs, AttentionObserver* obs = nullptr);
  // Conveniences for one sequence: a whole prompt in chunks of max_batch (the last chunk ends the prefill;
  // logits of its last token, or of every token if all_logits), and one decode token.
  std::span<const float> prefill(KVCache& kv, std::span<const int32_t> tokens, int32_t pos0, bool all_logits = false,
                                 AttentionObserver* obs = nullptr);
  std::span<const float> decode(KVCache& kv, int32_t token, int32_t pos);
  int max_batch() const { return max_batch_; }
  // Decode steps whose shapes have been recorded as graphs (backends with graphs), for tests and reports.
  int recorded_graphs() const;
  Backend& backend();  // rank 0's
  const Model& model() const { return m_; }
  int world() const { return int(ranks_.size()); }
  // Bytes of the weight slices rank r multiplies with (its matmul weights and embedding rows).
  int64_t rank_weight_bytes(int r) const;

 private:
  struct Rank;
  struct RecordedStep {
    std::vector<int64_t> key;
    std::unique_ptr<StepGraph> graph;  // null: seen once, not recorded yet
  };
  static constexpr size_t kMaxGraphs = 16;
  Runner(const Model& m, const std::vector<Backend*>& ranks, const TPPlan* plan, int max_batch);
  // One rank's part of a step: its tables (its heads' jobs, pages and slots, in its store's ids), uploaded,
  // then the device work, then its logits (its vocabulary columns) downloaded to `logits`.
  void rank_step(Rank& rk, std::span<const SeqRows> seqs, int n, int n_logits, AttentionObserver* obs, float* logits);
  // The device part of a step (embedding to logits matmul), once the rank's tables are uploaded.
  void device_step(Rank& rk, std::span<const SeqRows> seqs, int n, int n_logits, AttentionObserver* obs);
  void upload_page_table(Rank& rk, const PagePool& pool);
  std::vector<int64_t> graph_key(const Rank& rk, std::span<const SeqRows> seqs, int n, int n_logits) const;

  const Model& m_;
  int max_batch_;
  std::vector<std::unique_ptr<Communicator>> comms_;
  std::unique_ptr<RankWorkers> workers_;  // the threads of ranks 1.. (several ranks)
  std::vector<std::unique_ptr<Rank>> ranks_;
  bool broken_ = false;  // a rank failed mid-step (its communicator left the group)
  KVStep step_;
  std::vector<StepInfo> infos_;
  std::vector<int32_t> tokens_, pos_;
  std::vector<float> logits_, prefill_logits_;
};

}  // namespace headroom
