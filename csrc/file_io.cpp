#include "pyckpt/file_io.h"

#include <algorithm>
#include <cerrno>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#if defined(__linux__)
#include <sys/vfs.h>
#endif
#include <unistd.h>

#include "pyckpt/errors.h"

namespace pyckpt {

namespace {
[[noreturn]] void os_fail(const std::string& what, const std::string& path, int err) {
  throw Error(ErrorKind::OS, what + " " + path + ": " + errno_text(err));
}
}  // namespace

File::~File() {
  if (fd_ >= 0) ::close(fd_);
  if (direct_fd_ >= 0) ::close(direct_fd_);
}

File::File(File&& o) noexcept
    : fd_(o.fd_), direct_fd_(o.direct_fd_), writable_map_(o.writable_map_), path_(std::move(o.path_)),
      size_at_open_(o.size_at_open_) {
  o.fd_ = -1;
  o.direct_fd_ = -1;
}

File& File::operator=(File&& o) noexcept {
  if (this != &o) {
    if (fd_ >= 0) ::close(fd_);
    if (direct_fd_ >= 0) ::close(direct_fd_);
    fd_ = o.fd_;
    direct_fd_ = o.direct_fd_;
    writable_map_ = o.writable_map_;
    path_ = std::move(o.path_);
    size_at_open_ = o.size_at_open_;
    o.fd_ = -1;
    o.direct_fd_ = -1;
  }
  return *this;
}

File File::create(const std::string& path, bool direct, bool keep) {
  const int fd = ::open(path.c_str(), (keep ? O_RDWR : O_WRONLY | O_TRUNC) | O_CREAT | O_CLOEXEC, 0644);
  if (fd < 0) os_fail("cannot create", path, errno);
  // tmpfs and some network file systems refuse O_DIRECT: then buffered only.
  const int dfd = direct ? ::open(path.c_str(), O_WRONLY | O_DIRECT | O_CLOEXEC) : -1;
  File f(fd, path, dfd);
  f.writable_map_ = keep;
  return f;
}

bool File::pwrite_direct(const void* data, size_t n, uint64_t offset) const {
  if (direct_fd_ < 0) return false;
  const auto* p = static_cast<const uint8_t*>(data);
  size_t done = 0;
  while (done < n) {
    const ssize_t w = ::pwrite(direct_fd_, p + done, n - done, static_cast<off_t>(offset + done));
    if (w < 0 && errno == EINTR) continue;
    if (w < 0 && errno == EINVAL && done == 0) return false;  // alignment refused: caller rewrites buffered
    if (w < 0) os_fail("direct write failed at offset " + std::to_string(offset + done) + " of", path_, errno);
    if (w == 0) os_fail("write made no progress at offset " + std::to_string(offset + done) + " of", path_, EIO);
    done += static_cast<size_t>(w);
  }
  return true;
}

namespace {
// Only regular files are read: a FIFO, device or socket could block or
// stream endless bytes. The size is recorded so no length from a manifest is
// trusted beyond what the file holds.
File checked_reader(int fd, const std::string& path) {
  struct stat st;
  if (::fstat(fd, &st) != 0) {
    const int err = errno;
    ::close(fd);
    os_fail("fstat failed for", path, err);
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    throw Error(ErrorKind::OS, "cannot read " + path + ": not a regular file");
  }
  File f(fd, path);
  f.set_size_at_open(static_cast<uint64_t>(st.st_size));
  return f;
}
}  // namespace

File File::open_read(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK);
  if (fd < 0 && errno == ELOOP)
    throw Error(ErrorKind::OS, "cannot open " + path + ": it is a symbolic link (not followed)");
  if (fd < 0) os_fail("cannot open", path, errno);
  return checked_reader(fd, path);
}

File File::borrow_read(int fd, const std::string& name) {
  const int own = ::fcntl(fd, F_DUPFD_CLOEXEC, 0);
  if (own < 0) os_fail("cannot duplicate the descriptor of", name, errno);
  return checked_reader(own, name);
}

void File::pwrite_all(const void* data, size_t n, uint64_t offset) const {
  const auto* p = static_cast<const uint8_t*>(data);
  while (n > 0) {
    const ssize_t w = ::pwrite(fd_, p, n, static_cast<off_t>(offset));
    if (w < 0 && errno == EINTR) continue;
    if (w < 0) os_fail("write failed at offset " + std::to_string(offset) + " of", path_, errno);
    if (w == 0) os_fail("write made no progress at offset " + std::to_string(offset) + " of", path_, EIO);
    p += w;
    n -= static_cast<size_t>(w);
    offset += static_cast<uint64_t>(w);
  }
}

namespace {
constexpr long kExt4Magic = 0xEF53;      // EXT4_SUPER_MAGIC (linux/magic.h)
constexpr long kXfsMagic = 0x58465342;   // XFS_SUPER_MAGIC
}  // namespace

bool File::preallocate(uint64_t n) const {
#if defined(__linux__)
  // A direct write past the end of the file takes the inode's lock exclusively
  // on ext4 and XFS (it moves i_size), so parallel writes of a new file queue
  // on it, the waiters spinning on the training job's cores; inside allocated
  // blocks they share it. Elsewhere (tmpfs: fallocate zero-fills memory) no.
  struct statfs fs;
  if (n == 0 || direct_fd_ < 0 || fstatfs(fd_, &fs) != 0) return false;
  const long type = static_cast<long>(fs.f_type);
  if (type != kExt4Magic && type != kXfsMagic) return false;
  int r;
  while ((r = ::fallocate(fd_, 0, 0, static_cast<off_t>(n))) != 0 && errno == EINTR) {
  }
  if (r == 0) return true;
  // Out of space, it may have allocated part: given back, so the writes meet
  // the full disk where they always did and report it the same way.
  while (::ftruncate(fd_, 0) != 0 && errno == EINTR) {
  }
  return false;
#else
  (void)n;
  return false;
#endif
}

size_t File::pread_all(void* data, size_t n, uint64_t offset) const {
  auto* p = static_cast<uint8_t*>(data);
  size_t got = 0;
  while (got < n) {
    const ssize_t r = ::pread(fd_, p + got, n - got, static_cast<off_t>(offset + got));
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) os_fail("read failed at offset " + std::to_string(offset + got) + " of", path_, errno);
    if (r == 0) break;  // end of file
    got += static_cast<size_t>(r);
  }
  return got;
}

void File::truncate(uint64_t size) const {
  while (::ftruncate(fd_, static_cast<off_t>(size)) != 0) {
    if (errno != EINTR) os_fail("cannot truncate", path_, errno);
  }
}

void File::fsync() const {
  while (::fsync(fd_) != 0) {
    if (errno != EINTR) os_fail("fsync failed for", path_, errno);
  }
}

uint64_t File::size() const {
  struct stat st;
  if (::fstat(fd_, &st) != 0) os_fail("fstat failed for", path_, errno);
  return static_cast<uint64_t>(st.st_size);
}

void File::close() {
  if (direct_fd_ >= 0) ::close(direct_fd_);
  direct_fd_ = -1;
  if (fd_ < 0) return;
  const int fd = fd_;
  fd_ = -1;
  // close() can report a deferred write error (e.g. on NFS).
  if (::close(fd) != 0 && errno != EINTR) os_fail("close failed for", path_, errno);
}

namespace {
constexpr long kTmpfsMagic = 0x01021994;  // TMPFS_MAGIC (linux/magic.h)
}

MemoryFileView MemoryFileView::of(const File& file) {
  MemoryFileView v;
#if defined(__linux__)
  struct statfs fs;
  struct stat st;
  if (!file.is_open() || fstatfs(file.fd(), &fs) != 0 || static_cast<long>(fs.f_type) != kTmpfsMagic ||
      fstat(file.fd(), &st) != 0)
    return v;
  const uint64_t n = std::min<uint64_t>(file.size_at_open(), static_cast<uint64_t>(st.st_size));
  if (n == 0) return v;
  // Not MAP_POPULATE: prefaulting here runs on one thread, faults during the
  // reads are spread over the I/O threads (faster in a one-off measurement).
  void* p = mmap(nullptr, n, PROT_READ, MAP_SHARED, file.fd(), 0);
  if (p == MAP_FAILED) return v;
  v.data_ = static_cast<const uint8_t*>(p);
  v.size_ = n;
#else
  (void)file;
#endif
  return v;
}

MemoryFileView::~MemoryFileView() {
  if (data_ != nullptr) munmap(const_cast<uint8_t*>(data_), size_);
}

MemoryFileView::MemoryFileView(MemoryFileView&& o) noexcept : data_(o.data_), size_(o.size_) {
  o.data_ = nullptr;
  o.size_ = 0;
}

MemoryFileView& MemoryFileView::operator=(MemoryFileView&& o) noexcept {
  if (this != &o) {
    if (data_ != nullptr) munmap(const_cast<uint8_t*>(data_), size_);
    data_ = o.data_, size_ = o.size_;
    o.data_ = nullptr, o.size_ = 0;
  }
  return *this;
}

}  // namespace pyckpt
