#include "engine/sampler.h"

#include <algorithm>
#include <cmath>
#include <tuple>
#include <unordered_map>

#include "util/error.h"

namespace headroom {

void SamplerParams::validate() const {
  const std::tuple<const char*, const NumRange&, double> params[] = {
      {"--temp", temp_range, temp},
      {"--top-k", top_k_range, top_k},
      {"--top-p", top_p_range, top_p},
      {"--min-p", min_p_range, min_p},
      {"--repeat-penalty", repeat_penalty_range, repeat_penalty},
      {"--presence-penalty", presence_penalty_range, presence_penalty},
      {"--frequency-penalty", frequency_penalty_range, frequency_penalty},
      {"--repeat-last-n", penalty_last_n_range, penalty_last_n}};
  for (const auto& [name, range, v] : params)
    if (std::string e = range.check(v); !e.empty()) fail("{}: {}", name, e);
}

Sampler::Sampler(const SamplerParams& p) : p_(p), rng_(p.seed) { p_.validate(); }

int32_t Sampler::argmax(std::span<const float> logits) {
  return int32_t(std::max_element(logits.begin(), logits.end()) - logits.begin());
}

double Sampler::log_prob(std::span<const float> logits, int32_t id) {
  const double mx = *std::max_element(logits.begin(), logits.end());
  double sum = 0;
  for (float x : logits) sum += std::exp(double(x) - mx);
  return double(logits[size_t(id)]) - mx - std::log(sum);
}

int32_t Sampler::sample(std::span<const float> logits, std::span<const int32_t> history) {
  const int32_t V = int32_t(logits.size());
  const bool penalties = p_.repeat_penalty != 1.0f || p_.presence_penalty != 0.0f || p_.frequency_penalty != 0.0f;
  std::span<const float> l = logits;
  if (penalties && !history.empty()) {
    work_.assign(logits.begin(), logits.end());
    std::unordered_map<int32_t, int> counts;
    size_t from = p_.penalty_last_n > 0 && history.size() > size_t(p_.penalty_last_n) ? history.size() - p_.penalty_last_n : 0;
    for (size_t i = from; i < history.size(); ++i)
      if (history[i] >= 0 && history[i] < V) ++counts[history[i]];
    for (auto [id, cnt] : counts) {
      float& x = work_[id];
      if (p_.repeat_penalty != 1.0f) x = x > 0 ? x / p_.repeat_penalty : x * p_.repeat_penalty;
      x -= float(cnt) * p_.frequency_penalty + (cnt > 0 ? p_.presence_penalty : 0.0f);
    }
    l = work_;
  }
  if (p_.temp <= 0.0f) return argmax(l);

  cand_.clear();
  cand_.reserve(V);
  for (int32_t i = 0; i < V; ++i) cand_.emplace_back(l[i], i);
  auto by_logit = [](const auto& a, const auto& b) { return a.first > b.first || (a.first == b.first && a.second < b.second); };
  size_t k = cand_.size();
  if (p_.top_k > 0 && size_t(p_.top_k) < k) {
    k = size_t(p_.top_k);
    std::partial_sort(cand_.begin(), cand_.begin() + k, cand_.end(), by_logit);
    cand_.resize(k);
  } else {
    std::sort(cand_.begin(), cand_.end(), by_logit);
  }
  // Probabilities at temperature 1 for top-p / min-p (as llama.cpp applies them before temperature).
  const float mx = cand_[0].first;
  std::vector<float> pr(cand_.size());
  double sum = 0;
  for (size_t i = 0; i < cand_.size(); ++i) sum += pr[i] = std::exp(cand_[i].first - mx);
  if (p_.top_p < 1.0f) {
    double acc = 0;
    size_t keep = cand_.size();
    for (size_t i = 0; i < cand_.size(); ++i) {
      acc += pr[i] / sum;
      if (acc >= p_.top_p) {
        keep = i + 1;
        break;
      }
    }
    cand_.resize(keep);
  }
  if (p_.min_p > 0.0f) {
    size_t keep = 1;
    while (keep < cand_.size() && pr[keep] >= p_.min_p * pr[0]) ++keep;  // pr[0] is the max (= 1)
    cand_.resize(keep);
  }
  // Temperature, then draw.
  std::vector<double> w(cand_.size());
  double tot = 0;
  for (size_t i = 0; i < cand_.size(); ++i) tot += w[i] = std::exp((cand_[i].first - mx) / p_.temp);
  std::uniform_real_distribution<double> u(0.0, tot);
  double r = u(rng_);
  for (size_t i = 0; i < cand_.size(); ++i) {
    r -= w[i];
    if (r <= 0) return cand_[i].second;
  }
  return cand_.back().second;
}

}  // namespace headroom
