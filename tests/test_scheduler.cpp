// The scheduler's decisions, on page counts given by hand (no model): chunked prefill interleaved with
// decodes, prompts cut only at chunk multiples, admission by free pages, preemption of the newest sequence,
// rejection of what can never fit, the parallel limit.
#include <gtest/gtest.h>

#include <array>

#include <algorithm>
#include <map>
#include <memory>

#include "engine/scheduler.h"

namespace headroom {
namespace {

// One KV head per sequence, `ps` tokens per page, `capacity` device pages; parked sequences hold none.
struct FakePages : PageCounter {
  int ps = 4;
  int64_t capacity = 1000;
  std::vector<Sequence*> all;
  static int64_t pages(int tokens, int ps) { return (tokens + ps - 1) / ps; }
  int64_t free_pages() const override {
    int64_t used = 0;
    for (const Sequence* s : all)
      if (s->state != Sequence::State::Parked && s->state != Sequence::State::Finished) used += pages(s->n_cached, ps);
    return capacity - used;
  }
  int64_t need(const Sequence& s, int rows) const override { return pages(s.n_cached + rows, ps) - pages(s.n_cached, ps); }
  int64_t held(const Sequence& s) const override { return pages(s.n_cached, ps); }
  int64_t parked(const Sequence& s) const override { return pages(s.n_cached, ps); }
  bool can_park(const Sequence&) const override { return true; }
  std::string never_fits(const Sequence& s) const override {
    return pages(s.n_prompt, ps) > capacity ? "too long for the pool" : "";
  }
};

struct Sim {
  Scheduler sched;
  FakePages pages;
  std::vector<std::unique_ptr<Sequence>> owned;
  std::map<Sequence*, int> to_generate;
  explicit Sim(SchedulerOptions o) : sched(o) {}
  Sequence* add(int prompt, int gen) {
    owned.push_back(std::make_unique<Sequence>());
    Sequence* s = owned.back().get();
    s->id = int64_t(owned.size());
    s->n_prompt = prompt;
    to_generate[s] = gen;
    pages.all.push_back(s);
    sched.add(s);
    return s;
  }
  // Schedules one step and applies it as the engine would: rows fed, tokens generated, finishes.
  StepPlan step() {
    StepPlan p = sched.schedule(pages);
    for (auto& [s, why] : p.reject) s->state = Sequence::State::Finished;
    for (Sequence* s : p.out_of_pool) s->state = Sequence::State::Finished;
    for (const ScheduledRows& r : p.rows) {
      r.seq->n_cached += r.n_rows;
      if (!r.seq->prefilling() && ++r.seq->n_generated >= to_generate[r.seq]) {
        sched.remove(r.seq);
        r.seq->state = Sequence::State::Finished;
      }
    }
    return p;
  }
  static const ScheduledRows* find(const StepPlan& p, const Sequence* s) {
    for (const ScheduledRows& r : p.rows)
      if (r.seq == s) return &r;
    return nullptr;
  }
};

SchedulerOptions opts(int parallel, int chunk, int step_tokens = 0) {
  SchedulerOptions o;
  o.parallel = parallel;
  o.chunk = chunk;
  o.step_tokens = step_tokens;
  return o;
}

TEST(Scheduler, LongPromptIsPrefilledInChunksBetweenDecodes) {
  Sim sim(opts(4, 8));
  Sequence* a = sim.add(3, 100);
  StepPlan p = sim.step();
  ASSERT_EQ(p.rows.size(), 1u);
  EXPECT_TRUE(p.rows[0].prefill && p.rows[0].last_chunk);
  Sequence* b = sim.add(20, 5);
  const int want[] = {8, 8, 4};
  for (int i = 0; i < 3; ++i) {
    p = sim.step();
    const ScheduledRows* ra = Sim::find(p, a);
    const ScheduledRows* rb = Sim::find(p, b);
    ASSERT_TRUE(ra && rb) << "step " << i << ": the decode keeps flowing while the prompt is read";
    EXPECT_FALSE(ra->prefill);
    EXPECT_EQ(ra->n_rows, 1);
    EXPECT_TRUE(rb->prefill);
    EXPECT_EQ(rb->n_rows, want[i]);
    EXPECT_EQ(rb->last_chunk, i == 2);
  }
  p = sim.step();
  ASSERT_TRUE(Sim::find(p, b));
  EXPECT_FALSE(Sim::find(p, b)->prefill);
}

TEST(Scheduler, PromptsAreCutOnlyAtChunkMultiplesWhateverTheLoad) {
  // A step of 10 tokens: after four decodes, 6 are left, less than a chunk of 8. The chunk waits (it is
  // never cut to 6); the step after it gets it whole once a decode finishes.
  Sim sim(opts(5, 8, 10));
  std::vector<Sequence*> dec;
  for (int i = 0; i < 4; ++i) dec.push_back(sim.add(1, 3 + i));
  sim.step();  // their one-token prompts
  Sequence* b = sim.add(19, 1);
  for (int step = 0; step < 12 && b->state != Sequence::State::Finished; ++step) {
    StepPlan p = sim.step();
    int rows = 0;
    for (const ScheduledRows& r : p.rows) rows += r.n_rows;
    EXPECT_LE(rows, 10);
    if (const ScheduledRows* rb = Sim::find(p, b); rb && rb->prefill) {
      const int before = b->n_cached - rb->n_rows;
      EXPECT_EQ(before % 8, 0) << "a chunk starts at a multiple of --chunk";
      EXPECT_TRUE(rb->n_rows == 8 || rb->last_chunk) << rb->n_rows;
    }
  }
  EXPECT_EQ(b->state, Sequence::State::Finished);
}

TEST(Scheduler, AdmitsByFreePagesAndRunsTheRestInWaves) {
  Sim sim(opts(4, 16));
  sim.pages.capacity = 4;
  Sequence* a = sim.add(12, 2);  // 3 pages, then 4 while it decodes
  Sequence* b = sim.add(8, 2);   // 2 pages: not while a runs
  StepPlan p = sim.step();
  EXPECT_TRUE(Sim::find(p, a));
  EXPECT_FALSE(Sim::find(p, b));
  EXPECT_TRUE(p.waves);
  EXPECT_EQ(b->state, Sequence::State::Waiting);
  for (int i = 0; i < 4 && a->state != Sequence::State::Finished; ++i) sim.step();
  ASSERT_EQ(a->state, Sequence::State::Finished);
  p = sim.step();
  EXPECT_TRUE(Sim::find(p, b)) << "admitted once a's pages are back";
}

TEST(Scheduler, PreemptsTheNewestAndResumesItWhereItStopped) {
  Sim sim(opts(4, 16));
  sim.pages.capacity = 4;
  Sequence* a = sim.add(7, 10);  // 2 pages each: the pool is full after both prompts
  Sequence* b = sim.add(7, 10);
  StepPlan p = sim.step();
  ASSERT_EQ(p.rows.size(), 2u);
  p = sim.step();  // both at 8 tokens: still 2 pages each
  ASSERT_EQ(p.rows.size(), 2u);
  p = sim.step();  // a needs a third page: b, the newest, is parked
  ASSERT_EQ(p.preempt.size(), 1u);
  EXPECT_EQ(p.preempt[0], b);
  EXPECT_EQ(b->state, Sequence::State::Parked);
  EXPECT_TRUE(Sim::find(p, a));
  EXPECT_FALSE(Sim::find(p, b));
  const int b_at = b->n_cached;
  while (a->state != Sequence::State::Finished) {
    p = sim.step();
    EXPECT_FALSE(Sim::find(p, b)) << "b stays parked while a needs the pages";
  }
  // a's pages are back: b resumes, with its tokens as they were.
  p = sim.step();
  ASSERT_EQ(p.resume.size(), 1u);
  EXPECT_EQ(p.resume[0], b);
  ASSERT_TRUE(Sim::find(p, b));
  EXPECT_FALSE(Sim::find(p, b)->prefill);
  EXPECT_EQ(b->n_cached, b_at + 1) << "one decode row further, nothing recomputed";
  EXPECT_EQ(b->state, Sequence::State::Running);
}

TEST(Scheduler, OnlyWhatCanNeverFitIsRejected) {
  Sim sim(opts(4, 16));
  sim.pages.capacity = 4;
  Sequence* big = sim.add(100, 1);
  Sequence* small = sim.add(4, 1);
  StepPlan p = sim.step();
  ASSERT_EQ(p.reject.size(), 1u);
  EXPECT_EQ(p.reject[0].first, big);
  EXPECT_EQ(p.reject[0].second, "too long for the pool");
  EXPECT_TRUE(Sim::find(p, small));
}

TEST(Scheduler, ASequenceThatOutgrowsThePoolAloneEnds) {
  Sim sim(opts(1, 16));
  sim.pages.capacity = 2;
  Sequence* a = sim.add(8, 100);
  sim.step();  // prompt: 2 pages
  StepPlan p = sim.step();
  ASSERT_EQ(p.out_of_pool.size(), 1u);
  EXPECT_EQ(p.out_of_pool[0], a);
  EXPECT_TRUE(sim.sched.idle());
}

TEST(Scheduler, RunsAtMostParallelSequences) {
  Sim sim(opts(2, 16));
  Sequence* s[3] = {sim.add(2, 3), sim.add(2, 3), sim.add(2, 3)};
  StepPlan p = sim.step();
  EXPECT_TRUE(Sim::find(p, s[0]) && Sim::find(p, s[1]));
  EXPECT_FALSE(Sim::find(p, s[2]));
  EXPECT_EQ(sim.sched.running().size(), 2u);
  while (s[0]->state != Sequence::State::Finished) p = sim.step();
  p = sim.step();
  EXPECT_TRUE(Sim::find(p, s[2]));
}

// A pool in two parts (tensor-parallel ranks): every sequence's pages sit on the part its weights say (a head
// map can put all of one sequence's heavy heads on one rank). Admission must count per part: a sequence whose
// part is full waits even though the pool as a whole has room, and one for the other part goes ahead.
struct PartPages : FakePages {
  int64_t part_capacity = 10;
  std::map<const Sequence*, std::array<int64_t, 2>> weight;  // pages per token-page on part 0, part 1
  int parts() const override { return 2; }
  int64_t free_pages(int part) const override {
    int64_t used = 0;
    for (const Sequence* s : all)
      if (s->state != Sequence::State::Parked && s->state != Sequence::State::Finished)
        used += pages(s->n_cached, ps) * weight.at(s)[size_t(part)];
    return part_capacity - used;
  }
  int64_t need(const Sequence& s, int rows, int part) const override {
    return (pages(s.n_cached + rows, ps) - pages(s.n_cached, ps)) * weight.at(&s)[size_t(part)];
  }
  int64_t held(const Sequence& s, int part) const override { return pages(s.n_cached, ps) * weight.at(&s)[size_t(part)]; }
  int64_t parked(const Sequence& s, int part) const override { return held(s, part); }
  // The part-less counts: the sums.
  int64_t free_pages() const override { return free_pages(0) + free_pages(1); }
  int64_t need(const Sequence& s, int rows) const override { return need(s, rows, 0) + need(s, rows, 1); }
  int64_t held(const Sequence& s) const override { return held(s, 0) + held(s, 1); }
  int64_t parked(const Sequence& s) const override { return held(s); }
};

TEST(Scheduler, TensorParallelPartsAreCountedEachOnItsOwn) {
  Scheduler sched(opts(8, 8, 17));
  PartPages pages;
  std::vector<std::unique_ptr<Sequence>> owned;
  auto add = [&](int64_t w0, int64_t w1) {
    owned.push_back(std::make_unique<Sequence>());
    Sequence* s = owned.back().get();
    s->id = int64_t(owned.size());
    s->n_prompt = 8;  // 2 pages of 4: 4 pages on a part of weight 2
    pages.all.push_back(s);
    pages.weight[s] = {w0, w1};
    sched.add(s);
    return s;
  };
  Sequence* a1 = add(2, 0);
  Sequence* a2 = add(2, 0);
  Sequence* a3 = add(2, 0);
  Sequence* b = add(0, 2);
  auto admitted = [&](const StepPlan& p, const Sequence* s) {
    return std::any_of(p.rows.begin(), p.rows.end(), [&](const ScheduledRows& r) { return r.seq == s; });
  };
  // The token budget (17) takes two prompts a step, and then a decode and two prompts: a1 and a2 (part 0:
  // 8 of 10 pages).
  StepPlan p = sched.schedule(pages);
  for (const ScheduledRows& r : p.rows) r.seq->n_cached += r.n_rows;
  EXPECT_TRUE(admitted(p, a1) && admitted(p, a2));
  // a3 needs 4 more pages of part 0, which has 2 left; the pool as a whole has 12. It waits (waves), and
  // b, whose pages go to part 1, is not admitted past it (first come, first served) but fits once a3 can.
  p = sched.schedule(pages);
  EXPECT_FALSE(admitted(p, a3)) << "part 0 is full: a3 must wait although the pool has room elsewhere";
  EXPECT_TRUE(p.waves);
  EXPECT_FALSE(admitted(p, b));
  // a1 finishes: part 0 has room again (a2's decode row takes 2 of the 6 free), and both a3 and b run.
  sched.remove(a1);
  a1->state = Sequence::State::Finished;
  p = sched.schedule(pages);
  EXPECT_TRUE(admitted(p, a3));
  EXPECT_TRUE(admitted(p, b));
}

TEST(Scheduler, BadOptionsAreOneLine) {
  EXPECT_THROW(Scheduler(opts(0, 16)), Error);
  EXPECT_THROW(Scheduler(opts(1, 0)), Error);
  EXPECT_THROW(Scheduler(opts(1, 16, 8)), Error);
}

}  // namespace
}  // namespace headroom
