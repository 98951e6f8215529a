#include "engine/scheduler.h"

#include <algorithm>
#include <vector>

#include "util/error.h"

namespace headroom {

const char* finish_reason_name(FinishReason r) {
  switch (r) {
    case FinishReason::None: return "none";
    case FinishReason::Length: return "length";
    case FinishReason::Eog: return "eog";
    case FinishReason::Stop: return "stop";
    case FinishReason::Context: return "context";
    case FinishReason::Budget: return "budget";
    case FinishReason::Pool: return "pool";
    case FinishReason::Abort: return "abort";
  }
  return "?";
}

Scheduler::Scheduler(const SchedulerOptions& o) : o_(o) {
  if (o.parallel < 1) fail("--parallel {} is out of range (at least 1)", o.parallel);
  if (o.chunk < 1) fail("--chunk {} is out of range (at least 1)", o.chunk);
  step_tokens_ = o.step_tokens > 0 ? o.step_tokens : o.chunk + o.parallel;
  if (step_tokens_ < o.chunk) fail("a step of {} tokens cannot hold a prefill chunk of {}", step_tokens_, o.chunk);
}

void Scheduler::add(Sequence* s) {
  s->state = Sequence::State::Waiting;
  waiting_.push_back(s);
}

void Scheduler::remove(Sequence* s) {
  waiting_.erase(std::remove(waiting_.begin(), waiting_.end(), s), waiting_.end());
  running_.erase(std::remove(running_.begin(), running_.end(), s), running_.end());
}

int Scheduler::next_rows(const Sequence& s) const { return s.prefilling() ? std::min(o_.chunk, s.prompt_left()) : 1; }

namespace {
// Device pages per part of the pool (one entry for an unsplit pool).
struct PartPages {
  std::vector<int64_t> n;
  bool exceeds(const PartPages& o) const {  // more than `o` in some part
    for (size_t p = 0; p < n.size(); ++p)
      if (n[p] > o.n[p]) return true;
    return false;
  }
  void add(const PartPages& o, int sign) {
    for (size_t p = 0; p < n.size(); ++p) n[p] += sign * o.n[p];
  }
};
}  // namespace

StepPlan Scheduler::schedule(const PageCounter& pages) {
  StepPlan plan;
  const int P = std::max(1, pages.parts());
  auto per_part = [&](auto&& count) {
    PartPages c;
    c.n.resize(size_t(P));
    for (int p = 0; p < P; ++p) c.n[size_t(p)] = P == 1 ? count(-1) : count(p);
    return c;
  };
  PartPages free = per_part([&](int p) { return p < 0 ? pages.free_pages() : pages.free_pages(p); });
  auto need_of = [&](const Sequence& s, int rows) {
    return per_part([&](int p) { return p < 0 ? pages.need(s, rows) : pages.need(s, rows, p); });
  };
  int tokens = step_tokens_;

  // 1. Running sequences, oldest first.
  for (size_t i = 0; i < running_.size(); ++i) {
    Sequence* s = running_[i];
    const int rows = next_rows(*s);
    if (rows > tokens) continue;  // this chunk waits for a step with room: prompts are never cut shorter
    const PartPages need = need_of(*s, rows);
    while (need.exceeds(free) && running_.back() != s && pages.can_park(*running_.back())) {
      Sequence* victim = running_.back();
      running_.pop_back();
      free.add(per_part([&](int p) { return p < 0 ? pages.held(*victim) : pages.held(*victim, p); }), +1);
      victim->state = Sequence::State::Parked;
      waiting_.push_front(victim);
      plan.preempt.push_back(victim);
    }
    if (need.exceeds(free)) {
      if (i == 0 && running_.size() == 1) plan.out_of_pool.push_back(s);
      continue;
    }
    plan.rows.push_back({s, rows, s->prefilling(), s->prefilling() && rows == s->prompt_left()});
    free.add(need, -1);
    tokens -= rows;
  }
  for (Sequence* s : plan.out_of_pool) remove(s);

  // 2. Waiting sequences, first come first served.
  while (!waiting_.empty() && int(running_.size()) < o_.parallel) {
    Sequence* s = waiting_.front();
    if (std::find(plan.preempt.begin(), plan.preempt.end(), s) != plan.preempt.end()) break;  // not in the same step
    if (std::string why = pages.never_fits(*s); !why.empty()) {
      waiting_.pop_front();
      plan.reject.emplace_back(s, std::move(why));
      continue;
    }
    const int rows = next_rows(*s);
    if (rows > tokens) break;
    const bool parked = s->state == Sequence::State::Parked;
    PartPages need = need_of(*s, rows);
    if (parked) need.add(per_part([&](int p) { return p < 0 ? pages.parked(*s) : pages.parked(*s, p); }), +1);
    if (need.exceeds(free)) {
      plan.waves = true;
      break;
    }
    waiting_.pop_front();
    running_.push_back(s);
    if (parked) plan.resume.push_back(s);
    s->state = Sequence::State::Running;
    plan.rows.push_back({s, rows, s->prefilling(), s->prefilling() && rows == s->prompt_left()});
    free.add(need, -1);
    tokens -= rows;
  }
  return plan;
}

}  // namespace headroom
