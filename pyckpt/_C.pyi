"""Type stub for the native engine ``pyckpt._C`` (built from csrc/ by CMake).

The engine never sees torch objects: only addresses (int), byte counts,
device indices (-1 = host memory) and CUDA stream handles (int, 0 = legacy
default stream). Every call below releases the GIL while it works.

SAFETY: addresses are borrowed. A save's source memory must stay alive and
unmodified until its chunk is captured; a read's destination memory must stay
alive until ``read`` returns.
"""
from typing import Any, Optional, Sequence, Tuple

CODEC_NONE: int  # 0: bytes stored as they are
CODEC_ZSTD: int  # 1: byte planes, each raw or zstd (see docs/FORMAT.md "zstd/1 chunk frame")
DEFAULT_ZSTD_LEVEL: int  # -131072: zstd's fastest level, with Huffman literals forced on
MAX_CHUNK_BYTES: int  # 2**31: no chunk decodes to more (Engine's chunk_bytes is capped here)
MAX_ZSTD_RATIO: int  # 32768: a zstd chunk never decodes to more than this times its stored bytes

def version() -> str: ...
def name_this_thread(name: str) -> None:
    """Name the calling OS thread (Linux keeps 15 characters; elsewhere a no-op)."""
def cuda_compiled() -> bool:
    """True when the CUDA sources were compiled in (nvcc was found at build time)."""
def cuda_available() -> bool:
    """True when CUDA was compiled in and a driver with >= 1 device is present now."""
def _emulate_device(enabled: bool, copy_delay_us: int = 0, fail_copy_at: int = -1,
                    refuse_register: bool = False) -> None:
    """Tests only: an emulated GPU made of host memory (csrc/device_emulator.cpp), so the engine's
    device paths run without one; device pieces then name host addresses (refuse_register: page-locking
    the pool's own slabs is refused, as a driver may). Off with enabled=False."""
def _emulated_hold_stream(stream: int, hold: bool) -> None:
    """Tests only: events recorded on this caller stream stay pending while held (work "still queued")."""
def _emulated_device_stats() -> dict:
    """copies, max_in_flight (most device-to-host copies queued and unfinished at once), h2d_copies,
    h2d_pageable (of those, copies from memory not page-locked), live_events, since the last _emulate_device call;
    registered: ranges page-locked in place and not yet unlocked."""
def hw_crc32c() -> bool:
    """True when CRC32C uses the CPU's crc32 instruction."""
def zstd_load(path: str) -> None:
    """dlopen a shared object exporting the zstd C API (the zstandard wheel's _cffi module)."""
def zstd_available() -> bool: ...
def zstd_version() -> str:
    """Version of the loaded zstd library, e.g. "1.5.7"; RuntimeError if none is loaded."""
def crc32c(data: memoryview | bytes | bytearray, seed: int = 0) -> int:
    """CRC32C (Castagnoli) of a buffer, continuing from ``seed``."""
def crc32c_software(data: memoryview | bytes | bytearray, seed: int = 0) -> int:
    """Same as ``crc32c`` but always the portable table path (for tests)."""
def crc32c_addr(addr: int, nbytes: int, seed: int = 0) -> int: ...
def crc32c_kernel() -> str:
    """The CRC32C kernel large buffers use here: "vpclmulqdq" (folding), "sse4.2" or "table"."""
def crc32c_unfolded(data: memoryview | bytes | bytearray, seed: int = 0) -> int:
    """Same as ``crc32c`` by the crc32 instruction alone (tests compare the kernels)."""
def copy_crc32c(dst: int, src: int, nbytes: int, seed: int = 0, stream: bool = True) -> int:
    """Copies ``nbytes`` from address ``src`` to ``dst`` (the capture kernel: one pass, streaming
    stores when large unless ``stream`` is False) and returns the CRC32C of the bytes stored,
    continuing from ``seed``."""
def copy_crc32c_fingerprint(dst: int, src: int, nbytes: int) -> tuple[int, int]:
    """``copy_crc32c`` that also fingerprints: (CRC32C, pkfp1 fingerprint) of the bytes stored."""
FP_SEED: int  # start value of a chunk's fingerprint fold
def crc32c_fingerprint(src: int, nbytes: int) -> tuple[int, int]:
    """(CRC32C, fingerprint) of nbytes at address src, in one read of them."""
def fingerprint(data: memoryview | bytes | bytearray) -> int:
    """64-bit pkfp1 fingerprint (csrc/include/pyckpt/fingerprint.h) of a host buffer (AVX2 when present)."""
def fingerprint_portable(data: memoryview | bytes | bytearray) -> int:
    """Same value, always the portable loop (for tests and benchmarks)."""
def fingerprint_addr(addr: int, nbytes: int, device: int = -1) -> int:
    """Fingerprint of memory at ``addr``; ``device >= 0``: device memory, by the CUDA kernel
    on the engine's stream (synchronize the caller's stream first)."""
def fingerprint_simd() -> bool: ...
def encode_state_tree(encoder: Any, state: Any, tag: str, tensor_type: type, parameter_type: type,
                      ordered_dict_type: type, max_depth: int) -> Any:
    """pyckpt.tree's encoding of ``state`` (``encoder.value(state, "", 0)``): exact dicts, OrderedDicts,
    lists, scalars and plain tensors walked in C++, every other value by ``encoder``. Holds the GIL."""
def chunk_fold(h: int, piece_fp: int) -> int:
    """Fold a piece's fingerprint into a chunk's (start from FP_SEED; pieces in order)."""
def encode(data: bytes, elem_size: int, level: int = ...) -> Tuple[int, bytes]:
    """Encode one chunk as the engine would: returns (codec_used, stored_bytes)."""
def decode(stored: bytes, codec: int, raw_len: int) -> bytes:
    """Inverse of ``encode``; raises ValueError on a malformed frame."""

ChunkResult = Tuple[int, int, int, int, int, int]
# (file_offset, stored_len, raw_len, crc32c_of_stored, codec_used, crc32c_of_raw)

class SaveJob:
    def num_chunks(self) -> int: ...
    def chunk_captured(self, index: int) -> bool: ...
    def captured_count(self) -> int: ...
    def wait_captured(self, timeout_s: Optional[float] = None) -> bool:
        """Block until every chunk is in staging, or the job failed and its capture
        loop stopped; either way, when True the engine reads no source memory again.
        False on timeout."""
    def wait(self, timeout_s: Optional[float] = None) -> bool:
        """Block until the job ended: every chunk written and every file fsynced, or
        the job failed (then ``error()`` says why). False on timeout."""
    def done(self) -> bool: ...
    def error(self) -> Optional[str]:
        """None, or the first failure. A staging timeout starts with 'staging timeout'."""
    def results(self) -> list[ChunkResult]:
        """Per chunk, in input order. Raises RuntimeError if the job failed or is not done."""
    def incremental(self) -> list[Tuple[int, int]]:
        """Per chunk: (fingerprint, status); status 0 written, 1 referenced (unchanged: neither
        copied nor written, its results() entry is zeros), 2 written after the CRC32C check
        caught a fingerprint collision. Fingerprints are 0 unless the save computed them."""
    def cancel(self) -> None: ...

class Engine:
    def __init__(
        self,
        staging_bytes: int,
        chunk_bytes: int,
        io_threads: int = 4,
        copy_threads: int = 2,
        pinned: bool = False,
        io_nice: int = 0,
    ) -> None:
        """The staging pool is allocated lazily on the first save, up to
        ``staging_bytes`` (at least one slab of ``chunk_bytes``), then reused.
        ``io_nice`` > 0: the I/O workers run at that nice value (Linux), never raised."""
    def staging_bytes_allocated(self) -> int: ...
    def staging_bytes_in_use(self) -> int:
        """Bytes of staging slabs held by saves in progress (0 when none runs)."""
    def chunk_bytes(self) -> int: ...
    def thread_shortfall(self) -> str: ...
    def save(
        self,
        files: Sequence[str],
        chunks: Sequence[Tuple[int, int, Sequence[Tuple[int, int, int]]]],
        codec: int = 0,
        level: int = ...,
        stream: int = 0,
        device: int = -1,
        staging_timeout_ms: int = 60000,
        write_delay_us: int = 0,
        expect: Sequence[Tuple[int, int, bool, int]] = (),
        fingerprint: bool = False,
        constant_fp: bool = False,
        map_files: bool = False,
        skip_fingerprint: Sequence[int] = (),
        streams: Sequence[Tuple[int, int]] = (),
    ) -> SaveJob:
        """Start a save; returns at once.

        files: paths created (truncated) by the engine.
        chunks[i] = (file_idx, elem_size, [(src_addr, nbytes, src_device), ...]);
        the pieces' total must be <= chunk_bytes. Chunks are captured in order.
        Each chunk is written at a 4 KiB-aligned offset of files[file_idx].
        expect[k] = (chunk_index, fingerprint, verify, raw_crc32c): the chunk is
        fingerprinted where it lies first and, when equal (and with verify, when
        the CRC32C of its current bytes equals raw_crc32c), neither copied nor
        written. fingerprint: compute every chunk's fingerprint (incremental()).
        stream/device: the caller's CUDA stream on `device`; streams: (device,
        stream) for further devices. Each device's copies wait for the work
        queued on its stream before this call (a device with none named: the
        legacy default stream).
        constant_fp: testing only, every fingerprint is 0.
        map_files (codec none only): existing files are reused, not truncated
        (their pages stay allocated), and host chunks are copied straight into
        them, mapped, with no staging slab or write; a file the file system
        cannot allocate or map is written as usual.
        skip_fingerprint: chunk indices (not in expect) known to have changed:
        written without computing their fingerprint (incremental() gives 0).
        """
    def read(
        self,
        files: Sequence[str],
        chunks: Sequence[Tuple[int, int, int, int, int, int, Sequence[Tuple[int, int, int, int]]]],
        verify: bool = True,
        fds: Sequence[int] = (),
        direct: bool = False,
    ) -> list[Tuple[int, str]]:
        """Read chunks in parallel; returns [(chunk_index, message)] for every failure.

        chunks[i] = (file_idx, file_offset, stored_len, raw_len, crc32c, codec,
                     [(offset_in_raw, dst_addr, nbytes, dst_device), ...]).
        An empty piece list verifies only (used by ``pyckpt verify``).

        files are opened here with O_NOFOLLOW|O_NONBLOCK|O_CLOEXEC, regular
        files only; or, with ``fds`` (one per file), those open descriptors are
        read (duplicated for the call; the caller closes its own) and files
        only name them in messages. Every length is checked against the
        file's fstat size and MAX_CHUNK_BYTES / MAX_ZSTD_RATIO before a buffer
        is sized. ``direct=False``: a chunk reaches its destinations only
        after its checksum passed (bounce buffer). ``direct=True`` lets a
        whole uncompressed chunk be read straight into its one destination
        and verified there: only for memory discarded when the read fails.
        """
