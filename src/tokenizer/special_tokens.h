// Splitting raw text around special tokens written in it, before the text itself is tokenized
// (llama.cpp's tokenizer_st_partition).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string_view>
#include <vector>

#include "tokenizer/vocab.h"

namespace headroom::tok {

struct Fragment {
  int32_t token = -1;  // >= 0: a special token; -1: the raw text [offset, offset + length)
  size_t offset = 0;
  size_t length = 0;
};

// Special tokens are tried longest first; each one splits every raw-text fragment where it occurs. Control
// and unknown tokens are only matched when parse_special; user-defined tokens always are. Tokens with the
// lstrip/rstrip attribute eat the ASCII whitespace beside them. Raw fragments are never empty.
std::vector<Fragment> partition_special(const Vocab& v, std::string_view text, bool parse_special);

}  // namespace headroom::tok
