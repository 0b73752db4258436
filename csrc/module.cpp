// `import interpkernels._C` loads this shared library, which runs the static
// TORCH_LIBRARY registrations in ops.cpp and the per-device kernel files.
// The module itself exposes nothing: every op is reached via torch.ops.
#include <Python.h>

extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module);
}
