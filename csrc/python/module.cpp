// Makes the shared library importable as the Python module maml_ext._C. Importing it runs the
// static TORCH_LIBRARY registrations; the ops are then reached through torch.ops.maml_ext.
// (Not part of the CMake library: libtorch users load that with torch.ops.load_library.)
#include <Python.h>

extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "maml_ext compiled ops", -1,
                                          nullptr};
  return PyModule_Create(&module_def);
}
