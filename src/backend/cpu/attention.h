// CPU backend: paged softmax attention (see AttnJob in backend/backend.h for the exact rule).
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "backend/backend.h"
#include "backend/cpu/simd.h"
#include "backend/cpu/thread_pool.h"

namespace headroom::cpu {

// Buffers reused across calls (one backend = one caller thread at a time).
struct AttnScratch {
  AlignedBuf partial;              // split-K partial states
  std::vector<float> final_ml;     // final (max, sum) per (job, row, head) for the score pass
  std::vector<AlignedBuf> thread;  // per-thread running states
};

void attention(ThreadPool& pool, AttnScratch& scratch, std::span<const AttnJob> jobs);

}  // namespace headroom::cpu
