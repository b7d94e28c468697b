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
  File(int fd, std::string path) : fd_(fd), path_(std::move(path)) {}
  ~File();
  File(File&& o) noexcept;
  File& operator=(File&& o) noexcept;
  File(const File&) = delete;
  File& operator=(const File&) = delete;

  /// Create or truncate `path` for writing.
  static File create(const std::string& path);
  static File open_read(const std::string& path);

  int fd() const { return fd_; }
  const std::string& path() const { return path_; }
  bool is_open() const { return fd_ >= 0; }

  void pwrite_all(const void* data, size_t n, uint64_t offset) const;
  /// Reads up to n bytes; returns fewer only at end of file.
  size_t pread_all(void* data, size_t n, uint64_t offset) const;
  void fsync() const;
  uint64_t size() const;
  void close();

 private:
  int fd_ = -1;
  std::string path_;
};

}  // namespace pyckpt
