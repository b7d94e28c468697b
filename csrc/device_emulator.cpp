// An emulated GPU for tests on machines without one (see pyckpt/cuda_backends.h).
//
// "Device memory" is host memory; each device has one in-order stream, a
// single worker thread, on which device-to-host copies, event records and
// fingerprint passes run in the order they were enqueued, as on the CUDA
// engine stream. A copy can be made slow (copy_delay_us) so that copies are
// still queued when the engine enqueues the next ones, and one copy can be
// made to fail: like a CUDA context error, the failure is sticky, reported
// by every later event and refused by every later call, until reconfigured.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <future>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>

#include "pyckpt/cuda_backends.h"
#include "pyckpt/errors.h"
#include "pyckpt/fingerprint.h"
#include "pyckpt/thread_pool.h"

namespace pyckpt::cuda::emulated {

namespace {

struct EventState {
  std::mutex mu;
  std::condition_variable cv;
  bool done = false;
  std::string error;

  void finish(const std::string& err) {
    {
      std::lock_guard<std::mutex> lock(mu);
      done = true;
      error = err;
    }
    cv.notify_all();
  }
  std::string wait() {
    std::unique_lock<std::mutex> lock(mu);
    cv.wait(lock, [this] { return done; });
    return error;
  }
};
using EventRef = std::shared_ptr<EventState>;

struct State {
  std::mutex mu;
  Settings settings;
  Stats stats;
  uint64_t in_flight = 0;
  std::string sticky;  // the first copy failure since configure()
  std::map<int, std::unique_ptr<ThreadPool>> streams;
  std::map<void*, size_t> allocations;  // host_alloc'd memory: base -> size
  std::map<void*, size_t> registered;   // host_register'ed ranges: base -> size
  std::set<Event> events;
  std::map<uintptr_t, std::vector<EventRef>> held;  // held caller streams: their pending events
};

// Never destroyed: an engine may free slabs during static destruction.
State& state() {
  static State* s = new State();
  return *s;
}

std::atomic<bool> g_enabled{false};
std::atomic<bool> g_ever_enabled{false};

// Callers hold state().mu.
ThreadPool& stream_for(State& st, int device) {
  PYCKPT_CHECK_ARG(device >= 0, "emulated device index must be >= 0, got " << device);
  auto& s = st.streams[device];
  if (!s) s = std::make_unique<ThreadPool>(1, 0, "pyckpt-emu");
  return *s;
}

void throw_if_sticky(const State& st, const char* what) {
  if (!st.sticky.empty())
    throw Error(ErrorKind::Runtime, std::string("CUDA error in ") + what + ": " + st.sticky);
}

Event new_handle(State& st, EventRef ref) {
  Event e = new EventRef(std::move(ref));
  st.events.insert(e);
  ++st.stats.live_events;
  return e;
}

EventRef ref_of(Event e) { return *static_cast<EventRef*>(e); }

void drain(State& st, std::unique_lock<std::mutex>& lock) {
  std::vector<ThreadPool*> pools;
  for (auto& [d, p] : st.streams) pools.push_back(p.get());
  std::vector<std::future<void>> done;
  for (ThreadPool* p : pools) {
    auto pr = std::make_shared<std::promise<void>>();
    done.push_back(pr->get_future());
    p->submit([pr] { pr->set_value(); });
  }
  lock.unlock();  // queued copies take the lock when they finish
  for (auto& f : done) f.wait();
  lock.lock();
}

}  // namespace

void configure(const Settings& s) {
  State& st = state();
  std::unique_lock<std::mutex> lock(st.mu);
  for (auto& [stream, evs] : st.held)
    for (auto& ev : evs) ev->finish("");  // nothing may wait on a stream no test will release
  st.held.clear();
  drain(st, lock);
  if (!s.enabled) st.streams.clear();  // joins the idle workers
  st.settings = s;
  const uint64_t live = st.stats.live_events;
  st.stats = Stats{};
  st.stats.live_events = live;
  st.stats.registered = st.registered.size();
  st.in_flight = 0;
  st.sticky.clear();
  if (s.enabled) g_ever_enabled = true;
  g_enabled = s.enabled;
}

bool enabled() noexcept { return g_enabled.load(std::memory_order_relaxed); }

bool ever_enabled() noexcept { return g_ever_enabled.load(std::memory_order_relaxed); }

Stats stats() {
  State& st = state();
  std::lock_guard<std::mutex> lock(st.mu);
  return st.stats;
}

bool owns(void* p) noexcept {
  if (!ever_enabled()) return false;
  State& st = state();
  std::lock_guard<std::mutex> lock(st.mu);
  return st.allocations.count(p) != 0;
}

bool owns_registered(void* p) noexcept {
  if (!ever_enabled()) return false;
  State& st = state();
  std::lock_guard<std::mutex> lock(st.mu);
  return st.registered.count(p) != 0;
}

bool owns_event(Event e) noexcept {
  if (!ever_enabled()) return false;
  State& st = state();
  std::lock_guard<std::mutex> lock(st.mu);
  return st.events.count(e) != 0;
}

bool compiled() { return true; }

bool available() { return enabled(); }

void* host_alloc(size_t nbytes) {
  const size_t n = std::max<size_t>(4096, (nbytes + 4095) / 4096 * 4096);
  void* p = std::aligned_alloc(4096, n);
  if (!p) throw Error(ErrorKind::Runtime, "CUDA error in cudaHostAlloc: out of memory (emulated)");
  State& st = state();
  std::lock_guard<std::mutex> lock(st.mu);
  st.allocations.emplace(p, n);
  return p;
}

bool host_register(void* p, size_t nbytes) noexcept {
  State& st = state();
  std::lock_guard<std::mutex> lock(st.mu);
  if (st.settings.refuse_register || !p || nbytes == 0) return false;
  st.registered.emplace(p, nbytes);
  st.stats.registered = st.registered.size();
  return true;
}

void host_unregister(void* p) noexcept {
  State& st = state();
  std::lock_guard<std::mutex> lock(st.mu);
  st.registered.erase(p);
  st.stats.registered = st.registered.size();
}

void host_free(void* p) noexcept {
  if (!p) return;
  State& st = state();
  {
    std::lock_guard<std::mutex> lock(st.mu);
    if (st.allocations.erase(p) == 0) return;
  }
  std::free(p);
}

Event record_on(int device, uintptr_t stream) {
  // The caller's work is done by the host thread before this call, unless
  // the test holds the stream (work "still queued" there).
  State& st = state();
  std::lock_guard<std::mutex> lock(st.mu);
  stream_for(st, device);
  throw_if_sticky(st, "cudaEventRecord on the caller's stream");
  auto ev = std::make_shared<EventState>();
  auto held = st.held.find(stream);
  if (held != st.held.end())
    held->second.push_back(ev);
  else
    ev->finish("");
  return new_handle(st, std::move(ev));
}

void hold_stream(uintptr_t stream, bool hold) {
  PYCKPT_CHECK_ARG(stream != 0, "the legacy default stream (0) cannot be held");
  std::vector<EventRef> release;
  {
    State& st = state();
    std::lock_guard<std::mutex> lock(st.mu);
    auto it = st.held.find(stream);
    if (hold) {
      if (it == st.held.end()) st.held.emplace(stream, std::vector<EventRef>{});
      return;
    }
    if (it == st.held.end()) return;
    release = std::move(it->second);
    st.held.erase(it);
  }
  for (auto& ev : release) ev->finish("");
}

void copy_d2h_async(int device, void* dst, const void* src, size_t nbytes, Event after) {
  State& st = state();
  std::lock_guard<std::mutex> lock(st.mu);
  throw_if_sticky(st, "cudaMemcpyAsync D2H");
  const uint64_t index = st.stats.copies++;
  st.stats.max_in_flight = std::max(st.stats.max_in_flight, ++st.in_flight);
  const bool fail = static_cast<int64_t>(index) == st.settings.fail_copy_at;
  const auto delay = std::chrono::microseconds(st.settings.copy_delay_us);
  EventRef wait_for = after ? ref_of(after) : nullptr;
  stream_for(st, device).submit([&st, dst, src, nbytes, fail, delay, index, wait_for] {
    if (wait_for) wait_for->wait();
    const auto start = std::chrono::steady_clock::now();
    bool failed_before;
    {
      std::lock_guard<std::mutex> l(st.mu);
      failed_before = !st.sticky.empty();
      if (fail && !failed_before)
        st.sticky = "cudaErrorIllegalAddress: an illegal memory access was encountered (emulated, copy " +
                    std::to_string(index) + ")";
    }
    // The bytes land at the end, so a source changed while the copy "runs" is seen changed.
    std::this_thread::sleep_until(start + delay);
    if (!fail && !failed_before) std::memcpy(dst, src, nbytes);
    std::lock_guard<std::mutex> l(st.mu);
    --st.in_flight;
  });
}

Event record_engine(int device) {
  State& st = state();
  std::lock_guard<std::mutex> lock(st.mu);
  throw_if_sticky(st, "cudaEventRecord");
  auto ev = std::make_shared<EventState>();
  stream_for(st, device).submit([&st, ev] {
    std::string err;
    {
      std::lock_guard<std::mutex> l(st.mu);
      err = st.sticky;
    }
    ev->finish(err);
  });
  return new_handle(st, std::move(ev));
}

void synchronize(Event event) {
  const std::string err = ref_of(event)->wait();
  if (!err.empty()) throw Error(ErrorKind::Runtime, "CUDA error in cudaEventSynchronize: " + err);
}

void destroy(Event event) noexcept {
  if (!event) return;
  State& st = state();
  {
    std::lock_guard<std::mutex> lock(st.mu);
    if (st.events.erase(event) == 0) return;
    --st.stats.live_events;
  }
  delete static_cast<EventRef*>(event);
}

void copy_h2d(int device, void* dst, const void* src, size_t nbytes) {
  State& st = state();
  {
    std::lock_guard<std::mutex> lock(st.mu);
    stream_for(st, device);
    throw_if_sticky(st, "cudaMemcpy H2D");
    ++st.stats.h2d_copies;
    // From page-locked memory the real copy is one DMA; from pageable memory the driver stages it.
    const auto* from = static_cast<const uint8_t*>(src);
    const auto within = [from, nbytes](const std::map<void*, size_t>& ranges) {
      auto it = ranges.upper_bound(const_cast<uint8_t*>(from));
      return it != ranges.begin() && (--it, from + nbytes <= static_cast<const uint8_t*>(it->first) + it->second);
    };
    if (!within(st.allocations) && !within(st.registered)) ++st.stats.h2d_pageable;
  }
  std::memcpy(dst, src, nbytes);
}

void fingerprint_lanes(int device, const void* const* ptrs, const size_t* nbytes, size_t n,
                       uint64_t* lanes_out, Event after) {
  auto done = std::make_shared<std::promise<void>>();
  auto fut = done->get_future();
  EventRef wait_for = after ? ref_of(after) : nullptr;
  {
    State& st = state();
    std::lock_guard<std::mutex> lock(st.mu);
    throw_if_sticky(st, "fingerprint kernel launch");
    // In stream order, as the kernel runs after copies already queued.
    stream_for(st, device).submit([=] {
      if (wait_for) wait_for->wait();
      for (size_t i = 0; i < n; ++i) {
        uint64_t* acc = lanes_out + 4 * i;
        acc[0] = acc[1] = acc[2] = acc[3] = 0;
        ::pyckpt::fingerprint_lanes(static_cast<const uint8_t*>(ptrs[i]), nbytes[i], 0, acc);
      }
      done->set_value();
    });
  }
  fut.wait();
}

}  // namespace pyckpt::cuda::emulated
