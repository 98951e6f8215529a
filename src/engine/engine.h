// Engine: the one loop every command runs on (run, eval, profile, bench, and the server). Callers add
// requests; each step() asks the Scheduler what runs, parks and resumes what it preempts, feeds the rows of
// all running sequences to the Runner in one batched step, and turns each sequence's logits into its next
// token (sampled, or forced), reporting tokens, text and finishes through callbacks.
#pragma once

#include <functional>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <string_view>

#include "engine/scheduler.h"
#include "engine/sequence.h"
#include "model/model.h"

namespace headroom {

// The fewest device pages a prompt of n_prompt tokens takes under these per-head policies: what each head keeps
// of it, in whole pages. A prompt above the pool's capacity can never run.
int64_t prompt_min_pages(const std::vector<PolicySpec>& specs, int64_t n_prompt, int page_size);

struct EngineOptions {
  int parallel = 1;       // sequences running at once (-np / --parallel)
  int chunk = 512;        // prefill chunk (--chunk); the runner's max_batch must hold chunk + parallel rows
  AttentionObserver* observer = nullptr;  // sees every layer's attention (needs parallel 1)
};

class Engine {
 public:
  Engine(Runner& runner, PagePool& pool, const EngineOptions& o);
  ~Engine();

  // Queues a request; the sequence lives until it finishes (after on_finish) or, with keep, until release().
  Sequence& add(Request r);
  // Continues an idle (kept) sequence: `tokens` are prefilled as more prompt, then n_predict tokens are
  // generated (forced: teacher forcing, as in Request).
  void extend(Sequence& s, std::span<const int32_t> tokens, int n_predict, std::vector<int32_t> forced = {});
  void release(Sequence& s);  // an idle sequence: its pages go back, the sequence is gone
  // An idle sequence back to its first n_tokens tokens (KVCache::truncate says what that keeps per policy).
  void truncate(Sequence& s, int n_tokens);
  void abort(Sequence& s);    // ends it with finish reason abort at once (pages back, on_finish called)

  bool step();  // one step; false if there was nothing to run
  void run();   // steps until every sequence is finished or idle

  size_t running() const { return sched_.running().size(); }
  size_t waiting() const { return sched_.waiting().size(); }
  int64_t steps() const { return steps_; }
  PagePool& pool() { return pool_; }
  const Scheduler& scheduler() const { return sched_; }

  // Callbacks (all optional). on_logits sees a sequence's logits row before its next token is chosen;
  // on_token the chosen token; on_text text that is certain (stop strings held back until they cannot
  // match); on_finish the sequence at its end, before its pages go back; on_notice one-line notices.
  std::function<void(Sequence&, std::span<const float>)> on_logits;
  std::function<void(Sequence&, int32_t)> on_token;
  std::function<void(Sequence&, std::string_view)> on_text;
  std::function<void(Sequence&)> on_finish;
  std::function<void(const std::string&)> on_notice;

 private:
  void finish(Sequence& s, FinishReason r, std::string detail = {});
  void next_token(Sequence& s, std::span<const float> logits);
  bool push_text(Sequence& s, const std::string& piece);  // true if a stop string completed
  void emit(Sequence& s, const std::string& text);

  Runner& runner_;
  PagePool& pool_;
  EngineOptions o_;
  Scheduler sched_;
  std::unique_ptr<PageCounter> counter_;
  std::map<int64_t, std::unique_ptr<Sequence>> seqs_;
  int64_t next_id_ = 1, steps_ = 0;
  bool told_waves_ = false, told_preempt_ = false;
  std::vector<SeqRows> rows_;
};

}  // namespace headroom
