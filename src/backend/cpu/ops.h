// CPU backend: element-wise and per-row ops (rmsnorm, rope, swiglu, add, add_bias).
#pragma once

#include <cstdint>
#include <vector>

#include "backend/backend.h"
#include "backend/cpu/thread_pool.h"

namespace headroom::cpu {

void rmsnorm(ThreadPool& pool, const float* x, const float* weight, int64_t n, int64_t dim, float eps, float* out);
void swiglu(ThreadPool& pool, const float* gate, const float* up, int64_t count, float* out);
void add(ThreadPool& pool, float* x, const float* y, int64_t count);
void add_bias(ThreadPool& pool, float* x, const float* b, int64_t n, int64_t dim);

// RoPE with a cache of the cos/sin tables of the last call's positions and parameters: a forward pass
// rotates q and k of every layer with the same positions, so the tables are computed once per pass.
class Rope {
 public:
  void apply(ThreadPool& pool, float* x, int64_t n, int64_t n_heads, int64_t head_dim, const int32_t* pos,
             const RopeParams& p);

 private:
  bool cache_matches(int64_t n, const int32_t* pos, const RopeParams& p) const;
  // Key of the cached tables.
  std::vector<int32_t> pos_;
  std::vector<float> freq_factors_;
  bool has_ff_ = false;
  int n_rot_ = 0;
  float theta_base_ = 0, freq_scale_ = 0;
  bool valid_ = false;
  // cos_[r * n_rot/2 + i], sin_[...] for row r and pair i.
  std::vector<float> cos_, sin_;
};

}  // namespace headroom::cpu
