// Weight slices for tensor parallelism (docs/tensor-parallel.md): rows or columns of a stored weight, as a view
// into it where that is possible, else a copy owned by the caller. Used by the Runner at load.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <memory>
#include <utility>
#include <vector>

#include "backend/backend.h"

namespace headroom {

using Ranges = std::vector<std::pair<int64_t, int64_t>>;  // [begin, end), ascending, disjoint

// Appends [b, e), merging it with the last range when they touch.
void add_range(Ranges& r, int64_t b, int64_t e);
int64_t total(const Ranges& r);

struct AlignedFree {
  void operator()(uint8_t* p) const { std::free(p); }
};
using Owned = std::vector<std::unique_ptr<uint8_t, AlignedFree>>;
// 64-byte aligned memory owned by `o`.
uint8_t* own(Owned& o, size_t bytes);

// Rows `rs` of w: a view into it when they are one range, else a copy of those rows.
WeightView slice_rows(const WeightView& w, const Ranges& rs, Owned& o);
// Columns `cs` of w: w itself for all of them; else a copy of the stored blocks where every range starts and
// ends on a block boundary of the type, else the rows dequantized to F32 (exact) and cut.
WeightView slice_cols(const WeightView& w, const Ranges& cs, Owned& o);
// Elements `rs` of a float vector (biases), copied.
const float* slice_f32(const float* v, const Ranges& rs, Owned& o);

}  // namespace headroom
