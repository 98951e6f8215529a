#include "profile/profiler.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "engine/kv_setup.h"
#include "engine/stack.h"
#include "engine/sampler.h"
#include "util/error.h"

namespace headroom::profile {

namespace {

// Probes cycle through the model's trained retrieval formats.
constexpr eval::Task kTrainedTasks[] = {eval::Task::Passkey, eval::Task::KeyValue, eval::Task::MultiKey};

// Gathers one KV head's cached keys and values in position order (the profiler runs with `full`).
struct HeadKV {
  std::vector<float> k, v;
  std::vector<int32_t> pos;
};

void gather(KVCache& kv, int layer, int h, HeadKV& out) {
  const HeadCache& hc = kv.head(layer, h);
  PagePool& pool = kv.pool();
  const int hd = pool.head_dim(), ps = pool.page_size();
  out.k.clear();
  out.v.clear();
  out.pos.clear();
  std::vector<float> k(size_t(ps) * hd), v(size_t(ps) * hd);
  std::vector<int32_t> pos(static_cast<size_t>(ps));
  for (int32_t id : hc.pages) {
    pool.read_page(id, k.data(), v.data(), pos.data());
    for (int s = 0; s < ps; ++s) {
      if (pos[size_t(s)] < 0) continue;
      out.pos.push_back(pos[size_t(s)]);
      out.k.insert(out.k.end(), k.begin() + ptrdiff_t(s) * hd, k.begin() + ptrdiff_t(s + 1) * hd);
      out.v.insert(out.v.end(), v.begin() + ptrdiff_t(s) * hd, v.begin() + ptrdiff_t(s + 1) * hd);
    }
  }
}

class Observer : public AttentionObserver {
 public:
  Observer(const ModelConfig& c, const Options& o, Scores& s) : c_(c), o_(o), s_(s) {}

  // Retrieval probe: rows whose next token is an answer token found in the needle span.
  std::vector<int32_t> tokens;
  std::vector<std::pair<int32_t, int32_t>> needle_spans;  // [begin, end) positions
  std::vector<int32_t> copy_rows;                         // positions whose next token is copied
  bool measure_streaming = true;
  int32_t query_from = INT32_MAX;  // rows at or after this position (question + answer) are query rows
  std::vector<double> hits, err_sum, qerr_sum;
  std::vector<int64_t> err_n, qerr_n;

  void on_attention(int layer, int n, const int32_t* pos, const float* q, KVCache& kv) override {
    const int hd = c_.head_dim, G = c_.n_group();
    const float scale = 1.0f / std::sqrt(float(hd));
    for (int h = 0; h < c_.n_head_kv; ++h) {
      bool any = false;
      for (int r = 0; r < n && !any; ++r) any = wanted(pos[r]);
      if (!any) continue;
      gather(kv, layer, h, head_);
      const size_t idx = size_t(layer) * c_.n_head_kv + h;
      for (int r = 0; r < n; ++r) {
        const bool copy = std::binary_search(copy_rows.begin(), copy_rows.end(), pos[r]);
        const bool stream = measure_streaming && sample_streaming(pos[r]);
        if (!copy && !stream) continue;
        bool hit = false;
        double err = 0;
        for (int g = 0; g < G; ++g) {
          const float* qh = q + int64_t(r) * c_.n_head * hd + int64_t(h * G + g) * hd;
          scores_.resize(head_.pos.size());
          int best = -1;
          float best_s = -1e30f;
          for (size_t j = 0; j < head_.pos.size(); ++j) {
            if (head_.pos[j] > pos[r]) { scores_[j] = -INFINITY; continue; }
            float d = 0;
            for (int t = 0; t < hd; ++t) d += qh[t] * head_.k[j * hd + t];
            scores_[j] = d * scale;
            if (scores_[j] > best_s) { best_s = scores_[j]; best = int(j); }
          }
          if (copy && best >= 0) {
            const int32_t p = head_.pos[best];
            const bool in_needle = std::any_of(needle_spans.begin(), needle_spans.end(),
                                               [&](auto& sp) { return p >= sp.first && p < sp.second; });
            if (in_needle && tokens[p] == tokens[pos[r] + 1]) hit = true;
          }
          if (stream) err += rel_change(pos[r], hd);
        }
        if (copy && hit) hits[idx] += 1;
        if (stream && pos[r] >= query_from) {
          qerr_sum[idx] += err / G;
          qerr_n[idx] += 1;
        } else if (stream) {
          err_sum[idx] += err / G;
          err_n[idx] += 1;
        }
      }
    }
  }

 private:
  bool wanted(int32_t p) const {
    return std::binary_search(copy_rows.begin(), copy_rows.end(), p) || (measure_streaming && sample_streaming(p));
  }
  bool sample_streaming(int32_t p) const {
    return p >= o_.sinks + o_.window + 64 && (p % 16 == 0 || p >= query_from);
  }
  // ||o_full - o_stream|| / ||o_full|| for the scores in scores_ (softmax over allowed slots).
  double rel_change(int32_t qpos, int hd) {
    double mx_full = -1e300, mx_str = -1e300;
    for (size_t j = 0; j < scores_.size(); ++j) {
      if (scores_[j] == -INFINITY) continue;
      mx_full = std::max(mx_full, double(scores_[j]));
      if (in_stream(head_.pos[j], qpos)) mx_str = std::max(mx_str, double(scores_[j]));
    }
    of_.assign(hd, 0.0);
    os_.assign(hd, 0.0);
    double sf = 0, ss = 0;
    for (size_t j = 0; j < scores_.size(); ++j) {
      if (scores_[j] == -INFINITY) continue;
      const float* vr = &head_.v[j * hd];
      double wf = std::exp(double(scores_[j]) - mx_full);
      sf += wf;
      for (int t = 0; t < hd; ++t) of_[t] += wf * vr[t];
      if (in_stream(head_.pos[j], qpos)) {
        double ws = std::exp(double(scores_[j]) - mx_str);
        ss += ws;
        for (int t = 0; t < hd; ++t) os_[t] += ws * vr[t];
      }
    }
    double num = 0, den = 0;
    for (int t = 0; t < hd; ++t) {
      double a = of_[t] / sf, b = ss > 0 ? os_[t] / ss : 0.0;
      num += (a - b) * (a - b);
      den += a * a;
    }
    return den > 0 ? std::sqrt(num / den) : 0.0;
  }
  bool in_stream(int32_t p, int32_t q) const { return p < o_.sinks || p > q - o_.window; }

  const ModelConfig& c_;
  const Options& o_;
  Scores& s_;
  HeadKV head_;
  std::vector<float> scores_;
  std::vector<double> of_, os_;
};

// Positions of every occurrence of `needle` (a token sequence) in `ids` before `limit`.
std::vector<std::pair<int32_t, int32_t>> find_spans(const std::vector<int32_t>& ids, const std::vector<int32_t>& needle,
                                                    size_t limit) {
  std::vector<std::pair<int32_t, int32_t>> out;
  if (needle.empty()) return out;
  for (size_t i = 0; i + needle.size() <= limit; ++i)
    if (std::equal(needle.begin(), needle.end(), ids.begin() + i)) out.emplace_back(int32_t(i), int32_t(i + needle.size()));
  return out;
}

}  // namespace

AnswerProbes::AnswerProbes(const Model& m, const eval::TaskGen& gen, int n, int ctx, uint64_t seed) : m_(m) {
  const Tokenizer& tok = m.tokenizer();
  for (int i = 0; i < n; ++i) {
    eval::Episode e = gen.make(kTrainedTasks[i % 3], ctx, (i + 0.5) / n, seed + i);
    probes_.push_back({tok.encode(e.prompt + e.expected, tok.add_bos()), tok.encode(e.prompt, tok.add_bos()).size()});
  }
  ctx_ = ctx;
}

AnswerProbes::Result AnswerProbes::run(Backend& be, const std::vector<PolicySpec>& specs, const Options& o) const {
  KVOptions kvo;
  kvo.page_size = o.page_size;
  kvo.chunk = o.chunk;
  // The probes run together (a sequence's logits do not depend on what runs beside it).
  EngineStack st(m_, be, plan_kv_specs(m_, specs, kvo, ctx_ + 16, "probe"), int(std::min<size_t>(8, probes_.size())),
                 o.chunk);
  Engine& engine = *st.engine;
  std::vector<double> logprob(probes_.size(), 0.0);
  std::vector<uint8_t> exact(probes_.size(), 1);
  // Logits k (k >= 1) come from feeding the forced token k-1 and predict ids[plen - 1 + k]; the prefill's
  // (k = 0) are not scored.
  engine.on_logits = [&](Sequence& s, std::span<const float> row) {
    const size_t i = size_t(s.req.tag), k = size_t(s.n_generated);
    if (k == 0) return;
    const auto& [ids, plen] = probes_[i];
    const int32_t want = ids[plen - 1 + k];
    logprob[i] += Sampler::log_prob(row, want);
    exact[i] &= Sampler::argmax(row) == want;
  };
  for (size_t i = 0; i < probes_.size(); ++i) {
    const auto& [ids, plen] = probes_[i];
    // The prompt but its last token is prefilled; the answer is teacher-forced one decode step at a time,
    // starting from the prompt's last token, as generation would.
    Request q = st.request(std::vector<int32_t>(ids.begin(), ids.begin() + ptrdiff_t(plen - 1)));
    q.forced.assign(ids.begin() + ptrdiff_t(plen - 1), ids.end());
    q.n_predict = int(q.forced.size());
    q.tag = int64_t(i);
    engine.add(std::move(q));
  }
  engine.run();
  Result res;
  for (size_t i = 0; i < probes_.size(); ++i) {
    res.logprob += logprob[i];
    res.exact += exact[i];
  }
  res.logprob /= double(probes_.size());
  return res;
}

PrefillChoice choose_prefill(const AnswerProbes& probes, Backend& be, const std::vector<PolicySpec>& specs,
                             const Options& o) {
  PrefillChoice ch;
  ch.n = int(probes.size());
  ch.full = probes.run(be, std::vector<PolicySpec>(specs.size(), PolicySpec{}), o);
  std::vector<PolicySpec> v = specs;
  for (PolicySpec& p : v) p.prefill = PrefillMode::Window;
  ch.window = probes.run(be, v, o);
  for (PolicySpec& p : v) p.prefill = PrefillMode::Offload;
  ch.offload = probes.run(be, v, o);
  ch.mode = double(ch.window.exact) >= (1.0 - o.prefill_tolerance) * double(ch.full.exact) ? PrefillMode::Window
                                                                                         : PrefillMode::Offload;
  return ch;
}

Scores measure(const Model& m, Backend& be, const eval::TaskGen& gen, const Options& o, const Progress& progress) {
  const ModelConfig& c = m.config();
  const Tokenizer& tok = m.tokenizer();
  const int ctx = o.ctx > 0 ? o.ctx : c.n_ctx_train;
  Scores s;
  s.n_layer = c.n_layer;
  s.n_head_kv = c.n_head_kv;
  const size_t H = size_t(c.n_layer) * c.n_head_kv;
  Observer obs(c, o, s);
  obs.hits.assign(H, 0.0);
  obs.err_sum.assign(H, 0.0);
  obs.err_n.assign(H, 0);
  obs.qerr_sum.assign(H, 0.0);
  obs.qerr_n.assign(H, 0);
  KVOptions kvo;
  kvo.page_size = o.page_size;
  kvo.chunk = o.chunk;
  // One prompt at a time, with the observer watching every layer's attention.
  EngineStack st(m, be, plan_kv(m, kvo, ctx + 16), 1, o.chunk, "", &obs);
  auto observe = [&](const std::vector<int32_t>& ids) {
    Request q = st.request(ids);
    q.n_predict = 0;
    st.engine->add(std::move(q));
    st.engine->run();
  };
  const int total = o.retrieval_prompts + o.natural_prompts;
  int copy_steps = 0;

  for (int i = 0; i < o.retrieval_prompts; ++i) {
    eval::Episode e = gen.make(kTrainedTasks[i % 3], ctx, (i + 0.5) / o.retrieval_prompts, o.seed + 1000 + i);
    // Teacher-force the answer: tokenize prompt + answer together, as the model would have produced it.
    const std::vector<int32_t> prompt_ids = tok.encode(e.prompt, tok.add_bos());
    std::vector<int32_t> ids = tok.encode(e.prompt + e.expected, tok.add_bos());
    if (ids.size() <= prompt_ids.size() || !std::equal(prompt_ids.begin(), prompt_ids.end(), ids.begin()))
      fail("profile: the answer of a probe does not tokenize as a continuation of its prompt");
    const size_t prompt_len = prompt_ids.size();
    const std::vector<int32_t> ans(ids.begin() + prompt_len, ids.end());
    // The needle's copy of the answer digits: the answer's tokens minus its first (space) and last (period).
    std::vector<int32_t> digits_only(ans.begin() + (ans.size() > 2 ? 1 : 0), ans.end() - (ans.size() > 2 ? 1 : 0));
    obs.tokens = ids;
    obs.needle_spans = find_spans(ids, digits_only, prompt_len);
    obs.copy_rows.clear();
    for (size_t p = prompt_len - 1; p + 1 < ids.size(); ++p) {
      const int32_t next = ids[p + 1];
      if (std::find(digits_only.begin(), digits_only.end(), next) != digits_only.end() && !obs.needle_spans.empty())
        obs.copy_rows.push_back(int32_t(p));
    }
    copy_steps += int(obs.copy_rows.size());
    obs.measure_streaming = true;
    obs.query_from = int32_t(tok.encode(e.prompt.substr(0, e.prompt.rfind('\n')), tok.add_bos()).size());
    observe(ids);
    if (progress) progress(i + 1, total, fmt::format("retrieval probe {} ({} tokens)", eval::task_name(e.task), ids.size()));
  }
  // Natural text: streaming error only.
  for (int i = 0; i < o.natural_prompts; ++i) {
    eval::Episode e = gen.make(eval::Task::Passkey, ctx, 0.0, o.seed + 5000 + i);
    // Use the haystack part only (drop the needle sentence and the question).
    std::string text = e.prompt.substr(0, e.prompt.rfind('\n'));
    size_t cut = text.find("The pass key is");
    if (cut != std::string::npos) text = text.substr(text.find("pass key.", cut) + 9);
    std::vector<int32_t> ids = tok.encode(text, tok.add_bos());
    obs.tokens = ids;
    obs.query_from = INT32_MAX;
    obs.needle_spans.clear();
    obs.copy_rows.clear();
    observe(ids);
    if (progress) progress(o.retrieval_prompts + i + 1, total, fmt::format("natural text ({} tokens)", ids.size()));
  }
  // Per-head ablation: answer log-probability with only head h restricted, relative to all full.
  std::vector<double> ablation(H, 0.0);
  if (o.ablation_probes > 0) {
    AnswerProbes probes(m, gen, o.ablation_probes, ctx, o.seed + 9000);
    PolicySpec stream;
    stream.kind = PolicyKind::Streaming;
    stream.sinks = o.sinks;
    stream.window = o.window;
    auto answer_logprob = [&](const std::vector<PolicySpec>& specs) { return probes.run(be, specs, o).logprob; };
    const double base = answer_logprob(std::vector<PolicySpec>(H, PolicySpec{}));
    for (size_t h = 0; h < H; ++h) {
      std::vector<PolicySpec> specs(H, PolicySpec{});
      specs[h] = stream;
      ablation[h] = std::max(0.0, base - answer_logprob(specs));
      if (progress) progress(total, total, fmt::format("ablation {}/{}", h + 1, H));
    }
    s.ablation = ablation;
    // Joint effects: with the top head full and every other head streaming, how much does making each other
    // head full as well give back? (Heads that matter only together with the retrieval head show up here.)
    if (o.gain_round) {
      int top = int(std::max_element(ablation.begin(), ablation.end()) - ablation.begin());
      std::vector<PolicySpec> specs(H, stream);
      specs[top] = PolicySpec{};
      const double with_top = answer_logprob(specs);
      s.gain.assign(H, 0.0);
      for (size_t h = 0; h < H; ++h) {
        if (int(h) == top) continue;
        specs[h] = PolicySpec{};
        s.gain[h] = std::max(0.0, answer_logprob(specs) - with_top);
        specs[h] = stream;
        if (progress) progress(total, total, fmt::format("joint gain {}/{}", h + 1, H));
      }
    }
  }
  s.copy_steps = copy_steps;
  s.retrieval.resize(H);
  s.streaming_error.resize(H);
  s.query_error.resize(H);
  for (size_t i = 0; i < H; ++i) {
    s.retrieval[i] = copy_steps ? obs.hits[i] / copy_steps : 0.0;
    s.streaming_error[i] = obs.err_n[i] ? obs.err_sum[i] / double(obs.err_n[i]) : 0.0;
    s.query_error[i] = obs.qerr_n[i] ? obs.qerr_sum[i] / double(obs.qerr_n[i]) : 0.0;
  }
  return s;
}

std::function<double(int)> key_of(const Scores& s) {
  double max_r = 1e-12, max_e = 1e-12, max_a = 1e-12, max_g = 1e-12;
  for (double g : s.gain) max_g = std::max(max_g, g);
  for (double r : s.retrieval) max_r = std::max(max_r, r);
  for (double e : s.streaming_error) max_e = std::max(max_e, e);
  for (double a : s.ablation) max_a = std::max(max_a, a);
  // Retrieval score, ablation drop and joint gain, each normalised to [0, 1], summed; streaming error breaks ties.
  return [&s, max_r, max_e, max_a, max_g](int i) {
    const double abl = s.ablation.empty() ? 0.0 : s.ablation[i] / max_a;
    const double gain = s.gain.empty() ? 0.0 : s.gain[i] / max_g;
    const double err = s.streaming_error.empty() ? 0.0 : s.streaming_error[i] / max_e;
    return s.retrieval[i] / max_r + abl + gain + 1e-3 * err;
  };
}

std::vector<int> rank_heads(const Scores& s) {
  std::vector<int> order(s.retrieval.size());
  std::iota(order.begin(), order.end(), 0);
  auto key = key_of(s);
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return key(a) > key(b); });
  return order;
}

int64_t streaming_pages(const Options& o) { return streaming_max_pages(o.window, o.page_size); }
int64_t full_pages(int ctx, int page_size) { return (ctx + page_size - 1) / page_size; }

HeadMap assign(const ModelIdentity& id, const Scores& s, double target, int ctx, const Options& o,
               const std::vector<int>* order) {
  const int H = s.n_layer * s.n_head_kv;
  const int64_t fp = full_pages(ctx, o.page_size), sp = std::min(streaming_pages(o), fp);
  const double allowed = target * double(fp) * H;
  if (double(H * (o.fill_windows ? std::min<int64_t>(sp, 3) : sp)) > allowed + 1e-9)
    fail("target budget {:.1f}% is below what {} streaming heads need ({:.1f}%: {} sinks + {} window, pages of {})",
         target * 100, H, 100.0 * double(sp) / double(fp), o.sinks, o.window, o.page_size);
  // How many heads can be full with the others at the minimum window (with fill_windows, the smallest useful
  // window, 3 pages, so that a tight budget still keeps the retrieval heads) ...
  const int64_t sp_fit = o.fill_windows ? std::min<int64_t>(sp, 3) : sp;
  int k_fit = 0;
  while (k_fit < H && double((k_fit + 1) * fp + (H - k_fit - 1) * sp_fit) <= allowed + 1e-9) ++k_fit;
  // ... and how many the scores call for: heads whose combined score is at least `retrieval_share` of the best.
  std::vector<int> ranked = rank_heads(s);
  int k = k_fit;
  if (o.fill_windows) {
    auto key = key_of(s);
    const double best = ranked.empty() ? 0.0 : key(ranked[0]);
    int wanted = 0;
    while (wanted < H && best > 0 && key(ranked[wanted]) >= o.retrieval_share * best) ++wanted;
    k = std::min(k_fit, wanted);
  }
  if (order) ranked = *order;
  // The budget left after the full heads widens every streaming head's window equally (pages counted whole).
  int window = o.window;
  if (o.fill_windows && k < H) {
    const int64_t pages_each = std::min<int64_t>(fp, int64_t((allowed - double(k * fp)) / double(H - k)));
    window = int((pages_each - 2) * o.page_size + 1);
    if (streaming_max_pages(window, o.page_size) >= fp) window = int(ctx);  // as good as full
  }
  PolicySpec stream;
  stream.kind = PolicyKind::Streaming;
  stream.sinks = o.sinks;
  stream.window = window;
  stream.prefill = o.prefill;
  HeadMap m = HeadMap::uniform(id, stream);
  m.profile_sinks = o.sinks;
  m.profile_window = o.window;
  m.profile_prefill = o.prefill;
  for (int i = 0; i < k; ++i) m.heads[ranked[i]].spec = PolicySpec{};  // full
  for (int i = 0; i < H; ++i) {
    m.heads[i].retrieval_score = s.retrieval.empty() ? -1 : s.retrieval[i];
    m.heads[i].streaming_error = s.streaming_error.empty() ? -1 : s.streaming_error[i];
    m.heads[i].query_error = s.query_error.empty() ? -1 : s.query_error[i];
    m.heads[i].ablation = s.ablation.empty() ? -1 : s.ablation[i];
    m.heads[i].gain = s.gain.empty() ? -1 : s.gain[i];
  }
  const int64_t spw = std::min(streaming_max_pages(window, o.page_size), fp);
  m.note = fmt::format("target {:.1f}% of the full KV at {} tokens: {} full heads, {} streaming (sinks {}, window {}), "
                       "{:.1f}% of full KV bytes",
                       target * 100, ctx, k, H - k, o.sinks, window, 100.0 * double(k * fp + (H - k) * spw) / double(H * fp));
  return m;
}

}  // namespace headroom::profile
