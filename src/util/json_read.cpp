#include "util/json_read.h"

#include <cmath>

#include "util/error.h"

namespace headroom {

using nlohmann::json;

namespace {
// The value as written, short enough for one line (arrays and objects only by kind: dumping them recurses).
std::string shown(const json& v) {
  if (v.is_array()) return "an array";
  if (v.is_object()) return "an object";
  std::string s = v.dump(-1, ' ', true, json::error_handler_t::replace);
  return s.size() > 40 ? s.substr(0, 40) + "..." : s;
}

[[noreturn]] void bad(const JsonPlace& at, const char* key, const std::string& why) {
  fail("{}: {} \"{}\": {}", at.file, at.where, key, why);
}

// obj[key], or nullptr when absent and not `required` (obj itself must be an object).
const json* field(const json& obj, const JsonPlace& at, const char* key, bool required) {
  if (!obj.is_object()) fail("{}: {} is not a JSON object", at.file, at.where);
  auto it = obj.find(key);
  if (it == obj.end() && required) bad(at, key, "missing");
  return it == obj.end() ? nullptr : &*it;
}

// Fails unless d, v's value, is in r.
void check_range(const JsonPlace& at, const char* key, const json& v, double d, NumRange r) {
  if (!r.check(d).empty()) bad(at, key, fmt::format("{} is out of range ({})", shown(v), r.text()));
}
}  // namespace

int64_t json_int(const json& obj, const JsonPlace& at, const char* key, NumRange r, std::optional<int64_t> def) {
  const json* v = field(obj, at, key, !def);
  if (!v) return *def;
  if (!v->is_number_integer()) bad(at, key, fmt::format("{} is not a whole number ({})", shown(*v), r.text()));
  // An unsigned above int64 would wrap in get<int64_t>(); anything that large is out of every range.
  const double d = v->is_number_unsigned() ? double(v->get<uint64_t>()) : double(v->get<int64_t>());
  check_range(at, key, *v, d, r);
  return v->get<int64_t>();
}

double json_real(const json& obj, const JsonPlace& at, const char* key, NumRange r, std::optional<double> def) {
  const json* v = field(obj, at, key, !def);
  if (!v) return *def;
  if (!v->is_number()) bad(at, key, fmt::format("{} is not a number ({})", shown(*v), r.text()));
  const double d = v->get<double>();
  check_range(at, key, *v, d, r);
  return d;
}

std::string json_string(const json& obj, const JsonPlace& at, const char* key, std::optional<std::string> def) {
  const json* v = field(obj, at, key, !def);
  if (!v) return *def;
  if (!v->is_string()) bad(at, key, fmt::format("{} is not a string", shown(*v)));
  const std::string& s = v->get_ref<const std::string&>();
  if (s.size() > 4096) bad(at, key, fmt::format("a string of {} bytes is longer than 4096", s.size()));
  // Messages echo strings; a control character (a newline) would break their one line.
  for (char c : s)
    if (static_cast<unsigned char>(c) < 0x20 || c == 0x7f) bad(at, key, fmt::format("{} contains a control character", shown(*v)));
  return s;
}

const json& json_child(const json& obj, const JsonPlace& at, const char* key, bool array) {
  const json* v = field(obj, at, key, true);
  if (array ? !v->is_array() : !v->is_object()) bad(at, key, fmt::format("{} is not {}", shown(*v), array ? "an array" : "an object"));
  return *v;
}

}  // namespace headroom
