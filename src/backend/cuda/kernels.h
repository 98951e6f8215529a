// CUDA backend: the kernels' launch functions (kernels.cu, matmul.cu, attention.cu), called by the host
// code in cuda_backend.cpp. Plain C++ (no fmt, no exceptions thrown here): a launch returns the launch's
// cudaError_t and the caller turns it into a one-line Error naming the op.
//
// Device error word: kernels that meet bad input they cannot refuse on the host (token ids, page ids and
// slots that live in device memory) OR a code into *err and skip the bad item. The host reads the word at
// every download/synchronize and fails with a message naming the op (see cuda_backend.cpp).
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

#include "backend/backend.h"

namespace headroom::cuda {

enum ErrBits : uint32_t {
  kErrEmbedId = 1u << 0,     // embed: token id out of range
  kErrKVSlot = 1u << 1,      // kv_store / kv_copy_slots: slot out of range
  kErrAttnPage = 1u << 2,    // attention: page id out of range
  kErrAttnShape = 1u << 3,   // attention: a job with a bad shape (negative counts, group too large)
  kErrSelect = 1u << 4,      // select_pages: candidates outside the job's pages, or a bad page id
  kErrAttnScratch = 1u << 5, // attention: an output row beyond the scratch the host sized
};

// Weight types as the kernels see them (device copies; see cuda_backend.cpp upload_weight):
//   F32 / F16 / BF16: dense rows of `cols` elements (row stride = cols);
//   Q8_0: repacked: int8 values [rows][cols], then fp16 scales [rows][cols / 32] (at byte rows * cols,
//         rounded up to 256).
enum class WT : int { F32 = 0, F16 = 1, BF16 = 2, Q8_0 = 3 };
#if defined(__CUDACC__)
#define HR_HD __host__ __device__
#else
#define HR_HD
#endif
HR_HD inline size_t q8_scales_offset(int64_t rows, int64_t cols) { return (size_t(rows) * size_t(cols) + 255) & ~size_t(255); }

// The KV store's arrays as the kernels see them (both tiers; host tier = mapped pinned memory).
struct KVDev {
  uint8_t* k[2] = {nullptr, nullptr};
  uint8_t* v[2] = {nullptr, nullptr};
  int32_t* pos[2] = {nullptr, nullptr};
  float* sc[2] = {nullptr, nullptr};  // null without slot scores
  float* minmax = nullptr;            // [id][2][head_dim] (min, then max); null without key bounds
  int32_t dev_pages = 0, total_pages = 0;
  int page_size = 0, head_dim = 0, rb = 0;  // rb: bytes per stored K/V row
  int type = 0;                             // KVType
};

// ---- element-wise and per-row ops (kernels.cu) --------------------------------------------------------
cudaError_t launch_embed(WT t, const void* w, int64_t rows, int64_t cols, const int32_t* ids, int64_t n, float* out,
                         uint32_t* err, cudaStream_t s);
cudaError_t launch_rmsnorm(const float* x, const float* w, int64_t n, int64_t dim, float eps, float* out, cudaStream_t s);
cudaError_t launch_rope(float* x, int64_t n, int64_t n_heads, int64_t head_dim, const int32_t* pos, int n_rot, bool neox,
                        float theta_scale, float freq_scale, const float* freq_factors, cudaStream_t s);
// x += y, then out = rmsnorm(x) * w: the bits of launch_add then launch_rmsnorm. out may alias x or y.
cudaError_t launch_add_rmsnorm(float* x, const float* y, const float* w, int64_t n, int64_t dim, float eps, float* out,
                               cudaStream_t s);
cudaError_t launch_swiglu(const float* g, const float* u, int64_t count, float* out, cudaStream_t s);
cudaError_t launch_add(float* x, const float* y, int64_t count, cudaStream_t s);
cudaError_t launch_add_bias(float* x, const float* b, int64_t n, int64_t dim, cudaStream_t s);
// dst[pairs[2i]] = pairs[2i + 1] for n (index, value) pairs (the step's page table, updated in place).
cudaError_t launch_scatter_i32(int32_t* dst, const int32_t* pairs, int64_t n, cudaStream_t s);

// ---- KV (kernels.cu) ----------------------------------------------------------------------------------
cudaError_t launch_kv_reset(const KVDev& kv, const int32_t* ids, int n, cudaStream_t s);
cudaError_t launch_kv_store(const KVDev& kv, const float* k, const float* v, int64_t n_rows, int n_kv_heads,
                            const int32_t* slots, const int32_t* pos, uint32_t* err, cudaStream_t s);
// RoPE on q [n][n_head][head_dim] and k [n][n_kv_heads][head_dim] in place, then kv_store of k and v: the bits
// of launch_rope (twice) then launch_kv_store. head_dim is the store's; n_rot <= head_dim <= 256.
cudaError_t launch_rope_store(const KVDev& kv, float* q, float* k, const float* v, int64_t n, int n_head, int n_kv_heads,
                              const int32_t* pos, const int32_t* slots, int n_rot, bool neox, float theta_scale,
                              float freq_scale, const float* freq_factors, uint32_t* err, cudaStream_t s);
// Runs the copies in order (one block); copies: device memory.
cudaError_t launch_kv_copy_slots(const KVDev& kv, const SlotCopy* copies, int n, uint32_t* err, cudaStream_t s);

// ---- select_pages (kernels.cu) ------------------------------------------------------------------------
cudaError_t launch_select_pages(const KVDev& kv, const AttnBatch& b, uint32_t* err, cudaStream_t s);

// ---- matmul (matmul.cu) -------------------------------------------------------------------------------
// y[n][rows] = x[n][cols] . W^T for n <= kGemvMaxRows with the batch-invariant GEMV kernels. For Q8_0, xq/xd
// is scratch for x quantized to Q8_0 (n * cols bytes, n * cols / 32 floats).
constexpr int kGemvMaxRows = 32;
cudaError_t launch_gemv(WT t, const void* w, int64_t rows, int64_t cols, const float* x, int64_t n, float* y,
                        int8_t* xq, float* xd, cudaStream_t s);
// Fused GEMVs for one activation row (matmul.cu), on the shapes launch_gemv's vector kernel takes (gemv_fits):
// every output has the bits launch_gemv gives it. Q8_0: xq/xd as for launch_gemv (x quantized once).
bool gemv_fits(WT t, int64_t cols, const float* x);
constexpr int kGemvGroupMax = 4;
struct GemvPart {
  const void* w = nullptr;
  int64_t rows = 0;
  float* y = nullptr;
};
// y_p = x . W_p^T for up to kGemvGroupMax weights of one type and `cols`, in one launch.
cudaError_t launch_gemv_group(WT t, const GemvPart* parts, int n_parts, int64_t cols, const float* x, int8_t* xq, float* xd,
                              cudaStream_t s);
// out = silu(x . G^T) * (x . U^T) (G, U: rows x cols): the bits of two launch_gemv then launch_swiglu.
cudaError_t launch_gemv_swiglu(WT t, const void* gate, const void* up, int64_t rows, int64_t cols, const float* x,
                               float* out, int8_t* xq, float* xd, cudaStream_t s);
// Tensor-core skinny GEMM (matmul.cu): y[n][rows] = x[n][cols] . W^T for F16/BF16/Q8_0 weights, n <= kSkinnyMaxRows,
// cols % 32 == 0, x 16-byte aligned (skinny_takes). Batch invariant (results depend on the weight shape only).
// scratch: skinny_scratch_bytes (split/quantized activations, split-K partials).
constexpr int kSkinnyMaxRows = 64;
int skinny_splits(int64_t rows, int64_t cols);  // split-K factor (a function of the shape only)
bool skinny_takes(WT t, int64_t cols, int64_t n, const float* x);
size_t skinny_scratch_bytes(WT t, int64_t rows, int64_t cols, int64_t n);
cudaError_t launch_skinny(WT t, const void* w, int64_t rows, int64_t cols, const float* x, int64_t n, float* y,
                          void* scratch, cudaStream_t s);
// Conversions for the cuBLAS (prefill) path.
cudaError_t launch_f32_to_f16(const float* x, void* out, int64_t count, cudaStream_t s);
cudaError_t launch_f32_to_bf16(const float* x, void* out, int64_t count, cudaStream_t s);
// Rows [r0, r0 + nr) of a repacked Q8_0 weight to dense fp16 [nr][cols].
cudaError_t launch_q8_to_f16(const void* w, int64_t rows, int64_t cols, int64_t r0, int64_t nr, void* out, cudaStream_t s);

// ---- attention (attention.cu) -------------------------------------------------------------------------
constexpr int kAttnSplits = 64;      // slot splits per decode job (fixed: results do not depend on the batch)
constexpr int kAttnSplitMaxRows = 4; // jobs with fewer rows are split over slots, then merged
// Scratch the host provides: partial states [n_jobs][kAttnSplits][kAttnSplitMaxRows * n_group][head_dim + 2]
// and final (max, sum) per output (row, head): [ml_rows * (out_stride / head_dim)][2].
struct AttnScratch {
  float* partial = nullptr;
  float* ml = nullptr;
  int64_t ml_pairs = 0;  // capacity of ml in (row, head) pairs
  int prefill_taken = 0; // 1: the tensor-core prefill kernel ran the jobs prefill_takes() names; attn_kernel skips them
  float* pf_part = nullptr;  // prefill split-KV ranges: prefill_split_scratch().floats floats
  int pf_splits = 1;         // ... sized for this many ranges
};
// The jobs the tensor-core prefill kernel (attention_prefill.cu) takes when it runs: >= kAttnSplitMaxRows rows,
// and not a score job on a store with slot scores (those need the exact path's bit-for-bit score recomputation).
HR_HD inline bool prefill_takes(const AttnJob& j, bool store_has_scores) {
  return j.n_rows >= kAttnSplitMaxRows && !(j.score && store_has_scores);
}
// Resident blocks per SM of the fast decode kernel (F16 or Q8_0, head_dim 64 or 128; for the benchmarks).
int attn_fast_blocks_per_sm(int kv_type, int head_dim);
// Blocks per SM of the tensor-core decode kernel (F16 KV, head_dim 64 or 128), for the benchmark.
int attn_tc_blocks_per_sm(int head_dim);
// Floats of `partial` that launch_attention needs for this batch (host-known: the batch's shape hints, the store).
size_t attn_partial_floats(const KVDev& kv, const AttnBatch& b);
// Runs every job: pass 1 (split partials or whole rows), merge, and (if the store keeps slot scores) the
// score pass. head_dim <= 256 and n_group <= 64 (checked by the caller).
cudaError_t launch_attention(const KVDev& kv, const AttnBatch& b, const AttnScratch& scr, uint32_t* err,
                             cudaStream_t s);

// ---- tensor-core prefill attention (attention_prefill.cu) ---------------------------------------------
// Whether the batch's host-known shape lets the prefill kernel run (max_rows >= 4, head_dim 64 or 128).
bool prefill_attention_fits(const KVDev& kv, const AttnBatch& b);
// Runs the jobs prefill_takes() names (F16/BF16 operands, F32 accumulation); writes their outputs only (not
// the (max, sum) scratch: score jobs are not taken where the store keeps scores).
cudaError_t launch_prefill_attention(const KVDev& kv, const AttnBatch& b, const AttnScratch& scr, uint32_t* err,
                                     cudaStream_t s);
// Long jobs are cut into KV ranges merged afterwards (split-KV): how many ranges a batch gets, and the scratch
// they need beside an (max, sum) scratch of `pairs` (row, head) pairs.
struct PrefillSplitScratch {
  int splits = 1;     // KV ranges (1: no split)
  size_t floats = 0;  // scratch they need (0 without a split)
};
PrefillSplitScratch prefill_split_scratch(const KVDev& kv, const AttnBatch& b, int64_t pairs);

}  // namespace headroom::cuda
