// Shared between the CUDA translation units of the engine (not a public header).
#pragma once

#include <cuda_runtime.h>

namespace pyckpt::cuda {

/// The engine's own non-blocking stream for `device` (created on first use).
cudaStream_t engine_stream(int device);

}  // namespace pyckpt::cuda
