// Low-latency mode, the parts the normal kernels do not cover.
// Receive: a padded dispatch delivers rows in (source rank, token) order; decode-time experts want them
// expert-major, [E_local, R * M, H], each expert's rows packed from slot 0 in that same order. One block per
// local expert scans the rows' local ids (a block-wide prefix count of the rows that chose the expert), writes
// each hit's slot, source and top-k slot, then copies the rows, a warp per slot. Deterministic (no atomics
// decide an order) and equal to the portable backend's layout.
// Combine, in one round trip: every expert rank writes each (token, choice k) output row to slot t * K + k of
// its region on the token's rank, which sums the K rows weighted, in k order, in float32 (float64 for fp64).
#include <algorithm>
#include "../include/exception.cuh"
#include "../include/launch.cuh"
#include "../include/intranode.cuh"
#include "../include/layout.cuh"
#include "../include/ptx.cuh"

namespace moe_comm {
namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;

__global__ void __launch_bounds__(kThreads, 1) expert_major_kernel(ExpertMajorArgs a) {
  __shared__ int s_warp_hits[kWarps];
  __shared__ int s_per_source[kMaxRanks];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const size_t n = size_t(a.num_rows);
  for (int e = blockIdx.x; e < a.num_experts; e += gridDim.x) {
    if (threadIdx.x < kMaxRanks) s_per_source[threadIdx.x] = 0;
    __syncthreads();
    int filled = 0;  // slots given out so far (the same in every thread)
    // Slots: rows in order, one chunk of kThreads rows at a time (uniform trip count for the ballots).
    for (int start = 0; start < a.num_rows; start += kThreads) {
      const int i = start + threadIdx.x;
      bool hit = false;
      if (i < a.num_rows) {
        for (int k = 0; k < a.num_topk; ++k) {
          const int64_t id = a.local_ids[size_t(i) * a.num_topk + k];
          hit |= id == e;
          if (e == 0 && id < 0) a.slot_of[size_t(i) * a.num_topk + k] = -1;  // expert 0's block marks those once
        }
      }
      int in_chunk;
      const int slot = filled + block_count_below(hit, s_warp_hits, in_chunk);
      filled += in_chunk;
      if (hit) {
        const int s = a.src_rank[i];
        a.row_of[e * n + slot] = i;
        a.out_src_idx[e * n + slot] = a.src_idx[i];
        a.out_src_rank[e * n + slot] = s;
        atomicAdd(&s_per_source[s], 1);  // a count only: the slots are fixed by the scan
        for (int k = 0; k < a.num_topk; ++k)
          if (a.local_ids[size_t(i) * a.num_topk + k] == e) a.slot_of[size_t(i) * a.num_topk + k] = int64_t(e) * n + slot;
      }
    }
    __syncthreads();  // s_per_source and row_of are complete
    const int count = filled;
    if (threadIdx.x == 0) {
      a.recv_count[e] = count;
      int first = 0;
      for (int s = 0; s < a.num_ranks; ++s) {
        a.layout_range[(size_t(e) * a.num_ranks + s) * 2] = first;
        a.layout_range[(size_t(e) * a.num_ranks + s) * 2 + 1] = s_per_source[s];
        first += s_per_source[s];
      }
    }
    for (int slot = count + threadIdx.x; slot < a.num_rows; slot += kThreads) {
      a.out_src_idx[e * n + slot] = -1;
      a.out_src_rank[e * n + slot] = -1;
    }
    // row_of was written by this block's threads: visible to all of them after the barrier after the scan.
    const uint8_t* x = static_cast<const uint8_t*>(a.x);
    uint8_t* out_x = static_cast<uint8_t*>(a.out_x);
    for (int slot = warp; slot < count; slot += kWarps) {
      const int i = a.row_of[e * n + slot];
      warp_copy16(out_x + (e * n + slot) * a.row_bytes, x + size_t(i) * a.row_bytes, a.row_bytes, lane);
      if (a.scales != nullptr)
        for (int c = lane; c < a.num_scales; c += 32)
          a.out_scales[(e * n + slot) * a.num_scales + c] = a.scales[size_t(i) * a.num_scales + c];
    }
    __syncthreads();  // before the next expert resets the shared counters
  }
}

__global__ void __launch_bounds__(kIntranodeThreads, 1) ll_combine_send_kernel(LowLatencyCombineSendArgs a) {
  const PeerView v = launch_view(a.view, kCombineSend);
  // Every token rank must have summed what we returned in the previous combine-family epoch.
  const bool ok = block_wait_all_ranks(v, kSlotCombineFree, epoch_before(v.epoch), kPhaseCombineFree);
  if (ok) {
    const auto [lane, warp, num_warps] = warp_index();
    const uint8_t* x = static_cast<const uint8_t*>(a.x);
    const size_t region = combine_region_offset(v.rank, v.num_ranks, v.dispatch_region_bytes, v.combine_region_bytes);
    for (int item = warp; item < a.num_rows * a.num_topk; item += num_warps) {  // (received row, choice) pairs
      const int64_t row = a.slot_of[item];
      if (row < 0) continue;
      const int n = item / a.num_topk, k = item % a.num_topk;
      const int s = a.src_rank[n], t = a.src_idx[n];
      if (s < 0 || s >= v.num_ranks || t < 0 || t >= a.max_tokens) {
        if (lane == 0) record_error(v.err, v.rank, s, kPhaseOverflow, a.max_tokens, t);
        continue;
      }
      warp_copy16(v.peers[s] + region + (size_t(t) * a.num_topk + k) * a.row_bytes, x + size_t(row) * a.row_bytes,
                  a.row_bytes, lane);
    }
  }
  release_on_every_rank_when_done(v, kCombineSend, kSlotCombineFlag, ok);
}

template <typename T>
__global__ void __launch_bounds__(kIntranodeThreads, 1) ll_combine_recv_kernel(LowLatencyCombineRecvArgs a) {
  using AccT = typename Acc<T>::type;
  constexpr int kVec = 16 / sizeof(T);  // elements per 16-byte load
  const PeerView v = launch_view(a.view, kCombineRecv);
  const bool ok = block_wait_all_ranks(v, kSlotCombineFlag, v.epoch, kPhaseCombineArrive);
  if (ok) {
    const auto [lane, warp, num_warps] = warp_index();
    const size_t row_bytes = size_t(a.hidden) * sizeof(T);
    T* out = static_cast<T*>(a.out);
    for (int t = warp; t < a.num_tokens; t += num_warps) {
      // Lane k holds choice k: its expert's rank (-1 for none) and weight, broadcast in the k loop below.
      int my_rank = -1;
      float my_weight = 0.0f;
      if (lane < a.num_topk) {
        const int64_t e = a.topk_idx[size_t(t) * a.num_topk + lane];
        if (e >= 0 && e < int64_t(a.experts_per_rank) * v.num_ranks) {  // as the layout kernel, ids past E are none
          my_rank = int(e / a.experts_per_rank);
          my_weight = a.topk_weights[size_t(t) * a.num_topk + lane];
        }
      }
      // Every lane runs the same number of iterations (the shuffles need the whole warp); lanes past the row's
      // end only take part in them.
      for (int base = 0; base < a.hidden; base += 32 * kVec) {
        const int c = base + lane * kVec;
        const bool active = c < a.hidden;
        AccT acc[kVec];
#pragma unroll
        for (int j = 0; j < kVec; ++j) acc[j] = AccT(0);
        for (int k = 0; k < a.num_topk; ++k) {  // k order: deterministic
          const int d = __shfl_sync(0xffffffffu, my_rank, k);
          const AccT w = __shfl_sync(0xffffffffu, my_weight, k);
          if (d < 0 || !active) continue;
          const uint8_t* row = v.peers[v.rank] +
                               combine_region_offset(d, v.num_ranks, v.dispatch_region_bytes, v.combine_region_bytes) +
                               (size_t(t) * a.num_topk + k) * row_bytes;
          const int4 packed = *reinterpret_cast<const int4*>(row + size_t(c) * sizeof(T));
          const T* vals = reinterpret_cast<const T*>(&packed);
#pragma unroll
          for (int j = 0; j < kVec; ++j) acc[j] += w * to_acc(vals[j]);
        }
        int4 result;
        T* res = reinterpret_cast<T*>(&result);
#pragma unroll
        for (int j = 0; j < kVec; ++j) res[j] = from_acc<T>(acc[j]);
        if (active) *reinterpret_cast<int4*>(out + size_t(t) * a.hidden + c) = result;
      }
    }
  }
  release_on_every_rank_when_done(v, kCombineRecv, kSlotCombineFree, ok);
}

}  // namespace

void launch_low_latency_combine_send(const LowLatencyCombineSendArgs& a, int num_sms, cudaStream_t stream) {
  check_peer_view(a.view);
  MC_CHECK(num_sms >= 1, "num_sms must be >= 1");
  MC_CHECK(a.num_topk >= 1 && a.num_topk <= kMaxTopk, "num_topk must be in [1, 32]");
  MC_CHECK(a.row_bytes > 0 && a.row_bytes % 16 == 0, "row_bytes must be a positive multiple of 16");
  MC_CHECK(a.num_rows >= 0 && a.max_tokens >= 1, "num_rows must be >= 0 and max_tokens >= 1");
  MC_CHECK(size_t(a.max_tokens) * a.num_topk * a.row_bytes <= a.view.combine_region_bytes,
           "max_tokens x num_topk rows exceed the combine region");
  MC_CHECK(a.num_rows == 0 || (a.x != nullptr && a.slot_of != nullptr && a.src_idx != nullptr && a.src_rank != nullptr),
           "x/slot_of/src_idx/src_rank: null pointer");
  MC_CHECK(reinterpret_cast<uintptr_t>(a.x) % 16 == 0, "x must be 16-byte aligned");
  launch_kernel(ll_combine_send_kernel, num_sms, kIntranodeThreads, 0, stream, a);
}

void launch_low_latency_combine_recv(const LowLatencyCombineRecvArgs& a, int num_sms, cudaStream_t stream) {
  check_peer_view(a.view);
  MC_CHECK(num_sms >= 1, "num_sms must be >= 1");
  MC_CHECK(a.num_topk >= 1 && a.num_topk <= kMaxTopk, "num_topk must be in [1, 32]");
  const size_t elem = dtype_size(a.dtype);  // throws on a code other than bf16, fp16, fp32, fp64
  MC_CHECK(a.hidden > 0 && (a.hidden * elem) % 16 == 0, "hidden: rows must be a positive multiple of 16 bytes");
  MC_CHECK(a.num_tokens >= 0 && a.num_tokens <= a.max_tokens, "num_tokens must be in [0, max_tokens]");
  MC_CHECK(a.experts_per_rank >= 1, "experts_per_rank must be >= 1");
  MC_CHECK(size_t(a.max_tokens) * a.num_topk * a.hidden * elem <= a.view.combine_region_bytes,
           "max_tokens x num_topk rows exceed the combine region");
  MC_CHECK(a.num_tokens == 0 || (a.topk_idx != nullptr && a.topk_weights != nullptr && a.out != nullptr),
           "topk_idx/topk_weights/out: null pointer");
  MC_CHECK(reinterpret_cast<uintptr_t>(a.out) % 16 == 0, "out must be 16-byte aligned");
  switch (a.dtype) {
    case kBFloat16: launch_kernel(ll_combine_recv_kernel<__nv_bfloat16>, num_sms, kIntranodeThreads, 0, stream, a); break;
    case kFloat16: launch_kernel(ll_combine_recv_kernel<__half>, num_sms, kIntranodeThreads, 0, stream, a); break;
    case kFloat32: launch_kernel(ll_combine_recv_kernel<float>, num_sms, kIntranodeThreads, 0, stream, a); break;
    default: launch_kernel(ll_combine_recv_kernel<double>, num_sms, kIntranodeThreads, 0, stream, a); break;
  }
}

void launch_expert_major(const ExpertMajorArgs& a, int num_sms, cudaStream_t stream) {
  MC_CHECK(num_sms >= 1, "num_sms must be >= 1");
  MC_CHECK(a.num_ranks >= 1 && a.num_ranks <= kMaxRanks, "num_ranks must be in [1, 8]");
  MC_CHECK(a.num_topk >= 1 && a.num_topk <= kMaxTopk, "num_topk must be in [1, 32]");
  MC_CHECK(a.num_rows >= 0 && a.num_experts >= 1, "num_rows must be >= 0 and num_experts >= 1");
  MC_CHECK(a.row_bytes > 0 && a.row_bytes % 16 == 0, "row_bytes must be a positive multiple of 16");
  MC_CHECK(a.num_scales == 0 || (a.scales != nullptr && a.out_scales != nullptr), "scales/out_scales: null pointer");
  MC_CHECK(a.recv_count != nullptr && a.layout_range != nullptr, "recv_count/layout_range: null pointer");
  MC_CHECK(a.num_rows == 0 || (a.x != nullptr && a.local_ids != nullptr && a.src_idx != nullptr && a.src_rank != nullptr &&
                               a.out_x != nullptr && a.out_src_idx != nullptr && a.out_src_rank != nullptr &&
                               a.slot_of != nullptr && a.row_of != nullptr),
           "x/local_ids/src_idx/src_rank/out_x/out_src_idx/out_src_rank/slot_of/row_of: null pointer");
  MC_CHECK(reinterpret_cast<uintptr_t>(a.x) % 16 == 0 && reinterpret_cast<uintptr_t>(a.out_x) % 16 == 0,
           "x and out_x must be 16-byte aligned");
  launch_kernel(expert_major_kernel, std::min(num_sms, a.num_experts), kThreads, 0, stream, a);
}

}  // namespace moe_comm
