// A fixed set of worker threads draining a FIFO of tasks, plus a WaitGroup to
// wait for a batch of them. Tasks must not throw (they catch and record).
#pragma once

#include <condition_variable>
#include <cstddef>
#include <functional>
#include <mutex>
#include <queue>
#include <string>
#include <thread>
#include <vector>

namespace pyckpt {

class ThreadPool {
 public:
  /// `nice` > 0: each worker lowers its own scheduling priority to that nice value (Linux), so
  /// it takes a core only when the training threads leave one idle, not an equal share of it.
  /// `name` (at most 15 characters on Linux) labels the workers in `top -H`, py-spy and
  /// /proc/<pid>/task/*/comm, so an operator can tell the engine's threads from training's.
  /// Fewer threads than `nthreads` start when the limit on threads is reached (`shortfall()` says
  /// so); none is an Error(OS) naming the pool.
  explicit ThreadPool(size_t nthreads, int nice = 0, const char* name = "pyckpt-pool");
  /// Runs every queued task, then joins the workers.
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  void submit(std::function<void()> task);
  size_t size() const { return workers_.size(); }
  /// Empty, or how many of the threads asked for started and why no more did.
  const std::string& shortfall() const { return shortfall_; }

 private:
  void work();

  std::mutex mu_;
  std::condition_variable cv_;
  std::queue<std::function<void()>> tasks_;
  bool stopping_ = false;
  std::vector<std::thread> workers_;
  std::string shortfall_;
};

/// Names the calling thread (Linux: at most 15 characters are kept; elsewhere a no-op).
void name_this_thread(const char* name) noexcept;

/// Counts outstanding tasks; wait() returns when the count reaches zero.
class WaitGroup {
 public:
  void add(size_t n);
  void done();
  void wait();

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  size_t count_ = 0;
};

}  // namespace pyckpt
