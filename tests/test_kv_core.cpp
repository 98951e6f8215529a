// The KV core a GPU can use: stored bytes per KV type, no host synchronisation between the layers of a decode
// step, budget exhaustion found before a step writes anything, and policies exact in every KV type.
#include <gtest/gtest.h>

#include <map>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "engine/kv_setup.h"
#include "kv/kv_cache.h"
#include "model/model.h"
#include "test_models.h"
#include "test_util.h"

using namespace headroom;

namespace {

using test::retrieval_model;

// Forwards every op to the CPU backend and logs them, so a test can see where the host waits.
class LoggingBackend final : public Backend {
 public:
  explicit LoggingBackend(Backend& inner) : in_(inner) {}
  std::vector<std::string> log;
  const char* name() const override { return "logging"; }
  int threads() const override { return in_.threads(); }
  void matmul(const WeightView& w, const float* x, int64_t n, float* y) override { note("matmul"); in_.matmul(w, x, n, y); }
  void embed(const WeightView& w, const int32_t* ids, int64_t n, float* out) override { note("embed"); in_.embed(w, ids, n, out); }
  void rmsnorm(const float* x, const float* w, int64_t n, int64_t dim, float eps, float* out) override {
    note("rmsnorm");
    in_.rmsnorm(x, w, n, dim, eps, out);
  }
  void rope(float* x, int64_t n, int64_t nh, int64_t hd, const int32_t* pos, const RopeParams& p) override {
    note("rope");
    in_.rope(x, n, nh, hd, pos, p);
  }
  void swiglu(const float* g, const float* u, int64_t count, float* out) override { note("swiglu"); in_.swiglu(g, u, count, out); }
  void add(float* x, const float* y, int64_t count) override { note("add"); in_.add(x, y, count); }
  void add_bias(float* x, const float* b, int64_t n, int64_t dim) override { note("add_bias"); in_.add_bias(x, b, n, dim); }
  void* alloc(size_t bytes) override { return in_.alloc(bytes); }
  void free(void* p) override { in_.free(p); }
  void upload(void* d, const void* s, size_t bytes) override { note("upload"); in_.upload(d, s, bytes); }
  void download(void* d, const void* s, size_t bytes) override { note("SYNC download"); in_.download(d, s, bytes); }
  void synchronize() override { note("SYNC"); in_.synchronize(); }
  void scatter_i32(int32_t* d, size_t len, std::span<const int32_t> pairs) override {
    note("upload");  // (an upload of table entries)
    in_.scatter_i32(d, len, pairs);
  }
  std::unique_ptr<KVStore> kv_create(const KVLayout& l) override { return in_.kv_create(l); }
  void kv_reset(KVStore& kv, std::span<const int32_t> ids) override { note("kv_reset"); in_.kv_reset(kv, ids); }
  void kv_copy_pages(KVStore& kv, std::span<const PageCopy> c) override { note("kv_copy_pages"); in_.kv_copy_pages(kv, c); }
  void kv_copy_slots(KVStore& kv, std::span<const SlotCopy> c) override { note("kv_copy_slots"); in_.kv_copy_slots(kv, c); }
  void kv_store(KVStore& kv, const float* k, const float* v, int64_t n, int nkv, const int32_t* slots,
                const int32_t* pos) override {
    note("kv_store");
    in_.kv_store(kv, k, v, n, nkv, slots, pos);
  }
  void kv_read_scores(KVStore& kv, std::span<const int32_t> ids, float* out) override {
    note("SYNC kv_read_scores");
    in_.kv_read_scores(kv, ids, out);
  }
  void kv_read_page(KVStore& kv, int32_t id, float* k, float* v, int32_t* pos) override {
    note("SYNC kv_read_page");
    in_.kv_read_page(kv, id, k, v, pos);
  }
  void select_pages(KVStore& kv, const AttnBatch& b) override { note("select_pages"); in_.select_pages(kv, b); }
  void attention(KVStore& kv, const AttnBatch& b) override { note("attention"); in_.attention(kv, b); }

 private:
  void note(const char* what) { log.emplace_back(what); }
  Backend& in_;
};

// One sequence of the long-context model under a uniform policy (a budget for every policy but full).
struct OneSequence {
  OneSequence(Backend& be, const std::string& policy, const std::string& budget)
      : setup(plan(policy, budget)), pool(be, setup.layout), kv(retrieval_model().config(), pool, setup.specs),
        runner(retrieval_model(), be, 64) {}
  static KVSetup plan(const std::string& policy, const std::string& budget) {
    KVOptions o;
    o.policy = policy;
    if (policy != "full") o.budget = budget;
    return plan_kv(retrieval_model(), o, 512);
  }
  KVSetup setup;
  PagePool pool;
  KVCache kv;
  Runner runner;
};

}  // namespace

TEST(KVCore, BytesPerTokenEqualLlamaCpps) {
  // The Llama-3.2-1B shape: 16 layers, 8 KV heads of 64 dims. llama.cpp: 32 KiB per token in F16, 17 in Q8_0.
  ModelConfig c;
  c.n_layer = 16;
  c.n_head_kv = 8;
  c.head_dim = 64;
  EXPECT_EQ(c.kv_bytes_per_token(KVType::F16), 32 * 1024);
  EXPECT_EQ(c.kv_bytes_per_token(KVType::Q8_0), 17 * 1024);
  EXPECT_EQ(c.kv_bytes_per_token(KVType::BF16), 32 * 1024);
  EXPECT_EQ(c.kv_bytes_per_token(KVType::F32), 64 * 1024);
  KVLayout l;
  l.page_size = 32;
  l.head_dim = 64;
  l.type = KVType::Q8_0;
  EXPECT_EQ(l.kv_page_bytes() * c.n_layer * c.n_head_kv / l.page_size, 17 * 1024) << "pages add up to the same";
  EXPECT_EQ(parse_kv_type("Q8_0"), KVType::Q8_0);
  EXPECT_THROW(parse_kv_type("q4_0"), Error);
  EXPECT_NE(kv_type_fits(KVType::Q8_0, 48), "") << "q8_0 needs blocks of 32";
}

TEST(KVCore, BudgetsCountStoredBytesAndMetadata) {
  const Model& m = retrieval_model();
  const ModelConfig& c = m.config();
  KVOptions o;
  o.budget = "4MiB";
  o.kv_type = "f16";
  KVSetup f16 = plan_kv(m, o, 4096);
  o.kv_type = "q8_0";
  KVSetup q8 = plan_kv(m, o, 4096);
  o.kv_type = "f32";
  KVSetup f32 = plan_kv(m, o, 4096);
  const int64_t mib4 = 4 << 20;
  for (const KVSetup* s : {&f16, &q8, &f32}) {
    EXPECT_LE(s->capacity_pages * s->layout.page_bytes(), mib4) << kv_type_name(s->layout.type);
    EXPECT_GT((s->capacity_pages + 1) * s->layout.page_bytes(), mib4) << "the whole budget is used";
  }
  EXPECT_GT(q8.capacity_pages, f16.capacity_pages * 18 / 10) << "q8_0 holds almost twice the pages of f16";
  EXPECT_GT(f16.capacity_pages, f32.capacity_pages * 18 / 10);
  // topk keeps key bounds per page: fewer pages for the same bytes, and they are counted.
  o.kv_type = "f16";
  o.policy = "topk";
  KVSetup tk = plan_kv(m, o, 4096);
  EXPECT_EQ(tk.layout.meta_page_bytes(), 32 * 4 + 2 * c.head_dim * 4);
  EXPECT_TRUE(tk.layout.page_minmax);
  EXPECT_FALSE(f16.layout.page_minmax);
}

TEST(KVCore, NoHostSynchronisationBetweenTheLayersOfADecodeStep) {
  const Model& m = retrieval_model();
  for (const char* policy : {"full", "streaming", "topk", "evict"}) {
    SCOPED_TRACE(policy);
    LoggingBackend be(test::cpu_backend());
    OneSequence q(be, policy, "128");
    KVCache& kv = q.kv;
    Runner& r = q.runner;
    auto ids = test::haystack_ids(300);
    r.prefill(kv, std::span<const int32_t>(ids.data(), 290), 0);
    for (size_t i = 290; i < 300; ++i) {
      be.log.clear();
      r.decode(kv, ids[i], int32_t(i));
      // From the embedding to the logits matmul the step is pure backend work.
      size_t first = 0, last = 0;
      for (size_t e = 0; e < be.log.size(); ++e) {
        if (be.log[e] == "embed" && first == 0) first = e + 1;
        if (be.log[e] == "matmul") last = e;
      }
      ASSERT_GT(first, 0u);
      int attention = 0;
      for (size_t e = first; e < last; ++e) {
        EXPECT_EQ(be.log[e].rfind("SYNC", 0), std::string::npos) << "step " << i << ", op " << e << ": " << be.log[e];
        EXPECT_NE(be.log[e], "upload") << "the step's tables go up once, before the layers";
        attention += be.log[e] == "attention";
      }
      EXPECT_EQ(attention, m.config().n_layer) << "one attention call per layer";
      EXPECT_EQ(be.log[last + 1], "SYNC download") << "then the logits come back";
    }
  }
}

TEST(KVCore, BudgetExhaustionIsFoundBeforeTheStepWritesAnything) {
  const Model& m = retrieval_model();
  KVOptions o;
  o.budget = "64";  // full under 64 tokens per head: 2 pages of 32
  KVSetup s = plan_kv(m, o, 4096);
  PagePool pool(test::cpu_backend(), s.layout);
  KVCache kv(m.config(), pool, s.specs);
  Runner r(m, test::cpu_backend(), 32);
  auto ids = test::haystack_ids(100);
  r.prefill(kv, std::span<const int32_t>(ids.data(), 60), 0);
  const int64_t pages = pool.device_pages(), held = kv.pages_held(), tokens = kv.tokens_appended();
  EXPECT_EQ(kv.pages_for(4), 0) << "4 more tokens fit in the tail pages";
  EXPECT_GT(kv.pages_for(5), pool.device_free());
  try {
    r.prefill(kv, std::span<const int32_t>(ids.data() + 60, 8), 60);
    FAIL() << "68 tokens cannot fit in 64 per head";
  } catch (const BudgetExhausted& e) {
    EXPECT_NE(std::string(e.what()).find("KV budget exhausted after 60 tokens"), std::string::npos) << e.what();
  }
  EXPECT_EQ(pool.device_pages(), pages) << "nothing was allocated";
  EXPECT_EQ(kv.pages_held(), held);
  EXPECT_EQ(kv.tokens_appended(), tokens);
  // ... and the cache is still usable for what does fit.
  r.prefill(kv, std::span<const int32_t>(ids.data() + 60, 4), 60);
  EXPECT_EQ(kv.tokens_appended(), 64);
}

TEST(KVCore, TruncateRollsBackExactlyWhereThePolicyKeptEverything) {
  // Prefill 200 tokens, decode 20, truncate to 200, decode the same 20 again: full and topk give the same
  // logits bits as the first time (nothing before the cut changed). Streaming and evict roll back to what
  // they held, with every page past the cut given back.
  const auto ids = test::haystack_ids(240);
  for (const char* policy : {"full", "topk", "streaming", "evict"}) {
    SCOPED_TRACE(policy);
    OneSequence q(test::cpu_backend(), policy, "160");
    KVCache& kv = q.kv;
    PagePool& pool = q.pool;
    Runner& r = q.runner;
    r.prefill(kv, std::span<const int32_t>(ids.data(), 200), 0);
    const int64_t pages_at_cut = kv.pages_held();
    auto decode20 = [&] {
      std::vector<std::vector<float>> out;
      for (int i = 200; i < 220; ++i) {
        auto l = r.decode(kv, ids[size_t(i)], i);
        out.emplace_back(l.begin(), l.end());
      }
      return out;
    };
    const auto first = decode20();
    kv.truncate(200);
    if (std::string(policy) == "full") {
      EXPECT_EQ(kv.pages_held(), pages_at_cut) << "the pages past the cut went back";
    }
    for (int l = 0; l < kv.n_layer(); ++l)
      for (int h = 0; h < kv.n_head_kv(); ++h)
        for (int32_t id : kv.head(l, h).pages)
          for (int sl = 0; sl < pool.used(id); ++sl) ASSERT_LT(pool.pos(id)[sl], 200) << "a slot past the cut";
    const auto second = decode20();
    if (std::string(policy) == "full" || std::string(policy) == "topk") {
      ASSERT_EQ(first.size(), second.size());
      for (size_t i = 0; i < first.size(); ++i) ASSERT_EQ(first[i], second[i]) << "decode step " << i;
    }
    kv.truncate(0);
    EXPECT_EQ(kv.pages_held(), 0) << "truncating to 0 gives every page back";
  }
}

TEST(KVCore, ThePageTableUpdatedInPlaceHoldsEveryJobsPages) {
  // The step's page table persists (KVStep): each step writes only what changed and records it. A "device"
  // copy that takes nothing but those records must hold, at every job's range, the head's pages, through
  // sequences that join, skip steps, leave, roll back, park and resume, under every policy (topk offloads and
  // fetches pages, streaming drops them, evict compacts), and a second table the same caches are planned into.
  const ModelConfig c = test::attention_shape(2, 4, 4, 4);
  PolicySpec full{PolicyKind::Full}, stream{PolicyKind::Streaming}, topk{PolicyKind::TopK}, evict{PolicyKind::Evict};
  stream.sinks = 2;
  stream.window = 9;
  topk.topk_pages = 2;
  topk.recent_pages = 1;
  topk.offload = true;
  evict.budget = 12;
  evict.window = 4;
  const std::vector<PolicySpec> specs = {full, stream, topk, evict, stream, full, evict, topk};
  KVLayout l;
  l.type = KVType::F32;
  l.page_size = 4;
  l.head_dim = 4;
  l.device_pages = 4000;
  l.host_pages = 4000;
  set_policy_metadata(l, specs);
  PagePool pool(test::cpu_backend(), l);
  std::mt19937 rng(7);
  std::vector<std::unique_ptr<KVCache>> seqs;
  std::vector<int32_t> pos;
  KVStep step, other;
  std::vector<int32_t> device, other_device;  // what each table's records built
  auto apply = [](const KVStep& st, std::vector<int32_t>& dev) {
    if (dev.size() < st.page_ids.size()) dev.resize(st.page_ids.size(), -7);  // grown: unwritten is garbage
    for (const auto& [lo, hi] : st.written)
      for (int64_t i = lo; i < hi; ++i) dev[size_t(i)] = st.page_ids[size_t(i)];
  };
  int64_t written = 0, planned = 0;
  auto run = [&](int it, bool churn) {
    if (seqs.size() < 5 && (rng() % 4 == 0 || !churn)) {
      seqs.push_back(std::make_unique<KVCache>(c, pool, specs));
      pos.push_back(0);
    }
    if (churn && !seqs.empty() && rng() % 40 == 0) {  // one leaves
      const size_t i = rng() % seqs.size();
      seqs.erase(seqs.begin() + ptrdiff_t(i));
      pos.erase(pos.begin() + ptrdiff_t(i));
    }
    if (churn && !seqs.empty() && rng() % 30 == 0) {  // one rolls back
      const size_t i = rng() % seqs.size();
      if (!seqs[i]->parked()) {
        pos[i] /= 2;
        seqs[i]->truncate(pos[i]);
      }
    }
    if (churn && !seqs.empty() && rng() % 25 == 0) {  // one is parked, or resumes
      KVCache& kv = *seqs[rng() % seqs.size()];
      ASSERT_TRUE(kv.parked() ? kv.unpark() : kv.park());
    }
    const bool into_other = churn && rng() % 10 == 0;
    KVStep& st = into_other ? other : step;
    struct Ran {
      size_t i;  // the sequence
      StepInfo s;
      int row0;  // its first row in the step
    };
    std::vector<Ran> ran;
    int rows = 0;
    for (size_t i = 0; i < seqs.size(); ++i) rows += seqs[i]->parked() ? 0 : 1 + (pos[i] < 40 ? 3 : 0);
    st.begin(c.n_layer, c.n_head_kv, std::max(1, rows));
    int row0 = 0;
    for (size_t i = 0; i < seqs.size(); ++i) {
      if (seqs[i]->parked() || (churn && rng() % 6 == 0)) continue;  // skips this step (its region goes back)
      const StepInfo s{pos[i], pos[i] < 40 ? 4 : 1, pos[i] < 40, pos[i] + 4 == 40};
      seqs[i]->plan_step(st, row0, s);
      ran.push_back({i, s, row0});
      row0 += s.n_rows;
    }
    pool.flush();
    apply(st, into_other ? other_device : device);
    written += st.n_written;
    for (const auto& [i, s, seq_row0] : ran) {
      const KVCache& kv = *seqs[i];
      for (int layer = 0; layer < c.n_layer; ++layer)
        for (int h = 0; h < c.n_head_kv; ++h) {
          const PageList& pages = kv.head(layer, h).pages;
          const std::vector<int32_t> want(pages.begin(), pages.end());
          const AttnJob* job = nullptr;  // this sequence's job for the head
          for (const AttnJob& j : st.jobs[size_t(layer)])
            if (j.row0 == seq_row0 && j.kv_head == h) job = &j;
          ASSERT_NE(job, nullptr);
          ASSERT_EQ(job->n_pages, int32_t(want.size()));
          const std::vector<int32_t>& dev = into_other ? other_device : device;
          const std::vector<int32_t> got(dev.begin() + job->page0, dev.begin() + job->page0 + job->n_pages);
          ASSERT_EQ(got, want) << "step " << it << ", sequence " << i << ", layer " << layer << ", head " << h;
          planned += job->n_pages;
        }
    }
    // select_pages, as a backend runs it in place (here it keeps the first select_k candidates), and the
    // runner's read-back: the host table and the device copy both hold the moved ids.
    for (auto& layer_jobs : st.jobs)
      for (AttnJob& j : layer_jobs) {
        if (j.select_k <= 0) continue;
        std::vector<int32_t>& dev = into_other ? other_device : device;
        const int32_t first = j.page0 + j.cand0, n_after = j.n_pages - j.cand0 - j.n_cand;
        for (int32_t k = 0; k < n_after; ++k) dev[size_t(first + j.select_k + k)] = dev[size_t(first + j.n_cand + k)];
        j.n_pages -= j.n_cand - j.select_k;
        std::copy(dev.begin() + first, dev.begin() + j.page0 + j.n_pages, st.page_ids.begin() + first);
      }
    for (const auto& [i, s, seq_row0] : ran) {
      seqs[i]->finish_step(st, s);
      pos[i] += s.n_rows;
    }
  };
  for (int it = 0; it < 400; ++it) {
    run(it, true);
    if (HasFatalFailure()) return;
  }
  // Then steady decoding: the table takes hardly anything but the ids of new pages (and the topk heads'
  // lists, which select_pages may rewrite on the device, and the streaming and evict heads' cuts).
  for (auto& kv : seqs) {
    if (kv->parked()) {
      ASSERT_TRUE(kv->unpark());
    }
  }
  for (int it = 0; it < 20; ++it) run(400 + it, false);  // (every region placed anew once)
  written = planned = 0;
  for (int it = 0; it < 300; ++it) {
    run(420 + it, false);
    if (HasFatalFailure()) return;
  }
  EXPECT_GT(planned, 100000) << "the sequences grew long enough to matter";
  EXPECT_LT(written * 3, planned) << "written again: " << written << " of " << planned << " entries";
}

TEST(KVCore, PageTableRegionsNeverOverlapAndComeBack) {
  // KVStep's regions: an owner planned in consecutive steps keeps its place (kept) while its size stays; live
  // regions never overlap; an owner left out of a step loses its region at the next begin(), and the space is
  // reused, so the table stays within a small multiple of what is live.
  KVStep st;
  std::mt19937 rng(11);
  std::map<uint64_t, std::pair<int64_t, int64_t>> last;  // owner -> (offset, size) in the previous step
  int64_t most_live = 0, kept_steps = 0;
  for (int it = 0; it < 2000; ++it) {
    st.begin(1, 1, 1);
    std::map<uint64_t, std::pair<int64_t, int64_t>> now;
    for (uint64_t owner = 1; owner <= 24; ++owner) {
      if (rng() % 5 == 0) continue;  // not in this step
      int64_t size = int64_t(64 + (owner * 97) % 700);
      if (auto p = last.find(owner); p != last.end() && rng() % 10 != 0) size = p->second.second;  // mostly the same
      else size += int64_t(rng() % 300);
      bool kept = false;
      const int64_t off = st.region(owner, size, kept);
      const auto p = last.find(owner);
      const bool same = p != last.end() && p->second.second == size;
      ASSERT_EQ(kept, same) << "step " << it << " owner " << owner;
      if (kept) {
        ASSERT_EQ(off, p->second.first) << "a kept region stays where it was";
        ++kept_steps;
      }
      ASSERT_LE(off + size, int64_t(st.page_ids.size()));
      now[owner] = {off, size};
    }
    // Live: this step's regions, and those of the owners the last step had and this one left out (they go back
    // at the next begin).
    std::vector<std::pair<int64_t, int64_t>> r;
    for (const auto& [o, x] : now) r.push_back(x);
    for (const auto& [o, x] : last)
      if (!now.count(o)) r.push_back(x);
    std::sort(r.begin(), r.end());
    for (size_t i = 1; i < r.size(); ++i) ASSERT_LE(r[i - 1].first + r[i - 1].second, r[i].first) << "step " << it;
    int64_t live = 0;
    for (const auto& x : r) live += x.second;
    EXPECT_EQ(st.live_entries(), live);
    most_live = std::max(most_live, live);
    EXPECT_LE(int64_t(st.page_ids.size()), 2 * most_live + (int64_t(1) << 16) + 1024) << "step " << it;
    last = now;
  }
  EXPECT_GT(kept_steps, 20000) << "most regions stay from step to step";
}
