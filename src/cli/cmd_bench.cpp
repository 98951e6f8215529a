// `headroom bench`: prompt processing (pp) and generation (tg) tokens/s by context depth, as a llama-bench
// style markdown table. pp N @ dD: N prompt tokens processed in chunks on top of D tokens already cached
// (logits of the last token only, as llama-bench). tg N @ dD: N tokens decoded one at a time after D.
// --parallel P runs P sequences at once through the engine (each with its own D-token context): t/s is the
// aggregate over all of them, and the last column what one sequence sees.
#include <chrono>
#include <cmath>
#include <cstdio>
#include <random>

#include "cli/common.h"
#ifdef HEADROOM_HAVE_SERVER
#include <httplib.h>
#include <nlohmann/json.hpp>
#endif

#include "engine/stack.h"
#ifdef HEADROOM_HAVE_SERVER
#include "server/loadgen.h"
#endif
#include "model/model.h"
#include "util/error.h"

namespace headroom::cli {

namespace {
double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// One pp or tg measurement at depth d with `parallel` sequences: the depth is prefilled into each sequence
// once (not timed); every repetition then times the phase for all of them together and rolls the caches back
// to the depth (Engine::truncate), so a long depth is not prefilled again per repetition as llama-bench does.
// Returns the aggregate tokens/s of each counted repetition and the seconds each took.
struct PhaseRun {
  std::vector<double> rates, seconds;
};

PhaseRun measure(EngineStack& st, bool pp, int d, int n, int parallel, int reps, std::mt19937& rng, int32_t n_vocab) {
  std::uniform_int_distribution<int32_t> tok_dist(0, n_vocab - 1);
  auto random_tokens = [&](int k) {
    std::vector<int32_t> t(static_cast<size_t>(k), 0);
    for (int32_t& x : t) x = tok_dist(rng);
    return t;
  };
  Engine& engine = *st.engine;
  PhaseRun out;
  std::vector<Sequence*> seqs;
  for (int i = 0; i < parallel; ++i) {
    Request q = st.request(random_tokens(std::max(d, 1)));  // (depth 0: one token, rolled back below)
    q.keep = true;
    q.n_predict = 0;
    seqs.push_back(&engine.add(std::move(q)));
  }
  engine.run();
  for (Sequence* s : seqs) {
    if (s->state != Sequence::State::Idle || s->n_cached != std::max(d, 1))
      fail("bench: depth {} does not fit ({}): {}", d, finish_reason_name(s->finish),
           s->finish_detail.empty() ? "the sequence ended before the test" : s->finish_detail);
    engine.truncate(*s, d);
  }
  if (d > 0) {  // what one sequence holds at this depth, against a full cache of the same type
    const KVCache& kv = *seqs[0]->kv;
    const int64_t full = st.runner->model().config().kv_bytes_per_token(st.setup.layout.type) * d;
    std::fprintf(stderr, "bench: %s at depth %d: KV %.1f MiB on the device + %.1f MiB host + %.1f MiB metadata per "
                 "sequence, %.1f%% of a full %s cache (%.1f MiB)\n", pp ? "pp" : "tg", d,
                 double(kv.device_bytes()) / 1048576.0, double(kv.host_bytes()) / 1048576.0,
                 double(kv.device_meta_bytes()) / 1048576.0,
                 100.0 * double(kv.device_bytes() + kv.host_bytes() + kv.device_meta_bytes()) / double(full),
                 kv_type_name(st.setup.layout.type), double(full) / 1048576.0);
  }
  const PagePool& pool = *st.pool;
  int64_t moved0 = 0, moved_tokens = 0;
  for (int r = 0; r < reps + 1; ++r) {  // the first run warms up and is not counted
    if (r == 1) moved0 = pool.device_moves_in() + pool.device_moves_out();
    for (Sequence* s : seqs) {
      // pp: n more prompt tokens; tg: one token, then n-1 forced ones (no sampling, no early end): n rows each.
      if (pp) engine.extend(*s, random_tokens(n), 0);
      else engine.extend(*s, random_tokens(1), n, random_tokens(n));
    }
    auto t0 = std::chrono::steady_clock::now();
    engine.run();
    const double s = seconds_since(t0);
    for (Sequence* q : seqs) {
      if (q->finish != FinishReason::Length)
        fail("bench: a sequence ended early ({}): {}", finish_reason_name(q->finish), q->finish_detail);
      engine.truncate(*q, d);
    }
    if (r > 0) {
      out.rates.push_back(double(n) * parallel / s);
      out.seconds.push_back(s);
      moved_tokens += int64_t(n) * parallel;
    }
  }
  // Tier moves (offloading policies): pages copied between the device and the host tier while timed.
  if (const int64_t moved = pool.device_moves_in() + pool.device_moves_out() - moved0; moved > 0 && moved_tokens > 0)
    std::fprintf(stderr, "bench: %s at depth %d: %.1f page moves between the tiers per token, %.2f MiB per token\n",
                 pp ? "pp" : "tg", d, double(moved) / double(moved_tokens),
                 double(moved) * double(pool.page_bytes()) / double(moved_tokens) / 1048576.0);
  for (Sequence* q : seqs) engine.release(*q);
  return out;
}

std::pair<double, double> mean_sd(const std::vector<double>& xs) {
  double mean = 0, var = 0;
  for (double x : xs) mean += x;
  mean /= double(xs.size());
  for (double x : xs) var += (x - mean) * (x - mean);
  return {mean, xs.size() > 1 ? std::sqrt(var / double(xs.size() - 1)) : 0.0};
}

}  // namespace

void register_bench(CLI::App& app) {
  static std::string model_path;
  static std::vector<int> ds = {0}, ts = {0}, ps = {1};
  static int n_prompt = 512, n_gen = 128, reps = 3, tp = 1;
  static std::string device = "auto";
  static KVOptions kvo;
  auto* cmd = app.add_subcommand("bench", "measure prompt and generation tokens/s by context depth (markdown table)");
  static std::string server_url, server_model, server_key;
  static std::vector<int> clients = {1, 4, 16, 32};
  static int server_requests = 2, server_words = 1500;
  cmd->add_option("-m,--model", model_path, "GGUF model file (not with --server)");
  cmd->add_option("--server", server_url,
                  "load-test an OpenAI-compatible server instead (headroom serve or llama-server), e.g. "
                  "http://127.0.0.1:8080: streaming /v1/completions, -n tokens each, prompts of --prompt-words");
  cmd->add_option("--clients", clients, "--server: concurrent clients, comma-separated")
      ->delimiter(',')
      ->check(list_in_range("--clients", {1, 4096}))
      ->capture_default_str();
  cmd->add_option("--requests", server_requests, "--server: requests per client")->check(in_range({1, 100000}))->capture_default_str();
  cmd->add_option("--prompt-words", server_words, "--server: words per prompt")->check(in_range({1, 1000000}))->capture_default_str();
  cmd->add_option("--model-id", server_model, "--server: the request's \"model\" (default: the one /v1/models lists)");
  cmd->add_option("--api-key", server_key, "--server: bearer token");
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
  cmd->add_option("--parallel", ps,
                  "sequences run at once, comma-separated (e.g. 1,4,16; -np works too): t/s is the aggregate of all")
      ->delimiter(',')
      ->check(list_in_range("--parallel", {1, 4096}))
      ->capture_default_str();
  add_threads_flag(cmd, ts, "thread counts, comma-separated (0: one per physical core)");
  cmd->add_option("-r,--repetitions", reps, "repetitions per test")->check(in_range({1, 1000}))->capture_default_str();
  add_kv_flags(cmd, kvo);
  add_device_flag(cmd, device);
  add_tp_flag(cmd, tp);
  cmd->callback([] {
    if (!server_url.empty()) {
#ifndef HEADROOM_HAVE_SERVER
      fail("--server: this build has no HTTP client (configure with cpp-httplib installed)");
#else
      if (!model_path.empty()) fail("give -m (bench the engine) or --server (bench a server), not both");
      std::string id = server_model;
      if (id.empty()) {
        httplib::Client cli(server_url);
        cli.set_connection_timeout(10);
        auto r = cli.Get("/v1/models");
        if (!r || r->status != 200) fail("--server {}: no answer from /v1/models (is it running?)", server_url);
        auto j = nlohmann::json::parse(r->body, nullptr, false);
        if (j.is_discarded() || !j.contains("data") || j["data"].empty()) fail("--server {}: /v1/models lists no model", server_url);
        id = j["data"][0].value("id", "");
      }
      std::printf("| server | clients | requests | output tok/s | total tok/s | TTFT p50 | TTFT p99 | failed |\n");
      std::printf("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n");
      for (int c : clients) {
        server::LoadOptions lo;
        lo.url = server_url;
        lo.model = id;
        lo.api_key = server_key;
        lo.clients = c;
        lo.requests = server_requests;
        lo.prompt_words = server_words;
        lo.max_tokens = n_gen;
        server::LoadResult r = server::run_load(lo);
        std::printf("| %s | %d | %d | %.1f | %.1f | %.0f ms | %.0f ms | %d |\n", server_url.c_str(), c, r.ok + r.failed,
                    r.output_tokens / r.seconds, (r.prompt_tokens + r.output_tokens) / r.seconds, r.ttft_p50 * 1e3,
                    r.ttft_p99 * 1e3, r.failed);
        if (r.failed) std::fprintf(stderr, "first failure: %s\n", r.first_error.c_str());
        std::fflush(stdout);
      }
      return;
#endif
    }
    if (model_path.empty()) fail("give -m MODEL (or --server URL)");
    auto model = Model::load(model_path);
    const ModelConfig& c = model->config();
    check_tensor_parallel(c, tp, !kvo.head_map.empty());  // one line, before the table
    std::mt19937 rng(42);
    std::string mname = fmt::format("{} {:.0f}M {}", c.arch, double(model->n_params()) / 1e6,
                                    gguf::type_name(model->layers[0].wq.type));
    std::printf("| model | size | params | backend | threads | kv | parallel | test | t/s | latency per seq |\n");
    std::printf("| --- | ---: | ---: | --- | ---: | --- | ---: | ---: | ---: | ---: |\n");
    for (int t : ts) {
      RankBackends rb = backends_for(device, t, tp, /*quiet=*/true);
      Backend* be = &rb.first();
      if (t == ts.front() && std::string_view(be->name()) != "cpu")
        std::fprintf(stderr, "%s\n", describe_device_choice(device).c_str());
      for (int d : ds)
        for (int par : ps) {
          const int64_t n_ctx = int64_t(d) + std::max(n_prompt, n_gen) + 1;
          if (n_ctx > kMaxContext)
            fail("-d {} plus the larger of -p {} and -n {} is beyond the largest context ({} tokens)", d, n_prompt,
                 n_gen, kMaxContext);
          EngineStack st(*model, rb.ranks, plan_kv(*model, kvo, n_ctx), par, kvo.chunk, kvo.kv_pool);
          if (t == ts.front() && d == ds.front() && par == ps.front()) print_placement(st.tp);
          for (int phase = 0; phase < 2; ++phase) {
            const int n = phase == 0 ? n_prompt : n_gen;
            if (n == 0) continue;
            PhaseRun pr = measure(st, phase == 0, d, n, par, reps, rng, c.n_vocab);
            auto [mean, sd] = mean_sd(pr.rates);
            const double sec = mean_sd(pr.seconds).first;
            // Per sequence: the time its prompt took (pp), or the time per generated token (tg).
            const std::string latency = phase == 0 ? fmt::format("{:.1f} ms/prompt", sec * 1e3)
                                                   : fmt::format("{:.2f} ms/token", sec * 1e3 / n);
            std::string test = fmt::format("{}{}{}", phase == 0 ? "pp" : "tg", n, d ? fmt::format(" @ d{}", d) : "");
            const std::string backend = tp > 1 ? fmt::format("{} tp{}", be->name(), tp) : be->name();
            std::printf("| %s | %.2f MiB | %.2f M | %s | %d | %s | %d | %s | %.2f ± %.2f | %s |\n", mname.c_str(),
                        double(model->weight_bytes()) / 1048576.0, double(model->n_params()) / 1e6, backend.c_str(), rb.threads(),
                        kvo.head_map.empty() ? kvo.policy.c_str() : "head-map", par, test.c_str(), mean, sd,
                        latency.c_str());
            std::fflush(stdout);
          }
        }
    }
  });
}

}  // namespace headroom::cli
