// The runner's recorded decode steps (CUDA graphs on a GPU), tested on the CPU: a backend that records its
// compute ops as closures between graph_begin and graph_end and replays them on graph_launch. A replayed step
// must give the same logits bits as the same step run op by op, whatever the policy, when sequences join
// and leave, and when the backend says a graph went stale.
#include <gtest/gtest.h>

#include <functional>
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

class RecordingBackend final : public Backend {
 public:
  explicit RecordingBackend(Backend& inner) : in_(inner) {}
  int launches = 0, recorded = 0;
  uint64_t generation = 1;  // bump to make every graph stale

  struct Graph final : StepGraph {
    std::vector<std::function<void()>> ops;
    uint64_t generation = 0;
  };

  const char* name() const override { return "recording"; }
  int threads() const override { return in_.threads(); }
  void matmul(const WeightView& w, const float* x, int64_t n, float* y) override {
    op([=, this] { in_.matmul(w, x, n, y); });
  }
  void embed(const WeightView& w, const int32_t* ids, int64_t n, float* out) override {
    op([=, this] { in_.embed(w, ids, n, out); });
  }
  void rmsnorm(const float* x, const float* w, int64_t n, int64_t dim, float eps, float* out) override {
    op([=, this] { in_.rmsnorm(x, w, n, dim, eps, out); });
  }
  void rope(float* x, int64_t n, int64_t nh, int64_t hd, const int32_t* pos, const RopeParams& p) override {
    op([=, this] { in_.rope(x, n, nh, hd, pos, p); });
  }
  void swiglu(const float* g, const float* u, int64_t count, float* out) override {
    op([=, this] { in_.swiglu(g, u, count, out); });
  }
  void add(float* x, const float* y, int64_t count) override { op([=, this] { in_.add(x, y, count); }); }
  void add_bias(float* x, const float* b, int64_t n, int64_t dim) override {
    op([=, this] { in_.add_bias(x, b, n, dim); });
  }
  void add_rmsnorm(float* x, const float* y, const float* w, int64_t n, int64_t dim, float eps, float* out) override {
    op([=, this] { in_.add_rmsnorm(x, y, w, n, dim, eps, out); });
  }
  void matmul_group(std::span<const MatmulPart> parts, const float* x, int64_t n) override {
    op([p = std::vector<MatmulPart>(parts.begin(), parts.end()), x, n, this] { in_.matmul_group(p, x, n); });
  }
  void matmul_swiglu(const WeightView& g, const WeightView& u, const float* x, int64_t n, float* out,
                     float* up_out) override {
    op([=, this] { in_.matmul_swiglu(g, u, x, n, out, up_out); });
  }
  void rope_store(KVStore& kv, const AttnRows& r, const int32_t* slots, const RopeParams& p) override {
    op([=, this, &kv] { in_.rope_store(kv, r, slots, p); });
  }
  void kv_store(KVStore& kv, const float* k, const float* v, int64_t n, int nkv, const int32_t* slots,
                const int32_t* pos) override {
    op([=, this, &kv] { in_.kv_store(kv, k, v, n, nkv, slots, pos); });
  }
  void select_pages(KVStore& kv, const AttnBatch& b) override { op([=, this, &kv] { in_.select_pages(kv, b); }); }
  void attention(KVStore& kv, const AttnBatch& b) override { op([=, this, &kv] { in_.attention(kv, b); }); }

  // Not recordable: called while recording is a runner bug.
  void* alloc(size_t bytes) override { return not_recording("alloc"), in_.alloc(bytes); }
  void free(void* p) override { not_recording("free"), in_.free(p); }
  void upload(void* d, const void* s, size_t bytes) override { not_recording("upload"), in_.upload(d, s, bytes); }
  void scatter_i32(int32_t* d, size_t len, std::span<const int32_t> pairs) override {
    not_recording("scatter_i32"), in_.scatter_i32(d, len, pairs);
  }
  void download(void* d, const void* s, size_t bytes) override {
    not_recording("download"), in_.download(d, s, bytes);
  }
  void synchronize() override { not_recording("synchronize"), in_.synchronize(); }
  std::unique_ptr<KVStore> kv_create(const KVLayout& l) override { return in_.kv_create(l); }
  void kv_reset(KVStore& kv, std::span<const int32_t> ids) override { not_recording("kv_reset"), in_.kv_reset(kv, ids); }
  void kv_copy_pages(KVStore& kv, std::span<const PageCopy> c) override {
    not_recording("kv_copy_pages"), in_.kv_copy_pages(kv, c);
  }
  void kv_copy_slots(KVStore& kv, std::span<const SlotCopy> c) override {
    not_recording("kv_copy_slots"), in_.kv_copy_slots(kv, c);
  }
  void kv_read_scores(KVStore& kv, std::span<const int32_t> ids, float* out) override {
    not_recording("kv_read_scores"), in_.kv_read_scores(kv, ids, out);
  }
  void kv_read_page(KVStore& kv, int32_t id, float* k, float* v, int32_t* pos) override {
    not_recording("kv_read_page"), in_.kv_read_page(kv, id, k, v, pos);
  }

  bool graphs() const override { return true; }
  void graph_begin() override {
    if (rec_) ADD_FAILURE() << "graph_begin while recording";
    rec_ = std::make_unique<Graph>();
    rec_->generation = generation;
  }
  std::unique_ptr<StepGraph> graph_end() override {
    if (!rec_) ADD_FAILURE() << "graph_end without graph_begin";
    ++recorded;
    return std::move(rec_);
  }
  bool graph_launch(StepGraph& sg) override {
    auto& g = dynamic_cast<Graph&>(sg);
    if (g.generation != generation) return false;
    ++launches;
    for (auto& f : g.ops) f();
    return true;
  }

 private:
  template <class F>
  void op(F&& f) {
    if (rec_)
      rec_->ops.emplace_back(std::forward<F>(f));
    else
      f();
  }
  void not_recording(const char* what) {
    if (rec_) ADD_FAILURE() << what << " while recording a graph";
  }
  Backend& in_;
  std::unique_ptr<Graph> rec_;
};

// n sequences, each a prompt of its own length then greedy decoding, on one runner; sequence i stops after
// stop[i] decode steps (so the step's shape changes). Returns every logits row of every step, in order.
std::vector<std::vector<float>> run(Backend& be, const std::string& policy, const std::vector<int>& stop,
                                    Runner** runner_out = nullptr, RecordingBackend* stale_at_step = nullptr,
                                    int stale_step = -1) {
  const Model& m = retrieval_model();
  KVOptions o;
  o.policy = policy;
  if (policy != "full") o.budget = "160";
  KVSetup s = plan_kv(m, o, 1024, int(stop.size()));
  PoolPlan pp = plan_pool(s, int(stop.size()), "", int64_t(1) << 30);
  PagePool pool(be, pp.layout);
  std::vector<std::unique_ptr<KVCache>> kvs;
  static Runner* keep = nullptr;
  auto r = std::make_unique<Runner>(m, be, 64);
  const auto ids = test::haystack_ids(400);
  std::vector<int32_t> next(stop.size()), pos(stop.size());
  std::vector<std::vector<float>> out;
  for (size_t i = 0; i < stop.size(); ++i) {
    kvs.push_back(std::make_unique<KVCache>(m.config(), pool, s.specs));
    const int len = 150 + 37 * int(i);
    auto l = r->prefill(*kvs[i], std::span<const int32_t>(ids.data(), size_t(len)), 0);
    next[i] = int32_t(std::max_element(l.begin(), l.end()) - l.begin());
    pos[i] = len;
  }
  for (int step = 0;; ++step) {
    if (stale_at_step && step == stale_step) ++stale_at_step->generation;
    std::vector<SeqRows> rows;
    std::vector<size_t> who;
    for (size_t i = 0; i < stop.size(); ++i)
      if (step < stop[i]) {
        rows.push_back(SeqRows{kvs[i].get(), std::span<const int32_t>(&next[i], 1), pos[i], false, false,
                               SeqRows::Logits::Last});
        who.push_back(i);
      }
    if (rows.empty()) break;
    auto l = r->step(rows);
    const int64_t V = m.config().n_vocab;
    for (size_t k = 0; k < who.size(); ++k) {
      std::vector<float> row(l.begin() + ptrdiff_t(k) * V, l.begin() + ptrdiff_t(k + 1) * V);
      next[who[k]] = int32_t(std::max_element(row.begin(), row.end()) - row.begin());
      ++pos[who[k]];
      out.push_back(std::move(row));
    }
  }
  if (runner_out) {
    keep = r.release();  // the caller reads its counters
    *runner_out = keep;
  }
  return out;
}

}  // namespace

TEST(StepGraph, ReplayedDecodeStepsEqualStepsRunOpByOp) {
  for (const char* policy : {"full", "streaming", "topk", "evict"}) {
    SCOPED_TRACE(policy);
    const std::vector<int> stop = {12};
    const auto eager = run(test::cpu_backend(), policy, stop);
    RecordingBackend be(test::cpu_backend());
    Runner* r = nullptr;
    const auto replayed = run(be, policy, stop, &r);
    ASSERT_EQ(eager.size(), replayed.size());
    for (size_t i = 0; i < eager.size(); ++i) ASSERT_EQ(eager[i], replayed[i]) << "decode step " << i;
    // Step 1 runs eagerly, step 2 is recorded, later steps replay (a new graph only when a bound grows).
    EXPECT_GE(be.launches, 8) << "most decode steps replay a recorded graph";
    EXPECT_GE(be.recorded, 1);
    EXPECT_LE(be.recorded, 3);
    EXPECT_EQ(r->recorded_graphs(), be.recorded);
    delete r;
  }
}

TEST(StepGraph, SequencesJoiningAndLeavingGetTheirOwnGraphs) {
  const std::vector<int> stop = {14, 6, 10};
  const auto eager = run(test::cpu_backend(), "full", stop);
  RecordingBackend be(test::cpu_backend());
  const auto replayed = run(be, "full", stop);
  ASSERT_EQ(eager.size(), replayed.size());
  for (size_t i = 0; i < eager.size(); ++i) ASSERT_EQ(eager[i], replayed[i]) << "logits row " << i;
  EXPECT_GE(be.recorded, 3) << "one graph per batch shape (3, 2 and 1 sequences)";
  EXPECT_GE(be.launches, 8);
}

TEST(StepGraph, AStaleGraphIsRunAgainAndRecordedAgain) {
  const std::vector<int> stop = {14};
  const auto eager = run(test::cpu_backend(), "full", stop);
  RecordingBackend be(test::cpu_backend());
  const auto replayed = run(be, "full", stop, nullptr, &be, 6);
  ASSERT_EQ(eager, replayed);
  EXPECT_GE(be.recorded, 2) << "the stale graph was recorded again";
  EXPECT_GE(be.launches, 8);
}

TEST(StepGraph, TheCpuBackendHasNoGraphs) {
  EXPECT_FALSE(test::cpu_backend().graphs());
  EXPECT_THROW(test::cpu_backend().graph_begin(), Error);
}
