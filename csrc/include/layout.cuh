// Byte layout of the symmetric buffer every rank owns (see docs/kernels.md).
// Host and device share this arithmetic; tests/test_cuda_build.py checks it against Python.
//
//   [header: kHeaderBytes][dispatch region of source 0 .. R-1][combine region of source 0 .. R-1]
//
// A dispatch region holds the token records one source rank writes into this rank; a combine region holds
// the rows one expert rank returns to this rank. Regions are fixed worst-case sized (in bytes, from the
// largest call so far) and addressed by each row's position among its source's rows, so no queue or credit
// counter is ever needed.
#pragma once
#include <cstddef>
#include <cstdint>

namespace moe_comm {

constexpr int kMaxRanks = 8;
constexpr int kMaxTopk = 32;
constexpr size_t kHeaderBytes = 4096;

// int32 slots of the header. "written by" names the rank that stores into THIS rank's header.
enum HeaderSlot : int {
  kSlotDispatchFlag = 0,                          // [R] by source s: epoch whose rows are complete in region s
  kSlotDispatchCount = kSlotDispatchFlag + kMaxRanks,  // [R] by source s: rows it wrote into region s
  kSlotDispatchFree = kSlotDispatchCount + kMaxRanks,  // [R] by destination d: epoch whose rows it has read out
  kSlotCombineFlag = kSlotDispatchFree + kMaxRanks,    // [R] by expert rank d: epoch whose rows are in region d
  kSlotCombineFree = kSlotCombineFlag + kMaxRanks,     // [R] by token owner s: epoch it has reduced
  kSlotBarrier = kSlotCombineFree + kMaxRanks,         // [R] by rank r: barriers r has entered
  kSlotBlocksDone = kSlotBarrier + kMaxRanks,          // [kNumKernels] local: blocks of the running launch done
  // [kNumKernels] local: the last epoch each kernel completed on this rank. A launch runs at one past it and its
  // last block stores that back, so epochs live on the device and a kernel's arguments are the same at every
  // call (a captured CUDA graph replays correctly). Sends and receives count apart, so a send issued before
  // the previous receive of its family ran waits (and times out) instead of reusing that receive's epoch.
  kSlotEpochs = kSlotBlocksDone + 8,
  kSlotLaunchFailed = kSlotEpochs + 8,                 // [kNumKernels] local: a block of the running launch timed out
  // [1] by any rank: 1 + the first rank whose wait on these buffers expired, 0 while none has. Never cleared (the
  // host refuses launches on the buffers from then on): every later wait on this rank gives up at once.
  kSlotAbort = kSlotLaunchFailed + 8,
  kHeaderInts = kSlotAbort + 1,
};

// The protocol's kernels, for their header counters; the low-latency combine kernels count as the combine's.
enum KernelId : int { kDispatchSend = 0, kDispatchRecv = 1, kCombineSend = 2, kCombineRecv = 3, kNumKernels = 4 };

__host__ __device__ constexpr size_t align_up(size_t x, size_t a) { return (x + a - 1) / a * a; }

// One dispatched token record: row bytes | FP8 scales (f32) | local top-k ids (int32) | top-k weights (f32) |
// source token index (int32, padded to 16 bytes). Each part 16-byte aligned.
struct RecordLayout {
  size_t scales, topk_idx, topk_weights, src_idx, bytes;
  __host__ __device__ constexpr RecordLayout(size_t row_bytes, int num_scales, int num_topk)
      : scales(align_up(row_bytes, 16)),
        topk_idx(scales + align_up(size_t(num_scales) * 4, 16)),
        topk_weights(topk_idx + align_up(size_t(num_topk) * 4, 16)),
        src_idx(topk_weights + align_up(size_t(num_topk) * 4, 16)),
        bytes(src_idx + 16) {}
};

__host__ __device__ constexpr size_t token_record_bytes(size_t row_bytes, int num_scales, int num_topk) {
  return RecordLayout(row_bytes, num_scales, num_topk).bytes;
}

// One combined row: row bytes | top-k weights (f32), each 16-byte aligned.
__host__ __device__ constexpr size_t combine_record_bytes(size_t row_bytes, int num_topk) {
  return align_up(row_bytes, 16) + align_up(size_t(num_topk) * 4, 16);
}

__host__ __device__ constexpr size_t dispatch_region_offset(int source, size_t dispatch_region_bytes) {
  return kHeaderBytes + size_t(source) * dispatch_region_bytes;
}

__host__ __device__ constexpr size_t combine_region_offset(int source, int num_ranks, size_t dispatch_region_bytes,
                                                           size_t combine_region_bytes) {
  return kHeaderBytes + size_t(num_ranks) * dispatch_region_bytes + size_t(source) * combine_region_bytes;
}

__host__ __device__ constexpr size_t symmetric_buffer_bytes(int num_ranks, size_t dispatch_region_bytes,
                                                            size_t combine_region_bytes) {
  return kHeaderBytes + size_t(num_ranks) * (dispatch_region_bytes + combine_region_bytes);
}

static_assert(kHeaderInts * 4 <= kHeaderBytes, "header slots exceed the header");

}  // namespace moe_comm
