// CPU backend: paged attention with an online (flash-attention style) softmax.
//
// A job's slots (all pages, in order) are walked in chunks of kChunk slots. For every query row and head
// the kernel keeps a running max m, a running sum l and an output accumulator acc[head_dim]; per chunk it
// computes the scores of the allowed slots, rescales (l, acc) once if the max grew, and adds
// p_s = e^(s - m) and p_s * V_s. Disallowed slots (pos -1, in the future, outside the window) get no
// score, and chunks where a row allows nothing are skipped for that row.
//
// Parallel decomposition (a function of the job shapes only, never of the thread count, so results are
// bit-identical for any number of threads):
//   * jobs with >= kSplitMaxRows rows (prefill): one task per block of kRowBlock rows over all slots;
//   * jobs with fewer rows (decode) and more than kSeg slots: split-K, one task per segment of ~kSeg
//     slots producing a partial (m, l, acc) per row and head, merged afterwards in segment order.
// Score accumulation (pages with score_acc, the `evict` policy) runs as a second pass once the final
// (m, l) of every row and head is known: p = e^(s - m) / l is recomputed (same scores bit for bit) and
// summed over the job's rows and heads per slot, one task per (job, segment), so every slot is written
// by exactly one task.
#include "backend/cpu/attention.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "util/error.h"

namespace headroom::cpu {

namespace {

constexpr int kChunk = 16;         // slots per online-softmax step (one AVX-512 vector of scores)
constexpr int kSeg = 512;          // slots per split-K segment
constexpr int kSplitMaxRows = 8;   // jobs with fewer rows are split over slot segments
constexpr int kRowBlock = 8;       // rows per task for the other jobs
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

struct Piece {
  int page;
  int s0, s1;  // slot range within the page
};

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

// dots[s] = q · k[s] for s < cnt (k is slot-major, D floats per slot).
inline void dot_chunk(const float* q, const float* k, int D, int cnt, float* dots) {
#if defined(HR_AVX512)
  // Four slots at a time share the q loads; hsum4 reduces them together. Past the end, the last slot is
  // repeated (and dropped), so a slot's score never depends on its position in the chunk.
  for (int g = 0; g < cnt; g += 4) {
    const float* kr[4];
    for (int t = 0; t < 4; ++t) kr[t] = k + size_t(std::min(g + t, cnt - 1)) * size_t(D);
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int d = 0;
    for (; d + 16 <= D; d += 16) {
      const __m512 qv = _mm512_loadu_ps(q + d);
      a0 = _mm512_fmadd_ps(qv, _mm512_loadu_ps(kr[0] + d), a0);
      a1 = _mm512_fmadd_ps(qv, _mm512_loadu_ps(kr[1] + d), a1);
      a2 = _mm512_fmadd_ps(qv, _mm512_loadu_ps(kr[2] + d), a2);
      a3 = _mm512_fmadd_ps(qv, _mm512_loadu_ps(kr[3] + d), a3);
    }
    if (d < D) {
      const __mmask16 m = __mmask16((1u << (D - d)) - 1);
      const __m512 qv = _mm512_maskz_loadu_ps(m, q + d);
      a0 = _mm512_fmadd_ps(qv, _mm512_maskz_loadu_ps(m, kr[0] + d), a0);
      a1 = _mm512_fmadd_ps(qv, _mm512_maskz_loadu_ps(m, kr[1] + d), a1);
      a2 = _mm512_fmadd_ps(qv, _mm512_maskz_loadu_ps(m, kr[2] + d), a2);
      a3 = _mm512_fmadd_ps(qv, _mm512_maskz_loadu_ps(m, kr[3] + d), a3);
    }
    _mm_storeu_ps(dots + g, hsum4(a0, a1, a2, a3));  // dots has room for kChunk + 4
  }
#else
  for (int s = 0; s < cnt; ++s) {
    const float* kr = k + size_t(s) * size_t(D);
    VecF acc = vzero();
    int d = 0;
    for (; d + kVL <= D; d += kVL) acc = vfma(vload(q + d), vload(kr + d), acc);
    if (d < D) acc = vfma(vload_part(q + d, D - d), vload_part(kr + d, D - d), acc);
    dots[s] = vsum(acc);
  }
#endif
}

// Unnormalized probabilities of one chunk against the max m: p[s] = e^(dots[s]*scale - m) for allowed s,
// 0 otherwise. Returns the sum of p. With update, first raises m to the chunk's max and returns alpha
// = e^(m_old - m_new) through *alpha.
inline float chunk_probs(const float* dots, uint32_t mask, float scale, float* m, bool update, float* alpha,
                         float* p) {
#if defined(HR_AVX512)
  const __mmask16 k = __mmask16(mask);
  const __m512 s = _mm512_mask_mul_ps(_mm512_set1_ps(kNegInf), k, _mm512_loadu_ps(dots), _mm512_set1_ps(scale));
  if (update) {
    const float m_new = std::max(*m, _mm512_reduce_max_ps(s));
    *alpha = *m == m_new ? 1.0f : exp_scalar(*m - m_new);  // e^-inf = 0 when m was -inf
    *m = m_new;
  }
  const __m512 e = _mm512_maskz_mov_ps(k, exp16(_mm512_sub_ps(s, _mm512_set1_ps(*m))));
  _mm512_storeu_ps(p, e);
  return _mm512_reduce_add_ps(e);
#else
  float sc[kChunk];
  float cm = kNegInf;
  for (int i = 0; i < kChunk; ++i) {
    sc[i] = (mask >> i) & 1 ? dots[i] * scale : kNegInf;
    cm = std::max(cm, sc[i]);
  }
  if (update) {
    const float m_new = std::max(*m, cm);
    *alpha = *m == m_new ? 1.0f : exp_scalar(*m - m_new);
    *m = m_new;
  }
  float sum = 0.0f;
  for (int i = 0; i < kChunk; ++i) {
    p[i] = (mask >> i) & 1 ? exp_scalar(sc[i] - *m) : 0.0f;
    sum += p[i];
  }
  return sum;
#endif
}

// acc = acc * alpha + sum over allowed s of p[s] * v[s].
inline void accumulate_v(float* acc, float alpha, const float* p, uint32_t mask, const float* v, int D) {
  for (int d = 0; d < D; d += kVL) {
    const int w = std::min(kVL, D - d);
    VecF a = w == kVL ? vload(acc + d) : vload_part(acc + d, w);
    if (alpha != 1.0f) a = vmul(a, vset1(alpha));
    for (uint32_t b = mask; b; b &= b - 1) {
      const int s = __builtin_ctz(b);
      const float* vs = v + size_t(s) * size_t(D) + d;
      a = vfma(vset1(p[s]), w == kVL ? vload(vs) : vload_part(vs, w), a);
    }
    if (w == kVL) vstore(acc + d, a);
    else vstore_part(acc + d, a, w);
  }
}

// Online softmax of rows [r0, r1) of a job over the given pieces. ml holds (m, l) and acc holds head_dim
// floats per (row - r0, head), initialized by the caller.
void run_rows(const AttnJob& job, const Piece* pieces, size_t n_pieces, int r0, int r1, float* ml, float* acc) {
  const int D = job.head_dim, G = job.n_group;
  alignas(64) float dots[kChunk + 4];
  alignas(64) float p[kChunk];
  for (size_t pi = 0; pi < n_pieces; ++pi) {
    const AttnPage& page = job.pages[size_t(pieces[pi].page)];
    for (int c0 = pieces[pi].s0; c0 < pieces[pi].s1; c0 += kChunk) {
      const int cnt = std::min(kChunk, pieces[pi].s1 - c0);
      const float* kc = page.k + size_t(c0) * size_t(D);
      const float* vc = page.v + size_t(c0) * size_t(D);
      for (int r = r0; r < r1; ++r) {
        const uint32_t mask = allowed_mask(page.pos + c0, cnt, job.q_pos[r], job.sinks, job.window);
        if (!mask) continue;
        for (int h = 0; h < G; ++h) {
          const size_t st = size_t(r - r0) * size_t(G) + size_t(h);
          const float* q = job.q + int64_t(r) * job.q_stride + int64_t(job.head0 + h) * D;
          dot_chunk(q, kc, D, cnt, dots);
          float alpha = 1.0f;
          const float sum = chunk_probs(dots, mask, job.scale, &ml[2 * st], true, &alpha, p);
          ml[2 * st + 1] = ml[2 * st + 1] * alpha + sum;
          accumulate_v(acc + st * size_t(D), alpha, p, mask, vc, D);
        }
      }
    }
  }
}

void init_states(float* ml, float* acc, size_t n_states, int D) {
  for (size_t i = 0; i < n_states; ++i) {
    ml[2 * i] = kNegInf;
    ml[2 * i + 1] = 0.0f;
  }
  std::fill(acc, acc + n_states * size_t(D), 0.0f);
}

// out = acc / l for one (row, head), zeros when nothing was allowed.
void write_out(float* out, const float* acc, float l, int D) {
  if (l > 0.0f) {
    const float inv = 1.0f / l;
    for (int d = 0; d < D; ++d) out[d] = acc[d] * inv;
  } else {
    std::fill(out, out + D, 0.0f);
  }
}

// Score pass for the pieces of one segment: score_acc[s] += sum over rows, heads of e^(s - m) / l.
void accumulate_scores(const AttnJob& job, const Piece* pieces, size_t n_pieces, const float* final_ml) {
  const int D = job.head_dim, G = job.n_group;
  alignas(64) float dots[kChunk + 4];
  alignas(64) float p[kChunk];
  for (size_t pi = 0; pi < n_pieces; ++pi) {
    const AttnPage& page = job.pages[size_t(pieces[pi].page)];
    if (!page.score_acc) continue;
    for (int c0 = pieces[pi].s0; c0 < pieces[pi].s1; c0 += kChunk) {
      const int cnt = std::min(kChunk, pieces[pi].s1 - c0);
      const float* kc = page.k + size_t(c0) * size_t(D);
      float tot[kChunk] = {};
      uint32_t any = 0;
      for (int r = 0; r < job.n_rows; ++r) {
        const uint32_t mask = allowed_mask(page.pos + c0, cnt, job.q_pos[r], job.sinks, job.window);
        if (!mask) continue;
        any |= mask;
        for (int h = 0; h < G; ++h) {
          const size_t st = size_t(r) * size_t(G) + size_t(h);
          float m = final_ml[2 * st];
          const float l = final_ml[2 * st + 1];
          const float* q = job.q + int64_t(r) * job.q_stride + int64_t(job.head0 + h) * D;
          dot_chunk(q, kc, D, cnt, dots);
          chunk_probs(dots, mask, job.scale, &m, false, nullptr, p);
          for (int s = 0; s < kChunk; ++s) tot[s] += p[s] / l;
        }
      }
      for (uint32_t b = any; b; b &= b - 1) {
        const int s = __builtin_ctz(b);
        page.score_acc[c0 + s] += tot[s];
      }
    }
  }
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

}  // namespace

void attention(ThreadPool& pool, AttnScratch& scratch, std::span<const AttnJob> jobs) {
  const int T = pool.size();
  std::vector<Piece> pieces;
  std::vector<int> seg_begin;
  std::vector<JobPlan> plans(jobs.size());
  std::vector<Task> tasks;
  size_t partial_total = 0, ml_total = 0, state_max = 0;
  bool any_scores = false;

  for (size_t ji = 0; ji < jobs.size(); ++ji) {
    const AttnJob& job = jobs[ji];
    JobPlan& plan = plans[ji];
    if (job.n_rows < 0 || job.n_group <= 0 || job.head_dim <= 0)
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
      const AttnPage& page = job.pages[pg];
      if (page.n_slots < 0) fail("cpu backend: attention: page with {} slots", page.n_slots);
      if (page.n_slots > 0 && (!page.k || !page.v || !page.pos))
        fail("cpu backend: attention: page without k, v or pos");
      if (page.score_acc && page.n_slots > 0) plan.scores = true;
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
    plan.ml_off = ml_total;
    ml_total += 2 * n_states;
    any_scores |= plan.scores;
    if (plan.split) {
      plan.partial_off = partial_total;
      partial_total += size_t(plan.n_seg) * n_states * size_t(job.head_dim + 2);
      for (int g = 0; g < plan.n_seg; ++g) tasks.push_back({int(ji), g, 0});
    } else {
      state_max = std::max(state_max, size_t(kRowBlock) * size_t(job.n_group) * size_t(job.head_dim + 2));
      for (int r = 0; r < job.n_rows; r += kRowBlock)
        tasks.push_back({int(ji), r, std::min(job.n_rows, r + kRowBlock)});
    }
  }
  if (tasks.empty()) return;
  if (scratch.partial.size() < partial_total) scratch.partial.resize(partial_total);
  if (scratch.final_ml.size() < ml_total) scratch.final_ml.resize(ml_total);
  if (scratch.thread.size() < size_t(T)) scratch.thread.resize(size_t(T));
  for (int t = 0; t < T; ++t) scratch.thread[size_t(t)].ensure(state_max * sizeof(float));

  // Pass 1: online softmax per task.
  pool.parallel_for(int64_t(tasks.size()), [&](int64_t ti, int th) {
    const Task& task = tasks[size_t(ti)];
    const AttnJob& job = jobs[size_t(task.job)];
    const JobPlan& plan = plans[size_t(task.job)];
    const int D = job.head_dim, G = job.n_group;
    const Piece* jp = pieces.data() + plan.piece0;
    if (plan.split) {
      const size_t n_states = size_t(job.n_rows) * size_t(G);
      float* base = scratch.partial.data() + plan.partial_off + size_t(task.a) * n_states * size_t(D + 2);
      float* ml = base;
      float* acc = base + 2 * n_states;
      init_states(ml, acc, n_states, D);
      const int pb = seg_begin[plan.seg0 + size_t(task.a)], pe = seg_begin[plan.seg0 + size_t(task.a) + 1];
      run_rows(job, jp + pb, size_t(pe - pb), 0, job.n_rows, ml, acc);
      return;
    }
    const size_t n_states = size_t(task.b - task.a) * size_t(G);
    float* ml = static_cast<float*>(scratch.thread[size_t(th)].ensure(0));
    float* acc = ml + 2 * n_states;
    init_states(ml, acc, n_states, D);
    run_rows(job, jp, plan.n_pieces, task.a, task.b, ml, acc);
    for (int r = task.a; r < task.b; ++r)
      for (int h = 0; h < G; ++h) {
        const size_t st = size_t(r - task.a) * size_t(G) + size_t(h);
        write_out(job.out + int64_t(r) * job.out_stride + int64_t(job.head0 + h) * D, acc + st * size_t(D),
                  ml[2 * st + 1], D);
        float* fin = scratch.final_ml.data() + plan.ml_off + 2 * (size_t(r) * size_t(G) + size_t(h));
        fin[0] = ml[2 * st];
        fin[1] = ml[2 * st + 1];
      }
  });

  // Merge the split-K partials, in segment order (small: rows * heads * segments * head_dim).
  std::vector<float> merged;
  for (size_t ji = 0; ji < jobs.size(); ++ji) {
    const JobPlan& plan = plans[ji];
    if (!plan.split) continue;
    const AttnJob& job = jobs[ji];
    const int D = job.head_dim, G = job.n_group;
    const size_t n_states = size_t(job.n_rows) * size_t(G);
    merged.resize(size_t(D));
    for (size_t st = 0; st < n_states; ++st) {
      const float* seg0 = scratch.partial.data() + plan.partial_off;
      const size_t seg_stride = n_states * size_t(D + 2);
      float m = kNegInf;
      for (int g = 0; g < plan.n_seg; ++g) m = std::max(m, seg0[size_t(g) * seg_stride + 2 * st]);
      float l = 0.0f;
      std::fill(merged.begin(), merged.end(), 0.0f);
      if (m != kNegInf) {
        for (int g = 0; g < plan.n_seg; ++g) {
          const float* ml = seg0 + size_t(g) * seg_stride;
          if (ml[2 * st] == kNegInf) continue;
          const float f = exp_scalar(ml[2 * st] - m);
          l += ml[2 * st + 1] * f;
          const float* acc = ml + 2 * n_states + st * size_t(D);
          for (int d = 0; d < D; ++d) merged[size_t(d)] += acc[d] * f;
        }
      }
      const int r = int(st / size_t(G)), h = int(st % size_t(G));
      write_out(job.out + int64_t(r) * job.out_stride + int64_t(job.head0 + h) * D, merged.data(), l, D);
      float* fin = scratch.final_ml.data() + plan.ml_off + 2 * st;
      fin[0] = m;
      fin[1] = l;
    }
  }

  if (!any_scores) return;
  // Pass 2: probabilities into score_acc. One task per (job, segment) owns those slots. Jobs are assumed
  // to use disjoint score_acc arrays; if two jobs name the same array, the pass runs on one thread.
  std::vector<Task> stasks;
  std::vector<const float*> accs;
  for (size_t ji = 0; ji < jobs.size(); ++ji) {
    if (!plans[ji].scores || jobs[ji].n_rows == 0) continue;
    for (int g = 0; g < plans[ji].n_seg; ++g) stasks.push_back({int(ji), g, 0});
    std::vector<const float*> mine;
    for (const AttnPage& pg : jobs[ji].pages)
      if (pg.score_acc) mine.push_back(pg.score_acc);
    std::sort(mine.begin(), mine.end());
    mine.erase(std::unique(mine.begin(), mine.end()), mine.end());
    accs.insert(accs.end(), mine.begin(), mine.end());
  }
  std::sort(accs.begin(), accs.end());
  const bool shared = std::adjacent_find(accs.begin(), accs.end()) != accs.end();
  auto score_task = [&](int64_t ti, int) {
    const Task& task = stasks[size_t(ti)];
    const JobPlan& plan = plans[size_t(task.job)];
    const int pb = seg_begin[plan.seg0 + size_t(task.a)], pe = seg_begin[plan.seg0 + size_t(task.a) + 1];
    accumulate_scores(jobs[size_t(task.job)], pieces.data() + plan.piece0 + pb, size_t(pe - pb),
                      scratch.final_ml.data() + plan.ml_off);
  };
  if (shared) {
    for (size_t ti = 0; ti < stasks.size(); ++ti) score_task(int64_t(ti), 0);
  } else {
    pool.parallel_for(int64_t(stasks.size()), score_task);
  }
}

}  // namespace headroom::cpu
