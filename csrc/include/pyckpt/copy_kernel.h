// Host capture's inner loop: copy a block of tensor memory and checksum it
// (and fingerprint it, for incremental checkpoints) in one pass over memory.
#pragma once

#include <cstddef>
#include <cstdint>

namespace pyckpt {

/// Copies n bytes from src to dst and returns the CRC32C (continuing from
/// `seed`) of the bytes stored. Large copies use streaming stores: the copy
/// is not read again soon (it goes to a file or stays as a snapshot), so it
/// neither displaces the training's cache lines nor reads the destination
/// from memory before overwriting it. `stream` false: plain stores (memory
/// just allocated, whose pages the kernel zeroes into cache as they fault).
uint32_t copy_crc32c(void* dst, const void* src, size_t n, uint32_t seed = 0, bool stream = true);

/// copy_crc32c that also adds the bytes stored to a fingerprint's lane sums
/// (fingerprint.h; `first_stripe` is their stripe number within the piece).
uint32_t copy_crc32c_fp(void* dst, const void* src, size_t n, uint32_t seed, uint64_t first_stripe,
                        uint64_t lanes[4]);

/// The CRC32C (continuing from `seed`) of n bytes and their fingerprint lane sums, in one read of
/// them: an incremental save's check of a chunk expected unchanged (fingerprint, then checksum
/// against the chunk it would reference) without a second pass over memory.
uint32_t crc32c_fp(const void* src, size_t n, uint32_t seed, uint64_t first_stripe, uint64_t lanes[4]);

}  // namespace pyckpt
