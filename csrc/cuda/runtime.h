// cuda/runtime.h -- the few CUDA runtime services kernels.cu uses, real (nvcc) or emulated on the CPU
// (host C++ with -DDDPM_CUDA_EMU: cuda/emu/cuda_emu.h), so the same kernels.cu builds both ways:
//   gpu::launch(kernel, grid, block, smem, stream, args...)   the <<<grid, block, smem, stream>>> launch
//   gpu::launch_check()                                       C10_CUDA_KERNEL_LAUNCH_CHECK
//   gpu::current_stream(), gpu::device()                      where scratch tensors and launches go
#pragma once

#include <cstddef>
#include <utility>

#include <ATen/ATen.h>

#ifdef DDPM_CUDA_EMU
#include "emu/cuda_emu.h"

namespace ddpm::gpu {
using Stream = ddpm_emu::Stream;
inline Stream current_stream() { return {}; }
inline at::Device device() { return at::Device(at::kCPU); }  // emulated device memory is host memory
inline void launch_check() { ddpm_emu::launch_check(); }
template <class... Params, class... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, Stream, Args&&... args) {
  ddpm_emu::launch(grid, block, smem, [&] { kernel(args...); });
}
}  // namespace ddpm::gpu

#else
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>

namespace ddpm::gpu {
using Stream = cudaStream_t;
inline Stream current_stream() { return c10::cuda::getCurrentCUDAStream(); }
inline at::Device device() { return at::Device(at::kCUDA, c10::cuda::current_device()); }
inline void launch_check() { C10_CUDA_KERNEL_LAUNCH_CHECK(); }
template <class... Params, class... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, Stream stream, Args&&... args) {
  kernel<<<grid, block, smem, stream>>>(std::forward<Args>(args)...);
}
}  // namespace ddpm::gpu
#endif
