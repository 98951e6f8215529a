#include "kv/kv_cache.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstring>
#include <limits>

#include "util/parse.h"

namespace headroom {

KVBudget KVBudget::parse(const std::string& s, std::string_view what) {
  KVBudget b;
  size_t used = 0;
  const std::optional<double> num = parse_decimal_prefix(s, &used);
  std::string unit = num ? s.substr(used) : std::string();
  for (char& ch : unit) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
  double mult = 0;
  if (unit.empty()) b.kind = Kind::Tokens;
  else if (unit == "%") b.kind = Kind::Percent;
  else {
    b.kind = Kind::Bytes;
    if (unit == "b") mult = 1;
    else if (unit == "k" || unit == "kib") mult = 1024.0;
    else if (unit == "m" || unit == "mib") mult = 1024.0 * 1024;
    else if (unit == "g" || unit == "gib") mult = 1024.0 * 1024 * 1024;
    else if (unit == "kb") mult = 1e3;
    else if (unit == "mb") mult = 1e6;
    else if (unit == "gb") mult = 1e9;
  }
  const double v = num.value_or(0);
  b.value = b.kind == Kind::Bytes ? v * mult : v;
  // Tokens fit in int32 and bytes stay far below int64 (4 EiB), so every count derived from them fits.
  const bool ok = num && v > 0 &&
                  (b.kind == Kind::Tokens   ? v == std::floor(v) && v <= double(std::numeric_limits<int32_t>::max())
                   : b.kind == Kind::Percent ? v <= 100
                                             : mult > 0 && b.value >= 1 && b.value <= double(int64_t(1) << 62));
  if (!ok)
    fail("invalid {} {:?} (use tokens per KV head like 1024 (1..2147483647), bytes like 2GiB or 512MiB (1 B..4 EiB), "
         "or a share like 25% (above 0, at most 100%))", what, s);
  return b;
}

int64_t KVBudget::tokens_per_head(const ModelConfig& c, int64_t n_ctx) const {
  switch (kind) {
    case Kind::None: return n_ctx;
    case Kind::Tokens: return static_cast<int64_t>(value);
    case Kind::Percent: return static_cast<int64_t>(std::floor(value / 100.0 * double(n_ctx)));
    case Kind::Bytes:
      return static_cast<int64_t>(std::min(value / double(c.kv_bytes_per_token(sizeof(float))),
                                           double(std::numeric_limits<int32_t>::max())));
  }
  return n_ctx;
}

std::string KVBudget::to_string() const {
  switch (kind) {
    case Kind::None: return "none";
    case Kind::Tokens: return fmt::format("{} tokens/head", int64_t(value));
    case Kind::Percent: return fmt::format("{}%", value);
    case Kind::Bytes: return fmt::format("{:.1f} MiB", value / (1024.0 * 1024));
  }
  return "?";
}

PolicySpec uniform_spec(PolicyKind kind, int64_t t, int page_size, bool offload, std::string_view cause) {
  PolicySpec s;
  s.kind = kind;
  s.offload = offload;
  switch (kind) {
    case PolicyKind::Full: break;
    case PolicyKind::Streaming: {
      // The largest window whose pages (counted whole) fit in the budget: window = (pages - 2) * page + 1.
      const int64_t pages = t / page_size;
      if (pages < 3)
        fail("{} is {} tokens per head, {} pages of {} (--page-size); streaming needs at least 3 (sinks, window, tail)",
             cause, t, pages, page_size);
      s.window = static_cast<int>(std::min<int64_t>((pages - 2) * page_size + 1, kMaxContext));
      break;
    }
    case PolicyKind::TopK: {
      const int64_t pages = t / page_size;
      if (pages < 1 + s.recent_pages + 1)
        fail("{} is {} tokens per head, {} pages of {} (--page-size); topk needs at least {} (sink, {} recent, 1 chosen)",
             cause, t, pages, page_size, 2 + s.recent_pages, s.recent_pages);
      s.topk_pages = static_cast<int>(std::min<int64_t>(pages - 1 - s.recent_pages, kMaxContext));
      break;
    }
    case PolicyKind::Evict:
      if (t < s.sinks + 32) fail("{} is {} tokens per head, too small for evict (needs >= {})", cause, t, s.sinks + 32);
      s.budget = static_cast<int>(std::min<int64_t>(t, kMaxContext));
      s.window = s.budget / 2;
      break;
  }
  return s;
}

int64_t pages_needed(const std::vector<PolicySpec>& specs, int64_t n_ctx, int page_size, int chunk) {
  if (n_ctx < 1 || n_ctx > kMaxContext) fail("a context of {} tokens is out of range (1..{})", n_ctx, kMaxContext);
  if (page_size < 1 || page_size > kMaxPageSize) fail("--page-size {} is out of range (1..{})", page_size, kMaxPageSize);
  if (chunk < 1 || chunk > kMaxChunk) fail("--chunk {} is out of range (1..{})", chunk, kMaxChunk);
  int64_t total = 0;
  for (const PolicySpec& s : specs) {
    auto p = make_policy(s);
    int64_t tokens = std::min<int64_t>(n_ctx, p->max_tokens(n_ctx, page_size) + chunk);
    total += (tokens + page_size - 1) / page_size + 1;
  }
  return total;
}

KVCache::KVCache(const ModelConfig& cfg, PagePool& pool, const std::vector<PolicySpec>& specs)
    : n_layer_(cfg.n_layer), n_kv_(cfg.n_head_kv), head_dim_(cfg.head_dim), pool_(pool) {
  if (specs.size() != size_t(n_layer_) * n_kv_)
    fail("KV cache: {} policy specs for {} heads", specs.size(), size_t(n_layer_) * n_kv_);
  if (pool.head_dim() != head_dim_) fail("KV cache: pool head_dim {} != model {}", pool.head_dim(), head_dim_);
  heads_.resize(specs.size());
  for (const PolicySpec& s : specs) policies_.push_back(make_policy(s));
  jobs_.resize(n_kv_);
  job_pages_.resize(n_kv_);
}

KVCache::~KVCache() { clear(); }

void KVCache::clear() {
  for (HeadCache& h : heads_) {
    for (int32_t id : h.pages) pool_.release(id);
    h = HeadCache{};
  }
  appended_ = 0;
}

int64_t KVCache::pages_held() const {
  int64_t n = 0;
  for (const HeadCache& h : heads_) n += int64_t(h.pages.size());
  return n;
}

int32_t KVCache::new_page() {
  int32_t id = pool_.alloc();
  if (id < 0)
    throw BudgetExhausted(fmt::format(
        "KV budget exhausted after {} tokens: all {} device pages ({:.1f} MiB) are in use; raise --kv-budget or "
        "use a streaming/evict policy", appended_, pool_.device_capacity(),
        double(pool_.device_capacity() * pool_.page_bytes()) / (1024.0 * 1024)));
  return id;
}

void KVCache::append(int layer, int n, const int32_t* pos, const float* k, const float* v) {
  const int ps = pool_.page_size();
  for (int h = 0; h < n_kv_; ++h) {
    HeadCache& hc = heads_[size_t(layer) * n_kv_ + h];
    for (int r = 0; r < n; ++r) {
      if (hc.pages.empty() || pool_.used(hc.pages.back()) == ps) {
        int32_t id = new_page();
        hc.pages.push_back(id);
      }
      const int32_t id = hc.pages.back();
      if (pool_.on_host(id) && !pool_.fetch(id)) throw BudgetExhausted("KV budget exhausted: cannot fetch tail page");
      const int slot = pool_.used(id)++;
      const float* kr = k + (int64_t(r) * n_kv_ + h) * head_dim_;
      const float* vr = v + (int64_t(r) * n_kv_ + h) * head_dim_;
      std::memcpy(pool_.k(id) + int64_t(slot) * head_dim_, kr, head_dim_ * sizeof(float));
      std::memcpy(pool_.v(id) + int64_t(slot) * head_dim_, vr, head_dim_ * sizeof(float));
      pool_.pos(id)[slot] = pos[r];
      pool_.score(id)[slot] = 0.0f;
      float* mn = pool_.kmin(id);
      float* mx = pool_.kmax(id);
      for (int d = 0; d < head_dim_; ++d) {
        mn[d] = std::min(mn[d], kr[d]);
        mx[d] = std::max(mx[d], kr[d]);
      }
      ++hc.tokens;
    }
  }
  if (layer == 0) appended_ += n;
}

std::span<const AttnJob> KVCache::plan(int layer, int n, const int32_t* pos, const float* q, int64_t q_stride,
                                       float* out, int64_t out_stride, float scale) {
  const int group = static_cast<int>(q_stride / head_dim_) / n_kv_;
  for (int h = 0; h < n_kv_; ++h) {
    const size_t i = size_t(layer) * n_kv_ + h;
    QueryView qv{q, q_stride, h * group, group, head_dim_, n, pos, prefilling_};
    std::vector<AttnPage>& pages = job_pages_[h];
    pages.clear();
    AttnJob& j = jobs_[h];
    policies_[i]->select(heads_[i], pool_, qv, pages, j.sinks, j.window);
    j.n_rows = n;
    j.q = q;
    j.q_stride = q_stride;
    j.q_pos = pos;
    j.head0 = h * group;
    j.n_group = group;
    j.head_dim = head_dim_;
    j.scale = scale;
    j.pages = pages;
    j.out = out;
    j.out_stride = out_stride;
  }
  return jobs_;
}

void KVCache::after_step(int layer, int32_t next_pos) {
  for (int h = 0; h < n_kv_; ++h) {
    const size_t i = size_t(layer) * n_kv_ + h;
    policies_[i]->after_step(heads_[i], pool_, next_pos, prefilling_);
  }
}

void KVCache::end_prefill(int32_t next_pos) {
  prefilling_ = false;
  for (int l = 0; l < n_layer_; ++l) after_step(l, next_pos);
}

}  // namespace headroom
