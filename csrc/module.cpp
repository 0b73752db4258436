// `import interpkernels._C` loads this shared library, which runs the static
// TORCH_LIBRARY registrations in ops.cpp and the per-device kernel files.
// Ops are reached via torch.ops; the module itself exposes only two settings:
// the instruction-set level of the CPU kernels (cpu/vector_math.h) and how the
// data-dependent argument checks run (checks.h).
#include <Python.h>

#include <exception>
#include <string>
#include <vector>

#include "checks.h"
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

PyObject* index_check(PyObject*, PyObject*) {
  try {
    return PyUnicode_FromString(interpkernels::index_check().c_str());
  } catch (const std::exception& error) {
    return raise_value_error(error);
  }
}

PyObject* set_index_check(PyObject*, PyObject* mode) {
  const char* name = PyUnicode_AsUTF8(mode);
  if (name == nullptr) return nullptr;
  try {
    interpkernels::set_index_check(name);
  } catch (const std::exception& error) {
    return raise_value_error(error);
  }
  Py_RETURN_NONE;
}

PyObject* index_check_syncs(PyObject*, PyObject* on_cuda) {
  const int flag = PyObject_IsTrue(on_cuda);
  if (flag < 0) return nullptr;
  return PyBool_FromLong(interpkernels::index_check_syncs(flag != 0));
}

PyMethodDef methods[] = {
    {"cpu_isa", cpu_isa, METH_NOARGS, "The x86-64 level the CPU kernels run: 'avx512', 'avx2' or 'baseline'."},
    {"supported_cpu_isas", supported_cpu_isas, METH_NOARGS, "The levels this CPU runs, widest first."},
    {"set_cpu_isa", set_cpu_isa, METH_O, "Run the CPU kernels at this level from now on."},
    {"index_check", index_check, METH_NOARGS,
     "How index-range and latent_mask checks run: 'auto' (device-side on CUDA, on the host elsewhere), 'sync' "
     "(on the host: precise errors, one host sync per check) or 'async' (device-side assertions, no host sync)."},
    {"set_index_check", set_index_check, METH_O, "Run the index checks this way from now on (see index_check)."},
    {"index_check_syncs", index_check_syncs, METH_O,
     "index_check_syncs(on_cuda): whether a check of a tensor on CUDA (or not) reads its result on the host now."},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace

extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods, nullptr, nullptr, nullptr, nullptr};
  PyObject* created = PyModule_Create(&module);
  if (created != nullptr && PyModule_AddStringConstant(created, "ASYNC_CHECK_HINT", interpkernels::kAsyncCheckHint) < 0) {
    Py_DECREF(created);
    return nullptr;
  }
  return created;
}
