// CPU backend: weight formats (ggml block layouts), scalar conversions and row dequantization.
//
// The block structs mirror ggml's exactly (they are read straight out of mmapped GGUF files):
//   Q8_0: 32 values, fp16 d + 32 int8 q;               value = d * q
//   Q4_0: 32 values, fp16 d + 16 bytes of nibbles;     value = d * (nibble - 8); low nibbles are
//         elements 0..15, high nibbles 16..31
//   Q4_K: 256 values in 8 sub-blocks of 32; fp16 d, dmin; 12 bytes of packed 6-bit scales/mins;
//         value = d * sc[j] * nibble - dmin * m[j]
//   Q6_K: 256 values in 16 sub-blocks of 16; 6-bit quants (4 low bits in ql, 2 high bits in qh);
//         int8 scales; fp16 d; value = d * scale[j] * (q - 32)
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

#include "gguf/gguf.h"

namespace headroom::cpu {

using gguf::DType;

constexpr int kQK8_0 = 32;
constexpr int kQK4_0 = 32;
constexpr int kQK_K = 256;

struct BlockQ8_0 {
  uint16_t d;        // fp16 scale
  int8_t qs[kQK8_0];
};
static_assert(sizeof(BlockQ8_0) == 34);

struct BlockQ4_0 {
  uint16_t d;
  uint8_t qs[kQK4_0 / 2];
};
static_assert(sizeof(BlockQ4_0) == 18);

struct BlockQ4_K {
  uint16_t d;          // super-block scale for the 6-bit scales
  uint16_t dmin;       // super-block scale for the 6-bit mins
  uint8_t scales[12];  // 8 scales + 8 mins, 6 bits each
  uint8_t qs[kQK_K / 2];
};
static_assert(sizeof(BlockQ4_K) == 144);

struct BlockQ6_K {
  uint8_t ql[kQK_K / 2];   // low 4 bits
  uint8_t qh[kQK_K / 4];   // high 2 bits
  int8_t scales[kQK_K / 16];
  uint16_t d;
};
static_assert(sizeof(BlockQ6_K) == 210);

// IEEE half -> float (exact). Uses F16C when available.
float fp16_to_fp32(uint16_t h);
// float -> IEEE half, round to nearest even (used by tests to build weights).
uint16_t fp32_to_fp16(float f);

inline float bf16_to_fp32(uint16_t h) {
  uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
// float -> bf16, round to nearest even (NaN stays NaN).
uint16_t fp32_to_bf16(float f);

// Elements per block and bytes per block of a weight type; false if the CPU backend cannot read it.
bool block_info(DType t, int64_t* elems, int64_t* bytes);

// ggml's 6-bit scale/min unpacking of Q4_K/Q5_K (get_scale_min_k4).
inline void q4k_scale_min(int j, const uint8_t* q, uint8_t* d, uint8_t* m) {
  if (j < 4) {
    *d = q[j] & 63;
    *m = q[j + 4] & 63;
  } else {
    *d = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
    *m = (q[j + 4] >> 4) | ((q[j - 0] >> 6) << 4);
  }
}

}  // namespace headroom::cpu
