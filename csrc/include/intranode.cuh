// Arguments of the intranode dispatch/combine kernels (csrc/kernels/intranode_*.cu), shared by the host
// launchers and the bindings. Plain structs passed by value to the kernels. Shapes: T tokens on this rank,
// R ranks, K top-k, S FP8 scale blocks per row (0 without FP8), N rows received by this rank.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cuda_runtime.h>
#include "exception.cuh"
#include "layout.cuh"
#include "ptx.cuh"
#if MOE_COMM_DEVICE_CODE
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

namespace moe_comm {

// Where the symmetric buffers are and what this launch may wait on. Identical for every kernel.
struct PeerView {
  uint8_t* const* peers;       // device array [R] of symmetric-buffer base pointers (own one at [rank])
  int rank;
  int num_ranks;
  size_t dispatch_region_bytes;
  size_t combine_region_bytes;
  int epoch;                   // set on the device by launch_view (the host passes 0): this launch's epoch
  long long timeout_ns;        // bound on every spin wait, in nanoseconds of the global timer
  TimeoutRecord* err;          // host-mapped error record
};

struct DispatchSendArgs {
  PeerView view;
  const void* x;               // [T, row_bytes]; with cast_dtype, [T, H = row_bytes] of that dtype
  const float* x_scales;       // [T, S] or null (null with cast_dtype: the kernel computes them)
  const int64_t* topk_idx;     // [T, K] global expert ids or null (cached dispatch / no top-k)
  const float* topk_weights;   // [T, K] or null
  const bool* is_token_in_rank;  // [T, R]
  const int* send_pos;         // [T, R]: position of token t among this rank's rows for rank r
  const int* num_tokens_per_rank;  // [R]: rows for each rank
  int num_tokens;
  int row_bytes;
  int num_scales;
  int num_topk;
  int experts_per_rank;
  int capacity_rows;           // rows a dispatch region holds for this record size
  int cast_dtype;              // kNoCast, or the DType (bf16/fp16/fp32) of x to cast to FP8 e4m3 while sending
};

struct DispatchRecvArgs {
  PeerView view;
  void* recv_x;                // [max_rows, row_bytes]
  float* recv_scales;          // [max_rows, S] or null
  int64_t* recv_topk_idx;      // [max_rows, K] or null
  float* recv_topk_weights;    // [max_rows, K] or null
  int* recv_src_idx;           // [max_rows] or null (cached dispatch)
  int* recv_src_rank;          // [max_rows] or null
  int* recv_counts;            // [R] out: rows received from each source
  int* recv_expert_counts;     // [E_local] or null: += rows received for each local expert (zeroed beforehand)
  int num_local_experts;       // E_local (entries of recv_expert_counts)
  int max_rows;                // rows the outputs hold
  int row_bytes;
  int num_scales;
  int num_topk;                // K carried in the records (0 when none)
  int capacity_rows;
  int pad_rows;                // nonzero: rows [received, max_rows) get the padding (zeros, ids and sources -1)
};

struct CombineSendArgs {
  PeerView view;
  const void* x;               // [N, row_bytes], rows in receive order
  const float* topk_weights;   // [N, K] or null
  const int* recv_counts;      // [R] device: rows received from each source in the dispatch
  int row_bytes;
  int num_topk;                // K of topk_weights (0 when none)
  int capacity_rows;
};

// dtype codes for the combine reduction and the dispatch's fused FP8 cast.
enum DType : int { kNoCast = -1, kBFloat16 = 0, kFloat16 = 1, kFloat32 = 2, kFloat64 = 3 };

struct CombineRecvArgs {
  PeerView view;
  const bool* is_token_in_rank;  // [T, R]
  const int* send_pos;         // [T, R]
  const void* bias0;           // [T, H] in the accumulation dtype (float32, or float64 for float64) or null
  const void* bias1;
  void* out;                   // [T, H] in the row dtype
  float* out_weights;          // [T, K] or null
  int num_tokens;
  int hidden;
  int num_topk;
  int capacity_rows;
  int dtype;                   // DType
};

// Low-latency receive: the rows of a padded dispatch, in (source rank, token) order, rearranged expert-major.
struct ExpertMajorArgs {
  const void* x;               // [N, row_bytes]: the dispatch's recv_x (N = R * max tokens per rank)
  const float* scales;         // [N, S] or null
  const int64_t* local_ids;    // [N, K]: local expert ids, -1 elsewhere and on padding rows
  const int* src_idx;          // [N]
  const int* src_rank;         // [N]
  void* out_x;                 // [E, N, row_bytes]: expert e's rows in slots [0, recv_count[e]), the rest untouched
  float* out_scales;           // [E, N, S] or null
  int* recv_count;             // [E]
  int* out_src_idx;            // [E, N]: -1 from slot recv_count[e] on
  int* out_src_rank;           // [E, N]: -1 likewise
  int* layout_range;           // [E, R, 2]: (first slot, count) of each source's rows in expert e
  int64_t* slot_of;            // [N, K]: e * N + slot of row n in expert e = local_ids[n, k]; -1 where that is -1
  int* row_of;                 // [E, N] scratch: the row in each slot
  int num_rows;                // N
  int row_bytes;
  int num_scales;
  int num_topk;
  int num_experts;             // E, local experts
  int num_ranks;
};

// Low-latency combine, in one round trip: each expert rank returns every (token, top-k choice) output row to
// the token's rank at slot t * K + k of its region there; the token's rank sums them weighted, in k order.
// Same header flags, epochs and finished-block counters as the normal combine (the "combine" family).
struct LowLatencyCombineSendArgs {
  PeerView view;
  const void* x;               // [E * N, row_bytes]: expert outputs, expert e's slot p at row e * N + p
  const int64_t* slot_of;      // [N, K]: the row of x holding received row n's k-th choice, -1 where not local
  const int* src_idx;          // [N]: the source token of received row n
  const int* src_rank;         // [N]: its rank (-1 on padding rows)
  int num_rows;                // N
  int num_topk;                // K
  int max_tokens;              // M: a source's region holds M * K rows
  int row_bytes;
};

struct LowLatencyCombineRecvArgs {
  PeerView view;
  const int64_t* topk_idx;     // [T, K] global expert ids, -1 for none
  const float* topk_weights;   // [T, K]
  void* out;                   // [T, H] of dtype
  int num_tokens;              // T <= M
  int num_topk;
  int hidden;
  int experts_per_rank;
  int max_tokens;
  int dtype;                   // DType of the rows and of out
};

// Bytes of one element of a reduction dtype (host side; a bad code is a named error).
inline size_t dtype_size(int dtype) {
  switch (dtype) {
    case kBFloat16:
    case kFloat16: return 2;
    case kFloat32: return 4;
    case kFloat64: return 8;
  }
  throw Error("dtype: unsupported dtype code " + std::to_string(dtype), __FILE__, __LINE__);
}

// Host-side checks shared by every launcher.
inline void check_peer_view(const PeerView& v) {
  MC_CHECK(v.peers != nullptr, "peers: null peer table");
  MC_CHECK(v.num_ranks >= 1 && v.num_ranks <= 8, "num_ranks must be in [1, 8]");
  MC_CHECK(v.rank >= 0 && v.rank < v.num_ranks, "rank must be in [0, num_ranks)");
  MC_CHECK(v.timeout_ns > 0, "timeout_ns must be > 0");
  MC_CHECK(v.err != nullptr, "err: null timeout record");
  MC_CHECK(v.dispatch_region_bytes % 128 == 0 && v.combine_region_bytes % 128 == 0,
           "region sizes must be multiples of 128 bytes");
}

#if MOE_COMM_DEVICE_CODE
constexpr int kIntranodeThreads = 512;  // threads per block of every intranode kernel

__device__ __forceinline__ int* header_of(const PeerView& v, int rank) { return reinterpret_cast<int*>(v.peers[rank]); }

// Spin until this rank's header[slot + peer] reaches epoch `expected`, bounded by the view's timeout. A wait that
// expires records it and sets the abort word of every rank's buffer; a wait that finds this rank's abort word set
// gives up at once and records the rank that set it. Without that, once one rank's wait expired (a peer gone),
// every wave of blocks and every kernel already queued on every rank would wait out its own timeout in turn.
__device__ __forceinline__ bool wait_flag_or_abort(const PeerView& v, int slot, int peer, int expected, int phase) {
  const int* own = header_of(v, v.rank);
  int value, aborted_by;
  if (spin_until_reached(own + slot + peer, expected, v.timeout_ns, own + kSlotAbort, value, aborted_by)) return true;
  if (aborted_by != 0) {
    record_error(v.err, v.rank, aborted_by - 1, kPhasePeerAborted, expected, value);
    return false;
  }
  record_error(v.err, v.rank, peer, phase, expected, value);
  for (int r = 0; r < v.num_ranks; ++r) st_release_sys(header_of(v, r) + kSlotAbort, v.rank + 1);
  return false;
}

// Threads 0..num_ranks-1 each wait (wait_flag_or_abort) for this rank's header[slot + thread] to reach epoch
// `expected`; returns to every thread of the block whether all waits succeeded. Must be reached by the whole block.
__device__ __forceinline__ bool block_wait_all_ranks(const PeerView& v, int slot, int expected, int phase) {
  int ok = 1;
  if (threadIdx.x < v.num_ranks) ok = wait_flag_or_abort(v, slot, threadIdx.x, expected, phase) ? 1 : 0;
  return __syncthreads_and(ok) != 0;
}

// The view a kernel of the protocol runs with: the host's, at one past the last epoch `kernel` completed on
// this rank (flags are compared against epochs, which only move forward, so nothing is ever reset between calls).
__device__ __forceinline__ PeerView launch_view(const PeerView& host, int kernel) {
  PeerView v = host;
  v.epoch = epoch_after(ld_acquire_sys(header_of(v, v.rank) + kSlotEpochs + kernel));
  return v;
}

// In the last block of a launch: this rank's `kernel` completed the view's epoch. Every block read the old
// value at its start, before it counted itself finished.
__device__ __forceinline__ void complete_epoch(const PeerView& v, int kernel) {
  header_of(v, v.rank)[kSlotEpochs + kernel] = v.epoch;
}

// The end of every kernel of the protocol, in thread 0 of each block after the block's work: counts the block
// (`ok`: whether its waits succeeded) and returns true in the last block to finish when every block succeeded,
// which then publishes the launch's flags. A launch one of whose blocks timed out publishes nothing and keeps
// its epoch, so no peer ever reads rows a block skipped; the host raises the recorded timeout and refuses
// further launches on the buffer.
__device__ __forceinline__ bool last_block_of_complete_launch(const PeerView& v, int kernel, bool ok) {
  int* own = header_of(v, v.rank);
  if (!ok) atomicOr(own + kSlotLaunchFailed + kernel, 1);  // ordered before the count by its fence
  if (!last_block_to_finish(own + kSlotBlocksDone + kernel)) return false;
  return atomicExch(own + kSlotLaunchFailed + kernel, 0) == 0;
}

// The end of a kernel of the protocol: after every block's work, the last block to finish (counter `kernel`)
// releases this rank's entry of header slot array `slot` on every rank to the view's epoch, unless a block of
// the launch failed (`ok` false in that block).
__device__ __forceinline__ void release_on_every_rank_when_done(const PeerView& v, int kernel, int slot, bool ok) {
  __syncthreads();
  if (threadIdx.x == 0 && last_block_of_complete_launch(v, kernel, ok)) {
    for (int d = 0; d < v.num_ranks; ++d) st_release_sys(header_of(v, d) + slot + v.rank, v.epoch);
    complete_epoch(v, kernel);
  }
}

// Position of token t among this rank's rows for rank d (send_pos), or -1 where t does not go to d; a
// position outside [0, capacity_rows) is recorded as an overflow (by lane 0) and also gives -1.
__device__ __forceinline__ int token_position(const PeerView& v, const bool* is_token_in_rank, const int* send_pos,
                                              int t, int d, int capacity_rows, int lane) {
  if (d >= v.num_ranks || !is_token_in_rank[size_t(t) * v.num_ranks + d]) return -1;
  const int pos = send_pos[size_t(t) * v.num_ranks + d];
  if (pos < 0 || pos >= capacity_rows) {
    if (lane == 0) record_error(v.err, v.rank, d, kPhaseOverflow, capacity_rows, pos);
    return -1;
  }
  return pos;
}

// A grid-stride loop over items, one warp per item.
struct WarpIndex {
  int lane, warp, num_warps;
};
__device__ __forceinline__ WarpIndex warp_index() {
  const int warps_per_block = blockDim.x / 32;
  return {int(threadIdx.x % 32), int(blockIdx.x * warps_per_block + threadIdx.x / 32), int(gridDim.x * warps_per_block)};
}

// Row dtypes of the reductions: accumulated in float32 (float64 for float64), rounded once to nearest even.
template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
template <typename T> __device__ __forceinline__ T from_acc(typename Acc<T>::type x);
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <> __device__ __forceinline__ __half from_acc<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ float from_acc<float>(float x) { return x; }
template <> __device__ __forceinline__ double from_acc<double>(double x) { return x; }

// Row i of a receive order that concatenates the sources' rows: its source, given start[s] (start[R] = total).
__device__ __forceinline__ int source_of_row(const int* start, int num_ranks, int i) {
  int s = 0;
  while (s + 1 < num_ranks && i >= start[s + 1]) ++s;
  return s;
}
#endif

void launch_dispatch_send(const DispatchSendArgs& args, int num_sms, cudaStream_t stream);
void launch_dispatch_recv(const DispatchRecvArgs& args, int num_sms, cudaStream_t stream);
void launch_combine_send(const CombineSendArgs& args, int num_sms, cudaStream_t stream);
void launch_combine_recv(const CombineRecvArgs& args, int num_sms, cudaStream_t stream);
void launch_expert_major(const ExpertMajorArgs& args, int num_sms, cudaStream_t stream);
void launch_low_latency_combine_send(const LowLatencyCombineSendArgs& args, int num_sms, cudaStream_t stream);
void launch_low_latency_combine_recv(const LowLatencyCombineRecvArgs& args, int num_sms, cudaStream_t stream);

// Per-token FP8 cast: x [T, H] (bf16/fp16/fp32 by dtype code) -> fp8 e4m3 [T, H] + scales [T, ceil(H/128)],
// scale = max(amax, 1e-4) / 448 (moe_comm.fp8 semantics, bit-exact).
void launch_per_token_cast_fp8(const void* x, int dtype, int num_tokens, int hidden, void* out_fp8, float* out_scales,
                               int num_sms, cudaStream_t stream);

}  // namespace moe_comm
