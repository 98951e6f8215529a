// CPU backend: the Backend implementation tying the kernels together, and make_cpu_backend.
//
// A CpuBackend is used by one caller thread at a time (it owns scratch buffers and a thread pool); the
// library prints nothing and reports bad arguments with headroom::Error.
#include <algorithm>
#include <memory>

#include "backend/backend.h"
#include "backend/cpu/attention.h"
#include "backend/cpu/matmul.h"
#include "backend/cpu/ops.h"
#include "backend/cpu/thread_pool.h"
#include "util/error.h"

namespace headroom {

namespace {

class CpuBackend final : public Backend {
 public:
  explicit CpuBackend(int threads) : pool_(threads) {}

  const char* name() const override { return "cpu"; }
  int threads() const override { return pool_.size(); }

  void matmul(const WeightView& w, const float* x, int64_t n, float* y) override {
    cpu::matmul(pool_, mm_, w, x, n, y);
  }

  void embed(const WeightView& w, const int32_t* ids, int64_t n, float* out) override {
    const size_t stride = cpu::weight_row_stride(w, "embed");
    if (n < 0) fail("cpu backend: embed: negative count {}", n);
    for (int64_t i = 0; i < n; ++i)
      if (ids[i] < 0 || ids[i] >= w.rows) fail("cpu backend: embed: token id {} out of range [0, {})", ids[i], w.rows);
    const auto* base = static_cast<const uint8_t*>(w.data);
    auto rows = [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) dequantize_row(w.type, base + size_t(ids[i]) * stride, out + i * w.cols, w.cols);
    };
    constexpr int64_t kPerTask = 8;
    if (n < 2 * kPerTask) {
      rows(0, n);
    } else {
      pool_.parallel_for((n + kPerTask - 1) / kPerTask,
                         [&](int64_t t, int) { rows(t * kPerTask, std::min(n, (t + 1) * kPerTask)); });
    }
  }

  void rmsnorm(const float* x, const float* weight, int64_t n, int64_t dim, float eps, float* out) override {
    cpu::rmsnorm(pool_, x, weight, n, dim, eps, out);
  }

  void rope(float* x, int64_t n, int64_t n_heads, int64_t head_dim, const int32_t* pos,
            const RopeParams& p) override {
    rope_.apply(pool_, x, n, n_heads, head_dim, pos, p);
  }

  void swiglu(const float* gate, const float* up, int64_t count, float* out) override {
    cpu::swiglu(pool_, gate, up, count, out);
  }

  void add(float* x, const float* y, int64_t count) override { cpu::add(pool_, x, y, count); }

  void add_bias(float* x, const float* b, int64_t n, int64_t dim) override { cpu::add_bias(pool_, x, b, n, dim); }

  void attention(std::span<const AttnJob> jobs) override { cpu::attention(pool_, attn_, jobs); }

 private:
  cpu::ThreadPool pool_;
  cpu::MatmulScratch mm_;
  cpu::AttnScratch attn_;
  cpu::Rope rope_;
};

}  // namespace

std::unique_ptr<Backend> make_cpu_backend(int threads) {
  if (threads <= 0) threads = cpu::physical_core_count();
  return std::make_unique<CpuBackend>(threads);
}

}  // namespace headroom
