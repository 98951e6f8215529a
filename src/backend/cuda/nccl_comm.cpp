// NCCL communicators for tensor parallelism across the GPUs of one host (docs/tensor-parallel.md).
//
// NCCL is opened at run time (dlopen), as cuBLAS is: a CUDA build then needs no NCCL to compile or to run
// on one GPU, and a machine that has it (a system package, or the copy PyTorch installs) is found by
// HEADROOM_NCCL_LIB (a path), then libnccl.so.2 on the loader's path. The few entry points used are declared
// here from NCCL's stable C ABI (nccl.h, 2.x), as vLLM's pynccl wrapper does.
//
// One process drives every rank (one thread per rank), so the group is made with ncclCommInitAll. NVLink
// multicast (NVLS) is turned off before NCCL initialises: on shared hosts it can take GPUs out of service.
#include <cstdlib>
#include <string>

#include "backend/comm.h"
#include "backend/cuda/cuda_backend.h"
#include "backend/cuda/runtime_lib.h"
#include "util/error.h"

namespace headroom {

namespace {

// From nccl.h (NCCL 2.x ABI).
using ncclComm_t = struct ncclComm*;
using ncclResult_t = int;  // 0: ncclSuccess
constexpr int kNcclFloat32 = 7;
constexpr int kNcclSum = 0;

struct Nccl {
  ncclResult_t (*comm_init_all)(ncclComm_t*, int, const int*) = nullptr;
  ncclResult_t (*comm_destroy)(ncclComm_t) = nullptr;
  ncclResult_t (*all_reduce)(const void*, void*, size_t, int, int, ncclComm_t, cudaStream_t) = nullptr;
  ncclResult_t (*get_version)(int*) = nullptr;
  const char* (*error_string)(ncclResult_t) = nullptr;
  int version = 0;
};

const Nccl& nccl() {
  static const Nccl n = [] {
    Nccl r;
    const char* env = std::getenv("HEADROOM_NCCL_LIB");
    const std::string name = env && *env ? env : "libnccl.so.2";
    const std::string why = "tensor parallel on CUDA needs NCCL, and " + name +
                            " cannot be loaded; set HEADROOM_NCCL_LIB to the path of libnccl.so.2";
    const cuda::RuntimeLib lib = env && *env ? cuda::RuntimeLib::open({name}, why)
                                             : cuda::RuntimeLib::open({name, "libnccl.so"}, why);
    const char* who = "tensor parallel";
    lib.bind(r.comm_init_all, "ncclCommInitAll", who);
    lib.bind(r.comm_destroy, "ncclCommDestroy", who);
    lib.bind(r.all_reduce, "ncclAllReduce", who);
    lib.bind(r.get_version, "ncclGetVersion", who);
    lib.bind(r.error_string, "ncclGetErrorString", who);
    if (r.get_version(&r.version) != 0) fail("tensor parallel: ncclGetVersion failed");
    if (r.version < 20900)  // graphs capture NCCL collectives from 2.9 on
      fail("tensor parallel: NCCL {} is too old (2.9 or later is needed)", r.version);
    return r;  // the library stays loaded for the process
  }();
  return n;
}

void check(ncclResult_t e, const char* op) {
  if (e != 0) fail("tensor parallel: {}: NCCL error {} ({})", op, e, nccl().error_string(e));
}

// The communicators of one group share their lifetime: the last one destroys them all.
struct Group {
  std::vector<ncclComm_t> comms;
  ~Group() {
    for (ncclComm_t c : comms)
      if (c) nccl().comm_destroy(c);
  }
};

class NcclComm final : public Communicator {
 public:
  NcclComm(std::shared_ptr<Group> g, int rank) : g_(std::move(g)), rank_(rank) {}
  int rank() const override { return rank_; }
  int world() const override { return int(g_->comms.size()); }
  bool capturable() const override { return true; }
  // Enqueued on the backend's stream after the ops that wrote buf (no host synchronisation; graphs capture it).
  void all_reduce_sum(Backend& be, float* buf, int64_t count) override {
    check(nccl().all_reduce(buf, buf, size_t(count), kNcclFloat32, kNcclSum, g_->comms[size_t(rank_)], cuda_stream(be)),
          "all_reduce");
  }

 private:
  std::shared_ptr<Group> g_;
  int rank_;
};

}  // namespace

std::string nccl_version() {
  const int v = nccl().version;
  return fmt::format("{}.{}.{}", v / 10000, v / 100 % 100, v % 100);
}

std::vector<std::unique_ptr<Communicator>> make_nccl_group(const std::vector<Backend*>& ranks) {
  if (ranks.empty()) fail("a communicator group needs at least one rank");
  std::vector<int> devices;
  for (Backend* b : ranks) {
    const int d = cuda_device(*b);
    for (int seen : devices)
      if (seen == d) fail("tensor parallel over NCCL: two ranks on GPU {} (NCCL needs one GPU per rank)", d);
    devices.push_back(d);
  }
  setenv("NCCL_NVLS_ENABLE", "0", 1);  // no NVLink multicast (see the top of this file)
  auto g = std::make_shared<Group>();
  g->comms.resize(ranks.size(), nullptr);
  int current = 0;
  cudaGetDevice(&current);
  const ncclResult_t e = nccl().comm_init_all(g->comms.data(), int(ranks.size()), devices.data());
  cudaSetDevice(current);  // NCCL's init may leave another device current on this thread
  check(e, "init");
  std::vector<std::unique_ptr<Communicator>> out;
  for (int r = 0; r < int(ranks.size()); ++r) out.push_back(std::make_unique<NcclComm>(g, r));
  return out;
}

}  // namespace headroom
