// The bundled long-context model and a CPU backend, loaded once per test binary.
#pragma once

#include <cstdint>
#include <fstream>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "model/model.h"
#include "test_util.h"

namespace headroom::test {

inline const Model& retrieval_model() {
  static std::unique_ptr<Model> m = Model::load(shared("models/retrieval-14m-q8_0.gguf"));
  return *m;
}
inline Backend& cpu_backend() {
  static std::unique_ptr<Backend> be = make_cpu_backend(2);
  return *be;
}

// The first n tokens (BOS first) of the haystack corpus under the long-context model's tokenizer.
inline std::vector<int32_t> haystack_ids(int n) {
  static const std::vector<int32_t> ids = [] {
    std::ifstream f(shared("corpus/haystack.txt"));
    std::string text(40000, '\0');
    f.read(text.data(), std::streamsize(text.size()));
    text.resize(size_t(f.gcount()));
    return retrieval_model().tokenizer().encode(text, true);
  }();
  if (ids.size() < size_t(n)) throw std::runtime_error("the haystack corpus is shorter than " + std::to_string(n) + " tokens");
  return {ids.begin(), ids.begin() + n};
}

}  // namespace headroom::test
