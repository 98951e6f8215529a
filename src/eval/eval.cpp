#include "eval/eval.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <map>
#include <numeric>
#include <random>

#include "engine/sampler.h"
#include "engine/stack.h"
#include "profile/summary.h"
#include "util/error.h"

namespace headroom::eval {

namespace {

profile::Scores scores_of(const HeadMap& map) {
  profile::Scores s;
  s.n_layer = map.n_layer();
  s.n_head_kv = map.n_head_kv();
  for (const HeadEntry& e : map.heads) {
    if (e.retrieval_score < 0 || e.streaming_error < 0)
      fail("the head map has no profile scores; make it with `headroom profile`");
    s.retrieval.push_back(e.retrieval_score);
    s.streaming_error.push_back(e.streaming_error);
    s.query_error.push_back(std::max(0.0, e.query_error));
    if (e.ablation >= 0) s.ablation.push_back(e.ablation);
    if (e.gain >= 0) s.gain.push_back(e.gain);
  }
  return s;
}

profile::Options profile_options_of(const HeadMap& map, const Options& o) {
  profile::Options po;
  po.page_size = o.page_size;
  po.chunk = o.chunk;
  if (map.profile_window > 0) {
    po.sinks = map.profile_sinks;
    po.window = map.profile_window;
    po.prefill = map.profile_prefill;
  }
  return po;
}

double percent_of(const std::string& budget) {
  KVBudget b = KVBudget::parse(budget);
  if (b.kind != KVBudget::Kind::Percent) fail("profile/random configurations take a budget in percent, got '{}'", budget);
  return b.value / 100.0;
}

uint64_t episode_seed(uint64_t seed, Task t, int ctx, double depth, int sample) {
  uint64_t h = seed * 1000003ull;
  h = (h ^ uint64_t(t)) * 1099511628211ull;
  h = (h ^ uint64_t(ctx)) * 1099511628211ull;
  h = (h ^ uint64_t(std::llround(depth * 1000))) * 1099511628211ull;
  return (h ^ uint64_t(sample)) * 1099511628211ull;
}

}  // namespace

std::vector<EpisodeResult> run(const Model& m, Backend& be, const TaskGen& gen, const Options& o, const Progress& progress) {
  return run(m, std::vector<Backend*>{&be}, gen, o, progress);
}

std::vector<EpisodeResult> run(const Model& m, const std::vector<Backend*>& ranks, const TaskGen& gen, const Options& o,
                               const Progress& progress) {
  const Tokenizer& tok = m.tokenizer();
  std::unique_ptr<HeadMap> map;
  for (const Config& cfg : o.configs)
    if ((cfg.kind == "profile" || cfg.kind == "random" || cfg.kind == "map") && !map) {
      if (o.head_map.empty()) fail("the '{}' configuration needs --head-map (from `headroom profile`)", cfg.kind);
      ModelIdentity id = m.identity();
      map = std::make_unique<HeadMap>(HeadMap::load(o.head_map, &id));
    }
  KVOptions kvo;
  kvo.page_size = o.page_size;
  kvo.chunk = o.chunk;
  kvo.prefill = o.prefill;
  kvo.kv_type = o.kv_type;

  // Per (config, ctx): the per-head specs.
  std::map<std::pair<std::string, int>, KVSetup> setups;
  for (const Config& cfg : o.configs)
    for (int ctx : o.ctxs) {
      KVSetup s;
      if (cfg.kind == "map") {
        s = plan_kv_specs(m, map->specs(), kvo, ctx, "head map " + o.head_map);
      } else if (cfg.kind == "profile" || cfg.kind == "random") {
        profile::Scores sc = scores_of(*map);
        profile::Options po = profile_options_of(*map, o);
        HeadMap hm = profile::assign(m.identity(), sc, percent_of(cfg.budget), ctx, po);
        if (cfg.kind == "random") {
          std::vector<int> order(sc.retrieval.size());
          std::iota(order.begin(), order.end(), 0);
          std::mt19937_64 rng(o.seed * 31 + 17);
          std::shuffle(order.begin(), order.end(), rng);
          hm = profile::assign(m.identity(), sc, percent_of(cfg.budget), ctx, po, &order);
        }
        s = plan_kv_specs(m, hm.specs(), kvo, ctx, cfg.label() + ": " + hm.note);
      } else {
        KVOptions k = kvo;
        k.policy = cfg.kind;
        k.budget = cfg.budget;
        s = plan_kv(m, k, ctx);
      }
      setups[{cfg.label(), ctx}] = std::move(s);
    }

  // The episodes, in report order (task, ctx, depth, sample), each run under every configuration.
  struct Prompt {
    Episode e;
    std::vector<int32_t> ids;
    Task task;
    int ctx, sample;
    double depth;
  };
  std::vector<Prompt> prompts;
  for (Task task : o.tasks)
    for (int ctx : o.ctxs)
      for (double depth : o.depths)
        for (int sample = 0; sample < o.samples; ++sample) {
          Episode e = gen.make(task, ctx, depth, episode_seed(o.seed, task, ctx, depth, sample), o.answer_tokens + 2);
          std::vector<int32_t> ids = tok.encode(e.prompt, tok.add_bos());
          prompts.push_back({std::move(e), std::move(ids), task, ctx, sample, depth});
        }
  const size_t n_cfg = o.configs.size();
  const int total = int(prompts.size() * n_cfg);
  int done = 0;
  std::vector<EpisodeResult> out(prompts.size() * n_cfg);

  // Per (config, ctx): one engine runs that configuration's episodes, --parallel at a time. A sequence's
  // tokens do not depend on what runs beside it, so every result is the one it would be alone.
  size_t p0 = 0;
  for (size_t ti = 0; ti < o.tasks.size(); ++ti)
    for (int ctx : o.ctxs) {
      const size_t n_here = o.depths.size() * size_t(o.samples);
      for (size_t ci = 0; ci < n_cfg; ++ci) {
        const Config& cfg = o.configs[ci];
        EngineStack st(m, ranks, setups.at({cfg.label(), ctx}), std::max(1, o.parallel), o.chunk);
        Engine& engine = *st.engine;
        engine.on_finish = [&](Sequence& s) {
          const size_t pi = size_t(s.req.tag);
          const Prompt& pr = prompts[pi];
          EpisodeResult& r = out[pi * n_cfg + ci];
          r = EpisodeResult{pr.task, pr.ctx, pr.depth, pr.sample, cfg.label(), false, "", pr.e.expected,
                            int(pr.ids.size()), 0, 0, 0, 0, 0, 0};
          if (s.finish == FinishReason::Budget || s.finish == FinishReason::Pool) {
            r.answer = "[" + s.finish_detail + "]";
          } else {
            r.answer = tok.decode(std::span<const int32_t>(s.tokens).subspan(size_t(s.n_prompt)), false,
                                  /*continuation=*/true);
          }
          r.correct = score(pr.e, r.answer);
          const int64_t page = st.pool->page_bytes();
          r.kv_device_bytes = s.kv->device_bytes();
          r.kv_peak_bytes = s.kv->peak_device_pages() * page;
          r.kv_host_bytes = s.kv->host_bytes();
          r.kv_host_peak_bytes = s.kv->peak_host_pages() * page;
          r.kv_meta_bytes = s.kv->device_meta_bytes();
          r.seconds = s.t_finished - s.t_started;
          if (progress) progress(++done, total, r);
        };
        for (size_t pi = p0; pi < p0 + n_here; ++pi) {
          Request q = st.request(prompts[pi].ids);
          q.sampling.temp = 0;  // greedy
          q.n_predict = o.answer_tokens;
          q.tag = int64_t(pi);
          engine.add(std::move(q));
        }
        engine.run();
      }
      p0 += n_here;
    }
  return out;
}

}  // namespace headroom::eval
