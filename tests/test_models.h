// The bundled long-context model and a CPU backend, loaded once per test binary.
#pragma once

#include <memory>

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

}  // namespace headroom::test
