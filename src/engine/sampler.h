// Sampler: turns a row of logits into the next token. Order (as llama.cpp's default chain): repetition /
// presence / frequency penalties over the recent tokens, then greedy if temp <= 0, else top-k, top-p, min-p,
// temperature, and a draw from a seeded generator (same seed, same output).
#pragma once

#include <cstdint>
#include <random>
#include <span>
#include <vector>

#include "util/parse.h"

namespace headroom {

struct SamplerParams {
  float temp = 0.8f;            // 0: greedy
  int top_k = 40;               // <= 0: off
  float top_p = 0.95f;          // >= 1: off
  float min_p = 0.05f;          // <= 0: off
  float repeat_penalty = 1.0f;  // 1: off (llama.cpp semantics: divide positive logits, multiply negative)
  float presence_penalty = 0.0f;
  float frequency_penalty = 0.0f;
  int penalty_last_n = 64;       // <= 0: the whole history
  uint64_t seed = 0xC0FFEE;

  // The allowed ranges, used by validate() and by the CLI flags (src/cli/common.h).
  static constexpr NumRange temp_range{0, 100}, top_k_range{0, 2147483647}, top_p_range{0, 1}, min_p_range{0, 1},
                            repeat_penalty_range{0, 100, true}, presence_penalty_range{-2, 2},
                            frequency_penalty_range{-2, 2}, penalty_last_n_range{0, double(kMaxContext)};
  // Throws Error naming the first parameter (as its CLI flag) that is out of its range; the Sampler calls it.
  void validate() const;
};

class Sampler {
 public:
  explicit Sampler(const SamplerParams& p);
  // `history`: the tokens so far (prompt and generated) for penalties.
  int32_t sample(std::span<const float> logits, std::span<const int32_t> history);
  static int32_t argmax(std::span<const float> logits);
  // The ids that top-k, top-p and min-p keep for these logits (penalties are sample()'s), ascending.
  std::vector<int32_t> kept(std::span<const float> logits);
  // log softmax(logits)[id], in double precision.
  static double log_prob(std::span<const float> logits, int32_t id);

 private:
  void keep_candidates(std::span<const float> logits);  // the candidates the cuts keep, into cand_
  int32_t draw();                                       // one of cand_, at the temperature
  SamplerParams p_;
  std::mt19937_64 rng_;
  std::vector<std::pair<float, int32_t>> cand_;
  std::vector<float> work_;
};

}  // namespace headroom
