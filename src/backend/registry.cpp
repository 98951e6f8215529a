#include "backend/registry.h"

#include <algorithm>
#include <cstdlib>

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

namespace {
void check_device_name(std::string_view device) {
  if (device != "cpu" && device != "cuda" && device != "auto")
    fail("--device '{}' is not a device headroom knows (choose cpu, cuda, auto)", device);
}
}  // namespace

std::unique_ptr<Backend> make_backend(std::string_view device, int threads) {
  check_device_name(device);
  if (device == "cpu") return make_cpu_backend(threads);
  if (device == "cuda" || device == "auto") {
    const std::string why = cuda_unavailable();
    if (why.empty()) {
#if defined(HEADROOM_HAVE_CUDA)
      return make_cuda_backend();
#endif
    }
    if (device == "auto") return make_cpu_backend(threads);
  }
  fail("--device cuda: {}", cuda_unavailable());
}

int cuda_gpus() {
#if defined(HEADROOM_HAVE_CUDA)
  return cuda_unavailable().empty() ? cuda_device_count() : 0;
#else
  return 0;
#endif
}

namespace {
std::string tp_comm_env() {
  const char* e = std::getenv("HEADROOM_TP_COMM");
  const std::string v = e ? e : "";
  if (!v.empty() && v != "auto" && v != "threads" && v != "nccl")
    fail("HEADROOM_TP_COMM={:?} is not one of auto, threads, nccl", v);
  return v.empty() ? "auto" : v;
}
}  // namespace

std::vector<std::unique_ptr<Backend>> make_rank_backends(std::string_view device, int threads, int tp,
                                                         std::string* note) {
  std::vector<std::unique_ptr<Backend>> out;
  if (tp < 1) fail("--tensor-parallel {}: at least one rank", tp);
  if (tp == 1) {
    out.push_back(make_backend(device, threads));
    return out;
  }
  check_device_name(device);
  const std::string no_cuda = cuda_unavailable();
  if (device == "cuda" && !no_cuda.empty()) fail("--device cuda: {}", no_cuda);
  if (device == "cpu" || !no_cuda.empty()) {  // (auto without a usable GPU: the CPU)
    const int total = threads > 0 ? threads : make_cpu_backend(0)->threads();
    const int each = std::max(1, total / tp);
    for (int r = 0; r < tp; ++r) out.push_back(make_cpu_backend(each));
    if (note)
      *note = fmt::format("tensor parallel: {} CPU ranks (threads joined in-process) of {} thread{} each", tp, each,
                          each == 1 ? "" : "s");
    return out;
  }
#if defined(HEADROOM_HAVE_CUDA)
  const int gpus = cuda_device_count();
  const bool shared = tp_comm_env() == "threads";
  if (tp > gpus && !shared)
    fail("--tensor-parallel {} needs {} GPUs; this machine has {}", tp, tp, gpus);
  for (int r = 0; r < tp; ++r) out.push_back(make_cuda_backend(r % gpus));
  if (note)
    *note = shared ? fmt::format("tensor parallel: {} CUDA ranks on {} GPU{} joined in-process through the host "
                                 "(HEADROOM_TP_COMM=threads, a test mode)", tp, std::min(tp, gpus), gpus == 1 ? "" : "s")
                   : fmt::format("tensor parallel: {} CUDA ranks on GPUs 0-{} joined by NCCL {}", tp, tp - 1,
                                 nccl_version());
#endif
  return out;
}

std::string comm_kind(const std::vector<Backend*>& ranks) {
  const std::string env = tp_comm_env();
  if (env == "threads") return ranks.size() > 1 ? "threads" : "none";
  if (env == "nccl") return "nccl";
  if (ranks.size() <= 1) return "none";
  for (Backend* b : ranks)
    if (std::string_view(b->name()) != "cuda") return "threads";
  return "nccl";
}

std::vector<std::unique_ptr<Communicator>> make_comm_group(const std::vector<Backend*>& ranks) {
  const std::string kind = comm_kind(ranks);
  if (kind == "none") return {};
  if (kind == "threads") return make_in_process_group(int(ranks.size()));
#if defined(HEADROOM_HAVE_CUDA)
  for (Backend* b : ranks)
    if (std::string_view(b->name()) != "cuda")
      fail("HEADROOM_TP_COMM=nccl: the ranks must be CUDA backends, not {}", b->name());
  return make_nccl_group(ranks);
#else
  fail("HEADROOM_TP_COMM=nccl: this build has no CUDA backend");
#endif
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
