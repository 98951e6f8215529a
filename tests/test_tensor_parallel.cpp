// Tensor parallelism on the CPU (docs/tensor-parallel.md): the in-process all-reduce, the head placement, the
// split pool, and the sharded forward pass of every bundled model at world sizes 1, 2 and 4 (where they divide
// the KV heads) against the unsharded run, and with mixed per-head policies placed by bytes (2, 3 and 4 ranks).
//
// The bound. A sharded step computes the same products as the unsharded one; what changes is the float32
// summation order of the two projections before an all-reduce (attn_output over the query heads, ffn_down over
// the MLP columns): each rank sums its share, then the shares are added in rank order. Everything else is the
// same per element (the embedding all-reduce adds exact zeros; norms, RoPE, each head's attention and each
// vocabulary row's logit are unchanged; the column slices start on weight blocks, so Q8_0's activation blocks
// are the same blocks). A reordered float32 sum of m terms moves by up to about m * 2^-24 of the sum of their
// magnitudes, and the layers carry that forward; so:
//   float weights (F32/F16/BF16, and Q8_0 models widened to F32): |logit - unsharded| <= 2e-3 * max(1, max
//     |unsharded logit|) (largest seen: 5.7e-4, the 14M model over 1000+ token prompts; others <= 1e-4);
//   Q8_0 weights as stored: the CPU quantizes activations to 8 bits per 32-value block, a discontinuous step:
//     an ulp of difference now and then flips one rounding (1/254 of the block's maximum), and from then on
//     the two runs differ by the activation rounding noise itself, the same noise that separates either run
//     from the float64 reference (golden/README.md). Bound: 5e-2 * max(1, max |logit|) (largest seen: 2.1e-2).
// Both: the argmax is identical in every row where the unsharded top-1 leads by >= 1.0, and greedy decoding
// gives the golden tokens over each case's stable prefix (margins >= 0.25), as tests/test_golden.cpp asserts
// for the unsharded run. Runs are deterministic (the in-process all-reduce sums in rank order): two sharded
// runs are bitwise the same, and one rank is bitwise the plain runner.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <fstream>
#include <random>
#include <atomic>
#include <chrono>
#include <thread>

#include <nlohmann/json.hpp>

#include "backend/comm.h"
#include "backend/registry.h"
#include "engine/kv_setup.h"
#include "engine/sampler.h"
#include "engine/stack.h"
#include "kv/placement.h"
#include "model/model.h"
#include "model/slice.h"
#include "test_util.h"

using namespace headroom;
using nlohmann::json;

namespace {

constexpr double kRelBound = 2e-3;
constexpr double kQ8RelBound = 0.05;
constexpr double kArgmaxMargin = 1.0;

json load_json(const std::string& path) {
  std::ifstream f(path);
  return json::parse(f);
}

// ---- the communicator ----------------------------------------------------------------------------------------

TEST(TensorParallel, InProcessAllReduceSumsInRankOrder) {
  auto be = make_cpu_backend(1);
  constexpr int R = 3;
  constexpr int64_t N = 1001;
  auto group = make_in_process_group(R);
  std::vector<std::vector<float>> bufs(R, std::vector<float>(N));
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> u(-1, 1);
  for (int r = 0; r < R; ++r)
    for (int64_t i = 0; i < N; ++i) bufs[r][size_t(i)] = u(rng) * (r == 1 ? 1e-7f : 1e7f);  // order matters
  std::vector<float> want(N);
  for (int64_t i = 0; i < N; ++i) want[size_t(i)] = (bufs[0][size_t(i)] + bufs[1][size_t(i)]) + bufs[2][size_t(i)];
  std::vector<std::thread> ts;
  for (int r = 0; r < R; ++r) ts.emplace_back([&, r] { group[size_t(r)]->all_reduce_sum(*be, bufs[size_t(r)].data(), N); });
  for (auto& t : ts) t.join();
  for (int r = 0; r < R; ++r)
    for (int64_t i = 0; i < N; ++i) ASSERT_EQ(bufs[size_t(r)][size_t(i)], want[size_t(i)]) << "rank " << r << " element " << i;
}

TEST(TensorParallel, AllReduceWithDifferentCountsFailsOnEveryRank) {
  auto be = make_cpu_backend(1);
  auto group = make_in_process_group(2);
  std::vector<float> a(8), b(8);
  int failed = 0;
  std::thread t([&] {
    try {
      group[1]->all_reduce_sum(*be, b.data(), 7);
    } catch (const Error&) {
      ++failed;
    }
  });
  try {
    group[0]->all_reduce_sum(*be, a.data(), 8);
  } catch (const Error& e) {
    ++failed;
    EXPECT_NE(std::string(e.what()).find("rank 1 sums 7"), std::string::npos) << e.what();
  }
  t.join();
  EXPECT_EQ(failed, 2);
}

// A rank that fails leaves the group: the others' all-reduces throw GroupLeft instead of waiting forever.
TEST(TensorParallel, AnAbandonedRankDoesNotBlockTheOthers) {
  auto be = make_cpu_backend(1);
  auto group = make_in_process_group(3);
  std::vector<std::vector<float>> bufs(3, std::vector<float>(16, 1.0f));
  std::atomic<int> left{0};
  std::vector<std::thread> ts;
  for (int r = 0; r < 2; ++r)
    ts.emplace_back([&, r] {
      try {
        for (int i = 0; i < 3; ++i) group[size_t(r)]->all_reduce_sum(*be, bufs[size_t(r)].data(), 16);
      } catch (const GroupLeft&) {
        ++left;
      }
    });
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  group[2]->abandon();  // rank 2 fails before its first all-reduce
  for (auto& t : ts) t.join();
  EXPECT_EQ(left.load(), 2);
}

// ---- placement -------------------------------------------------------------------------------------------------

ModelConfig four_kv_heads(int layers = 3) {
  ModelConfig c;
  c.n_layer = layers;
  c.n_head = 8;
  c.n_head_kv = 4;
  c.head_dim = 64;
  c.n_embd = 512;
  return c;
}

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

TEST(TensorParallel, RankCountsTheModelDoesNotAllowGiveOneLine) {
  const ModelConfig c = four_kv_heads();
  EXPECT_EQ(error_of([&] { check_tensor_parallel(c, 2, false); }), "");
  EXPECT_EQ(error_of([&] { check_tensor_parallel(c, 4, false); }), "");
  std::string e = error_of([&] { check_tensor_parallel(c, 3, false); });
  EXPECT_NE(e.find("does not divide the model's 4 KV heads"), std::string::npos) << e;
  EXPECT_NE(e.find("use 1, 2, 4"), std::string::npos) << e;
  EXPECT_EQ(error_of([&] { check_tensor_parallel(c, 3, true); }), "") << "a head map may split unevenly";
  e = error_of([&] { check_tensor_parallel(c, 5, true); });
  EXPECT_NE(e.find("at most 4 ranks"), std::string::npos) << e;
  e = error_of([&] { check_tensor_parallel(c, 0, false); });
  EXPECT_NE(e.find("out of range"), std::string::npos) << e;
  for (const std::string& s : {error_of([&] { check_tensor_parallel(c, 3, false); }),
                               error_of([&] { check_tensor_parallel(c, 5, true); })})
    EXPECT_EQ(s.find('\n'), std::string::npos) << s;
}

TEST(TensorParallel, ContiguousPlacementWithoutAHeadMap) {
  const ModelConfig c = four_kv_heads();
  std::vector<PolicySpec> specs(size_t(c.n_layer) * c.n_head_kv);
  TPPlan p = place_heads(c, specs, 2, false, 1024, 32, 64, 128);
  for (int l = 0; l < c.n_layer; ++l) {
    EXPECT_EQ(p.heads(0, l), (std::vector<int32_t>{0, 1}));
    EXPECT_EQ(p.heads(1, l), (std::vector<int32_t>{2, 3}));
  }
  EXPECT_EQ(p.held_bytes[0], p.held_bytes[1]);
}

// A head map whose full heads are the first two of every layer: a contiguous split puts them all on rank 0;
// the balanced placement gives each rank one full and one streaming head per layer.
TEST(TensorParallel, HeadMapPlacementBalancesKVBytes) {
  const ModelConfig c = four_kv_heads();
  PolicySpec full, stream;
  stream.kind = PolicyKind::Streaming;
  stream.sinks = 4;
  stream.window = 60;
  std::vector<PolicySpec> specs;
  for (int l = 0; l < c.n_layer; ++l)
    for (int h = 0; h < c.n_head_kv; ++h) specs.push_back(h < 2 ? full : stream);
  const TPPlan contiguous = place_heads(c, specs, 2, false, 4096, 32, 64, 128);
  const TPPlan balanced = place_heads(c, specs, 2, true, 4096, 32, 64, 128);
  EXPECT_GT(contiguous.held_bytes[0], 5 * contiguous.held_bytes[1]);
  EXPECT_EQ(balanced.held_bytes[0], balanced.held_bytes[1]);
  EXPECT_EQ(balanced.read_bytes[0], balanced.read_bytes[1]);
  for (int l = 0; l < c.n_layer; ++l)
    for (int r = 0; r < 2; ++r) {
      std::vector<int32_t> h = balanced.heads(r, l);
      ASSERT_EQ(h.size(), 2u);
      EXPECT_LT(h[0], 2) << "one full head each";
      EXPECT_GE(h[1], 2) << "one streaming head each";
    }
  std::vector<std::string> lines = balanced.describe();
  ASSERT_EQ(lines.size(), 2u);
  EXPECT_NE(lines[0].find("tp rank 0: 6 KV heads (L0 "), std::string::npos) << lines[0];
  EXPECT_NE(lines[0].find("holds"), std::string::npos) << lines[0];
}

// Uneven (3 ranks, 4 heads): every rank keeps a head in every layer, and the bytes stay within one head's.
TEST(TensorParallel, UnevenPlacementGivesEveryRankAHeadOfEveryLayer) {
  const ModelConfig c = four_kv_heads(5);
  std::mt19937 rng(3);
  std::vector<PolicySpec> specs;
  for (int i = 0; i < c.n_layer * c.n_head_kv; ++i) {
    PolicySpec s;
    if (rng() % 3) {
      s.kind = PolicyKind::Streaming;
      s.window = 28 + int(rng() % 4) * 32;
    }
    specs.push_back(s);
  }
  const TPPlan p = place_heads(c, specs, 3, true, 2048, 32, 64, 128);
  for (int l = 0; l < c.n_layer; ++l)
    for (int r = 0; r < 3; ++r) EXPECT_FALSE(p.heads(r, l).empty()) << "rank " << r << " layer " << l;
  int64_t biggest = 0;
  for (const PolicySpec& s : specs) biggest = std::max(biggest, pages_needed({s}, 2048, 32, 64) * 2 * 32 * 128);
  const auto [lo, hi] = std::minmax_element(p.held_bytes.begin(), p.held_bytes.end());
  EXPECT_LE(*hi - *lo, biggest);
  int heads = 0;
  for (int32_t n : p.head_count) heads += n;
  EXPECT_EQ(heads, c.n_layer * c.n_head_kv);
}

// The pool's tiers split by need: device by device need, host by the larger of host and device need.
TEST(TensorParallel, PoolSplitFollowsTheHeadsNeeds) {
  const ModelConfig c = four_kv_heads(2);
  PolicySpec full, topk;
  topk.kind = PolicyKind::TopK;
  topk.offload = true;  // parks unchosen pages in the host tier
  std::vector<PolicySpec> specs;
  for (int l = 0; l < c.n_layer; ++l)
    for (int h = 0; h < c.n_head_kv; ++h) specs.push_back(h < 2 ? full : topk);
  const TPPlan p = place_heads(c, specs, 2, false, 1024, 32, 64, 128);  // contiguous: the topk heads on rank 1
  std::vector<int32_t> dev, host;
  split_pool_pages(p, specs, 1024, 32, 64, 1000, 600, dev, host);
  ASSERT_EQ(dev.size(), 2u);
  EXPECT_GE(dev[0] + dev[1], 1000);
  EXPECT_GT(dev[0], dev[1]) << "full heads need more device pages";
  EXPECT_EQ(host[1], 600) << "all of the parked pages are rank 1's";
  EXPECT_GE(host[0], 600 * dev[0] / (dev[0] + dev[1])) << "rank 0 keeps room to park its device pages";
}

// ---- the split pool -----------------------------------------------------------------------------------------

TEST(TensorParallel, SplitPoolKeepsEveryHeadsPagesInItsPart) {
  auto b0 = make_cpu_backend(1), b1 = make_cpu_backend(1);
  KVLayout l;
  l.type = KVType::F32;
  l.page_size = 4;
  l.head_dim = 8;
  l.device_pages = 5 + 3;
  l.host_pages = 2 + 4;
  PagePool pool({b0.get(), b1.get()}, l, {0, 1}, {5, 3}, {2, 4});
  EXPECT_EQ(pool.device_free(0), 5);
  EXPECT_EQ(pool.device_free(1), 3);
  const int32_t a = pool.alloc(1);
  EXPECT_EQ(pool.part_of(a), 1);
  EXPECT_GE(a, 5);  // part 1's device ids follow part 0's
  EXPECT_EQ(pool.local_id(a), a - 5);
  EXPECT_EQ(pool.global_id(1, pool.local_id(a)), a);
  const int32_t h = pool.offload(a);
  EXPECT_TRUE(pool.on_host(h));
  EXPECT_EQ(pool.part_of(h), 1);
  EXPECT_EQ(pool.local_id(h), 3 + (h - 8 - 2));  // after part 1's 3 device pages, in its own store
  EXPECT_EQ(pool.global_id(1, pool.local_id(h)), h);
  EXPECT_EQ(pool.host_free(0), 2);
  EXPECT_EQ(pool.host_free(1), 3);
  for (int i = 0; i < 3; ++i) EXPECT_GE(pool.alloc(1), 0);
  EXPECT_EQ(pool.alloc(1), -1) << "part 1 is full even though part 0 has room";
  EXPECT_GE(pool.alloc(0), 0);
  // A slot written through part 1's store reads back through the pool.
  const int32_t p = pool.alloc(0);
  const int32_t slot = pool.assign_slot(p, 9);
  pool.flush();
  std::vector<float> k(8, 0.5f), v(8, -0.25f), kk(4 * 8), vv(4 * 8);
  std::vector<int32_t> pos(4);
  const int32_t local_slot = pool.local_slot(slot), p9 = 9;
  b0->kv_store(pool.store(0), k.data(), v.data(), 1, 1, &local_slot, &p9);
  pool.read_page(p, kk.data(), vv.data(), pos.data());
  EXPECT_EQ(pos[0], 9);
  EXPECT_EQ(kk[0], 0.5f);
  EXPECT_EQ(vv[7], -0.25f);
}

// ---- weight slices ---------------------------------------------------------------------------------------------

// Every element of a slice equals the dequantized original, for row slices (a view, or gathered), column slices
// on block boundaries (blocks copied, the type kept) and off them (F32).
TEST(TensorParallel, WeightSlicesHoldExactlyTheirRowsAndColumns) {
  auto m = Model::load(test::shared("models/tinystories-656k-q8_0.gguf"));
  const WeightView w = m->layers[0].wo;  // Q8_0, 128 x 128
  ASSERT_EQ(w.type, DType::Q8_0);
  auto dense = [](const WeightView& v) {
    std::vector<float> out(size_t(v.rows * v.cols));
    for (int64_t r = 0; r < v.rows; ++r)
      dequantize_row(v.type, static_cast<const uint8_t*>(v.data) + size_t(r) * v.row_bytes, out.data() + r * v.cols, v.cols);
    return out;
  };
  const std::vector<float> full = dense(w);
  Owned owned;
  const WeightView one = slice_rows(w, {{16, 48}}, owned);
  EXPECT_EQ(one.data, static_cast<const uint8_t*>(w.data) + 16 * w.row_bytes) << "one range of rows is a view";
  EXPECT_TRUE(owned.empty());
  const Ranges rows = {{0, 16}, {64, 80}};
  const WeightView rs = slice_rows(w, rows, owned);
  const std::vector<float> got_rows = dense(rs);
  ASSERT_EQ(rs.rows, 32);
  for (int64_t i = 0; i < 32; ++i)
    for (int64_t j = 0; j < w.cols; ++j)
      ASSERT_EQ(got_rows[size_t(i * w.cols + j)], full[size_t((i < 16 ? i : 64 + i - 16) * w.cols + j)]);
  for (const Ranges& cols : {Ranges{{32, 64}, {96, 128}}, Ranges{{16, 40}, {100, 110}}}) {
    const WeightView cs = slice_cols(w, cols, owned);
    const bool aligned = cols[0].first % 32 == 0;
    EXPECT_EQ(cs.type, aligned ? DType::Q8_0 : DType::F32);
    EXPECT_EQ(cs.cols, total(cols));
    const std::vector<float> got = dense(cs);
    for (int64_t r = 0; r < w.rows; ++r) {
      int64_t k = 0;
      for (auto [b, e] : cols)
        for (int64_t c = b; c < e; ++c, ++k) ASSERT_EQ(got[size_t(r * cs.cols + k)], full[size_t(r * w.cols + c)]) << r << "," << c;
    }
  }
  EXPECT_EQ(slice_cols(w, {{0, w.cols}}, owned).data, w.data) << "all columns: the weight itself";
}

// ---- the sharded forward pass ----------------------------------------------------------------------------------

struct Sharded {
  std::vector<std::unique_ptr<Backend>> owned;
  std::vector<Backend*> ranks;
  TPPlan plan;
  std::unique_ptr<PagePool> pool;
  std::unique_ptr<Runner> runner;
};

// A runner of `world` CPU ranks (one thread each; cuda: CUDA ranks, make_rank_backends) with a pool split by
// the plan (world 0: the plain runner).
Sharded make_sharded(const Model& m, const KVSetup& s, int world, int chunk, bool cuda = false) {
  Sharded sh;
  if (world == 0) {
    sh.owned.push_back(cuda ? make_backend("cuda", 0) : make_cpu_backend(2));
    sh.pool = std::make_unique<PagePool>(*sh.owned[0], s.layout);
    sh.runner = std::make_unique<Runner>(m, *sh.owned[0], chunk);
    return sh;
  }
  sh.owned = make_rank_backends(cuda ? "cuda" : "cpu", world, world);
  for (auto& b : sh.owned) sh.ranks.push_back(b.get());
  const KVLayout& l = s.layout;
  sh.plan = place_heads(m.config(), s.specs, world, s.per_head, s.n_ctx, l.page_size, chunk, kv_row_bytes(l.type, l.head_dim));
  std::vector<int32_t> dev, host;
  split_pool_pages(sh.plan, s.specs, s.n_ctx, l.page_size, chunk, l.device_pages, l.host_pages, dev, host);
  KVLayout split = l;
  split.device_pages = split.host_pages = 0;
  for (int r = 0; r < world; ++r) {
    split.device_pages += dev[size_t(r)];
    split.host_pages += host[size_t(r)];
  }
  sh.pool = std::make_unique<PagePool>(sh.ranks, split, sh.plan.rank_of, dev, host);
  sh.runner = std::make_unique<Runner>(m, sh.ranks, sh.plan, chunk);
  return sh;
}

// Widens every Q8_0 weight of m to F32 (exact: the values are d * q), so that activations are no longer
// quantized; `keep` owns the copies.
void widen_to_f32(Model& m, std::vector<std::vector<float>>& keep) {
  auto widen = [&](WeightView& w) {
    if (w.type != DType::Q8_0) return;
    keep.emplace_back(size_t(w.rows * w.cols));
    for (int64_t r = 0; r < w.rows; ++r)
      dequantize_row(w.type, static_cast<const uint8_t*>(w.data) + size_t(r) * w.row_bytes,
                     keep.back().data() + r * w.cols, w.cols);
    w.type = DType::F32;
    w.data = keep.back().data();
    w.row_bytes = size_t(w.cols) * sizeof(float);
  };
  const bool tied = m.output.data == m.tok_embd.data;
  widen(m.tok_embd);
  if (tied) m.output = m.tok_embd;
  else widen(m.output);
  for (LayerWeights& L : m.layers)
    for (WeightView* w : {&L.wq, &L.wk, &L.wv, &L.wo, &L.gate, &L.up, &L.down}) widen(*w);
}

struct RunOut {
  std::vector<float> prompt_logits;  // every prompt row
  std::vector<std::vector<float>> decode_logits;
  std::vector<int32_t> greedy;
};

// The prompt in chunks (all logits), then n greedy tokens, or the given tokens (teacher forcing) if any.
RunOut run(const Model& m, const KVSetup& s, int world, const std::vector<int32_t>& prompt, int n,
           const std::vector<int32_t>& forced = {}, int chunk = 16, bool cuda = false) {
  Sharded sh = make_sharded(m, s, world, chunk, cuda);
  KVCache kv(m.config(), *sh.pool, s.specs);
  RunOut o;
  auto l = sh.runner->prefill(kv, prompt, 0, true);
  o.prompt_logits.assign(l.begin(), l.end());
  const size_t V = size_t(m.config().n_vocab);
  std::vector<float> last(o.prompt_logits.end() - ptrdiff_t(V), o.prompt_logits.end());
  for (int i = 0; i < n; ++i) {
    const int32_t id = forced.empty() ? Sampler::argmax(last) : forced[size_t(i)];
    o.greedy.push_back(id);
    if (i + 1 == n) break;
    auto d = sh.runner->decode(kv, id, int32_t(prompt.size()) + i);
    last.assign(d.begin(), d.end());
    o.decode_logits.push_back(last);
  }
  return o;
}

// max |a - b| over the rows, and the largest |b|.
std::pair<double, double> max_diff(const std::vector<float>& a, const std::vector<float>& b) {
  double d = 0, mx = 0;
  EXPECT_EQ(a.size(), b.size());
  for (size_t i = 0; i < std::min(a.size(), b.size()); ++i) {
    d = std::max(d, std::fabs(double(a[i]) - double(b[i])));
    mx = std::max(mx, std::fabs(double(b[i])));
  }
  return {d, mx};
}

// The bound of a comparison: float weights (or Q8_0 widened to F32), the summation-order bound; Q8_0 as stored,
// the activation-rounding bound (see the top of the file).
struct Bound {
  bool q8 = false;
  double worst_rel = 0, worst_gap = 0;  // the largest seen, for the log
};

// Largest change, over the reference's top-10 tokens, of the gap to the reference's top-1.
double top_gap_change(const std::vector<float>& got, const std::vector<float>& want, size_t V) {
  double worst = 0;
  for (size_t r = 0; r + V <= want.size(); r += V) {
    std::vector<int> idx(V);
    for (size_t i = 0; i < V; ++i) idx[i] = int(i);
    std::partial_sort(idx.begin(), idx.begin() + 10, idx.end(), [&](int a, int b) { return want[r + size_t(a)] > want[r + size_t(b)]; });
    const double g0 = got[r + size_t(idx[0])], w0 = want[r + size_t(idx[0])];
    for (int k = 1; k < 10; ++k)
      worst = std::max(worst, std::fabs((got[r + size_t(idx[size_t(k)])] - g0) - (want[r + size_t(idx[size_t(k)])] - w0)));
  }
  return worst;
}

void expect_close(const std::vector<float>& got, const std::vector<float>& want, size_t V, Bound& b,
                  const std::string& where) {
  auto [d, mx] = max_diff(got, want);
  const double rel = d / std::max(1.0, mx), gap = top_gap_change(got, want, V);
  b.worst_rel = std::max(b.worst_rel, rel);
  b.worst_gap = std::max(b.worst_gap, gap);
  EXPECT_LE(rel, b.q8 ? kQ8RelBound : kRelBound)
      << where << ": max |logit difference| " << d << " (largest logit " << mx << ")";
  // Argmax: identical in every row where the reference's top-1 leads by kArgmaxMargin or more.
  for (size_t r = 0; r + V <= want.size(); r += V) {
    const auto w = want.begin() + ptrdiff_t(r), g = got.begin() + ptrdiff_t(r);
    const size_t top = size_t(std::max_element(w, w + ptrdiff_t(V)) - w);
    float second = -INFINITY;
    for (size_t i = 0; i < V; ++i)
      if (i != top) second = std::max(second, w[ptrdiff_t(i)]);
    if (w[ptrdiff_t(top)] - second < kArgmaxMargin) continue;
    EXPECT_EQ(size_t(std::max_element(g, g + ptrdiff_t(V)) - g), top) << where << " row " << r / V;
  }
}

class ShardedModel : public ::testing::TestWithParam<std::string> {};

bool has_q8(const Model& m) {
  return m.layers[0].wq.type == DType::Q8_0 || m.layers[0].down.type == DType::Q8_0 || m.tok_embd.type == DType::Q8_0;
}

// Every golden case: all prompt logits and the greedy continuation, at every world size that divides the KV
// heads, against the unsharded runner; world 1 through the tensor-parallel path must be bitwise the same.
// Q8_0 models run twice: as stored, and widened to F32 (then the float bound holds).
void check_sharded(const std::string& golden, bool widen) {
  const json g = load_json(test::shared("golden/" + golden));
  auto m = Model::load(test::shared(g["model"].get<std::string>()));
  std::vector<std::vector<float>> keep;
  Bound bound;
  bound.q8 = has_q8(*m);
  if (widen) {
    EXPECT_TRUE(bound.q8) << golden << " has no Q8_0 weights to widen";
    widen_to_f32(*m, keep);
    bound.q8 = false;
  }
  const ModelConfig& c = m->config();
  const size_t V = size_t(c.n_vocab);
  std::string worlds;
  for (const json& cs : g["cases"]) {
    const std::vector<int32_t> ids = cs["prompt_ids"].get<std::vector<int32_t>>();
    const std::vector<int32_t> want = cs["greedy"]["ids"].get<std::vector<int32_t>>();
    const int stable = cs["greedy"]["stable"].get<int>();
    const int n = std::max(stable, 8);
    KVOptions o;
    o.page_size = 8;
    KVSetup s = plan_kv(*m, o, int64_t(ids.size()) + n + 1);
    const RunOut ref = run(*m, s, 0, ids, n);
    for (int w : {1, 2, 4}) {
      if (w > c.n_head_kv || c.n_head_kv % w) continue;
      if (worlds.find(std::to_string(w)) == std::string::npos) worlds += (worlds.empty() ? "" : ",") + std::to_string(w);
      const std::string where = fmt::format("{}{} case {} world {}", golden, widen ? " (widened)" : "",
                                            cs["name"].get<std::string>(), w);
      // The reference's own tokens fed to both, so every decode step compares like with like.
      const RunOut got = run(*m, s, w, ids, n, ref.greedy);
      if (w == 1) {
        EXPECT_EQ(got.prompt_logits, ref.prompt_logits) << where << ": one rank is the plain runner";
        EXPECT_EQ(got.decode_logits, ref.decode_logits) << where;
      }
      expect_close(got.prompt_logits, ref.prompt_logits, V, bound, where + " prompt");
      for (size_t i = 0; i < got.decode_logits.size(); ++i)
        expect_close(got.decode_logits[i], ref.decode_logits[i], V, bound, where + fmt::format(" decode step {}", i));
      // Greedy on its own: the golden tokens over the stable prefix.
      if (!widen) {
        const RunOut free = run(*m, s, w, ids, stable);
        for (int i = 0; i < stable; ++i)
          ASSERT_EQ(free.greedy[size_t(i)], want[size_t(i)]) << where << " greedy token " << i;
      }
    }
  }
  std::printf("[ tp ] %s%s, worlds %s: largest |logit difference| / max(1, |logit|) %.3g, top-10 gap change %.3g (%s)\n",
              golden.c_str(), widen ? " widened to f32" : "", worlds.c_str(), bound.worst_rel, bound.worst_gap,
              bound.q8 ? "q8_0 activations" : "float");
}

TEST_P(ShardedModel, MatchesTheUnshardedRun) { check_sharded(GetParam(), false); }
class ShardedQ8Model : public ::testing::TestWithParam<std::string> {};
TEST_P(ShardedQ8Model, WidenedToF32MatchesWithinTheFloatBound) { check_sharded(GetParam(), true); }

INSTANTIATE_TEST_SUITE_P(AllModels, ShardedModel,
                         ::testing::ValuesIn(test::golden_files()),
                         test::golden_test_name<::testing::TestParamInfo<std::string>>);
INSTANTIATE_TEST_SUITE_P(Q8Models, ShardedQ8Model,
                         ::testing::Values("tinystories-656k-q8_0.json", "retrieval-14m-q8_0.json",
                                           "rand-llama3-ropefreqs-q8_0.json"),
                         test::golden_test_name<::testing::TestParamInfo<std::string>>);

// ---- on CUDA ranks (where a GPU is; tests/test_backend_ops.cpp checks the ops themselves) ---------------------

// Sets an environment variable for a scope.
struct ScopedEnv {
  ScopedEnv(const char* name, const char* value) : name_(name) {
    if (const char* old = std::getenv(name)) old_ = old, had_ = true;
    setenv(name, value, 1);
  }
  ~ScopedEnv() { had_ ? setenv(name_, old_.c_str(), 1) : unsetenv(name_); }
  const char* name_;
  std::string old_;
  bool had_ = false;
};

// Every golden case on CUDA ranks against the plain CUDA runner:
// - world 1 through NCCL (HEADROOM_TP_COMM=nccl, issue 17's world-size-1 check) is bitwise the plain runner;
// - world 2 and 4 on one GPU (HEADROOM_TP_COMM=threads: CUDA ranks sharing GPU 0, summed through the host):
//   the sharded CUDA forward (slices, placement, split pools) within the bounds above, and the argmax rule;
// - world 2 over NCCL where there are 2 GPUs or more.
// NCCL is found at run time (HEADROOM_NCCL_LIB or libnccl.so.2); without it the NCCL checks fail, they do not
// skip, on a machine with a GPU.
TEST(CudaTensorParallel, ShardedCudaRanksMatchThePlainCudaRunner) {
  if (cuda_gpus() == 0) GTEST_SKIP() << "no usable GPU here (" << cuda_unavailable() << ")";
  for (const std::string& golden : test::golden_files()) {
    const json g = load_json(test::shared("golden/" + golden));
    auto m = Model::load(test::shared(g["model"].get<std::string>()));
    const ModelConfig& c = m->config();
    const size_t V = size_t(c.n_vocab);
    Bound bound;
    bound.q8 = has_q8(*m);
    const json& cs = g["cases"][0];
    const std::vector<int32_t> ids = cs["prompt_ids"].get<std::vector<int32_t>>();
    const int n = 8;
    KVOptions o;
    o.page_size = 8;
    KVSetup s = plan_kv(*m, o, int64_t(ids.size()) + n + 1);
    const RunOut ref = run(*m, s, 0, ids, n, {}, 16, /*cuda=*/true);
    {
      ScopedEnv e("HEADROOM_TP_COMM", "nccl");
      const RunOut got = run(*m, s, 1, ids, n, ref.greedy, 16, true);
      EXPECT_EQ(got.prompt_logits, ref.prompt_logits) << golden << ": NCCL world 1 is the plain CUDA runner";
      EXPECT_EQ(got.decode_logits, ref.decode_logits) << golden << ": NCCL world 1 is the plain CUDA runner";
    }
    for (int w : {2, 4}) {
      if (w > c.n_head_kv || c.n_head_kv % w) continue;
      for (const char* comm : {"threads", "nccl"}) {
        if (std::string(comm) == "nccl" && cuda_gpus() < w) continue;
        ScopedEnv e("HEADROOM_TP_COMM", comm);
        const std::string where = fmt::format("{} on CUDA, world {} ({})", golden, w, comm);
        const RunOut got = run(*m, s, w, ids, n, ref.greedy, 16, true);
        expect_close(got.prompt_logits, ref.prompt_logits, V, bound, where + " prompt");
        for (size_t i = 0; i < got.decode_logits.size(); ++i)
          expect_close(got.decode_logits[i], ref.decode_logits[i], V, bound, where + fmt::format(" decode step {}", i));
      }
    }
    std::printf("[ tp cuda ] %s: largest |logit difference| / max(1, |logit|) %.3g (%s)\n", golden.c_str(),
                bound.worst_rel, bound.q8 ? "q8_0 activations" : "float");
  }
}

// Mixed per-head policies (full, streaming, topk with page selection, evict with scores) placed by their
// bytes, evenly and unevenly: the sharded run matches the unsharded one with the same policies, and two
// sharded runs are bitwise the same.
void check_mixed(const std::string& model, int world, bool widen = false) {
  auto m = Model::load(test::shared(model));
  std::vector<std::vector<float>> keep;
  Bound bound;
  bound.q8 = has_q8(*m) && !widen;
  if (widen) widen_to_f32(*m, keep);
  const ModelConfig& c = m->config();
  std::vector<PolicySpec> specs;
  for (int i = 0; i < c.n_layer * c.n_head_kv; ++i) {
    PolicySpec s;
    switch (i % 4) {
      case 0: break;  // full
      case 1: s.kind = PolicyKind::Streaming, s.sinks = 4, s.window = 44; break;
      case 2: s.kind = PolicyKind::TopK, s.topk_pages = 2, s.recent_pages = 1; break;
      case 3: s.kind = PolicyKind::Evict, s.sinks = 4, s.window = 16, s.budget = 64; break;
    }
    specs.push_back(s);
  }
  std::vector<int32_t> prompt;
  std::mt19937 rng(11);
  prompt.push_back(1);
  for (int i = 0; i < 150; ++i) prompt.push_back(int32_t(3 + rng() % uint32_t(std::min(c.n_vocab, 400) - 3)));
  const int n = 24;
  KVOptions o;
  o.page_size = 8;
  o.chunk = 16;
  KVSetup s = plan_kv_specs(*m, specs, o, int64_t(prompt.size()) + n + 1, "mixed");
  const RunOut ref = run(*m, s, 0, prompt, n);
  const RunOut a = run(*m, s, world, prompt, n, ref.greedy);
  const RunOut b = run(*m, s, world, prompt, n, ref.greedy);
  const std::string where = fmt::format("{} mixed policies world {}", model, world);
  EXPECT_EQ(a.prompt_logits, b.prompt_logits) << where << ": not reproducible";
  EXPECT_EQ(a.decode_logits, b.decode_logits) << where << ": not reproducible";
  expect_close(a.prompt_logits, ref.prompt_logits, size_t(c.n_vocab), bound, where + " prompt");
  for (size_t i = 0; i < a.decode_logits.size(); ++i)
    expect_close(a.decode_logits[i], ref.decode_logits[i], size_t(c.n_vocab), bound, where + fmt::format(" decode step {}", i));
  std::printf("[ tp ] %s: largest |logit difference| / max(1, |logit|) %.3g, top-10 gap change %.3g\n", where.c_str(),
              bound.worst_rel, bound.worst_gap);
}

TEST(TensorParallel, MixedPoliciesTwoRanks) { check_mixed("models/retrieval-14m-q8_0.gguf", 2); }
TEST(TensorParallel, MixedPoliciesUnevenThreeRanks) { check_mixed("models/stories260K.gguf", 3); }
TEST(TensorParallel, MixedPoliciesFourRanks) { check_mixed("models/tinystories-656k-q8_0.gguf", 4); }
TEST(TensorParallel, MixedPoliciesWidenedToF32) {
  check_mixed("models/retrieval-14m-q8_0.gguf", 2, true);
  check_mixed("models/tinystories-656k-q8_0.gguf", 4, true);
}

// A CPU backend whose matmul fails from call `fail_at` on (a rank failing mid-step).
class FailingBackend final : public Backend {
 public:
  explicit FailingBackend(int fail_at) : in_(make_cpu_backend(1)), fail_at_(fail_at) {}
  const char* name() const override { return "cpu"; }
  int threads() const override { return 1; }
  void matmul(const WeightView& w, const float* x, int64_t n, float* y) override {
    if (++calls_ >= fail_at_) fail("injected matmul failure");
    in_->matmul(w, x, n, y);
  }
  void embed(const WeightView& w, const int32_t* ids, int64_t n, float* out) override { in_->embed(w, ids, n, out); }
  void rmsnorm(const float* x, const float* w, int64_t n, int64_t d, float eps, float* out) override { in_->rmsnorm(x, w, n, d, eps, out); }
  void rope(float* x, int64_t n, int64_t h, int64_t hd, const int32_t* pos, const RopeParams& p) override { in_->rope(x, n, h, hd, pos, p); }
  void swiglu(const float* g, const float* u, int64_t c, float* out) override { in_->swiglu(g, u, c, out); }
  void add(float* x, const float* y, int64_t c) override { in_->add(x, y, c); }
  void add_bias(float* x, const float* b, int64_t n, int64_t d) override { in_->add_bias(x, b, n, d); }
  void* alloc(size_t b) override { return in_->alloc(b); }
  void free(void* p) override { in_->free(p); }
  void upload(void* d, const void* s, size_t b) override { in_->upload(d, s, b); }
  void scatter_i32(int32_t* d, size_t len, std::span<const int32_t> pairs) override { in_->scatter_i32(d, len, pairs); }
  void download(void* d, const void* s, size_t b) override { in_->download(d, s, b); }
  void synchronize() override { in_->synchronize(); }
  std::unique_ptr<KVStore> kv_create(const KVLayout& l) override { return in_->kv_create(l); }
  void kv_reset(KVStore& kv, std::span<const int32_t> ids) override { in_->kv_reset(kv, ids); }
  void kv_copy_pages(KVStore& kv, std::span<const PageCopy> c) override { in_->kv_copy_pages(kv, c); }
  void kv_copy_slots(KVStore& kv, std::span<const SlotCopy> c) override { in_->kv_copy_slots(kv, c); }
  void kv_store(KVStore& kv, const float* k, const float* v, int64_t n, int h, const int32_t* s, const int32_t* p) override {
    in_->kv_store(kv, k, v, n, h, s, p);
  }
  void kv_read_scores(KVStore& kv, std::span<const int32_t> ids, float* out) override { in_->kv_read_scores(kv, ids, out); }
  void kv_read_page(KVStore& kv, int32_t id, float* k, float* v, int32_t* pos) override { in_->kv_read_page(kv, id, k, v, pos); }
  void select_pages(KVStore& kv, const AttnBatch& b) override { in_->select_pages(kv, b); }
  void attention(KVStore& kv, const AttnBatch& b) override { in_->attention(kv, b); }

 private:
  std::unique_ptr<Backend> in_;
  int fail_at_, calls_ = 0;
};

// A rank failing in the middle of a step: the step reports its error (not the others' GroupLeft), nothing
// hangs, and the runner refuses further steps.
TEST(TensorParallel, ARankFailingMidStepReportsItsErrorWithoutHanging) {
  auto m = Model::load(test::shared("models/stories260K.gguf"));
  KVOptions o;
  o.page_size = 8;
  KVSetup s = plan_kv(*m, o, 64);
  auto b0 = make_cpu_backend(1);
  FailingBackend b1(9);  // rank 1 fails in layer 1's attention block, after two all-reduces
  std::vector<Backend*> ranks = {b0.get(), &b1};
  TPPlan plan = place_heads(m->config(), s.specs, 2, false, s.n_ctx, o.page_size, 16, kv_row_bytes(s.layout.type, s.layout.head_dim));
  std::vector<int32_t> dev, host;
  split_pool_pages(plan, s.specs, s.n_ctx, o.page_size, 16, s.layout.device_pages, s.layout.host_pages, dev, host);
  KVLayout l = s.layout;
  l.device_pages = dev[0] + dev[1];
  l.host_pages = host[0] + host[1];
  PagePool pool(ranks, l, plan.rank_of, dev, host);
  Runner r(*m, ranks, plan, 16);
  KVCache kv(m->config(), pool, s.specs);
  const std::vector<int32_t> prompt = {1, 20, 30};
  EXPECT_EQ(error_of([&] { r.prefill(kv, prompt, 0); }), "injected matmul failure");
  KVCache kv2(m->config(), pool, s.specs);
  EXPECT_NE(error_of([&] { r.prefill(kv2, prompt, 0); }).find("cannot step again"), std::string::npos);
}

// The engine stack with several ranks, batching three requests two at a time: the same logits as one rank.
std::vector<std::vector<std::vector<float>>> engine_logits(const Model& m, const std::vector<Backend*>& ranks,
                                                           const std::vector<std::vector<int32_t>>& forced) {
  KVOptions o;
  o.page_size = 8;
  o.chunk = 16;
  EngineStack st(m, ranks, plan_kv(m, o, 128), 2, o.chunk);
  EXPECT_EQ(st.tp.world, int(ranks.size()));
  EXPECT_EQ(st.pool->n_parts(), int(ranks.size()));
  EXPECT_EQ(st.runner->world(), int(ranks.size()));
  std::vector<std::vector<std::vector<float>>> out(forced.size());
  st.engine->on_logits = [&](Sequence& s, std::span<const float> row) {
    out[size_t(s.req.tag)].emplace_back(row.begin(), row.end());
  };
  for (size_t i = 0; i < forced.size(); ++i) {
    Request q = st.request({1, int32_t(20 + i), int32_t(30 + 2 * i), 40, 41, 42});
    q.sampling.temp = 0;
    q.n_predict = int(forced[i].size());
    q.forced = forced[i];
    q.ignore_eos = true;
    q.tag = int64_t(i);
    st.engine->add(std::move(q));
  }
  st.engine->run();
  return out;
}

TEST(TensorParallel, EngineStackBatchesRequestsOverRanks) {
  auto m = Model::load(test::shared("models/tinystories-656k-q8_0.gguf"));
  std::vector<std::unique_ptr<Backend>> owned;
  std::vector<Backend*> ranks;
  for (int r = 0; r < 2; ++r) {
    owned.push_back(make_cpu_backend(1));
    ranks.push_back(owned.back().get());
  }
  std::vector<std::vector<int32_t>> forced = {{5, 6, 7, 8, 9, 10}, {11, 12, 13}, {14, 15, 16, 17, 18}};
  const auto ref = engine_logits(*m, {ranks[0]}, forced);
  const auto got = engine_logits(*m, ranks, forced);
  Bound bound;
  bound.q8 = has_q8(*m);
  ASSERT_EQ(got.size(), ref.size());
  for (size_t i = 0; i < ref.size(); ++i) {
    ASSERT_EQ(got[i].size(), ref[i].size());
    ASSERT_EQ(ref[i].size(), forced[i].size());
    for (size_t j = 0; j < ref[i].size(); ++j)
      expect_close(got[i][j], ref[i][j], size_t(m->config().n_vocab), bound, fmt::format("request {} token {}", i, j));
  }
  KVOptions o;
  std::string e = error_of([&] { EngineStack bad(*m, {ranks[0], ranks[1], ranks[0]}, plan_kv(*m, o, 128), 1, o.chunk); });
  EXPECT_NE(e.find("does not divide"), std::string::npos) << e;
}

}  // namespace
