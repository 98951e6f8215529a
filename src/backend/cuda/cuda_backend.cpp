// CUDA backend: the Backend implementation (host side). Kernels live in kernels.cu, matmul.cu and
// attention.cu; this file validates arguments, owns the memory and launches them on one stream.
//
// Memory. Weights are uploaded once (upload_weight copies to the device; Q8_0 is repacked into int8 values
// + fp16 scales, Q4_0/Q4_K/Q6_K are dequantized and stored as F16); activations and step tables are
// cudaMalloc'd; every op is queued on one stream (upload is cudaMemcpyAsync, download waits). The KV store's
// device tier is device memory; its host tier is pinned, mapped host memory, which attention reads in place;
// page copies between tiers are cudaMemcpyAsync on the same stream (ordered with the ops).
//
// Errors. Every CUDA call is checked and a failure throws Error naming the op. Kernels that meet bad
// indices in device memory (token ids, slots, page ids) skip the item and set a bit in a device error word,
// which download() and synchronize() read: the Error then names the op that met it. With the environment
// variable HEADROOM_CUDA_SYNC=1 every op synchronizes and checks at once (slow; for finding a failing op).
//
// Precision. Decode matmuls: n = 2..32 (Q8_0: 2..64) run the tensor-core skinny GEMM (F16/BF16: activations split
// into 2-3 half-precision terms, ~22 bits kept; Q8_0: int8 mma), n = 1, F32 weights and odd shapes the GEMV
// kernels in float (Q8_0: int8, activations quantized as on the CPU); both batch invariant within their range.
// Prefill matmuls (larger n) use cuBLAS with float
// accumulation on half-precision inputs: the activations are rounded to F16 (BF16 for BF16 weights) and
// Q8_0 weight tiles are dequantized to F16, so prefill rows differ from decode rows by that rounding.
#include "backend/cuda/cuda_backend.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <map>
#include <unordered_map>
#include <vector>

#include <cublas_v2.h>

#include "backend/cpu/quant.h"
#include "backend/cuda/kernels.h"
#include "backend/cuda/runtime_lib.h"
#include "util/error.h"

namespace headroom {

namespace {

using cuda::KVDev;
using cuda::WT;

void check(cudaError_t e, const char* op) {
  if (e != cudaSuccess) {
    cudaGetLastError();  // clear a non-sticky error
    fail("cuda backend: {}: {} ({})", op, cudaGetErrorString(e), cudaGetErrorName(e));
  }
}

// cuBLAS, opened when the first CUDA backend is made (dlopen): linking it would map ~200 MB into every
// process of a CUDA build (the CLI and the tests too), whether or not it ever uses the GPU.
struct Blas {
  cublasStatus_t (*create)(cublasHandle_t*) = nullptr;
  cublasStatus_t (*destroy)(cublasHandle_t) = nullptr;
  cublasStatus_t (*set_stream)(cublasHandle_t, cudaStream_t) = nullptr;
  cublasStatus_t (*sgemm)(cublasHandle_t, cublasOperation_t, cublasOperation_t, int, int, int, const float*,
                          const float*, int, const float*, int, const float*, float*, int) = nullptr;
  cublasStatus_t (*gemm_ex)(cublasHandle_t, cublasOperation_t, cublasOperation_t, int, int, int, const void*,
                            const void*, cudaDataType, int, const void*, cudaDataType, int, const void*, void*,
                            cudaDataType, int, cublasComputeType_t, cublasGemmAlgo_t) = nullptr;
  const char* (*status_string)(cublasStatus_t) = nullptr;
};

const Blas& blas() {
  static const Blas b = [] {
    Blas r;
    const std::string versioned = "libcublas.so." + std::to_string(CUBLAS_VER_MAJOR);
    const cuda::RuntimeLib lib =
        cuda::RuntimeLib::open({versioned, "libcublas.so"}, "cuda backend: cannot load cuBLAS (" + versioned + ")");
    const char* who = "cuda backend";
    lib.bind(r.create, "cublasCreate_v2", who);
    lib.bind(r.destroy, "cublasDestroy_v2", who);
    lib.bind(r.set_stream, "cublasSetStream_v2", who);
    lib.bind(r.sgemm, "cublasSgemm_v2", who);
    lib.bind(r.gemm_ex, "cublasGemmEx", who);
    lib.bind(r.status_string, "cublasGetStatusString", who);
    return r;  // the library stays loaded for the process
  }();
  return b;
}

void check_blas(cublasStatus_t st, const char* op) {
  if (st != CUBLAS_STATUS_SUCCESS) fail("cuda backend: {}: cuBLAS error {}", op, blas().status_string(st));
}

std::string mib(size_t bytes) { return fmt::format("{:.1f} MiB", double(bytes) / (1024.0 * 1024.0)); }

// Device memory that only grows (scratch); contents are not kept across growth.
// Bumped whenever scratch memory moves: graphs recorded before then are stale.
uint64_t g_scratch_generation = 1;

struct DevBuf {
  void* p = nullptr;
  size_t n = 0;
  void* ensure(size_t bytes, const char* op) {
    if (bytes <= n && p) return p;
    ++g_scratch_generation;
    const size_t want = std::max<size_t>(std::max(bytes, size_t(256)), n * 2);
    if (p) cudaFree(p);  // synchronizes with the queued work that may still read it
    p = nullptr;
    n = 0;
    check(cudaMalloc(&p, want), op);
    n = want;
    return p;
  }
  ~DevBuf() {
    if (p) cudaFree(p);
  }
};

class CudaKVStore final : public KVStore {
 public:
  CudaKVStore(const KVLayout& l, cudaStream_t s);
  ~CudaKVStore() override;
  KVDev dev;
  int64_t page_kv_bytes = 0;  // K (or V) bytes of one page
  void check_id(int32_t id, const char* op) const {
    if (id < 0 || id >= layout_.total_pages())
      fail("cuda backend: {}: page id {} out of range [0, {})", op, id, layout_.total_pages());
  }
  void check_slot(int64_t slot, const char* op) const {
    const int64_t total = int64_t(layout_.total_pages()) * layout_.page_size;
    if (slot < 0 || slot >= total) fail("cuda backend: {}: slot {} out of range [0, {})", op, slot, total);
  }
  int tier(int32_t id) const { return id >= layout_.device_pages ? 1 : 0; }
  int64_t local(int32_t id) const { return id >= layout_.device_pages ? id - layout_.device_pages : id; }
  uint8_t* k(int32_t id) const { return dev.k[tier(id)] + local(id) * page_kv_bytes; }
  uint8_t* v(int32_t id) const { return dev.v[tier(id)] + local(id) * page_kv_bytes; }
  int32_t* pos(int32_t id) const { return dev.pos[tier(id)] + local(id) * layout_.page_size; }
  float* scores(int32_t id) const {
    return dev.sc[tier(id)] ? dev.sc[tier(id)] + local(id) * layout_.page_size : nullptr;
  }
  float* minmax(int32_t id) const { return dev.minmax ? dev.minmax + int64_t(id) * 2 * layout_.head_dim : nullptr; }

 private:
  std::vector<void*> dev_allocs_, host_allocs_;
};

CudaKVStore::CudaKVStore(const KVLayout& l, cudaStream_t s) : KVStore(l) {
  if (const std::string why = kv_type_fits(l.type, l.head_dim); !why.empty()) fail("cuda backend: {}", why);
  if (l.page_size <= 0 || l.head_dim <= 0 || l.device_pages < 0 || l.host_pages < 0)
    fail("cuda backend: KV store: bad layout (page_size {}, head_dim {}, device pages {}, host pages {})", l.page_size,
         l.head_dim, l.device_pages, l.host_pages);
  if (l.head_dim > 256) fail("cuda backend: KV store: head_dim {} is larger than the 256 the kernels take", l.head_dim);
  const int64_t total = int64_t(l.device_pages) + l.host_pages;
  if (total * l.page_size > std::numeric_limits<int32_t>::max())
    fail("cuda backend: KV store: {} pages of {} tokens exceed the int32 slot numbering", total, l.page_size);
  const int64_t rb = kv_row_bytes(l.type, l.head_dim);
  page_kv_bytes = int64_t(l.page_size) * rb;
  const int64_t P = l.page_size;
  const int64_t tier_pages[2] = {l.device_pages, l.host_pages};
  auto tier_bytes = [&](int t) {
    return 2 * tier_pages[t] * page_kv_bytes + tier_pages[t] * P * 4 * (l.slot_scores ? 2 : 1);
  };
  const int64_t dev_bytes = tier_bytes(0) + (l.page_minmax ? total * 2 * l.head_dim * 4 : 0);
  size_t free_b = 0, total_b = 0;
  check(cudaMemGetInfo(&free_b, &total_b), "KV store");
  if (dev_bytes + (int64_t(256) << 20) > int64_t(free_b))
    fail("cuda backend: KV store: the device tier ({} pages of {} tokens, {}) needs {} but the GPU has {} free",
         l.device_pages, l.page_size, kv_type_name(l.type), mib(size_t(dev_bytes)), mib(free_b));
  auto dalloc = [&](int64_t bytes, const char* what) -> void* {
    if (bytes <= 0) return nullptr;
    void* p = nullptr;
    if (cudaMalloc(&p, size_t(bytes)) != cudaSuccess) {
      cudaGetLastError();
      fail("cuda backend: KV store: cannot allocate {} of device memory for {}", mib(size_t(bytes)), what);
    }
    dev_allocs_.push_back(p);
    return p;
  };
  auto halloc = [&](int64_t bytes, const char* what) -> void* {
    if (bytes <= 0) return nullptr;
    void* p = nullptr;
    if (cudaHostAlloc(&p, size_t(bytes), cudaHostAllocMapped | cudaHostAllocPortable) != cudaSuccess) {
      cudaGetLastError();
      fail("cuda backend: KV store: cannot pin {} of host memory for the host tier's {}", mib(size_t(bytes)), what);
    }
    host_allocs_.push_back(p);
    void* d = nullptr;
    check(cudaHostGetDevicePointer(&d, p, 0), "KV store (host tier)");
    return d;
  };
  try {
    dev.k[0] = static_cast<uint8_t*>(dalloc(tier_pages[0] * page_kv_bytes, "K"));
    dev.v[0] = static_cast<uint8_t*>(dalloc(tier_pages[0] * page_kv_bytes, "V"));
    dev.pos[0] = static_cast<int32_t*>(dalloc(tier_pages[0] * P * 4, "positions"));
    if (l.slot_scores) dev.sc[0] = static_cast<float*>(dalloc(tier_pages[0] * P * 4, "slot scores"));
    dev.k[1] = static_cast<uint8_t*>(halloc(tier_pages[1] * page_kv_bytes, "K"));
    dev.v[1] = static_cast<uint8_t*>(halloc(tier_pages[1] * page_kv_bytes, "V"));
    dev.pos[1] = static_cast<int32_t*>(halloc(tier_pages[1] * P * 4, "positions"));
    if (l.slot_scores) dev.sc[1] = static_cast<float*>(halloc(tier_pages[1] * P * 4, "slot scores"));
    if (l.page_minmax) dev.minmax = static_cast<float*>(dalloc(total * 2 * l.head_dim * 4, "key bounds"));
  } catch (...) {
    for (void* p : dev_allocs_) cudaFree(p);
    for (void* p : host_allocs_) cudaFreeHost(p);
    throw;
  }
  dev.dev_pages = l.device_pages;
  dev.total_pages = int32_t(total);
  dev.page_size = l.page_size;
  dev.head_dim = l.head_dim;
  dev.rb = int(rb);
  dev.type = int(l.type);
  // Every page empty: positions -1 (all bytes 0xFF), scores 0, key bounds +inf / -inf.
  for (int t = 0; t < 2; ++t) {
    if (tier_pages[t] == 0) continue;
    check(cudaMemsetAsync(dev.pos[t], 0xFF, size_t(tier_pages[t] * P * 4), s), "KV store");
    if (dev.sc[t]) check(cudaMemsetAsync(dev.sc[t], 0, size_t(tier_pages[t] * P * 4), s), "KV store");
  }
  if (dev.minmax && total > 0) {
    std::vector<int32_t> ids(static_cast<size_t>(total));
    for (int32_t i = 0; i < int32_t(total); ++i) ids[size_t(i)] = i;
    int32_t* d = nullptr;
    check(cudaMalloc(&d, ids.size() * 4), "KV store");
    check(cudaMemcpy(d, ids.data(), ids.size() * 4, cudaMemcpyHostToDevice), "KV store");
    check(cuda::launch_kv_reset(dev, d, int(total), s), "KV store");
    check(cudaStreamSynchronize(s), "KV store");
    cudaFree(d);
  }
  check(cudaStreamSynchronize(s), "KV store");
}

CudaKVStore::~CudaKVStore() {
  cudaDeviceSynchronize();
  for (void* p : dev_allocs_) cudaFree(p);
  for (void* p : host_allocs_) cudaFreeHost(p);
}

DType dtype_of(KVType t) {
  switch (t) {
    case KVType::F32: return DType::F32;
    case KVType::F16: return DType::F16;
    case KVType::BF16: return DType::BF16;
    case KVType::Q8_0: return DType::Q8_0;
  }
  return DType::F32;
}

class CudaBackend final : public Backend {
  struct Weight {  // a weight's device copy
    void* dev = nullptr;
    WT type = WT::F32;
    int64_t rows = 0, cols = 0;
  };

 public:
  explicit CudaBackend(int device) : device_(device) {
    if (const std::string why = cuda_unavailable_reason(); !why.empty()) fail("cuda backend: {}", why);
    if (device < 0 || device >= cuda_device_count())
      fail("cuda backend: no GPU {} (this machine has {})", device, cuda_device_count());
    bind();
    check(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "init");
    check_blas(blas().create(&blas_), "init");
    check_blas(blas().set_stream(blas_, stream_), "init");
    check(cudaMalloc(&err_dev_, 4), "init");
    check(cudaMemset(err_dev_, 0, 4), "init");
    check(cudaMallocHost(&err_host_, 4), "init");
    *err_host_ = 0;
    const char* e = std::getenv("HEADROOM_CUDA_SYNC");
    sync_each_ = e && *e && std::strcmp(e, "0") != 0;
    const char* g = std::getenv("HEADROOM_CUDA_GRAPHS");
    graphs_on_ = !sync_each_ && !(g && std::strcmp(g, "0") == 0);
  }
  ~CudaBackend() override {
    bind();
    cudaStreamSynchronize(stream_);
    for (auto& [p, w] : weights_) cudaFree(const_cast<void*>(p));
    for (void* p : owned_) cudaFree(p);
    for (auto& [p, n] : allocs_) cudaFree(reinterpret_cast<void*>(p));
    if (blas_) blas().destroy(blas_);
    if (err_dev_) cudaFree(err_dev_);
    if (err_host_) cudaFreeHost(err_host_);
    if (stream_) cudaStreamDestroy(stream_);
  }

  const char* name() const override { return "cuda"; }

  // ---- graphs: the stream's work between graph_begin and graph_end, captured and instantiated ----------
  struct CudaGraph final : StepGraph {
    cudaGraphExec_t exec = nullptr;
    uint64_t generation = 0;
    ~CudaGraph() override {
      if (exec) cudaGraphExecDestroy(exec);
    }
  };
  bool graphs() const override { return graphs_on_; }
  void graph_begin() override {
    bind();
    if (!graphs_on_) fail("cuda backend: graphs are off (HEADROOM_CUDA_GRAPHS=0 or HEADROOM_CUDA_SYNC=1)");
    capture_generation_ = g_scratch_generation;
    check(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeRelaxed), "graph capture");
  }
  std::unique_ptr<StepGraph> graph_end() override {
    bind();
    cudaGraph_t g = nullptr;
    check(cudaStreamEndCapture(stream_, &g), "graph capture");
    auto r = std::make_unique<CudaGraph>();
    const cudaError_t e = cudaGraphInstantiate(&r->exec, g, 0);
    cudaGraphDestroy(g);
    check(e, "graph instantiate");
    // Scratch that moved during the capture (it should not: shapes are run once before) makes it stale.
    r->generation = capture_generation_ == g_scratch_generation ? capture_generation_ : 0;
    return r;
  }
  bool graph_launch(StepGraph& sg) override {
    bind();
    auto* g = dynamic_cast<CudaGraph*>(&sg);
    if (!g) fail("cuda backend: a graph of another backend");
    if (g->generation != g_scratch_generation) return false;
    after(cudaGraphLaunch(g->exec, stream_), "graph launch");
    return true;
  }
  int threads() const override { return 1; }
  cudaStream_t stream() const { return stream_; }
  int device() const { return device_; }

  // ---- matmul -------------------------------------------------------------------------------------------
  static int64_t env_rows(const char* name, int64_t dflt) {
    const char* v = std::getenv(name);
    return v && *v ? std::strtoll(v, nullptr, 10) : dflt;
  }
  void matmul(const WeightView& w, const float* x, int64_t n, float* y) override {
    bind();
    const Weight& W = weight(w, "matmul");
    if (n < 0) fail("cuda backend: matmul: negative row count {}", n);
    if (n == 0) return;
    const int64_t rows = W.rows, cols = W.cols;
    // The tensor-core skinny GEMM takes n = 2..32 (Q8_0: 2..64), chosen by measurement on the H200: n = 1 is
    // faster on the GEMV (3590 vs 2159 GB/s on 4096x4096 F16), F16/BF16 n > 32 faster on cuBLAS (2653 vs 943
    // GB/s at n = 64), Q8_0 n = 33..64 faster on the skinny kernel (532 vs 312). Rows inside the range are batch
    // invariant among themselves; n = 1 (GEMV) differs from them by rounding. HEADROOM_CUDA_SKINNY_MIN/MAX move
    // the range (for measurements).
    if (skinny_takes(W, x, n)) {
      void* scr = xq_.ensure(cuda::skinny_scratch_bytes(W.type, rows, cols, n), "matmul");
      after(cuda::launch_skinny(W.type, W.dev, rows, cols, x, n, y, scr, stream_), "matmul");
      return;
    }
    if (n <= cuda::kGemvMaxRows) {
      const Q8Scratch q = q8_scratch(W, n, "matmul");
      after(cuda::launch_gemv(W.type, W.dev, rows, cols, x, n, y, q.xq, q.xd, stream_), "matmul");
      return;
    }
    const float one = 1.0f, zero = 0.0f;
    if (W.type == WT::F32) {
      check_blas(blas().sgemm(blas_, CUBLAS_OP_T, CUBLAS_OP_N, int(rows), int(n), int(cols), &one,
                             static_cast<const float*>(W.dev), int(cols), x, int(cols), &zero, y, int(rows)),
                 "matmul (cublasSgemm)");
      after(cudaGetLastError(), "matmul");
      return;
    }
    void* xh = xh_.ensure(size_t(n * cols) * 2, "matmul");
    const bool bf = W.type == WT::BF16;
    after(bf ? cuda::launch_f32_to_bf16(x, xh, n * cols, stream_) : cuda::launch_f32_to_f16(x, xh, n * cols, stream_),
          "matmul");
    const cudaDataType_t ht = bf ? CUDA_R_16BF : CUDA_R_16F;
    if (W.type == WT::F16 || W.type == WT::BF16) {
      check_blas(blas().gemm_ex(blas_, CUBLAS_OP_T, CUBLAS_OP_N, int(rows), int(n), int(cols), &one, W.dev, ht, int(cols),
                              xh, ht, int(cols), &zero, y, CUDA_R_32F, int(rows), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
                 "matmul (cublasGemmEx)");
      after(cudaGetLastError(), "matmul");
      return;
    }
    // Q8_0: dequantize tiles of weight rows to F16, then cuBLAS.
    const int64_t tile = std::clamp<int64_t>((int64_t(64) << 20) / cols, 256, rows);
    void* wt = wtile_.ensure(size_t(tile * cols) * 2, "matmul");
    for (int64_t r0 = 0; r0 < rows; r0 += tile) {
      const int64_t nr = std::min(tile, rows - r0);
      after(cuda::launch_q8_to_f16(W.dev, rows, cols, r0, nr, wt, stream_), "matmul");
      check_blas(blas().gemm_ex(blas_, CUBLAS_OP_T, CUBLAS_OP_N, int(nr), int(n), int(cols), &one, wt, CUDA_R_16F, int(cols),
                              xh, CUDA_R_16F, int(cols), &zero, y + r0, CUDA_R_32F, int(rows), CUBLAS_COMPUTE_32F,
                              CUBLAS_GEMM_DEFAULT),
                 "matmul (cublasGemmEx, q8_0)");
    }
    after(cudaGetLastError(), "matmul");
  }

  // Whether matmul runs the skinny GEMM for this call (else n <= kGemvMaxRows runs the GEMV).
  static bool skinny_takes(const Weight& W, const float* x, int64_t n) {
    static const int64_t sk_min = env_rows("HEADROOM_CUDA_SKINNY_MIN", 2);
    static const int64_t sk_max_env = env_rows("HEADROOM_CUDA_SKINNY_MAX", -1);
    const int64_t sk_max = std::min<int64_t>(sk_max_env >= 0 ? sk_max_env : W.type == WT::Q8_0 ? 64 : 32, cuda::kSkinnyMaxRows);
    return n >= sk_min && n <= sk_max && cuda::skinny_takes(W.type, W.cols, n, x);
  }
  // Scratch for n activation rows quantized to Q8_0 (Q8_0 weights; null otherwise).
  struct Q8Scratch {
    int8_t* xq = nullptr;
    float* xd = nullptr;
  };
  Q8Scratch q8_scratch(const Weight& W, int64_t n, const char* op) {
    if (W.type != WT::Q8_0) return {};
    const size_t nc = size_t(n * W.cols);
    auto* base = static_cast<uint8_t*>(xq_.ensure(nc + nc / 32 * 4 + 256, op));
    return {reinterpret_cast<int8_t*>(base), reinterpret_cast<float*>(base + ((nc + 255) & ~size_t(255)))};
  }
  // Whether the fused GEMVs take a call: one activation row that matmul would give the GEMV's vector kernel.
  static bool fused_gemv_takes(const Weight& W, const float* x, int64_t n) {
    return n == 1 && !skinny_takes(W, x, n) && cuda::gemv_fits(W.type, W.cols, x);
  }

  // ---- fused ops (backend.h): one launch where the composed ops take several; the same bits -------------
  void matmul_group(std::span<const MatmulPart> parts, const float* x, int64_t n) override {
    bind();
    if (parts.empty()) return;
    const Weight& W0 = weight(parts[0].w, "matmul_group");
    bool one_launch = parts.size() <= size_t(cuda::kGemvGroupMax) && fused_gemv_takes(W0, x, n);
    cuda::GemvPart gp[cuda::kGemvGroupMax];
    for (size_t i = 0; i < parts.size() && one_launch; ++i) {
      const Weight& W = weight(parts[i].w, "matmul_group");
      one_launch = W.type == W0.type && W.cols == W0.cols;
      gp[i] = {W.dev, W.rows, parts[i].y};
    }
    if (!one_launch) return Backend::matmul_group(parts, x, n);
    const Q8Scratch q = q8_scratch(W0, n, "matmul_group");
    after(cuda::launch_gemv_group(W0.type, gp, int(parts.size()), W0.cols, x, q.xq, q.xd, stream_), "matmul_group");
  }

  void matmul_swiglu(const WeightView& gate, const WeightView& up, const float* x, int64_t n, float* out,
                     float* up_out) override {
    bind();
    const Weight& G = weight(gate, "matmul_swiglu");
    const Weight& U = weight(up, "matmul_swiglu");
    if (G.type != U.type || G.rows != U.rows || G.cols != U.cols || !fused_gemv_takes(G, x, n))
      return Backend::matmul_swiglu(gate, up, x, n, out, up_out);
    const Q8Scratch q = q8_scratch(G, n, "matmul_swiglu");
    after(cuda::launch_gemv_swiglu(G.type, G.dev, U.dev, G.rows, G.cols, x, out, q.xq, q.xd, stream_), "matmul_swiglu");
  }

  void add_rmsnorm(float* x, const float* y, const float* weight, int64_t n, int64_t dim, float eps, float* out) override {
    bind();
    if (n < 0 || dim <= 0) fail("cuda backend: add_rmsnorm: bad shape {} x {}", n, dim);
    after(cuda::launch_add_rmsnorm(x, y, weight, n, dim, eps, out, stream_), "add_rmsnorm");
  }

  void rope_store(KVStore& kv, const AttnRows& r, const int32_t* slots, const RopeParams& p) override {
    bind();
    CudaKVStore& st = store(kv);
    if (r.n < 0 || r.n_head <= 0 || r.n_kv_heads <= 0 || r.head_dim != st.layout().head_dim)
      fail("cuda backend: rope_store: bad shape ({} rows, {} + {} heads of {} for a store of head_dim {})", r.n, r.n_head,
           r.n_kv_heads, r.head_dim, st.layout().head_dim);
    check_rope(p, r.head_dim, "rope_store");
    after(cuda::launch_rope_store(st.dev, r.q, r.k, r.v, r.n, r.n_head, r.n_kv_heads, r.pos, slots, p.n_rot, p.neox,
                                  rope_theta_scale(p), p.freq_scale, p.freq_factors, err_dev_, stream_),
          "rope_store");
  }

  void embed(const WeightView& w, const int32_t* ids, int64_t n, float* out) override {
    bind();
    const Weight& W = weight(w, "embed");
    if (n < 0) fail("cuda backend: embed: negative count {}", n);
    after(cuda::launch_embed(W.type, W.dev, W.rows, W.cols, ids, n, out, err_dev_, stream_), "embed");
  }

  void rmsnorm(const float* x, const float* weight, int64_t n, int64_t dim, float eps, float* out) override {
    bind();
    if (n < 0 || dim <= 0) fail("cuda backend: rmsnorm: bad shape {} x {}", n, dim);
    after(cuda::launch_rmsnorm(x, weight, n, dim, eps, out, stream_), "rmsnorm");
  }

  void rope(float* x, int64_t n, int64_t n_heads, int64_t head_dim, const int32_t* pos, const RopeParams& p) override {
    bind();
    if (n < 0 || n_heads <= 0 || head_dim <= 0) fail("cuda backend: rope: bad shape {} x {} x {}", n, n_heads, head_dim);
    check_rope(p, head_dim, "rope");
    after(cuda::launch_rope(x, n, n_heads, head_dim, pos, p.n_rot, p.neox, rope_theta_scale(p), p.freq_scale,
                            p.freq_factors, stream_),
          "rope");
  }
  static void check_rope(const RopeParams& p, int64_t head_dim, const char* op) {
    if (p.n_rot <= 0 || p.n_rot % 2 != 0 || p.n_rot > head_dim)
      fail("cuda backend: {}: n_rot {} must be even and in (0, head_dim {}]", op, p.n_rot, head_dim);
  }
  static float rope_theta_scale(const RopeParams& p) { return std::pow(p.theta_base, -2.0f / float(p.n_rot)); }

  void swiglu(const float* gate, const float* up, int64_t count, float* out) override {
    bind();
    if (count < 0) fail("cuda backend: swiglu: negative count {}", count);
    after(cuda::launch_swiglu(gate, up, count, out, stream_), "swiglu");
  }
  void add(float* x, const float* y, int64_t count) override {
    bind();
    if (count < 0) fail("cuda backend: add: negative count {}", count);
    after(cuda::launch_add(x, y, count, stream_), "add");
  }
  void add_bias(float* x, const float* b, int64_t n, int64_t dim) override {
    bind();
    if (n < 0 || dim <= 0) fail("cuda backend: add_bias: bad shape {} x {}", n, dim);
    after(cuda::launch_add_bias(x, b, n, dim, stream_), "add_bias");
  }

  // ---- memory -------------------------------------------------------------------------------------------
  void* alloc(size_t bytes) override {
    bind();
    void* p = nullptr;
    const cudaError_t e = cudaMalloc(&p, std::max<size_t>(bytes, 1));
    if (e != cudaSuccess) {
      cudaGetLastError();
      size_t free_b = 0, total_b = 0;
      cudaMemGetInfo(&free_b, &total_b);
      fail("cuda backend: cannot allocate {} of device memory ({} free)", mib(bytes), mib(free_b));
    }
    allocs_[reinterpret_cast<uintptr_t>(p)] = std::max<size_t>(bytes, 1);
    return p;
  }
  void free(void* p) override {
    bind();
    if (!p) return;
    auto it = allocs_.find(reinterpret_cast<uintptr_t>(p));
    if (it == allocs_.end()) fail("cuda backend: free of memory this backend did not allocate");
    allocs_.erase(it);
    check(cudaFree(p), "free");
  }
  void upload(void* dst, const void* src, size_t bytes) override {
    bind();
    if (bytes) after(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, stream_), "upload");
  }
  void download(void* dst, const void* src, size_t bytes) override {
    bind();
    if (bytes) check(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, stream_), "download");
    wait("download");
  }
  void synchronize() override {
    bind();
    wait("synchronize");
  }
  // Free device memory (what the KV pool's device tier can still take).
  int64_t free_memory() const override {
    bind();
    size_t free_b = 0, total_b = 0;
    if (cudaMemGetInfo(&free_b, &total_b) != cudaSuccess) {
      cudaGetLastError();
      return 0;
    }
    return int64_t(free_b);
  }

  WeightView upload_weight(const WeightView& host) override {
    bind();
    if (!host.data || host.rows <= 0 || host.cols <= 0)
      fail("cuda backend: upload_weight: empty weight ({} x {})", host.rows, host.cols);
    const size_t dense = row_bytes(host.type, host.cols);  // validates the type and the block size
    const size_t stride = host.row_bytes ? host.row_bytes : dense;
    if (stride < dense) fail("cuda backend: upload_weight: row stride {} below the row size {}", stride, dense);
    const int64_t rows = host.rows, cols = host.cols;
    const auto* src = static_cast<const uint8_t*>(host.data);
    Weight W;
    W.rows = rows;
    W.cols = cols;
    WeightView out = host;
    out.row_bytes = dense;
    size_t bytes = 0;
    switch (host.type) {
      case DType::F32: W.type = WT::F32; bytes = size_t(rows * cols) * 4; break;
      case DType::F16: W.type = WT::F16; bytes = size_t(rows * cols) * 2; break;
      case DType::BF16: W.type = WT::BF16; bytes = size_t(rows * cols) * 2; break;
      case DType::Q8_0: W.type = WT::Q8_0; bytes = cuda::q8_scales_offset(rows, cols) + size_t(rows * (cols / 32)) * 2; break;
      case DType::Q4_0:
      case DType::Q4_K:
      case DType::Q6_K:  // dequantized at upload, stored as F16
        W.type = WT::F16;
        bytes = size_t(rows * cols) * 2;
        out.type = DType::F16;
        out.row_bytes = size_t(cols) * 2;
        break;
      default: fail("cuda backend: weight type {} is not supported", gguf::type_name(host.type));
    }
    size_t free_b = 0, total_b = 0;
    check(cudaMemGetInfo(&free_b, &total_b), "upload_weight");
    if (bytes + (size_t(256) << 20) > free_b)
      fail("cuda backend: a {} x {} {} weight needs {} but the GPU has {} free", rows, cols, gguf::type_name(host.type),
           mib(bytes), mib(free_b));
    void* d = nullptr;
    check(cudaMalloc(&d, bytes), "upload_weight");
    W.dev = d;
    weights_[d] = W;
    auto* dst = static_cast<uint8_t*>(d);
    if (host.type == DType::F32 || host.type == DType::F16 || host.type == DType::BF16) {
      check(cudaMemcpy2D(dst, dense, src, stride, dense, size_t(rows), cudaMemcpyHostToDevice), "upload_weight");
    } else {
      // Row chunks through a host buffer.
      const int64_t chunk = std::max<int64_t>(1, (int64_t(64) << 20) / std::max<int64_t>(1, cols * 2));
      std::vector<uint8_t> buf;
      std::vector<float> row(static_cast<size_t>(cols));
      for (int64_t r0 = 0; r0 < rows; r0 += chunk) {
        const int64_t nr = std::min(chunk, rows - r0);
        if (host.type == DType::Q8_0) {
          const int64_t nb = cols / 32;
          buf.resize(size_t(nr * cols) + size_t(nr * nb) * 2);
          uint8_t* qs = buf.data();
          uint8_t* sc = buf.data() + size_t(nr * cols);
          for (int64_t r = 0; r < nr; ++r) {
            const uint8_t* s = src + size_t(r0 + r) * stride;
            for (int64_t b = 0; b < nb; ++b) {
              std::memcpy(sc + size_t(r * nb + b) * 2, s + b * 34, 2);
              std::memcpy(qs + size_t(r * cols + b * 32), s + b * 34 + 2, 32);
            }
          }
          check(cudaMemcpy(dst + size_t(r0 * cols), qs, size_t(nr * cols), cudaMemcpyHostToDevice), "upload_weight");
          check(cudaMemcpy(dst + cuda::q8_scales_offset(rows, cols) + size_t(r0 * nb) * 2, sc, size_t(nr * nb) * 2,
                           cudaMemcpyHostToDevice),
                "upload_weight");
        } else {
          buf.resize(size_t(nr * cols) * 2);
          auto* h = reinterpret_cast<uint16_t*>(buf.data());
          for (int64_t r = 0; r < nr; ++r) {
            dequantize_row(host.type, src + size_t(r0 + r) * stride, row.data(), cols);
            for (int64_t c = 0; c < cols; ++c) {
              const float v = row[size_t(c)];
              if (!(std::fabs(v) <= 65504.0f))
                fail("cuda backend: a {} weight value ({}) does not fit the F16 it is converted to", gguf::type_name(host.type), v);
              h[size_t(r * cols + c)] = cpu::fp32_to_fp16(v);
            }
          }
          check(cudaMemcpy(dst + size_t(r0 * cols) * 2, h, size_t(nr * cols) * 2, cudaMemcpyHostToDevice), "upload_weight");
        }
      }
    }
    out.data = d;
    return out;
  }

  const float* upload_f32(const float* host, int64_t n) override {
    bind();
    if (!host || n <= 0) return nullptr;
    void* d = nullptr;
    check(cudaMalloc(&d, size_t(n) * 4), "upload_f32");
    owned_.push_back(d);
    check(cudaMemcpy(d, host, size_t(n) * 4, cudaMemcpyHostToDevice), "upload_f32");
    return static_cast<const float*>(d);
  }

  // ---- KV -----------------------------------------------------------------------------------------------
  std::unique_ptr<KVStore> kv_create(const KVLayout& layout) override {
    bind();
    return std::make_unique<CudaKVStore>(layout, stream_);
  }

  void scatter_i32(int32_t* dst, size_t dst_len, std::span<const int32_t> pairs) override {
    bind();
    check_scatter_pairs(dst_len, pairs);
    if (pairs.empty()) return;
    auto* d = static_cast<int32_t*>(pairs_.ensure(pairs.size_bytes(), "scatter_i32"));
    check(cudaMemcpyAsync(d, pairs.data(), pairs.size_bytes(), cudaMemcpyHostToDevice, stream_), "scatter_i32");
    after(cuda::launch_scatter_i32(dst, d, int64_t(pairs.size() / 2), stream_), "scatter_i32");
  }

  void kv_reset(KVStore& kv, std::span<const int32_t> ids) override {
    bind();
    CudaKVStore& st = store(kv);
    for (int32_t id : ids) st.check_id(id, "kv_reset");
    if (ids.empty()) return;
    auto* d = static_cast<int32_t*>(ids_.ensure(ids.size_bytes(), "kv_reset"));
    check(cudaMemcpyAsync(d, ids.data(), ids.size_bytes(), cudaMemcpyHostToDevice, stream_), "kv_reset");
    after(cuda::launch_kv_reset(st.dev, d, int(ids.size()), stream_), "kv_reset");
  }

  void kv_copy_pages(KVStore& kv, std::span<const PageCopy> copies) override {
    bind();
    CudaKVStore& st = store(kv);
    for (const PageCopy& c : copies) {
      st.check_id(c.src, "kv_copy_pages");
      st.check_id(c.dst, "kv_copy_pages");
    }
    const size_t P = size_t(st.layout().page_size), kvb = size_t(st.page_kv_bytes), D = size_t(st.layout().head_dim);
    for (const PageCopy& c : copies) {
      if (c.src == c.dst) continue;
      check(cudaMemcpyAsync(st.k(c.dst), st.k(c.src), kvb, cudaMemcpyDefault, stream_), "kv_copy_pages");
      check(cudaMemcpyAsync(st.v(c.dst), st.v(c.src), kvb, cudaMemcpyDefault, stream_), "kv_copy_pages");
      check(cudaMemcpyAsync(st.pos(c.dst), st.pos(c.src), P * 4, cudaMemcpyDefault, stream_), "kv_copy_pages");
      if (st.scores(c.src))
        check(cudaMemcpyAsync(st.scores(c.dst), st.scores(c.src), P * 4, cudaMemcpyDefault, stream_), "kv_copy_pages");
      if (st.minmax(c.src))
        check(cudaMemcpyAsync(st.minmax(c.dst), st.minmax(c.src), 2 * D * 4, cudaMemcpyDefault, stream_), "kv_copy_pages");
    }
    after(cudaSuccess, "kv_copy_pages");
  }

  void kv_copy_slots(KVStore& kv, std::span<const SlotCopy> copies) override {
    bind();
    CudaKVStore& st = store(kv);
    for (const SlotCopy& c : copies) {
      if (c.src != -1) st.check_slot(c.src, "kv_copy_slots");
      st.check_slot(c.dst, "kv_copy_slots");
    }
    if (copies.empty()) return;
    auto* d = static_cast<SlotCopy*>(copies_.ensure(copies.size_bytes(), "kv_copy_slots"));
    check(cudaMemcpyAsync(d, copies.data(), copies.size_bytes(), cudaMemcpyHostToDevice, stream_), "kv_copy_slots");
    after(cuda::launch_kv_copy_slots(st.dev, d, int(copies.size()), err_dev_, stream_), "kv_copy_slots");
  }

  void kv_store(KVStore& kv, const float* k, const float* v, int64_t n_rows, int n_kv_heads, const int32_t* slots,
                const int32_t* pos) override {
    bind();
    CudaKVStore& st = store(kv);
    if (n_rows < 0 || n_kv_heads <= 0) fail("cuda backend: kv_store: bad shape ({} rows, {} KV heads)", n_rows, n_kv_heads);
    after(cuda::launch_kv_store(st.dev, k, v, n_rows, n_kv_heads, slots, pos, err_dev_, stream_), "kv_store");
  }

  void kv_read_scores(KVStore& kv, std::span<const int32_t> ids, float* out) override {
    bind();
    CudaKVStore& st = store(kv);
    if (!st.layout().slot_scores) fail("cuda backend: kv_read_scores: the store keeps no slot scores");
    for (int32_t id : ids) st.check_id(id, "kv_read_scores");
    wait("kv_read_scores");
    const size_t P = size_t(st.layout().page_size);
    for (size_t i = 0; i < ids.size(); ++i)
      check(cudaMemcpy(out + i * P, st.scores(ids[i]), P * 4, cudaMemcpyDefault), "kv_read_scores");
  }

  void kv_read_page(KVStore& kv, int32_t id, float* k, float* v, int32_t* pos) override {
    bind();
    CudaKVStore& st = store(kv);
    st.check_id(id, "kv_read_page");
    wait("kv_read_page");
    const int P = st.layout().page_size, D = st.layout().head_dim;
    const size_t rb = size_t(st.dev.rb);
    std::vector<uint8_t> raw(size_t(st.page_kv_bytes));
    const DType t = dtype_of(st.layout().type);
    for (int which = 0; which < 2; ++which) {
      float* dst = which == 0 ? k : v;
      if (!dst) continue;
      check(cudaMemcpy(raw.data(), which == 0 ? st.k(id) : st.v(id), raw.size(), cudaMemcpyDefault), "kv_read_page");
      for (int s = 0; s < P; ++s) dequantize_row(t, raw.data() + size_t(s) * rb, dst + size_t(s) * size_t(D), D);
    }
    if (pos) check(cudaMemcpy(pos, st.pos(id), size_t(P) * 4, cudaMemcpyDefault), "kv_read_page");
  }

  void select_pages(KVStore& kv, const AttnBatch& b) override {
    bind();
    CudaKVStore& st = store(kv);
    if (b.n_jobs < 0) fail("cuda backend: select_pages: {} jobs", b.n_jobs);
    if (b.n_jobs == 0) return;
    check_batch(st, b, "select_pages");
    after(cuda::launch_select_pages(st.dev, b, err_dev_, stream_), "select_pages");
  }

  void attention(KVStore& kv, const AttnBatch& b) override {
    bind();
    CudaKVStore& st = store(kv);
    if (b.n_jobs < 0) fail("cuda backend: attention: {} jobs", b.n_jobs);
    if (b.n_jobs == 0) return;
    check_batch(st, b, "attention");
    if (b.out_stride % b.head_dim != 0)
      fail("cuda backend: attention: out_stride {} is not a multiple of head_dim {}", b.out_stride, b.head_dim);
    // Rows the output can hold (from the allocation it points into): sizes the (max, sum) scratch.
    const int64_t end = alloc_end(b.out, "attention", "out");
    const int64_t rows_cap = (end - int64_t(reinterpret_cast<uintptr_t>(b.out))) / (b.out_stride * 4) + 1;
    const int64_t hq = b.out_stride / b.head_dim;
    cuda::AttnScratch scr;
    scr.partial = static_cast<float*>(
        partial_.ensure(cuda::attn_partial_floats(st.dev, b) * 4, "attention"));
    scr.ml_pairs = rows_cap * hq;
    scr.ml = static_cast<float*>(ml_.ensure(size_t(scr.ml_pairs) * 8, "attention"));
    if (const cuda::PrefillSplitScratch pf = cuda::prefill_split_scratch(st.dev, b, scr.ml_pairs); pf.floats > 0) {
      scr.pf_part = static_cast<float*>(pf_part_.ensure(pf.floats * 4, "attention"));
      scr.pf_splits = pf.splits;
    }
    after(cuda::launch_attention(st.dev, b, scr, err_dev_, stream_), "attention");
  }

 private:

  const Weight& weight(const WeightView& w, const char* op) const {
    auto it = weights_.find(w.data);
    if (it == weights_.end()) fail("cuda backend: {}: the weight was not uploaded with this backend's upload_weight", op);
    if (it->second.rows != w.rows || it->second.cols != w.cols)
      fail("cuda backend: {}: weight shape {} x {} does not match its upload ({} x {})", op, w.rows, w.cols,
           it->second.rows, it->second.cols);
    return it->second;
  }

  static CudaKVStore& store(KVStore& kv) {
    auto* st = dynamic_cast<CudaKVStore*>(&kv);
    if (!st) fail("cuda backend: a KV store of another backend");
    return *st;
  }

  void check_batch(const CudaKVStore& st, const AttnBatch& b, const char* op) const {
    if (b.head_dim != st.layout().head_dim)
      fail("cuda backend: {}: head_dim {} but the store holds rows of {}", op, b.head_dim, st.layout().head_dim);
    if (b.n_group <= 0 || b.n_group > 64) fail("cuda backend: {}: {} query heads per KV head (1..64)", op, b.n_group);
    if (!b.q || !b.q_pos || !b.out || !b.jobs || !b.page_ids)
      fail("cuda backend: {}: batch without q, q_pos, out, jobs or page ids", op);
  }

  // One past the last byte of the backend allocation holding p.
  int64_t alloc_end(const void* p, const char* op, const char* what) const {
    const auto u = reinterpret_cast<uintptr_t>(p);
    auto it = allocs_.upper_bound(u);
    if (it == allocs_.begin()) fail("cuda backend: {}: {} is not memory of this backend", op, what);
    --it;
    if (u >= it->first + it->second) fail("cuda backend: {}: {} is not memory of this backend", op, what);
    return int64_t(it->first + it->second);
  }

  // After a launch: the launch's error, and with HEADROOM_CUDA_SYNC the op's execution too.
  void after(cudaError_t e, const char* op) {
    check(e, op);
    if (sync_each_) wait(op);
  }

  // Waits for the stream, then reads the device error word.
  void wait(const char* op) {
    check(cudaMemcpyAsync(err_host_, err_dev_, 4, cudaMemcpyDeviceToHost, stream_), op);
    check(cudaStreamSynchronize(stream_), op);
    const uint32_t e = *err_host_;
    if (!e) return;
    check(cudaMemsetAsync(err_dev_, 0, 4, stream_), op);
    check(cudaStreamSynchronize(stream_), op);
    std::string what;
    auto add = [&](uint32_t bit, const char* s) {
      if (e & bit) what += (what.empty() ? "" : "; ") + std::string(s);
    };
    add(cuda::kErrEmbedId, "embed: a token id out of range");
    add(cuda::kErrKVSlot, "kv_store/kv_copy_slots: a slot out of range");
    add(cuda::kErrAttnPage, "attention: a page id out of range");
    add(cuda::kErrAttnShape, "attention: a job with a bad shape");
    add(cuda::kErrSelect, "select_pages: candidates outside the job's pages, a bad page id or no key bounds");
    add(cuda::kErrAttnScratch, "attention: an output row beyond the out buffer");
    fail("cuda backend: {} (seen at {})", what, op);
  }

  // Makes this backend's GPU current on the calling thread (ranks of a tensor-parallel group share threads).
  void bind() const {
    int current = -1;
    if (cudaGetDevice(&current) == cudaSuccess && current == device_) return;
    check(cudaSetDevice(device_), "set device");
  }

  int device_ = 0;
  cudaStream_t stream_ = nullptr;
  cublasHandle_t blas_ = nullptr;
  uint32_t* err_dev_ = nullptr;
  uint32_t* err_host_ = nullptr;
  bool sync_each_ = false;
  bool graphs_on_ = true;
  uint64_t capture_generation_ = 0;
  std::map<uintptr_t, size_t> allocs_;
  std::unordered_map<const void*, Weight> weights_;
  std::vector<void*> owned_;
  DevBuf xq_, xh_, wtile_, ids_, pairs_, copies_, partial_, ml_, pf_part_;
};

}  // namespace

std::string cuda_unavailable_reason() {
  int n = 0;
  const cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess) {
    cudaGetLastError();
    return fmt::format("no CUDA device ({})", cudaGetErrorString(e));
  }
  if (n == 0) return "no CUDA device";
  cudaDeviceProp p{};
  if (cudaGetDeviceProperties(&p, 0) != cudaSuccess) {
    cudaGetLastError();
    return "cannot read the CUDA device's properties";
  }
  if (p.major < 9)
    return fmt::format("the GPU {} (compute capability {}.{}) is older than the Hopper (sm_90a) the kernels are built for",
                       p.name, p.major, p.minor);
  return "";
}

std::string cuda_device_description() {
  if (!cuda_unavailable_reason().empty()) return "";
  cudaDeviceProp p{};
  cudaGetDeviceProperties(&p, 0);
  return fmt::format("{} ({} SMs, {:.1f} GiB)", p.name, p.multiProcessorCount, double(p.totalGlobalMem) / double(1 << 30));
}

int cuda_device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return n;
}

std::unique_ptr<Backend> make_cuda_backend(int device) { return std::make_unique<CudaBackend>(device); }

int cuda_device(Backend& be) {
  auto* c = dynamic_cast<CudaBackend*>(&be);
  if (!c) fail("cuda_device: not a CUDA backend");
  return c->device();
}

cudaStream_t cuda_stream(Backend& be) {
  auto* c = dynamic_cast<CudaBackend*>(&be);
  if (!c) fail("cuda_stream: not a CUDA backend");
  return c->stream();
}

}  // namespace headroom
