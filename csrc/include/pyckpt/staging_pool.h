// Host staging memory: slabs of chunk_bytes, at most budget/chunk_bytes of
// them (at least one). Slabs are allocated on demand, pre-touched once, and
// then reused for every later save, so steady-state checkpoints neither
// allocate nor page-fault. When every slab is in use, acquire() waits up to a
// timeout and then gives up: memory never grows past the budget.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <vector>

namespace pyckpt {

class StagingPool {
 public:
  /// pinned: use page-locked memory (requires CUDA at run time; falls back
  /// to plain 4 KiB-aligned memory when CUDA is unavailable).
  StagingPool(size_t budget_bytes, size_t slab_bytes, bool pinned);
  ~StagingPool();
  StagingPool(const StagingPool&) = delete;
  StagingPool& operator=(const StagingPool&) = delete;

  /// A free slab, or nullptr once `timeout` passed or `*abort` became true.
  uint8_t* acquire(std::chrono::milliseconds timeout, const std::atomic<bool>* abort);
  void release(uint8_t* slab);

  size_t slab_bytes() const { return slab_bytes_; }
  size_t max_slabs() const { return max_slabs_; }
  size_t allocated_bytes() const;
  /// Bytes of slabs acquired and not released (0 once every job is done).
  size_t in_use_bytes() const;
  bool pinned() const { return pinned_; }

 private:
  uint8_t* allocate_slab();
  void free_slab(uint8_t* p) noexcept;

  const size_t slab_bytes_;
  const size_t max_slabs_;
  const bool pinned_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::vector<uint8_t*> free_;
  std::vector<uint8_t*> all_;
  size_t allocating_ = 0;  // slabs being allocated outside the lock
};

}  // namespace pyckpt
