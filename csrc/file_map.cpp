#include "pyckpt/file_map.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>

namespace pyckpt {

namespace {

std::shared_ptr<uint8_t> map_shared(int fd, size_t n) {
  void* p = ::mmap(nullptr, n, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, 0);
  if (p == MAP_FAILED) return nullptr;
  // A forked DataLoader worker must not inherit (and so pin) the tier's pages.
  ::madvise(p, n, MADV_DONTFORK);
  return std::shared_ptr<uint8_t>(static_cast<uint8_t*>(p), [n](uint8_t* q) { ::munmap(q, n); });
}

// Allocates [0, n) of the file. A file with no holes (a recycled snapshot,
// cut to its last chunk's end) only needs its tail: walking 0.6 GB of
// allocated tmpfs pages again costs ~20 ms.
bool allocate(int fd, const struct stat& st, size_t n) {
  off_t from = 0;
  if (static_cast<uint64_t>(st.st_blocks) * 512 >= static_cast<uint64_t>(st.st_size))
    from = st.st_size & ~off_t{4095};
  if (static_cast<off_t>(n) <= from) return true;
  int err;
  while ((err = ::posix_fallocate(fd, from, static_cast<off_t>(n) - from)) == EINTR) {
  }
  return err == 0;
}

}  // namespace

MappingCache::~MappingCache() {
  for (Entry& e : entries_) ::close(e.fd);
}

void MappingCache::drop_deleted() {
  for (auto it = entries_.begin(); it != entries_.end();) {
    struct stat st;
    if (::fstat(it->fd, &st) != 0 || st.st_nlink == 0) {
      ::close(it->fd);
      it = entries_.erase(it);  // unmapped once the last job using it ends
    } else {
      ++it;
    }
  }
}

void MappingCache::evict_one() {
  auto lru = std::min_element(entries_.begin(), entries_.end(),
                              [](const Entry& a, const Entry& b) { return a.used < b.used; });
  if (lru == entries_.end()) return;
  ::close(lru->fd);
  entries_.erase(lru);
}

std::shared_ptr<uint8_t> MappingCache::acquire(const File& f, size_t n) {
  if (!f.writable_map() || n == 0) return nullptr;
  struct stat st;
  if (::fstat(f.fd(), &st) != 0 || !allocate(f.fd(), st, n)) return nullptr;
  std::lock_guard<std::mutex> lock(mu_);
  drop_deleted();
  for (auto it = entries_.begin(); it != entries_.end(); ++it) {
    if (it->dev != st.st_dev || it->ino != st.st_ino) continue;
    // Our descriptor names a live file with this device and inode: this one.
    if (it->len >= n && it->map.use_count() == 1) {
      it->used = ++clock_;
      return it->map;
    }
    ::close(it->fd);
    entries_.erase(it);  // too short, or (never expected) in use by another job
    break;
  }
  std::shared_ptr<uint8_t> map = map_shared(f.fd(), n);
  if (!map) return nullptr;
  const int fd = ::fcntl(f.fd(), F_DUPFD_CLOEXEC, 0);
  if (fd < 0) return map;  // used once, not kept
  if (entries_.size() >= max_entries_) evict_one();
  entries_.push_back(Entry{fd, st.st_dev, st.st_ino, n, map, ++clock_});
  return map;
}

}  // namespace pyckpt
