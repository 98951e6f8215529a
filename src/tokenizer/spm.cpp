#include "tokenizer/spm.h"

#include <functional>

#include "tokenizer/merge.h"
#include "tokenizer/utf8.h"

namespace headroom::tok {

namespace {

constexpr std::string_view kSpace = "\xE2\x96\x81";  // U+2581, SentencePiece's escaped space

// Highest score first; among equal scores the leftmost pair (llama.cpp's llm_bigram_spm::comparator). With
// all scores equal (TinyStories-656K has -1000 everywhere) merging thus proceeds left to right.
using BigramQueue = MergeQueue<float, std::greater<float>>;

}  // namespace

SpmTokenizer::SpmTokenizer(Vocab v) : TokenizerBase(std::move(v)) {
  for (int b = 0; b < 256; ++b) {
    static const char* hex = "0123456789ABCDEF";
    const char buf[6] = {'<', '0', 'x', hex[b >> 4], hex[b & 15], '>'};
    int32_t id = vocab_.find(std::string_view(buf, 6));
    const char c = static_cast<char>(b);
    if (id < 0) id = vocab_.find(std::string_view(&c, 1));
    byte_token_[b] = id;
  }
  init_pieces();
}

void SpmTokenizer::emit_bytes(std::string_view sym, std::vector<int32_t>& out) const {
  bool prev_unk = false;
  for (char c : sym) {
    const int32_t id = byte_token_[static_cast<uint8_t>(c)];
    if (id >= 0) {
      out.push_back(id);
      prev_unk = false;
    } else if (!prev_unk && vocab_.unk >= 0) {  // one <unk> per character, not per byte
      out.push_back(vocab_.unk);
      prev_unk = true;
    }
  }
}

void SpmTokenizer::encode_text(std::string_view raw, bool after_special, std::vector<int32_t>& out) const {
  std::string text;
  text.reserve(raw.size() + raw.size() / 2 + kSpace.size());
  if (vocab_.add_space_prefix && after_special) text += kSpace;
  for (char c : raw) {
    if (c == ' ')
      text += kSpace;
    else
      text += c;
  }

  // One symbol per UTF-8 character.
  std::vector<MergeSymbol> syms = utf8_symbols(text);
  if (syms.empty()) return;

  BigramQueue queue;
  auto try_add = [&](int32_t left, int32_t right) {
    if (left < 0 || right < 0) return;
    const size_t size = syms[left].n + syms[right].n;
    const int32_t id = vocab_.find(std::string_view(text).substr(syms[left].offset, size));
    if (id < 0) return;
    queue.push({left, right, vocab_.scores[id], size});
  };
  merge_symbols(syms, queue, try_add);

  // Every merged symbol is a token (a pair is only queued when it is one), so what is not a token here is a
  // single character: llama.cpp's rev_merge re-segmentation never applies, and byte fallback is all we need.
  for (int32_t i = 0; i != -1; i = syms[i].next) {
    const std::string_view s = std::string_view(text).substr(syms[i].offset, syms[i].n);
    const int32_t id = vocab_.find(s);
    if (id >= 0)
      out.push_back(id);
    else
      emit_bytes(s, out);
  }
}

// U+2581 stands for a space.
std::string SpmTokenizer::decode_normal(const std::string& text) const {
  std::string out;
  out.reserve(text.size());
  for (size_t i = 0; i < text.size();) {
    if (text.compare(i, kSpace.size(), kSpace) == 0) {
      out += ' ';
      i += kSpace.size();
    } else {
      out += text[i++];
    }
  }
  return out;
}

}  // namespace headroom::tok
