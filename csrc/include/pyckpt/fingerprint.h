// Chunk fingerprints for incremental checkpoints: a 64-bit hash that runs at
// memory speed on the CPU (AVX2 when the CPU has it, a portable loop that the
// compiler can unroll otherwise) and, with the same definition, in a CUDA
// kernel over device memory (csrc/cuda/fingerprint.cu).
//
// Definition ("pkfp1"). The bytes are cut into 32-byte stripes, the last one
// zero-padded. Stripe s holds four little-endian 64-bit words w[0..3]; lane j
// accumulates, modulo 2^64,
//
//     x       = w[j] ^ (kFpKey[j] + s * kFpStep)
//     acc[j] += (x & 0xffffffff) * (x >> 32) + w[j]
//
// (a 32x32->64 multiply, one AVX2 vpmuludq per four lanes). The position key
// makes a word's contribution depend on where it sits, so moved or swapped
// data changes the sum. Because the lanes are sums, any split of the stripes
// (threads, CUDA blocks) gives the same result. finish() mixes the four sums
// and the length with the splitmix64 finalizer. A chunk's fingerprint folds
// its pieces' fingerprints in order (chunk_fold).
//
// It is not a cryptographic hash: an adversary who can choose tensor contents
// can make collisions. The per-chunk CRC32C check of referenced chunks
// (docs/FORMAT.md §12) is the backstop.
#pragma once

#include <cstddef>
#include <cstdint>

namespace pyckpt {

constexpr uint64_t kFpKey[4] = {0x9E3779B97F4A7C15ull, 0xC2B2AE3D27D4EB4Full,
                                0x165667B19E3779F9ull, 0xD6E8FEB86659FD93ull};
constexpr uint64_t kFpStep = 0xA0761D6478BD642Full;
constexpr uint64_t kFpSeed = 0x243F6A8885A308D3ull;

/// Adds stripes of n bytes at p to acc[4]; the first stripe is stripe number
/// `first_stripe` of the piece (so parts of one piece can run in parallel,
/// split at 32-byte multiples). A last partial stripe is zero-padded.
void fingerprint_lanes(const uint8_t* p, size_t n, uint64_t first_stripe, uint64_t acc[4]);

/// The portable loop (tests compare it with the AVX2 path).
void fingerprint_lanes_portable(const uint8_t* p, size_t n, uint64_t first_stripe, uint64_t acc[4]);

/// True when fingerprint_lanes uses AVX2.
bool fingerprint_simd();

/// The 64-bit fingerprint of an nbytes-long piece from its lane sums.
uint64_t fingerprint_finish(const uint64_t acc[4], uint64_t nbytes);

/// fingerprint_finish(lanes of p[0..n)), single-threaded.
uint64_t fingerprint(const void* p, size_t n);

/// Folds the next piece's fingerprint into a chunk's (start from kFpSeed).
uint64_t chunk_fold(uint64_t h, uint64_t piece_fp);

}  // namespace pyckpt
