// CUDA backend: tensor-core paged prefill attention (flash-attention-2 style, mma.sync m16n8k16).
//
// Takes the jobs with >= kAttnSplitMaxRows rows (prompt chunks) of a batch whose host-known shape says there are
// some (AttnBatch::max_rows >= 4), head_dim 64 or 128; score jobs on a store with slot scores stay on the exact
// path (attention.cu), which also runs the decode jobs (prefill_takes() in kernels.h is the one rule).
//
// Block: 256 threads (8 warps), one job, BM = 128 "M rows" = (query row, query head of the group) pairs,
// m = r * G + h (RB = BM / G query rows per block; the group's heads share every K/V tile). Warp w owns M rows
// [16w, 16w + 16) and keeps its Q fragments (F32 q * scale * log2 e, rounded to F16, or BF16 for BF16 KV) in
// registers for the whole walk. The job's slots (its page list, page_size slots a page, in order) are walked
// in tiles of BN = 64 slots:
//   * positions: thread i < BN owns slot i of a tile; its page id is fetched two tiles ahead and its position
//     one tile ahead (registers), so the block's vote on a tile (__syncthreads_or / _and: may any row of the
//     block attend a slot of it, do all rows attend every slot) has no load latency in it. A tile nobody may
//     attend (causal: the later pages of a chunk; window; empty pages) is neither loaded nor computed; a tile
//     every row attends in full skips the per-element mask;
//   * K/V: cp.async (16 bytes, zero-filled for empty slots, so NaN garbage never reaches P V) into a
//     double-buffered, XOR-swizzled shared tile [BN][D]; F32 and Q8_0 rows (and host-tier rows, read in place
//     from mapped memory) are loaded, converted to F16 and stored by the threads instead;
//   * S = Q K^T (ldmatrix of K rows), the job's rule per element from the slot positions (masked scores are
//     -inf: a select, so garbage scores vanish), online softmax in F32 base 2, P rounded to F16/BF16 in
//     registers as the A operand, O += P V (ldmatrix.trans of V rows), F32 accumulators.
// A row with no allowed slot gets zeros. No atomics: the result is deterministic (fixed order per job).
// Heavy blocks first: block x = tile_rev * n_jobs + job, and a job's tile_rev 0 is its last (longest causal) tile.
#include <algorithm>
#include <climits>
#include <cstdlib>

#include "backend/cuda/common.cuh"

namespace headroom::cuda {

namespace {

// NW warps a block, 16 M rows a warp: 8 (one block an SM for head_dim 128). 4 warps (2 blocks an SM) measured
// 4-37% slower on the H200 (docs/cuda.md).
constexpr int kPfWarps = 8;
constexpr int kBN = 64;             // slots per KV tile
constexpr float kPfLog2e = 1.4426950408889634f;

__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, bool valid) {
  const int n = valid ? 16 : 0;  // 0: the 16 bytes are zero-filled, nothing is read
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(n) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}
__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldsm_x4_t(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
template <bool BF>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  if constexpr (BF) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  } else {
    const __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  }
}
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}
// qp - window, saturated (window > 0); INT_MIN without a window.
__device__ __forceinline__ int32_t win_lo(int32_t qp, int32_t window) {
  if (window == 0) return INT_MIN;
  const int64_t v = int64_t(qp) - int64_t(window);
  return v < INT_MIN ? INT_MIN : int32_t(v);
}
// Allowed: ps >= 0 && ps <= qp && (ps < sinks || ps > lo), lo = win_lo(qp, window).
__device__ __forceinline__ bool pf_allowed(int32_t ps, int32_t qp, int32_t lo, int32_t sinks) {
  return ps >= 0 && ps <= qp && (ps < sinks || ps > lo);
}

// Byte offset of 16-byte chunk `ch` of tile row `row` (rows of D halves, chunks XOR-swizzled by row % 8).
template <int D>
__device__ __forceinline__ uint32_t swz(int row, int ch) {
  return uint32_t(row * (D * 2) + ((ch ^ (row & 7)) << 4));
}

template <int D>
constexpr size_t pf_smem() {
  return size_t(2) * 2 * kBN * D * 2   // K, V: 2 buffers of [kBN][D] halves
         + size_t(2) * kBN * 4         // positions
         + size_t(2) * 2 * kBN * 8;    // K, V row pointers (low bit: host tier)
}

// Ranges (of split_tiles KV tiles) a job of n_kt tiles is cut into: 1 without splitting.
__host__ __device__ inline int pf_job_splits(int n_kt, int n_splits, int split_tiles) {
  if (n_splits <= 1) return 1;
  return n_kt <= split_tiles ? 1 : (n_kt + split_tiles - 1) / split_tiles;
}

// Split-KV (long contexts): a job's KV tiles are cut into ranges of `split_tiles`; block (tile, split, job)
// walks one range and, when the job has several, writes its unnormalized O and (max, sum) to the split scratch
// for pf_merge_kernel. n_splits == 1: one range per job, the output written directly.
struct PfSplit {
  int n_splits = 1;
  int split_tiles = INT_MAX;
  float* part = nullptr;  // [split][pair][D]
  float* ml = nullptr;    // [split][pair][2]: max (base 2, scaled), sum
};

template <int T, int D, int NW>
__global__ void __launch_bounds__(NW * 32, (D == 64 || NW == 4) ? 2 : 1)
    attn_prefill_kernel(KVDev kv, AttnBatch b, AttnScratch scr, int hq, int n_tiles, PfSplit sp, uint32_t* err) {
  constexpr int kPfThreads = NW * 32, kBM = 16 * NW;
  constexpr bool BF = T == kKVBF16;
  constexpr int CH = D / 8;  // 16-byte chunks per tile row
  constexpr int KS = D / 16; // k-steps of Q K^T
  constexpr int NT = kBN / 8;
  constexpr int DT = D / 8;
  const int job_i = int(blockIdx.x % unsigned(b.n_jobs));
  const int split = int(blockIdx.x / unsigned(b.n_jobs) % unsigned(sp.n_splits));
  const int tile_rev = int(blockIdx.x / unsigned(b.n_jobs) / unsigned(sp.n_splits));
  const AttnJob job = b.jobs[job_i];
  const bool has_scores = kv.sc[0] != nullptr || kv.sc[1] != nullptr;
  if (!prefill_takes(job, has_scores)) return;
  const int G = b.n_group, P = kv.page_size;
  const int RB = kBM / G;
  const int job_tiles = (job.n_rows + RB - 1) / RB;
  const int64_t n_slots = int64_t(job.n_pages) * P;
  const int n_kt = int((n_slots + kBN - 1) / kBN);
  const int n_js = pf_job_splits(n_kt, sp.n_splits, sp.split_tiles);  // this job's ranges
  if (job.row0 < 0 || job.page0 < 0 || job.n_pages < 0 || job.kv_head < 0 || job_tiles > n_tiles ||
      n_js > sp.n_splits) {
    if (threadIdx.x == 0 && tile_rev == 0 && split == 0) atomicOr(err, kErrAttnShape);
    return;
  }
  const int tile = job_tiles - 1 - tile_rev;
  if (tile < 0 || split >= n_js) return;
  const int r0 = tile * RB;                       // first row of the job in this block
  const int nr = min(RB, job.n_rows - r0);        // rows in this block
  const int t_begin = n_js == 1 ? 0 : split * sp.split_tiles;  // this block's KV tiles [t_begin, t_end)
  const int t_end = n_js == 1 ? n_kt : min(n_kt, t_begin + sp.split_tiles);

  extern __shared__ __align__(128) uint8_t smem[];
  uint8_t* sK = smem;                                   // [2][kBN][D] halves
  uint8_t* sV = sK + 2 * kBN * D * 2;                   // [2][kBN][D]
  int32_t* sPos = reinterpret_cast<int32_t*>(sV + 2 * kBN * D * 2);  // [2][kBN]
  const uint8_t** sKp = reinterpret_cast<const uint8_t**>(sPos + 2 * kBN);  // [2][kBN]
  const uint8_t** sVp = sKp + 2 * kBN;                  // [2][kBN]
  __shared__ int32_t sQmin, sQmax;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, c4 = lane & 3;

  // ---- the block's rows: positions (min/max for the tile votes) and Q fragments ----
  if (tid == 0) sQmin = INT_MAX, sQmax = INT_MIN;
  __syncthreads();
  if (tid < nr) {
    const int32_t qp = b.q_pos[job.row0 + r0 + tid];
    atomicMin(&sQmin, qp);
    atomicMax(&sQmax, qp);
  }
  __syncthreads();
  const int32_t qmin = sQmin, qmax = sQmax;
  const int32_t sinks = job.sinks, window = job.window;

  int32_t qp[2], lo[2];
  bool mvalid[2];
  int orow[2], ohead[2];
  const float qs = b.scale * kPfLog2e;
  uint32_t qf[KS][4];
#pragma unroll
  for (int h2 = 0; h2 < 2; ++h2) {
    const int m = warp * 16 + g + 8 * h2;
    const int rl = m / G, hh = m % G;
    mvalid[h2] = m < RB * G && rl < nr;
    orow[h2] = job.row0 + r0 + (mvalid[h2] ? rl : 0);
    ohead[h2] = job.kv_head * G + hh;
    qp[h2] = mvalid[h2] ? b.q_pos[orow[h2]] : qmax;
    lo[h2] = win_lo(qp[h2], window);
  }
#pragma unroll
  for (int ks = 0; ks < KS; ++ks)
#pragma unroll
    for (int h2 = 0; h2 < 2; ++h2)
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        float2 v = make_float2(0.0f, 0.0f);
        if (mvalid[h2])
          v = *reinterpret_cast<const float2*>(b.q + int64_t(orow[h2]) * b.q_stride + int64_t(ohead[h2]) * D +
                                               ks * 16 + half * 8 + 2 * c4);
        qf[ks][h2 + 2 * half] = pack2<BF>(v.x * qs, v.y * qs);
      }

  // ---- slot positions: page id two tiles ahead, position one tile ahead (thread tid < kBN owns slot tid) ----
  const int32_t qlo_max = win_lo(qmax, window), qlo_min = win_lo(qmin, window);
  auto fetch_id = [&](int t) -> int32_t {  // -1 past the job's slots (publish tells a bad id from that)
    const int64_t gi = int64_t(t) * kBN + tid;
    if (tid >= kBN || t >= t_end || gi >= n_slots) return -1;
    return b.page_ids[job.page0 + int(gi / P)];
  };
  auto fetch_pos = [&](int t, int32_t id) -> int32_t {
    if (id < 0 || id >= kv.total_pages) return -1;
    const int64_t gi = int64_t(t) * kBN + tid;
    const bool host = id >= kv.dev_pages;
    return (host ? kv.pos[1] : kv.pos[0])[int64_t(host ? id - kv.dev_pages : id) * P + int(gi % P)];
  };
  // Publishes tile t's positions and row pointers (buffer t & 1); returns the block's votes.
  auto publish = [&](int t, int32_t id, int32_t ps, bool& need, bool& full) {
    bool maybe = false, all = true;
    if (tid < kBN) {
      const bool in_job = t < t_end && int64_t(t) * kBN + tid < n_slots;
      if (!in_job || id < 0 || id >= kv.total_pages) {
        if (in_job) atomicOr(err, kErrAttnPage);
        ps = -1;
      }
      const int buf = t & 1;
      sPos[buf * kBN + tid] = ps;
      const uint8_t* kp = nullptr;
      const uint8_t* vp = nullptr;
      if (ps >= 0) {  // (selects, not a run-time index into the parameter arrays: no stack frame)
        const int sl = int((int64_t(t) * kBN + tid) % P);
        const bool host = id >= kv.dev_pages;
        const int64_t off = (int64_t(host ? id - kv.dev_pages : id) * P + sl) * int64_t(kv.rb);
        kp = reinterpret_cast<const uint8_t*>(reinterpret_cast<uintptr_t>((host ? kv.k[1] : kv.k[0]) + off) | host);
        vp = reinterpret_cast<const uint8_t*>(reinterpret_cast<uintptr_t>((host ? kv.v[1] : kv.v[0]) + off) | host);
      }
      sKp[buf * kBN + tid] = kp;
      sVp[buf * kBN + tid] = vp;
      maybe = ps >= 0 && ps <= qmax && (ps < sinks || ps > qlo_min);
      all = ps >= 0 && ps <= qmin && (ps < sinks || ps > qlo_max);
    }
    need = __syncthreads_or(maybe) != 0;
    full = __syncthreads_and(all) != 0;
  };
  // Issues tile t's K/V rows into buffer t & 1 (after publish(t)).
  auto load_tile = [&](int t) {
    const int buf = t & 1;
    uint8_t* dk = sK + buf * kBN * D * 2;
    uint8_t* dv = sV + buf * kBN * D * 2;
#pragma unroll
    for (int it = 0; it < kBN * CH / kPfThreads; ++it) {
      const int idx = tid + it * kPfThreads;
      const int row = idx / CH, ch = idx % CH;
      const uintptr_t kp = reinterpret_cast<uintptr_t>(sKp[buf * kBN + row]);
      const uintptr_t vp = reinterpret_cast<uintptr_t>(sVp[buf * kBN + row]);
      const uint32_t off = swz<D>(row, ch);
      if constexpr (T == kKVF16 || T == kKVBF16) {
        if (!(kp & 1)) {
          cp_async16(smem_addr(dk + off), kp ? reinterpret_cast<const void*>(kp + ch * 16) : b.page_ids, kp != 0);
          cp_async16(smem_addr(dv + off), vp ? reinterpret_cast<const void*>(vp + ch * 16) : b.page_ids, vp != 0);
        } else {  // host tier: plain loads from mapped memory
          *reinterpret_cast<uint4*>(dk + off) = *reinterpret_cast<const uint4*>((kp & ~uintptr_t(1)) + ch * 16);
          *reinterpret_cast<uint4*>(dv + off) = *reinterpret_cast<const uint4*>((vp & ~uintptr_t(1)) + ch * 16);
        }
      } else {  // F32 / Q8_0: exact to float, rounded to F16
        uint4 wk = make_uint4(0, 0, 0, 0), wv = make_uint4(0, 0, 0, 0);
        if (kp) {
          float f[8];
          kv_load8<T>(reinterpret_cast<const uint8_t*>(kp & ~uintptr_t(1)), ch * 8, f);
          wk = make_uint4(pack2<false>(f[0], f[1]), pack2<false>(f[2], f[3]), pack2<false>(f[4], f[5]),
                          pack2<false>(f[6], f[7]));
          kv_load8<T>(reinterpret_cast<const uint8_t*>(vp & ~uintptr_t(1)), ch * 8, f);
          wv = make_uint4(pack2<false>(f[0], f[1]), pack2<false>(f[2], f[3]), pack2<false>(f[4], f[5]),
                          pack2<false>(f[6], f[7]));
        }
        *reinterpret_cast<uint4*>(dk + off) = wk;
        *reinterpret_cast<uint4*>(dv + off) = wv;
      }
    }
  };

  float o[DT][4];
#pragma unroll
  for (int i = 0; i < DT; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.0f;
  float mrow[2] = {-INFINITY, -INFINITY}, lrow[2] = {0.0f, 0.0f};

  // Prologue: the first tile published and issued; the second's position and the third's page id in flight.
  bool need_cur = false, full_cur = false;
  {
    const int32_t id0 = fetch_id(t_begin);
    publish(t_begin, id0, fetch_pos(t_begin, id0), need_cur, full_cur);
    if (need_cur) load_tile(t_begin);
    cp_async_commit();
  }
  int32_t id1 = fetch_id(t_begin + 1);
  int32_t pos1 = fetch_pos(t_begin + 1, id1);
  int32_t id2 = fetch_id(t_begin + 2);

  for (int t = t_begin; t < t_end; ++t) {
    bool need_nxt = false, full_nxt = false;
    if (t + 1 < t_end) {
      publish(t + 1, id1, pos1, need_nxt, full_nxt);
      if (need_nxt) load_tile(t + 1);
    }
    cp_async_commit();
    id1 = id2;
    pos1 = fetch_pos(t + 2, id1);
    id2 = fetch_id(t + 3);
    cp_async_wait<1>();
    __syncthreads();
    if (need_cur) {
      const int buf = t & 1;
      const uint32_t kb = smem_addr(sK + buf * kBN * D * 2), vb = smem_addr(sV + buf * kBN * D * 2);
      float s[NT][4];
#pragma unroll
      for (int j = 0; j < NT; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.0f;
#pragma unroll
      for (int ks = 0; ks < KS; ks += 2)
#pragma unroll
        for (int j = 0; j < NT; ++j) {
          uint32_t r[4];
          ldsm_x4(r, kb + swz<D>(8 * j + (lane & 7), 2 * ks + (lane >> 3)));
          mma16816<BF>(s[j], qf[ks], r[0], r[1]);
          mma16816<BF>(s[j], qf[ks + 1], r[2], r[3]);
        }
      if (!full_cur) {
        const int32_t* pp = sPos + buf * kBN;
#pragma unroll
        for (int j = 0; j < NT; ++j) {
          const int2 ps = *reinterpret_cast<const int2*>(pp + 8 * j + 2 * c4);
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int h2 = e >> 1;
            const int32_t p = (e & 1) ? ps.y : ps.x;
            if (!pf_allowed(p, qp[h2], lo[h2], sinks)) s[j][e] = -INFINITY;
          }
        }
      }
      // Online softmax (base 2), rows g and g + 8 of the warp.
#pragma unroll
      for (int h2 = 0; h2 < 2; ++h2) {
        float mx = -INFINITY;
#pragma unroll
        for (int j = 0; j < NT; ++j) mx = fmaxf(mx, fmaxf(s[j][2 * h2], s[j][2 * h2 + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xFFFFFFFFu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xFFFFFFFFu, mx, 2));
        const float mnew = fmaxf(mrow[h2], mx);
        const float muse = mnew == -INFINITY ? 0.0f : mnew;
        const float alpha = fast_exp2(mrow[h2] - muse);
        mrow[h2] = mnew;
        float sum = 0.0f;
#pragma unroll
        for (int j = 0; j < NT; ++j) {
          s[j][2 * h2] = fast_exp2(s[j][2 * h2] - muse);
          s[j][2 * h2 + 1] = fast_exp2(s[j][2 * h2 + 1] - muse);
          sum += s[j][2 * h2] + s[j][2 * h2 + 1];
        }
        lrow[h2] = lrow[h2] * alpha + sum;
#pragma unroll
        for (int i = 0; i < DT; ++i) o[i][2 * h2] *= alpha, o[i][2 * h2 + 1] *= alpha;
      }
      // O += P V.
#pragma unroll
      for (int kk = 0; kk < kBN / 16; ++kk) {
        uint32_t a[4];
        a[0] = pack2<BF>(s[2 * kk][0], s[2 * kk][1]);
        a[1] = pack2<BF>(s[2 * kk][2], s[2 * kk][3]);
        a[2] = pack2<BF>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
        a[3] = pack2<BF>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
        for (int dp = 0; dp < DT; dp += 2) {
          uint32_t r[4];
          ldsm_x4_t(r, vb + swz<D>(16 * kk + (lane & 7) + ((lane >> 3) & 1) * 8, dp + (lane >> 4)));
          mma16816<BF>(o[dp], a, r[0], r[1]);
          mma16816<BF>(o[dp + 1], a, r[2], r[3]);
        }
      }
    }
    need_cur = need_nxt;
    full_cur = full_nxt;
    __syncthreads();  // buffer t & 1 is free for tile t + 2
  }
  cp_async_wait<0>();

  // ---- epilogue: O / l (zeros for a row without an allowed slot) ----
#pragma unroll
  for (int h2 = 0; h2 < 2; ++h2) {
    float l = lrow[h2];
    l += __shfl_xor_sync(0xFFFFFFFFu, l, 1);
    l += __shfl_xor_sync(0xFFFFFFFFu, l, 2);
    if (!mvalid[h2]) continue;
    const int64_t mi = int64_t(orow[h2]) * hq + ohead[h2];
    if (mi >= scr.ml_pairs) {
      if (c4 == 0) atomicOr(err, kErrAttnScratch);
      continue;
    }
    if (n_js > 1) {  // one range of several: unnormalized O and (max, sum) for pf_merge_kernel
      const int64_t si = int64_t(split) * scr.ml_pairs + mi;
      float* pp = sp.part + si * D + 2 * c4;
#pragma unroll
      for (int i = 0; i < DT; ++i) *reinterpret_cast<float2*>(pp + 8 * i) = make_float2(o[i][2 * h2], o[i][2 * h2 + 1]);
      if (c4 == 0) *reinterpret_cast<float2*>(sp.ml + si * 2) = make_float2(mrow[h2], l);
      continue;
    }
    const float inv = l > 0.0f ? 1.0f / l : 0.0f;
    float* op = b.out + int64_t(orow[h2]) * b.out_stride + int64_t(ohead[h2]) * D + 2 * c4;
#pragma unroll
    for (int i = 0; i < DT; ++i)
      *reinterpret_cast<float2*>(op + 8 * i) = make_float2(o[i][2 * h2] * inv, o[i][2 * h2 + 1] * inv);
  }
}

// Merges the ranges of the split jobs: block (job, row), threads over (head of the group, dim). In range order,
// so deterministic: O = sum_s 2^(m_s - M) O_s / sum_s 2^(m_s - M) l_s, zeros where no range had a slot.
__global__ void pf_merge_kernel(AttnBatch b, AttnScratch scr, int hq, int page_size, PfSplit sp, int has_scores) {
  const AttnJob job = b.jobs[blockIdx.x % unsigned(b.n_jobs)];
  const int r = int(blockIdx.x / unsigned(b.n_jobs));
  if (!prefill_takes(job, has_scores != 0) || r >= job.n_rows || job.n_pages < 0) return;
  const int64_t n_kt = (int64_t(job.n_pages) * page_size + kBN - 1) / kBN;
  const int n_js = pf_job_splits(int(n_kt), sp.n_splits, sp.split_tiles);
  if (n_js <= 1 || n_js > sp.n_splits) return;
  const int D = b.head_dim, G = b.n_group;
  const int orow = job.row0 + r;
  for (int idx = threadIdx.x; idx < G * D; idx += blockDim.x) {
    const int hh = idx / D, d = idx % D;
    const int ohead = job.kv_head * G + hh;
    const int64_t mi = int64_t(orow) * hq + ohead;
    if (mi >= scr.ml_pairs) return;  // (the kernel flagged it)
    float M = -INFINITY;
    for (int s = 0; s < n_js; ++s) M = fmaxf(M, sp.ml[(int64_t(s) * scr.ml_pairs + mi) * 2]);
    float L = 0.0f, O = 0.0f;
    if (M != -INFINITY)
      for (int s = 0; s < n_js; ++s) {
        const int64_t si = int64_t(s) * scr.ml_pairs + mi;
        const float m = sp.ml[si * 2];
        if (m == -INFINITY) continue;
        const float w = exp2f(m - M);
        L += w * sp.ml[si * 2 + 1];
        O += w * sp.part[si * D + d];
      }
    b.out[int64_t(orow) * b.out_stride + int64_t(ohead) * D + d] = L > 0.0f ? O / L : 0.0f;
  }
}

// Tiles a split range holds at least (shorter jobs are not split), and the most ranges.
constexpr int kPfSplitMinTiles = 256;  // 16k slots
constexpr int kPfMaxSplits = 8;
constexpr int64_t kPfSplitMaxBytes = int64_t(512) << 20;  // scratch cap

// The split plan from the batch's host-known shape (max_pages): longer jobs are cut into up to 8 ranges so that
// a chunk over a long context fills the GPU even when a few heads (a head map's full ones) hold all the pages.
// HEADROOM_CUDA_PF_SPLIT=0 turns it off; =N (N > 0) forces ranges of N tiles (tests; at most 64 ranges).
PfSplit pf_plan(const KVDev& kv, const AttnBatch& b, int64_t pairs) {
  PfSplit sp;
  const char* env = std::getenv("HEADROOM_CUDA_PF_SPLIT");  // (read per call: the tests set it)
  const int forced = env && *env ? std::atoi(env) : -1;
  if (forced == 0 || b.max_pages <= 0 || pairs <= 0) return sp;
  const int64_t max_kt = (int64_t(b.max_pages) * kv.page_size + kBN - 1) / kBN;
  int64_t S = forced > 0 ? (max_kt + forced - 1) / forced : std::min<int64_t>(kPfMaxSplits, max_kt / kPfSplitMinTiles);
  S = std::min<int64_t>(S, forced > 0 ? 64 : kPfMaxSplits);
  while (S > 1 && S * pairs * (b.head_dim + 2) * 4 > kPfSplitMaxBytes) --S;
  if (S <= 1) return sp;
  sp.n_splits = int(S);
  sp.split_tiles = int((max_kt + S - 1) / S);
  if (forced > 0) sp.split_tiles = std::max(sp.split_tiles, forced);
  return sp;
}

template <int T, int D, int NW>
cudaError_t run_prefill(const KVDev& kv, const AttnBatch& b, const AttnScratch& scr, int hq, uint32_t* err,
                        cudaStream_t s) {
  constexpr size_t smem = pf_smem<D>();
  static PerDeviceOnce attr;
  if (const int dev = current_device(); attr.needed(dev)) {
    cudaError_t e = cudaFuncSetAttribute(attn_prefill_kernel<T, D, NW>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
    if (e != cudaSuccess) return e;
    attr.done(dev);
  }
  const int RB = 16 * NW / b.n_group;
  const int n_tiles = (b.max_rows + RB - 1) / RB;
  PfSplit sp = pf_plan(kv, b, scr.ml_pairs);
  if (sp.n_splits > 1) {
    if (!scr.pf_part || scr.pf_splits < sp.n_splits) return cudaErrorInvalidValue;  // the host sized less
    sp.part = scr.pf_part;
    sp.ml = scr.pf_part + int64_t(sp.n_splits) * scr.ml_pairs * D;
  }
  const int64_t blocks = int64_t(n_tiles) * b.n_jobs * sp.n_splits;
  if (blocks <= 0) return cudaSuccess;
  if (blocks > INT32_MAX) return cudaErrorInvalidConfiguration;
  attn_prefill_kernel<T, D, NW><<<unsigned(blocks), NW * 32, smem, s>>>(kv, b, scr, hq, n_tiles, sp, err);
  if (cudaError_t e = cudaGetLastError(); e != cudaSuccess || sp.n_splits == 1) return e;
  const int64_t mblocks = int64_t(b.n_jobs) * b.max_rows;
  if (mblocks > INT32_MAX) return cudaErrorInvalidConfiguration;
  const int threads = std::min(1024, (b.n_group * D + 31) / 32 * 32);
  pf_merge_kernel<<<unsigned(mblocks), threads, 0, s>>>(b, scr, hq, kv.page_size, sp, kv.sc[0] || kv.sc[1] ? 1 : 0);
  return cudaGetLastError();
}

template <int D, int NW>
cudaError_t run_prefill_d(const KVDev& kv, const AttnBatch& b, const AttnScratch& scr, int hq, uint32_t* err,
                          cudaStream_t s) {
  switch (kv.type) {
    case kKVF32: return run_prefill<kKVF32, D, NW>(kv, b, scr, hq, err, s);
    case kKVF16: return run_prefill<kKVF16, D, NW>(kv, b, scr, hq, err, s);
    case kKVBF16: return run_prefill<kKVBF16, D, NW>(kv, b, scr, hq, err, s);
    default: return run_prefill<kKVQ8, D, NW>(kv, b, scr, hq, err, s);
  }
}


}  // namespace

PrefillSplitScratch prefill_split_scratch(const KVDev& kv, const AttnBatch& b, int64_t pairs) {
  PrefillSplitScratch r;
  if (!prefill_attention_fits(kv, b)) return r;
  r.splits = pf_plan(kv, b, pairs).n_splits;
  r.floats = r.splits > 1 ? size_t(r.splits) * size_t(pairs) * size_t(b.head_dim + 2) : 0;
  return r;
}

bool prefill_attention_fits(const KVDev& kv, const AttnBatch& b) {
  (void)kv;
  return b.max_rows >= kAttnSplitMaxRows && (b.head_dim == 64 || b.head_dim == 128) && b.n_group >= 1 &&
         b.n_group <= 16 * kPfWarps && b.n_jobs > 0;
}

cudaError_t launch_prefill_attention(const KVDev& kv, const AttnBatch& b, const AttnScratch& scr, uint32_t* err,
                                     cudaStream_t s) {
  const int hq = int(b.out_stride / b.head_dim);
  return b.head_dim == 64 ? run_prefill_d<64, kPfWarps>(kv, b, scr, hq, err, s)
                           : run_prefill_d<128, kPfWarps>(kv, b, scr, hq, err, s);
}

}  // namespace headroom::cuda
