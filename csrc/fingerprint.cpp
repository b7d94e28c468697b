#include "pyckpt/fingerprint.h"

#include <cstring>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace pyckpt {

namespace {

inline uint64_t mix64(uint64_t z) {  // splitmix64's finalizer
  z ^= z >> 30;
  z *= 0xBF58476D1CE4E5B9ull;
  z ^= z >> 27;
  z *= 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

inline void stripe(const uint8_t* p, uint64_t s, uint64_t acc[4]) {
  for (int j = 0; j < 4; ++j) {
    uint64_t w;
    std::memcpy(&w, p + 8 * j, 8);
    const uint64_t x = w ^ (kFpKey[j] + s * kFpStep);
    acc[j] += (x & 0xFFFFFFFFull) * (x >> 32) + w;
  }
}

// The zero-padded last stripe.
inline void tail(const uint8_t* p, size_t n, uint64_t s, uint64_t acc[4]) {
  if (n == 0) return;
  uint8_t buf[32] = {0};
  std::memcpy(buf, p, n);
  stripe(buf, s, acc);
}

#if defined(__x86_64__)
__attribute__((target("avx2"))) void lanes_avx2(const uint8_t* p, size_t n, uint64_t s,
                                                 uint64_t acc[4]) {
  const size_t full = n / 32;
  // Two independent accumulators hide the multiply latency; key vectors for
  // stripes s and s+1 advance by two steps per iteration.
  __m256i a0 = _mm256_setzero_si256(), a1 = _mm256_setzero_si256();
  const __m256i base = _mm256_set_epi64x(static_cast<long long>(kFpKey[3]), static_cast<long long>(kFpKey[2]),
                                         static_cast<long long>(kFpKey[1]), static_cast<long long>(kFpKey[0]));
  __m256i k0 = _mm256_add_epi64(base, _mm256_set1_epi64x(static_cast<long long>(s * kFpStep)));
  __m256i k1 = _mm256_add_epi64(k0, _mm256_set1_epi64x(static_cast<long long>(kFpStep)));
  const __m256i step2 = _mm256_set1_epi64x(static_cast<long long>(2 * kFpStep));
  size_t i = 0;
  for (; i + 2 <= full; i += 2) {
    const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32 * i));
    const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32 * i + 32));
    const __m256i x0 = _mm256_xor_si256(w0, k0);
    const __m256i x1 = _mm256_xor_si256(w1, k1);
    a0 = _mm256_add_epi64(a0, _mm256_add_epi64(_mm256_mul_epu32(x0, _mm256_srli_epi64(x0, 32)), w0));
    a1 = _mm256_add_epi64(a1, _mm256_add_epi64(_mm256_mul_epu32(x1, _mm256_srli_epi64(x1, 32)), w1));
    k0 = _mm256_add_epi64(k0, step2);
    k1 = _mm256_add_epi64(k1, step2);
  }
  alignas(32) uint64_t out[4];
  _mm256_store_si256(reinterpret_cast<__m256i*>(out), _mm256_add_epi64(a0, a1));
  for (int j = 0; j < 4; ++j) acc[j] += out[j];
  for (; i < full; ++i) stripe(p + 32 * i, s + i, acc);
  tail(p + 32 * full, n - 32 * full, s + full, acc);
}

bool has_avx2() {
  static const bool yes = __builtin_cpu_supports("avx2");
  return yes;
}
#endif

}  // namespace

void fingerprint_lanes_portable(const uint8_t* p, size_t n, uint64_t s, uint64_t acc[4]) {
  const size_t full = n / 32;
  for (size_t i = 0; i < full; ++i) stripe(p + 32 * i, s + i, acc);
  tail(p + 32 * full, n - 32 * full, s + full, acc);
}

void fingerprint_lanes(const uint8_t* p, size_t n, uint64_t s, uint64_t acc[4]) {
#if defined(__x86_64__)
  if (has_avx2()) return lanes_avx2(p, n, s, acc);
#endif
  fingerprint_lanes_portable(p, n, s, acc);
}

bool fingerprint_simd() {
#if defined(__x86_64__)
  return has_avx2();
#else
  return false;
#endif
}

uint64_t fingerprint_finish(const uint64_t acc[4], uint64_t nbytes) {
  uint64_t h = mix64(nbytes ^ kFpSeed);
  for (int j = 0; j < 4; ++j) h = mix64(h ^ mix64(acc[j] + kFpKey[j]));
  return h;
}

uint64_t fingerprint(const void* p, size_t n) {
  uint64_t acc[4] = {0, 0, 0, 0};
  fingerprint_lanes(static_cast<const uint8_t*>(p), n, 0, acc);
  return fingerprint_finish(acc, n);
}

uint64_t chunk_fold(uint64_t h, uint64_t piece_fp) { return mix64(h ^ mix64(piece_fp + kFpStep)); }

}  // namespace pyckpt
