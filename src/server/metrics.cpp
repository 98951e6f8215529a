#include "server/metrics.h"

#include <fmt/format.h>

namespace headroom::server {

void Histogram::observe(double x) {
  size_t i = 0;
  while (i < bounds_.size() && x > bounds_[i]) ++i;
  ++counts_[i];
  sum_ += x;
  ++n_;
}

void Histogram::render(const std::string& name, std::string& out) const {
  uint64_t cum = 0;
  for (size_t i = 0; i < bounds_.size(); ++i) {
    cum += counts_[i];
    out += fmt::format("{}_bucket{{le=\"{}\"}} {}\n", name, bounds_[i], cum);
  }
  out += fmt::format("{}_bucket{{le=\"+Inf\"}} {}\n{}_sum {}\n{}_count {}\n", name, n_, name, sum_, name, n_);
}

Metrics::Metrics()
    : ttft_({0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60}),
      itl_({0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5}) {}

void Metrics::request(int status) {
  std::lock_guard lk(mu_);
  ++requests_[status];
}

void Metrics::tokens(int prompt, int generated) {
  std::lock_guard lk(mu_);
  prompt_tokens_ += uint64_t(prompt);
  generated_tokens_ += uint64_t(generated);
}

void Metrics::first_token(double s) {
  std::lock_guard lk(mu_);
  ttft_.observe(s);
}

void Metrics::inter_token(double s) {
  std::lock_guard lk(mu_);
  itl_.observe(s);
}

std::string Metrics::render(const EngineGauges& g) const {
  std::lock_guard lk(mu_);
  std::string o;
  o += "# HELP headroom_requests_total HTTP requests answered, by status.\n# TYPE headroom_requests_total counter\n";
  for (const auto& [status, n] : requests_) o += fmt::format("headroom_requests_total{{status=\"{}\"}} {}\n", status, n);
  o += fmt::format(
      "# HELP headroom_prompt_tokens_total Prompt tokens of finished requests.\n# TYPE headroom_prompt_tokens_total "
      "counter\nheadroom_prompt_tokens_total {}\n# HELP headroom_generation_tokens_total Generated tokens.\n# TYPE "
      "headroom_generation_tokens_total counter\nheadroom_generation_tokens_total {}\n",
      prompt_tokens_, generated_tokens_);
  o += "# HELP headroom_time_to_first_token_seconds From the request to its first token.\n"
       "# TYPE headroom_time_to_first_token_seconds histogram\n";
  ttft_.render("headroom_time_to_first_token_seconds", o);
  o += "# HELP headroom_inter_token_latency_seconds Between two tokens of one sequence.\n"
       "# TYPE headroom_inter_token_latency_seconds histogram\n";
  itl_.render("headroom_inter_token_latency_seconds", o);
  o += fmt::format(
      "# HELP headroom_sequences_running Sequences in the running batch.\n# TYPE headroom_sequences_running gauge\n"
      "headroom_sequences_running {}\n# HELP headroom_sequences_waiting Sequences waiting (queued or preempted).\n"
      "# TYPE headroom_sequences_waiting gauge\nheadroom_sequences_waiting {}\n",
      g.running, g.waiting);
  o += "# HELP headroom_kv_pages_used KV pages held, by tier and by the policy of the head that holds them.\n"
       "# TYPE headroom_kv_pages_used gauge\n";
  for (const auto& [key, n] : g.pages_used)
    o += fmt::format("headroom_kv_pages_used{{tier=\"{}\",policy=\"{}\"}} {}\n", key.first, key.second, n);
  o += fmt::format(
      "# HELP headroom_kv_pages_free Free KV pages, by tier.\n# TYPE headroom_kv_pages_free gauge\n"
      "headroom_kv_pages_free{{tier=\"device\"}} {}\nheadroom_kv_pages_free{{tier=\"host\"}} {}\n",
      g.device_free, g.host_free);
  return o;
}

}  // namespace headroom::server
