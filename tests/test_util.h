// Helpers shared by the test files.
#pragma once

#include <filesystem>
#include <string>

namespace headroom::test {

inline std::string shared_dir() {
  if (const char* e = std::getenv("HEADROOM_SHARED_DIR")) return e;
  return HEADROOM_SHARED_DIR;
}
inline std::string shared(const std::string& rel) { return shared_dir() + "/" + rel; }
inline std::string headroom_bin() { return HEADROOM_BIN; }

// A scratch directory under the build tree's temp area, created on demand.
inline std::string scratch_dir(const std::string& name) {
  auto p = std::filesystem::temp_directory_path() / ("headroom-test-" + name);
  std::filesystem::create_directories(p);
  return p.string();
}

}  // namespace headroom::test
