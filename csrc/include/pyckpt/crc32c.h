// CRC32C (Castagnoli, reflected polynomial 0x82F63B78), the checksum of every
// stored chunk. Uses the SSE4.2 crc32 instruction when the CPU has it (three
// independent streams interleaved to hide its 3-cycle latency) and a portable
// slicing-by-8 table otherwise; large buffers are folded with VPCLMULQDQ where
// the CPU has it. All give identical results.
#pragma once

#include <cstddef>
#include <cstdint>

namespace pyckpt {

/// CRC32C of n bytes continuing from `seed` (crc32c(b, crc32c(a)) == crc32c(a+b)).
uint32_t crc32c(const void* data, size_t n, uint32_t seed = 0);

/// CRC32C of A||B from crc32c(A) and crc32c(B), where B is len_b bytes long:
/// lets parts of one buffer be checksummed on different threads.
uint32_t crc32c_combine(uint32_t crc_a, uint32_t crc_b, size_t len_b);
/// The table-driven path, whatever the CPU supports (tests compare both).
uint32_t crc32c_software(const void* data, size_t n, uint32_t seed = 0);

/// The crc32c() kernel for large buffers: "vpclmulqdq", "sse4.2" or "table".
const char* crc32c_kernel();
/// crc32c() without folding (the crc32-instruction path), for tests.
uint32_t crc32c_unfolded(const void* data, size_t n, uint32_t seed = 0);

/// True when crc32c() uses the CPU's crc32 instruction.
bool crc32c_hardware();

}  // namespace pyckpt
