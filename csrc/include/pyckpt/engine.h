// The engine: a staging pool, I/O workers and copy workers shared by every
// save and read of a process.
//
// save() validates its arguments, records an event on the caller's CUDA
// stream when any piece lives on a GPU, and returns a SaveJob at once. A
// capture thread per job fills staging slabs chunk by chunk, in order (host
// pieces: memcpy split across copy workers; device pieces: cudaMemcpyAsync on
// the engine's stream after the caller's event, several chunks queued at
// once, each marked captured when its event completes). Each captured chunk goes to
// an I/O worker: CRC32C of the raw bytes, encode, CRC32C of the stored bytes,
// reserve a 4 KiB-aligned offset, pwrite, release the slab. After the last
// chunk every file is fsynced.
//
// read() fetches chunks in parallel on the I/O workers, verifies, decodes and
// scatters them, and returns one message per failed chunk instead of throwing.
// A chunk's bytes reach a destination only after its checksum passed (they go
// through a per-thread bounce buffer, or are checksummed where they lie in a
// file on tmpfs, MemoryFileView), unless the caller allows `direct` reads
// into memory it discards on failure. Lengths are checked against the
// file's size (fstat) and the limits below before any buffer is sized.
//
// SAFETY: addresses are borrowed. Save sources must stay alive and unchanged
// until their chunk is captured; read destinations until read() returns.
#pragma once

#include <cstddef>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "pyckpt/codec.h"
#include "pyckpt/cuda_api.h"
#include "pyckpt/file_io.h"
#include "pyckpt/save_job.h"
#include "pyckpt/staging_pool.h"
#include "pyckpt/thread_pool.h"

namespace pyckpt {

struct ReadPiece {
  uint64_t offset_in_raw;
  uintptr_t dst;
  size_t nbytes;
  int device;  // -1 = host memory
};

struct ReadChunk {
  size_t file_idx;
  uint64_t file_offset;
  uint64_t stored_len;
  uint64_t raw_len;
  uint32_t crc32c;
  int codec;
  std::vector<ReadPiece> pieces;
};

using ReadError = std::pair<size_t, std::string>;

/// No chunk is larger than this decoded (Engine's chunk_bytes is capped to it).
constexpr uint64_t kMaxChunkBytes = uint64_t{1} << 31;
/// A zstd/1 chunk never decodes to more than this many times its stored size:
/// a zstd block holds at most 128 KiB and takes at least 4 bytes (RLE block).
constexpr uint64_t kMaxZstdRatio = 32768;

/// Per device a save reads from: the event recorded on the caller's stream
/// there at save() time, which that device's copies wait for.
using DeviceEvents = std::vector<std::pair<int, cuda::Event>>;

class File;

class Engine {
 public:
  /// `io_nice` > 0: the I/O (write and read) workers run at that nice value (Linux); capture
  /// and copy threads keep the caller's, as the next optimizer step may wait for them.
  Engine(size_t staging_bytes, size_t chunk_bytes, size_t io_threads, size_t copy_threads,
         bool pinned, int io_nice = 0);
  /// Waits for every job still in flight, then stops the workers.
  ~Engine();
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  std::shared_ptr<SaveJob> save(std::vector<std::string> files, std::vector<SaveChunk> chunks,
                                const SaveOptions& options);
  /// `files` are opened here (no symlink, regular files only) unless `fds`
  /// is non-empty: then fds[i] is an open descriptor of files[i] (borrowed,
  /// duplicated for the call; files[i] only names it in messages).
  std::vector<ReadError> read(const std::vector<std::string>& files,
                              const std::vector<ReadChunk>& chunks, bool verify,
                              const std::vector<int>& fds = {}, bool direct = false);

  size_t staging_bytes_allocated() const { return pool_.allocated_bytes(); }
  size_t staging_bytes_in_use() const { return pool_.in_use_bytes(); }
  size_t chunk_bytes() const { return chunk_bytes_; }
  /// Empty, or which worker pools started fewer threads than asked (the limit on threads was
  /// reached): the engine works with those, slower.
  std::string thread_shortfall() const;

 private:
  void validate(const std::vector<std::string>& files, const std::vector<SaveChunk>& chunks,
                const SaveOptions& options) const;
  void capture_loop(const std::shared_ptr<SaveJob>& job, const DeviceEvents& after);
  /// Hands captured chunks (index, slab) to the I/O threads and clears the list.
  void submit_writes(const std::shared_ptr<SaveJob>& job,
                     std::vector<std::pair<size_t, uint8_t*>>& captured);
  /// A device chunk whose copies into its slab are queued on the engine stream.
  struct DeviceCopy {
    size_t index;
    uint8_t* slab;
    bool verify_slab;                // compare the slab's CRC32C with the expected one when done
    std::vector<cuda::Event> done;  // one per device the chunk reads from
  };
  /// Device chunks queued at once: enough that the copy engine never waits
  /// for the capture thread to notice a finished copy and queue the next.
  static constexpr size_t kCopiesInFlight = 4;
  /// Queues the chunk's device pieces (host pieces are copied now) and
  /// returns the events that mark them done. On failure, waits for what it
  /// queued, so the caller may release the slab.
  std::vector<cuda::Event> start_device_copy(const SaveChunk& chunk, uint8_t* slab, const DeviceEvents& after);
  /// Waits for the oldest queued chunk, then marks it captured and moves it
  /// to `captured` (or releases its slab, when it proved unchanged).
  void finish_device_copy(SaveJob& job, std::deque<DeviceCopy>& copying,
                          std::vector<std::pair<size_t, uint8_t*>>& captured);
  /// After a failure: waits for the queued copies and releases their slabs.
  void abandon_device_copies(std::deque<DeviceCopy>& copying) noexcept;
  /// Waits (errors ignored) for a queued chunk's copies, then releases its slab.
  void wait_and_release(DeviceCopy& d) noexcept;
  /// Waits (errors ignored) for everything queued on the engine stream of `device`.
  static void drain_engine_stream(int device) noexcept;
  /// Runs fn(part, begin, len) over up to copy_threads parts of [0, n) (one
  /// part below 2 MiB), part 0 on the calling thread, the others on the copy
  /// workers; returns how many parts ran (indices 0..returned-1).
  size_t split_parts(size_t n, const std::function<void(size_t, size_t, size_t)>& fn);
  void host_copy(uint8_t* dst, const uint8_t* src, size_t n);
  /// Copies an all-host chunk into its slab and returns the CRC32C of its raw
  /// bytes; with `fp`, also stores the chunk's fingerprint there. One pass over memory.
  uint32_t capture_host_summed(const SaveChunk& chunk, uint8_t* slab, uint64_t* fp);
  // A host chunk copied (and checksummed) straight into its file's mapping.
  void capture_mapped(SaveJob& job, size_t i);
  /// Fingerprint of a chunk read from its sources (host pieces on the copy
  /// workers, device pieces by the CUDA kernel after `after`).
  /// `device_fps` (may be null or empty): the per-piece fingerprints of its
  /// device pieces, already computed by device_fingerprints.
  uint64_t source_fingerprint(const SaveChunk& chunk, const std::vector<uint64_t>* device_fps,
                              const DeviceEvents& after);
  /// Per chunk, per piece: fingerprints of the device pieces of every chunk with
  /// an expectation, in one batch per device (one launch per 1024 pieces and
  /// one synchronization instead of one per chunk).
  static std::vector<std::vector<uint64_t>> device_fingerprints(const std::vector<SaveChunk>& chunks,
                                                                const DeviceEvents& after);
  uint64_t host_fingerprint(const uint8_t* p, size_t n);
  /// An all-host chunk's fingerprint and the CRC32C of its bytes, in one read of them on the copy
  /// workers: the check of a chunk expected unchanged whose reference's CRC must match too.
  std::pair<uint64_t, uint32_t> host_fingerprint_crc(const SaveChunk& chunk);
  /// One part of a host piece: (part's source, its offset in the chunk, its first fingerprint
  /// stripe, its length, lane sums to add to or null) -> the part's CRC32C from 0.
  using PartSum = std::function<uint32_t(const uint8_t*, size_t, uint64_t, size_t, uint64_t*)>;
  /// (fingerprint, CRC32C) of an all-host chunk, each piece split over the copy workers and
  /// `part` run on each part; the fingerprint only with `want_fp`.
  std::pair<uint64_t, uint32_t> sum_pieces(const SaveChunk& chunk, bool want_fp, const PartSum& part);
  /// A captured chunk's fingerprint, from its staging slab.
  static uint64_t slab_fingerprint(const SaveChunk& chunk, const uint8_t* slab);
  void write_chunk(SaveJob& job, size_t i, uint8_t* slab);
  void write_stored(const File& file, const Encoded& e, uint8_t* slab, uint64_t offset);
  std::string staging_timeout_message(const SaveJob& job) const;
  void read_chunk(const File& file, const MemoryFileView& view, const ReadChunk& chunk, bool verify,
                  bool direct_ok);
  void reap_captures(bool all);

  const size_t chunk_bytes_;
  StagingPool pool_;
  MappingCache maps_;  // the memory tier's files, mapped (SaveOptions::map_files)
  ThreadPool copy_;  // copy_threads - 1 workers: the capture thread copies too
  const size_t copy_parts_;
  ThreadPool io_;
  std::mutex captures_mu_;
  std::vector<std::pair<std::shared_ptr<SaveJob>, std::thread>> captures_;
};

}  // namespace pyckpt
