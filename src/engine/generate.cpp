#include "engine/generate.h"

#include <chrono>

#include "util/error.h"

namespace headroom {

namespace {
double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}
}  // namespace

GenerateResult generate(Runner& runner, KVCache& kv, const Tokenizer& tok, std::span<const int32_t> prompt,
                        Sampler& sampler, const GenerateOptions& opt,
                        const std::function<void(const std::string&)>& on_text) {
  GenerateResult r;
  r.n_prompt = int(prompt.size());
  if (prompt.empty()) fail("empty prompt: nothing to generate from");
  if (opt.n_ctx > 0 && int64_t(prompt.size()) > opt.n_ctx)
    fail("prompt is {} tokens, longer than the context of {} tokens (raise -c or shorten the prompt)", prompt.size(),
         opt.n_ctx);
  std::vector<int32_t> history(prompt.begin(), prompt.end());
  StreamDecoder dec(tok, /*special=*/false, /*continuation=*/true);
  std::string pending;  // text held back while it could be the start of a stop string
  auto emit = [&](const std::string& s) {
    r.text += s;
    if (on_text && !s.empty()) on_text(s);
  };
  // Returns true if a stop string completed; emits what is certainly not part of one.
  auto push_text = [&](const std::string& s) {
    pending += s;
    for (const std::string& st : opt.stop) {
      size_t at = st.empty() ? std::string::npos : pending.find(st);
      if (at != std::string::npos) {
        emit(pending.substr(0, at));
        pending.clear();
        return true;
      }
    }
    size_t keep = 0;  // longest suffix of pending that is a proper prefix of some stop string
    for (const std::string& st : opt.stop)
      for (size_t len = std::min(st.size() - 1, pending.size()); len > keep; --len)
        if (pending.compare(pending.size() - len, len, st, 0, len) == 0) {
          keep = len;
          break;
        }
    emit(pending.substr(0, pending.size() - keep));
    pending.erase(0, pending.size() - keep);
    return false;
  };

  double t0 = now_s();
  std::span<const float> logits;
  try {
    logits = runner.prefill(kv, prompt, 0);
  } catch (const BudgetExhausted& e) {
    r.stop_reason = std::string("budget: ") + e.what();
    r.prompt_s = now_s() - t0;
    return r;
  }
  double t1 = now_s();
  r.prompt_s = t1 - t0;
  int32_t pos = int32_t(prompt.size());
  r.stop_reason = "length";
  for (int i = 0; opt.n_predict < 0 || i < opt.n_predict; ++i) {
    int32_t id = sampler.sample(logits, history);
    if (tok.is_eog(id)) {
      r.stop_reason = "eog";
      break;
    }
    r.tokens.push_back(id);
    history.push_back(id);
    if (push_text(dec.push(id))) {
      r.stop_reason = "stop";
      break;
    }
    if (opt.n_predict >= 0 && i + 1 == opt.n_predict) break;
    if (opt.n_ctx > 0 && pos >= opt.n_ctx) {
      r.stop_reason = "context";
      break;
    }
    try {
      logits = runner.decode(kv, id, pos);
    } catch (const BudgetExhausted& e) {
      r.stop_reason = std::string("budget: ") + e.what();
      break;
    }
    ++pos;
  }
  if (r.stop_reason != "stop") {
    push_text(dec.flush());
    emit(pending);
  }
  r.gen_s = now_s() - t1;
  return r;
}

}  // namespace headroom
