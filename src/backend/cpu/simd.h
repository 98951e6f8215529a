// CPU backend: small SIMD helpers shared by the kernels.
//
// The ISA is chosen at compile time (we build with -march=native): AVX-512 (16 floats), else AVX2+FMA
// (8 floats), else portable scalar code. `VecF` wraps the float vector of the chosen width so that the
// float kernels (F32/F16/BF16 matmul, dots in attention) are written once.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>

// GCC 12 reports false -Wmaybe-uninitialized / -Wuninitialized warnings inside its own AVX-512 intrinsics (the
// _mm512_undefined_* idiom, GCC bug 105593); silence them for the files that include this header.
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ < 13
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif
#if defined(__AVX512F__) || defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__)
#define HR_AVX512 1
#endif
#if defined(HR_AVX512) && defined(__AVX512VNNI__)
#define HR_AVX512VNNI 1
#endif
#if !defined(HR_AVX512) && defined(__AVX2__) && defined(__FMA__)
#define HR_AVX2 1
#endif

namespace headroom::cpu {

// The vector e^x's constants (exp16, exp8): x = n ln2 + r with ln2 split in two (Cody-Waite), and Cephes'
// degree-6 polynomial for e^r = p(r) r^2 + r + 1, p(r) = ((((c0 r + c1) r + c2) r + c3) r + c4) r + c5.
inline constexpr struct {
  float log2e = 1.44269504088896341f, ln2_hi = 0.693359375f, ln2_lo = -2.12194440e-4f;
  float c[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f,
                5.0000001201e-1f};
} kExp;

// 64-byte aligned growable scratch buffer (contents are not preserved on growth).
class AlignedBuf {
 public:
  void* ensure(size_t bytes) {
    if (bytes > cap_) {
      cap_ = (bytes + 4095) & ~size_t(4095);
      ptr_.reset(static_cast<uint8_t*>(std::aligned_alloc(64, cap_)));
      if (!ptr_) std::abort();
    }
    return ptr_.get();
  }
  template <typename T>
  T* as(size_t count) { return static_cast<T*>(ensure(count * sizeof(T))); }

 private:
  struct Free {
    void operator()(uint8_t* p) const { std::free(p); }
  };
  std::unique_ptr<uint8_t, Free> ptr_;
  size_t cap_ = 0;
};

#if defined(HR_AVX512)

// ---- AVX-512: 16 float lanes -------------------------------------------------------------------------
constexpr int kVL = 16;
using VecF = __m512;
inline VecF vzero() { return _mm512_setzero_ps(); }
inline VecF vset1(float f) { return _mm512_set1_ps(f); }
inline VecF vload(const float* p) { return _mm512_loadu_ps(p); }
// Loads the first n (< kVL) lanes, zeroing the rest (never touches memory past p + n).
inline VecF vload_part(const float* p, int n) { return _mm512_maskz_loadu_ps(__mmask16((1u << n) - 1), p); }
inline void vstore(float* p, VecF v) { _mm512_storeu_ps(p, v); }
inline void vstore_part(float* p, VecF v, int n) { _mm512_mask_storeu_ps(p, __mmask16((1u << n) - 1), v); }
inline VecF vfma(VecF a, VecF b, VecF c) { return _mm512_fmadd_ps(a, b, c); }
inline VecF vmul(VecF a, VecF b) { return _mm512_mul_ps(a, b); }
inline VecF vadd(VecF a, VecF b) { return _mm512_add_ps(a, b); }
inline float vsum(VecF v) { return _mm512_reduce_add_ps(v); }
// n halves / bf16 values -> floats.
inline VecF vload_f16(const uint16_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p)); }
inline VecF vload_f16_part(const uint16_t* p, int n) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(__mmask16((1u << n) - 1), p));
}
inline VecF vload_bf16(const uint16_t* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}
inline VecF vload_bf16_part(const uint16_t* p, int n) {
  const __m256i h = _mm256_maskz_loadu_epi16(__mmask16((1u << n) - 1), p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// e^x for 16 lanes: Cody-Waite range reduction x = n ln2 + r, |r| <= ln2/2, Cephes degree-6 polynomial
// for e^r (relative error ~1e-7), then scalef(p, n) = p * 2^n, which over/underflows gracefully
// (e^-inf = 0, e^+inf = inf). NaN propagates.
inline __m512 exp16(__m512 x) {
  const __m512 log2e = _mm512_set1_ps(kExp.log2e);
  x = _mm512_max_ps(x, _mm512_set1_ps(-104.0f));  // below: result underflows to 0 anyway
  x = _mm512_min_ps(x, _mm512_set1_ps(89.0f));    // above: result overflows to inf anyway
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kExp.ln2_hi), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kExp.ln2_lo), r);
  __m512 p = _mm512_set1_ps(kExp.c[0]);
  for (int i = 1; i < 6; ++i) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExp.c[i]));
  const __m512 r2 = _mm512_mul_ps(r, r);
  p = _mm512_fmadd_ps(p, r2, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

// Sums of four vectors -> {sum(a), sum(b), sum(c), sum(d)} (a fixed reduction tree).
inline __m128 hsum4(__m512 a, __m512 b, __m512 c, __m512 d) {
  const __m256 a8 = _mm256_add_ps(_mm512_castps512_ps256(a), _mm512_extractf32x8_ps(a, 1));
  const __m256 b8 = _mm256_add_ps(_mm512_castps512_ps256(b), _mm512_extractf32x8_ps(b, 1));
  const __m256 c8 = _mm256_add_ps(_mm512_castps512_ps256(c), _mm512_extractf32x8_ps(c, 1));
  const __m256 d8 = _mm256_add_ps(_mm512_castps512_ps256(d), _mm512_extractf32x8_ps(d, 1));
  const __m256 ab = _mm256_hadd_ps(a8, b8);    // a01 a23 b01 b23 | a45 a67 b45 b67
  const __m256 cd = _mm256_hadd_ps(c8, d8);
  const __m256 abcd = _mm256_hadd_ps(ab, cd);  // a0-3 b0-3 c0-3 d0-3 | a4-7 b4-7 c4-7 d4-7
  return _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1));
}

#elif defined(HR_AVX2)

// ---- AVX2 + FMA: 8 float lanes -----------------------------------------------------------------------
constexpr int kVL = 8;
using VecF = __m256;
inline VecF vzero() { return _mm256_setzero_ps(); }
inline VecF vset1(float f) { return _mm256_set1_ps(f); }
inline VecF vload(const float* p) { return _mm256_loadu_ps(p); }
inline __m256i tail_mask8(int n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
inline VecF vload_part(const float* p, int n) { return _mm256_maskload_ps(p, tail_mask8(n)); }
inline void vstore(float* p, VecF v) { _mm256_storeu_ps(p, v); }
inline void vstore_part(float* p, VecF v, int n) { _mm256_maskstore_ps(p, tail_mask8(n), v); }
inline VecF vfma(VecF a, VecF b, VecF c) { return _mm256_fmadd_ps(a, b, c); }
inline VecF vmul(VecF a, VecF b) { return _mm256_mul_ps(a, b); }
inline VecF vadd(VecF a, VecF b) { return _mm256_add_ps(a, b); }
inline float vsum(VecF v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
inline VecF vload_f16(const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p)); }
inline VecF vload_bf16(const uint16_t* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}
inline VecF vload_f16_part(const uint16_t* p, int n) {
  alignas(32) uint16_t t[8] = {};
  std::memcpy(t, p, size_t(n) * 2);
  return vload_f16(t);
}
inline VecF vload_bf16_part(const uint16_t* p, int n) {
  alignas(32) uint16_t t[8] = {};
  std::memcpy(t, p, size_t(n) * 2);
  return vload_bf16(t);
}

// e^x for 8 lanes, as exp16 (the same reduction and polynomial; relative error ~1e-7) but with 2^n built in
// the exponent bits, AVX2 having no scalef: below -87.3 (e^-inf included) the result is 0, above 88.37 inf;
// NaN propagates.
inline __m256 exp8(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.33654f), hi = _mm256_set1_ps(88.37626f);
  const __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ), over = _mm256_cmp_ps(x, hi, _CMP_GT_OQ);
  const __m256 nan = _mm256_cmp_ps(x, x, _CMP_UNORD_Q);
  const __m256 xc = _mm256_min_ps(_mm256_max_ps(x, lo), hi);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(xc, _mm256_set1_ps(kExp.log2e)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kExp.ln2_hi), xc);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kExp.ln2_lo), r);
  __m256 p = _mm256_set1_ps(kExp.c[0]);
  for (int i = 1; i < 6; ++i) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExp.c[i]));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  __m256 y = _mm256_mul_ps(p, _mm256_castsi256_ps(e));
  y = _mm256_blendv_ps(y, _mm256_setzero_ps(), under);
  y = _mm256_blendv_ps(y, _mm256_set1_ps(INFINITY), over);
  return _mm256_blendv_ps(y, x, nan);
}

#else

// ---- portable scalar: one lane -----------------------------------------------------------------------
constexpr int kVL = 1;
using VecF = float;
inline VecF vzero() { return 0.0f; }
inline VecF vset1(float f) { return f; }
inline VecF vload(const float* p) { return *p; }
inline VecF vload_part(const float* p, int) { return *p; }
inline void vstore(float* p, VecF v) { *p = v; }
inline void vstore_part(float* p, VecF v, int) { *p = v; }
inline VecF vfma(VecF a, VecF b, VecF c) { return a * b + c; }
inline VecF vmul(VecF a, VecF b) { return a * b; }
inline VecF vadd(VecF a, VecF b) { return a + b; }
inline float vsum(VecF v) { return v; }

#endif

// Scalar e^x used where no vector exp exists (and for single values).
inline float exp_scalar(float x) { return std::exp(x); }

}  // namespace headroom::cpu
