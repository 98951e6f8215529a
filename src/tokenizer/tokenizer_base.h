// What the SentencePiece and byte-level BPE tokenizers share: the vocab, special-token partitioning of the
// input, BOS, and decoding from a table of per-token pieces computed once at load.
#pragma once

#include <string>
#include <string_view>
#include <vector>

#include "tokenizer/tokenizer.h"
#include "tokenizer/vocab.h"

namespace headroom::tok {

class TokenizerBase : public Tokenizer {
 public:
  explicit TokenizerBase(Vocab v) : vocab_(std::move(v)) {}

  std::vector<int32_t> encode(std::string_view text, bool add_bos, bool parse_special) const override;
  std::string token_to_piece(int32_t id, bool special) const override;
  std::string decode(std::span<const int32_t> ids, bool special) const override;
  using Tokenizer::decode;

  int32_t n_vocab() const override { return vocab_.n(); }
  int32_t bos() const override { return vocab_.bos; }
  int32_t eos() const override { return vocab_.eos; }
  int32_t unk() const override { return vocab_.unk; }
  int32_t eot() const override { return vocab_.eot; }
  bool add_bos() const override { return vocab_.add_bos; }
  bool add_eos() const override { return vocab_.add_eos; }
  bool add_space_prefix() const override { return vocab_.add_space_prefix; }
  bool is_eog(int32_t id) const override { return vocab_.valid(id) && vocab_.eog[id]; }
  bool is_control(int32_t id) const override { return vocab_.valid(id) && hidden_[id]; }
  const std::string& model_kind() const override { return vocab_.model; }
  const std::string& pre() const override { return vocab_.pre; }
  const std::string& raw_piece(int32_t id) const override;
  const std::string& chat_template() const override { return vocab_.chat_template; }

  const Vocab& vocab() const { return vocab_; }

 protected:
  // Tokenizes one stretch of raw text with no special token in it (never empty, valid UTF-8). `after_special`
  // is true at the start of the input and right after a special token.
  virtual void encode_text(std::string_view text, bool after_special, std::vector<int32_t>& out) const = 0;
  // The bytes a normal token's vocabulary text stands for (each model has its own escaping of spaces/bytes).
  virtual std::string decode_normal(const std::string& text) const = 0;
  // Fills the piece table; subclass constructors call it once they are ready to answer decode_normal().
  void init_pieces();

  Vocab vocab_;

 private:
  // The bytes token `id` prints as when special tokens are shown: unknown, control and user-defined tokens
  // their text, normal tokens decode_normal(), byte tokens <0xHH> their byte; unused ones nothing (llama.cpp).
  std::string make_piece(int32_t id) const;

  std::vector<std::string> piece_;  // printed bytes, special tokens included
  std::vector<uint8_t> hidden_;     // 1: printed only when `special` (control and unknown tokens)
};

}  // namespace headroom::tok
