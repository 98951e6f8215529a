// Tokenizers built from the vocabulary stored in a GGUF file (tokenizer.ggml.*):
//  - "llama": SentencePiece-style BPE (merge by score) with byte fallback (Llama 2, phi-3, TinyStories).
//  - "gpt2":  byte-level BPE (merge by rank) with a pre-tokenizer chosen by tokenizer.ggml.pre
//             (default/gpt-2, llama-bpe/llama3, qwen2, smollm, deepseek-llm, deepseek-coder, falcon, starcoder).
// Special/control tokens are matched in the text when parse_special is set. BOS/EOS rules come from metadata.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "gguf/gguf.h"

namespace headroom {

class Tokenizer {
 public:
  // Throws headroom::Error (one line) if the vocab is missing, inconsistent or of an unsupported kind.
  static std::unique_ptr<Tokenizer> from_gguf(const gguf::File& f);
  virtual ~Tokenizer() = default;

  // add_bos: put BOS first (throws Error if the vocab has none). parse_special: control tokens written in the
  // text ("<|im_start|>") become their ids; user-defined tokens are matched either way (as llama.cpp and HF do).
  // Any bytes are accepted: SPM keeps invalid UTF-8 as byte tokens, byte-level BPE replaces it with U+FFFD.
  virtual std::vector<int32_t> encode(std::string_view text, bool add_bos, bool parse_special = true) const = 0;
  // The bytes a token stands for when decoded (byte tokens give their byte, SPM "▁" becomes a space;
  // control tokens give their text only if `special`). Ids outside the vocab give "".
  virtual std::string token_to_piece(int32_t id, bool special = false) const = 0;
  // Concatenated pieces; SPM drops the leading space that the first token of the text carries (the first
  // token that prints anything). Bytes that do not form valid UTF-8 become U+FFFD, one per byte, so
  // decode(encode(s)) == s for valid UTF-8 s. No clean-up of spaces around punctuation.
  virtual std::string decode(std::span<const int32_t> ids, bool special = false) const = 0;

  virtual int32_t n_vocab() const = 0;
  virtual int32_t bos() const = 0;           // -1 if none
  virtual int32_t eos() const = 0;           // -1 if none
  virtual bool add_bos() const = 0;          // tokenizer.ggml.add_bos_token (or the family default)
  virtual bool is_eog(int32_t id) const = 0; // end of generation: EOS, EOT, <|im_end|>, <|eot_id|>, ...
  virtual const std::string& model_kind() const = 0;  // "llama" or "gpt2"
  virtual const std::string& pre() const = 0;         // pre-tokenizer name ("" for SPM)
  virtual const std::string& raw_piece(int32_t id) const = 0;  // the vocab string as stored

  // Added beside the interface above (defaults keep other implementations compiling):
  virtual int32_t unk() const { return -1; }            // -1 if none
  virtual int32_t eot() const { return -1; }            // end of turn (<|eot_id|>, <|im_end|>, <|end|>...), -1 if none
  virtual bool add_eos() const { return false; }        // tokenizer.ggml.add_eos_token; encode() never adds EOS
  virtual bool add_space_prefix() const { return false; }  // SPM: a space is prefixed to the text (and dropped by decode)
  virtual bool is_control(int32_t id) const { return false; }  // printed only when `special`
  virtual const std::string& chat_template() const;     // tokenizer.chat_template, "" if none
};

// Streams decoded text token by token, holding back an incomplete UTF-8 sequence until it completes, so the
// concatenation of push() results plus flush() equals decode() of all ids.
class StreamDecoder {
 public:
  explicit StreamDecoder(const Tokenizer& tok, bool special = false) : tok_(tok), special_(special) {}
  std::string push(int32_t id);
  std::string flush();  // whatever is held back (an incomplete sequence is emitted as U+FFFD per byte, as decode)

 private:
  const Tokenizer& tok_;
  bool special_;
  bool first_ = true;
  std::string pending_;
};

struct ChatMessage {
  std::string role;     // "system", "user", "assistant"
  std::string content;
};

// Chat templates recognised from the text of tokenizer.chat_template (no Jinja interpreter): ChatML (Qwen2,
// SmolLM), Llama-3, Llama-2, Mistral ([INST]), phi-3, Gemma-style; unknown text falls back to ChatML... or a
// plain "role: content" format, with a warning.
class ChatTemplate {
 public:
  enum class Kind { ChatML, Llama3, Llama2, Mistral, Phi3, Plain };
  // Empty template text -> Plain. `recognised` tells whether the text matched a known family.
  static ChatTemplate detect(const std::string& template_text);
  Kind kind() const { return kind_; }
  const char* name() const;
  bool recognised() const { return recognised_; }
  std::string apply(const std::vector<ChatMessage>& msgs, bool add_generation_prompt,
                    const std::string& bos_text = "", const std::string& eos_text = "") const;

 private:
  Kind kind_ = Kind::Plain;
  bool recognised_ = false;
};

}  // namespace headroom
