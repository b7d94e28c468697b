// pyckpt/cuda_api.h: each call goes to the CUDA runtime backend, or to the
// emulated device while a test has switched it on (pyckpt/cuda_backends.h).
// Memory and events are released by the backend that made them, so switching
// between saves never hands one backend's pointer to the other.
#include "pyckpt/cuda_api.h"
#include "pyckpt/cuda_backends.h"

namespace pyckpt::cuda {

namespace emu = emulated;

bool compiled() { return runtime::compiled(); }

bool available() { return emu::enabled() || runtime::available(); }

void* host_alloc(size_t nbytes) { return emu::enabled() ? emu::host_alloc(nbytes) : runtime::host_alloc(nbytes); }

void host_free(void* p) noexcept {
  if (emu::owns(p))
    emu::host_free(p);
  else
    runtime::host_free(p);
}

bool host_register(void* p, size_t nbytes) noexcept {
  return emu::enabled() ? emu::host_register(p, nbytes) : runtime::host_register(p, nbytes);
}

void host_unregister(void* p) noexcept {
  if (emu::owns_registered(p))
    emu::host_unregister(p);
  else
    runtime::host_unregister(p);
}

Event record_on(int device, uintptr_t stream) {
  return emu::enabled() ? emu::record_on(device, stream) : runtime::record_on(device, stream);
}

void copy_d2h_async(int device, void* dst, const void* src, size_t nbytes, Event after) {
  if (emu::enabled())
    emu::copy_d2h_async(device, dst, src, nbytes, after);
  else
    runtime::copy_d2h_async(device, dst, src, nbytes, after);
}

Event record_engine(int device) { return emu::enabled() ? emu::record_engine(device) : runtime::record_engine(device); }

void synchronize(Event event) {
  if (emu::owns_event(event))
    emu::synchronize(event);
  else
    runtime::synchronize(event);
}

void destroy(Event event) noexcept {
  if (emu::owns_event(event))
    emu::destroy(event);
  else
    runtime::destroy(event);
}

void copy_h2d(int device, void* dst, const void* src, size_t nbytes) {
  if (emu::enabled())
    emu::copy_h2d(device, dst, src, nbytes);
  else
    runtime::copy_h2d(device, dst, src, nbytes);
}

void fingerprint_lanes(int device, const void* const* ptrs, const size_t* nbytes, size_t n,
                       uint64_t* lanes_out, Event after) {
  if (emu::enabled())
    emu::fingerprint_lanes(device, ptrs, nbytes, n, lanes_out, after);
  else
    runtime::fingerprint_lanes(device, ptrs, nbytes, n, lanes_out, after);
}

}  // namespace pyckpt::cuda
