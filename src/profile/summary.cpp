#include "profile/summary.h"

#include <algorithm>

#include <fmt/format.h>

namespace headroom::profile {

std::string prefill_note(const PrefillChoice& ch) {
  return fmt::format("; prefill {} (teacher-forced exact match on {} probes: every head full {}, the map "
                     "with window prefill {}, with whole-prompt prefill {})",
                     prefill_mode_name(ch.mode), ch.n, ch.full.exact, ch.window.exact, ch.offload.exact);
}

std::string prefill_note(const std::string& set_by_flag) {
  return fmt::format("; prefill {} (set by --prefill)", set_by_flag);
}

std::string map_note(const Scores& s, const Options& o, const std::string& assign_note, const std::string& prefill) {
  return fmt::format("headroom profile: {} copy steps over {} probes; ", s.copy_steps, o.retrieval_prompts) +
         assign_note + prefill;
}

std::string head_table(const HeadMap& map) {
  std::string out = fmt::format("{:<6} {:<8} {:<10} {:<10} {:<10} {:<10} {:<10} {}\n", "layer", "kv_head", "retrieval",
                                "ablation", "gain", "stream_err", "query_err", "policy");
  for (int l = 0; l < map.n_layer(); ++l)
    for (int h = 0; h < map.n_head_kv(); ++h) {
      const HeadEntry& e = map.at(l, h);
      out += fmt::format("{:<6} {:<8} {:<10.3f} {:<10.3f} {:<10.3f} {:<10.4f} {:<10.4f} {}\n", l, h, e.retrieval_score,
                         e.ablation, e.gain, e.streaming_error, e.query_error, policy_name(e.spec.kind));
    }
  return out;
}

plot::Heatmap score_heatmap(const HeadMap& map, HeadScore which) {
  plot::Heatmap h;
  h.title = which == HeadScore::Retrieval ? "Retrieval score per KV head" : "Streaming error per KV head (relative L2)";
  h.x_label = "KV head";
  h.y_label = "layer";
  for (int k = 0; k < map.n_head_kv(); ++k) h.x_ticks.push_back(std::to_string(k));
  h.v_min = 0;
  h.v_max = 0;
  for (int l = 0; l < map.n_layer(); ++l) {
    h.y_ticks.push_back(std::to_string(l));
    std::vector<double> row;
    for (int k = 0; k < map.n_head_kv(); ++k) {
      const double v = which == HeadScore::Retrieval ? map.at(l, k).retrieval_score : map.at(l, k).streaming_error;
      row.push_back(v);
      h.v_max = std::max(h.v_max, v);
    }
    h.values.push_back(row);
  }
  if (h.v_max <= 0) h.v_max = 1;
  h.colormap = plot::Colormap::Viridis;
  return h;
}

}  // namespace headroom::profile
