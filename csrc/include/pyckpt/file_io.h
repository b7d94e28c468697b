// Positional file I/O that never gives up on a partial transfer or EINTR, and
// turns every failure into Error(OS) naming the file, offset and errno text.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace pyckpt {

/// RAII file descriptor.
class File {
 public:
  File() = default;
  File(int fd, std::string path, int direct_fd = -1)
      : fd_(fd), direct_fd_(direct_fd), path_(std::move(path)) {}
  ~File();
  File(File&& o) noexcept;
  File& operator=(File&& o) noexcept;
  File(const File&) = delete;
  File& operator=(const File&) = delete;

  /// Create or truncate `path` for writing. With `direct`, also open an
  /// O_DIRECT descriptor when the file system supports one (best effort).
  /// With `keep`, an existing file is opened read-write and not truncated,
  /// so its pages are reused (a recycled memory-tier file; see MappingCache).
  static File create(const std::string& path, bool direct = false, bool keep = false);
  /// Open `path` for reading: O_NOFOLLOW (a symbolic link as the last
  /// component is refused), O_NONBLOCK (a FIFO never blocks the open) and
  /// O_CLOEXEC; anything but a regular file is refused (Error(OS)).
  static File open_read(const std::string& path);
  /// A reader of an already-open descriptor `fd` (dup'ed with F_DUPFD_CLOEXEC,
  /// so the caller keeps and closes its own). `name` is used in messages.
  /// Refuses anything but a regular file.
  static File borrow_read(int fd, const std::string& name);

  int fd() const { return fd_; }
  const std::string& path() const { return path_; }
  bool is_open() const { return fd_ >= 0; }

  void pwrite_all(const void* data, size_t n, uint64_t offset) const;
  /// True when pwrite_direct may be used (an O_DIRECT descriptor is open).
  bool has_direct() const { return direct_fd_ >= 0; }
  /// Writes through the O_DIRECT descriptor, bypassing the page cache. `data`,
  /// `n` and `offset` must be 4 KiB multiples. Returns false (nothing written)
  /// when the kernel refuses direct I/O for this request: use pwrite_all.
  bool pwrite_direct(const void* data, size_t n, uint64_t offset) const;
  /// Allocates [0, n) of a new, empty file opened for direct writes, on ext4
  /// and XFS only; false (nothing allocated) elsewhere or on any failure, when
  /// the writes extend the file as before. Call before any write.
  bool preallocate(uint64_t n) const;
  /// Reads up to n bytes; returns fewer only at end of file.
  size_t pread_all(void* data, size_t n, uint64_t offset) const;
  void fsync() const;
  /// Opened with `keep` (read-write): MappingCache may map it.
  bool writable_map() const { return writable_map_; }
  void truncate(uint64_t size) const;
  uint64_t size() const;
  /// File size captured by open_read/borrow_read (0 for files made by create).
  uint64_t size_at_open() const { return size_at_open_; }
  void set_size_at_open(uint64_t n) { size_at_open_ = n; }
  void close();

 private:
  int fd_ = -1;
  int direct_fd_ = -1;
  bool writable_map_ = false;
  std::string path_;
  uint64_t size_at_open_ = 0;
};

/// A read-only view of a whole file that lives in memory (tmpfs: the memory
/// tier), so a restore can checksum chunks where they lie and copy them once,
/// instead of reading them into a bounce buffer first. Empty for any other
/// file system or when mapping fails (the caller reads as usual). Covers the
/// smaller of the size at open and the size now; a file truncated while a
/// chunk is being copied from it would still fault, as with any mapping.
class MemoryFileView {
 public:
  MemoryFileView() = default;
  static MemoryFileView of(const File& file);
  ~MemoryFileView();
  MemoryFileView(MemoryFileView&& o) noexcept;
  MemoryFileView& operator=(MemoryFileView&& o) noexcept;
  MemoryFileView(const MemoryFileView&) = delete;
  MemoryFileView& operator=(const MemoryFileView&) = delete;

  /// The n bytes at offset, or nullptr when they are not all inside the view.
  const uint8_t* at(uint64_t offset, uint64_t n) const {
    return data_ != nullptr && n <= size_ && offset <= size_ - n ? data_ + offset : nullptr;
  }

 private:
  const uint8_t* data_ = nullptr;
  size_t size_ = 0;
};

}  // namespace pyckpt
