// ChatTemplate: see tokenizer.h. Each render_* function mirrors one family's Jinja template; the templates
// they were written against are quoted in tests/test_chat_template.cpp.
#include <ctime>

#include "tokenizer/tokenizer.h"
#include "util/error.h"

namespace headroom {

namespace {

bool has(const std::string& text, const char* what) { return text.find(what) != std::string::npos; }

constexpr const char* kWs = " \t\n\r\v\f";

// Python's str.strip/lstrip/rstrip with a character set (ASCII whitespace by default, as Jinja's trim for
// the text chat messages carry in practice).
std::string lstrip(const std::string& s, const char* chars = kWs) {
  const size_t b = s.find_first_not_of(chars);
  return b == std::string::npos ? std::string() : s.substr(b);
}
std::string rstrip(const std::string& s, const char* chars = kWs) {
  const size_t e = s.find_last_not_of(chars);
  return e == std::string::npos ? std::string() : s.substr(0, e + 1);
}
std::string strip(const std::string& s, const char* chars = kWs) { return lstrip(rstrip(s, chars), chars); }

bool starts_with(const std::string& s, const std::string& p) { return s.compare(0, p.size(), p) == 0; }
bool ends_with(const std::string& s, const std::string& p) {
  return s.size() >= p.size() && s.compare(s.size() - p.size(), p.size(), p) == 0;
}

// Undoes the escapes of a Jinja string literal (\n, \t, \', \", \\).
std::string unescape_literal(const std::string& s) {
  std::string out;
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] == '\\' && i + 1 < s.size()) {
      const char c = s[++i];
      out += c == 'n' ? '\n' : c == 't' ? '\t' : c;
    } else {
      out += s[i];
    }
  }
  return out;
}

// A ChatML template's built-in system prompt: a string literal '<|im_start|>system\n...<|im_end|>' whose text
// is plain (no quotes, no template expressions), e.g. Qwen2.5's "You are Qwen, created by Alibaba Cloud...".
std::string chatml_default_system(const std::string& t) {
  static const std::string open = "<|im_start|>system\\n";
  for (size_t pos = t.find(open); pos != std::string::npos; pos = t.find(open, pos + 1)) {
    const size_t start = pos + open.size();
    const size_t end = t.find("<|im_end|>", start);
    if (end == std::string::npos) break;
    const std::string body = t.substr(start, end - start);
    if (!body.empty() && body.find_first_of("'\"{}+") == std::string::npos) return unescape_literal(body);
  }
  return {};
}

std::string llama31_date(const std::string& t) {
  if (has(t, "strftime_now")) {  // Llama-3.2: today's date, as llama.cpp's strftime_now gives it
    const std::time_t now = std::time(nullptr);
    std::tm tm{};
    localtime_r(&now, &tm);
    char buf[32];
    std::strftime(buf, sizeof buf, "%d %b %Y", &tm);
    return buf;
  }
  // The first `date_string = "..."` (spaces allowed around '='), found by plain search: the template is
  // untrusted text of any size, so no backtracking regex runs over it.
  static const std::string key = "date_string";
  for (size_t pos = t.find(key); pos != std::string::npos; pos = t.find(key, pos + 1)) {
    size_t i = t.find_first_not_of(kWs, pos + key.size());
    if (i == std::string::npos || t[i] != '=') continue;
    i = t.find_first_not_of(kWs, i + 1);
    if (i == std::string::npos || t[i] != '"') continue;
    const size_t end = t.find('"', i + 1);
    if (end == std::string::npos) break;  // no closing quote after here: no later match either
    return t.substr(i + 1, end - i - 1);
  }
  return "26 Jul 2024";
}

void check_alternating(const std::vector<ChatMessage>& msgs, size_t first, const char* family) {
  for (size_t i = first; i < msgs.size(); ++i)
    if ((msgs[i].role == "user") != ((i - first) % 2 == 0))
      fail(
          "{} chat template: conversation roles must alternate user/assistant/user/assistant/... (message {} is "
          "'{}')",
          family, i + 1, msgs[i].role);
}

}  // namespace

ChatTemplate ChatTemplate::detect(const std::string& t) {
  ChatTemplate ct;
  ct.recognised_ = true;
  ct.bos_in_template_ = has(t, "bos_token");
  const bool looks_at_gen_prompt = has(t, "add_generation_prompt");
  if (has(t, "<|im_start|>")) {
    ct.kind_ = Kind::ChatML;
    ct.qwen3_think_ = has(t, "reasoning_content") && has(t, "</think>");
    ct.default_system_ = chatml_default_system(t);
  } else if (has(t, "<|start_header_id|>")) {
    ct.kind_ = Kind::Llama3;
    ct.gen_prompt_always_ = !looks_at_gen_prompt;
    ct.llama31_header_ = has(t, "Cutting Knowledge Date");
    if (ct.llama31_header_) ct.date_ = llama31_date(t);
  } else if (has(t, "[INST]")) {
    ct.kind_ = has(t, "<<SYS>>") ? Kind::Llama2 : Kind::Mistral;
  } else if (has(t, "<|user|>") && has(t, "<|end|>")) {
    ct.kind_ = Kind::Phi3;
    ct.phi3_system_ = looks_at_gen_prompt;
    ct.gen_prompt_always_ = !looks_at_gen_prompt;
  } else {
    ct.kind_ = Kind::Plain;
    ct.recognised_ = false;
  }
  return ct;
}

const char* ChatTemplate::name() const {
  switch (kind_) {
    case Kind::ChatML:
      return "chatml";
    case Kind::Llama3:
      return "llama3";
    case Kind::Llama2:
      return "llama2";
    case Kind::Mistral:
      return "mistral";
    case Kind::Phi3:
      return "phi3";
    case Kind::Plain:
      return "plain";
  }
  return "plain";
}

std::string ChatTemplate::apply(const std::vector<ChatMessage>& msgs, bool add_generation_prompt,
                                const std::string& bos_text, const std::string& eos_text) const {
  std::string out;
  const std::string bos = bos_in_template_ ? bos_text : std::string();
  switch (kind_) {
    case Kind::ChatML: {
      const bool has_system = !msgs.empty() && msgs[0].role == "system";
      if (!has_system && !default_system_.empty()) out += "<|im_start|>system\n" + default_system_ + "<|im_end|>\n";
      if (!qwen3_think_) {
        for (const ChatMessage& m : msgs) out += "<|im_start|>" + m.role + "\n" + m.content + "<|im_end|>\n";
      } else {
        // Qwen3: the assistant turns after the last real user query carry their reasoning in <think> tags
        // (an empty block for the final turn); earlier ones are written without it.
        size_t last_query = msgs.empty() ? 0 : msgs.size() - 1;
        for (size_t i = msgs.size(); i-- > 0;) {
          const std::string& c = msgs[i].content;
          if (msgs[i].role == "user" && !(starts_with(c, "<tool_response>") && ends_with(c, "</tool_response>"))) {
            last_query = i;
            break;
          }
        }
        for (size_t i = 0; i < msgs.size(); ++i) {
          const ChatMessage& m = msgs[i];
          if (m.role == "user" || m.role == "system") {  // a leading system message is written the same way
            out += "<|im_start|>" + m.role + "\n" + m.content + "<|im_end|>\n";
          } else if (m.role == "assistant") {
            std::string content = m.content, reasoning;
            if (const size_t end = content.find("</think>"); end != std::string::npos) {
              content = lstrip(m.content.substr(m.content.rfind("</think>") + 8), "\n");
              std::string before = rstrip(m.content.substr(0, end), "\n");
              const size_t open = before.rfind("<think>");
              reasoning = lstrip(open == std::string::npos ? before : before.substr(open + 7), "\n");
            }
            out += "<|im_start|>assistant\n";
            if (i > last_query && (i + 1 == msgs.size() || !reasoning.empty()))
              out += "<think>\n" + strip(reasoning, "\n") + "\n</think>\n\n" + lstrip(content, "\n");
            else
              out += content;
            out += "<|im_end|>\n";
          } else if (m.role == "tool") {
            if (i == 0 || msgs[i - 1].role != "tool") out += "<|im_start|>user";
            out += "\n<tool_response>\n" + m.content + "\n</tool_response>";
            if (i + 1 == msgs.size() || msgs[i + 1].role != "tool") out += "<|im_end|>\n";
          }
        }
      }
      if (add_generation_prompt) out += "<|im_start|>assistant\n";
      return out;
    }
    case Kind::Llama3: {
      size_t first = 0;
      if (llama31_header_) {
        std::string system;
        if (!msgs.empty() && msgs[0].role == "system") {
          system = strip(msgs[0].content);
          first = 1;
        }
        out += bos +
               "<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\nToday Date: " +
               date_ + "\n\n" + system + "<|eot_id|>";
      }
      for (size_t i = first; i < msgs.size(); ++i) {
        if (i == 0 && !llama31_header_) out += bos;
        out += "<|start_header_id|>" + msgs[i].role + "<|end_header_id|>\n\n" + strip(msgs[i].content) + "<|eot_id|>";
      }
      if (add_generation_prompt || gen_prompt_always_) out += "<|start_header_id|>assistant<|end_header_id|>\n\n";
      return out;
    }
    case Kind::Llama2: {
      size_t first = 0;
      std::string system;
      bool has_system = false;
      if (!msgs.empty() && msgs[0].role == "system") {
        system = msgs[0].content;
        has_system = true;
        first = 1;
      }
      check_alternating(msgs, first, "Llama-2");
      for (size_t i = first; i < msgs.size(); ++i) {
        std::string content = msgs[i].content;
        if (i == first && has_system) content = "<<SYS>>\n" + system + "\n<</SYS>>\n\n" + content;
        if (msgs[i].role == "user")
          out += bos + "[INST] " + strip(content) + " [/INST]";
        else if (msgs[i].role == "assistant")
          out += " " + strip(content) + " " + eos_text;
      }
      return out;
    }
    case Kind::Mistral: {
      size_t first = 0;
      std::string system;
      if (!msgs.empty() && msgs[0].role == "system") {
        system = msgs[0].content;
        first = 1;
      }
      check_alternating(msgs, first, "Mistral");
      out += bos;
      for (size_t i = first; i < msgs.size(); ++i) {
        const ChatMessage& m = msgs[i];
        if (m.role == "user") {
          out += "[INST] " + (i == first && !system.empty() ? system + "\n\n" : std::string()) + m.content + " [/INST]";
        } else if (m.role == "assistant") {
          out += m.content + eos_text;
        } else {
          fail("Mistral chat template: only user and assistant roles are supported (message {} is '{}')", i + 1,
               m.role);
        }
      }
      return out;
    }
    case Kind::Phi3: {
      out += bos;
      if (!phi3_system_) {
        // phi-3-mini-4k (original): the assistant prompt follows every user turn; system messages are dropped.
        for (const ChatMessage& m : msgs) {
          if (m.role == "user")
            out += "<|user|>\n" + m.content + "<|end|>\n<|assistant|>\n";
          else if (m.role == "assistant")
            out += m.content + "<|end|>\n";
        }
        return out;
      }
      for (const ChatMessage& m : msgs) {
        if (m.role == "system" && !m.content.empty())
          out += "<|system|>\n" + m.content + "<|end|>\n";
        else if (m.role == "user")
          out += "<|user|>\n" + m.content + "<|end|>\n";
        else if (m.role == "assistant")
          out += "<|assistant|>\n" + m.content + "<|end|>\n";
      }
      out += add_generation_prompt ? std::string("<|assistant|>\n") : eos_text;
      return out;
    }
    case Kind::Plain:
      for (const ChatMessage& m : msgs) out += m.role + ": " + m.content + "\n";
      if (add_generation_prompt) out += "assistant:";
      return out;
  }
  return out;
}

}  // namespace headroom
