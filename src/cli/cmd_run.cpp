// `headroom run`: generate text from a prompt, streaming it, then print load / prompt / generation speed.
#include <chrono>
#include <cstdio>

#include "cli/common.h"
#include "util/escape.h"
#include <nlohmann/json.hpp>

#include "engine/stack.h"
#include "util/error.h"
#include "util/file.h"
#include "tokenizer/utf8.h"

namespace headroom::cli {

namespace {
struct RunArgs {
  std::string model, prompt, prompt_file, prompts_file, system, device = "auto";
  int n_predict = 128, n_ctx = 0, threads = 0, parallel = 0, tp = 1;
  bool chat = false, escape = true;
  std::vector<std::string> stop;
  SamplerParams sp;
  KVOptions kv;
};

// --prompts FILE: one JSON string per line (blank lines skipped). Throws Error naming the line.
std::vector<std::string> read_prompts(const std::string& path) {
  const std::string text = read_text_file(path, "prompts file", size_t(64) << 20);
  std::vector<std::string> out;
  size_t at = 0;
  for (int line = 1; at < text.size(); ++line) {
    size_t end = text.find('\n', at);
    if (end == std::string::npos) end = text.size();
    std::string l = text.substr(at, end - at);
    at = end + 1;
    if (l.find_first_not_of(" \t\r") == std::string::npos) continue;
    if (tok::utf8_sanitize(l) != l) fail("--prompts {:?}: line {} is not valid UTF-8", path, line);
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(l);
    } catch (const nlohmann::json::exception&) {
      fail("--prompts {:?}: line {} is not JSON (each line is one JSON string, like \"Hello\")", path, line);
    }
    if (!j.is_string()) fail("--prompts {:?}: line {} is JSON but not a string (each line is one JSON string)", path, line);
    out.push_back(j.get<std::string>());
  }
  if (out.empty()) fail("--prompts {:?}: no prompts in the file", path);
  return out;
}

// The token ids of one prompt, in the chat template if asked.
std::vector<int32_t> encode_prompt(const Model& model, const RunArgs& a, const std::string& prompt) {
  const Tokenizer& tok = model.tokenizer();
  std::string text = prompt;
  bool add_bos = tok.add_bos();
  if (a.chat) {
    std::string tmpl = model.file().get_str("tokenizer.chat_template", "");
    ChatTemplate ct = ChatTemplate::detect(tmpl);
    std::vector<ChatMessage> msgs;
    if (!a.system.empty()) msgs.push_back({"system", a.system});
    msgs.push_back({"user", prompt});
    text = ct.apply(msgs, true, tok.bos() >= 0 ? tok.token_to_piece(tok.bos(), true) : "");
    // The template text carries BOS itself where the family puts it.
    if (ct.recognised() && tok.bos() >= 0 && text.rfind(tok.token_to_piece(tok.bos(), true), 0) == 0) add_bos = false;
  }
  std::vector<int32_t> ids = tok.encode(text, add_bos, /*parse_special=*/a.chat);
  if (ids.empty()) fail("the prompt is empty (and the model adds no BOS token): nothing to generate from");
  return ids;
}

void run(RunArgs& a) {
  auto t0 = std::chrono::steady_clock::now();
  std::vector<std::string> prompts;
  if (!a.prompts_file.empty()) {
    prompts = read_prompts(a.prompts_file);
  } else {
    if (a.escape) a.prompt = process_escapes(a.prompt);
    if (!a.prompt_file.empty()) a.prompt = read_text_file(a.prompt_file, "prompt file", size_t(64) << 20);
    if (!a.prompt_file.empty() && a.prompt.empty()) fail("-f {:?}: the prompt file is empty or unreadable", a.prompt_file);
    if (std::string clean = tok::utf8_sanitize(a.prompt); clean != a.prompt) {
      std::fprintf(stderr, "warning: the prompt is not valid UTF-8; invalid bytes were replaced with U+FFFD\n");
      a.prompt = std::move(clean);
    }
    prompts.push_back(a.prompt);
  }
  const int parallel = a.parallel > 0 ? a.parallel : int(std::min<size_t>(prompts.size(), 16));
  auto model = Model::load(a.model);
  const ModelConfig& c = model->config();
  const int n_ctx = int(context_for(a.n_ctx, c));
  check_tensor_parallel(c, a.tp, !a.kv.head_map.empty());  // one line before any backend starts
  RankBackends backends = backends_for(a.device, a.threads, a.tp);
  double load_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  if (a.chat) {
    std::string tmpl = model->file().get_str("tokenizer.chat_template", "");
    if (!ChatTemplate::detect(tmpl).recognised())
      std::fprintf(stderr, "warning: %s; using the plain fallback format\n",
                   tmpl.empty() ? "the model has no chat template" : "the model's chat template is not recognised");
  }
  std::vector<std::vector<int32_t>> ids;
  for (const std::string& p : prompts) {
    ids.push_back(encode_prompt(*model, a, p));
    if (int64_t(ids.back().size()) > n_ctx)
      fail("prompt {}is {} tokens, longer than the context of {} tokens (raise -c or shorten the prompt)",
           prompts.size() > 1 ? fmt::format("{} ", ids.size()) : "", ids.back().size(), n_ctx);
  }

  EngineStack st(*model, backends.ranks, plan_kv(*model, a.kv, n_ctx), parallel, a.kv.chunk, a.kv.kv_pool);
  std::fprintf(stderr, "%s\n", st.setup.summary.c_str());
  print_placement(st.tp);
  if (prompts.size() > 1) std::fprintf(stderr, "%s\n", st.pool_plan.summary.c_str());
  Engine& engine = *st.engine;
  struct Result {
    std::string text, finish, detail;
    int n_prompt = 0, n_gen = 0;
    double prompt_s = 0, gen_s = 0;
    int64_t held = 0, peak = 0, host = 0;
    std::string per_rank;  // tensor parallel: the KV each rank holds
  };
  std::vector<Result> results(prompts.size());
  const bool stream = prompts.size() == 1;
  engine.on_notice = [](const std::string& s) { std::fprintf(stderr, "notice: %s\n", s.c_str()); };
  if (stream) {
    engine.on_text = [](Sequence&, std::string_view s) {
      std::fwrite(s.data(), 1, s.size(), stdout);
      std::fflush(stdout);
    };
  }
  engine.on_finish = [&](Sequence& s) {
    Result& r = results[size_t(s.req.tag)];
    r.text = s.text;
    r.finish = finish_reason_name(s.finish);
    r.detail = s.finish_detail;
    r.n_prompt = s.n_prompt;
    r.n_gen = s.n_generated;
    r.prompt_s = s.prompt_seconds();
    r.gen_s = s.gen_seconds();
    r.held = s.kv->device_bytes();
    r.peak = s.kv->peak_device_pages() * st.pool->page_bytes();
    r.host = s.kv->host_bytes();
    if (st.pool->n_parts() > 1) {
      r.per_rank = " (ranks";
      for (int p = 0; p < st.pool->n_parts(); ++p)
        r.per_rank += fmt::format(" {:.2f}", double(s.kv->device_pages_held(p) * st.pool->layout().kv_page_bytes()) / 1048576.0);
      r.per_rank += ")";
    }
  };
  for (size_t i = 0; i < prompts.size(); ++i) {
    Request r = st.request(ids[i]);
    r.sampling = a.sp;
    r.sampling.seed = a.sp.seed + i;  // each prompt its own stream (the first one's is -s's)
    r.n_predict = a.n_predict;
    r.n_ctx = n_ctx;
    r.stop = a.stop;
    r.tag = int64_t(i);
    engine.add(std::move(r));
  }
  if (stream && !a.chat) {
    std::fputs(prompts[0].c_str(), stdout);
    std::fflush(stdout);
  }
  const auto t_run = std::chrono::steady_clock::now();
  engine.run();
  const double run_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_run).count();
  if (stream) {
    std::printf("\n");
  } else {
    for (size_t i = 0; i < prompts.size(); ++i) std::printf("%s%s\n", a.chat ? "" : prompts[i].c_str(), results[i].text.c_str());
  }
  std::fflush(stdout);
  int total_gen = 0;
  for (size_t i = 0; i < results.size(); ++i) {
    const Result& r = results[i];
    total_gen += r.n_gen;
    if (!r.detail.empty()) std::fprintf(stderr, "%sstopped: %s\n", stream ? "" : fmt::format("[{}] ", i + 1).c_str(), r.detail.c_str());
    std::fprintf(stderr,
                 "%sload %.0f ms | prompt %d tokens, %.1f tokens/s | generated %d tokens, %.1f tokens/s | stop: %s | "
                 "KV held %.2f MiB%s (peak %.2f MiB), host tier %.2f MiB | %d threads\n",
                 stream ? "" : fmt::format("[{}] ", i + 1).c_str(), load_s * 1e3, r.n_prompt,
                 r.prompt_s > 0 ? r.n_prompt / r.prompt_s : 0.0, r.n_gen,
                 r.gen_s > 0 && r.n_gen > 1 ? (r.n_gen - 1) / r.gen_s : 0.0, r.finish.c_str(), r.held / 1048576.0, r.per_rank.c_str(),
                 r.peak / 1048576.0, r.host / 1048576.0, backends.threads());
  }
  if (!stream)
    std::fprintf(stderr, "%zu prompts, %d at once: %d tokens generated in %.2f s (%.1f tokens/s in all)\n",
                 prompts.size(), parallel, total_gen, run_s, run_s > 0 ? total_gen / run_s : 0.0);
}
}  // namespace

void register_run(CLI::App& app) {
  static RunArgs a;
  auto* cmd = app.add_subcommand("run", "generate text from a prompt (streams it, then prints speed)");
  cmd->add_option("-m,--model", a.model, "GGUF model file")->required();
  cmd->add_option("-p,--prompt", a.prompt, "prompt text");
  cmd->add_option("-f,--file", a.prompt_file, "read the prompt from this file");
  cmd->add_option("--prompts", a.prompts_file,
                  "run many prompts together: a file with one JSON string per line; results print in order");
  cmd->add_option("--parallel", a.parallel,
                  "sequences run at once (-np works too, as in llama.cpp; default: one, or with --prompts up to 16)")
      ->check(in_range({1, 4096}));
  cmd->add_flag("!--no-escape", a.escape, "take -p literally (by default \\n \\t \\\\ \\\" \\xHH in it are escapes, as in llama.cpp)");
  cmd->add_option("-n,--n-predict", a.n_predict, "tokens to generate (-1: until end of text or context, 0: only the prompt)")
      ->check(in_range({-1, double(kMaxContext)}))
      ->capture_default_str();
  cmd->add_option("-c,--ctx", a.n_ctx, "context size in tokens, like 4096 or 4k (0: the model's trained context)")
      ->transform(tokens_in("-c", 0, kMaxContext));
  add_threads_flag(cmd, a.threads);
  add_device_flag(cmd, a.device);
  add_tp_flag(cmd, a.tp);
  add_sampling_flags(cmd, a.sp);
  cmd->add_flag("--chat", a.chat, "wrap the prompt in the model's chat template");
  cmd->add_option("--system", a.system, "system message (with --chat)");
  cmd->add_option("--stop", a.stop, "stop string (repeatable)");
  add_kv_flags(cmd, a.kv);
  cmd->callback([cmd] {
    const int sources = int(cmd->count("-p") > 0) + int(!a.prompt_file.empty()) + int(!a.prompts_file.empty());
    if (sources == 0) fail("give a prompt with -p TEXT, -f FILE or --prompts FILE");
    if (sources > 1) fail("give one of -p, -f and --prompts");
    run(a);
  });
}

}  // namespace headroom::cli
