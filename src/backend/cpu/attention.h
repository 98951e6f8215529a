// CPU backend: paged softmax attention (see AttnJob in backend/backend.h for the exact rule).
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "backend/backend.h"
#include "backend/cpu/simd.h"
#include "backend/cpu/thread_pool.h"

namespace headroom::cpu {

// The kernel's view of one page: n_slots rows of K and V in the kernel's KV type (row_bytes apart), their
// positions and, if the job accumulates scores, the page's slot scores.
struct KernelPage {
  const uint8_t* k = nullptr;
  const uint8_t* v = nullptr;
  const int32_t* pos = nullptr;
  float* score = nullptr;  // null: no score accumulation for this page
  int n_slots = 0;
};

// One job as the kernel runs it (built from an AttnJob and the store by the backend).
struct KernelJob {
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
  std::span<const KernelPage> pages;
  float* out = nullptr;          // out + r*out_stride + h*head_dim
  int64_t out_stride = 0;
};

// Buffers reused across calls (one backend = one caller thread at a time).
struct AttnScratch {
  AlignedBuf partial;              // split-K partial states
  std::vector<float> final_ml;     // final (max, sum) per (job, row, head) for the score pass
  std::vector<AlignedBuf> thread;  // per-thread running states
};

// Every job's K/V rows are stored in `type` (kv_row_bytes(type, head_dim) bytes each).
void attention(ThreadPool& pool, AttnScratch& scratch, KVType type, std::span<const KernelJob> jobs);

}  // namespace headroom::cpu
