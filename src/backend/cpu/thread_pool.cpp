// CPU backend: persistent thread pool (see thread_pool.h).
#include "backend/cpu/thread_pool.h"

#include <sched.h>

#include <cassert>
#include <chrono>
#include <fstream>
#include <set>
#include <string>
#include <utility>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define HR_CPU_RELAX() _mm_pause()
#else
#define HR_CPU_RELAX() ((void)0)
#endif

namespace headroom::cpu {

namespace {

// The claim word packs the section's generation, its task count and the next task index, so a worker
// that wakes late can tell from one atomic load whether there is anything left for it to take.
constexpr int kIdxBits = 20, kCountBits = 20;
constexpr uint64_t kIdxMask = (uint64_t(1) << kIdxBits) - 1;
constexpr uint64_t kCountMask = (uint64_t(1) << kCountBits) - 1;
constexpr uint32_t kGenMask = (uint32_t(1) << 24) - 1;
constexpr int64_t kMaxTasks = int64_t(1) << kIdxBits;  // per run(); larger sections are split

uint64_t pack_claim(uint32_t gen, uint64_t count, uint64_t idx) {
  return uint64_t(gen & kGenMask) << (kIdxBits + kCountBits) | count << kIdxBits | idx;
}

constexpr auto kSpin = std::chrono::microseconds(200);  // busy-wait this long before sleeping

}  // namespace

ThreadPool::ThreadPool(int n_threads) : n_threads_(n_threads < 1 ? 1 : n_threads) {
  workers_.reserve(size_t(n_threads_ - 1));
  for (int t = 1; t < n_threads_; ++t) workers_.emplace_back([this, t] { worker_main(t); });
}

ThreadPool::~ThreadPool() {
  stop_.store(true);
  gen_.fetch_add(1);
  gen_.notify_all();
  for (auto& w : workers_) w.join();
}

int64_t ThreadPool::drain(uint32_t gen, int thread) {
  int64_t ran = 0;
  uint64_t c = claim_.load(std::memory_order_acquire);
  for (;;) {
    if (uint32_t(c >> (kIdxBits + kCountBits)) != (gen & kGenMask)) break;  // another section now
    const uint64_t idx = c & kIdxMask, count = (c >> kIdxBits) & kCountMask;
    if (idx >= count) break;                                                // all tasks claimed
    if (!claim_.compare_exchange_weak(c, c + 1, std::memory_order_acq_rel, std::memory_order_acquire))
      continue;
    // The task is ours and unfinished, so the caller is still inside this section: fn_/ctx_ are valid.
    fn_(ctx_, int64_t(idx), thread);
    ++ran;
    done_.fetch_add(1, std::memory_order_acq_rel);
    c = claim_.load(std::memory_order_acquire);
  }
  return ran;
}

void ThreadPool::worker_main(int thread) {
  uint32_t seen = gen_.load();
  for (;;) {
    uint32_t g = gen_.load(std::memory_order_acquire);
    if (g == seen) {
      const auto until = std::chrono::steady_clock::now() + kSpin;
      for (int i = 0; g == seen; ++i) {
        HR_CPU_RELAX();
        g = gen_.load(std::memory_order_acquire);
        if ((i & 63) == 63 && std::chrono::steady_clock::now() > until) break;
      }
      if (g == seen) {
        sleepers_.fetch_add(1);  // seq_cst: pairs with the caller's store of gen_ then load of sleepers_
        gen_.wait(seen);
        sleepers_.fetch_sub(1);
        continue;
      }
    }
    seen = g;
    if (stop_.load()) return;
    drain(g, thread);
  }
}

void ThreadPool::run(int64_t n_tasks, TaskFn fn, void* ctx) {
  for (int64_t base = 0; base < n_tasks; base += kMaxTasks) {
    const int64_t count = std::min(kMaxTasks, n_tasks - base);
    struct Shifted {
      TaskFn fn;
      void* ctx;
      int64_t base;
    } sh{fn, ctx, base};
    fn_ = base == 0 ? fn : [](void* c, int64_t t, int th) {
      auto* s = static_cast<Shifted*>(c);
      s->fn(s->ctx, s->base + t, th);
    };
    ctx_ = base == 0 ? ctx : &sh;
    done_.store(0, std::memory_order_relaxed);
    const uint32_t g = gen_.load(std::memory_order_relaxed) + 1;
    claim_.store(pack_claim(g, uint64_t(count), 0), std::memory_order_release);
    gen_.store(g);  // seq_cst, see worker_main
    if (sleepers_.load() > 0) gen_.notify_all();
    drain(g, 0);
    while (done_.load(std::memory_order_acquire) != count) HR_CPU_RELAX();
  }
}

int physical_core_count() {
  cpu_set_t set;
  CPU_ZERO(&set);
  const bool have_mask = sched_getaffinity(0, sizeof(set), &set) == 0;
  std::set<std::pair<std::string, std::string>> cores;
  for (int c = 0; c < CPU_SETSIZE; ++c) {
    if (have_mask && !CPU_ISSET(c, &set)) continue;
    const std::string dir = "/sys/devices/system/cpu/cpu" + std::to_string(c) + "/topology/";
    std::ifstream core(dir + "core_id"), pkg(dir + "physical_package_id");
    std::string core_id, pkg_id;
    if (!(core >> core_id)) {
      if (!have_mask) break;  // without a mask, stop at the first missing cpu
      continue;
    }
    pkg >> pkg_id;
    cores.emplace(pkg_id, core_id);
  }
  if (!cores.empty()) return int(cores.size());
  const unsigned hc = std::thread::hardware_concurrency();
  return hc ? int(hc) : 1;
}

}  // namespace headroom::cpu
