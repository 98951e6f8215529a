// Shared CLI pieces: KV flags, thread flag, loading with timing.
#pragma once

#include <CLI/CLI.hpp>
#include <string>

#include "engine/kv_setup.h"

namespace headroom::cli {

inline void add_kv_flags(CLI::App* app, KVOptions& o) {
  app->add_option("--kv-policy", o.policy, "KV policy for every head: full | streaming | topk | evict | auto (auto = --head-map)")
      ->capture_default_str();
  app->add_option("--kv-budget", o.budget,
                  "KV budget: tokens per KV head (1024), bytes (2GiB, 512MiB) or a share of the full cache (25%)");
  app->add_option("--head-map", o.head_map, "per-head policy map (JSON) from `headroom profile`");
  app->add_option("--page-size", o.page_size, "KV page size in tokens")->capture_default_str();
  app->add_option("--chunk", o.chunk, "prefill chunk size in tokens")->capture_default_str();
  app->add_option("--prefill", o.prefill,
                  "what streaming heads attend while the prompt is prefilled: window (sinks + window; device peak = "
                  "window + chunk), full (the whole prompt on the device, cut to the window when it ends), offload "
                  "(the whole prompt, pages past the window parked in the host tier until it ends); default: the "
                  "head map's choice, else window")
      ->check(CLI::IsMember({"window", "full", "offload"}));
  app->add_option("--kv-type", o.kv_type,
                  "type the KV cache stores K and V in: f16 (default, as llama.cpp), bf16, f32, q8_0 (half of f16)")
      ->capture_default_str();
  app->add_option("--cache-type-k,--ctk", o.cache_type_k, "llama.cpp's name for the K type (-ctk works too); must equal V's");
  app->add_option("--cache-type-v,--ctv", o.cache_type_v, "llama.cpp's name for the V type (-ctv works too); must equal K's");
}

void register_inspect(CLI::App& app);
void register_tokenize(CLI::App& app);
void register_run(CLI::App& app);
void register_bench(CLI::App& app);
void register_synth(CLI::App& app);
void register_profile(CLI::App& app);
void register_eval(CLI::App& app);

}  // namespace headroom::cli
