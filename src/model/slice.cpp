#include "model/slice.h"

#include <algorithm>
#include <cstring>

#include "util/error.h"

namespace headroom {

void add_range(Ranges& r, int64_t b, int64_t e) {
  if (!r.empty() && r.back().second == b) r.back().second = e;
  else r.emplace_back(b, e);
}
int64_t total(const Ranges& r) {
  int64_t n = 0;
  for (auto [b, e] : r) n += e - b;
  return n;
}

uint8_t* own(Owned& o, size_t bytes) {
  auto* p = static_cast<uint8_t*>(std::aligned_alloc(64, (std::max<size_t>(bytes, 1) + 63) / 64 * 64));
  if (!p) fail("tensor parallel: out of memory for a weight slice of {} bytes", bytes);
  o.emplace_back(p);
  return p;
}

// Rows `rs` of w: a view into it when they are one range, else a copy of those rows.
WeightView slice_rows(const WeightView& w, const Ranges& rs, Owned& o) {
  WeightView s = w;
  s.rows = total(rs);
  const auto* src = static_cast<const uint8_t*>(w.data);
  if (rs.size() == 1) {
    s.data = src + size_t(rs[0].first) * w.row_bytes;
    return s;
  }
  uint8_t* dst = own(o, size_t(s.rows) * w.row_bytes);
  s.data = dst;
  for (auto [b, e] : rs) {
    std::memcpy(dst, src + size_t(b) * w.row_bytes, size_t(e - b) * w.row_bytes);
    dst += size_t(e - b) * w.row_bytes;
  }
  return s;
}

// Columns `cs` of w: w itself for all of them; else a copy of the stored blocks where every range starts and
// ends on a block boundary of the type, else the rows dequantized to F32 (exact) and cut.
WeightView slice_cols(const WeightView& w, const Ranges& cs, Owned& o) {
  if (cs.size() == 1 && cs[0].first == 0 && cs[0].second == w.cols) return w;
  const int64_t blk = gguf::type_traits(w.type)->block_elems;
  bool aligned = true;
  for (auto [b, e] : cs) aligned = aligned && b % blk == 0 && e % blk == 0;
  WeightView s;
  s.rows = w.rows;
  s.cols = total(cs);
  s.type = aligned ? w.type : DType::F32;
  s.row_bytes = row_bytes(s.type, s.cols);
  uint8_t* dst = own(o, size_t(s.rows) * s.row_bytes);
  s.data = dst;
  const auto* src = static_cast<const uint8_t*>(w.data);
  std::vector<float> row(aligned ? 0 : size_t(w.cols));
  for (int64_t r = 0; r < w.rows; ++r) {
    const uint8_t* in = src + size_t(r) * w.row_bytes;
    uint8_t* out = dst + size_t(r) * s.row_bytes;
    if (!aligned) dequantize_row(w.type, in, row.data(), w.cols);
    for (auto [b, e] : cs) {
      if (aligned) {
        const size_t off = b ? row_bytes(w.type, b) : 0, len = row_bytes(w.type, e - b);
        std::memcpy(out, in + off, len);
        out += len;
      } else {
        std::memcpy(out, row.data() + b, size_t(e - b) * sizeof(float));
        out += size_t(e - b) * sizeof(float);
      }
    }
  }
  return s;
}

const float* slice_f32(const float* v, const Ranges& rs, Owned& o) {
  auto* dst = reinterpret_cast<float*>(own(o, size_t(total(rs)) * sizeof(float)));
  float* out = dst;
  for (auto [b, e] : rs) out = std::copy(v + b, v + e, out);
  return dst;
}


}  // namespace headroom
