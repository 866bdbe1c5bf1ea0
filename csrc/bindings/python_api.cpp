// pybind11 bindings: raw device pointers (int), sizes and stream handles (int); no torch C++ ABI.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <cuda_runtime.h>
#include <string>
#include "../include/api.cuh"
#include "../include/exception.cuh"
#include "../include/intranode.cuh"
#include "../include/layout.cuh"
#include "../include/ptx.cuh"

namespace py = pybind11;
using namespace moe_comm;

#ifndef MOE_COMM_ARCHS
#define MOE_COMM_ARCHS "unknown"
#endif
#if defined(MOE_COMM_SIMT)
#define MOE_COMM_MODULE _C_simt  // the same bindings, the kernels on CPU fibers (csrc/simt)
#else
#define MOE_COMM_MODULE _C
#endif

namespace {

template <typename T>
T* as_ptr(uint64_t p, const char* name, bool allow_null = false) {
  if (p == 0 && !allow_null) throw Error(std::string("argument '") + name + "' is a null pointer", __FILE__, __LINE__);
  return reinterpret_cast<T*>(static_cast<uintptr_t>(p));
}

cudaStream_t as_stream(uint64_t s) { return reinterpret_cast<cudaStream_t>(static_cast<uintptr_t>(s)); }

// view = (peers, rank, num_ranks, dispatch_region_bytes, combine_region_bytes, timeout_ns, err_record):
// moe_comm/backends/cuda_memory.py builds it. No per-call state: the epochs live in the header.
PeerView peer_view(const py::tuple& t) {
  if (t.size() != 7) throw Error("view: expected a 7-tuple, got " + std::to_string(t.size()) + " items", __FILE__, __LINE__);
  PeerView v;
  v.peers = as_ptr<uint8_t* const>(t[0].cast<uint64_t>(), "view.peers");
  v.rank = t[1].cast<int>();
  v.num_ranks = t[2].cast<int>();
  v.dispatch_region_bytes = t[3].cast<size_t>();
  v.combine_region_bytes = t[4].cast<size_t>();
  v.epoch = 0;
  v.timeout_ns = t[5].cast<long long>();
  v.err = as_ptr<TimeoutRecord>(t[6].cast<uint64_t>(), "view.err");
  return v;
}

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

PYBIND11_MODULE(MOE_COMM_MODULE, m) {
  m.doc() = "moe_comm CUDA kernels (raw-pointer bindings)";
#if defined(MOE_COMM_SIMT)
  m.def("simt_configure", [](int order, uint64_t seed) {
          MC_CHECK(order >= 0 && order <= 2, "order: 0 (forward), 1 (reverse) or 2 (shuffled)");
          simt::configure(simt::Order(order), seed);
        },
        py::arg("order"), py::arg("seed"), "Block and thread order of later launches: 0 forward, 1 reverse, 2 shuffled.");
  m.def("simt_launches", &simt::launches_completed, "Kernel launches completed in this process.");
  m.def(
      "simt_launch_shapes",
      [](size_t first) {
        py::list shapes;
        const auto& all = simt::launch_shapes();
        for (size_t i = first; i < all.size(); ++i)
          shapes.append(py::make_tuple(all[i].blocks, all[i].threads, all[i].smem_bytes));
        return shapes;
      },
      py::arg("first") = 0, "(blocks, threads per block, dynamic shared bytes) of launches first, first + 1, ...");
  m.def(
      "simt_selftest",
      [](const std::string& name, int blocks, int threads) {
        std::vector<long long> out;
        std::string error = simt::selftest(name, blocks, threads, &out);
        return py::make_tuple(error, out);
      },
      py::arg("name"), py::arg("blocks"), py::arg("threads"),
      "Runs a kernel of csrc/simt/selftest.cpp: (launch error or '', its output values).");
#if defined(MOE_COMM_SIMT_TSAN)
  m.attr("SIMT_THREAD_SANITIZER") = true;  // every CUDA thread a TSan fiber (scripts/simt_tsan.sh)
#else
  m.attr("SIMT_THREAD_SANITIZER") = false;
#endif
#endif
  py::register_exception<Error>(m, "MoeCommError", PyExc_RuntimeError);
  m.def("compiled_architectures", []() { return std::string(MOE_COMM_ARCHS); });
  m.def("device_count", &device_count);
  m.def("device_status", &device_status);
  m.def("token_record_bytes", [](size_t row_bytes, int num_scales, int num_topk) {
    return token_record_bytes(row_bytes, num_scales, num_topk);
  });
  m.def("combine_record_bytes", [](size_t row_bytes, int num_topk) { return combine_record_bytes(row_bytes, num_topk); });
  m.def("symmetric_buffer_bytes", [](int r, size_t dispatch_region_bytes, size_t combine_region_bytes) {
    return symmetric_buffer_bytes(r, dispatch_region_bytes, combine_region_bytes);
  });
  m.attr("HEADER_BYTES") = kHeaderBytes;
  m.attr("MAX_RANKS") = kMaxRanks;
  m.attr("MAX_TOPK") = kMaxTopk;
  m.attr("NO_CAST") = int(kNoCast);
  py::dict slots;
  slots["dispatch_flag"] = int(kSlotDispatchFlag);
  slots["dispatch_count"] = int(kSlotDispatchCount);
  slots["dispatch_free"] = int(kSlotDispatchFree);
  slots["combine_flag"] = int(kSlotCombineFlag);
  slots["combine_free"] = int(kSlotCombineFree);
  slots["barrier"] = int(kSlotBarrier);
  slots["blocks_done"] = int(kSlotBlocksDone);
  slots["epochs"] = int(kSlotEpochs);
  slots["launch_failed"] = int(kSlotLaunchFailed);
  slots["abort"] = int(kSlotAbort);
  m.attr("HEADER_SLOTS") = slots;
  py::dict kernels;  // index of each kernel's counters in the blocks_done and epochs slot arrays
  kernels["dispatch_send"] = int(kDispatchSend);
  kernels["dispatch_recv"] = int(kDispatchRecv);
  kernels["combine_send"] = int(kCombineSend);
  kernels["combine_recv"] = int(kCombineRecv);
  m.attr("KERNEL_IDS") = kernels;
  py::dict phases;
  phases["barrier"] = int(kPhaseBarrier);
  phases["dispatch_free"] = int(kPhaseDispatchFree);
  phases["dispatch_arrive"] = int(kPhaseDispatchArrive);
  phases["combine_free"] = int(kPhaseCombineFree);
  phases["combine_arrive"] = int(kPhaseCombineArrive);
  phases["overflow"] = int(kPhaseOverflow);
  phases["peer_aborted"] = int(kPhasePeerAborted);
  m.attr("PHASES") = phases;

  m.def("device_alloc_zeroed", &device_alloc_zeroed, py::arg("device"), py::arg("bytes"));
  m.def("device_free", &device_free, py::arg("device"), py::arg("ptr"));
  m.def("ipc_get_handle", [](int device, uint64_t ptr) { return py::bytes(ipc_get_handle(device, ptr)); },
        py::arg("device"), py::arg("ptr"));
  m.def("ipc_open_handle", [](int device, py::bytes handle) { return ipc_open_handle(device, std::string(handle)); },
        py::arg("device"), py::arg("handle"));
  m.def("ipc_close_handle", &ipc_close_handle, py::arg("device"), py::arg("ptr"));
  m.def("device_attribute", &device_attribute, py::arg("device"), py::arg("name"));

  m.def(
      "dispatch_send",
      [](py::tuple view, uint64_t x, uint64_t x_scales, uint64_t topk_idx, uint64_t topk_weights,
         uint64_t is_token_in_rank, uint64_t send_pos, uint64_t num_tokens_per_rank, int num_tokens, int row_bytes,
         int num_scales, int num_topk, int experts_per_rank, int capacity_rows, int cast_dtype, int num_sms,
         uint64_t stream) {
        DispatchSendArgs a{peer_view(view),
                           as_ptr<const void>(x, "x", true),
                           as_ptr<const float>(x_scales, "x_scales", true),
                           as_ptr<const int64_t>(topk_idx, "topk_idx", true),
                           as_ptr<const float>(topk_weights, "topk_weights", true),
                           as_ptr<const bool>(is_token_in_rank, "is_token_in_rank", true),
                           as_ptr<const int>(send_pos, "send_pos", true),
                           as_ptr<const int>(num_tokens_per_rank, "num_tokens_per_rank"),
                           num_tokens, row_bytes, num_scales, num_topk, experts_per_rank, capacity_rows,
                           cast_dtype};
        launch_dispatch_send(a, num_sms, as_stream(stream));
      },
      py::arg("view"), py::arg("x"), py::arg("x_scales"), py::arg("topk_idx"), py::arg("topk_weights"),
      py::arg("is_token_in_rank"), py::arg("send_pos"), py::arg("num_tokens_per_rank"), py::arg("num_tokens"),
      py::arg("row_bytes"), py::arg("num_scales"), py::arg("num_topk"), py::arg("experts_per_rank"),
      py::arg("capacity_rows"), py::arg("cast_dtype"), py::arg("num_sms"), py::arg("stream"));
  m.def(
      "dispatch_recv",
      [](py::tuple view, uint64_t recv_x, uint64_t recv_scales, uint64_t recv_topk_idx, uint64_t recv_topk_weights,
         uint64_t recv_src_idx, uint64_t recv_src_rank, uint64_t recv_counts, uint64_t recv_expert_counts,
         int num_local_experts, int max_rows, int row_bytes, int num_scales, int num_topk, int capacity_rows,
         bool pad_rows, int num_sms, uint64_t stream) {
        DispatchRecvArgs a{peer_view(view),
                           as_ptr<void>(recv_x, "recv_x", true),
                           as_ptr<float>(recv_scales, "recv_scales", true),
                           as_ptr<int64_t>(recv_topk_idx, "recv_topk_idx", true),
                           as_ptr<float>(recv_topk_weights, "recv_topk_weights", true),
                           as_ptr<int>(recv_src_idx, "recv_src_idx", true),
                           as_ptr<int>(recv_src_rank, "recv_src_rank", true),
                           as_ptr<int>(recv_counts, "recv_counts"),
                           as_ptr<int>(recv_expert_counts, "recv_expert_counts", true),
                           num_local_experts,
                           max_rows, row_bytes, num_scales, num_topk, capacity_rows, pad_rows ? 1 : 0};
        launch_dispatch_recv(a, num_sms, as_stream(stream));
      },
      py::arg("view"), py::arg("recv_x"), py::arg("recv_scales"), py::arg("recv_topk_idx"),
      py::arg("recv_topk_weights"), py::arg("recv_src_idx"), py::arg("recv_src_rank"), py::arg("recv_counts"),
      py::arg("recv_expert_counts"), py::arg("num_local_experts"), py::arg("max_rows"), py::arg("row_bytes"),
      py::arg("num_scales"), py::arg("num_topk"), py::arg("capacity_rows"), py::arg("pad_rows"), py::arg("num_sms"),
      py::arg("stream"));
  m.def(
      "combine_send",
      [](py::tuple view, uint64_t x, uint64_t topk_weights, uint64_t recv_counts, int row_bytes, int num_topk,
         int capacity_rows, int num_sms, uint64_t stream) {
        CombineSendArgs a{peer_view(view), as_ptr<const void>(x, "x", true),
                          as_ptr<const float>(topk_weights, "topk_weights", true),
                          as_ptr<const int>(recv_counts, "recv_counts"), row_bytes, num_topk, capacity_rows};
        launch_combine_send(a, num_sms, as_stream(stream));
      },
      py::arg("view"), py::arg("x"), py::arg("topk_weights"), py::arg("recv_counts"), py::arg("row_bytes"),
      py::arg("num_topk"), py::arg("capacity_rows"), py::arg("num_sms"), py::arg("stream"));
  m.def(
      "combine_recv",
      [](py::tuple view, uint64_t is_token_in_rank, uint64_t send_pos, uint64_t bias0, uint64_t bias1, uint64_t out,
         uint64_t out_weights, int num_tokens, int hidden, int num_topk, int capacity_rows, int dtype, int num_sms,
         uint64_t stream) {
        CombineRecvArgs a{peer_view(view),
                          as_ptr<const bool>(is_token_in_rank, "is_token_in_rank", true),
                          as_ptr<const int>(send_pos, "send_pos", true),
                          as_ptr<const void>(bias0, "bias0", true),
                          as_ptr<const void>(bias1, "bias1", true),
                          as_ptr<void>(out, "out", true),
                          as_ptr<float>(out_weights, "out_weights", true),
                          num_tokens, hidden, num_topk, capacity_rows, dtype};
        launch_combine_recv(a, num_sms, as_stream(stream));
      },
      py::arg("view"), py::arg("is_token_in_rank"), py::arg("send_pos"), py::arg("bias0"), py::arg("bias1"),
      py::arg("out"), py::arg("out_weights"), py::arg("num_tokens"), py::arg("hidden"), py::arg("num_topk"),
      py::arg("capacity_rows"), py::arg("dtype"), py::arg("num_sms"), py::arg("stream"));
  m.def(
      "expert_major",
      [](uint64_t x, uint64_t scales, uint64_t local_ids, uint64_t src_idx, uint64_t src_rank, uint64_t out_x,
         uint64_t out_scales, uint64_t recv_count, uint64_t out_src_idx, uint64_t out_src_rank, uint64_t layout_range,
         uint64_t slot_of, uint64_t row_of, int num_rows, int row_bytes, int num_scales, int num_topk, int num_experts,
         int num_ranks, int num_sms, uint64_t stream) {
        const bool empty = num_rows == 0;
        ExpertMajorArgs a{as_ptr<const void>(x, "x", empty),
                          as_ptr<const float>(scales, "scales", true),
                          as_ptr<const int64_t>(local_ids, "local_ids", empty),
                          as_ptr<const int>(src_idx, "src_idx", empty),
                          as_ptr<const int>(src_rank, "src_rank", empty),
                          as_ptr<void>(out_x, "out_x", empty),
                          as_ptr<float>(out_scales, "out_scales", true),
                          as_ptr<int>(recv_count, "recv_count"),
                          as_ptr<int>(out_src_idx, "out_src_idx", empty),
                          as_ptr<int>(out_src_rank, "out_src_rank", empty),
                          as_ptr<int>(layout_range, "layout_range"),
                          as_ptr<int64_t>(slot_of, "slot_of", empty),
                          as_ptr<int>(row_of, "row_of", empty),
                          num_rows, row_bytes, num_scales, num_topk, num_experts, num_ranks};
        launch_expert_major(a, num_sms, as_stream(stream));
      },
      py::arg("x"), py::arg("scales"), py::arg("local_ids"), py::arg("src_idx"), py::arg("src_rank"), py::arg("out_x"),
      py::arg("out_scales"), py::arg("recv_count"), py::arg("out_src_idx"), py::arg("out_src_rank"),
      py::arg("layout_range"), py::arg("slot_of"), py::arg("row_of"), py::arg("num_rows"), py::arg("row_bytes"),
      py::arg("num_scales"), py::arg("num_topk"), py::arg("num_experts"), py::arg("num_ranks"), py::arg("num_sms"),
      py::arg("stream"));
  m.def(
      "low_latency_combine_send",
      [](py::tuple view, uint64_t x, uint64_t slot_of, uint64_t src_idx, uint64_t src_rank, int num_rows, int num_topk,
         int max_tokens, int row_bytes, int num_sms, uint64_t stream) {
        const bool empty = num_rows == 0;
        LowLatencyCombineSendArgs a{peer_view(view),
                                    as_ptr<const void>(x, "x", empty),
                                    as_ptr<const int64_t>(slot_of, "slot_of", empty),
                                    as_ptr<const int>(src_idx, "src_idx", empty),
                                    as_ptr<const int>(src_rank, "src_rank", empty),
                                    num_rows, num_topk, max_tokens, row_bytes};
        launch_low_latency_combine_send(a, num_sms, as_stream(stream));
      },
      py::arg("view"), py::arg("x"), py::arg("slot_of"), py::arg("src_idx"), py::arg("src_rank"), py::arg("num_rows"),
      py::arg("num_topk"), py::arg("max_tokens"), py::arg("row_bytes"), py::arg("num_sms"), py::arg("stream"));
  m.def(
      "low_latency_combine_recv",
      [](py::tuple view, uint64_t topk_idx, uint64_t topk_weights, uint64_t out, int num_tokens, int num_topk, int hidden,
         int experts_per_rank, int max_tokens, int dtype, int num_sms, uint64_t stream) {
        const bool empty = num_tokens == 0;
        LowLatencyCombineRecvArgs a{peer_view(view),
                                    as_ptr<const int64_t>(topk_idx, "topk_idx", empty),
                                    as_ptr<const float>(topk_weights, "topk_weights", empty),
                                    as_ptr<void>(out, "out", empty),
                                    num_tokens, num_topk, hidden, experts_per_rank, max_tokens, dtype};
        launch_low_latency_combine_recv(a, num_sms, as_stream(stream));
      },
      py::arg("view"), py::arg("topk_idx"), py::arg("topk_weights"), py::arg("out"), py::arg("num_tokens"),
      py::arg("num_topk"), py::arg("hidden"), py::arg("experts_per_rank"), py::arg("max_tokens"), py::arg("dtype"),
      py::arg("num_sms"), py::arg("stream"));
  m.def(
      "per_token_cast_fp8",
      [](uint64_t x, int dtype, int num_tokens, int hidden, uint64_t out_fp8, uint64_t out_scales, int num_sms,
         uint64_t stream) {
        launch_per_token_cast_fp8(as_ptr<const void>(x, "x", num_tokens == 0), dtype, num_tokens, hidden,
                                  as_ptr<void>(out_fp8, "out_fp8", num_tokens == 0),
                                  as_ptr<float>(out_scales, "out_scales", num_tokens == 0), num_sms, as_stream(stream));
      },
      py::arg("x"), py::arg("dtype"), py::arg("num_tokens"), py::arg("hidden"), py::arg("out_fp8"),
      py::arg("out_scales"), py::arg("num_sms"), py::arg("stream"));
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
      "routing_plan",
      [](uint64_t is_token_in_rank, int num_tokens, int num_ranks, uint64_t send_pos, uint64_t send_token_idx,
         int num_sent, uint64_t recv_counts, uint64_t expert_counts, int num_local_experts, int num_sms,
         uint64_t stream) {
        launch_routing_plan(as_ptr<const bool>(is_token_in_rank, "is_token_in_rank", num_tokens == 0), num_tokens,
                            num_ranks, as_ptr<int>(send_pos, "send_pos", num_tokens == 0),
                            as_ptr<int64_t>(send_token_idx, "send_token_idx", num_sent == 0), num_sent,
                            as_ptr<int>(recv_counts, "recv_counts"),
                            as_ptr<int>(expert_counts, "expert_counts", num_local_experts == 0), num_local_experts,
                            num_sms, as_stream(stream));
      },
      py::arg("is_token_in_rank"), py::arg("num_tokens"), py::arg("num_ranks"), py::arg("send_pos"),
      py::arg("send_token_idx"), py::arg("num_sent"), py::arg("recv_counts"), py::arg("expert_counts"),
      py::arg("num_local_experts"), py::arg("num_sms"), py::arg("stream"));
  m.def(
      "sm_copy",
      [](uint64_t dst, uint64_t src, size_t bytes, int num_sms, uint64_t stream) {
        launch_sm_copy(as_ptr<void>(dst, "dst"), as_ptr<const void>(src, "src"), bytes, num_sms, as_stream(stream));
      },
      py::arg("dst"), py::arg("src"), py::arg("bytes"), py::arg("num_sms"), py::arg("stream"));
  m.def("timeout_record_bytes", []() { return sizeof(TimeoutRecord); });
  m.def(
      "barrier",
      [](uint64_t counters_table, int rank, int num_ranks, int epoch, long long timeout_ns, uint64_t err_record,
         uint64_t stream) {
        launch_barrier(as_ptr<int* const>(counters_table, "counters_table"), rank, num_ranks, epoch, timeout_ns,
                       as_ptr<void>(err_record, "err_record"), as_stream(stream));
      },
      py::arg("counters_table"), py::arg("rank"), py::arg("num_ranks"), py::arg("epoch"), py::arg("timeout_ns"),
      py::arg("err_record"), py::arg("stream"));
}
