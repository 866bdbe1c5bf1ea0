#include <algorithm>
#include "../include/api.cuh"
#include "../include/exception.cuh"
#include "../include/launch.cuh"

namespace moe_comm {
namespace {

constexpr int kThreads = 256;

__global__ void zero_counts(int* per_rank, int num_ranks, int* per_expert, int num_experts) {
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < num_ranks + num_experts; i += gridDim.x * blockDim.x) {
    if (i < num_ranks) per_rank[i] = 0;
    else per_expert[i - num_ranks] = 0;
  }
}

// One thread per token (grid-stride). Per-rank membership is deduplicated per token; counts go through
// shared memory then one global atomic per block and bin.
__global__ void layout_kernel(const int64_t* __restrict__ topk_idx, int num_tokens, int num_topk, int num_experts,
                              int num_ranks, int* per_rank, int* per_expert, bool* in_rank) {
  MC_DYNAMIC_SHARED(int, smem);
  int* s_rank = smem;
  int* s_expert = smem + num_ranks;
  for (int i = threadIdx.x; i < num_ranks + num_experts; i += blockDim.x) smem[i] = 0;
  __syncthreads();
  const int experts_per_rank = num_experts / num_ranks;
  for (int t = blockIdx.x * blockDim.x + threadIdx.x; t < num_tokens; t += gridDim.x * blockDim.x) {
    unsigned seen = 0;  // up to 32 ranks
    for (int k = 0; k < num_topk; ++k) {
      int64_t e = topk_idx[int64_t(t) * num_topk + k];
      if (e < 0 || e >= num_experts) continue;
      atomicAdd(&s_expert[e], 1);
      seen |= 1u << int(e / experts_per_rank);
    }
    for (int r = 0; r < num_ranks; ++r) {
      bool hit = (seen >> r) & 1u;
      in_rank[int64_t(t) * num_ranks + r] = hit;
      if (hit) atomicAdd(&s_rank[r], 1);
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < num_ranks; i += blockDim.x)
    if (s_rank[i]) atomicAdd(&per_rank[i], s_rank[i]);
  for (int i = threadIdx.x; i < num_experts; i += blockDim.x)
    if (s_expert[i]) atomicAdd(&per_expert[i], s_expert[i]);
}

// The sum over the block of every thread's `value`; every thread gets it. `scratch` holds a value per warp.
__device__ __forceinline__ int block_sum(int value, int* scratch) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, num_warps = blockDim.x / 32;
#pragma unroll
  for (int off = 16; off > 0; off /= 2) value += __shfl_xor_sync(0xffffffffu, value, off);
  if (lane == 0) scratch[warp] = value;
  __syncthreads();
  int total = 0;
  for (int w = 0; w < num_warps; ++w) total += scratch[w];
  __syncthreads();  // scratch is free again
  return total;
}

// A rank's routing plan, one block per destination rank r (grid-stride over ranks): send_pos[t, r] is the
// position of token t among the tokens for r (-1 where t does not go to r), by a block-wide scan down the
// column in chunks of blockDim tokens; send_token_idx (null to skip) lists the tokens rank-major, then in
// token order, in its first num_sent entries, -1 after the last listed token; recv_counts [R] and expert_counts
// [num_local_experts] (the receive's counts) are zeroed.
__global__ void routing_plan_kernel(const bool* __restrict__ in_rank, int num_tokens, int num_ranks, int* send_pos,
                                    int64_t* send_token_idx, int num_sent, int* recv_counts, int* expert_counts,
                                    int num_local_experts) {
  __shared__ int s_warp[kThreads / 32];
  if (blockIdx.x == 0) {
    for (int i = threadIdx.x; i < num_ranks; i += blockDim.x) recv_counts[i] = 0;
    for (int i = threadIdx.x; i < num_local_experts; i += blockDim.x) expert_counts[i] = 0;
  }
  for (int r = blockIdx.x; r < num_ranks; r += gridDim.x) {
    // Where r's tokens start in send_token_idx: after the tokens of every rank before it.
    int before = 0;
    for (int t = threadIdx.x; t < num_tokens; t += blockDim.x)
      for (int q = 0; q < r; ++q) before += in_rank[size_t(t) * num_ranks + q];
    const int start = block_sum(before, s_warp);

    int count = 0;  // r's tokens in the chunks done
    for (int chunk = 0; chunk < num_tokens; chunk += blockDim.x) {
      const int t = chunk + threadIdx.x;
      const bool hit = t < num_tokens && in_rank[size_t(t) * num_ranks + r];
      int in_chunk;
      const int below = block_count_below(hit, s_warp, in_chunk);
      if (t < num_tokens) {
        const int pos = count + below;
        send_pos[size_t(t) * num_ranks + r] = hit ? pos : -1;
        if (hit && send_token_idx != nullptr && start + pos < num_sent) send_token_idx[start + pos] = t;
      }
      count += in_chunk;
    }
    if (r == num_ranks - 1 && send_token_idx != nullptr)
      for (int i = start + count + threadIdx.x; i < num_sent; i += blockDim.x) send_token_idx[i] = -1;
  }
}

}  // namespace

void launch_routing_plan(const bool* is_token_in_rank, int num_tokens, int num_ranks, int* send_pos,
                         int64_t* send_token_idx, int num_sent, int* recv_counts, int* expert_counts,
                         int num_local_experts, int num_sms, cudaStream_t stream) {
  MC_CHECK(num_ranks >= 1 && num_ranks <= 32, "num_ranks must be in [1, 32]");
  MC_CHECK(num_tokens >= 0 && num_sent >= 0, "num_tokens and num_sent must be >= 0");
  MC_CHECK(num_sms >= 1, "num_sms must be >= 1");
  MC_CHECK(num_tokens == 0 || (is_token_in_rank != nullptr && send_pos != nullptr),
           "is_token_in_rank/send_pos: null pointer");
  MC_CHECK(num_sent == 0 || send_token_idx != nullptr, "send_token_idx: null pointer with num_sent > 0");
  MC_CHECK(recv_counts != nullptr, "recv_counts: null pointer");
  MC_CHECK(num_local_experts >= 0 && (num_local_experts == 0 || expert_counts != nullptr),
           "expert_counts: null pointer with num_local_experts > 0");
  launch_kernel(routing_plan_kernel, std::min(num_sms, num_ranks), kThreads, 0, stream, is_token_in_rank, num_tokens,
                num_ranks, send_pos, send_token_idx, num_sent, recv_counts, expert_counts, num_local_experts);
}

void launch_get_dispatch_layout(const int64_t* topk_idx, int num_tokens, int num_topk, int num_experts,
                                int num_ranks, int* num_tokens_per_rank, int* num_tokens_per_expert,
                                bool* is_token_in_rank, int num_sms, cudaStream_t stream) {
  MC_CHECK(num_ranks >= 1 && num_ranks <= 32, "num_ranks must be in [1, 32]");
  MC_CHECK(num_experts >= num_ranks && num_experts % num_ranks == 0, "num_experts must be a multiple of num_ranks");
  MC_CHECK(num_topk >= 0 && num_topk <= 32, "num_topk must be in [0, 32]");
  MC_CHECK(num_tokens >= 0, "num_tokens must be >= 0");
  MC_CHECK(num_sms >= 1, "num_sms must be >= 1");
  int blocks = std::max(1, std::min(num_sms, (num_tokens + kThreads - 1) / kThreads));
  launch_kernel(zero_counts, 1, kThreads, 0, stream, num_tokens_per_rank, num_ranks, num_tokens_per_expert,
                num_experts);
  size_t smem = size_t(num_ranks + num_experts) * sizeof(int);
  MC_CHECK(smem <= 48 * 1024, "num_experts too large for the layout kernel's shared memory");
  if (num_tokens == 0) return;
  launch_kernel(layout_kernel, blocks, kThreads, smem, stream, topk_idx, num_tokens, num_topk, num_experts, num_ranks,
                num_tokens_per_rank, num_tokens_per_expert, is_token_in_rank);
}

}  // namespace moe_comm
