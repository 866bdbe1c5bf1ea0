// Intranode dispatch: every sender writes each of its token records straight into its own region of each
// destination's symmetric buffer, at the token's position among its rows for that destination; every
// receiver waits for all sources' completion flags and copies the regions out in (source rank, token) order.
// Senders never wait on receivers of the same epoch, so there is no cycle (docs/kernels.md).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <algorithm>
#include "../include/exception.cuh"
#include "../include/launch.cuh"
#include "../include/intranode.cuh"
#include "../include/layout.cuh"
#include "../include/ptx.cuh"

namespace moe_comm {
namespace {

// Everything of a record after its row: the scales (when given, not cast), the top-k ids remapped to
// destination d's local ids (-1 elsewhere) with their weights (0 elsewhere), and the source token index.
__device__ __forceinline__ void write_record_tail(const DispatchSendArgs& a, const RecordLayout& rec, uint8_t* dst,
                                                  int d, int t, int lane) {
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

// Eight consecutive elements (16-byte aligned) of a bf16, fp16 or fp32 row, as float.
__device__ __forceinline__ void load8_as_float(const void* row, int dtype, int c, float (&v)[8]) {
  if (dtype == kFloat32) {
    const float4* p = reinterpret_cast<const float4*>(static_cast<const float*>(row) + c);
    const float4 lo = p[0], hi = p[1];
    v[0] = lo.x; v[1] = lo.y; v[2] = lo.z; v[3] = lo.w; v[4] = hi.x; v[5] = hi.y; v[6] = hi.z; v[7] = hi.w;
    return;
  }
  const int4 packed = *reinterpret_cast<const int4*>(static_cast<const uint16_t*>(row) + c);
  if (dtype == kBFloat16) {
    const __nv_bfloat16* h = reinterpret_cast<const __nv_bfloat16*>(&packed);
#pragma unroll
    for (int k = 0; k < 8; ++k) v[k] = __bfloat162float(h[k]);
  } else {
    const __half* h = reinterpret_cast<const __half*>(&packed);
#pragma unroll
    for (int k = 0; k < 8; ++k) v[k] = __half2float(h[k]);
  }
}

// Fused cast: the warp reads token t's row once, 8 channels per lane (16 lanes = one 128-channel scale
// block, so the amax is a 4-step butterfly within each half-warp), and writes the FP8 bytes and the scales
// to every destination in `dsts` (null where the token does not go).
__device__ __forceinline__ void cast_row_to_records(const DispatchSendArgs& a, const RecordLayout& rec,
                                                    uint8_t* const (&dsts)[kMaxRanks], int t, int lane) {
  const int hidden = a.row_bytes;  // one FP8 byte per channel
  const size_t in_row_bytes = size_t(hidden) * (a.cast_dtype == kFloat32 ? 4 : 2);
  const void* row = static_cast<const uint8_t*>(a.x) + size_t(t) * in_row_bytes;
  for (int base = 0; base < hidden; base += 32 * 8) {  // uniform trip count: every lane takes the shuffles
    const int c = base + lane * 8;
    const bool active = c < hidden;  // hidden % 16 == 0, so a lane's 8 channels are all in or all out
    float v[8];
    float amax = 0.0f;
    if (active) {
      load8_as_float(row, a.cast_dtype, c, v);
#pragma unroll
      for (int k = 0; k < 8; ++k) amax = fmaxf(amax, fabsf(v[k]));
    }
#pragma unroll
    for (int off = 8; off > 0; off /= 2) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, off));
    if (!active) continue;
    const float scale = fp8_scale_of(amax);
    uint32_t lo = 0, hi = 0;
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      lo |= uint32_t(fp8_e4m3_of(v[k], scale)) << (8 * k);
      hi |= uint32_t(fp8_e4m3_of(v[k + 4], scale)) << (8 * k);
    }
    const uint2 packed = make_uint2(lo, hi);
#pragma unroll
    for (int d = 0; d < kMaxRanks; ++d) {
      if (dsts[d] == nullptr) continue;
      *reinterpret_cast<uint2*>(dsts[d] + c) = packed;
      if ((lane & 15) == 0) reinterpret_cast<float*>(dsts[d] + rec.scales)[c / kFp8Block] = scale;
    }
  }
}

__global__ void __launch_bounds__(kIntranodeThreads, 1) dispatch_send_kernel(DispatchSendArgs a) {
  const PeerView v = launch_view(a.view, kDispatchSend);
  // Every destination must have read out what we wrote in the previous epoch before we overwrite it.
  const bool ok = block_wait_all_ranks(v, kSlotDispatchFree, epoch_before(v.epoch), kPhaseDispatchFree);
  if (ok) {
    const RecordLayout rec(a.row_bytes, a.num_scales, a.num_topk);
    const auto [lane, warp, num_warps] = warp_index();
    const uint8_t* x = static_cast<const uint8_t*>(a.x);
    for (int t = warp; t < a.num_tokens; t += num_warps) {
      // This token's record in each destination it reaches (null elsewhere); unrolled, so in registers.
      uint8_t* dsts[kMaxRanks];
#pragma unroll
      for (int d = 0; d < kMaxRanks; ++d) {
        const int pos = token_position(v, a.is_token_in_rank, a.send_pos, t, d, a.capacity_rows, lane);
        dsts[d] = pos < 0 ? nullptr
                          : v.peers[d] + dispatch_region_offset(v.rank, v.dispatch_region_bytes) + size_t(pos) * rec.bytes;
      }
      if (a.cast_dtype != kNoCast) cast_row_to_records(a, rec, dsts, t, lane);
#pragma unroll
      for (int d = 0; d < kMaxRanks; ++d) {
        if (dsts[d] == nullptr) continue;
        if (a.cast_dtype == kNoCast) warp_copy16(dsts[d], x + size_t(t) * a.row_bytes, a.row_bytes, lane);
        write_record_tail(a, rec, dsts[d], d, t, lane);
      }
    }
  }
  __syncthreads();
  if (threadIdx.x == 0 && last_block_of_complete_launch(v, kDispatchSend, ok)) {
    for (int d = 0; d < v.num_ranks; ++d) {
      int* peer = header_of(v, d);
      peer[kSlotDispatchCount + v.rank] = a.num_tokens_per_rank[d];
      st_release_sys(peer + kSlotDispatchFlag + v.rank, v.epoch);
    }
    complete_epoch(v, kDispatchSend);
  }
}

// Output row i of a worst-case receive that no source filled: zeros, top-k ids and the source -1.
__device__ __forceinline__ void write_padding_row(const DispatchRecvArgs& a, int i, uint8_t* recv_x, int lane) {
  warp_zero16(recv_x + size_t(i) * a.row_bytes, a.row_bytes, lane);
  if (a.recv_scales != nullptr)
    for (int k = lane; k < a.num_scales; k += 32) a.recv_scales[size_t(i) * a.num_scales + k] = 0.0f;
  if (lane < a.num_topk) {
    if (a.recv_topk_idx != nullptr) a.recv_topk_idx[size_t(i) * a.num_topk + lane] = -1;
    if (a.recv_topk_weights != nullptr) a.recv_topk_weights[size_t(i) * a.num_topk + lane] = 0.0f;
  }
  if (lane == 0) {
    if (a.recv_src_idx != nullptr) a.recv_src_idx[i] = -1;
    if (a.recv_src_rank != nullptr) a.recv_src_rank[i] = -1;
  }
}

__global__ void __launch_bounds__(kIntranodeThreads) dispatch_recv_kernel(DispatchRecvArgs a) {
  const PeerView v = launch_view(a.view, kDispatchRecv);
  int* own = header_of(v, v.rank);
  const bool ok = block_wait_all_ranks(v, kSlotDispatchFlag, v.epoch, kPhaseDispatchArrive);
  if (ok) {
    __shared__ int s_start[kMaxRanks + 1];
    if (threadIdx.x == 0) {
      // Counts clipped to what the outputs hold (an overflow is recorded), so that the combine of these rows,
      // which reads recv_counts, never reads past its [max_rows, H] input.
      int total = 0, wanted = 0;
      for (int s = 0; s < v.num_ranks; ++s) {
        s_start[s] = total;
        // Written before flag s, whose acquire load (thread s) the block barrier above orders before this one.
        int count = ld_relaxed_sys(own + kSlotDispatchCount + s);
        if (count > a.capacity_rows) {
          record_error(v.err, v.rank, s, kPhaseOverflow, a.capacity_rows, count);
          count = a.capacity_rows;
        }
        wanted += count;
        count = min(count, a.max_rows - total);
        if (blockIdx.x == 0) a.recv_counts[s] = count;
        total += count;
      }
      if (wanted > a.max_rows) record_error(v.err, v.rank, -1, kPhaseOverflow, a.max_rows, wanted);
      s_start[v.num_ranks] = total;
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
        const int id = reinterpret_cast<const int*>(src + rec.topk_idx)[lane];
        if (a.recv_topk_idx != nullptr) a.recv_topk_idx[size_t(i) * a.num_topk + lane] = id;
        if (a.recv_expert_counts != nullptr && id >= 0 && id < a.num_local_experts)
          atomicAdd(a.recv_expert_counts + id, 1);
        if (a.recv_topk_weights != nullptr)
          a.recv_topk_weights[size_t(i) * a.num_topk + lane] =
              reinterpret_cast<const float*>(src + rec.topk_weights)[lane];
      }
      if (lane == 0) {
        if (a.recv_src_idx != nullptr) a.recv_src_idx[i] = reinterpret_cast<const int*>(src + rec.src_idx)[0];
        if (a.recv_src_rank != nullptr) a.recv_src_rank[i] = s;
      }
    }
    if (a.pad_rows) {
      for (int i = total + warp; i < a.max_rows; i += num_warps) write_padding_row(a, i, recv_x, lane);
    }
  }
  release_on_every_rank_when_done(v, kDispatchRecv, kSlotDispatchFree, ok);
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
  if (a.cast_dtype != kNoCast) {
    MC_CHECK(a.cast_dtype == kBFloat16 || a.cast_dtype == kFloat16 || a.cast_dtype == kFloat32,
             "cast_dtype: the fused FP8 cast reads bf16, fp16 or fp32");
    MC_CHECK(a.x_scales == nullptr, "x_scales: must be null with the fused FP8 cast (the kernel computes them)");
    MC_CHECK(a.num_scales == (a.row_bytes + kFp8Block - 1) / kFp8Block,
             "num_scales must be ceil(H / 128) with the fused FP8 cast");
  }
  launch_kernel(dispatch_send_kernel, num_sms, kIntranodeThreads, 0, stream, a);
}

void launch_dispatch_recv(const DispatchRecvArgs& a, int num_sms, cudaStream_t stream) {
  check_peer_view(a.view);
  MC_CHECK(num_sms >= 1, "num_sms must be >= 1");
  MC_CHECK(a.row_bytes > 0 && a.row_bytes % 16 == 0, "row_bytes must be a positive multiple of 16");
  MC_CHECK(a.num_topk >= 0 && a.num_topk <= kMaxTopk, "num_topk must be in [0, 32]");
  MC_CHECK(a.recv_counts != nullptr, "recv_counts: null pointer");
  MC_CHECK(a.recv_expert_counts == nullptr || a.num_local_experts > 0,
           "num_local_experts must be > 0 with recv_expert_counts");
  MC_CHECK(a.max_rows == 0 || a.recv_x != nullptr, "recv_x: null pointer");
  MC_CHECK(reinterpret_cast<uintptr_t>(a.recv_x) % 16 == 0, "recv_x must be 16-byte aligned");
  MC_CHECK(size_t(a.capacity_rows) * token_record_bytes(a.row_bytes, a.num_scales, a.num_topk) <=
               a.view.dispatch_region_bytes, "capacity_rows exceeds the dispatch region");
  launch_kernel(dispatch_recv_kernel, num_sms, kIntranodeThreads, 0, stream, a);
}

}  // namespace moe_comm
