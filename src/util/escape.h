// Backslash escapes in command-line prompts, as llama.cpp's -p does by default: \n \r \t \\ \' \" \xHH.
// An unknown or incomplete escape is kept as written.
#pragma once

#include <string>

namespace headroom {

inline std::string process_escapes(const std::string& in) {
  auto hex = [](char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
  };
  std::string out;
  out.reserve(in.size());
  for (size_t i = 0; i < in.size(); ++i) {
    if (in[i] != '\\' || i + 1 == in.size()) {
      out += in[i];
      continue;
    }
    const char e = in[i + 1];
    switch (e) {
      case 'n': out += '\n'; ++i; break;
      case 'r': out += '\r'; ++i; break;
      case 't': out += '\t'; ++i; break;
      case '\\': out += '\\'; ++i; break;
      case '\'': out += '\''; ++i; break;
      case '"': out += '"'; ++i; break;
      case 'x':
        if (i + 3 < in.size() && hex(in[i + 2]) >= 0 && hex(in[i + 3]) >= 0) {
          out += char(hex(in[i + 2]) * 16 + hex(in[i + 3]));
          i += 3;
        } else {
          out += in[i];
        }
        break;
      default: out += in[i]; break;
    }
  }
  return out;
}

}  // namespace headroom
