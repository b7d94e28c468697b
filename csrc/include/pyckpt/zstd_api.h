// zstd, resolved at run time from a shared object that exports its C API
// (normally the `zstandard` wheel's _cffi extension, so no system libzstd or
// headers are needed). Until load() succeeds, available() is false and the
// zstd codec is refused with a clear error.
#pragma once

#include <cstddef>
#include <string>

namespace pyckpt::zstd {

/// dlopen `path` and resolve the zstd symbols; throws Error(OS) naming the path.
/// Loading again after a success is a no-op.
void load(const std::string& path);

bool available();

/// Library version as "1.5.7".
std::string version();

/// Compress n bytes of src into at most `capacity` bytes of dst at `level`
/// (literal compression forced on). Returns the compressed size, or 0 when
/// the result would not fit (the caller then stores the bytes raw).
size_t compress(const void* src, size_t n, void* dst, size_t capacity, int level);

/// Decompress into exactly `expected` bytes; throws Error(Value) otherwise.
void decompress_exact(const void* src, size_t n, void* dst, size_t expected);

}  // namespace pyckpt::zstd
