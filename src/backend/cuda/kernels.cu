// CUDA backend: element-wise and per-row ops, KV store ops and Quest page selection.
//
// Every result element is computed by one thread (or one block / warp with a fixed reduction order), so
// results never depend on the batch size or on the launch shape.
#include <cfloat>

#include "backend/cuda/common.cuh"

namespace headroom::cuda {

namespace {

// ---- embed --------------------------------------------------------------------------------------------
__global__ void embed_kernel(int t, const uint8_t* w, int64_t rows, int64_t cols, const int32_t* ids, float* out,
                             uint32_t* err) {
  const int64_t i = blockIdx.x;
  const int32_t id = ids[i];
  float* o = out + i * cols;
  const bool bad = id < 0 || int64_t(id) >= rows;
  if (bad && threadIdx.x == 0 && blockIdx.y == 0) atomicOr(err, kErrEmbedId);
  for (int64_t c = int64_t(blockIdx.y) * blockDim.x + threadIdx.x; c < cols; c += int64_t(gridDim.y) * blockDim.x) {
    if (bad) {
      o[c] = 0.0f;
      continue;
    }
    float v;
    switch (t) {
      case int(WT::F32): v = reinterpret_cast<const float*>(w)[int64_t(id) * cols + c]; break;
      case int(WT::F16): v = h2f(reinterpret_cast<const uint16_t*>(w)[int64_t(id) * cols + c]); break;
      case int(WT::BF16): v = bf2f(reinterpret_cast<const uint16_t*>(w)[int64_t(id) * cols + c]); break;
      default: {
        const int8_t q = reinterpret_cast<const int8_t*>(w)[int64_t(id) * cols + c];
        const uint16_t* sc = reinterpret_cast<const uint16_t*>(w + q8_scales_offset(rows, cols));
        v = float(q) * h2f(sc[int64_t(id) * (cols / 32) + c / 32]);
      }
    }
    o[c] = v;
  }
}

// ---- rmsnorm: one block per row; sum of squares in double (fixed order), as the CPU backend ------------
// y non-null (add_rmsnorm): x += y first, each element by the thread that then squares and scales it, so the
// result has the bits of add then rmsnorm (out may alias y or x).
__global__ void rmsnorm_kernel(float* x, const float* y, const float* w, int64_t dim, float eps, float* out) {
  float* xr = x + int64_t(blockIdx.x) * dim;
  const float* yr = y ? y + int64_t(blockIdx.x) * dim : nullptr;
  float* o = out + int64_t(blockIdx.x) * dim;
  double s = 0.0;
  for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) {
    float v = xr[i];
    if (yr) {
      v += yr[i];
      xr[i] = v;
    }
    s += double(v) * double(v);
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xFFFFFFFFu, s, off);
  __shared__ double part[32];
  __shared__ float scale_s;
  if ((threadIdx.x & 31) == 0) part[threadIdx.x / 32] = s;
  __syncthreads();
  if (threadIdx.x == 0) {
    double t = 0.0;
    for (int i = 0; i < int(blockDim.x / 32); ++i) t += part[i];
    const float mean = float(t / double(dim));
    scale_s = 1.0f / sqrtf(mean + eps);
  }
  __syncthreads();
  const float sc = scale_s;
  for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) o[i] = __fmul_rn(__fmul_rn(xr[i], sc), w[i]);
}

// ---- rope: ggml's angle recurrence (theta_i = p * scale^i by repeated float multiplication) ------------
struct RopeArgs {
  int n_rot = 0;
  bool neox = false;
  float theta_scale = 1.0f, freq_scale = 1.0f;
  const float* ff = nullptr;  // frequency factors, or null
};

// The (sin, cos) of pair i at position p.
__device__ __forceinline__ void rope_angle(const RopeArgs& a, int32_t p, int i, float* sn, float* cs) {
  float theta = float(p);
  for (int k = 0; k < i; ++k) theta = __fmul_rn(theta, a.theta_scale);
  const float f = a.ff ? a.ff[i] : 1.0f;
  const float angle = __fmul_rn(a.freq_scale, __fdiv_rn(theta, f));
  sincosf(angle, sn, cs);
}
// Rotates pair i of one head's vector.
__device__ __forceinline__ void rope_pair(const RopeArgs& a, float* v, int i, float sn, float cs) {
  const int half = a.n_rot / 2;
  const int i0 = a.neox ? i : 2 * i, i1 = a.neox ? i + half : 2 * i + 1;
  const float x0 = v[i0], x1 = v[i1];
  v[i0] = __fsub_rn(__fmul_rn(x0, cs), __fmul_rn(x1, sn));
  v[i1] = __fadd_rn(__fmul_rn(x0, sn), __fmul_rn(x1, cs));
}

__global__ void rope_kernel(float* x, int64_t n_heads, int64_t head_dim, const int32_t* pos, RopeArgs a) {
  const int64_t r = blockIdx.x;
  for (int i = threadIdx.x; i < a.n_rot / 2; i += blockDim.x) {
    float sn, cs;
    rope_angle(a, pos[r], i, &sn, &cs);
    for (int64_t h = 0; h < n_heads; ++h) rope_pair(a, x + (r * n_heads + h) * head_dim, i, sn, cs);
  }
}

__global__ void swiglu_kernel(const float* g, const float* u, int64_t count, float* out) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < count; i += int64_t(gridDim.x) * blockDim.x) {
    out[i] = silu_mul(g[i], u[i]);
  }
}

__global__ void add_kernel(float* x, const float* y, int64_t count) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < count; i += int64_t(gridDim.x) * blockDim.x)
    x[i] += y[i];
}

__global__ void add_bias_kernel(float* x, const float* b, int64_t n, int64_t dim) {
  const int64_t count = n * dim;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < count; i += int64_t(gridDim.x) * blockDim.x)
    x[i] += b[i % dim];
}

// ---- KV -----------------------------------------------------------------------------------------------
__global__ void kv_reset_kernel(KVDev kv, const int32_t* ids) {
  const int32_t id = ids[blockIdx.x];
  int32_t* pos = kv_pos(kv, id);
  float* sc = kv_scores(kv, id);
  for (int s = threadIdx.x; s < kv.page_size; s += blockDim.x) {
    pos[s] = -1;
    if (sc) sc[s] = 0.0f;
  }
  if (kv.minmax) {
    float* mn = kv.minmax + int64_t(id) * 2 * kv.head_dim;
    for (int d = threadIdx.x; d < kv.head_dim; d += blockDim.x) {
      mn[d] = INFINITY;
      mn[kv.head_dim + d] = -INFINITY;
    }
  }
}

// Encodes x (head_dim floats) into a stored row; returns this lane's decoded stored values through
// `bounds` updates. One warp per row.
template <int T>
__device__ void encode_row_warp(const float* x, int D, uint8_t* dst, float* kmin, float* kmax) {
  const int lane = threadIdx.x & 31;
  if constexpr (T == kKVQ8) {
    for (int b = 0; b < D / 32; ++b) {
      const float xv = x[b * 32 + lane];
      const float amax = warp_max(fabsf(xv));
      const float d = __fdiv_rn(amax, 127.0f);
      const float id = d != 0.0f ? __fdiv_rn(1.0f, d) : 0.0f;
      const float qf = roundf(__fmul_rn(xv, id));
      const int8_t q = int8_t(qf);
      uint8_t* blk = dst + b * 34;
      const uint16_t dh = f2h(d);
      if (lane == 0) {
        blk[0] = uint8_t(dh & 0xFF);
        blk[1] = uint8_t(dh >> 8);
      }
      blk[2 + lane] = uint8_t(q);
      if (kmin) {
        const float sv = h2f(dh) * float(q);
        atomic_min_f(kmin + b * 32 + lane, sv);
        atomic_max_f(kmax + b * 32 + lane, sv);
      }
    }
  } else {
    for (int d = lane; d < D; d += 32) {
      const float xv = x[d];
      float sv;
      if constexpr (T == kKVF32) {
        reinterpret_cast<float*>(dst)[d] = xv;
        sv = xv;
      } else if constexpr (T == kKVF16) {
        const uint16_t h = f2h(xv);
        reinterpret_cast<uint16_t*>(dst)[d] = h;
        sv = h2f(h);
      } else {
        const uint16_t h = f2bf(xv);
        reinterpret_cast<uint16_t*>(dst)[d] = h;
        sv = bf2f(h);
      }
      if (kmin && sv == sv) {  // NaN leaves the bounds as they are (as std::min/max on the CPU)
        atomic_min_f(kmin + d, sv);
        atomic_max_f(kmax + d, sv);
      }
    }
  }
}

// Item i = row * n_kv + head of a kv_store: one warp encodes its K and V rows and sets the slot's position.
template <int T>
__device__ void store_item(const KVDev& kv, const float* k, const float* v, int64_t i, int n_kv, const int32_t* slots,
                           const int32_t* pos, uint32_t* err) {
  const int32_t g = slots[i];
  if (g == -1) return;
  const int64_t total = int64_t(kv.total_pages) * kv.page_size;
  if (g < 0 || g >= total) {
    if ((threadIdx.x & 31) == 0) atomicOr(err, kErrKVSlot);
    return;
  }
  const int D = kv.head_dim;
  const int32_t id = g / kv.page_size, s = g % kv.page_size;
  float* kmin = kv.minmax ? kv.minmax + int64_t(id) * 2 * D : nullptr;
  encode_row_warp<T>(k + i * D, D, kv_krow(kv, id, s), kmin, kmin ? kmin + D : nullptr);
  encode_row_warp<T>(v + i * D, D, kv_vrow(kv, id, s), nullptr, nullptr);
  if ((threadIdx.x & 31) == 0) {
    kv_pos(kv, id)[s] = pos[i / n_kv];
    if (float* sc = kv_scores(kv, id)) sc[s] = 0.0f;
  }
}

template <int T>
__global__ void kv_store_kernel(KVDev kv, const float* k, const float* v, int64_t n_items, int n_kv, const int32_t* slots,
                                const int32_t* pos, uint32_t* err) {
  const int64_t i = int64_t(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  if (i < n_items) store_item<T>(kv, k, v, i, n_kv, slots, pos, err);
}

// rope_store: one block per row. Its pairs' angles once (shared), q's and k's heads rotated in place, then a
// warp per KV head stores K and V (the block's writes to k are visible to it after the barrier).
constexpr int kRopeStoreThreads = 256;
template <int T>
__global__ void __launch_bounds__(kRopeStoreThreads) rope_store_kernel(KVDev kv, float* q, float* k, const float* v,
                                                                       int n_head, int n_kv, int head_dim,
                                                                       const int32_t* pos, const int32_t* slots,
                                                                       RopeArgs a, uint32_t* err) {
  const int64_t r = blockIdx.x;
  const int half = a.n_rot / 2;
  __shared__ float s_sn[128], s_cs[128];
  for (int i = threadIdx.x; i < half; i += blockDim.x) rope_angle(a, pos[r], i, &s_sn[i], &s_cs[i]);
  __syncthreads();
  const int heads = n_head + n_kv;
  for (int t = threadIdx.x; t < heads * half; t += blockDim.x) {
    const int h = t / half, i = t % half;
    float* vec = h < n_head ? q + (r * n_head + h) * head_dim : k + (r * n_kv + h - n_head) * head_dim;
    rope_pair(a, vec, i, s_sn[i], s_cs[i]);
  }
  __syncthreads();
  for (int h = threadIdx.x / 32; h < n_kv; h += blockDim.x / 32) store_item<T>(kv, k, v, r * n_kv + h, n_kv, slots, pos, err);
}

// The copies in order, one block: every thread takes part in each copy, with a barrier between copies.
__global__ void kv_copy_slots_kernel(KVDev kv, const SlotCopy* copies, int n, uint32_t* err) {
  const int P = kv.page_size, D = kv.head_dim, rb = kv.rb;
  const int64_t total = int64_t(kv.total_pages) * P;
  for (int c = 0; c < n; ++c) {
    const SlotCopy cp = copies[c];
    __syncthreads();
    if (cp.src == cp.dst) continue;
    if (cp.dst < 0 || cp.dst >= total || cp.src < -1 || cp.src >= total) {
      if (threadIdx.x == 0) atomicOr(err, kErrKVSlot);
      continue;
    }
    const int32_t di = cp.dst / P, ds = cp.dst % P;
    if (cp.src == -1) {
      if (threadIdx.x == 0) {
        kv_pos(kv, di)[ds] = -1;
        if (float* sc = kv_scores(kv, di)) sc[ds] = 0.0f;
      }
      continue;
    }
    const int32_t si = cp.src / P, ss = cp.src % P;
    const uint8_t* ks = kv_krow(kv, si, ss);
    const uint8_t* vs = kv_vrow(kv, si, ss);
    uint8_t* kd = kv_krow(kv, di, ds);
    uint8_t* vd = kv_vrow(kv, di, ds);
    for (int b = threadIdx.x; b < rb; b += blockDim.x) {
      kd[b] = ks[b];
      vd[b] = vs[b];
    }
    const int32_t sp = kv_pos(kv, si)[ss];
    __syncthreads();  // every thread has read the source position before thread 0 writes the destination's
    if (threadIdx.x == 0) {
      kv_pos(kv, di)[ds] = sp;
      if (float* sc = kv_scores(kv, si)) kv_scores(kv, di)[ds] = sc[ss];
    }
    if (kv.minmax && sp >= 0) {
      float* mn = kv.minmax + int64_t(di) * 2 * D;
      for (int d = threadIdx.x; d < D; d += blockDim.x) {
        const float x = kv_elem_rt(kv.type, ks, d);
        if (x == x) {
          mn[d] = fminf(mn[d], x);
          mn[D + d] = fmaxf(mn[D + d], x);
        }
      }
    }
  }
}

// ---- select_pages -------------------------------------------------------------------------------------
// One block per job. Quest score of each candidate (one thread, fixed order: heads in order, dims in order),
// as an order-preserving 32-bit key; a 4-pass radix select finds the select_k-th largest key; the kept
// pages (key above it, or equal to it and among the earliest) are compacted in place, in their order.
constexpr int kSelThreads = 512;
constexpr int kSelCache = 12288;  // candidates whose keys stay in shared memory; more are recomputed

__device__ __forceinline__ uint32_t order_key(float f) {
  if (!(f == f)) f = -INFINITY;
  const uint32_t u = __float_as_uint(f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__device__ uint32_t quest_key(const KVDev& kv, int32_t id, const float* q, int G, int D) {
  const float* mn = kv.minmax + int64_t(id) * 2 * D;
  const float* mx = mn + D;
  if (!(mn[0] <= mx[0])) return order_key(-INFINITY);
  float total = 0.0f;
  for (int h = 0; h < G; ++h) {
    const float* qh = q + h * D;
    float head = 0.0f;
    for (int d = 0; d < D; ++d) head = __fadd_rn(head, fmaxf(__fmul_rn(qh[d], mn[d]), __fmul_rn(qh[d], mx[d])));
    total = __fadd_rn(total, head);
  }
  return order_key(total);
}

// Exclusive block-wide prefix sum of v (kSelThreads threads); *total gets the sum.
__device__ int block_excl_scan(int v, int* warp_tot, int* total) {
  const int lane = threadIdx.x & 31, w = threadIdx.x / 32;
  int x = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int y = __shfl_up_sync(0xFFFFFFFFu, x, o);
    if (lane >= o) x += y;
  }
  __syncthreads();
  if (lane == 31) warp_tot[w] = x;
  __syncthreads();
  if (threadIdx.x == 0) {
    int acc = 0;
    for (int i = 0; i < kSelThreads / 32; ++i) {
      const int t = warp_tot[i];
      warp_tot[i] = acc;
      acc += t;
    }
    *total = acc;
  }
  __syncthreads();
  return x - v + warp_tot[w];
}

__global__ void __launch_bounds__(kSelThreads) select_kernel(KVDev kv, AttnBatch b, uint32_t* err) {
  AttnJob& j = b.jobs[blockIdx.x];
  const int select_k = j.select_k, n_rows = j.n_rows, cand0 = j.cand0, n_cand = j.n_cand, n_pages = j.n_pages;
  if (select_k <= 0 || n_rows <= 0) return;
  if (cand0 < 0 || n_cand < 0 || j.page0 < 0 || int64_t(cand0) + n_cand > n_pages) {
    if (threadIdx.x == 0) atomicOr(err, kErrSelect);
    return;
  }
  if (n_cand <= select_k) return;
  if (!kv.minmax) {
    if (threadIdx.x == 0) atomicOr(err, kErrSelect);
    return;
  }
  const int G = b.n_group, D = b.head_dim;
  int32_t* cand = b.page_ids + j.page0 + cand0;
  extern __shared__ uint8_t sel_smem[];
  float* sq = reinterpret_cast<float*>(sel_smem);                 // G * D
  uint32_t* keys = reinterpret_cast<uint32_t*>(sq + G * D);       // kSelCache
  __shared__ int hist[256];
  __shared__ int warp_tot[kSelThreads / 32];
  __shared__ int s_total, s_digit, s_kk, s_bad;
  const float* q = b.q + int64_t(j.row0 + n_rows - 1) * b.q_stride + int64_t(j.kv_head) * G * D;
  for (int i = threadIdx.x; i < G * D; i += blockDim.x) sq[i] = q[i];
  if (threadIdx.x == 0) s_bad = 0;
  __syncthreads();
  for (int c = threadIdx.x; c < n_cand; c += blockDim.x)
    if (cand[c] < 0 || cand[c] >= kv.total_pages) s_bad = 1;
  __syncthreads();
  if (s_bad) {
    if (threadIdx.x == 0) atomicOr(err, kErrSelect);
    return;
  }
  const bool cached = n_cand <= kSelCache;
  if (cached)
    for (int c = threadIdx.x; c < n_cand; c += blockDim.x) keys[c] = quest_key(kv, cand[c], sq, G, D);
  __syncthreads();
  auto key_of = [&](int c) { return cached ? keys[c] : quest_key(kv, cand[c], sq, G, D); };

  // Radix select: the select_k-th largest key (prefix), and how many keys equal to it to keep (kk).
  uint32_t prefix = 0, mask = 0;
  int kk = select_k;
  for (int pass = 0; pass < 4; ++pass) {
    const int shift = 24 - 8 * pass;
    for (int i = threadIdx.x; i < 256; i += blockDim.x) hist[i] = 0;
    __syncthreads();
    for (int c = threadIdx.x; c < n_cand; c += blockDim.x) {
      const uint32_t k = key_of(c);
      if ((k & mask) == prefix) atomicAdd(&hist[(k >> shift) & 255], 1);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      int above = 0, dg = 255;
      for (; dg > 0; --dg) {
        if (above + hist[dg] >= kk) break;
        above += hist[dg];
      }
      s_digit = dg;
      s_kk = kk - above;
    }
    __syncthreads();
    prefix |= uint32_t(s_digit) << shift;
    mask |= 255u << shift;
    kk = s_kk;
    __syncthreads();
  }
  const uint32_t T = prefix;
  // Compaction in index order, chunk by chunk (every chunk is read before any of its slots is written;
  // writes land at or below the chunk's own positions).
  int out = 0, ties = 0;
  for (int base = 0; base < n_cand; base += blockDim.x) {
    const int c = base + threadIdx.x;
    const bool in = c < n_cand;
    const uint32_t k = in ? key_of(c) : 0;
    const int32_t id = in ? cand[c] : 0;
    const bool eq = in && k == T;
    const int tie_rank = block_excl_scan(eq ? 1 : 0, warp_tot, &s_total) + ties;
    const int n_eq = s_total;
    const bool keep = in && (k > T || (eq && tie_rank < kk));
    const int pos = block_excl_scan(keep ? 1 : 0, warp_tot, &s_total) + out;
    const int n_keep = s_total;
    __syncthreads();
    if (keep) cand[pos] = id;
    ties += n_eq;
    out += n_keep;
    __syncthreads();
  }
  // The pages after the candidate range move down behind the kept ones.
  const int n_after = n_pages - cand0 - n_cand;
  for (int base = 0; base < n_after; base += blockDim.x) {
    const int i = base + threadIdx.x;
    const int32_t id = i < n_after ? cand[n_cand + i] : 0;
    __syncthreads();
    if (i < n_after) cand[select_k + i] = id;
    __syncthreads();
  }
  if (threadIdx.x == 0) j.n_pages = n_pages - (n_cand - select_k);
}

}  // namespace

cudaError_t launch_embed(WT t, const void* w, int64_t rows, int64_t cols, const int32_t* ids, int64_t n, float* out,
                         uint32_t* err, cudaStream_t s) {
  if (n <= 0) return cudaSuccess;
  const dim3 grid(unsigned(n), unsigned(std::min<int64_t>(32, (cols + 255) / 256)));
  embed_kernel<<<grid, 256, 0, s>>>(int(t), static_cast<const uint8_t*>(w), rows, cols, ids, out, err);
  return cudaGetLastError();
}

cudaError_t launch_rmsnorm(const float* x, const float* w, int64_t n, int64_t dim, float eps, float* out, cudaStream_t s) {
  if (n <= 0) return cudaSuccess;
  rmsnorm_kernel<<<unsigned(n), 256, 0, s>>>(const_cast<float*>(x), nullptr, w, dim, eps, out);  // x is only read
  return cudaGetLastError();
}

cudaError_t launch_add_rmsnorm(float* x, const float* y, const float* w, int64_t n, int64_t dim, float eps, float* out,
                               cudaStream_t s) {
  if (n <= 0) return cudaSuccess;
  rmsnorm_kernel<<<unsigned(n), 256, 0, s>>>(x, y, w, dim, eps, out);
  return cudaGetLastError();
}

cudaError_t launch_rope(float* x, int64_t n, int64_t n_heads, int64_t head_dim, const int32_t* pos, int n_rot, bool neox,
                        float theta_scale, float freq_scale, const float* freq_factors, cudaStream_t s) {
  if (n <= 0) return cudaSuccess;
  rope_kernel<<<unsigned(n), 64, 0, s>>>(x, n_heads, head_dim, pos, RopeArgs{n_rot, neox, theta_scale, freq_scale, freq_factors});
  return cudaGetLastError();
}

cudaError_t launch_rope_store(const KVDev& kv, float* q, float* k, const float* v, int64_t n, int n_head, int n_kv_heads,
                              const int32_t* pos, const int32_t* slots, int n_rot, bool neox, float theta_scale,
                              float freq_scale, const float* freq_factors, uint32_t* err, cudaStream_t s) {
  if (n <= 0) return cudaSuccess;
  const RopeArgs a{n_rot, neox, theta_scale, freq_scale, freq_factors};
  const int D = kv.head_dim;
  switch (kv.type) {
#define HR_ROPE_STORE(T) \
  rope_store_kernel<T><<<unsigned(n), kRopeStoreThreads, 0, s>>>(kv, q, k, v, n_head, n_kv_heads, D, pos, slots, a, err)
    case kKVF32: HR_ROPE_STORE(kKVF32); break;
    case kKVF16: HR_ROPE_STORE(kKVF16); break;
    case kKVBF16: HR_ROPE_STORE(kKVBF16); break;
    default: HR_ROPE_STORE(kKVQ8); break;
#undef HR_ROPE_STORE
  }
  return cudaGetLastError();
}

static unsigned elem_grid(int64_t count) { return unsigned(std::min<int64_t>(65535, (count + 255) / 256)); }

cudaError_t launch_swiglu(const float* g, const float* u, int64_t count, float* out, cudaStream_t s) {
  if (count <= 0) return cudaSuccess;
  swiglu_kernel<<<elem_grid(count), 256, 0, s>>>(g, u, count, out);
  return cudaGetLastError();
}

cudaError_t launch_add(float* x, const float* y, int64_t count, cudaStream_t s) {
  if (count <= 0) return cudaSuccess;
  add_kernel<<<elem_grid(count), 256, 0, s>>>(x, y, count);
  return cudaGetLastError();
}

cudaError_t launch_add_bias(float* x, const float* b, int64_t n, int64_t dim, cudaStream_t s) {
  if (n <= 0) return cudaSuccess;
  add_bias_kernel<<<elem_grid(n * dim), 256, 0, s>>>(x, b, n, dim);
  return cudaGetLastError();
}

__global__ void scatter_i32_kernel(int32_t* dst, const int32_t* pairs, int64_t n) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    dst[pairs[2 * i]] = pairs[2 * i + 1];
}

cudaError_t launch_scatter_i32(int32_t* dst, const int32_t* pairs, int64_t n, cudaStream_t s) {
  if (n <= 0) return cudaSuccess;
  scatter_i32_kernel<<<elem_grid(n), 256, 0, s>>>(dst, pairs, n);
  return cudaGetLastError();
}

cudaError_t launch_kv_reset(const KVDev& kv, const int32_t* ids, int n, cudaStream_t s) {
  if (n <= 0) return cudaSuccess;
  kv_reset_kernel<<<unsigned(n), 128, 0, s>>>(kv, ids);
  return cudaGetLastError();
}

cudaError_t launch_kv_store(const KVDev& kv, const float* k, const float* v, int64_t n_rows, int n_kv_heads,
                            const int32_t* slots, const int32_t* pos, uint32_t* err, cudaStream_t s) {
  const int64_t items = n_rows * n_kv_heads;
  if (items <= 0) return cudaSuccess;
  const unsigned grid = unsigned((items + 3) / 4);
  switch (kv.type) {
    case kKVF32: kv_store_kernel<kKVF32><<<grid, 128, 0, s>>>(kv, k, v, items, n_kv_heads, slots, pos, err); break;
    case kKVF16: kv_store_kernel<kKVF16><<<grid, 128, 0, s>>>(kv, k, v, items, n_kv_heads, slots, pos, err); break;
    case kKVBF16: kv_store_kernel<kKVBF16><<<grid, 128, 0, s>>>(kv, k, v, items, n_kv_heads, slots, pos, err); break;
    default: kv_store_kernel<kKVQ8><<<grid, 128, 0, s>>>(kv, k, v, items, n_kv_heads, slots, pos, err); break;
  }
  return cudaGetLastError();
}

cudaError_t launch_kv_copy_slots(const KVDev& kv, const SlotCopy* copies, int n, uint32_t* err, cudaStream_t s) {
  if (n <= 0) return cudaSuccess;
  kv_copy_slots_kernel<<<1, 256, 0, s>>>(kv, copies, n, err);
  return cudaGetLastError();
}

cudaError_t launch_select_pages(const KVDev& kv, const AttnBatch& b, uint32_t* err, cudaStream_t s) {
  if (b.n_jobs <= 0) return cudaSuccess;
  const size_t smem = size_t(b.n_group) * size_t(b.head_dim) * 4 + size_t(kSelCache) * 4;
  static PerDeviceOnce attr;
  if (const int dev = current_device(); attr.needed(dev)) {
    const cudaError_t e = cudaFuncSetAttribute(select_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 200 * 1024);
    if (e != cudaSuccess) return e;
    attr.done(dev);
  }
  select_kernel<<<unsigned(b.n_jobs), kSelThreads, smem, s>>>(kv, b, err);
  return cudaGetLastError();
}

}  // namespace headroom::cuda
