// Reading numbers and strings out of user-supplied JSON (head maps): every field is type- and range-checked
// where it is read, and a bad one is reported in one line naming the file, the place (e.g. "heads[3]") and the
// key, e.g. `heads.json: heads[3] "budget": 2147483647 is out of range (1..16777216)`.
#pragma once

#include <cstdint>
#include <optional>
#include <string>

#include <nlohmann/json.hpp>

#include "util/parse.h"

namespace headroom {

struct JsonPlace {
  std::string file;   // the file name (or "<input>")
  std::string where;  // the object within it: "model", "heads[3]", ...
};

// obj[key] as a whole number in r. A missing key gives `def`, or is an error when def is nullopt.
int64_t json_int(const nlohmann::json& obj, const JsonPlace& at, const char* key, NumRange r,
                 std::optional<int64_t> def = std::nullopt);
// obj[key] as a finite number in r, likewise.
double json_real(const nlohmann::json& obj, const JsonPlace& at, const char* key, NumRange r,
                 std::optional<double> def = std::nullopt);
// obj[key] as a string (at most 4096 bytes, no control characters), likewise.
std::string json_string(const nlohmann::json& obj, const JsonPlace& at, const char* key,
                        std::optional<std::string> def = std::nullopt);
// obj[key] as an array (array = true) or an object: a reference into obj.
const nlohmann::json& json_child(const nlohmann::json& obj, const JsonPlace& at, const char* key, bool array);

}  // namespace headroom
