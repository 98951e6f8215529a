// `headroom profile`: measure every KV head's retrieval score and streaming error, write the head map (JSON)
// and a PNG heat map of the scores.
#include <cstdio>

#include "cli/common.h"
#include "eval/plot.h"
#include "profile/profiler.h"
#include "profile/summary.h"
#include "util/error.h"

namespace headroom::cli {

void register_profile(CLI::App& app) {
  static std::string model_path, out = "heads.json", target = "25%", shared = "../shared", png, prefill = "auto";
  static int threads = 0;
  static std::string device = "auto";
  static profile::Options o;
  auto* cmd = app.add_subcommand("profile", "find each KV head's role (retrieval vs streaming) and write a head map");
  cmd->add_option("-m,--model", model_path, "GGUF model file")->required();
  cmd->add_option("-o,--output", out, "head map JSON to write")->capture_default_str();
  cmd->add_option("--target-budget", target, "share of the full KV bytes the map must fit (e.g. 25%)")
      ->check(CLI::Validator(
          [](std::string& s) {
            if (KVBudget::parse(s, "--target-budget").kind != KVBudget::Kind::Percent)
              fail("--target-budget {:?} must be a percentage like 25%", s);
            return std::string();
          },
          "PERCENT"))
      ->capture_default_str();
  cmd->add_option("--ctx", o.ctx, "probe length in tokens, like 4096 or 4k (0: the trained context)")
      ->transform(tokens_in("--ctx", 0, kMaxContext));
  cmd->add_option("--probes", o.retrieval_prompts, "needle-copy prompts (retrieval score)")
      ->check(in_range({1, 100000}))
      ->capture_default_str();
  cmd->add_option("--natural", o.natural_prompts, "natural-text prompts (streaming error)")
      ->check(in_range({0, 100000}))
      ->capture_default_str();
  cmd->add_flag("!--no-fill-windows", o.fill_windows,
               "make as many heads full as fit (at --window) instead of only the retrieval heads + wider windows");
  cmd->add_option("--ablation", o.ablation_probes, "needle prompts for the per-head ablation (0: skip)")
      ->check(in_range({0, 100000}))
      ->capture_default_str();
  cmd->add_option("--sinks", o.sinks, "sink tokens of streaming heads")->check(in_range({0, 4096}))->capture_default_str();
  cmd->add_option("--window", o.window, "recent window of streaming heads")
      ->check(in_range({16, double(kMaxContext)}))
      ->capture_default_str();
  add_page_size_flag(cmd, o.page_size);
  cmd->add_option("--prefill", prefill,
                  "streaming heads' prefill written into the map: auto (teacher-forced exact match of the map on "
                  "--prefill-probes needle prompts with window and with whole-prompt prefill; offload if window keeps "
                  "less than 1 - --prefill-tolerance of full's), window, full or offload")
      ->check(CLI::IsMember({"auto", "window", "full", "offload"}))
      ->capture_default_str();
  cmd->add_option("--prefill-tolerance", o.prefill_tolerance, "share of full attention's exact matches windowed prefill may lose (auto)")
      ->check(in_range({0, 1}))
      ->capture_default_str();
  cmd->add_option("--prefill-probes", o.prefill_probes, "needle prompts for the prefill choice (auto)")
      ->check(in_range({1, 100000}))
      ->capture_default_str();
  add_seed_flag(cmd, "--seed", o.seed, "probe seed");
  cmd->add_option("--png", png, "heat map of the scores (default: OUTPUT with .png)");
  cmd->add_option("--shared", shared, "shared data folder (haystack corpus, key words)")->capture_default_str();
  add_threads_flag(cmd, threads);
  add_device_flag(cmd, device);
  cmd->callback([] {
    KVBudget b = KVBudget::parse(target, "--target-budget");
    if (o.ctx != 0 && o.ctx < 64) fail("--ctx {} is out of range (0 for the trained context, or 64..{})", o.ctx, kMaxContext);
    if (png.empty()) png = out.substr(0, out.rfind('.')) + ".png";
    const std::string png_streaming = png.substr(0, png.rfind('.')) + "-streaming.png";
    check_output_file(out, "-o");
    check_output_file(png, "--png");
    check_output_file(png_streaming, "--png");
    auto model = Model::load(model_path);
    const ModelConfig& c = model->config();
    const int ctx = int(context_for(o.ctx, c));
    auto be = backend_for(device, threads);
    eval::TaskGen gen = eval::TaskGen::from_shared(model->tokenizer(), shared);
    std::fprintf(stderr, "profile: %d layers x %d KV heads, %d + %d probes of %d tokens\n", c.n_layer, c.n_head_kv,
                 o.retrieval_prompts, o.natural_prompts, ctx);
    profile::Scores s = profile::measure(*model, *be, gen, o, [](int done, int total, const std::string& what) {
      const int w = 30, filled = w * done / total;
      std::fprintf(stderr, "\r[%s%s] %d/%d %s      ", std::string(filled, '#').c_str(), std::string(w - filled, '.').c_str(),
                   done, total, what.c_str());
      if (done == total) std::fprintf(stderr, "\n");
    });
    HeadMap map = profile::assign(model->identity(), s, b.value / 100.0, ctx, o);
    std::string prefill_note;
    if (prefill == "auto") {
      // Windowed prefill is cheapest; keep it unless it costs the map's answers (a model that was trained with
      // full attention may build its needle representations with heads that are streaming at decode).
      std::fprintf(stderr, "prefill: %d probes, every head full / the map with window prefill / with whole-prompt prefill ...\n",
                   o.prefill_probes);
      profile::AnswerProbes probes(*model, gen, o.prefill_probes, ctx, o.seed + 12000);
      profile::PrefillChoice ch = profile::choose_prefill(probes, *be, map.specs(), o);
      o.prefill = ch.mode;
      prefill_note = profile::prefill_note(ch);
    } else {
      o.prefill = parse_prefill_mode(prefill);
      prefill_note = profile::prefill_note(prefill);
    }
    map = profile::assign(model->identity(), s, b.value / 100.0, ctx, o);
    map.note = profile::map_note(s, o, map.note, prefill_note);
    map.save(out);
    std::printf("%s%s\nwrote %s\n", profile::head_table(map).c_str(), map.note.c_str(), out.c_str());
    for (auto [which, path] : {std::pair{profile::HeadScore::Retrieval, png},
                               std::pair{profile::HeadScore::StreamingError, png_streaming}}) {
      plot::heatmap(path, profile::score_heatmap(map, which));
      std::printf("wrote %s\n", path.c_str());
    }
  });
}

}  // namespace headroom::cli
