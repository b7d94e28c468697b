// The two implementations behind pyckpt/cuda_api.h (not a public header).
//
// `runtime` is the CUDA runtime (csrc/cuda/*.cu) or, in a build without
// CUDA, the stub that reports "not compiled in" (csrc/cuda_stub.cpp).
// `emulated` is a device made of host memory with an in-order copy stream
// run by a thread (csrc/device_emulator.cpp): tests switch it on to drive the
// engine's device paths (pipelined capture, failures mid-stream, reads into a
// device) on machines without a GPU. csrc/cuda_dispatch.cpp routes each
// pyckpt::cuda call to one of them.
#pragma once

#include <cstddef>
#include <cstdint>

#include "pyckpt/cuda_api.h"

// The same signatures as pyckpt/cuda_api.h, declared once per backend.
#define PYCKPT_CUDA_BACKEND_DECLS                                                                 \
  bool compiled();                                                                                \
  bool available();                                                                               \
  void* host_alloc(size_t nbytes);                                                                \
  void host_free(void* p) noexcept;                                                               \
  bool host_register(void* p, size_t nbytes) noexcept;                                            \
  void host_unregister(void* p) noexcept;                                                         \
  Event record_on(int device, uintptr_t stream);                                                  \
  void copy_d2h_async(int device, void* dst, const void* src, size_t nbytes, Event after);        \
  Event record_engine(int device);                                                                \
  void synchronize(Event event);                                                                  \
  void destroy(Event event) noexcept;                                                             \
  void copy_h2d(int device, void* dst, const void* src, size_t nbytes);                           \
  void fingerprint_lanes(int device, const void* const* ptrs, const size_t* nbytes, size_t n,     \
                         uint64_t* lanes_out, Event after);

namespace pyckpt::cuda::runtime {
PYCKPT_CUDA_BACKEND_DECLS
}  // namespace pyckpt::cuda::runtime

namespace pyckpt::cuda::emulated {
PYCKPT_CUDA_BACKEND_DECLS

struct Settings {
  bool enabled = false;
  int64_t copy_delay_us = 0;  // each device-to-host copy takes at least this long
  int64_t fail_copy_at = -1;  // the copy with this index (from 0, counted since enabling) fails
  bool refuse_register = false;  // host_register refuses, as a driver may
};

struct Stats {
  uint64_t copies = 0;          // device-to-host copies enqueued since enabling
  uint64_t max_in_flight = 0;   // most copies enqueued and not yet finished at one time
  uint64_t h2d_copies = 0;      // host-to-device copies since enabling
  uint64_t h2d_pageable = 0;    // of which from memory host_alloc did not return
  uint64_t live_events = 0;     // events created and not destroyed
  uint64_t registered = 0;      // host_register'ed ranges not unregistered (kept across configure)
};

/// Switches the emulated device on or off and resets its statistics. Waits
/// for copies already queued. Memory it allocated stays valid (host_free
/// finds it whichever backend is active).
void configure(const Settings& s);
bool enabled() noexcept;
/// enabled() at some time in this process (until then the checks below cost nothing).
bool ever_enabled() noexcept;
Stats stats();
/// True for memory this backend's host_alloc returned and host_free has not freed.
bool owns(void* p) noexcept;
/// True for a range this backend's host_register accepted and host_unregister has not undone.
bool owns_registered(void* p) noexcept;
/// While held, events recorded on the caller stream `stream` stay pending, as
/// if kernels queued there before them were still running; releasing
/// completes them. Stream 0 is never held.
void hold_stream(uintptr_t stream, bool hold);
/// True for an event this backend created and destroy() has not destroyed.
bool owns_event(Event e) noexcept;
}  // namespace pyckpt::cuda::emulated

#undef PYCKPT_CUDA_BACKEND_DECLS
