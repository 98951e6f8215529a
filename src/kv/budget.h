// KVBudget: what --kv-budget (and a head map's or eval's budgets) say, and the limits of the KV flags.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

namespace headroom {

// --kv-budget: tokens per KV head ("1024"), bytes ("2GiB", "512MiB", "300MB") or a share of the full cache ("25%").
struct KVBudget {
  enum class Kind { None, Tokens, Bytes, Percent } kind = Kind::None;
  double value = 0;
  // Throws Error with one line naming `what` (the flag) for anything else, or for a value out of range.
  static KVBudget parse(const std::string& s, std::string_view what = "--kv-budget");
  // Tokens per KV head this budget allows for a context of n_ctx. `stored_bytes_per_token` is what a token
  // costs in the cache (K + V of every layer and KV head in the stored type, plus the policies' metadata);
  // `kv_bytes_per_token` is K + V alone. A share is a share of the full cache's bytes (K + V of n_ctx tokens,
  // which keeps no metadata), so metadata counts against it as it does against a byte budget.
  int64_t tokens_per_head(int64_t n_ctx, double stored_bytes_per_token, double kv_bytes_per_token) const;
  std::string to_string() const;
};

// Page size and prefill chunk limits (tokens), checked by pages_needed and by the flags that set them.
inline constexpr int kMaxPageSize = 4096;
inline constexpr int kMaxChunk = 1 << 16;

}  // namespace headroom
