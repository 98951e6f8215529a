// CPU backend: scalar conversions, row sizes and reference dequantization (bit-exact with ggml's
// dequantize_row_* functions: same float operations in the same order).
#include "backend/cpu/quant.h"

#include <cmath>

#if defined(__F16C__)
#include <immintrin.h>
#endif

#include "backend/backend.h"
#include "backend/cpu/simd.h"
#include "util/error.h"

namespace headroom::cpu {

float fp16_to_fp32(uint16_t h) {
#if defined(__F16C__)
  return _cvtsh_ss(h);
#else
  const uint32_t sign = uint32_t(h & 0x8000) << 16;
  uint32_t exp = (h >> 10) & 0x1F;
  uint32_t man = h & 0x3FF;
  uint32_t u;
  if (exp == 0) {
    if (man == 0) {
      u = sign;
    } else {  // subnormal: normalize
      int e = -1;
      do {
        man <<= 1;
        ++e;
      } while (!(man & 0x400));
      u = sign | uint32_t(127 - 15 - e) << 23 | (man & 0x3FF) << 13;
    }
  } else if (exp == 31) {
    u = sign | 0x7F800000u | man << 13;
  } else {
    u = sign | (exp + 112) << 23 | man << 13;
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}

uint16_t fp32_to_fp16(float f) {
#if defined(__F16C__)
  return _cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT);
#else
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint16_t sign = uint16_t((u >> 16) & 0x8000);
  const uint32_t au = u & 0x7FFFFFFFu;
  if (au >= 0x7F800000u) return sign | 0x7C00 | (au > 0x7F800000u ? 0x200 : 0);  // inf / NaN
  if (au >= 0x477FF000u) return sign | 0x7C00;                                   // overflow -> inf
  if (au < 0x38800000u) {                                                        // subnormal or zero
    if (au < 0x33000000u) return sign;                                           // rounds to 0
    const uint32_t man = (au & 0x7FFFFF) | 0x800000;
    const int shift = 126 - int(au >> 23);  // 14..24
    uint32_t r = man >> shift;
    const uint32_t rem = man & ((1u << shift) - 1), half = 1u << (shift - 1);
    if (rem > half || (rem == half && (r & 1))) ++r;
    return sign | uint16_t(r);
  }
  uint32_t r = ((au >> 13) - (112u << 10));
  const uint32_t rem = au & 0x1FFF;
  if (rem > 0x1000 || (rem == 0x1000 && (r & 1))) ++r;
  return sign | uint16_t(r);
#endif
}

uint16_t fp32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return uint16_t((u >> 16) | 0x40);  // quiet NaN
  u += 0x7FFF + ((u >> 16) & 1);
  return uint16_t(u >> 16);
}

bool block_info(DType t, int64_t* elems, int64_t* bytes) {
  switch (t) {
    case DType::F32: *elems = 1; *bytes = 4; return true;
    case DType::F16: *elems = 1; *bytes = 2; return true;
    case DType::BF16: *elems = 1; *bytes = 2; return true;
    case DType::Q8_0: *elems = kQK8_0; *bytes = sizeof(BlockQ8_0); return true;
    case DType::Q4_0: *elems = kQK4_0; *bytes = sizeof(BlockQ4_0); return true;
    case DType::Q4_K: *elems = kQK_K; *bytes = sizeof(BlockQ4_K); return true;
    case DType::Q6_K: *elems = kQK_K; *bytes = sizeof(BlockQ6_K); return true;
    default: return false;
  }
}

namespace {

void deq_q8_0(const BlockQ8_0* x, float* y, int64_t nb) {
  for (int64_t i = 0; i < nb; ++i) {
    const float d = fp16_to_fp32(x[i].d);
    for (int j = 0; j < kQK8_0; ++j) y[i * kQK8_0 + j] = x[i].qs[j] * d;
  }
}

void deq_q4_0(const BlockQ4_0* x, float* y, int64_t nb) {
  for (int64_t i = 0; i < nb; ++i) {
    const float d = fp16_to_fp32(x[i].d);
    for (int j = 0; j < kQK4_0 / 2; ++j) {
      const int x0 = (x[i].qs[j] & 0x0F) - 8;
      const int x1 = (x[i].qs[j] >> 4) - 8;
      y[i * kQK4_0 + j] = x0 * d;
      y[i * kQK4_0 + j + kQK4_0 / 2] = x1 * d;
    }
  }
}

void deq_q4_k(const BlockQ4_K* x, float* y, int64_t nb) {
  for (int64_t i = 0; i < nb; ++i) {
    const uint8_t* q = x[i].qs;
    const float d = fp16_to_fp32(x[i].d);
    const float min = fp16_to_fp32(x[i].dmin);
    int is = 0;
    uint8_t sc, m;
    for (int j = 0; j < kQK_K; j += 64) {
      q4k_scale_min(is + 0, x[i].scales, &sc, &m);
      const float d1 = d * sc, m1 = min * m;
      q4k_scale_min(is + 1, x[i].scales, &sc, &m);
      const float d2 = d * sc, m2 = min * m;
      for (int l = 0; l < 32; ++l) *y++ = d1 * (q[l] & 0xF) - m1;
      for (int l = 0; l < 32; ++l) *y++ = d2 * (q[l] >> 4) - m2;
      q += 32;
      is += 2;
    }
  }
}

void deq_q6_k(const BlockQ6_K* x, float* y, int64_t nb) {
  for (int64_t i = 0; i < nb; ++i) {
    const float d = fp16_to_fp32(x[i].d);
    const uint8_t* ql = x[i].ql;
    const uint8_t* qh = x[i].qh;
    const int8_t* sc = x[i].scales;
    for (int n = 0; n < kQK_K; n += 128) {
      for (int l = 0; l < 32; ++l) {
        const int is = l / 16;
        const int8_t q1 = int8_t((ql[l + 0] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32;
        const int8_t q2 = int8_t((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
        const int8_t q3 = int8_t((ql[l + 0] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
        const int8_t q4 = int8_t((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
        y[l + 0] = d * sc[is + 0] * q1;
        y[l + 32] = d * sc[is + 2] * q2;
        y[l + 64] = d * sc[is + 4] * q3;
        y[l + 96] = d * sc[is + 6] * q4;
      }
      y += 128;
      ql += 64;
      qh += 32;
      sc += 8;
    }
  }
}

// F16 or BF16 to float, whole vectors then the rest: exact conversions, so both paths give the same bits.
template <bool kBF16>
void widen_half_row(const uint16_t* s, float* dst, int64_t n) {
  int64_t i = 0;
#if defined(HR_AVX512) || defined(HR_AVX2)
  for (; i + kVL <= n; i += kVL) {
    if constexpr (kBF16) vstore(dst + i, vload_bf16(s + i));
    else vstore(dst + i, vload_f16(s + i));
  }
#endif
  for (; i < n; ++i) dst[i] = kBF16 ? bf16_to_fp32(s[i]) : fp16_to_fp32(s[i]);
}

}  // namespace
}  // namespace headroom::cpu

namespace headroom {

size_t row_bytes(DType type, int64_t n) {
  int64_t elems = 0, bytes = 0;
  if (!cpu::block_info(type, &elems, &bytes)) fail("cpu backend: unsupported weight type {}", gguf::type_name(type));
  if (n < 0 || n % elems != 0)
    fail("cpu backend: row of {} elements is not a multiple of the {} block size {}", n, gguf::type_name(type), elems);
  return size_t(n / elems) * size_t(bytes);
}

void dequantize_row(DType type, const void* src, float* dst, int64_t n) {
  using namespace cpu;
  (void)row_bytes(type, n);  // validates type and n
  switch (type) {
    case DType::F32:
      std::memcpy(dst, src, size_t(n) * 4);
      return;
    case DType::F16: widen_half_row<false>(static_cast<const uint16_t*>(src), dst, n); return;
    case DType::BF16: widen_half_row<true>(static_cast<const uint16_t*>(src), dst, n); return;
    case DType::Q8_0: deq_q8_0(static_cast<const BlockQ8_0*>(src), dst, n / kQK8_0); return;
    case DType::Q4_0: deq_q4_0(static_cast<const BlockQ4_0*>(src), dst, n / kQK4_0); return;
    case DType::Q4_K: deq_q4_k(static_cast<const BlockQ4_K*>(src), dst, n / kQK_K); return;
    case DType::Q6_K: deq_q6_k(static_cast<const BlockQ6_K*>(src), dst, n / kQK_K); return;
    default: break;
  }
  fail("cpu backend: unsupported weight type {}", gguf::type_name(type));
}

}  // namespace headroom
