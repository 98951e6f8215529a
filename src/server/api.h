// The OpenAI wire format: requests parsed and checked into ApiRequest (any problem is an ApiError with its
// HTTP status, as OpenAI sends it), and the JSON of responses, stream chunks and errors.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "engine/sampler.h"
#include "tokenizer/tokenizer.h"

namespace headroom::server {

// An error a client caused: the HTTP status and OpenAI's error object.
struct ApiError : std::runtime_error {
  int status;
  std::string type, code, param;
  ApiError(int status, std::string message, std::string code = "", std::string param = "",
           std::string type = "invalid_request_error")
      : std::runtime_error(std::move(message)), status(status), type(std::move(type)), code(std::move(code)),
        param(std::move(param)) {}
};
std::string error_json(const ApiError& e);

struct ApiRequest {
  bool chat = false;
  std::string model;
  std::string prompt;                 // /v1/completions
  std::vector<ChatMessage> messages;  // /v1/chat/completions
  std::optional<int> max_tokens;      // max_tokens / max_completion_tokens (none: to the end of the context)
  SamplerParams sampling;
  bool seeded = false;                // a seed was given
  std::vector<std::string> stop;
  bool stream = false, include_usage = false;
  bool ignore_eos = false;            // llama.cpp's extension: end-of-generation tokens do not end it
  bool logprobs = false;
  int top_logprobs = 0;
  // headroom's extensions, checked against the server's limits by the server.
  std::string kv_policy, kv_budget, head_map;
};

// Parses and checks a request body (throws ApiError 400 naming the field).
ApiRequest parse_request(const std::string& body, bool chat);

// One generated token with its log-probability and the most likely alternatives (for logprobs).
struct TokenLogprob {
  std::string text;
  double logprob = 0;
  std::vector<std::pair<std::string, double>> top;
};

// Response JSON.
struct ResponseHead {
  std::string id, model;
  int64_t created = 0;
  bool chat = false;
};
nlohmann::json usage_json(int prompt_tokens, int completion_tokens);
nlohmann::json logprobs_json(bool chat, const std::vector<TokenLogprob>& lps);
// The whole response of a non-streaming request.
std::string response_json(const ResponseHead& h, const std::string& text, const char* finish_reason,
                          const std::vector<TokenLogprob>* lps, int prompt_tokens, int completion_tokens);
// One SSE event "data: {...}\n\n": a piece of text (chat: the first one carries the role), the final chunk with
// the finish reason, or the usage chunk (choices: []).
std::string chunk_sse(const ResponseHead& h, const std::string& text, const char* finish_reason, bool first,
                      const std::vector<TokenLogprob>* lps);
std::string usage_sse(const ResponseHead& h, int prompt_tokens, int completion_tokens);

// A client's side of SSE: appends bytes to `buf` and calls on_data(payload) for every complete "data: ..."
// event in it (payload without the prefix, "[DONE]" included), keeping an incomplete tail. Returns false as
// soon as on_data does.
bool read_sse(std::string& buf, const char* bytes, size_t n, const std::function<bool(const std::string&)>& on_data);

}  // namespace headroom::server
