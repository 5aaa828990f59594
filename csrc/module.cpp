// The Python module `fsdp_fastload._C`: importing it runs the static op registrations in ops.cpp.
// No pybind11 and only the limited API, so one abi3 build serves every CPython >= 3.9.
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "fsdp_fastload compiled ops (registered as torch.ops.fsdp_fastload)",
      -1, nullptr};
  return PyModule_Create(&module_def);
}
}
