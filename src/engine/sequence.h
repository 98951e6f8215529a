// Sequence: one request's state in the engine — its tokens (prompt, then generated), its KV cache (per-head
// page lists), its sampler and RNG, stop strings and the streaming decoder, timings and how it finished.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "engine/sampler.h"
#include "kv/kv_cache.h"
#include "tokenizer/tokenizer.h"

namespace headroom {

enum class FinishReason : uint8_t {
  None,
  Length,   // n_predict tokens
  Eog,      // an end-of-generation token
  Stop,     // a stop string
  Context,  // the context is full
  Budget,   // the sequence's own KV budget is spent
  Pool,     // the shared KV pool cannot hold it (even alone)
  Abort,    // the caller aborted it
};
const char* finish_reason_name(FinishReason r);  // "length", "eog", "stop", "context", "budget", "pool", "abort"

// What a caller asks for.
struct Request {
  std::vector<int32_t> prompt;
  SamplerParams sampling;
  int n_predict = 128;           // tokens to generate; < 0: until end of generation or context
  int n_ctx = 0;                 // the sequence may not grow past this many tokens (0: no limit)
  std::vector<std::string> stop; // stop strings (not included in the text)
  std::vector<int32_t> forced;   // teacher forcing: generated token i is forced[i] instead of a sample
  bool ignore_eos = false;       // end-of-generation tokens do not end it
  bool keep = false;             // at the end, keep the cache: the sequence idles until extend() or release()
  const std::vector<PolicySpec>* specs = nullptr;  // [layer * n_head_kv + kv_head]; must outlive the sequence
  int64_t max_device_pages = -1; // the sequence's own KV budget (-1: only the pool limits it)
  int64_t tag = 0;               // the caller's
};

struct Sequence {
  enum class State : uint8_t { Waiting, Running, Parked, Idle, Finished };

  int64_t id = 0;
  Request req;
  State state = State::Waiting;
  std::vector<int32_t> tokens;   // prompt, then generated tokens
  int n_prompt = 0;              // tokens[0, n_prompt) are prompt: prefilled in chunks
  int n_cached = 0;              // tokens in the KV cache
  int n_generated = 0;
  std::unique_ptr<KVCache> kv;
  std::unique_ptr<Sampler> sampler;
  std::unique_ptr<StreamDecoder> decoder;
  std::string text;              // generated text so far (stop strings cut)
  std::string pending;           // text held back while it could be the start of a stop string
  FinishReason finish = FinishReason::None;
  std::string finish_detail;     // the one-line reason for budget / pool ends
  double t_added = 0, t_started = 0, t_first_token = 0, t_finished = 0;  // seconds (steady clock)

  bool prefilling() const { return n_cached < n_prompt; }
  int prompt_left() const { return n_prompt - n_cached; }
  double prompt_seconds() const { return t_first_token > 0 ? t_first_token - t_started : 0; }
  double gen_seconds() const { return t_finished > t_first_token && t_first_token > 0 ? t_finished - t_first_token : 0; }
};

}  // namespace headroom
