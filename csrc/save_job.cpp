#include "pyckpt/save_job.h"

#include <chrono>

#include "pyckpt/codec.h"
#include "pyckpt/errors.h"

namespace pyckpt {

namespace {
constexpr uint64_t kAlign = 4096;

template <typename Pred>
bool wait_for(std::unique_lock<std::mutex>& lock, std::condition_variable& cv, double timeout_s,
              Pred pred) {
  if (timeout_s < 0) {
    cv.wait(lock, pred);
    return true;
  }
  return cv.wait_for(lock, std::chrono::duration<double>(timeout_s), pred);
}
}  // namespace

SaveJob::SaveJob(std::vector<std::string> files, std::vector<SaveChunk> chunks,
                 SaveOptions options)
    : paths_(std::move(files)),
      chunks_(std::move(chunks)),
      options_(options),
      next_offset_(new std::atomic<uint64_t>[paths_.size()]),
      data_end_(new std::atomic<uint64_t>[paths_.size()]),
      captured_(new std::atomic<bool>[chunks_.size()]),
      results_(chunks_.size()),
      fps_(chunks_.size(), 0),
      fp_known_(chunks_.size(), 0),
      raw_crc_(chunks_.size(), 0),
      raw_crc_known_(chunks_.size(), 0),
      status_(chunks_.size(), kChunkWritten) {
  for (size_t i = 0; i < paths_.size(); ++i) next_offset_[i] = data_end_[i] = 0;
  for (size_t i = 0; i < chunks_.size(); ++i) captured_[i] = false;
}

bool SaveJob::chunk_captured(size_t i) const {
  PYCKPT_CHECK_ARG(i < chunks_.size(), "chunk index " << i << " out of range (job has "
                                                      << chunks_.size() << " chunks)");
  return captured_[i].load();
}

bool SaveJob::wait_captured(double timeout_s) {
  std::unique_lock<std::mutex> lock(mu_);
  return wait_for(lock, cv_, timeout_s, [this] {
    return done_ || capture_finished_ || captured_count_.load() == chunks_.size();
  });
}

bool SaveJob::wait(double timeout_s) {
  std::unique_lock<std::mutex> lock(mu_);
  return wait_for(lock, cv_, timeout_s, [this] { return done_; });
}

bool SaveJob::done() const {
  std::lock_guard<std::mutex> lock(mu_);
  return done_;
}

std::optional<std::string> SaveJob::error() const {
  std::lock_guard<std::mutex> lock(mu_);
  return error_;
}

std::vector<ChunkResult> SaveJob::results() const {
  std::lock_guard<std::mutex> lock(mu_);
  if (error_) throw Error(ErrorKind::Runtime, "save failed: " + *error_);
  if (!done_) throw Error(ErrorKind::Runtime, "save is still running: call wait() first");
  return results_;
}

std::vector<std::pair<uint64_t, int>> SaveJob::incremental() const {
  results();  // same preconditions
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<std::pair<uint64_t, int>> out;
  out.reserve(chunks_.size());
  for (size_t i = 0; i < chunks_.size(); ++i) out.emplace_back(fps_[i], status_[i]);
  return out;
}

void SaveJob::cancel() { fail("cancelled"); }

void SaveJob::fail(const std::string& message) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!error_) error_ = message;
    stop_ = true;
  }
  cv_.notify_all();
}

void SaveJob::open_files() {
  files_.reserve(paths_.size());
  for (const auto& p : paths_)
    files_.push_back(File::create(p, /*direct=*/!options_.map_files, /*keep=*/options_.map_files));
  if (options_.map_files || options_.codec != kCodecNone) return;
  // Uncompressed, the room the chunks to be written take is known now: allocated
  // before the parallel writes, they land inside the file (File::preallocate).
  // A chunk expected unchanged is left out (usually referenced, not written);
  // finalize() cuts the file to its data's end either way.
  std::vector<uint64_t> lens(paths_.size(), 0);
  for (const SaveChunk& c : chunks_)
    if (!c.expect) lens[c.file_idx] += (c.raw_len + kAlign - 1) / kAlign * kAlign;
  for (size_t i = 0; i < files_.size(); ++i) files_[i].preallocate(lens[i]);
}

void SaveJob::map_files(MappingCache& cache) {
  if (!options_.map_files || options_.codec != kCodecNone) return;
  std::vector<size_t> lens(paths_.size(), 0);
  // Device chunks (written) take their share of the file too.
  for (const SaveChunk& c : chunks_) lens[c.file_idx] += (c.raw_len + kAlign - 1) / kAlign * kAlign;
  maps_.assign(paths_.size(), nullptr);
  for (size_t i = 0; i < paths_.size(); ++i) maps_[i] = cache.acquire(files_[i], lens[i]);
}

void SaveJob::note_end(size_t file_idx, uint64_t end) {
  uint64_t cur = data_end_[file_idx].load();
  while (cur < end && !data_end_[file_idx].compare_exchange_weak(cur, end)) {
  }
}

uint64_t SaveJob::reserve(size_t file_idx, uint64_t n) {
  return next_offset_[file_idx].fetch_add((n + kAlign - 1) / kAlign * kAlign);
}

void SaveJob::mark_captured(size_t i) {
  captured_[i] = true;
  {
    std::lock_guard<std::mutex> lock(mu_);  // pairs with the waiters' predicate check
    captured_count_.fetch_add(1);
  }
  cv_.notify_all();
}

void SaveJob::mark_capture_finished() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    capture_finished_ = true;
  }
  cv_.notify_all();
}

void SaveJob::end_task() {
  if (pending_.fetch_sub(1) == 1) finalize();
}

void SaveJob::finalize() {
  // Data is durable before the job reports success: the commit protocol
  // relies on it when it writes the manifest next.
  try {
    // Stores into a shared mapping are in the file's pages (the page cache):
    // the fsync below covers them like written pages. The mapping itself is
    // kept by the MappingCache for the next save into this file.
    maps_.clear();
    if (!stopped())
      for (size_t i = 0; i < files_.size(); ++i) {
        files_[i].truncate(data_end_[i].load());
        files_[i].fsync();
      }
    for (auto& f : files_) f.close();
  } catch (const std::exception& e) {
    fail(e.what());
  }
  files_.clear();
  {
    std::lock_guard<std::mutex> lock(mu_);
    done_ = true;
  }
  cv_.notify_all();
}

}  // namespace pyckpt
