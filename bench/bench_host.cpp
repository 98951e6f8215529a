// The host's work between two decode steps (Google Benchmark), which a GPU waits for:
//
// BM_PlanDecodeStep: planning one decode step, every sequence's KVCache::plan_step, the pool's flush and every
// finish_step, for the KV geometry of Llama-3-8B (32 layers x 8 KV heads of 128, F16, pages of 32 tokens) under
// `full`, at a depth and a number of sequences. Counters: table_written = page-table entries written (and
// uploaded) per step, table = entries in the table. The KV store is allocated but never touched.
// BM_Sample: one token from a row of 128256 logits (Llama 3's vocabulary), per sampler setting.
//
//   bench_host --benchmark_filter=BM_PlanDecodeStep/131072/1
#include <benchmark/benchmark.h>

#include <memory>
#include <vector>

#include <random>

#include "backend/backend.h"
#include "engine/sampler.h"
#include "kv/kv_cache.h"
#include "kv/page_pool.h"

namespace {

using namespace headroom;

// args: depth, sequences
void BM_PlanDecodeStep(benchmark::State& st) {
  const int depth = int(st.range(0)), n_seq = int(st.range(1)), layers = 32, n_kv = 8;
  ModelConfig c;
  c.n_layer = layers;
  c.n_head = 32;
  c.n_head_kv = n_kv;
  c.head_dim = 128;
  auto be = make_cpu_backend(1);
  KVLayout l;
  l.type = KVType::F16;
  l.page_size = 32;
  l.head_dim = 128;
  const int64_t steps = 520;  // pages for the depth and the steps the benchmark may run (its iterations)
  l.device_pages = int32_t(int64_t(layers) * n_kv * n_seq * ((depth + steps) / 32 + 2));
  PagePool pool(*be, l);
  const std::vector<PolicySpec> specs(size_t(layers) * n_kv);
  std::vector<std::unique_ptr<KVCache>> seqs;
  KVStep step;
  for (int s = 0; s < n_seq; ++s) {
    seqs.push_back(std::make_unique<KVCache>(c, pool, specs));
    for (int p = 0; p < depth; p += 2048) {
      const StepInfo si{p, std::min(2048, depth - p), true, p + 2048 >= depth};
      step.begin(layers, n_kv, si.n_rows);
      seqs.back()->plan_step(step, 0, si);
      pool.flush();
      seqs.back()->finish_step(step, si);
    }
  }
  int32_t pos = depth;
  std::vector<StepInfo> info(static_cast<size_t>(n_seq));
  auto decode_step = [&] {
    step.begin(layers, n_kv, n_seq);
    for (int s = 0; s < n_seq; ++s) {
      info[size_t(s)] = StepInfo{pos, 1, false, false};
      seqs[size_t(s)]->plan_step(step, s, info[size_t(s)]);
    }
    pool.flush();
    for (int s = 0; s < n_seq; ++s) seqs[size_t(s)]->finish_step(step, info[size_t(s)]);
    ++pos;
  };
  decode_step();  // the first step of the batch lays its table out (every entry written once)
  int64_t written = 0, n = 0;
  for (auto _ : st) {
    if (pos > depth + steps) {
      st.SkipWithError("ran past the pages set aside");
      break;
    }
    decode_step();
    written += step.n_written;
    ++n;
  }
  st.counters["table_written"] = double(written) / double(std::max<int64_t>(1, n));
  st.counters["table"] = double(step.page_ids.size());
}
BENCHMARK(BM_PlanDecodeStep)->Args({0, 1})->Args({8192, 1})->Args({131072, 1})->Args({8192, 32})
    ->Unit(benchmark::kMicrosecond)->Iterations(512);

// args: temp x 100, top_k, top_p x 100, min_p x 100
void BM_Sample(benchmark::State& st) {
  SamplerParams p;
  p.temp = float(st.range(0)) / 100;
  p.top_k = int(st.range(1));
  p.top_p = float(st.range(2)) / 100;
  p.min_p = float(st.range(3)) / 100;
  std::mt19937 rng(1);
  std::normal_distribution<float> nd(0.0f, 3.0f);
  std::vector<float> l(128256);
  for (auto& x : l) x = nd(rng);
  Sampler s(p);
  int64_t sum = 0;
  for (auto _ : st) sum += s.sample(l, {});
  benchmark::DoNotOptimize(sum);
}
BENCHMARK(BM_Sample)->ArgNames({"temp", "k", "p", "minp"})
    ->Args({0, 40, 95, 5})     // greedy
    ->Args({80, 40, 95, 5})    // llama.cpp's defaults
    ->Args({100, 0, 100, 0})   // temperature alone (an OpenAI client's default)
    ->Args({100, 0, 100, 5})   // min-p alone
    ->Args({100, 0, 90, 0})    // top-p alone (these logits are flat: ~60k candidates reach 0.9)
    ->Unit(benchmark::kMicrosecond);

}  // namespace

BENCHMARK_MAIN();
