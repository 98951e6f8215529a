#include "tokenizer/tokenizer_base.h"

#include "tokenizer/special_tokens.h"
#include "tokenizer/utf8.h"
#include "util/error.h"

namespace headroom {

const std::string& Tokenizer::chat_template() const {
  static const std::string empty;
  return empty;
}

std::string Tokenizer::decode(std::span<const int32_t> ids, bool special, bool continuation) const {
  if (!continuation) return decode(ids, special);
  std::string bytes;
  for (int32_t id : ids) bytes += token_to_piece(id, special);
  return tok::utf8_sanitize(bytes);
}

namespace tok {

std::vector<int32_t> TokenizerBase::encode(std::string_view raw, bool add_bos, bool parse_special) const {
  // Invalid UTF-8 becomes U+FFFD first (llama.cpp does so for BPE, whose regexes need valid text; doing it for
  // SPM too keeps a broken byte from fusing with the U+2581 of a following space).
  const std::string valid = utf8_sanitize(raw);
  const std::string_view text = valid;
  std::vector<int32_t> out;
  out.reserve(text.size() / 3 + 2);
  if (add_bos) {
    if (vocab_.bos < 0) fail("cannot add BOS: this vocabulary has no BOS token");
    out.push_back(vocab_.bos);
  }
  bool after_special = true;
  for (const Fragment& fr : partition_special(vocab_, text, parse_special)) {
    if (fr.token >= 0) {
      out.push_back(fr.token);
      after_special = true;
    } else {
      encode_text(text.substr(fr.offset, fr.length), after_special, out);
      after_special = false;
    }
  }
  return out;
}

std::string TokenizerBase::make_piece(int32_t id) const {
  const uint32_t attr = vocab_.attrs[id];
  const std::string& text = vocab_.pieces[id];
  if (attr & (kAttrUnknown | kAttrControl | kAttrUserDefined)) return text;
  if (attr & kAttrNormal) return decode_normal(text);
  if (attr & kAttrByte) {
    uint8_t b;
    if (parse_byte_token(text, b)) return std::string(1, static_cast<char>(b));
    return text;
  }
  return {};
}

void TokenizerBase::init_pieces() {
  const int32_t n = vocab_.n();
  piece_.resize(n);
  hidden_.resize(n);
  for (int32_t id = 0; id < n; ++id) {
    piece_[id] = make_piece(id);
    hidden_[id] = (vocab_.attrs[id] & (kAttrControl | kAttrUnknown)) ? 1 : 0;
  }
}

std::string TokenizerBase::token_to_piece(int32_t id, bool special) const {
  if (!vocab_.valid(id) || (hidden_[id] && !special)) return {};
  return piece_[id];
}

const std::string& TokenizerBase::raw_piece(int32_t id) const {
  static const std::string empty;
  return vocab_.valid(id) ? vocab_.pieces[id] : empty;
}

std::string TokenizerBase::decode(std::span<const int32_t> ids, bool special) const {
  std::string bytes;
  bool strip_space = vocab_.add_space_prefix;
  for (int32_t id : ids) {
    if (!vocab_.valid(id) || (hidden_[id] && !special)) continue;
    std::string_view p = piece_[id];
    if (p.empty()) continue;
    if (strip_space && p.front() == ' ') p.remove_prefix(1);
    strip_space = false;
    bytes.append(p);
  }
  return utf8_sanitize(bytes);
}

}  // namespace tok
}  // namespace headroom
