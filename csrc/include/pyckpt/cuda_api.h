// The engine's only window onto CUDA. Implemented in csrc/cuda/cuda_api.cu
// (compiled by nvcc, linked against the static CUDA runtime) when the build
// has CUDA, and by cuda_stub.cpp otherwise. Nothing else includes CUDA headers.
//
// All functions taking a device call cudaSetDevice first, because engine
// threads do not inherit the caller's current device. Failures throw
// pyckpt::Error(Runtime) with the CUDA error string.
#pragma once

#include <cstddef>
#include <cstdint>

namespace pyckpt::cuda {

/// True when the CUDA sources were compiled in.
bool compiled();

/// compiled() and at least one device is visible now. Never throws: a
/// missing driver simply means false.
bool available();

/// Page-locked host memory (portable across devices/contexts).
void* host_alloc(size_t nbytes);
void host_free(void* p) noexcept;

/// Page-lock `nbytes` at `p`, memory the caller mapped, for device copies as
/// host_alloc's (portable). False when the driver refuses (or there is no
/// CUDA): the caller then unmaps it and uses host_alloc. Undone by
/// host_unregister, before the caller unmaps it.
bool host_register(void* p, size_t nbytes) noexcept;
void host_unregister(void* p) noexcept;

/// Opaque cudaEvent_t.
using Event = void*;

/// Create an event and record it on `stream` (a cudaStream_t as an integer,
/// 0 = legacy default stream) of `device`.
Event record_on(int device, uintptr_t stream);

/// Enqueue a device-to-host copy on the engine's own stream for `device`,
/// ordered after `after` (an event recorded on the caller's stream).
void copy_d2h_async(int device, void* dst, const void* src, size_t nbytes, Event after);

/// Record an event on the engine's stream for `device` (marks queued copies).
Event record_engine(int device);

/// Block the calling thread until `event` has completed.
void synchronize(Event event);

void destroy(Event event) noexcept;

/// Host-to-device copy on the engine's stream for `device`; returns once it
/// is done. Reads pass page-locked memory (host_alloc), so it is one DMA.
/// The destination must not be in use by work still queued elsewhere.
void copy_h2d(int device, void* dst, const void* src, size_t nbytes);

/// Fingerprint lanes (pyckpt/fingerprint.h) of n device buffers of `device`,
/// computed by a kernel on the engine's stream after `after` (an event on the
/// caller's stream, or null); blocks until done. lanes_out gets 4 sums per
/// buffer. Only the 32 bytes of sums per buffer cross to the host. Implemented
/// in csrc/cuda/fingerprint.cu.
void fingerprint_lanes(int device, const void* const* ptrs, const size_t* nbytes, size_t n,
                       uint64_t* lanes_out, Event after);

}  // namespace pyckpt::cuda
