// headroom: user-facing errors.
//
// Anything a user can cause (bad file, bad flag, prompt too long, budget exhausted) is reported by throwing
// headroom::Error with ONE line of text that names the thing that is wrong. The CLI prints it and exits 1;
// the server turns it into a JSON error. Internal invariants use assert() instead.
#pragma once

#include <stdexcept>
#include <string>

#include <fmt/format.h>

namespace headroom {

class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& what) : std::runtime_error(what) {}
};

template <typename... Args>
[[noreturn]] inline void fail(fmt::format_string<Args...> f, Args&&... args) {
  throw Error(fmt::format(f, std::forward<Args>(args)...));
}

}  // namespace headroom
