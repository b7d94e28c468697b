// The state of one Engine::save(): what to save, per-chunk progress, results
// and the first error. Shared by the capture thread, the I/O workers and the
// Python-facing handle; all methods are thread-safe.
//
// Life cycle: every chunk is captured (bytes in a staging slab), then written;
// when the capture thread and every write task have finished, the job is
// finalized: on success every file is fsynced and closed, then done() is true.
// A failure (I/O error, staging timeout, cancel) stops further capture, lets
// in-flight work drain without writing, and still ends in done().
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "pyckpt/file_io.h"
#include "pyckpt/file_map.h"

namespace pyckpt {

struct SavePiece {
  uintptr_t addr;
  size_t nbytes;
  int device;  // -1 = host memory
};

struct SaveChunk {
  size_t file_idx;
  int elem_size;
  std::vector<SavePiece> pieces;
  size_t raw_len;  // sum of piece sizes
  bool on_device;  // any piece with device >= 0
  // Incremental saves: when `expect` is set and the chunk's fingerprint equals
  // expect_fp (and, with `verify`, the CRC32C of its current bytes equals
  // expect_crc), the chunk is neither copied nor written (status kReferenced).
  bool expect = false;
  bool verify = false;
  uint64_t expect_fp = 0;
  uint32_t expect_crc = 0;
  // Incremental saves: a chunk known to have changed (its tensors' version
  // counters moved) is written without a fingerprint (status kWritten, fp 0).
  bool no_fp = false;
};

/// Per-chunk outcome of an incremental save (SaveJob::incremental()).
constexpr int kChunkWritten = 0;
constexpr int kChunkReferenced = 1;  // unchanged: not copied, not written
constexpr int kChunkCollision = 2;   // fingerprint matched, CRC32C did not: written

struct SaveOptions {
  int codec = 0;
  int level = 0;
  uintptr_t stream = 0;  // the caller's stream on `device`
  int device = -1;
  // The caller's streams on other devices, (device, stream); a device read
  // from with none named is ordered after its legacy default stream.
  std::vector<std::pair<int, uintptr_t>> streams;
  int64_t staging_timeout_ms = 60000;
  int64_t write_delay_us = 0;
  bool fingerprint = false;  // compute every chunk's fingerprint (incremental saves)
  bool constant_fp = false;  // testing: every fingerprint is 0 (forced collisions)
  // The memory tier: files are reused, not truncated (a recycled file's pages
  // are already allocated) and host chunks are copied straight into them,
  // mapped, with no staging slab and no write (codec none only).
  bool map_files = false;
};

struct ChunkResult {
  uint64_t file_offset = 0;
  uint64_t stored_len = 0;
  uint64_t raw_len = 0;
  uint32_t crc32c = 0;
  int codec = 0;
  uint32_t raw_crc32c = 0;
};

class SaveJob {
 public:
  SaveJob(std::vector<std::string> files, std::vector<SaveChunk> chunks, SaveOptions options);

  // ---- queries (Python-facing) ----
  size_t num_chunks() const { return chunks_.size(); }
  bool chunk_captured(size_t i) const;
  size_t captured_count() const { return captured_count_.load(); }
  /// timeout_s < 0 waits forever. True once all chunks are captured, or once the
  /// job failed AND the capture loop stopped reading source memory (so the
  /// caller may free or mutate its tensors whenever this returns true).
  bool wait_captured(double timeout_s);
  /// True once the job ended (successfully or not).
  bool wait(double timeout_s);
  bool done() const;
  std::optional<std::string> error() const;
  /// Per-chunk results; throws Error(Runtime) if the job failed or is running.
  std::vector<ChunkResult> results() const;
  void cancel();

  // ---- pipeline side ----
  const std::vector<std::string>& paths() const { return paths_; }
  const std::vector<SaveChunk>& chunks() const { return chunks_; }
  const SaveOptions& options() const { return options_; }
  const std::atomic<bool>& stop_flag() const { return stop_; }
  bool stopped() const { return stop_.load(); }

  /// Records the first failure and stops the job; later failures are ignored.
  void fail(const std::string& message);
  /// Creates the files; uncompressed, also allocates the room the chunks to be
  /// written will take (File::preallocate).
  void open_files();
  const File& file(size_t i) const { return files_[i]; }
  /// With options().map_files: maps every file over the room all its chunks
  /// may need (from `cache`); a file that cannot be mapped is written.
  void map_files(MappingCache& cache);
  /// File i's mapping, or nullptr (then its chunks go through staging).
  uint8_t* mapped(size_t i) const { return maps_.empty() ? nullptr : maps_[i].get(); }
  /// Reserve a 4 KiB-aligned region of `n` bytes in file i.
  uint64_t reserve(size_t file_idx, uint64_t n);
  /// Records that file i holds data up to `end`; finalize() truncates each
  /// file there, dropping the zero padding of a last O_DIRECT write.
  void note_end(size_t file_idx, uint64_t end);
  void mark_captured(size_t i);
  /// Called by the capture loop when it will not read source memory again.
  void mark_capture_finished();
  void set_result(size_t i, const ChunkResult& r) { results_[i] = r; }
  // Each index is written by one thread (capture or its write task), read after done().
  void set_fingerprint(size_t i, uint64_t fp) { fps_[i] = fp, fp_known_[i] = 1; }
  bool fingerprint_known(size_t i) const { return fp_known_[i] != 0; }
  /// CRC32C of a chunk's raw bytes, when capture computed it while copying.
  void set_raw_crc(size_t i, uint32_t crc) { raw_crc_[i] = crc, raw_crc_known_[i] = 1; }
  bool raw_crc_known(size_t i) const { return raw_crc_known_[i] != 0; }
  uint32_t raw_crc(size_t i) const { return raw_crc_[i]; }
  void set_status(size_t i, int status) { status_[i] = static_cast<uint8_t>(status); }
  /// (fingerprint, status) per chunk; throws like results().
  std::vector<std::pair<uint64_t, int>> incremental() const;

  /// Counts a unit of outstanding work (the capture loop, each write task).
  void begin_task() { pending_.fetch_add(1); }
  /// Ends one; the last one finalizes the job (fsync + close, or cleanup).
  void end_task();

 private:
  void finalize();

  const std::vector<std::string> paths_;
  const std::vector<SaveChunk> chunks_;
  const SaveOptions options_;
  std::vector<File> files_;
  std::vector<std::shared_ptr<uint8_t>> maps_;
  std::unique_ptr<std::atomic<uint64_t>[]> next_offset_;
  std::unique_ptr<std::atomic<uint64_t>[]> data_end_;
  std::unique_ptr<std::atomic<bool>[]> captured_;
  std::atomic<size_t> captured_count_{0};
  std::vector<ChunkResult> results_;
  std::vector<uint64_t> fps_;
  std::vector<uint8_t> fp_known_;
  std::vector<uint32_t> raw_crc_;
  std::vector<uint8_t> raw_crc_known_;
  std::vector<uint8_t> status_;
  std::atomic<size_t> pending_{0};
  std::atomic<bool> stop_{false};

  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::optional<std::string> error_;
  bool done_ = false;
  bool capture_finished_ = false;
};

}  // namespace pyckpt
