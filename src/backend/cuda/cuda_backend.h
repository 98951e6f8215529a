// CUDA backend (NVIDIA GPUs; built for Hopper, sm_90a). Only compiled when HEADROOM_HAVE_CUDA is defined;
// use backend/registry.h to pick a backend by name.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include <cuda_runtime.h>

#include "backend/backend.h"
#include "backend/comm.h"

namespace headroom {

// "" when a CUDA device can be used, otherwise why not (one line).
std::string cuda_unavailable_reason();
// "NVIDIA H200 (132 SMs, 139.8 GiB)" for device 0, or "" when there is none.
std::string cuda_device_description();
// GPUs present (0 when none or the driver cannot be asked).
int cuda_device_count();
// A backend on GPU `device` (every op binds it on the calling thread). Throws Error (one line) when no
// device can be used.
std::unique_ptr<Backend> make_cuda_backend(int device = 0);
// The stream every op of a CUDA backend runs on (benchmarks time and capture on it). Throws for others.
cudaStream_t cuda_stream(Backend& be);
// The GPU a CUDA backend runs on. Throws for others.
int cuda_device(Backend& be);

// NCCL (nccl_comm.cpp, opened at run time): one communicator per rank over the ranks' GPUs (one each).
// Throws Error (one line) when NCCL cannot be loaded or initialised.
std::vector<std::unique_ptr<Communicator>> make_nccl_group(const std::vector<Backend*>& ranks);
// "2.21.5" (loads NCCL; throws like make_nccl_group).
std::string nccl_version();

}  // namespace headroom
