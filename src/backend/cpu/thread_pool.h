// CPU backend: a small persistent thread pool built for many short parallel sections (one per op of a
// decode step, a few microseconds each).
//
// parallel_for(n_tasks, fn) runs fn(task, thread) for every task in [0, n_tasks); the calling thread takes
// part as thread 0. Tasks are claimed dynamically, so which thread runs a task varies from call to call:
// kernels must make every output depend only on the task's inputs (never on the thread or on the order of
// tasks) to stay bit-identical for any thread count.
//
// Waking: workers spin on an atomic generation counter for a while (~100 µs) after each section, then
// sleep on it (futex via std::atomic::wait); the caller only issues a wake-up syscall when somebody sleeps.
#pragma once

#include <atomic>
#include <cstdint>
#include <thread>
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
    if (n_threads_ == 1 || n_tasks == 1) {
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
  // Claims tasks of generation `gen` until none is left; returns how many it ran.
  int64_t drain(uint32_t gen, int thread);

  int n_threads_;
  std::vector<std::thread> workers_;

  // The current section. Written by the caller before gen_ is bumped; read by workers only after a
  // successful claim in that generation, so a late worker never sees a half-written section.
  TaskFn fn_ = nullptr;
  void* ctx_ = nullptr;

  alignas(64) std::atomic<uint32_t> gen_{0};        // bumped once per section; workers wait on it
  alignas(64) std::atomic<uint64_t> claim_{0};      // (generation << 32) | next task index
  alignas(64) std::atomic<int64_t> done_{0};        // tasks finished in the current section
  alignas(64) std::atomic<int> sleepers_{0};        // workers blocked in gen_.wait
  std::atomic<bool> stop_{false};
};

// One per physical core of the CPUs this process may run on (sysfs topology; falls back to
// std::thread::hardware_concurrency).
int physical_core_count();

}  // namespace headroom::cpu
