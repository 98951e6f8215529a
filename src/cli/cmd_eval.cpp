// `headroom eval`: the long-context tasks under KV configurations; accuracy, KV bytes, JSON/CSV and PNG plots.
#include <unistd.h>

#include <cstdio>
#include <sstream>

#include "cli/common.h"
#include "eval/eval.h"
#include "util/error.h"

namespace headroom::cli {

namespace {
std::vector<std::string> split(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  for (std::string item; std::getline(ss, item, ',');)
    if (!item.empty()) out.push_back(item);
  return out;
}

int parse_ctx(const std::string& s) {
  try {
    size_t used = 0;
    double v = std::stod(s, &used);
    std::string unit = s.substr(used);
    if (unit == "k" || unit == "K") v *= 1024;
    else if (!unit.empty()) throw std::invalid_argument("");
    if (v < 64 || v > (1 << 24)) throw std::invalid_argument("");
    return int(v);
  } catch (...) {
    fail("bad --ctx entry '{}' (use tokens like 4096 or 4k, at least 64)", s);
  }
}

// "0:100:10" -> 0,10,...,100 (percent), or a comma list "10,50,90".
std::vector<double> parse_depths(const std::string& s) {
  std::vector<double> out;
  try {
    if (s.find(':') != std::string::npos) {
      std::vector<double> p;
      std::stringstream ss(s);
      for (std::string item; std::getline(ss, item, ':');) p.push_back(std::stod(item));
      if (p.size() != 3 || p[2] <= 0 || p[0] > p[1]) throw std::invalid_argument("");
      for (double d = p[0]; d <= p[1] + 1e-9; d += p[2]) out.push_back(d / 100.0);
    } else {
      for (const std::string& x : split(s)) out.push_back(std::stod(x) / 100.0);
    }
  } catch (...) {
    fail("bad --depths '{}' (use START:END:STEP in percent like 0:100:10, or a list like 10,50,90)", s);
  }
  for (double d : out)
    if (d < 0 || d > 1) fail("--depths must lie in 0..100 percent");
  if (out.empty()) fail("--depths is empty");
  return out;
}
}  // namespace

void register_eval(CLI::App& app) {
  static std::string model_path, tasks = "niah,multikey,kv", ctxs, depths = "0:100:25", policies = "full",
                                 budgets = "25%", out_dir = "eval-out", shared = "../shared";
  static int threads = 0;
  static eval::Options o;
  auto* cmd = app.add_subcommand("eval", "long-context accuracy (NIAH, multi-key, key-value, variable tracking) vs KV policy and budget");
  cmd->add_option("-m,--model", model_path, "GGUF model file")->required();
  cmd->add_option("--tasks", tasks, "comma list of niah, multikey, kv, vartrack, kv-uuid")->capture_default_str();
  cmd->add_option("--ctx", ctxs, "comma list of context lengths (e.g. 1k,2k,4k; default: the trained context)");
  cmd->add_option("--depths", depths, "needle depths in percent: START:END:STEP or a list")->capture_default_str();
  cmd->add_option("--policy", policies,
                  "comma list of configurations: full, streaming, topk, evict (uniform at each budget), profile (the "
                  "--head-map's scores at each budget), random (same number of full heads, chosen at random), map (the --head-map as written)")
      ->capture_default_str();
  cmd->add_option("--budget", budgets, "comma list of KV budgets for the non-full configurations (25%, 1024, 8MiB)")
      ->capture_default_str();
  cmd->add_option("--head-map", o.head_map, "head map from `headroom profile` (for profile and random)");
  cmd->add_option("--samples", o.samples, "episodes per (task, context, depth)")->capture_default_str();
  cmd->add_option("--seed", o.seed, "episode seed")->capture_default_str();
  cmd->add_option("--page-size", o.page_size, "KV page size in tokens")->capture_default_str();
  cmd->add_option("--chunk", o.chunk, "prefill chunk size")->capture_default_str();
  cmd->add_option("--kv-type", o.kv_type, "stored K/V type: f16 (default), bf16, f32, q8_0")->capture_default_str();
  cmd->add_option("--prefill", o.prefill,
                  "streaming heads during prefill, for every configuration: window, full (device peak = the prompt) "
                  "or offload (the prompt past the window parked in the host tier); default: the head map's choice "
                  "for profile/random/map, window for streaming")
      ->check(CLI::IsMember({"window", "full", "offload"}));
  cmd->add_option("-o,--out", out_dir, "output folder for results.json, results.csv, summary.md and PNG plots")->capture_default_str();
  cmd->add_option("--shared", shared, "shared data folder (haystack corpus, key words)")->capture_default_str();
  cmd->add_option("-t,--threads", threads, "threads (default: physical cores)");
  cmd->callback([] {
    auto model = Model::load(model_path);
    o.tasks.clear();
    for (const std::string& t : split(tasks)) o.tasks.push_back(eval::parse_task(t));
    if (o.tasks.empty()) fail("--tasks is empty");
    o.ctxs.clear();
    if (ctxs.empty()) o.ctxs.push_back(model->config().n_ctx_train);
    for (const std::string& c : split(ctxs)) o.ctxs.push_back(parse_ctx(c));
    o.depths = parse_depths(depths);
    o.configs.clear();
    for (const std::string& p : split(policies)) {
      if (p == "full" || p == "map") {
        o.configs.push_back({p, ""});
        continue;
      }
      if (p != "streaming" && p != "topk" && p != "evict" && p != "profile" && p != "random")
        fail("unknown --policy entry '{}' (full, map, streaming, topk, evict, profile, random)", p);
      for (const std::string& b : split(budgets)) o.configs.push_back({p, b});
    }
    if (o.samples < 1) fail("--samples must be >= 1");
    o.out_dir = out_dir;
    auto be = make_cpu_backend(threads);
    eval::TaskGen gen = eval::TaskGen::from_shared(model->tokenizer(), shared);
    const bool tty = isatty(fileno(stderr));
    std::vector<eval::EpisodeResult> rs = eval::run(*model, *be, gen, o, [tty](int done, int total, const eval::EpisodeResult& r) {
      // On a terminal one line is rewritten; in a log, one line per episode.
      std::fprintf(stderr, "%s[%d/%d] %-8s ctx %-6d depth %3.0f%% %-16s %s (%.2f s)%s", tty ? "\r" : "", done, total,
                   eval::task_name(r.task), r.ctx, r.depth * 100, r.config.c_str(), r.correct ? "ok  " : "MISS", r.seconds,
                   tty ? "      " : "\n");
      if (tty && done == total) std::fprintf(stderr, "\n");
    });
    std::string md = eval::report(*model, o, rs);
    std::printf("%s\nwritten to %s/ (results.json, results.csv, summary.md, PNG plots)\n", md.c_str(), out_dir.c_str());
  });
}

}  // namespace headroom::cli
