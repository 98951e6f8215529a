// headroom: line charts and heat maps as PNG (see plot.h). Layout is computed first (from text widths), then
// drawn; the layout functions are shared with heatmap_cell() / line_chart_area() so tests can find things.
#include "eval/plot.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include <fmt/format.h>

#include "util/error.h"

namespace headroom::plot {

namespace {

constexpr double kTitlePx = 18, kLabelPx = 14, kTickPx = 12.5, kLegendPx = 13, kCellPx = 12;
constexpr Rgb kWhite{255, 255, 255};
const Rgb kInk = hex(0x222222), kAxis = hex(0x555555), kGrid = hex(0xe6e6e6), kLegendEdge = hex(0xcccccc);

bool finite(double v) { return std::isfinite(v); }

// "Nice" ticks (steps of 1, 2 or 5 x 10^k) inside [lo, hi], about `target` of them.
std::vector<double> nice_ticks(double lo, double hi, int target, double* step_out = nullptr) {
  std::vector<double> out;
  if (!(hi > lo) || !finite(lo) || !finite(hi)) return out;
  double raw = (hi - lo) / std::max(target, 1), mag = std::pow(10.0, std::floor(std::log10(raw)));
  double norm = raw / mag, step = (norm < 1.5 ? 1 : norm < 3 ? 2 : norm < 7 ? 5 : 10) * mag;
  for (double k = std::ceil(lo / step - 1e-9); k * step <= hi + step * 1e-9; k += 1)
    out.push_back(std::abs(k) < 0.5 ? 0.0 : k * step);
  if (step_out) *step_out = step;
  return out;
}

std::string tick_label(double v, double step) {
  int decimals = std::clamp(int(-std::floor(std::log10(step) + 1e-9)), 0, 6);
  return fmt::format("{:.{}f}", v, decimals);
}

std::string pow2_label(double v) {  // 512, 1K, 32K, 1M
  if (v >= 1048576 && std::fmod(v, 1048576) == 0) return fmt::format("{}M", v / 1048576);
  if (v >= 1024 && std::fmod(v, 1024) == 0) return fmt::format("{}K", v / 1024);
  return fmt::format("{:g}", v);
}

double line_height(const Font& f, double px) { return f.ascent(px) + f.descent(px); }

// Shortens s with a trailing "..." until it is at most max_w pixels wide.
std::string elide(const Font& f, std::string s, double px, double max_w) {
  if (f.width(s, px) <= max_w) return s;
  while (!s.empty() && f.width(s + "...", px) > max_w) {
    s.pop_back();
    while (!s.empty() && (static_cast<unsigned char>(s.back()) >> 6) == 2) s.pop_back();  // UTF-8 tail bytes
    if (!s.empty() && static_cast<unsigned char>(s.back()) >= 0xc0) s.pop_back();
  }
  return s + "...";
}

double max_width(const Font& f, const std::vector<std::string>& v, double px) {
  double w = 0;
  for (const auto& s : v) w = std::max(w, f.width(s, px));
  return w;
}

// ------------------------------------------------------------------------------------ line chart layout

struct ChartLayout {
  int W = 900, H = 600;
  Rect area;
  double xlo = 0, xhi = 1, ylo = 0, yhi = 1;  // the area's data range; x in log2 units when x_log2
  std::vector<double> xticks, yticks;         // positions in the same units
  std::vector<std::string> xlabels, ylabels, names;
  int legend_w = 0;

  double px(double x) const { return area.x + (x - xlo) / (xhi - xlo) * area.w; }
  double py(double y) const { return area.y + area.h - (y - ylo) / (yhi - ylo) * area.h; }
};

ChartLayout layout_chart(const LineChart& c, const Font& f) {
  ChartLayout L;
  auto tx = [&](double x) { return c.x_log2 ? std::log2(x) : x; };
  double lo = std::numeric_limits<double>::infinity(), hi = -lo;
  for (const auto& s : c.series)
    for (size_t i = 0; i < std::min(s.x.size(), s.y.size()); ++i)
      if (finite(s.x[i]) && finite(s.y[i]) && (!c.x_log2 || s.x[i] > 0)) lo = std::min(lo, tx(s.x[i])), hi = std::max(hi, tx(s.x[i]));
  if (!(lo <= hi)) lo = 0, hi = 1;
  if (hi - lo < 1e-12) {
    double d = c.x_log2 ? 1 : std::max(1.0, std::abs(lo) * 0.1);
    lo -= d, hi += d;
  }
  double margin = 0.05 * (hi - lo);
  L.xlo = lo - margin, L.xhi = hi + margin;
  L.ylo = c.y_min, L.yhi = c.y_max > c.y_min ? c.y_max : c.y_min + 1;
  double ystep = 1;
  L.yticks = nice_ticks(L.ylo, L.yhi, 6, &ystep);
  for (double v : L.yticks) L.ylabels.push_back(tick_label(v, ystep));
  double pad = 0.04 * (L.yhi - L.ylo);  // so points on y_min / y_max are not cut by the frame
  L.ylo -= pad, L.yhi += pad;

  if (c.x_log2) {
    for (double k = std::ceil(L.xlo); k <= std::floor(L.xhi); k += 1) L.xticks.push_back(k);
    for (double k : L.xticks) L.xlabels.push_back(pow2_label(std::exp2(k)));
  }
  if (L.xticks.size() < 2) {  // linear axis, or a log2 range narrower than two powers of two
    L.xticks.clear(), L.xlabels.clear();
    double step = 1, a = c.x_log2 ? std::exp2(L.xlo) : L.xlo, b = c.x_log2 ? std::exp2(L.xhi) : L.xhi;
    for (double v : nice_ticks(a, b, 7, &step)) {
      if (c.x_log2 && v <= 0) continue;
      L.xticks.push_back(tx(v)), L.xlabels.push_back(tick_label(v, step));
    }
  }

  bool legend = std::any_of(c.series.begin(), c.series.end(), [](const Series& s) { return !s.name.empty(); });
  if (legend) {
    for (const auto& s : c.series) L.names.push_back(elide(f, s.name, kLegendPx, 220));
    L.legend_w = int(std::ceil(56 + max_width(f, L.names, kLegendPx) + 12));
  }
  double tick_h = line_height(f, kTickPx), lab_h = line_height(f, kLabelPx);
  int top = c.title.empty() ? 20 : 52;
  int left = int(std::ceil(16 + (c.y_label.empty() ? 0 : lab_h + 12) + max_width(f, L.ylabels, kTickPx) + 10));
  int bottom = int(std::ceil(8 + tick_h + (c.x_label.empty() ? 0 : 10 + lab_h) + 14));
  int right = legend ? 16 + L.legend_w + 20 : 28;
  L.area = {left, top, L.W - left - right, L.H - top - bottom};

  // Thin out x tick labels until neighbours do not touch.
  while (L.xticks.size() > 2) {
    double spacing = L.xticks.size() > 1 ? (L.px(L.xticks[1]) - L.px(L.xticks[0])) : L.area.w;
    if (max_width(f, L.xlabels, kTickPx) + 10 <= spacing) break;
    std::vector<double> t;
    std::vector<std::string> s;
    for (size_t i = 0; i < L.xticks.size(); i += 2) t.push_back(L.xticks[i]), s.push_back(L.xlabels[i]);
    L.xticks = t, L.xlabels = s;
  }
  return L;
}

// ------------------------------------------------------------------------------------- heat map layout

struct HeatLayout {
  int W = 0, H = 0, rows = 0, cols = 0, cw = 0, ch = 0;
  Rect grid, bar;
  std::vector<std::string> xlabels, ylabels;
  bool rotate_x = false;
  size_t x_stride = 1, y_stride = 1;
  double xtick_region = 0;
};

HeatLayout layout_heat(const Heatmap& h, const Font& f) {
  HeatLayout L;
  L.rows = int(std::max(h.values.size(), h.y_ticks.size()));
  for (const auto& r : h.values) L.cols = std::max(L.cols, int(r.size()));
  L.cols = std::max(L.cols, int(h.x_ticks.size()));
  if (L.rows == 0 || L.cols == 0) L.rows = L.cols = 0;
  auto cell_size = [](int n, double target, int lo, int hi) {
    if (n == 0) return 0;
    int s = std::clamp(int(std::lround(target / n)), lo, hi);
    return n * s > 1600 ? std::max(1, 1600 / n) : s;
  };
  L.cw = cell_size(L.cols, 720, 40, 120), L.ch = cell_size(L.rows, 480, 40, 80);
  for (int i = 0; i < L.cols; ++i) L.xlabels.push_back(size_t(i) < h.x_ticks.size() ? h.x_ticks[i] : std::to_string(i));
  for (int i = 0; i < L.rows; ++i) L.ylabels.push_back(size_t(i) < h.y_ticks.size() ? h.y_ticks[i] : std::to_string(i));
  double tick_h = line_height(f, kTickPx), lab_h = line_height(f, kLabelPx);
  double xw = max_width(f, L.xlabels, kTickPx);
  L.rotate_x = xw + 8 > L.cw;
  L.x_stride = L.rotate_x ? size_t(std::ceil((tick_h + 2) / std::max(L.cw, 1))) : 1;
  L.y_stride = size_t(std::ceil((tick_h + 2) / std::max(L.ch, 1)));
  L.xtick_region = L.rotate_x ? xw : tick_h;

  int top = h.title.empty() ? 20 : 52;
  int left = int(std::ceil(16 + (h.y_label.empty() ? 0 : lab_h + 12) + max_width(f, L.ylabels, kTickPx) + 8));
  int bottom = int(std::ceil(8 + L.xtick_region + (h.x_label.empty() ? 0 : 10 + lab_h) + 14));
  double v_step = 1;
  std::vector<std::string> bar_labels;
  for (double v : nice_ticks(h.v_min, h.v_max, 5, &v_step)) bar_labels.push_back(tick_label(v, v_step));
  int right = h.colorbar && L.rows ? int(std::ceil(24 + 18 + 8 + max_width(f, bar_labels, kTickPx) + 20)) : 24;
  int gw = L.cols * L.cw, gh = L.rows * L.ch;
  L.W = std::max({left + gw + right, int(f.width(h.title, kTitlePx)) + 40, 400});
  L.H = std::max(top + gh + bottom, 300);
  int shift = (L.W - (left + gw + right)) / 2;  // centre the content when the title is the widest thing
  L.grid = {left + shift, top, gw, gh};
  if (h.colorbar && L.rows) L.bar = {L.grid.x + gw + 24, top, 18, gh};
  return L;
}

// Interpolates a table of evenly spaced colors.
template <size_t N>
Rgb interpolate(const uint32_t (&table)[N], double t) {
  t = std::clamp(finite(t) ? t : 0.0, 0.0, 1.0) * (N - 1);
  size_t i = std::min(size_t(t), N - 2);
  double u = t - double(i);
  Rgb a = hex(table[i]), b = hex(table[i + 1]);
  auto mix = [u](uint8_t p, uint8_t q) { return uint8_t(std::lround(p + (q - p) * u)); };
  return {mix(a.r, b.r), mix(a.g, b.g), mix(a.b, b.b)};
}

double normalise(double v, double lo, double hi) { return hi > lo ? (v - lo) / (hi - lo) : 0.5; }

}  // namespace

// ----------------------------------------------------------------------------------------------- public

Rgb series_color(size_t i) {
  static const uint32_t palette[8] = {0x1f77b4, 0xd62728, 0x2ca02c, 0xff7f0e, 0x9467bd, 0x8c564b, 0xe377c2, 0x17becf};
  return hex(palette[i % 8]);
}

Rgb colormap_color(Colormap m, double t) {
  static const uint32_t rdylgn[] = {0xa50026, 0xd73027, 0xf46d43, 0xfdae61, 0xfee08b, 0xffffbf,
                                    0xd9ef8b, 0xa6d96a, 0x66bd63, 0x1a9850, 0x006837};
  static const uint32_t viridis[] = {0x440154, 0x482475, 0x414487, 0x355f8d, 0x2a788e, 0x21918c,
                                     0x22a884, 0x44bf70, 0x7ad151, 0xbddf26, 0xfde725};
  return m == Colormap::Viridis ? interpolate(viridis, t) : interpolate(rdylgn, t);
}

Rect line_chart_area(const LineChart& c) { return layout_chart(c, *Font::load()).area; }

Rect heatmap_cell(const Heatmap& h, size_t row, size_t col) {
  HeatLayout L = layout_heat(h, *Font::load());
  if (row >= size_t(L.rows) || col >= size_t(L.cols)) return {};
  return {L.grid.x + int(col) * L.cw, L.grid.y + int(row) * L.ch, L.cw, L.ch};
}

void line_chart(const std::string& png_path, const LineChart& c) {
  auto font = Font::load();
  const Font& f = *font;
  ChartLayout L = layout_chart(c, f);
  Canvas cv(L.W, L.H, kWhite, font);
  const Rect& a = L.area;
  int ax1 = a.x + a.w, ay1 = a.y + a.h;

  // Grid lines and tick labels.
  for (size_t i = 0; i < L.yticks.size(); ++i) {
    int y = int(std::lround(L.py(L.yticks[i])));
    cv.fill_rect(a.x, y, ax1, y + 1, kGrid);
    cv.fill_rect(a.x - 5, y, a.x, y + 1, kAxis);
    cv.text(a.x - 9, y + 0.5, L.ylabels[i], kTickPx, kInk, HAlign::Right, VAlign::Middle);
  }
  for (size_t i = 0; i < L.xticks.size(); ++i) {
    int x = int(std::lround(L.px(L.xticks[i])));
    cv.fill_rect(x, a.y, x + 1, ay1, kGrid);
    cv.fill_rect(x, ay1, x + 1, ay1 + 5, kAxis);
    cv.text(x + 0.5, ay1 + 8, L.xlabels[i], kTickPx, kInk, HAlign::Center, VAlign::Top);
  }

  // Series: lines (broken at invalid points), then markers on top.
  cv.set_clip(a.x + 1, a.y + 1, ax1 - 1, ay1 - 1);
  auto marker_of = [](size_t i) { return Marker(i % 4); };
  // Point i of a series in pixels; false for a point that cannot be drawn (not finite, or <= 0 on a log axis).
  auto pixel = [&](const Series& s, size_t i, double& x, double& y) {
    if (!finite(s.x[i]) || !finite(s.y[i]) || (c.x_log2 && s.x[i] <= 0)) return false;
    x = L.px(c.x_log2 ? std::log2(s.x[i]) : s.x[i]);
    y = L.py(s.y[i]);
    return true;
  };
  double x = 0, y = 0;
  for (size_t si = 0; si < c.series.size(); ++si) {
    const Series& s = c.series[si];
    std::vector<double> xs, ys;
    auto flush = [&] { cv.polyline(xs, ys, 2.25, series_color(si)), xs.clear(), ys.clear(); };
    for (size_t i = 0; i < std::min(s.x.size(), s.y.size()); ++i) {
      if (!pixel(s, i, x, y)) { flush(); continue; }
      xs.push_back(x), ys.push_back(y);
    }
    flush();
  }
  for (size_t si = 0; si < c.series.size(); ++si) {
    const Series& s = c.series[si];
    for (size_t i = 0; i < std::min(s.x.size(), s.y.size()); ++i)
      if (pixel(s, i, x, y)) cv.marker(x, y, 4.5, marker_of(si), series_color(si));
  }
  cv.reset_clip();
  cv.stroke_rect(a.x, a.y, ax1 + 1, ay1 + 1, kAxis);

  // Title, axis labels, legend.
  double title_x = f.width(c.title, kTitlePx) < a.w ? a.x + a.w / 2.0 : L.W / 2.0;
  cv.text(title_x, 16, c.title, kTitlePx, kInk, HAlign::Center, VAlign::Top);
  cv.text(a.x + a.w / 2.0, L.H - 14, c.x_label, kLabelPx, kInk, HAlign::Center, VAlign::Bottom);
  cv.text(16, a.y + a.h / 2.0, c.y_label, kLabelPx, kInk, HAlign::Left, VAlign::Middle, true);
  if (L.legend_w) {
    int lx = ax1 + 16, ly = a.y, row = 24;
    int lh = int(L.names.size()) * row + 10;
    cv.fill_rect(lx, ly, lx + L.legend_w, ly + lh, kWhite);
    cv.stroke_rect(lx, ly, lx + L.legend_w, ly + lh, kLegendEdge);
    for (size_t i = 0; i < L.names.size(); ++i) {
      double cy = ly + 5 + row * (i + 0.5);
      cv.line(lx + 12, cy, lx + 42, cy, 2.25, series_color(i));
      cv.marker(lx + 27, cy, 4.5, marker_of(i), series_color(i));
      cv.text(lx + 52, cy, L.names[i], kLegendPx, kInk, HAlign::Left, VAlign::Middle);
    }
  }
  cv.save_png(png_path);
}

void heatmap(const std::string& png_path, const Heatmap& h) {
  auto font = Font::load();
  const Font& f = *font;
  HeatLayout L = layout_heat(h, f);
  Canvas cv(L.W, L.H, kWhite, font);
  const Rect& g = L.grid;
  double title_x = g.w > f.width(h.title, kTitlePx) ? g.x + g.w / 2.0 : L.W / 2.0;
  cv.text(title_x, 16, h.title, kTitlePx, kInk, HAlign::Center, VAlign::Top);
  if (L.rows == 0) {
    cv.text(L.W / 2.0, L.H / 2.0, "no data", kLabelPx, kAxis, HAlign::Center, VAlign::Middle);
    cv.save_png(png_path);
    return;
  }

  // Cells, separated by 1 px white lines when they are large enough.
  int gap = L.cw >= 20 && L.ch >= 20 ? 1 : 0;
  double ann_w = f.width("0.00", kCellPx);
  bool annotate = h.annotate && f.ok() && L.ch >= line_height(f, kCellPx) + 4 && L.cw >= ann_w + 6;
  for (int r = 0; r < L.rows; ++r) {
    for (int c = 0; c < L.cols; ++c) {
      double v = size_t(r) < h.values.size() && size_t(c) < h.values[r].size()
                     ? h.values[r][c]
                     : std::numeric_limits<double>::quiet_NaN();
      Rgb col = finite(v) ? colormap_color(h.colormap, normalise(v, h.v_min, h.v_max)) : kMissingColor;
      int x0 = g.x + c * L.cw, y0 = g.y + r * L.ch;
      cv.fill_rect(x0, y0, x0 + L.cw - gap, y0 + L.ch - gap, col);
      if (!annotate || !finite(v)) continue;
      std::string s = fmt::format("{:.2f}", v);
      if (f.width(s, kCellPx) + 4 > L.cw - gap) continue;
      double lum = 0.2126 * col.r + 0.7152 * col.g + 0.0722 * col.b;
      cv.text(x0 + (L.cw - gap) / 2.0, y0 + (L.ch - gap) / 2.0, s, kCellPx, lum > 140 ? kInk : kWhite,
              HAlign::Center, VAlign::Middle);
    }
  }

  // Tick labels (thinned out when cells are smaller than the text) and axis labels.
  for (int r = 0; r < L.rows; r += int(L.y_stride))
    cv.text(g.x - 8, g.y + (r + 0.5) * L.ch - gap / 2.0, L.ylabels[r], kTickPx, kInk, HAlign::Right,
            VAlign::Middle);
  for (int c = 0; c < L.cols; c += int(L.x_stride)) {
    double x = g.x + (c + 0.5) * L.cw - gap / 2.0;
    cv.text(x, g.y + g.h + 8, L.xlabels[c], kTickPx, kInk, HAlign::Center, VAlign::Top, L.rotate_x);
  }
  cv.text(g.x + g.w / 2.0, L.H - 14, h.x_label, kLabelPx, kInk, HAlign::Center, VAlign::Bottom);
  cv.text(16, g.y + g.h / 2.0, h.y_label, kLabelPx, kInk, HAlign::Left, VAlign::Middle, true);

  // Colorbar: v_max at the top.
  if (h.colorbar) {
    const Rect& b = L.bar;
    for (int y = 0; y < b.h; ++y)
      cv.fill_rect(b.x, b.y + y, b.x + b.w, b.y + y + 1,
                   colormap_color(h.colormap, b.h > 1 ? 1.0 - double(y) / (b.h - 1) : 1.0));
    cv.stroke_rect(b.x, b.y, b.x + b.w, b.y + b.h, kAxis);
    double step = 1;
    for (double v : nice_ticks(h.v_min, h.v_max, 5, &step)) {
      int y = int(std::lround(b.y + (1.0 - normalise(v, h.v_min, h.v_max)) * (b.h - 1)));
      cv.fill_rect(b.x + b.w, y, b.x + b.w + 5, y + 1, kAxis);
      cv.text(b.x + b.w + 8, y + 0.5, tick_label(v, step), kTickPx, kInk, HAlign::Left, VAlign::Middle);
    }
  }
  cv.save_png(png_path);
}

}  // namespace headroom::plot
