// Chunk codecs: "none" (bytes as they are) and "zstd/1" (byte planes, each
// stored raw or zstd-compressed).
//
// zstd/1 chunk frame. All integers are little-endian.
//
//   offset  size        field
//   0       4           magic "PKZ1" (bytes 0x50 0x4B 0x5A 0x31)
//   4       1           version, = 1
//   5       1           elem_size: element width the chunk was split by (1, 2, 4, 8)
//   6       1           nplanes: 1, or elem_size
//   7       1           reserved, = 0
//   8       8           raw_len: length of the decoded chunk in bytes
//   16      8*nplanes   plane table, one entry per plane:
//                         u8  mode (0 = raw, 1 = zstd)
//                         u8  reserved[3], = 0
//                         u32 stored_len (bytes of this plane's payload)
//   16+8*nplanes        plane payloads, in plane order, no padding
//
// Plane p holds byte p of every element: plane[p][k] = raw[k*nplanes + p]
// (on little-endian hosts plane 0 is the least significant byte; with
// nplanes = 1 the plane is the raw chunk). Every plane is raw_len/nplanes
// bytes long when decoded. A raw plane's stored_len equals that length; a zstd
// plane is one complete zstd frame that decodes to exactly that length. The
// frame's total size is exactly 16 + 8*nplanes + sum(stored_len).
//
// The encoder splits into elem_size planes when elem_size is 2, 4 or 8 and
// raw_len is a multiple of it, else uses one plane. It estimates each plane's
// order-0 entropy from a strided sample (~4096 elements) and only compresses
// planes estimated below 7 bits/byte, keeping a plane raw when zstd does not
// shrink it. When the frame would not be smaller than raw_len, the chunk is
// stored with codec none instead, so encoding never makes a chunk bigger.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace pyckpt {

constexpr int kCodecNone = 0;
constexpr int kCodecZstd = 1;

/// zstd's fastest level; with forced literal compression it gave ~0.34 on the
/// bf16 exponent plane at ~1 GB/s per core, level 1 gave 0.37 at 0.27 GB/s.
constexpr int kDefaultZstdLevel = -131072;

/// Per-thread buffers reused across chunks so the hot path does not allocate.
struct CodecScratch {
  std::vector<uint8_t> planes;
  std::vector<uint8_t> out;
};

/// This thread's scratch buffers.
CodecScratch& thread_scratch();

struct Encoded {
  int codec;            // kCodecNone or kCodecZstd
  const uint8_t* data;  // `raw` itself for kCodecNone, else scratch.out
  size_t size;
};

/// Encode one chunk for `codec`. The result may point into `scratch`.
Encoded encode_chunk(const uint8_t* raw, size_t n, int elem_size, int codec, int level,
                     CodecScratch& scratch);

/// Decode `stored` (codec kCodecNone or kCodecZstd) into exactly raw_len bytes
/// at dst. Throws Error(Value) naming the defect on any malformed input.
void decode_chunk(const uint8_t* stored, size_t stored_len, int codec, uint8_t* dst,
                  size_t raw_len, CodecScratch& scratch);

}  // namespace pyckpt
