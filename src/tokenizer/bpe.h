// Byte-level BPE ("gpt2" vocabs: GPT-2, Llama 3, Qwen2, DeepSeek, Falcon, StarCoder): the pre-tokenizer cuts
// the text into words, each word's bytes are written with GPT-2's byte-to-character table, and the adjacent
// pair with the lowest merge rank is merged until none is left (llama.cpp's llm_tokenizer_bpe).
#pragma once

#include <array>

#include "tokenizer/pretokenizer.h"
#include "tokenizer/tokenizer_base.h"

namespace headroom::tok {

class BpeTokenizer final : public TokenizerBase {
 public:
  // `merges` is tokenizer.ggml.merges ("left right", rank = index). Throws Error on a malformed merge.
  BpeTokenizer(Vocab v, const gguf::Value& merges, const PreTokenizerInfo& pre);

 protected:
  void encode_text(std::string_view text, bool after_special, std::vector<int32_t>& out) const override;
  std::string decode_normal(const std::string& text) const override;

 private:
  void encode_word(std::string_view word, std::vector<int32_t>& out) const;
  int32_t rank(std::string_view left, std::string_view right, std::string& key) const;

  PreTokenizer pretok_;
  bool ignore_merges_;
  // Merge ranks keyed by the merge text "left right" as stored: the pieces of byte-level words never contain a
  // raw space (it is written U+0120), so "left" + ' ' + "right" names the pair without ambiguity.
  std::unordered_map<std::string, int32_t, StringHash, StringEq> ranks_;
  std::array<std::string, 256> byte_to_chars_;  // byte -> UTF-8 of its GPT-2 character
  std::array<int16_t, 324> char_to_byte_;       // GPT-2 character (< U+0144) -> byte, -1 if none
};

}  // namespace headroom::tok
