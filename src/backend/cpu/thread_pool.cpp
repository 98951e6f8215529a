// CPU backend: persistent thread pool (see thread_pool.h).
#include "backend/cpu/thread_pool.h"

#include <linux/futex.h>
#include <sched.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <climits>
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

// Range word: generation (24 bits) | end (20 bits) | next (20 bits).
constexpr int kIdxBits = 20;
constexpr uint64_t kIdxMask = (uint64_t(1) << kIdxBits) - 1;
constexpr uint32_t kGenMask = (uint32_t(1) << 24) - 1;
constexpr int64_t kMaxTasks = int64_t(kIdxMask);  // per run(); larger sections are split

uint64_t pack(uint32_t gen, uint64_t end, uint64_t next) {
  return uint64_t(gen & kGenMask) << (2 * kIdxBits) | end << kIdxBits | next;
}
uint32_t gen_of(uint64_t w) { return uint32_t(w >> (2 * kIdxBits)); }
uint64_t end_of(uint64_t w) { return (w >> kIdxBits) & kIdxMask; }
uint64_t next_of(uint64_t w) { return w & kIdxMask; }

constexpr auto kSpin = std::chrono::microseconds(1000);    // poll this long before sleeping (waking a
                                                            // sleeper took 0.2-3 ms on our 2-vCPU VM)
constexpr auto kStallMin = std::chrono::microseconds(200);  // a wait this long may be a stall...
constexpr auto kYieldAfter = std::chrono::microseconds(50); // yield the core while waiting this long
constexpr auto kSerialFor = std::chrono::milliseconds(50);  // run alone this long after a stall

// Raw futex on the generation word.
static_assert(sizeof(std::atomic<uint32_t>) == sizeof(uint32_t));
void futex_wait(std::atomic<uint32_t>* addr, uint32_t expected) {
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(addr), FUTEX_WAIT_PRIVATE, expected, nullptr, nullptr, 0);
}
void futex_wake_all(std::atomic<uint32_t>* addr) {
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(addr), FUTEX_WAKE_PRIVATE, INT_MAX, nullptr, nullptr, 0);
}

}  // namespace

ThreadPool::ThreadPool(int n_threads)
    : n_threads_(n_threads < 1 ? 1 : n_threads), ranges_(new Range[size_t(n_threads < 1 ? 1 : n_threads)]) {
  workers_.reserve(size_t(n_threads_ - 1));
  for (int t = 1; t < n_threads_; ++t) workers_.emplace_back([this, t] { worker_main(t); });
}

ThreadPool::~ThreadPool() {
  stop_.store(true);
  gen_.fetch_add(1);
  futex_wake_all(&gen_);
  for (auto& w : workers_) w.join();
}

int64_t ThreadPool::drain(uint32_t gen, int thread) {
  const uint32_t g = gen & kGenMask;
  int64_t ran = 0;
  // A claim that succeeds in generation g means the task is unfinished, so the caller is still inside
  // this section and fn_/ctx_ are valid.
  std::atomic<uint64_t>& own = ranges_[size_t(thread)].word;
  uint64_t c = own.load(std::memory_order_acquire);
  while (gen_of(c) == g && next_of(c) < end_of(c)) {
    if (!own.compare_exchange_weak(c, c + 1, std::memory_order_acq_rel, std::memory_order_acquire)) continue;
    fn_(ctx_, int64_t(next_of(c)), thread);
    ++ran;
    c = own.load(std::memory_order_acquire);
  }
  // Steal from the back of the other ranges.
  for (int k = 1; k < n_threads_; ++k) {
    std::atomic<uint64_t>& victim = ranges_[size_t((thread + k) % n_threads_)].word;
    c = victim.load(std::memory_order_acquire);
    while (gen_of(c) == g && next_of(c) < end_of(c)) {
      const uint64_t taken = c - (uint64_t(1) << kIdxBits);  // end - 1
      if (!victim.compare_exchange_weak(c, taken, std::memory_order_acq_rel, std::memory_order_acquire)) continue;
      fn_(ctx_, int64_t(end_of(taken)), thread);
      ++ran;
      c = victim.load(std::memory_order_acquire);
    }
  }
  if (ran) done_.fetch_add(ran, std::memory_order_acq_rel);
  return ran;
}

void ThreadPool::worker_main(int thread) {
  uint32_t seen = 0;  // gen_'s initial value: a section published before this thread started is still seen
  for (;;) {
    uint32_t g = gen_.load(std::memory_order_acquire);
    if (g == seen) {
      const auto until = std::chrono::steady_clock::now() + kSpin;
      for (int i = 0; g == seen; ++i) {
        HR_CPU_RELAX();
        g = gen_.load(std::memory_order_acquire);
        if ((i & 63) == 63) {
          if (std::chrono::steady_clock::now() > until) break;
          // If this core is shared with a runnable thread (our caller, when the machine is busy), let it
          // run; on an idle core this returns at once.
          sched_yield();
          g = gen_.load(std::memory_order_acquire);
        }
      }
      if (g == seen) {
        if (stop_.load()) return;
        sleepers_.fetch_add(1);  // seq_cst: pairs with the caller's store of gen_ then load of sleepers_
        futex_wait(&gen_, seen);  // returns at once if gen_ != seen already
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
    for (int t = 0; t < n_threads_; ++t)
      ranges_[size_t(t)].word.store(
          pack(g, uint64_t(count * (t + 1) / n_threads_), uint64_t(count * t / n_threads_)),
          std::memory_order_relaxed);
    gen_.store(g);  // seq_cst (a release for the stores above), see worker_main
    if (sleepers_.load() > 0) futex_wake_all(&gen_);
    const auto t0 = Clock::now();
    const int64_t ran = drain(g, 0);
    if (done_.load(std::memory_order_acquire) == count) continue;
    // Wait for the workers' last tasks. A healthy wait is at most about one task; much longer means a
    // worker was preempted: yield the core (it may be waiting for it) and go serial for a while.
    const auto t1 = Clock::now();
    const auto per_task = ran > 0 ? (t1 - t0) / ran : Clock::duration{};
    const auto patience = std::max<Clock::duration>(kStallMin, 4 * per_task);
    bool stalled = false;
    for (int i = 1; done_.load(std::memory_order_acquire) != count; ++i) {
      HR_CPU_RELAX();
      if ((i & 63) == 0) {
        const auto waited = Clock::now() - t1;
        if (waited > kYieldAfter) sched_yield();
        if (waited > patience) stalled = true;
      }
    }
    if (stalled) serial_until_ = Clock::now() + kSerialFor;
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
