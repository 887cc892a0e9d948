// The one binding file of convnextv2_fast._C.
//
// Ops are registered with the PyTorch dispatcher (TORCH_LIBRARY, namespace
// ``convnextv2_fast``) so they are visible to torch.compile as
// ``torch.ops.convnextv2_fast.<name>``; their fake (meta) implementations are
// registered from Python (convnextv2_fast/sparse/_ops.py).  The Python module
// itself is a minimal CPython module (no pybind11) whose only attribute is
// ``WITH_CUDA``: importing it loads the shared library, which runs the
// registrations below.
#include <Python.h>

#include <torch/library.h>

#include "sparse_dwconv/sparse_dwconv.h"

TORCH_LIBRARY(convnextv2_fast, m) {
  m.def("sparse_dwconv_fwd(Tensor feats, Tensor taps, Tensor? bias, Tensor nbr_rows) "
        "-> Tensor");
  m.def("sparse_dwconv_bwd_weight(Tensor grad_out, Tensor feats, Tensor nbr_rows) "
        "-> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(convnextv2_fast, CPU, m) {
  m.impl("sparse_dwconv_fwd", &convnextv2_fast::sparse_dwconv_fwd_cpu);
  m.impl("sparse_dwconv_bwd_weight", &convnextv2_fast::sparse_dwconv_bwd_weight_cpu);
}

#ifdef WITH_CUDA
TORCH_LIBRARY_IMPL(convnextv2_fast, CUDA, m) {
  m.impl("sparse_dwconv_fwd", &convnextv2_fast::sparse_dwconv_fwd_cuda);
  m.impl("sparse_dwconv_bwd_weight", &convnextv2_fast::sparse_dwconv_bwd_weight_cuda);
}
#endif

namespace {
PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "_C",
    "convnextv2_fast compiled ops (registered as torch.ops.convnextv2_fast.*)", -1, nullptr};
}  // namespace

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) return nullptr;
#ifdef WITH_CUDA
  PyObject* with_cuda = Py_True;
#else
  PyObject* with_cuda = Py_False;
#endif
  Py_INCREF(with_cuda);
  if (PyModule_AddObject(module, "WITH_CUDA", with_cuda) < 0) {
    Py_DECREF(with_cuda);
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
