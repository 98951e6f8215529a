// The eval runner: episodes of the synthetic tasks under several KV configurations, exact-match scoring, KV
// bytes measured from the page pool, results as JSON and CSV, and PNG plots.
#pragma once

#include <functional>
#include <string>
#include <vector>

#include "engine/kv_setup.h"
#include "eval/tasks.h"
#include "model/model.h"
#include "profile/profiler.h"

namespace headroom::eval {

// One KV configuration to evaluate. `kind`: full | streaming | topk | evict (uniform policy at `budget`),
// profile (the head map's scores assigned at `budget`), random (as many full heads as `profile` picks at
// this budget, chosen at random: the control), map (the --head-map's policies as written, no budget).
struct Config {
  std::string kind;
  std::string budget;   // "" for full; else a --kv-budget string ("25%", "512", "8MiB")
  std::string label() const { return budget.empty() ? kind : kind + "@" + budget; }
};

struct Options {
  std::vector<Task> tasks;
  std::vector<int> ctxs;
  std::vector<double> depths;
  std::vector<Config> configs;
  int samples = 4;            // episodes per (task, ctx, depth)
  uint64_t seed = 1;
  int answer_tokens = 12;
  int page_size = 32;
  int chunk = 512;
  int parallel = 1;           // episodes run at once (each one's output is what it is alone)
  std::string kv_type = "f16";  // the stored K/V type (bytes are reported in it)
  std::string prefill;        // streaming heads' prefill: window | full | offload; "" = the head map's (else window)
  std::string head_map;       // for profile / random configs (needs scores)
  std::string out_dir;        // results.json, results.csv, PNGs
};

struct EpisodeResult {
  Task task;
  int ctx;
  double depth;
  int sample;
  std::string config;
  bool correct;
  std::string answer, expected;
  int prompt_tokens;
  int64_t kv_device_bytes;    // held on the device tier at the end of the episode
  int64_t kv_peak_bytes;      // device tier peak (includes a prefill chunk in flight)
  int64_t kv_host_bytes;      // host tier at the end
  int64_t kv_host_peak_bytes; // host tier peak (offload prefill parks the prompt there until it ends)
  int64_t kv_meta_bytes;      // policy metadata held on the device at the end (positions, key bounds, scores)
  double seconds;
};

using Progress = std::function<void(int done, int total, const EpisodeResult& r)>;

std::vector<EpisodeResult> run(const Model& m, Backend& be, const TaskGen& gen, const Options& o, const Progress& p);
// The same over tensor-parallel ranks (one backend each; docs/tensor-parallel.md).
std::vector<EpisodeResult> run(const Model& m, const std::vector<Backend*>& ranks, const TaskGen& gen, const Options& o,
                               const Progress& p);

// Writes results.json, results.csv, summary.md and the plots into o.out_dir; returns the summary table (markdown).
// In eval/report.cpp, composed of the pieces eval/report.h declares.
std::string report(const Model& m, const Options& o, const std::vector<EpisodeResult>& rs);

}  // namespace headroom::eval
