// The sampler: greedy, top-k, top-p, min-p, temperature, penalties, seeding and parameter validation.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <set>
#include <vector>

#include "engine/sampler.h"
#include "util/error.h"

using namespace headroom;

namespace {

// Only the filter under test on: temperature 1, no top-k, top-p or min-p.
SamplerParams plain(uint64_t seed = 1) {
  SamplerParams p;
  p.temp = 1.0f;
  p.top_k = 0;
  p.top_p = 1.0f;
  p.min_p = 0.0f;
  p.seed = seed;
  return p;
}

// Logits whose softmax is `probs`.
std::vector<float> logits_of(const std::vector<double>& probs) {
  std::vector<float> l;
  for (double p : probs) l.push_back(float(std::log(p)));
  return l;
}

// The tokens drawn by `n` samplers with seeds 1..n (one draw each, no history).
std::multiset<int32_t> draws(SamplerParams p, const std::vector<float>& logits, int n) {
  std::multiset<int32_t> out;
  for (int s = 1; s <= n; ++s) {
    p.seed = uint64_t(s);
    Sampler sm(p);
    out.insert(sm.sample(logits, {}));
  }
  return out;
}

const std::vector<float> kMixed = {0.3f, 2.5f, -1.0f, 1.7f, 2.1f, 0.0f, -3.0f, 1.0f};  // argmax 1, then 4, 3, 7

}  // namespace

TEST(Sampler, GreedyPicksArgmax) {
  SamplerParams p = plain();
  p.temp = 0.0f;
  for (uint64_t seed : {1u, 2u, 99u}) {
    p.seed = seed;
    Sampler s(p);
    EXPECT_EQ(s.sample(kMixed, {}), 1);
  }
  EXPECT_EQ(Sampler::argmax(kMixed), 1);
  std::vector<float> l = kMixed;
  l[6] = 9.0f;
  Sampler s(p);
  EXPECT_EQ(s.sample(l, {}), 6);
}

TEST(Sampler, TopKOneIsGreedyForAnySeed) {
  SamplerParams p = plain();
  p.top_k = 1;
  std::multiset<int32_t> got = draws(p, kMixed, 200);
  EXPECT_EQ(got.count(1), got.size());
}

TEST(Sampler, TopKRestrictsSupportToTheKLargest) {
  SamplerParams p = plain();
  p.top_k = 3;
  std::multiset<int32_t> got = draws(p, kMixed, 600);
  for (int32_t t : got) EXPECT_TRUE(t == 1 || t == 4 || t == 3) << t;
  EXPECT_GT(got.count(1), 0u);
  EXPECT_GT(got.count(4), 0u);
  EXPECT_GT(got.count(3), 0u);
  // Without top-k the tail is drawn too.
  std::multiset<int32_t> all = draws(plain(), kMixed, 600);
  EXPECT_GT(all.size() - all.count(1) - all.count(4) - all.count(3), 0u);
}

TEST(Sampler, TopPKeepsTheSmallestSetOverP) {
  const std::vector<float> l = logits_of({0.5, 0.3, 0.15, 0.05});
  SamplerParams p = plain();
  p.top_p = 0.75f;  // 0.5 < 0.75 <= 0.8: tokens 0 and 1
  std::multiset<int32_t> got = draws(p, l, 600);
  EXPECT_GT(got.count(0), 0u);
  EXPECT_GT(got.count(1), 0u);
  EXPECT_EQ(got.count(0) + got.count(1), got.size());
  p.top_p = 0.85f;  // 0.8 < 0.85 <= 0.95: token 2 joins, 3 stays out
  got = draws(p, l, 600);
  EXPECT_GT(got.count(2), 0u);
  EXPECT_EQ(got.count(3), 0u);
}

TEST(Sampler, MinPDropsTokensBelowMinPTimesTheMax) {
  const std::vector<float> l = logits_of({0.5, 0.3, 0.15, 0.05});
  SamplerParams p = plain();
  p.min_p = 0.2f;  // threshold 0.1: 0.15 stays, 0.05 goes
  std::multiset<int32_t> got = draws(p, l, 800);
  EXPECT_EQ(got.count(3), 0u);
  EXPECT_GT(got.count(2), 0u);
  p.min_p = 0.5f;  // threshold 0.25: only 0 and 1
  got = draws(p, l, 800);
  EXPECT_EQ(got.count(0) + got.count(1), got.size());
  EXPECT_GT(got.count(1), 0u);
}

TEST(Sampler, RepeatPenaltyDividesPositiveAndMultipliesNegativeLogits) {
  SamplerParams p = plain();
  p.temp = 0.0f;
  p.repeat_penalty = 2.0f;
  Sampler s(p);
  const std::vector<float> pos = {2.0f, 1.5f, -1.0f};
  const std::vector<int32_t> h0 = {0};
  EXPECT_EQ(s.sample(pos, {}), 0);
  EXPECT_EQ(s.sample(pos, h0), 1);  // 2 / 2 = 1 < 1.5
  const std::vector<float> neg = {-1.0f, -1.5f, -4.0f};
  EXPECT_EQ(s.sample(neg, h0), 1);  // -1 * 2 = -2 < -1.5 (dividing would have raised it to -0.5)
  // Outside --repeat-last-n the token is not penalised.
  p.penalty_last_n = 2;
  Sampler w(p);
  const std::vector<int32_t> old = {0, 2, 2};
  EXPECT_EQ(w.sample(pos, old), 0);
  const std::vector<int32_t> recent = {2, 2, 0};
  EXPECT_EQ(w.sample(pos, recent), 1);
}

TEST(Sampler, PresenceAndFrequencyPenaltiesSubtract) {
  SamplerParams p = plain();
  p.temp = 0.0f;
  p.frequency_penalty = 0.3f;
  Sampler f(p);
  const std::vector<float> l = {2.0f, 1.5f};
  const std::vector<int32_t> once = {0}, twice = {0, 0};
  EXPECT_EQ(f.sample(l, once), 0);   // 2 - 0.3 = 1.7 > 1.5
  EXPECT_EQ(f.sample(l, twice), 1);  // 2 - 0.6 = 1.4 < 1.5
  p.frequency_penalty = 0.0f;
  p.presence_penalty = 0.6f;
  Sampler pr(p);
  EXPECT_EQ(pr.sample(l, once), 1);  // 2 - 0.6 = 1.4
}

TEST(Sampler, SameSeedSameSequenceDifferentSeedsDiffer) {
  const std::vector<float> flat(16, 0.0f);
  auto sequence = [&](uint64_t seed) {
    Sampler s(plain(seed));
    std::vector<int32_t> out;
    for (int i = 0; i < 40; ++i) out.push_back(s.sample(flat, {}));
    return out;
  };
  EXPECT_EQ(sequence(7), sequence(7));
  EXPECT_NE(sequence(7), sequence(8));
  std::vector<int32_t> a = sequence(7);
  EXPECT_GT(std::set<int32_t>(a.begin(), a.end()).size(), 4u);  // it really draws
}

TEST(Sampler, TemperatureZeroIsGreedyAndLowTemperatureSharpens) {
  SamplerParams p = plain();
  p.temp = 0.0f;
  std::multiset<int32_t> got = draws(p, kMixed, 100);
  EXPECT_EQ(got.count(1), got.size());
  // At temperature 1 the second-best token (logit 2.1 vs 2.5) is drawn often; at 0.05 almost never.
  p.temp = 1.0f;
  const size_t warm = draws(p, kMixed, 400).count(4);
  p.temp = 0.05f;
  const size_t cold = draws(p, kMixed, 400).count(4);
  EXPECT_GT(warm, 50u);
  EXPECT_LT(cold, 5u);
}

TEST(Sampler, ParametersOutOfRangeAreRefusedNamingTheFlag) {
  auto refused = [](SamplerParams p, const char* flag) {
    try {
      Sampler s(p);
      ADD_FAILURE() << flag << " accepted";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(flag), std::string::npos) << e.what();
    }
  };
  SamplerParams p;
  p.top_p = 2.0f;
  refused(p, "--top-p");
  p = {};
  p.temp = std::nanf("");
  refused(p, "--temp");
  p = {};
  p.top_k = -5;
  refused(p, "--top-k");
  p = {};
  p.min_p = 2.0f;
  refused(p, "--min-p");
  p = {};
  p.repeat_penalty = -1.0f;
  refused(p, "--repeat-penalty");
  p = {};
  p.repeat_penalty = 0.0f;
  refused(p, "--repeat-penalty");
  p = {};
  p.frequency_penalty = INFINITY;
  refused(p, "--frequency-penalty");
  p = {};
  p.penalty_last_n = -3;
  refused(p, "--repeat-last-n");
  EXPECT_NO_THROW(SamplerParams{}.validate());
}

namespace {
// The cuts as the definition reads (and as the sampler ran before it sorted only what the cuts keep): every
// candidate sorted (logit descending, then id), top-k, then top-p and min-p at temperature 1 over what top-k kept.
std::vector<int32_t> kept_by_definition(const SamplerParams& p, const std::vector<float>& l) {
  std::vector<std::pair<float, int32_t>> c;
  for (size_t i = 0; i < l.size(); ++i) c.emplace_back(l[i], int32_t(i));
  std::sort(c.begin(), c.end(), [](const auto& a, const auto& b) { return a.first > b.first || (a.first == b.first && a.second < b.second); });
  if (p.top_k > 0 && size_t(p.top_k) < c.size()) c.resize(size_t(p.top_k));
  const float mx = c[0].first;
  double sum = 0;
  for (const auto& x : c) sum += std::exp(x.first - mx);
  if (p.top_p < 1.0f) {
    double acc = 0;
    for (size_t i = 0; i < c.size(); ++i) {
      acc += std::exp(c[i].first - mx) / sum;
      if (acc >= p.top_p) {
        c.resize(i + 1);
        break;
      }
    }
  }
  if (p.min_p > 0.0f) {
    size_t keep = 1;
    while (keep < c.size() && std::exp(c[keep].first - mx) >= p.min_p) ++keep;
    c.resize(keep);
  }
  std::vector<int32_t> ids;
  for (const auto& x : c) ids.push_back(x.second);
  std::sort(ids.begin(), ids.end());
  return ids;
}
}  // namespace

TEST(Sampler, KeepsWhatTheCutsDefineOnALargeVocabulary) {
  // A 128k vocabulary, peaked and flat logits, ties, every combination of the cuts: the sampler sorts only
  // the prefix the cuts keep (top-k's candidates above a floor, top-p's prefix grown until its mass is
  // reached, min-p's survivors), and keeps exactly what the definition keeps.
  std::mt19937 rng(5);
  int cases = 0;
  for (float spread : {0.5f, 3.0f, 12.0f}) {
    std::normal_distribution<float> nd(0.0f, spread);
    std::vector<float> l(128256);
    for (auto& x : l) x = nd(rng);
    for (size_t i = 0; i < 300; ++i) l[(i * 7919) % l.size()] = l[0];  // ties with the first logit
    for (int top_k : {0, 1, 40, 1000, 200000})
      for (float top_p : {1.0f, 0.95f, 0.5f})
        for (float min_p : {0.0f, 0.05f, 0.5f}) {
          SamplerParams p = plain();
          p.top_k = top_k;
          p.top_p = top_p;
          p.min_p = min_p;
          Sampler s(p);
          const std::vector<int32_t> want = kept_by_definition(p, l);
          ASSERT_EQ(s.kept(l), want) << "spread " << spread << " top_k " << top_k << " top_p " << top_p << " min_p " << min_p;
          ++cases;
        }
  }
  EXPECT_EQ(cases, 135);
  {  // exactly k logits at the floor (one per block): all of them, and nothing else, are the top k
    std::vector<float> l(128256, -1.0f);
    for (size_t b = 0; b < 40; ++b) l[b * (l.size() / 40) + 7] = 1.0f;
    SamplerParams p = plain();
    p.top_k = 40;
    Sampler s(p);
    EXPECT_EQ(s.kept(l), kept_by_definition(p, l));
    EXPECT_EQ(s.kept(l).size(), 40u);
  }
  EXPECT_EQ(Sampler::argmax(std::vector<float>{1, 3, 3, -INFINITY}), 1) << "the first of equal maxima";
  std::vector<float> big(1000, 0.0f);
  big[517] = big[900] = 2.0f;
  EXPECT_EQ(Sampler::argmax(big), 517);
  big[3] = NAN;
  EXPECT_EQ(Sampler::argmax(big), 517) << "a NaN never wins";
}
