// UTF-8 helpers shared by the tokenizers and the stream decoder.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace headroom::tok {

// Length of the sequence a lead byte announces, as llama.cpp's unicode_len_utf8: 1 for ASCII and for
// stray continuation bytes, else 2/3/4 by the high bits. Does not check that the sequence is valid.
inline size_t utf8_lead_len(uint8_t c) {
  static constexpr uint8_t kLen[16] = {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 3, 4};
  return kLen[c >> 4];
}

// Looks at the sequence starting at s[0] (n bytes available). Returns its length (1-4) if it is a complete,
// well-formed UTF-8 sequence (no overlongs, no surrogates, at most U+10FFFF); 0 if the bytes so far are a
// valid beginning that the end of the buffer cuts short; -1 if s[0] cannot start a valid sequence here.
int utf8_check(const char* s, size_t n);

// Replaces every byte that does not belong to a well-formed sequence with U+FFFD, one per byte (a sequence
// cut short by the end of the text counts as ill-formed). The same rule is applied by decode() and by
// StreamDecoder, so that streamed output equals decoded output.
std::string utf8_sanitize(std::string_view s);
// Appends the sanitized form of s to out. If hold_incomplete, a valid beginning cut short by the end of s is
// not emitted; the number of bytes consumed from s is returned (the rest must be passed again later).
size_t utf8_sanitize_append(std::string_view s, std::string& out, bool hold_incomplete);

void utf8_append(std::string& out, uint32_t cp);
// Decodes one code point starting at s[0]; the sequence must be well-formed (checked by the caller).
uint32_t utf8_decode(const char* s, size_t len);

inline constexpr std::string_view kReplacementChar = "\xEF\xBF\xBD";  // U+FFFD

}  // namespace headroom::tok
