// The chunk fingerprint (pyckpt/fingerprint.h, "pkfp1") computed on the GPU,
// so an unchanged chunk costs one read of device memory and 32 bytes over
// PCIe instead of a device-to-host copy of the whole chunk.
//
// One launch covers up to 1024 buffers (blockIdx.y), so a whole checkpoint's
// unchanged device chunks cost a few launches and one synchronization. Each
// thread sums its stripes into four lane accumulators (grid-stride over
// 32-byte stripes, two 16-byte loads per stripe when the buffer is 16-byte
// aligned), then warps and blocks reduce with shuffles and shared memory and
// one thread per block adds the block's sums atomically. Additions modulo
// 2^64 commute, so the result equals the CPU's for any launch shape.
#include <cuda_runtime.h>

#include <map>
#include <mutex>
#include <string>
#include <vector>

#include "internal.cuh"
#include "pyckpt/cuda_api.h"
#include "pyckpt/cuda_backends.h"
#include "pyckpt/errors.h"
#include "pyckpt/fingerprint.h"

namespace pyckpt::cuda {

namespace {

using u64 = unsigned long long;

__constant__ u64 d_key[4] = {0x9E3779B97F4A7C15ull, 0xC2B2AE3D27D4EB4Full, 0x165667B19E3779F9ull,
                             0xD6E8FEB86659FD93ull};
constexpr u64 kStep = 0xA0761D6478BD642Full;
constexpr int kThreads = 256;
constexpr size_t kSlots = 1024;  // buffers per launch batch (32 bytes of sums each)

void check(cudaError_t rc, const char* what) {
  if (rc != cudaSuccess)
    throw Error(ErrorKind::Runtime, std::string("CUDA error in ") + what + ": " +
                                        cudaGetErrorName(rc) + ": " + cudaGetErrorString(rc));
}

__device__ __forceinline__ void add_stripe(const u64 w[4], u64 s, u64 acc[4]) {
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const u64 x = w[j] ^ (d_key[j] + s * kStep);
    acc[j] += (x & 0xFFFFFFFFull) * (x >> 32) + w[j];
  }
}

struct Piece {
  const unsigned char* p;
  size_t n;
};

// One launch for many buffers: blockIdx.y picks the buffer, blocks along x
// stride over its stripes (small buffers leave most x-blocks idle at once).
__global__ void fingerprint_kernel(const Piece* __restrict__ pieces, u64* out) {
  const unsigned char* __restrict__ p = pieces[blockIdx.y].p;
  const size_t n = pieces[blockIdx.y].n;
  const size_t nstripes = (n + 31) / 32;
  const size_t full = n / 32;
  const bool aligned = (reinterpret_cast<uintptr_t>(p) & 15) == 0;
  u64 acc[4] = {0, 0, 0, 0};
  for (size_t s = blockIdx.x * size_t(blockDim.x) + threadIdx.x; s < nstripes;
       s += size_t(gridDim.x) * blockDim.x) {
    u64 w[4];
    if (aligned && s < full) {
      const ulonglong2 a = __ldg(reinterpret_cast<const ulonglong2*>(p) + 2 * s);
      const ulonglong2 b = __ldg(reinterpret_cast<const ulonglong2*>(p) + 2 * s + 1);
      w[0] = a.x, w[1] = a.y, w[2] = b.x, w[3] = b.y;
    } else {  // unaligned buffer or the zero-padded last stripe: assemble bytes
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        u64 v = 0;
        for (int b = 0; b < 8; ++b) {
          const size_t at = 32 * s + 8 * j + b;
          if (at < n) v |= u64(p[at]) << (8 * b);
        }
        w[j] = v;
      }
    }
    add_stripe(w, s, acc);
  }
  __shared__ u64 part[kThreads / 32][4];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    for (int off = 16; off > 0; off >>= 1) acc[j] += __shfl_down_sync(0xFFFFFFFFu, acc[j], off);
    if (lane == 0) part[warp][j] = acc[j];
  }
  __syncthreads();
  if (threadIdx.x < 4) {
    u64 sum = 0;
    for (int k = 0; k < kThreads / 32; ++k) sum += part[k][threadIdx.x];
    if (sum) atomicAdd(out + 4 * blockIdx.y + threadIdx.x, sum);
  }
}

struct DeviceScratch {
  u64* sums = nullptr;     // kSlots * 4, device memory, kept for the process
  Piece* pieces = nullptr;  // kSlots descriptors, device memory
  std::mutex mu;
  int blocks_cap = 0;
};

DeviceScratch& scratch_for(int device) {
  static std::mutex mu;
  static std::map<int, DeviceScratch*> all;
  std::lock_guard<std::mutex> lock(mu);
  DeviceScratch*& d = all[device];
  if (!d) {
    auto* fresh = new DeviceScratch();  // never freed: lives as long as the engine stream
    check(cudaMalloc(&fresh->sums, kSlots * 4 * sizeof(u64)), "cudaMalloc (fingerprint sums)");
    check(cudaMalloc(&fresh->pieces, kSlots * sizeof(Piece)), "cudaMalloc (fingerprint pieces)");
    int sms = 0;
    check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), "cudaDeviceGetAttribute");
    fresh->blocks_cap = sms * 8;  // enough resident warps to saturate memory bandwidth
    d = fresh;
  }
  return *d;
}

}  // namespace

void runtime::fingerprint_lanes(int device, const void* const* ptrs, const size_t* nbytes, size_t n,
                       uint64_t* lanes_out, Event after) {
  check(cudaSetDevice(device), "cudaSetDevice");
  DeviceScratch& sc = scratch_for(device);
  std::lock_guard<std::mutex> lock(sc.mu);
  cudaStream_t s = engine_stream(device);
  if (after) check(cudaStreamWaitEvent(s, static_cast<cudaEvent_t>(after), 0), "cudaStreamWaitEvent");
  std::vector<Piece> desc;
  for (size_t first = 0; first < n; first += kSlots) {
    const size_t count = n - first < kSlots ? n - first : kSlots;
    desc.assign(count, Piece{nullptr, 0});
    size_t longest = 0;
    for (size_t i = 0; i < count; ++i) {
      desc[i] = Piece{static_cast<const unsigned char*>(ptrs[first + i]), nbytes[first + i]};
      if (desc[i].n > longest) longest = desc[i].n;
    }
    check(cudaMemsetAsync(sc.sums, 0, count * 4 * sizeof(u64), s), "cudaMemsetAsync");
    check(cudaMemcpyAsync(sc.pieces, desc.data(), count * sizeof(Piece), cudaMemcpyHostToDevice, s),
          "cudaMemcpyAsync (fingerprint pieces)");
    if (longest > 0) {
      // Each thread takes ~8 stripes (256 bytes) at least, so small buffers use few blocks.
      const size_t stripes = (longest + 31) / 32;
      size_t blocks = (stripes + kThreads * 8 - 1) / (kThreads * 8);
      if (blocks > size_t(sc.blocks_cap)) blocks = sc.blocks_cap;
      fingerprint_kernel<<<dim3(unsigned(blocks), unsigned(count)), kThreads, 0, s>>>(sc.pieces, sc.sums);
      check(cudaGetLastError(), "fingerprint kernel launch");
    }
    check(cudaMemcpyAsync(lanes_out + 4 * first, sc.sums, count * 4 * sizeof(u64), cudaMemcpyDeviceToHost, s),
          "cudaMemcpyAsync (fingerprint sums)");
    // Also orders the pageable descriptor copy before `desc` is reused.
    check(cudaStreamSynchronize(s), "cudaStreamSynchronize (fingerprint)");
  }
}

}  // namespace pyckpt::cuda
