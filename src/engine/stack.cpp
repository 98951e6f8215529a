#include "engine/stack.h"

namespace headroom {

EngineStack::EngineStack(const Model& m, Backend& be, KVSetup s, int parallel, int chunk, const std::string& kv_pool,
                         AttentionObserver* observer)
    : EngineStack(m, std::vector<Backend*>{&be}, std::move(s), parallel, chunk, kv_pool, observer) {}

EngineStack::EngineStack(const Model& m, const std::vector<Backend*>& ranks, KVSetup s, int parallel, int chunk,
                         const std::string& kv_pool, AttentionObserver* observer)
    : setup(std::move(s)) {
  const ModelConfig& c = m.config();
  const int R = int(ranks.size());
  pool_plan = plan_pool(setup, parallel, kv_pool, ranks[0]->free_memory());
  if (R == 1) {
    pool = std::make_unique<PagePool>(*ranks[0], pool_plan.layout);
    runner = std::make_unique<Runner>(m, *ranks[0], chunk + parallel);
    tp_device_pages = {pool_plan.layout.device_pages};
  } else {
    const KVLayout& l = pool_plan.layout;
    tp = place_heads(c, setup.specs, R, setup.per_head, setup.n_ctx > 0 ? setup.n_ctx : c.n_ctx_train, l.page_size,
                     chunk, kv_row_bytes(l.type, l.head_dim));
    std::vector<int32_t> host;
    split_pool_pages(tp, setup.specs, setup.n_ctx > 0 ? setup.n_ctx : c.n_ctx_train, l.page_size, chunk,
                     l.device_pages, l.host_pages, tp_device_pages, host);
    KVLayout split = l;
    split.device_pages = split.host_pages = 0;
    for (int r = 0; r < R; ++r) {
      split.device_pages += tp_device_pages[size_t(r)];
      split.host_pages += host[size_t(r)];
    }
    pool_plan.layout = split;
    pool = std::make_unique<PagePool>(ranks, split, tp.rank_of, tp_device_pages, host);
    runner = std::make_unique<Runner>(m, ranks, tp, chunk + parallel);
  }
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
