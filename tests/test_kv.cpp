// Paged KV cache, per-head policies, head maps and budgets.
#include <gtest/gtest.h>

#include <cmath>
#include <fstream>
#include <random>

#include "engine/stack.h"
#include "engine/kv_setup.h"
#include "kv/head_map.h"
#include "kv/kv_cache.h"
#include "kv/page_pool.h"
#include "model/model.h"
#include "test_models.h"
#include "test_util.h"

using namespace headroom;

namespace {

using test::retrieval_model;
Backend& backend() { return test::cpu_backend(); }


// Logits of every position under the given per-head specs.
std::vector<float> logits_with(const std::vector<PolicySpec>& specs, const std::vector<int32_t>& ids, int page_size,
                               int chunk, const std::string& kv_type = "f16") {
  const Model& m = retrieval_model();
  KVOptions o;
  o.page_size = page_size;
  o.chunk = chunk;
  o.kv_type = kv_type;
  KVSetup s = plan_kv_specs(m, specs, o, int64_t(ids.size()) + 1, "test");
  PagePool pool(backend(), s.layout);
  KVCache kv(m.config(), pool, s.specs);
  Runner r(m, backend(), chunk);
  std::vector<float> out;
  // Prefill all but the last 8 tokens, then decode them one by one (both paths of every policy).
  const size_t pre = ids.size() - 8;
  auto l = r.prefill(kv, std::span<const int32_t>(ids.data(), pre), 0, true);
  out.assign(l.begin(), l.end());
  for (size_t i = pre; i < ids.size(); ++i) {
    auto d = r.decode(kv, ids[i], int32_t(i));
    out.insert(out.end(), d.begin(), d.end());
  }
  return out;
}

std::vector<PolicySpec> all(const PolicySpec& s) {
  const ModelConfig& c = retrieval_model().config();
  return std::vector<PolicySpec>(size_t(c.n_layer) * c.n_head_kv, s);
}

// A pool for the retrieval model with the metadata the specs' policies need, `device` device pages and as
// many host pages.
KVLayout layout_for(int ps, int32_t device, const std::vector<PolicySpec>& specs, KVType t = KVType::F16,
                    int head_dim = 0) {
  KVLayout l;
  l.type = t;
  l.page_size = ps;
  l.head_dim = head_dim ? head_dim : retrieval_model().config().head_dim;
  l.device_pages = device;
  l.host_pages = device;
  set_policy_metadata(l, specs);
  return l;
}

}  // namespace

TEST(PagePool, AllocReleaseCapacityAndTiers) {
  KVLayout l = layout_for(4, 3, {}, KVType::F32, 8);
  PagePool pool(backend(), l);
  int32_t a = pool.alloc(), b = pool.alloc(), c = pool.alloc();
  EXPECT_GE(a, 0);
  EXPECT_GE(c, 0);
  EXPECT_EQ(pool.alloc(), -1) << "capacity is a hard limit";
  EXPECT_EQ(pool.device_pages(), 3);
  // Write one token into page a through the backend op, as the model does.
  std::vector<float> k(8), v(8);
  for (int i = 0; i < 8; ++i) k[size_t(i)] = 42.0f + float(i), v[size_t(i)] = -float(i);
  int32_t slot = pool.assign_slot(a, 7), pos7 = 7;
  pool.flush();
  backend().kv_store(pool.store(), k.data(), v.data(), 1, 1, &slot, &pos7);
  const int32_t ha = pool.offload(a);
  EXPECT_TRUE(pool.on_host(ha));
  EXPECT_NE(ha, a) << "a page id is its place";
  EXPECT_EQ(pool.device_pages(), 2);
  EXPECT_EQ(pool.host_pages(), 1);
  std::vector<float> rk(4 * 8), rv(4 * 8);
  std::vector<int32_t> rp(4);
  pool.read_page(ha, rk.data(), rv.data(), rp.data());
  EXPECT_EQ(rk[0], 42.0f) << "data follows the page to the host tier";
  EXPECT_EQ(rv[7], -7.0f);
  EXPECT_EQ(rp, (std::vector<int32_t>{7, -1, -1, -1}));
  EXPECT_EQ(pool.used(ha), 1);
  int32_t d = pool.alloc();  // the freed device page is reusable, and empty
  EXPECT_GE(d, 0);
  pool.read_page(d, rk.data(), rv.data(), rp.data());
  EXPECT_EQ(rp, (std::vector<int32_t>{-1, -1, -1, -1})) << "a reused page starts empty";
  EXPECT_EQ(pool.fetch(ha), -1) << "no device room to fetch";
  pool.release(b);
  const int32_t back = pool.fetch(ha);
  ASSERT_GE(back, 0);
  EXPECT_FALSE(pool.on_host(back));
  pool.read_page(back, rk.data(), rv.data(), rp.data());
  EXPECT_EQ(rk[7], 49.0f);
  EXPECT_EQ(pool.host_pages(), 0);
  pool.retain(c);
  pool.release(c);
  EXPECT_EQ(pool.device_pages(), 3) << "refcount keeps the page";
  pool.release(c);
  EXPECT_EQ(pool.device_pages(), 2);
  EXPECT_EQ(pool.peak_device_pages(), 3);
  EXPECT_EQ(pool.page_bytes(), 2 * 4 * 8 * 4) << "F32: K + V of 4 slots of 8 floats";
  EXPECT_EQ(pool.layout().meta_page_bytes(), 4 * 4) << "positions only: no policy asked for more";
}

TEST(KVBudgetParse, Forms) {
  EXPECT_EQ(KVBudget::parse("1024").kind, KVBudget::Kind::Tokens);
  EXPECT_EQ(KVBudget::parse("25%").value, 25);
  EXPECT_EQ(KVBudget::parse("2GiB").value, 2.0 * 1024 * 1024 * 1024);
  EXPECT_EQ(KVBudget::parse("512MiB").value, 512.0 * 1024 * 1024);
  EXPECT_EQ(KVBudget::parse("300MB").value, 300e6);
  for (const char* bad : {"", "abc", "-5", "0", "150%", "12XB", "1.5"}) EXPECT_THROW(KVBudget::parse(bad), Error) << bad;
  const ModelConfig& c = retrieval_model().config();
  EXPECT_EQ(KVBudget::parse("25%").tokens_per_head(4096, 1000.0, 1000.0), 1024);
  // Metadata counts against a share: with 1/4 of a token's stored bytes in metadata, 25% holds 768 tokens.
  EXPECT_EQ(KVBudget::parse("25%").tokens_per_head(4096, 1000.0, 750.0), 768);
  const double kv = double(c.kv_bytes_per_token(KVType::F16));
  EXPECT_EQ(KVBudget::parse("8MiB").tokens_per_head(4096, kv, kv), 8 * 1024 * 1024 / c.kv_bytes_per_token(KVType::F16));
  EXPECT_EQ(KVBudget::parse("8MiB").tokens_per_head(4096, 2 * kv, kv), 4 * 1024 * 1024 / c.kv_bytes_per_token(KVType::F16));
}

// Page sizes that are multiples of the kernel's 16-slot blocks give bit-identical results whatever the
// chunking. Other page sizes change the floating-point summation order of the online softmax (~1e-8), which
// Q8_0 activation quantization can amplify to visible logit changes; there the top-1 must agree wherever
// the margin is clear and the mean change must stay small.
void expect_close(const std::vector<float>& a, const std::vector<float>& b, const char* what) {
  ASSERT_EQ(a.size(), b.size());
  const size_t V = 32000;
  double sum = 0;
  for (size_t row = 0; row < a.size() / V; ++row) {
    const float* x = a.data() + row * V;
    const float* y = b.data() + row * V;
    std::vector<float> sorted(x, x + V);
    std::partial_sort(sorted.begin(), sorted.begin() + 2, sorted.end(), std::greater<>());
    if (sorted[0] - sorted[1] > 0.5f) {
      EXPECT_EQ(std::max_element(x, x + V) - x, std::max_element(y, y + V) - y) << what << " row " << row;
    }
    for (size_t i = 0; i < V; ++i) sum += std::abs(x[i] - y[i]);
  }
  EXPECT_LT(sum / double(a.size()), 0.1) << what;  // a wrong page or mask moves logits by ~1 or more
}

TEST(KVPolicies, FullIsIndependentOfPagingAndChunking) {
  auto ids = test::haystack_ids(300);
  auto ref = logits_with(all(PolicySpec{}), ids, 512, 512);
  EXPECT_EQ(logits_with(all(PolicySpec{}), ids, 32, 64), ref);
  EXPECT_EQ(logits_with(all(PolicySpec{}), ids, 16, 100), ref);
  expect_close(logits_with(all(PolicySpec{}), ids, 7, 100), ref, "page size 7");
  expect_close(logits_with(all(PolicySpec{}), ids, 1, 13), ref, "page size 1");
}

TEST(KVPolicies, LooseBudgetsEqualFull) {
  // Every policy whose budget covers the whole sequence must give exactly full attention.
  auto ids = test::haystack_ids(300);
  auto ref = logits_with(all(PolicySpec{}), ids, 32, 64);
  PolicySpec st{PolicyKind::Streaming};
  st.window = 400;
  EXPECT_EQ(logits_with(all(st), ids, 32, 64), ref) << "streaming, window > length";
  PolicySpec tk{PolicyKind::TopK};
  tk.topk_pages = 20;
  EXPECT_EQ(logits_with(all(tk), ids, 32, 64), ref) << "topk choosing every page";
  PolicySpec ev{PolicyKind::Evict};
  ev.budget = 1000;
  EXPECT_EQ(logits_with(all(ev), ids, 32, 64), ref) << "evict, budget > length";
}

TEST(KVPolicies, StreamingIsExactWhateverTheChunkingAndFreeing) {
  // Pages are freed as they leave the window; the windowed attention must not depend on when that happens.
  auto ids = test::haystack_ids(400);
  PolicySpec st{PolicyKind::Streaming};
  st.sinks = 4;
  st.window = 64;
  auto a = logits_with(all(st), ids, 16, 16);
  EXPECT_EQ(logits_with(all(st), ids, 32, 512), a);
  EXPECT_EQ(logits_with(all(st), ids, 64, 7), a);
  expect_close(logits_with(all(st), ids, 1, 7), a, "streaming, page size 1");
  // And it is not full attention.
  auto full = logits_with(all(PolicySpec{}), ids, 16, 16);
  double diff = 0;
  for (size_t i = 0; i < a.size(); ++i) diff = std::max(diff, double(std::abs(a[i] - full[i])));
  EXPECT_GT(diff, 0.01);
}

TEST(KVPolicies, StreamingFreesPagesAndStaysWithinBound) {
  const Model& m = retrieval_model();
  const ModelConfig& c = m.config();
  PolicySpec st{PolicyKind::Streaming};
  st.sinks = 4;
  st.window = 33;
  auto specs = all(st);
  PagePool pool(backend(), layout_for(16, 10000, specs));
  KVCache kv(c, pool, specs);
  Runner r(m, backend(), 32);
  auto ids = test::haystack_ids(500);
  r.prefill(kv, ids, 0);
  const int64_t bound = streaming_max_pages(33, 16);
  for (int l = 0; l < c.n_layer; ++l)
    for (int h = 0; h < c.n_head_kv; ++h) {
      const HeadCache& hc = kv.head(l, h);
      EXPECT_LE(int64_t(hc.pages.size()), bound);
      EXPECT_EQ(pool.pos(hc.pages[0])[0], 0) << "the sink page stays";
    }
  EXPECT_LE(pool.device_pages(), bound * c.n_layer * c.n_head_kv);
  EXPECT_LT(pool.device_pages(), 500 / 16 * c.n_layer * c.n_head_kv / 4);
}

TEST(KVPolicies, EvictKeepsBudgetSinksAndRecent) {
  const Model& m = retrieval_model();
  const ModelConfig& c = m.config();
  PolicySpec ev{PolicyKind::Evict};
  ev.budget = 100;
  ev.sinks = 4;
  ev.window = 40;
  PagePool pool(backend(), layout_for(16, 10000, all(ev)));
  KVCache kv(c, pool, all(ev));
  Runner r(m, backend(), 64);
  auto ids = test::haystack_ids(400);
  r.prefill(kv, ids, 0);
  for (int l = 0; l < c.n_layer; ++l)
    for (int h = 0; h < c.n_head_kv; ++h) {
      const HeadCache& hc = kv.head(l, h);
      // The last chunk's 16 rows arrived after the last eviction; the next step evicts them before it runs.
      EXPECT_LE(hc.tokens, 100 + 16);
      std::vector<int32_t> held;
      for (int32_t id : hc.pages)
        for (int s = 0; s < pool.used(id); ++s) held.push_back(pool.pos(id)[s]);
      EXPECT_EQ(int64_t(held.size()), hc.tokens);
      for (int32_t p = 0; p < 4; ++p) EXPECT_NE(std::find(held.begin(), held.end(), p), held.end()) << "sink " << p;
      for (int32_t p = 400 - 40; p < 400; ++p) EXPECT_NE(std::find(held.begin(), held.end(), p), held.end()) << "recent " << p;
      EXPECT_LE(int64_t(hc.pages.size()), (100 + 16 + 15) / 16) << "pages are compacted";
    }
  // One decode step: the excess goes first, so the head holds the budget plus the new token.
  r.decode(kv, ids[0], 400);
  for (int l = 0; l < c.n_layer; ++l)
    for (int h = 0; h < c.n_head_kv; ++h) EXPECT_LE(kv.head(l, h).tokens, 101);
}

TEST(KVPolicies, TopKChoosesTheHighestScoringPageAndOffloadsTheRest) {
  // One head, hand-made keys: page 3 holds a key aligned with the query. The cache plans each step, the
  // backend stores the rows and, at the query step, chooses the pages (select_pages) inside the "layer".
  const ModelConfig c = test::attention_shape(1, 2, 1, 4);
  PolicySpec tk{PolicyKind::TopK};
  tk.topk_pages = 1;
  tk.recent_pages = 1;
  tk.offload = true;
  PagePool pool(backend(), layout_for(2, 100, {tk}, KVType::F32, 4));
  KVCache kv(c, pool, {tk});
  KVStep step;
  std::vector<float> k(4), v(4, 1.0f), q(8, 1.0f), out(8);
  auto run_step = [&](int32_t p) {
    StepInfo s{p, 1, false, false};
    step.begin(1, 1, 1);
    kv.plan_step(step, 0, s);
    pool.flush();
    std::fill(k.begin(), k.end(), 0.01f);
    if (p == 6) k = {5, 5, 5, 5};  // page 3 (positions 6, 7)
    backend().kv_store(pool.store(), k.data(), v.data(), 1, 1, step.layer_slots(0), &p);
    AttnBatch b;
    b.q = q.data();
    b.q_stride = 8;
    b.q_pos = &p;
    b.out = out.data();
    b.out_stride = 8;
    b.n_group = 2;
    b.head_dim = 4;
    b.scale = 0.5f;
    b.jobs = step.jobs[0].data();
    b.n_jobs = 1;
    b.page_ids = step.page_ids.data();
    if (step.selects) backend().select_pages(pool.store(), b);
    backend().attention(pool.store(), b);
    kv.finish_step(step, s);
  };
  for (int32_t p = 0; p < 16; ++p) run_step(p);
  EXPECT_EQ(pool.host_pages(), 5) << "8 pages: the 3 that step 14 read stay, the 5 others went before step 15";
  run_step(16);  // 9 pages now: sink, 7 candidates, the recent page (holding position 16)
  ASSERT_TRUE(step.selects);
  const AttnJob& j = step.jobs[0][0];
  std::vector<int32_t> first_pos;
  for (int i = 0; i < j.n_pages; ++i) first_pos.push_back(pool.pos(step.page_ids[size_t(j.page0 + i)])[0]);
  EXPECT_EQ(first_pos, (std::vector<int32_t>{0, 6, 16})) << "sink page, best page, recent page";
  EXPECT_EQ(pool.host_pages(), 5) << "this step's choice moves nothing yet: moves take effect at the next step";
  run_step(17);
  EXPECT_EQ(pool.host_pages(), 6) << "9 pages, 3 read at the last step: 6 offloaded before this one";
  EXPECT_EQ(pool.device_pages(), 3);
}

TEST(HeadMapFile, RoundTripAndMismatch) {
  const Model& m = retrieval_model();
  ModelIdentity id = m.identity();
  PolicySpec st{PolicyKind::Streaming};
  HeadMap map = HeadMap::uniform(id, st);
  map.at(6, 0).spec = PolicySpec{};
  map.at(6, 0).retrieval_score = 0.9;
  map.at(0, 1).spec.prefill = PrefillMode::Offload;
  PolicySpec tk{PolicyKind::TopK};
  tk.topk_pages = 5;
  tk.offload = true;
  map.at(1, 0).spec = tk;
  tk.offload = false;
  map.at(1, 1).spec = tk;
  std::string path = test::scratch_dir("kv") + "/map.json";
  map.save(path);
  HeadMap back = HeadMap::load(path, &id);
  EXPECT_EQ(back.count(PolicyKind::Full), 1);
  EXPECT_EQ(back.count(PolicyKind::TopK), 2);
  EXPECT_TRUE(back.at(1, 0).spec.offload) << "a topk head's offload survives the file";
  EXPECT_FALSE(back.at(1, 1).spec.offload);
  EXPECT_EQ(back.at(1, 0).spec.topk_pages, 5);
  EXPECT_EQ(back.at(6, 0).retrieval_score, 0.9);
  EXPECT_EQ(back.at(0, 1).spec.window, st.window);
  EXPECT_EQ(back.at(0, 1).spec.prefill, PrefillMode::Offload);
  EXPECT_EQ(back.at(0, 0).spec.prefill, PrefillMode::Window);

  auto other = Model::load(test::shared("models/stories260K.gguf"));
  ModelIdentity oid = other->identity();
  try {
    HeadMap::load(path, &oid);
    FAIL() << "a map for another model must be refused";
  } catch (const Error& e) {
    std::string msg = e.what();
    EXPECT_NE(msg.find("another model"), std::string::npos) << msg;
    EXPECT_EQ(msg.find('\n'), std::string::npos);
  }
  {  // a bad prefill mode is named
    std::string text = map.to_json();
    const std::string from = "\"prefill\": \"offload\"";
    ASSERT_NE(text.find(from), std::string::npos) << text.substr(0, 400);
    text.replace(text.find(from), from.size(), "\"prefill\": \"sometimes\"");
    std::ofstream(path) << text;
    try {
      HeadMap::load(path, &id);
      FAIL() << "a bad prefill mode must be refused";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("prefill mode 'sometimes'"), std::string::npos) << e.what();
    }
  }
  std::ofstream(path) << "{not json";
  EXPECT_THROW(HeadMap::load(path, &id), Error);
}

TEST(KVBudgetLimits, TooSmallAndExhausted) {
  const Model& m = retrieval_model();
  KVOptions o;
  o.policy = "streaming";
  o.budget = "40";
  EXPECT_THROW(plan_kv(m, o, 4096), Error) << "cannot hold sinks + window";
  o.policy = "auto";
  o.budget = "";
  EXPECT_THROW(plan_kv(m, o, 4096), Error) << "auto needs a head map";

  // `full` under a budget of 64 tokens per head: the request ends with a reason, no crash.
  o.policy = "full";
  o.budget = "64";
  EngineStack st(m, backend(), plan_kv(m, o, 4096), 1, 32);
  Request req = st.request(test::haystack_ids(40));
  req.n_predict = 100;
  int generated = 0;
  FinishReason why = FinishReason::None;
  std::string detail;
  st.engine->on_finish = [&](Sequence& s) {
    generated = s.n_generated;
    why = s.finish;
    detail = s.finish_detail;
  };
  st.engine->add(std::move(req));
  st.engine->run();
  EXPECT_EQ(why, FinishReason::Budget);
  EXPECT_EQ(detail.rfind("KV budget exhausted", 0), 0u) << detail;
  EXPECT_GT(generated, 0);
  EXPECT_LT(generated, 100);
}

// The same prompt prefilled under full attention and under `spec` on every head, with the same paging and
// chunking (so prefill logits that should agree agree bit for bit).
struct BesideFull {
  static constexpr int ps = 16, chunk = 64;
  const ModelConfig& c = retrieval_model().config();
  const int heads = c.n_layer * c.n_head_kv;
  PagePool pool_full, pool;
  KVCache kv_full, kv;
  Runner r{retrieval_model(), backend(), chunk};
  explicit BesideFull(const PolicySpec& spec)
      : pool_full(backend(), layout_for(ps, 20000, all(PolicySpec{}))),
        pool(backend(), layout_for(ps, 20000, all(spec))),
        kv_full(c, pool_full, all(PolicySpec{})),
        kv(c, pool, all(spec)) {}
  // Prefills ids[0, n) into both; true if every logit agrees exactly.
  bool prefill_agrees(const std::vector<int32_t>& ids, size_t n) {
    std::span<const int32_t> prompt(ids.data(), n);
    auto a = r.prefill(kv_full, prompt, 0, true);
    std::vector<float> full_logits(a.begin(), a.end());
    auto b = r.prefill(kv, prompt, 0, true);
    return std::vector<float>(b.begin(), b.end()) == full_logits;
  }
};

// Streaming heads that attend the whole prompt while it is prefilled (PrefillMode full and offload).
class StreamingWholePromptPrefill : public ::testing::TestWithParam<PrefillMode> {};

TEST_P(StreamingWholePromptPrefill, AttendsThePromptThenKeepsOnlyTheWindow) {
  auto ids = test::haystack_ids(300);
  PolicySpec st{PolicyKind::Streaming};
  st.sinks = 4;
  st.window = 40;
  st.prefill = GetParam();
  BesideFull t(st);
  const int ps = t.ps, chunk = t.chunk, heads = t.heads;
  const ModelConfig& c = t.c;
  PagePool& pool_st = t.pool;
  KVCache& kv_st = t.kv;
  // Prefill logits equal full attention's ...
  EXPECT_TRUE(t.prefill_agrees(ids, 290));
  // ... and once the prompt is done only the sinks and the window stay, all on the device.
  for (int l = 0; l < c.n_layer; ++l)
    for (int h = 0; h < c.n_head_kv; ++h) EXPECT_LE(int64_t(kv_st.head(l, h).pages.size()), streaming_max_pages(40, ps));
  EXPECT_EQ(pool_st.host_pages(), 0);
  if (GetParam() == PrefillMode::Full) {
    EXPECT_GE(pool_st.peak_device_pages(), 290 / ps * heads) << "the device peak held the whole prompt";
    EXPECT_EQ(pool_st.peak_host_pages(), 0);
  } else {
    // The device held the window and one chunk per head at most; the rest of the prompt waited in the host tier.
    EXPECT_LE(pool_st.peak_device_pages(), (streaming_max_pages(40, ps) + chunk / ps) * heads);
    EXPECT_GE(pool_st.peak_host_pages(), (290 - 40 - chunk) / ps * heads);
    EXPECT_GT(pool_st.device_moves_out(), 0);
  }
  // The budget planner agrees: full needs the prompt, offload the window and a chunk.
  const int64_t planned = pages_needed(all(st), 290, ps, chunk);
  if (GetParam() == PrefillMode::Full) EXPECT_GE(planned, 290 / ps * heads);
  else EXPECT_GE(planned, pool_st.peak_device_pages());
  // Decoding then uses the window: logits differ from full attention.
  auto d1 = t.r.decode(t.kv_full, ids[290], 290);
  std::vector<float> f1(d1.begin(), d1.end());
  auto d2 = t.r.decode(kv_st, ids[290], 290);
  double diff = 0;
  for (size_t i = 0; i < f1.size(); ++i) diff = std::max(diff, double(std::abs(f1[i] - d2[i])));
  EXPECT_GT(diff, 1e-3);
}

INSTANTIATE_TEST_SUITE_P(Modes, StreamingWholePromptPrefill, ::testing::Values(PrefillMode::Full, PrefillMode::Offload),
                         [](const auto& info) { return std::string(prefill_mode_name(info.param)); });

TEST(KVPolicies, TopKWithOffloadParksThePromptAndHoldsOnlyChosenPages) {
  auto ids = test::haystack_ids(400);
  PolicySpec tk{PolicyKind::TopK};
  tk.topk_pages = 3;
  tk.recent_pages = 2;
  tk.offload = true;
  BesideFull t(tk);
  const int ps = t.ps, chunk = t.chunk, heads = t.heads;
  PagePool& pool_tk = t.pool;
  EXPECT_TRUE(t.prefill_agrees(ids, 390)) << "prefill attends every page, parked or not";
  EXPECT_LE(pool_tk.peak_device_pages(), (1 + tk.recent_pages + chunk / ps + 1) * heads);
  for (size_t i = 390; i < 400; ++i) {
    t.r.decode(t.kv, ids[i], int32_t(i));
    EXPECT_LE(pool_tk.device_pages(), (1 + tk.recent_pages + tk.topk_pages) * heads);
  }
  EXPECT_LE(pool_tk.peak_device_pages(), pages_needed(all(tk), 400, ps, chunk));
  EXPECT_EQ(pool_tk.device_pages() + pool_tk.host_pages(), (400 + ps - 1) / ps * heads) << "nothing is lost";
}
