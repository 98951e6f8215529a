// libFuzzer target for the string -> number parsers of user input (KVBudget::parse, parse_tokens,
// parse_depths, parse_decimal_prefix): any bytes in, either a value inside the documented range or a
// headroom::Error with one line — never a crash, undefined behaviour or unbounded memory.
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "kv/kv_cache.h"
#include "util/error.h"
#include "util/parse.h"

namespace {
void one_line(const headroom::Error& e) {
  if (std::string(e.what()).find('\n') != std::string::npos) std::abort();
}
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace headroom;
  const std::string s(reinterpret_cast<const char*>(data), size);
  size_t used = 0;
  if (std::optional<double> v = parse_decimal_prefix(s, &used))
    if (!std::isfinite(*v) || *v < 0 || used == 0 || used > s.size()) std::abort();
  try {
    KVBudget b = KVBudget::parse(s);
    if (!(b.value > 0) || !std::isfinite(b.value)) std::abort();
    if (b.kind == KVBudget::Kind::Tokens && b.value > 2147483647.0) std::abort();
    if (b.kind == KVBudget::Kind::Percent && b.value > 100) std::abort();
    ModelConfig c;
    c.n_layer = 8;
    c.n_head_kv = 2;
    c.head_dim = 64;
    const double kv = double(c.kv_bytes_per_token(KVType::F16));
    const int64_t t = b.tokens_per_head(4096, 1.25 * kv, kv);
    if (t < 0 || t > 2147483647) std::abort();
  } catch (const Error& e) {
    one_line(e);
  }
  try {
    const int64_t t = parse_tokens(s, "--ctx", 64, kMaxContext);
    if (t < 64 || t > kMaxContext) std::abort();
  } catch (const Error& e) {
    one_line(e);
  }
  try {
    std::vector<double> d = parse_depths(s, "--depths");
    if (d.empty() || int64_t(d.size()) > kMaxDepths) std::abort();
    for (double x : d)
      if (!(x >= 0 && x <= 1)) std::abort();
  } catch (const Error& e) {
    one_line(e);
  }
  return 0;
}
