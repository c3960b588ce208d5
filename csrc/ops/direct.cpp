// ops/direct.cpp -- the extension module's init (ddpm_fast/_build.py imports the library as a Python module):
// makes each op's direct binding registered by DDPM_DEVICE_OP (ops/direct.h).
#include "direct.h"

namespace ddpm {
namespace op {

std::vector<DirectFunction>& direct_functions() {
  static std::vector<DirectFunction> functions;  // filled by static initialisers
  return functions;
}

PyObject* boxed_op(const char* name) {
  PyObject* ops = PyImport_ImportModule("torch.ops");  // a dict lookup once torch is imported
  if (ops == nullptr) return nullptr;
  PyObject* ns = PyObject_GetAttrString(ops, DDPM_NS_STR);
  Py_DECREF(ops);
  if (ns == nullptr) return nullptr;
  PyObject* packet = PyObject_GetAttrString(ns, name);
  Py_DECREF(ns);
  if (packet == nullptr) return nullptr;
  PyObject* overload = PyObject_GetAttrString(packet, "default");
  Py_DECREF(packet);
  return overload;
}

}  // namespace op
}  // namespace ddpm

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "ddpm_fast's ops called through the dispatcher without torch.ops' boxing (csrc/ops/direct.h)";
  for (const auto& f : ddpm::op::direct_functions()) {
    auto* def = new PyMethodDef{f.name, reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(f.call)),
                                METH_FASTCALL, "the op through the dispatcher, positional arguments (direct.h)"};
    pybind11::capsule data(f.make_data(f.name, f.python_results));
    pybind11::object function = pybind11::reinterpret_steal<pybind11::object>(PyCFunction_New(def, data.ptr()));
    if (!function) throw pybind11::error_already_set();
    m.add_object(f.name, function);
  }
}
