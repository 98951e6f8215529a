// CPU backend: paged attention with an online (flash-attention style) softmax.
//
// A job's slots (all pages, in order) are walked in chunks of kChunk = 16 slots (a chunk may span small
// pages: it holds a K/V row pointer per slot). For every query row and head ("pair") the kernel keeps a
// running max m, a running sum l (16 lanes, summed at the end) and an output accumulator acc[head_dim]. Per chunk and pair it computes the scores of the allowed slots,
// rescales (l, acc) by e^(m_old - m_new) if the max grew, and adds p_s = e^(s - m) and p_s * V_s.
// Disallowed slots (pos -1, in the future, outside the window) never contribute and their K/V rows are
// never used in arithmetic that reaches a result (so garbage in empty slots is harmless); a chunk where a
// row allows nothing is skipped for that row.
//
// Kernels (AVX-512, head_dim % 16 == 0):
//   * scores: when a job has >= 4 (row, head) pairs, the chunk's K rows are transposed once into
//     Kt[head_dim][16] and each pair's 16 scores are accumulated with broadcast-q FMAs (no horizontal
//     sums); eight pairs (then four) share each Kt load. Otherwise (decode with few heads), each slot's dot over
//     head_dim accumulates in its own register and the 16 are reduced together (hsum16).
//   * P·V: for head_dim 64 / 128 the accumulators of 4 / 2 pairs live in registers while the chunk's V
//     rows stream past, so each V row is loaded once per group of pairs. With more pairs than one such
//     group, a stored (F16/BF16/Q8_0) V row is converted to floats once per chunk, not once per group.
// Other builds / head_dims use simple vector loops with the same structure.
//
// KV types: with AVX-512 and head_dim 64 / 128 the kernels read the stored rows of every type directly
// (load16: F16 through vcvtph2ps, BF16 by a shift, Q8_0 by int8 -> float times the block's scale), so
// F16/BF16 move half the bytes of F32 and Q8_0 about a quarter. Otherwise the K/V rows of each 16-slot chunk
// are converted into a small per-thread float scratch first. The conversions are exact, so both routes
// compute the same values; nothing ever converts more than one chunk at a time.
//
// Parallel decomposition (a function of the job shapes only, never of the thread count, so results are
// bit-identical for any number of threads):
//   * jobs with >= kSplitMaxRows rows (prefill): one task per block of kRowBlock rows over all slots
//     (kBigRowBlock rows for jobs of >= kBigRowRows rows and groups <= 8: each transposed K chunk and
//     converted V row then serves twice the pairs);
//   * jobs with fewer rows (decode) and more than kSeg slots: split-K, one task per segment of kSeg
//     slots producing a partial (m, l, acc) per pair, merged afterwards in segment order. These walks
//     are bound by memory: the next chunk's K/V rows are prefetched while one is processed.
// Score accumulation (pages with a score array, the `evict` policy) runs as a second pass once the final
// (m, l) of every pair is known: p = e^(s - m) / l is recomputed with the same score kernel (the same
// scores bit for bit) and summed over the job's rows and heads per slot, one task per (job, segment), so
// every slot is written by exactly one task.
#include "backend/cpu/attention.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "backend/cpu/kv_store.h"
#include "util/error.h"

namespace headroom::cpu {

namespace {

constexpr int kChunk = 16;         // slots per online-softmax step (one AVX-512 vector of scores)
constexpr int kSeg = 512;          // slots per split-K segment
constexpr int kSplitMaxRows = 8;   // jobs with fewer rows are split over slot segments
constexpr int kRowBlock = 8;       // rows per task for the other jobs (kBigRowBlock for long ones)
constexpr int kBigRowBlock = 16;   // with >= kBigRowRows rows and at most 8 heads per KV head: the
constexpr int kBigRowRows = 64;    //   transposed K chunk and each converted V row serve twice the pairs
constexpr int kMaxTransposedDim = 256;
constexpr int kMaxGroup = 64;      // query heads per KV head
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Rows per task of an unsplit job, and (row, head) pairs a task's scratch holds: functions of the job shape.
// (Grouping rows into tasks never changes a row's arithmetic.)
inline int row_block(int n_rows, int n_group) {
  return n_rows >= kBigRowRows && n_group <= 8 ? kBigRowBlock : kRowBlock;
}
inline size_t task_pairs(int n_rows, int n_group) { return size_t(row_block(n_rows, n_group)) * size_t(n_group); }

struct Piece {
  int page;
  int s0, s1;  // slot range within the page
};

// Up to kChunk consecutive slots of a job (they may come from several pages): row pointers and positions.
struct Chunk {
  int cnt = 0;
  int32_t pos[kChunk];
  // K and V rows as the kernels read them: the stored rows (F32, or any type the kernels read directly),
  // or float conversions of them in the scratch.
  const uint8_t* k[kChunk];
  const uint8_t* v[kChunk];
  float* score[kChunk];  // score slot, or null
  uint32_t scored = 0;   // bit s set iff score[s] is not null
};

// How a job's stored rows become the float rows the kernels read.
struct KVConv {
  KVType type = KVType::F32;
  bool direct = false;      // the kernels read `type` rows themselves (else F32 or converted rows)
  size_t rb = 0;            // bytes per stored row
  float* kbuf = nullptr;    // kChunk rows of ld floats each (types other than F32)
  float* vbuf = nullptr;
  size_t ld = 0;
  bool need_v = true;
};

// Unless the kernels read the stored rows (F32, or direct), converts the rows of real tokens (pos >= 0) to
// floats in the scratch and points the chunk at them; the rows of empty slots are never used in arithmetic
// that reaches a result.
inline void convert_chunk(Chunk& c, const KVConv& cv, int D) {
  if (cv.type == KVType::F32 || cv.direct) return;
  for (int i = 0; i < c.cnt; ++i) {
    float* kd = cv.kbuf + size_t(i) * cv.ld;
    float* vd = cv.vbuf + size_t(i) * cv.ld;
    if (c.pos[i] >= 0) {
      kv_decode_row(cv.type, c.k[i], D, kd);
      if (cv.need_v) kv_decode_row(cv.type, c.v[i], D, vd);
    }
    c.k[i] = reinterpret_cast<const uint8_t*>(kd);
    c.v[i] = reinterpret_cast<const uint8_t*>(vd);
  }
}

// A full chunk of slots [s, s + kChunk) of one page.
inline void fill_chunk(Chunk& c, const KernelPage& page, int s, size_t rb) {
  c.cnt = kChunk;
  std::memcpy(c.pos, page.pos + s, sizeof(c.pos));
#if defined(HR_AVX512)
  const __m512i step = _mm512_mullo_epi64(_mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7), _mm512_set1_epi64(int64_t(rb)));
  const __m512i eight = _mm512_set1_epi64(int64_t(rb * 8));
  const __m512i k0 = _mm512_add_epi64(_mm512_set1_epi64(reinterpret_cast<int64_t>(page.k + size_t(s) * rb)), step);
  const __m512i v0 = _mm512_add_epi64(_mm512_set1_epi64(reinterpret_cast<int64_t>(page.v + size_t(s) * rb)), step);
  _mm512_storeu_si512(c.k, k0);
  _mm512_storeu_si512(c.k + 8, _mm512_add_epi64(k0, eight));
  _mm512_storeu_si512(c.v, v0);
  _mm512_storeu_si512(c.v + 8, _mm512_add_epi64(v0, eight));
#else
  for (int i = 0; i < kChunk; ++i) {
    c.k[i] = page.k + size_t(s + i) * rb;
    c.v[i] = page.v + size_t(s + i) * rb;
  }
#endif
  for (int i = 0; i < kChunk; ++i) c.score[i] = page.score ? page.score + s + i : nullptr;
  c.scored = page.score ? 0xFFFFu : 0u;
}

// Prefetches the K and V rows of slots [s, s + n) of a page (no effect on results).
inline void prefetch_rows(const KernelPage& page, int s, int n, size_t rb) {
  if (n <= 0) return;
  const size_t bytes = size_t(n) * rb;
  const uint8_t* k = page.k + size_t(s) * rb;
  const uint8_t* v = page.v + size_t(s) * rb;
  for (size_t off = 0; off < bytes; off += 64) {
    __builtin_prefetch(k + off, 0, 3);
    __builtin_prefetch(v + off, 0, 3);
  }
}

// Calls f(chunk) for the slots of the pieces, in order, kChunk at a time (the last chunk may be short).
// For jobs of few rows (decode: each K/V row is used by few pairs, so the walk is bound by memory), the
// rows of the next chunk are prefetched before a whole chunk is processed.
template <typename F>
void for_each_chunk(const KernelJob& job, const KVConv& cv, const Piece* pieces, size_t n_pieces, F&& f) {
  const size_t rb = cv.rb;
  const bool prefetch = job.n_rows < kSplitMaxRows;
  const int D = job.head_dim;
  Chunk c;
  for (size_t pi = 0; pi < n_pieces; ++pi) {
    const KernelPage& page = job.pages[size_t(pieces[pi].page)];
    for (int s = pieces[pi].s0; s < pieces[pi].s1; ++s) {
      if (c.cnt == 0 && s + kChunk <= pieces[pi].s1) {  // a whole chunk inside this page
        fill_chunk(c, page, s, rb);
        if (prefetch) {
          if (s + kChunk < pieces[pi].s1)
            prefetch_rows(page, s + kChunk, std::min(kChunk, pieces[pi].s1 - s - kChunk), rb);
          else if (pi + 1 < n_pieces)
            prefetch_rows(job.pages[size_t(pieces[pi + 1].page)], pieces[pi + 1].s0,
                          std::min(kChunk, pieces[pi + 1].s1 - pieces[pi + 1].s0), rb);
        }
        convert_chunk(c, cv, D);
        f(c);
        c.cnt = 0;
        c.scored = 0;
        s += kChunk - 1;
        continue;
      }
      c.pos[c.cnt] = page.pos[s];
      c.k[c.cnt] = page.k + size_t(s) * rb;
      c.v[c.cnt] = page.v + size_t(s) * rb;
      c.score[c.cnt] = page.score ? page.score + s : nullptr;
      if (page.score) c.scored |= 1u << c.cnt;
      if (++c.cnt == kChunk) {
        convert_chunk(c, cv, D);
        f(c);
        c.cnt = 0;
        c.scored = 0;
      }
    }
  }
  if (c.cnt) {
    convert_chunk(c, cv, D);
    f(c);
  }
}

// ---- per-pair running state -----------------------------------------------------------------------------
// [0] m, [16..31] l as 16 partial sums, [32 ..) acc[head_dim] (64-byte aligned when the base is).
constexpr size_t kStateHead = 32;
inline size_t state_stride(int D) { return kStateHead + (size_t(D) + 15) / 16 * 16; }

void init_state(float* st, int D) {
  st[0] = kNegInf;
  std::fill(st + 1, st + kStateHead + size_t(D), 0.0f);
}
inline float state_l(const float* st) {
  float l = 0.0f;
  for (int i = 0; i < 16; ++i) l += st[16 + i];
  return l;
}

// Per-thread scratch of the chunk kernels.
struct ChunkScratch {
  float* scores;  // pairs x 16: raw dots, then probabilities
  float* alpha;   // pairs
  float* kt;      // kMaxTransposedDim x 16 (transposed K chunk)
  float* kconv;   // kChunk x conv_ld(D): K rows converted from the KV type
  float* vconv;
};
inline size_t conv_ld(int D) { return (size_t(D) + 15) / 16 * 16; }
inline size_t chunk_scratch_floats(size_t pairs, int D) {
  return kMaxTransposedDim * 16 + pairs * 16 + (pairs + 15) / 16 * 16 + 2 * kChunk * conv_ld(D);
}
ChunkScratch make_chunk_scratch(float* base, size_t pairs, int D) {
  ChunkScratch c;
  c.kt = base;
  c.scores = base + kMaxTransposedDim * 16;
  c.alpha = c.scores + pairs * 16;
  c.kconv = c.alpha + (pairs + 15) / 16 * 16;
  c.vconv = c.kconv + kChunk * conv_ld(D);
  return c;
}

// Bit s set iff slot s (< cnt) of the chunk may be attended by a query at position qp.
inline uint32_t allowed_mask(const int32_t* pos, int cnt, int32_t qp, int32_t sinks, int32_t window) {
  const int64_t lo64 = int64_t(qp) - int64_t(window);  // allowed (outside sinks) iff pos > lo
#if defined(HR_AVX512)
  const __mmask16 valid = __mmask16((1u << cnt) - 1);
  const __m512i p = _mm512_maskz_loadu_epi32(valid, pos);
  __mmask16 m = _mm512_mask_cmpge_epi32_mask(valid, p, _mm512_setzero_si512());
  m = _mm512_mask_cmple_epi32_mask(m, p, _mm512_set1_epi32(qp));
  if (window != 0) {
    const int32_t lo = int32_t(std::clamp<int64_t>(lo64, INT32_MIN, INT32_MAX));
    const __mmask16 w = _mm512_cmplt_epi32_mask(p, _mm512_set1_epi32(sinks)) |
                        (lo64 < INT32_MIN ? valid : _mm512_cmpgt_epi32_mask(p, _mm512_set1_epi32(lo)));
    m &= w;
  }
  return m;
#else
  uint32_t m = 0;
  for (int s = 0; s < cnt; ++s) {
    const int32_t ps = pos[s];
    if (ps < 0 || ps > qp) continue;
    if (window != 0 && !(ps < sinks || int64_t(ps) > lo64)) continue;
    m |= 1u << s;
  }
  return m;
#endif
}

// ---- scores ---------------------------------------------------------------------------------------------

#if defined(HR_AVX512)
// {sum(v[0]), ..., sum(v[15])}: a transpose-and-add network (every input goes through the same tree, so
// a slot's sum does not depend on its lane).
inline __m512 hsum16(const __m512 (&v)[16]) {
  __m512 t[8], u[4];
  for (int k = 0; k < 8; ++k)  // per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3]
    t[k] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * k], v[2 * k + 1]), _mm512_unpackhi_ps(v[2 * k], v[2 * k + 1]));
  for (int k = 0; k < 4; ++k)  // per 128-bit lane: partial sums of v[4k..4k+3]
    u[k] = _mm512_add_ps(_mm512_shuffle_ps(t[2 * k], t[2 * k + 1], 0x44), _mm512_shuffle_ps(t[2 * k], t[2 * k + 1], 0xEE));
  const __m512 w0 = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], 0x88), _mm512_shuffle_f32x4(u[0], u[1], 0xDD));
  const __m512 w1 = _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], 0x88), _mm512_shuffle_f32x4(u[2], u[3], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(w0, w1, 0x88), _mm512_shuffle_f32x4(w0, w1, 0xDD));
}
#endif

#if defined(HR_AVX512)
// Elements [d, d + 16) of a stored row of type T as floats (d % 16 == 0). The conversions are exact, so a
// kernel reading a type directly computes what it would from the row converted to floats first.
template <KVType T>
inline __m512 load16(const uint8_t* row, int d) {
  if constexpr (T == KVType::F32) {
    return _mm512_loadu_ps(reinterpret_cast<const float*>(row) + d);
  } else if constexpr (T == KVType::F16) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + 2 * d)));
  } else if constexpr (T == KVType::BF16) {
    return vload_bf16(reinterpret_cast<const uint16_t*>(row + 2 * d));
  } else {  // Q8_0: block d / 32 (fp16 scale, 32 int8), half d % 32
    const uint8_t* b = row + size_t(d / 32) * 34;
    uint16_t h;
    std::memcpy(&h, b, 2);
    const __m512 qf = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 2 + d % 32))));
    return _mm512_mul_ps(qf, _mm512_set1_ps(_cvtsh_ss(h)));
  }
}
#endif

// dots[s] = q · k[s] for s < cnt (D values per row, type T: F32 unless the job reads its type directly);
// dots has room for 16 values.
template <KVType T>
inline void dot_chunk(const float* q, const uint8_t* const* k, int D, int cnt, float* dots) {
#if defined(HR_AVX512)
  // One accumulator per slot (past cnt the last slot is repeated and dropped), reduced together.
  const uint8_t* kr[16];
  for (int t = 0; t < 16; ++t) kr[t] = k[std::min(t, cnt - 1)];
  __m512 a[16];
  for (auto& v : a) v = _mm512_setzero_ps();
  int d = 0;
  for (; d + 16 <= D; d += 16) {
    const __m512 qv = _mm512_loadu_ps(q + d);
    for (int t = 0; t < 16; ++t) a[t] = _mm512_fmadd_ps(qv, load16<T>(kr[t], d), a[t]);
  }
  if constexpr (T == KVType::F32) {
    if (d < D) {
      const __mmask16 m = __mmask16((1u << (D - d)) - 1);
      const __m512 qv = _mm512_maskz_loadu_ps(m, q + d);
      for (int t = 0; t < 16; ++t)
        a[t] = _mm512_fmadd_ps(qv, _mm512_maskz_loadu_ps(m, reinterpret_cast<const float*>(kr[t]) + d), a[t]);
    }
  }
  _mm512_storeu_ps(dots, hsum16(a));
#else
  for (int s = 0; s < cnt; ++s) {
    const float* kr = reinterpret_cast<const float*>(k[s]);
    VecF acc = vzero();
    int d = 0;
    for (; d + kVL <= D; d += kVL) acc = vfma(vload(q + d), vload(kr + d), acc);
    if (d < D) acc = vfma(vload_part(q + d, D - d), vload_part(kr + d, D - d), acc);
    dots[s] = vsum(acc);
  }
#endif
}

#if defined(HR_AVX512)
// 16x16 transpose: out[c] lane r = in[r] lane c.
inline void transpose16(const __m512 (&in)[16], __m512 (&out)[16]) {
  __m512 t[16], u[16];
  for (int i = 0; i < 8; ++i) {  // per 128-bit lane: t[2i] = [a0 b0 a1 b1], t[2i+1] = [a2 b2 a3 b3]
    t[2 * i] = _mm512_unpacklo_ps(in[2 * i], in[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(in[2 * i], in[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {  // u[4i+k] per 128-bit lane L: element 4L+k of rows 4i..4i+3
    u[4 * i + 0] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
    u[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
    u[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
    u[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
  }
  for (int k = 0; k < 4; ++k) {  // gather the 128-bit lanes: column 4L+k = lane L of u[k], u[4+k], ...
    const __m512 v0 = _mm512_shuffle_f32x4(u[k], u[4 + k], 0x88);
    const __m512 v1 = _mm512_shuffle_f32x4(u[k], u[4 + k], 0xDD);
    const __m512 v2 = _mm512_shuffle_f32x4(u[8 + k], u[12 + k], 0x88);
    const __m512 v3 = _mm512_shuffle_f32x4(u[8 + k], u[12 + k], 0xDD);
    out[k] = _mm512_shuffle_f32x4(v0, v2, 0x88);
    out[8 + k] = _mm512_shuffle_f32x4(v0, v2, 0xDD);
    out[4 + k] = _mm512_shuffle_f32x4(v1, v3, 0x88);
    out[12 + k] = _mm512_shuffle_f32x4(v1, v3, 0xDD);
  }
}

// kt[d*16 + s] = k[s][d] for s < cnt (0 for s >= cnt); D % 16 == 0.
template <KVType T>
void transpose_chunk(const uint8_t* const* k, int D, int cnt, float* kt) {
  for (int d0 = 0; d0 < D; d0 += 16) {
    __m512 in[16], out[16];
    for (int s = 0; s < 16; ++s) in[s] = s < cnt ? load16<T>(k[s], d0) : _mm512_setzero_ps();
    transpose16(in, out);
    for (int i = 0; i < 16; ++i) _mm512_store_ps(kt + size_t(d0 + i) * 16, out[i]);
  }
}

// Scores of NP (row, head) pairs against a transposed chunk: out[i][s] = q_i · k_s. Each pair keeps two
// accumulators (even and odd d), summed at the end: a pair's scores never depend on how pairs are grouped.
template <int NP>
void scores_transposed(const float* const* q, const float* kt, int D, float* const* out) {
  __m512 acc[NP][2];
  for (auto& r : acc)
    for (auto& v : r) v = _mm512_setzero_ps();
  const float* qi[NP];  // local copies: the stores cannot alias them
  float* oi[NP];
  for (int i = 0; i < NP; ++i) {
    qi[i] = q[i];
    oi[i] = out[i];
  }
  int d = 0;
  do {  // D >= 16: a loop that runs at least once keeps the accumulators in registers
    const __m512 k0 = _mm512_load_ps(kt + size_t(d) * 16);
    const __m512 k1 = _mm512_load_ps(kt + size_t(d + 1) * 16);
    for (int i = 0; i < NP; ++i) {
      acc[i][0] = _mm512_fmadd_ps(_mm512_set1_ps(qi[i][d]), k0, acc[i][0]);
      acc[i][1] = _mm512_fmadd_ps(_mm512_set1_ps(qi[i][d + 1]), k1, acc[i][1]);
    }
    d += 2;
  } while (d < D);
  for (int i = 0; i < NP; ++i) _mm512_storeu_ps(oi[i], _mm512_add_ps(acc[i][0], acc[i][1]));
}

// Transposed scores for n pairs, eight at a time (16 accumulators; each Kt load serves 8 pairs), the rest
// four at a time.
void scores_transposed_n(const float* const* q, const float* kt, int D, float* const* out, int n) {
  int i = 0;
  for (; i + 8 <= n; i += 8) scores_transposed<8>(q + i, kt, D, out + i);
  for (; i < n; i += 4) {
    switch (std::min(4, n - i)) {
      case 1: scores_transposed<1>(q + i, kt, D, out + i); break;
      case 2: scores_transposed<2>(q + i, kt, D, out + i); break;
      case 3: scores_transposed<3>(q + i, kt, D, out + i); break;
      default: scores_transposed<4>(q + i, kt, D, out + i); break;
    }
  }
}
#endif

// Whether a job's scores use the transposed-K kernel (a function of the job shape only).
bool use_transposed(const KernelJob& job) {
#if defined(HR_AVX512)
  return job.head_dim % 16 == 0 && job.head_dim <= kMaxTransposedDim && int64_t(job.n_rows) * job.n_group >= 4;
#else
  (void)job;
  return false;
#endif
}

inline const float* q_ptr(const KernelJob& job, int r, int h) {
  return job.q + int64_t(r) * job.q_stride + int64_t(job.head0 + h) * job.head_dim;
}

// Raw dots of all heads of row r for one chunk: sc[h*16 + s]. kt is the transposed chunk (if used).
template <KVType T>
void row_scores(const KernelJob& job, int r, const Chunk& c, bool transposed, const float* kt, float* sc) {
  const int D = job.head_dim, G = job.n_group;
#if defined(HR_AVX512)
  if (transposed) {
    const float* q[kMaxGroup];
    float* out[kMaxGroup];
    for (int h = 0; h < G; ++h) {
      q[h] = q_ptr(job, r, h);
      out[h] = sc + size_t(h) * 16;
    }
    scores_transposed_n(q, kt, D, out, G);
    return;
  }
#else
  (void)transposed;
  (void)kt;
#endif
  for (int h = 0; h < G; ++h) dot_chunk<T>(q_ptr(job, r, h), c.k, D, c.cnt, sc + size_t(h) * 16);
}

// ---- softmax and P·V ------------------------------------------------------------------------------------

// Turns raw dots into unnormalized probabilities p = e^(dot*scale - m) (0 where not allowed). With
// update, first raises the state's max m to the chunk's and rescales l; returns alpha = e^(m_old - m_new).
inline float chunk_probs(float* sc, uint32_t mask, float scale, float* st, bool update) {
  float alpha = 1.0f;
#if defined(HR_AVX512)
  const __mmask16 k = __mmask16(mask);
  const __m512 s = _mm512_mask_mul_ps(_mm512_set1_ps(kNegInf), k, _mm512_loadu_ps(sc), _mm512_set1_ps(scale));
  if (update) {
    const float m_new = std::max(st[0], _mm512_reduce_max_ps(s));
    if (st[0] != m_new)  // e^-inf = 0 when m was -inf
      alpha = _mm512_cvtss_f32(exp16(_mm512_set1_ps(st[0] - m_new)));
    st[0] = m_new;
  }
  const __m512 e = _mm512_maskz_mov_ps(k, exp16(_mm512_sub_ps(s, _mm512_set1_ps(st[0]))));
  _mm512_storeu_ps(sc, e);
  if (update) _mm512_storeu_ps(st + 16, _mm512_fmadd_ps(_mm512_loadu_ps(st + 16), _mm512_set1_ps(alpha), e));
#elif defined(HR_AVX2)
  // Two 8-lane halves; masked-off slots are -inf, their probabilities 0.
  const __m256i bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  auto lanes = [&](uint32_t m8) {
    return _mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(int(m8)), bit), bit));
  };
  const __m256 k0 = lanes(mask & 0xFFu), k1 = lanes((mask >> 8) & 0xFFu);
  const __m256 ninf = _mm256_set1_ps(kNegInf), sv = _mm256_set1_ps(scale);
  const __m256 s0 = _mm256_blendv_ps(ninf, _mm256_mul_ps(_mm256_loadu_ps(sc), sv), k0);
  const __m256 s1 = _mm256_blendv_ps(ninf, _mm256_mul_ps(_mm256_loadu_ps(sc + 8), sv), k1);
  if (update) {
    const __m256 m8 = _mm256_max_ps(s0, s1);
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(m8), _mm256_extractf128_ps(m8, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    h = _mm_max_ss(h, _mm_movehdup_ps(h));
    const float m_new = std::max(st[0], _mm_cvtss_f32(h));
    alpha = st[0] == m_new ? 1.0f : exp_scalar(st[0] - m_new);
    st[0] = m_new;
  }
  const __m256 mv = _mm256_set1_ps(st[0]);
  const __m256 e0 = _mm256_and_ps(k0, exp8(_mm256_sub_ps(s0, mv)));
  const __m256 e1 = _mm256_and_ps(k1, exp8(_mm256_sub_ps(s1, mv)));
  _mm256_storeu_ps(sc, e0);
  _mm256_storeu_ps(sc + 8, e1);
  if (update) st[16] = st[16] * alpha + vsum(_mm256_add_ps(e0, e1));
#else
  float s[kChunk];
  float cm = kNegInf;
  for (int i = 0; i < kChunk; ++i) {
    s[i] = (mask >> i) & 1 ? sc[i] * scale : kNegInf;
    cm = std::max(cm, s[i]);
  }
  if (update) {
    const float m_new = std::max(st[0], cm);
    alpha = st[0] == m_new ? 1.0f : exp_scalar(st[0] - m_new);
    st[0] = m_new;
  }
  float sum = 0.0f;
  for (int i = 0; i < kChunk; ++i) {
    sc[i] = (mask >> i) & 1 ? exp_scalar(s[i] - st[0]) : 0.0f;
    sum += sc[i];
  }
  if (update) st[16] = st[16] * alpha + sum;
#endif
  return alpha;
}

// acc = acc * alpha + sum over allowed s of p[s] * v[s] (any head_dim; accumulator in memory).
inline void accumulate_v(float* acc, float alpha, const float* p, uint32_t mask, const uint8_t* const* vrows, int D) {
  const float* const* v = reinterpret_cast<const float* const*>(vrows);
  for (int d = 0; d < D; d += kVL) {
    const int w = std::min(kVL, D - d);
    VecF a = w == kVL ? vload(acc + d) : vload_part(acc + d, w);
    if (alpha != 1.0f) a = vmul(a, vset1(alpha));
    for (uint32_t b = mask; b; b &= b - 1) {
      const int s = __builtin_ctz(b);
      const float* vs = v[s] + d;
      a = vfma(vset1(p[s]), w == kVL ? vload(vs) : vload_part(vs, w), a);
    }
    if (w == kVL) vstore(acc + d, a);
    else vstore_part(acc + d, a, w);
  }
}

#if defined(HR_AVX512)
// Register-blocked P·V for NP pairs over the slots in `mask`, head_dim = 16*NV: each V row is loaded once
// for the NP pairs.
template <int NV, int NP, KVType T>
void accumulate_v_regs(float* const* acc_in, const float* alpha, const float* const* p_in, uint32_t mask,
                       const uint8_t* const* v) {
  // Local copies of the pointers (the stores below cannot alias them) and a loop that runs at least once,
  // so the accumulators stay in registers from the first load to the last store.
  float* acc[NP];
  const float* p[NP];
  for (int h = 0; h < NP; ++h) {
    acc[h] = acc_in[h];
    p[h] = p_in[h];
  }
  __m512 a[NP][NV];
  for (int h = 0; h < NP; ++h) {
    const __m512 al = _mm512_set1_ps(alpha[h]);
    for (int i = 0; i < NV; ++i) a[h][i] = _mm512_mul_ps(_mm512_load_ps(acc[h] + 16 * i), al);
  }
  if (!mask) {
    for (int h = 0; h < NP; ++h)
      for (int i = 0; i < NV; ++i) _mm512_store_ps(acc[h] + 16 * i, a[h][i]);
    return;
  }
  {
    uint32_t b = mask;
    do {
      const int s = __builtin_ctz(b);
      const uint8_t* vs = v[s];
      for (int i = 0; i < NV; ++i) {
        const __m512 vv = load16<T>(vs, 16 * i);
        for (int h = 0; h < NP; ++h) a[h][i] = _mm512_fmadd_ps(_mm512_set1_ps(p[h][s]), vv, a[h][i]);
      }
      b &= b - 1;
    } while (b);
  }
  for (int h = 0; h < NP; ++h)
    for (int i = 0; i < NV; ++i) _mm512_store_ps(acc[h] + 16 * i, a[h][i]);
}

// P·V for n pairs, NV*16 = head_dim, in register blocks of PG pairs. The slots of a block are the union of
// its pairs' allowed slots: all of them hold real tokens (pos >= 0), and a pair's p is 0 on the others.
template <int NV, KVType T>
void pv_regs_n(float* const* st, const float* alpha, const float* const* p, const uint32_t* mask,
               const uint8_t* const* v, int n) {
  constexpr int PG = NV <= 4 ? 4 : 2;  // pairs per register block
  for (int i = 0; i < n; i += PG) {
    const int np = std::min(PG, n - i);
    float* acc[PG];
    uint32_t m = 0;
    for (int j = 0; j < np; ++j) {
      acc[j] = st[i + j] + kStateHead;
      m |= mask[i + j];
    }
    switch (np) {
      case 1: accumulate_v_regs<NV, 1, T>(acc, alpha + i, p + i, m, v); break;
      case 2: accumulate_v_regs<NV, 2, T>(acc, alpha + i, p + i, m, v); break;
      case 3: accumulate_v_regs<NV, (PG >= 3 ? 3 : 2), T>(acc, alpha + i, p + i, m, v); break;
      default: accumulate_v_regs<NV, PG, T>(acc, alpha + i, p + i, m, v); break;
    }
  }
}
#endif

// ---- the passes -----------------------------------------------------------------------------------------

// Online softmax of rows [r0, r1) (at most row_block) of a job over the given pieces. State of (row r,
// head h): states + ((r - r0) * G + h) * state_stride(D), initialized by the caller.
template <KVType T>
void run_rows(const KernelJob& job, const KVConv& cv, const Piece* pieces, size_t n_pieces, int r0, int r1,
              float* states, const ChunkScratch& cs) {
  const int D = job.head_dim, G = job.n_group;
  const size_t sst = state_stride(D);
#if defined(HR_AVX512)
  const bool transposed = use_transposed(job);
#endif
  // Active pairs of the current chunk (rows with an allowed slot, row-major, all heads).
  constexpr int kMaxPairs = std::max(kRowBlock * kMaxGroup, kBigRowBlock * 8);
  int n_pairs = 0;
  float* st[kMaxPairs];
  const float* q[kMaxPairs];
  float* sc[kMaxPairs];
  uint32_t pmask[kMaxPairs];
  for_each_chunk(job, cv, pieces, n_pieces, [&](const Chunk& c) {
    n_pairs = 0;
    for (int r = r0; r < r1; ++r) {
      const uint32_t m = allowed_mask(c.pos, c.cnt, job.q_pos[r], job.sinks, job.window);
      if (!m) continue;
      for (int h = 0; h < G; ++h, ++n_pairs) {
        const size_t pair = size_t(r - r0) * size_t(G) + size_t(h);
        st[n_pairs] = states + pair * sst;
        q[n_pairs] = q_ptr(job, r, h);
        sc[n_pairs] = cs.scores + size_t(n_pairs) * 16;
        pmask[n_pairs] = m;
      }
    }
    if (!n_pairs) return;
    // Scores.
#if defined(HR_AVX512)
    if (transposed) {
      transpose_chunk<T>(c.k, D, c.cnt, cs.kt);
      scores_transposed_n(q, cs.kt, D, sc, n_pairs);
    } else
#endif
    {
      for (int i = 0; i < n_pairs; ++i) dot_chunk<T>(q[i], c.k, D, c.cnt, sc[i]);
    }
    // Online softmax.
    for (int i = 0; i < n_pairs; ++i) cs.alpha[i] = chunk_probs(sc[i], pmask[i], job.scale, st[i], true);
    // P·V.
#if defined(HR_AVX512)
    if constexpr (T != KVType::F32) {
      // With more pairs than one register block, each V row would be converted once per block: convert the
      // rows in use once into the (otherwise unused) V scratch instead. Exact, so the same values.
      constexpr int PG = 4;  // pairs per register block of pv_regs_n at head_dim 64; 2 at 128
      if (n_pairs > (D == 64 ? PG : PG / 2)) {
        uint32_t used = 0;
        for (int i = 0; i < n_pairs; ++i) used |= pmask[i];
        const uint8_t* vf[kChunk] = {};
        for (uint32_t b = used; b; b &= b - 1) {
          const int s = __builtin_ctz(b);
          float* dst = cs.vconv + size_t(s) * conv_ld(D);
          for (int d = 0; d < D; d += 16) _mm512_storeu_ps(dst + d, load16<T>(c.v[s], d));
          vf[s] = reinterpret_cast<const uint8_t*>(dst);
        }
        if (D == 64) return pv_regs_n<4, KVType::F32>(st, cs.alpha, sc, pmask, vf, n_pairs);
        if (D == 128) return pv_regs_n<8, KVType::F32>(st, cs.alpha, sc, pmask, vf, n_pairs);
      }
    }
    if (D == 64) return pv_regs_n<4, T>(st, cs.alpha, sc, pmask, c.v, n_pairs);
    if (D == 128) return pv_regs_n<8, T>(st, cs.alpha, sc, pmask, c.v, n_pairs);
#endif
    if constexpr (T == KVType::F32)  // (direct types only run with head_dim 64 / 128)
      for (int i = 0; i < n_pairs; ++i) accumulate_v(st[i] + kStateHead, cs.alpha[i], sc[i], pmask[i], c.v, D);
  });
}

// out = acc / l for one pair, zeros when nothing was allowed.
void write_out(float* out, const float* acc, float l, int D) {
  if (l > 0.0f) {
    const float inv = 1.0f / l;
    for (int d = 0; d < D; ++d) out[d] = acc[d] * inv;
  } else {
    std::fill(out, out + D, 0.0f);
  }
}

// Score pass for the pieces of one segment: score[s] += sum over rows, heads of e^(s - m) / l.
template <KVType T>
void accumulate_scores(const KernelJob& job, const KVConv& cv, const Piece* pieces, size_t n_pieces,
                       const float* final_ml, const ChunkScratch& cs) {
  const int G = job.n_group;
  const bool transposed = use_transposed(job);
  for_each_chunk(job, cv, pieces, n_pieces, [&](const Chunk& c) {
    const uint32_t wanted = c.scored;  // slots of pages with scores
    if (!wanted) return;
    float tot[kChunk] = {};
    uint32_t any = 0;
#if defined(HR_AVX512)
    bool have_kt = false;
#endif
    for (int r = 0; r < job.n_rows; ++r) {
      const uint32_t mask = allowed_mask(c.pos, c.cnt, job.q_pos[r], job.sinks, job.window);
      if (!(mask & wanted)) continue;
      any |= mask;
#if defined(HR_AVX512)
      if (transposed && !have_kt) {
        transpose_chunk<T>(c.k, job.head_dim, c.cnt, cs.kt);
        have_kt = true;
      }
#endif
      row_scores<T>(job, r, c, transposed, cs.kt, cs.scores);
      for (int h = 0; h < G; ++h) {
        const size_t pair = size_t(r) * size_t(G) + size_t(h);
        float st[1] = {final_ml[2 * pair]};
        float* p = cs.scores + size_t(h) * 16;
        chunk_probs(p, mask, job.scale, st, false);
        const float l = final_ml[2 * pair + 1];
        for (int s = 0; s < kChunk; ++s) tot[s] += p[s] / l;
      }
    }
    for (uint32_t b = any & wanted; b; b &= b - 1) {
      const int s = __builtin_ctz(b);
      *c.score[s] += tot[s];
    }
  });
}

struct JobPlan {
  size_t piece0 = 0, n_pieces = 0;  // into pieces
  size_t seg0 = 0;                  // into seg_begin (n_seg + 1 entries, relative to piece0)
  int n_seg = 0;
  bool split = false;
  size_t partial_off = 0;           // into scratch.partial (split jobs)
  size_t ml_off = 0;                // into scratch.final_ml
  bool scores = false;
};

struct Task {
  int job;
  int a, b;  // row block [a, b) or segment a (split)
};

// The conversion state of a job for the thread whose chunk scratch is cs.
KVConv make_conv(KVType type, const KernelJob& job, const ChunkScratch& cs, bool need_v) {
  KVConv cv;
  cv.type = type;
#if defined(HR_AVX512)
  cv.direct = job.head_dim == 64 || job.head_dim == 128;
#endif
  cv.rb = size_t(kv_row_bytes(type, job.head_dim));
  cv.kbuf = cs.kconv;
  cv.vbuf = cs.vconv;
  cv.ld = conv_ld(job.head_dim);
  cv.need_v = need_v;
  return cv;
}

// Calls f.template operator()<T>() for the type the kernels read: the KV type itself when direct, else floats.
template <typename F>
void with_read_type(const KVConv& cv, F&& f) {
  switch (cv.direct ? cv.type : KVType::F32) {
    case KVType::F32: return f.template operator()<KVType::F32>();
#if defined(HR_AVX512)
    case KVType::F16: return f.template operator()<KVType::F16>();
    case KVType::BF16: return f.template operator()<KVType::BF16>();
    case KVType::Q8_0: return f.template operator()<KVType::Q8_0>();
#else
    default: break;
#endif
  }
}
template <typename... A>
void run_rows_any(const KernelJob& job, const KVConv& cv, A&&... a) {
  with_read_type(cv, [&]<KVType T>() { run_rows<T>(job, cv, a...); });
}
template <typename... A>
void accumulate_scores_any(const KernelJob& job, const KVConv& cv, A&&... a) {
  with_read_type(cv, [&]<KVType T>() { accumulate_scores<T>(job, cv, a...); });
}

}  // namespace

void attention(ThreadPool& pool, AttnScratch& scratch, KVType type, std::span<const KernelJob> jobs) {
  const int T = pool.size();
  std::vector<Piece> pieces;
  std::vector<int> seg_begin;
  std::vector<JobPlan> plans(jobs.size());
  std::vector<Task> tasks;
  size_t partial_total = 0, ml_total = 0, thread_floats = 0;
  bool any_scores = false;

  for (size_t ji = 0; ji < jobs.size(); ++ji) {
    const KernelJob& job = jobs[ji];
    JobPlan& plan = plans[ji];
    if (job.n_rows < 0 || job.n_group <= 0 || job.n_group > kMaxGroup || job.head_dim <= 0)
      fail("cpu backend: attention: bad job shape (rows {}, group {}, head_dim {})", job.n_rows, job.n_group,
           job.head_dim);
    if (job.n_rows == 0) continue;
    if (!job.q || !job.out || !job.q_pos) fail("cpu backend: attention: job without q, q_pos or out");
    // Pieces of at most kSeg slots; segments are runs of pieces of kSeg slots in total.
    plan.piece0 = pieces.size();
    plan.seg0 = seg_begin.size();
    seg_begin.push_back(0);
    int in_seg = 0;
    for (size_t pg = 0; pg < job.pages.size(); ++pg) {
      const KernelPage& page = job.pages[pg];
      if (page.n_slots < 0) fail("cpu backend: attention: page with {} slots", page.n_slots);
      if (page.n_slots > 0 && (!page.k || !page.v || !page.pos))
        fail("cpu backend: attention: page without k, v or pos");
      if (page.score && page.n_slots > 0) plan.scores = true;
      for (int off = 0; off < page.n_slots;) {
        const int take = std::min(page.n_slots - off, kSeg - in_seg);
        pieces.push_back({int(pg), off, off + take});
        off += take;
        in_seg += take;
        if (in_seg == kSeg) {
          seg_begin.push_back(int(pieces.size() - plan.piece0));
          in_seg = 0;
        }
      }
    }
    plan.n_pieces = pieces.size() - plan.piece0;
    if (in_seg > 0) seg_begin.push_back(int(plan.n_pieces));
    plan.n_seg = int(seg_begin.size() - plan.seg0 - 1);
    plan.split = job.n_rows < kSplitMaxRows && plan.n_seg > 1;
    const size_t n_states = size_t(job.n_rows) * size_t(job.n_group);
    const size_t sst = state_stride(job.head_dim);
    plan.ml_off = ml_total;
    ml_total += 2 * n_states;
    any_scores |= plan.scores;
    if (!kv_type_fits(type, job.head_dim).empty()) fail("cpu backend: attention: {}", kv_type_fits(type, job.head_dim));
    const size_t tp = task_pairs(job.n_rows, job.n_group);
    thread_floats = std::max(thread_floats, chunk_scratch_floats(tp, job.head_dim));
    if (plan.split) {
      plan.partial_off = partial_total;
      partial_total += size_t(plan.n_seg) * n_states * sst;
      for (int g = 0; g < plan.n_seg; ++g) tasks.push_back({int(ji), g, 0});
    } else {
      thread_floats = std::max(thread_floats, chunk_scratch_floats(tp, job.head_dim) + tp * sst);
      const int rb = row_block(job.n_rows, job.n_group);
      for (int r = 0; r < job.n_rows; r += rb) tasks.push_back({int(ji), r, std::min(job.n_rows, r + rb)});
    }
  }
  if (tasks.empty()) return;
  scratch.partial.ensure(partial_total * sizeof(float));
  if (scratch.final_ml.size() < ml_total) scratch.final_ml.resize(ml_total);
  if (scratch.thread.size() < size_t(T)) scratch.thread.resize(size_t(T));
  for (int t = 0; t < T; ++t) scratch.thread[size_t(t)].ensure(thread_floats * sizeof(float));
  float* const partial = static_cast<float*>(scratch.partial.ensure(0));

  // Pass 1: online softmax per task.
  pool.parallel_for(int64_t(tasks.size()), [&](int64_t ti, int th) {
    const Task& task = tasks[size_t(ti)];
    const KernelJob& job = jobs[size_t(task.job)];
    const JobPlan& plan = plans[size_t(task.job)];
    const int D = job.head_dim, G = job.n_group;
    const size_t sst = state_stride(D);
    const Piece* jp = pieces.data() + plan.piece0;
    float* tbuf = static_cast<float*>(scratch.thread[size_t(th)].ensure(0));
    const ChunkScratch cs = make_chunk_scratch(tbuf, task_pairs(job.n_rows, G), D);
    const size_t cs_floats = chunk_scratch_floats(task_pairs(job.n_rows, G), D);
    const KVConv cv = make_conv(type, job, cs, true);
    if (plan.split) {
      const size_t n_states = size_t(job.n_rows) * size_t(G);
      float* states = partial + plan.partial_off + size_t(task.a) * n_states * sst;
      for (size_t i = 0; i < n_states; ++i) init_state(states + i * sst, D);
      const int pb = seg_begin[plan.seg0 + size_t(task.a)], pe = seg_begin[plan.seg0 + size_t(task.a) + 1];
      run_rows_any(job, cv, jp + pb, size_t(pe - pb), 0, job.n_rows, states, cs);
      return;
    }
    const size_t n_states = size_t(task.b - task.a) * size_t(G);
    float* states = tbuf + (cs_floats + 15) / 16 * 16;
    for (size_t i = 0; i < n_states; ++i) init_state(states + i * sst, D);
    run_rows_any(job, cv, jp, plan.n_pieces, task.a, task.b, states, cs);
    for (int r = task.a; r < task.b; ++r)
      for (int h = 0; h < G; ++h) {
        const float* st = states + (size_t(r - task.a) * size_t(G) + size_t(h)) * sst;
        const float l = state_l(st);
        write_out(job.out + int64_t(r) * job.out_stride + int64_t(job.head0 + h) * D, st + kStateHead, l, D);
        float* fin = scratch.final_ml.data() + plan.ml_off + 2 * (size_t(r) * size_t(G) + size_t(h));
        fin[0] = st[0];
        fin[1] = l;
      }
  });

  // Merge the split-K partials, in segment order (small: rows * heads * segments * head_dim).
  std::vector<float> merged;
  for (size_t ji = 0; ji < jobs.size(); ++ji) {
    const JobPlan& plan = plans[ji];
    if (!plan.split) continue;
    const KernelJob& job = jobs[ji];
    const int D = job.head_dim, G = job.n_group;
    const size_t n_states = size_t(job.n_rows) * size_t(G), sst = state_stride(D);
    const float* seg0 = partial + plan.partial_off;
    const size_t seg_stride = n_states * sst;
    merged.resize(size_t(D));
    for (size_t pair = 0; pair < n_states; ++pair) {
      float m = kNegInf;
      for (int g = 0; g < plan.n_seg; ++g) m = std::max(m, seg0[size_t(g) * seg_stride + pair * sst]);
      float l = 0.0f;
      std::fill(merged.begin(), merged.end(), 0.0f);
      if (m != kNegInf) {
        for (int g = 0; g < plan.n_seg; ++g) {
          const float* st = seg0 + size_t(g) * seg_stride + pair * sst;
          if (st[0] == kNegInf) continue;
          const float f = exp_scalar(st[0] - m);
          l += state_l(st) * f;
          for (int d = 0; d < D; ++d) merged[size_t(d)] += st[kStateHead + size_t(d)] * f;
        }
      }
      const int r = int(pair / size_t(G)), h = int(pair % size_t(G));
      write_out(job.out + int64_t(r) * job.out_stride + int64_t(job.head0 + h) * D, merged.data(), l, D);
      float* fin = scratch.final_ml.data() + plan.ml_off + 2 * pair;
      fin[0] = m;
      fin[1] = l;
    }
  }

  if (!any_scores) return;
  // Pass 2: probabilities into the pages' scores. One task per (job, segment) owns those slots. Jobs are assumed
  // to score disjoint pages; if two jobs name the same page, the pass runs on one thread.
  std::vector<Task> stasks;
  std::vector<const float*> accs;
  for (size_t ji = 0; ji < jobs.size(); ++ji) {
    if (!plans[ji].scores || jobs[ji].n_rows == 0) continue;
    for (int g = 0; g < plans[ji].n_seg; ++g) stasks.push_back({int(ji), g, 0});
    std::vector<const float*> mine;
    for (const KernelPage& pg : jobs[ji].pages)
      if (pg.score) mine.push_back(pg.score);
    std::sort(mine.begin(), mine.end());
    mine.erase(std::unique(mine.begin(), mine.end()), mine.end());
    accs.insert(accs.end(), mine.begin(), mine.end());
  }
  std::sort(accs.begin(), accs.end());
  const bool shared = std::adjacent_find(accs.begin(), accs.end()) != accs.end();
  auto score_task = [&](int64_t ti, int th) {
    const Task& task = stasks[size_t(ti)];
    const JobPlan& plan = plans[size_t(task.job)];
    const KernelJob& job = jobs[size_t(task.job)];
    const ChunkScratch cs = make_chunk_scratch(static_cast<float*>(scratch.thread[size_t(th)].ensure(0)),
                                               task_pairs(job.n_rows, job.n_group), job.head_dim);
    const KVConv cv = make_conv(type, job, cs, false);
    const int pb = seg_begin[plan.seg0 + size_t(task.a)], pe = seg_begin[plan.seg0 + size_t(task.a) + 1];
    accumulate_scores_any(job, cv, pieces.data() + plan.piece0 + pb, size_t(pe - pb),
                      scratch.final_ml.data() + plan.ml_off, cs);
  };
  if (shared) {
    for (size_t ti = 0; ti < stasks.size(); ++ti) score_task(int64_t(ti), 0);
  } else {
    pool.parallel_for(int64_t(stasks.size()), score_task);
  }
}

}  // namespace headroom::cpu
