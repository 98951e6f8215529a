#include "server/loadgen.h"

#include <httplib.h>

#include <algorithm>
#include <chrono>
#include <mutex>
#include <random>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "server/api.h"
#include "util/error.h"

namespace headroom::server {

namespace {

// Plain English-like text from a fixed word list: distinct per (client, request), so no server can reuse a
// cached prefix of another request.
std::string prompt_text(int words, uint64_t seed) {
  static const char* const kWords[] = {
      "the", "river", "ran", "past", "old", "mill", "where", "children", "played", "in", "summer", "and", "winter",
      "light", "fell", "on", "quiet", "streets", "of", "a", "small", "town", "near", "hills", "that", "farmers",
      "crossed", "each", "morning", "with", "carts", "full", "bread", "apples", "stone", "wood", "market", "voices",
      "rose", "over", "roofs", "while", "bells", "rang", "for", "noon", "people", "stopped", "to", "talk", "about",
      "weather", "roads", "news", "from", "city", "far", "away", "beyond", "sea"};
  std::mt19937_64 rng(seed);
  std::string s;
  for (int i = 0; i < words; ++i) {
    if (i) s += ' ';
    s += kWords[rng() % (sizeof kWords / sizeof kWords[0])];
  }
  return s;
}

double quantile(std::vector<double> v, double q) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const size_t i = std::min(v.size() - 1, size_t(q * double(v.size() - 1) + 0.5));
  return v[i];
}

}  // namespace

LoadResult run_load(const LoadOptions& o) {
  if (o.url.rfind("http://", 0) != 0) fail("--server {:?}: give an http:// URL, like http://127.0.0.1:8080", o.url);
  if (o.clients < 1 || o.requests < 1) fail("load: clients and requests must be at least 1");
  LoadResult res;
  std::mutex mu;
  std::vector<double> ttfts;
  const auto t0 = std::chrono::steady_clock::now();
  std::vector<std::thread> th;
  for (int c = 0; c < o.clients; ++c)
    th.emplace_back([&, c] {
      httplib::Client cli(o.url);
      cli.set_read_timeout(600);
      cli.set_connection_timeout(30);
      for (int r = 0; r < o.requests; ++r) {
        nlohmann::json body = {{"model", o.model},
                               {"prompt", prompt_text(o.prompt_words, o.seed * 1000003 + uint64_t(c) * 1009 + uint64_t(r))},
                               {"max_tokens", o.max_tokens}, {"temperature", 0}, {"stream", true},
                               {"ignore_eos", true}, {"stream_options", {{"include_usage", true}}}};
        httplib::Request req;
        req.method = "POST";
        req.path = "/v1/completions";
        req.body = body.dump();
        req.set_header("Content-Type", "application/json");
        if (!o.api_key.empty()) req.set_header("Authorization", "Bearer " + o.api_key);
        const auto start = std::chrono::steady_clock::now();
        double ttft = -1;
        int64_t pt = 0, ct = 0, chunks = 0;
        std::string buf;
        req.content_receiver = [&](const char* d, size_t n, uint64_t, uint64_t) {
          return read_sse(buf, d, n, [&](const std::string& data) {
            if (data == "[DONE]") return true;
            nlohmann::json j = nlohmann::json::parse(data, nullptr, false);
            if (j.is_discarded()) return true;
            if (j.contains("usage") && j["usage"].is_object()) {
              pt = j["usage"].value("prompt_tokens", int64_t(0));
              ct = j["usage"].value("completion_tokens", int64_t(0));
            }
            if (j.contains("choices") && !j["choices"].empty() && j["choices"][0].value("text", "") != "") {
              ++chunks;
              if (ttft < 0) ttft = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
            }
            return true;
          });
        };
        httplib::Response resp;
        httplib::Error err;
        const bool ok = cli.send(req, resp, err) && resp.status == 200;
        std::lock_guard lk(mu);
        if (!ok) {
          ++res.failed;
          if (res.first_error.empty())
            res.first_error = fmt::format("status {}, {}", resp.status, resp.body.substr(0, 200));
          continue;
        }
        ++res.ok;
        res.prompt_tokens += pt;
        res.output_tokens += ct > 0 ? ct : chunks;
        if (ttft >= 0) ttfts.push_back(ttft);
      }
    });
  for (auto& t : th) t.join();
  res.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  res.ttft_p50 = quantile(ttfts, 0.5);
  res.ttft_p99 = quantile(ttfts, 0.99);
  return res;
}

}  // namespace headroom::server
