// Intranode combine, the dispatch in reverse: each expert rank writes every received row back into its own
// combine region of the token owner's buffer, at the row's position among that owner's rows; each owner then
// sums, per token and in rank order, the rows of every rank the token reached (float32, or float64 for
// float64 rows), adds the biases and casts back. Deterministic: one warp owns a token, no atomics.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include "../include/exception.cuh"
#include "../include/launch.cuh"
#include "../include/intranode.cuh"
#include "../include/layout.cuh"
#include "../include/ptx.cuh"

namespace moe_comm {
namespace {

__global__ void __launch_bounds__(kIntranodeThreads) combine_send_kernel(CombineSendArgs a) {
  const PeerView v = launch_view(a.view, kCombineSend);
  // Every token owner must have reduced what we returned in the previous epoch.
  const bool ok = block_wait_all_ranks(v, kSlotCombineFree, epoch_before(v.epoch), kPhaseCombineFree);
  if (ok) {
    __shared__ int s_start[kMaxRanks + 1];
    if (threadIdx.x == 0) {
      int total = 0;
      for (int s = 0; s < v.num_ranks; ++s) {
        s_start[s] = total;
        total += a.recv_counts[s];
      }
      s_start[v.num_ranks] = total;
    }
    __syncthreads();

    const size_t rec_bytes = combine_record_bytes(a.row_bytes, a.num_topk);
    const size_t weights_offset = align_up(a.row_bytes, 16);
    const auto [lane, warp, num_warps] = warp_index();
    const uint8_t* x = static_cast<const uint8_t*>(a.x);
    for (int i = warp; i < s_start[v.num_ranks]; i += num_warps) {
      const int s = source_of_row(s_start, v.num_ranks, i);
      const int j = i - s_start[s];
      if (j >= a.capacity_rows) {
        if (lane == 0) record_error(v.err, v.rank, s, kPhaseOverflow, a.capacity_rows, j);
        continue;
      }
      uint8_t* dst = v.peers[s] + combine_region_offset(v.rank, v.num_ranks, v.dispatch_region_bytes,
                                                        v.combine_region_bytes) + size_t(j) * rec_bytes;
      warp_copy16(dst, x + size_t(i) * a.row_bytes, a.row_bytes, lane);
      if (a.topk_weights != nullptr && lane < a.num_topk)
        reinterpret_cast<float*>(dst + weights_offset)[lane] = a.topk_weights[size_t(i) * a.num_topk + lane];
    }
  }
  release_on_every_rank_when_done(v, kCombineSend, kSlotCombineFlag, ok);
}

template <typename T>
__global__ void __launch_bounds__(kIntranodeThreads) combine_recv_kernel(CombineRecvArgs a) {
  using AccT = typename Acc<T>::type;
  constexpr int kVec = 16 / sizeof(T);  // elements per 16-byte load
  const PeerView v = launch_view(a.view, kCombineRecv);
  const bool ok = block_wait_all_ranks(v, kSlotCombineFlag, v.epoch, kPhaseCombineArrive);
  if (ok) {
    const size_t row_bytes = size_t(a.hidden) * sizeof(T);
    const size_t rec_bytes = combine_record_bytes(row_bytes, a.num_topk);
    const size_t weights_offset = align_up(row_bytes, 16);
    const auto [lane, warp, num_warps] = warp_index();
    const AccT* bias0 = static_cast<const AccT*>(a.bias0);
    const AccT* bias1 = static_cast<const AccT*>(a.bias1);
    T* out = static_cast<T*>(a.out);
    for (int t = warp; t < a.num_tokens; t += num_warps) {
      // One slot per rank, null where the token did not go: indexed only by unrolled constants, so the
      // pointers stay in registers, and every rank's 16 bytes of a chunk are loaded before any is summed
      // (up to kMaxRanks loads in flight per lane instead of one).
      const uint8_t* rows[kMaxRanks];
#pragma unroll
      for (int d = 0; d < kMaxRanks; ++d) {
        const int pos = token_position(v, a.is_token_in_rank, a.send_pos, t, d, a.capacity_rows, lane);
        rows[d] = pos < 0 ? nullptr
                          : v.peers[v.rank] +
                                combine_region_offset(d, v.num_ranks, v.dispatch_region_bytes, v.combine_region_bytes) +
                                size_t(pos) * rec_bytes;
      }
      for (int c = lane * kVec; c < a.hidden; c += 32 * kVec) {
        int4 packed[kMaxRanks];
#pragma unroll
        for (int d = 0; d < kMaxRanks; ++d)
          if (rows[d] != nullptr) packed[d] = *reinterpret_cast<const int4*>(rows[d] + size_t(c) * sizeof(T));
        AccT acc[kVec];
#pragma unroll
        for (int k = 0; k < kVec; ++k) acc[k] = AccT(0);
#pragma unroll
        for (int d = 0; d < kMaxRanks; ++d) {  // rank order: deterministic and equal to the portable backend
          if (rows[d] == nullptr) continue;
          const T* vals = reinterpret_cast<const T*>(&packed[d]);
#pragma unroll
          for (int k = 0; k < kVec; ++k) acc[k] += to_acc(vals[k]);
        }
        if (bias0 != nullptr) {
#pragma unroll
          for (int k = 0; k < kVec; ++k) acc[k] += bias0[size_t(t) * a.hidden + c + k];
        }
        if (bias1 != nullptr) {
#pragma unroll
          for (int k = 0; k < kVec; ++k) acc[k] += bias1[size_t(t) * a.hidden + c + k];
        }
        int4 result;
        T* res = reinterpret_cast<T*>(&result);
#pragma unroll
        for (int k = 0; k < kVec; ++k) res[k] = from_acc<T>(acc[k]);
        *reinterpret_cast<int4*>(out + size_t(t) * a.hidden + c) = result;
      }
      if (a.out_weights != nullptr && lane < a.num_topk) {
        float w = 0.0f;
#pragma unroll
        for (int d = 0; d < kMaxRanks; ++d)
          if (rows[d] != nullptr) w += reinterpret_cast<const float*>(rows[d] + weights_offset)[lane];
        a.out_weights[size_t(t) * a.num_topk + lane] = w;
      }
    }
  }
  release_on_every_rank_when_done(v, kCombineRecv, kSlotCombineFree, ok);
}

}  // namespace

void launch_combine_send(const CombineSendArgs& a, int num_sms, cudaStream_t stream) {
  check_peer_view(a.view);
  MC_CHECK(num_sms >= 1, "num_sms must be >= 1");
  MC_CHECK(a.row_bytes > 0 && a.row_bytes % 16 == 0, "row_bytes must be a positive multiple of 16");
  MC_CHECK(a.num_topk >= 0 && a.num_topk <= kMaxTopk, "num_topk must be in [0, 32]");
  MC_CHECK(a.recv_counts != nullptr, "recv_counts: null pointer");
  MC_CHECK(size_t(a.capacity_rows) * combine_record_bytes(a.row_bytes, a.num_topk) <= a.view.combine_region_bytes,
           "capacity_rows exceeds the combine region");
  MC_CHECK(reinterpret_cast<uintptr_t>(a.x) % 16 == 0, "x must be 16-byte aligned");
  launch_kernel(combine_send_kernel, num_sms, kIntranodeThreads, 0, stream, a);
}

void launch_combine_recv(const CombineRecvArgs& a, int num_sms, cudaStream_t stream) {
  check_peer_view(a.view);
  MC_CHECK(num_sms >= 1, "num_sms must be >= 1");
  const size_t row_bytes = size_t(a.hidden) * dtype_size(a.dtype);
  MC_CHECK(a.hidden > 0 && row_bytes % 16 == 0, "hidden: a row must be a positive multiple of 16 bytes");
  MC_CHECK(a.num_topk >= 0 && a.num_topk <= kMaxTopk, "num_topk must be in [0, 32]");
  MC_CHECK(a.num_tokens == 0 || (a.out != nullptr && a.is_token_in_rank != nullptr && a.send_pos != nullptr),
           "out/is_token_in_rank/send_pos: null pointer");
  MC_CHECK(reinterpret_cast<uintptr_t>(a.out) % 16 == 0, "out must be 16-byte aligned");
  MC_CHECK(size_t(a.capacity_rows) * combine_record_bytes(row_bytes, a.num_topk) <= a.view.combine_region_bytes,
           "capacity_rows exceeds the combine region");
  switch (a.dtype) {
    case kBFloat16: launch_kernel(combine_recv_kernel<__nv_bfloat16>, num_sms, kIntranodeThreads, 0, stream, a); break;
    case kFloat16: launch_kernel(combine_recv_kernel<__half>, num_sms, kIntranodeThreads, 0, stream, a); break;
    case kFloat32: launch_kernel(combine_recv_kernel<float>, num_sms, kIntranodeThreads, 0, stream, a); break;
    case kFloat64: launch_kernel(combine_recv_kernel<double>, num_sms, kIntranodeThreads, 0, stream, a); break;
  }
}

}  // namespace moe_comm
