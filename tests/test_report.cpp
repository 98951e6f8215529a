// The eval report's aggregation on hand-made episodes: accuracy per cell, KV bytes against the full cache
// (measured, or computed when `full` did not run), the headline's mean of task means, the NIAH grid and the
// budget lines; and the writers render those numbers. The profile command's summary (table, heat map).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <stdexcept>

#include "eval/report.h"
#include "profile/summary.h"

using namespace headroom;
using namespace headroom::eval;

namespace {

ModelConfig shape() {
  ModelConfig c;
  c.n_layer = 2;
  c.n_head_kv = 2;
  c.head_dim = 64;
  return c;
}

EpisodeResult ep(const std::string& config, Task task, int ctx, double depth, bool correct, int64_t held,
                 int prompt_tokens = 980) {
  EpisodeResult r{task, ctx, depth, 0, config, correct, "", "", prompt_tokens, held, 0, 0, 0, 0, 0};
  r.kv_peak_bytes = 2 * held;
  r.kv_host_peak_bytes = held / 2;
  r.kv_meta_bytes = 10;
  return r;
}

Options options(std::vector<Config> configs, std::vector<Task> tasks, std::vector<int> ctxs) {
  Options o;
  o.configs = std::move(configs);
  o.tasks = std::move(tasks);
  o.ctxs = std::move(ctxs);
  o.depths = {0.0, 0.5};
  return o;
}

const CellRow& cell(const Tables& t, const std::string& config, Task task, int ctx) {
  for (const CellRow& r : t.cells)
    if (r.config == config && r.task == task && r.ctx == ctx) return r;
  throw std::runtime_error("no cell " + config);
}

const HeadlineRow& headline(const Tables& t, const std::string& config, int ctx) {
  for (const HeadlineRow& h : t.headline)
    if (h.config == config && h.ctx == ctx) return h;
  throw std::runtime_error("no headline row " + config);
}

}  // namespace

TEST(Report, AccuracyAndBytesAgainstTheMeasuredFullCache) {
  const Options o = options({{"full", ""}, {"topk", "25%"}}, {Task::Passkey, Task::KeyValue, Task::VarTrack}, {1000});
  const std::vector<EpisodeResult> rs = {
      ep("full", Task::Passkey, 1000, 0.0, true, 1000),   ep("full", Task::Passkey, 1000, 0.5, true, 1000),
      ep("full", Task::KeyValue, 1000, 0.0, false, 3000), ep("full", Task::VarTrack, 1000, 0.0, true, 3000),
      ep("topk@25%", Task::Passkey, 1000, 0.0, true, 500), ep("topk@25%", Task::Passkey, 1000, 0.5, false, 700),
      ep("topk@25%", Task::KeyValue, 1000, 0.0, true, 300), ep("topk@25%", Task::VarTrack, 1000, 0.0, false, 600),
  };
  const Tables t = aggregate(shape(), o, rs);

  // Full's reference: the mean held bytes of every full episode at the context, untrained tasks included.
  ASSERT_EQ(t.full_bytes.size(), 1u);
  EXPECT_DOUBLE_EQ(t.full_bytes.at(1000), 2000.0);

  ASSERT_EQ(t.cells.size(), 6u);  // 2 configs x 3 tasks, in the order given
  EXPECT_EQ(t.cells[0].config, "full");
  EXPECT_EQ(t.cells[3].config, "topk@25%");
  EXPECT_EQ(t.cells[4].task, Task::KeyValue);
  const CellRow& pk = cell(t, "topk@25%", Task::Passkey, 1000);
  EXPECT_EQ(pk.s.n, 2);
  EXPECT_EQ(pk.s.correct, 1);
  EXPECT_DOUBLE_EQ(pk.s.accuracy, 0.5);
  EXPECT_DOUBLE_EQ(pk.s.kv_held, 600.0);
  EXPECT_DOUBLE_EQ(pk.s.kv_peak, 1200.0);
  EXPECT_DOUBLE_EQ(pk.s.kv_host_peak, 300.0);
  EXPECT_DOUBLE_EQ(pk.s.kv_meta, 10.0);
  EXPECT_DOUBLE_EQ(pk.kv_vs_full, 0.3);
  EXPECT_DOUBLE_EQ(cell(t, "topk@25%", Task::KeyValue, 1000).kv_vs_full, 0.15);
  EXPECT_DOUBLE_EQ(cell(t, "full", Task::KeyValue, 1000).s.accuracy, 0.0);

  // Headline: the mean of the trained tasks' accuracies (not of the episodes: that would be 2/3), vartrack out.
  const HeadlineRow& h = headline(t, "topk@25%", 1000);
  EXPECT_DOUBLE_EQ(h.accuracy, 0.75);
  EXPECT_DOUBLE_EQ(h.full_accuracy, 0.5);  // full: passkey 1, kv 0
  EXPECT_DOUBLE_EQ(h.held_vs_full, 500.0 / 2000);  // (500 + 700 + 300) / 3 over the trained episodes
  EXPECT_DOUBLE_EQ(h.peak_vs_full, 1000.0 / 2000);
  EXPECT_DOUBLE_EQ(h.host_peak_vs_full, 250.0 / 2000);
  EXPECT_DOUBLE_EQ(headline(t, "full", 1000).held_vs_full, (1000 + 1000 + 3000) / 3.0 / 2000);

  // NIAH: one grid per config, depths x contexts.
  ASSERT_EQ(t.niah.size(), 2u);
  EXPECT_EQ(t.niah[1].config, "topk@25%");
  ASSERT_EQ(t.niah[1].accuracy.size(), 2u);
  EXPECT_DOUBLE_EQ(t.niah[1].accuracy[0][0], 1.0);
  EXPECT_DOUBLE_EQ(t.niah[1].accuracy[1][0], 0.0);

  // Budget lines at the last context, by kind.
  ASSERT_EQ(t.budget.size(), 2u);
  EXPECT_EQ(t.budget[0].kind, "full");
  EXPECT_EQ(t.budget[1].kind, "topk");
  EXPECT_DOUBLE_EQ(t.budget[1].kv_percent.at(0), 25.0);
  EXPECT_DOUBLE_EQ(t.budget[1].accuracy.at(0), 0.75);
  EXPECT_EQ(t.budget_ctx, 1000);

  const std::string md = summary_markdown(t);
  EXPECT_NE(md.find("| topk@25% | niah | 1000 | 2 | 0.500 | 0.00 | 30.0% |"), std::string::npos) << md;
  EXPECT_NE(md.find("| topk@25% | vartrack (untrained) | 1000 | 1 |"), std::string::npos) << md;
  EXPECT_NE(md.find("| topk@25% | 1000 | 0.750 | 150.0% | 25.0% | 50.0% | 12.5% |"), std::string::npos) << md;
  const std::string csv = results_csv(t);
  EXPECT_NE(csv.find("\ntopk@25%,kv,1000,1,1.0000,0.0003,0.1500,"), std::string::npos) << csv;
  EXPECT_EQ(std::count(csv.begin(), csv.end(), '\n'), 7);  // header + 6 cells
  const nlohmann::json j = results_json("llama test", t, rs);
  EXPECT_EQ(j["model"], "llama test");
  EXPECT_EQ(j["episodes"].size(), rs.size());
  EXPECT_DOUBLE_EQ(j["summary"][3]["kv_vs_full"].get<double>(), 0.3);
}

TEST(Report, ComputedFullCacheWhenFullDidNotRun) {
  Options o = options({{"streaming", "25%"}}, {Task::Passkey, Task::KeyValue}, {1000, 2000});
  o.answer_tokens = 12;
  o.page_size = 32;
  o.kv_type = "f16";
  // The first episode's prompt length per context: (980 + 12) tokens in pages of 32 = 31 pages (992 / 32),
  // (1990 + 12) = 2002 tokens = 63 pages; a page of K+V in f16 at head_dim 64 is 2 x 32 x 64 x 2 = 8192 bytes,
  // times 2 layers x 2 KV heads.
  const double full1k = 31.0 * 4 * 8192, full2k = 63.0 * 4 * 8192;
  EXPECT_DOUBLE_EQ(computed_full_bytes(shape(), o, 980), full1k);
  EXPECT_DOUBLE_EQ(computed_full_bytes(shape(), o, 1990), full2k);
  EXPECT_DOUBLE_EQ(computed_full_bytes(shape(), o, 981), 32.0 * 4 * 8192) << "a partial page counts whole";
  const std::vector<EpisodeResult> rs = {
      ep("streaming@25%", Task::Passkey, 1000, 0.0, true, 65536, 980),
      ep("streaming@25%", Task::KeyValue, 1000, 0.0, false, 131072, 980),
      ep("streaming@25%", Task::Passkey, 2000, 0.5, true, 65536, 1990),
  };
  const Tables t = aggregate(shape(), o, rs);
  EXPECT_DOUBLE_EQ(t.full_bytes.at(1000), full1k);
  EXPECT_DOUBLE_EQ(t.full_bytes.at(2000), full2k);
  EXPECT_DOUBLE_EQ(cell(t, "streaming@25%", Task::Passkey, 1000).kv_vs_full, 65536 / full1k);
  EXPECT_DOUBLE_EQ(cell(t, "streaming@25%", Task::KeyValue, 1000).kv_vs_full, 131072 / full1k);
  EXPECT_DOUBLE_EQ(cell(t, "streaming@25%", Task::Passkey, 2000).kv_vs_full, 65536 / full2k);
  const HeadlineRow& h = headline(t, "streaming@25%", 1000);
  EXPECT_DOUBLE_EQ(h.accuracy, 0.5);
  EXPECT_TRUE(std::isnan(h.full_accuracy));
  EXPECT_DOUBLE_EQ(h.held_vs_full, 98304 / full1k);
  // 2000 has only passkey: its headline is passkey's accuracy; the NIAH grid has no episode at (0.5, 1000).
  EXPECT_DOUBLE_EQ(headline(t, "streaming@25%", 2000).accuracy, 1.0);
  ASSERT_EQ(t.niah.size(), 1u);
  EXPECT_DOUBLE_EQ(t.niah[0].accuracy[0][0], 1.0);
  EXPECT_TRUE(std::isnan(t.niah[0].accuracy[1][0]));
  EXPECT_DOUBLE_EQ(t.niah[0].accuracy[1][1], 1.0);
  EXPECT_EQ(t.budget_ctx, 2000);
  ASSERT_EQ(t.budget.size(), 1u);
  EXPECT_DOUBLE_EQ(t.budget[0].kv_percent.at(0), 100 * 65536 / full2k);
  EXPECT_NE(summary_markdown(t).find("| streaming@25% | 1000 | 0.500 | n/a |"), std::string::npos);
}

TEST(Report, NoNiahGridWithoutThePasskeyTask) {
  const Options o = options({{"full", ""}}, {Task::KeyValue}, {1000});
  const Tables t = aggregate(shape(), o, {ep("full", Task::KeyValue, 1000, 0.0, true, 100)});
  EXPECT_TRUE(t.niah.empty());
  ASSERT_EQ(t.cells.size(), 1u);
  EXPECT_DOUBLE_EQ(t.cells[0].kv_vs_full, 1.0);
}

TEST(ProfileSummary, TableAndHeatmapOfAMap) {
  ModelIdentity id;
  id.n_layer = 2;
  id.n_head_kv = 2;
  HeadMap map = HeadMap::uniform(id, PolicySpec{PolicyKind::Streaming});
  const double retrieval[] = {0.0, 0.25, 0.9, 0.1};
  for (int i = 0; i < 4; ++i) {
    map.heads[i].retrieval_score = retrieval[i];
    map.heads[i].streaming_error = 0.01 * i;
  }
  map.at(1, 0).spec.kind = PolicyKind::Full;
  const std::string table = profile::head_table(map);
  EXPECT_EQ(std::count(table.begin(), table.end(), '\n'), 5);
  EXPECT_EQ(table.substr(0, table.find('\n')),
            "layer  kv_head  retrieval  ablation   gain       stream_err query_err  policy");
  EXPECT_NE(table.find("\n1      0        0.900      -1.000     -1.000     0.0200     -1.0000    full\n"), std::string::npos)
      << table;
  plot::Heatmap h = profile::score_heatmap(map, profile::HeadScore::Retrieval);
  ASSERT_EQ(h.values.size(), 2u);
  EXPECT_DOUBLE_EQ(h.values[1][0], 0.9);  // row = layer, column = KV head
  EXPECT_DOUBLE_EQ(h.values[0][1], 0.25);
  EXPECT_DOUBLE_EQ(h.v_max, 0.9);
  EXPECT_DOUBLE_EQ(profile::score_heatmap(map, profile::HeadScore::StreamingError).v_max, 0.03);
  for (HeadEntry& e : map.heads) e.streaming_error = 0;
  EXPECT_DOUBLE_EQ(profile::score_heatmap(map, profile::HeadScore::StreamingError).v_max, 1.0) << "all zero: 0..1";
  ASSERT_EQ(map.specs().size(), 4u);
  EXPECT_EQ(map.specs()[2].kind, PolicyKind::Full);
}
