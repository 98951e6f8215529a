// StreamDecoder: decode() one token at a time. It applies the same two rules as decode() — the first
// printed piece of an SPM text loses its leading space, and bytes that are not valid UTF-8 become U+FFFD
// (one per byte) — holding back only the bytes of a sequence that may still complete.
#include "tokenizer/tokenizer.h"
#include "tokenizer/utf8.h"

namespace headroom {

std::string StreamDecoder::push(int32_t id) {
  std::string piece = tok_.token_to_piece(id, special_);
  if (piece.empty()) return {};
  if (first_) {
    if (tok_.add_space_prefix() && piece.front() == ' ') piece.erase(0, 1);
    first_ = false;
  }
  pending_ += piece;
  std::string out;
  const size_t used = tok::utf8_sanitize_append(pending_, out, /*hold_incomplete=*/true);
  pending_.erase(0, used);
  return out;
}

std::string StreamDecoder::flush() {
  std::string out = tok::utf8_sanitize(pending_);
  pending_.clear();
  return out;
}

}  // namespace headroom
