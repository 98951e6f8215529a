// headroom: raster canvas + text for the plots. The stb implementations are compiled here, once, with static
// linkage (STB_*_STATIC), so they cannot clash with any other copy linked into the program and the binary does
// not depend on libstb.so at run time.
#include "eval/canvas.h"

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>

#include <fmt/format.h>

#include "util/error.h"
#include "util/file.h"

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wunused-function"
#pragma GCC diagnostic ignored "-Wmissing-field-initializers"
#pragma GCC diagnostic ignored "-Wsign-compare"
#define STB_IMAGE_WRITE_STATIC
#define STB_IMAGE_WRITE_IMPLEMENTATION
#include <stb_image_write.h>
#define STBTT_STATIC
#define STB_TRUETYPE_IMPLEMENTATION
#include <stb_truetype.h>
#pragma GCC diagnostic pop

namespace headroom::plot {

Rgb hex(uint32_t v) { return {uint8_t(v >> 16), uint8_t(v >> 8), uint8_t(v)}; }

// ---------------------------------------------------------------------------------------------- font

struct Font::Impl {
  std::vector<unsigned char> data;
  stbtt_fontinfo info{};
  int ascent = 0, descent = 0, line_gap = 0;  // font units
};

Font::~Font() = default;

namespace {

constexpr const char* kDefaultFont = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

// Decodes UTF-8; invalid bytes become U+FFFD.
std::vector<int> codepoints(const std::string& s) {
  std::vector<int> out;
  for (size_t i = 0; i < s.size();) {
    auto c = static_cast<unsigned char>(s[i]);
    int n = c < 0x80 ? 0 : (c >> 5) == 6 ? 1 : (c >> 4) == 14 ? 2 : (c >> 3) == 30 ? 3 : -1;
    int cp = n == 0 ? c : n == 1 ? (c & 0x1f) : n == 2 ? (c & 0x0f) : (c & 0x07);
    bool ok = n >= 0 && i + n < s.size();
    for (int k = 1; ok && k <= n; ++k) {
      if ((static_cast<unsigned char>(s[i + k]) >> 6) != 2) ok = false;
      else cp = (cp << 6) | (s[i + k] & 0x3f);
    }
    out.push_back(ok ? cp : 0xfffd);
    i += ok ? n + 1 : 1;
  }
  return out;
}

}  // namespace

std::shared_ptr<const Font> Font::load() {
  static std::atomic<bool> warned{false};
  const char* env = std::getenv("HEADROOM_PLOT_FONT");
  std::string path = env && *env ? env : kDefaultFont;
  std::shared_ptr<Font> f(new Font());
  f->impl_ = std::make_unique<Impl>();
  std::string why;
  try {
    const std::string bytes = read_text_file(path, "font", size_t(64) << 20);
    f->impl_->data.assign(bytes.begin(), bytes.end());
  } catch (const Error& e) {
    why = e.what();
  }
  auto& d = f->impl_->data;
  if (!d.empty()) {
    int off = stbtt_GetFontOffsetForIndex(d.data(), 0);
    f->ok_ = off >= 0 && stbtt_InitFont(&f->impl_->info, d.data(), off) != 0;
  }
  if (f->ok_) {
    stbtt_GetFontVMetrics(&f->impl_->info, &f->impl_->ascent, &f->impl_->descent, &f->impl_->line_gap);
  } else if (!warned.exchange(true)) {
    fmt::print(stderr, "headroom: warning: cannot load font {}{}{}; plots are drawn without text\n", path,
               why.empty() ? "" : ": ", why);
  }
  return f;
}

double Font::ascent(double px) const {
  if (!ok_) return 0.93 * px;  // DejaVuSans proportions, so layouts do not change without the font
  return impl_->ascent * stbtt_ScaleForMappingEmToPixels(&impl_->info, float(px));
}

double Font::descent(double px) const {
  if (!ok_) return 0.24 * px;
  return -impl_->descent * stbtt_ScaleForMappingEmToPixels(&impl_->info, float(px));
}

double Font::width(const std::string& utf8, double px) const {
  if (!ok_) return 0;
  float scale = stbtt_ScaleForMappingEmToPixels(&impl_->info, float(px));
  double w = 0;
  int prev = 0;
  for (int cp : codepoints(utf8)) {
    int adv = 0, lsb = 0;
    stbtt_GetCodepointHMetrics(&impl_->info, cp, &adv, &lsb);
    if (prev) w += scale * stbtt_GetCodepointKernAdvance(&impl_->info, prev, cp);
    w += scale * adv;
    prev = cp;
  }
  return w;
}

Font::Mask Font::render(const std::string& utf8, double px) const {
  Mask m;
  if (!ok_ || utf8.empty()) return m;
  const stbtt_fontinfo* info = &impl_->info;
  float scale = stbtt_ScaleForMappingEmToPixels(info, float(px));
  m.baseline = int(std::ceil(ascent(px))) + 1;
  m.h = m.baseline + int(std::ceil(descent(px))) + 1;
  m.w = int(std::ceil(width(utf8, px))) + int(px / 2) + 2;  // room for overhanging glyphs (italics, 'j')
  m.a.assign(size_t(m.w) * m.h, 0);
  std::vector<uint8_t> glyph;
  double pen = 1;
  int prev = 0;
  for (int cp : codepoints(utf8)) {
    if (prev) pen += scale * stbtt_GetCodepointKernAdvance(info, prev, cp);
    int adv = 0, lsb = 0;
    stbtt_GetCodepointHMetrics(info, cp, &adv, &lsb);
    float frac = float(pen - std::floor(pen));
    int x0, y0, x1, y1;
    stbtt_GetCodepointBitmapBoxSubpixel(info, cp, scale, scale, frac, 0, &x0, &y0, &x1, &y1);
    int gw = x1 - x0, gh = y1 - y0;
    if (gw > 0 && gh > 0) {
      glyph.assign(size_t(gw) * gh, 0);
      stbtt_MakeCodepointBitmapSubpixel(info, glyph.data(), gw, gh, gw, scale, scale, frac, 0, cp);
      int ox = int(std::floor(pen)) + x0, oy = m.baseline + y0;
      for (int y = 0; y < gh; ++y) {
        for (int x = 0; x < gw; ++x) {
          int mx = ox + x, my = oy + y;
          if (mx < 0 || my < 0 || mx >= m.w || my >= m.h) continue;
          uint8_t& dst = m.a[size_t(my) * m.w + mx];
          dst = std::max(dst, glyph[size_t(y) * gw + x]);
        }
      }
    }
    pen += scale * adv;
    prev = cp;
  }
  return m;
}

// -------------------------------------------------------------------------------------------- canvas

Canvas::Canvas(int w, int h, Rgb bg, std::shared_ptr<const Font> font)
    : w_(std::max(w, 1)), h_(std::max(h, 1)), px_(size_t(w_) * h_ * 3), font_(std::move(font)) {
  if (!font_) font_ = Font::load();
  for (size_t i = 0; i < px_.size(); i += 3) px_[i] = bg.r, px_[i + 1] = bg.g, px_[i + 2] = bg.b;
  reset_clip();
}

Rgb Canvas::pixel(int x, int y) const {
  if (x < 0 || y < 0 || x >= w_ || y >= h_) return {};
  const uint8_t* p = &px_[(size_t(y) * w_ + x) * 3];
  return {p[0], p[1], p[2]};
}

void Canvas::set_clip(int x0, int y0, int x1, int y1) {
  cx0_ = std::clamp(x0, 0, w_), cy0_ = std::clamp(y0, 0, h_);
  cx1_ = std::clamp(x1, cx0_, w_), cy1_ = std::clamp(y1, cy0_, h_);
}

void Canvas::blend(int x, int y, Rgb c, double a) {
  if (x < cx0_ || y < cy0_ || x >= cx1_ || y >= cy1_ || !(a > 0)) return;
  uint8_t* p = &px_[(size_t(y) * w_ + x) * 3];
  if (a >= 1) {
    p[0] = c.r, p[1] = c.g, p[2] = c.b;
    return;
  }
  auto mix = [a](uint8_t d, uint8_t s) { return uint8_t(std::lround(d + (s - d) * a)); };
  p[0] = mix(p[0], c.r), p[1] = mix(p[1], c.g), p[2] = mix(p[2], c.b);
}

void Canvas::fill_rect(int x0, int y0, int x1, int y1, Rgb c) {
  for (int y = std::max(y0, cy0_); y < std::min(y1, cy1_); ++y)
    for (int x = std::max(x0, cx0_); x < std::min(x1, cx1_); ++x) blend(x, y, c, 1);
}

void Canvas::stroke_rect(int x0, int y0, int x1, int y1, Rgb c) {
  fill_rect(x0, y0, x1, y0 + 1, c);
  fill_rect(x0, y1 - 1, x1, y1, c);
  fill_rect(x0, y0, x0 + 1, y1, c);
  fill_rect(x1 - 1, y0, x1, y1, c);
}

void Canvas::line(double x0, double y0, double x1, double y1, double width, Rgb c) {
  if (!std::isfinite(x0) || !std::isfinite(y0) || !std::isfinite(x1) || !std::isfinite(y1)) return;
  double hw = width / 2, dx = x1 - x0, dy = y1 - y0, len2 = dx * dx + dy * dy;
  int bx0 = std::max(cx0_, int(std::floor(std::min(x0, x1) - hw - 1)));
  int bx1 = std::min(cx1_, int(std::ceil(std::max(x0, x1) + hw + 1)));
  int by0 = std::max(cy0_, int(std::floor(std::min(y0, y1) - hw - 1)));
  int by1 = std::min(cy1_, int(std::ceil(std::max(y0, y1) + hw + 1)));
  for (int y = by0; y < by1; ++y) {
    for (int x = bx0; x < bx1; ++x) {
      double px = x + 0.5 - x0, py = y + 0.5 - y0;
      double t = len2 > 0 ? std::clamp((px * dx + py * dy) / len2, 0.0, 1.0) : 0.0;
      double d = std::hypot(px - t * dx, py - t * dy);  // distance to the segment: a capsule
      blend(x, y, c, std::clamp(hw + 0.5 - d, 0.0, 1.0));
    }
  }
}

void Canvas::polyline(const std::vector<double>& xs, const std::vector<double>& ys, double width, Rgb c) {
  for (size_t i = 1; i < std::min(xs.size(), ys.size()); ++i) line(xs[i - 1], ys[i - 1], xs[i], ys[i], width, c);
}

void Canvas::marker(double cx, double cy, double r, Marker m, Rgb c) {
  if (!std::isfinite(cx) || !std::isfinite(cy)) return;
  auto inside = [&](double dx, double dy) {
    switch (m) {
      case Marker::Circle: return dx * dx + dy * dy <= r * r;
      case Marker::Square: return std::abs(dx) <= 0.85 * r && std::abs(dy) <= 0.85 * r;
      case Marker::Diamond: return std::abs(dx) + std::abs(dy) <= 1.25 * r;
      case Marker::Triangle: {  // pointing up, centred on its centroid
        double R = 1.3 * r, top = -R, base = R / 2, half = R * std::sqrt(3.0) / 2;
        return dy >= top && dy <= base && std::abs(dx) <= half * (dy - top) / (base - top);
      }
    }
    return false;
  };
  constexpr int S = 4;  // 4x4 supersampling
  int R = int(std::ceil(1.5 * r)) + 1;
  for (int y = int(cy) - R; y <= int(cy) + R; ++y) {
    for (int x = int(cx) - R; x <= int(cx) + R; ++x) {
      int hits = 0;
      for (int sy = 0; sy < S; ++sy)
        for (int sx = 0; sx < S; ++sx) hits += inside(x + (sx + 0.5) / S - cx, y + (sy + 0.5) / S - cy);
      blend(x, y, c, double(hits) / (S * S));
    }
  }
}

void Canvas::text(double x, double y, const std::string& s, double px, Rgb c, HAlign ha, VAlign va,
                  bool vertical) {
  Font::Mask m = font_->render(s, px);
  if (m.a.empty()) return;
  double tw = font_->width(s, px), asc = font_->ascent(px), desc = font_->descent(px);
  int ox, oy;
  if (!vertical) {
    double left = ha == HAlign::Left ? x : ha == HAlign::Center ? x - tw / 2 : x - tw;
    double base = va == VAlign::Baseline ? y
                  : va == VAlign::Top    ? y + asc
                  : va == VAlign::Bottom ? y - desc
                                         : y + (asc - desc) / 2;
    ox = int(std::lround(left)) - 1;  // the mask has one pixel of padding on the left
    oy = int(std::lround(base)) - m.baseline;
    for (int my = 0; my < m.h; ++my)
      for (int mx = 0; mx < m.w; ++mx) blend(ox + mx, oy + my, c, m.a[size_t(my) * m.w + mx] / 255.0);
    return;
  }
  // Rotated box on the canvas: width = line box height (asc + desc), height = advance width tw.
  double bw = asc + desc;
  double left = ha == HAlign::Left ? x : ha == HAlign::Right ? x - bw : x - bw / 2;
  double top = va == VAlign::Top ? y : va == VAlign::Bottom ? y - tw : y - tw / 2;
  // Mask (mx, my) -> canvas (ox + my, oy - mx): the start of the string sits at the bottom.
  ox = int(std::lround(left)) - (m.baseline - int(std::ceil(asc)));
  oy = int(std::lround(top + tw)) + 1;
  for (int my = 0; my < m.h; ++my)
    for (int mx = 0; mx < m.w; ++mx) blend(ox + my, oy - mx, c, m.a[size_t(my) * m.w + mx] / 255.0);
}

void Canvas::save_png(const std::string& path) const {
  std::string png;
  auto sink = [](void* ctx, void* data, int size) { static_cast<std::string*>(ctx)->append((const char*)data, size); };
  if (!stbi_write_png_to_func(sink, &png, w_, h_, 3, px_.data(), w_ * 3) || png.empty())
    fail("cannot encode PNG for {}", path);
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  if (!out) fail("cannot write plot {}: {}", path, std::strerror(errno));
  out.write(png.data(), std::streamsize(png.size()));
  out.close();
  if (!out) fail("cannot write plot {}: write failed", path);
}

}  // namespace headroom::plot
