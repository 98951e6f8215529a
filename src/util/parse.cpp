#include "util/parse.h"

#include <charconv>
#include <cmath>

#include "util/error.h"

namespace headroom {

std::string NumRange::text() const {
  return lo_open ? fmt::format("above {}, at most {}", lo, hi) : fmt::format("{}..{}", lo, hi);
}

std::string NumRange::check(double v) const {
  if (std::isfinite(v) && (lo_open ? v > lo : v >= lo) && v <= hi) return "";
  return fmt::format("{} is out of range ({})", v, text());
}

std::optional<double> parse_decimal_prefix(std::string_view s, size_t* used) {
  auto digits_from = [&](size_t i) {
    size_t j = i;
    while (j < s.size() && s[j] >= '0' && s[j] <= '9') ++j;
    return j;
  };
  size_t end = digits_from(0);
  if (end == 0) return std::nullopt;
  if (end < s.size() && s[end] == '.') {
    const size_t frac = digits_from(end + 1);
    if (frac == end + 1) return std::nullopt;  // "12." is not a number
    end = frac;
  }
  if (end > 31) return std::nullopt;  // 30 digits and a point: beyond anything a flag means
  double v = 0;
  auto [p, ec] = std::from_chars(s.data(), s.data() + end, v);
  if (ec != std::errc() || p != s.data() + end || !std::isfinite(v)) return std::nullopt;
  *used = end;
  return v;
}

int64_t parse_tokens(std::string_view s, std::string_view what, int64_t lo, int64_t hi) {
  size_t used = 0;
  std::optional<double> v = parse_decimal_prefix(s, &used);
  const std::string_view unit = v ? s.substr(used) : std::string_view();
  if (v && (unit == "k" || unit == "K")) *v *= 1024;
  else if (!unit.empty()) v.reset();
  if (!v || *v != std::floor(*v) || *v < double(lo) || *v > double(hi))
    fail("invalid {} {:?} (a whole number of tokens like 4096 or 4k, in {}..{})", what, s, lo, hi);
  return int64_t(*v);
}

std::vector<double> parse_depths(std::string_view s, std::string_view what) {
  auto bad = [&](std::string_view why) {
    fail("invalid {} {:?}: {} (START:END:STEP in percent like 0:100:10, or a list like 10,50,90; each in 0..100, "
         "at most {} depths)", what, s, why, kMaxDepths);
  };
  // Splits on `sep` and parses every item as a percentage.
  auto numbers = [&](char sep) {
    std::vector<double> out;
    size_t start = 0;
    for (;;) {
      const size_t end = std::min(s.find(sep, start), s.size());
      const std::string_view item = s.substr(start, end - start);
      size_t used = 0;
      std::optional<double> v = parse_decimal_prefix(item, &used);
      if (!v || used != item.size()) bad(fmt::format("{:?} is not a number", item));
      if (*v > 100) bad(fmt::format("{} is above 100", *v));
      if (int64_t(out.size()) == kMaxDepths) bad("too many depths");
      out.push_back(*v);
      if (end == s.size()) return out;
      start = end + 1;
    }
  };
  std::vector<double> out;
  if (s.find(':') != std::string_view::npos) {
    std::vector<double> p = numbers(':');
    if (p.size() != 3) bad("a range has three parts");
    if (p[2] <= 0) bad("STEP must be above 0");
    if (p[0] > p[1]) bad("START is above END");
    const double n = std::floor((p[1] - p[0]) / p[2] + 1e-9) + 1;
    if (n > double(kMaxDepths)) bad(fmt::format("the range has {:.0f} depths", n));
    for (int64_t i = 0; i < int64_t(n); ++i) out.push_back(std::min(p[0] + double(i) * p[2], 100.0) / 100.0);
  } else {
    for (double d : numbers(',')) out.push_back(d / 100.0);
  }
  return out;
}

}  // namespace headroom
