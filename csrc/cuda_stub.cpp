// CPU-only build: CUDA entry points that report "not compiled in".
#include "pyckpt/cuda_api.h"
#include "pyckpt/cuda_backends.h"
#include "pyckpt/errors.h"

namespace pyckpt::cuda::runtime {

namespace {
[[noreturn]] void not_compiled() {
  throw Error(ErrorKind::Runtime,
              "pyckpt._C was built without CUDA: reinstall with nvcc on PATH "
              "(PYCKPT_CUDA=1 pip install .) to checkpoint GPU tensors directly");
}
}  // namespace

bool compiled() { return false; }
bool available() { return false; }
void* host_alloc(size_t) { not_compiled(); }
void host_free(void*) noexcept {}
bool host_register(void*, size_t) noexcept { return false; }
void host_unregister(void*) noexcept {}
Event record_on(int, uintptr_t) { not_compiled(); }
void copy_d2h_async(int, void*, const void*, size_t, Event) { not_compiled(); }
Event record_engine(int) { not_compiled(); }
void synchronize(Event) { not_compiled(); }
void destroy(Event) noexcept {}
void copy_h2d(int, void*, const void*, size_t) { not_compiled(); }
void fingerprint_lanes(int, const void* const*, const size_t*, size_t, uint64_t*, Event) {
  not_compiled();
}

}  // namespace pyckpt::cuda::runtime
