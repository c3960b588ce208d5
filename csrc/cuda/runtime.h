// cuda/runtime.h -- the few CUDA runtime services kernels.cu uses, real (nvcc) or emulated on the CPU
// (host C++ with -DDDPM_CUDA_EMU: cuda/emu/cuda_emu.h), so the same kernels.cu builds both ways:
//   gpu::launch(kernel, grid, block, smem, stream, args...)   the <<<grid, block, smem, stream>>> launch
//   gpu::launch_check()                                       C10_CUDA_KERNEL_LAUNCH_CHECK
//   gpu::current_stream(), gpu::device()                      where scratch tensors and launches go
//   gpu::sm_count()                                           SMs of the current device (grid sizing)
//   float4, uint4, gpu::store16(p, v)                         16-byte vector types and their 128-bit store
#pragma once

#include <cstddef>
#include <utility>

#include <ATen/ATen.h>

#ifdef DDPM_CUDA_EMU
#include "emu/cuda_emu.h"

// CUDA's vector_types.h: 16-byte aligned, so a load or store of one is a single 128-bit access
struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};

namespace ddpm::gpu {
// The emulated device reports the SMs of an H100 SXM, so that grid sizing takes the GPU's path.
constexpr int kEmulatedSmCount = 132;

using Stream = ddpm_emu::Stream;
inline int sm_count() { return kEmulatedSmCount; }
template <class V> inline void store16(V* p, const V& v) { *p = v; }
inline Stream current_stream() { return {}; }
inline at::Device device() { return at::Device(at::kCPU); }  // emulated device memory is host memory
inline void launch_check() { ddpm_emu::launch_check(); }
template <class... Params, class... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, Stream, Args&&... args) {
  ddpm_emu::launch(grid, block, smem, [&] { kernel(args...); });
}
}  // namespace ddpm::gpu

#else
#include <atomic>

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>

namespace ddpm::gpu {
using Stream = cudaStream_t;
// *p = v as one 128-bit store (st.global.v4, STG.E.128): nvcc splits a plain store of a float4 / uint4
// built lane by lane into four 32-bit stores (its four registers are not allocated consecutively)
__device__ __forceinline__ void store16(float4* p, const float4& v) {
  asm volatile("st.global.v4.f32 [%0], {%1, %2, %3, %4};" ::"l"(p), "f"(v.x), "f"(v.y), "f"(v.z), "f"(v.w)
               : "memory");
}
__device__ __forceinline__ void store16(uint4* p, const uint4& v) {
  asm volatile("st.global.v4.u32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w)
               : "memory");
}
// SMs of the current device, asked once per device (cudaDeviceGetAttribute; no sync)
inline int sm_count() {
  static std::atomic<int> cached[64];
  const int dev = c10::cuda::current_device();
  int n = dev < 64 ? cached[dev].load(std::memory_order_relaxed) : 0;
  if (n == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev));
    if (dev < 64) cached[dev].store(n, std::memory_order_relaxed);
  }
  return n;
}
inline Stream current_stream() { return c10::cuda::getCurrentCUDAStream(); }
inline at::Device device() { return at::Device(at::kCUDA, c10::cuda::current_device()); }
inline void launch_check() { C10_CUDA_KERNEL_LAUNCH_CHECK(); }
template <class... Params, class... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, Stream stream, Args&&... args) {
  kernel<<<grid, block, smem, stream>>>(std::forward<Args>(args)...);
}
}  // namespace ddpm::gpu
#endif
