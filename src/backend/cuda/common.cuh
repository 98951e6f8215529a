// CUDA backend: device helpers shared by the kernel files (conversions, KV row access, reductions).
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "backend/cuda/kernels.h"

namespace headroom::cuda {

constexpr int kKVF32 = int(KVType::F32), kKVF16 = int(KVType::F16), kKVBF16 = int(KVType::BF16),
              kKVQ8 = int(KVType::Q8_0);

__device__ __forceinline__ float h2f(uint16_t h) { return __half2float(__ushort_as_half(h)); }
__device__ __forceinline__ float bf2f(uint16_t h) { return __uint_as_float(uint32_t(h) << 16); }
__device__ __forceinline__ uint16_t f2h(float f) { return __half_as_ushort(__float2half_rn(f)); }
// float -> bf16, round to nearest even, NaN stays NaN (exactly the CPU backend's fp32_to_bf16).
__device__ __forceinline__ uint16_t f2bf(float f) {
  uint32_t u = __float_as_uint(f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return uint16_t((u >> 16) | 0x40);
  u += 0x7FFFu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

__device__ __forceinline__ uint16_t ld_u16(const uint8_t* p) { return *reinterpret_cast<const uint16_t*>(p); }

// Page id -> tier (0 device, 1 host) and index within the tier.
__device__ __forceinline__ int kv_tier(const KVDev& kv, int32_t id) { return id >= kv.dev_pages ? 1 : 0; }
__device__ __forceinline__ int64_t kv_local(const KVDev& kv, int32_t id) {
  return id >= kv.dev_pages ? int64_t(id - kv.dev_pages) : int64_t(id);
}
__device__ __forceinline__ uint8_t* kv_krow(const KVDev& kv, int32_t id, int slot) {
  return kv.k[kv_tier(kv, id)] + (kv_local(kv, id) * kv.page_size + slot) * int64_t(kv.rb);
}
__device__ __forceinline__ uint8_t* kv_vrow(const KVDev& kv, int32_t id, int slot) {
  return kv.v[kv_tier(kv, id)] + (kv_local(kv, id) * kv.page_size + slot) * int64_t(kv.rb);
}
__device__ __forceinline__ int32_t* kv_pos(const KVDev& kv, int32_t id) {
  return kv.pos[kv_tier(kv, id)] + kv_local(kv, id) * kv.page_size;
}
__device__ __forceinline__ float* kv_scores(const KVDev& kv, int32_t id) {
  float* s = kv.sc[kv_tier(kv, id)];
  return s ? s + kv_local(kv, id) * kv.page_size : nullptr;
}

// Element d of a stored KV row of type T (exact conversion).
template <int T>
__device__ __forceinline__ float kv_elem(const uint8_t* row, int d) {
  if constexpr (T == kKVF32) {
    return reinterpret_cast<const float*>(row)[d];
  } else if constexpr (T == kKVF16) {
    return h2f(reinterpret_cast<const uint16_t*>(row)[d]);
  } else if constexpr (T == kKVBF16) {
    return bf2f(reinterpret_cast<const uint16_t*>(row)[d]);
  } else {
    const uint8_t* b = row + (d / 32) * 34;
    return h2f(ld_u16(b)) * float(int8_t(b[2 + d % 32]));
  }
}
__device__ __forceinline__ float kv_elem_rt(int t, const uint8_t* row, int d) {
  switch (t) {
    case kKVF32: return kv_elem<kKVF32>(row, d);
    case kKVF16: return kv_elem<kKVF16>(row, d);
    case kKVBF16: return kv_elem<kKVBF16>(row, d);
    default: return kv_elem<kKVQ8>(row, d);
  }
}

// Elements [d, d + 8) of a stored row (d % 8 == 0; F16/BF16 rows 16-byte aligned, F32 32-byte aligned).
template <int T>
__device__ __forceinline__ void kv_load8(const uint8_t* row, int d, float* o) {
  if constexpr (T == kKVF32) {
    const float4 a = *reinterpret_cast<const float4*>(row + 4 * d);
    const float4 b = *reinterpret_cast<const float4*>(row + 4 * d + 16);
    o[0] = a.x, o[1] = a.y, o[2] = a.z, o[3] = a.w, o[4] = b.x, o[5] = b.y, o[6] = b.z, o[7] = b.w;
  } else if constexpr (T == kKVF16 || T == kKVBF16) {
    const uint4 u = *reinterpret_cast<const uint4*>(row + 2 * d);
    const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      if constexpr (T == kKVF16) {
        o[2 * i] = h2f(uint16_t(w[i] & 0xFFFF));
        o[2 * i + 1] = h2f(uint16_t(w[i] >> 16));
      } else {
        o[2 * i] = __uint_as_float(w[i] << 16);
        o[2 * i + 1] = __uint_as_float(w[i] & 0xFFFF0000u);
      }
    }
  } else {  // Q8_0: 2-byte aligned block (fp16 scale, 32 int8)
    const uint8_t* b = row + (d / 32) * 34;
    const float sc = h2f(ld_u16(b));
    const uint16_t* qs = reinterpret_cast<const uint16_t*>(b + 2 + d % 32);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const uint16_t q = qs[i];
      o[2 * i] = sc * float(int8_t(q & 0xFF));
      o[2 * i + 1] = sc * float(int8_t(q >> 8));
    }
  }
}

// Float atomic min/max through the integer orderings (NaN never stored: the caller skips it).
__device__ __forceinline__ void atomic_min_f(float* a, float v) {
  if (v >= 0.0f) atomicMin(reinterpret_cast<int*>(a), __float_as_int(v));
  else atomicMax(reinterpret_cast<unsigned*>(a), __float_as_uint(v));
}
__device__ __forceinline__ void atomic_max_f(float* a, float v) {
  if (v >= 0.0f) atomicMax(reinterpret_cast<int*>(a), __float_as_int(v));
  else atomicMin(reinterpret_cast<unsigned*>(a), __float_as_uint(v));
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xFFFFFFFFu, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xFFFFFFFFu, v, o));
  return v;
}

// SwiGLU's element: silu(g) * u (swiglu and the fused gate/up GEMV).
__device__ __forceinline__ float silu_mul(float g, float u) { return __fmul_rn(__fdiv_rn(g, 1.0f + expf(-g)), u); }

inline unsigned grid1d(int64_t n, int threads) { return unsigned((n + threads - 1) / threads); }

}  // namespace headroom::cuda
