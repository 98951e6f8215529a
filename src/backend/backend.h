// The op interface every backend implements (CPU now, CUDA next). The model (src/model/llama.cpp) is
// written once against Backend&; tests/test_backend_ops.cpp checks every op of every backend against the
// CPU reference on random inputs.
//
// Conventions: activations are float32, row-major, one row per token. A weight matrix W has `rows` output
// features and `cols` input features and is stored row-major in its file type (ggml layout: ne[0] = cols).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>

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

// One page of one (layer, KV head)'s cache as the attention kernel sees it: `n_slots` token slots of K and V
// rows (head_dim floats each, slot-major), and the absolute position of each slot's token (-1 = empty or
// evicted). If `score_acc` is non-null the kernel adds, per slot, the attention probability summed over the
// query heads and query rows of the job (used by the `evict` policy).
struct AttnPage {
  const float* k = nullptr;
  const float* v = nullptr;
  const int32_t* pos = nullptr;
  float* score_acc = nullptr;
  int n_slots = 0;
};

// Attention of the query heads [head0, head0 + n_group) that share one KV head, over the given pages.
// Query row r (position q_pos[r]) attends slot s iff pos[s] >= 0 && pos[s] <= q_pos[r] && the rule allows it:
// window == 0 means no restriction; otherwise pos[s] < sinks || pos[s] > q_pos[r] - window.
// The result is exact softmax attention over exactly those slots (a row with no allowed slot gets zeros).
struct AttnJob {
  int n_rows = 0;
  const float* q = nullptr;      // q + r*q_stride + h*head_dim is query head h of row r (RoPE applied)
  int64_t q_stride = 0;
  const int32_t* q_pos = nullptr;
  int head0 = 0;
  int n_group = 1;
  int head_dim = 0;
  float scale = 1.0f;
  int32_t sinks = 0;
  int32_t window = 0;
  std::span<const AttnPage> pages;
  float* out = nullptr;          // out + r*out_stride + h*head_dim
  int64_t out_stride = 0;
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
  // Runs every job (typically all KV heads of one layer); jobs write disjoint outputs.
  virtual void attention(std::span<const AttnJob> jobs) = 0;
};

// threads <= 0: one per physical core.
std::unique_ptr<Backend> make_cpu_backend(int threads);

// Dequantizes one row of a weight to float (reference path; used by tests and slow paths).
void dequantize_row(DType type, const void* src, float* dst, int64_t n);
// Bytes of one stored row of n elements (n must be a multiple of the block size).
size_t row_bytes(DType type, int64_t n);

}  // namespace headroom
