// Scheduler: which sequences run in the next step, and how many rows each feeds. Waiting and running queues,
// a per-step token budget, admission by free pages in the pool, preemption of the newest sequence when pages
// run out. It decides on counts only (PageCounter), so its decisions are tested without a model.
//
// Per step:
//   1. running sequences, oldest first: a decode row, or the next chunk of the prompt. A prompt is split only
//      at multiples of `chunk` (its last piece is what is left), whatever the load, so its logits never
//      depend on what else runs; a chunk that does not fit the step's token budget waits for the next step.
//      When the pool cannot take a sequence's rows, the newest running sequences are preempted (their pages
//      parked in the host tier) until it can; the oldest that still cannot, alone, has outgrown the pool.
//   2. waiting sequences, first come first served (preempted ones at the front), while fewer than `parallel`
//      run and the pool and the token budget take their first rows. One that can never fit is rejected.
#pragma once

#include <cstdint>
#include <deque>
#include <string>
#include <utility>
#include <vector>

#include "engine/sequence.h"

namespace headroom {

// Page counts the scheduler decides on (the engine answers from the KV caches; tests answer by hand).
// A pool split into parts (tensor-parallel ranks, each its own device pages) answers per part as well: a
// sequence fits when every part has room for its heads there. One part: the part-less counts.
class PageCounter {
 public:
  virtual ~PageCounter() = default;
  virtual int64_t free_pages() const = 0;                         // device pages free in the pool
  virtual int64_t need(const Sequence& s, int rows) const = 0;    // device pages `rows` more rows take
  virtual int64_t held(const Sequence& s) const = 0;              // device pages the sequence holds
  virtual int64_t parked(const Sequence& s) const = 0;            // pages a parked sequence brings back
  virtual bool can_park(const Sequence& s) const = 0;             // the host tier has room for its pages
  virtual std::string never_fits(const Sequence& s) const = 0;    // "" or why it can never run
  virtual int parts() const { return 1; }
  virtual int64_t free_pages(int part) const { return part == 0 ? free_pages() : 0; }
  virtual int64_t need(const Sequence& s, int rows, int part) const { return part == 0 ? need(s, rows) : 0; }
  virtual int64_t held(const Sequence& s, int part) const { return part == 0 ? held(s) : 0; }
  virtual int64_t parked(const Sequence& s, int part) const { return part == 0 ? parked(s) : 0; }
};

struct SchedulerOptions {
  int parallel = 1;      // sequences running at once
  int chunk = 512;       // prefill chunk (tokens)
  int step_tokens = 0;   // rows per step (0: chunk + parallel, so one chunk and every decode fit)
};

struct ScheduledRows {
  Sequence* seq;
  int n_rows;
  bool prefill;
  bool last_chunk;
};

struct StepPlan {
  std::vector<Sequence*> preempt;   // park these before the step (they are waiting again)
  std::vector<Sequence*> resume;    // unpark these before the step (they are running again)
  std::vector<ScheduledRows> rows;  // the step, in order
  std::vector<std::pair<Sequence*, std::string>> reject;  // can never fit: finish them with the reason
  std::vector<Sequence*> out_of_pool;  // the oldest running one and the pool cannot take its rows even alone
  bool waves = false;               // a waiting sequence could not be admitted for want of pages
};

class Scheduler {
 public:
  explicit Scheduler(const SchedulerOptions& o);
  const SchedulerOptions& options() const { return o_; }
  int step_tokens() const { return step_tokens_; }

  void add(Sequence* s);     // to the back of the waiting queue
  void remove(Sequence* s);  // finished or aborted: out of both queues
  StepPlan schedule(const PageCounter& pages);

  // The rows a sequence feeds when it next runs: a decode row, or its next prompt chunk.
  int next_rows(const Sequence& s) const;

  const std::deque<Sequence*>& waiting() const { return waiting_; }
  const std::vector<Sequence*>& running() const { return running_; }
  bool idle() const { return waiting_.empty() && running_.empty(); }

 private:
  SchedulerOptions o_;
  int step_tokens_;
  std::deque<Sequence*> waiting_;
  std::vector<Sequence*> running_;  // in order of admission
};

}  // namespace headroom
