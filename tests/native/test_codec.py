"""The zstd/1 chunk codec: bitwise round trips, never growing, the documented
frame layout, and clean rejection of malformed frames."""
from __future__ import annotations

import struct

import numpy as np
import pytest

from native_helpers import bf16_normal

NONE, ZSTD = 0, 1


def parse_frame(frame: bytes) -> tuple[int, int, int, list[tuple[int, int]]]:
    """Independent parser of the layout documented in codec.h / FORMAT.md."""
    magic, version, elem_size, nplanes, reserved, raw_len = struct.unpack_from("<4sBBBBQ", frame)
    assert magic == b"PKZ1" and version == 1 and reserved == 0
    planes = [struct.unpack_from("<B3xI", frame, 16 + 8 * j) for j in range(nplanes)]
    return elem_size, nplanes, raw_len, planes


def samples(rng):
    n = 1 << 18
    return {
        "bf16": (bf16_normal(rng, n // 2).tobytes(), 2),
        "fp16": ((rng.standard_normal(n // 2) * 0.1).astype(np.float16).tobytes(), 2),
        "fp32": ((rng.standard_normal(n // 4, dtype=np.float32) * 0.02).tobytes(), 4),
        "fp64": (rng.standard_normal(n // 8).tobytes(), 8),
        "int64 small": (rng.integers(-1000, 1000, n // 8).tobytes(), 8),
        "uint8 skewed": (rng.geometric(0.3, n).clip(0, 255).astype(np.uint8).tobytes(), 1),
        "zeros": (bytes(n), 4),
        "random": (rng.bytes(n), 4),
    }


@pytest.mark.parametrize("cut", [0, 1, 3, 255, 1001])
def test_round_trip_every_elem_size_and_odd_lengths(C, rng, cut):
    for name, (data, es) in samples(rng).items():
        for elem_size in sorted({1, 2, 4, 8, es}):
            raw = data[: len(data) - cut]
            codec, stored = C.encode(raw, elem_size)
            assert codec in (NONE, ZSTD)
            assert C.decode(stored, codec, len(raw)) == raw, (name, elem_size, cut)


def test_tiny_and_empty_chunks_round_trip(C):
    for n in (0, 1, 2, 7, 255, 256, 257):
        raw = bytes(n)
        codec, stored = C.encode(raw, 4)
        assert C.decode(stored, codec, n) == raw
        assert len(stored) <= n


def test_compressible_weights_shrink(C, rng):
    s = samples(rng)
    for name, limit in [("bf16", 0.75), ("fp32", 0.9), ("zeros", 0.01)]:
        data, es = s[name]
        codec, stored = C.encode(data, es)
        assert codec == ZSTD and len(stored) < limit * len(data), name


def test_incompressible_data_is_stored_raw_and_never_grows(C, rng):
    data = rng.bytes(1 << 20)
    codec, stored = C.encode(data, 4)
    assert codec == NONE and stored == data
    for name, (raw, es) in samples(rng).items():
        codec, stored = C.encode(raw, es)
        assert len(stored) <= len(raw), name


def test_frame_matches_documented_layout(C, rng):
    data, _ = samples(rng)["fp32"]
    codec, frame = C.encode(data, 4)
    assert codec == ZSTD
    elem_size, nplanes, raw_len, planes = parse_frame(frame)
    assert (elem_size, nplanes, raw_len) == (4, 4, len(data))
    assert 16 + 8 * nplanes + sum(n for _, n in planes) == len(frame)
    modes = [m for m, _ in planes]
    # The top byte (sign + exponent) compresses; the low mantissa bytes do not.
    assert modes[3] == 1 and modes[0] == 0
    # A raw plane holds byte j of every element, stored verbatim.
    pos = 16 + 8 * nplanes
    assert planes[0] == (0, len(data) // 4)
    assert frame[pos : pos + len(data) // 4] == np.frombuffer(data, np.uint8)[0::4].tobytes()


def test_one_plane_when_length_is_not_a_multiple(C, rng):
    data, _ = samples(rng)["bf16"]
    codec, frame = C.encode(data[:-1], 2)
    assert codec == ZSTD
    assert parse_frame(frame)[1] == 1


def _frame(C, rng):
    data, _ = samples(rng)["fp32"]
    codec, frame = C.encode(data, 4)
    assert codec == ZSTD
    return data, bytearray(frame)


def _patched(frame: bytearray, offset: int, fmt: str, value) -> bytes:
    out = bytearray(frame)
    struct.pack_into(fmt, out, offset, value)
    return bytes(out)


def test_malformed_frames_are_rejected(C, rng):
    data, frame = _frame(C, rng)
    n = len(data)
    bad = {
        "magic": _patched(frame, 0, "<B", ord("X")),
        "version": _patched(frame, 4, "<B", 2),
        "elem_size": _patched(frame, 5, "<B", 3),
        "nplanes": _patched(frame, 6, "<B", 2),
        "reserved": _patched(frame, 7, "<B", 1),
        "raw_len": _patched(frame, 8, "<Q", n + 4),
        "mode": _patched(frame, 16, "<B", 7),
        "plane_len_huge": _patched(frame, 16 + 4, "<I", 0xFFFFFFFF),
        "raw_plane_len": _patched(frame, 16 + 4, "<I", n // 4 - 1),
        "trailing": bytes(frame) + b"\0",
        "empty": b"",
        "header_only": bytes(frame[:16]),
    }
    for cut in (1, 17, 40, len(frame) // 2, len(frame) - 1):
        bad[f"cut{cut}"] = bytes(frame[:cut])
    for name, stored in bad.items():
        with pytest.raises(ValueError):
            C.decode(stored, ZSTD, n)
            pytest.fail(f"{name} was accepted")


def test_random_corruption_never_crashes(C, rng):
    data, frame = _frame(C, rng)
    for _ in range(300):
        mutated = bytearray(frame)
        for pos in rng.integers(0, len(frame), int(rng.integers(1, 4))):
            mutated[pos] ^= int(rng.integers(1, 256))
        try:
            out = C.decode(bytes(mutated), ZSTD, len(data))
        except ValueError:
            continue
        assert len(out) == len(data)


def test_codec_none_and_unknown_codec(C):
    assert C.decode(b"abc", NONE, 3) == b"abc"
    with pytest.raises(ValueError):
        C.decode(b"abc", NONE, 4)
    with pytest.raises(ValueError):
        C.decode(b"abc", 9, 3)
