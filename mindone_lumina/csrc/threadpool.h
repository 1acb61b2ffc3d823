// The threads of the CPU custom ops: one per core the process may run on (the calling thread is one of them), shared by
// every op and handed to oneDNN as its threadpool. Closures are dealt out by an atomic counter.
#pragma once

#include <sched.h>

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

// oneDNN's dnnl::threadpool_interop::threadpool_iface, declared with the same virtual functions in the same order
struct ThreadpoolIface {
  virtual int get_num_threads() const = 0;
  virtual bool get_in_parallel() const = 0;
  virtual void parallel_for(int n, const std::function<void(int, int)> &fn) = 0;
  virtual uint64_t get_flags() const = 0;  // 0: parallel_for returns when every closure has run
  virtual ~ThreadpoolIface() = default;
};

inline thread_local bool in_pool = false;

class Threadpool : public ThreadpoolIface {
 public:
  Threadpool() {
    cpu_set_t set;
    threads_ = sched_getaffinity(0, sizeof(set), &set) == 0 ? CPU_COUNT(&set) : 1;
    for (int i = 1; i < threads_; ++i) workers_.emplace_back([this] { work(); });
  }
  int get_num_threads() const override { return threads_; }
  bool get_in_parallel() const override { return in_pool; }
  uint64_t get_flags() const override { return 0; }

  // for (i = 0; i < n; i++) fn(i, n), spread over the threads; nested calls run on the calling thread, and calls
  // from two threads (MindSpore may launch two kernels at once) take turns
  void parallel_for(int n, const std::function<void(int, int)> &fn) override {
    if (n <= 1 || in_pool || threads_ == 1) {
      for (int i = 0; i < n; ++i) fn(i, n);
      return;
    }
    std::lock_guard<std::mutex> turn(call_);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      fn_ = &fn, tasks_ = n, next_ = 0, busy_ = threads_ - 1, ++generation_;
    }
    wake_.notify_all();
    run();
    std::unique_lock<std::mutex> lock(mutex_);
    done_.wait(lock, [this] { return busy_ == 0; });
  }

 private:
  void run() {
    in_pool = true;
    for (int i = next_++; i < tasks_; i = next_++) (*fn_)(i, tasks_);
    in_pool = false;
  }
  void work() {
    uint64_t seen = 0;
    for (;;) {
      {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return generation_ != seen; });
        seen = generation_;
      }
      run();
      std::lock_guard<std::mutex> lock(mutex_);
      if (--busy_ == 0) done_.notify_one();
    }
  }
  int threads_;
  std::vector<std::thread> workers_;  // never joined: the pool lives as long as the process
  std::mutex call_, mutex_;
  std::condition_variable wake_, done_;
  const std::function<void(int, int)> *fn_ = nullptr;
  int tasks_ = 0, busy_ = 0;
  std::atomic<int> next_{0};
  uint64_t generation_ = 0;
};

// The process's pool (one for all the ops compiled into the library).
inline Threadpool &threadpool() {
  static Threadpool *pool = new Threadpool;  // never destroyed: its threads may be waiting at exit
  return *pool;
}
