// GPU micro-benchmarks of the CUDA backend (no Google Benchmark needed):
//   build-cuda/bench_cuda [--quick (no 128k rows, no output matrix) | --attention (attention only) |
//                          --attention-ab (attention only, each decode row also through the previous fast path, the legacy kernel, the probe) |
//                          --prefill [--quick] (the prefill attention rows only) |
//                          --attention-one DEPTH [f16|q8_0] (one 8B case, e.g. under ncu) |
//                          --gemv [--ns 1,8,...] [--types f16,bf16,q8_0] [--only 8B|1B] (matmul rows only)]
//
//   gemv       matmul at n = 1 (GEMV), 2..32 (tensor-core skinny GEMM; Q8_0 up to 64), larger n (cuBLAS) on the
//              Llama-3 8B and 1B layer shapes, F16 / BF16 / Q8_0 weights: time per call and the weight bytes
//              streamed per second (each shape is rotated over enough copies to be several times the L2).
//   attention  the decode attention kernel (one query row, GQA 4) over every layer's cache at depth 8k, 32k
//              and 128k (8B: 32 layers x 8 KV heads x head_dim 128; 1B: 16 layers x 8 x 64), F16 and Q8_0
//              KV: K+V bytes read per second; and batched decode (8 and 32 sequences at 8k, both shapes, F16/Q8_0).
//
// Timing: the calls are captured into a CUDA graph on the backend's stream and the graph is replayed;
// CUDA events around each replay; the median of the replays, divided by the calls in the graph.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include <cuda_runtime.h>

#include "backend/backend.h"
#include "backend/cpu/quant.h"
#include "backend/cuda/cuda_backend.h"
#include "backend/cuda/kernels.h"
#include "backend/registry.h"
#include "util/error.h"

using namespace headroom;

namespace {

#define CK(x)                                                                                  \
  do {                                                                                         \
    cudaError_t e_ = (x);                                                                      \
    if (e_ != cudaSuccess) {                                                                   \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_)); \
      std::exit(1);                                                                            \
    }                                                                                          \
  } while (0)

// Median seconds per call of f() (which enqueues `calls` ops on the stream), over `reps` graph replays.
template <typename F>
double time_graph(Backend& be, int calls, int reps, F&& f, bool graph = true) {
  cudaStream_t s = cuda_stream(be);
  f();  // warm-up outside the graph (scratch growth, attributes)
  be.synchronize();
  // Long calls (cuBLAS prefill) are timed as direct launches; the rest as replays of one captured graph.
  cudaGraph_t g = nullptr;
  cudaGraphExec_t ge = nullptr;
  if (graph) {
    CK(cudaStreamBeginCapture(s, cudaStreamCaptureModeRelaxed));
    f();
    CK(cudaStreamEndCapture(s, &g));
    CK(cudaGraphInstantiate(&ge, g, 0));
    CK(cudaGraphLaunch(ge, s));  // warm-up replay
    CK(cudaStreamSynchronize(s));
  }
  cudaEvent_t a, b;
  CK(cudaEventCreate(&a));
  CK(cudaEventCreate(&b));
  std::vector<double> t;
  for (int r = 0; r < reps; ++r) {
    CK(cudaEventRecord(a, s));
    if (graph) CK(cudaGraphLaunch(ge, s));
    else f();
    CK(cudaEventRecord(b, s));
    CK(cudaEventSynchronize(b));
    float ms = 0;
    CK(cudaEventElapsedTime(&ms, a, b));
    t.push_back(ms * 1e-3 / calls);
  }
  be.synchronize();
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  if (graph) {
    cudaGraphExecDestroy(ge);
    cudaGraphDestroy(g);
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

uint64_t rng_state = 0x9E3779B97F4A7C15ull;
inline uint64_t next_rand() {
  rng_state ^= rng_state << 13;
  rng_state ^= rng_state >> 7;
  rng_state ^= rng_state << 17;
  return rng_state;
}

// Random host bytes of a weight: values in +-[0.5, 1) for F16/BF16; Q8_0 blocks with scale 1/64.
std::vector<uint8_t> random_weight(DType t, int64_t rows, int64_t cols) {
  const size_t bytes = row_bytes(t, cols) * size_t(rows);
  std::vector<uint8_t> w(bytes);
  if (t == DType::Q8_0) {
    for (size_t i = 0; i < bytes; i += 8) {
      const uint64_t r = next_rand();
      std::memcpy(w.data() + i, &r, std::min<size_t>(8, bytes - i));
    }
    const uint16_t d = cpu::fp32_to_fp16(1.0f / 64);
    for (size_t b = 0; b < bytes; b += 34) std::memcpy(w.data() + b, &d, 2);
  } else {
    auto* h = reinterpret_cast<uint16_t*>(w.data());
    const size_t n = bytes / 2;
    for (size_t i = 0; i < n; i += 4) {
      const uint64_t r = next_rand();
      for (size_t k = 0; k < 4 && i + k < n; ++k) {
        const uint16_t v = uint16_t(r >> (16 * k));
        h[i + k] = t == DType::F16 ? uint16_t((v & 0x83FF) | 0x3800) : uint16_t((v & 0x807F) | 0x3F00);
      }
    }
  }
  return w;
}

struct Shape {
  const char* name;
  int64_t rows, cols;
};

struct GemvOpts {
  bool quick = false;
  std::vector<int64_t> ns = {1, 2, 4, 8, 16, 32, 64, 128, 512};
  std::vector<DType> types = {DType::F16, DType::BF16, DType::Q8_0};
  std::string only;  // "8B" or "1B": that model's shapes only
};

void bench_gemv(const GemvOpts& o) {
  const Shape s8[] = {{"8B wq/wo 4096x4096", 4096, 4096},   {"8B wk/wv 1024x4096", 1024, 4096},
                      {"8B gate/up 14336x4096", 14336, 4096}, {"8B down 4096x14336", 4096, 14336},
                      {"8B output 128256x4096", 128256, 4096}, {"1B wq/wo 2048x2048", 2048, 2048},
                      {"1B wk/wv 512x2048", 512, 2048},     {"1B gate/up 8192x2048", 8192, 2048},
                      {"1B down 2048x8192", 2048, 8192},    {"1B output 128256x2048", 128256, 2048}};
  const char* sk = std::getenv("HEADROOM_CUDA_SKINNY_MAX");
  std::printf("\n== matmul: n = 1 GEMV, n = 2..32 (Q8_0: 2..64) tensor-core skinny GEMM%s, larger n cuBLAS ==\n",
              sk ? (std::string(", HEADROOM_CUDA_SKINNY_MAX=") + sk).c_str() : "");
  std::printf("%-24s %-5s %4s %10s %10s %9s\n", "shape", "type", "n", "us/call", "GB/s", "TFLOP/s");
  for (DType t : o.types) {
    auto be = make_backend("cuda", 0);
    for (const Shape& sh : s8) {
      if (o.quick && sh.rows == 128256) continue;
      if (!o.only.empty() && std::strncmp(sh.name, o.only.c_str(), o.only.size()) != 0) continue;
      const std::vector<uint8_t> host = random_weight(t, sh.rows, sh.cols);
      const size_t wbytes = host.size();
      const int copies = int(std::max<size_t>(1, (size_t(768) << 20) / wbytes));
      WeightView hv{t, host.data(), sh.rows, sh.cols, row_bytes(t, sh.cols)};
      std::vector<WeightView> dw;
      for (int c = 0; c < copies; ++c) dw.push_back(be->upload_weight(hv));
      const int64_t nmax = *std::max_element(o.ns.begin(), o.ns.end());
      std::vector<float> x(size_t(nmax * sh.cols));
      for (auto& v : x) v = float(int64_t(next_rand() % 2001) - 1000) / 1000.0f;
      DeviceArray<float> dx(*be, x.size()), dy(*be, size_t(nmax * sh.rows));
      dx.upload(x.data(), x.size());
      for (int64_t n : o.ns) {
        if (n >= 512 && t == DType::BF16) continue;
        const int calls = std::max(copies, 8);
        const double sec = time_graph(*be, calls, 7, [&] {
          for (int c = 0; c < calls; ++c) be->matmul(dw[size_t(c % copies)], dx.get(), n, dy.get());
        }, n <= 128);
        const double bytes = double(wbytes) + double(n) * double(sh.cols + sh.rows) * 4;
        std::printf("%-24s %-5s %4lld %10.2f %10.0f %9.1f\n", sh.name, gguf::type_name(t), (long long)n, sec * 1e6,
                    bytes / sec * 1e-9, 2.0 * double(n) * double(sh.rows) * double(sh.cols) / sec * 1e-12);
      }
      std::fflush(stdout);
    }
  }
}

struct AttnShape {
  const char* name;
  int layers, n_kv, group, head_dim;
};

// Decode attention over `layers` layers' caches, `seqs` sequences each at `depth` tokens.
bool legacy_ab = false;  // --attention-ab: time the legacy decode kernel beside every decode row

// Prefill (q_rows > 1): the q_rows are the last rows of the depth tokens (positions depth - q_rows ...), causal;
// host_shape false leaves AttnBatch's host-known shape unknown (max_rows 0: the CUDA-core path).
void bench_attention_case(Backend& be, const AttnShape& sh, KVType t, int depth, int seqs, int q_rows = 1,
                          bool host_shape = true) {
  const int P = 32, D = sh.head_dim, G = sh.group, H = sh.n_kv * G;
  const int pages_per = (depth + P - 1) / P;  // per (layer, sequence, KV head)
  const int64_t n_pages = int64_t(sh.layers) * seqs * sh.n_kv * pages_per;
  KVLayout l;
  l.type = t;
  l.page_size = P;
  l.head_dim = D;
  l.device_pages = int32_t(n_pages);
  auto kv = be.kv_create(l);
  // Fill every slot with random rows (positions 0..depth-1), 65536 rows per kv_store call.
  const int64_t chunk = 65536;
  std::vector<float> rows(size_t(chunk) * D);
  for (auto& v : rows) v = float(int64_t(next_rand() % 2001) - 1000) / 1000.0f;
  DeviceArray<float> dk(be, rows.size()), dv(be, rows.size());
  dk.upload(rows.data(), rows.size());
  for (auto& v : rows) v = float(int64_t(next_rand() % 2001) - 1000) / 1000.0f;
  dv.upload(rows.data(), rows.size());
  DeviceArray<int32_t> dslots(be, size_t(chunk)), dpos(be, size_t(chunk));
  std::vector<int32_t> slots(static_cast<size_t>(chunk)), pos(static_cast<size_t>(chunk));
  const int64_t total_slots = n_pages * P;
  for (int64_t s0 = 0; s0 < total_slots; s0 += chunk) {
    const int64_t n = std::min(chunk, total_slots - s0);
    for (int64_t i = 0; i < n; ++i) {
      const int64_t g = s0 + i;
      const int64_t page_in_list = (g / P) % pages_per;
      const int64_t p = page_in_list * P + g % P;
      slots[size_t(i)] = int32_t(g);
      pos[size_t(i)] = p < depth ? int32_t(p) : -1;
      if (p >= depth) slots[size_t(i)] = -1;
    }
    dslots.upload(slots.data(), size_t(n));
    dpos.upload(pos.data(), size_t(n));
    be.kv_store(*kv, dk.get(), dv.get(), n, 1, dslots.get(), dpos.get());
  }
  be.synchronize();
  // Jobs per layer: one per (sequence, KV head); page lists in id order.
  std::vector<int32_t> ids(static_cast<size_t>(n_pages));
  for (int64_t i = 0; i < n_pages; ++i) ids[size_t(i)] = int32_t(i);
  DeviceArray<int32_t> dids(be, ids.size());
  dids.upload(ids.data(), ids.size());
  const int jobs_per_layer = seqs * sh.n_kv;
  std::vector<AttnJob> jobs;
  for (int ly = 0; ly < sh.layers; ++ly)
    for (int sq = 0; sq < seqs; ++sq)
      for (int h = 0; h < sh.n_kv; ++h) {
        AttnJob j;
        j.row0 = sq * q_rows;
        j.n_rows = q_rows;
        j.kv_head = h;
        j.page0 = int32_t(((int64_t(ly) * seqs + sq) * sh.n_kv + h) * pages_per);
        j.n_pages = pages_per;
        jobs.push_back(j);
      }
  DeviceArray<AttnJob> djobs(be, jobs.size());
  djobs.upload(jobs.data(), jobs.size());
  std::vector<float> q(size_t(seqs) * q_rows * H * D);
  for (auto& v : q) v = float(int64_t(next_rand() % 2001) - 1000) / 1000.0f;
  DeviceArray<float> dq(be, q.size()), dout(be, q.size());
  dq.upload(q.data(), q.size());
  std::vector<int32_t> qpos(size_t(seqs) * q_rows);
  for (size_t i = 0; i < qpos.size(); ++i) qpos[i] = depth - q_rows + int32_t(i % size_t(q_rows));
  DeviceArray<int32_t> dqpos(be, qpos.size());
  dqpos.upload(qpos.data(), qpos.size());
  AttnBatch b;
  b.q = dq.get();
  b.q_stride = int64_t(H) * D;
  b.q_pos = dqpos.get();
  b.out = dout.get();
  b.out_stride = b.q_stride;
  b.n_group = G;
  b.head_dim = D;
  b.scale = 1.0f / std::sqrt(float(D));
  b.n_jobs = jobs_per_layer;
  b.page_ids = dids.get();
  if (host_shape) {  // the step's host-known shape, as the model passes it
    b.max_rows = q_rows;
    b.n_decode_jobs = q_rows < 4 ? jobs_per_layer : 0;
    b.max_pages = pages_per;
  }
  auto run_layers = [&] {
    for (int ly = 0; ly < sh.layers; ++ly) {
      AttnBatch bl = b;
      bl.jobs = djobs.get() + size_t(ly) * jobs_per_layer;
      be.attention(*kv, bl);
    }
  };
  const double sec = time_graph(be, sh.layers, 5, run_layers);
  const double kv_bytes = double(jobs_per_layer) * depth * 2.0 * double(kv_row_bytes(t, D));
  const double meta = double(jobs_per_layer) * pages_per * P * 4.0;
  if (q_rows > 1) {  // prefill: causal rows over the cache; FLOPs 4 * head_dim * heads * allowed slots per row
    double allowed = 0;
    for (int i = 0; i < q_rows; ++i) allowed += double(depth - q_rows + i + 1);
    const double flop = 4.0 * D * H * allowed * seqs;
    std::printf("%-4s %-5s past %6d rows %4d %-10s %9.1f us/layer %8.1f TFLOP/s  attention alone %8.0f tok/s (%d layers)\n",
                sh.name, kv_type_name(t), depth - q_rows, q_rows, host_shape ? "tensor" : "cuda-core", sec * 1e6,
                flop / sec * 1e-12, double(q_rows) * seqs / (sec * sh.layers), sh.layers);
  } else {
    const double gbs = (kv_bytes + meta) / sec * 1e-9;
    std::printf("%-8s %-5s %7d %5d %10.1f %10.3f %10.0f %6.1f%%", sh.name, kv_type_name(t), depth, seqs, sec * 1e6,
                sec * sh.layers * 1e3, gbs, 100.0 * gbs / 4252.0);
    if (legacy_ab) {
      // The same cache through the previous fast path (HEADROOM_CUDA_ATTN_TC=0: attn_fast_kernel for F16 too),
      // the legacy kernel (HEADROOM_CUDA_ATTN_LEGACY) and the bulk-copy probe (fast mode 2: streams the stages,
      // computes nothing), same graph method.
      auto timed_with = [&](const char* var, const char* val) {
        setenv(var, val, 1);
        const double t = time_graph(be, sh.layers, 5, run_layers);
        unsetenv(var);
        return t;
      };
      const double prev = timed_with("HEADROOM_CUDA_ATTN_TC", "0");
      const double old = timed_with("HEADROOM_CUDA_ATTN_LEGACY", "1");
      const double probe = timed_with("HEADROOM_CUDA_ATTN_FAST_MODE", "2");
      std::printf(" %10.1f %8.0f %6.2fx %10.1f %9.0f", prev * 1e6, (kv_bytes + meta) / prev * 1e-9, prev / sec, old * 1e6,
                  (kv_bytes + meta) / probe * 1e-9);
    }
    std::printf("\n");
  }
  std::fflush(stdout);
}

// Prefill attention: one sequence's chunk of `rows` causal rows after `past` tokens, every layer (8B: 32 x 8 KV
// heads x 4 x 128; 1B: 16 x 8 x 4 x 64). TFLOP/s counts 4 * head_dim * heads * allowed slots (causal).
void bench_prefill(Backend& be, bool quick) {
  std::printf("\n== prefill attention (tensor-core kernel; one CUDA-core row for comparison) ==\n");
  const AttnShape s8{"8B", 32, 8, 4, 128}, s1{"1B", 16, 8, 4, 64};
  for (const AttnShape& sh : {s8, s1})
    for (int past : {0, 32768}) bench_attention_case(be, sh, KVType::F16, past + 2048, 1, 2048);
  bench_attention_case(be, s8, KVType::F16, 4096 + 512, 1, 512);
  if (quick) return;
  for (KVType t : {KVType::BF16, KVType::Q8_0, KVType::F32}) bench_attention_case(be, s8, t, 2048, 1, 2048);
  bench_attention_case(be, s8, KVType::F16, 131072 + 2048, 1, 2048);
  bench_attention_case(be, s8, KVType::F16, 4096 + 512, 1, 512, false);
}

void bench_attention(bool quick) {
  std::printf("\n== decode attention (paged flash-decoding, bulk-copy pipeline), every layer's cache ==\n");
  std::printf("GB/s: K+V+positions read per second; %% of the 4252 GB/s device copy%s\n",
              legacy_ab ? "; then the previous fast path's (HEADROOM_CUDA_ATTN_TC=0) us/layer, GB/s and the speedup over it, the legacy kernel's us/layer, the no-compute probe" : "");
  std::printf("%-8s %-5s %7s %5s %10s %10s %10s %7s%s\n", "shape", "kv", "depth", "seqs", "us/layer", "ms/token", "GB/s",
              "of copy", legacy_ab ? " prev us/ly prevGB/s speedup legacy us/ly probeGB/s" : "");
  if (legacy_ab) {
    std::printf("tensor-core kernel blocks/SM: f16 d128 %d, f16 d64 %d\n", cuda::attn_tc_blocks_per_sm(128),
                cuda::attn_tc_blocks_per_sm(64));
    std::printf("fast kernel blocks/SM: f16 d128 %d, q8_0 d128 %d, f16 d64 %d, q8_0 d64 %d\n",
                cuda::attn_fast_blocks_per_sm(int(KVType::F16), 128), cuda::attn_fast_blocks_per_sm(int(KVType::Q8_0), 128),
                cuda::attn_fast_blocks_per_sm(int(KVType::F16), 64), cuda::attn_fast_blocks_per_sm(int(KVType::Q8_0), 64));
  }
  auto be = make_backend("cuda", 0);
  const AttnShape s8{"8B", 32, 8, 4, 128}, s1{"1B", 16, 8, 4, 64};
  if (legacy_ab) {  // the A/B run: the F16 rows (the tensor-core kernel) first, then Q8_0 (unchanged path)
    for (const AttnShape& sh : {s8, s1}) {
      bench_attention_case(*be, sh, KVType::F16, 131072, 1);
      bench_attention_case(*be, sh, KVType::F16, 8192, 32);
    }
    for (const AttnShape& sh : {s8, s1}) {
      for (int depth : {8192, 32768}) bench_attention_case(*be, sh, KVType::F16, depth, 1);
      bench_attention_case(*be, sh, KVType::F16, 8192, 8);
    }
    for (const AttnShape& sh : {s8, s1})
      for (int depth : {8192, 131072}) bench_attention_case(*be, sh, KVType::Q8_0, depth, 1);
    for (const AttnShape& sh : {s8, s1}) bench_attention_case(*be, sh, KVType::Q8_0, 8192, 32);
    return;
  }
  for (const AttnShape& sh : {s8, s1})
    for (KVType t : {KVType::F16, KVType::Q8_0})
      for (int depth : {8192, 32768, 131072}) {
        if (quick && depth > 8192) continue;
        bench_attention_case(*be, sh, t, depth, 1);
      }
  for (const AttnShape& sh : {s8, s1})
    for (KVType t : {KVType::F16, KVType::Q8_0})
      for (int seqs : {8, 32}) bench_attention_case(*be, sh, t, 8192, seqs);
  bench_prefill(*be, quick);
}

void bench_copy() {
  auto be = make_backend("cuda", 0);
  const size_t n = size_t(2) << 30;
  void* a = be->alloc(n);
  void* b = be->alloc(n);
  cudaStream_t s = cuda_stream(*be);
  const double sec = time_graph(*be, 1, 5, [&] { CK(cudaMemcpyAsync(b, a, n, cudaMemcpyDeviceToDevice, s)); });
  std::printf("device-to-device copy of %zu MiB: %.0f GB/s (read + write)\n", n >> 20, 2.0 * double(n) / sec * 1e-9);
  be->free(a);
  be->free(b);
}

}  // namespace

std::vector<std::string> split_list(const char* s) {
  std::vector<std::string> r;
  std::string cur;
  for (const char* p = s;; ++p) {
    if (*p == ',' || *p == 0) {
      if (!cur.empty()) r.push_back(cur);
      cur.clear();
      if (*p == 0) break;
    } else {
      cur += *p;
    }
  }
  return r;
}

int main(int argc, char** argv) {
  const bool quick = argc > 1 && std::strcmp(argv[1], "--quick") == 0;
  if (argc > 1 && std::strcmp(argv[1], "--prefill") == 0) {  // the prefill attention rows only
    try {
      std::printf("%s\n", describe_device_choice("cuda").c_str());
      auto be = make_backend("cuda", 0);
      bench_prefill(*be, argc > 2 && std::strcmp(argv[2], "--quick") == 0);
    } catch (const std::exception& e) {
      std::fprintf(stderr, "bench_cuda: %s\n", e.what());
      return 1;
    }
    return 0;
  }
  // --gemv [--ns 1,2,...] [--types f16,bf16,q8_0] [--only 8B|1B]: the matmul rows only.
  bool gemv_only = false;
  GemvOpts go;
  go.quick = quick;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--gemv") == 0) gemv_only = true;
    else if (std::strcmp(argv[i], "--ns") == 0 && i + 1 < argc) {
      go.ns.clear();
      for (const auto& v : split_list(argv[++i])) go.ns.push_back(std::atoll(v.c_str()));
    } else if (std::strcmp(argv[i], "--types") == 0 && i + 1 < argc) {
      go.types.clear();
      for (const auto& v : split_list(argv[++i]))
        go.types.push_back(v == "bf16" ? DType::BF16 : v == "q8_0" ? DType::Q8_0 : DType::F16);
    } else if (std::strcmp(argv[i], "--only") == 0 && i + 1 < argc) {
      go.only = argv[++i];
    }
  }
  legacy_ab = argc > 1 && std::strcmp(argv[1], "--attention-ab") == 0;
  const bool attn_only = legacy_ab || (argc > 1 && std::strcmp(argv[1], "--attention") == 0);
  if (argc > 2 && std::strcmp(argv[1], "--attention-one") == 0) {  // one case, for a profiler: 8B F16 at DEPTH
    try {
      auto be = make_backend("cuda", 0);
      bench_attention_case(*be, AttnShape{"8B", 32, 8, 4, 128}, std::strcmp(argc > 3 ? argv[3] : "f16", "q8_0") == 0 ? KVType::Q8_0 : KVType::F16,
                           std::atoi(argv[2]), 1);
    } catch (const std::exception& e) {
      std::fprintf(stderr, "bench_cuda: %s\n", e.what());
      return 1;
    }
    return 0;
  }
  const std::string why = cuda_unavailable();
  if (!why.empty()) {
    std::printf("bench_cuda: skipped: %s\n", why.c_str());
    return 0;
  }
  try {
    std::printf("%s\n", describe_device_choice("cuda").c_str());
    bench_copy();
    if (!attn_only) bench_gemv(go);
    if (!gemv_only) bench_attention(quick);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_cuda: %s\n", e.what());
    return 1;
  }
  return 0;
}
