// The server's Prometheus metrics (text exposition format 0.0.4): request counts by status, token counts,
// time-to-first-token and inter-token-latency histograms, and gauges the engine thread publishes.
#pragma once

#include <array>
#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <vector>

namespace headroom::server {

class Histogram {
 public:
  explicit Histogram(std::vector<double> bounds) : bounds_(std::move(bounds)), counts_(bounds_.size() + 1, 0) {}
  void observe(double x);
  // Appends the _bucket/_sum/_count lines of `name`.
  void render(const std::string& name, std::string& out) const;

 private:
  std::vector<double> bounds_;
  std::vector<uint64_t> counts_;
  double sum_ = 0;
  uint64_t n_ = 0;
};

// What the engine thread knows between steps.
struct EngineGauges {
  int64_t running = 0, waiting = 0;
  std::map<std::pair<std::string, std::string>, int64_t> pages_used;  // (tier, policy) -> pages, every pair
  int64_t device_free = 0, host_free = 0;
};

class Metrics {
 public:
  Metrics();
  void request(int status);
  void tokens(int prompt, int generated);
  void first_token(double seconds);
  void inter_token(double seconds);
  std::string render(const EngineGauges& g) const;

 private:
  mutable std::mutex mu_;
  std::map<int, uint64_t> requests_;
  uint64_t prompt_tokens_ = 0, generated_tokens_ = 0;
  Histogram ttft_, itl_;
};

}  // namespace headroom::server
