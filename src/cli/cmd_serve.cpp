// `headroom serve`: the OpenAI-compatible server (src/server/). SIGTERM or SIGINT stops it: no new requests,
// running ones end with finish reason "abort", exit 0.
#include <atomic>
#include <csignal>
#include <filesystem>
#include <thread>

#include "cli/common.h"
#include "server/server.h"
#include "util/error.h"

namespace headroom::cli {

namespace {
std::atomic<bool> g_stop{false};
extern "C" void on_signal(int) { g_stop = true; }
}  // namespace

void register_serve(CLI::App& app) {
  static std::string model_path, device = "auto";
  static std::vector<std::string> maps;
  static int threads = 0, tp = 1;
  static server::ServerOptions o;
  auto* cmd = app.add_subcommand("serve", "OpenAI-compatible HTTP server (/v1/chat/completions, /v1/completions, "
                                          "/v1/models, /health, /metrics) on the batched engine");
  cmd->add_option("-m,--model", model_path, "GGUF model file")->required();
  cmd->add_option("--host", o.host, "address to bind (loopback by default)")->capture_default_str();
  cmd->add_option("--port", o.port, "port (0: any free one; the log says which)")->check(in_range({0, 65535}))->capture_default_str();
  cmd->add_option("-c,--ctx", o.n_ctx, "each sequence's context in tokens, like 4096 or 4k (0: the model's trained one; "
                                       "not split across sequences, unlike llama-server)")
      ->transform(tokens_in("-c", 0, kMaxContext));
  cmd->add_option("--parallel", o.parallel, "sequences run at once (-np works too)")->check(in_range({1, 4096}))->capture_default_str();
  cmd->add_option("--max-queue", o.max_queue, "waiting requests beyond this get 503 with Retry-After")
      ->check(in_range({0, 1 << 20}))
      ->capture_default_str();
  add_threads_flag(cmd, threads);
  add_kv_flags(cmd, o.kv, /*head_map_flag=*/false);
  cmd->add_option("--head-map", maps,
                  "[NAME=]FILE, repeatable: head maps a request may name in \"head_map\" (a map without NAME is the "
                  "default for every request)");
  cmd->add_option("--api-key", o.api_key, "require 'Authorization: Bearer KEY' on /v1/ routes");
  cmd->add_option("--chat-template", o.chat_template, "chatml, llama3, llama2, mistral, phi3, or a template FILE "
                                                      "(default: the model's; ChatML if it has none)");
  cmd->add_option("--alias", o.model_name, "the model id clients send and /v1/models lists (default: the file name)");
  add_device_flag(cmd, device);
  add_tp_flag(cmd, tp);
  cmd->callback([] {
    for (const std::string& m : maps) {
      const size_t eq = m.find('=');
      const std::string name = eq == std::string::npos ? "default" : m.substr(0, eq);
      const std::string path = eq == std::string::npos ? m : m.substr(eq + 1);
      if (name.empty() || path.empty()) fail("--head-map {:?}: give FILE or NAME=FILE", m);
      if (!o.head_maps.emplace(name, path).second) fail("--head-map: the name '{}' is given twice", name);
    }
    if (o.model_name.empty()) o.model_name = std::filesystem::path(model_path).filename().string();
    auto model = Model::load(model_path);
    o.n_ctx = int(context_for(o.n_ctx, model->config()));
    check_tensor_parallel(model->config(), tp, o.head_maps.count("default") > 0);  // one line before anything starts
    RankBackends be = backends_for(device, threads, tp);
    server::Server srv(*model, be.ranks, o);
    std::signal(SIGTERM, on_signal);
    std::signal(SIGINT, on_signal);
    std::signal(SIGPIPE, SIG_IGN);
    std::thread watcher([&] {
      while (!g_stop.load()) std::this_thread::sleep_for(std::chrono::milliseconds(50));
      std::fprintf(stderr, "stopping: no new requests; running ones end with finish reason abort\n");
      srv.shutdown();
    });
    try {
      srv.run();
    } catch (...) {
      g_stop = true;
      watcher.join();
      throw;
    }
    g_stop = true;
    watcher.join();
    std::fprintf(stderr, "stopped\n");
  });
}

}  // namespace headroom::cli
