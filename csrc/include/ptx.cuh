// Device helpers shared by every kernel family: memory ordering (system scope, since peers may be other
// GPUs through NVLink/IPC mappings), bounded waits with a host-visible timeout record, block completion, warp
// copies, the FP8 cast.
#pragma once
#include <cstdint>
#include <ctime>
#if defined(MOE_COMM_SIMT)
#include "../simt/simt.h"  // the device code on CPU threads (tests/cuda_model)
#elif defined(__CUDACC__)
#include <cuda_fp8.h>
#endif

// Whether this translation unit compiles the device code: nvcc, or the host compiler for csrc/simt.
#if defined(__CUDACC__) || defined(MOE_COMM_SIMT)
#define MOE_COMM_DEVICE_CODE 1
#else
#define MOE_COMM_DEVICE_CODE 0
#endif

namespace moe_comm {

// Phases named in timeout records (moe_comm/backends/cuda_memory.py maps them to words).
enum Phase : int {
  kPhaseBarrier = 1,
  kPhaseDispatchFree = 2,   // a sender waits for a destination to have read out its previous rows
  kPhaseDispatchArrive = 3, // a receiver waits for a source's rows
  kPhaseCombineFree = 4,
  kPhaseCombineArrive = 5,
  kPhaseOverflow = 6,       // a row position beyond the region or output capacity (host sizing bug)
  kPhasePeerAborted = 7,    // a wait gave up because another rank's wait on the buffers had expired (`peer`)
};

// Error record written to host-mapped memory when a bounded wait expires or a capacity check fails.
struct TimeoutRecord {
  int flag;      // 0 = none, -1 = being written, 1 = error (the other fields are complete)
  int rank;
  int peer;
  int phase;
  long long expected;
  long long observed;
};

constexpr int kFp8Block = 128;  // channels per FP8 scale (see fp8_scale_of)

#if MOE_COMM_DEVICE_CODE
#if defined(__CUDACC__)
// A strong load with no ordering: what a spin re-reads. On sm_90 ld.acquire compiles to the load plus an L1
// invalidate (CCTL.IVALL), which in a spin loop would throw away the L1 lines of every warp on the SM at each
// iteration; waits therefore spin relaxed and take one acquire load once the value is there (spin_until_reached).
__device__ __forceinline__ int ld_relaxed_sys(const int* p) {
  int v;
  asm volatile("ld.relaxed.sys.global.b32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ int ld_acquire_sys(const int* p) {
  int v;
  asm volatile("ld.acquire.sys.global.b32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ void st_release_sys(int* p, int v) {
  asm volatile("st.release.sys.global.b32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

__device__ __forceinline__ int atomic_add_release_sys(int* p, int v) {
  int old;
  asm volatile("atom.add.release.sys.global.s32 %0, [%1], %2;" : "=r"(old) : "l"(p), "r"(v) : "memory");
  return old;
}
#else  // MOE_COMM_SIMT: host atomics; a relaxed or acquire load is where a spinning thread lets the others run
inline int ld_relaxed_sys(const int* p) {
  ::simt::spin_point();
  return __atomic_load_n(p, __ATOMIC_RELAXED);
}
inline int ld_acquire_sys(const int* p) {
  ::simt::spin_point();
  return __atomic_load_n(p, __ATOMIC_ACQUIRE);
}
inline void st_release_sys(int* p, int v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
inline int atomic_add_release_sys(int* p, int v) { return __atomic_fetch_add(p, v, __ATOMIC_RELEASE); }
#endif

__device__ __forceinline__ void record_error(TimeoutRecord* err, int rank, int peer, int phase, long long expected,
                                             long long observed) {
  // A relaxed read first: once a record is claimed, the other threads that fail (every token of an overflowing
  // dispatch) skip the atomic on host memory, each a round trip over the bus.
  if (err != nullptr && ld_relaxed_sys(&err->flag) == 0 && atomicCAS(&err->flag, 0, -1) == 0) {
    err->rank = rank;
    err->peer = peer;
    err->phase = phase;
    err->expected = expected;
    err->observed = observed;
    __threadfence_system();
    atomicExch(&err->flag, 1);
  }
}

// Nanoseconds of the GPU's global timer: wall time, unlike clock64(), whose rate follows the SM clock (an idle
// H200 runs at a fifth of the rate cudaDevAttrClockRate reports, which would stretch every timeout five-fold).
__device__ __forceinline__ unsigned long long global_timer_ns() {
#if defined(__CUDACC__)
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
#else
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<unsigned long long>(ts.tv_sec) * 1000000000ull + static_cast<unsigned long long>(ts.tv_nsec);
#endif
}

// Epochs count calls, so an int32 wraps after 2^31 of them (days of decode steps on one buffer). They are
// compared as serial numbers (RFC 1982): `v` has reached `want` when v - want, taken modulo 2^32, is in
// [0, 2^31). That holds across the wrap as long as the two differ by less than 2^31, and a flag never lags the
// epoch its waiter wants by more than one call.
__device__ __forceinline__ int epoch_after(int e) { return static_cast<int>(static_cast<unsigned>(e) + 1u); }
__device__ __forceinline__ int epoch_before(int e) { return static_cast<int>(static_cast<unsigned>(e) - 1u); }
__device__ __forceinline__ bool epoch_reached(int v, int want) {
  return static_cast<int>(static_cast<unsigned>(v) - static_cast<unsigned>(want)) >= 0;
}

// Spin until *p has reached epoch `expected`, then return true after an acquire load of *p (so what the writer
// released before its flag is visible). Return false as soon as `abort_word` (may be null) holds a nonzero value,
// which goes to `aborted_by`, or once `timeout_ns` elapse (`aborted_by` 0). `observed` gets the last value of *p.
__device__ __forceinline__ bool spin_until_reached(const int* p, int expected, long long timeout_ns,
                                                   const int* abort_word, int& observed, int& aborted_by) {
  const unsigned long long start = global_timer_ns();
  aborted_by = 0;
  for (;;) {
    observed = ld_relaxed_sys(p);
    if (epoch_reached(observed, expected)) {
      observed = ld_acquire_sys(p);  // a later value of the same word: the writer's epochs only move forward
      return true;
    }
    if (abort_word != nullptr && (aborted_by = ld_relaxed_sys(abort_word)) != 0) return false;
    if (static_cast<long long>(global_timer_ns() - start) > timeout_ns) return false;
  }
}

// Spin until *p has reached epoch `expected` or `timeout_ns` elapse; on expiry fill `err` (first writer wins)
// and return false.
__device__ __forceinline__ bool wait_reached(const int* p, int expected, long long timeout_ns, TimeoutRecord* err,
                                             int rank, int peer, int phase) {
  int observed, aborted_by;
  if (spin_until_reached(p, expected, timeout_ns, nullptr, observed, aborted_by)) return true;
  record_error(err, rank, peer, phase, expected, observed);
  return false;
}

// Called by thread 0 of every block once the block's memory operations are issued: makes them visible
// system-wide and counts the block. Returns true in exactly one block, the last to finish, which may then
// publish the kernel's completion (the fences on both sides order the other blocks' writes before it). The
// last block puts the counter back to 0 for the next launch, which the stream orders after this one, so the
// launch arguments carry no counter state (a captured CUDA graph replays correctly).
__device__ __forceinline__ bool last_block_to_finish(int* counter) {
  __threadfence_system();
  const bool last = atomicAdd(counter, 1) + 1 == int(gridDim.x);
  if (last) {
    __threadfence_system();
    atomicExch(counter, 0);  // every other block has counted: nothing else touches it during this launch
  }
  return last;
}

// A warp copies `bytes` (a multiple of 16, both pointers 16-byte aligned, not overlapping) from src to dst.
// Plain (coherent) loads on purpose: src may be a region another GPU just wrote. Each lane issues
// kCopyUnroll loads before their stores, so a warp has that many 512-byte transactions in flight instead of
// waiting out one memory latency per 512 bytes.
constexpr int kCopyUnroll = 4;
__device__ __forceinline__ void warp_copy16(void* dst, const void* src, size_t bytes, int lane) {
  const int4* __restrict__ s = static_cast<const int4*>(src);
  int4* __restrict__ d = static_cast<int4*>(dst);
  const size_t n = bytes / 16;
  size_t i = lane;
  for (; i + 32 * (kCopyUnroll - 1) < n; i += 32 * kCopyUnroll) {
    int4 v[kCopyUnroll];
#pragma unroll
    for (int u = 0; u < kCopyUnroll; ++u) v[u] = s[i + 32 * u];
#pragma unroll
    for (int u = 0; u < kCopyUnroll; ++u) d[i + 32 * u] = v[u];
  }
  for (; i < n; i += 32) d[i] = s[i];
}

// One chunk of a block-wide scan of `hit` (warp ballots), reached by every thread of the block: returns the hits
// of the threads below this one and sets `in_block` to the block's hits. `scratch` holds an int per warp; the call
// ends with a barrier, so the next call may reuse it.
__device__ __forceinline__ int block_count_below(bool hit, int* scratch, int& in_block) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const unsigned ballot = __ballot_sync(0xffffffffu, hit);
  if (lane == 0) scratch[warp] = __popc(ballot);
  __syncthreads();
  int below = __popc(ballot & ((1u << lane) - 1u));
  in_block = 0;
  for (int w = 0; w < int(blockDim.x / 32); ++w) {
    if (w < warp) below += scratch[w];
    in_block += scratch[w];
  }
  __syncthreads();
  return below;
}

// A warp zeroes `bytes` (a multiple of 16, 16-byte aligned) at dst.
__device__ __forceinline__ void warp_zero16(void* dst, size_t bytes, int lane) {
  int4* d = static_cast<int4*>(dst);
  for (size_t i = lane; i < bytes / 16; i += 32) d[i] = make_int4(0, 0, 0, 0);
}

// FP8 (e4m3) per-token cast with one float32 scale per kFp8Block channels, shared by the standalone cast
// kernel and the dispatch send kernel's fused cast: scale = max(amax, 1e-4) / 448, q = x / scale (IEEE
// division), rounded to nearest even with saturation. Bit-exact with moe_comm.fp8.per_token_cast_to_fp8.
__device__ __forceinline__ float fp8_scale_of(float amax) { return fmaxf(amax, 1e-4f) / 448.0f; }
__device__ __forceinline__ uint8_t fp8_e4m3_of(float v, float scale) {
  return __nv_cvt_float_to_fp8(v / scale, __NV_SATFINITE, __NV_E4M3);
}
#endif  // MOE_COMM_DEVICE_CODE

}  // namespace moe_comm
