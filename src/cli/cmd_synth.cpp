// `headroom synth`: write a random-weight model of a real shape (for speed work only; its text is noise),
// with a real vocabulary copied from a GGUF vocab/model file.
#include <cmath>
#include <cstdio>
#include <cstring>

#include "cli/common.h"
#include "gguf/gguf.h"
#include "kv/head_map.h"
#include "model/model.h"
#include "util/error.h"

namespace headroom::cli {

namespace {
struct Shape {
  const char* name;
  const char* arch;
  int n_embd, n_layer, n_head, n_head_kv, n_ff, ctx;
  float theta;
  bool tied;
  const char* default_vocab;  // relative to ../shared
};
const Shape kShapes[] = {
    {"llama3-8b", "llama", 4096, 32, 32, 8, 14336, 131072, 500000.f, false, "testdata/vocab/ggml-vocab-llama-bpe.gguf"},
    {"llama3-1b", "llama", 2048, 16, 32, 8, 8192, 131072, 500000.f, true, "testdata/vocab/ggml-vocab-llama-bpe.gguf"},
    {"qwen2-0.5b", "qwen2", 896, 24, 14, 2, 4864, 32768, 1000000.f, true, "testdata/vocab/ggml-vocab-qwen2.gguf"},
    {"tiny", "llama", 256, 8, 4, 2, 768, 4096, 10000.f, true, "models/retrieval-14m-q8_0.gguf"},
};

uint16_t f32_to_f16(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  uint32_t sign = (x >> 16) & 0x8000;
  int32_t e = int32_t((x >> 23) & 0xFF) - 127 + 15;
  uint32_t m = x & 0x7FFFFF;
  if (e <= 0) return uint16_t(sign);  // flush tiny values to zero (fine for random weights)
  if (e >= 31) return uint16_t(sign | 0x7C00);
  return uint16_t(sign | (uint32_t(e) << 10) | (m >> 13));
}

// Deterministic fast generator (xorshift64*), one stream per tensor.
struct Rng {
  uint64_t s;
  explicit Rng(uint64_t seed) : s(seed * 0x9E3779B97F4A7C15ull + 1) {}
  uint64_t next() {
    s ^= s >> 12; s ^= s << 25; s ^= s >> 27;
    return s * 2685821657736338717ull;
  }
  float uniform() { return float(next() >> 40) / float(1 << 24) * 2.0f - 1.0f; }  // [-1, 1)
};

gguf::Writer::Generator random_gen(DType type, uint64_t seed, float amp) {
  auto rng = std::make_shared<Rng>(seed);
  return [type, rng, amp](uint8_t* dst, size_t n) {
    switch (type) {
      case DType::F32:
        for (size_t i = 0; i + 4 <= n; i += 4) { float v = amp * rng->uniform(); std::memcpy(dst + i, &v, 4); }
        break;
      case DType::F16:
        for (size_t i = 0; i + 2 <= n; i += 2) { uint16_t h = f32_to_f16(amp * rng->uniform()); std::memcpy(dst + i, &h, 2); }
        break;
      case DType::BF16:
        for (size_t i = 0; i + 2 <= n; i += 2) {
          float v = amp * rng->uniform(); uint32_t x; std::memcpy(&x, &v, 4); uint16_t h = uint16_t(x >> 16);
          std::memcpy(dst + i, &h, 2);
        }
        break;
      case DType::Q8_0:  // blocks of 34 bytes: fp16 scale, 32 int8 (pieces are multiples of the block size)
        for (size_t i = 0; i + 34 <= n; i += 34) {
          uint16_t d = f32_to_f16(amp / 127.0f);
          std::memcpy(dst + i, &d, 2);
          for (int k = 0; k < 32; k += 8) { uint64_t r = rng->next(); std::memcpy(dst + i + 2 + k, &r, 8); }
        }
        break;
      default: fail("synth: unsupported type");
    }
  };
}
}  // namespace

void register_synth(CLI::App& app) {
  static std::string shape = "llama3-1b", type = "f16", out, vocab, shared = "../shared";
  static int layers = 0, ctx = 0;
  static uint64_t seed = 1;
  static std::string map_out;
  static double map_full = 0.25;
  static int map_sinks = 64, map_window = 1024, map_topk_tokens = 4096;
  static std::string map_rest = "streaming";
  auto* cmd = app.add_subcommand("synth", "write a random-weight model of a real shape (for speed tests only)");
  cmd->add_option("--shape", shape, "llama3-8b | llama3-1b | qwen2-0.5b | tiny")->capture_default_str();
  cmd->add_option("--type", type, "weight type: f32 | f16 | bf16 | q8_0")->capture_default_str();
  cmd->add_option("-o,--output", out, "output GGUF file")->required();
  cmd->add_option("--vocab", vocab, "GGUF file whose tokenizer.* metadata to copy (default: by shape, from --shared)");
  cmd->add_option("--shared", shared, "the shared data folder")->capture_default_str();
  cmd->add_option("--layers", layers, "override the layer count");
  cmd->add_option("--ctx", ctx, "override the context length");
  cmd->add_option("--seed", seed, "random seed")->capture_default_str();
  cmd->add_option("--head-map", map_out,
                  "also write a head map FILE for the model: --map-full of the KV heads full (spread over the heads "
                  "of each layer), the rest --map-rest (streaming: --map-sinks, --map-window, prefill window)");
  cmd->add_option("--map-full", map_full, "--head-map: share of KV heads kept full")->check(CLI::Range(0.0, 1.0))->capture_default_str();
  cmd->add_option("--map-sinks", map_sinks, "--head-map: streaming heads' sink tokens")->check(CLI::Range(0, 1 << 20))->capture_default_str();
  cmd->add_option("--map-window", map_window, "--head-map: streaming heads' window")->check(CLI::Range(1, 1 << 24))->capture_default_str();
  cmd->add_option("--map-rest", map_rest,
                  "--head-map: the policy of the heads that are not full: streaming, or topk (Quest pages chosen per "
                  "step within --map-topk-tokens, the other pages offloaded to the host tier; --map-sinks/--map-window "
                  "are streaming's)")
      ->check(CLI::IsMember({"streaming", "topk"}))
      ->capture_default_str();
  cmd->add_option("--map-topk-tokens", map_topk_tokens,
                  "--head-map with --map-rest topk: tokens a topk head reads per decode step (its sink page, 2 recent "
                  "pages and the chosen ones, pages of 32 tokens)")
      ->check(CLI::Range(128, 1 << 24))
      ->capture_default_str();
  cmd->callback([] {
    const Shape* s = nullptr;
    for (const Shape& k : kShapes)
      if (shape == k.name) s = &k;
    if (!s) fail("unknown --shape '{}' (llama3-8b, llama3-1b, qwen2-0.5b, tiny)", shape);
    DType wt;
    if (type == "f32") wt = DType::F32;
    else if (type == "f16") wt = DType::F16;
    else if (type == "bf16") wt = DType::BF16;
    else if (type == "q8_0") wt = DType::Q8_0;
    else fail("unsupported --type '{}' (f32, f16, bf16, q8_0)", type);
    if (layers < 0 || ctx < 0) fail("--layers and --ctx must be positive");
    const int L = layers ? layers : s->n_layer;
    const int C = ctx ? ctx : s->ctx;
    const std::string vpath = vocab.empty() ? shared + "/" + s->default_vocab : vocab;
    auto vf = gguf::File::open(vpath);
    const int64_t n_vocab = int64_t(vf->get_str_arr("tokenizer.ggml.tokens").size());

    gguf::Writer w;
    const std::string a = s->arch;
    w.add("general.architecture", gguf::Value::of_str(a));
    w.add("general.name", gguf::Value::of_str(std::string("synth-") + s->name + "-" + type));
    w.add(a + ".context_length", gguf::Value::of_u32(C));
    w.add(a + ".embedding_length", gguf::Value::of_u32(s->n_embd));
    w.add(a + ".block_count", gguf::Value::of_u32(L));
    w.add(a + ".feed_forward_length", gguf::Value::of_u32(s->n_ff));
    w.add(a + ".attention.head_count", gguf::Value::of_u32(s->n_head));
    w.add(a + ".attention.head_count_kv", gguf::Value::of_u32(s->n_head_kv));
    w.add(a + ".attention.layer_norm_rms_epsilon", gguf::Value::of_f32(1e-5f));
    w.add(a + ".rope.freq_base", gguf::Value::of_f32(s->theta));
    w.add("general.file_type", gguf::Value::of_u32(*gguf::file_type_of(wt)));  // every --type has one
    for (const auto& [k, v] : vf->metadata())
      if (k.rfind("tokenizer.", 0) == 0) w.add(k, v);

    const int64_t D = s->n_embd, HD = D / s->n_head, KV = int64_t(s->n_head_kv) * HD, F = s->n_ff;
    uint64_t sd = seed * 1000;
    const float amp = 0.035f;  // uniform(-a, a): std 0.02, like a trained model's init
    auto ones = [](uint8_t* dst, size_t n) { for (size_t i = 0; i + 4 <= n; i += 4) { float o = 1.0f; std::memcpy(dst + i, &o, 4); } };
    w.add_tensor("token_embd.weight", wt, {D, n_vocab}, random_gen(wt, ++sd, amp));
    w.add_tensor("output_norm.weight", DType::F32, {D}, ones);
    if (!s->tied) w.add_tensor("output.weight", wt, {D, n_vocab}, random_gen(wt, ++sd, amp));
    for (int l = 0; l < L; ++l) {
      const std::string b = "blk." + std::to_string(l) + ".";
      w.add_tensor(b + "attn_norm.weight", DType::F32, {D}, ones);
      w.add_tensor(b + "attn_q.weight", wt, {D, D}, random_gen(wt, ++sd, amp));
      w.add_tensor(b + "attn_k.weight", wt, {D, KV}, random_gen(wt, ++sd, amp));
      w.add_tensor(b + "attn_v.weight", wt, {D, KV}, random_gen(wt, ++sd, amp));
      if (a == "qwen2") {
        w.add_tensor(b + "attn_q.bias", DType::F32, {D}, random_gen(DType::F32, ++sd, amp));
        w.add_tensor(b + "attn_k.bias", DType::F32, {KV}, random_gen(DType::F32, ++sd, amp));
        w.add_tensor(b + "attn_v.bias", DType::F32, {KV}, random_gen(DType::F32, ++sd, amp));
      }
      w.add_tensor(b + "attn_output.weight", wt, {D, D}, random_gen(wt, ++sd, amp));
      w.add_tensor(b + "ffn_norm.weight", DType::F32, {D}, ones);
      w.add_tensor(b + "ffn_gate.weight", wt, {D, F}, random_gen(wt, ++sd, amp));
      w.add_tensor(b + "ffn_up.weight", wt, {D, F}, random_gen(wt, ++sd, amp));
      w.add_tensor(b + "ffn_down.weight", wt, {F, D}, random_gen(wt, ++sd, amp));
    }
    std::fprintf(stderr, "synth: writing %s (%s, %d layers, %s, vocab %lld from %s) ...\n", out.c_str(), s->name, L,
                 type.c_str(), (long long)n_vocab, vpath.c_str());
    w.write(out);
    std::fprintf(stderr, "synth: done\n");
    if (!map_out.empty()) {
      auto m = Model::load(out);
      PolicySpec st;
      st.kind = PolicyKind::Streaming;
      st.sinks = map_sinks;
      st.window = map_window;
      st.prefill = PrefillMode::Window;
      if (map_rest == "topk")  // the budget as topk's own uniform spec (offloading), in pages of the default size
        st = uniform_spec(PolicyKind::TopK, map_topk_tokens, KVOptions{}.page_size, "--map-topk-tokens");
      HeadMap map = HeadMap::uniform(m->identity(), st);
      const int nkv = m->config().n_head_kv, total = L * nkv;
      const int n_full = int(std::lround(map_full * total));
      // Full heads spread evenly over the (layer, head) grid, shifted per layer so no head index is favoured.
      for (int i = 0; i < n_full; ++i) {
        const int k = int(int64_t(i) * total / std::max(1, n_full));
        map.at(k / nkv, (k % nkv + k / nkv) % nkv).spec = PolicySpec{};  // full
      }
      map.note = map_rest == "topk"
                     ? fmt::format("headroom synth: {} of {} KV heads full, the rest topk ({} tokens per step: the "
                                   "sink page, {} chosen and {} recent pages of {}; the others offloaded)",
                                   map.count(PolicyKind::Full), total, map_topk_tokens, st.topk_pages,
                                   st.recent_pages, KVOptions{}.page_size)
                     : fmt::format("headroom synth: {} of {} KV heads full, the rest streaming (sinks {}, window {}, "
                                   "prefill window)", map.count(PolicyKind::Full), total, map_sinks, map_window);
      map.save(map_out);
      std::fprintf(stderr, "synth: %s\n", map.note.c_str());
    }
  });
}

}  // namespace headroom::cli
