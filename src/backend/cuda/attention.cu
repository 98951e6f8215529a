// CUDA backend: paged attention (flash-decoding for decode jobs) over the KV store, and evict's score pass.
//
// Decode jobs with n_rows * n_group <= 4 (head_dim 64/128/256, pages of a multiple of 4 slots, 16-byte aligned
// arrays) take the fast path (attn_fast_kernel + attn_fast_merge_kernel, below): pages streamed into shared
// memory with bulk asynchronous copies, up to 128 splits per job. For F16 KV with head_dim 64/128 the split
// pass is attn_tc_kernel instead (the same stream, QK^T and PV on tensor cores with hi/lo-split operands;
// HEADROOM_CUDA_ATTN_TC=0 turns it off), except evict's score jobs. Every other job takes the legacy kernel
// described here (HEADROOM_CUDA_ATTN_LEGACY=1 sends the decode jobs there too, for A/B runs).
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
#include <algorithm>
#include <climits>
#include <cstdlib>
#include <cstring>

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

// ---- Fast decode path (decode jobs with n_rows * n_group <= 4, head_dim 64/128/256, page_size % 4 == 0) ------
//
// Block (job, split) streams the split's slots through shared memory: NS stages of CH slots (K rows, V rows,
// positions), filled by bulk asynchronous copies (cp.async.bulk, completing on one mbarrier per stage; one
// copy per page piece and array) that thread 0 issues NS - 1 stages ahead, so many bytes are in flight
// without registers held per load. Host-tier pages (mapped pinned memory) and bad page ids are filled by
// ordinary loads/stores of the whole block instead. The compute matches the legacy kernel's per-slot
// arithmetic bit for bit (lane slice of 8 dims, fmaf in element order, the group butterfly, the score
// rounding), so evict's score pass recomputes the same scores; the query of the (up to 4) pairs lives in
// registers, and a group updates its online softmax once per stage for its U slots.
// Splits: a fixed number of pages per split that depends only on the job's n_pages and the page size
// (fast_pps), so a job's result does not depend on the grid (gridDim.y >= its split count; blocks past it exit).
constexpr int kFastNP = 4;             // (row, head) pairs per job held in registers
constexpr int kFastMaxSplits = 128;    // most splits per job
constexpr int kFastMinSplitSlots = 256;  // fewest slots per split
constexpr int kFastIdWin = 64;         // page ids staged in shared memory at a time

__host__ __device__ inline int fast_pps(int n_pages, int P) {
  const int a = (kFastMinSplitSlots + P - 1) / P, b = (n_pages + kFastMaxSplits - 1) / kFastMaxSplits;
  return a > b ? a : b;
}
__host__ __device__ inline int fast_splits(int n_pages, int P) {
  if (n_pages <= 0) return 0;
  const int pps = fast_pps(n_pages, P);
  return (n_pages + pps - 1) / pps;
}
// slot_allowed in 32-bit arithmetic: for 0 <= ps <= qp, ps > qp - window is qp - ps < window (no overflow).
__device__ __forceinline__ bool fast_allowed(int32_t ps, int32_t qp, int32_t sinks, int32_t window) {
  return ps >= 0 && ps <= qp && (window == 0 || ps < sinks || qp - ps < window);
}
__device__ __forceinline__ bool fast_job(const AttnJob& j, int G) {
  return j.n_rows > 0 && j.n_rows < kAttnSplitMaxRows && j.n_rows * G <= kFastNP;
}

template <int T, int D>
struct FastCfg {
  static constexpr int SUB = D / 8, GPW = 32 / SUB, NG = kWarps * GPW;
  static constexpr int U = T == kKVF32 ? 2 : 4;  // slots per group per stage
  static constexpr int CH = NG * U;              // slots per stage
  static constexpr int RB = T == kKVF32 ? 4 * D : (T == kKVQ8 ? 34 * D / 32 : 2 * D);
  static constexpr int NS = T == kKVQ8 ? 4 : 3;  // stages
  static constexpr int STAGE = CH * (2 * RB + 4);
  static constexpr int AREA = NS * STAGE;
  static constexpr size_t SMEM = size_t(AREA) + kFastIdWin * 4 + NS * 8;
  static_assert(NG * kFastNP * D * 4 <= AREA, "the group merge reuses the stage area");
  static_assert(CH % 4 == 0 && RB % 4 == 0 && STAGE % 16 == 0, "bulk copies need 16-byte pieces");
};

__device__ __forceinline__ void mbar_init(uint64_t* bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_addr(bar)), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_arrive_tx(uint64_t* bar, uint32_t tx) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_addr(bar)), "r"(tx) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
  asm volatile(
      "{\n.reg .pred P1;\nLAB_WAIT:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 P1, [%0], %1;\n"
      "@P1 bra DONE;\nbra LAB_WAIT;\nDONE:\n}" ::"r"(smem_addr(bar)),
      "r"(parity)
      : "memory");
}
__device__ __forceinline__ void bulk_load(void* dst, const void* src, uint32_t bytes, uint64_t* bar) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(smem_addr(dst)),
      "l"(src), "r"(bytes), "r"(smem_addr(bar))
      : "memory");
}
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;" ::: "memory"); }
__device__ __forceinline__ void fence_mbar_init() { asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory"); }

// The lane's 8 elements (dims 8 tig .. 8 tig + 7) of a stored row in shared memory, converted exactly (the same
// values as kv_load8 / unpack_raw8).
template <int T>
__device__ __forceinline__ void fast_row8(const uint8_t* row, int tig, float* o) {
  if constexpr (T == kKVF32) {
    const float4 a = *reinterpret_cast<const float4*>(row + 32 * tig);
    const float4 c = *reinterpret_cast<const float4*>(row + 32 * tig + 16);
    o[0] = a.x, o[1] = a.y, o[2] = a.z, o[3] = a.w, o[4] = c.x, o[5] = c.y, o[6] = c.z, o[7] = c.w;
  } else if constexpr (T == kKVF16) {
    const uint4 u = *reinterpret_cast<const uint4*>(row + 16 * tig);
    const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&w[i]));
      o[2 * i] = f.x, o[2 * i + 1] = f.y;
    }
  } else if constexpr (T == kKVBF16) {
    const uint4 u = *reinterpret_cast<const uint4*>(row + 16 * tig);
    const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      o[2 * i] = __uint_as_float(w[i] << 16);
      o[2 * i + 1] = __uint_as_float(w[i] & 0xFFFF0000u);
    }
  } else {
    // Block tig / 4 (scale, 32 int8), bytes 8 (tig % 4) .. + 8 of its values; rows are 4-byte aligned, so the
    // values are read as three aligned words and shifted into place.
    const uint8_t* blk = row + (tig >> 2) * 34;
    const float sc = h2f(ld_u16(blk));
    const uint8_t* qs = blk + 2 + 8 * (tig & 3);
    const uint32_t sh = uint32_t(reinterpret_cast<uintptr_t>(qs) & 3u) * 8u;
    const uint32_t* a = reinterpret_cast<const uint32_t*>(reinterpret_cast<uintptr_t>(qs) & ~uintptr_t(3));
    const uint32_t w0 = a[0], w1 = a[1], w2 = a[2];
    const uint32_t x[2] = {__funnelshift_r(w0, w1, sh) ^ 0x80808080u, __funnelshift_r(w1, w2, sh) ^ 0x80808080u};
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        // 2^23 + (q + 128), exactly, minus 2^23 + 128: the int8 value q as a float, then scaled (one rounding).
        const float qf = __int_as_float(int(__byte_perm(x[i], 0x4B000000u, 0x7540u | unsigned(k)))) - 8388736.0f;
        o[4 * i + k] = __fmul_rn(sc, qf);
      }
  }
}

// The stage stream of a fast-path block of NT threads: the split's slots [0, nslots) (pages pg_lo .. pg_lo + npg
// of the job) through NS shared-memory stages of CH slots (K rows, V rows, positions), filled by bulk
// asynchronous copies (cp.async.bulk, completing on one mbarrier per stage; one copy per page piece and array)
// that thread 0 issues; host-tier pages (mapped pinned memory) and bad page ids are filled by ordinary
// loads/stores of the whole block instead. Page ids are staged kFastIdWin at a time in shared memory. Every
// thread of the block calls every member (they contain block barriers).
template <int T, int D, int NT>
struct FastStream {
  using C = FastCfg<T, D>;
  static constexpr int CH = C::CH, RB = C::RB, NS = C::NS;
  const KVDev& kv;
  const AttnBatch& b;
  const AttnJob& job;
  uint32_t* err;
  uint8_t* fsm;
  int32_t* sIds;
  uint64_t* bar;
  int P, pg_lo, npg, nslots;
  int win0 = 0;          // first page (relative to pg_lo) whose id is in sIds
  bool all_dev = false;  // every id of the window is a device-tier page (then thread 0 alone fills the stages)

  __device__ __forceinline__ FastStream(const KVDev& kv_, const AttnBatch& b_, const AttnJob& j, uint32_t* e, uint8_t* sm,
                                        int lo, int n)
      : kv(kv_), b(b_), job(j), err(e), fsm(sm), sIds(reinterpret_cast<int32_t*>(sm + C::AREA)),
        bar(reinterpret_cast<uint64_t*>(sm + C::AREA + kFastIdWin * 4)), P(kv_.page_size), pg_lo(lo), npg(n),
        nslots(n * kv_.page_size) {}
  __device__ __forceinline__ int stages() const { return (nslots + CH - 1) / CH; }
  __device__ __forceinline__ uint8_t* k_of(int st) const { return fsm + st * C::STAGE; }
  __device__ __forceinline__ uint8_t* v_of(int st) const { return fsm + st * C::STAGE + CH * RB; }
  __device__ __forceinline__ int32_t* p_of(int st) const {
    return reinterpret_cast<int32_t*>(fsm + st * C::STAGE + 2 * CH * RB);
  }
  // Loads the id window starting at page win0.
  __device__ __forceinline__ void load_window() {
    bool odd = false;
    for (int i = threadIdx.x; i < min(kFastIdWin, npg - win0); i += NT) {
      const int32_t id = b.page_ids[job.page0 + pg_lo + win0 + i];
      sIds[i] = id;
      odd |= id < 0 || id >= kv.dev_pages;
    }
    all_dev = __syncthreads_or(odd) == 0;
  }
  // The barriers, the first id window and the first NS stages; ends with a block barrier (generic fills of the
  // first stages are visible).
  __device__ __forceinline__ void start() {
    if (threadIdx.x == 0) {
      for (int i = 0; i < NS; ++i) mbar_init(&bar[i], 1);
      fence_mbar_init();
    }
    load_window();
    for (int t = 0; t < min(NS, stages()); ++t) issue(t);
    __syncthreads();
  }
  __device__ __forceinline__ void wait(int t) { mbar_wait(&bar[t % NS], uint32_t(t / NS) & 1u); }
  // Fills stage t % NS with the split's slots [t * CH, min(nslots, (t + 1) * CH)).
  __device__ __forceinline__ void issue(int t) {
    const int tid = threadIdx.x;
    const int st = t % NS, i0 = t * CH, i1 = min(nslots, i0 + CH);
    uint8_t* sK = k_of(st);
    uint8_t* sV = v_of(st);
    int32_t* sP = p_of(st);
    const int pr0 = i0 / P, pr1 = (i1 - 1) / P;
    if (pr0 < win0 || pr1 >= win0 + kFastIdWin) {  // uniform: every thread sees the same window
      __syncthreads();
      win0 = pr0;
      load_window();
    }
    if (all_dev) {  // the common case: bulk copies only, issued by thread 0
      if (tid == 0) {
        mbar_arrive_tx(&bar[st], uint32_t(i1 - i0) * uint32_t(2 * RB + 4));
        for (int i = i0; i < i1;) {
          const int pr = i / P, a = i - pr * P, n = min(P - a, i1 - i), off = i - i0;
          const int32_t id = sIds[pr - win0];
          const int64_t sl = int64_t(id) * P + a;  // device tier (tier 0 named directly: no indexed kernel params)
          bulk_load(sK + off * RB, kv.k[0] + sl * RB, uint32_t(n * RB), &bar[st]);
          bulk_load(sV + off * RB, kv.v[0] + sl * RB, uint32_t(n * RB), &bar[st]);
          bulk_load(sP + off, kv.pos[0] + sl, uint32_t(n * 4), &bar[st]);
          i += n;
        }
      }
      return;
    }
    uint32_t dev_bytes = 0;
    bool generic = false;
    for (int i = i0; i < i1;) {
      const int pr = i / P, a = i % P, n = min(P - a, i1 - i), off = i - i0;
      const int32_t id = sIds[pr - win0];
      if (id < 0 || id >= kv.total_pages) {
        for (int j = tid; j < n; j += NT) sP[off + j] = -1;
        if (tid == 0) atomicOr(err, kErrAttnPage);
        generic = true;
      } else if (id >= kv.dev_pages) {  // host tier: ordinary loads from mapped memory
        const int64_t sl = int64_t(id - kv.dev_pages) * P + a;  // host tier
        const uint4* k4 = reinterpret_cast<const uint4*>(kv.k[1] + sl * RB);
        const uint4* v4 = reinterpret_cast<const uint4*>(kv.v[1] + sl * RB);
        uint4* dk = reinterpret_cast<uint4*>(sK + off * RB);
        uint4* dv = reinterpret_cast<uint4*>(sV + off * RB);
        const int nw = n * RB / 16;
        for (int j = tid; j < nw; j += NT) dk[j] = k4[j], dv[j] = v4[j];
        const int32_t* ps = kv.pos[1] + sl;
        for (int j = tid; j < n; j += NT) sP[off + j] = ps[j];
        generic = true;
      } else {
        dev_bytes += uint32_t(n) * uint32_t(2 * RB + 4);
      }
      i += n;
    }
    if (generic) fence_proxy_async();
    if (tid == 0) {
      mbar_arrive_tx(&bar[st], dev_bytes);
      if (dev_bytes)
        for (int i = i0; i < i1;) {
          const int pr = i / P, a = i % P, n = min(P - a, i1 - i), off = i - i0;
          const int32_t id = sIds[pr - win0];
          if (id >= 0 && id < kv.dev_pages) {
            const int64_t sl = int64_t(id) * P + a;
            bulk_load(sK + off * RB, kv.k[0] + sl * RB, uint32_t(n * RB), &bar[st]);
            bulk_load(sV + off * RB, kv.v[0] + sl * RB, uint32_t(n * RB), &bar[st]);
            bulk_load(sP + off, kv.pos[0] + sl, uint32_t(n * 4), &bar[st]);
          }
          i += n;
        }
    }
  }
};

// Pair k of NG online-softmax states (sM, sL: [NG][NP]), merged in group order: the max and sum (sMLk[2k],
// sMLk[2k + 1]) and each group's factor 2^(m_g - M) (sF, 0 for a group that saw nothing).
template <int NG, int NP>
__device__ __forceinline__ void merge_group_states(const float* sM, const float* sL, float* sF, float* sMLk, int k) {
  float M = -INFINITY;
  for (int g = 0; g < NG; ++g) M = fmaxf(M, sM[g * NP + k]);
  float L = 0.0f;
  for (int g = 0; g < NG; ++g) {
    const float mg = sM[g * NP + k];
    const float f = (M == -INFINITY || mg == -INFINITY) ? 0.0f : exp2f(mg - M);
    sF[g * NP + k] = f;
    if (f != 0.0f) L = fmaf(sL[g * NP + k], f, L);
  }
  sMLk[2 * k] = M;
  sMLk[2 * k + 1] = L;
}

// The end of a fast-path block (NT threads): merges the NG states (sM, sL [NG][kFastNP], sA [NG][kFastNP][D],
// written before the call) in group order and writes the split's partial (max, sum, acc) of each pair to
// part: ml [n_jobs][Sg][kFastNP][2], then acc [n_jobs][Sg][kFastNP][D].
template <int NG, int NT, int D>
__device__ __forceinline__ void fast_write_partial(const float* sM, const float* sL, const float* sA, float* sF,
                                                   float* sMLk, float* part, int Sg, int npairs) {
  __syncthreads();
  if (threadIdx.x < kFastNP) merge_group_states<NG, kFastNP>(sM, sL, sF, sMLk, threadIdx.x);
  __syncthreads();
  const int64_t slot_base = (int64_t(blockIdx.x) * Sg + blockIdx.y) * kFastNP;
  float* pml = part + slot_base * 2;
  float* pacc = part + int64_t(gridDim.x) * Sg * kFastNP * 2 + slot_base * D;
  for (int i = threadIdx.x; i < kFastNP * D; i += NT) {
    const int k = i / D, d = i % D;
    if (k >= npairs) break;
    float A = 0.0f;
    for (int g = 0; g < NG; ++g) {
      const float f = sF[g * kFastNP + k];
      if (f != 0.0f) A = fmaf(sA[(g * kFastNP + k) * D + d], f, A);
    }
    pacc[k * D + d] = A;
    if (d == 0) pml[2 * k] = sMLk[2 * k], pml[2 * k + 1] = sMLk[2 * k + 1];
  }
}

// Pass 1 of the fast path: block (job, split s) writes the split's partial (max, sum, acc) per pair to
// part: ml [n_jobs][Sg][kFastNP][2], then acc [n_jobs][Sg][kFastNP][D].
// MODE 0 (default): a group scores all U of its slots of a stage together (U * 4 independent dot/butterfly
// chains), then one softmax update per pair; MODE 3: 2 slots at a time; MODE 1: slot by slot (the first
// version). MODE 2: a bandwidth probe that streams the stages and computes nothing (wrong results; benchmarks
// only). Measured (2026-12-01, 8B F16 128k): MODE 0 251.7 us/layer, MODE 3 261.0, MODE 1 295.5, probe 4034 GB/s.
template <int T, int D, int MODE>
__global__ void __launch_bounds__(kThreads, 2) attn_fast_kernel(KVDev kv, AttnBatch b, float* part, int Sg, int only_score,
                                                                uint32_t* err) {
  using C = FastCfg<T, D>;
  constexpr int SUB = C::SUB, GPW = C::GPW, NG = C::NG, U = C::U, CH = C::CH, RB = C::RB, NS = C::NS;
  const AttnJob job = b.jobs[blockIdx.x];
  const int G = b.n_group, P = kv.page_size;
  if (!fast_job(job, G) || (only_score && !job.score)) return;
  if (job.row0 < 0 || job.page0 < 0 || job.n_pages < 0 || job.kv_head < 0) {
    if (threadIdx.x == 0 && blockIdx.y == 0) atomicOr(err, kErrAttnShape);
    return;
  }
  const int S = fast_splits(job.n_pages, P), s = blockIdx.y;
  if (s >= S) return;
  const int pps = fast_pps(job.n_pages, P);
  const int pg_lo = s * pps, npg = min(job.n_pages, pg_lo + pps) - pg_lo;

  extern __shared__ __align__(128) uint8_t fsm[];
  __shared__ float sM[NG * kFastNP], sL[NG * kFastNP], sF[NG * kFastNP], sMLk[2 * kFastNP];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid / 32;
  const int tig = lane % SUB, grp = warp * GPW + lane / SUB;
  const unsigned gmask = group_mask<SUB>();
  const float sc2 = b.scale * kLog2e;

  // The pairs: query slice in registers.
  const int npairs = job.n_rows * G;
  float q[kFastNP][8];
  int32_t qp[kFastNP];
  bool pv[kFastNP];
#pragma unroll
  for (int k = 0; k < kFastNP; ++k) {
    pv[k] = k < npairs;
    const int row = job.row0 + (pv[k] ? k / G : 0), head = job.kv_head * G + (pv[k] ? k % G : 0);
    qp[k] = pv[k] ? b.q_pos[row] : INT_MIN;
    if (pv[k]) {
      const float4* qq = reinterpret_cast<const float4*>(b.q + int64_t(row) * b.q_stride + int64_t(head) * D + 8 * tig);
      const float4 a = qq[0], c = qq[1];
      q[k][0] = a.x, q[k][1] = a.y, q[k][2] = a.z, q[k][3] = a.w, q[k][4] = c.x, q[k][5] = c.y, q[k][6] = c.z, q[k][7] = c.w;
    } else {
#pragma unroll
      for (int e = 0; e < 8; ++e) q[k][e] = 0.0f;
    }
  }

  FastStream<T, D, kThreads> fs(kv, b, job, err, fsm, pg_lo, npg);
  fs.start();
  const int nslots = fs.nslots, nst = fs.stages();

  float m[kFastNP], l[kFastNP], acc[kFastNP][8];
#pragma unroll
  for (int k = 0; k < kFastNP; ++k) {
    m[k] = -INFINITY;
    l[k] = 0.0f;
#pragma unroll
    for (int e = 0; e < 8; ++e) acc[k][e] = 0.0f;
  }
  for (int t = 0; t < nst; ++t) {
    const int st = t % NS, cnt = min(CH, nslots - t * CH);
    const uint8_t* sK = fs.k_of(st);
    const uint8_t* sV = fs.v_of(st);
    const int32_t* sP = fs.p_of(st);
    fs.wait(t);
    if constexpr (MODE == 0 || MODE == 3) {
      // Scores of UB of the group's slots at a time for the pairs, as UB * kFastNP independent chains (slots past
      // the stage or not allowed are computed on whatever the buffer holds and masked out; never used).
      constexpr int UB = MODE == 3 ? 2 : U;
#pragma unroll
      for (int h = 0; h < U; h += UB) {
      unsigned alm[UB];  // bit k: pair k may see slot u
      float sc[UB][kFastNP];
#pragma unroll
      for (int u = 0; u < UB; ++u) {
        const int j = grp + (h + u) * NG;
        const int32_t ps = j < cnt ? sP[j] : -1;
        alm[u] = 0;
#pragma unroll
        for (int k = 0; k < kFastNP; ++k)
          if (pv[k] && fast_allowed(ps, qp[k], job.sinks, job.window)) alm[u] |= 1u << k;
        float kf[8];
        fast_row8<T>(sK + j * RB, tig, kf);
#pragma unroll
        for (int k = 0; k < kFastNP; ++k) {
          float part = 0.0f;
#pragma unroll
          for (int e = 0; e < 8; ++e) part = fmaf(q[k][e], kf[e], part);
          sc[u][k] = part;
        }
      }
#pragma unroll
      for (int o = SUB / 2; o > 0; o >>= 1)  // the group butterfly of every chain (group_sum's order)
#pragma unroll
        for (int u = 0; u < UB; ++u)
#pragma unroll
          for (int k = 0; k < kFastNP; ++k) sc[u][k] += __shfl_xor_sync(gmask, sc[u][k], o);
#pragma unroll
      for (int k = 0; k < kFastNP; ++k) {
        float mx = -INFINITY;
#pragma unroll
        for (int u = 0; u < UB; ++u) {
          sc[u][k] = (alm[u] >> k & 1u) ? __fmul_rn(sc[u][k], sc2) : -INFINITY;  // legacy/score-pass bits
          mx = fmaxf(mx, sc[u][k]);
        }
        if (mx > m[k]) {
          const float f = exp2f(m[k] - mx);
          l[k] *= f;
#pragma unroll
          for (int e = 0; e < 8; ++e) acc[k][e] *= f;
          m[k] = mx;
        }
      }
#pragma unroll
      for (int u = 0; u < UB; ++u) {
        if (!alm[u]) continue;  // uniform in the group
        float vf[8];
        fast_row8<T>(sV + (grp + (h + u) * NG) * RB, tig, vf);
#pragma unroll
        for (int k = 0; k < kFastNP; ++k)
          if (alm[u] >> k & 1u) {
            const float p = exp2f(sc[u][k] - m[k]);
            l[k] += p;
#pragma unroll
            for (int e = 0; e < 8; ++e) acc[k][e] = fmaf(p, vf[e], acc[k][e]);
          }
      }
      }  // h
    } else if constexpr (MODE == 1) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int j = grp + u * NG;
      const int32_t ps = j < cnt ? sP[j] : -1;
      unsigned alm = 0;  // bit k: pair k may see the slot
#pragma unroll
      for (int k = 0; k < kFastNP; ++k)
        if (pv[k] && slot_allowed(ps, qp[k], job.sinks, job.window)) alm |= 1u << k;
      if (!alm) continue;  // uniform in the group
      float kf[8];
      fast_row8<T>(sK + j * RB, tig, kf);
      float sc[kFastNP];
#pragma unroll
      for (int k = 0; k < kFastNP; ++k) {
        float part = 0.0f;
#pragma unroll
        for (int e = 0; e < 8; ++e) part = fmaf(q[k][e], kf[e], part);
        const float dot = group_sum<SUB>(part, gmask);
        sc[k] = __fmul_rn(dot, sc2);  // the same bits as the legacy kernel and the score pass
        if ((alm >> k & 1u) && sc[k] > m[k]) {
          const float f = exp2f(m[k] - sc[k]);
          l[k] *= f;
#pragma unroll
          for (int e = 0; e < 8; ++e) acc[k][e] *= f;
          m[k] = sc[k];
        }
      }
      float vf[8];
      fast_row8<T>(sV + j * RB, tig, vf);
#pragma unroll
      for (int k = 0; k < kFastNP; ++k)
        if (alm >> k & 1u) {
          const float p = exp2f(sc[k] - m[k]);
          l[k] += p;
#pragma unroll
          for (int e = 0; e < 8; ++e) acc[k][e] = fmaf(p, vf[e], acc[k][e]);
        }
    }
    }
    __syncthreads();  // stage st is free
    if (t + NS < nst) fs.issue(t + NS);
  }

  // Merge the NG group states in group order (the stage area is free: every stage was consumed).
  float* sA = reinterpret_cast<float*>(fsm);  // [NG][kFastNP][D]
#pragma unroll
  for (int k = 0; k < kFastNP; ++k) {
    if (tig == 0) {
      sM[grp * kFastNP + k] = m[k];
      sL[grp * kFastNP + k] = l[k];
    }
    float4* a4 = reinterpret_cast<float4*>(sA + (grp * kFastNP + k) * D + 8 * tig);
    a4[0] = make_float4(acc[k][0], acc[k][1], acc[k][2], acc[k][3]);
    a4[1] = make_float4(acc[k][4], acc[k][5], acc[k][6], acc[k][7]);
  }
  fast_write_partial<NG, kThreads, D>(sM, sL, sA, sF, sMLk, part, Sg, npairs);
}

// ---- Tensor-core decode path (F16 KV, head_dim 64/128, the fast jobs) -----------------------------------------
//
// The same stage stream, split rule and partial layout as attn_fast_kernel (attn_fast_merge_kernel combines the
// splits), but 4 warps a block (2 blocks an SM) and the per-slot work on tensor cores (mma.sync m16n8k16, F16
// operands, F32 accumulation). A warp takes 16-slot tiles of each stage; its M rows are the job's (up to 4)
// pairs, twice: row k holds the high F16 part and row k + 8 the low part of an F32 operand, so one mma computes
// both halves and a thread holds both in its own accumulators (c0/c1 and c2/c3), summed in F32 afterwards.
//   * S = Q K^T: Q is q * scale * log2(e), scaled per pair by a power of two 2^e (max |q| in [2^14, 2^15): the
//     low part stays a normal F16) and split q = hi + lo; K (F16, exact) is the B operand, read from the stage
//     with 16-byte loads (thread (r, c) of the warp: slot r of the n-tile, dims 8 (c + 4 i) .. + 7; a k-step
//     takes 4 of them, the same dims in Q's fragment). s = (S_hi + S_lo) * 2^-e: the score in log2 units.
//   * Online softmax per pair in F32 (the 4 threads of a quad share a pair: max by two shuffles; each keeps its
//     own partial sum, added in a fixed order at the end), p = 2^(s - m).
//   * O += P V: P * 2^14 split into hi + lo (rows k and k + 8 again), straight from the score fragments (the
//     FA2 layout); V (F16, exact) is the B operand: thread (r, c) packs dims 8 (r + 8 h) .. + 7 of its 4 slots
//     into half2 pairs with byte permutes. Slots no pair may see (holes, padding past the stage) have their V
//     words zeroed, so NaN garbage never meets a zero probability. O * 2^-14 at the end.
// The four warps' states are merged in warp order, as the groups of attn_fast_kernel. Deterministic: no atomics,
// every order fixed. Results differ from attn_fast_kernel's by rounding (tensor-core accumulation), within the
// exact-attention tolerance; evict's score jobs (stores with slot scores) stay on attn_fast_kernel, whose scores
// the score pass recomputes bit for bit. HEADROOM_CUDA_ATTN_TC=0 turns it off (A/B runs).
constexpr int kTcWarps = 4, kTcThreads = 32 * kTcWarps;
constexpr float kTcPScale = 16384.0f, kTcPInv = 1.0f / 16384.0f;

__device__ __forceinline__ uint32_t pack_h2(__half lo, __half hi) {
  return uint32_t(__half_as_ushort(lo)) | uint32_t(__half_as_ushort(hi)) << 16;
}
// x = hi + lo (+ a rounding of lo): hi = f16(x), lo = f16(x - hi) (x - hi exact in F32).
__device__ __forceinline__ void split_f16(float x, __half& hi, __half& lo) {
  hi = __float2half_rn(x);
  lo = __float2half_rn(x - __half2float(hi));
}
__device__ __forceinline__ uint32_t word_of(const uint4& v, int i) { return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w; }

template <int D>
__global__ void __launch_bounds__(kTcThreads, 2) attn_tc_kernel(KVDev kv, AttnBatch b, float* part, int Sg, int skip_score,
                                                                 uint32_t* err) {
  using Stream = FastStream<kKVF16, D, kTcThreads>;
  constexpr int CH = Stream::CH, RB = Stream::RB, NS = Stream::NS;
  constexpr int TPW = CH / (16 * kTcWarps);  // 16-slot tiles per warp per stage
  static_assert(TPW >= 1 && CH % (16 * kTcWarps) == 0, "whole tiles per warp");
  constexpr int KS = D / 16, NV = D / 8, NCK = D / 32, NCV = D / 64;  // QK k-steps, PV n-tiles, K / V chunks
  static_assert(kTcWarps * kFastNP * D * 4 <= FastCfg<kKVF16, D>::AREA, "the warp merge reuses the stage area");
  const AttnJob job = b.jobs[blockIdx.x];
  const int G = b.n_group, P = kv.page_size;
  if (!fast_job(job, G) || (skip_score && job.score)) return;
  if (job.row0 < 0 || job.page0 < 0 || job.n_pages < 0 || job.kv_head < 0) {
    if (threadIdx.x == 0 && blockIdx.y == 0) atomicOr(err, kErrAttnShape);
    return;
  }
  const int S = fast_splits(job.n_pages, P), s = blockIdx.y;
  if (s >= S) return;
  const int pps = fast_pps(job.n_pages, P);
  const int pg_lo = s * pps, npg = min(job.n_pages, pg_lo + pps) - pg_lo;

  extern __shared__ __align__(128) uint8_t fsm[];
  __shared__ float sM[kTcWarps * kFastNP], sL[kTcWarps * kFastNP], sF[kTcWarps * kFastNP], sMLk[2 * kFastNP];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid / 32;
  const int r = lane >> 2, c = lane & 3;  // the mma fragment's group (row / column) and thread in group
  const float sc2 = b.scale * kLog2e;
  const int npairs = job.n_rows * G;
  const bool mine = r < npairs;  // this thread's row r is pair r (lanes 16..31: rows 4..7, never a pair)
  int32_t qp[kFastNP];
  int32_t myqp = INT_MIN;
#pragma unroll
  for (int k = 0; k < kFastNP; ++k) {
    qp[k] = k < npairs ? b.q_pos[job.row0 + k / G] : INT_MIN;
    if (k == r) myqp = qp[k];
  }

  // Q fragments of pair r: k-step t takes dims d0 .. d0 + 3, d0 = 8 (c + 4 (t / 2)) + 4 (t % 2). The loads are
  // issued before the stream starts (page ids, first stages), and used after it, so the latencies overlap.
  float4 qv[KS];
  {
    const int row = job.row0 + (mine ? r / G : 0), head = job.kv_head * G + (mine ? r % G : 0);
    const float* qrow = b.q + int64_t(row) * b.q_stride + int64_t(head) * D;
#pragma unroll
    for (int t = 0; t < KS; ++t)
      qv[t] = mine ? *reinterpret_cast<const float4*>(qrow + 8 * (c + 4 * (t / 2)) + 4 * (t % 2))
                   : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
  }

  Stream fs(kv, b, job, err, fsm, pg_lo, npg);
  fs.start();
  const int nslots = fs.nslots, nst = fs.stages();

  uint32_t qa[KS][4];
  float qinv = 1.0f;
  {
    float x[KS][4];
    float mx = 0.0f;
#pragma unroll
    for (int t = 0; t < KS; ++t) {
      x[t][0] = __fmul_rn(qv[t].x, sc2), x[t][1] = __fmul_rn(qv[t].y, sc2), x[t][2] = __fmul_rn(qv[t].z, sc2),
      x[t][3] = __fmul_rn(qv[t].w, sc2);
#pragma unroll
      for (int e = 0; e < 4; ++e) mx = fmaxf(mx, fabsf(x[t][e]));
    }
    mx = fmaxf(mx, __shfl_xor_sync(0xFFFFFFFFu, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xFFFFFFFFu, mx, 2));
    int ex = 0;
    if (mx > 0.0f && mx <= 3.0e38f) {
      frexpf(mx, &ex);                    // mx in [2^(ex - 1), 2^ex)
      ex = min(max(15 - ex, -100), 100);  // mx * 2^ex in [2^14, 2^15)
    }
    const float qs = ldexpf(1.0f, ex);  // exact powers of two
    qinv = ldexpf(1.0f, -ex);
#pragma unroll
    for (int t = 0; t < KS; ++t) {
      __half h[4], lo[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) split_f16(__fmul_rn(x[t][e], qs), h[e], lo[e]);
      qa[t][0] = pack_h2(h[0], h[1]);    // row r (hi), k 2c, 2c + 1: dims d0, d0 + 1
      qa[t][1] = pack_h2(lo[0], lo[1]);  // row r + 8 (lo)
      qa[t][2] = pack_h2(h[2], h[3]);    // row r, k 2c + 8, 2c + 9: dims d0 + 2, d0 + 3
      qa[t][3] = pack_h2(lo[2], lo[3]);
    }
  }

  float m = -INFINITY, l = 0.0f;
  float o[NV][4];
#pragma unroll
  for (int i = 0; i < NV; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.0f;
  for (int t = 0; t < nst; ++t) {
    const int st = t % NS, cnt = min(CH, nslots - t * CH);
    const uint8_t* sK = fs.k_of(st);
    const uint8_t* sV = fs.v_of(st);
    const int32_t* sP = fs.p_of(st);
    fs.wait(t);
#pragma unroll
    for (int tt = 0; tt < TPW; ++tt) {
      const int base = (tt * kTcWarps + warp) * 16;
      if (base >= cnt) continue;  // past the stage's slots (uniform in the warp)
      // Slots some pair may see: lane l < 16 tests slot base + l (bit l of seen).
      unsigned seen;
      {
        const int32_t ps = lane < 16 && base + lane < cnt ? sP[base + lane] : -1;
        bool a = false;
#pragma unroll
        for (int k = 0; k < kFastNP; ++k) a |= fast_allowed(ps, qp[k], job.sinks, job.window);
        seen = __ballot_sync(0xFFFFFFFFu, a);
      }
      // This thread's 4 slots (score columns and P / V rows): u = 2 j + e is slot base + 8 j + 2 c + e.
      bool al[4];
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        const int j = base + 8 * (u / 2) + 2 * c + (u % 2);
        const int32_t ps = j < cnt ? sP[j] : -1;
        al[u] = mine && fast_allowed(ps, myqp, job.sinks, job.window);
      }
      // S = Q K^T for the tile's two n-tiles of 8 slots.
      uint4 kw[2][NCK];
#pragma unroll
      for (int j = 0; j < 2; ++j)
#pragma unroll
        for (int i = 0; i < NCK; ++i)
          kw[j][i] = *reinterpret_cast<const uint4*>(sK + (base + 8 * j + r) * RB + 16 * (c + 4 * i));
      float sacc[2][4];
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        sacc[j][0] = sacc[j][1] = sacc[j][2] = sacc[j][3] = 0.0f;
#pragma unroll
        for (int kt = 0; kt < KS; ++kt) {
          const uint4& w = kw[j][kt / 2];
          mma16816<false>(sacc[j], qa[kt], kt % 2 ? w.z : w.x, kt % 2 ? w.w : w.y);
        }
      }
      // V rows of the 4 slots (chunks r + 8 h), loaded before the softmax so they are in flight meanwhile.
      uint4 vw[4][NCV];
#pragma unroll
      for (int u = 0; u < 4; ++u)
#pragma unroll
        for (int h = 0; h < NCV; ++h)
          vw[u][h] = *reinterpret_cast<const uint4*>(sV + (base + 8 * (u / 2) + 2 * c + (u % 2)) * RB + 16 * (r + 8 * h));
      float sv[4];
      float mx = -INFINITY;
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        const int j = u / 2, e = u % 2;
        sv[u] = al[u] ? (sacc[j][e] + sacc[j][e + 2]) * qinv : -INFINITY;
        mx = fmaxf(mx, sv[u]);
      }
      mx = fmaxf(mx, __shfl_xor_sync(0xFFFFFFFFu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xFFFFFFFFu, mx, 2));
      const float mn = fmaxf(m, mx);
      const float f = mn > m ? exp2f(m - mn) : 1.0f;
      if (__any_sync(0xFFFFFFFFu, mn > m)) {
#pragma unroll
        for (int i = 0; i < NV; ++i) o[i][0] *= f, o[i][1] *= f, o[i][2] *= f, o[i][3] *= f;
      }
      l *= f;
      m = mn;
      float p[4];
#pragma unroll
      for (int u = 0; u < 4; ++u) p[u] = al[u] ? exp2f(sv[u] - mn) : 0.0f;
      l += (p[0] + p[1]) + (p[2] + p[3]);
      uint32_t pa[4];
      {
        __half h[4], lo[4];
#pragma unroll
        for (int u = 0; u < 4; ++u) split_f16(p[u] * kTcPScale, h[u], lo[u]);
        pa[0] = pack_h2(h[0], h[1]);    // row r (hi), k 2c, 2c + 1: slots u = 0, 1
        pa[1] = pack_h2(lo[0], lo[1]);  // row r + 8 (lo)
        pa[2] = pack_h2(h[2], h[3]);    // row r, k 2c + 8, 2c + 9: slots u = 2, 3
        pa[3] = pack_h2(lo[2], lo[3]);
      }
      if (seen != 0xFFFFu) {  // uniform
#pragma unroll
        for (int u = 0; u < 4; ++u)
#pragma unroll
          for (int h = 0; h < NCV; ++h)
            if (!(seen >> (8 * (u / 2) + 2 * c + u % 2) & 1u)) vw[u][h] = make_uint4(0u, 0u, 0u, 0u);
      }
      // O += P V: n-tile i holds dims 8 (n + 8 (i / 8)) + i % 8 in its column n.
#pragma unroll
      for (int i = 0; i < NV; ++i) {
        const int h = i / 8, e = i % 8;
        const unsigned sel = e % 2 ? 0x7632u : 0x5410u;
        const uint32_t b0 = __byte_perm(word_of(vw[0][h], e / 2), word_of(vw[1][h], e / 2), sel);
        const uint32_t b1 = __byte_perm(word_of(vw[2][h], e / 2), word_of(vw[3][h], e / 2), sel);
        mma16816<false>(o[i], pa, b0, b1);
      }
    }
    __syncthreads();  // stage st is free
    if (t + NS < nst) fs.issue(t + NS);
  }

  // The warp's state of pair r: l summed over the quad (the same bits in its 4 lanes), O = (hi + lo) * 2^-14.
  l += __shfl_xor_sync(0xFFFFFFFFu, l, 1);
  l += __shfl_xor_sync(0xFFFFFFFFu, l, 2);
  float* sA = reinterpret_cast<float*>(fsm);  // [kTcWarps][kFastNP][D]; the stage area is free
  if (r < kFastNP) {
    if (c == 0) sM[warp * kFastNP + r] = m, sL[warp * kFastNP + r] = l;
    float* a = sA + (warp * kFastNP + r) * D;
#pragma unroll
    for (int i = 0; i < NV; ++i)
#pragma unroll
      for (int e = 0; e < 2; ++e) a[8 * (2 * c + e + 8 * (i / 8)) + i % 8] = (o[i][e] + o[i][e + 2]) * kTcPInv;
  }
  fast_write_partial<kTcWarps, kTcThreads, D>(sM, sL, sA, sF, sMLk, part, Sg, npairs);
}

// Combines a fast job's splits: block (job, pair k * (D / 32) + dim chunk), 256 threads. The (max, sum) of the
// splits: thread t takes split t; the sum is a fixed tree (warp butterflies, then warps in order). The acc: thread
// (quad, lane) sums splits lane, lane + 32, ... for 4 dims, then the 32 partial sums in order.
template <int D>
__global__ void __launch_bounds__(kThreads) attn_fast_merge_kernel(AttnBatch b, const float* part, int Sg, int page_size,
                                                                   AttnScratch scr, int hq, uint32_t* err) {
  static_assert(kFastMaxSplits <= kThreads, "one split per thread");
  constexpr int NC = D / 32;
  const AttnJob job = b.jobs[blockIdx.x];
  const int G = b.n_group;
  if (!fast_job(job, G)) return;
  if (job.row0 < 0 || job.page0 < 0 || job.n_pages < 0 || job.kv_head < 0) return;  // pass 1 reported it
  const int k = blockIdx.y / NC, dc = blockIdx.y % NC;
  if (k >= job.n_rows * G) return;
  int S = fast_splits(job.n_pages, page_size);
  if (S > Sg) {  // more pages than the batch's max_pages promised
    if (threadIdx.x == 0 && blockIdx.y == 0) atomicOr(err, kErrAttnShape);
    S = Sg;
  }
  const int tid = threadIdx.x, lane = tid & 31, warp = tid / 32;
  const float* pml = part + int64_t(blockIdx.x) * Sg * kFastNP * 2;
  const float* pacc = part + int64_t(gridDim.x) * Sg * kFastNP * 2 + int64_t(blockIdx.x) * Sg * kFastNP * D;
  __shared__ float sf[kThreads], swm[kWarps], swl[kWarps], sred[32][33];
  __shared__ float sML[2];
  const float mt = tid < S ? pml[(tid * kFastNP + k) * 2] : -INFINITY;
  const float lt = tid < S ? pml[(tid * kFastNP + k) * 2 + 1] : 0.0f;
  const float wm = warp_max(mt);
  if (lane == 0) swm[warp] = wm;
  __syncthreads();
  float M = -INFINITY;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) M = fmaxf(M, swm[w]);
  const float f = (M == -INFINITY || mt == -INFINITY) ? 0.0f : exp2f(mt - M);
  sf[tid] = f;
  const float wl = warp_sum(f != 0.0f ? lt * f : 0.0f);
  if (lane == 0) swl[warp] = wl;
  __syncthreads();
  if (tid == 0) {
    float L = 0.0f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) L += swl[w];
    sML[0] = M;
    sML[1] = L;
  }
  const int quad = tid % 8, sl = tid / 8, d = dc * 32 + 4 * quad;
  float4 A = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
  for (int sp = sl; sp < S; sp += 32) {
    const float fs = sf[sp];
    if (fs == 0.0f) continue;
    const float4 v = *reinterpret_cast<const float4*>(pacc + (int64_t(sp) * kFastNP + k) * D + d);
    A.x = fmaf(v.x, fs, A.x), A.y = fmaf(v.y, fs, A.y), A.z = fmaf(v.z, fs, A.z), A.w = fmaf(v.w, fs, A.w);
  }
  sred[sl][4 * quad] = A.x, sred[sl][4 * quad + 1] = A.y, sred[sl][4 * quad + 2] = A.z, sred[sl][4 * quad + 3] = A.w;
  __syncthreads();
  const int row = job.row0 + k / G, head = job.kv_head * G + k % G;
  if (tid < 32) {
    float a = 0.0f;
#pragma unroll 8
    for (int i = 0; i < 32; ++i) a += sred[i][tid];
    const float L = sML[1];
    b.out[int64_t(row) * b.out_stride + int64_t(head) * D + dc * 32 + tid] = L > 0.0f ? a / L : 0.0f;
    if (dc == 0 && tid == 0) {
      const int64_t mi = int64_t(row) * hq + head;
      if (mi < scr.ml_pairs) scr.ml[2 * mi] = sML[0], scr.ml[2 * mi + 1] = L;
      else atomicOr(err, kErrAttnScratch);
    }
  }
}

template <int T, int SUB, int W, int CH>
__global__ void __launch_bounds__(kThreads, 2) attn_kernel(KVDev kv, AttnBatch b, AttnScratch scr, int hq, int fast, uint32_t* err) {
  constexpr int EPL = W * CH, GPW = 32 / SUB, NG = kWarps * GPW;
  const AttnJob job = b.jobs[blockIdx.x];
  if (job.n_rows <= 0) return;
  if (scr.prefill_taken && prefill_takes(job, kv.sc[0] || kv.sc[1])) return;  // attention_prefill.cu ran it
  if (fast && fast_job(job, b.n_group)) return;  // attn_fast_kernel's job
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
    if (threadIdx.x < kNP) merge_group_states<NG, kNP>(sM, sL, sF, sMLk, threadIdx.x);
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
__global__ void __launch_bounds__(128) attn_merge_kernel(AttnBatch b, AttnScratch scr, int hq, int fast, uint32_t* err) {
  const AttnJob job = b.jobs[blockIdx.x];
  if (job.n_rows <= 0 || job.n_rows >= kAttnSplitMaxRows) return;
  if (fast && fast_job(job, b.n_group)) return;
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

// What one call launches (all host-known: the batch's shape hints, the store, the pointers).
struct Plan {
  bool fast = false;       // attn_fast_kernel + its merge, for the jobs fast_job() takes
  bool legacy = false;     // attn_kernel (prefill jobs, and decode jobs the fast path does not take)
  bool legacy_merge = false;
  int Sg = 0;              // grid.y of the fast kernel (>= every fast job's split count)
  int fast_pairs = 0;      // pairs per fast job the merge grid covers
};

int next_pow2(int n) {
  int p = 1;
  while (p < n && p < (1 << 30)) p <<= 1;
  return p;
}

bool fast_possible(const KVDev& kv, const AttnBatch& b) {
  if (std::getenv("HEADROOM_CUDA_ATTN_LEGACY")) return false;  // A/B runs of the legacy kernel (read per call)
  const int D = b.head_dim;
  if (D != 64 && D != 128 && D != 256) return false;
  if (kv.page_size <= 0 || kv.page_size % 4 != 0 || b.n_group > kFastNP) return false;
  auto al16 = [](const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; };
  for (int t = 0; t < 2; ++t)
    if (!al16(kv.k[t]) || !al16(kv.v[t]) || !al16(kv.pos[t])) return false;
  return al16(b.q) && b.q_stride % 4 == 0;
}

Plan plan_for(const KVDev& kv, const AttnBatch& b) {
  Plan pl;
  const int G = b.n_group;
  const bool may_decode = b.n_decode_jobs != 0;
  const bool may_prefill = !(b.max_rows > 0 && b.max_rows < kAttnSplitMaxRows) && b.n_decode_jobs != b.n_jobs;
  const int decode_rows = b.max_rows > 0 ? std::min(b.max_rows, kAttnSplitMaxRows - 1) : kAttnSplitMaxRows - 1;
  const bool ok = fast_possible(kv, b);
  pl.fast = may_decode && ok;
  const bool covers = ok && decode_rows * G <= kFastNP;  // every decode job is a fast one
  pl.legacy_merge = may_decode && !covers;
  pl.legacy = may_prefill || pl.legacy_merge;
  if (pl.fast) {
    const int a = (kFastMinSplitSlots + kv.page_size - 1) / kv.page_size;  // fast_pps's floor
    if (b.max_pages > 0) {
      const int n = next_pow2(b.max_pages);
      pl.Sg = n <= kFastMaxSplits * a ? (n + a - 1) / a : kFastMaxSplits;  // the most splits of any n_pages <= n
    } else {
      pl.Sg = kFastMaxSplits;
    }
    pl.Sg = std::max(pl.Sg, 1);
    pl.fast_pairs = std::min(kFastNP, decode_rows * G);
  }
  return pl;
}

size_t legacy_partial_floats(int n_jobs, int n_group, int head_dim) {
  const size_t n = size_t(n_jobs) * kAttnSplits * size_t(kAttnSplitMaxRows) * size_t(n_group) * size_t(head_dim + 2);
  return (n + 3) & ~size_t(3);  // the fast partials start 16-byte aligned behind these
}

// Pass 1 of attn_fast_kernel (only_score: the jobs with `score` alone).
template <int T, int D, int MODE>
cudaError_t fast_pass1(const KVDev& kv, const AttnBatch& b, const Plan& pl, float* part, int only_score, uint32_t* err,
                       cudaStream_t s) {
  using C = FastCfg<T, D>;
  static PerDeviceOnce attr;
  if (const int dev = current_device(); attr.needed(dev)) {
    cudaError_t e = cudaFuncSetAttribute(attn_fast_kernel<T, D, MODE>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         int(C::SMEM));
    if (e == cudaSuccess)  // two blocks per SM need the largest shared-memory carveout
      e = cudaFuncSetAttribute(attn_fast_kernel<T, D, MODE>, cudaFuncAttributePreferredSharedMemoryCarveout,
                               int(cudaSharedmemCarveoutMaxShared));
    if (e != cudaSuccess) return e;
    attr.done(dev);
  }
  attn_fast_kernel<T, D, MODE><<<dim3(unsigned(b.n_jobs), unsigned(pl.Sg)), kThreads, C::SMEM, s>>>(kv, b, part, pl.Sg,
                                                                                                  only_score, err);
  return cudaGetLastError();
}

// Pass 1 of attn_tc_kernel (skip_score: leave the jobs with `score` to attn_fast_kernel).
template <int D>
cudaError_t tc_pass1(const KVDev& kv, const AttnBatch& b, const Plan& pl, float* part, int skip_score, uint32_t* err,
                     cudaStream_t s) {
  using C = FastCfg<kKVF16, D>;
  static PerDeviceOnce attr;
  if (const int dev = current_device(); attr.needed(dev)) {
    cudaError_t e = cudaFuncSetAttribute(attn_tc_kernel<D>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(C::SMEM));
    if (e == cudaSuccess)
      e = cudaFuncSetAttribute(attn_tc_kernel<D>, cudaFuncAttributePreferredSharedMemoryCarveout,
                               int(cudaSharedmemCarveoutMaxShared));
    if (e != cudaSuccess) return e;
    attr.done(dev);
  }
  attn_tc_kernel<D><<<dim3(unsigned(b.n_jobs), unsigned(pl.Sg)), kTcThreads, C::SMEM, s>>>(kv, b, part, pl.Sg, skip_score,
                                                                                           err);
  return cudaGetLastError();
}

// HEADROOM_CUDA_ATTN_FAST_MODE=1|2|3 (A/B runs; F16/Q8_0 with head_dim 64/128 only): attn_fast_kernel's MODE
// (and the tensor-core kernel off).
int fast_mode() {
  const char* v = std::getenv("HEADROOM_CUDA_ATTN_FAST_MODE");
  return v ? std::atoi(v) : 0;
}
// HEADROOM_CUDA_ATTN_TC=0: F16 fast jobs on attn_fast_kernel instead of the tensor-core kernel (A/B runs; read
// per call).
bool tc_enabled() {
  const char* v = std::getenv("HEADROOM_CUDA_ATTN_TC");
  return !(v && std::strcmp(v, "0") == 0) && fast_mode() == 0;
}

template <int T, int D>
cudaError_t run_fast(const KVDev& kv, const AttnBatch& b, const Plan& pl, const AttnScratch& scr, int hq, uint32_t* err,
                     cudaStream_t s) {
  float* part = scr.partial + legacy_partial_floats(b.n_jobs, b.n_group, b.head_dim);
  cudaError_t e = cudaSuccess;
  bool done = false;
  if constexpr (T == kKVF16 && D <= 128) {
    if (tc_enabled()) {
      const bool scores = kv.sc[0] || kv.sc[1];  // evict's score jobs stay on the exact kernel
      e = tc_pass1<D>(kv, b, pl, part, scores ? 1 : 0, err, s);
      if (e == cudaSuccess && scores) e = fast_pass1<T, D, 0>(kv, b, pl, part, 1, err, s);
      done = true;
    }
  }
  if constexpr ((T == kKVF16 || T == kKVQ8) && D <= 128) {
    if (!done) {
      const int mode = fast_mode();
      if (mode == 1) e = fast_pass1<T, D, 1>(kv, b, pl, part, 0, err, s), done = true;
      if (mode == 2) e = fast_pass1<T, D, 2>(kv, b, pl, part, 0, err, s), done = true;
      if (mode == 3) e = fast_pass1<T, D, 3>(kv, b, pl, part, 0, err, s), done = true;
    }
  }
  if (!done) e = fast_pass1<T, D, 0>(kv, b, pl, part, 0, err, s);
  if (e != cudaSuccess) return e;
  attn_fast_merge_kernel<D><<<dim3(unsigned(b.n_jobs), unsigned(pl.fast_pairs * (D / 32))), kThreads, 0, s>>>(
      b, part, pl.Sg, kv.page_size, scr, hq, err);
  return cudaGetLastError();
}

template <int T, int D, int MODE>
int fast_occupancy() {
  int n = 0;
  if (cudaFuncSetAttribute(attn_fast_kernel<T, D, MODE>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                           int(FastCfg<T, D>::SMEM)) != cudaSuccess)
    return -1;
  cudaFuncSetAttribute(attn_fast_kernel<T, D, MODE>, cudaFuncAttributePreferredSharedMemoryCarveout,
                       int(cudaSharedmemCarveoutMaxShared));
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, attn_fast_kernel<T, D, MODE>, kThreads, FastCfg<T, D>::SMEM) !=
      cudaSuccess)
    return -1;
  return n;
}

template <int T, int SUB, int W, int CH>
cudaError_t run(const KVDev& kv, const AttnBatch& b, const Plan& pl, const AttnScratch& scr, int hq, uint32_t* err,
                cudaStream_t s) {
  if (pl.fast) {
    cudaError_t e = cudaSuccess;
    switch (b.head_dim) {
      case 64: e = run_fast<T, 64>(kv, b, pl, scr, hq, err, s); break;
      case 128: e = run_fast<T, 128>(kv, b, pl, scr, hq, err, s); break;
      default: e = run_fast<T, 256>(kv, b, pl, scr, hq, err, s); break;
    }
    if (e != cudaSuccess) return e;
  }
  const dim3 grid(unsigned(b.n_jobs), kAttnSplits);
  const int fast = pl.fast ? 1 : 0;
  if (pl.legacy) {
    const size_t smem = attn_smem<SUB, W, CH>(b.head_dim);
    static PerDeviceOnce attr;
    if (const int dev = current_device(); attr.needed(dev)) {
      cudaError_t e = cudaFuncSetAttribute(attn_kernel<T, SUB, W, CH>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           int(attn_smem<SUB, W, CH>(256)));
      if (e != cudaSuccess) return e;
      attr.done(dev);
    }
    attn_kernel<T, SUB, W, CH><<<grid, kThreads, smem, s>>>(kv, b, scr, hq, fast, err);
    if (cudaError_t e = cudaGetLastError(); e != cudaSuccess) return e;
  }
  if (pl.legacy_merge) {
    attn_merge_kernel<<<dim3(unsigned(b.n_jobs), unsigned(kAttnSplitMaxRows * b.n_group)), 128, 0, s>>>(b, scr, hq, fast, err);
    if (cudaError_t e = cudaGetLastError(); e != cudaSuccess) return e;
  }
  if (kv.sc[0] || kv.sc[1]) {
    attn_score_kernel<T, SUB, W, CH><<<grid, kThreads, 0, s>>>(kv, b, scr, hq);
    if (cudaError_t e = cudaGetLastError(); e != cudaSuccess) return e;
  }
  return cudaSuccess;
}

template <int T>
cudaError_t run_type(const KVDev& kv, const AttnBatch& b, const Plan& pl, const AttnScratch& scr, int hq, uint32_t* err,
                     cudaStream_t s) {
  switch (b.head_dim) {
    case 64: return run<T, 8, 8, 1>(kv, b, pl, scr, hq, err, s);
    case 128: return run<T, 16, 8, 1>(kv, b, pl, scr, hq, err, s);
    case 256: return run<T, 32, 8, 1>(kv, b, pl, scr, hq, err, s);
    default: return run<T, 32, 1, 8>(kv, b, pl, scr, hq, err, s);
  }
}

}  // namespace

int attn_tc_blocks_per_sm(int head_dim) {
  int n = 0;
  auto occ = [&](auto kern, size_t smem) {
    if (cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)) != cudaSuccess) return -1;
    cudaFuncSetAttribute(kern, cudaFuncAttributePreferredSharedMemoryCarveout, int(cudaSharedmemCarveoutMaxShared));
    if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kern, kTcThreads, smem) != cudaSuccess) return -1;
    return n;
  };
  return head_dim == 64 ? occ(attn_tc_kernel<64>, FastCfg<kKVF16, 64>::SMEM) : occ(attn_tc_kernel<128>, FastCfg<kKVF16, 128>::SMEM);
}

int attn_fast_blocks_per_sm(int kv_type, int head_dim) {
  if (head_dim == 64) return kv_type == kKVQ8 ? fast_occupancy<kKVQ8, 64, 0>() : fast_occupancy<kKVF16, 64, 0>();
  return kv_type == kKVQ8 ? fast_occupancy<kKVQ8, 128, 0>() : fast_occupancy<kKVF16, 128, 0>();
}

size_t attn_partial_floats(const KVDev& kv, const AttnBatch& b) {
  const Plan pl = plan_for(kv, b);
  return legacy_partial_floats(b.n_jobs, b.n_group, b.head_dim) +
         (pl.fast ? size_t(b.n_jobs) * size_t(pl.Sg) * kFastNP * size_t(b.head_dim + 2) : 0);
}

cudaError_t launch_attention(const KVDev& kv, const AttnBatch& b, const AttnScratch& scr, uint32_t* err, cudaStream_t s) {
  if (b.n_jobs <= 0) return cudaSuccess;
  const int hq = int(b.out_stride / b.head_dim);
  AttnScratch sc = scr;
  Plan pl = plan_for(kv, b);
  if (prefill_attention_fits(kv, b)) {  // tensor-core prefill (attention_prefill.cu) takes the long jobs
    if (cudaError_t e = launch_prefill_attention(kv, b, scr, err, s); e != cudaSuccess) return e;
    sc.prefill_taken = 1;
    // The split kernel is still needed for decode jobs the fast path leaves, and for score jobs (slot scores).
    if (!kv.sc[0] && !kv.sc[1]) pl.legacy = pl.legacy_merge;
  }
  switch (kv.type) {
    case kKVF32: return run_type<kKVF32>(kv, b, pl, sc, hq, err, s);
    case kKVF16: return run_type<kKVF16>(kv, b, pl, sc, hq, err, s);
    case kKVBF16: return run_type<kKVBF16>(kv, b, pl, sc, hq, err, s);
    default: return run_type<kKVQ8>(kv, b, pl, sc, hq, err, s);
  }
}

}  // namespace headroom::cuda
