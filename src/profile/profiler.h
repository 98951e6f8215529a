// Training-free head profiler (Retrieval Head + DuoAttention-style streaming error, measured, not trained):
//  - retrieval score of a KV head: on needle-copy prompts (the trained retrieval formats, answer teacher-
//    forced), the share of copy steps where the strongest attention of (any query head of) the KV head lands
//    on the needle token being copied — as in the Retrieval Head paper;
//  - streaming error of a KV head: the relative L2 change of its attention output when only that head is
//    restricted to sinks + window, on long retrieval prompts and natural text, averaged over query rows;
//  - ablation drop of a KV head: how much the teacher-forced answer's log-probability falls when only that
//    head is restricted to sinks + window (catches heads retrieval needs that do not copy themselves);
//  - assign(): from the scores, the heads that get `full` under a target budget; the rest `streaming`.
#pragma once

#include <functional>
#include <string>
#include <vector>

#include "eval/tasks.h"
#include "kv/head_map.h"
#include "model/model.h"

namespace headroom::profile {

struct Options {
  int ctx = 0;             // prompt length (0: the model's trained context)
  int retrieval_prompts = 12;
  int natural_prompts = 2;
  int ablation_probes = 6;
  bool gain_round = true;   // also measure the joint gain of each head next to the top head (n_heads more forwards)
  bool fill_windows = true;      // assign(): full only for heads scoring >= retrieval_share of the best (as many
                                 // as fit), then spend the rest of the budget widening the streaming windows;
                                 // false: as many full heads as fit at the minimum window
  double retrieval_share = 0.1;  // probes for the per-head ablation (0: skip); costs n_heads x this many forwards
  int sinks = 4;
  int window = 252;
  int page_size = 32;
  int chunk = 512;
  uint64_t seed = 7;
  // Streaming heads' prefill (see PrefillMode): chosen by choose_prefill() unless set by the user.
  PrefillMode prefill = PrefillMode::Window;
  double prefill_tolerance = 0.0;   // share of full's exact matches windowed prefill may lose before offload is
                                    // chosen (0: window must match full on the probes; it saves no steady-state KV)
  int prefill_probes = 60;          // needle probes for that choice (a third of each trained format)
};

struct Scores {
  int n_layer = 0, n_head_kv = 0;
  std::vector<double> retrieval;        // [layer * n_head_kv + h], 0..1
  std::vector<double> streaming_error;  // [layer * n_head_kv + h], relative L2, over the text rows
  std::vector<double> query_error;      // the same at the question and answer rows of the retrieval probes
  std::vector<double> ablation;         // mean drop (nats) of the answer's log-probability when only this head
                                        // is streaming, on needle prompts (empty if not measured)
  std::vector<double> gain;             // answer log-prob gained by making head h full on top of the top head,
                                        // all others streaming (empty if not measured)
  int copy_steps = 0;                   // how many copy steps the retrieval score is over
};

// Needle prompts with their answers, for teacher-forced answer scores under per-head policies.
class AnswerProbes {
 public:
  AnswerProbes(const Model& m, const eval::TaskGen& gen, int n, int ctx, uint64_t seed);
  struct Result {
    double logprob = 0;  // mean over the probes of the answer's log-probability (nats)
    int exact = 0;       // probes whose every answer token is the argmax (teacher-forced exact match)
  };
  // The prompt is prefilled in chunks, then the answer is decoded one token per forward call.
  Result run(Backend& be, const std::vector<PolicySpec>& specs, const Options& o) const;
  size_t size() const { return probes_.size(); }

 private:
  const Model& m_;
  int ctx_ = 0;
  std::vector<std::pair<std::vector<int32_t>, size_t>> probes_;  // (prompt + answer ids, prompt length)
};

// How the streaming heads of `specs` should prefill. Teacher-forced exact match on the probes with every head
// full, with the map's streaming heads windowed from the first prompt token, and with them attending the whole
// prompt (offload). Window is chosen if it keeps at least (1 - o.prefill_tolerance) of full's exact matches.
struct PrefillChoice {
  PrefillMode mode = PrefillMode::Window;
  int n = 0;
  AnswerProbes::Result full, window, offload;
};
PrefillChoice choose_prefill(const AnswerProbes& probes, Backend& be, const std::vector<PolicySpec>& specs,
                             const Options& o);

using Progress = std::function<void(int done, int total, const std::string& what)>;

Scores measure(const Model& m, Backend& be, const eval::TaskGen& gen, const Options& o, const Progress& progress);

// The order in which heads are promoted to `full`: by retrieval score, ties (and heads that never retrieve)
// by streaming error. Exposed for the random-choice control.
std::vector<int> rank_heads(const Scores& s);
std::function<double(int)> key_of(const Scores& s);  // the ranking key of head i (higher: more retrieval)

// Head map meeting `target` (a share of the full KV bytes at ctx, pages counted whole): as many heads `full`
// as fit, best-ranked first, the rest `streaming` (sinks + window). `order` overrides the ranking (control).
// Streaming heads get o.prefill.
HeadMap assign(const ModelIdentity& id, const Scores& s, double target, int ctx, const Options& o,
               const std::vector<int>* order = nullptr);

// Pages a streaming head holds at most in steady state, and a full head at ctx.
int64_t streaming_pages(const Options& o);
int64_t full_pages(int ctx, int page_size);

}  // namespace headroom::profile
