// CPU backend: element-wise and per-row ops. Each element's result depends only on its own inputs (and
// each row's on that row), so splitting the work across threads never changes results.
#include "backend/cpu/ops.h"

#include <algorithm>
#include <cmath>

#include "backend/cpu/simd.h"
#include "util/error.h"

namespace headroom::cpu {

namespace {

constexpr int64_t kElemsPerTask = 16384;  // below ~2 tasks' worth, run inline (a dispatch costs ~1 µs)

// Runs f(begin, end) over [0, count) in chunks that are multiples of 16 elements.
template <typename F>
void split_elems(ThreadPool& pool, int64_t count, F&& f) {
  if (count < 2 * kElemsPerTask || pool.size() == 1) {
    f(int64_t(0), count);
    return;
  }
  pool.parallel_for((count + kElemsPerTask - 1) / kElemsPerTask, [&](int64_t t, int) {
    f(t * kElemsPerTask, std::min(count, (t + 1) * kElemsPerTask));
  });
}

// Runs f(r0, r1) over rows in groups of about kElemsPerTask elements.
template <typename F>
void split_rows(ThreadPool& pool, int64_t n, int64_t dim, F&& f) {
  const int64_t rows_per_task = std::max<int64_t>(1, kElemsPerTask / std::max<int64_t>(dim, 1));
  if (n < 2 * rows_per_task || pool.size() == 1) {
    f(int64_t(0), n);
    return;
  }
  pool.parallel_for((n + rows_per_task - 1) / rows_per_task, [&](int64_t t, int) {
    f(t * rows_per_task, std::min(n, (t + 1) * rows_per_task));
  });
}

// Sum of squares in double (fixed order: lane-wise partial sums, then a fixed reduction).
double sum_squares(const float* x, int64_t dim) {
#if defined(HR_AVX512)
  __m512d a0 = _mm512_setzero_pd(), a1 = _mm512_setzero_pd();
  int64_t i = 0;
  for (; i + 16 <= dim; i += 16) {
    const __m512d lo = _mm512_cvtps_pd(_mm256_loadu_ps(x + i));
    const __m512d hi = _mm512_cvtps_pd(_mm256_loadu_ps(x + i + 8));
    a0 = _mm512_fmadd_pd(lo, lo, a0);
    a1 = _mm512_fmadd_pd(hi, hi, a1);
  }
  double s = _mm512_reduce_add_pd(_mm512_add_pd(a0, a1));
  for (; i < dim; ++i) s += double(x[i]) * double(x[i]);
  return s;
#else
  double s = 0.0;
  for (int64_t i = 0; i < dim; ++i) s += double(x[i]) * double(x[i]);
  return s;
#endif
}

// silu(g) * u = g / (1 + e^-g) * u.
void swiglu_range(const float* g, const float* u, float* out, int64_t i0, int64_t i1) {
  int64_t i = i0;
#if defined(HR_AVX512)
  const __m512 one = _mm512_set1_ps(1.0f);
  for (; i < i1; i += 16) {
    const __mmask16 m = i1 - i >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (i1 - i)) - 1);
    const __m512 gv = _mm512_maskz_loadu_ps(m, g + i);
    const __m512 uv = _mm512_maskz_loadu_ps(m, u + i);
    const __m512 e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), gv));
    _mm512_mask_storeu_ps(out + i, m, _mm512_mul_ps(_mm512_div_ps(gv, _mm512_add_ps(one, e)), uv));
  }
#elif defined(HR_AVX2)
  const __m256 one = _mm256_set1_ps(1.0f);
  for (; i < i1; i += 8) {  // (the tail masked, so that a value's bits do not depend on where a range ends)
    const int w = int(std::min<int64_t>(8, i1 - i));
    const __m256 gv = vload_part(g + i, w), uv = vload_part(u + i, w);
    const __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), gv));
    vstore_part(out + i, _mm256_mul_ps(_mm256_div_ps(gv, _mm256_add_ps(one, e)), uv), w);
  }
#else
  for (; i < i1; ++i) out[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
#endif
}

}  // namespace

void rmsnorm(ThreadPool& pool, const float* x, const float* weight, int64_t n, int64_t dim, float eps, float* out) {
  if (n < 0 || dim <= 0) fail("cpu backend: rmsnorm: bad shape {} x {}", n, dim);
  split_rows(pool, n, dim, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* xr = x + r * dim;
      float* o = out + r * dim;
      // As ggml: mean in float from a double sum, scale = 1/sqrt(mean + eps), out = (x * scale) * w.
      const float mean = float(sum_squares(xr, dim) / double(dim));
      const float scale = 1.0f / std::sqrt(mean + eps);
      int64_t i = 0;
      const VecF sv = vset1(scale);
      for (; i + kVL <= dim; i += kVL) vstore(o + i, vmul(vmul(vload(xr + i), sv), vload(weight + i)));
      for (; i < dim; ++i) o[i] = (xr[i] * scale) * weight[i];
    }
  });
}

void swiglu(ThreadPool& pool, const float* gate, const float* up, int64_t count, float* out) {
  if (count < 0) fail("cpu backend: swiglu: negative count {}", count);
  split_elems(pool, count, [&](int64_t i0, int64_t i1) { swiglu_range(gate, up, out, i0, i1); });
}

void add(ThreadPool& pool, float* x, const float* y, int64_t count) {
  if (count < 0) fail("cpu backend: add: negative count {}", count);
  split_elems(pool, count, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) x[i] += y[i];
  });
}

void add_bias(ThreadPool& pool, float* x, const float* b, int64_t n, int64_t dim) {
  if (n < 0 || dim <= 0) fail("cpu backend: add_bias: bad shape {} x {}", n, dim);
  split_rows(pool, n, dim, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t j = 0; j < dim; ++j) x[r * dim + j] += b[j];
  });
}

bool Rope::cache_matches(int64_t n, const int32_t* pos, const RopeParams& p) const {
  if (!valid_ || p.n_rot != n_rot_ || p.theta_base != theta_base_ || p.freq_scale != freq_scale_) return false;
  if ((p.freq_factors != nullptr) != has_ff_) return false;
  if (has_ff_ && !std::equal(freq_factors_.begin(), freq_factors_.end(), p.freq_factors)) return false;
  return int64_t(pos_.size()) == n && std::equal(pos_.begin(), pos_.end(), pos);
}

void Rope::apply(ThreadPool& pool, float* x, int64_t n, int64_t n_heads, int64_t head_dim, const int32_t* pos,
                 const RopeParams& p) {
  if (n < 0 || n_heads <= 0 || head_dim <= 0) fail("cpu backend: rope: bad shape {} x {} x {}", n, n_heads, head_dim);
  if (p.n_rot <= 0 || p.n_rot % 2 != 0 || p.n_rot > head_dim)
    fail("cpu backend: rope: n_rot {} must be even and in (0, head_dim {}]", p.n_rot, head_dim);
  if (n == 0) return;
  const int half = p.n_rot / 2;

  if (!cache_matches(n, pos, p)) {
    valid_ = false;
    pos_.assign(pos, pos + n);
    has_ff_ = p.freq_factors != nullptr;
    if (has_ff_) freq_factors_.assign(p.freq_factors, p.freq_factors + half);
    else freq_factors_.clear();
    n_rot_ = p.n_rot;
    theta_base_ = p.theta_base;
    freq_scale_ = p.freq_scale;
    cos_.resize(size_t(n) * size_t(half));
    sin_.resize(size_t(n) * size_t(half));
    // The same float recurrence as ggml_rope_cache_init (ext_factor 0, attn_factor 1):
    //   theta_scale = base^(-2/n_rot); theta_i = p * theta_scale^i (by repeated multiplication);
    //   angle_i = freq_scale * (theta_i / ff_i).
    const float theta_scale = std::pow(p.theta_base, -2.0f / float(p.n_rot));
    split_rows(pool, n, half * 8, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        float theta = float(pos[r]);
        for (int i = 0; i < half; ++i) {
          const float ff = has_ff_ ? freq_factors_[size_t(i)] : 1.0f;
          const float angle = p.freq_scale * (theta / ff);
          cos_[size_t(r) * size_t(half) + size_t(i)] = std::cos(angle);
          sin_[size_t(r) * size_t(half) + size_t(i)] = std::sin(angle);
          theta *= theta_scale;
        }
      }
    });
    valid_ = true;
  }

  const int64_t dim = n_heads * head_dim;
  split_rows(pool, n, dim, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* c = cos_.data() + size_t(r) * size_t(half);
      const float* s = sin_.data() + size_t(r) * size_t(half);
      for (int64_t h = 0; h < n_heads; ++h) {
        float* v = x + r * dim + h * head_dim;
        if (!p.neox) {
          for (int i = 0; i < half; ++i) {
            const float x0 = v[2 * i], x1 = v[2 * i + 1];
            v[2 * i] = x0 * c[i] - x1 * s[i];
            v[2 * i + 1] = x0 * s[i] + x1 * c[i];
          }
        } else {
          for (int i = 0; i < half; ++i) {
            const float x0 = v[i], x1 = v[i + half];
            v[i] = x0 * c[i] - x1 * s[i];
            v[i + half] = x0 * s[i] + x1 * c[i];
          }
        }
      }
    }
  });
}

}  // namespace headroom::cpu
