// CPU backend: a small persistent thread pool built for many short parallel sections (one per op of a
// decode step, a few microseconds each).
//
// parallel_for(n_tasks, fn) runs fn(task, thread) for every task in [0, n_tasks); the calling thread takes
// part as thread 0. Scheduling: thread t owns the contiguous range [n*t/T, n*(t+1)/T) and takes its tasks
// from the front; a thread that runs out steals from the back of the others' ranges. The static part
// keeps the same weight rows on the same core from call to call (their cache lines stay in that core's
// caches); stealing absorbs a late or preempted thread. Which thread runs a task can still vary, so kernels
// must make every output depend only on the task's inputs (never on the thread or on the order of tasks)
// to stay bit-identical for any thread count.
//
// Waking: after each section, workers poll an atomic generation counter for ~1 ms (yielding the core now
// and then, so that a busy machine loses little), then sleep on it (futex); the caller only issues a
// wake-up syscall when somebody sleeps. Tasks nobody has claimed yet are run by the caller, so a slow
// wake-up never delays a section: the worker just takes no part in it.
//
// Oversubscription: on a machine busy with other processes a worker can be preempted while it holds a
// task, and the caller then waits a whole scheduler time slice (milliseconds) for it. When the caller
// waits for a straggler much longer than a task takes, it runs the following sections alone for 50 ms
// (results do not depend on the thread that runs a task), then tries the workers again.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <thread>
#include <type_traits>
#include <vector>

namespace headroom::cpu {

class ThreadPool {
 public:
  explicit ThreadPool(int n_threads);  // n_threads >= 1 (the caller counts as one)
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const { return n_threads_; }

  template <typename F>
  void parallel_for(int64_t n_tasks, F&& fn) {
    if (n_tasks <= 0) return;
    if (n_threads_ == 1 || n_tasks == 1 || serial_now()) {
      for (int64_t t = 0; t < n_tasks; ++t) fn(t, 0);
      return;
    }
    using Fn = std::remove_reference_t<F>;
    run(n_tasks, [](void* ctx, int64_t task, int thread) { (*static_cast<Fn*>(ctx))(task, thread); },
        const_cast<void*>(static_cast<const void*>(&fn)));
  }

 private:
  using TaskFn = void (*)(void* ctx, int64_t task, int thread);
  void run(int64_t n_tasks, TaskFn fn, void* ctx);
  void worker_main(int thread);
  // Runs tasks of generation `gen`: own range first, then stolen ones. Returns how many it ran.
  int64_t drain(uint32_t gen, int thread);
  // True while the pool runs sections on the caller alone after a stall (see run()).
  bool serial_now() const { return serial_until_ != Clock::time_point{} && Clock::now() < serial_until_; }

  using Clock = std::chrono::steady_clock;
  Clock::time_point serial_until_{};  // caller-side only

  // A thread's task range: (generation << 40) | (end << 20) | next, in one word so that claiming (from
  // the front, by the owner) and stealing (from the back) are single CASes that fail on a stale section.
  struct alignas(64) Range {
    std::atomic<uint64_t> word{0};
  };

  int n_threads_;
  std::unique_ptr<Range[]> ranges_;
  std::vector<std::thread> workers_;

  // The current section. Written by the caller before gen_ is bumped; read by workers only after a
  // successful claim in that generation, so a late worker never sees a half-written section.
  TaskFn fn_ = nullptr;
  void* ctx_ = nullptr;

  alignas(64) std::atomic<uint32_t> gen_{0};        // bumped once per section; workers wait on it
  alignas(64) std::atomic<int64_t> done_{0};        // tasks finished in the current section
  alignas(64) std::atomic<int> sleepers_{0};        // workers blocked in futex_wait(gen_)
  std::atomic<bool> stop_{false};
};

// One per physical core of the CPUs this process may run on (sysfs topology; falls back to
// std::thread::hardware_concurrency).
int physical_core_count();

}  // namespace headroom::cpu
