// Strict string -> number parsers for user input (flag values, budget strings). Each accepts only what its
// comment says (no sign, exponent, hex, inf or nan, no trailing text) and throws Error with one line naming
// the input (`what`, e.g. "--ctx") and what it accepts. fuzz/fuzz_flags.cpp feeds them arbitrary bytes.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace headroom {

// The largest context (tokens) any flag or head map accepts; far above any trained context, small enough that
// token positions, page counts and buffer sizes derived from it cannot overflow.
inline constexpr int64_t kMaxContext = int64_t(1) << 24;
// The most needle depths one --depths may ask for (0:100:0.1 is 1001).
inline constexpr int64_t kMaxDepths = 1001;

// An inclusive range of a numeric input (lo itself excluded when lo_open), for flags and API fields alike.
struct NumRange {
  double lo, hi;
  bool lo_open = false;
  // "" when v is finite and inside; else one line like "2 is out of range (0..1)".
  std::string check(double v) const;
  std::string text() const;  // "0..1", or "above 0, at most 10"
};

// A plain decimal number ("12", "12.5") at the start of s: digits, optionally '.' and more digits. Returns it
// and sets *used to its length; nullopt if s does not start with one (or it has more than 30 digits).
std::optional<double> parse_decimal_prefix(std::string_view s, size_t* used);

// A token count: "4096", or with k (x1024): "4k", "1.5k"; the result must be whole and lie in lo..hi.
int64_t parse_tokens(std::string_view s, std::string_view what, int64_t lo, int64_t hi);

// Needle depths in percent, "START:END:STEP" (0:100:10 = 0,10,...,100) or a comma list (10,50,90); every depth
// in 0..100 and at most kMaxDepths of them. Returned as fractions 0..1.
std::vector<double> parse_depths(std::string_view s, std::string_view what);

}  // namespace headroom
