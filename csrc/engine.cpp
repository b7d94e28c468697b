#include "pyckpt/engine.h"

#include <algorithm>
#include <array>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <functional>
#include <system_error>
#include <tuple>

#include "pyckpt/codec.h"
#include "pyckpt/copy_kernel.h"
#include "pyckpt/crc32c.h"
#include "pyckpt/errors.h"
#include "pyckpt/file_io.h"
#include "pyckpt/fingerprint.h"
#include "pyckpt/zstd_api.h"

namespace pyckpt {

namespace {

// CRC32C of a host chunk's current bytes, read where they lie.
uint32_t chunk_crc(const SaveChunk& c) {
  uint32_t crc = 0;
  for (const SavePiece& p : c.pieces) crc = crc32c(reinterpret_cast<const void*>(p.addr), p.nbytes, crc);
  return crc;
}

// The event for `device` (null when the save reads nothing from it).
cuda::Event event_for(const DeviceEvents& after, int device) {
  for (const auto& [d, e] : after)
    if (d == device) return e;
  return nullptr;
}

void destroy_all(const DeviceEvents& after) noexcept {
  for (const auto& [d, e] : after) cuda::destroy(e);
}

// Below this a host piece is copied by one thread: splitting costs more.
constexpr size_t kParallelCopyMin = 1 << 20;

std::string hex32(uint32_t v) {
  char buf[16];
  std::snprintf(buf, sizeof buf, "0x%08x", static_cast<unsigned>(v));
  return buf;
}

// Read-side buffers, one set per I/O thread, grown to the largest chunk seen
// (released after use when over kKeepReadBuffer, so one huge chunk does not
// pin its memory for the life of the process).
constexpr size_t kKeepReadBuffer = size_t{64} << 20;

// Page-locked host memory for chunks bound for a GPU: the read lands (or the
// decoder writes) here and the device copy is a DMA from it, with no staging
// copy by the driver. Allocated only by threads that read for a device.
class PinnedBuffer {
 public:
  PinnedBuffer() = default;
  PinnedBuffer(const PinnedBuffer&) = delete;
  PinnedBuffer& operator=(const PinnedBuffer&) = delete;
  ~PinnedBuffer() { cuda::host_free(p_); }
  uint8_t* get(size_t n) {
    if (n > cap_ || p_ == nullptr) {
      cuda::host_free(p_);
      p_ = nullptr;
      cap_ = 0;
      n = std::max<size_t>(n, 4096);  // never null, even for an empty piece
      p_ = static_cast<uint8_t*>(cuda::host_alloc(n));
      cap_ = n;
    }
    return p_;
  }
  void release_if_large() {
    if (cap_ > kKeepReadBuffer) {
      cuda::host_free(p_);
      p_ = nullptr;
      cap_ = 0;
    }
  }

 private:
  uint8_t* p_ = nullptr;
  size_t cap_ = 0;
};

struct ReadBuffers {
  std::vector<uint8_t> stored;
  std::vector<uint8_t> raw;
  PinnedBuffer pinned;
};

ReadBuffers& read_buffers() {
  thread_local ReadBuffers buffers;
  return buffers;
}

}  // namespace

Engine::Engine(size_t staging_bytes, size_t chunk_bytes, size_t io_threads, size_t copy_threads,
               bool pinned, int io_nice)
    : chunk_bytes_(chunk_bytes),
      pool_(staging_bytes, chunk_bytes, pinned),
      copy_(copy_threads > 1 ? copy_threads - 1 : 1, 0, "pyckpt-copy"),
      copy_parts_(copy_threads > 0 ? copy_threads : 1),
      io_(io_threads, io_nice, "pyckpt-io") {
  PYCKPT_CHECK_ARG(chunk_bytes > 0 && chunk_bytes <= kMaxChunkBytes,
                   "chunk_bytes must be in (0, 2 GiB], got " << chunk_bytes);
}

Engine::~Engine() { reap_captures(true); }

std::string Engine::thread_shortfall() const {
  std::string out = copy_.shortfall();
  if (!io_.shortfall().empty()) out += (out.empty() ? "" : "; ") + io_.shortfall();
  return out;
}

void Engine::reap_captures(bool all) {
  std::lock_guard<std::mutex> lock(captures_mu_);
  for (auto it = captures_.begin(); it != captures_.end();) {
    if (all) it->first->wait(-1);
    if (it->first->done()) {
      it->second.join();
      it = captures_.erase(it);
    } else {
      ++it;
    }
  }
}

void Engine::validate(const std::vector<std::string>& files, const std::vector<SaveChunk>& chunks,
                      const SaveOptions& o) const {
  PYCKPT_CHECK_ARG(o.codec == kCodecNone || o.codec == kCodecZstd,
                   "unknown codec id " << o.codec << " (0 = none, 1 = zstd)");
  if (o.codec == kCodecZstd && !zstd::available())
    throw Error(ErrorKind::Runtime,
                "codec zstd requested but zstd is not loaded: install `zstandard>=0.22` "
                "or save with compression 'none'");
  PYCKPT_CHECK_ARG(o.staging_timeout_ms >= 0, "staging_timeout_ms must be >= 0");
  // Each path gets its own offset counter, so a repeated path would overlap.
  std::vector<std::string> sorted(files);
  std::sort(sorted.begin(), sorted.end());
  const auto dup = std::adjacent_find(sorted.begin(), sorted.end());
  PYCKPT_CHECK_ARG(dup == sorted.end(), "file " << *dup << " is listed twice");
  PYCKPT_CHECK_ARG(o.write_delay_us >= 0, "write_delay_us must be >= 0");
  for (size_t i = 0; i < chunks.size(); ++i) {
    const SaveChunk& c = chunks[i];
    PYCKPT_CHECK_ARG(c.file_idx < files.size(), "chunk " << i << ": file index " << c.file_idx
                                                          << " but only " << files.size()
                                                          << " files");
    PYCKPT_CHECK_ARG(c.elem_size == 1 || c.elem_size == 2 || c.elem_size == 4 || c.elem_size == 8,
                     "chunk " << i << ": elem_size must be 1, 2, 4 or 8, got " << c.elem_size);
    PYCKPT_CHECK_ARG(c.raw_len <= chunk_bytes_, "chunk " << i << " holds " << c.raw_len
                                                         << " bytes, more than chunk_bytes="
                                                         << chunk_bytes_);
    if (c.on_device && !cuda::available())
      throw Error(ErrorKind::Value, "chunk " + std::to_string(i) +
                                        " has a GPU piece but CUDA is not available in pyckpt._C");
  }
}

std::shared_ptr<SaveJob> Engine::save(std::vector<std::string> files,
                                      std::vector<SaveChunk> chunks, const SaveOptions& options) {
  validate(files, chunks, options);
  // One event per device read from, on the caller's stream for that device:
  // each device's copies then see the kernels queued there before save().
  std::vector<int> devices;
  for (const auto& c : chunks)
    for (const auto& p : c.pieces)
      if (p.device >= 0 && std::find(devices.begin(), devices.end(), p.device) == devices.end())
        devices.push_back(p.device);
  DeviceEvents after;
  try {
    for (int d : devices) {
      // `stream` belongs to `device` (or, with no device named, to the first
      // device read from); a device with no stream named gets the legacy
      // default stream, which orders after that device's blocking streams.
      const bool named = d == options.device || (options.device < 0 && d == devices.front());
      uintptr_t stream = named ? options.stream : 0;
      for (const auto& [sd, ss] : options.streams)
        if (sd == d) stream = ss;
      after.emplace_back(d, cuda::record_on(d, stream));
    }
  } catch (...) {
    destroy_all(after);
    throw;
  }
  auto job = std::make_shared<SaveJob>(std::move(files), std::move(chunks), options);
  job->begin_task();  // the capture loop's unit of work
  reap_captures(false);
  std::lock_guard<std::mutex> lock(captures_mu_);
  try {
    captures_.emplace_back(job, std::thread([this, job, after] { capture_loop(job, after); }));
  } catch (const std::system_error& e) {  // the limit on threads: this save fails, not the process
    destroy_all(after);
    throw Error(ErrorKind::OS, std::string("cannot start the capture thread of this save (") + e.what() +
                                   "): the limit on threads (ulimit -u, the container's pids.max) is reached");
  }
  return job;
}

std::string Engine::staging_timeout_message(const SaveJob& job) const {
  Msg os;
  os << "staging timeout: no free staging slab within " << job.options().staging_timeout_ms
     << " ms (pool of " << pool_.max_slabs() << " slabs x " << pool_.slab_bytes()
     << " bytes is busy with earlier checkpoints); the checkpoint was skipped. Raise "
        "PYCKPT_STAGING_MB or PYCKPT_STAGING_TIMEOUT_S, or checkpoint less often";
  return os.str();
}

void Engine::submit_writes(const std::shared_ptr<SaveJob>& job,
                           std::vector<std::pair<size_t, uint8_t*>>& captured) {
  for (const auto& [i, slab] : captured) {
    job->begin_task();
    io_.submit([this, job, i = i, slab = slab] { write_chunk(*job, i, slab); });
  }
  captured.clear();
}

void Engine::capture_loop(const std::shared_ptr<SaveJob>& job, const DeviceEvents& after) {
  std::vector<std::pair<size_t, uint8_t*>> captured;  // captured, write not yet submitted
  std::deque<DeviceCopy> copying;  // device chunks queued on the engine stream, oldest first
  name_this_thread("pyckpt-capture");
  try {
    job->open_files();
    job->map_files(maps_);
    const auto timeout = std::chrono::milliseconds(job->options().staging_timeout_ms);
    // Unchanged GPU chunks: all device fingerprints in one batch, before the first copy.
    const std::vector<std::vector<uint64_t>> dev_fps =
        job->options().constant_fp ? std::vector<std::vector<uint64_t>>() : device_fingerprints(job->chunks(), after);
    for (size_t i = 0; i < job->num_chunks() && !job->stopped(); ++i) {
      const SaveChunk& c = job->chunks()[i];
      bool verify_slab = false;  // a device chunk's CRC is checked once it is in staging
      if (c.expect) {
        // A host chunk to be CRC-checked too is fingerprinted and checksummed in one read of it.
        const bool together = c.verify && !c.on_device && !job->options().constant_fp;
        uint64_t fp = 0;
        uint32_t crc = 0;
        if (together)
          std::tie(fp, crc) = host_fingerprint_crc(c);
        else if (!job->options().constant_fp)
          fp = source_fingerprint(c, dev_fps.empty() ? nullptr : &dev_fps[i], after);
        job->set_fingerprint(i, fp);
        if (fp == c.expect_fp) {
          if (!c.verify || (!c.on_device && (together ? crc : chunk_crc(c)) == c.expect_crc)) {
            job->set_status(i, kChunkReferenced);  // unchanged: no slab, no copy, no write
            job->mark_captured(i);
            continue;
          }
          if (c.on_device)
            verify_slab = true;
          else
            job->set_status(i, kChunkCollision);
        }
      }
      if (!c.on_device && job->mapped(c.file_idx)) {
        capture_mapped(*job, i);
        job->mark_captured(i);
        continue;
      }
      uint8_t* slab = pool_.acquire(c.raw_len, std::chrono::milliseconds(0), &job->stop_flag());
      if (!slab) {
        // Pool dry: finish the queued copies and start the deferred writes,
        // which free slabs, then wait.
        while (!copying.empty()) finish_device_copy(*job, copying, captured);
        submit_writes(job, captured);
        slab = pool_.acquire(c.raw_len, timeout, &job->stop_flag());
      }
      if (!slab) {
        job->fail(staging_timeout_message(*job));  // no-op if already cancelled
        break;
      }
      if (c.on_device) {
        // Queued behind the copies before it: the copy engine stays busy
        // while this thread waits for the oldest one.
        copying.push_back(DeviceCopy{i, slab, verify_slab, {}});
        copying.back().done = start_device_copy(c, slab, after);
        if (copying.size() >= kCopiesInFlight) finish_device_copy(*job, copying, captured);
        continue;
      }
      try {
        // Host chunk: CRC32C (and the fingerprint, if still needed) computed while copying.
        const bool want_fp = job->options().fingerprint && !job->options().constant_fp && !c.no_fp &&
                             !job->fingerprint_known(i);
        uint64_t fp = 0;
        job->set_raw_crc(i, capture_host_summed(c, slab, want_fp ? &fp : nullptr));
        if (want_fp) job->set_fingerprint(i, fp);
      } catch (...) {
        pool_.release(slab);
        throw;
      }
      job->mark_captured(i);
      captured.emplace_back(i, slab);
    }
    while (!copying.empty()) finish_device_copy(*job, copying, captured);
  } catch (const std::exception& e) {
    job->fail(e.what());
  }
  abandon_device_copies(copying);  // left only by a failure
  // Writes start once capture is over (or the pool ran dry, above): writes
  // overlapping the copies slowed capture ~3x on a 2-core machine, even with
  // O_DIRECT, and the caller is blocked on capture, not on durability.
  submit_writes(job, captured);
  destroy_all(after);
  job->mark_capture_finished();
  job->end_task();
}

std::vector<cuda::Event> Engine::start_device_copy(const SaveChunk& chunk, uint8_t* slab,
                                                   const DeviceEvents& after) {
  std::vector<int> devices;
  std::vector<cuda::Event> done;
  try {
    uint8_t* dst = slab;
    for (const SavePiece& p : chunk.pieces) {
      if (p.device < 0) {
        host_copy(dst, reinterpret_cast<const uint8_t*>(p.addr), p.nbytes);
      } else {
        if (std::find(devices.begin(), devices.end(), p.device) == devices.end()) devices.push_back(p.device);
        cuda::copy_d2h_async(p.device, dst, reinterpret_cast<const void*>(p.addr), p.nbytes,
                             event_for(after, p.device));
      }
      dst += p.nbytes;
    }
    for (int d : devices) done.push_back(cuda::record_engine(d));
  } catch (...) {
    // Copies already queued must land before the caller frees the slab.
    for (int d : devices) drain_engine_stream(d);
    for (cuda::Event e : done) cuda::destroy(e);
    throw;
  }
  return done;
}

void Engine::drain_engine_stream(int device) noexcept {
  cuda::Event e = nullptr;
  try {
    e = cuda::record_engine(device);
    cuda::synchronize(e);
  } catch (...) {  // a failed stream runs nothing more either
  }
  cuda::destroy(e);
}

void Engine::wait_and_release(DeviceCopy& d) noexcept {
  for (cuda::Event e : d.done) {
    try {
      cuda::synchronize(e);  // the slab is not reused while a copy may still write it
    } catch (...) {
    }
    cuda::destroy(e);
  }
  d.done.clear();
  pool_.release(d.slab);
}

void Engine::finish_device_copy(SaveJob& job, std::deque<DeviceCopy>& copying,
                                std::vector<std::pair<size_t, uint8_t*>>& captured) {
  DeviceCopy d = std::move(copying.front());
  copying.pop_front();
  try {
    for (cuda::Event e : d.done) cuda::synchronize(e);
  } catch (...) {
    wait_and_release(d);
    throw;
  }
  for (cuda::Event e : d.done) cuda::destroy(e);
  if (d.verify_slab) {
    const SaveChunk& c = job.chunks()[d.index];
    const uint32_t crc = crc32c(d.slab, c.raw_len);
    job.set_raw_crc(d.index, crc);  // the write task needs it too
    if (crc == c.expect_crc) {
      pool_.release(d.slab);
      job.set_status(d.index, kChunkReferenced);
      job.mark_captured(d.index);
      return;
    }
    job.set_status(d.index, kChunkCollision);
  }
  job.mark_captured(d.index);
  captured.emplace_back(d.index, d.slab);
}

void Engine::abandon_device_copies(std::deque<DeviceCopy>& copying) noexcept {
  for (DeviceCopy& d : copying) wait_and_release(d);
  copying.clear();
}

size_t Engine::split_parts(size_t n, const std::function<void(size_t, size_t, size_t)>& fn) {
  const size_t parts = std::max<size_t>(1, std::min(copy_parts_, n / kParallelCopyMin));
  // Cut at 64-byte boundaries: whole fingerprint stripes, whole cache lines.
  const size_t per = parts == 1 ? n : (n / parts + 63) & ~size_t{63};
  size_t used = 1;
  WaitGroup wg;
  for (size_t k = 1; k < parts && k * per < n; ++k, ++used) {
    const size_t begin = k * per, len = std::min(per, n - begin);
    wg.add(1);
    copy_.submit([&wg, &fn, k, begin, len] {
      fn(k, begin, len);
      wg.done();
    });
  }
  fn(0, 0, std::min(per, n));
  wg.wait();
  return used;
}

uint64_t Engine::host_fingerprint(const uint8_t* p, size_t n) {
  // Lane sums of parts add up.
  std::vector<std::array<uint64_t, 4>> sums(copy_parts_ + 1, {0, 0, 0, 0});
  const size_t used = split_parts(n, [&](size_t k, size_t begin, size_t len) {
    fingerprint_lanes(p + begin, len, begin / 32, sums[k].data());
  });
  uint64_t acc[4] = {0, 0, 0, 0};
  for (size_t k = 0; k < used; ++k)
    for (int j = 0; j < 4; ++j) acc[j] += sums[k][j];
  return fingerprint_finish(acc, n);
}

std::pair<uint64_t, uint32_t> Engine::sum_pieces(const SaveChunk& chunk, bool want_fp, const PartSum& part) {
  uint32_t crc = 0;
  uint64_t h = kFpSeed;
  size_t at = 0;  // the piece's offset in the chunk
  std::vector<uint32_t> crcs(copy_parts_ + 1);
  std::vector<size_t> lens(copy_parts_ + 1);
  std::vector<std::array<uint64_t, 4>> sums(copy_parts_ + 1);
  for (const SavePiece& piece : chunk.pieces) {
    const auto* src = reinterpret_cast<const uint8_t*>(piece.addr);
    // Each part's CRC starts from 0; combined in order they give the piece's
    // CRC, and the parts' lane sums add up to its fingerprint's.
    const size_t used = split_parts(piece.nbytes, [&](size_t k, size_t begin, size_t len) {
      lens[k] = len, sums[k] = {0, 0, 0, 0};
      crcs[k] = part(src + begin, at + begin, begin / 32, len, want_fp ? sums[k].data() : nullptr);
    });
    uint64_t acc[4] = {0, 0, 0, 0};
    for (size_t k = 0; k < used; ++k) {
      crc = crc32c_combine(crc, crcs[k], lens[k]);
      for (int j = 0; j < 4; ++j) acc[j] += sums[k][j];
    }
    if (want_fp) h = chunk_fold(h, fingerprint_finish(acc, piece.nbytes));
    at += piece.nbytes;
  }
  return {h, crc};
}

std::pair<uint64_t, uint32_t> Engine::host_fingerprint_crc(const SaveChunk& chunk) {
  return sum_pieces(chunk, true, [](const uint8_t* src, size_t, uint64_t stripe, size_t len, uint64_t* lanes) {
    return crc32c_fp(src, len, 0, stripe, lanes);  // one read: no copy
  });
}

std::vector<std::vector<uint64_t>> Engine::device_fingerprints(const std::vector<SaveChunk>& chunks,
                                                               const DeviceEvents& after) {
  std::vector<std::vector<uint64_t>> out(chunks.size());
  std::vector<int> devices;
  for (const SaveChunk& c : chunks)
    if (c.expect && c.on_device)
      for (const SavePiece& p : c.pieces)
        if (p.device >= 0 && std::find(devices.begin(), devices.end(), p.device) == devices.end())
          devices.push_back(p.device);
  for (int d : devices) {
    std::vector<std::pair<size_t, size_t>> where;  // (chunk, piece)
    std::vector<const void*> ptrs;
    std::vector<size_t> lens;
    for (size_t i = 0; i < chunks.size(); ++i) {
      if (!chunks[i].expect) continue;
      for (size_t k = 0; k < chunks[i].pieces.size(); ++k)
        if (chunks[i].pieces[k].device == d) {
          where.emplace_back(i, k);
          ptrs.push_back(reinterpret_cast<const void*>(chunks[i].pieces[k].addr));
          lens.push_back(chunks[i].pieces[k].nbytes);
        }
    }
    std::vector<uint64_t> lanes(4 * where.size(), 0);
    cuda::fingerprint_lanes(d, ptrs.data(), lens.data(), where.size(), lanes.data(), event_for(after, d));
    for (size_t q = 0; q < where.size(); ++q) {
      auto& v = out[where[q].first];
      if (v.empty()) v.assign(chunks[where[q].first].pieces.size(), 0);
      v[where[q].second] = fingerprint_finish(&lanes[4 * q], lens[q]);
    }
  }
  return out;
}

uint64_t Engine::source_fingerprint(const SaveChunk& chunk, const std::vector<uint64_t>* device_fps,
                                    const DeviceEvents& after) {
  std::vector<uint64_t> fps(chunk.pieces.size(), 0);
  if (device_fps && !device_fps->empty()) fps = *device_fps;
  // Device pieces of one device go to the GPU in one batch.
  std::vector<int> devices;
  if (!device_fps || device_fps->empty())
    for (const SavePiece& p : chunk.pieces)
      if (p.device >= 0 && std::find(devices.begin(), devices.end(), p.device) == devices.end())
        devices.push_back(p.device);
  for (int d : devices) {
    std::vector<size_t> idx;
    std::vector<const void*> ptrs;
    std::vector<size_t> lens;
    for (size_t k = 0; k < chunk.pieces.size(); ++k)
      if (chunk.pieces[k].device == d) {
        idx.push_back(k);
        ptrs.push_back(reinterpret_cast<const void*>(chunk.pieces[k].addr));
        lens.push_back(chunk.pieces[k].nbytes);
      }
    std::vector<uint64_t> lanes(4 * idx.size(), 0);
    cuda::fingerprint_lanes(d, ptrs.data(), lens.data(), idx.size(), lanes.data(), event_for(after, d));
    for (size_t q = 0; q < idx.size(); ++q) fps[idx[q]] = fingerprint_finish(&lanes[4 * q], lens[q]);
  }
  uint64_t h = kFpSeed;
  for (size_t k = 0; k < chunk.pieces.size(); ++k) {
    const SavePiece& p = chunk.pieces[k];
    if (p.device < 0) fps[k] = host_fingerprint(reinterpret_cast<const uint8_t*>(p.addr), p.nbytes);
    h = chunk_fold(h, fps[k]);
  }
  return h;
}

uint64_t Engine::slab_fingerprint(const SaveChunk& chunk, const uint8_t* slab) {
  uint64_t h = kFpSeed;
  for (const SavePiece& p : chunk.pieces) {
    h = chunk_fold(h, fingerprint(slab, p.nbytes));
    slab += p.nbytes;
  }
  return h;
}

uint32_t Engine::capture_host_summed(const SaveChunk& chunk, uint8_t* slab, uint64_t* fp) {
  const auto copy = [slab](const uint8_t* src, size_t at, uint64_t stripe, size_t len, uint64_t* lanes) {
    // One pass over memory: copy, CRC32C (and fingerprint) from the same registers (copy_kernel.h).
    return lanes ? copy_crc32c_fp(slab + at, src, len, 0, stripe, lanes) : copy_crc32c(slab + at, src, len, 0);
  };
  const auto [h, crc] = sum_pieces(chunk, fp != nullptr, copy);
  if (fp) *fp = h;
  return crc;
}

void Engine::capture_mapped(SaveJob& job, size_t i) {
  const SaveChunk& c = job.chunks()[i];
  const SaveOptions& o = job.options();
  const bool want_fp = o.fingerprint && !o.constant_fp && !c.no_fp && !job.fingerprint_known(i);
  ChunkResult r;
  r.raw_len = r.stored_len = c.raw_len;
  r.codec = kCodecNone;
  r.file_offset = job.reserve(c.file_idx, c.raw_len);
  uint8_t* dst = job.mapped(c.file_idx) + r.file_offset;
  uint64_t fp = 0;
  r.raw_crc32c = r.crc32c = capture_host_summed(c, dst, want_fp ? &fp : nullptr);
  if (want_fp) job.set_fingerprint(i, fp);
  if (o.fingerprint && o.constant_fp && !c.no_fp) job.set_fingerprint(i, 0);
  // A recycled file holds an older snapshot's bytes: the padding up to the
  // next chunk is zeroed, as in a written file.
  const size_t padded = (c.raw_len + 4095) / 4096 * 4096;
  std::memset(dst + c.raw_len, 0, padded - c.raw_len);
  job.note_end(c.file_idx, r.file_offset + c.raw_len);
  if (o.write_delay_us > 0) std::this_thread::sleep_for(std::chrono::microseconds(o.write_delay_us));
  job.set_result(i, r);
}

void Engine::host_copy(uint8_t* dst, const uint8_t* src, size_t n) {
  split_parts(n, [=](size_t, size_t begin, size_t len) { std::memcpy(dst + begin, src + begin, len); });
}

void Engine::write_stored(const File& file, const Encoded& e, uint8_t* slab, uint64_t offset) {
  // The slab is 4 KiB-aligned and the file region reserved for the chunk is
  // rounded up to 4 KiB, so an uncompressed chunk can go out with O_DIRECT
  // once its tail is padded with zeros (the padding lies in its own region).
  const size_t padded = (e.size + 4095) / 4096 * 4096;
  if (e.data == slab && padded <= pool_.block_bytes(e.size)) {
    std::memset(slab + e.size, 0, padded - e.size);
    if (file.pwrite_direct(slab, padded, offset)) return;
    // Padding included: a reused (memory-tier) file holds older bytes there.
    file.pwrite_all(slab, padded, offset);
    return;
  }
  file.pwrite_all(e.data, e.size, offset);
}

void Engine::write_chunk(SaveJob& job, size_t i, uint8_t* slab) {
  try {
    if (!job.stopped()) {
      const SaveChunk& c = job.chunks()[i];
      const SaveOptions& o = job.options();
      ChunkResult r;
      r.raw_len = c.raw_len;
      r.raw_crc32c = job.raw_crc_known(i) ? job.raw_crc(i) : crc32c(slab, c.raw_len);
      if (o.fingerprint && !c.no_fp && !job.fingerprint_known(i))
        job.set_fingerprint(i, o.constant_fp ? 0 : slab_fingerprint(c, slab));
      const Encoded e = encode_chunk(slab, c.raw_len, c.elem_size, o.codec, o.level, thread_scratch());
      r.codec = e.codec;
      r.stored_len = e.size;
      r.crc32c = e.codec == kCodecNone ? r.raw_crc32c : crc32c(e.data, e.size);
      r.file_offset = job.reserve(c.file_idx, e.size);
      write_stored(job.file(c.file_idx), e, slab, r.file_offset);
      job.note_end(c.file_idx, r.file_offset + e.size);
      if (o.write_delay_us > 0) std::this_thread::sleep_for(std::chrono::microseconds(o.write_delay_us));
      job.set_result(i, r);
    }
  } catch (const std::exception& e) {
    job.fail(e.what());
  }
  pool_.release(slab);
  job.end_task();
}

std::vector<ReadError> Engine::read(const std::vector<std::string>& paths,
                                    const std::vector<ReadChunk>& chunks, bool verify,
                                    const std::vector<int>& fds, bool direct) {
  PYCKPT_CHECK_ARG(fds.empty() || fds.size() == paths.size(),
                   "fds must be empty or one per file (" << fds.size() << " fds, " << paths.size()
                                                         << " files)");
  std::vector<File> files(paths.size());
  std::vector<MemoryFileView> views(paths.size());
  std::vector<std::string> open_errors(paths.size());
  for (size_t i = 0; i < paths.size(); ++i) {
    try {
      files[i] = fds.empty() ? File::open_read(paths[i]) : File::borrow_read(fds[i], paths[i]);
      views[i] = MemoryFileView::of(files[i]);
    } catch (const Error& e) {
      open_errors[i] = e.what();
    }
  }
  std::mutex mu;
  std::vector<ReadError> errors;
  WaitGroup wg;
  wg.add(chunks.size());
  for (size_t i = 0; i < chunks.size(); ++i) {
    io_.submit([&, i] {
      std::string msg;
      const ReadChunk& c = chunks[i];
      try {
        if (c.file_idx >= files.size())
          msg = "file index " + std::to_string(c.file_idx) + " out of range";
        else if (!files[c.file_idx].is_open())
          msg = open_errors[c.file_idx];
        else
          read_chunk(files[c.file_idx], views[c.file_idx], c, verify, direct);
      } catch (const std::exception& e) {
        msg = e.what();
      } catch (...) {  // nothing may escape a worker task
        msg = "unknown error";
      }
      if (!msg.empty()) {
        std::lock_guard<std::mutex> lock(mu);
        errors.emplace_back(i, std::move(msg));
      }
      wg.done();
    });
  }
  wg.wait();
  std::sort(errors.begin(), errors.end());
  return errors;
}

namespace {
void release_if_large(std::vector<uint8_t>& v) {
  if (v.capacity() > kKeepReadBuffer) std::vector<uint8_t>().swap(v);
}

// A chunk of a file in memory (the memory tier) going to fresh host memory,
// which the caller drops if the read fails: each piece is copied and
// checksummed in one pass (copy_crc32c) and the bytes between pieces only
// checksummed, so the chunk is passed over once, not checksummed and then
// copied. False (nothing done) unless every piece goes to the host and the
// pieces lie in order without overlapping (the CRC runs through the chunk
// front to back); true with the chunk's CRC in *crc otherwise.
bool copy_and_checksum(const uint8_t* src, const ReadChunk& c, uint32_t* crc) {
  uint64_t pos = 0;
  for (const ReadPiece& p : c.pieces) {
    if (p.device >= 0 || p.offset_in_raw < pos) return false;
    pos = p.offset_in_raw + p.nbytes;
  }
  uint32_t run = 0;
  pos = 0;
  for (const ReadPiece& p : c.pieces) {
    run = crc32c(src + pos, p.offset_in_raw - pos, run);
    run = copy_crc32c(reinterpret_cast<void*>(p.dst), src + p.offset_in_raw, p.nbytes, run, false);
    pos = p.offset_in_raw + p.nbytes;
  }
  *crc = crc32c(src + pos, c.raw_len - pos, run);
  return true;
}
}  // namespace

void Engine::read_chunk(const File& file, const MemoryFileView& view, const ReadChunk& c, bool verify,
                        bool direct_ok) {
  const std::string where = file.path() + " chunk at offset " + std::to_string(c.file_offset);
  for (const ReadPiece& p : c.pieces)
    if (p.offset_in_raw > c.raw_len || p.nbytes > c.raw_len - p.offset_in_raw)
      throw Error(ErrorKind::Value, "in " + where + ": piece [" + std::to_string(p.offset_in_raw) +
                                        ", +" + std::to_string(p.nbytes) + ") lies outside the " +
                                        std::to_string(c.raw_len) + "-byte chunk");
  if (c.codec != kCodecNone && c.codec != kCodecZstd)
    throw Error(ErrorKind::Value, "in " + where + ": unknown codec id " + std::to_string(c.codec));
  if (c.codec == kCodecNone && c.stored_len != c.raw_len)
    throw Error(ErrorKind::Value, "in " + where + ": codec none but stored length " +
                                      std::to_string(c.stored_len) + " != raw length " +
                                      std::to_string(c.raw_len));
  // Nothing is sized from a claimed length before it is checked against the
  // limits and the file's real size.
  if (c.raw_len > kMaxChunkBytes)
    throw Error(ErrorKind::Value, "in " + where + ": raw length " + std::to_string(c.raw_len) +
                                      " exceeds the " + std::to_string(kMaxChunkBytes) +
                                      "-byte chunk limit");
  if (c.codec == kCodecZstd && c.raw_len / kMaxZstdRatio > c.stored_len)
    throw Error(ErrorKind::Value, "in " + where + ": raw length " + std::to_string(c.raw_len) +
                                      " is more than zstd can decode from " +
                                      std::to_string(c.stored_len) + " stored bytes");
  const uint64_t size = file.size_at_open();
  if (c.stored_len > size || c.file_offset > size - c.stored_len)
    throw Error(ErrorKind::Value, "truncated: expected " + std::to_string(c.stored_len) +
                                      " bytes at offset " + std::to_string(c.file_offset) + " of " +
                                      file.path() + ", file has " + std::to_string(size));
  // Fast path, only where the caller allows it (memory it discards when the
  // read fails): one host destination covering the whole uncompressed chunk
  // is read into directly and verified in place. Otherwise the bytes go
  // through the bounce buffer and reach destinations only once verified.
  // A chunk of a file in memory (the memory tier) is read where it lies:
  // copied to fresh host memory with its checksum in the same pass
  // (copy_and_checksum), else checksummed there first and copied once.
  const uint8_t* in_memory = view.at(c.file_offset, c.stored_len);
  const bool direct = in_memory == nullptr && direct_ok && c.codec == kCodecNone && c.pieces.size() == 1 &&
                      c.pieces[0].device < 0 && c.pieces[0].offset_in_raw == 0 &&
                      c.pieces[0].nbytes == c.raw_len;
  const bool to_device =
      std::any_of(c.pieces.begin(), c.pieces.end(), [](const ReadPiece& p) { return p.device >= 0; });
  ReadBuffers& buf = read_buffers();
  uint8_t* stored = nullptr;
  if (direct) {
    stored = reinterpret_cast<uint8_t*>(c.pieces[0].dst);
  } else if (in_memory == nullptr && to_device && c.codec == kCodecNone) {
    stored = buf.pinned.get(c.stored_len);  // these bytes go to the device as they are
  } else if (in_memory == nullptr) {
    buf.stored.resize(c.stored_len);
    stored = buf.stored.data();
  }
  struct Release {  // give back an oversized buffer on every exit path
    ReadBuffers& b;
    ~Release() {
      release_if_large(b.stored);
      release_if_large(b.raw);
      release_if_large(thread_scratch().planes);
      b.pinned.release_if_large();
    }
  } release{buf};
  if (in_memory == nullptr) {
    const size_t got = file.pread_all(stored, c.stored_len, c.file_offset);
    if (got < c.stored_len)
      throw Error(ErrorKind::Value, "truncated: expected " + std::to_string(c.stored_len) +
                                        " bytes at offset " + std::to_string(c.file_offset) + " of " +
                                        file.path() + ", file has " + std::to_string(file.size()));
  }
  const uint8_t* src = in_memory != nullptr ? in_memory : stored;
  // The message carries the expected value only: the checksum of the bytes
  // read would disclose them (a 1-byte chunk's CRC names its byte).
  uint32_t fused = 0;
  const bool copied = in_memory != nullptr && direct_ok && verify && c.codec == kCodecNone &&
                      copy_and_checksum(src, c, &fused);
  if (verify && (copied ? fused : crc32c(src, c.stored_len)) != c.crc32c)
    throw Error(ErrorKind::Value, "checksum mismatch in " + where + " (expected crc32c " +
                                      hex32(c.crc32c) + ")");
  if (copied || direct) return;
  const uint8_t* raw = src;
  bool raw_pinned = to_device && in_memory == nullptr;  // read into the pinned buffer above
  if (c.codec != kCodecNone) {
    uint8_t* out = nullptr;
    if (to_device) {
      out = buf.pinned.get(c.raw_len);
    } else {
      buf.raw.resize(c.raw_len);
      out = buf.raw.data();
    }
    try {
      decode_chunk(src, c.stored_len, c.codec, out, c.raw_len, thread_scratch());
    } catch (const Error& e) {
      throw Error(e.kind(), "in " + where + ": " + e.what());
    }
    raw = out;
    raw_pinned = to_device;
  }
  for (const ReadPiece& p : c.pieces) {
    if (p.device < 0) {
      std::memcpy(reinterpret_cast<void*>(p.dst), raw + p.offset_in_raw, p.nbytes);
    } else if (raw_pinned) {
      cuda::copy_h2d(p.device, reinterpret_cast<void*>(p.dst), raw + p.offset_in_raw, p.nbytes);
    } else {
      // A chunk checksummed where it lies (memory tier): through pinned memory too.
      uint8_t* pinned = buf.pinned.get(p.nbytes);
      std::memcpy(pinned, raw + p.offset_in_raw, p.nbytes);
      cuda::copy_h2d(p.device, reinterpret_cast<void*>(p.dst), pinned, p.nbytes);
    }
  }
}

}  // namespace pyckpt
