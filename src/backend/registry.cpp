#include "backend/registry.h"

#include "util/error.h"

#if defined(HEADROOM_HAVE_CUDA)
#include "backend/cuda/cuda_backend.h"
#endif

namespace headroom {

bool cuda_compiled() {
#if defined(HEADROOM_HAVE_CUDA)
  return true;
#else
  return false;
#endif
}

std::string cuda_unavailable() {
#if defined(HEADROOM_HAVE_CUDA)
  return cuda_unavailable_reason();
#else
  return "this build has no CUDA backend (configure with -DHEADROOM_CUDA=ON where nvcc is installed)";
#endif
}

std::unique_ptr<Backend> make_backend(std::string_view device, int threads) {
  if (device == "cpu") return make_cpu_backend(threads);
  if (device == "cuda" || device == "auto") {
    const std::string why = cuda_unavailable();
    if (why.empty()) {
#if defined(HEADROOM_HAVE_CUDA)
      return make_cuda_backend();
#endif
    }
    if (device == "auto") return make_cpu_backend(threads);
    fail("--device cuda: {}", why);
  }
  fail("--device '{}' is not a device headroom knows (choose cpu, cuda, auto)", device);
}

std::string describe_device_choice(std::string_view device) {
  if (device == "cpu") return "device: cpu";
  const std::string why = cuda_unavailable();
#if defined(HEADROOM_HAVE_CUDA)
  if (why.empty()) return "device: cuda (" + cuda_device_description() + ")";
#endif
  return "device: cpu (CUDA: " + why + ")";
}

}  // namespace headroom
