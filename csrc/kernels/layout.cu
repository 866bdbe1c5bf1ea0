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

}  // namespace

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
