// Backslash escapes, both ways:
//  - process_escapes: in command-line prompts, as llama.cpp's -p does by default: \n \r \t \\ \' \" \xHH.
//    An unknown or incomplete escape is kept as written.
//  - escape_control: untrusted text (file metadata, names) made safe to print on a terminal: control bytes
//    (C0, DEL) and C1 control characters become \n \r \t or \xHH, and a backslash becomes \\, so what is
//    printed is one line and reads back unambiguously. Other bytes, UTF-8 included, are kept.
#pragma once

#include <string>
#include <string_view>

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

inline std::string escape_control(std::string_view in) {
  static const char* hex = "0123456789abcdef";
  auto put_hex = [](std::string& out, unsigned char c) {
    out += "\\x";
    out += hex[c >> 4];
    out += hex[c & 15];
  };
  std::string out;
  out.reserve(in.size());
  for (size_t i = 0; i < in.size(); ++i) {
    const auto c = static_cast<unsigned char>(in[i]);
    if (c == '\n') out += "\\n";
    else if (c == '\r') out += "\\r";
    else if (c == '\t') out += "\\t";
    else if (c == '\\') out += "\\\\";
    else if (c < 0x20 || c == 0x7f) put_hex(out, c);
    else if (c == 0xc2 && i + 1 < in.size() && static_cast<unsigned char>(in[i + 1]) >= 0x80 &&
             static_cast<unsigned char>(in[i + 1]) <= 0x9f) {  // U+0080..U+009F, the C1 controls
      put_hex(out, c);
      put_hex(out, static_cast<unsigned char>(in[++i]));
    } else {
      out += char(c);
    }
  }
  return out;
}

}  // namespace headroom
