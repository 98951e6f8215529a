// CUDA backend: device helpers shared by the kernel files (conversions, KV row access, reductions).
#pragma once

#include <atomic>
#include <cstdint>

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "backend/cuda/kernels.h"

namespace headroom::cuda {

// Function attributes (dynamic shared memory, carveout) are set per GPU: a call site's flag for each device
// (a tensor-parallel process drives several). Usage:
//   static PerDeviceOnce attr;
//   if (const int dev = current_device(); attr.needed(dev)) { ...cudaFuncSetAttribute...; attr.done(dev); }
inline int current_device() {
  int d = 0;
  cudaGetDevice(&d);
  return d;
}
struct PerDeviceOnce {
  std::atomic<uint64_t> bits{0};
  bool needed(int dev) const { return dev < 0 || dev >= 64 || !(bits.load() & (uint64_t(1) << dev)); }
  void done(int dev) {
    if (dev >= 0 && dev < 64) bits.fetch_or(uint64_t(1) << dev);
  }
};

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

// Raw 8-element chunks of a stored row (kept packed in registers until used): F32 8 words, F16/BF16 4, Q8_0 8
// bytes + scale. Elements [d0, d0 + 8) (d0 % 8 == 0; F16/BF16 rows 16-byte aligned, F32 32-byte aligned, Q8_0
// 2-byte aligned blocks).
template <int T>
struct RawWords {
  static constexpr int N = T == kKVF32 ? 8 : 4;
};
template <int T>
__device__ __forceinline__ void load_raw8(const uint8_t* row, int d0, uint32_t* w) {
  if constexpr (T == kKVF32) {
    const uint4 a = *reinterpret_cast<const uint4*>(row + 4 * d0);
    const uint4 b = *reinterpret_cast<const uint4*>(row + 4 * d0 + 16);
    w[0] = a.x, w[1] = a.y, w[2] = a.z, w[3] = a.w, w[4] = b.x, w[5] = b.y, w[6] = b.z, w[7] = b.w;
  } else if constexpr (T == kKVF16 || T == kKVBF16) {
    const uint4 a = *reinterpret_cast<const uint4*>(row + 2 * d0);
    w[0] = a.x, w[1] = a.y, w[2] = a.z, w[3] = a.w;
  } else {
    const uint8_t* b = row + (d0 / 32) * 34;
    const uint16_t* qs = reinterpret_cast<const uint16_t*>(b + 2 + d0 % 32);
    w[0] = uint32_t(qs[0]) | uint32_t(qs[1]) << 16;
    w[1] = uint32_t(qs[2]) | uint32_t(qs[3]) << 16;
    w[2] = ld_u16(b);
    w[3] = 0;
  }
}
// The chunk's 8 values, converted exactly.
template <int T>
__device__ __forceinline__ void unpack_raw8(const uint32_t* w, float* o) {
  if constexpr (T == kKVF32) {
#pragma unroll
    for (int i = 0; i < 8; ++i) o[i] = __uint_as_float(w[i]);
  } else if constexpr (T == kKVF16) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      o[2 * i] = h2f(uint16_t(w[i] & 0xFFFF));
      o[2 * i + 1] = h2f(uint16_t(w[i] >> 16));
    }
  } else if constexpr (T == kKVBF16) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      o[2 * i] = __uint_as_float(w[i] << 16);
      o[2 * i + 1] = __uint_as_float(w[i] & 0xFFFF0000u);
    }
  } else {
    const float sc = h2f(uint16_t(w[2]));
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int k = 0; k < 4; ++k) o[4 * i + k] = sc * float(int8_t((w[i] >> (8 * k)) & 0xFF));
  }
}
// Elements [d, d + 8) of a stored row, converted exactly.
template <int T>
__device__ __forceinline__ void kv_load8(const uint8_t* row, int d, float* o) {
  uint32_t w[RawWords<T>::N];
  load_raw8<T>(row, d, w);
  unpack_raw8<T>(w, o);
}

__device__ __forceinline__ uint32_t smem_addr(const void* p) { return uint32_t(__cvta_generic_to_shared(p)); }

// d += a * b, mma.sync m16n8k16, F32 accumulate; BF: bf16 operands, else f16.
template <bool BF>
__device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (BF) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
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
