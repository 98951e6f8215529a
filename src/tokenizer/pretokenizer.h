// Pre-tokenizers of the byte-level BPE vocabs: the text is cut into words by a sequence of regexes, as
// tokenizer.ggml.pre names them (the Hugging Face pre_tokenizer of each family, as llama.cpp applies it).
#pragma once

#include <cstddef>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace headroom::tok {

struct PreTokenizerInfo {
  std::string family;                // canonical name: "gpt-2", "llama3", "qwen2", ...
  std::vector<const char*> regexes;  // applied in turn
  bool ignore_merges = false;        // a word that is itself a token is not merged (llama3)
  bool add_bos = false;              // llama.cpp's default for tokenizer.ggml.add_bos_token
};

// Maps a tokenizer.ggml.pre value to its regexes. Throws headroom::Error naming an unsupported value.
PreTokenizerInfo pretokenizer_info(const std::string& pre);

class PreTokenizer {
 public:
  explicit PreTokenizer(const PreTokenizerInfo& info);  // compiles the regexes (PCRE2, UTF + UCP, JIT)
  ~PreTokenizer();
  PreTokenizer(PreTokenizer&&) noexcept;
  PreTokenizer& operator=(PreTokenizer&&) noexcept;

  // Splits `text` (valid UTF-8) into words: each regex splits every piece left by the one before, keeping
  // both the matches and the stretches between them (HF's Split with behavior "Isolated"). Appends
  // [offset, length) pairs to `words`. Thread-safe.
  void split(std::string_view text, std::vector<std::pair<size_t, size_t>>& words) const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace headroom::tok
