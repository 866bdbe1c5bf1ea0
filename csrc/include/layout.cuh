// Byte layout of the fixed worst-case receive regions of the symmetric buffer (see docs/kernels.md).
// Host and device share this arithmetic; tests/test_cuda_build.py checks it against Python.
#pragma once
#include <cstddef>
#include <cstdint>

namespace moe_comm {

__host__ __device__ constexpr size_t align_up(size_t x, size_t a) { return (x + a - 1) / a * a; }

// One received token record: row bytes, FP8 scales, top-k idx (int64) + weights (f32), source index (int32).
__host__ __device__ constexpr size_t token_record_bytes(size_t hidden_bytes, int num_scales, int num_topk) {
  return align_up(hidden_bytes, 16) + align_up(size_t(num_scales) * 4, 16) +
         align_up(size_t(num_topk) * 8, 16) + align_up(size_t(num_topk) * 4, 16) + 16;
}

// Per rank: header (counts matrix R*R int32 + expert counts R*E int32 + flags R*R uint64), then R receive
// regions of max_tokens records each.
__host__ __device__ constexpr size_t header_bytes(int num_ranks, int num_experts) {
  return align_up(size_t(num_ranks) * num_ranks * 4, 128) + align_up(size_t(num_ranks) * num_experts * 4, 128) +
         align_up(size_t(num_ranks) * num_ranks * 8, 128);
}

__host__ __device__ constexpr size_t region_bytes(int max_tokens, size_t hidden_bytes, int num_scales, int num_topk) {
  return align_up(size_t(max_tokens) * token_record_bytes(hidden_bytes, num_scales, num_topk), 128);
}

__host__ __device__ constexpr size_t symmetric_buffer_bytes(int num_ranks, int num_experts, int max_tokens,
                                                            size_t hidden_bytes, int num_scales, int num_topk) {
  return header_bytes(num_ranks, num_experts) +
         size_t(num_ranks) * region_bytes(max_tokens, hidden_bytes, num_scales, num_topk);
}

}  // namespace moe_comm
