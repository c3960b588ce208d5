// op_namespace.h -- the torch.library namespace the ops register in: ddpm_fast (the compiled extension),
// or ddpm_fast_emu for the emulated-CUDA build (-DDDPM_CUDA_EMU), so both libraries load side by side.
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>

#ifdef DDPM_CUDA_EMU
#define DDPM_NS ddpm_fast_emu
#else
#define DDPM_NS ddpm_fast
#endif
#define DDPM_STR_(x) #x
#define DDPM_STR(x) DDPM_STR_(x)
#define DDPM_NS_STR DDPM_STR(DDPM_NS)
// "ns::name" of an op of this library
#define DDPM_OP(name) DDPM_NS_STR "::" name
// TORCH_LIBRARY_FRAGMENT / TORCH_LIBRARY_IMPL with the namespace macro expanded first
#define DDPM_TORCH_LIBRARY_IMPL(ns, key, m) TORCH_LIBRARY_IMPL(ns, key, m)
#define DDPM_TORCH_LIBRARY_FRAGMENT(ns, m) TORCH_LIBRARY_FRAGMENT(ns, m)

namespace ddpm {
namespace op {
// The typed dispatcher handle of the op `name` ("ns::name", DDPM_OP), looked up once per call site.
template <class Sig> c10::TypedOperatorHandle<Sig> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}
}  // namespace op
}  // namespace ddpm
