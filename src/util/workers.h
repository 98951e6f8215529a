// RankWorkers: one persistent thread per tensor-parallel rank after the first (rank 0 runs on the caller),
// so that a step does not create threads and each rank keeps its thread (and a GPU rank its bound device).
#pragma once

#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace headroom {

class RankWorkers {
 public:
  explicit RankWorkers(int ranks) {
    for (int r = 1; r < ranks; ++r) threads_.emplace_back([this, r] { loop(r); });
  }
  ~RankWorkers() {
    {
      std::lock_guard<std::mutex> g(m_);
      stop_ = true;
    }
    start_.notify_all();
    for (std::thread& t : threads_) t.join();
  }
  RankWorkers(const RankWorkers&) = delete;
  RankWorkers& operator=(const RankWorkers&) = delete;

  // Runs f(r) for every rank r: r = 0 on the calling thread, the others on their own threads; returns when
  // all have returned. f must not throw (catch on the rank and report after run returns).
  void run(const std::function<void(int)>& f) {
    {
      std::lock_guard<std::mutex> g(m_);
      task_ = &f;
      pending_ = int(threads_.size());
      ++generation_;
    }
    start_.notify_all();
    f(0);
    std::unique_lock<std::mutex> g(m_);
    done_.wait(g, [&] { return pending_ == 0; });
    task_ = nullptr;
  }

 private:
  void loop(int r) {
    uint64_t seen = 0;
    for (;;) {
      const std::function<void(int)>* f = nullptr;
      {
        std::unique_lock<std::mutex> g(m_);
        start_.wait(g, [&] { return stop_ || generation_ != seen; });
        if (stop_) return;
        seen = generation_;
        f = task_;
      }
      (*f)(r);
      std::lock_guard<std::mutex> g(m_);
      if (--pending_ == 0) done_.notify_one();
    }
  }

  std::mutex m_;
  std::condition_variable start_, done_;
  const std::function<void(int)>* task_ = nullptr;
  int pending_ = 0;
  uint64_t generation_ = 0;
  bool stop_ = false;
  std::vector<std::thread> threads_;
};

}  // namespace headroom
