// Micro-benchmarks of the CPU backend ops (Google Benchmark).
//
//   bench_ops --benchmark_filter=Q8 --benchmark_min_time=0.5s
//
// Counters: GB/s = weight (or K/V cache) bytes read per second; GFLOP/s = 2*rows*cols*n per second.
// BM_Attention / BM_AttentionL8B: attention over a KV store per KV type (the kv arg: 0 f32, 1 f16, 2 bf16, 3 q8_0;
// GB/s counts the stored K/V bytes). BM_ModelStep runs the matmuls + attention + small ops of one forward pass of a retrieval-14m-like
// Llama (dim 256, 8 layers, FFN 768, 4 heads x 64, 2 KV heads, vocab 32000, all Q8_0) and reports tok/s.
#include <benchmark/benchmark.h>

#include <cmath>
#include <cstring>
#include <memory>
#include <random>
#include <vector>

#include "backend/backend.h"

namespace {

using namespace headroom;

struct Weight {
  std::vector<uint8_t> data;
  WeightView view;
};

// Random Q8_0 (or F32) weight.
Weight make_weight(DType type, int64_t rows, int64_t cols, uint32_t seed) {
  std::mt19937 rng(seed);
  Weight w;
  const size_t rb = row_bytes(type, cols);
  w.data.resize(rb * size_t(rows));
  if (type == DType::Q8_0) {
    for (size_t b = 0; b < w.data.size(); b += 34) {
      const uint16_t d = uint16_t(0x2000 + rng() % 0x400);  // ~0.008..0.016
      std::memcpy(&w.data[b], &d, 2);
      for (int k = 0; k < 32; ++k) w.data[b + 2 + size_t(k)] = uint8_t(rng());
    }
  } else {
    std::uniform_real_distribution<float> u(-1, 1);
    for (size_t i = 0; i < w.data.size(); i += 4) {
      const float f = u(rng);
      std::memcpy(&w.data[i], &f, 4);
    }
  }
  w.view = {type, w.data.data(), rows, cols, rb};
  return w;
}

std::vector<float> random_vec(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> u(-1, 1);
  std::vector<float> v(n);
  for (auto& x : v) x = u(rng);
  return v;
}

// args: rows, cols, n, threads
void run_matmul(benchmark::State& st, DType type) {
  const int64_t rows = st.range(0), cols = st.range(1), n = st.range(2);
  auto be = make_cpu_backend(int(st.range(3)));
  const Weight w = make_weight(type, rows, cols, 1);
  const std::vector<float> x = random_vec(size_t(n * cols), 2);
  std::vector<float> y(size_t(n * rows));
  for (auto _ : st) {
    be->matmul(w.view, x.data(), n, y.data());
    benchmark::DoNotOptimize(y.data());
  }
  st.counters["GB/s"] = benchmark::Counter(double(w.data.size()), benchmark::Counter::kIsIterationInvariantRate);
  st.counters["GFLOP/s"] = benchmark::Counter(2.0 * rows * cols * n * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
}
void BM_MatmulQ8(benchmark::State& st) { run_matmul(st, DType::Q8_0); }
void BM_MatmulF32(benchmark::State& st) { run_matmul(st, DType::F32); }
BENCHMARK(BM_MatmulQ8)
    ->ArgNames({"rows", "cols", "n", "thr"})
    ->ArgsProduct({{256}, {256}, {1, 512}, {1, 2}})
    ->ArgsProduct({{768}, {256}, {1, 512}, {1, 2}})
    ->ArgsProduct({{256}, {768}, {1, 512}, {1, 2}})
    ->ArgsProduct({{32000}, {256}, {1, 512}, {1, 2}})
    ->UseRealTime();
BENCHMARK(BM_MatmulF32)->ArgNames({"rows", "cols", "n", "thr"})->ArgsProduct({{768}, {256}, {1, 512}, {1, 2}})->UseRealTime();

// Attention over a store in `type`: n_kv KV heads (one job each) x group, `slots` cached tokens per KV head
// in pages of 32, `rows` query rows at the end of the context.
struct AttnSetup {
  int D, G, n_kv, slots, rows;
  std::unique_ptr<KVStore> kv;
  std::vector<float> q, out;
  std::vector<int32_t> qpos, ids;
  std::vector<AttnJob> jobs;
  AttnBatch batch;
  AttnSetup(Backend& be, KVType type, int D_, int G_, int n_kv_, int slots_, int rows_)
      : D(D_), G(G_), n_kv(n_kv_), slots(slots_), rows(rows_) {
    const int P = 32, per_head = (slots + P - 1) / P;
    KVLayout l;
    l.type = type;
    l.page_size = P;
    l.head_dim = D;
    l.device_pages = per_head * n_kv;
    kv = be.kv_create(l);
    for (int h = 0; h < n_kv; ++h) {  // page ids of head h: h, h + n_kv, ... (heads interleaved in memory)
      const std::vector<float> k = random_vec(size_t(slots) * D, uint32_t(3 + h)), v = random_vec(k.size(), uint32_t(5 + h));
      std::vector<int32_t> sl(static_cast<size_t>(slots)), pos(static_cast<size_t>(slots));
      for (int s = 0; s < slots; ++s) {
        sl[size_t(s)] = ((s / P) * n_kv + h) * P + s % P;
        pos[size_t(s)] = s;
      }
      be.kv_store(*kv, k.data(), v.data(), slots, 1, sl.data(), pos.data());
      AttnJob j;
      j.n_rows = rows;
      j.kv_head = h;
      j.page0 = int32_t(ids.size());
      j.n_pages = per_head;
      for (int p = 0; p < per_head; ++p) ids.push_back(p * n_kv + h);
      jobs.push_back(j);
    }
    q = random_vec(size_t(rows * n_kv * G * D), 7);
    out.resize(q.size());
    for (int r = 0; r < rows; ++r) qpos.push_back(slots - rows + r);
    batch.q = q.data();
    batch.q_stride = int64_t(n_kv) * G * D;
    batch.q_pos = qpos.data();
    batch.out = out.data();
    batch.out_stride = batch.q_stride;
    batch.n_group = G;
    batch.head_dim = D;
    batch.scale = 1.0f / std::sqrt(float(D));
    batch.jobs = jobs.data();
    batch.n_jobs = int32_t(jobs.size());
    batch.page_ids = ids.data();
  }
  double kv_bytes() const { return 2.0 * n_kv * slots * double(kv_row_bytes(kv->layout().type, D)); }
};

constexpr KVType kBenchKV[] = {KVType::F32, KVType::F16, KVType::BF16, KVType::Q8_0};

void run_attention(benchmark::State& st, int D, int G, int n_kv) {
  const KVType type = kBenchKV[st.range(3)];
  auto be = make_cpu_backend(int(st.range(2)));
  AttnSetup a(*be, type, D, G, n_kv, int(st.range(0)), int(st.range(1)));
  for (auto _ : st) {
    be->attention(*a.kv, a.batch);
    benchmark::DoNotOptimize(a.out.data());
  }
  st.SetLabel(kv_type_name(type));
  st.counters["GB/s"] = benchmark::Counter(a.kv_bytes(), benchmark::Counter::kIsIterationInvariantRate);
  // QK and PV multiply-adds over all (row, head, slot) triples (the causal tail counted as full): 1e9 flops.
  st.counters["GFLOP/s"] = benchmark::Counter(4e-9 * a.rows * a.n_kv * a.G * double(a.slots) * a.D,
                                              benchmark::Counter::kIsIterationInvariantRate);
}
// args: slots, rows, threads, kv (0 f32, 1 f16, 2 bf16, 3 q8_0). retrieval-14m-like heads: 2 KV x 2, dim 64.
void BM_Attention(benchmark::State& st) { run_attention(st, 64, 2, 2); }
BENCHMARK(BM_Attention)
    ->ArgNames({"slots", "rows", "thr", "kv"})
    ->ArgsProduct({{512, 4096, 32768, 131072}, {1}, {1, 2}, {0, 1, 2, 3}})
    ->ArgsProduct({{512}, {512}, {1, 2}, {0, 1, 3}})
    ->UseRealTime();
// Llama-3-8B-like heads: 8 KV x 4, dim 128 (one layer).
void BM_AttentionL8B(benchmark::State& st) { run_attention(st, 128, 4, 8); }
BENCHMARK(BM_AttentionL8B)
    ->ArgNames({"slots", "rows", "thr", "kv"})
    ->ArgsProduct({{4096, 32768}, {1}, {1, 2}, {0, 1, 3}})
    ->UseRealTime();

// Llama-3.2-1B-like heads: 8 KV x 4, dim 64 (one layer); 4096 cached slots, decode (1 row) and a prefill
// step of 128 rows at depth 4096 (4224 slots); decode over 65536 slots reads 128 MiB of F16 K/V, what
// all 16 layers of the 1B shape read per token at depth 4096 (more than the last-level cache).
void BM_AttentionL1B(benchmark::State& st) { run_attention(st, 64, 4, 8); }
BENCHMARK(BM_AttentionL1B)
    ->ArgNames({"slots", "rows", "thr", "kv"})
    ->Args({4096, 1, 1, 1})
    ->Args({4096, 1, 2, 1})
    ->Args({4224, 128, 1, 1})
    ->Args({4224, 128, 2, 1})
    ->Args({65536, 1, 1, 1})
    ->Args({65536, 1, 2, 1})
    ->UseRealTime();

// One forward pass of a retrieval-14m-like model: args n (tokens), threads. Context = n tokens.
void BM_ModelStep(benchmark::State& st) {
  const int64_t n = st.range(0);
  auto be = make_cpu_backend(int(st.range(1)));
  const int64_t dim = 256, ffn = 768, L = 8, vocab = 32000, hd = 64, nh = 4, nkv = 2;
  struct Layer {
    Weight wq, wk, wv, wo, w1, w3, w2;
  };
  std::vector<Layer> layers;
  for (int64_t l = 0; l < L; ++l)
    layers.push_back({make_weight(DType::Q8_0, dim, dim, uint32_t(10 * l + 1)),
                      make_weight(DType::Q8_0, nkv * hd, dim, uint32_t(10 * l + 2)),
                      make_weight(DType::Q8_0, nkv * hd, dim, uint32_t(10 * l + 3)),
                      make_weight(DType::Q8_0, dim, dim, uint32_t(10 * l + 4)),
                      make_weight(DType::Q8_0, ffn, dim, uint32_t(10 * l + 5)),
                      make_weight(DType::Q8_0, ffn, dim, uint32_t(10 * l + 6)),
                      make_weight(DType::Q8_0, dim, ffn, uint32_t(10 * l + 7))});
  const Weight out_w = make_weight(DType::Q8_0, vocab, dim, 99);
  std::vector<float> x = random_vec(size_t(n * dim), 1), h(size_t(n * dim)), q(size_t(n * dim)), k(size_t(n * nkv * hd)),
                     v(k.size()), att(size_t(n * dim)), g(size_t(n * ffn)), u(size_t(n * ffn)), logits(static_cast<size_t>(vocab)),
                     norm_w(size_t(dim), 1.0f);
  std::vector<int32_t> pos(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) pos[size_t(i)] = int32_t(i);
  // The cache of one layer: the n tokens themselves (decode: pretend 128 tokens of context).
  AttnSetup cache(*be, KVType::F16, int(hd), int(nh / nkv), int(nkv), int(std::max<int64_t>(n, 128)), int(n));
  RopeParams rp;
  rp.n_rot = int(hd);
  for (auto _ : st) {
    for (const Layer& ly : layers) {
      be->rmsnorm(x.data(), norm_w.data(), n, dim, 1e-5f, h.data());
      be->matmul(ly.wq.view, h.data(), n, q.data());
      be->matmul(ly.wk.view, h.data(), n, k.data());
      be->matmul(ly.wv.view, h.data(), n, v.data());
      be->rope(q.data(), n, nh, hd, pos.data(), rp);
      be->rope(k.data(), n, nkv, hd, pos.data(), rp);
      be->attention(*cache.kv, cache.batch);
      be->matmul(ly.wo.view, cache.out.data(), n, att.data());
      be->add(x.data(), att.data(), n * dim);
      be->rmsnorm(x.data(), norm_w.data(), n, dim, 1e-5f, h.data());
      be->matmul(ly.w1.view, h.data(), n, g.data());
      be->matmul(ly.w3.view, h.data(), n, u.data());
      be->swiglu(g.data(), u.data(), n * ffn, g.data());
      be->matmul(ly.w2.view, g.data(), n, att.data());
      be->add(x.data(), att.data(), n * dim);
    }
    be->rmsnorm(x.data() + (n - 1) * dim, norm_w.data(), 1, dim, 1e-5f, h.data());
    be->matmul(out_w.view, h.data(), 1, logits.data());  // logits of the last token only
    benchmark::DoNotOptimize(logits.data());
    for (auto& e : x) e = std::tanh(e);  // keep activations bounded
  }
  st.counters["tok/s"] = benchmark::Counter(double(n), benchmark::Counter::kIsIterationInvariantRate);
}
BENCHMARK(BM_ModelStep)->ArgNames({"n", "thr"})->ArgsProduct({{1, 512}, {1, 2}})->UseRealTime();

}  // namespace

BENCHMARK_MAIN();
