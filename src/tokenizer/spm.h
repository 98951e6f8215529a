// SentencePiece-style BPE ("llama" vocabs: Llama 2, phi-3, TinyStories): spaces become U+2581, the text is
// split into UTF-8 characters, and the adjacent pair whose concatenation is the highest-scoring token is
// merged until none is left (llama.cpp's llm_tokenizer_spm). What is not a token falls back to <0xXX> byte
// tokens, else to <unk>.
#pragma once

#include <array>

#include "tokenizer/tokenizer_base.h"

namespace headroom::tok {

class SpmTokenizer final : public TokenizerBase {
 public:
  explicit SpmTokenizer(Vocab v);

 protected:
  void encode_text(std::string_view text, bool after_special, std::vector<int32_t>& out) const override;
  std::string decode_normal(const std::string& text) const override;

 private:
  void emit_bytes(std::string_view sym, std::vector<int32_t>& out) const;
  std::array<int32_t, 256> byte_token_{};  // <0xXX> (or the one-byte token), -1 if neither exists
};

}  // namespace headroom::tok
