// pybind11 entry point for fedge._core (placeholder until the core lands).
#include <pybind11/pybind11.h>

namespace py = pybind11;

PYBIND11_MODULE(_core, m) {
  m.doc() = "fedge compiled core";
  m.def("build_info", []() {
    py::dict d;
    d["cuda_compiled"] = false;
    return d;
  });
}
