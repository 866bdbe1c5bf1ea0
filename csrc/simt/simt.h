// SIMT on the CPU: the device code of csrc/ compiled by the host compiler (-DMOE_COMM_SIMT) and run with one
// fiber per CUDA thread, so the kernels themselves, not a re-implementation, run where there is no GPU
// (tests/cuda_model). What a launch does:
//
//   * blocks run one after another, in an order set by simt::configure (forward, reverse or shuffled), so
//     nothing may depend on which block runs first or last; a block's threads are fibers of the calling thread;
//   * a fiber runs until it reaches a barrier (__syncthreads, __syncthreads_and), a warp collective (__shfl_sync,
//     __shfl_xor_sync, __ballot_sync, __syncwarp) or a load of memory other ranks write (ld_relaxed_sys,
//     ld_acquire_sys: where kernels spin), then the next fiber runs, in the configured thread order; a missing
//     barrier between a write and another thread's read shows as a wrong result in one of the orders, and any
//     race between threads of a block (write-after-read hazards included) or between blocks as a report of a
//     ThreadSanitizer build (-DMOE_COMM_SIMT_TSAN, scripts/simt_tsan.sh), where every thread is a TSan fiber
//     and the blocks of a launch are not ordered;
//   * a barrier completes when every thread of the block is at the same barrier, a warp collective when all 32
//     lanes are at the same collective with the same full mask; anything else (a lane at another collective or
//     another line, a lane exited while the rest wait, a barrier after some threads returned) stops the launch
//     with an error naming the lines, which is undefined behaviour on a GPU;
//   * __shared__ variables are function statics (one block runs at a time) in section "simt_shared"; it and the
//     dynamic shared memory are filled with 0xA5 before each block, so reading either uninitialised gives
//     garbage, as on a GPU, and never what an earlier block left.
//
// Memory between ranks (other processes) is shared host memory; ld_acquire_sys / st_release_sys are acquire and
// release accesses of it, atomics are host atomics. The kernels' float arithmetic is the host's, FMA contraction
// included where the compiler chooses it (setup.py compiles with -mfma -ffp-contract=fast, as nvcc contracts).
// What it cannot show: timing, occupancy, blocks of one launch waiting for each other (they would deadlock),
// weak-memory reorderings of a GPU (the host is x86-TSO; TSan takes the atomics as sequentially consistent and
// does not model fences), bank conflicts.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

// The CUDA qualifiers, for the host compiler: every function is a host function, __shared__ a function static.
#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __shared__
#undef __launch_bounds__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
// Function statics in one section, so that each block can start with them filled with garbage (simt.cpp). GCC
// ignores the section of a function template's statics, so no __shared__ variable may be declared in a template.
#define __shared__ static __attribute__((section("simt_shared")))
#define __launch_bounds__(...)

namespace simt {

// Identity of the running CUDA thread.
struct ThreadId {
  uint3 thread_idx;
  uint3 block_idx;
};
const ThreadId& current();
const dim3& block_dim();
const dim3& grid_dim();

// Order in which a launch runs its blocks and, at every switch, its threads.
enum class Order : int { kForward = 0, kReverse = 1, kShuffled = 2 };
void configure(Order order, uint64_t seed);

// Runs `body` as a grid of `grid` blocks of `block` threads with `smem_bytes` of dynamic shared memory. Returns an
// empty string, or what went wrong (divergent collectives, barriers or deadlock within a block).
std::string launch(dim3 grid, dim3 block, size_t smem_bytes, const std::function<void()>& body);
// Launches completed since the process started (the tests' stream bookkeeping counts them).
uint64_t launches_completed();
// (blocks, threads per block, dynamic shared bytes) of every launch since the process started, in order.
struct LaunchShape {
  unsigned blocks, threads;
  size_t smem_bytes;
};
const std::vector<LaunchShape>& launch_shapes();

// Runs the selftest kernel `name` (csrc/simt/selftest.cpp) as `blocks` x `threads`; fills *out, returns launch's
// error (empty when none).
std::string selftest(const std::string& name, int blocks, int threads, std::vector<long long>* out);

// For the device primitives below.
void barrier(const char* file, int line);
int barrier_and(int predicate, const char* file, int line);
enum class WarpOp : int { kShuffle = 0, kShuffleXor = 1, kBallot = 2, kSync = 3 };
uint64_t warp_collective(WarpOp op, unsigned mask, uint64_t value, int arg, int width, const char* file, int line);
void spin_point();  // lets the other threads of the block run (a spin wait's poll)
void* dynamic_shared();

template <typename T>
uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "warp collectives move at most 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  return bits;
}
template <typename T>
T from_bits(uint64_t bits) {
  T v;
  std::memcpy(&v, &bits, sizeof(T));
  return v;
}

}  // namespace simt

#define threadIdx (::simt::current().thread_idx)
#define blockIdx (::simt::current().block_idx)
#define blockDim (::simt::block_dim())
#define gridDim (::simt::grid_dim())

inline void __syncthreads(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  ::simt::barrier(file, line);
}
inline int __syncthreads_and(int predicate, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return ::simt::barrier_and(predicate, file, line);
}
template <typename T>
inline T __shfl_sync(unsigned mask, T v, int src_lane, int width = 32, const char* file = __builtin_FILE(),
                     int line = __builtin_LINE()) {
  return ::simt::from_bits<T>(
      ::simt::warp_collective(::simt::WarpOp::kShuffle, mask, ::simt::to_bits(v), src_lane, width, file, line));
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32, const char* file = __builtin_FILE(),
                         int line = __builtin_LINE()) {
  return ::simt::from_bits<T>(
      ::simt::warp_collective(::simt::WarpOp::kShuffleXor, mask, ::simt::to_bits(v), lane_mask, width, file, line));
}
inline unsigned __ballot_sync(unsigned mask, int predicate, const char* file = __builtin_FILE(),
                              int line = __builtin_LINE()) {
  return unsigned(::simt::warp_collective(::simt::WarpOp::kBallot, mask, predicate != 0, 0, 32, file, line));
}
inline void __syncwarp(unsigned mask = 0xffffffffu, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  ::simt::warp_collective(::simt::WarpOp::kSync, mask, 0, 0, 32, file, line);
}

inline int __popc(unsigned x) { return __builtin_popcount(x); }
using std::max;
using std::min;

// Atomics: host atomics (sequentially consistent), on shared statics and on memory shared between processes.
template <typename T>
inline T atomicAdd(T* p, T v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
inline int atomicOr(int* p, int v) { return __atomic_fetch_or(p, v, __ATOMIC_SEQ_CST); }
inline int atomicExch(int* p, int v) { return __atomic_exchange_n(p, v, __ATOMIC_SEQ_CST); }
inline int atomicCAS(int* p, int expected, int desired) {
  __atomic_compare_exchange_n(p, &expected, desired, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
  return expected;  // the old value, whether or not it was swapped
}
inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_system() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
