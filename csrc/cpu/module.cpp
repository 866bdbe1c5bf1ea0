// moe_comm._cpu: the portable backend's compiled host kernels (csrc/cpu/), bound with raw pointers and sizes
// only (no torch C++ ABI), like moe_comm._C. The Python side (moe_comm/cpu_kernels.py) checks dtypes, shapes
// and devices; the kernels check indices, so a bad value is a ValueError, never a stray read. The GIL is
// released while they run.
#include <pybind11/pybind11.h>

#include "common.h"

namespace py = pybind11;
using moe_comm::cpu::bag_sum;
using moe_comm::cpu::localize_topk;

PYBIND11_MODULE(_cpu, m) {
  m.doc() = "Host-CPU kernels of moe_comm's portable backend (raw pointers; see moe_comm/cpu_kernels.py).";
  const auto released = py::call_guard<py::gil_scoped_release>();
  m.def("bag_sum", &bag_sum, py::arg("rows"), py::arg("dtype"), py::arg("num_rows"), py::arg("hidden"),
        py::arg("element_row"), py::arg("num_elements"), py::arg("bag_end"), py::arg("num_tokens"), py::arg("bias0"),
        py::arg("bias1"), py::arg("out"), py::arg("num_threads"), released,
        "out[t] = round(sum of rows[element_row[bag_end[t-1]:bag_end[t]]] + bias0[t] + bias1[t]), accumulated in "
        "float32 (float64 for float64) in bag order, rounded once to nearest even.");
  m.def("localize_topk", &localize_topk, py::arg("global_ids"), py::arg("ids_row_stride"), py::arg("weights"),
        py::arg("weights_row_stride"), py::arg("num_rows"), py::arg("num_topk"), py::arg("first_expert"),
        py::arg("num_local_experts"), py::arg("local_ids"), py::arg("local_weights"), py::arg("counts"), released,
        "int32 global ids (row stride in elements) -> int64 local ids (-1 elsewhere), float32 weights zeroed "
        "elsewhere, and int64 counts per local expert.");
}
