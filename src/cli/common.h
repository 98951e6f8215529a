// Shared CLI pieces: the flags several commands take (KV, threads, context, sampling, seed) with their ranges,
// declared once here; the output-path check; the context warning.
#pragma once

#include <fcntl.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <cerrno>
#include <charconv>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <string>

#include "backend/registry.h"
#include "engine/kv_setup.h"
#include "kv/placement.h"
#include "engine/sampler.h"
#include "util/error.h"
#include "util/parse.h"

namespace headroom::cli {

inline constexpr int kMaxThreads = 512;

// A number in `r` (finite: CLI::Range lets nan through). Text that is no number at all is left to the option's
// own conversion, which rejects it.
inline CLI::Validator in_range(NumRange r) {
  return CLI::Validator(
      [r](std::string& s) -> std::string {
        double v = 0;
        if (!CLI::detail::lexical_cast(s, v)) return "";
        return r.check(v);
      },
      r.text());
}

// Each item of a comma list of whole numbers in `r` (for options with ->delimiter(',')); throws Error naming
// the flag, so a bad item reads the same whether it is no number or out of range.
inline CLI::Validator list_in_range(std::string flag, NumRange r) {
  return CLI::Validator(
      [flag, r](std::string& s) -> std::string {
        int64_t v = 0;
        auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
        if (s.empty() || ec != std::errc() || p != s.data() + s.size() || !r.check(double(v)).empty())
          fail("{} expects a comma-separated list of whole numbers in {}; {:?} is not one", flag, r.text(), s);
        return "";
      },
      fmt::format("LIST of {}", r.text()));
}

// A token count "4096" or "4k" in lo..hi, rewritten to digits for the option's conversion (parse_tokens).
inline CLI::Validator tokens_in(const std::string& flag, int64_t lo, int64_t hi) {
  return CLI::Validator(
      [flag, lo, hi](std::string& s) {
        s = std::to_string(parse_tokens(s, flag, lo, hi));
        return std::string();
      },
      fmt::format("TOKENS {}..{}", lo, hi));
}

// Thread count (0: one per physical core): one value, or a comma list for bench.
template <typename T>
CLI::Option* add_threads_flag(CLI::App* app, T& threads, const std::string& help = "threads (0: one per physical core)") {
  CLI::Option* o = app->add_option("-t,--threads", threads, help);
  if constexpr (std::is_arithmetic_v<T>) o->check(in_range({0, double(kMaxThreads)}));
  else o->delimiter(',')->check(list_in_range("-t", {0, double(kMaxThreads)}));
  return o->capture_default_str();
}

// A seed: a whole number 0..2^64-1 (CLI11's own conversion would wrap "-1" around).
inline CLI::Option* add_seed_flag(CLI::App* app, const std::string& name, uint64_t& seed, const std::string& help) {
  return app->add_option(name, seed, help)
      ->check(CLI::Validator(
          [](std::string& s) -> std::string {
            uint64_t v = 0;
            auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
            if (s.empty() || ec != std::errc() || p != s.data() + s.size())
              return fmt::format("{:?} is not a whole number in 0..18446744073709551615", s);
            return "";
          },
          "0..2^64-1"))
      ->capture_default_str();
}

inline CLI::Option* add_page_size_flag(CLI::App* app, int& page_size) {
  return app->add_option("--page-size", page_size, "KV page size in tokens")
      ->check(in_range({1, double(kMaxPageSize)}))
      ->capture_default_str();
}

inline CLI::Option* add_chunk_flag(CLI::App* app, int& chunk) {
  return app->add_option("--chunk", chunk, "prefill chunk size in tokens")
      ->check(in_range({1, double(kMaxChunk)}))
      ->capture_default_str();
}

// Sampling flags with the sampler's own ranges (SamplerParams::validate checks the same for other callers).
inline void add_sampling_flags(CLI::App* app, SamplerParams& sp) {
  using P = SamplerParams;
  app->add_option("--temp", sp.temp, "temperature (0 = greedy)")->check(in_range(P::temp_range))->capture_default_str();
  app->add_option("--top-k", sp.top_k, "top-k (0 = off)")->check(in_range(P::top_k_range))->capture_default_str();
  app->add_option("--top-p", sp.top_p, "top-p (1 = off)")->check(in_range(P::top_p_range))->capture_default_str();
  app->add_option("--min-p", sp.min_p, "min-p (0 = off)")->check(in_range(P::min_p_range))->capture_default_str();
  app->add_option("--repeat-penalty", sp.repeat_penalty, "repetition penalty (1 = off)")
      ->check(in_range(P::repeat_penalty_range))
      ->capture_default_str();
  app->add_option("--presence-penalty", sp.presence_penalty, "presence penalty")
      ->check(in_range(P::presence_penalty_range))
      ->capture_default_str();
  app->add_option("--frequency-penalty", sp.frequency_penalty, "frequency penalty")
      ->check(in_range(P::frequency_penalty_range))
      ->capture_default_str();
  app->add_option("--repeat-last-n", sp.penalty_last_n, "tokens the penalties look back over (0: all)")
      ->check(in_range(P::penalty_last_n_range))
      ->capture_default_str();
  add_seed_flag(app, "-s,--seed", sp.seed, "random seed (same seed, same output)");
}

inline void add_kv_flags(CLI::App* app, KVOptions& o, bool head_map_flag = true) {
  app->add_option("--kv-policy", o.policy, "KV policy for every head: full | streaming | topk | evict | auto (auto = --head-map)")
      ->capture_default_str();
  app->add_option("--kv-budget", o.budget,
                  "KV budget: tokens per KV head (1024), bytes (2GiB, 512MiB) or a share of the full cache (25%)")
      ->check(CLI::Validator([](std::string& s) { return (void)KVBudget::parse(s), std::string(); }, "BUDGET"));
  if (head_map_flag) app->add_option("--head-map", o.head_map, "per-head policy map (JSON) from `headroom profile`");
  app->add_option("--kv-pool", o.kv_pool,
                  "KV memory all sequences share, in bytes (4GiB, 512MiB); default: each sequence's whole budget, "
                  "at most half the free memory. Sequences that do not fit at once run in waves")
      ->check(CLI::Validator(
          [](std::string& s) {
            bool bytes = false;
            try {
              bytes = KVBudget::parse(s, "--kv-pool").kind == KVBudget::Kind::Bytes;
            } catch (const Error&) {
            }
            return bytes ? std::string() : fmt::format("{:?}: give bytes, like 4GiB or 512MiB", s);
          },
          "BYTES"));
  add_page_size_flag(app, o.page_size);
  add_chunk_flag(app, o.chunk);
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

// --device auto|cpu|cuda (auto: CUDA when a usable GPU is there, else the CPU).
inline void add_device_flag(CLI::App* app, std::string& device) {
  app->add_option("--device", device, "auto | cpu | cuda (auto: CUDA when this build has it and a GPU is usable)")
      ->check(CLI::IsMember({"auto", "cpu", "cuda"}))
      ->capture_default_str();
}
// The backend for --device; when it is a GPU, one line on stderr says which.
inline std::unique_ptr<Backend> backend_for(const std::string& device, int threads) {
  auto be = make_backend(device, threads);
  if (std::string_view(be->name()) != "cpu") std::fprintf(stderr, "%s\n", describe_device_choice(device).c_str());
  return be;
}

// -tp / --tensor-parallel N (main.cpp rewrites -tp: CLI11 declares no multi-letter short flag).
inline CLI::Option* add_tp_flag(CLI::App* app, int& tp) {
  return app
      ->add_option("--tensor-parallel", tp,
                   "tensor-parallel ranks (-tp works too): the model split by KV head over N ranks, at most the KV "
                   "heads per layer and dividing them (a --head-map may split unevenly and balances the KV bytes). "
                   "On the CPU the ranks are threads sharing --threads; on CUDA each rank takes a GPU (0 .. N-1) and the ranks "
                   "are joined by NCCL (found at run time: HEADROOM_NCCL_LIB or libnccl.so.2)")
      ->check(in_range({1, 128}))
      ->capture_default_str();
}

// The backends of `tp` ranks for --device (backend/registry.h: make_rank_backends). One rank: backend_for
// (which says which device it picked). Several: CPU ranks share --threads; CUDA ranks take one GPU each
// and are joined by NCCL.
struct RankBackends {
  std::vector<std::unique_ptr<Backend>> owned;
  std::vector<Backend*> ranks;
  Backend& first() { return *ranks[0]; }
  int threads() const {
    int t = 0;
    for (Backend* b : ranks) t += b->threads();
    return t;
  }
};
inline RankBackends backends_for(const std::string& device, int threads, int tp, bool quiet = false) {
  RankBackends rb;
  if (tp <= 1) {
    rb.owned.push_back(quiet ? make_backend(device, threads) : backend_for(device, threads));
  } else {
    std::string note;
    rb.owned = make_rank_backends(device, threads, tp, &note);
    if (!quiet && !note.empty()) std::fprintf(stderr, "%s\n", note.c_str());
  }
  for (auto& b : rb.owned) rb.ranks.push_back(b.get());
  return rb;
}

// The placement lines (one per rank) of a tensor-parallel stack, on stderr.
inline void print_placement(const TPPlan& tp) {
  if (tp.world <= 1) return;
  std::fprintf(stderr, "tensor parallel: KV heads %s\n",
               tp.balanced ? "placed by the head map's KV bytes" : "split contiguously, evenly");
  for (const std::string& l : tp.describe()) std::fprintf(stderr, "%s\n", l.c_str());
}

// The context to run at: `requested`, or the model's trained context for 0. Above the trained context is
// allowed (RoPE positions the model never saw), with one warning.
inline int64_t context_for(int64_t requested, const ModelConfig& c) {
  const int64_t n_ctx = requested > 0 ? requested : c.n_ctx_train;
  if (n_ctx > c.n_ctx_train)
    std::fprintf(stderr, "warning: a context of %lld tokens is beyond the model's trained context of %d; quality may drop\n",
                 static_cast<long long>(n_ctx), c.n_ctx_train);
  return n_ctx;
}

// Before any compute: `path` (a file) can be written. An existing file keeps its content; a new one is removed.
inline void check_output_file(const std::string& path, const char* flag) {
  std::error_code ec;
  const bool existed = std::filesystem::exists(path, ec);
  // O_NONBLOCK: a FIFO without a reader fails instead of blocking.
  const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_NONBLOCK | O_CLOEXEC, 0644);
  if (fd < 0) fail("{} {:?}: cannot write there: {}", flag, path, std::strerror(errno));
  ::close(fd);
  if (!existed) ::unlink(path.c_str());
}

// Before any compute: `dir` exists (it is created) and a file can be made in it.
inline void check_output_dir(const std::string& dir, const char* flag) {
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) fail("{} {:?}: cannot create the folder: {}", flag, dir, ec.message());
  std::string probe = dir + "/.headroom-write-test-XXXXXX";
  const int fd = ::mkstemp(probe.data());
  if (fd < 0) fail("{} {:?}: cannot write in the folder: {}", flag, dir, std::strerror(errno));
  ::close(fd);
  ::unlink(probe.c_str());
}

void register_inspect(CLI::App& app);
void register_tokenize(CLI::App& app);
void register_run(CLI::App& app);
void register_bench(CLI::App& app);
void register_synth(CLI::App& app);
void register_profile(CLI::App& app);
void register_eval(CLI::App& app);
void register_serve(CLI::App& app);

}  // namespace headroom::cli
