#include "backend/kv_layout.h"

#include <algorithm>
#include <cctype>

#include "util/error.h"

namespace headroom {

namespace {
struct KVTypeInfo {
  KVType type;
  const char* name;
};
constexpr KVTypeInfo kKVTypes[] = {
    {KVType::F32, "f32"}, {KVType::F16, "f16"}, {KVType::BF16, "bf16"}, {KVType::Q8_0, "q8_0"}};
}  // namespace

const char* kv_type_name(KVType t) {
  for (const KVTypeInfo& i : kKVTypes)
    if (i.type == t) return i.name;
  return "?";
}

KVType parse_kv_type(const std::string& s, const char* flag) {
  std::string l = s;
  std::transform(l.begin(), l.end(), l.begin(), [](unsigned char c) { return char(std::tolower(c)); });
  for (const KVTypeInfo& i : kKVTypes)
    if (l == i.name) return i.type;
  fail("{} '{}' is not a KV type headroom stores (choose f16, bf16, f32, q8_0)", flag, s);
}

int64_t kv_row_bytes(KVType t, int head_dim) {
  switch (t) {
    case KVType::F32: return int64_t(head_dim) * 4;
    case KVType::F16:
    case KVType::BF16: return int64_t(head_dim) * 2;
    case KVType::Q8_0: return int64_t(head_dim) / 32 * 34;
  }
  return 0;
}

std::string kv_type_fits(KVType t, int head_dim) {
  if (t == KVType::Q8_0 && head_dim % 32 != 0)
    return fmt::format("KV type q8_0 stores blocks of 32 values, but head_dim is {}", head_dim);
  return "";
}

}  // namespace headroom
