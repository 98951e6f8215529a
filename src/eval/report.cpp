#include "eval/report.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <numeric>
#include <tuple>

#include <fmt/format.h>

#include "eval/plot.h"

namespace headroom::eval {

namespace {

// Sums over a group of episodes.
struct Agg {
  int n = 0, ok = 0;
  double dev = 0, peak = 0, host = 0, host_peak = 0, meta = 0;
  void add(const EpisodeResult& r) {
    n++;
    ok += r.correct;
    dev += double(r.kv_device_bytes);
    peak += double(r.kv_peak_bytes);
    host += double(r.kv_host_bytes);
    host_peak += double(r.kv_host_peak_bytes);
    meta += double(r.kv_meta_bytes);
  }
  double accuracy() const { return double(ok) / n; }
  CellStats stats() const { return {n, ok, accuracy(), dev / n, peak / n, host / n, host_peak / n, meta / n}; }
};

constexpr double kMiB = 1048576.0;

}  // namespace

double computed_full_bytes(const ModelConfig& c, const Options& o, int prompt_tokens) {
  int64_t pages = (prompt_tokens + o.answer_tokens + o.page_size - 1) / o.page_size;
  KVLayout l;
  l.type = parse_kv_type(o.kv_type);
  l.page_size = o.page_size;
  l.head_dim = c.head_dim;
  return double(pages) * c.n_layer * c.n_head_kv * double(l.kv_page_bytes());
}

Tables aggregate(const ModelConfig& c, const Options& o, const std::vector<EpisodeResult>& rs) {
  Tables t;
  t.kv_type = o.kv_type;
  t.ctxs = o.ctxs;
  t.depths = o.depths;

  std::map<std::tuple<std::string, std::string, int>, Agg> cell;  // (config, task, ctx)
  std::map<std::tuple<std::string, int, double>, Agg> niah;       // (config, ctx, depth), passkey only
  std::map<std::pair<std::string, int>, Agg> trained;             // (config, ctx), trained tasks only
  std::map<int, Agg> full_all;                                    // `full`, every task, per ctx
  std::map<int, int> prompt_tokens_at;  // the first episode's prompt length per ctx, for the computed reference
  for (const EpisodeResult& r : rs) {
    cell[{r.config, task_name(r.task), r.ctx}].add(r);
    if (r.task == Task::Passkey) niah[{r.config, r.ctx, r.depth}].add(r);
    if (task_is_trained(r.task)) trained[{r.config, r.ctx}].add(r);
    if (r.config == "full") full_all[r.ctx].add(r);
    prompt_tokens_at.emplace(r.ctx, r.prompt_tokens);
  }
  for (const auto& [ctx, prompt_tokens] : prompt_tokens_at) {
    auto it = full_all.find(ctx);
    t.full_bytes[ctx] = it != full_all.end() ? it->second.dev / it->second.n : computed_full_bytes(c, o, prompt_tokens);
  }

  std::vector<std::string> cfg_order;
  for (const Config& cf : o.configs) cfg_order.push_back(cf.label());
  for (const std::string& cfg : cfg_order)
    for (Task task : o.tasks)
      for (int ctx : o.ctxs) {
        auto it = cell.find({cfg, task_name(task), ctx});
        if (it == cell.end()) continue;
        CellRow row{cfg, task, ctx, it->second.stats(), 0};
        row.kv_vs_full = row.s.kv_held / t.full_bytes.at(ctx);
        t.cells.push_back(row);
      }

  // The headline: mean over the trained tasks, per config and ctx, relative to full.
  auto mean_task_acc = [&](const std::string& cfg, int ctx) {
    double sum = 0;
    int n = 0;
    for (Task task : o.tasks) {
      if (!task_is_trained(task)) continue;
      auto it = cell.find({cfg, task_name(task), ctx});
      if (it == cell.end()) continue;
      sum += it->second.accuracy();
      ++n;
    }
    return n ? sum / n : NAN;
  };
  std::map<std::string, BudgetLine> lines;
  for (const std::string& cfg : cfg_order)
    for (int ctx : o.ctxs) {
      HeadlineRow h{cfg, ctx, mean_task_acc(cfg, ctx), mean_task_acc("full", ctx), NAN, NAN, NAN};
      if (std::isnan(h.accuracy)) continue;
      if (auto it = trained.find({cfg, ctx}); it != trained.end()) {
        const Agg& a = it->second;
        const double full = t.full_bytes.at(ctx);
        h.held_vs_full = a.dev / a.n / full;
        h.peak_vs_full = a.peak / a.n / full;
        h.host_peak_vs_full = a.host_peak / a.n / full;
      }
      t.headline.push_back(h);
      if (ctx == o.ctxs.back()) {
        const std::string kind = cfg.substr(0, cfg.find('@'));
        BudgetLine& l = lines[kind];
        l.kind = kind;
        l.kv_percent.push_back(100 * h.held_vs_full);
        l.accuracy.push_back(h.accuracy);
      }
    }
  for (auto& [kind, l] : lines) {
    std::vector<size_t> idx(l.kv_percent.size());
    std::iota(idx.begin(), idx.end(), 0);
    const std::vector<double>& kvp = l.kv_percent;  // (clang 14 cannot capture a structured binding)
    std::sort(idx.begin(), idx.end(), [&kvp](size_t a, size_t b) { return kvp[a] < kvp[b]; });
    BudgetLine sorted{kind, {}, {}};
    for (size_t i : idx) {
      sorted.kv_percent.push_back(l.kv_percent[i]);
      sorted.accuracy.push_back(l.accuracy[i]);
    }
    t.budget.push_back(sorted);
  }
  if (!o.ctxs.empty()) t.budget_ctx = o.ctxs.back();

  if (std::find(o.tasks.begin(), o.tasks.end(), Task::Passkey) != o.tasks.end())
    for (const std::string& cfg : cfg_order) {
      NiahGrid g{cfg, {}};
      for (double d : o.depths) {
        std::vector<double> row;
        for (int ctx : o.ctxs) {
          auto it = niah.find({cfg, ctx, d});
          row.push_back(it == niah.end() ? NAN : it->second.accuracy());
        }
        g.accuracy.push_back(row);
      }
      t.niah.push_back(g);
    }
  return t;
}

std::string summary_markdown(const Tables& t) {
  std::string md = fmt::format("KV type {} (bytes below are stored bytes; metadata is its own column)\n\n", t.kv_type) +
                   "| config | task | ctx | n | accuracy | KV held (MiB) | KV vs full | KV peak (MiB) | host tier (MiB) | host peak (MiB) | metadata (MiB) |\n"
                   "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n";
  for (const CellRow& r : t.cells) {
    const CellStats& s = r.s;
    md += fmt::format("| {} | {}{} | {} | {} | {:.3f} | {:.2f} | {:.1f}% | {:.2f} | {:.2f} | {:.2f} | {:.3f} |\n", r.config,
                      task_name(r.task), task_is_trained(r.task) ? "" : " (untrained)", r.ctx, s.n, s.accuracy,
                      s.kv_held / kMiB, 100 * r.kv_vs_full, s.kv_peak / kMiB, s.kv_host / kMiB, s.kv_host_peak / kMiB,
                      s.kv_meta / kMiB);
  }
  md += "\n| config | ctx | trained-task accuracy (mean of task means) | vs full | KV held vs full | device peak vs full | host peak vs full |\n"
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |\n";
  for (const HeadlineRow& h : t.headline) {
    const bool no_full = std::isnan(h.full_accuracy) || h.full_accuracy == 0;
    md += fmt::format("| {} | {} | {:.3f} | {} | {:.1f}% | {:.1f}% | {:.1f}% |\n", h.config, h.ctx, h.accuracy,
                      no_full ? "n/a" : fmt::format("{:.1f}%", 100 * h.accuracy / h.full_accuracy),
                      100 * h.held_vs_full, 100 * h.peak_vs_full, 100 * h.host_peak_vs_full);
  }
  return md;
}

std::string results_csv(const Tables& t) {
  std::string csv = "config,task,ctx,n,accuracy,kv_held_mib,kv_vs_full,kv_peak_mib,kv_host_mib,kv_host_peak_mib\n";
  for (const CellRow& r : t.cells) {
    const CellStats& s = r.s;
    csv += fmt::format("{},{},{},{},{:.4f},{:.4f},{:.4f},{:.4f},{:.4f},{:.4f}\n", r.config, task_name(r.task), r.ctx,
                       s.n, s.accuracy, s.kv_held / kMiB, r.kv_vs_full, s.kv_peak / kMiB, s.kv_host / kMiB,
                       s.kv_host_peak / kMiB);
  }
  return csv;
}

nlohmann::json results_json(const std::string& model, const Tables& t, const std::vector<EpisodeResult>& rs) {
  using nlohmann::json;
  json summary = json::array();
  for (const CellRow& r : t.cells) {
    const CellStats& s = r.s;
    summary.push_back({{"config", r.config}, {"task", task_name(r.task)}, {"trained", task_is_trained(r.task)},
                       {"ctx", r.ctx}, {"n", s.n}, {"accuracy", s.accuracy}, {"kv_held_bytes", s.kv_held},
                       {"kv_vs_full", r.kv_vs_full}, {"kv_peak_bytes", s.kv_peak}, {"kv_host_bytes", s.kv_host},
                       {"kv_host_peak_bytes", s.kv_host_peak}, {"kv_meta_bytes", s.kv_meta}});
  }
  json eps = json::array();
  for (const EpisodeResult& r : rs)
    eps.push_back({{"task", task_name(r.task)}, {"ctx", r.ctx}, {"depth", r.depth}, {"sample", r.sample},
                   {"config", r.config}, {"correct", r.correct}, {"answer", r.answer}, {"expected", r.expected},
                   {"prompt_tokens", r.prompt_tokens}, {"kv_device_bytes", r.kv_device_bytes},
                   {"kv_peak_bytes", r.kv_peak_bytes}, {"kv_host_bytes", r.kv_host_bytes},
                   {"kv_host_peak_bytes", r.kv_host_peak_bytes}, {"kv_meta_bytes", r.kv_meta_bytes},
                   {"seconds", r.seconds}});
  json j;
  j["model"] = model;
  j["summary"] = summary;
  j["episodes"] = eps;
  return j;
}

void plot_niah(const Tables& t, const std::string& out_dir) {
  for (const NiahGrid& g : t.niah) {
    plot::Heatmap h;
    h.title = "NIAH (passkey) accuracy: " + g.config;
    h.x_label = "context length (tokens)";
    h.y_label = "needle depth (%)";
    for (int ctx : t.ctxs) h.x_ticks.push_back(std::to_string(ctx));
    for (double d : t.depths) h.y_ticks.push_back(fmt::format("{:.0f}", d * 100));
    h.values = g.accuracy;
    std::string safe = g.config;
    for (char& ch : safe)
      if (ch == '%') ch = 'p';
      else if (ch == '@') ch = '_';
    plot::heatmap(out_dir + "/niah_" + safe + ".png", h);
  }
}

void plot_budget(const Tables& t, const std::string& out_dir) {
  if (t.budget.empty()) return;
  plot::LineChart lc;
  lc.title = fmt::format("Accuracy vs KV bytes (trained tasks, {} tokens)", t.budget_ctx);
  lc.x_label = "KV bytes held, % of full (measured from the page pool)";
  lc.y_label = "exact-match accuracy";
  for (const BudgetLine& l : t.budget) lc.series.push_back({l.kind, l.kv_percent, l.accuracy});
  plot::line_chart(out_dir + "/accuracy_vs_budget.png", lc);
}

std::string report(const Model& m, const Options& o, const std::vector<EpisodeResult>& rs) {
  const Tables t = aggregate(m.config(), o, rs);
  const std::string md = summary_markdown(t);
  if (o.out_dir.empty()) return md;
  std::filesystem::create_directories(o.out_dir);
  std::ofstream(o.out_dir + "/results.csv") << results_csv(t);
  std::ofstream(o.out_dir + "/results.json")
      << results_json(m.identity().arch + " " + m.config().name, t, rs).dump(1) << "\n";
  std::ofstream(o.out_dir + "/summary.md") << md;
  plot_niah(t, o.out_dir);
  plot_budget(t, o.out_dir);
  return md;
}

}  // namespace headroom::eval
