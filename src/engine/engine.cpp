#include "engine/engine.h"

#include <algorithm>
#include <chrono>

#include "util/error.h"

namespace headroom {

namespace {

double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// The scheduler's page counts, from the sequences' caches and the pool.
class CachePages : public PageCounter {
 public:
  explicit CachePages(PagePool& pool) : pool_(pool) {}
  int64_t free_pages() const override { return pool_.device_free(); }
  int64_t need(const Sequence& s, int rows) const override { return s.kv->pages_for(rows); }
  int64_t held(const Sequence& s) const override { return s.kv->device_pages_held(); }
  int64_t parked(const Sequence& s) const override { return s.kv->parked_pages(); }
  bool can_park(const Sequence& s) const override { return s.kv->can_park(); }
  // Tensor parallel: each rank's part of the pool counts for the heads placed there.
  int parts() const override { return pool_.n_parts(); }
  int64_t free_pages(int part) const override { return pool_.device_free(part); }
  int64_t need(const Sequence& s, int rows, int part) const override {
    return s.kv->pages_for_parts(rows)[size_t(part)];
  }
  int64_t held(const Sequence& s, int part) const override { return s.kv->device_pages_held(part); }
  int64_t parked(const Sequence& s, int part) const override { return s.kv->parked_pages_by_part()[size_t(part)]; }
  std::string never_fits(const Sequence& s) const override {
    if (s.kv->pages_held() > 0) return "";  // it has run before: it fitted
    const int64_t least = prompt_min_pages(*s.req.specs, s.n_prompt, pool_.page_size());
    if (least <= pool_.device_capacity()) return "";
    return fmt::format("its prompt of {} tokens needs at least {} KV pages, more than the pool's {} ({:.1f} MiB; "
                       "raise --kv-pool or shorten the prompt)",
                       s.n_prompt, least, pool_.device_capacity(),
                       double(pool_.device_capacity() * pool_.layout().page_bytes()) / (1024.0 * 1024));
  }

 private:
  PagePool& pool_;
};

}  // namespace

int64_t prompt_min_pages(const std::vector<PolicySpec>& specs, int64_t n_prompt, int page_size) {
  int64_t least = 0;
  for (const PolicySpec& spec : specs) {
    const int64_t kept = std::min<int64_t>(n_prompt, make_policy(spec)->max_tokens(n_prompt, page_size));
    least += (kept + page_size - 1) / page_size;
  }
  return least;
}

namespace {

SchedulerOptions scheduler_options(const EngineOptions& o) {
  SchedulerOptions so;
  so.parallel = o.parallel;
  so.chunk = o.chunk;
  return so;
}

}  // namespace

Engine::Engine(Runner& runner, PagePool& pool, const EngineOptions& o)
    : runner_(runner), pool_(pool), o_(o), sched_(scheduler_options(o)), counter_(std::make_unique<CachePages>(pool)) {
  if (o.observer && o.parallel != 1) fail("engine: an attention observer needs --parallel 1");
  if (runner.max_batch() < sched_.step_tokens())
    fail("engine: the runner holds {} rows per step, the scheduler plans up to {}", runner.max_batch(),
         sched_.step_tokens());
}

Engine::~Engine() = default;

Sequence& Engine::add(Request r) {
  const Model& m = runner_.model();
  if (!r.specs) fail("engine: a request without KV policy specs");
  if (r.prompt.empty() && !r.keep) fail("empty prompt: nothing to generate from");
  if (r.n_ctx > 0 && int64_t(r.prompt.size()) > r.n_ctx)
    fail("prompt is {} tokens, longer than the context of {} tokens (raise -c or shorten the prompt)", r.prompt.size(),
         r.n_ctx);
  auto s = std::make_unique<Sequence>();
  s->id = next_id_++;
  s->tokens = r.prompt;
  s->n_prompt = int(r.prompt.size());
  s->kv = std::make_unique<KVCache>(m.config(), pool_, *r.specs, r.max_device_pages);
  s->sampler = std::make_unique<Sampler>(r.sampling);
  s->decoder = std::make_unique<StreamDecoder>(m.tokenizer(), /*special=*/false, /*continuation=*/true);
  s->req = std::move(r);
  s->t_added = now_s();
  Sequence& ref = *s;
  seqs_.emplace(ref.id, std::move(s));
  if (ref.n_prompt == 0) {
    ref.state = Sequence::State::Idle;  // a kept sequence with nothing yet: extend() gives it its prompt
  } else {
    sched_.add(&ref);
  }
  return ref;
}

void Engine::extend(Sequence& s, std::span<const int32_t> tokens, int n_predict, std::vector<int32_t> forced) {
  if (s.state != Sequence::State::Idle) fail("engine: only an idle sequence can be extended");
  if (tokens.empty()) fail("engine: extend with no tokens");
  s.tokens.resize(size_t(s.n_cached));  // a generated token that was never fed goes
  s.tokens.insert(s.tokens.end(), tokens.begin(), tokens.end());
  s.n_prompt = int(s.tokens.size());
  s.n_generated = 0;
  s.req.n_predict = n_predict;
  s.req.forced = std::move(forced);
  s.finish = FinishReason::None;
  s.finish_detail.clear();
  s.t_started = s.t_first_token = s.t_finished = 0;
  sched_.add(&s);
}

void Engine::truncate(Sequence& s, int n_tokens) {
  if (s.state != Sequence::State::Idle) fail("engine: only an idle sequence can be truncated");
  if (n_tokens < 0 || n_tokens > s.n_cached)
    fail("engine: truncate to {} tokens of a sequence that holds {}", n_tokens, s.n_cached);
  s.kv->truncate(n_tokens);
  s.tokens.resize(size_t(n_tokens));
  s.n_cached = n_tokens;
  s.n_prompt = std::min(s.n_prompt, n_tokens);
}

void Engine::release(Sequence& s) {
  if (s.state != Sequence::State::Idle) fail("engine: only an idle sequence can be released");
  sched_.remove(&s);
  seqs_.erase(s.id);
}

void Engine::abort(Sequence& s) {
  if (s.state == Sequence::State::Finished) return;
  sched_.remove(&s);
  finish(s, FinishReason::Abort);
}

void Engine::emit(Sequence& s, const std::string& text) {
  if (text.empty()) return;
  s.text += text;
  if (on_text) on_text(s, text);
}

bool Engine::push_text(Sequence& s, const std::string& piece) {
  s.pending += piece;
  const std::vector<std::string>& stop = s.req.stop;
  for (const std::string& st : stop) {
    const size_t at = st.empty() ? std::string::npos : s.pending.find(st);
    if (at != std::string::npos) {
      emit(s, s.pending.substr(0, at));
      s.pending.clear();
      return true;
    }
  }
  size_t keep = 0;  // the longest suffix of pending that is a proper prefix of some stop string
  for (const std::string& st : stop)
    for (size_t len = std::min(st.empty() ? 0 : st.size() - 1, s.pending.size()); len > keep; --len)
      if (s.pending.compare(s.pending.size() - len, len, st, 0, len) == 0) {
        keep = len;
        break;
      }
  emit(s, s.pending.substr(0, s.pending.size() - keep));
  s.pending.erase(0, s.pending.size() - keep);
  return false;
}

void Engine::finish(Sequence& s, FinishReason r, std::string detail) {
  s.finish = r;
  s.finish_detail = std::move(detail);
  s.t_finished = now_s();
  if (r != FinishReason::Stop) {
    push_text(s, s.decoder->flush());
    emit(s, s.pending);
    s.pending.clear();
  }
  sched_.remove(&s);
  if (s.kv->parked()) s.kv->unpark();  // (pages come back to be given back or kept)
  const bool keep = s.req.keep && r != FinishReason::Abort;
  s.state = keep ? Sequence::State::Idle : Sequence::State::Finished;
  if (on_finish) on_finish(s);
  if (!keep) seqs_.erase(s.id);
}

void Engine::next_token(Sequence& s, std::span<const float> logits) {
  if (s.n_generated == 0) s.t_first_token = now_s();
  if (on_logits) on_logits(s, logits);
  const Request& r = s.req;
  if (r.n_predict == 0) return finish(s, FinishReason::Length);
  const bool forced = size_t(s.n_generated) < r.forced.size();
  const int32_t id = forced ? r.forced[size_t(s.n_generated)] : s.sampler->sample(logits, s.tokens);
  if (!forced && !r.ignore_eos && runner_.model().tokenizer().is_eog(id)) return finish(s, FinishReason::Eog);
  s.tokens.push_back(id);
  ++s.n_generated;
  if (on_token) on_token(s, id);
  if (push_text(s, s.decoder->push(id))) return finish(s, FinishReason::Stop);
  if (r.n_predict > 0 && s.n_generated >= r.n_predict) return finish(s, FinishReason::Length);
  if (r.n_ctx > 0 && s.n_cached >= r.n_ctx) return finish(s, FinishReason::Context);
}

bool Engine::step() {
  // The running sequences' policies act on their last step first, so that the page counts the scheduler
  // decides on are exact (a running sequence's next rows are known: a decode row or its next chunk).
  for (Sequence* s : sched_.running()) {
    const int rows = sched_.next_rows(*s);
    s->kv->prepare(StepInfo{s->n_cached, rows, s->prefilling(), s->prefilling() && rows == s->prompt_left()});
  }
  StepPlan plan = sched_.schedule(*counter_);
  for (auto& [s, why] : plan.reject) finish(*s, FinishReason::Pool, std::move(why));
  for (Sequence* s : plan.out_of_pool) {
    if (std::string why = s->kv->over_budget(sched_.next_rows(*s)); !why.empty()) {
      finish(*s, FinishReason::Budget, std::move(why));
      continue;
    }
    finish(*s, FinishReason::Pool,
           fmt::format("KV pool exhausted after {} tokens: the sequence alone outgrew the pool's {} pages (raise "
                       "--kv-pool)", s->n_cached, pool_.device_capacity()));
  }
  for (Sequence* s : plan.preempt) {
    if (!s->kv->park()) fail("engine: the host tier has no room to park a preempted sequence");  // checked
    if (on_notice && !told_preempt_)
      on_notice("the KV pool is full: the newest sequences are preempted (parked in the host tier) and resume later");
    told_preempt_ = true;
  }
  for (Sequence* s : plan.resume)
    if (!s->kv->unpark()) fail("engine: no room to resume a parked sequence");  // checked by the scheduler
  if (plan.waves && !told_waves_ && on_notice) {
    on_notice(fmt::format("the sequences do not all fit in the KV pool ({} pages) at once: they run in waves",
                          pool_.device_capacity()));
  }
  told_waves_ |= plan.waves;

  // Each sequence's own budget, checked after its policies acted on the last step (exact).
  rows_.clear();
  std::vector<ScheduledRows> ran;
  for (const ScheduledRows& r : plan.rows) {
    Sequence& s = *r.seq;
    const StepInfo info{s.n_cached, r.n_rows, r.prefill, r.last_chunk};
    s.kv->prepare(info);
    if (std::string why = s.kv->over_budget(r.n_rows); !why.empty()) {
      finish(s, FinishReason::Budget, std::move(why));
      continue;
    }
    if (s.t_started == 0) s.t_started = now_s();
    SeqRows sr;
    sr.kv = s.kv.get();
    sr.tokens = std::span<const int32_t>(s.tokens.data() + s.n_cached, size_t(r.n_rows));
    sr.pos0 = s.n_cached;
    sr.prefill = r.prefill;
    sr.last_chunk = r.last_chunk;
    sr.logits = !r.prefill || r.last_chunk ? SeqRows::Logits::Last : SeqRows::Logits::None;
    rows_.push_back(sr);
    ran.push_back(r);
  }
  if (rows_.empty()) {
    // Nothing could run and nothing is running: the first waiting sequence cannot start even alone.
    if (plan.rows.empty() && sched_.running().empty() && !sched_.waiting().empty() && plan.preempt.empty()) {
      Sequence& s = *sched_.waiting().front();
      const int rows = sched_.next_rows(s);
      finish(s, FinishReason::Pool,
             fmt::format("KV pool exhausted: the sequence's next {} tokens need {} device pages, {} of the pool's {} "
                         "are free (raise --kv-pool, or lower --chunk)",
                         rows, s.kv->pages_for(rows) + s.kv->parked_pages(),
                         pool_.device_free(), pool_.device_capacity()));
    }
    return !sched_.idle();
  }
  ++steps_;
  std::span<const float> logits = runner_.step(rows_, o_.observer);
  const size_t V = size_t(runner_.model().config().n_vocab);
  size_t row = 0;
  for (size_t i = 0; i < ran.size(); ++i) {
    Sequence& s = *ran[i].seq;
    s.n_cached += ran[i].n_rows;
    if (rows_[i].logits == SeqRows::Logits::None) continue;
    next_token(s, logits.subspan(row * V, V));
    ++row;
  }
  return true;
}

void Engine::run() {
  while (!sched_.idle()) step();
}

}  // namespace headroom
