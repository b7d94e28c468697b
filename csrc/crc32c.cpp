#include "pyckpt/crc32c.h"

#include "pyckpt/crc32c_fold.h"

#include <cstring>

#if defined(__x86_64__)
#include <nmmintrin.h>
#endif

namespace pyckpt {

namespace {

constexpr uint32_t kPoly = 0x82F63B78u;  // CRC-32C, bit-reflected

struct SliceTables {
  uint32_t t[8][256];
  SliceTables() {
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = (c & 1) ? (c >> 1) ^ kPoly : c >> 1;
      t[0][i] = c;
    }
    for (int k = 1; k < 8; ++k)
      for (int i = 0; i < 256; ++i) t[k][i] = (t[k - 1][i] >> 8) ^ t[0][t[k - 1][i] & 0xff];
  }
};

const SliceTables& slice_tables() {
  static const SliceTables tables;
  return tables;
}

uint64_t load64(const uint8_t* p) {
  uint64_t v;
  std::memcpy(&v, p, 8);
  return v;
}

// Raw register update (no pre/post inversion), slicing-by-8, little-endian.
uint32_t sw_update(uint32_t crc, const uint8_t* p, size_t n) {
  const auto& T = slice_tables().t;
  for (; n >= 8; p += 8, n -= 8) {
    const uint64_t w = load64(p) ^ crc;
    crc = T[7][w & 0xff] ^ T[6][(w >> 8) & 0xff] ^ T[5][(w >> 16) & 0xff] ^
          T[4][(w >> 24) & 0xff] ^ T[3][(w >> 32) & 0xff] ^ T[2][(w >> 40) & 0xff] ^
          T[1][(w >> 48) & 0xff] ^ T[0][w >> 56];
  }
  for (; n; --n) crc = T[0][(crc ^ *p++) & 0xff] ^ (crc >> 8);
  return crc;
}

#if defined(__x86_64__)

// Advancing a CRC register over `nbytes` zero bytes is linear over GF(2), so it
// is a 32x32 bit matrix, applied here as four byte-indexed tables. This lets
// three streams be checksummed independently and then combined:
// crc(A || B) = shift_len(B)(crc(A)) ^ crc_from_zero(B).
struct ShiftTable {
  uint32_t t[4][256];
  explicit ShiftTable(size_t nbytes) {
    const auto& T0 = slice_tables().t[0];
    uint32_t basis[32];
    for (int j = 0; j < 32; ++j) {
      uint32_t v = 1u << j;
      for (size_t i = 0; i < nbytes; ++i) v = T0[v & 0xff] ^ (v >> 8);
      basis[j] = v;
    }
    for (int k = 0; k < 4; ++k)
      for (int b = 0; b < 256; ++b) {
        uint32_t v = 0;
        for (int i = 0; i < 8; ++i)
          if (b & (1 << i)) v ^= basis[8 * k + i];
        t[k][b] = v;
      }
  }
  uint32_t apply(uint32_t c) const {
    return t[0][c & 0xff] ^ t[1][(c >> 8) & 0xff] ^ t[2][(c >> 16) & 0xff] ^ t[3][c >> 24];
  }
};

// Loads blocks for fold::update (checksum in place).
struct InPlace {
  const uint8_t* p;
  PYCKPT_FOLD_TARGET __m256i operator()(size_t off) const {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + off));
  }
};

constexpr size_t kLong = 8192;  // bytes per stream in the big interleaved loop
constexpr size_t kShort = 256;  // bytes per stream for the medium tail

const ShiftTable& long_shift() {
  static const ShiftTable table(kLong);
  return table;
}
const ShiftTable& short_shift() {
  static const ShiftTable table(kShort);
  return table;
}

// Three crc32 instructions in flight per iteration: the instruction has a
// latency of 3 cycles but a throughput of 1, so one stream would run at 1/3.
__attribute__((target("sse4.2"))) uint64_t hw_streams(uint64_t c0, const uint8_t*& p,
                                                        size_t& n, size_t block,
                                                        const ShiftTable& shift) {
  while (n >= 3 * block) {
    uint64_t c1 = 0, c2 = 0;
    const uint8_t* end = p + block;
    do {
      c0 = _mm_crc32_u64(c0, load64(p));
      c1 = _mm_crc32_u64(c1, load64(p + block));
      c2 = _mm_crc32_u64(c2, load64(p + 2 * block));
      p += 8;
    } while (p < end);
    c0 = shift.apply(static_cast<uint32_t>(c0)) ^ static_cast<uint32_t>(c1);
    c0 = shift.apply(static_cast<uint32_t>(c0)) ^ static_cast<uint32_t>(c2);
    p += 2 * block;
    n -= 3 * block;
  }
  return c0;
}

__attribute__((target("sse4.2"))) uint32_t hw_update(uint32_t crc, const uint8_t* p, size_t n,
                                                       bool allow_fold = true) {
  if (allow_fold && n >= fold::kMin && fold::available()) {
    InPlace take{p};
    size_t done = 0;
    crc = fold::update(crc, n, take, &done);
    p += done, n -= done;
  }
  for (; n && (reinterpret_cast<uintptr_t>(p) & 7); --n) crc = _mm_crc32_u8(crc, *p++);
  uint64_t c = crc;
  c = hw_streams(c, p, n, kLong, long_shift());
  c = hw_streams(c, p, n, kShort, short_shift());
  for (; n >= 8; p += 8, n -= 8) c = _mm_crc32_u64(c, load64(p));
  crc = static_cast<uint32_t>(c);
  for (; n; --n) crc = _mm_crc32_u8(crc, *p++);
  return crc;
}

bool detect_hardware() { return __builtin_cpu_supports("sse4.2"); }

#else

uint32_t hw_update(uint32_t crc, const uint8_t* p, size_t n, bool = true) { return sw_update(crc, p, n); }
bool detect_hardware() { return false; }

#endif

}  // namespace

bool crc32c_hardware() {
  static const bool hw = detect_hardware();
  return hw;
}

uint32_t crc32c(const void* data, size_t n, uint32_t seed) {
  const auto* p = static_cast<const uint8_t*>(data);
  if (crc32c_hardware()) return ~hw_update(~seed, p, n);
  return ~sw_update(~seed, p, n);
}

namespace {
// Advancing the register over zero bytes is a linear map on 32 bits (see
// ShiftTable). Over 2^k bytes it is the k-fold square of the one-byte map;
// a matrix is stored as the images of the 32 unit vectors.
using ZeroShift = uint32_t[32];

uint32_t apply_shift(const ZeroShift& m, uint32_t v) {
  uint32_t r = 0;
  for (int j = 0; v; ++j, v >>= 1)
    if (v & 1) r ^= m[j];
  return r;
}

struct ZeroShiftPowers {
  ZeroShift p[64];  // p[k]: advance over 2^k zero bytes
  ZeroShiftPowers() {
    const auto& T0 = slice_tables().t[0];
    for (int j = 0; j < 32; ++j) {
      const uint32_t v = 1u << j;
      p[0][j] = T0[v & 0xff] ^ (v >> 8);
    }
    for (int k = 1; k < 64; ++k)
      for (int j = 0; j < 32; ++j) p[k][j] = apply_shift(p[k - 1], p[k - 1][j]);
  }
};
}  // namespace

uint32_t crc32c_combine(uint32_t crc_a, uint32_t crc_b, size_t len_b) {
  // With pre/post inversion the affine parts cancel: crc(A||B) = shift_len(B)(crc(A)) ^ crc(B).
  static const ZeroShiftPowers powers;
  for (int k = 0; len_b; ++k, len_b >>= 1)
    if (len_b & 1) crc_a = apply_shift(powers.p[k], crc_a);
  return crc_a ^ crc_b;
}

#if defined(__x86_64__)
namespace fold {

namespace {
// x^e mod P in the reflected 64-bit form clmul takes (coefficient of x^j at bit 63-j).
uint64_t x_pow_mod(unsigned e) {
  uint64_t r = 1;
  for (unsigned i = 0; i < e; ++i) {
    r <<= 1;
    if (r & (uint64_t{1} << 32)) r ^= 0x11EDC6F41ull;  // CRC-32C, normal bit order
  }
  uint64_t k = 0;
  for (int j = 0; j < 32; ++j)
    if ((r >> j) & 1) k |= uint64_t{1} << (63 - j);
  return k;
}

void set(uint64_t k[2], unsigned bytes) {
  k[0] = x_pow_mod(8 * bytes + 63);
  k[1] = x_pow_mod(8 * bytes - 1);
}

Constants make_constants() {
  Constants c;
  set(c.by128, 128);
  set(c.by32, 32);
  set(c.by16, 16);
  return c;
}
}  // namespace

const Constants& constants() {
  static const Constants c = make_constants();
  return c;
}

bool available() {
  static const bool yes = __builtin_cpu_supports("sse4.2") && __builtin_cpu_supports("avx2") &&
                          __builtin_cpu_supports("pclmul") && __builtin_cpu_supports("vpclmulqdq");
  return yes;
}

}  // namespace fold
#endif

const char* crc32c_kernel() {
#if defined(__x86_64__)
  if (fold::available()) return "vpclmulqdq";
#endif
  return crc32c_hardware() ? "sse4.2" : "table";
}

uint32_t crc32c_unfolded(const void* data, size_t n, uint32_t seed) {
  const auto* p = static_cast<const uint8_t*>(data);
  if (crc32c_hardware()) return ~hw_update(~seed, p, n, false);
  return ~sw_update(~seed, p, n);
}

uint32_t crc32c_software(const void* data, size_t n, uint32_t seed) {
  return ~sw_update(~seed, static_cast<const uint8_t*>(data), n);
}

}  // namespace pyckpt
