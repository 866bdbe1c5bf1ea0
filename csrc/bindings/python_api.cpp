// pybind11 bindings: raw device pointers (int), sizes and stream handles (int); no torch C++ ABI.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <cuda_runtime.h>
#include <string>
#include "../include/api.cuh"
#include "../include/exception.cuh"
#include "../include/layout.cuh"
#include "../include/ptx.cuh"

namespace py = pybind11;
using namespace moe_comm;

#ifndef MOE_COMM_ARCHS
#define MOE_COMM_ARCHS "unknown"
#endif

namespace {

template <typename T>
T* as_ptr(uint64_t p, const char* name, bool allow_null = false) {
  if (p == 0 && !allow_null) throw Error(std::string("argument '") + name + "' is a null pointer", __FILE__, __LINE__);
  return reinterpret_cast<T*>(static_cast<uintptr_t>(p));
}

cudaStream_t as_stream(uint64_t s) { return reinterpret_cast<cudaStream_t>(static_cast<uintptr_t>(s)); }

int device_count() {
  int n = 0;
  cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no device" state
    return 0;
  }
  return n;
}

std::string device_status() {
  int n = 0;
  cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess) {
    cudaGetLastError();
    return std::string("no usable CUDA device: ") + cudaGetErrorString(err);
  }
  if (n == 0) return "no CUDA device";
  return "ok";
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "moe_comm CUDA kernels (raw-pointer bindings)";
  py::register_exception<Error>(m, "MoeCommError", PyExc_RuntimeError);
  m.def("compiled_architectures", []() { return std::string(MOE_COMM_ARCHS); });
  m.def("device_count", &device_count);
  m.def("device_status", &device_status);
  m.def("token_record_bytes", [](size_t hidden_bytes, int num_scales, int num_topk) {
    return token_record_bytes(hidden_bytes, num_scales, num_topk);
  });
  m.def("header_bytes", [](int r, int e) { return header_bytes(r, e); });
  m.def("symmetric_buffer_bytes", [](int r, int e, int t, size_t hb, int ns, int k) {
    return symmetric_buffer_bytes(r, e, t, hb, ns, k);
  });
  m.def(
      "get_dispatch_layout",
      [](uint64_t topk_idx, int num_tokens, int num_topk, int num_experts, int num_ranks, uint64_t per_rank,
         uint64_t per_expert, uint64_t in_rank, int num_sms, uint64_t stream) {
        launch_get_dispatch_layout(as_ptr<const int64_t>(topk_idx, "topk_idx", num_tokens == 0), num_tokens, num_topk,
                                   num_experts, num_ranks, as_ptr<int>(per_rank, "num_tokens_per_rank"),
                                   as_ptr<int>(per_expert, "num_tokens_per_expert"),
                                   as_ptr<bool>(in_rank, "is_token_in_rank", num_tokens == 0), num_sms,
                                   as_stream(stream));
      },
      py::arg("topk_idx"), py::arg("num_tokens"), py::arg("num_topk"), py::arg("num_experts"), py::arg("num_ranks"),
      py::arg("num_tokens_per_rank"), py::arg("num_tokens_per_expert"), py::arg("is_token_in_rank"),
      py::arg("num_sms"), py::arg("stream"));
  m.def(
      "sm_copy",
      [](uint64_t dst, uint64_t src, size_t bytes, int num_sms, uint64_t stream) {
        launch_sm_copy(as_ptr<void>(dst, "dst"), as_ptr<const void>(src, "src"), bytes, num_sms, as_stream(stream));
      },
      py::arg("dst"), py::arg("src"), py::arg("bytes"), py::arg("num_sms"), py::arg("stream"));
  m.def("timeout_record_bytes", []() { return sizeof(TimeoutRecord); });
  m.def(
      "barrier",
      [](uint64_t counters_table, int rank, int num_ranks, int epoch, long long timeout_cycles, uint64_t err_record,
         uint64_t stream) {
        launch_barrier(as_ptr<int* const>(counters_table, "counters_table"), rank, num_ranks, epoch, timeout_cycles,
                       as_ptr<void>(err_record, "err_record"), as_stream(stream));
      },
      py::arg("counters_table"), py::arg("rank"), py::arg("num_ranks"), py::arg("epoch"), py::arg("timeout_cycles"),
      py::arg("err_record"), py::arg("stream"));
}
