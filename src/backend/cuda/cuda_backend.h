// CUDA backend (NVIDIA GPUs; built for Hopper, sm_90a). Only compiled when HEADROOM_HAVE_CUDA is defined;
// use backend/registry.h to pick a backend by name.
#pragma once

#include <memory>
#include <string>

#include <cuda_runtime.h>

#include "backend/backend.h"

namespace headroom {

// "" when a CUDA device can be used, otherwise why not (one line).
std::string cuda_unavailable_reason();
// "NVIDIA H200 (132 SMs, 139.8 GiB)" for device 0, or "" when there is none.
std::string cuda_device_description();
// Throws Error (one line) when no device can be used.
std::unique_ptr<Backend> make_cuda_backend();
// The stream every op of a CUDA backend runs on (benchmarks time and capture on it). Throws for others.
cudaStream_t cuda_stream(Backend& be);

}  // namespace headroom
