// Host-side launchers implemented in csrc/kernels/*.cu, called by the bindings.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

namespace moe_comm {

// topk_idx [T, K] int64 (-1 = none) -> num_tokens_per_rank [R] int32, num_tokens_per_expert [E] int32,
// is_token_in_rank [T, R] bool. Outputs need not be zeroed. Grid bounded by num_sms.
void launch_get_dispatch_layout(const int64_t* topk_idx, int num_tokens, int num_topk, int num_experts,
                                int num_ranks, int* num_tokens_per_rank, int* num_tokens_per_expert,
                                bool* is_token_in_rank, int num_sms, cudaStream_t stream);

// A rank's routing plan from is_token_in_rank [T, R] bool: send_pos [T, R] int32 (token t's position among
// the tokens for rank r, -1 where t does not go to r), send_token_idx [num_sent] int64 (null when num_sent is 0:
// the tokens rank-major then in token order, -1 after them), and recv_counts [R] and expert_counts
// [num_local_experts] (null when 0) int32 zeroed for the receive to fill. Grid bounded by num_sms (and R).
void launch_routing_plan(const bool* is_token_in_rank, int num_tokens, int num_ranks, int* send_pos,
                         int64_t* send_token_idx, int num_sent, int* recv_counts, int* expert_counts,
                         int num_local_experts, int num_sms, cudaStream_t stream);

// Plain device copy restricted to num_sms blocks (bench baseline).
void launch_sm_copy(void* dst, const void* src, size_t bytes, int num_sms, cudaStream_t stream);

// Cross-rank barrier: counters_table is a device array of num_ranks device pointers (peer counter arrays).
// err_record: host-mapped TimeoutRecord (ptx.cuh) filled on timeout; the host checks it after syncing.
void launch_barrier(int* const* counters_table, int rank, int num_ranks, int epoch, long long timeout_ns,
                    void* err_record, cudaStream_t stream);

}  // namespace moe_comm

// Symmetric-buffer memory and CUDA IPC (csrc/runtime/memory.cpp). Pointers travel as integers.
#include <string>
namespace moe_comm {
uint64_t device_alloc_zeroed(int device, size_t bytes);
void device_free(int device, uint64_t ptr);
std::string ipc_get_handle(int device, uint64_t ptr);
uint64_t ipc_open_handle(int device, const std::string& handle);
void ipc_close_handle(int device, uint64_t ptr);
int device_attribute(int device, const std::string& name);  // "clock_rate_khz" or "sm_count"
}  // namespace moe_comm
