// Internal to the engine: CRC32C by carry-less multiply folding (VPCLMULQDQ on
// 256-bit registers), shared by crc32c.cpp (checksum of bytes in place) and
// copy_kernel.cpp (copy, checksum and fingerprint in one pass). x86-64 only;
// callers check fold::available() first.
//
// Why: the crc32 instruction handles 8 bytes per cycle on one core, slower
// than memory on the machines this runs on; folding handles 32 bytes per two
// multiplies. Derivation, with lane bit i standing for x^(127-i) (reflected
// bit order): a clmul of two 64-bit halves a, k yields x * a(x) * k(x), so
// moving a 128-bit lane D bits forward multiplies its low half by
// x^(D+63) mod P and its high half by x^(D-1) mod P (Constants). What is left
// at the end is one 16-byte lane congruent to the message mod P, whose CRC from
// a zero register is the message's.
#pragma once

#if defined(__x86_64__)

#include <immintrin.h>

#include <cstddef>
#include <cstdint>

#define PYCKPT_FOLD_TARGET __attribute__((target("avx2,vpclmulqdq,pclmul,sse4.2")))

namespace pyckpt::fold {

/// Below this many bytes the crc32 instruction is as fast; update() needs at least this.
constexpr size_t kMin = 256;

/// {low half, high half} multipliers per fold distance (in bytes).
struct Constants {
  uint64_t by128[2], by32[2], by16[2];
};
const Constants& constants();

/// True when the CPU has AVX2, PCLMULQDQ, VPCLMULQDQ and SSE4.2.
bool available();

PYCKPT_FOLD_TARGET inline __m256i fold256(__m256i x, __m256i k, __m256i next) {
  return _mm256_xor_si256(
      _mm256_xor_si256(_mm256_clmulepi64_epi128(x, k, 0x00), _mm256_clmulepi64_epi128(x, k, 0x11)), next);
}

PYCKPT_FOLD_TARGET inline __m128i fold128(__m128i x, __m128i k, __m128i next) {
  return _mm_xor_si128(_mm_xor_si128(_mm_clmulepi64_si128(x, k, 0x00), _mm_clmulepi64_si128(x, k, 0x11)), next);
}

PYCKPT_FOLD_TARGET inline __m256i pair(const uint64_t k[2]) {
  return _mm256_set_epi64x(static_cast<long long>(k[1]), static_cast<long long>(k[0]),
                           static_cast<long long>(k[1]), static_cast<long long>(k[0]));
}

/// Continues the raw CRC register `crc` (no pre/post inversion) over the
/// whole 32-byte blocks of n >= kMin bytes; returns the register and sets
/// *done to the bytes consumed (n rounded down to 32). `take(off)` returns the
/// 32 bytes at offset off: it is called exactly once per block, in increasing
/// offset order, so it may also store or hash the block from the register.
template <class Take>
PYCKPT_FOLD_TARGET inline uint32_t update(uint32_t crc, size_t n, Take& take, size_t* done) {
  const Constants& K = constants();
  __m256i x0 = take(0), x1 = take(32), x2 = take(64), x3 = take(96);
  // The running register enters as if XORed into the first four bytes.
  x0 = _mm256_xor_si256(x0, _mm256_zextsi128_si256(_mm_cvtsi32_si128(static_cast<int>(crc))));
  size_t off = 128;
  const __m256i k128 = pair(K.by128);
  for (; off + 128 <= n; off += 128) {
    x0 = fold256(x0, k128, take(off));
    x1 = fold256(x1, k128, take(off + 32));
    x2 = fold256(x2, k128, take(off + 64));
    x3 = fold256(x3, k128, take(off + 96));
  }
  const __m256i k32 = pair(K.by32);
  x1 = fold256(x0, k32, x1);
  x2 = fold256(x1, k32, x2);
  x3 = fold256(x2, k32, x3);
  for (; off + 32 <= n; off += 32) x3 = fold256(x3, k32, take(off));
  const __m128i k16 = _mm_set_epi64x(static_cast<long long>(K.by16[1]), static_cast<long long>(K.by16[0]));
  const __m128i r = fold128(_mm256_castsi256_si128(x3), k16, _mm256_extracti128_si256(x3, 1));
  uint64_t c = _mm_crc32_u64(0, static_cast<uint64_t>(_mm_cvtsi128_si64(r)));
  c = _mm_crc32_u64(c, static_cast<uint64_t>(_mm_extract_epi64(r, 1)));
  *done = off;
  return static_cast<uint32_t>(c);
}

}  // namespace pyckpt::fold

#endif  // __x86_64__
