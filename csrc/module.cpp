// `import interpkernels._C` loads this shared library, which runs the static
// TORCH_LIBRARY registrations in ops.cpp and the per-device kernel files.
// Ops are reached via torch.ops; the module itself exposes only the choice of
// CPU instruction-set level of the CPU kernels (cpu/vector_math.h).
#include <Python.h>

#include <exception>
#include <string>
#include <vector>

#include "cpu/vector_math.h"

namespace {

PyObject* raise_value_error(const std::exception& error) {
  PyErr_SetString(PyExc_ValueError, error.what());
  return nullptr;
}

PyObject* cpu_isa(PyObject*, PyObject*) {
  try {
    return PyUnicode_FromString(interpkernels::cpu::active_cpu_isa().c_str());
  } catch (const std::exception& error) {
    return raise_value_error(error);
  }
}

PyObject* supported_cpu_isas(PyObject*, PyObject*) {
  const std::vector<std::string> names = interpkernels::cpu::supported_cpu_isas();
  PyObject* result = PyList_New(static_cast<Py_ssize_t>(names.size()));
  if (result == nullptr) return nullptr;
  for (size_t i = 0; i < names.size(); ++i) {
    PyObject* name = PyUnicode_FromString(names[i].c_str());
    if (name == nullptr) {
      Py_DECREF(result);
      return nullptr;
    }
    PyList_SET_ITEM(result, static_cast<Py_ssize_t>(i), name);
  }
  return result;
}

PyObject* set_cpu_isa(PyObject*, PyObject* isa) {
  const char* name = PyUnicode_AsUTF8(isa);
  if (name == nullptr) return nullptr;
  try {
    interpkernels::cpu::set_cpu_isa(name);
  } catch (const std::exception& error) {
    return raise_value_error(error);
  }
  Py_RETURN_NONE;
}

PyMethodDef methods[] = {
    {"cpu_isa", cpu_isa, METH_NOARGS, "The x86-64 level the CPU kernels run: 'avx512', 'avx2' or 'baseline'."},
    {"supported_cpu_isas", supported_cpu_isas, METH_NOARGS, "The levels this CPU runs, widest first."},
    {"set_cpu_isa", set_cpu_isa, METH_O, "Run the CPU kernels at this level from now on."},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace

extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module);
}
