// Intranode dispatch: every sender writes each of its token records straight into its own region of each
// destination's symmetric buffer, at the token's position among its rows for that destination; every
// receiver waits for all sources' completion flags and copies the regions out in (source rank, token) order.
// Senders never wait on receivers of the same epoch, so there is no cycle (docs/kernels.md).
#include <algorithm>
#include "../include/exception.cuh"
#include "../include/intranode.cuh"
#include "../include/layout.cuh"
#include "../include/ptx.cuh"

namespace moe_comm {
namespace {

__global__ void __launch_bounds__(kIntranodeThreads) dispatch_send_kernel(DispatchSendArgs a) {
  const PeerView& v = a.view;
  int* own = header_of(v, v.rank);
  // Every destination must have read out what we wrote in the previous epoch before we overwrite it.
  if (!block_wait_all_ranks(own, kSlotDispatchFree, v.num_ranks, v.epoch - 1, v.timeout_ns, v.err, v.rank,
                            kPhaseDispatchFree))
    return;

  const RecordLayout rec(a.row_bytes, a.num_scales, a.num_topk);
  const auto [lane, warp, num_warps] = warp_index();
  const uint8_t* x = static_cast<const uint8_t*>(a.x);
  for (int t = warp; t < a.num_tokens; t += num_warps) {
    for (int d = 0; d < v.num_ranks; ++d) {
      if (!a.is_token_in_rank[size_t(t) * v.num_ranks + d]) continue;
      const int pos = a.send_pos[size_t(t) * v.num_ranks + d];
      if (pos < 0 || pos >= a.capacity_rows) {
        if (lane == 0) record_error(v.err, v.rank, d, kPhaseOverflow, a.capacity_rows, pos);
        continue;
      }
      uint8_t* dst = v.peers[d] + dispatch_region_offset(v.rank, v.dispatch_region_bytes) + size_t(pos) * rec.bytes;
      warp_copy16(dst, x + size_t(t) * a.row_bytes, a.row_bytes, lane);
      if (a.x_scales != nullptr) {
        float* s = reinterpret_cast<float*>(dst + rec.scales);
        for (int i = lane; i < a.num_scales; i += 32) s[i] = a.x_scales[size_t(t) * a.num_scales + i];
      }
      if (a.topk_idx != nullptr && lane < a.num_topk) {
        const int64_t e = a.topk_idx[size_t(t) * a.num_topk + lane];
        const int64_t first = int64_t(d) * a.experts_per_rank;
        const bool local = e >= first && e < first + a.experts_per_rank;
        reinterpret_cast<int*>(dst + rec.topk_idx)[lane] = local ? int(e - first) : -1;
        if (a.topk_weights != nullptr)
          reinterpret_cast<float*>(dst + rec.topk_weights)[lane] =
              local ? a.topk_weights[size_t(t) * a.num_topk + lane] : 0.0f;
      }
      if (lane == 0) reinterpret_cast<int*>(dst + rec.src_idx)[0] = t;
    }
  }

  __syncthreads();
  if (threadIdx.x == 0 && last_block_to_finish(own + kSlotBlocksDone + kDispatchSend, v.blocks_base)) {
    for (int d = 0; d < v.num_ranks; ++d) {
      int* peer = header_of(v, d);
      peer[kSlotDispatchCount + v.rank] = a.num_tokens_per_rank[d];
      st_release_sys(peer + kSlotDispatchFlag + v.rank, v.epoch);
    }
  }
}

__global__ void __launch_bounds__(kIntranodeThreads) dispatch_recv_kernel(DispatchRecvArgs a) {
  const PeerView& v = a.view;
  int* own = header_of(v, v.rank);
  if (!block_wait_all_ranks(own, kSlotDispatchFlag, v.num_ranks, v.epoch, v.timeout_ns, v.err, v.rank,
                            kPhaseDispatchArrive))
    return;

  __shared__ int s_start[kMaxRanks + 1];
  if (threadIdx.x == 0) {
    int total = 0;
    for (int s = 0; s < v.num_ranks; ++s) {
      s_start[s] = total;
      int count = ld_acquire_sys(own + kSlotDispatchCount + s);  // written before the flag we acquired
      if (count > a.capacity_rows) {
        record_error(v.err, v.rank, s, kPhaseOverflow, a.capacity_rows, count);
        count = a.capacity_rows;
      }
      if (blockIdx.x == 0) a.recv_counts[s] = count;
      total += count;
    }
    if (total > a.max_rows) record_error(v.err, v.rank, -1, kPhaseOverflow, a.max_rows, total);
    s_start[v.num_ranks] = min(total, a.max_rows);
  }
  __syncthreads();

  const RecordLayout rec(a.row_bytes, a.num_scales, a.num_topk);
  const auto [lane, warp, num_warps] = warp_index();
  const int total = s_start[v.num_ranks];
  uint8_t* recv_x = static_cast<uint8_t*>(a.recv_x);
  for (int i = warp; i < total; i += num_warps) {
    const int s = source_of_row(s_start, v.num_ranks, i);
    const int j = i - s_start[s];
    const uint8_t* src = v.peers[v.rank] + dispatch_region_offset(s, v.dispatch_region_bytes) + size_t(j) * rec.bytes;
    warp_copy16(recv_x + size_t(i) * a.row_bytes, src, a.row_bytes, lane);
    if (a.recv_scales != nullptr) {
      const float* sc = reinterpret_cast<const float*>(src + rec.scales);
      for (int k = lane; k < a.num_scales; k += 32) a.recv_scales[size_t(i) * a.num_scales + k] = sc[k];
    }
    if (lane < a.num_topk) {
      if (a.recv_topk_idx != nullptr)
        a.recv_topk_idx[size_t(i) * a.num_topk + lane] = reinterpret_cast<const int*>(src + rec.topk_idx)[lane];
      if (a.recv_topk_weights != nullptr)
        a.recv_topk_weights[size_t(i) * a.num_topk + lane] =
            reinterpret_cast<const float*>(src + rec.topk_weights)[lane];
    }
    if (lane == 0) {
      if (a.recv_src_idx != nullptr) a.recv_src_idx[i] = reinterpret_cast<const int*>(src + rec.src_idx)[0];
      if (a.recv_src_rank != nullptr) a.recv_src_rank[i] = s;
    }
  }

  __syncthreads();
  if (threadIdx.x == 0 && last_block_to_finish(own + kSlotBlocksDone + kDispatchRecv, v.blocks_base)) {
    for (int s = 0; s < v.num_ranks; ++s) st_release_sys(header_of(v, s) + kSlotDispatchFree + v.rank, v.epoch);
  }
}

}  // namespace

void launch_dispatch_send(const DispatchSendArgs& a, int num_sms, cudaStream_t stream) {
  check_peer_view(a.view);
  MC_CHECK(num_sms >= 1, "num_sms must be >= 1");
  MC_CHECK(a.row_bytes > 0 && a.row_bytes % 16 == 0, "row_bytes must be a positive multiple of 16");
  MC_CHECK(a.num_topk >= 0 && a.num_topk <= kMaxTopk, "num_topk must be in [0, 32]");
  MC_CHECK(a.num_tokens == 0 || (a.x != nullptr && a.is_token_in_rank != nullptr && a.send_pos != nullptr),
           "x/is_token_in_rank/send_pos: null pointer");
  MC_CHECK(a.num_tokens_per_rank != nullptr, "num_tokens_per_rank: null pointer");
  MC_CHECK(reinterpret_cast<uintptr_t>(a.x) % 16 == 0, "x must be 16-byte aligned");
  MC_CHECK(a.topk_idx == nullptr || a.experts_per_rank > 0, "experts_per_rank must be > 0 with top-k");
  MC_CHECK(size_t(a.capacity_rows) * token_record_bytes(a.row_bytes, a.num_scales, a.num_topk) <=
               a.view.dispatch_region_bytes, "capacity_rows exceeds the dispatch region");
  dispatch_send_kernel<<<num_sms, kIntranodeThreads, 0, stream>>>(a);
  MC_LAUNCH_CHECK();
}

void launch_dispatch_recv(const DispatchRecvArgs& a, int num_sms, cudaStream_t stream) {
  check_peer_view(a.view);
  MC_CHECK(num_sms >= 1, "num_sms must be >= 1");
  MC_CHECK(a.row_bytes > 0 && a.row_bytes % 16 == 0, "row_bytes must be a positive multiple of 16");
  MC_CHECK(a.num_topk >= 0 && a.num_topk <= kMaxTopk, "num_topk must be in [0, 32]");
  MC_CHECK(a.recv_counts != nullptr, "recv_counts: null pointer");
  MC_CHECK(a.max_rows == 0 || a.recv_x != nullptr, "recv_x: null pointer");
  MC_CHECK(reinterpret_cast<uintptr_t>(a.recv_x) % 16 == 0, "recv_x must be 16-byte aligned");
  MC_CHECK(size_t(a.capacity_rows) * token_record_bytes(a.row_bytes, a.num_scales, a.num_topk) <=
               a.view.dispatch_region_bytes, "capacity_rows exceeds the dispatch region");
  dispatch_recv_kernel<<<num_sms, kIntranodeThreads, 0, stream>>>(a);
  MC_LAUNCH_CHECK();
}

}  // namespace moe_comm
