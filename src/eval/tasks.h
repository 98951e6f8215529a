// Synthetic long-context tasks, made from a seed with no downloads. The haystack is natural English / Python
// docs text (../shared/corpus/haystack.txt); needles are inserted between its words and the question follows
// the haystack after a newline, in the exact formats the bundled retrieval model was trained on:
//   passkey   (NIAH, one needle)   "The pass key is 4821930. Remember it. 4821930 is the pass key."
//   multikey  (1-8 needles)        "One of the special magic numbers for lantern is: 5520917."
//   kv        (1-8 needles)        "The value of key 3fa9c01b is 730114."
// and two formats it was NOT trained on, reported but not averaged:
//   vartrack  (RULER variable tracking)  "VAR QXN = 48213." ... "VAR KPL = VAR QXN." ...
//   kv-uuid   (key-value with UUID keys, as in RULER / LongBench)
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "tokenizer/tokenizer.h"

namespace headroom::eval {

enum class Task { Passkey, MultiKey, KeyValue, VarTrack, KeyValueUUID };
const char* task_name(Task t);
Task parse_task(const std::string& s);  // niah|passkey, multikey, kv, vartrack, kv-uuid
bool task_is_trained(Task t);

struct Episode {
  Task task;
  int ctx = 0;              // target length in tokens (prompt + answer room)
  double depth = 0;         // 0..1: where the queried needle sits in the haystack
  std::string prompt;       // text fed to the model (the tokenizer adds BOS)
  std::string expected;     // the answer the greedy continuation must start with
  std::vector<std::string> expected_all;  // vartrack: every name must appear
  int prompt_tokens = 0;
  int needles = 0;
};

class TaskGen {
 public:
  // haystack: the corpus text; keys: the word keys for multikey (one per line file content).
  TaskGen(const Tokenizer& tok, std::string haystack, std::vector<std::string> keys);
  static TaskGen from_shared(const Tokenizer& tok, const std::string& shared_dir);
  // Builds one episode whose prompt plus `answer_room` tokens fits in ctx tokens. Deterministic in seed.
  Episode make(Task task, int ctx, double depth, uint64_t seed, int answer_room = 16) const;

 private:
  const Tokenizer& tok_;
  std::string text_;
  std::vector<std::string> keys_;
};

// True if the generated text answers the episode (exact match of the answer at the start, or for vartrack
// every expected name present).
bool score(const Episode& e, const std::string& generated);

}  // namespace headroom::eval
