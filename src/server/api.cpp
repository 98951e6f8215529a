#include "server/api.h"

#include <fmt/format.h>

#include "tokenizer/utf8.h"

#include <cmath>
#include <limits>

namespace headroom::server {

using nlohmann::json;

std::string error_json(const ApiError& e) {
  json err = {{"message", e.what()}, {"type", e.type}, {"param", nullptr}, {"code", nullptr}};
  if (!e.param.empty()) err["param"] = e.param;
  if (!e.code.empty()) err["code"] = e.code;
  return json{{"error", err}}.dump();
}

namespace {

[[noreturn]] void bad(const std::string& param, const std::string& what) {
  throw ApiError(400, param.empty() ? what : "'" + param + "': " + what, "", param);
}

double number(const json& j, const char* key, double lo, double hi) {
  const json& v = j.at(key);
  if (!v.is_number()) bad(key, "must be a number");
  const double x = v.get<double>();
  if (!std::isfinite(x) || x < lo || x > hi) bad(key, fmt::format("{} is out of range ({}..{})", v.dump(), lo, hi));
  return x;
}

int64_t integer(const json& j, const char* key, int64_t lo, int64_t hi) {
  const json& v = j.at(key);
  if (!v.is_number_integer()) bad(key, "must be an integer");
  if (v.is_number_unsigned() && v.get<uint64_t>() > uint64_t(std::numeric_limits<int64_t>::max()))
    bad(key, fmt::format("{} is out of range ({}..{})", v.dump(), lo, hi));
  const int64_t x = v.get<int64_t>();
  if (x < lo || x > hi) bad(key, fmt::format("{} is out of range ({}..{})", x, lo, hi));
  return x;
}

bool boolean(const json& j, const char* key) {
  const json& v = j.at(key);
  if (!v.is_boolean()) bad(key, "must be true or false");
  return v.get<bool>();
}

std::string string(const json& j, const char* key) {
  const json& v = j.at(key);
  if (!v.is_string()) bad(key, "must be a string");
  return v.get<std::string>();
}

bool has(const json& j, const char* key) { return j.contains(key) && !j.at(key).is_null(); }

// A message's content: a string, or an array of {"type": "text", "text": ...} parts.
std::string content_of(const json& m, size_t i) {
  const std::string where = fmt::format("messages[{}].content", i);
  if (!m.contains("content") || m["content"].is_null()) bad(where, "is missing");
  const json& c = m["content"];
  if (c.is_string()) return c.get<std::string>();
  if (!c.is_array()) bad(where, "must be a string or an array of text parts");
  std::string out;
  for (const json& part : c) {
    if (!part.is_object() || part.value("type", "") != "text" || !part.contains("text") || !part["text"].is_string())
      bad(where, "only text parts ({\"type\": \"text\", \"text\": ...}) are supported");
    out += part["text"].get<std::string>();
  }
  return out;
}

}  // namespace

ApiRequest parse_request(const std::string& body, bool chat) {
  if (tok::utf8_sanitize(body) != body) throw ApiError(400, "the body is not valid UTF-8");
  json j;
  try {
    j = json::parse(body);
  } catch (const json::parse_error& e) {
    throw ApiError(400, std::string("the body is not valid JSON: ") + e.what());
  }
  if (!j.is_object()) throw ApiError(400, "the body must be a JSON object");
  ApiRequest r;
  r.chat = chat;
  try {
    if (!has(j, "model")) bad("model", "is missing");
    r.model = string(j, "model");
    if (chat) {
      if (!has(j, "messages")) bad("messages", "is missing");
      const json& ms = j["messages"];
      if (!ms.is_array() || ms.empty()) bad("messages", "must be a non-empty array");
      for (size_t i = 0; i < ms.size(); ++i) {
        const json& m = ms[i];
        if (!m.is_object()) bad(fmt::format("messages[{}]", i), "must be an object");
        if (!m.contains("role") || !m["role"].is_string()) bad(fmt::format("messages[{}].role", i), "must be a string");
        const std::string role = m["role"].get<std::string>();
        if (role != "system" && role != "user" && role != "assistant" && role != "developer")
          bad(fmt::format("messages[{}].role", i), "must be system, developer, user or assistant, not '" + role + "'");
        r.messages.push_back({role == "developer" ? "system" : role, content_of(m, i)});
      }
    } else {
      if (!has(j, "prompt")) bad("prompt", "is missing");
      const json& p = j["prompt"];
      if (p.is_string()) r.prompt = p.get<std::string>();
      else if (p.is_array() && p.size() == 1 && p[0].is_string()) r.prompt = p[0].get<std::string>();
      else bad("prompt", "must be a string (or an array of one string)");
    }
    const char* mt = chat && has(j, "max_completion_tokens") ? "max_completion_tokens" : "max_tokens";
    if (has(j, mt)) r.max_tokens = int(integer(j, mt, 1, std::numeric_limits<int32_t>::max()));
    if (has(j, "n") && integer(j, "n", std::numeric_limits<int32_t>::min(), std::numeric_limits<int32_t>::max()) != 1)
      bad("n", "only n = 1 is supported");
    SamplerParams& s = r.sampling;
    if (has(j, "temperature")) s.temp = float(number(j, "temperature", 0, 2));
    if (has(j, "top_p")) s.top_p = float(number(j, "top_p", 0, 1));
    if (has(j, "top_k")) s.top_k = int(integer(j, "top_k", 0, std::numeric_limits<int32_t>::max()));
    if (has(j, "min_p")) s.min_p = float(number(j, "min_p", 0, 1));
    if (has(j, "presence_penalty")) s.presence_penalty = float(number(j, "presence_penalty", -2, 2));
    if (has(j, "frequency_penalty")) s.frequency_penalty = float(number(j, "frequency_penalty", -2, 2));
    if (has(j, "seed")) {
      s.seed = uint64_t(integer(j, "seed", std::numeric_limits<int64_t>::min(), std::numeric_limits<int64_t>::max()));
      r.seeded = true;
    }
    if (has(j, "stop")) {
      const json& st = j["stop"];
      if (st.is_string()) r.stop.push_back(st.get<std::string>());
      else if (st.is_array() && st.size() <= 4) {
        for (const json& x : st) {
          if (!x.is_string()) bad("stop", "must be a string or an array of up to 4 strings");
          r.stop.push_back(x.get<std::string>());
        }
      } else bad("stop", "must be a string or an array of up to 4 strings");
      for (const std::string& x : r.stop)
        if (x.empty()) bad("stop", "stop strings must not be empty");
    }
    if (has(j, "stream")) r.stream = boolean(j, "stream");
    if (has(j, "ignore_eos")) r.ignore_eos = boolean(j, "ignore_eos");
    if (has(j, "stream_options")) {
      const json& so = j["stream_options"];
      if (!so.is_object()) bad("stream_options", "must be an object");
      if (has(so, "include_usage")) r.include_usage = boolean(so, "include_usage");
    }
    if (chat) {
      if (has(j, "logprobs")) r.logprobs = boolean(j, "logprobs");
      if (has(j, "top_logprobs")) {
        r.top_logprobs = int(integer(j, "top_logprobs", 0, 20));
        if (!r.logprobs) bad("top_logprobs", "needs logprobs: true");
      }
    } else if (has(j, "logprobs")) {
      r.top_logprobs = int(integer(j, "logprobs", 0, 5));
      r.logprobs = true;
    }
    if (has(j, "kv_policy")) r.kv_policy = string(j, "kv_policy");
    if (has(j, "kv_budget")) {
      const json& b = j["kv_budget"];
      if (b.is_string()) r.kv_budget = b.get<std::string>();
      else if (b.is_number_integer()) r.kv_budget = std::to_string(integer(j, "kv_budget", 1, std::numeric_limits<int32_t>::max()));
      else bad("kv_budget", "must be a string (\"25%\", \"64MiB\") or a token count");
    }
    if (has(j, "head_map")) r.head_map = string(j, "head_map");
  } catch (const json::exception& e) {
    throw ApiError(400, std::string("bad request: ") + e.what());
  }
  return r;
}

json usage_json(int prompt_tokens, int completion_tokens) {
  return {{"prompt_tokens", prompt_tokens},
          {"completion_tokens", completion_tokens},
          {"total_tokens", prompt_tokens + completion_tokens}};
}

namespace {
json bytes_of(const std::string& s) {
  json b = json::array();
  for (unsigned char ch : s) b.push_back(int(ch));
  return b;
}
// Token text as JSON can carry it (a piece may be half of a UTF-8 character).
std::string safe(const std::string& s) {
  std::string out;
  tok::utf8_sanitize_append(s, out, false);
  return out;
}
}  // namespace

json logprobs_json(bool chat, const std::vector<TokenLogprob>& lps) {
  if (chat) {
    json content = json::array();
    for (const TokenLogprob& t : lps) {
      json top = json::array();
      for (const auto& [text, lp] : t.top) top.push_back({{"token", safe(text)}, {"logprob", lp}, {"bytes", bytes_of(text)}});
      content.push_back({{"token", safe(t.text)}, {"logprob", t.logprob}, {"bytes", bytes_of(t.text)}, {"top_logprobs", top}});
    }
    return {{"content", content}};
  }
  json tokens = json::array(), token_logprobs = json::array(), top = json::array();
  for (const TokenLogprob& t : lps) {
    tokens.push_back(safe(t.text));
    token_logprobs.push_back(t.logprob);
    json alt = json::object();
    for (const auto& [text, lp] : t.top) alt[safe(text)] = lp;
    top.push_back(alt);
  }
  return {{"tokens", tokens}, {"token_logprobs", token_logprobs}, {"top_logprobs", top}};
}

std::string response_json(const ResponseHead& h, const std::string& text, const char* finish_reason,
                          const std::vector<TokenLogprob>* lps, int prompt_tokens, int completion_tokens) {
  json choice = {{"index", 0}, {"finish_reason", finish_reason}, {"logprobs", nullptr}};
  if (lps) choice["logprobs"] = logprobs_json(h.chat, *lps);
  if (h.chat) choice["message"] = {{"role", "assistant"}, {"content", text}};
  else choice["text"] = text;
  json r = {{"id", h.id},
            {"object", h.chat ? "chat.completion" : "text_completion"},
            {"created", h.created},
            {"model", h.model},
            {"choices", json::array({choice})},
            {"usage", usage_json(prompt_tokens, completion_tokens)}};
  return r.dump();
}

namespace {
json chunk_base(const ResponseHead& h) {
  return {{"id", h.id}, {"object", h.chat ? "chat.completion.chunk" : "text_completion"}, {"created", h.created},
          {"model", h.model}};
}
}  // namespace

std::string chunk_sse(const ResponseHead& h, const std::string& text, const char* finish_reason, bool first,
                      const std::vector<TokenLogprob>* lps) {
  json choice = {{"index", 0}, {"logprobs", nullptr}, {"finish_reason", nullptr}};
  if (finish_reason) choice["finish_reason"] = finish_reason;
  if (lps && !lps->empty()) choice["logprobs"] = logprobs_json(h.chat, *lps);
  if (h.chat) {
    json delta = json::object();
    if (first) delta["role"] = "assistant";
    if (!finish_reason || !text.empty()) delta["content"] = text;
    choice["delta"] = delta;
  } else {
    choice["text"] = text;
  }
  json c = chunk_base(h);
  c["choices"] = json::array({choice});
  return "data: " + c.dump() + "\n\n";
}

std::string usage_sse(const ResponseHead& h, int prompt_tokens, int completion_tokens) {
  json c = chunk_base(h);
  c["choices"] = json::array();
  c["usage"] = usage_json(prompt_tokens, completion_tokens);
  return "data: " + c.dump() + "\n\n";
}

bool read_sse(std::string& buf, const char* bytes, size_t n, const std::function<bool(const std::string&)>& on_data) {
  buf.append(bytes, n);
  size_t at;
  while ((at = buf.find("\n\n")) != std::string::npos) {
    const std::string ev = buf.substr(0, at);
    buf.erase(0, at + 2);
    if (ev.rfind("data: ", 0) == 0 && !on_data(ev.substr(6))) return false;
  }
  return true;
}

}  // namespace headroom::server
