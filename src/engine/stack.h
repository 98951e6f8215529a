// EngineStack: what a command needs to run sequences — the per-sequence KV setup, the pool they share, the
// runner and the engine loop — built in one place for run, eval, profile and bench (and the server).
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "engine/engine.h"
#include "engine/kv_setup.h"
#include "kv/placement.h"

namespace headroom {

struct EngineStack {
  // kv_pool: --kv-pool ("" = what memory allows). The runner holds chunk + parallel rows per step.
  EngineStack(const Model& m, Backend& be, KVSetup setup, int parallel, int chunk, const std::string& kv_pool = "",
              AttentionObserver* observer = nullptr);
  // Tensor parallel over `ranks` (one backend per rank; docs/tensor-parallel.md): the KV heads placed by
  // place_heads (by their bytes when the setup's specs are per head), the pool split by rank in proportion.
  // Throws Error (one line) for a rank count the model does not allow.
  EngineStack(const Model& m, const std::vector<Backend*>& ranks, KVSetup setup, int parallel, int chunk,
              const std::string& kv_pool = "", AttentionObserver* observer = nullptr);
  // A request with this setup's per-head policies and per-sequence budget.
  Request request(std::vector<int32_t> prompt) const;

  KVSetup setup;
  PoolPlan pool_plan;
  TPPlan tp;                      // world 1: no tensor parallelism
  std::vector<int32_t> tp_device_pages;  // [rank]: its part of the pool's device tier
  std::unique_ptr<PagePool> pool;
  std::unique_ptr<Runner> runner;
  std::unique_ptr<Engine> engine;
};

}  // namespace headroom
