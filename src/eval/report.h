// The eval report: aggregate() turns the episodes into tables (a pure function of the episodes, the options and
// the model's shape); the writers render those tables as markdown, CSV and JSON; the plot functions draw them.
// eval::report() (eval.h) composes them and writes the files.
#pragma once

#include <map>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "eval/eval.h"
#include "model/config.h"

namespace headroom::eval {

// Per-episode means over a group of episodes (bytes), and the share answered right.
struct CellStats {
  int n = 0, correct = 0;
  double accuracy = 0;
  double kv_held = 0, kv_peak = 0, kv_host = 0, kv_host_peak = 0, kv_meta = 0;  // bytes, mean per episode
};

// One (config, task, ctx): accuracy and KV bytes, and the held bytes as a share of the full cache's at ctx.
struct CellRow {
  std::string config;
  Task task;
  int ctx = 0;
  CellStats s;
  double kv_vs_full = 0;  // s.kv_held / full_bytes(ctx)
};

// One (config, ctx) over the trained tasks: the mean of the task accuracies, and the bytes (means over every
// trained-task episode) as shares of the full cache's.
struct HeadlineRow {
  std::string config;
  int ctx = 0;
  double accuracy = 0;       // mean of the trained tasks' accuracies
  double full_accuracy = 0;  // the same for `full` at ctx; NaN when `full` was not run
  double held_vs_full = 0, peak_vs_full = 0, host_peak_vs_full = 0;
};

// NIAH (passkey) accuracy of one config: accuracy[depth index][ctx index], NaN where no episode ran.
struct NiahGrid {
  std::string config;
  std::vector<std::vector<double>> accuracy;
};

// Accuracy against held KV (% of full) at the last context, one line per policy kind, sorted by x.
struct BudgetLine {
  std::string kind;
  std::vector<double> kv_percent, accuracy;
};

struct Tables {
  std::string kv_type;
  std::vector<int> ctxs;
  std::vector<double> depths;
  std::map<int, double> full_bytes;  // the 100% reference per ctx: `full`'s mean held bytes, else computed
  std::vector<CellRow> cells;        // configs (as given) x tasks x ctxs, where episodes ran
  std::vector<HeadlineRow> headline;
  std::vector<NiahGrid> niah;        // one per config when the passkey task ran
  std::vector<BudgetLine> budget;    // by kind name
  int budget_ctx = 0;                // the context of the budget lines (the last of o.ctxs)
};

// The full cache's K+V bytes for a prompt of `prompt_tokens` plus o.answer_tokens, pages counted whole: the
// reference when `full` is not among the configurations.
double computed_full_bytes(const ModelConfig& c, const Options& o, int prompt_tokens);

Tables aggregate(const ModelConfig& c, const Options& o, const std::vector<EpisodeResult>& rs);

std::string summary_markdown(const Tables& t);
std::string results_csv(const Tables& t);
nlohmann::json results_json(const std::string& model, const Tables& t, const std::vector<EpisodeResult>& rs);

// niah_<config>.png per NiahGrid; accuracy_vs_budget.png when there are budget lines.
void plot_niah(const Tables& t, const std::string& out_dir);
void plot_budget(const Tables& t, const std::string& out_dir);

}  // namespace headroom::eval
