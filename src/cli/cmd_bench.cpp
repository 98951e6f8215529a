// `headroom bench`: prompt processing (pp) and generation (tg) tokens/s by context depth, as a llama-bench
// style markdown table. pp N @ dD: N prompt tokens processed in chunks on top of D tokens already cached
// (logits of the last token only, as llama-bench). tg N @ dD: N tokens decoded one at a time after D.
#include <chrono>
#include <cmath>
#include <cstdio>
#include <random>

#include "cli/common.h"
#include "model/model.h"
#include "util/error.h"

namespace headroom::cli {

namespace {
double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}
}  // namespace

void register_bench(CLI::App& app) {
  static std::string model_path;
  static std::vector<int> ds = {0}, ts = {0};
  static int n_prompt = 512, n_gen = 128, reps = 3;
  static KVOptions kvo;
  auto* cmd = app.add_subcommand("bench", "measure prompt and generation tokens/s by context depth (markdown table)");
  cmd->add_option("-m,--model", model_path, "GGUF model file")->required();
  cmd->add_option("-p,--n-prompt", n_prompt, "prompt tokens per pp test (0: skip)")
      ->check(in_range({0, double(kMaxContext)}))
      ->capture_default_str();
  cmd->add_option("-n,--n-gen", n_gen, "generated tokens per tg test (0: skip)")
      ->check(in_range({0, double(kMaxContext)}))
      ->capture_default_str();
  cmd->add_option("-d,--depth", ds, "context depths, comma-separated (e.g. 0,2048)")
      ->delimiter(',')
      ->check(list_in_range("-d", {0, double(kMaxContext)}))
      ->capture_default_str();
  add_threads_flag(cmd, ts, "thread counts, comma-separated (0: one per physical core)");
  cmd->add_option("-r,--repetitions", reps, "repetitions per test")->check(in_range({1, 1000}))->capture_default_str();
  add_kv_flags(cmd, kvo);
  cmd->callback([] {
    auto model = Model::load(model_path);
    const ModelConfig& c = model->config();
    std::mt19937 rng(42);
    std::uniform_int_distribution<int32_t> tok_dist(0, c.n_vocab - 1);
    std::string mname = fmt::format("{} {:.0f}M {}", c.arch, double(model->n_params()) / 1e6,
                                    gguf::type_name(model->layers[0].wq.type));
    std::printf("| model | size | params | backend | threads | kv | test | t/s |\n");
    std::printf("| --- | ---: | ---: | --- | ---: | --- | ---: | ---: |\n");
    for (int t : ts) {
      auto be = make_cpu_backend(t);
      for (int d : ds) {
        const int64_t n_ctx = int64_t(d) + std::max(n_prompt, n_gen) + 1;
        if (n_ctx > kMaxContext)
          fail("-d {} plus the larger of -p {} and -n {} is beyond the largest context ({} tokens)", d, n_prompt, n_gen,
               kMaxContext);
        KVSetup kvs = plan_kv(*model, kvo, n_ctx);
        Runner runner(*model, *be, kvo.chunk);
        for (int phase = 0; phase < 2; ++phase) {
          const int n = phase == 0 ? n_prompt : n_gen;
          if (n == 0) continue;
          std::vector<double> rates;
          for (int r = 0; r < reps + 1; ++r) {  // the first run warms up and is not counted
            PagePool pool(*be, kvs.layout);
            KVCache kv(c, pool, kvs.specs);
            std::vector<int32_t> toks(size_t(d) + n);
            for (int32_t& x : toks) x = tok_dist(rng);
            if (d > 0) runner.prefill(kv, std::span<const int32_t>(toks.data(), d), 0);
            auto t0 = std::chrono::steady_clock::now();
            if (phase == 0) {
              runner.prefill(kv, std::span<const int32_t>(toks.data() + d, n), d);
            } else {
              for (int i = 0; i < n; ++i) runner.decode(kv, toks[d + i], d + i);
            }
            double s = seconds_since(t0);
            if (r > 0) rates.push_back(n / s);
          }
          double mean = 0, var = 0;
          for (double x : rates) mean += x;
          mean /= rates.size();
          for (double x : rates) var += (x - mean) * (x - mean);
          double sd = rates.size() > 1 ? std::sqrt(var / (rates.size() - 1)) : 0.0;
          std::string test = fmt::format("{}{}{}", phase == 0 ? "pp" : "tg", n, d ? fmt::format(" @ d{}", d) : "");
          std::printf("| %s | %.2f MiB | %.2f M | CPU | %d | %s | %s | %.2f ± %.2f |\n", mname.c_str(),
                      double(model->weight_bytes()) / 1048576.0, double(model->n_params()) / 1e6, be->threads(),
                      kvo.head_map.empty() ? kvo.policy.c_str() : "head-map", test.c_str(), mean, sd);
          std::fflush(stdout);
        }
      }
    }
  });
}

}  // namespace headroom::cli
