// Model loading: tensor lookup and shape checks. The forward pass itself is in llama.cpp.
#include "model/model.h"

#include "util/error.h"

namespace headroom {

namespace {
bool matmul_type_supported(DType t) {
  switch (t) {
    case DType::F32: case DType::F16: case DType::BF16: case DType::Q8_0: case DType::Q4_0: case DType::Q4_K:
    case DType::Q6_K: return true;
    default: return false;
  }
}

WeightView weight(const gguf::File& f, const std::string& name, int64_t cols, int64_t rows) {
  const gguf::Tensor& t = f.tensor(name);
  if (t.n_dims != 2 || t.ne[0] != cols || t.ne[1] != rows)
    fail("{}: tensor '{}' has shape {}, expected [{}, {}]", f.path(), name, t.shape_string(), cols, rows);
  if (!matmul_type_supported(t.type))
    fail("{}: tensor '{}' has type {}, which headroom does not support yet (f32, f16, bf16, q8_0, q4_0, q4_K, q6_K)",
         f.path(), name, gguf::type_name(t.type));
  WeightView w;
  w.type = t.type;
  w.data = t.data;
  w.rows = rows;
  w.cols = cols;
  w.row_bytes = row_bytes(t.type, cols);
  return w;
}
}  // namespace

const float* Model::f32_vector(const std::string& name, int64_t n) {
  const gguf::Tensor& t = file_->tensor(name);
  if (t.n_elements() != n || t.ne[0] != n)
    fail("{}: tensor '{}' has shape {}, expected [{}]", file_->path(), name, t.shape_string(), n);
  if (t.type == DType::F32 && reinterpret_cast<uintptr_t>(t.data) % alignof(float) == 0)
    return reinterpret_cast<const float*>(t.data);
  if (t.type != DType::F32 && t.type != DType::F16 && t.type != DType::BF16)
    fail("{}: tensor '{}' has type {}; expected f32, f16 or bf16", file_->path(), name, gguf::type_name(t.type));
  owned_.emplace_back(n);
  dequantize_row(t.type, t.data, owned_.back().data(), n);
  return owned_.back().data();
}

std::unique_ptr<Model> Model::load(const std::string& path) {
  std::unique_ptr<Model> m(new Model());
  m->file_ = gguf::File::open(path);
  const gguf::File& f = *m->file_;
  m->cfg_ = load_config(f);
  const ModelConfig& c = m->cfg_;
  m->tok_ = Tokenizer::from_gguf(f);
  if (m->tok_->n_vocab() != c.n_vocab)
    fail("{}: tokenizer has {} tokens but token_embd has {} rows", path, m->tok_->n_vocab(), c.n_vocab);

  const int64_t q_dim = int64_t(c.n_head) * c.head_dim, kv_dim = c.kv_dim();
  m->tok_embd = weight(f, "token_embd.weight", c.n_embd, c.n_vocab);
  m->output = c.tied_output ? m->tok_embd : weight(f, "output.weight", c.n_embd, c.n_vocab);
  m->output_norm = m->f32_vector("output_norm.weight", c.n_embd);
  if (c.has_rope_freqs) m->rope_freqs = m->f32_vector("rope_freqs.weight", c.head_dim / 2);
  for (int l = 0; l < c.n_layer; ++l) {
    const std::string b = "blk." + std::to_string(l) + ".";
    LayerWeights L;
    L.attn_norm = m->f32_vector(b + "attn_norm.weight", c.n_embd);
    L.wq = weight(f, b + "attn_q.weight", c.n_embd, q_dim);
    L.wk = weight(f, b + "attn_k.weight", c.n_embd, kv_dim);
    L.wv = weight(f, b + "attn_v.weight", c.n_embd, kv_dim);
    L.wo = weight(f, b + "attn_output.weight", q_dim, c.n_embd);
    if (c.attn_bias) {
      L.bq = m->f32_vector(b + "attn_q.bias", q_dim);
      L.bk = m->f32_vector(b + "attn_k.bias", kv_dim);
      L.bv = m->f32_vector(b + "attn_v.bias", kv_dim);
    }
    L.ffn_norm = m->f32_vector(b + "ffn_norm.weight", c.n_embd);
    L.gate = weight(f, b + "ffn_gate.weight", c.n_embd, c.n_ff);
    L.up = weight(f, b + "ffn_up.weight", c.n_embd, c.n_ff);
    L.down = weight(f, b + "ffn_down.weight", c.n_ff, c.n_embd);
    m->layers.push_back(L);
  }
  return m;
}

int64_t Model::n_params() const {
  int64_t n = 0;
  for (const gguf::Tensor& t : file_->tensors()) n += t.n_elements();
  return n;
}

int64_t Model::weight_bytes() const {
  int64_t n = 0;
  for (const gguf::Tensor& t : file_->tensors()) n += int64_t(t.n_bytes);
  return n;
}

}  // namespace headroom
