// ops/direct.h -- each op's direct Python binding: a function of the extension module (ops/direct.cpp) that
// calls the op through the dispatcher, typed and unboxed, as C++ callers do. The same dispatch as
// torch.ops.<ns>.<op>.default (autograd, functorch, dispatch modes, the profiler) without its boxing: that path
// builds a stack of IValues from the Python arguments by the schema, releases the GIL, and re-takes it to drop
// each input tensor's reference (~1 us a call at q_sample's 4 arguments, ~2.5 us at training_losses' 11 and its
// 6 results); DDPM_DIRECT_RESULTS trims the results an op gives Python. A torch.Tensor subclass argument (it may
// have a __torch_function__), an active torch function mode, or an argument the host function's types do not
// take sends the call to torch.ops' instead, which handles or rejects it as it always did (and returns every
// result: a caller of a trimmed op takes its first results by index). DDPM_DEVICE_OP (host.h) registers every
// op's binding; the module makes them when it is imported, and ddpm_fast/native.py's EagerKernel calls them
// (plain-eager callers: torch.compile traces the OpOverload).
#pragma once

#include <ATen/PythonTorchFunctionTLS.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/utils/pybind.h>

#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "../op_namespace.h"

namespace ddpm {
namespace op {

// One op's binding as the module makes it: a METH_FASTCALL function (self: a capsule of `data`)
struct DirectFunction {
  const char* name;
  PyObject* (*call)(PyObject* self, PyObject* const* args, Py_ssize_t nargs);
  // the binding's state, made when the module is imported (never freed)
  void* (*make_data)(const char* name, int python_results);
  int python_results = -1;  // >= 0: only the op's first results go to Python (DDPM_DIRECT_RESULTS)
};

// Every op's binding, in registration order (ops/direct.cpp).
std::vector<DirectFunction>& direct_functions();

// torch.ops.<DDPM_NS>.<name>.default (a new reference; NULL with the Python error set when the lookup fails)
PyObject* boxed_op(const char* name);

// Whether the argument may have a __torch_function__: a torch.Tensor subclass (nn.Parameter's is disabled, but
// it goes to torch.ops too); plain tensors, None and Python's int / float / bool have none, and are told by their
// exact type first (THPVariable_Check's isinstance costs ~450 instructions on an int: the metaclass's
// __instancecheck__).
inline bool maybe_torch_function(PyObject* object) {
  PyTypeObject* type = Py_TYPE(object);
  if (type == reinterpret_cast<PyTypeObject*>(THPVariableClass) || type == &PyLong_Type || type == &PyFloat_Type ||
      type == &PyBool_Type || object == Py_None)
    return false;
  return THPVariable_Check(object);
}

// The Python value of an op's results: all of them (python_results < 0), or a tuple of the first python_results
// of a tuple of results (the others, kept by the op's autograd node, are never wrapped as Python objects).
template <class R> PyObject* python_value(R&& result, int python_results) {
  if constexpr (c10::guts::is_instantiation_of<std::tuple, R>::value) {
    if (python_results >= 0) {
      pybind11::tuple out(python_results);
      int i = 0;
      auto put = [&](auto& x) {
        if (i < python_results) out[i] = pybind11::cast(std::move(x));
        ++i;
      };
      std::apply([&](auto&... x) { (put(x), ...); }, result);
      return out.release().ptr();
    }
  }
  return pybind11::cast(std::move(result)).release().ptr();
}

// The binding of an op whose host function is R(A...)
template <class R, class... A> struct Direct {
  c10::TypedOperatorHandle<R(A...)> op;
  const char* name;
  int python_results;

  static void* make(const char* name, int python_results) {
    return new Direct{op_handle<R(A...)>((std::string(DDPM_NS_STR) + "::" + name).c_str()), name, python_results};
  }
  static PyObject* call(PyObject* self, PyObject* const* args, Py_ssize_t nargs) {
    HANDLE_TH_ERRORS
    auto* direct = static_cast<Direct*>(PyCapsule_GetPointer(self, nullptr));
    return direct->run(args, nargs, std::index_sequence_for<A...>{});
    END_HANDLE_TH_ERRORS
  }
  template <size_t... I> PyObject* run(PyObject* const* args, Py_ssize_t nargs, std::index_sequence<I...>) {
    std::tuple<pybind11::detail::make_caster<A>...> cast;
    if (nargs == sizeof...(A) && !at::impl::torch_function_mode_enabled() && !(maybe_torch_function(args[I]) || ...) &&
        (std::get<I>(cast).load(pybind11::handle(args[I]), true) && ...)) {
      R result;
      {
        pybind11::gil_scoped_release no_gil;  // as torch's own op bindings: other Python threads run meanwhile
        result = op.call(pybind11::detail::cast_op<A>(std::get<I>(cast))...);
      }
      return python_value(std::move(result), python_results);
    }
    PyObject* boxed = boxed_op(name);
    if (boxed == nullptr) return nullptr;
    PyObject* out = PyObject_Vectorcall(boxed, args, static_cast<size_t>(nargs), nullptr);
    Py_DECREF(boxed);
    return out;
  }
};

// Registers the op `name`'s binding: positional arguments of its host function's types (the op's CPU kernel,
// whose signature its schema matches).
struct DirectBinding {
  template <class R, class... A> DirectBinding(const char* name, R (*)(A...)) {
    direct_functions().push_back({name, &Direct<R, A...>::call, &Direct<R, A...>::make});
  }
};

// Sets the op `name`'s binding (registered before, in the same file) to give Python only its first n results:
// for an op whose other results exist for its autograd node (saved gradients), so that plain-eager callers do not
// pay a Python object each for them. torch.ops' OpOverload (torch.compile's path) still returns them all.
struct DirectResults {
  DirectResults(const char* name, int n) {
    for (auto& f : direct_functions())
      if (std::string(f.name) == name) f.python_results = n;
  }
};
#define DDPM_DIRECT_RESULTS(name, n) static const ::ddpm::op::DirectResults direct_results_##name(#name, n);

}  // namespace op
}  // namespace ddpm
