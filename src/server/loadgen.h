// A load generator for OpenAI-compatible servers (headroom's or llama-server): `clients` threads each send
// `requests` streaming /v1/completions one after another, with distinct prompts of about `prompt_words` words
// and `max_tokens` output tokens; it reports throughput and time to first token.
#pragma once

#include <cstdint>
#include <string>

namespace headroom::server {

struct LoadOptions {
  std::string url;        // http://host:port
  std::string model;      // the "model" field
  std::string api_key;
  int clients = 1;
  int requests = 2;       // per client
  int prompt_words = 1500;
  int max_tokens = 128;
  uint64_t seed = 1;
};

struct LoadResult {
  int ok = 0, failed = 0;
  int64_t prompt_tokens = 0, output_tokens = 0;
  double seconds = 0;
  double ttft_p50 = 0, ttft_p99 = 0;  // seconds
  std::string first_error;
};

// Throws Error (one line) for a URL it cannot use.
LoadResult run_load(const LoadOptions& o);

}  // namespace headroom::server
