#include "tokenizer/bpe.h"

#include <functional>

#include "tokenizer/merge.h"
#include "tokenizer/utf8.h"
#include "util/error.h"
#include "util/escape.h"

namespace headroom::tok {

namespace {

// Lowest rank first; among equal ranks the leftmost pair (llama.cpp's llm_bigram_bpe::comparator).
using BigramQueue = MergeQueue<int32_t, std::less<int32_t>>;

}  // namespace

BpeTokenizer::BpeTokenizer(Vocab v, const gguf::Value& merges, const PreTokenizerInfo& pre)
    : TokenizerBase(std::move(v)), pretok_(pre), ignore_merges_(pre.ignore_merges) {
  // GPT-2's bytes_to_unicode(): printable bytes stand for themselves, the others for U+0100 onwards.
  char_to_byte_.fill(-1);
  uint32_t next = 256;
  for (int b = 0; b < 256; ++b) {
    const bool printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255);
    const uint32_t cp = printable ? static_cast<uint32_t>(b) : next++;
    utf8_append(byte_to_chars_[b], cp);
    char_to_byte_[cp] = static_cast<int16_t>(b);
  }

  if (merges.type != gguf::ValueType::ARRAY || merges.elem_type != gguf::ValueType::STRING)
    fail("tokenizer.ggml.merges must be an array of strings");
  ranks_.reserve(merges.size() * 2);
  for (size_t i = 0; i < merges.size(); ++i) {
    const std::string_view m = merges.str_at(i);
    const size_t sp = m.find(' ', 1);  // as llama.cpp: a merge may start with a literal space
    if (sp == std::string::npos || sp + 1 >= m.size())
      fail("tokenizer.ggml.merges[{}] = '{}' is not of the form 'left right'", i, escape_control(m));
    if (i > static_cast<size_t>(INT32_MAX)) fail("tokenizer.ggml.merges has too many entries");
    ranks_.emplace(m, static_cast<int32_t>(i));  // the first occurrence of a pair keeps its rank
  }
  init_pieces();
}

int32_t BpeTokenizer::rank(std::string_view left, std::string_view right, std::string& key) const {
  key.assign(left);
  key += ' ';
  key.append(right);
  auto it = ranks_.find(key);
  return it == ranks_.end() ? -1 : it->second;
}

// `text` is valid UTF-8 (TokenizerBase::encode sanitizes it), as PCRE2 requires.
void BpeTokenizer::encode_text(std::string_view text, bool /*after_special*/, std::vector<int32_t>& out) const {
  std::vector<std::pair<size_t, size_t>> words;
  pretok_.split(text, words);

  std::string word;
  for (auto [off, len] : words) {
    word.clear();
    for (size_t i = off; i < off + len; ++i) word += byte_to_chars_[static_cast<uint8_t>(text[i])];
    encode_word(word, out);
  }
}

void BpeTokenizer::encode_word(std::string_view word, std::vector<int32_t>& out) const {
  if (word.empty()) return;
  if (ignore_merges_) {
    if (int32_t id = vocab_.find(word); id >= 0) {
      out.push_back(id);
      return;
    }
  }

  std::vector<MergeSymbol> syms = utf8_symbols(word);
  std::string key;
  BigramQueue queue;
  auto try_add = [&](int32_t left, int32_t right) {
    if (left < 0 || right < 0) return;
    const int32_t r =
        rank(word.substr(syms[left].offset, syms[left].n), word.substr(syms[right].offset, syms[right].n), key);
    if (r < 0) return;
    queue.push({left, right, r, syms[left].n + syms[right].n});
  };
  merge_symbols(syms, queue, try_add);

  for (int32_t i = 0; i != -1; i = syms[i].next) {
    const std::string_view s = word.substr(syms[i].offset, syms[i].n);
    if (int32_t id = vocab_.find(s); id >= 0) {
      out.push_back(id);
      continue;
    }
    // A merge result that is not a token (an inconsistent vocab): emit its characters one by one. (llama.cpp
    // looks up single bytes here, which silently drops every non-ASCII character.)
    for (size_t c = 0; c < s.size();) {
      const size_t n = std::min(utf8_lead_len(static_cast<uint8_t>(s[c])), s.size() - c);
      if (int32_t id = vocab_.find(s.substr(c, n)); id >= 0) out.push_back(id);
      c += n;
    }
  }
}

// Undoes the byte-to-character table; a character outside it is kept as it is.
std::string BpeTokenizer::decode_normal(const std::string& text) const {
  std::string out;
  out.reserve(text.size());
  for (size_t i = 0; i < text.size();) {
    const int r = utf8_check(text.data() + i, text.size() - i);
    if (r <= 0) {
      out += text[i++];
      continue;
    }
    const uint32_t cp = utf8_decode(text.data() + i, static_cast<size_t>(r));
    if (cp < char_to_byte_.size() && char_to_byte_[cp] >= 0)
      out += static_cast<char>(char_to_byte_[cp]);
    else
      out.append(text, i, static_cast<size_t>(r));
    i += static_cast<size_t>(r);
  }
  return out;
}

}  // namespace headroom::tok
