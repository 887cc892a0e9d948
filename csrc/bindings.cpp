// The one binding file of convnextv2_fast._C.
//
// Ops are registered with the PyTorch dispatcher (TORCH_LIBRARY, namespace
// ``convnextv2_fast``) so they are visible to torch.compile as
// ``torch.ops.convnextv2_fast.<name>``; their fake (meta) implementations are
// registered from Python (convnextv2_fast/sparse/_ops.py).  The Python module
// itself is a minimal CPython module (no pybind11): importing it loads the
// shared library, which runs the registrations below.  Its attributes:
// ``WITH_CUDA`` and the build stamp that setup.py generates
// (convnextv2_fast_build_stamp.h): ``BUILD_STAMP`` (JSON), ``TORCH_VERSION``,
// ``CUDA_VERSION`` (torch.version.cuda at build time) and ``CUDA_ARCH_LIST``.
// The stamp is also stored as one NUL-terminated string
// "CONVNEXTV2_FAST_BUILD_STAMP=<json>" so that convnextv2_fast/_ext.py can read it
// from the file *without* importing (a build for another torch may fail to load
// with undefined symbols, or crash, when imported).
#include <Python.h>

#include <torch/library.h>

#include "sparse_dwconv/sparse_dwconv.h"

#if __has_include("convnextv2_fast_build_stamp.h")
#include "convnextv2_fast_build_stamp.h"
#else  // built outside setup.py (e.g. torch.utils.cpp_extension.load): unknown
#define CONVNEXTV2_FAST_STAMP_JSON "{}"
#define CONVNEXTV2_FAST_STAMP_TORCH ""
#define CONVNEXTV2_FAST_STAMP_CUDA ""
#define CONVNEXTV2_FAST_STAMP_ARCHS ""
#endif

TORCH_LIBRARY(convnextv2_fast, m) {
  m.def("sparse_dwconv_fwd(Tensor feats, Tensor taps, Tensor? bias, Tensor nbr_rows) "
        "-> Tensor");
  m.def("sparse_dwconv_tile_fwd(Tensor feats, Tensor taps, Tensor? bias, Tensor halo_rows, "
        "int tile) -> Tensor");
  m.def("sparse_dwconv_mma_fwd(Tensor feats, Tensor taps, Tensor? bias, Tensor halo_rows) "
        "-> Tensor");
  m.def("sparse_dwconv_bwd_weight(Tensor grad_out, Tensor feats, Tensor nbr_rows) "
        "-> (Tensor, Tensor)");
  m.def("sparse_dwconv_tile_wgrad(Tensor grad_out, Tensor feats, Tensor halo_rows, "
        "int tile) -> (Tensor, Tensor)");
  m.def("sparse_dwconv_skip_fwd(Tensor feats, Tensor taps, Tensor? bias, Tensor halo_rows, "
        "int tile) -> Tensor");
  m.def("sparse_dwconv_skip_wgrad(Tensor grad_out, Tensor feats, Tensor halo_rows, "
        "int tile) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(convnextv2_fast, CPU, m) {
  m.impl("sparse_dwconv_fwd", &convnextv2_fast::sparse_dwconv_fwd_cpu);
  m.impl("sparse_dwconv_tile_fwd", &convnextv2_fast::sparse_dwconv_tile_fwd_cpu);
  m.impl("sparse_dwconv_mma_fwd", &convnextv2_fast::sparse_dwconv_mma_fwd_cpu);
  m.impl("sparse_dwconv_bwd_weight", &convnextv2_fast::sparse_dwconv_bwd_weight_cpu);
  m.impl("sparse_dwconv_tile_wgrad", &convnextv2_fast::sparse_dwconv_tile_wgrad_cpu);
  m.impl("sparse_dwconv_skip_fwd", &convnextv2_fast::sparse_dwconv_skip_fwd_cpu);
  m.impl("sparse_dwconv_skip_wgrad", &convnextv2_fast::sparse_dwconv_skip_wgrad_cpu);
}

#ifdef WITH_CUDA
TORCH_LIBRARY_IMPL(convnextv2_fast, CUDA, m) {
  m.impl("sparse_dwconv_fwd", &convnextv2_fast::sparse_dwconv_fwd_cuda);
  m.impl("sparse_dwconv_tile_fwd", &convnextv2_fast::sparse_dwconv_tile_fwd_cuda);
  m.impl("sparse_dwconv_mma_fwd", &convnextv2_fast::sparse_dwconv_mma_fwd_cuda);
  m.impl("sparse_dwconv_bwd_weight", &convnextv2_fast::sparse_dwconv_bwd_weight_cuda);
  m.impl("sparse_dwconv_tile_wgrad", &convnextv2_fast::sparse_dwconv_tile_wgrad_cuda);
  m.impl("sparse_dwconv_skip_fwd", &convnextv2_fast::sparse_dwconv_skip_fwd_cuda);
  m.impl("sparse_dwconv_skip_wgrad", &convnextv2_fast::sparse_dwconv_skip_wgrad_cuda);
}
#endif

namespace {
constexpr char kStampMarker[] = "CONVNEXTV2_FAST_BUILD_STAMP=";
// One literal: marker and JSON are contiguous in the binary's read-only data.
const char kBuildStamp[] = "CONVNEXTV2_FAST_BUILD_STAMP=" CONVNEXTV2_FAST_STAMP_JSON;

int add_string(PyObject* module, const char* name, const char* value) {
  PyObject* str = PyUnicode_FromString(value);
  if (str == nullptr) return -1;
  if (PyModule_AddObject(module, name, str) < 0) {
    Py_DECREF(str);
    return -1;
  }
  return 0;
}

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
  if (add_string(module, "BUILD_STAMP", kBuildStamp + sizeof(kStampMarker) - 1) < 0 ||
      add_string(module, "TORCH_VERSION", CONVNEXTV2_FAST_STAMP_TORCH) < 0 ||
      add_string(module, "CUDA_VERSION", CONVNEXTV2_FAST_STAMP_CUDA) < 0 ||
      add_string(module, "CUDA_ARCH_LIST", CONVNEXTV2_FAST_STAMP_ARCHS) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
