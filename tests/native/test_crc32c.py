"""CRC32C: standard vectors, an independent bitwise reference, and agreement
between the hardware (SSE4.2, 3-way interleaved) and table paths."""
from __future__ import annotations

import numpy as np
import pytest

from native_helpers import crc32c_bitwise


@pytest.mark.parametrize(
    "data, expected",
    [
        (b"123456789", 0xE3069283),  # the CRC-32C catalogue check value
        (bytes(32), 0x8A9136AA),  # RFC 3720 B.4 vectors
        (b"\xff" * 32, 0x62A8AB43),
        (bytes(range(32)), 0x46DD794E),
        (bytes(range(31, -1, -1)), 0x113FDB5C),
        (b"", 0),
    ],
)
def test_known_vectors(C, data, expected):
    assert C.crc32c(data) == expected
    assert C.crc32c_software(data) == expected


def test_bitwise_reference_small_and_unaligned(C, rng):
    buf = rng.bytes(3000)
    for start in range(0, 9):
        for n in (1, 7, 8, 9, 63, 255, 256, 257, 1000, 2990):
            view = memoryview(buf)[start : start + n]
            ref = crc32c_bitwise(bytes(view))
            assert C.crc32c(view) == ref, (start, n)
            assert C.crc32c_software(view) == ref, (start, n)


def test_bitwise_reference_crosses_interleaved_blocks(C, rng):
    # > 3 * 8192 bytes: exercises the 3-stream path and its shift-combine step.
    buf = rng.bytes(3 * 8192 + 3 * 256 + 77)
    assert C.crc32c(buf) == crc32c_bitwise(buf)


def test_hardware_and_software_agree_on_large_buffers(C, rng):
    buf = rng.bytes((1 << 20) + 123)
    for start, n in [(0, len(buf)), (1, 1 << 20), (5, 3 * 8192 * 7 + 5), (3, 24575)]:
        view = memoryview(buf)[start : start + n]
        assert C.crc32c(view) == C.crc32c_software(view), (start, n)


def test_seed_continues_a_checksum(C, rng):
    a, b = rng.bytes(10_000), rng.bytes(50_001)
    assert C.crc32c(b, C.crc32c(a)) == C.crc32c(a + b)
    assert C.crc32c_software(b, C.crc32c_software(a)) == C.crc32c(a + b)


def test_accepts_numpy_and_addresses(C, rng):
    arr = rng.standard_normal(1000)
    expected = crc32c_bitwise(arr.tobytes())
    assert C.crc32c(arr) == expected
    assert C.crc32c_addr(arr.ctypes.data, arr.nbytes) == expected


def test_rejects_non_contiguous_buffers(C):
    arr = np.arange(100, dtype=np.float64)[::2]
    with pytest.raises((BufferError, ValueError)):
        C.crc32c(arr)


@pytest.mark.parametrize("len_a, len_b", [(0, 0), (0, 5), (5, 0), (1, 1), (7, 4099), (8192 * 3 + 5, 1 << 20), (1 << 20, 3)])
def test_combine_equals_the_checksum_of_the_concatenation(C, rng, len_a, len_b):
    # The engine checksums parts of one chunk on different threads and combines them.
    a, b = rng.bytes(len_a), rng.bytes(len_b)
    assert C.crc32c_combine(C.crc32c(a), C.crc32c(b), len(b)) == C.crc32c_software(a + b)


# Lengths around the folding kernel's edges: under its 256-byte minimum,
# whole and partial 128-byte rounds, the 32-byte tail loop, large buffers.
EDGE_LENGTHS = (0, 1, 31, 32, 255, 256, 257, 287, 288, 383, 384, 511, 4096 + 45, (256 << 10) + 33, (1 << 22) + 7)


def test_the_kernel_in_use_agrees_with_the_crc32_instruction_and_the_table(C, rng):
    # crc32c() folds with VPCLMULQDQ where the CPU has it (the kernel in use is
    # named so a regression to a slower one shows in benchmarks); whatever it
    # picks must equal the instruction-only and the table paths bit for bit.
    assert C.crc32c_kernel() in ("vpclmulqdq", "sse4.2", "table")
    buf = rng.bytes((1 << 22) + 64)
    for n in EDGE_LENGTHS:
        for start in (0, 1, 13):
            view = memoryview(buf)[start : start + n]
            expected = C.crc32c_software(view, 0x1234567)
            assert C.crc32c(view, 0x1234567) == expected, (n, start)
            assert C.crc32c_unfolded(view, 0x1234567) == expected, (n, start)

