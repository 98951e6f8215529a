// libFuzzer target for chat templates: arbitrary bytes as the template text (what a GGUF's
// tokenizer.chat_template holds), recognised, then rendered for a few conversations with and without a
// generation prompt. The first byte picks the conversation's contents from the rest of the input, so message
// text is fuzzed too. Checks, besides "no crash, no sanitizer report, no stack overflow":
//  - a template that is not recognised renders as the plain fallback;
//  - rendering fails only with a headroom::Error of one line (role alternation for Llama-2 / Mistral);
//  - every user message's text appears in the rendering, stripped of surrounding whitespace at most (system
//    messages may be dropped, as by the original Phi-3 template; Qwen3 cuts reasoning out of assistant turns).
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "tokenizer/tokenizer.h"
#include "util/error.h"

using namespace headroom;

namespace {

void check(bool ok, const char* what) {
  if (!ok) {
    std::fprintf(stderr, "fuzz_chat_template: check failed: %s\n", what);
    std::abort();
  }
}

std::string trimmed(const std::string& s) {
  const char* ws = " \t\n\r\v\f";
  const size_t b = s.find_first_not_of(ws);
  if (b == std::string::npos) return {};
  return s.substr(b, s.find_last_not_of(ws) - b + 1);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  const std::string text(reinterpret_cast<const char*>(data) + 1, size - 1);
  // Message text: a slice of the input (so it can hold template markers), or fixed words.
  const size_t cut = text.empty() ? 0 : data[0] % (text.size() + 1);
  const std::string a = (data[0] & 1) ? text.substr(0, std::min<size_t>(cut, 64)) : "Hello";
  const std::string b = (data[0] & 2) ? text.substr(cut, 64) : "Hi there";

  const ChatTemplate ct = ChatTemplate::detect(text);
  check(ct.name() != nullptr, "no name");
  if (!ct.recognised()) check(ct.kind() == ChatTemplate::Kind::Plain, "unrecognised but not plain");
  const std::vector<std::vector<ChatMessage>> conversations = {
      {},
      {{"user", a}},
      {{"system", b}, {"user", a}},
      {{"user", a}, {"assistant", b}, {"user", "again"}},
      {{"assistant", a}, {"assistant", b}},  // bad alternation
  };
  for (const auto& msgs : conversations)
    for (bool gen : {false, true}) {
      try {
        const std::string out = ct.apply(msgs, gen, "<s>", "</s>");
        for (const ChatMessage& m : msgs)
          if (m.role == "user") check(out.find(trimmed(m.content)) != std::string::npos, "message text missing");
      } catch (const Error& e) {
        check(std::string(e.what()).find('\n') == std::string::npos, "error of more than one line");
      }
    }
  return 0;
}
