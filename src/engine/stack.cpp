#include "engine/stack.h"

namespace headroom {

EngineStack::EngineStack(const Model& m, Backend& be, KVSetup s, int parallel, int chunk, const std::string& kv_pool,
                         AttentionObserver* observer)
    : setup(std::move(s)) {
  pool_plan = plan_pool(setup, parallel, kv_pool, be.free_memory());
  pool = std::make_unique<PagePool>(be, pool_plan.layout);
  runner = std::make_unique<Runner>(m, be, chunk + parallel);
  EngineOptions eo;
  eo.parallel = parallel;
  eo.chunk = chunk;
  eo.observer = observer;
  engine = std::make_unique<Engine>(*runner, *pool, eo);
}

Request EngineStack::request(std::vector<int32_t> prompt) const {
  Request r;
  r.prompt = std::move(prompt);
  r.specs = &setup.specs;
  r.max_device_pages = setup.capacity_pages;
  return r;
}

}  // namespace headroom
