// Helpers shared by the test files.
#pragma once

#include <cctype>
#include <filesystem>
#include <string>
#include <vector>

#include "model/config.h"

namespace headroom::test {

// The attention shape of a model (what the KV cache and its policies read), set by hand.
inline ModelConfig attention_shape(int layers, int heads, int kv_heads, int head_dim) {
  ModelConfig c;
  c.n_layer = layers;
  c.n_head = heads;
  c.n_head_kv = kv_heads;
  c.head_dim = head_dim;
  return c;
}

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


// The golden files of the bundled models (../shared/golden), one per model: parameters of the model-wide tests.
inline const std::vector<std::string>& golden_files() {
  static const std::vector<std::string> files = {
      "stories260K.json",          "tinystories-656k-q8_0.json", "retrieval-14m-q8_0.json",
      "rand-llama-f16.json",       "rand-llama-linear-f16.json", "rand-llama-tied-f32.json",
      "rand-llama3-ropefreqs-q8_0.json", "rand-qwen2-bias-bf16.json"};
  return files;
}
// A test name from a golden file's name ("rand-llama-f16.json" -> "rand_llama_f16").
template <class Info>
std::string golden_test_name(const Info& info) {
  std::string n = info.param.substr(0, info.param.size() - 5);
  for (char& ch : n)
    if (!std::isalnum(static_cast<unsigned char>(ch))) ch = '_';
  return n;
}

}  // namespace headroom::test
