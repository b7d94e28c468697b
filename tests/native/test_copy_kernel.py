"""The capture kernels (csrc/copy_kernel.cpp): copy a block and checksum (and
fingerprint) the bytes stored in one pass. Every checkpointed host byte goes
through them, so each edge of the folding and streaming paths is compared with
the independent table CRC and the portable fingerprint loop."""
from __future__ import annotations

import numpy as np
import pytest

# Under the folding minimum (256), partial 128-byte rounds, the 32-byte tail,
# just under / at / over the 256 KiB streaming threshold, and a large copy.
LENGTHS = (0, 5, 255, 256, 300, 4096 + 45, (256 << 10) - 1, 256 << 10, (256 << 10) + 33, (1 << 22) + 7)
# Source and destination misalignments: streaming stores need a 32-byte
# aligned destination (a head is copied first, or plain stores are used).
OFFSETS = [(0, 0), (3, 0), (0, 5), (7, 33)]


def _buffers(rng, n, src_offset, dst_offset):
    src = np.frombuffer(rng.bytes(n + src_offset), dtype=np.uint8)
    # Guard bytes either side: nothing may be written outside [dst, dst + n).
    dst = np.full(n + dst_offset + 64, 0xA5, dtype=np.uint8)
    return src, dst


def _untouched_around(dst, dst_offset, n):
    return bool((dst[:dst_offset] == 0xA5).all() and (dst[dst_offset + n :] == 0xA5).all())


@pytest.mark.parametrize("stream", [True, False], ids=["streaming_stores", "plain_stores"])
@pytest.mark.parametrize("src_offset, dst_offset", OFFSETS)
def test_copy_crc32c_stores_the_bytes_and_returns_their_checksum(C, rng, src_offset, dst_offset, stream):
    # stream=False: the memory tier's reads into fresh memory (plain stores, any alignment).
    for n in LENGTHS:
        src, dst = _buffers(rng, n, src_offset, dst_offset)
        crc = C.copy_crc32c(dst.ctypes.data + dst_offset, src.ctypes.data + src_offset, n, 77, stream=stream)
        data = bytes(src[src_offset:])
        assert bytes(dst[dst_offset : dst_offset + n]) == data, n
        assert crc == C.crc32c_software(data, 77), n
        assert _untouched_around(dst, dst_offset, n), n


@pytest.mark.parametrize("src_offset, dst_offset", OFFSETS)
def test_copy_with_fingerprint_matches_the_separate_passes(C, rng, src_offset, dst_offset):
    for n in LENGTHS:
        src, dst = _buffers(rng, n, src_offset, dst_offset)
        crc, fp = C.copy_crc32c_fingerprint(dst.ctypes.data + dst_offset, src.ctypes.data + src_offset, n)
        data = bytes(src[src_offset:])
        assert bytes(dst[dst_offset : dst_offset + n]) == data, n
        assert crc == C.crc32c_software(data), n
        assert fp == C.fingerprint_portable(data), n
        assert _untouched_around(dst, dst_offset, n), n


@pytest.mark.parametrize("src_offset", [0, 3, 33])
def test_checksum_with_fingerprint_in_one_read_matches_the_separate_passes(C, rng, src_offset):
    # An incremental save's check of a chunk expected unchanged: both values from one read.
    for n in LENGTHS:
        src = np.frombuffer(rng.bytes(n + src_offset), dtype=np.uint8)
        before = bytes(src)
        crc, fp = C.crc32c_fingerprint(src.ctypes.data + src_offset, n)
        data = bytes(src[src_offset:])
        assert crc == C.crc32c_software(data), n
        assert fp == C.fingerprint_portable(data), n
        assert bytes(src) == before  # read only
