// The vocabulary of a GGUF file (tokenizer.ggml.*), validated, with llama.cpp's defaults for missing keys.
// Shared by the SentencePiece and byte-level BPE tokenizers; knows nothing about how text is split.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "gguf/gguf.h"

namespace headroom::tok {

// tokenizer.ggml.token_type values (GGUF / llama.cpp numbering).
enum TokenType : int32_t {
  kUndefined = 0,
  kNormal = 1,
  kUnknown = 2,
  kControl = 3,
  kUserDefined = 4,
  kUnused = 5,
  kByte = 6
};

// Token attributes as bits (llama.cpp's llama_token_attr): a type plus strip flags set by model-specific rules.
enum Attr : uint32_t {
  kAttrUndefined = 0,
  kAttrUnknown = 1u << 0,
  kAttrUnused = 1u << 1,
  kAttrNormal = 1u << 2,
  kAttrControl = 1u << 3,
  kAttrUserDefined = 1u << 4,
  kAttrByte = 1u << 5,
  kAttrLstrip = 1u << 7,  // when matched as a special token, eat the whitespace to its left
  kAttrRstrip = 1u << 8,  // ... and to its right
};

// Hash/equality that let unordered_map<std::string, V> be searched with a string_view, without a copy.
struct StringHash {
  using is_transparent = void;
  size_t operator()(std::string_view s) const { return std::hash<std::string_view>{}(s); }
};
struct StringEq {
  using is_transparent = void;
  bool operator()(std::string_view a, std::string_view b) const { return a == b; }
};

// "<0x0A>" -> 0x0A. False if the text is not of that form.
inline bool parse_byte_token(std::string_view s, uint8_t& out) {
  if (s.size() != 6 || s.substr(0, 3) != "<0x" || s[5] != '>') return false;
  auto hex = [](char c) -> int {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    return -1;
  };
  const int hi = hex(s[3]), lo = hex(s[4]);
  if (hi < 0 || lo < 0) return false;
  out = static_cast<uint8_t>(hi * 16 + lo);
  return true;
}

struct Vocab {
  std::string model;  // "llama" (SentencePiece) or "gpt2" (byte-level BPE)
  std::string pre;    // tokenizer.ggml.pre as stored ("" for SPM)
  std::vector<std::string> pieces;
  std::vector<float> scores;
  std::vector<uint32_t> attrs;
  std::unordered_map<std::string, int32_t, StringHash, StringEq> ids;

  int32_t bos = -1, eos = -1, eot = -1, eom = -1, unk = -1, pad = -1;
  bool add_bos = false, add_eos = false, add_space_prefix = false;
  std::string chat_template;

  // Tokens matched in raw text before tokenizing (CONTROL, USER_DEFINED and UNKNOWN), longest first.
  std::vector<int32_t> specials;
  std::vector<uint8_t> eog;  // per token: ends generation

  int32_t n() const { return static_cast<int32_t>(pieces.size()); }
  bool valid(int32_t id) const { return id >= 0 && id < n(); }
  // -1 if the text is not a token.
  int32_t find(std::string_view text) const {
    auto it = ids.find(text);
    return it == ids.end() ? -1 : it->second;
  }

  // Reads and checks tokens, scores, token types and the special token ids. Model-specific parts (merges,
  // pre-tokenizer, family defaults for add_bos) are the caller's; `default_add_bos` and the default ids are
  // llama.cpp's for the model kind. Throws headroom::Error naming the file and the problem.
  static Vocab load(const gguf::File& f, const std::string& model, bool default_add_bos, int32_t default_bos,
                    int32_t default_eos, int32_t default_unk);
};

}  // namespace headroom::tok
