// CUDA backend: decode matmul kernels (the GEMV for n = 1 / F32 / odd shapes, the tensor-core skinny GEMM for
// n = 2..32, Q8_0 2..64: see below and CudaBackend::matmul for the routing) and the conversions that feed cuBLAS.
//
// GEMV (batch invariant). A block of 256 threads computes kBR = 4 consecutive weight rows for up to NR = 8
// activation rows. Thread t takes the 16-byte weight units t, t + 256, ... of each row (8 F16/BF16
// values, 4 F32 values, or one whole Q8_0 block of 32 int8 values) and keeps one float partial per (weight row,
// activation row), summed sequentially over its units; the 256 partials are then reduced by a warp
// butterfly and the 8 warp sums added in warp order. The unit -> thread assignment and every reduction
// order depend only on the weight shape, so an output element has the same bits whatever n (and NR) is:
// a row of a batch equals the same row computed alone. n > 8 runs passes of 8 activation rows.
//
// Q8_0: the activation rows are first quantized to Q8_0 blocks exactly as the CPU backend does (d = amax/127,
// q = round-to-nearest-even(x / d)); each block's dot product is exact in int32 (dp4a) and scaled by
// d_w * d_x in float, as on the CPU (the float sums run in another order: results differ by rounding). F32/F16/BF16 multiply float activations in float (FMA).
// Shapes the vector kernel cannot take (cols not a multiple of the unit, x not 16-byte aligned) run a simple
// warp-per-output kernel (also batch invariant).
#include <atomic>
#include <cstdlib>

#include <cooperative_groups.h>

#include "backend/cuda/common.cuh"

namespace cg = cooperative_groups;

namespace headroom::cuda {

namespace {

constexpr int kBR = 4;
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

__device__ __forceinline__ void unpack8(uint4 u, bool bf, float* o) {
  const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    if (bf) {
      o[2 * i] = __uint_as_float(w[i] << 16);
      o[2 * i + 1] = __uint_as_float(w[i] & 0xFFFF0000u);
    } else {
      o[2 * i] = h2f(uint16_t(w[i] & 0xFFFF));
      o[2 * i + 1] = h2f(uint16_t(w[i] >> 16));
    }
  }
}

// The block's sums for weight rows [row0, row0 + kBR) of M matrices of one shape (w0; M = 2: and w1) and NR
// activation rows: thread t < M * kBR * NR returns the sum of row i = t / NR (matrix i / kBR, its weight row
// row0 + i % kBR; rows past the end repeat the last) with activation row t % NR; the others return 0. Each
// row's sum runs in the same order whatever M is, so the GEMV kernels below (this and a store) and the fused
// gate/up one give an output the same bits.
template <int T, int NR, int M = 1>
__device__ __forceinline__ float gemv_rows(const uint8_t* __restrict__ w0, const uint8_t* __restrict__ w1, int64_t rows,
                                           int64_t cols, const float* __restrict__ x, int n,
                                           const int8_t* __restrict__ xq, const float* __restrict__ xd, int64_t row0) {
  constexpr int R = M * kBR;
  const uint8_t* const wm[2] = {w0, w1};
  int64_t wr[R];
#pragma unroll
  for (int i = 0; i < R; ++i) wr[i] = min(row0 + i % kBR, rows - 1);
  int64_t xr[NR];
#pragma unroll
  for (int j = 0; j < NR; ++j) xr[j] = min(j, n - 1);
  float acc[R][NR];
#pragma unroll
  for (int i = 0; i < R; ++i)
#pragma unroll
    for (int j = 0; j < NR; ++j) acc[i][j] = 0.0f;

  if constexpr (T == int(WT::F16) || T == int(WT::BF16)) {
    const int64_t U = cols / 8;
#pragma unroll(NR <= 2 ? 2 : 1)
    for (int64_t u = threadIdx.x; u < U; u += kThreads) {
      uint4 wv[R];
#pragma unroll
      for (int i = 0; i < R; ++i) wv[i] = __ldg(reinterpret_cast<const uint4*>(wm[i / kBR] + (wr[i] * cols + u * 8) * 2));
      float wf[R][8];
#pragma unroll
      for (int i = 0; i < R; ++i) unpack8(wv[i], T == int(WT::BF16), wf[i]);
#pragma unroll
      for (int j = 0; j < NR; ++j) {
        const float4 a = __ldg(reinterpret_cast<const float4*>(x + xr[j] * cols + u * 8));
        const float4 b = __ldg(reinterpret_cast<const float4*>(x + xr[j] * cols + u * 8 + 4));
        const float xv[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
#pragma unroll
        for (int i = 0; i < R; ++i)
#pragma unroll
          for (int e = 0; e < 8; ++e) acc[i][j] = fmaf(wf[i][e], xv[e], acc[i][j]);
      }
    }
  } else if constexpr (T == int(WT::F32)) {
    const int64_t U = cols / 4;
#pragma unroll(NR <= 2 ? 2 : 1)
    for (int64_t u = threadIdx.x; u < U; u += kThreads) {
      float4 wv[R];
#pragma unroll
      for (int i = 0; i < R; ++i) wv[i] = __ldg(reinterpret_cast<const float4*>(wm[i / kBR] + (wr[i] * cols + u * 4) * 4));
#pragma unroll
      for (int j = 0; j < NR; ++j) {
        const float4 xv = __ldg(reinterpret_cast<const float4*>(x + xr[j] * cols + u * 4));
#pragma unroll
        for (int i = 0; i < R; ++i) {
          float a = acc[i][j];
          a = fmaf(wv[i].x, xv.x, a);
          a = fmaf(wv[i].y, xv.y, a);
          a = fmaf(wv[i].z, xv.z, a);
          a = fmaf(wv[i].w, xv.w, a);
          acc[i][j] = a;
        }
      }
    }
  } else {  // Q8_0, repacked: int8 [rows][cols], fp16 scales [rows][cols/32]; units of one block
    const int64_t U = cols / 32;
#pragma unroll 1
    for (int64_t u = threadIdx.x; u < U; u += kThreads) {
      int4 wv[R][2];
      float wd[R];
#pragma unroll
      for (int i = 0; i < R; ++i) {
        const int4* p = reinterpret_cast<const int4*>(wm[i / kBR] + wr[i] * cols + u * 32);
        const uint16_t* wsc = reinterpret_cast<const uint16_t*>(wm[i / kBR] + q8_scales_offset(rows, cols));
        wv[i][0] = __ldg(p);
        wv[i][1] = __ldg(p + 1);
        wd[i] = h2f(__ldg(wsc + wr[i] * U + u));
      }
#pragma unroll
      for (int j = 0; j < NR; ++j) {
        const int4* p = reinterpret_cast<const int4*>(xq + xr[j] * cols + u * 32);
        const int4 x0 = __ldg(p), x1 = __ldg(p + 1);
        const float dx = __ldg(xd + xr[j] * U + u);
#pragma unroll
        for (int i = 0; i < R; ++i) {
          int s = 0;
          s = __dp4a(wv[i][0].x, x0.x, s);
          s = __dp4a(wv[i][0].y, x0.y, s);
          s = __dp4a(wv[i][0].z, x0.z, s);
          s = __dp4a(wv[i][0].w, x0.w, s);
          s = __dp4a(wv[i][1].x, x1.x, s);
          s = __dp4a(wv[i][1].y, x1.y, s);
          s = __dp4a(wv[i][1].z, x1.z, s);
          s = __dp4a(wv[i][1].w, x1.w, s);
          acc[i][j] = fmaf(__fmul_rn(wd[i], dx), float(s), acc[i][j]);
        }
      }
    }
  }

  __shared__ float red[kWarps][R * NR];
  const int lane = threadIdx.x & 31, warp = threadIdx.x / 32;
#pragma unroll
  for (int i = 0; i < R; ++i)
#pragma unroll
    for (int j = 0; j < NR; ++j) {
      const float v = warp_sum(acc[i][j]);
      if (lane == 0) red[warp][i * NR + j] = v;
    }
  __syncthreads();
  float s = 0.0f;
  if (threadIdx.x < R * NR) {
#pragma unroll
    for (int k = 0; k < kWarps; ++k) s += red[k][threadIdx.x];
  }
  return s;
}

template <int T, int NR>
__global__ void __launch_bounds__(kThreads, 2) gemv_kernel(const uint8_t* __restrict__ w, int64_t rows, int64_t cols,
                                                        const float* __restrict__ x, int n, float* __restrict__ y,
                                                        const int8_t* __restrict__ xq, const float* __restrict__ xd) {
  const int64_t row0 = int64_t(blockIdx.x) * kBR;
  const float s = gemv_rows<T, NR>(w, nullptr, rows, cols, x, n, xq, xd, row0);
  const int i = threadIdx.x / NR, j = threadIdx.x % NR;
  if (threadIdx.x < kBR * NR && j < n && row0 + i < rows) y[int64_t(j) * rows + row0 + i] = s;
}

// Fused GEMVs (one activation row). A grouped launch: block b belongs to the part p with block0[p] <= b.
struct GemvGroup {
  GemvPart part[kGemvGroupMax];
  unsigned block0[kGemvGroupMax + 1] = {};
  int n_parts = 0;
};

template <int T>
__global__ void __launch_bounds__(kThreads, 2) gemv_group_kernel(GemvGroup g, int64_t cols, const float* __restrict__ x,
                                                              const int8_t* __restrict__ xq, const float* __restrict__ xd) {
  GemvPart part = g.part[0];
  unsigned b0 = 0;
#pragma unroll
  for (int p = 1; p < kGemvGroupMax; ++p)  // constant indices: the parts stay in parameter memory
    if (p < g.n_parts && blockIdx.x >= g.block0[p]) part = g.part[p], b0 = g.block0[p];
  const int64_t row0 = int64_t(blockIdx.x - b0) * kBR;
  const float s = gemv_rows<T, 1>(static_cast<const uint8_t*>(part.w), nullptr, part.rows, cols, x, 1, xq, xd, row0);
  if (threadIdx.x < kBR && row0 + threadIdx.x < part.rows) part.y[row0 + threadIdx.x] = s;
}

// Gate and up rows [row0, row0 + kBR) in one block (as two matrices of one gemv_rows: their loads in flight
// together), then silu(gate) * up: thread t < kBR holds gate row t's sum, thread kBR + t up's.
template <int T>
__global__ void __launch_bounds__(kThreads, 2) gemv_swiglu_kernel(const uint8_t* __restrict__ gw,
                                                               const uint8_t* __restrict__ uw, int64_t rows, int64_t cols,
                                                               const float* __restrict__ x, float* __restrict__ out,
                                                               const int8_t* __restrict__ xq, const float* __restrict__ xd) {
  const int64_t row0 = int64_t(blockIdx.x) * kBR;
  const float g = gemv_rows<T, 1, 2>(gw, uw, rows, cols, x, 1, xq, xd, row0);
  const float u = __shfl_down_sync(0xFFFFFFFFu, g, kBR);
  if (threadIdx.x < kBR && row0 + threadIdx.x < rows) out[row0 + threadIdx.x] = silu_mul(g, u);
}

// Any shape, float weight types: one warp per output element.
template <int T>
__global__ void gemv_generic_kernel(const uint8_t* w, int64_t rows, int64_t cols, const float* x, float* y) {
  const int64_t r = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int64_t j = blockIdx.y;
  if (r >= rows) return;
  const int lane = threadIdx.x & 31;
  float acc = 0.0f;
  for (int64_t c = lane; c < cols; c += 32) {
    float wv;
    if constexpr (T == int(WT::F32)) wv = reinterpret_cast<const float*>(w)[r * cols + c];
    else if constexpr (T == int(WT::F16)) wv = h2f(reinterpret_cast<const uint16_t*>(w)[r * cols + c]);
    else wv = bf2f(reinterpret_cast<const uint16_t*>(w)[r * cols + c]);
    acc = fmaf(wv, x[j * cols + c], acc);
  }
  acc = warp_sum(acc);
  if (lane == 0) y[j * rows + r] = acc;
}

// Activations -> Q8_0 (as the CPU backend's quantize_row_q8): one thread per block of 32.
__global__ void quantize_q8_kernel(const float* x, int64_t n_blocks, int8_t* xq, float* xd) {
  const int64_t b = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= n_blocks) return;
  const float* xb = x + b * 32;
  float v[32];
  float amax = 0.0f;
#pragma unroll
  for (int k = 0; k < 32; ++k) {
    v[k] = xb[k];
    amax = fmaxf(amax, fabsf(v[k]));
  }
  const float d = __fdiv_rn(amax, 127.0f);
  const float id = d != 0.0f ? __fdiv_rn(1.0f, d) : 0.0f;
  int32_t packed[8];
#pragma unroll
  for (int k = 0; k < 8; ++k) {
    uint32_t p = 0;
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int q = max(-127, min(127, __float2int_rn(__fmul_rn(v[4 * k + e], id))));
      p |= uint32_t(uint8_t(int8_t(q))) << (8 * e);
    }
    packed[k] = int32_t(p);
  }
  int4* o = reinterpret_cast<int4*>(xq + b * 32);
  o[0] = make_int4(packed[0], packed[1], packed[2], packed[3]);
  o[1] = make_int4(packed[4], packed[5], packed[6], packed[7]);
  xd[b] = d;
}

__global__ void f32_to_f16_kernel(const float* x, uint16_t* o, int64_t count) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < count; i += int64_t(gridDim.x) * blockDim.x)
    o[i] = f2h(x[i]);
}
__global__ void f32_to_bf16_kernel(const float* x, uint16_t* o, int64_t count) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < count; i += int64_t(gridDim.x) * blockDim.x)
    o[i] = f2bf(x[i]);
}
__global__ void q8_to_f16_kernel(const uint8_t* w, int64_t rows, int64_t cols, int64_t r0, int64_t count, uint16_t* o) {
  const uint16_t* sc = reinterpret_cast<const uint16_t*>(w + q8_scales_offset(rows, cols));
  const int8_t* q = reinterpret_cast<const int8_t*>(w) + r0 * cols;
  const uint16_t* s = sc + r0 * (cols / 32);
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < count; i += int64_t(gridDim.x) * blockDim.x)
    o[i] = f2h(float(q[i]) * h2f(s[i / 32]));
}

unsigned elem_grid(int64_t count) { return unsigned(std::min<int64_t>(65535, (count + 255) / 256)); }

template <int T>
cudaError_t gemv_pass(const void* w, int64_t rows, int64_t cols, const float* x, int nr, float* y, const int8_t* xq,
                      const float* xd, cudaStream_t s) {
  const unsigned grid = unsigned((rows + kBR - 1) / kBR);
  const auto* wb = static_cast<const uint8_t*>(w);
  if (nr == 1) gemv_kernel<T, 1><<<grid, kThreads, 0, s>>>(wb, rows, cols, x, nr, y, xq, xd);
  else if (nr == 2) gemv_kernel<T, 2><<<grid, kThreads, 0, s>>>(wb, rows, cols, x, nr, y, xq, xd);
  else if (nr <= 4) gemv_kernel<T, 4><<<grid, kThreads, 0, s>>>(wb, rows, cols, x, nr, y, xq, xd);
  else gemv_kernel<T, 8><<<grid, kThreads, 0, s>>>(wb, rows, cols, x, nr, y, xq, xd);
  return cudaGetLastError();
}

// ---- tensor-core skinny GEMM (1..kSkinnyMaxRows activation rows) ------------------------------------
//
// mma.sync with the weights as the A operand (16 weight rows x k16 / k32) and the activation rows as the
// N = 8 operand (padded by repeating the last row; padded columns are never stored). K is cut into chunks of
// 32 columns; thread (g = lane / 4, t = lane % 4) loads weight rows g and g + 8 at columns 8t .. 8t + 7 of a
// chunk (one 16-byte load each for F16/BF16, 8 bytes for Q8_0) and the activation row g at the same
// columns, and the k index inside the mma is a fixed permutation of those columns (the same for A and B), so
// no shuffles or shared memory are needed to build the fragments.
//
// Activations: F16 weights multiply x split into two F16 terms, x * 2^s = hi + lo (s per activation row, a
// power of two that puts the row's amax in [2^14, 2^15): no overflow, ~22 bits of x kept), two mma per tile,
// the result scaled back by 2^-s (exact). BF16 weights multiply three BF16 terms hi + mid + lo (~24 bits; BF16
// has float's range, no scale). Q8_0: x quantized to Q8_0 as on the CPU, int8 mma (m16n8k32 s8) gives each
// 32-block's exact integer dot, scaled by d_w * d_x in float. A pre-pass writes the split / quantized
// activations to scratch once per call.
//
// Batch invariance. A block is 8 warps: 2 along M (each MT x 16 weight rows) x 4 along K (warp wk takes
// chunks wk, wk + 4, ... of the block's K range); the K range of the whole matrix is cut into kb ranges
// (skinny_splits: a function of the weight shape only, kb <= 8). Per output: an mma chain over the warp's
// chunks in order, the 4 warp partials summed in warp order, then (kb > 1) the kb partials summed in order by a
// second kernel. None of this depends on n, on the N tiling or on MT, so a row's result has the same bits
// whatever the batch is (tested). The pipelined variant further down (skinny2_kernel) computes the same sums in
// the same order, so the two may be chosen per call (skinny_v2_stages).
constexpr int kSkWK = 4, kSkWM = 2, kSkThreads = 32 * kSkWK * kSkWM;
constexpr int kSkModelSMs = 132;  // the split model's SM count (fixed, so results depend on the shape only)

__device__ __forceinline__ void mma_f16(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                        uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
__device__ __forceinline__ void mma_bf16(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                         uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
__device__ __forceinline__ void mma_s8(int (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0,
                                       uint32_t b1) {
  asm("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
      : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
// Streamed weights: read once, keep them out of L1 (the activations live there).
__device__ __forceinline__ uint4 ld_stream16(const void* p) {
  uint4 r;
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p));
  return r;
}
__device__ __forceinline__ uint2 ld_stream8(const void* p) {
  uint2 r;
  asm("ld.global.nc.L1::no_allocate.v2.u32 {%0,%1}, [%2];" : "=r"(r.x), "=r"(r.y) : "l"(p));
  return r;
}
__device__ __forceinline__ uint32_t u4get(const uint4& u, int i) { return i == 0 ? u.x : i == 1 ? u.y : i == 2 ? u.z : u.w; }

// Pre-pass: one block per activation row. F16: xs = [hi plane][lo plane] of n x cols halves of x * 2^s, and
// xscale[j] = 2^-s; BF16: [hi][mid][lo] planes. cols % 4 == 0, x 16-byte aligned.
template <bool BF>
__global__ void __launch_bounds__(1024) skinny_split_kernel(const float* __restrict__ x, int64_t cols, int64_t n,
                                                            uint16_t* __restrict__ xs, float* __restrict__ xscale) {
  const int64_t j = blockIdx.x;
  const float4* xr = reinterpret_cast<const float4*>(x + j * cols);
  const int64_t U = cols / 4, plane = n * cols;
  int sh = 0;
  if constexpr (!BF) {
    float m = 0.0f;
#pragma unroll 4
    for (int64_t u = threadIdx.x; u < U; u += blockDim.x) {
      const float4 v = __ldg(xr + u);
      m = fmaxf(m, fmaxf(fmaxf(fabsf(v.x), fabsf(v.y)), fmaxf(fabsf(v.z), fabsf(v.w))));
    }
    m = warp_max(m);
    __shared__ float wm[32];
    if ((threadIdx.x & 31) == 0) wm[threadIdx.x / 32] = m;
    __syncthreads();
    m = 0.0f;
    for (int k = 0; k < int(blockDim.x / 32); ++k) m = fmaxf(m, wm[k]);
    int e = 0;
    if (m > 0.0f && m <= 3.4e38f) {
      frexpf(m, &e);  // m < 2^e
      sh = min(126, 15 - e);
    }
    if (threadIdx.x == 0) xscale[j] = ldexpf(1.0f, -sh);
  }
  for (int64_t u = threadIdx.x; u < U; u += blockDim.x) {
    const float4 v4 = __ldg(xr + u);
    const float v[4] = {v4.x, v4.y, v4.z, v4.w};
    uint16_t h[3][4];
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      if constexpr (BF) {
        const float a = v[e];
        h[0][e] = f2bf(a);
        const float r1 = a - bf2f(h[0][e]);
        h[1][e] = f2bf(r1);
        h[2][e] = f2bf(r1 - bf2f(h[1][e]));
      } else {
        const float a = ldexpf(v[e], sh);
        h[0][e] = f2h(a);
        h[1][e] = f2h(a - h2f(h[0][e]));
      }
    }
#pragma unroll
    for (int q = 0; q < (BF ? 3 : 2); ++q)
      *reinterpret_cast<uint2*>(xs + q * plane + j * cols + u * 4) =
          make_uint2(uint32_t(h[q][0]) | uint32_t(h[q][1]) << 16, uint32_t(h[q][2]) | uint32_t(h[q][3]) << 16);
  }
}

template <int T, int MT, int NT>
__global__ void __launch_bounds__(kSkThreads, 1)
    skinny_kernel(const uint8_t* __restrict__ w, int64_t rows, int64_t cols, const uint16_t* __restrict__ xs,
                  const float* __restrict__ xscale, const int8_t* __restrict__ xq, const float* __restrict__ xd, int n,
                  float* __restrict__ out, int kb_count) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const int wk = warp % kSkWK, wm = warp / kSkWK;
  const int64_t r0 = int64_t(blockIdx.x) * (kSkWM * MT * 16) + wm * (MT * 16);
  const int64_t C = cols / 32;
  const int64_t cb = C * blockIdx.y / kb_count, ce = C * (blockIdx.y + 1) / kb_count;
  int64_t wrow[MT][2];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int h = 0; h < 2; ++h) wrow[mt][h] = min(r0 + mt * 16 + h * 8 + g, rows - 1);
  int64_t xrow[NT];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) xrow[nt] = min(nt * 8 + g, n - 1);
  float acc[MT][NT][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[mt][nt][i] = 0.0f;

  if constexpr (T == int(WT::F16) || T == int(WT::BF16)) {
    constexpr int TERMS = T == int(WT::BF16) ? 3 : 2;
    const uint16_t* W = reinterpret_cast<const uint16_t*>(w);
    const int64_t plane = int64_t(n) * cols;
#pragma unroll(NT <= 2 ? 2 : 1)
    for (int64_t c = cb + wk; c < ce; c += kSkWK) {
      const int64_t k0 = c * 32 + 8 * t;
      uint4 wv[MT][2];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int h = 0; h < 2; ++h) wv[mt][h] = ld_stream16(W + wrow[mt][h] * cols + k0);
      uint4 xv[NT][TERMS];
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int q = 0; q < TERMS; ++q) xv[nt][q] = __ldg(reinterpret_cast<const uint4*>(xs + q * plane + xrow[nt] * cols + k0));
#pragma unroll
      for (int s = 0; s < 2; ++s)
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          const uint32_t a0 = u4get(wv[mt][0], 2 * s), a1 = u4get(wv[mt][1], 2 * s), a2 = u4get(wv[mt][0], 2 * s + 1),
                         a3 = u4get(wv[mt][1], 2 * s + 1);
#pragma unroll
          for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int q = 0; q < TERMS; ++q) {
              if constexpr (T == int(WT::BF16))
                mma_bf16(acc[mt][nt], a0, a1, a2, a3, u4get(xv[nt][q], 2 * s), u4get(xv[nt][q], 2 * s + 1));
              else
                mma_f16(acc[mt][nt], a0, a1, a2, a3, u4get(xv[nt][q], 2 * s), u4get(xv[nt][q], 2 * s + 1));
            }
        }
    }
  } else {  // Q8_0, repacked: int8 [rows][cols], fp16 scales [rows][cols / 32]
    const int8_t* W = reinterpret_cast<const int8_t*>(w);
    const uint16_t* wsc = reinterpret_cast<const uint16_t*>(w + q8_scales_offset(rows, cols));
    int64_t drow[NT][2];  // the activation rows of this thread's accumulator columns (2t, 2t + 1)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int e = 0; e < 2; ++e) drow[nt][e] = min(nt * 8 + 2 * t + e, n - 1);
#pragma unroll(NT <= 2 ? 2 : 1)
    for (int64_t c = cb + wk; c < ce; c += kSkWK) {
      const int64_t k0 = c * 32 + 8 * t;
      uint2 wv[MT][2];
      float wd[MT][2];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          wv[mt][h] = ld_stream8(W + wrow[mt][h] * cols + k0);
          wd[mt][h] = h2f(__ldg(wsc + wrow[mt][h] * C + c));
        }
      uint2 xv[NT];
      float dx[NT][2];
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        xv[nt] = __ldg(reinterpret_cast<const uint2*>(xq + xrow[nt] * cols + k0));
#pragma unroll
        for (int e = 0; e < 2; ++e) dx[nt][e] = __ldg(xd + drow[nt][e] * C + c);
      }
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          int ci[4] = {0, 0, 0, 0};
          mma_s8(ci, wv[mt][0].x, wv[mt][1].x, wv[mt][0].y, wv[mt][1].y, xv[nt].x, xv[nt].y);
#pragma unroll
          for (int i = 0; i < 4; ++i)
            acc[mt][nt][i] = fmaf(__fmul_rn(wd[mt][i >> 1], dx[nt][i & 1]), float(ci[i]), acc[mt][nt][i]);
        }
    }
  }

  // The 4 K-warps' partials, summed in warp order by warp wk = 0.
  __shared__ float red[kSkWK - 1][kSkWM][MT * 16][NT * 8];
  if (wk > 0)
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int i = 0; i < 4; ++i) red[wk - 1][wm][mt * 16 + g + (i >> 1) * 8][nt * 8 + 2 * t + (i & 1)] = acc[mt][nt][i];
  __syncthreads();
  if (wk == 0)
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int rl = mt * 16 + g + (i >> 1) * 8, cl = nt * 8 + 2 * t + (i & 1);
          float v = acc[mt][nt][i];
#pragma unroll
          for (int k = 0; k < kSkWK - 1; ++k) v += red[k][wm][rl][cl];
          const int64_t row = r0 + rl;
          if (row < rows && cl < n) {
            if constexpr (T == int(WT::F16)) v *= xscale[cl];
            out[(int64_t(blockIdx.y) * n + cl) * rows + row] = v;
          }
        }
}

// y[i] = sum over k in order of part[k][i].
__global__ void skinny_sum_kernel(const float* __restrict__ part, int kb, int64_t count, float* __restrict__ y) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < count; i += int64_t(gridDim.x) * blockDim.x) {
    float s = part[i];
    for (int k = 1; k < kb; ++k) s += part[int64_t(k) * count + i];
    y[i] = s;
  }
}

size_t align256(size_t b) { return (b + 255) & ~size_t(255); }

struct SkinnyLayout {
  size_t xs = 0, xscale = 0, part = 0, total = 0;  // byte offsets into the scratch
};
SkinnyLayout skinny_layout(WT t, int64_t rows, int64_t cols, int64_t n) {
  SkinnyLayout l;
  const size_t nc = size_t(n) * size_t(cols);
  size_t xbytes = t == WT::F16 ? 4 * nc : t == WT::BF16 ? 6 * nc : nc;
  l.xscale = align256(xbytes);
  const size_t sbytes = t == WT::F16 ? size_t(n) * 4 : t == WT::Q8_0 ? nc / 32 * 4 : 0;
  l.part = l.xscale + align256(sbytes);
  const int kb = skinny_splits(rows, cols);
  l.total = l.part + (kb > 1 ? align256(size_t(kb) * size_t(n) * size_t(rows) * 4) : 0) + 256;
  return l;
}

template <int T, int NT>
cudaError_t skinny_main(const void* w, int64_t rows, int64_t cols, const uint16_t* xs, const float* xscale,
                        const int8_t* xq, const float* xd, int n, float* out, int kb, cudaStream_t s) {
  constexpr int MT = NT >= 8 ? 2 : 4;
  const dim3 grid(unsigned((rows + kSkWM * MT * 16 - 1) / (kSkWM * MT * 16)), unsigned(kb));
  skinny_kernel<T, MT, NT><<<grid, kSkThreads, 0, s>>>(static_cast<const uint8_t*>(w), rows, cols, xs, xscale, xq, xd,
                                                       n, out, kb);
  return cudaGetLastError();
}

template <int T>
cudaError_t skinny_dispatch(const void* w, int64_t rows, int64_t cols, const uint16_t* xs, const float* xscale,
                            const int8_t* xq, const float* xd, int n, float* out, int kb, cudaStream_t s) {
  if (n <= 8) return skinny_main<T, 1>(w, rows, cols, xs, xscale, xq, xd, n, out, kb, s);
  if (n <= 16) return skinny_main<T, 2>(w, rows, cols, xs, xscale, xq, xd, n, out, kb, s);
  if (n <= 32) return skinny_main<T, 4>(w, rows, cols, xs, xscale, xq, xd, n, out, kb, s);
  return skinny_main<T, 8>(w, rows, cols, xs, xscale, xq, xd, n, out, kb, s);
}


// ---- skinny GEMM, pipelined variant (F16/BF16; chosen per shape and n by skinny_v2_stages) -------------------
//
// The same mma layout, warp grid (2 along M x 4 along K, warp wk takes chunks wk, wk + 4, ... of its K piece),
// operands and per-output summation order as skinny_kernel, so both kernels give the same bits and may be mixed
// across n without breaking batch invariance (the tests compare n-row calls on this kernel with 2-row calls on
// skinny_kernel bitwise). What differs:
// * The operands come through a per-warp ring of S shared-memory stages filled by cp.async, S - 1 chunks ahead:
//   weights (cp.async.cg, L2 only), activations (cp.async.ca, through L1: the two M warps read the same ones).
//   A lane copies its own 16-byte weight units; an activation unit is copied once per warp (by the lane whose
//   row it is; padded rows read row n - 1's slot), so a __syncwarp after the wait orders the ring.
// * BF16 needs no pre-pass: the float activations are split into hi + mid + lo in registers (round to nearest
//   even, as the pre-pass). F16 reads the pre-pass planes (per-row power-of-two scale), as skinny_kernel.
// * Split-K (kb > 1) is summed inside the launch: the kb blocks of a row block form a thread-block cluster,
//   each leaves its (scaled) block sum in shared memory, and after a cluster barrier block r adds the kb sums
//   in piece order 0, 1, ..., kb - 1 (as skinny_sum_kernel) for its 1/kb of the outputs through DSMEM.
__device__ __forceinline__ void cp_async16(uint32_t s, const void* g) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(s), "l"(g) : "memory");
}
__device__ __forceinline__ void cp_async16_ca(uint32_t s, const void* g) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 16;" ::"r"(s), "l"(g) : "memory");
}
__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_wait() {
  asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}
__device__ __forceinline__ uint32_t b2bits(__nv_bfloat162 h) { return *reinterpret_cast<uint32_t*>(&h); }

constexpr int kSk2Ring = 200 * 1024;  // shared-memory bound of the stage rings (one block per SM)

template <int MT, int NT>
struct Sk2 {
  static constexpr int W = MT * 2 * 16, X = NT * 32;  // bytes per lane and stage: weight units, activations
  static constexpr int STAGE = 32 * (W + X);          // one warp's stage
  static constexpr int S0 = kSk2Ring / (kSkThreads / 32 * STAGE);
  static constexpr int S = S0 < 2 ? 2 : S0 > 8 ? 8 : S0;  // the most stages that fit
  static constexpr int BR = kSkWM * MT * 16;               // weight rows per block
  static constexpr int RED = (kSkWK - 1) * kSkWM * MT * 16 * NT * 8 * 4;
  static constexpr int TILE = NT * 8 * BR * 4;
};

template <int T, int MT, int NT>
__global__ void __launch_bounds__(kSkThreads, 1)
    skinny2_kernel(const uint8_t* __restrict__ w, int64_t rows, int64_t cols, const float* __restrict__ x,
                   const uint16_t* __restrict__ xs, const float* __restrict__ xscale, int n, float* __restrict__ y,
                   int kb, int S) {
  using P = Sk2<MT, NT>;  // S: the ring's stages, 2..P::S
  constexpr bool BF = T == int(WT::BF16);
  constexpr int TERMS = BF ? 3 : 2;
  extern __shared__ __align__(16) uint8_t sk2_smem[];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const int wk = warp % kSkWK, wm = warp / kSkWK;
  const int64_t r0 = int64_t(blockIdx.x) * P::BR + wm * (MT * 16);
  const int64_t C = cols / 32;
  const int64_t cb = C * blockIdx.y / kb, ce = C * (blockIdx.y + 1) / kb;
  const uint16_t* W = reinterpret_cast<const uint16_t*>(w);
  int64_t wrow[MT][2];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int h = 0; h < 2; ++h) wrow[mt][h] = min(r0 + mt * 16 + h * 8 + g, rows - 1);
  int64_t xrow[NT];
  bool xown[NT];  // this lane copies row nt * 8 + g (it exists)
  int xslot[NT];  // where this lane reads its activation row: tile * 64 + lane of row min(nt * 8 + g, n - 1)
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    xrow[nt] = min(nt * 8 + g, n - 1);
    xown[nt] = nt * 8 + g < n;
    const int r = int(xrow[nt]);
    xslot[nt] = (r >> 3) * 64 + (r & 7) * 4 + t;
  }
  float acc[MT][NT][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[mt][nt][i] = 0.0f;

  // A stage: [MT * 2 weight slots][NT * 2 activation slots], each slot 32 lanes x 16 bytes.
  uint8_t* ring = sk2_smem + warp * (S * P::STAGE);
  const uint32_t sring = uint32_t(__cvta_generic_to_shared(ring));
  constexpr int oX = 32 * P::W;
  const int64_t plane = int64_t(n) * cols;
  auto issue = [&](int64_t c, int st) {
    const uint32_t sb = sring + st * P::STAGE;
    const int64_t k0 = c * 32 + 8 * t;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int h = 0; h < 2; ++h) cp_async16(sb + ((mt * 2 + h) * 32 + lane) * 16, W + wrow[mt][h] * cols + k0);
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
      if (xown[nt])
#pragma unroll
        for (int p = 0; p < 2; ++p) {
          const void* src;
          if constexpr (BF) src = x + xrow[nt] * cols + k0 + 4 * p;  // 8 floats
          else src = xs + p * plane + xrow[nt] * cols + k0;          // F16 hi, lo planes: 8 halves each
          cp_async16_ca(sb + oX + ((nt * 2 + p) * 32 + lane) * 16, src);
        }
  };

  const int64_t c0 = cb + wk;
  const int nc = c0 < ce ? int((ce - c0 + kSkWK - 1) / kSkWK) : 0;
#pragma unroll 1
  for (int s = 0; s < S - 1; ++s) {
    if (s < nc) issue(c0 + int64_t(s) * kSkWK, s);
    cp_commit();
  }
  int st = 0, st_next = S - 1;
#pragma unroll 1
  for (int i = 0; i < nc; ++i) {
    switch (S) {  // chunk i has landed (this thread's copies) ...
      case 2: cp_wait<0>(); break;
      case 3: cp_wait<1>(); break;
      case 4: cp_wait<2>(); break;
      case 5: cp_wait<3>(); break;
      case 6: cp_wait<4>(); break;
      case 7: cp_wait<5>(); break;
      default: cp_wait<6>(); break;
    }
    __syncwarp();  // ... and the other lanes' (shared activations); the stage refilled below was read by all
    if (i + S - 1 < nc) issue(c0 + int64_t(i + S - 1) * kSkWK, st_next);
    cp_commit();
    st_next = st_next + 1 == S ? 0 : st_next + 1;
    const uint8_t* sb = ring + st * P::STAGE;
    st = st + 1 == S ? 0 : st + 1;
    uint4 wv[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int h = 0; h < 2; ++h) wv[mt][h] = *reinterpret_cast<const uint4*>(sb + ((mt * 2 + h) * 32 + lane) * 16);
    uint32_t xv[NT][TERMS][4];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      const uint8_t* xp = sb + oX + xslot[nt] * 16;  // slot (tile * 2 + p, lane) = tile * 1024 + p * 512 + lane * 16
      const uint4 u0 = *reinterpret_cast<const uint4*>(xp), u1 = *reinterpret_cast<const uint4*>(xp + 512);
      if constexpr (!BF) {
        xv[nt][0][0] = u0.x, xv[nt][0][1] = u0.y, xv[nt][0][2] = u0.z, xv[nt][0][3] = u0.w;
        xv[nt][1][0] = u1.x, xv[nt][1][1] = u1.y, xv[nt][1][2] = u1.z, xv[nt][1][3] = u1.w;
      } else {
        const float xf[8] = {__uint_as_float(u0.x), __uint_as_float(u0.y), __uint_as_float(u0.z), __uint_as_float(u0.w),
                             __uint_as_float(u1.x), __uint_as_float(u1.y), __uint_as_float(u1.z), __uint_as_float(u1.w)};
#pragma unroll
        for (int e = 0; e < 4; ++e) {  // hi + mid + lo, each rounded to nearest even (skinny_split_kernel<true>)
          const float a0 = xf[2 * e], a1 = xf[2 * e + 1];
          const __nv_bfloat162 hi = __floats2bfloat162_rn(a0, a1);
          const float2 hf = __bfloat1622float2(hi);
          const float m0 = a0 - hf.x, m1 = a1 - hf.y;
          const __nv_bfloat162 mid = __floats2bfloat162_rn(m0, m1);
          const float2 mf = __bfloat1622float2(mid);
          xv[nt][0][e] = b2bits(hi);
          xv[nt][1][e] = b2bits(mid);
          xv[nt][2][e] = b2bits(__floats2bfloat162_rn(m0 - mf.x, m1 - mf.y));
        }
      }
    }
    // Per accumulator: k16 step s = 0, 1, terms in order (as skinny_kernel).
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      uint32_t a[2][4];
#pragma unroll
      for (int s = 0; s < 2; ++s) {
        a[s][0] = u4get(wv[mt][0], 2 * s), a[s][1] = u4get(wv[mt][1], 2 * s);
        a[s][2] = u4get(wv[mt][0], 2 * s + 1), a[s][3] = u4get(wv[mt][1], 2 * s + 1);
      }
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int s = 0; s < 2; ++s)
#pragma unroll
          for (int q = 0; q < TERMS; ++q) {
            if constexpr (BF) mma_bf16(acc[mt][nt], a[s][0], a[s][1], a[s][2], a[s][3], xv[nt][q][2 * s], xv[nt][q][2 * s + 1]);
            else mma_f16(acc[mt][nt], a[s][0], a[s][1], a[s][2], a[s][3], xv[nt][q][2 * s], xv[nt][q][2 * s + 1]);
          }
    }
  }
  cp_wait<0>();
  __syncthreads();  // the rings are reused below

  // The 4 K-warps' partials, summed in warp order by warp wk = 0 (as skinny_kernel).
  auto red = reinterpret_cast<float(*)[kSkWM][MT * 16][NT * 8]>(sk2_smem);
  float* tile = reinterpret_cast<float*>(sk2_smem + P::RED);  // [NT * 8][BR]: this block's sums (kb > 1)
  if (wk > 0)
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int i = 0; i < 4; ++i) red[wk - 1][wm][mt * 16 + g + (i >> 1) * 8][nt * 8 + 2 * t + (i & 1)] = acc[mt][nt][i];
  __syncthreads();
  if (wk == 0)
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int rl = mt * 16 + g + (i >> 1) * 8, cl = nt * 8 + 2 * t + (i & 1);
          float v = acc[mt][nt][i];
#pragma unroll
          for (int k = 0; k < kSkWK - 1; ++k) v += red[k][wm][rl][cl];
          if constexpr (!BF) v *= xscale[min(cl, n - 1)];
          if (kb == 1) {
            const int64_t row = r0 + rl;
            if (row < rows && cl < n) y[int64_t(cl) * rows + row] = v;
          } else {
            tile[cl * P::BR + wm * (MT * 16) + rl] = v;
          }
        }
  if (kb == 1) return;
  cg::cluster_group cluster = cg::this_cluster();
  cluster.sync();
  const int rank = int(cluster.block_rank());
  const int used = n * P::BR, eb = used * rank / kb, ee = used * (rank + 1) / kb;
  for (int e = eb + int(threadIdx.x); e < ee; e += kSkThreads) {
    float v = cluster.map_shared_rank(tile, 0)[e];
    for (int k = 1; k < kb; ++k) v += cluster.map_shared_rank(tile, k)[e];
    const int cl = e / P::BR;
    const int64_t row = int64_t(blockIdx.x) * P::BR + e % P::BR;
    if (row < rows) y[int64_t(cl) * rows + row] = v;
  }
  cluster.sync();  // the other blocks may still read this block's tile
}

// Rows per warp (x 16): 4, or 2 where 4 leaves most SMs idle (does not change any result).
int skinny2_mt(int64_t rows, int64_t cols) { return (rows + 127) / 128 * skinny_splits(rows, cols) >= 96 ? 4 : 2; }

int env_int(const char* name, int dflt) {
  const char* e = std::getenv(name);
  return e && *e ? std::atoi(e) : dflt;
}

// Returns cudaErrorNotSupported (nothing launched) where a cluster of kb blocks cannot be resident.
template <int T, int MT, int NT>
cudaError_t skinny2_launch(const void* w, int64_t rows, int64_t cols, const float* x, const uint16_t* xs,
                           const float* xscale, int n, float* y, int kb, int stages, cudaStream_t s) {
  using P = Sk2<MT, NT>;
  auto kern = skinny2_kernel<T, MT, NT>;
  const int S = std::max(2, std::min(stages, P::S));
  const int smem = std::max(kSkThreads / 32 * S * P::STAGE, P::RED + P::TILE);
  static std::atomic<uint32_t> ready{0};  // per device: the shared-memory attribute is set
  int dev = 0;
  if (cudaError_t e = cudaGetDevice(&dev); e != cudaSuccess) return e;
  const uint32_t bit = 1u << (dev & 31);
  if (!(ready.load(std::memory_order_acquire) & bit)) {
    const int most = std::max(kSkThreads / 32 * P::S * P::STAGE, P::RED + P::TILE);
    if (cudaError_t e = cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, most); e != cudaSuccess)
      return e;
    ready.fetch_or(bit, std::memory_order_release);
  }
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(unsigned((rows + P::BR - 1) / P::BR), unsigned(kb));
  cfg.blockDim = dim3(kSkThreads);
  cfg.dynamicSmemBytes = size_t(smem);
  cfg.stream = s;
  cudaLaunchAttribute at[1];
  at[0].id = cudaLaunchAttributeClusterDimension;
  at[0].val.clusterDim.x = 1;
  at[0].val.clusterDim.y = unsigned(kb);
  at[0].val.clusterDim.z = 1;
  cfg.attrs = at;
  cfg.numAttrs = 1;
  // Can a cluster of kb such blocks be resident at all? (Asked once per split factor; if not, the caller runs
  // skinny_kernel, which gives the same bits.)
  static std::atomic<int> fits[9] = {};  // 0 unknown, 1 yes, 2 no
  if (kb > 1 && fits[kb].load(std::memory_order_relaxed) == 0) {
    int clusters = 0;
    const cudaError_t e = cudaOccupancyMaxActiveClusters(&clusters, kern, &cfg);
    fits[kb].store(e == cudaSuccess && clusters > 0 ? 1 : 2, std::memory_order_relaxed);
    if (e != cudaSuccess || clusters <= 0) (void)cudaGetLastError();
  }
  if (kb > 1 && fits[kb].load(std::memory_order_relaxed) == 2) return cudaErrorNotSupported;
  return cudaLaunchKernelEx(&cfg, kern, static_cast<const uint8_t*>(w), rows, cols, x, xs, xscale, n, y, kb, S);
}

template <int T>
cudaError_t skinny2_dispatch(const void* w, int64_t rows, int64_t cols, const float* x, const uint16_t* xs,
                             const float* xscale, int n, float* y, int stages, cudaStream_t s) {
  const int kb = skinny_splits(rows, cols);
  const bool m4 = skinny2_mt(rows, cols) == 4;
#define SK2(MT, NT) skinny2_launch<T, MT, NT>(w, rows, cols, x, xs, xscale, n, y, kb, stages, s)
  if (n <= 8) return m4 ? SK2(4, 1) : SK2(2, 1);
  if (n <= 16) return m4 ? SK2(4, 2) : SK2(2, 2);
  return m4 ? SK2(4, 4) : SK2(2, 4);
#undef SK2
}

// Which kernel runs an F16/BF16 call of n <= 32 rows, and with how many stages (0: skinny_kernel). Both kernels
// give the same bits, so this may depend on anything. Default, from the H200 passes of 2026-12-01 16:58 UTC that
// forced each configuration (docs/cuda.md): one K piece (kb = 1: gate/up, output) -> pipelined, 3 stages; kb = 8
// (few rows, e.g. 1024x4096) and n <= 16 -> pipelined, 3 stages; BF16 (no pre-pass then) with n <= 8 ->
// pipelined, 2 stages; else skinny_kernel. HEADROOM_CUDA_SKINNY_V2=0 / 1: always skinny_kernel / always the
// pipelined one; 2: the pipelined one for n > 2 (the tests' batch invariance check, which compares with 2-row
// calls, then compares the two kernels bitwise); HEADROOM_CUDA_SKINNY_STAGES=k sets the stages (forced modes
// default to the most that fit).
int skinny_v2_stages(WT t, int64_t rows, int64_t cols, int64_t n) {
  static const int mode = env_int("HEADROOM_CUDA_SKINNY_V2", -1);
  static const int stages = env_int("HEADROOM_CUDA_SKINNY_STAGES", 0);
  if (n > 32 || t == WT::Q8_0) return 0;
  int st = 0;
  if (mode == 0) st = 0;
  else if (mode == 1) st = 8;
  else if (mode == 2) st = n > 2 ? 8 : 0;
  else {
    const int kb = skinny_splits(rows, cols);
    st = kb == 1 ? 3 : kb >= 8 && n <= 16 ? 3 : t == WT::BF16 && n <= 8 ? 2 : 0;
  }
  return st > 0 && stages > 0 ? std::max(2, stages) : st;
}

}  // namespace

cudaError_t launch_gemv(WT t, const void* w, int64_t rows, int64_t cols, const float* x, int64_t n, float* y, int8_t* xq,
                        float* xd, cudaStream_t s) {
  if (n <= 0 || rows <= 0) return cudaSuccess;
  const bool x_aligned = (reinterpret_cast<uintptr_t>(x) & 15) == 0;
  if (t == WT::Q8_0) {
    const int64_t nb = n * cols / 32;
    quantize_q8_kernel<<<grid1d(nb, 128), 128, 0, s>>>(x, nb, xq, xd);
    if (cudaError_t e = cudaGetLastError(); e != cudaSuccess) return e;
  } else if (!x_aligned || cols % (t == WT::F32 ? 4 : 8) != 0) {
    const dim3 grid(unsigned((rows + kWarps - 1) / kWarps), unsigned(n));
    const auto* wb = static_cast<const uint8_t*>(w);
    if (t == WT::F32) gemv_generic_kernel<int(WT::F32)><<<grid, kThreads, 0, s>>>(wb, rows, cols, x, y);
    else if (t == WT::F16) gemv_generic_kernel<int(WT::F16)><<<grid, kThreads, 0, s>>>(wb, rows, cols, x, y);
    else gemv_generic_kernel<int(WT::BF16)><<<grid, kThreads, 0, s>>>(wb, rows, cols, x, y);
    return cudaGetLastError();
  }
  for (int64_t j0 = 0; j0 < n; j0 += 8) {
    const int nr = int(std::min<int64_t>(8, n - j0));
    const float* xj = x + j0 * cols;
    float* yj = y + j0 * rows;
    cudaError_t e;
    switch (t) {
      case WT::F32: e = gemv_pass<int(WT::F32)>(w, rows, cols, xj, nr, yj, nullptr, nullptr, s); break;
      case WT::F16: e = gemv_pass<int(WT::F16)>(w, rows, cols, xj, nr, yj, nullptr, nullptr, s); break;
      case WT::BF16: e = gemv_pass<int(WT::BF16)>(w, rows, cols, xj, nr, yj, nullptr, nullptr, s); break;
      default: e = gemv_pass<int(WT::Q8_0)>(w, rows, cols, nullptr, nr, yj, xq + j0 * cols, xd + j0 * (cols / 32), s);
    }
    if (e != cudaSuccess) return e;
  }
  return cudaSuccess;
}

bool gemv_fits(WT t, int64_t cols, const float* x) {
  return t == WT::Q8_0 || ((reinterpret_cast<uintptr_t>(x) & 15) == 0 && cols % (t == WT::F32 ? 4 : 8) == 0);
}

// Q8_0: x quantized to Q8_0 blocks once, for every weight of a fused GEMV.
static cudaError_t quantize_for_gemv(WT t, const float* x, int64_t cols, int8_t* xq, float* xd, cudaStream_t s) {
  if (t != WT::Q8_0) return cudaSuccess;
  quantize_q8_kernel<<<grid1d(cols / 32, 128), 128, 0, s>>>(x, cols / 32, xq, xd);
  return cudaGetLastError();
}

template <int T>
static void gemv_group_as(const GemvGroup& g, int64_t cols, const float* x, const int8_t* xq, const float* xd, cudaStream_t s) {
  gemv_group_kernel<T><<<g.block0[g.n_parts], kThreads, 0, s>>>(g, cols, x, xq, xd);
}

cudaError_t launch_gemv_group(WT t, const GemvPart* parts, int n_parts, int64_t cols, const float* x, int8_t* xq, float* xd,
                              cudaStream_t s) {
  if (n_parts <= 0 || n_parts > kGemvGroupMax || !gemv_fits(t, cols, x)) return cudaErrorInvalidValue;
  GemvGroup g;
  g.n_parts = n_parts;
  for (int p = 0; p < n_parts; ++p) {
    g.part[p] = parts[p];
    g.block0[p + 1] = g.block0[p] + unsigned((parts[p].rows + kBR - 1) / kBR);
  }
  if (g.block0[n_parts] == 0) return cudaSuccess;
  if (cudaError_t e = quantize_for_gemv(t, x, cols, xq, xd, s); e != cudaSuccess) return e;
  switch (t) {
    case WT::F32: gemv_group_as<int(WT::F32)>(g, cols, x, xq, xd, s); break;
    case WT::F16: gemv_group_as<int(WT::F16)>(g, cols, x, xq, xd, s); break;
    case WT::BF16: gemv_group_as<int(WT::BF16)>(g, cols, x, xq, xd, s); break;
    default: gemv_group_as<int(WT::Q8_0)>(g, cols, x, xq, xd, s); break;
  }
  return cudaGetLastError();
}

template <int T>
static void gemv_swiglu_as(const void* gate, const void* up, int64_t rows, int64_t cols, const float* x, float* out,
                           const int8_t* xq, const float* xd, cudaStream_t s) {
  gemv_swiglu_kernel<T><<<unsigned((rows + kBR - 1) / kBR), kThreads, 0, s>>>(
      static_cast<const uint8_t*>(gate), static_cast<const uint8_t*>(up), rows, cols, x, out, xq, xd);
}

cudaError_t launch_gemv_swiglu(WT t, const void* gate, const void* up, int64_t rows, int64_t cols, const float* x,
                               float* out, int8_t* xq, float* xd, cudaStream_t s) {
  if (!gemv_fits(t, cols, x)) return cudaErrorInvalidValue;
  if (rows <= 0) return cudaSuccess;
  if (cudaError_t e = quantize_for_gemv(t, x, cols, xq, xd, s); e != cudaSuccess) return e;
  switch (t) {
    case WT::F32: gemv_swiglu_as<int(WT::F32)>(gate, up, rows, cols, x, out, xq, xd, s); break;
    case WT::F16: gemv_swiglu_as<int(WT::F16)>(gate, up, rows, cols, x, out, xq, xd, s); break;
    case WT::BF16: gemv_swiglu_as<int(WT::BF16)>(gate, up, rows, cols, x, out, xq, xd, s); break;
    default: gemv_swiglu_as<int(WT::Q8_0)>(gate, up, rows, cols, x, out, xq, xd, s); break;
  }
  return cudaGetLastError();
}

int skinny_splits(int64_t rows, int64_t cols) {
  // Time model for one block per SM: waves / kb (each block does 1/kb of a row block's K), plus the
  // partials' traffic (at n = 16) and a second launch when kb > 1. A function of the shape only.
  const int64_t rb = (rows + 127) / 128, C = cols / 32;
  int best = 1;
  double best_cost = 1e300;
  for (int kb = 1; kb <= 8; kb *= 2) {  // <= 8: the pipelined kernel's cluster (portable size)
    if (kb > 1 && C / kb < 8) break;
    const int64_t tiles = rb * kb;
    const double waves = double((tiles + kSkModelSMs - 1) / kSkModelSMs);
    const double cost = waves / kb * (1.0 + (kb > 1 ? 64.0 * kb / double(cols) : 0.0)) + (kb > 1 ? 0.02 : 0.0);
    if (cost < best_cost - 1e-9) {
      best_cost = cost;
      best = kb;
    }
  }
  return best;
}

bool skinny_takes(WT t, int64_t cols, int64_t n, const float* x) {
  return (t == WT::F16 || t == WT::BF16 || t == WT::Q8_0) && n >= 1 && n <= kSkinnyMaxRows && cols >= 32 &&
         cols % 32 == 0 && (reinterpret_cast<uintptr_t>(x) & 15) == 0;
}

size_t skinny_scratch_bytes(WT t, int64_t rows, int64_t cols, int64_t n) { return skinny_layout(t, rows, cols, n).total; }

cudaError_t launch_skinny(WT t, const void* w, int64_t rows, int64_t cols, const float* x, int64_t n, float* y,
                          void* scratch, cudaStream_t s) {
  if (n <= 0 || rows <= 0) return cudaSuccess;
  const SkinnyLayout l = skinny_layout(t, rows, cols, n);
  auto* base = static_cast<uint8_t*>(scratch);
  cudaError_t e = cudaSuccess;
  bool split_done = false;
  if (const int stages = skinny_v2_stages(t, rows, cols, n); stages > 0) {
    auto* xs = reinterpret_cast<uint16_t*>(base + l.xs);
    auto* xscale = reinterpret_cast<float*>(base + l.xscale);
    if (t == WT::F16) {
      const int threads = int(std::min<int64_t>(1024, std::max<int64_t>(32, (cols / 4 + 31) / 32 * 32)));
      skinny_split_kernel<false><<<unsigned(n), threads, 0, s>>>(x, cols, n, xs, xscale);
      if ((e = cudaGetLastError()) != cudaSuccess) return e;
      split_done = true;
      e = skinny2_dispatch<int(WT::F16)>(w, rows, cols, nullptr, xs, xscale, int(n), y, stages, s);
    } else {
      e = skinny2_dispatch<int(WT::BF16)>(w, rows, cols, x, nullptr, nullptr, int(n), y, stages, s);
    }
    if (e != cudaErrorNotSupported) return e;  // else (no cluster of kb fits) skinny_kernel, same bits
  }
  const int kb = skinny_splits(rows, cols);
  float* out = kb > 1 ? reinterpret_cast<float*>(base + l.part) : y;
  if (t == WT::Q8_0) {
    auto* xq = reinterpret_cast<int8_t*>(base + l.xs);
    auto* xd = reinterpret_cast<float*>(base + l.xscale);
    const int64_t nb = n * cols / 32;
    quantize_q8_kernel<<<grid1d(nb, 128), 128, 0, s>>>(x, nb, xq, xd);
    if ((e = cudaGetLastError()) != cudaSuccess) return e;
    e = skinny_dispatch<int(WT::Q8_0)>(w, rows, cols, nullptr, nullptr, xq, xd, int(n), out, kb, s);
  } else {
    auto* xs = reinterpret_cast<uint16_t*>(base + l.xs);
    auto* xscale = reinterpret_cast<float*>(base + l.xscale);
    const int threads = int(std::min<int64_t>(1024, std::max<int64_t>(32, (cols / 4 + 31) / 32 * 32)));
    if (t == WT::F16) {
      if (!split_done) skinny_split_kernel<false><<<unsigned(n), threads, 0, s>>>(x, cols, n, xs, xscale);
    } else {
      skinny_split_kernel<true><<<unsigned(n), threads, 0, s>>>(x, cols, n, xs, nullptr);
    }
    if ((e = cudaGetLastError()) != cudaSuccess) return e;
    e = t == WT::F16 ? skinny_dispatch<int(WT::F16)>(w, rows, cols, xs, xscale, nullptr, nullptr, int(n), out, kb, s)
                     : skinny_dispatch<int(WT::BF16)>(w, rows, cols, xs, nullptr, nullptr, nullptr, int(n), out, kb, s);
  }
  if (e != cudaSuccess || kb == 1) return e;
  const int64_t count = n * rows;
  skinny_sum_kernel<<<unsigned(std::min<int64_t>(4096, (count + 255) / 256)), 256, 0, s>>>(out, kb, count, y);
  return cudaGetLastError();
}

cudaError_t launch_f32_to_f16(const float* x, void* out, int64_t count, cudaStream_t s) {
  if (count <= 0) return cudaSuccess;
  f32_to_f16_kernel<<<elem_grid(count), 256, 0, s>>>(x, static_cast<uint16_t*>(out), count);
  return cudaGetLastError();
}
cudaError_t launch_f32_to_bf16(const float* x, void* out, int64_t count, cudaStream_t s) {
  if (count <= 0) return cudaSuccess;
  f32_to_bf16_kernel<<<elem_grid(count), 256, 0, s>>>(x, static_cast<uint16_t*>(out), count);
  return cudaGetLastError();
}
cudaError_t launch_q8_to_f16(const void* w, int64_t rows, int64_t cols, int64_t r0, int64_t nr, void* out, cudaStream_t s) {
  const int64_t count = nr * cols;
  if (count <= 0) return cudaSuccess;
  q8_to_f16_kernel<<<elem_grid(count), 256, 0, s>>>(static_cast<const uint8_t*>(w), rows, cols, r0, count,
                                                     static_cast<uint16_t*>(out));
  return cudaGetLastError();
}

}  // namespace headroom::cuda
