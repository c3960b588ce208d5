// cuda/emu/kernels_emu.cpp -- cuda/kernels.cu itself, compiled as host C++ against the CUDA emulation
// (cuda_emu.h, selected by -DDDPM_CUDA_EMU in cuda/runtime.h): the library of backend "cuda_emu".
// A .cpp translation unit only because build tools pick the compiler by file suffix.
#ifndef DDPM_CUDA_EMU
#error "kernels_emu.cpp is built with -DDDPM_CUDA_EMU (ddpm_fast._build.load_emu)"
#endif
#include "../kernels.cu"
