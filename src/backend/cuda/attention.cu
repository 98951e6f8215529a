// CUDA backend: paged attention (flash-decoding for decode jobs) over the KV store, and evict's score pass.
//
// Grid (n_jobs, kAttnSplits = 64), 256 threads (8 warps). A block reads the job from the device job table (so
// select_pages may have rewritten it; the host never reads it back).
//   * Decode jobs (n_rows < kAttnSplitMaxRows): block (job, s) takes the job's pages
//     [s * pps, (s + 1) * pps), pps = ceil(n_pages / kAttnSplits), for every (row, head) pair of the job, and
//     writes a partial (max, sum, acc[head_dim]) per pair; a merge kernel combines the kAttnSplits partials
//     of a pair in split order.
//   * Other jobs (prefill): block (job, s) takes the passes s, s + kAttnSplits, ... over all pages and
//     writes the outputs itself.
// Within a block, lanes form groups of SUB lanes and a group owns one slot at a time; each lane holds a
// fixed slice of head_dim. Fast path (head_dim 64/128/256): SUB = head_dim / 8, so every lane holds 8
// contiguous values (one 16-byte load of F16/BF16); warps take the block's pages in turn, read a page's
// positions once per 32 slots, and each group takes every (32 / SUB)-th slot kSlotsAhead at a time,
// loading their K/V rows (packed) before using the first. Other head_dims: SUB = 32, one value per lane per chunk,
// slots in turn. A pass covers kNP = 4 (row, head) pairs: with GQA the pairs are the query heads of the KV
// head, so one read of a K/V row serves every query head of the group (4 of them for Llama-3 8B/1B). Per
// pair a group keeps an online softmax state (running max m, sum l, acc); the NG group states are merged in
// group order through shared memory. KV rows are read in their stored type (F32, F16, BF16, Q8_0) and
// converted
// exactly in registers; host-tier pages are read in place from mapped pinned memory.
//
// Batch invariance: every reduction order (the lane slice sums, the group butterfly, the group merge, the
// split merge) and the split boundaries depend only on the job itself (its pages, rows, head_dim), never
// on the number of jobs or rows in the call. A decode row's result therefore does not depend on the batch.
// A job with >= kAttnSplitMaxRows rows takes the unsplit path, so its rows differ (by rounding) from the same
// row computed as a decode job; as on the CPU.
//
// Score pass (jobs with `score`, stores with slot scores): block (job, s) takes split s's slots, recomputes
// each allowed (row, head) score with the same code as pass 1 (the same bits), and adds
// sum over pairs of 2^(s - M) / L (scores in log2 units, s = q.k * scale * log2(e); M, L: the pair's final
// max and sum, written by pass 1 or the merge) to
// the slot's score; one group owns a slot, so the sum has a fixed order and needs no atomics.
#include <climits>

#include "backend/cuda/common.cuh"

namespace headroom::cuda {

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kNP = 4;
constexpr int kSlotsAhead = 4;
constexpr float kLog2e = 1.4426950408889634f;  // slots per group whose K/V rows are loaded before the first is used

__device__ __forceinline__ bool slot_allowed(int32_t ps, int32_t qp, int32_t sinks, int32_t window) {
  if (ps < 0 || ps > qp) return false;
  return window == 0 || ps < sinks || int64_t(ps) > int64_t(qp) - int64_t(window);
}

template <int SUB>
__device__ __forceinline__ unsigned group_mask() {
  if constexpr (SUB == 32) {
    return 0xFFFFFFFFu;
  } else {
    const int lane = threadIdx.x & 31;
    return ((1u << SUB) - 1u) << (lane & ~(SUB - 1));
  }
}

template <int SUB>
__device__ __forceinline__ float group_sum(float v, unsigned mask) {
#pragma unroll
  for (int o = SUB / 2; o > 0; o >>= 1) v += __shfl_xor_sync(mask, v, o);
  return v;
}

// The lane's elements of a stored row: element e = c * W + w is dimension (tig + SUB * c) * W + w.
template <int T, int SUB, int W, int CH>
__device__ __forceinline__ void load_row(const uint8_t* row, int tig, int D, float* o) {
#pragma unroll
  for (int c = 0; c < CH; ++c) {
    const int d0 = (tig + SUB * c) * W;
    if constexpr (W == 8) {
      kv_load8<T>(row, d0, o + c * 8);
    } else {
      o[c] = d0 < D ? kv_elem<T>(row, d0) : 0.0f;
    }
  }
}

// Raw 8-element chunks (kept packed in registers until used): F32 8 words, F16/BF16 4, Q8_0 8 bytes + scale.
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

template <int SUB, int W, int CH>
__device__ __forceinline__ int lane_dim(int tig, int e) {
  return (tig + SUB * (e / W)) * W + e % W;
}

// q . k over the lane's elements (q: head_dim floats), in element order, then the group butterfly.
template <int SUB, int W, int CH>
__device__ __forceinline__ float group_dot(const float* q, const float* kf, int tig, int D, unsigned mask) {
  float part = 0.0f;
#pragma unroll
  for (int e = 0; e < W * CH; ++e) {
    const int d = lane_dim<SUB, W, CH>(tig, e);
    if (W == 8 || d < D) part = fmaf(q[d], kf[e], part);
  }
  return group_sum<SUB>(part, mask);
}

struct JobRange {
  int pg_lo, pg_hi;  // pages [pg_lo, pg_hi) of the job
};
__device__ __forceinline__ JobRange split_range(const AttnJob& j, int s) {
  const int pps = (j.n_pages + kAttnSplits - 1) / kAttnSplits;
  const int lo = min(j.n_pages, s * pps);
  return {lo, min(j.n_pages, lo + pps)};
}

template <int T, int SUB, int W, int CH>
__global__ void __launch_bounds__(kThreads, 2) attn_kernel(KVDev kv, AttnBatch b, AttnScratch scr, int hq, uint32_t* err) {
  constexpr int EPL = W * CH, GPW = 32 / SUB, NG = kWarps * GPW;
  const AttnJob job = b.jobs[blockIdx.x];
  if (job.n_rows <= 0) return;
  if (scr.prefill_taken && prefill_takes(job, kv.sc[0] || kv.sc[1])) return;  // attention_prefill.cu ran it
  const int G = b.n_group, D = b.head_dim, P = kv.page_size;
  if (job.row0 < 0 || job.page0 < 0 || job.n_pages < 0 || job.kv_head < 0 || G <= 0) {
    if (threadIdx.x == 0 && blockIdx.y == 0) atomicOr(err, kErrAttnShape);
    return;
  }
  const bool split = job.n_rows < kAttnSplitMaxRows;
  const int npairs = job.n_rows * G;
  const int n_passes = (npairs + kNP - 1) / kNP;
  JobRange rg{0, job.n_pages};
  int pass_lo = 0, pass_step = 1;
  if (split) {
    rg = split_range(job, blockIdx.y);
  } else {
    pass_lo = blockIdx.y;
    pass_step = kAttnSplits;
  }
  const int nslots = (rg.pg_hi - rg.pg_lo) * P;

  extern __shared__ float smem[];
  float* sQ = smem;             // [kNP][D]
  float* sM = sQ + kNP * D;     // [NG][kNP]
  float* sL = sM + NG * kNP;    // [NG][kNP]
  float* sA = sL + NG * kNP;    // [NG][kNP][D]
  const int lane = threadIdx.x & 31, warp = threadIdx.x / 32;
  const int tig = lane % SUB, grp = warp * GPW + lane / SUB;
  const unsigned gmask = group_mask<SUB>();
  __shared__ int32_t spos[kWarps][32];
  __shared__ float sF[NG * kNP];
  __shared__ float sMLk[2 * kNP];
  const float sc2 = b.scale * kLog2e;  // scores in log2 units: p = 2^(s - m)

  for (int pass = pass_lo; pass < n_passes; pass += pass_step) {
    int prow[kNP], phead[kNP];
    int32_t qp[kNP];
    bool pv[kNP];
#pragma unroll
    for (int k = 0; k < kNP; ++k) {
      const int p = pass * kNP + k;
      pv[k] = p < npairs;
      prow[k] = job.row0 + (pv[k] ? p / G : 0);
      phead[k] = job.kv_head * G + (pv[k] ? p % G : 0);
      qp[k] = pv[k] ? b.q_pos[prow[k]] : INT_MIN;
    }
    __syncthreads();  // the previous pass is done with shared memory
    for (int i = threadIdx.x; i < kNP * D; i += kThreads) {
      const int k = i / D, d = i % D;
      int row = 0, head = 0;
      bool ok = false;
#pragma unroll
      for (int kk = 0; kk < kNP; ++kk)
        if (kk == k) row = prow[kk], head = phead[kk], ok = pv[kk];
      sQ[i] = ok ? b.q[int64_t(row) * b.q_stride + int64_t(head) * D + d] : 0.0f;
    }
    __syncthreads();

    float m[kNP], l[kNP], acc[kNP][EPL];
#pragma unroll
    for (int k = 0; k < kNP; ++k) {
      m[k] = -INFINITY;
      l[k] = 0.0f;
#pragma unroll
      for (int e = 0; e < EPL; ++e) acc[k][e] = 0.0f;
    }
    // One online-softmax step of the group for a slot whose K and V rows are kf / vf.
    auto step = [&](const float* kf, const float* vf, const bool* al) {
#pragma unroll
      for (int k = 0; k < kNP; ++k) {
        const float dot = group_dot<SUB, W, CH>(sQ + k * D, kf, tig, D, gmask);
        if (!al[k]) continue;
        const float s = __fmul_rn(dot, sc2);  // rounded (never contracted into the exp2 argument)
        if (s > m[k]) {
          const float f = exp2f(m[k] - s);
          l[k] *= f;
#pragma unroll
          for (int e = 0; e < EPL; ++e) acc[k][e] *= f;
          m[k] = s;
        }
        const float p = exp2f(s - m[k]);
        l[k] += p;
#pragma unroll
        for (int e = 0; e < EPL; ++e) acc[k][e] = fmaf(p, vf[e], acc[k][e]);
      }
    };
    if constexpr (W == 8) {
      // Warps take the block's pages in turn; a page's positions are read once per 32 slots (one load per
      // lane, through shared memory), and each group takes every GPW-th slot of the chunk, two slots at a
      // time whose K/V rows are loaded (packed) before either is used.
      constexpr int NW = RawWords<T>::N;
      const int gw = lane / SUB;
      // The next page's id and first 32 positions are fetched while this page's rows are in flight.
      auto page_id = [&](int pg) -> int32_t {
        if (pg >= rg.pg_hi) return -1;
        const int32_t id = b.page_ids[job.page0 + pg];
        return (id >= 0 && id < kv.total_pages) ? id : -2;
      };
      auto first_pos = [&](int32_t id) -> int32_t {
        return (id >= 0 && lane < min(32, P)) ? kv_pos(kv, id)[lane] : -1;
      };
      int32_t next_id = page_id(rg.pg_lo + warp);
      int32_t next_pos = first_pos(next_id);
      for (int pg = rg.pg_lo + warp; pg < rg.pg_hi; pg += kWarps) {
        const int32_t id = next_id;
        const int32_t pos0 = next_pos;
        next_id = page_id(pg + kWarps);
        if (id == -2) {
          if (lane == 0) atomicOr(err, kErrAttnPage);
          next_pos = first_pos(next_id);
          continue;
        }
        const int32_t* ppos = kv_pos(kv, id);
        const uint8_t* krow0 = kv_krow(kv, id, 0);
        const uint8_t* vrow0 = kv_vrow(kv, id, 0);
        bool fetched = false;
        for (int c0 = 0; c0 < P; c0 += 32) {
          const int cnt = min(32, P - c0);
          __syncwarp();
          spos[warp][lane] = c0 == 0 ? pos0 : (lane < cnt ? ppos[c0 + lane] : -1);
          __syncwarp();
          constexpr int U = kSlotsAhead;
          for (int j = gw; j < cnt; j += U * GPW) {
            bool al[U][kNP];
            bool any[U];
#pragma unroll
            for (int u = 0; u < U; ++u) {
              const int ju = j + u * GPW;
              const int32_t pu = ju < cnt ? spos[warp][ju] : -1;
              any[u] = false;
#pragma unroll
              for (int k = 0; k < kNP; ++k) {
                al[u][k] = pv[k] && slot_allowed(pu, qp[k], job.sinks, job.window);
                any[u] |= al[u][k];
              }
            }
            uint32_t rk[U][NW], rv[U][NW];
#pragma unroll
            for (int u = 0; u < U; ++u)
              if (any[u]) {
                const int64_t off = int64_t(c0 + j + u * GPW) * kv.rb;
                load_raw8<T>(krow0 + off, tig * 8, rk[u]);
                load_raw8<T>(vrow0 + off, tig * 8, rv[u]);
              }
            if (c0 == 0 && j == gw) {  // after this batch's loads are issued
              next_pos = first_pos(next_id);
              fetched = true;
            }
#pragma unroll
            for (int u = 0; u < U; ++u)
              if (any[u]) {
                float kf[8], vf[8];
                unpack_raw8<T>(rk[u], kf);
                unpack_raw8<T>(rv[u], vf);
                step(kf, vf, al[u]);
              }
          }
        }
        if (!fetched) next_pos = first_pos(next_id);
      }
    } else {
      // Slots i = grp, grp + NG, ...; the next slot's page id and position are fetched while this slot's
      // K/V rows are in flight.
      int i = grp;
      int32_t id = -1, ps = -1;
      auto fetch = [&](int at, int32_t& fid, int32_t& fps) {
        const int pgi = rg.pg_lo + at / P, slot = at % P;
        fid = b.page_ids[job.page0 + pgi];
        fps = (fid >= 0 && fid < kv.total_pages) ? kv_pos(kv, fid)[slot] : -1;
      };
      if (i < nslots) fetch(i, id, ps);
      for (; i < nslots; i += NG) {
        const int slot = i % P;
        const int32_t cid = id, cps = ps;
        if (i + NG < nslots) fetch(i + NG, id, ps);
        if (cid < 0 || cid >= kv.total_pages) {
          if (tig == 0) atomicOr(err, kErrAttnPage);
          continue;
        }
        bool al[kNP];
        bool any = false;
  #pragma unroll
        for (int k = 0; k < kNP; ++k) {
          al[k] = pv[k] && slot_allowed(cps, qp[k], job.sinks, job.window);
          any |= al[k];
        }
        if (!any) continue;
        float kf[EPL], vf[EPL];
        load_row<T, SUB, W, CH>(kv_krow(kv, cid, slot), tig, D, kf);
        load_row<T, SUB, W, CH>(kv_vrow(kv, cid, slot), tig, D, vf);
        step(kf, vf, al);
      }
    }
    // Merge the NG group states in group order.
#pragma unroll
    for (int k = 0; k < kNP; ++k) {
      if (tig == 0) {
        sM[grp * kNP + k] = m[k];
        sL[grp * kNP + k] = l[k];
      }
#pragma unroll
      for (int e = 0; e < EPL; ++e) {
        const int d = lane_dim<SUB, W, CH>(tig, e);
        if (W == 8 || d < D) sA[(grp * kNP + k) * D + d] = acc[k][e];
      }
    }
    __syncthreads();
    // Per pair: the merged max and sum, and each group's factor 2^(m_g - M) (0 for a group that saw nothing).
    if (threadIdx.x < kNP) {
      const int k = threadIdx.x;
      float M = -INFINITY;
      for (int g = 0; g < NG; ++g) M = fmaxf(M, sM[g * kNP + k]);
      float L = 0.0f;
      for (int g = 0; g < NG; ++g) {
        const float mg = sM[g * kNP + k];
        const float f = (M == -INFINITY || mg == -INFINITY) ? 0.0f : exp2f(mg - M);
        sF[g * kNP + k] = f;
        if (f != 0.0f) L = fmaf(sL[g * kNP + k], f, L);
      }
      sMLk[2 * k] = M;
      sMLk[2 * k + 1] = L;
    }
    __syncthreads();
    for (int i = threadIdx.x; i < kNP * D; i += kThreads) {
      const int k = i / D, d = i % D;
      int row = 0, head = 0;
      bool ok = false;
#pragma unroll
      for (int kk = 0; kk < kNP; ++kk)
        if (kk == k) row = prow[kk], head = phead[kk], ok = pv[kk];
      if (!ok) continue;
      const float M = sMLk[2 * k], L = sMLk[2 * k + 1];
      float A = 0.0f;
      for (int g = 0; g < NG; ++g) {
        const float f = sF[g * kNP + k];
        if (f != 0.0f) A = fmaf(sA[(g * kNP + k) * D + d], f, A);
      }
      if (split) {
        float* pt = scr.partial + ((int64_t(blockIdx.x) * kAttnSplits + blockIdx.y) * (kAttnSplitMaxRows * G) +
                                   (pass * kNP + k)) * (D + 2);
        if (d == 0) pt[0] = M, pt[1] = L;
        pt[2 + d] = A;
      } else {
        b.out[int64_t(row) * b.out_stride + int64_t(head) * D + d] = L > 0.0f ? A / L : 0.0f;
        if (d == 0) {
          const int64_t mi = int64_t(row) * hq + head;
          if (mi < scr.ml_pairs) scr.ml[2 * mi] = M, scr.ml[2 * mi + 1] = L;
          else atomicOr(err, kErrAttnScratch);
        }
      }
    }
  }
}

// Combines the kAttnSplits partials of each pair of the decode jobs, in split order: block (job, pair).
__global__ void __launch_bounds__(128) attn_merge_kernel(AttnBatch b, AttnScratch scr, int hq, uint32_t* err) {
  const AttnJob job = b.jobs[blockIdx.x];
  if (job.n_rows <= 0 || job.n_rows >= kAttnSplitMaxRows) return;
  if (job.row0 < 0 || job.page0 < 0 || job.n_pages < 0 || job.kv_head < 0) return;  // pass 1 reported it
  const int G = b.n_group, D = b.head_dim;
  const int p = blockIdx.y;
  if (p >= job.n_rows * G) return;
  const int64_t stride = int64_t(kAttnSplitMaxRows) * G * (D + 2);
  const float* pt = scr.partial + int64_t(blockIdx.x) * kAttnSplits * stride + int64_t(p) * (D + 2);
  __shared__ float sm[kAttnSplits], sl[kAttnSplits], sf[kAttnSplits];
  __shared__ float sML[2];
  for (int sp = threadIdx.x; sp < kAttnSplits; sp += blockDim.x) {
    sm[sp] = pt[sp * stride];
    sl[sp] = pt[sp * stride + 1];
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    float M = -INFINITY;
    for (int sp = 0; sp < kAttnSplits; ++sp) M = fmaxf(M, sm[sp]);
    float L = 0.0f;
    for (int sp = 0; sp < kAttnSplits; ++sp) {
      const float f = (M == -INFINITY || sm[sp] == -INFINITY) ? 0.0f : exp2f(sm[sp] - M);
      sf[sp] = f;
      if (f != 0.0f) L = fmaf(sl[sp], f, L);
    }
    sML[0] = M;
    sML[1] = L;
  }
  __syncthreads();
  const float M = sML[0], L = sML[1];
  const int row = job.row0 + p / G, head = job.kv_head * G + p % G;
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float A = 0.0f;
#pragma unroll 8
    for (int sp = 0; sp < kAttnSplits; ++sp)
      if (sf[sp] != 0.0f) A = fmaf(pt[sp * stride + 2 + d], sf[sp], A);
    b.out[int64_t(row) * b.out_stride + int64_t(head) * D + d] = L > 0.0f ? A / L : 0.0f;
  }
  if (threadIdx.x == 0) {
    const int64_t mi = int64_t(row) * hq + head;
    if (mi < scr.ml_pairs) scr.ml[2 * mi] = M, scr.ml[2 * mi + 1] = L;
    else atomicOr(err, kErrAttnScratch);
  }
}

template <int T, int SUB, int W, int CH>
__global__ void __launch_bounds__(kThreads) attn_score_kernel(KVDev kv, AttnBatch b, AttnScratch scr, int hq) {
  constexpr int EPL = W * CH, GPW = 32 / SUB, NG = kWarps * GPW;
  const AttnJob job = b.jobs[blockIdx.x];
  if (!job.score || job.n_rows <= 0) return;
  if (job.row0 < 0 || job.page0 < 0 || job.n_pages < 0 || job.kv_head < 0) return;
  const int G = b.n_group, D = b.head_dim, P = kv.page_size;
  const JobRange rg = split_range(job, blockIdx.y);
  const int nslots = (rg.pg_hi - rg.pg_lo) * P;
  const int lane = threadIdx.x & 31, warp = threadIdx.x / 32;
  const int tig = lane % SUB, grp = warp * GPW + lane / SUB;
  const unsigned gmask = group_mask<SUB>();
  for (int i = grp; i < nslots; i += NG) {
    const int pgi = rg.pg_lo + i / P, slot = i % P;
    const int32_t id = b.page_ids[job.page0 + pgi];
    if (id < 0 || id >= kv.total_pages) continue;
    float* sc = kv_scores(kv, id);
    if (!sc) continue;
    const int32_t ps = kv_pos(kv, id)[slot];
    float kf[EPL];
    bool loaded = false, any = false;
    float tot = 0.0f;
    for (int r = 0; r < job.n_rows; ++r) {
      const int row = job.row0 + r;
      if (!slot_allowed(ps, b.q_pos[row], job.sinks, job.window)) continue;
      if (!loaded) {
        load_row<T, SUB, W, CH>(kv_krow(kv, id, slot), tig, D, kf);
        loaded = true;
      }
      any = true;
      for (int h = 0; h < G; ++h) {
        const int head = job.kv_head * G + h;
        const float* q = b.q + int64_t(row) * b.q_stride + int64_t(head) * D;
        const float dot = group_dot<SUB, W, CH>(q, kf, tig, D, gmask);
        const float s = __fmul_rn(dot, b.scale * kLog2e);  // the same bits as pass 1
        const int64_t mi = int64_t(row) * hq + head;
        if (mi >= scr.ml_pairs) continue;
        tot += exp2f(s - scr.ml[2 * mi]) / scr.ml[2 * mi + 1];
      }
    }
    if (any && tig == 0) sc[slot] += tot;
  }
}

template <int SUB, int W, int CH>
size_t attn_smem(int D) {
  constexpr int NG = kWarps * (32 / SUB);
  return size_t(kNP * D + 2 * NG * kNP + NG * kNP * D) * sizeof(float);
}

template <int T, int SUB, int W, int CH>
cudaError_t run(const KVDev& kv, const AttnBatch& b, const AttnScratch& scr, int hq, uint32_t* err, cudaStream_t s) {
  const size_t smem = attn_smem<SUB, W, CH>(b.head_dim);
  static bool attr = false;
  if (!attr) {
    cudaError_t e = cudaFuncSetAttribute(attn_kernel<T, SUB, W, CH>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         int(attn_smem<SUB, W, CH>(256)));
    if (e != cudaSuccess) return e;
    attr = true;
  }
  const dim3 grid(unsigned(b.n_jobs), kAttnSplits);
  attn_kernel<T, SUB, W, CH><<<grid, kThreads, smem, s>>>(kv, b, scr, hq, err);
  if (cudaError_t e = cudaGetLastError(); e != cudaSuccess) return e;
  attn_merge_kernel<<<dim3(unsigned(b.n_jobs), unsigned(kAttnSplitMaxRows * b.n_group)), 128, 0, s>>>(b, scr, hq, err);
  if (cudaError_t e = cudaGetLastError(); e != cudaSuccess) return e;
  if (kv.sc[0] || kv.sc[1]) {
    attn_score_kernel<T, SUB, W, CH><<<grid, kThreads, 0, s>>>(kv, b, scr, hq);
    if (cudaError_t e = cudaGetLastError(); e != cudaSuccess) return e;
  }
  return cudaSuccess;
}

template <int T>
cudaError_t run_type(const KVDev& kv, const AttnBatch& b, const AttnScratch& scr, int hq, uint32_t* err, cudaStream_t s) {
  switch (b.head_dim) {
    case 64: return run<T, 8, 8, 1>(kv, b, scr, hq, err, s);
    case 128: return run<T, 16, 8, 1>(kv, b, scr, hq, err, s);
    case 256: return run<T, 32, 8, 1>(kv, b, scr, hq, err, s);
    default: return run<T, 32, 1, 8>(kv, b, scr, hq, err, s);
  }
}

}  // namespace

size_t attn_partial_floats(int n_jobs, int n_group, int head_dim) {
  return size_t(n_jobs) * kAttnSplits * size_t(kAttnSplitMaxRows) * size_t(n_group) * size_t(head_dim + 2);
}

cudaError_t launch_attention(const KVDev& kv, const AttnBatch& b, const AttnScratch& scr, uint32_t* err, cudaStream_t s) {
  if (b.n_jobs <= 0) return cudaSuccess;
  const int hq = int(b.out_stride / b.head_dim);
  AttnScratch sc = scr;
  if (prefill_attention_fits(kv, b)) {  // tensor-core prefill (attention_prefill.cu) takes the long jobs
    if (cudaError_t e = launch_prefill_attention(kv, b, scr, err, s); e != cudaSuccess) return e;
    sc.prefill_taken = 1;
    if (b.n_decode_jobs == 0 && !kv.sc[0] && !kv.sc[1]) return cudaSuccess;  // nothing left for the split kernel
  }
  switch (kv.type) {
    case kKVF32: return run_type<kKVF32>(kv, b, sc, hq, err, s);
    case kKVF16: return run_type<kKVF16>(kv, b, sc, hq, err, s);
    case kKVBF16: return run_type<kKVBF16>(kv, b, sc, hq, err, s);
    default: return run_type<kKVQ8>(kv, b, sc, hq, err, s);
  }
}

}  // namespace headroom::cuda
