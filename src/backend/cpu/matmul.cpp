// CPU backend: matmul kernels.
//
// Work decomposition. The output y[n][rows] is cut into tasks of (a chunk of weight rows) x (a block of
// activation rows). Inside a task, register tiles of kMR = 4 weight rows x NR <= 4 activation rows are
// computed over the whole K dimension, so every weight value loaded into a register is used NR times and
// every activation value kMR times. Every output element is produced by exactly one tile with the same
// sequence of operations whatever the tile shape, chunking or thread count, so results are bit-identical
// for any number of threads (and a row of a batch equals the same row computed alone).
//
// Q8_0 weights: the activation rows are quantized once per call to Q8_0 blocks (fp32 scale per 32 values,
// like llama.cpp's q8_0 x q8_0 path) and dot products run in int8:
//   * AVX-512 VNNI: vpdpbusd multiplies unsigned by signed bytes. We feed the weights as unsigned w + 128
//     (sign bit flipped) and the activations as signed x, so a block sum is sum(w*x) + 128*sum(x); the
//     128*sum(x) correction is precomputed per activation block and used as the accumulator's starting
//     value, which makes it free. Two blocks fill one 512-bit register (8 int32 lanes each); the lanes are
//     scaled by d_w*d_x in float and accumulated, the horizontal sum happens once per output.
//     For n >= kPackMinN the weights of a task are first repacked (sign flipped, scales expanded to lanes)
//     into a panel that stays in L1/L2 while all activation tiles of the task stream past it.
//   * AVX2: the classic sign trick (|w| unsigned x sign(x, w) signed with vpmaddubsw), per block.
//   * Scalar: integer dot per block.
// F32/F16/BF16/Q4_0/Q4_K/Q6_K weights: rows are converted to float (in a per-thread panel; F32 is used in
// place) and multiplied with FMA on float activations.
#include "backend/cpu/matmul.h"

#include <algorithm>
#include <cstring>

#include "backend/cpu/quant.h"
#include "util/error.h"

namespace headroom::cpu {

namespace {

constexpr int kMR = 4;               // weight rows per register tile
constexpr int kNRMax = 4;            // activation rows per register tile
constexpr int64_t kXBlock = 64;      // activation rows per task when n is large
constexpr int64_t kPackMinN = 8;     // from this n on, use the large-n decomposition (and Q8_0 panels)
constexpr int64_t kRowChunkBig = 32; // weight rows per task when n is large

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// -------------------------------------------------------------------------------------------------------
// Activations quantized to Q8_0. Per row: np = ceil(nb/2) "pairs" of two 32-value blocks.
//   qs  : np*64 int8        (the values; a missing last block is zero)
//   xsc : np*16 float       (lane l of pair p holds the scale of block 2p + l/8)
//   corr: np*16 int32       (lane l holds -16*sum(q of its block): 8 lanes sum to -128*sum(q))
struct QActs {
  int64_t nb = 0, np = 0;
  size_t stride = 0;
  uint8_t* base = nullptr;
  const int8_t* qs(int64_t j) const { return reinterpret_cast<const int8_t*>(base + size_t(j) * stride); }
  const float* xsc(int64_t j) const { return reinterpret_cast<const float*>(base + size_t(j) * stride + np * 64); }
  const int32_t* corr(int64_t j) const {
    return reinterpret_cast<const int32_t*>(base + size_t(j) * stride + np * 128);
  }
};

void quantize_row_q8(const float* x, int64_t nb, int8_t* qs, float* xsc, int32_t* corr) {
  for (int64_t b = 0; b < nb; ++b) {
    const float* xb = x + b * 32;
    int8_t* qb = qs + b * 32;
    int32_t sum = 0;
#if defined(HR_AVX512)
    const __m512 v0 = _mm512_loadu_ps(xb), v1 = _mm512_loadu_ps(xb + 16);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
    const float d = amax / 127.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    const __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, _mm512_set1_ps(id)));  // round to nearest even
    const __m512i q1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, _mm512_set1_ps(id)));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(qb), _mm512_cvtepi32_epi8(q0));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(qb + 16), _mm512_cvtepi32_epi8(q1));
    sum = _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
#else
    float amax = 0.0f;
    for (int k = 0; k < 32; ++k) amax = std::max(amax, std::fabs(xb[k]));
    const float d = amax / 127.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    for (int k = 0; k < 32; ++k) {
      const float v = std::fmin(127.0f, std::fmax(-127.0f, std::nearbyint(xb[k] * id)));
      qb[k] = int8_t(v);
      sum += qb[k];
    }
#endif
    const int64_t off = (b / 2) * 16 + (b % 2) * 8;
    for (int l = 0; l < 8; ++l) {
      xsc[off + l] = d;
      corr[off + l] = -16 * sum;
    }
  }
  if (nb % 2) {  // pad the last pair with an empty block
    std::memset(qs + nb * 32, 0, 32);
    const int64_t off = (nb / 2) * 16 + 8;
    for (int l = 0; l < 8; ++l) {
      xsc[off + l] = 0.0f;
      corr[off + l] = 0;
    }
  }
}

// The layout of n rows of K quantized activations in buf.
QActs view_acts(AlignedBuf& buf, int64_t n, int64_t K) {
  QActs a;
  a.nb = K / 32;
  a.np = ceil_div(a.nb, 2);
  a.stride = size_t(a.np) * 192;
  a.base = static_cast<uint8_t*>(buf.ensure(a.stride * size_t(n)));
  return a;
}

QActs quantize_acts(ThreadPool& pool, AlignedBuf& buf, const float* x, int64_t n, int64_t K) {
  const QActs a = view_acts(buf, n, K);
  auto rows = [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j)
      quantize_row_q8(x + j * K, a.nb, const_cast<int8_t*>(a.qs(j)), const_cast<float*>(a.xsc(j)),
                      const_cast<int32_t*>(a.corr(j)));
  };
  constexpr int64_t kRowsPerTask = 16;
  if (n < 2 * kRowsPerTask) {
    rows(0, n);
  } else {
    pool.parallel_for(ceil_div(n, kRowsPerTask), [&](int64_t t, int) {
      rows(t * kRowsPerTask, std::min(n, (t + 1) * kRowsPerTask));
    });
  }
  return a;
}

// Stores a finished tile: y[(j0+j)*ldy + i0+i] for i < mr.
// (Written out for the full tile so that the compiler does not turn it into a memcpy call.)
template <int NR>
inline void store_sums(const float (&s)[NR][kMR], float* y, int64_t ldy, int64_t j0, int64_t i0, int mr) {
  for (int j = 0; j < NR; ++j) {
    float* yj = y + (j0 + j) * ldy + i0;
    if (mr == kMR) {
      yj[0] = s[j][0];
      yj[1] = s[j][1];
      yj[2] = s[j][2];
      yj[3] = s[j][3];
    } else {
      for (int i = 0; i < mr; ++i) yj[i] = s[j][i];
    }
  }
}

// -------------------------------------------------------------------------------------------------------
#if defined(HR_AVX512VNNI)

// One pair of blocks for one (weight row, activation row): lanes 0-7 belong to block 2p, lanes 8-15 to
// block 2p+1. s = corr + sum over 4 bytes of (w+128)*x per lane, so sum of a block's 8 lanes = sum(w*x)
// exactly; then acc += float(s) * d_x * d_w lane-wise.
inline __m512 q8_fma(__m512 acc, __m512i wu, __m512 wsc, __m512i xq, __m512i xcorr, __m512 xsc) {
  const __m512i s = _mm512_dpbusd_epi32(xcorr, wu, xq);
  return _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(s), xsc), wsc, acc);
}

// Loads pair p of a Q8_0 row straight from the file layout (34-byte blocks): weights with the sign bit
// flipped and the two fp16 scales broadcast over their 8 lanes. A missing second block reads as zeros.
inline void q8_load_pair(const uint8_t* row, int64_t p, bool full, __m512i* wu, __m512* wsc) {
  const uint8_t* b = row + p * 68;
  uint16_t h0, h1 = 0;
  std::memcpy(&h0, b, 2);
  const __m256i lo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 2));
  if (full) {
    std::memcpy(&h1, b + 34, 2);
    const __m256i hi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 36));
    *wu = _mm512_xor_si512(_mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1), _mm512_set1_epi8(char(0x80)));
  } else {
    *wu = _mm512_zextsi256_si512(_mm256_xor_si256(lo, _mm256_set1_epi8(char(0x80))));
  }
  *wsc = _mm512_cvtph_ps(_mm256_set_m128i(_mm_set1_epi16(short(h1)), _mm_set1_epi16(short(h0))));
}

template <int NR>
inline void q8_finish(__m512 (&acc)[kMR][NR], float* y, int64_t ldy, int64_t j0, int64_t i0, int mr) {
  const __mmask8 m = __mmask8((1u << mr) - 1);
  for (int j = 0; j < NR; ++j)
    _mm_mask_storeu_ps(y + (j0 + j) * ldy + i0, m, hsum4(acc[0][j], acc[1][j], acc[2][j], acc[3][j]));
}

// Tile straight from the weight file layout (used for small n: every weight byte is read once anyway).
template <int NR>
void q8_tile_direct(const uint8_t* const* rows, const QActs& a, int64_t j0, float* y, int64_t ldy, int64_t i0,
                    int mr) {
  __m512 acc[kMR][NR];
  for (auto& r : acc)
    for (auto& v : r) v = _mm512_setzero_ps();
  const int64_t full_pairs = a.nb / 2;
  for (int64_t p = 0; p < a.np; ++p) {
    __m512i wu[kMR];
    __m512 wsc[kMR];
    for (int i = 0; i < kMR; ++i) q8_load_pair(rows[i], p, p < full_pairs, &wu[i], &wsc[i]);
    for (int j = 0; j < NR; ++j) {
      const __m512i xq = _mm512_loadu_si512(a.qs(j0 + j) + p * 64);
      const __m512i xc = _mm512_loadu_si512(a.corr(j0 + j) + p * 16);
      const __m512 xs = _mm512_loadu_ps(a.xsc(j0 + j) + p * 16);
      for (int i = 0; i < kMR; ++i) acc[i][j] = q8_fma(acc[i][j], wu[i], wsc[i], xq, xc, xs);
    }
  }
  q8_finish<NR>(acc, y, ldy, j0, i0, mr);
}

// Packed panel of kMR rows: for each pair p and row i, 64 bytes of sign-flipped weights then 16 floats of
// lane scales (exactly what q8_load_pair produces, so packed and direct tiles give identical results).
constexpr size_t kQ8PanelPairBytes = kMR * 128;

void q8_pack_panel(const uint8_t* const* rows, const QActs& a, uint8_t* dst) {
  const int64_t full_pairs = a.nb / 2;
  for (int64_t p = 0; p < a.np; ++p)
    for (int i = 0; i < kMR; ++i) {
      __m512i wu;
      __m512 wsc;
      q8_load_pair(rows[i], p, p < full_pairs, &wu, &wsc);
      uint8_t* d = dst + size_t(p) * kQ8PanelPairBytes + size_t(i) * 128;
      _mm512_store_si512(d, wu);
      _mm512_store_ps(d + 64, wsc);
    }
}

template <int NR>
void q8_tile_packed(const uint8_t* panel, const QActs& a, int64_t j0, float* y, int64_t ldy, int64_t i0, int mr) {
  __m512 acc[kMR][NR];
  for (auto& r : acc)
    for (auto& v : r) v = _mm512_setzero_ps();
  const int8_t* xq_row[NR];
  const int32_t* xc_row[NR];
  const float* xs_row[NR];
  for (int j = 0; j < NR; ++j) {
    xq_row[j] = a.qs(j0 + j);
    xc_row[j] = a.corr(j0 + j);
    xs_row[j] = a.xsc(j0 + j);
  }
  for (int64_t p = 0; p < a.np; ++p) {
    const uint8_t* pp = panel + size_t(p) * kQ8PanelPairBytes;
    __m512i wu[kMR];
    __m512 wsc[kMR];
    for (int i = 0; i < kMR; ++i) {
      wu[i] = _mm512_load_si512(pp + i * 128);
      wsc[i] = _mm512_load_ps(pp + i * 128 + 64);
    }
    for (int j = 0; j < NR; ++j) {
      const __m512i xq = _mm512_loadu_si512(xq_row[j] + p * 64);
      const __m512i xc = _mm512_loadu_si512(xc_row[j] + p * 16);
      const __m512 xs = _mm512_loadu_ps(xs_row[j] + p * 16);
      for (int i = 0; i < kMR; ++i) acc[i][j] = q8_fma(acc[i][j], wu[i], wsc[i], xq, xc, xs);
    }
  }
  q8_finish<NR>(acc, y, ldy, j0, i0, mr);
}

#elif defined(HR_AVX2)

// AVX2: per 32-value block, |w| (unsigned) x sign(x, w) (signed) with vpmaddubsw: the pairwise int16
// sums cannot saturate (|w| <= 128, |x| <= 127), then vpmaddwd with ones widens to 8 int32 lanes, which
// are scaled by d_w*d_x and accumulated in float.
template <int NR>
void q8_tile_direct(const uint8_t* const* rows, const QActs& a, int64_t j0, float* y, int64_t ldy, int64_t i0,
                    int mr) {
  __m256 acc[kMR][NR];
  for (auto& r : acc)
    for (auto& v : r) v = _mm256_setzero_ps();
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t b = 0; b < a.nb; ++b) {
    __m256i aw[kMR], w[kMR];
    float dw[kMR];
    for (int i = 0; i < kMR; ++i) {
      const uint8_t* blk = rows[i] + b * 34;
      uint16_t h;
      std::memcpy(&h, blk, 2);
      dw[i] = fp16_to_fp32(h);
      w[i] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 2));
      aw[i] = _mm256_sign_epi8(w[i], w[i]);
    }
    for (int j = 0; j < NR; ++j) {
      const __m256i xq = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.qs(j0 + j) + b * 32));
      const float dx = a.xsc(j0 + j)[(b / 2) * 16 + (b % 2) * 8];
      for (int i = 0; i < kMR; ++i) {
        const __m256i p16 = _mm256_maddubs_epi16(aw[i], _mm256_sign_epi8(xq, w[i]));
        const __m256 s = _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, ones));
        acc[i][j] = _mm256_fmadd_ps(s, _mm256_set1_ps(dw[i] * dx), acc[i][j]);
      }
    }
  }
  float s[NR][kMR];
  for (int j = 0; j < NR; ++j)
    for (int i = 0; i < kMR; ++i) s[j][i] = vsum(acc[i][j]);
  store_sums<NR>(s, y, ldy, j0, i0, mr);
}

#else

template <int NR>
void q8_tile_direct(const uint8_t* const* rows, const QActs& a, int64_t j0, float* y, int64_t ldy, int64_t i0,
                    int mr) {
  float s[NR][kMR] = {};
  for (int64_t b = 0; b < a.nb; ++b) {
    for (int i = 0; i < kMR; ++i) {
      const uint8_t* blk = rows[i] + b * 34;
      uint16_t h;
      std::memcpy(&h, blk, 2);
      const float dw = fp16_to_fp32(h);
      const int8_t* wq = reinterpret_cast<const int8_t*>(blk + 2);
      for (int j = 0; j < NR; ++j) {
        const int8_t* xq = a.qs(j0 + j) + b * 32;
        int32_t dot = 0;
        for (int k = 0; k < 32; ++k) dot += int32_t(wq[k]) * int32_t(xq[k]);
        s[j][i] += dw * a.xsc(j0 + j)[(b / 2) * 16 + (b % 2) * 8] * float(dot);
      }
    }
  }
  store_sums<NR>(s, y, ldy, j0, i0, mr);
}

#endif

// -------------------------------------------------------------------------------------------------------
// Float tile: kMR weight rows x NR activation rows, FMA over K in vector steps (masked tail).
template <int NR>
void f32_tile(const float* const* w, const float* x, int64_t K, float* y, int64_t ldy, int64_t j0, int64_t i0,
              int mr) {
  VecF acc[kMR][NR];
  for (auto& r : acc)
    for (auto& v : r) v = vzero();
  const float* xr[NR];
  for (int j = 0; j < NR; ++j) xr[j] = x + (j0 + j) * K;
  int64_t k = 0;
  for (; k + kVL <= K; k += kVL) {
    VecF wv[kMR];
    for (int i = 0; i < kMR; ++i) wv[i] = vload(w[i] + k);
    for (int j = 0; j < NR; ++j) {
      const VecF xv = vload(xr[j] + k);
      for (int i = 0; i < kMR; ++i) acc[i][j] = vfma(wv[i], xv, acc[i][j]);
    }
  }
  if (k < K) {
    const int t = int(K - k);
    VecF wv[kMR];
    for (int i = 0; i < kMR; ++i) wv[i] = vload_part(w[i] + k, t);
    for (int j = 0; j < NR; ++j) {
      const VecF xv = vload_part(xr[j] + k, t);
      for (int i = 0; i < kMR; ++i) acc[i][j] = vfma(wv[i], xv, acc[i][j]);
    }
  }
  float s[NR][kMR];
  for (int j = 0; j < NR; ++j)
    for (int i = 0; i < kMR; ++i) s[j][i] = vsum(acc[i][j]);
  store_sums<NR>(s, y, ldy, j0, i0, mr);
}

// Converts one stored row to float.
void to_float_row(DType t, const void* src, float* dst, int64_t K) {
#if defined(HR_AVX512) || defined(HR_AVX2)
  if (t == DType::F16 || t == DType::BF16) {
    const auto* s = static_cast<const uint16_t*>(src);
    int64_t k = 0;
    for (; k + kVL <= K; k += kVL) vstore(dst + k, t == DType::F16 ? vload_f16(s + k) : vload_bf16(s + k));
    if (k < K) {
      const int r = int(K - k);
      vstore_part(dst + k, t == DType::F16 ? vload_f16_part(s + k, r) : vload_bf16_part(s + k, r), r);
    }
    return;
  }
#endif
  dequantize_row(t, src, dst, K);
}

// Calls f.template operator()<NR>() for a runtime nr in 1..4.
template <typename F>
inline void with_nr(int nr, F&& f) {
  switch (nr) {
    case 1: f.template operator()<1>(); break;
    case 2: f.template operator()<2>(); break;
    case 3: f.template operator()<3>(); break;
    default: f.template operator()<4>(); break;
  }
}

}  // namespace

size_t weight_row_stride(const WeightView& w, const char* op) {
  if (w.rows < 0 || w.cols <= 0) fail("cpu backend: {}: bad weight shape {} x {}", op, w.rows, w.cols);
  const size_t dense = row_bytes(w.type, w.cols);  // throws for unsupported types / partial blocks
  if (w.row_bytes != 0 && w.row_bytes < dense)
    fail("cpu backend: {}: row_bytes {} is less than the {} bytes of a {} row of {}", op, w.row_bytes, dense,
         gguf::type_name(w.type), w.cols);
  if (w.rows > 0 && w.data == nullptr) fail("cpu backend: {}: weight has no data", op);
  return w.row_bytes ? w.row_bytes : dense;
}

void matmul(ThreadPool& pool, MatmulScratch& scratch, const WeightView& w, const float* x, int64_t n, float* y) {
  const size_t stride = weight_row_stride(w, "matmul");
  if (n < 0) fail("cpu backend: matmul: negative row count {}", n);
  if (n == 0 || w.rows == 0) return;
  const int64_t rows = w.rows, K = w.cols;
  const int T = pool.size();
  if (scratch.thread.size() < size_t(T)) scratch.thread.resize(size_t(T));
  const auto* wbase = static_cast<const uint8_t*>(w.data);

  // Task grid: (chunk of rc weight rows) x (block of xb activation rows).
  const bool big = n >= kPackMinN;
  const int64_t xb = big ? kXBlock : n;
  const int64_t n_xb = ceil_div(n, xb);
  int64_t rc = big ? kRowChunkBig : ceil_div(ceil_div(rows, int64_t(T) * 4), kMR) * kMR;
  rc = std::max<int64_t>(rc, kMR);
  const int64_t n_rc = ceil_div(rows, rc);

  // Row pointers of panel starting at r (rows past the end repeat the last row; their results are dropped).
  auto panel_rows = [&](int64_t r, int64_t r_end, const uint8_t** out) {
    for (int i = 0; i < kMR; ++i) out[i] = wbase + size_t(std::min(r + i, r_end - 1)) * stride;
  };

  if (w.type == DType::Q8_0) {
    const QActs a = scratch.acts_x == x && scratch.acts_n == n && scratch.acts_k == K
                        ? view_acts(scratch.acts, n, K)  // matmul_shared: quantized by the group's first
                        : quantize_acts(pool, scratch.acts, x, n, K);
#if defined(HR_AVX512VNNI)
    const size_t panel_bytes = size_t(a.np) * kQ8PanelPairBytes;
    if (big)
      for (int t = 0; t < T; ++t) scratch.thread[size_t(t)].ensure(panel_bytes * size_t(rc / kMR + 1));
#endif
    pool.parallel_for(n_rc * n_xb, [&](int64_t task, int th) {
      const int64_t r0 = (task / n_xb) * rc, r1 = std::min(rows, r0 + rc);
      const int64_t j0 = (task % n_xb) * xb, j1 = std::min(n, j0 + xb);
#if defined(HR_AVX512VNNI)
      if (big) {
        uint8_t* panels = static_cast<uint8_t*>(scratch.thread[size_t(th)].ensure(0));
        for (int64_t r = r0; r < r1; r += kMR) {
          const uint8_t* pr[kMR];
          panel_rows(r, r1, pr);
          q8_pack_panel(pr, a, panels + size_t((r - r0) / kMR) * panel_bytes);
        }
        for (int64_t j = j0; j < j1; j += kNRMax)
          with_nr(int(std::min<int64_t>(kNRMax, j1 - j)), [&]<int NR>() {
            for (int64_t r = r0; r < r1; r += kMR)
              q8_tile_packed<NR>(panels + size_t((r - r0) / kMR) * panel_bytes, a, j, y, rows, r,
                                 int(std::min<int64_t>(kMR, r1 - r)));
          });
        return;
      }
#endif
      for (int64_t r = r0; r < r1; r += kMR) {
        const uint8_t* pr[kMR];
        panel_rows(r, r1, pr);
        for (int64_t j = j0; j < j1; j += kNRMax)
          with_nr(int(std::min<int64_t>(kNRMax, j1 - j)), [&]<int NR>() {
            q8_tile_direct<NR>(pr, a, j, y, rows, r, int(std::min<int64_t>(kMR, r1 - r)));
          });
      }
    });
    return;
  }

  // Float path.
  const bool convert = w.type != DType::F32;
  if (convert)
    for (int t = 0; t < T; ++t) scratch.thread[size_t(t)].ensure(size_t(rc) * size_t(K) * sizeof(float));
  pool.parallel_for(n_rc * n_xb, [&](int64_t task, int th) {
    const int64_t r0 = (task / n_xb) * rc, r1 = std::min(rows, r0 + rc);
    const int64_t j0 = (task % n_xb) * xb, j1 = std::min(n, j0 + xb);
    float* conv = convert ? static_cast<float*>(scratch.thread[size_t(th)].ensure(0)) : nullptr;
    if (convert)
      for (int64_t r = r0; r < r1; ++r) to_float_row(w.type, wbase + size_t(r) * stride, conv + (r - r0) * K, K);
    auto row_ptr = [&](int64_t r) -> const float* {
      r = std::min(r, r1 - 1);
      return convert ? conv + (r - r0) * K : reinterpret_cast<const float*>(wbase + size_t(r) * stride);
    };
    for (int64_t j = j0; j < j1; j += kNRMax)
      with_nr(int(std::min<int64_t>(kNRMax, j1 - j)), [&]<int NR>() {
        for (int64_t r = r0; r < r1; r += kMR) {
          const float* pr[kMR];
          for (int i = 0; i < kMR; ++i) pr[i] = row_ptr(r + i);
          f32_tile<NR>(pr, x, K, y, rows, j, r, int(std::min<int64_t>(kMR, r1 - r)));
        }
      });
  });
}

void matmul_shared(ThreadPool& pool, MatmulScratch& scratch, std::span<const WeightView* const> ws,
                   std::span<float* const> ys, const float* x, int64_t n) {
  if (ws.size() != ys.size()) fail("cpu backend: matmul_shared: {} weights but {} outputs", ws.size(), ys.size());
  struct Forget {  // the quantized activations are valid only within this call
    MatmulScratch& s;
    ~Forget() { s.acts_x = nullptr, s.acts_n = s.acts_k = -1; }
  } forget{scratch};
  for (size_t i = 0; i < ws.size(); ++i) {
    const WeightView& w = *ws[i];
    matmul(pool, scratch, w, x, n, ys[i]);
    if (w.type == DType::Q8_0 && n > 0) {  // acts now holds x quantized for w.cols
      scratch.acts_x = x;
      scratch.acts_n = n;
      scratch.acts_k = w.cols;
    }
  }
}

}  // namespace headroom::cpu
