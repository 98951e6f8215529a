#include "engine/sampler.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
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

namespace {
// 8 floats / int32s as GCC/Clang vector extensions: the compiler picks whatever the target has.
typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

// The largest of n floats (a NaN never wins; -inf for none), in vectors (std::max_element does not vectorize).
inline float max_of(const float* l, size_t n) {
  const float ninf = -std::numeric_limits<float>::infinity();
  v8f m[4];
  for (v8f& v : m) v = v8f{ninf, ninf, ninf, ninf, ninf, ninf, ninf, ninf};
  size_t i = 0;
  for (; i + 32 <= n; i += 32)
    for (int k = 0; k < 4; ++k) {
      v8f x;
      std::memcpy(&x, l + i + 8 * size_t(k), sizeof x);
      m[k] = m[k] < x ? x : m[k];
    }
  m[0] = m[0] < m[1] ? m[1] : m[0];
  m[2] = m[2] < m[3] ? m[3] : m[2];
  m[0] = m[0] < m[2] ? m[2] : m[0];
  float best = m[0][0];
  for (int k = 1; k < 8; ++k) best = best < m[0][k] ? m[0][k] : best;
  for (; i < n; ++i) best = best < l[i] ? l[i] : best;
  return best;
}

// f(i) for every i with l[i] >= floor, in order: 32 at a time in vectors, one by one only where one is.
template <class F>
inline void for_each_at_least(const float* l, size_t n, float floor, F&& f) {
  const v8f fv = {floor, floor, floor, floor, floor, floor, floor, floor};
  size_t i = 0;
  for (; i + 32 <= n; i += 32) {
    v8i any = {};
    for (int k = 0; k < 4; ++k) {
      v8f x;
      std::memcpy(&x, l + i + 8 * size_t(k), sizeof x);
      any |= x >= fv;
    }
    int32_t hit = 0;
    for (int k = 0; k < 8; ++k) hit |= any[k];
    if (hit)
      for (size_t j = i; j < i + 32; ++j)
        if (l[j] >= floor) f(j);
  }
  for (; i < n; ++i)
    if (l[i] >= floor) f(i);
}
}  // namespace

int32_t Sampler::argmax(std::span<const float> logits) {
  // The first index of the largest value (a NaN never wins; all NaN: 0): the first block of 128 whose maximum is
  // the largest, then the first index in it (a 128k vocabulary: 8-20 us here, std::max_element 70-100).
  constexpr size_t B = 128;
  const float* l = logits.data();
  const size_t n = logits.size();
  float best = -std::numeric_limits<float>::infinity();
  size_t best_block = SIZE_MAX, i = 0;
  for (; i + B <= n; i += B) {
    const float bm = max_of(l + i, B);
    if (bm > best || (best_block == SIZE_MAX && bm == best)) best = bm, best_block = i;
  }
  size_t at = SIZE_MAX;
  if (best_block != SIZE_MAX)
    for (size_t k = best_block; k < best_block + B; ++k)
      if (l[k] == best) {
        at = k;
        break;
      }
  for (size_t k = i; k < n; ++k)
    if (l[k] > best || (at == SIZE_MAX && l[k] == best)) best = l[k], at = k;
  return at == SIZE_MAX ? 0 : int32_t(at);
}

double Sampler::log_prob(std::span<const float> logits, int32_t id) {
  const double mx = max_of(logits.data(), logits.size());
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

  keep_candidates(l);
  return draw();
}

std::vector<int32_t> Sampler::kept(std::span<const float> logits) {
  keep_candidates(logits);
  std::vector<int32_t> ids;
  for (const auto& c : cand_) ids.push_back(c.second);
  std::sort(ids.begin(), ids.end());
  return ids;
}

int32_t Sampler::draw() {
  // Temperature, then draw.
  const float mx = cand_.front().first;  // (the largest logit: candidates are in order or all of them)
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

// top-k, top-p and min-p each keep a prefix of the candidates in order (logit descending, then id), top-p's
// and min-p's measured at temperature 1 over what top-k kept: the kept set is the shortest prefix, which is all
// that needs sorting. With top-k, its k are sorted (as llama.cpp does). Without, the candidates are those min-p
// keeps (exp(l - max) >= min_p, one pass), and for top-p a prefix of them is sorted that grows until its mass
// reaches top_p (a peaked distribution needs a few hundred); with no cut at all nothing is sorted (the
// candidates stay in id order, the largest moved first).
void Sampler::keep_candidates(std::span<const float> l) {
  const size_t V = l.size();
  const auto by_logit = [](const auto& a, const auto& b) { return a.first > b.first || (a.first == b.first && a.second < b.second); };
  const int32_t top = argmax(l);
  const float mx = l[size_t(top)];
  const bool top_k = p_.top_k > 0 && size_t(p_.top_k) < V, top_p = p_.top_p < 1.0f;
  cand_.clear();
  cand_.reserve(V);
  if (top_k && size_t(p_.top_k) * 16 <= V) {
    // Only logits at least the least of k blocks' maxima: k of them are that large, so the top k are too.
    const size_t k = size_t(p_.top_k), block = V / k;
    float floor = std::numeric_limits<float>::infinity();
    for (size_t b = 0; b < k; ++b) floor = std::min(floor, max_of(l.data() + b * block, b + 1 == k ? V - b * block : block));
    for_each_at_least(l.data(), V, floor, [&](size_t i) { cand_.emplace_back(l[i], int32_t(i)); });
  } else if (top_k || p_.min_p <= 0.0f) {
    for (size_t i = 0; i < V; ++i) cand_.emplace_back(l[i], int32_t(i));
  } else {
    // exp(l - max) >= min_p needs l >= max + log(min_p); a vector pass finds the logits near that, the exact
    // test decides.
    const float near = mx + std::log(p_.min_p) - 0.01f * (1.0f + std::fabs(mx));
    for_each_at_least(l.data(), V, near, [&](size_t i) {
      if (std::exp(l[i] - mx) >= p_.min_p) cand_.emplace_back(l[i], int32_t(i));
    });
  }
  if (cand_.empty()) cand_.emplace_back(mx, top);  // every logit NaN
  size_t keep = top_k ? std::min(size_t(p_.top_k), cand_.size()) : cand_.size();
  if (!top_k && !top_p) {  // min-p alone keeps every candidate here; no cut keeps all
    std::iter_swap(cand_.begin(), std::min_element(cand_.begin(), cand_.end(), by_logit));
    return;
  }
  // The probability mass top-p measures: over the top-k candidates (summed once they are sorted) or the whole
  // vocabulary.
  double sum = 0;
  if (top_p && !top_k)
    for (size_t i = 0; i < V; ++i) sum += std::exp(l[i] - mx);
  size_t sorted = top_k || !top_p ? keep : std::min(keep, size_t(256));
  for (;;) {
    std::partial_sort(cand_.begin(), cand_.begin() + ptrdiff_t(sorted), cand_.end(), by_logit);
    if (!top_p) break;
    if (top_k && sum == 0)
      for (size_t i = 0; i < keep; ++i) sum += std::exp(cand_[i].first - mx);
    double acc = 0;
    size_t cut = 0;
    for (size_t i = 0; i < sorted && cut == 0; ++i) {
      acc += std::exp(cand_[i].first - mx) / sum;
      if (acc >= p_.top_p) cut = i + 1;
    }
    if (cut > 0) {
      keep = cut;
      break;
    }
    if (sorted == keep) break;  // the mass never reached top_p: no cut
    sorted = std::min(keep, sorted * 8);
  }
  if (top_k && p_.min_p > 0.0f) {  // min-p on the sorted top-k candidates
    size_t n = 1;
    while (n < keep && std::exp(cand_[n].first - mx) >= p_.min_p) ++n;
    keep = n;
  }
  cand_.resize(keep);
}

}  // namespace headroom
