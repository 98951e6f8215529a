// Generation loop for one sequence: prefill the prompt in chunks, then sample token by token, streaming the
// decoded text, until n_predict tokens, an end-of-generation token, a stop string, or a KV budget stop.
#pragma once

#include <functional>
#include <span>
#include <string>
#include <vector>

#include "engine/sampler.h"
#include "kv/kv_cache.h"
#include "model/model.h"

namespace headroom {

struct GenerateOptions {
  int n_predict = 128;                 // < 0: until end of generation or context
  int n_ctx = 0;                       // the sequence may not grow past this
  std::vector<std::string> stop;       // stop strings (not included in the output)
};

struct GenerateResult {
  std::vector<int32_t> tokens;         // generated ids (without the stop token)
  std::string text;
  std::string stop_reason;             // "length", "eog", "stop", "context", "budget: ..."
  int n_prompt = 0;
  double prompt_s = 0, gen_s = 0;      // wall time of prefill and of decoding
};

GenerateResult generate(Runner& runner, KVCache& kv, const Tokenizer& tok, std::span<const int32_t> prompt,
                        Sampler& sampler, const GenerateOptions& opt,
                        const std::function<void(const std::string&)>& on_text = {});

}  // namespace headroom
