#include "kv/budget.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <limits>
#include <optional>

#include "util/error.h"
#include "util/parse.h"

namespace headroom {

KVBudget KVBudget::parse(const std::string& s, std::string_view what) {
  KVBudget b;
  size_t used = 0;
  const std::optional<double> num = parse_decimal_prefix(s, &used);
  std::string unit = num ? s.substr(used) : std::string();
  for (char& ch : unit) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
  double mult = 0;
  if (unit.empty()) b.kind = Kind::Tokens;
  else if (unit == "%") b.kind = Kind::Percent;
  else {
    b.kind = Kind::Bytes;
    if (unit == "b") mult = 1;
    else if (unit == "k" || unit == "kib") mult = 1024.0;
    else if (unit == "m" || unit == "mib") mult = 1024.0 * 1024;
    else if (unit == "g" || unit == "gib") mult = 1024.0 * 1024 * 1024;
    else if (unit == "kb") mult = 1e3;
    else if (unit == "mb") mult = 1e6;
    else if (unit == "gb") mult = 1e9;
  }
  const double v = num.value_or(0);
  b.value = b.kind == Kind::Bytes ? v * mult : v;
  // Tokens fit in int32 and bytes stay far below int64 (4 EiB), so every count derived from them fits.
  const bool ok = num && v > 0 &&
                  (b.kind == Kind::Tokens   ? v == std::floor(v) && v <= double(std::numeric_limits<int32_t>::max())
                   : b.kind == Kind::Percent ? v <= 100
                                             : mult > 0 && b.value >= 1 && b.value <= double(int64_t(1) << 62));
  if (!ok)
    fail("invalid {} {:?} (use tokens per KV head like 1024 (1..2147483647), bytes like 2GiB or 512MiB (1 B..4 EiB), "
         "or a share like 25% (above 0, at most 100%))", what, s);
  return b;
}

int64_t KVBudget::tokens_per_head(int64_t n_ctx, double stored_bytes_per_token, double kv_bytes_per_token) const {
  switch (kind) {
    case Kind::None: return n_ctx;
    case Kind::Tokens: return static_cast<int64_t>(value);
    case Kind::Percent:
      return static_cast<int64_t>(std::floor(value / 100.0 * double(n_ctx) * kv_bytes_per_token / stored_bytes_per_token));
    case Kind::Bytes:
      return static_cast<int64_t>(std::min(value / stored_bytes_per_token, double(std::numeric_limits<int32_t>::max())));
  }
  return n_ctx;
}

std::string KVBudget::to_string() const {
  switch (kind) {
    case Kind::None: return "none";
    case Kind::Tokens: return fmt::format("{} tokens/head", int64_t(value));
    case Kind::Percent: return fmt::format("{}%", value);
    case Kind::Bytes: return fmt::format("{:.1f} MiB", value / (1024.0 * 1024));
  }
  return "?";
}

}  // namespace headroom
