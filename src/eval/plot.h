// headroom: PNG plots for `eval` and `profile`: line charts (accuracy vs KV budget, one line per policy) and
// heat maps (NIAH depth x context length per policy; head-profile scores, layers x KV heads).
// Every function throws headroom::Error when the file cannot be written. Text uses DejaVuSans; without the
// font file the plots are still written, without text (see eval/canvas.h).
#pragma once

#include <cstddef>
#include <string>
#include <vector>

#include "eval/canvas.h"

namespace headroom::plot {

struct Series {  // a line with markers, named in the legend; NaN y values break the line
  std::string name;
  std::vector<double> x, y;
};

struct LineChart {
  std::string title, x_label, y_label;
  std::vector<Series> series;
  double y_min = 0, y_max = 1;  // fixed y range (accuracy plots); the x range comes from the data, with margins
  bool x_log2 = false;          // log2 x axis (budgets, context lengths); x <= 0 is skipped
};
void line_chart(const std::string& png_path, const LineChart& c);

enum class Colormap {
  RedGreen,  // red (v_min) -> yellow -> green (v_max), as in NIAH plots (matplotlib RdYlGn)
  Viridis,   // perceptually uniform, for scores
};

struct Heatmap {
  std::string title, x_label, y_label;
  std::vector<std::string> x_ticks, y_ticks;   // one per column / row; empty: indices 0..n-1
  std::vector<std::vector<double>> values;     // values[row][col], row 0 at the top; NaN = no data (grey)
  double v_min = 0, v_max = 1;                 // values are clamped into this range
  bool annotate = true;                        // print each value (2 decimals) where cells are big enough
  Colormap colormap = Colormap::RedGreen;
  bool colorbar = true;                        // a bar showing v_min..v_max at the right
};
void heatmap(const std::string& png_path, const Heatmap& h);

// Exposed for tests and for callers that want consistent colors.
Rgb series_color(size_t i);                      // fixed palette of 8 (tab10-like), cycling
Rgb colormap_color(Colormap m, double t);        // t in [0, 1], clamped
inline constexpr Rgb kMissingColor{200, 200, 200};

struct Rect {
  int x = 0, y = 0, w = 0, h = 0;
};
Rect heatmap_cell(const Heatmap& h, size_t row, size_t col);  // where heatmap() draws that cell
Rect line_chart_area(const LineChart& c);                     // the plotting area of line_chart()

}  // namespace headroom::plot
