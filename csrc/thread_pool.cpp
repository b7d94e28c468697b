#include "pyckpt/thread_pool.h"

#include <system_error>

#include "pyckpt/errors.h"

#if defined(__linux__)
#include <cerrno>

#include <pthread.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace pyckpt {
namespace {

// The calling thread's nice value raised to `nice` (a no-op for `nice` <= 0 or where it fails).
void lower_thread_priority(int nice) noexcept {
#if defined(__linux__)
  // On Linux a nice value belongs to one thread (its tid), not to the whole process. Only ever
  // lowered: a process already niced further keeps its value (and root never raises one).
  if (nice <= 0) return;
  const auto tid = static_cast<id_t>(syscall(SYS_gettid));
  errno = 0;
  const int now = getpriority(PRIO_PROCESS, tid);
  if (errno == 0 && now >= nice) return;
  (void)setpriority(PRIO_PROCESS, tid, nice);
#else
  (void)nice;
#endif
}

}  // namespace

void name_this_thread(const char* name) noexcept {
#if defined(__linux__)
  char buf[16] = {};  // the kernel keeps 15 characters; a longer name would make the call fail
  for (size_t i = 0; i + 1 < sizeof buf && name[i] != '\0'; ++i) buf[i] = name[i];
  (void)pthread_setname_np(pthread_self(), buf);
#else
  (void)name;
#endif
}

ThreadPool::ThreadPool(size_t nthreads, int nice, const char* name) {
  if (nthreads == 0) nthreads = 1;
  workers_.reserve(nthreads);
  for (size_t i = 0; i < nthreads; ++i) {
    try {
      workers_.emplace_back([this, nice, name] {
        name_this_thread(name);
        lower_thread_priority(nice);
        work();
      });
    } catch (const std::system_error& e) {
      // The process's or container's limit on threads (ulimit -u, cgroup pids.max) is reached.
      // Letting this escape would destroy joinable std::threads: std::terminate, and the training
      // process with it. Some workers: the pool runs with those, slower; none: it cannot run.
      Msg m;
      m << name << ": " << workers_.size() << " of " << nthreads << " threads started (" << e.what()
        << "): the limit on threads (ulimit -u, the container's pids.max) is reached";
      if (workers_.empty()) throw Error(ErrorKind::OS, "cannot start the engine's threads: " + m.str());
      shortfall_ = m.str();
      break;
    }
  }
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
  }
  cv_.notify_all();
  for (auto& t : workers_) t.join();
}

void ThreadPool::submit(std::function<void()> task) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    tasks_.push(std::move(task));
  }
  cv_.notify_one();
}

void ThreadPool::work() {
  for (;;) {
    std::function<void()> task;
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [this] { return stopping_ || !tasks_.empty(); });
      if (tasks_.empty()) return;  // stopping and drained
      task = std::move(tasks_.front());
      tasks_.pop();
    }
    task();
  }
}

void WaitGroup::add(size_t n) {
  std::lock_guard<std::mutex> lock(mu_);
  count_ += n;
}

void WaitGroup::done() {
  std::lock_guard<std::mutex> lock(mu_);
  if (--count_ == 0) cv_.notify_all();
}

void WaitGroup::wait() {
  std::unique_lock<std::mutex> lock(mu_);
  cv_.wait(lock, [this] { return count_ == 0; });
}

}  // namespace pyckpt
