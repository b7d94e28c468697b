// CUDA runtime calls for the engine (see include/pyckpt/cuda_api.h).
// Linked with the static runtime so the module imports without a driver.
#include <cuda_runtime.h>

#include <map>
#include <mutex>
#include <string>

#include "pyckpt/cuda_api.h"
#include "pyckpt/cuda_backends.h"
#include "internal.cuh"
#include "pyckpt/errors.h"

namespace pyckpt::cuda {

namespace {

void check(cudaError_t rc, const char* what) {
  if (rc != cudaSuccess)
    throw Error(ErrorKind::Runtime, std::string("CUDA error in ") + what + ": " +
                                        cudaGetErrorName(rc) + ": " + cudaGetErrorString(rc));
}

void use_device(int device) { check(cudaSetDevice(device), "cudaSetDevice"); }

Event new_event() {
  cudaEvent_t e = nullptr;
  check(cudaEventCreateWithFlags(&e, cudaEventDisableTiming), "cudaEventCreateWithFlags");
  return static_cast<Event>(e);
}

}  // namespace

// One non-blocking stream per device, created on first use and kept for the
// process lifetime (destroying it at exit could race driver shutdown).
cudaStream_t engine_stream(int device) {
  static std::mutex mu;
  static std::map<int, cudaStream_t> streams;
  std::lock_guard<std::mutex> lock(mu);
  auto it = streams.find(device);
  if (it != streams.end()) return it->second;
  cudaStream_t s = nullptr;
  check(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), "cudaStreamCreateWithFlags");
  streams[device] = s;
  return s;
}

namespace runtime {

bool compiled() { return true; }

bool available() {
  int n = 0;
  const cudaError_t rc = cudaGetDeviceCount(&n);
  if (rc != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver" error
    return false;
  }
  return n > 0;
}

void* host_alloc(size_t nbytes) {
  void* p = nullptr;
  check(cudaHostAlloc(&p, nbytes, cudaHostAllocPortable), "cudaHostAlloc");
  return p;
}

void host_free(void* p) noexcept {
  if (p) cudaFreeHost(p);  // errors at process exit are harmless
}

bool host_register(void* p, size_t nbytes) noexcept {
  if (cudaHostRegister(p, nbytes, cudaHostRegisterPortable) == cudaSuccess) return true;
  cudaGetLastError();  // not sticky: clear it, the caller falls back to cudaHostAlloc
  return false;
}

void host_unregister(void* p) noexcept {
  if (p) cudaHostUnregister(p);  // errors at process exit are harmless
}

Event record_on(int device, uintptr_t stream) {
  use_device(device);
  Event e = new_event();
  check(cudaEventRecord(static_cast<cudaEvent_t>(e), reinterpret_cast<cudaStream_t>(stream)),
        "cudaEventRecord on the caller's stream");
  return e;
}

void copy_d2h_async(int device, void* dst, const void* src, size_t nbytes, Event after) {
  use_device(device);
  cudaStream_t s = engine_stream(device);
  if (after) check(cudaStreamWaitEvent(s, static_cast<cudaEvent_t>(after), 0), "cudaStreamWaitEvent");
  check(cudaMemcpyAsync(dst, src, nbytes, cudaMemcpyDeviceToHost, s), "cudaMemcpyAsync D2H");
}

Event record_engine(int device) {
  use_device(device);
  Event e = new_event();
  check(cudaEventRecord(static_cast<cudaEvent_t>(e), engine_stream(device)), "cudaEventRecord");
  return e;
}

void synchronize(Event event) {
  check(cudaEventSynchronize(static_cast<cudaEvent_t>(event)), "cudaEventSynchronize");
}

void destroy(Event event) noexcept {
  if (event) cudaEventDestroy(static_cast<cudaEvent_t>(event));
}

void copy_h2d(int device, void* dst, const void* src, size_t nbytes) {
  use_device(device);
  // The engine's stream, not the legacy default one: reads on several I/O
  // threads queue their DMAs back to back without waiting on the caller's
  // kernels. Each waits for its own event only.
  cudaStream_t s = engine_stream(device);
  check(cudaMemcpyAsync(dst, src, nbytes, cudaMemcpyHostToDevice, s), "cudaMemcpyAsync H2D");
  Event done = new_event();
  const cudaError_t rc = cudaEventRecord(static_cast<cudaEvent_t>(done), s);
  const cudaError_t sync = rc == cudaSuccess ? cudaEventSynchronize(static_cast<cudaEvent_t>(done)) : rc;
  cudaEventDestroy(static_cast<cudaEvent_t>(done));
  check(sync, "cudaEventSynchronize (H2D)");
}

}  // namespace runtime

}  // namespace pyckpt::cuda
