#include "pyckpt/copy_kernel.h"

#include <algorithm>
#include <cstring>

#include "pyckpt/crc32c.h"
#include "pyckpt/crc32c_fold.h"
#include "pyckpt/fingerprint.h"

namespace pyckpt {

namespace {

// Below this the copy is small enough to stay in cache, where plain stores
// serve the writer that reads it next.
constexpr size_t kStreamMin = 256 << 10;

// Without folding: block by block, checksummed (and fingerprinted) while the
// block is still in cache. Multiple of the 32-byte fingerprint stripe.
constexpr size_t kBlock = 64 << 10;

uint32_t copy_blocks(uint8_t* d, const uint8_t* s, size_t n, uint32_t crc, uint64_t first_stripe, uint64_t* lanes) {
  for (size_t o = 0; o < n; o += kBlock) {
    const size_t len = std::min(kBlock, n - o);
    std::memcpy(d + o, s + o, len);
    crc = crc32c(d + o, len, crc);
    if (lanes) fingerprint_lanes(d + o, len, first_stripe + o / 32, lanes);
  }
  return crc;
}

// crc32c_fp without folding: block by block, each hashed while still in cache.
uint32_t sum_blocks(const uint8_t* s, size_t n, uint32_t crc, uint64_t first_stripe, uint64_t* lanes) {
  for (size_t o = 0; o < n; o += kBlock) {
    const size_t len = std::min(kBlock, n - o);
    crc = crc32c(s + o, len, crc);
    fingerprint_lanes(s + o, len, first_stripe + o / 32, lanes);
  }
  return crc;
}

#if defined(__x86_64__)

// Each block is stored from the register it is checksummed (and hashed)
// from, so the checksum is of exactly the bytes stored even if the source
// changes meanwhile.
template <bool kStream>
struct Copy {
  const uint8_t* src;
  uint8_t* dst;
  PYCKPT_FOLD_TARGET __m256i operator()(size_t off) const {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + off));
    if (kStream)
      _mm256_stream_si256(reinterpret_cast<__m256i*>(dst + off), v);
    else
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + off), v);
    return v;
  }
};

// Copy plus the fingerprint's stripe sums (fingerprint.h): one block is one
// stripe, and blocks come in stripe order, so the position key advances by
// one step per call.
template <bool kStream>
struct CopyFingerprint {
  Copy<kStream> copy;
  __m256i key, step, acc;
  PYCKPT_FOLD_TARGET __m256i operator()(size_t off) {
    const __m256i w = copy(off);
    const __m256i x = _mm256_xor_si256(w, key);
    acc = _mm256_add_epi64(acc, _mm256_add_epi64(_mm256_mul_epu32(x, _mm256_srli_epi64(x, 32)), w));
    key = _mm256_add_epi64(key, step);
    return w;
  }
};

// Read only: the fingerprint's stripe sums of each 32-byte block, which the fold then checksums.
struct ReadFingerprint {
  const uint8_t* src;
  __m256i key, step, acc;
  PYCKPT_FOLD_TARGET __m256i operator()(size_t off) {
    const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + off));
    const __m256i x = _mm256_xor_si256(w, key);
    acc = _mm256_add_epi64(acc, _mm256_add_epi64(_mm256_mul_epu32(x, _mm256_srli_epi64(x, 32)), w));
    key = _mm256_add_epi64(key, step);
    return w;
  }
};

template <class Take>
uint32_t fold_copy(Take& take, size_t n, uint32_t seed, size_t* done) {
  const uint32_t raw = fold::update(~seed, n, take, done);
  _mm_sfence();  // streamed bytes are visible before anyone is told they are there
  return ~raw;
}

PYCKPT_FOLD_TARGET uint32_t copy_fp_folded(uint8_t* d, const uint8_t* s, size_t n, uint32_t seed,
                                           uint64_t first_stripe, uint64_t* lanes, bool stream, size_t* done) {
  const __m256i key = _mm256_add_epi64(
      _mm256_set_epi64x(static_cast<long long>(kFpKey[3]), static_cast<long long>(kFpKey[2]),
                        static_cast<long long>(kFpKey[1]), static_cast<long long>(kFpKey[0])),
      _mm256_set1_epi64x(static_cast<long long>(first_stripe * kFpStep)));
  const __m256i step = _mm256_set1_epi64x(static_cast<long long>(kFpStep));
  alignas(32) uint64_t sums[4];
  uint32_t crc;
  if (stream) {
    CopyFingerprint<true> take{{s, d}, key, step, _mm256_setzero_si256()};
    crc = fold_copy(take, n, seed, done);
    _mm256_store_si256(reinterpret_cast<__m256i*>(sums), take.acc);
  } else {
    CopyFingerprint<false> take{{s, d}, key, step, _mm256_setzero_si256()};
    crc = fold_copy(take, n, seed, done);
    _mm256_store_si256(reinterpret_cast<__m256i*>(sums), take.acc);
  }
  for (int j = 0; j < 4; ++j) lanes[j] += sums[j];
  return crc;
}

PYCKPT_FOLD_TARGET uint32_t sum_fp_folded(const uint8_t* s, size_t n, uint32_t seed, uint64_t first_stripe,
                                          uint64_t* lanes, size_t* done) {
  ReadFingerprint take{s,
                       _mm256_add_epi64(
                           _mm256_set_epi64x(static_cast<long long>(kFpKey[3]), static_cast<long long>(kFpKey[2]),
                                             static_cast<long long>(kFpKey[1]), static_cast<long long>(kFpKey[0])),
                           _mm256_set1_epi64x(static_cast<long long>(first_stripe * kFpStep))),
                       _mm256_set1_epi64x(static_cast<long long>(kFpStep)), _mm256_setzero_si256()};
  const uint32_t crc = ~fold::update(~seed, n, take, done);
  alignas(32) uint64_t sums[4];
  _mm256_store_si256(reinterpret_cast<__m256i*>(sums), take.acc);
  for (int j = 0; j < 4; ++j) lanes[j] += sums[j];
  return crc;
}

#endif

}  // namespace

uint32_t crc32c_fp(const void* src, size_t n, uint32_t seed, uint64_t first_stripe, uint64_t lanes[4]) {
  const auto* s = static_cast<const uint8_t*>(src);
#if defined(__x86_64__)
  if (n >= fold::kMin && fold::available() && fingerprint_simd()) {
    size_t done = 0;
    seed = sum_fp_folded(s, n, seed, first_stripe, lanes, &done);
    s += done, n -= done;
    first_stripe += done / 32;
  }
#endif
  return sum_blocks(s, n, seed, first_stripe, lanes);
}

uint32_t copy_crc32c(void* dst, const void* src, size_t n, uint32_t seed, bool stream) {
  auto* d = static_cast<uint8_t*>(dst);
  const auto* s = static_cast<const uint8_t*>(src);
#if defined(__x86_64__)
  if (n >= kStreamMin && fold::available()) {
    size_t done = 0;
    if (stream) {
      // Streaming stores need 32-byte-aligned destinations: the head goes first.
      const size_t head = (32 - (reinterpret_cast<uintptr_t>(d) & 31)) & 31;
      std::memcpy(d, s, head);
      seed = crc32c(d, head, seed);
      d += head, s += head, n -= head;
      Copy<true> take{s, d};
      seed = fold_copy(take, n, seed, &done);
    } else {
      Copy<false> take{s, d};
      seed = fold_copy(take, n, seed, &done);
    }
    d += done, s += done, n -= done;
  }
#endif
  return copy_blocks(d, s, n, seed, 0, nullptr);
}

uint32_t copy_crc32c_fp(void* dst, const void* src, size_t n, uint32_t seed, uint64_t first_stripe,
                        uint64_t lanes[4]) {
  auto* d = static_cast<uint8_t*>(dst);
  const auto* s = static_cast<const uint8_t*>(src);
#if defined(__x86_64__)
  if (n >= kStreamMin && fold::available() && fingerprint_simd()) {
    // Stripes start at the piece, so the destination cannot be realigned by
    // a head copy: an unaligned destination gets plain stores.
    const bool aligned = (reinterpret_cast<uintptr_t>(d) & 31) == 0;
    size_t done = 0;
    seed = copy_fp_folded(d, s, n, seed, first_stripe, lanes, aligned, &done);
    d += done, s += done, n -= done;
    first_stripe += done / 32;
  }
#endif
  return copy_blocks(d, s, n, seed, first_stripe, lanes);
}

}  // namespace pyckpt
