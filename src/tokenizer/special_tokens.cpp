#include "tokenizer/special_tokens.h"

namespace headroom::tok {

namespace {
bool is_ascii_space(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\v' || c == '\f' || c == '\r'; }
}  // namespace

std::vector<Fragment> partition_special(const Vocab& v, std::string_view text, bool parse_special) {
  std::vector<Fragment> frags;
  if (text.empty()) return frags;
  frags.push_back({-1, 0, text.size()});

  std::vector<Fragment> next;
  for (int32_t id : v.specials) {
    const uint32_t attr = v.attrs[id];
    if (!parse_special && (attr & (kAttrControl | kAttrUnknown))) continue;
    const std::string& tok = v.pieces[id];
    if (text.find(tok) == std::string_view::npos) continue;  // cheap filter: most specials never occur

    next.clear();
    for (const Fragment& fr : frags) {
      if (fr.token >= 0) {
        next.push_back(fr);
        continue;
      }
      size_t off = fr.offset, len = fr.length;
      while (len > 0) {
        const size_t match = text.substr(0, off + len).find(tok, off);
        if (match == std::string_view::npos) {
          next.push_back({-1, off, len});
          break;
        }
        size_t left_len = match - off;
        if (attr & kAttrLstrip)
          while (left_len > 0 && is_ascii_space(text[off + left_len - 1])) --left_len;
        if (left_len > 0) next.push_back({-1, off, left_len});
        next.push_back({id, 0, 0});
        size_t right_off = match + tok.size();
        size_t right_len = off + len - right_off;
        if (attr & kAttrRstrip)
          while (right_len > 0 && is_ascii_space(text[right_off])) ++right_off, --right_len;
        off = right_off;
        len = right_len;
      }
    }
    frags.swap(next);
  }
  return frags;
}

}  // namespace headroom::tok
