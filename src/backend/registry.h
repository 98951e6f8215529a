// Picks a backend by name: "cpu", "cuda" or "auto" (CUDA when a usable GPU is present, else the CPU).
#pragma once

#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "backend/backend.h"
#include "backend/comm.h"

namespace headroom {

// threads: the CPU backend's thread count (<= 0: one per physical core); ignored by CUDA.
// Throws Error (one line) for an unknown name, or "cuda" when CUDA is not compiled in or no GPU is usable.
std::unique_ptr<Backend> make_backend(std::string_view device, int threads);

// The backends of `tp` tensor-parallel ranks on `device` ("cpu", "cuda", "auto"): CPU ranks share `threads`
// (<= 0: the physical cores) evenly; CUDA ranks take GPUs 0 .. tp-1. Throws Error (one line) when there are
// fewer GPUs than ranks. HEADROOM_TP_COMM=threads (a test mode) lets CUDA ranks share GPUs: rank r on GPU
// r % count. `note` (if given) gets one line saying what was made.
std::vector<std::unique_ptr<Backend>> make_rank_backends(std::string_view device, int threads, int tp,
                                                         std::string* note = nullptr);
// GPUs present (0 without CUDA).
int cuda_gpus();

// The communicators of a tensor-parallel group over `ranks` (one each, in rank order), by HEADROOM_TP_COMM:
//   unset / "auto": none for one rank; NCCL when the ranks are CUDA backends; else the in-process group;
//   "threads": the in-process group (any backend; device memory is staged through the host);
//   "nccl": NCCL, even for one rank (its world-size-1 check).
// Throws Error (one line) when NCCL is asked for and cannot be had.
std::vector<std::unique_ptr<Communicator>> make_comm_group(const std::vector<Backend*>& ranks);
// Which implementation make_comm_group picks for these ranks: "none", "threads" or "nccl".
std::string comm_kind(const std::vector<Backend*>& ranks);

// True when this build has the CUDA backend.
bool cuda_compiled();
// "" when make_backend("cuda") would work, otherwise why not (one line: not compiled in / no GPU / ...).
std::string cuda_unavailable();
// One line for the user: which backend "auto" (or the given device) picks and why, e.g.
// "device: cuda (NVIDIA H200, 132 SMs, 139.8 GiB)" or "device: cpu (CUDA: no CUDA device)".
std::string describe_device_choice(std::string_view device);

}  // namespace headroom
