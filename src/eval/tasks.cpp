#include "eval/tasks.h"

#include <algorithm>
#include <random>
#include <sstream>

#include "util/error.h"
#include "util/file.h"

namespace headroom::eval {

namespace {
constexpr size_t kMaxCorpusBytes = size_t(256) << 20;
}  // namespace

const char* task_name(Task t) {
  switch (t) {
    case Task::Passkey: return "niah";
    case Task::MultiKey: return "multikey";
    case Task::KeyValue: return "kv";
    case Task::VarTrack: return "vartrack";
    case Task::KeyValueUUID: return "kv-uuid";
  }
  return "?";
}

Task parse_task(const std::string& s) {
  if (s == "niah" || s == "passkey") return Task::Passkey;
  if (s == "multikey") return Task::MultiKey;
  if (s == "kv") return Task::KeyValue;
  if (s == "vartrack") return Task::VarTrack;
  if (s == "kv-uuid") return Task::KeyValueUUID;
  fail("unknown task '{}' (niah, multikey, kv, vartrack, kv-uuid)", s);
}

bool task_is_trained(Task t) { return t == Task::Passkey || t == Task::MultiKey || t == Task::KeyValue; }

TaskGen::TaskGen(const Tokenizer& tok, std::string haystack, std::vector<std::string> keys)
    : tok_(tok), text_(std::move(haystack)), keys_(std::move(keys)) {
  if (text_.size() < 10000) fail("haystack corpus is too small ({} bytes)", text_.size());
  if (keys_.size() < 8) fail("need at least 8 key words for multikey, have {}", keys_.size());
}

TaskGen TaskGen::from_shared(const Tokenizer& tok, const std::string& shared_dir) {
  auto slurp = [](const std::string& p, const char* what) {
    try {
      return read_text_file(p, what, kMaxCorpusBytes);
    } catch (const Error& e) {
      fail("{} (is --shared pointing at the shared data folder?)", e.what());
    }
  };
  std::string text = slurp(shared_dir + "/corpus/haystack.txt", "haystack corpus");
  std::vector<std::string> keys;
  std::stringstream ks(slurp(shared_dir + "/models/retrieval-keys.txt", "key word list"));
  for (std::string line; std::getline(ks, line);)
    if (!line.empty()) keys.push_back(line);
  return TaskGen(tok, std::move(text), std::move(keys));
}

namespace {
std::string digits(std::mt19937_64& rng) {
  int n = 5 + int(rng() % 3);  // 5 to 7 digits, no leading zero
  std::string s(1, char('1' + rng() % 9));
  while (int(s.size()) < n) s += char('0' + rng() % 10);
  return s;
}
std::string hex(std::mt19937_64& rng, int n) {
  static const char* h = "0123456789abcdef";
  std::string s;
  for (int i = 0; i < n; ++i) s += h[rng() % 16];
  return s;
}
std::string var_name(std::mt19937_64& rng) {
  std::string s;
  for (int i = 0; i < 3; ++i) s += char('A' + rng() % 26);
  return s;
}
}  // namespace

Episode TaskGen::make(Task task, int ctx, double depth, uint64_t seed, int answer_room) const {
  std::mt19937_64 rng(seed * 0x9E3779B97F4A7C15ull + uint64_t(task) * 7919 + uint64_t(ctx));
  Episode e;
  e.task = task;
  e.ctx = ctx;
  e.depth = std::clamp(depth, 0.0, 1.0);

  // Needles (the queried one first) and the question.
  std::vector<std::string> needles;
  std::string question;
  switch (task) {
    case Task::Passkey: {
      std::string n = digits(rng);
      needles.push_back("The pass key is " + n + ". Remember it. " + n + " is the pass key.");
      question = "What is the pass key? The pass key is";
      e.expected = " " + n + ".";
      break;
    }
    case Task::MultiKey: {
      int count = 1 + int(rng() % 8);
      std::vector<std::string> ks = keys_;
      std::shuffle(ks.begin(), ks.end(), rng);
      for (int i = 0; i < count; ++i) {
        std::string n = digits(rng);
        needles.push_back("One of the special magic numbers for " + ks[i] + " is: " + n + ".");
        if (i == 0) {
          question = "What is the special magic number for " + ks[i] + "? The special magic number for " + ks[i] + " is:";
          e.expected = " " + n + ".";
        }
      }
      break;
    }
    case Task::KeyValue:
    case Task::KeyValueUUID: {
      int count = 1 + int(rng() % 8);
      for (int i = 0; i < count; ++i) {
        std::string key = task == Task::KeyValue ? hex(rng, 8)
                                                 : hex(rng, 8) + "-" + hex(rng, 4) + "-" + hex(rng, 4) + "-" +
                                                       hex(rng, 4) + "-" + hex(rng, 12);
        std::string n = digits(rng);
        needles.push_back("The value of key " + key + " is " + n + ".");
        if (i == 0) {
          question = "What is the value of key " + key + "? The value of key " + key + " is";
          e.expected = " " + n + ".";
        }
      }
      break;
    }
    case Task::VarTrack: {
      std::string n = digits(rng);
      std::vector<std::string> names;
      while (names.size() < 4) {
        std::string v = var_name(rng);
        if (std::find(names.begin(), names.end(), v) == names.end()) names.push_back(v);
      }
      needles.push_back("VAR " + names[0] + " = " + n + ".");
      for (size_t i = 1; i < names.size(); ++i) needles.push_back("VAR " + names[i] + " = VAR " + names[i - 1] + ".");
      question = "Find all variables that are assigned the value " + n +
                 " in the text above. Answer: the variables assigned the value " + n + " are:";
      e.expected_all = names;
      break;
    }
  }
  e.needles = int(needles.size());

  // Haystack words from a random place in the corpus (starting at a line start).
  size_t start = size_t(rng() % (text_.size() / 2));
  start = text_.find('\n', start);
  start = start == std::string::npos ? 0 : start + 1;
  std::vector<std::string_view> words;
  const size_t max_words = size_t(ctx) * 2 + 64;
  std::string_view rest(text_);
  rest.remove_prefix(start);
  while (words.size() < max_words) {
    size_t sp = rest.find(' ');
    if (sp == std::string_view::npos) {  // wrap around to the corpus start
      if (!rest.empty()) words.push_back(rest);
      rest = std::string_view(text_);
      continue;
    }
    if (sp > 0) words.push_back(rest.substr(0, sp));
    rest.remove_prefix(sp + 1);
  }
  // Needle slots: the queried needle at `depth` (vartrack: its chain spread after it), others at random.
  std::vector<double> at(needles.size());
  at[0] = e.depth;
  for (size_t i = 1; i < needles.size(); ++i)
    at[i] = task == Task::VarTrack ? e.depth + (1.0 - e.depth) * double(i) / double(needles.size())
                                   : double(rng() % 1000) / 1000.0;

  auto build = [&](size_t n_words) {
    std::vector<std::pair<size_t, size_t>> slots;  // (word index, needle)
    for (size_t i = 0; i < needles.size(); ++i) slots.emplace_back(size_t(at[i] * double(n_words) + 0.5), i);
    std::stable_sort(slots.begin(), slots.end());
    std::string s;
    size_t k = 0;
    for (size_t w = 0; w <= n_words; ++w) {
      while (k < slots.size() && slots[k].first == w) {
        if (!s.empty() && s.back() != ' ' && s.back() != '\n') s += ' ';
        s += needles[slots[k++].second];
        s += ' ';
      }
      if (w < n_words) {
        s.append(words[w]);
        s += ' ';
      }
    }
    while (!s.empty() && (s.back() == ' ' || s.back() == '\n')) s.pop_back();
    return s + "\n" + question;
  };
  // Largest word count whose prompt fits: binary search on tokenized length.
  const int limit = ctx - answer_room;
  size_t lo = 0, hi = words.size();
  while (lo < hi) {
    size_t mid = (lo + hi + 1) / 2;
    if (int(tok_.encode(build(mid), tok_.add_bos()).size()) <= limit) lo = mid;
    else hi = mid - 1;
  }
  e.prompt = build(lo);
  e.prompt_tokens = int(tok_.encode(e.prompt, tok_.add_bos()).size());
  if (e.prompt_tokens > limit) fail("context {} is too short for a {} episode", ctx, task_name(task));
  return e;
}

bool score(const Episode& e, const std::string& generated) {
  if (e.task == Task::VarTrack) {
    for (const std::string& n : e.expected_all)
      if (generated.find(n) == std::string::npos) return false;
    return true;
  }
  return generated.rfind(e.expected, 0) == 0;
}

}  // namespace headroom::eval
