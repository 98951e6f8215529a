// Plots: line charts and heat maps come out as valid PNGs of the expected size, with the series colors and
// colormap colors where they should be; bad paths throw headroom::Error; NaN / empty input does not crash.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <limits>

#include "eval/plot.h"
#include "test_util.h"
#include "util/error.h"

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wunused-function"
#pragma GCC diagnostic ignored "-Wmissing-field-initializers"
#pragma GCC diagnostic ignored "-Wsign-compare"
#define STBI_STATIC
#define STBI_ONLY_PNG
#define STB_IMAGE_IMPLEMENTATION
#include <stb_image.h>
#pragma GCC diagnostic pop

using namespace headroom;
using namespace headroom::plot;

namespace {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

std::string tmp_png(const std::string& name) { return test::scratch_dir("plot") + "/" + name + ".png"; }

struct Image {
  int w = 0, h = 0;
  std::vector<uint8_t> px;  // RGB
  Rgb at(int x, int y) const {
    const uint8_t* p = &px[(size_t(y) * w + x) * 3];
    return {p[0], p[1], p[2]};
  }
  size_t count(Rgb c) const {
    size_t n = 0;
    for (int y = 0; y < h; ++y)
      for (int x = 0; x < w; ++x) n += at(x, y) == c;
    return n;
  }
};

// Checks the PNG signature and IHDR, then decodes with stb_image.
Image read_png(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  EXPECT_GE(bytes.size(), 33u);
  if (bytes.size() < 33) return {};
  EXPECT_EQ(bytes.substr(0, 8), std::string("\x89PNG\r\n\x1a\n", 8));
  EXPECT_EQ(bytes.substr(12, 4), "IHDR");
  auto be32 = [&](size_t o) {
    return uint32_t(uint8_t(bytes[o])) << 24 | uint32_t(uint8_t(bytes[o + 1])) << 16 |
           uint32_t(uint8_t(bytes[o + 2])) << 8 | uint32_t(uint8_t(bytes[o + 3]));
  };
  Image img;
  int n = 0;
  unsigned char* data = stbi_load(path.c_str(), &img.w, &img.h, &n, 3);
  EXPECT_NE(data, nullptr) << stbi_failure_reason();
  if (!data) return {};
  EXPECT_EQ(be32(16), uint32_t(img.w));
  EXPECT_EQ(be32(20), uint32_t(img.h));
  img.px.assign(data, data + size_t(img.w) * img.h * 3);
  stbi_image_free(data);
  return img;
}

bool near(Rgb a, Rgb b, int tol = 2) {
  return std::abs(a.r - b.r) <= tol && std::abs(a.g - b.g) <= tol && std::abs(a.b - b.b) <= tol;
}

LineChart sample_chart() {
  LineChart c;
  c.title = "Passkey accuracy vs KV budget";
  c.x_label = "KV budget (tokens)";
  c.y_label = "accuracy";
  c.x_log2 = true;
  std::vector<double> budgets = {128, 256, 512, 1024, 2048, 4096};
  c.series.push_back({"full", budgets, {1, 1, 1, 1, 1, 1}});
  c.series.push_back({"streaming", budgets, {0.1, 0.15, 0.3, 0.45, 0.7, 0.9}});
  c.series.push_back({"topk", budgets, {0.4, 0.6, 0.8, 0.9, 0.95, 1.0}});
  c.series.push_back({"headroom (per-head)", budgets, {0.55, 0.75, 0.9, kNaN, 1.0, 1.0}});
  return c;
}

Heatmap sample_heat() {
  Heatmap h;
  h.title = "NIAH accuracy: streaming";
  h.x_label = "context length (tokens)";
  h.y_label = "needle depth (%)";
  h.x_ticks = {"1K", "2K", "4K", "8K", "16K"};
  for (int d = 0; d <= 100; d += 25) {
    h.y_ticks.push_back(std::to_string(d));
    std::vector<double> row;
    for (int c = 0; c < 5; ++c) row.push_back(std::clamp(1.0 - 0.2 * c + 0.002 * d, 0.0, 1.0));
    h.values.push_back(row);
  }
  h.values[2][3] = kNaN;
  return h;
}

}  // namespace

TEST(Plot, LineChartIsAValidPngWithSeriesColors) {
  auto path = tmp_png("line");
  LineChart c = sample_chart();
  line_chart(path, c);
  Image img = read_png(path);
  EXPECT_EQ(img.w, 900);
  EXPECT_EQ(img.h, 600);
  for (size_t i = 0; i < c.series.size(); ++i)
    EXPECT_GT(img.count(series_color(i)), 20u) << "series " << i << " color missing";
  // A marker centre sits exactly at a data point (the last point of "streaming" is on top of nothing else).
  Rect a = line_chart_area(c);
  EXPECT_GT(a.w, 400);
  EXPECT_GT(a.h, 300);
  size_t in_area = 0;
  for (int y = a.y + 2; y < a.y + a.h - 2; ++y)
    for (int x = a.x + 2; x < a.x + a.w - 2; ++x) in_area += img.at(x, y) == series_color(1);
  EXPECT_GT(in_area, 20u);
}

TEST(Plot, LineChartLinearAxisAndOddInput) {
  LineChart c;
  c.series.push_back({"empty", {}, {}});
  c.series.push_back({"all nan", {1, 2}, {kNaN, kNaN}});
  c.series.push_back({"single", {5}, {0.5}});
  c.series.push_back({"mismatched", {1, 2, 3}, {0.2}});
  c.y_min = c.y_max = 3;  // degenerate range
  EXPECT_NO_THROW(line_chart(tmp_png("line-odd"), c));
  EXPECT_EQ(read_png(tmp_png("line-odd")).w, 900);

  LineChart none;  // no series at all, log axis with no positive x
  none.x_log2 = true;
  EXPECT_NO_THROW(line_chart(tmp_png("line-none"), none));
  none.series.push_back({"neg", {-1, 0}, {0.5, 0.5}});
  EXPECT_NO_THROW(line_chart(tmp_png("line-neg"), none));
}

TEST(Plot, HeatmapCellsHaveColormapColors) {
  auto path = tmp_png("heat");
  Heatmap h = sample_heat();
  h.annotate = false;  // so the cell centres are pure color
  heatmap(path, h);
  Image img = read_png(path);
  ASSERT_GT(img.w, 0);
  for (size_t r = 0; r < h.values.size(); ++r) {
    for (size_t c = 0; c < h.values[r].size(); ++c) {
      Rect cell = heatmap_cell(h, r, c);
      ASSERT_GE(cell.w, 40);
      ASSERT_GE(cell.h, 40);
      ASSERT_LE(cell.x + cell.w, img.w);
      ASSERT_LE(cell.y + cell.h, img.h);
      double v = h.values[r][c];
      Rgb want = std::isnan(v) ? kMissingColor : colormap_color(Colormap::RedGreen, v);
      EXPECT_TRUE(near(img.at(cell.x + cell.w / 2, cell.y + cell.h / 2), want)) << r << "," << c;
    }
  }
  EXPECT_EQ(heatmap_cell(h, 99, 0).w, 0);
  // Red for 0, green for 1.
  Rgb lo = colormap_color(Colormap::RedGreen, 0), hi = colormap_color(Colormap::RedGreen, 1);
  EXPECT_GT(lo.r, lo.g);
  EXPECT_GT(hi.g, hi.r);
}

TEST(Plot, HeatmapViridisLargeAndAnnotated) {
  Heatmap h;  // a head profile: 40 layers x 8 KV heads, values outside [v_min, v_max] clamp
  h.title = "head scores";
  h.colormap = Colormap::Viridis;
  h.v_min = -1, h.v_max = 2;
  for (int l = 0; l < 40; ++l) {
    h.values.emplace_back();
    for (int k = 0; k < 8; ++k) h.values.back().push_back(std::sin(l * 0.3 + k) * 2);
  }
  h.values[3][3] = kNaN;
  auto path = tmp_png("heat-viridis");
  heatmap(path, h);
  Image img = read_png(path);
  EXPECT_LE(img.h, 1600 + 200);
  Rect cell = heatmap_cell(h, 0, 0);
  double v = std::clamp(h.values[0][0], -1.0, 2.0);
  EXPECT_TRUE(near(img.at(cell.x + 2, cell.y + 2), colormap_color(Colormap::Viridis, (v + 1) / 3)));
  Rgb top_of_viridis = colormap_color(Colormap::Viridis, 1);
  EXPECT_GT(img.count(top_of_viridis), 0u);  // in the clamped cells and the colorbar

  Heatmap big;  // 100 columns: cells shrink so the grid stays under 1600 px; no annotation room
  big.values.assign(3, std::vector<double>(100, 0.5));
  heatmap(tmp_png("heat-big"), big);
  EXPECT_LE(heatmap_cell(big, 0, 99).x + heatmap_cell(big, 0, 99).w - heatmap_cell(big, 0, 0).x, 1600);
}

TEST(Plot, NanEmptyAndRaggedHeatmapsDoNotCrash) {
  Heatmap h;
  EXPECT_NO_THROW(heatmap(tmp_png("heat-empty"), h));
  h.values = {{kNaN, kNaN}, {kNaN}};  // ragged, all NaN
  h.y_ticks = {"a", "b", "c"};        // more ticks than rows
  EXPECT_NO_THROW(heatmap(tmp_png("heat-nan"), h));
  Image img = read_png(tmp_png("heat-nan"));
  Rect cell = heatmap_cell(h, 2, 1);
  EXPECT_TRUE(near(img.at(cell.x + cell.w / 2, cell.y + cell.h / 2), kMissingColor));
  h.v_min = h.v_max = 1;  // degenerate range
  h.values = {{1.0, 0.0}};
  EXPECT_NO_THROW(heatmap(tmp_png("heat-flat"), h));
}

TEST(Plot, UnwritablePathThrows) {
  std::string bad = test::scratch_dir("plot") + "/no/such/dir/x.png";
  EXPECT_THROW(line_chart(bad, sample_chart()), Error);
  EXPECT_THROW(heatmap(bad, sample_heat()), Error);
  EXPECT_THROW(heatmap(test::scratch_dir("plot"), sample_heat()), Error);  // a directory
}

TEST(Plot, MissingFontStillWritesTheImage) {
  const char* old = std::getenv("HEADROOM_PLOT_FONT");
  std::string saved = old ? old : "";
  setenv("HEADROOM_PLOT_FONT", "/nonexistent/font.ttf", 1);
  EXPECT_FALSE(Font::load()->ok());
  EXPECT_NO_THROW(line_chart(tmp_png("line-nofont"), sample_chart()));
  EXPECT_NO_THROW(heatmap(tmp_png("heat-nofont"), sample_heat()));
  if (old) setenv("HEADROOM_PLOT_FONT", saved.c_str(), 1);
  else unsetenv("HEADROOM_PLOT_FONT");
  EXPECT_EQ(read_png(tmp_png("line-nofont")).w, 900);
  EXPECT_GT(read_png(tmp_png("heat-nofont")).w, 0);
}

TEST(Plot, TextIsDrawnWhenTheFontExists) {
  auto font = Font::load();
  if (!font->ok()) GTEST_SKIP() << "DejaVuSans not installed";
  EXPECT_GT(font->width("accuracy", 14), 40);
  Canvas cv(200, 60, {255, 255, 255}, font);
  cv.text(10, 30, "Hello", 20, {0, 0, 0}, HAlign::Left, VAlign::Middle);
  cv.text(150, 30, "Up", 14, {0, 0, 0}, HAlign::Center, VAlign::Middle, true);
  int dark = 0;
  for (int y = 0; y < 60; ++y)
    for (int x = 0; x < 200; ++x) dark += cv.pixel(x, y).r < 128;
  EXPECT_GT(dark, 50);
}
