// headroom: a small RGB raster canvas for the eval/profile plots: anti-aliased lines, markers and text
// (stb_truetype with DejaVuSans), written as PNG (stb_image_write).
//
// Coordinates are pixels with y pointing down; pixel (x, y) covers [x, x+1) x [y, y+1). Every primitive is
// clipped to the clip rectangle (the whole canvas by default). If the font file cannot be loaded, text is
// measured as zero-width and not drawn (one warning on stderr), so plots still come out, just without labels.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace headroom::plot {

struct Rgb {
  uint8_t r = 0, g = 0, b = 0;
  bool operator==(const Rgb&) const = default;
};
Rgb hex(uint32_t rrggbb);

enum class HAlign { Left, Center, Right };
enum class VAlign { Top, Middle, Baseline, Bottom };
enum class Marker { Circle, Square, Triangle, Diamond };

// A loaded TrueType font. $HEADROOM_PLOT_FONT overrides the default DejaVuSans path.
class Font {
 public:
  static std::shared_ptr<const Font> load();  // never null; ok() is false when the file is missing or bad
  ~Font();
  bool ok() const { return ok_; }
  double width(const std::string& utf8, double px) const;  // advance width at an em size of px
  double ascent(double px) const;                           // line box above / below the baseline (> 0)
  double descent(double px) const;

  struct Mask {  // coverage 0..255, w x h, baseline at row `baseline`, one pixel of padding left
    int w = 0, h = 0, baseline = 0;
    std::vector<uint8_t> a;
  };
  Mask render(const std::string& utf8, double px) const;

 private:
  Font() = default;
  struct Impl;
  std::unique_ptr<Impl> impl_;
  bool ok_ = false;
};

class Canvas {
 public:
  Canvas(int w, int h, Rgb background, std::shared_ptr<const Font> font);
  int width() const { return w_; }
  int height() const { return h_; }
  const Font& font() const { return *font_; }
  Rgb pixel(int x, int y) const;

  void set_clip(int x0, int y0, int x1, int y1);  // [x0, x1) x [y0, y1)
  void reset_clip() { set_clip(0, 0, w_, h_); }

  void blend(int x, int y, Rgb c, double alpha);                  // alpha >= 1 writes c exactly
  void fill_rect(int x0, int y0, int x1, int y1, Rgb c);          // [x0, x1) x [y0, y1), crisp
  void stroke_rect(int x0, int y0, int x1, int y1, Rgb c);        // 1 px outline just inside the rect
  void line(double x0, double y0, double x1, double y1, double width, Rgb c);  // anti-aliased, round caps
  void polyline(const std::vector<double>& xs, const std::vector<double>& ys, double width, Rgb c);
  void marker(double cx, double cy, double r, Marker m, Rgb c);    // anti-aliased filled shape

  // Text anchored at (x, y). vertical = rotated 90 degrees counter-clockwise (reads bottom to top); then the
  // alignments refer to the rotated box on the canvas (Baseline acts as Middle).
  void text(double x, double y, const std::string& utf8, double px, Rgb c, HAlign ha = HAlign::Left,
            VAlign va = VAlign::Baseline, bool vertical = false);

  void save_png(const std::string& path) const;  // throws headroom::Error on failure

 private:
  int w_, h_;
  int cx0_, cy0_, cx1_, cy1_;
  std::vector<uint8_t> px_;
  std::shared_ptr<const Font> font_;
};

}  // namespace headroom::plot
