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
  // Any bytes are accepted: invalid UTF-8 is replaced with U+FFFD (one per bad byte) before tokenizing.
  virtual std::vector<int32_t> encode(std::string_view text, bool add_bos, bool parse_special = true) const = 0;
  // The bytes a token stands for when decoded (byte tokens give their byte, SPM "▁" becomes a space;
  // control tokens give their text only if `special`). Ids outside the vocab give "".
  virtual std::string token_to_piece(int32_t id, bool special = false) const = 0;
  // Concatenated pieces; SPM drops the leading space that the first token of the text carries (the first
  // token that prints anything). Bytes that do not form valid UTF-8 become U+FFFD, one per byte. No clean-up
  // of spaces around punctuation, so decode(encode(s, bos, parse_special=false)) == s for valid UTF-8 s that
  // the vocab can spell (every byte-level vocab, every SPM vocab with <0xXX> tokens; SPM reads U+2581 as a space).
  virtual std::string decode(std::span<const int32_t> ids, bool special = false) const = 0;
  // The same for tokens that continue a text (generated after a prompt): no leading space is dropped.
  std::string decode(std::span<const int32_t> ids, bool special, bool continuation) const;

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
  // continuation: the ids continue a text (generated after a prompt), so the SPM leading space is kept; the
  // output then equals decode(ids, special, /*continuation=*/true).
  StreamDecoder(const Tokenizer& tok, bool special, bool continuation)
      : tok_(tok), special_(special), first_(!continuation) {}
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

// Chat templates recognised from the text of tokenizer.chat_template (there is no Jinja interpreter: each
// family is rendered by code written to give the same output as its templates):
//  - ChatML ("<|im_start|>": Qwen2/2.5/3, SmolLM): "<|im_start|>role\ncontent<|im_end|>\n" per message. A default
//    system prompt written in the template (Qwen2/2.5, SmolLM2) is used when the conversation has none; a
//    template with Qwen3's reasoning_content logic gets Qwen3's <think> blocks for the last assistant turn.
//  - Llama-3 ("<|start_header_id|>"): header + trimmed content + <|eot_id|>, bos_text first; the Llama-3.1/3.2
//    "Cutting Knowledge Date" system header when the template has it. The assistant header is added when
//    add_generation_prompt, or always if the template does not look at add_generation_prompt (Llama-3 base).
//  - Llama-2 ("[INST]" with "<<SYS>>"): bos_text "[INST] (<<SYS>>...) user [/INST]" assistant eos_text.
//  - Mistral ("[INST]" without "<<SYS>>", v0.1/v0.2 form): bos_text "[INST] user [/INST]assistant" eos_text; a
//    system message (which those templates reject) is put before the first user message.
//  - Phi-3 ("<|user|>" and "<|end|>"): phi-3-mini-4k's original form (user turns followed by "<|assistant|>\n",
//    system messages dropped, bos_text first) or, when the template looks at add_generation_prompt, Phi-3.5's
//    form with a <|system|> block and eos_text when no generation prompt is asked for.
//  - Plain: anything else (recognised() == false: the caller should warn): "role: content\n" per message and
//    "assistant:" as the generation prompt.
// Llama-2 and Mistral throw headroom::Error unless roles alternate user/assistant (as their templates do).
// Tools, tool calls and other template variables are not supported. bos_text is written only by the families
// whose templates write bos_token: pass "" when the tokenizer adds BOS itself.
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
  // Variants within a family, read from the template text.
  bool gen_prompt_always_ = false;  // Llama-3 base / phi-3 original: the template ignores add_generation_prompt
  bool qwen3_think_ = false;        // ChatML with Qwen3's <think> handling of assistant turns
  bool phi3_system_ = false;        // Phi-3.5 form
  bool bos_in_template_ = true;     // the template writes bos_token
  bool llama31_header_ = false;     // Llama-3.1+: "Cutting Knowledge Date" system header
  std::string date_;                // Llama-3.1+: "Today Date: ..." (the template's default date, or today)
  std::string default_system_;      // ChatML: system prompt the template inserts when none is given
};

}  // namespace headroom
