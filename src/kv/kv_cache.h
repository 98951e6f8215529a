// KVCache: the paged, head-aware KV cache of ONE sequence. Every (layer, KV head) has its own page list and
// its own Policy; pages come from a PagePool shared by all sequences. The forward pass calls, per layer:
//   append()      write the new tokens' K and V (RoPE applied) into the heads' pages,
//   plan()        ask each head's policy which pages to read; returns one AttnJob per KV head,
//   after_step()  let each policy give back / evict / offload.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "backend/backend.h"
#include "kv/head_map.h"
#include "kv/page_pool.h"
#include "kv/policy.h"
#include "model/config.h"
#include "util/error.h"

namespace headroom {

// Thrown when the device tier cannot take another page; the request ends with this reason.
class BudgetExhausted : public Error {
 public:
  using Error::Error;
};

// --kv-budget: tokens per KV head ("1024"), bytes ("2GiB", "512MiB", "300MB") or a share of the full cache ("25%").
struct KVBudget {
  enum class Kind { None, Tokens, Bytes, Percent } kind = Kind::None;
  double value = 0;
  // Throws Error with one line naming `what` (the flag) for anything else, or for a value out of range.
  static KVBudget parse(const std::string& s, std::string_view what = "--kv-budget");
  // Tokens per KV head this budget allows for a context of n_ctx.
  int64_t tokens_per_head(const ModelConfig& c, int64_t n_ctx) const;
  std::string to_string() const;
};

// Per-head policy specs for a uniform policy under a budget: full, streaming (4 sinks + the rest as window),
// topk (pages = budget / page size, minus the sink and recent pages), evict (budget tokens, half recent).
// Throws Error if the budget is too small for the policy (e.g. cannot hold the sinks and a window), naming
// `cause`: where tokens_per_head came from (e.g. "--kv-budget 25% of a 512-token context").
PolicySpec uniform_spec(PolicyKind kind, int64_t tokens_per_head, int page_size, bool offload, std::string_view cause);

// Page size and prefill chunk limits (tokens), checked by pages_needed and by the flags that set them.
inline constexpr int kMaxPageSize = 4096;
inline constexpr int kMaxChunk = 1 << 16;

// Device pages a set of heads needs at most (steady state plus one prefill chunk in flight per head). Throws
// Error naming the context, --page-size or --chunk if one is out of range.
int64_t pages_needed(const std::vector<PolicySpec>& specs, int64_t n_ctx, int page_size, int chunk);

class KVCache {
 public:
  KVCache(const ModelConfig& cfg, PagePool& pool, const std::vector<PolicySpec>& specs);
  ~KVCache();
  KVCache(const KVCache&) = delete;
  KVCache& operator=(const KVCache&) = delete;

  // k, v: n rows of n_head_kv * head_dim floats.
  void append(int layer, int n, const int32_t* pos, const float* k, const float* v);
  // One job per KV head of `layer`, valid until the next plan() call.
  std::span<const AttnJob> plan(int layer, int n, const int32_t* pos, const float* q, int64_t q_stride, float* out,
                                int64_t out_stride, float scale);
  void after_step(int layer, int32_t next_pos);
  // Brackets the chunks of one prompt: policies may treat prefill differently (streaming's prefill_full).
  // end_prefill() runs every head's after_step as a decode step would, giving back what the prompt left.
  void begin_prefill() { prefilling_ = true; }
  void end_prefill(int32_t next_pos);
  void clear();  // give every page back

  int n_layer() const { return n_layer_; }
  int n_head_kv() const { return n_kv_; }
  const HeadCache& head(int layer, int h) const { return heads_[size_t(layer) * n_kv_ + h]; }
  const Policy& policy(int layer, int h) const { return *policies_[size_t(layer) * n_kv_ + h]; }
  PagePool& pool() { return pool_; }
  int64_t pages_held() const;  // device + host pages of this sequence
  int64_t tokens_appended() const { return appended_; }

 private:
  int32_t new_page();
  int n_layer_, n_kv_, head_dim_;
  PagePool& pool_;
  std::vector<HeadCache> heads_;
  std::vector<std::unique_ptr<Policy>> policies_;
  std::vector<AttnJob> jobs_;
  std::vector<std::vector<AttnPage>> job_pages_;
  int64_t appended_ = 0;
  bool prefilling_ = false;
};

}  // namespace headroom
