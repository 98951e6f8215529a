// `headroom inspect MODEL` and `headroom tokenize -m MODEL -p TEXT`.
#include <cstdio>
#include <map>

#include "cli/common.h"
#include "model/config.h"
#include "tokenizer/tokenizer.h"
#include "util/error.h"
#include "util/escape.h"

namespace headroom::cli {

void register_inspect(CLI::App& app) {
  auto* cmd = app.add_subcommand("inspect", "print a GGUF file's metadata, tensor summary, parameter count and KV bytes per token");
  static std::string path;
  static bool all = false;
  cmd->add_option("model", path, "GGUF file")->required();
  cmd->add_flag("--all", all, "list every tensor and full arrays' first items");
  cmd->callback([] {
    auto f = gguf::File::open(path);
    std::printf("file: %s\nGGUF version %u, %zu metadata keys, %zu tensors, alignment %llu, %.2f MiB\n\n", path.c_str(),
                f->version(), f->metadata().size(), f->tensors().size(), (unsigned long long)f->alignment(),
                double(f->file_size()) / (1024.0 * 1024));
    std::printf("metadata:\n");
    for (const auto& [k, v] : f->metadata()) {
      std::string shown = v.to_string(all ? 16 : 6);
      if (k == "general.file_type" && v.is_int() && v.as_double() >= 0 && v.as_double() <= UINT32_MAX)
        if (const char* name = gguf::file_type_name(uint32_t(v.as_double()))) shown += fmt::format(" ({})", name);
      std::printf("  %-44s %s\n", k.c_str(), shown.c_str());
    }

    std::map<std::string, std::pair<int, uint64_t>> by_type;
    int64_t params = 0;
    for (const gguf::Tensor& t : f->tensors()) {
      auto& e = by_type[gguf::type_name(t.type)];
      e.first++;
      e.second += t.n_bytes;
      params += t.n_elements();
    }
    std::printf("\ntensors: %zu\n", f->tensors().size());
    for (const auto& [name, e] : by_type)
      std::printf("  %-6s %5d tensors  %10.2f MiB\n", name.c_str(), e.first, double(e.second) / (1024.0 * 1024));
    if (all)
      for (const gguf::Tensor& t : f->tensors())
        std::printf("  %-36s %-6s %s\n", t.name.c_str(), gguf::type_name(t.type), t.shape_string().c_str());
    std::printf("parameters: %lld (%.2f M)\n", (long long)params, double(params) / 1e6);

    if (f->has("general.architecture") && f->find_tensor("token_embd.weight")) {
      ModelConfig c = load_config(*f);
      std::printf("\nmodel: %s%s%s, %d layers, dim %d, %d heads x %d, %d KV heads (GQA %d:1), FFN %d, vocab %d\n",
                  c.arch.c_str(), c.name.empty() ? "" : " ", escape_control(c.name).c_str(), c.n_layer, c.n_embd, c.n_head,
                  c.head_dim, c.n_head_kv, c.n_group(), c.n_ff, c.n_vocab);
      std::printf("context %d (trained), rope theta %g, %s pairs%s, rms eps %g, %s output, %s\n", c.n_ctx_train,
                  c.rope_theta, c.rope_neox ? "NEOX" : "adjacent",
                  c.rope_scaling == RopeScaling::Linear  ? fmt::format(", linear scaling x{}", c.rope_scale_factor).c_str()
                  : c.rope_scaling == RopeScaling::Llama3 ? ", llama3 frequency factors"
                                                          : "",
                  c.rms_eps, c.tied_output ? "tied" : "separate", c.attn_bias ? "q/k/v biases" : "no biases");
      std::printf("KV bytes per token: %lld (f16, the default --kv-type), %lld (q8_0), %lld (f32); full context %d: "
                  "%.2f MiB (f16)\n",
                  (long long)c.kv_bytes_per_token(KVType::F16), (long long)c.kv_bytes_per_token(KVType::Q8_0),
                  (long long)c.kv_bytes_per_token(KVType::F32), c.n_ctx_train,
                  double(c.kv_bytes_per_token(KVType::F16)) * c.n_ctx_train / (1024.0 * 1024));
    }
    if (f->has("tokenizer.ggml.model")) {
      auto tok = Tokenizer::from_gguf(*f);
      std::printf("tokenizer: %s%s%s, %d tokens, bos %d, eos %d, add_bos %s\n", tok->model_kind().c_str(),
                  tok->pre().empty() ? "" : " / ", tok->pre().c_str(), tok->n_vocab(), tok->bos(), tok->eos(),
                  tok->add_bos() ? "yes" : "no");
      std::string tmpl = f->get_str("tokenizer.chat_template", "");
      if (!tmpl.empty()) {
        ChatTemplate ct = ChatTemplate::detect(tmpl);
        std::printf("chat template: %s%s\n", ct.name(), ct.recognised() ? "" : " (not recognised; plain fallback)");
      } else {
        std::printf("chat template: none\n");
      }
    }
  });
}

void register_tokenize(CLI::App& app) {
  auto* cmd = app.add_subcommand("tokenize", "print the token ids and pieces of a text");
  static std::string path, text;
  static bool no_bos = false, no_special = false;
  cmd->add_option("-m,--model", path, "GGUF file (model or vocab)")->required();
  cmd->add_option("-p,--prompt", text, "text to tokenize")->required();
  cmd->add_flag("--no-bos", no_bos, "do not add BOS even if the model adds it");
  cmd->add_flag("--no-special", no_special, "treat special token text as plain text");
  cmd->callback([] {
    auto f = gguf::File::open(path);
    auto tok = Tokenizer::from_gguf(*f);
    auto ids = tok->encode(text, tok->add_bos() && !no_bos, !no_special);
    for (int32_t id : ids) {
      std::printf("%8d  '%s'\n", id, escape_control(tok->token_to_piece(id, true)).c_str());
    }
    std::printf("%zu tokens\n", ids.size());
  });
}

}  // namespace headroom::cli
