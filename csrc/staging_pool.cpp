#include "pyckpt/staging_pool.h"

#include <sys/mman.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <iterator>

#include "pyckpt/cuda_api.h"
#include "pyckpt/errors.h"

namespace pyckpt {

namespace {
constexpr size_t kAlign = 4096;
// A slab that holds a 2 MiB page starts on a 2 MiB boundary, so the kernel can
// back it with transparent huge pages where it allows them ("madvise", "always").
constexpr size_t kHugePage = size_t{2} << 20;
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

// An anonymous mapping of its own per slab (never malloc's heap, so the
// advice below touches nothing else), starting on a 2 MiB boundary when the
// slab holds a 2 MiB page: what was mapped around it for alignment is
// unmapped again.
uint8_t* StagingPool::map_slab() const {
  const size_t align = slab_bytes_ >= kHugePage ? kHugePage : kAlign;
  const size_t len = slab_bytes_ + (align - kAlign);  // mmap gives 4 KiB alignment
  void* raw = ::mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (raw == MAP_FAILED) return nullptr;
  const uintptr_t at = reinterpret_cast<uintptr_t>(raw);
  const uintptr_t start = round_up(at, align);
  if (start > at) ::munmap(raw, start - at);
  const uintptr_t end = start + slab_bytes_;
  if (at + len > end) ::munmap(reinterpret_cast<void*>(end), at + len - end);
  return reinterpret_cast<uint8_t*>(start);
}

// `registered`: set when the slab is a mapping page-locked by host_register
// (pinned pools; freed by unregistering and unmapping, not cudaFreeHost).
uint8_t* StagingPool::allocate_slab(bool& registered) {
  registered = false;
  uint8_t* p = map_slab();
  if (pinned_) {
    // Page-locked in place, the slab keeps its huge pages: the device copies
    // into it as into cudaHostAlloc's memory, and its O_DIRECT writes pin
    // 512x fewer pages, as for host slabs. Refused by the driver:
    // cudaHostAlloc, as before.
    if (p && cuda::host_register(prepare_mapped(p), slab_bytes_)) {
      registered = true;
      return p;
    }
    if (p) ::munmap(p, slab_bytes_);
    return static_cast<uint8_t*>(cuda::host_alloc(slab_bytes_));
  }
  if (!p)
    throw Error(ErrorKind::Runtime, "cannot allocate a staging slab of " +
                                        std::to_string(slab_bytes_) +
                                        " bytes: out of memory (lower PYCKPT_STAGING_MB)");
  return prepare_mapped(p);
}

// Advice and first touch for a slab from map_slab.
uint8_t* StagingPool::prepare_mapped(uint8_t* p) const {
  // Huge pages where the kernel grants them: an O_DIRECT write pins 512x
  // fewer pages (benchmarks/save_cpu.py: 0.6 GB saves spent about a third
  // less kernel CPU) and the capture copy misses the TLB less. Advice only:
  // refused, the slab keeps 4 KiB pages.
  if (slab_bytes_ >= kHugePage) ::madvise(p, slab_bytes_, MADV_HUGEPAGE);
  // A forked child (a DataLoader worker) never uses the engine it inherits:
  // without this, each fork shares the slabs copy-on-write, and the next
  // capture copies them page by page while the child lives
  // (benchmarks/fork_capture.py).
  ::madvise(p, slab_bytes_, MADV_DONTFORK);
  // First touch costs a page fault per page; pay it once here, not per save
  // (and before page-locking, so the pages locked are the huge ones).
  std::memset(p, 0, slab_bytes_);
  return p;
}

void StagingPool::free_slab(uint8_t* p) noexcept {
  if (registered_.count(p) != 0) {
    cuda::host_unregister(p);
    ::munmap(p, slab_bytes_);
  } else if (pinned_) {
    cuda::host_free(p);
  } else {
    ::munmap(p, slab_bytes_);
  }
}

int StagingPool::split_for(size_t nbytes) const {
  const size_t need = round_up(std::max<size_t>(nbytes, 1), kAlign);
  int split = 0;
  while (split + 1 < kSplits && block_size(split + 1) >= need) ++split;
  return split;
}

size_t StagingPool::block_size(int split) const {
  // Whole slabs are slab_bytes_; blocks are cut at 4 KiB boundaries (O_DIRECT
  // writes straight from them) and none is smaller than 4 KiB.
  return split == 0 ? slab_bytes_ : std::max<size_t>((slab_bytes_ >> split) / kAlign * kAlign, kAlign);
}

uint8_t* StagingPool::take_whole(std::unique_lock<std::mutex>& lock) {
  if (!free_.empty()) {
    uint8_t* p = free_.back();
    free_.pop_back();
    return p;
  }
  if (all_.size() + allocating_ >= max_slabs_) return nullptr;
  ++allocating_;
  lock.unlock();
  uint8_t* p = nullptr;
  bool registered = false;
  try {
    p = allocate_slab(registered);
  } catch (...) {
    lock.lock();
    --allocating_;
    throw;
  }
  lock.lock();
  --allocating_;
  all_.push_back(p);
  if (registered) registered_.insert(p);
  slabs_.emplace(p, Slab{});
  return p;
}

uint8_t* StagingPool::acquire(size_t nbytes, std::chrono::milliseconds timeout, const std::atomic<bool>* abort) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  const int split = split_for(nbytes);
  std::unique_lock<std::mutex> lock(mu_);
  for (;;) {
    if (split > 0 && !free_blocks_[split].empty()) {
      uint8_t* p = free_blocks_[split].back();
      free_blocks_[split].pop_back();
      --std::prev(slabs_.upper_bound(p))->second.free;
      return p;
    }
    if (uint8_t* base = take_whole(lock)) {
      if (split == 0) return base;
      // Split it: the first block is returned, the others wait in this size's free list.
      const size_t block = block_size(split), n = slab_bytes_ / block;
      slabs_[base] = Slab{split, n - 1};
      for (size_t k = n - 1; k >= 1; --k) free_blocks_[split].push_back(base + k * block);
      return base;
    }
    if (abort && abort->load()) return nullptr;
    const auto now = std::chrono::steady_clock::now();
    if (now >= deadline) return nullptr;
    cv_.wait_until(lock, std::min(deadline, now + kPollSlice));
  }
}

void StagingPool::release(uint8_t* block) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = std::prev(slabs_.upper_bound(block));
    Slab& slab = it->second;
    if (slab.split == 0) {
      free_.push_back(block);
    } else {
      std::vector<uint8_t*>& list = free_blocks_[slab.split];
      list.push_back(block);
      if (++slab.free == slab_bytes_ / block_size(slab.split)) {
        // Every block back: the slab is whole again, for a chunk of any size.
        uint8_t* base = it->first;
        uint8_t* end = base + slab_bytes_;
        list.erase(std::remove_if(list.begin(), list.end(), [&](uint8_t* p) { return p >= base && p < end; }),
                   list.end());
        slab = Slab{};
        free_.push_back(base);
      }
    }
  }
  cv_.notify_all();  // a whole slab serves a waiter of any size
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
