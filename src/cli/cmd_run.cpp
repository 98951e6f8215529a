// `headroom run`: generate text from a prompt, streaming it, then print load / prompt / generation speed.
#include <chrono>
#include <cstdio>

#include "cli/common.h"
#include "util/escape.h"
#include "engine/generate.h"
#include "util/error.h"
#include "util/file.h"
#include "tokenizer/utf8.h"

namespace headroom::cli {

namespace {
struct RunArgs {
  std::string model, prompt, prompt_file, system;
  int n_predict = 128, n_ctx = 0, threads = 0;
  bool chat = false, escape = true;
  std::vector<std::string> stop;
  SamplerParams sp;
  KVOptions kv;
};

void run(RunArgs& a) {
  auto t0 = std::chrono::steady_clock::now();
  if (a.escape) a.prompt = process_escapes(a.prompt);
  if (!a.prompt_file.empty()) {
    a.prompt = read_text_file(a.prompt_file, "prompt file", size_t(64) << 20);
  }
  if (!a.prompt_file.empty() && a.prompt.empty()) fail("-f {:?}: the prompt file is empty or unreadable", a.prompt_file);
  if (std::string clean = tok::utf8_sanitize(a.prompt); clean != a.prompt) {
    std::fprintf(stderr, "warning: the prompt is not valid UTF-8; invalid bytes were replaced with U+FFFD\n");
    a.prompt = std::move(clean);
  }
  auto model = Model::load(a.model);
  const ModelConfig& c = model->config();
  const Tokenizer& tok = model->tokenizer();
  const int n_ctx = int(context_for(a.n_ctx, c));
  auto backend = make_cpu_backend(a.threads);
  double load_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();

  std::string text = a.prompt;
  bool add_bos = tok.add_bos();
  if (a.chat) {
    std::string tmpl = model->file().get_str("tokenizer.chat_template", "");
    ChatTemplate ct = ChatTemplate::detect(tmpl);
    if (!ct.recognised())
      std::fprintf(stderr, "warning: %s; using the plain fallback format\n",
                   tmpl.empty() ? "the model has no chat template" : "the model's chat template is not recognised");
    std::vector<ChatMessage> msgs;
    if (!a.system.empty()) msgs.push_back({"system", a.system});
    msgs.push_back({"user", a.prompt});
    text = ct.apply(msgs, true, tok.bos() >= 0 ? tok.token_to_piece(tok.bos(), true) : "");
    // The template text carries BOS itself where the family puts it.
    if (ct.recognised() && tok.bos() >= 0 && text.rfind(tok.token_to_piece(tok.bos(), true), 0) == 0) add_bos = false;
  }
  std::vector<int32_t> ids = tok.encode(text, add_bos, /*parse_special=*/a.chat);
  if (ids.empty()) fail("the prompt is empty (and the model adds no BOS token): nothing to generate from");
  if (int64_t(ids.size()) > n_ctx)
    fail("prompt is {} tokens, longer than the context of {} tokens (raise -c or shorten the prompt)", ids.size(), n_ctx);

  KVSetup kvs = plan_kv(*model, a.kv, n_ctx);
  std::fprintf(stderr, "%s\n", kvs.summary.c_str());
  PagePool pool(*backend, kvs.layout);
  KVCache kv(c, pool, kvs.specs);
  Runner runner(*model, *backend, a.kv.chunk);
  Sampler sampler(a.sp);
  GenerateOptions go;
  go.n_predict = a.n_predict;
  go.n_ctx = n_ctx;
  go.stop = a.stop;
  if (!a.chat) {
    std::fputs(a.prompt.c_str(), stdout);
    std::fflush(stdout);
  }
  GenerateResult r = generate(runner, kv, tok, ids, sampler, go, [](const std::string& s) {
    std::fputs(s.c_str(), stdout);
    std::fflush(stdout);
  });
  std::printf("\n");
  std::fflush(stdout);
  if (r.stop_reason.rfind("budget", 0) == 0) std::fprintf(stderr, "stopped: %s\n", r.stop_reason.c_str() + 8);
  std::fprintf(stderr,
               "load %.0f ms | prompt %d tokens, %.1f tokens/s | generated %zu tokens, %.1f tokens/s | stop: %s | "
               "KV held %.2f MiB (peak %.2f MiB), host tier %.2f MiB | %d threads\n",
               load_s * 1e3, r.n_prompt, r.prompt_s > 0 ? r.n_prompt / r.prompt_s : 0.0, r.tokens.size(),
               r.gen_s > 0 && r.tokens.size() > 1 ? (r.tokens.size() - 1) / r.gen_s : 0.0,
               r.stop_reason.substr(0, r.stop_reason.find(':')).c_str(), pool.device_bytes() / 1048576.0,
               pool.peak_device_pages() * pool.page_bytes() / 1048576.0, pool.host_bytes() / 1048576.0,
               backend->threads());
}
}  // namespace

void register_run(CLI::App& app) {
  static RunArgs a;
  auto* cmd = app.add_subcommand("run", "generate text from a prompt (streams it, then prints speed)");
  cmd->add_option("-m,--model", a.model, "GGUF model file")->required();
  cmd->add_option("-p,--prompt", a.prompt, "prompt text");
  cmd->add_option("-f,--file", a.prompt_file, "read the prompt from this file");
  cmd->add_flag("!--no-escape", a.escape, "take -p literally (by default \\n \\t \\\\ \\\" \\xHH in it are escapes, as in llama.cpp)");
  cmd->add_option("-n,--n-predict", a.n_predict, "tokens to generate (-1: until end of text or context, 0: only the prompt)")
      ->check(in_range({-1, double(kMaxContext)}))
      ->capture_default_str();
  cmd->add_option("-c,--ctx", a.n_ctx, "context size in tokens, like 4096 or 4k (0: the model's trained context)")
      ->transform(tokens_in("-c", 0, kMaxContext));
  add_threads_flag(cmd, a.threads);
  add_sampling_flags(cmd, a.sp);
  cmd->add_flag("--chat", a.chat, "wrap the prompt in the model's chat template");
  cmd->add_option("--system", a.system, "system message (with --chat)");
  cmd->add_option("--stop", a.stop, "stop string (repeatable)");
  add_kv_flags(cmd, a.kv);
  cmd->callback([cmd] {
    if (cmd->count("-p") == 0 && a.prompt_file.empty()) fail("give a prompt with -p TEXT or -f FILE");
    run(a);
  });
}

}  // namespace headroom::cli
