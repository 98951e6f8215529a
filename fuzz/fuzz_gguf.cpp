// libFuzzer target for the GGUF reader: any bytes in, either a parsed file whose tensors lie inside the input
// or a headroom::Error — never a crash, a leak or undefined behaviour (run under ASan + UBSan).
#include <cstdint>
#include <cstdlib>

#include "gguf/gguf.h"
#include "util/error.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  try {
    auto f = headroom::gguf::File::parse(data, size, "fuzz.gguf");
    for (const auto& t : f->tensors()) {
      if (t.data < data || t.data + t.n_bytes > data + size) std::abort();
      if (t.n_bytes) (void)t.data[t.n_bytes - 1];  // ASan checks the last byte is inside the input
    }
    for (const auto& [k, v] : f->metadata()) (void)v.to_string();
  } catch (const headroom::Error&) {
  }
  return 0;
}
