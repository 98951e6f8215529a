#include "kv/placement.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include <fmt/ranges.h>

#include "kv/kv_cache.h"
#include "util/error.h"

namespace headroom {

namespace {

// Tokens a head reads per decode step at context n_ctx.
int64_t read_tokens(const PolicySpec& s, int64_t n_ctx, int page_size) {
  switch (s.kind) {
    case PolicyKind::Full: return n_ctx;
    case PolicyKind::Streaming: return std::min<int64_t>(n_ctx, int64_t(s.sinks) + s.window);
    case PolicyKind::TopK: return std::min<int64_t>(n_ctx, int64_t(1 + s.topk_pages + s.recent_pages) * page_size);
    case PolicyKind::Evict: return std::min<int64_t>(n_ctx, s.budget);
  }
  return n_ctx;
}

std::string mib(int64_t b) { return fmt::format("{:.2f} MiB", double(b) / (1024.0 * 1024.0)); }

}  // namespace

std::vector<int32_t> TPPlan::heads(int rank, int layer) const {
  std::vector<int32_t> h;
  for (int k = 0; k < n_kv; ++k)
    if (rank_of[size_t(layer) * size_t(n_kv) + size_t(k)] == rank) h.push_back(k);
  return h;
}

std::vector<std::string> TPPlan::describe() const {
  std::vector<std::string> out;
  for (int r = 0; r < world; ++r) {
    std::string layers;
    for (int l = 0; l < n_layer; ++l) {
      std::vector<int32_t> h = heads(r, l);
      layers += fmt::format("{}L{} {}", l ? " | " : "", l, fmt::join(h, ","));
    }
    out.push_back(fmt::format("tp rank {}: {} KV heads ({}), holds {}, reads {} per decode step (one sequence)", r,
                              head_count[size_t(r)], layers, mib(held_bytes[size_t(r)]), mib(read_bytes[size_t(r)])));
  }
  return out;
}

void check_tensor_parallel(const ModelConfig& c, int world, bool uneven_ok) {
  if (world < 1) fail("--tensor-parallel {} is out of range (at least 1)", world);
  if (world > c.n_head_kv)
    fail("--tensor-parallel {}: the model has {} KV heads per layer and every rank needs at least one, so at most {} ranks",
         world, c.n_head_kv, c.n_head_kv);
  if (!uneven_ok && c.n_head_kv % world != 0) {
    std::vector<int> ok;
    for (int w = 1; w <= c.n_head_kv; ++w)
      if (c.n_head_kv % w == 0) ok.push_back(w);
    fail("--tensor-parallel {} does not divide the model's {} KV heads per layer (use {}; with a --head-map the split "
         "may be uneven)", world, c.n_head_kv, fmt::join(ok, ", "));
  }
}

TPPlan place_heads(const ModelConfig& c, const std::vector<PolicySpec>& specs, int world, bool balanced, int64_t n_ctx,
                   int page_size, int chunk, int64_t kv_row_bytes) {
  check_tensor_parallel(c, world, balanced);
  const int L = c.n_layer, K = c.n_head_kv;
  if (specs.size() != size_t(L) * size_t(K)) fail("tensor parallel: {} head specs for {} heads", specs.size(), L * K);
  TPPlan p;
  p.world = world;
  p.n_layer = L;
  p.n_kv = K;
  p.balanced = balanced;
  p.rank_of.assign(specs.size(), 0);
  p.held_bytes.assign(size_t(world), 0);
  p.read_bytes.assign(size_t(world), 0);
  p.head_count.assign(size_t(world), 0);
  const int64_t page_bytes = 2 * int64_t(page_size) * kv_row_bytes;
  std::vector<int64_t> held(specs.size()), read(specs.size());
  for (size_t i = 0; i < specs.size(); ++i) {
    held[i] = pages_needed({specs[i]}, n_ctx, page_size, chunk) * page_bytes;
    read[i] = read_tokens(specs[i], n_ctx, page_size) * 2 * kv_row_bytes;
  }
  for (int l = 0; l < L; ++l) {
    std::vector<int> order(static_cast<size_t>(K));
    std::iota(order.begin(), order.end(), 0);
    if (balanced)
      std::stable_sort(order.begin(), order.end(), [&](int a, int b) {
        const size_t ia = size_t(l) * K + a, ib = size_t(l) * K + b;
        return held[ia] != held[ib] ? held[ia] > held[ib] : read[ia] > read[ib];
      });
    std::vector<int> in_layer(size_t(world), 0);
    int empty_ranks = world;
    for (int n = 0; n < K; ++n) {
      const int h = order[size_t(n)];
      const size_t i = size_t(l) * K + h;
      int best = -1;
      if (!balanced) {
        best = h / (K / world);
      } else {
        const bool must_fill = K - n == empty_ranks;  // the rest of the layer's heads go to ranks without one
        for (int r = 0; r < world; ++r) {
          if (must_fill && in_layer[size_t(r)] > 0) continue;
          if (best < 0) { best = r; continue; }
          auto key = [&](int q) {
            return std::make_tuple(p.held_bytes[size_t(q)], p.read_bytes[size_t(q)], p.head_count[size_t(q)], q);
          };
          if (key(r) < key(best)) best = r;
        }
      }
      if (in_layer[size_t(best)]++ == 0) --empty_ranks;
      p.rank_of[i] = int8_t(best);
      p.held_bytes[size_t(best)] += held[i];
      p.read_bytes[size_t(best)] += read[i];
      ++p.head_count[size_t(best)];
    }
  }
  return p;
}

void split_pool_pages(const TPPlan& p, const std::vector<PolicySpec>& specs, int64_t n_ctx, int page_size, int chunk,
                      int64_t device_pages, int64_t host_pages, std::vector<int32_t>& device,
                      std::vector<int32_t>& host) {
  std::vector<int64_t> dneed(size_t(p.world), 0), hneed(size_t(p.world), 0);
  for (size_t i = 0; i < specs.size(); ++i) {
    dneed[size_t(p.rank_of[i])] += pages_needed({specs[i]}, n_ctx, page_size, chunk);
    hneed[size_t(p.rank_of[i])] += host_pages_needed({specs[i]}, n_ctx, page_size);
  }
  const int64_t dsum = std::accumulate(dneed.begin(), dneed.end(), int64_t(0));
  const int64_t hsum = std::accumulate(hneed.begin(), hneed.end(), int64_t(0));
  device.assign(size_t(p.world), 0);
  host.assign(size_t(p.world), 0);
  for (int r = 0; r < p.world; ++r) {
    const size_t i = size_t(r);
    const double d = dsum > 0 ? double(dneed[i]) / double(dsum) : 1.0 / p.world;
    // The host tier holds what the policies park (by their need) and, with several sequences, room to park a
    // sequence's device pages (by the device need): each part gets the larger share.
    const double h = std::max(d, hsum > 0 ? double(hneed[i]) / double(hsum) : 0.0);
    device[i] = int32_t(std::ceil(double(device_pages) * d - 1e-9));
    host[i] = int32_t(std::ceil(double(host_pages) * h - 1e-9));
  }
}

}  // namespace headroom
