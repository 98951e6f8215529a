// CPU backend: the KV store's arrays and the KV row codecs (see kv_store.h).
#include "backend/cpu/kv_store.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "backend/cpu/quant.h"
#include "backend/cpu/simd.h"
#include "util/error.h"

namespace headroom::cpu {

void kv_encode_row(KVType t, const float* x, int D, uint8_t* dst) {
  switch (t) {
    case KVType::F32: std::memcpy(dst, x, size_t(D) * 4); return;
    case KVType::F16: {
      int d = 0;
#if defined(HR_AVX512)
      for (; d + 16 <= D; d += 16)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 2 * d),
                            _mm512_cvtps_ph(_mm512_loadu_ps(x + d), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#endif
      for (; d < D; ++d) {
        const uint16_t h = fp32_to_fp16(x[d]);
        std::memcpy(dst + 2 * d, &h, 2);
      }
      return;
    }
    case KVType::BF16:
      for (int d = 0; d < D; ++d) {
        const uint16_t h = fp32_to_bf16(x[d]);
        std::memcpy(dst + 2 * d, &h, 2);
      }
      return;
    case KVType::Q8_0:
      for (int b = 0; b < D / kQK8_0; ++b) {  // llama.cpp quantize_row_q8_0_ref
        const float* xb = x + b * kQK8_0;
        float amax = 0.0f;
        for (int j = 0; j < kQK8_0; ++j) amax = std::max(amax, std::fabs(xb[j]));
        const float d = amax / 127.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        BlockQ8_0 blk;
        blk.d = fp32_to_fp16(d);
        for (int j = 0; j < kQK8_0; ++j) blk.qs[j] = int8_t(std::roundf(xb[j] * id));
        std::memcpy(dst + size_t(b) * sizeof(BlockQ8_0), &blk, sizeof(blk));
      }
      return;
  }
}

void kv_decode_row(KVType t, const uint8_t* src, int D, float* dst) {
  // The stored types are weight types too: one decoder (dequantize_row) serves both.
  static constexpr DType kAs[] = {DType::F32, DType::F16, DType::BF16, DType::Q8_0};  // KVType order
  dequantize_row(kAs[size_t(t)], src, dst, D);
}

CpuKVStore::Buf CpuKVStore::allocate(int64_t pages, int64_t per_page, const KVLayout& l, const char* what) {
  if (pages == 0 || per_page == 0) return nullptr;
  int64_t bytes;
  if (__builtin_mul_overflow(pages, per_page, &bytes) || bytes > (int64_t(1) << 56))
    fail("cpu backend: KV store: {} of {} pages x {} bytes is too large", what, pages, per_page);
  const size_t n = (size_t(bytes) + 63) & ~size_t(63);
  auto* p = static_cast<uint8_t*>(std::aligned_alloc(64, n));
  if (!p)
    fail("cpu backend: KV store: cannot allocate {} MiB for {} ({} pages of {} tokens, {})", n >> 20, what, pages,
         l.page_size, kv_type_name(l.type));
  return Buf(p);
}

CpuKVStore::CpuKVStore(const KVLayout& l) : KVStore(l) {
  if (const std::string why = kv_type_fits(l.type, l.head_dim); !why.empty()) fail("cpu backend: {}", why);
  if (l.page_size <= 0 || l.head_dim <= 0 || l.device_pages < 0 || l.host_pages < 0)
    fail("cpu backend: KV store: bad layout (page_size {}, head_dim {}, device pages {}, host pages {})", l.page_size,
         l.head_dim, l.device_pages, l.host_pages);
  const int64_t total = int64_t(l.device_pages) + l.host_pages;
  // Global slots (page_id * page_size + slot) are int32.
  if (total * l.page_size > std::numeric_limits<int32_t>::max())
    fail("cpu backend: KV store: {} pages of {} tokens exceed the int32 slot numbering", total, l.page_size);
  rb_ = kv_row_bytes(l.type, l.head_dim);
  const int64_t kv_bytes = int64_t(l.page_size) * rb_, meta = int64_t(l.page_size) * 4;
  const int64_t tier_pages[2] = {l.device_pages, l.host_pages};
  for (int t = 0; t < 2; ++t) {
    tiers_[t].k = allocate(tier_pages[t], kv_bytes, l, "K");
    tiers_[t].v = allocate(tier_pages[t], kv_bytes, l, "V");
    tiers_[t].pos = allocate(tier_pages[t], meta, l, "positions");
    if (l.slot_scores) tiers_[t].scores = allocate(tier_pages[t], meta, l, "slot scores");
  }
  if (l.page_minmax) minmax_ = allocate(total, 2 * int64_t(l.head_dim) * 4, l, "key bounds");
  for (int32_t id = 0; id < int32_t(total); ++id) reset(id);
}

void CpuKVStore::check_id(int32_t id, const char* op) const {
  if (id < 0 || id >= layout_.total_pages())
    fail("cpu backend: {}: page id {} out of range [0, {})", op, id, layout_.total_pages());
}

void CpuKVStore::check_slot(int64_t slot, const char* op) const {
  if (slot < 0 || slot >= total_slots()) fail("cpu backend: {}: slot {} out of range [0, {})", op, slot, total_slots());
}

void CpuKVStore::reset(int32_t id) {
  const size_t P = size_t(layout_.page_size), D = size_t(layout_.head_dim);
  std::fill(pos(id), pos(id) + P, -1);
  if (float* s = scores(id)) std::fill(s, s + P, 0.0f);
  if (float* mn = kmin(id)) {
    std::fill(mn, mn + D, std::numeric_limits<float>::infinity());
    std::fill(mn + D, mn + 2 * D, -std::numeric_limits<float>::infinity());
  }
}

}  // namespace headroom::cpu
