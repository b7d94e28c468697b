#pragma once
// Writable mappings of the memory tier's data files, kept between saves.
//
// The tier writes each snapshot over the pages of an evicted one (two files
// in turn). Mapping 0.6 GB afresh (prefault, later unmap) costs about as much
// kernel time as copying it, so a file's mapping is kept and reused while the
// file lives; a mapping whose file was deleted is dropped at the next acquire.

#include <sys/types.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

#include "pyckpt/file_io.h"

namespace pyckpt {

class MappingCache {
 public:
  explicit MappingCache(size_t max_entries = 2) : max_entries_(max_entries) {}
  ~MappingCache();
  MappingCache(const MappingCache&) = delete;
  MappingCache& operator=(const MappingCache&) = delete;

  /// A shared, writable mapping of the first n bytes of `f` (opened with
  /// File::create(..., keep=true)), those bytes allocated first so a full
  /// file system is an error now, never a SIGBUS at a store later. nullptr
  /// when the file system refuses: the caller writes instead. The mapping
  /// stays valid while the returned pointer lives.
  std::shared_ptr<uint8_t> acquire(const File& f, size_t n);

 private:
  struct Entry {
    int fd = -1;  // our own descriptor: tells whether the file still exists
    dev_t dev = 0;
    ino_t ino = 0;
    size_t len = 0;
    std::shared_ptr<uint8_t> map;
    uint64_t used = 0;
  };
  void drop_deleted();  // mu_ held
  void evict_one();     // mu_ held

  const size_t max_entries_;
  std::mutex mu_;
  std::vector<Entry> entries_;
  uint64_t clock_ = 0;
};

}  // namespace pyckpt
