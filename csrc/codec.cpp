#include "pyckpt/codec.h"

#include <cmath>
#include <cstring>
#include <string>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "pyckpt/errors.h"
#include "pyckpt/zstd_api.h"

namespace pyckpt {

namespace {

constexpr uint8_t kMagic[4] = {'P', 'K', 'Z', '1'};
constexpr uint8_t kVersion = 1;
constexpr size_t kFixedHeader = 16;
constexpr size_t kPlaneEntry = 8;
constexpr uint8_t kModeRaw = 0;
constexpr uint8_t kModeZstd = 1;
constexpr size_t kMinEncodeBytes = 256;     // below this a frame cannot pay for itself
constexpr double kCompressibleBits = 7.0;   // order-0 estimate that is worth zstd's time
constexpr size_t kSampleBlocks = 64;
constexpr size_t kSampleBlockElems = 64;

size_t header_size(size_t nplanes) { return kFixedHeader + kPlaneEntry * nplanes; }

void put_u32(uint8_t* p, uint32_t v) {
  for (int i = 0; i < 4; ++i) p[i] = static_cast<uint8_t>(v >> (8 * i));
}
void put_u64(uint8_t* p, uint64_t v) {
  for (int i = 0; i < 8; ++i) p[i] = static_cast<uint8_t>(v >> (8 * i));
}
uint32_t get_u32(const uint8_t* p) {
  uint32_t v = 0;
  for (int i = 0; i < 4; ++i) v |= static_cast<uint32_t>(p[i]) << (8 * i);
  return v;
}
uint64_t get_u64(const uint8_t* p) {
  uint64_t v = 0;
  for (int i = 0; i < 8; ++i) v |= static_cast<uint64_t>(p[i]) << (8 * i);
  return v;
}

[[noreturn]] void malformed(const std::string& why) {
  throw Error(ErrorKind::Value, "malformed zstd/1 chunk frame: " + why);
}

double entropy_bits(const uint32_t* hist, size_t total) {
  if (total == 0) return 8.0;
  double sum = 0;
  for (int b = 0; b < 256; ++b)
    if (hist[b]) sum += hist[b] * std::log2(static_cast<double>(hist[b]));
  return std::log2(static_cast<double>(total)) - sum / static_cast<double>(total);
}

// Order-0 entropy per plane from ~4096 elements taken in 64 evenly spaced
// runs: enough to tell an exponent plane (~3 bits) from a mantissa plane
// (~8 bits) while costing well under 1% of compressing the chunk.
void estimate_entropy(const uint8_t* raw, size_t n, size_t np, double* bits) {
  static thread_local uint32_t hist[8][256];
  std::memset(hist, 0, sizeof hist);
  const size_t elems = n / np;
  size_t sampled = 0;
  auto take = [&](size_t first, size_t count) {
    const uint8_t* p = raw + first * np;
    for (size_t k = 0; k < count; ++k, p += np)
      for (size_t j = 0; j < np; ++j) ++hist[j][p[j]];
    sampled += count;
  };
  if (elems <= kSampleBlocks * kSampleBlockElems) {
    take(0, elems);
  } else {
    const size_t stride = elems / kSampleBlocks;
    for (size_t b = 0; b < kSampleBlocks; ++b) take(b * stride, kSampleBlockElems);
  }
  for (size_t j = 0; j < np; ++j) bits[j] = entropy_bits(hist[j], sampled);
}

// Byte-plane transposes. The 2-way split is the building block: on x86-64 it
// uses SSE2 (always present there) to move 16 elements per step; 4- and 8-byte
// elements are split by applying it recursively, which keeps every pass a
// streaming, vectorized one instead of a strided scalar loop.
void split2(const uint8_t* in, size_t elems, uint8_t* lo, uint8_t* hi) {
  size_t k = 0;
#if defined(__SSE2__)
  const __m128i mask = _mm_set1_epi16(0x00ff);
  for (; k + 16 <= elems; k += 16) {
    const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(in + 2 * k));
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(in + 2 * k + 16));
    const __m128i l = _mm_packus_epi16(_mm_and_si128(a, mask), _mm_and_si128(b, mask));
    const __m128i h = _mm_packus_epi16(_mm_srli_epi16(a, 8), _mm_srli_epi16(b, 8));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(lo + k), l);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(hi + k), h);
  }
#endif
  for (; k < elems; ++k) {
    lo[k] = in[2 * k];
    hi[k] = in[2 * k + 1];
  }
}

void merge2(const uint8_t* lo, const uint8_t* hi, size_t elems, uint8_t* out) {
  size_t k = 0;
#if defined(__SSE2__)
  for (; k + 16 <= elems; k += 16) {
    const __m128i l = _mm_loadu_si128(reinterpret_cast<const __m128i*>(lo + k));
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(hi + k));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 2 * k), _mm_unpacklo_epi8(l, h));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 2 * k + 16), _mm_unpackhi_epi8(l, h));
  }
#endif
  for (; k < elems; ++k) {
    out[2 * k] = lo[k];
    out[2 * k + 1] = hi[k];
  }
}

// Splitting np-byte elements as 2-byte pairs yields the even bytes (0, 2, ...)
// and the odd bytes (1, 3, ...), each as (np/2)-byte elements; recursing on
// both halves yields every plane. `tmp` needs 1.5 * n bytes for np = 8.
void split_rec(const uint8_t* in, size_t n, size_t np, uint8_t* const* slots, uint8_t* tmp) {
  const size_t half = n / 2;
  if (np == 2) return split2(in, half, slots[0], slots[1]);
  split2(in, half, tmp, tmp + half);
  uint8_t* even[4];
  uint8_t* odd[4];
  for (size_t j = 0; j < np / 2; ++j) {
    even[j] = slots[2 * j];
    odd[j] = slots[2 * j + 1];
  }
  split_rec(tmp, half, np / 2, even, tmp + n);
  split_rec(tmp + half, half, np / 2, odd, tmp + n);
}

void merge_rec(const uint8_t* const* slots, size_t n, size_t np, uint8_t* out, uint8_t* tmp) {
  const size_t half = n / 2;
  if (np == 2) return merge2(slots[0], slots[1], half, out);
  const uint8_t* even[4];
  const uint8_t* odd[4];
  for (size_t j = 0; j < np / 2; ++j) {
    even[j] = slots[2 * j];
    odd[j] = slots[2 * j + 1];
  }
  merge_rec(even, half, np / 2, tmp, tmp + n);
  merge_rec(odd, half, np / 2, tmp + half, tmp + n);
  merge2(tmp, tmp + half, half, out);
}

std::vector<uint8_t>& transpose_tmp(size_t n) {
  thread_local std::vector<uint8_t> tmp;
  if (tmp.size() < n + n / 2) tmp.resize(n + n / 2);
  return tmp;
}

void split_planes(const uint8_t* raw, size_t n, size_t np, uint8_t* planes) {
  uint8_t* slots[8];
  for (size_t j = 0; j < np; ++j) slots[j] = planes + j * (n / np);
  split_rec(raw, n, np, slots, np > 2 ? transpose_tmp(n).data() : nullptr);
}

void merge_planes(const uint8_t* planes, size_t n, size_t np, uint8_t* raw) {
  const uint8_t* slots[8];
  for (size_t j = 0; j < np; ++j) slots[j] = planes + j * (n / np);
  merge_rec(slots, n, np, raw, np > 2 ? transpose_tmp(n).data() : nullptr);
}

size_t plane_count(size_t n, int elem_size) {
  const bool split = (elem_size == 2 || elem_size == 4 || elem_size == 8) && n % elem_size == 0;
  return split ? static_cast<size_t>(elem_size) : 1;
}

void write_header(uint8_t* out, int elem_size, size_t np, size_t n, const uint8_t* modes,
                  const size_t* lens) {
  std::memcpy(out, kMagic, 4);
  out[4] = kVersion;
  out[5] = static_cast<uint8_t>(elem_size);
  out[6] = static_cast<uint8_t>(np);
  out[7] = 0;
  put_u64(out + 8, n);
  for (size_t j = 0; j < np; ++j) {
    uint8_t* e = out + kFixedHeader + kPlaneEntry * j;
    e[0] = modes[j];
    e[1] = e[2] = e[3] = 0;
    put_u32(e + 4, static_cast<uint32_t>(lens[j]));
  }
}

}  // namespace

CodecScratch& thread_scratch() {
  thread_local CodecScratch scratch;
  return scratch;
}

Encoded encode_chunk(const uint8_t* raw, size_t n, int elem_size, int codec, int level,
                     CodecScratch& scratch) {
  const Encoded as_is{kCodecNone, raw, n};
  if (codec == kCodecNone || n < kMinEncodeBytes) return as_is;
  PYCKPT_CHECK_ARG(codec == kCodecZstd, "unknown codec id " << codec);
  if (!zstd::available())
    throw Error(ErrorKind::Runtime, "codec zstd requested but zstd is not loaded: install "
                                    "`zstandard>=0.22` or use compression 'none'");
  PYCKPT_CHECK_ARG(n <= UINT32_MAX, "chunk of " << n << " bytes is too large to encode");
  const size_t np = plane_count(n, elem_size);
  double bits[8];
  estimate_entropy(raw, n, np, bits);
  bool any = false;
  for (size_t j = 0; j < np; ++j) any = any || bits[j] < kCompressibleBits;
  if (!any) return as_is;  // e.g. random or already-compressed bytes: skip zstd entirely

  const size_t plen = n / np, hdr = header_size(np);
  const uint8_t* planes = raw;
  if (np > 1) {
    scratch.planes.resize(n);
    split_planes(raw, n, np, scratch.planes.data());
    planes = scratch.planes.data();
  }
  scratch.out.resize(hdr + n);
  uint8_t* out = scratch.out.data();
  uint8_t modes[8];
  size_t lens[8], pos = hdr;
  for (size_t j = 0; j < np; ++j) {
    const uint8_t* src = planes + j * plen;
    size_t c = 0;
    if (bits[j] < kCompressibleBits) c = zstd::compress(src, plen, out + pos, plen - 1, level);
    modes[j] = c ? kModeZstd : kModeRaw;
    lens[j] = c ? c : plen;
    if (!c) std::memcpy(out + pos, src, plen);
    pos += lens[j];
    if (pos >= n) return as_is;  // cannot end up smaller than raw any more
  }
  write_header(out, elem_size, np, n, modes, lens);
  return Encoded{kCodecZstd, out, pos};
}

void decode_chunk(const uint8_t* stored, size_t stored_len, int codec, uint8_t* dst,
                  size_t raw_len, CodecScratch& scratch) {
  if (codec == kCodecNone) {
    if (stored_len != raw_len)
      throw Error(ErrorKind::Value, "codec none: stored length " + std::to_string(stored_len) +
                                        " differs from raw length " + std::to_string(raw_len));
    std::memmove(dst, stored, raw_len);
    return;
  }
  if (codec != kCodecZstd) throw Error(ErrorKind::Value, "unknown codec id " + std::to_string(codec));
  if (stored_len < kFixedHeader) malformed("shorter than its 16-byte header");
  if (std::memcmp(stored, kMagic, 4) != 0) malformed("bad magic");
  if (stored[4] != kVersion) malformed("unsupported version " + std::to_string(stored[4]));
  const size_t es = stored[5], np = stored[6];
  if (es != 1 && es != 2 && es != 4 && es != 8) malformed("bad elem_size " + std::to_string(es));
  if (np != 1 && np != es) malformed("bad plane count " + std::to_string(np));
  if (stored[7] != 0) malformed("reserved byte is not zero");
  if (get_u64(stored + 8) != raw_len)
    malformed("frame says " + std::to_string(get_u64(stored + 8)) + " raw bytes, expected " +
              std::to_string(raw_len));
  if (raw_len % np != 0) malformed("raw length is not a multiple of the plane count");
  const size_t hdr = header_size(np);
  if (stored_len < hdr) malformed("truncated plane table");

  const size_t plen = raw_len / np;
  uint8_t* planes = dst;
  if (np > 1) {
    scratch.planes.resize(raw_len);
    planes = scratch.planes.data();
  }
  size_t pos = hdr;
  for (size_t j = 0; j < np; ++j) {
    const uint8_t* e = stored + kFixedHeader + kPlaneEntry * j;
    const size_t len = get_u32(e + 4);
    if (e[1] || e[2] || e[3]) malformed("reserved plane bytes are not zero");
    if (len > stored_len - pos) malformed("plane " + std::to_string(j) + " runs past the end");
    if (e[0] == kModeRaw) {
      if (len != plen) malformed("raw plane " + std::to_string(j) + " has the wrong length");
      std::memcpy(planes + j * plen, stored + pos, plen);
    } else if (e[0] == kModeZstd) {
      zstd::decompress_exact(stored + pos, len, planes + j * plen, plen);
    } else {
      malformed("unknown plane mode " + std::to_string(e[0]));
    }
    pos += len;
  }
  if (pos != stored_len) malformed("trailing bytes after the last plane");
  if (np > 1) merge_planes(planes, raw_len, np, dst);
}

}  // namespace pyckpt
