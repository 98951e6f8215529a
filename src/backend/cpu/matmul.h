// CPU backend: y[n][rows] = x[n][cols] · Wᵀ for every supported weight type.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "backend/backend.h"
#include "backend/cpu/simd.h"
#include "backend/cpu/thread_pool.h"

namespace headroom::cpu {

// Buffers reused across calls (one backend = one caller thread at a time).
struct MatmulScratch {
  AlignedBuf acts;                 // activations quantized to Q8_0 (Q8_0 weights)
  std::vector<AlignedBuf> thread;  // per-thread weight panels
  // Within matmul_shared: `acts` holds these activations (x, n rows of k) already quantized.
  const float* acts_x = nullptr;
  int64_t acts_n = -1, acts_k = -1;
};

// Throws headroom::Error for unsupported types or inconsistent shapes.
void matmul(ThreadPool& pool, MatmulScratch& scratch, const WeightView& w, const float* x, int64_t n, float* y);
// ys[i] = x · ws[i]ᵀ for weights sharing one input (q/k/v; gate/up): Q8_0 weights of one width quantize x once
// between them. The same bits as separate matmul calls.
void matmul_shared(ThreadPool& pool, MatmulScratch& scratch, std::span<const WeightView* const> ws,
                   std::span<float* const> ys, const float* x, int64_t n);

// Row stride of a weight (w.row_bytes, or the dense size if it is 0); validates type, shape and data.
size_t weight_row_stride(const WeightView& w, const char* op);

}  // namespace headroom::cpu
