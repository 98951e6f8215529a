// EngineStack: what a command needs to run sequences — the per-sequence KV setup, the pool they share, the
// runner and the engine loop — built in one place for run, eval, profile and bench (and the server).
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "engine/engine.h"
#include "engine/kv_setup.h"

namespace headroom {

struct EngineStack {
  // kv_pool: --kv-pool ("" = what memory allows). The runner holds chunk + parallel rows per step.
  EngineStack(const Model& m, Backend& be, KVSetup setup, int parallel, int chunk, const std::string& kv_pool = "",
              AttentionObserver* observer = nullptr);
  // A request with this setup's per-head policies and per-sequence budget.
  Request request(std::vector<int32_t> prompt) const;

  KVSetup setup;
  PoolPlan pool_plan;
  std::unique_ptr<PagePool> pool;
  std::unique_ptr<Runner> runner;
  std::unique_ptr<Engine> engine;
};

}  // namespace headroom
