// Picks a backend by name: "cpu", "cuda" or "auto" (CUDA when a usable GPU is present, else the CPU).
#pragma once

#include <memory>
#include <string>
#include <string_view>

#include "backend/backend.h"

namespace headroom {

// threads: the CPU backend's thread count (<= 0: one per physical core); ignored by CUDA.
// Throws Error (one line) for an unknown name, or "cuda" when CUDA is not compiled in or no GPU is usable.
std::unique_ptr<Backend> make_backend(std::string_view device, int threads);

// True when this build has the CUDA backend.
bool cuda_compiled();
// "" when make_backend("cuda") would work, otherwise why not (one line: not compiled in / no GPU / ...).
std::string cuda_unavailable();
// One line for the user: which backend "auto" (or the given device) picks and why, e.g.
// "device: cuda (NVIDIA H200, 132 SMs, 139.8 GiB)" or "device: cpu (CUDA: no CUDA device)".
std::string describe_device_choice(std::string_view device);

}  // namespace headroom
