// Host staging memory: slabs of chunk_bytes, at most budget/chunk_bytes of
// them (at least one). Slabs are allocated on demand, pre-touched once, and
// then reused for every later save, so steady-state checkpoints neither
// allocate nor page-fault. When every slab is in use, acquire() waits up to a
// timeout and then gives up: memory never grows past the budget.
//
// A chunk much smaller than a slab (the tail of a large tensor, a tensor of
// a quarter chunk or more, which shares its chunks with nothing) gets a block
// of a slab split into 2, 4, 8 or 16 equal parts, the smallest that holds it;
// a split slab is whole again once all its blocks are back. With one slab per
// chunk, a 4 GiB GPU state of 495 tensors took 1.45x its size in slabs: the
// pool ran dry and capture waited for the disk (0.14 of a plain copy's speed).
//
// Slabs are anonymous mappings, on 2 MiB boundaries and advised to use
// transparent huge pages when a slab holds one, and are not inherited by
// forked children. Pinned slabs are such mappings page-locked for the device
// (cuda::host_register), or cudaHostAlloc'd where that is refused.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <map>
#include <mutex>
#include <set>
#include <vector>

namespace pyckpt {

class StagingPool {
 public:
  /// pinned: use page-locked memory (requires CUDA at run time; falls back
  /// to host slabs as above when CUDA is unavailable).
  StagingPool(size_t budget_bytes, size_t slab_bytes, bool pinned);
  ~StagingPool();
  StagingPool(const StagingPool&) = delete;
  StagingPool& operator=(const StagingPool&) = delete;

  /// A free block of at least `nbytes` (<= slab_bytes(); block_bytes(nbytes)
  /// long, 4 KiB-aligned), or nullptr once `timeout` passed or `*abort` became true.
  uint8_t* acquire(size_t nbytes, std::chrono::milliseconds timeout, const std::atomic<bool>* abort);
  void release(uint8_t* block);

  size_t slab_bytes() const { return slab_bytes_; }
  /// The length of the block acquire(nbytes) returns.
  size_t block_bytes(size_t nbytes) const { return block_size(split_for(nbytes)); }
  size_t max_slabs() const { return max_slabs_; }
  size_t allocated_bytes() const;
  /// Bytes of slabs acquired and not released (0 once every job is done).
  size_t in_use_bytes() const;
  bool pinned() const { return pinned_; }

 private:
  static constexpr int kSplits = 5;  // a slab whole, or in 2, 4, 8, 16 blocks
  struct Slab {
    int split = 0;     // index into the splits: blocks of slab_bytes_ >> split
    size_t free = 0;   // its blocks in free_blocks_[split] (split > 0)
  };
  int split_for(size_t nbytes) const;
  size_t block_size(int split) const;
  uint8_t* take_whole(std::unique_lock<std::mutex>& lock);  // nullptr: none free or allocatable
  uint8_t* map_slab() const;
  uint8_t* allocate_slab(bool& registered);
  uint8_t* prepare_mapped(uint8_t* p) const;
  void free_slab(uint8_t* p) noexcept;

  const size_t slab_bytes_;
  const size_t max_slabs_;
  const bool pinned_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::vector<uint8_t*> free_;  // whole slabs
  std::vector<uint8_t*> free_blocks_[kSplits];
  std::map<uint8_t*, Slab> slabs_;  // by base address: a block's slab is found by upper_bound
  std::vector<uint8_t*> all_;
  std::set<uint8_t*> registered_;  // of all_, the mapped slabs page-locked by host_register
  size_t allocating_ = 0;  // slabs being allocated outside the lock
};

}  // namespace pyckpt
