#include "pyckpt/staging_pool.h"

#include <cstdlib>
#include <cstring>

#include "pyckpt/cuda_api.h"
#include "pyckpt/errors.h"

namespace pyckpt {

namespace {
constexpr size_t kAlign = 4096;
size_t round_up(size_t n, size_t a) { return (n + a - 1) / a * a; }
// Abort flags are polled at this interval while waiting for a slab.
constexpr std::chrono::milliseconds kPollSlice(20);
}  // namespace

StagingPool::StagingPool(size_t budget_bytes, size_t slab_bytes, bool pinned)
    : slab_bytes_(round_up(slab_bytes, kAlign)),
      max_slabs_(budget_bytes / round_up(slab_bytes, kAlign) > 0
                     ? budget_bytes / round_up(slab_bytes, kAlign)
                     : 1),
      pinned_(pinned && cuda::available()) {
  PYCKPT_CHECK_ARG(slab_bytes > 0, "chunk_bytes must be > 0");
}

StagingPool::~StagingPool() {
  for (uint8_t* p : all_) free_slab(p);
}

uint8_t* StagingPool::allocate_slab() {
  if (pinned_) return static_cast<uint8_t*>(cuda::host_alloc(slab_bytes_));
  void* p = std::aligned_alloc(kAlign, slab_bytes_);
  if (!p)
    throw Error(ErrorKind::Runtime, "cannot allocate a staging slab of " +
                                        std::to_string(slab_bytes_) +
                                        " bytes: out of memory (lower PYCKPT_STAGING_MB)");
  // First touch costs a page fault per 4 KiB; pay it once here, not per save.
  std::memset(p, 0, slab_bytes_);
  return static_cast<uint8_t*>(p);
}

void StagingPool::free_slab(uint8_t* p) noexcept {
  if (pinned_)
    cuda::host_free(p);
  else
    std::free(p);
}

uint8_t* StagingPool::acquire(std::chrono::milliseconds timeout, const std::atomic<bool>* abort) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  std::unique_lock<std::mutex> lock(mu_);
  for (;;) {
    if (!free_.empty()) {
      uint8_t* p = free_.back();
      free_.pop_back();
      return p;
    }
    if (all_.size() + allocating_ < max_slabs_) {
      ++allocating_;
      lock.unlock();
      uint8_t* p = nullptr;
      try {
        p = allocate_slab();
      } catch (...) {
        lock.lock();
        --allocating_;
        throw;
      }
      lock.lock();
      --allocating_;
      all_.push_back(p);
      return p;
    }
    if (abort && abort->load()) return nullptr;
    const auto now = std::chrono::steady_clock::now();
    if (now >= deadline) return nullptr;
    cv_.wait_until(lock, std::min(deadline, now + kPollSlice));
  }
}

void StagingPool::release(uint8_t* slab) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    free_.push_back(slab);
  }
  cv_.notify_one();
}

size_t StagingPool::allocated_bytes() const {
  std::lock_guard<std::mutex> lock(mu_);
  return (all_.size() + allocating_) * slab_bytes_;
}

size_t StagingPool::in_use_bytes() const {
  std::lock_guard<std::mutex> lock(mu_);
  return (all_.size() - free_.size()) * slab_bytes_;
}

}  // namespace pyckpt
