// `headroom eval`: the long-context tasks under KV configurations; accuracy, KV bytes, JSON/CSV and PNG plots.
#include <unistd.h>

#include <algorithm>
#include <cstdio>

#include "cli/common.h"
#include "eval/eval.h"
#include "util/error.h"

namespace headroom::cli {

void register_eval(CLI::App& app) {
  static std::string model_path, depths = "0:100:25", out_dir = "eval-out", shared = "../shared";
  static std::vector<std::string> tasks = {"niah", "multikey", "kv"}, policies = {"full"}, budgets = {"25%"};
  static std::vector<int> ctxs;
  static int threads = 0, tp = 1;
  static std::string device = "auto";
  static eval::Options o;
  auto* cmd = app.add_subcommand("eval", "long-context accuracy (NIAH, multi-key, key-value, variable tracking) vs KV policy and budget");
  cmd->add_option("-m,--model", model_path, "GGUF model file")->required();
  cmd->add_option("--tasks", tasks, "comma list of niah, multikey, kv, vartrack, kv-uuid")
      ->delimiter(',')
      ->check(CLI::Validator([](std::string& s) { return (void)eval::parse_task(s), std::string(); }, "TASK"))
      ->capture_default_str();
  cmd->add_option("--ctx", ctxs, "comma list of context lengths (e.g. 1k,2k,4k; default: the trained context)")
      ->delimiter(',')
      ->transform(tokens_in("--ctx", 64, kMaxContext));
  cmd->add_option("--depths", depths, "needle depths in percent: START:END:STEP or a list")
      ->check(CLI::Validator([](std::string& s) { return (void)parse_depths(s, "--depths"), std::string(); }, "DEPTHS"))
      ->capture_default_str();
  cmd->add_option("--policy", policies,
                  "comma list of configurations: full, streaming, topk, evict (uniform at each budget), profile (the "
                  "--head-map's scores at each budget), random (same number of full heads, chosen at random), map (the --head-map as written)")
      ->delimiter(',')
      ->check(CLI::IsMember({"full", "map", "streaming", "topk", "evict", "profile", "random"}))
      ->capture_default_str();
  cmd->add_option("--budget", budgets, "comma list of KV budgets for the non-full configurations (25%, 1024, 8MiB)")
      ->delimiter(',')
      ->check(CLI::Validator([](std::string& s) { return (void)KVBudget::parse(s, "--budget"), std::string(); }, "BUDGET"))
      ->capture_default_str();
  cmd->add_option("--head-map", o.head_map, "head map from `headroom profile` (for profile and random)");
  cmd->add_option("--samples", o.samples, "episodes per (task, context, depth)")
      ->check(in_range({1, 100000}))
      ->capture_default_str();
  add_seed_flag(cmd, "--seed", o.seed, "episode seed");
  add_page_size_flag(cmd, o.page_size);
  add_chunk_flag(cmd, o.chunk);
  cmd->add_option("--parallel", o.parallel,
                  "episodes run at once (-np works too); each episode's output is the same as with 1")
      ->check(in_range({1, 4096}))
      ->capture_default_str();
  cmd->add_option("--kv-type", o.kv_type, "stored K/V type: f16 (default), bf16, f32, q8_0")->capture_default_str();
  cmd->add_option("--prefill", o.prefill,
                  "streaming heads during prefill, for every configuration: window, full (device peak = the prompt) "
                  "or offload (the prompt past the window parked in the host tier); default: the head map's choice "
                  "for profile/random/map, window for streaming")
      ->check(CLI::IsMember({"window", "full", "offload"}));
  cmd->add_option("-o,--out", out_dir, "output folder for results.json, results.csv, summary.md and PNG plots")->capture_default_str();
  cmd->add_option("--shared", shared, "shared data folder (haystack corpus, key words)")->capture_default_str();
  add_threads_flag(cmd, threads);
  add_device_flag(cmd, device);
  add_tp_flag(cmd, tp);
  cmd->callback([] {
    check_output_dir(out_dir, "-o");
    auto model = Model::load(model_path);
    o.tasks.clear();
    for (const std::string& t : tasks) o.tasks.push_back(eval::parse_task(t));
    o.ctxs = ctxs;
    if (o.ctxs.empty()) o.ctxs.push_back(model->config().n_ctx_train);
    context_for(*std::max_element(o.ctxs.begin(), o.ctxs.end()), model->config());  // warns once if beyond trained
    o.depths = parse_depths(depths, "--depths");
    o.configs.clear();
    for (const std::string& p : policies) {
      if (p == "full" || p == "map") o.configs.push_back({p, ""});
      else
        for (const std::string& b : budgets) o.configs.push_back({p, b});
    }
    o.out_dir = out_dir;
    // Per-head configurations (a head map) may split the heads unevenly; uniform policies must divide them.
    const bool all_maps = std::all_of(policies.begin(), policies.end(), [](const std::string& p) { return p == "map"; });
    check_tensor_parallel(model->config(), tp, all_maps);
    RankBackends be = backends_for(device, threads, tp);
    eval::TaskGen gen = eval::TaskGen::from_shared(model->tokenizer(), shared);
    const bool tty = isatty(fileno(stderr));
    std::vector<eval::EpisodeResult> rs = eval::run(*model, be.ranks, gen, o, [tty](int done, int total, const eval::EpisodeResult& r) {
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
