#include "eval/eval.h"

#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <numeric>
#include <random>
#include <set>

#include <nlohmann/json.hpp>

#include "engine/sampler.h"
#include "engine/stack.h"
#include "eval/plot.h"
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
  const ModelConfig& c = m.config();
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
        std::vector<PolicySpec> specs;
        for (const HeadEntry& e : map->heads) specs.push_back(e.spec);
        s = plan_kv_specs(m, specs, kvo, ctx, "head map " + o.head_map);
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
        std::vector<PolicySpec> specs;
        for (const HeadEntry& e : hm.heads) specs.push_back(e.spec);
        s = plan_kv_specs(m, specs, kvo, ctx, cfg.label() + ": " + hm.note);
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
  for (Task task : o.tasks)
    for (int ctx : o.ctxs) {
      const size_t n_here = o.depths.size() * size_t(o.samples);
      for (size_t ci = 0; ci < n_cfg; ++ci) {
        const Config& cfg = o.configs[ci];
        EngineStack st(m, be, setups.at({cfg.label(), ctx}), std::max(1, o.parallel), o.chunk);
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

std::string report(const Model& m, const Options& o, const std::vector<EpisodeResult>& rs) {
  using nlohmann::json;
  namespace fs = std::filesystem;
  if (!o.out_dir.empty()) fs::create_directories(o.out_dir);

  // Per (config, task, ctx): accuracy and mean KV bytes; full's bytes per ctx are the 100% reference.
  struct Agg { int n = 0, ok = 0; double dev = 0, peak = 0, host = 0, host_peak = 0, meta = 0; };
  std::map<std::tuple<std::string, std::string, int>, Agg> cell;
  std::map<std::tuple<std::string, int, double>, Agg> niah;  // (config, ctx, depth)
  std::map<std::pair<std::string, int>, Agg> by_cfg_ctx;      // trained tasks only, for the budget plot
  std::map<int, double> full_bytes;
  std::map<int, Agg> full_all;
  for (const EpisodeResult& r : rs) {
    auto add = [&](Agg& a) { a.n++; a.ok += r.correct; a.dev += double(r.kv_device_bytes); a.peak += double(r.kv_peak_bytes); a.host += double(r.kv_host_bytes); a.host_peak += double(r.kv_host_peak_bytes); a.meta += double(r.kv_meta_bytes); };
    add(cell[{r.config, task_name(r.task), r.ctx}]);
    if (r.task == Task::Passkey) add(niah[{r.config, r.ctx, r.depth}]);
    if (task_is_trained(r.task)) add(by_cfg_ctx[{r.config, r.ctx}]);
    if (r.config == "full") add(full_all[r.ctx]);
  }
  for (auto& [ctx, a] : full_all) full_bytes[ctx] = a.dev / a.n;
  // Full-cache bytes for a context, pages counted whole, if `full` was not among the configurations.
  const ModelConfig& c = m.config();
  std::map<int, int> prompt_tokens_at;  // a prompt length per context, for the computed full-cache size
  for (const EpisodeResult& r : rs) prompt_tokens_at.emplace(r.ctx, r.prompt_tokens);
  auto full_ref = [&](int ctx) {
    auto it = full_bytes.find(ctx);
    if (it != full_bytes.end()) return it->second;
    const int prompt_tokens = prompt_tokens_at[ctx];
    int64_t pages = (prompt_tokens + o.answer_tokens + o.page_size - 1) / o.page_size;
    KVLayout l;
    l.type = parse_kv_type(o.kv_type);
    l.page_size = o.page_size;
    l.head_dim = c.head_dim;
    return double(pages) * c.n_layer * c.n_head_kv * double(l.kv_page_bytes());
  };

  std::vector<std::string> cfg_order;
  for (const Config& cf : o.configs) cfg_order.push_back(cf.label());
  std::string md = fmt::format("KV type {} (bytes below are stored bytes; metadata is its own column)\n\n", o.kv_type) +
                   "| config | task | ctx | n | accuracy | KV held (MiB) | KV vs full | KV peak (MiB) | host tier (MiB) | host peak (MiB) | metadata (MiB) |\n"
                   "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n";
  std::ofstream csv;
  if (!o.out_dir.empty()) {
    csv.open(o.out_dir + "/results.csv");
    csv << "config,task,ctx,n,accuracy,kv_held_mib,kv_vs_full,kv_peak_mib,kv_host_mib,kv_host_peak_mib\n";
  }
  json summary = json::array();
  for (const std::string& cfg : cfg_order)
    for (Task t : o.tasks)
      for (int ctx : o.ctxs) {
        auto it = cell.find({cfg, task_name(t), ctx});
        if (it == cell.end()) continue;
        const Agg& a = it->second;
        double held = a.dev / a.n, ratio = held / full_ref(ctx);
        auto mib = [&a](double total) { return total / a.n / 1048576.0; };  // per-episode mean, MiB
        md += fmt::format("| {} | {}{} | {} | {} | {:.3f} | {:.2f} | {:.1f}% | {:.2f} | {:.2f} | {:.2f} | {:.3f} |\n", cfg,
                          task_name(t), task_is_trained(t) ? "" : " (untrained)", ctx, a.n, double(a.ok) / a.n,
                          mib(a.dev), 100 * ratio, mib(a.peak), mib(a.host), mib(a.host_peak), mib(a.meta));
        if (csv.is_open())
          csv << fmt::format("{},{},{},{},{:.4f},{:.4f},{:.4f},{:.4f},{:.4f},{:.4f}\n", cfg, task_name(t), ctx, a.n,
                             double(a.ok) / a.n, mib(a.dev), ratio, mib(a.peak), mib(a.host), mib(a.host_peak));
        summary.push_back({{"config", cfg}, {"task", task_name(t)}, {"trained", task_is_trained(t)}, {"ctx", ctx},
                           {"n", a.n}, {"accuracy", double(a.ok) / a.n}, {"kv_held_bytes", held},
                           {"kv_vs_full", ratio}, {"kv_peak_bytes", a.peak / a.n}, {"kv_host_bytes", a.host / a.n},
                           {"kv_host_peak_bytes", a.host_peak / a.n}, {"kv_meta_bytes", a.meta / a.n}});
      }
  // The headline: mean over the trained tasks, per config and ctx, relative to full.
  md += "\n| config | ctx | trained-task accuracy (mean of task means) | vs full | KV held vs full | device peak vs full | host peak vs full |\n"
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |\n";
  std::map<int, double> full_acc;
  auto mean_task_acc = [&](const std::string& cfg, int ctx) {
    double sum = 0;
    int n = 0;
    for (Task t : o.tasks) {
      if (!task_is_trained(t)) continue;
      auto it = cell.find({cfg, task_name(t), ctx});
      if (it == cell.end()) continue;
      sum += double(it->second.ok) / it->second.n;
      ++n;
    }
    return n ? sum / n : NAN;
  };
  for (int ctx : o.ctxs) full_acc[ctx] = mean_task_acc("full", ctx);
  std::map<std::string, plot::Series> budget_lines;
  for (const std::string& cfg : cfg_order)
    for (int ctx : o.ctxs) {
      double acc = mean_task_acc(cfg, ctx);
      if (std::isnan(acc)) continue;
      auto it = by_cfg_ctx.find({cfg, ctx});
      const bool have = it != by_cfg_ctx.end();
      double ratio = have ? it->second.dev / it->second.n / full_ref(ctx) : NAN;
      double peak = have ? it->second.peak / it->second.n / full_ref(ctx) : NAN;
      double host_peak = have ? it->second.host_peak / it->second.n / full_ref(ctx) : NAN;
      md += fmt::format("| {} | {} | {:.3f} | {} | {:.1f}% | {:.1f}% | {:.1f}% |\n", cfg, ctx, acc,
                        std::isnan(full_acc[ctx]) || full_acc[ctx] == 0 ? "n/a" : fmt::format("{:.1f}%", 100 * acc / full_acc[ctx]),
                        100 * ratio, 100 * peak, 100 * host_peak);
      if (ctx == o.ctxs.back()) {
        std::string kind = cfg.substr(0, cfg.find('@'));
        plot::Series& s = budget_lines[kind];
        s.name = kind;
        s.x.push_back(100 * ratio);
        s.y.push_back(acc);
      }
    }
  if (!o.out_dir.empty()) {
    json j;
    j["model"] = m.identity().arch + " " + m.config().name;
    j["summary"] = summary;
    json eps = json::array();
    for (const EpisodeResult& r : rs)
      eps.push_back({{"task", task_name(r.task)}, {"ctx", r.ctx}, {"depth", r.depth}, {"sample", r.sample},
                     {"config", r.config}, {"correct", r.correct}, {"answer", r.answer}, {"expected", r.expected},
                     {"prompt_tokens", r.prompt_tokens}, {"kv_device_bytes", r.kv_device_bytes},
                     {"kv_peak_bytes", r.kv_peak_bytes}, {"kv_host_bytes", r.kv_host_bytes},
                     {"kv_host_peak_bytes", r.kv_host_peak_bytes}, {"kv_meta_bytes", r.kv_meta_bytes},
                     {"seconds", r.seconds}});
    j["episodes"] = eps;
    std::ofstream(o.out_dir + "/results.json") << j.dump(1) << "\n";
    std::ofstream(o.out_dir + "/summary.md") << md;

    // NIAH heat map per config: depth (rows) x context (columns).
    bool has_niah = std::find(o.tasks.begin(), o.tasks.end(), Task::Passkey) != o.tasks.end();
    if (has_niah)
      for (const std::string& cfg : cfg_order) {
        plot::Heatmap h;
        h.title = "NIAH (passkey) accuracy: " + cfg;
        h.x_label = "context length (tokens)";
        h.y_label = "needle depth (%)";
        for (int ctx : o.ctxs) h.x_ticks.push_back(std::to_string(ctx));
        for (double d : o.depths) {
          h.y_ticks.push_back(fmt::format("{:.0f}", d * 100));
          std::vector<double> row;
          for (int ctx : o.ctxs) {
            auto it = niah.find({cfg, ctx, d});
            row.push_back(it == niah.end() ? NAN : double(it->second.ok) / it->second.n);
          }
          h.values.push_back(row);
        }
        std::string safe = cfg;
        for (char& ch : safe) if (ch == '%') ch = 'p'; else if (ch == '@') ch = '_';
        plot::heatmap(o.out_dir + "/niah_" + safe + ".png", h);
      }
    if (!budget_lines.empty()) {
      plot::LineChart lc;
      lc.title = fmt::format("Accuracy vs KV bytes (trained tasks, {} tokens)", o.ctxs.back());
      lc.x_label = "KV bytes held, % of full (measured from the page pool)";
      lc.y_label = "exact-match accuracy";
      for (auto& kv : budget_lines) {
        const plot::Series& s = kv.second;
        std::vector<size_t> idx(s.x.size());
        std::iota(idx.begin(), idx.end(), 0);
        std::sort(idx.begin(), idx.end(), [&](size_t a, size_t b) { return s.x[a] < s.x[b]; });
        plot::Series sorted{s.name, {}, {}};
        for (size_t i : idx) { sorted.x.push_back(s.x[i]); sorted.y.push_back(s.y[i]); }
        lc.series.push_back(sorted);
      }
      plot::line_chart(o.out_dir + "/accuracy_vs_budget.png", lc);
    }
  }
  return md;
}

}  // namespace headroom::eval
