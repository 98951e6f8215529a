// libFuzzer target for head-map JSON: any bytes in, either a map whose every head has an entry and whose
// parameters lie in their ranges, or a headroom::Error with one line — never a crash or undefined behaviour.
#include <cstdint>
#include <cstdlib>
#include <string>

#include "kv/head_map.h"
#include "util/error.h"
#include "util/parse.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  try {
    headroom::HeadMap m = headroom::HeadMap::parse(text, "fuzz.json", nullptr);
    if (m.heads.size() != size_t(m.n_layer()) * m.n_head_kv()) std::abort();
    for (const headroom::HeadEntry& e : m.heads)
      if (e.spec.window < 1 || e.spec.window > headroom::kMaxContext || e.spec.budget < 1 || e.spec.sinks < 0 ||
          e.spec.topk_pages < 1 || e.spec.recent_pages < 1)
        std::abort();
    (void)m.to_json();
  } catch (const headroom::Error& e) {
    if (std::string(e.what()).find('\n') != std::string::npos) std::abort();
  }
  return 0;
}
