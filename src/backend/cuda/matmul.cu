// CUDA backend: decode GEMV / skinny GEMM kernels (1..32 activation rows) and the conversions that feed
// cuBLAS for prefill.
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
#include "backend/cuda/common.cuh"

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

template <int T, int NR>
__global__ void __launch_bounds__(kThreads, 2) gemv_kernel(const uint8_t* __restrict__ w, int64_t rows, int64_t cols,
                                                        const float* __restrict__ x, int n, float* __restrict__ y,
                                                        const int8_t* __restrict__ xq, const float* __restrict__ xd) {
  const int64_t row0 = int64_t(blockIdx.x) * kBR;
  int64_t wr[kBR];
#pragma unroll
  for (int i = 0; i < kBR; ++i) wr[i] = min(row0 + i, rows - 1);
  int64_t xr[NR];
#pragma unroll
  for (int j = 0; j < NR; ++j) xr[j] = min(j, n - 1);
  float acc[kBR][NR];
#pragma unroll
  for (int i = 0; i < kBR; ++i)
#pragma unroll
    for (int j = 0; j < NR; ++j) acc[i][j] = 0.0f;

  if constexpr (T == int(WT::F16) || T == int(WT::BF16)) {
    const int64_t U = cols / 8;
#pragma unroll(NR <= 2 ? 2 : 1)
    for (int64_t u = threadIdx.x; u < U; u += kThreads) {
      uint4 wv[kBR];
#pragma unroll
      for (int i = 0; i < kBR; ++i) wv[i] = __ldg(reinterpret_cast<const uint4*>(w + (wr[i] * cols + u * 8) * 2));
      float wf[kBR][8];
#pragma unroll
      for (int i = 0; i < kBR; ++i) unpack8(wv[i], T == int(WT::BF16), wf[i]);
#pragma unroll
      for (int j = 0; j < NR; ++j) {
        const float4 a = __ldg(reinterpret_cast<const float4*>(x + xr[j] * cols + u * 8));
        const float4 b = __ldg(reinterpret_cast<const float4*>(x + xr[j] * cols + u * 8 + 4));
        const float xv[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
#pragma unroll
        for (int i = 0; i < kBR; ++i)
#pragma unroll
          for (int e = 0; e < 8; ++e) acc[i][j] = fmaf(wf[i][e], xv[e], acc[i][j]);
      }
    }
  } else if constexpr (T == int(WT::F32)) {
    const int64_t U = cols / 4;
#pragma unroll(NR <= 2 ? 2 : 1)
    for (int64_t u = threadIdx.x; u < U; u += kThreads) {
      float4 wv[kBR];
#pragma unroll
      for (int i = 0; i < kBR; ++i) wv[i] = __ldg(reinterpret_cast<const float4*>(w + (wr[i] * cols + u * 4) * 4));
#pragma unroll
      for (int j = 0; j < NR; ++j) {
        const float4 xv = __ldg(reinterpret_cast<const float4*>(x + xr[j] * cols + u * 4));
#pragma unroll
        for (int i = 0; i < kBR; ++i) {
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
    const uint16_t* wsc = reinterpret_cast<const uint16_t*>(w + q8_scales_offset(rows, cols));
#pragma unroll 1
    for (int64_t u = threadIdx.x; u < U; u += kThreads) {
      int4 wv[kBR][2];
      float wd[kBR];
#pragma unroll
      for (int i = 0; i < kBR; ++i) {
        const int4* p = reinterpret_cast<const int4*>(w + wr[i] * cols + u * 32);
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
        for (int i = 0; i < kBR; ++i) {
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

  __shared__ float red[kWarps][kBR * NR];
  const int lane = threadIdx.x & 31, warp = threadIdx.x / 32;
#pragma unroll
  for (int i = 0; i < kBR; ++i)
#pragma unroll
    for (int j = 0; j < NR; ++j) {
      const float v = warp_sum(acc[i][j]);
      if (lane == 0) red[warp][i * NR + j] = v;
    }
  __syncthreads();
  if (threadIdx.x < kBR * NR) {
    const int i = threadIdx.x / NR, j = threadIdx.x % NR;
    float s = 0.0f;
#pragma unroll
    for (int k = 0; k < kWarps; ++k) s += red[k][threadIdx.x];
    if (j < n && row0 + i < rows) y[int64_t(j) * rows + row0 + i] = s;
  }
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
