// Small kernels that pin down what the simt runtime does (tests/test_simt.py): the values of warp collectives,
// block barriers, the order of blocks, and the errors for code that is undefined on a GPU.
#include <map>

#include "simt.h"

namespace simt {
namespace {

constexpr unsigned kFull = 0xffffffffu;

int lane_id() { return int(threadIdx.x % 32); }
int thread_id() { return int(blockIdx.x * blockDim.x + threadIdx.x); }

// out[4 t .. 4 t + 3] for thread t: shuffle from lane + 3, xor-shuffle with 5, width-8 shuffle from lane 2 of the
// segment, ballot of lane % 3 == 0.
__global__ void collectives(long long* out) {
  const int lane = lane_id(), t = thread_id();
  const int v = 1000 * int(threadIdx.x / 32) + lane;
  out[4 * t] = __shfl_sync(kFull, v, (lane + 3) % 32);
  out[4 * t + 1] = __shfl_xor_sync(kFull, v, 5);
  out[4 * t + 2] = __shfl_sync(kFull, v, 2, 8);
  out[4 * t + 3] = __ballot_sync(kFull, lane % 3 == 0);
}

// out[t]: __syncthreads_and over "thread != 5" (0), then over "true" (1), packed as 10 * first + second.
__global__ void barrier_and(long long* out) {
  const int first = __syncthreads_and(threadIdx.x != 5);
  const int second = __syncthreads_and(1);
  out[thread_id()] = 10 * first + second;
}

// Thread 0 writes a shared value after an acquire load (where a fiber gives way); with the barrier every thread
// reads it, without it the others may run first. out[t] = what thread t read.
__global__ void shared_write_then_read(long long* out, bool barrier) {
  __shared__ int s_value;
  if (threadIdx.x == 0) s_value = -1;
  __syncthreads();
  if (threadIdx.x == 0) {
    static int flag = 1;
    (void)__atomic_load_n(&flag, __ATOMIC_ACQUIRE);
    spin_point();
    s_value = 42 + int(blockIdx.x);
  }
  if (barrier) __syncthreads();
  out[thread_id()] = s_value;
}

// Every thread reads a shared value, then thread 0 overwrites it. Without the barrier between, that write races
// the other warps' reads (a write-after-read hazard), yet thread 0 writes after its own read and the others read
// before a spin point lets it run, so every thread order gives the same output: only a ThreadSanitizer build
// (csrc/simt/simt.cpp) reports it. out[t] = what thread t read (1).
__global__ void shared_read_then_overwritten(long long* out, bool barrier) {
  __shared__ int s_value;
  if (threadIdx.x == 0) s_value = 1;
  __syncthreads();
  out[thread_id()] = s_value;
  if (barrier) __syncthreads();
  if (threadIdx.x == 0) {
    spin_point();
    s_value = 2;
  }
}

// out[i] = the block that ran i-th.
__global__ void block_order(long long* out, int* counter) {
  if (threadIdx.x == 0) out[atomicAdd(counter, 1)] = blockIdx.x;
}

// Thread 0 of every block stores its block index in out[0]: on a GPU the blocks race, and out[0] is whichever
// stored last. Blocks run one after another here, so only a ThreadSanitizer build reports it.
__global__ void blocks_store_one_word(long long* out) {
  if (threadIdx.x == 0) out[0] = blockIdx.x;
}

// Race-free across blocks: each block sums 1 + threadIdx.x in a __shared__ counter and in dynamic shared memory
// (the same addresses in every block), thread 0 stores the block's sum in out[1 + blockIdx.x], and the last block
// to count itself in `counter` (fences on both sides, as ptx.cuh's last_block_to_finish) adds every block's sum
// into out[0]. out[0] = blocks * threads * (threads + 1) / 2.
__global__ void blocks_sum_then_last_adds(long long* out, int* counter) {
  __shared__ int s_sum;
  int* d_sum = static_cast<int*>(dynamic_shared());
  if (threadIdx.x == 0) s_sum = *d_sum = 0;
  __syncthreads();
  atomicAdd(&s_sum, 1 + int(threadIdx.x));
  atomicAdd(d_sum, 1 + int(threadIdx.x));
  __syncthreads();
  if (threadIdx.x != 0) return;
  out[1 + blockIdx.x] = s_sum == *d_sum ? s_sum : -1;
  __threadfence();
  if (atomicAdd(counter, 1) + 1 != int(gridDim.x)) return;
  __threadfence();
  long long total = 0;
  for (unsigned b = 0; b < gridDim.x; ++b) total += out[1 + b];
  out[0] = total;
  atomicExch(counter, 0);
}

// out[t] = the first int of dynamic shared memory, then of a __shared__ array, before anything wrote them (the
// array is written at the end, so a later block would read that if blocks shared it).
__global__ void shared_uninitialised(long long* out) {
  __shared__ int s_array[4];
  const int* smem = static_cast<const int*>(dynamic_shared());
  out[2 * thread_id()] = smem[0];
  out[2 * thread_id() + 1] = s_array[0];
  __syncthreads();
  if (threadIdx.x == 0) s_array[0] = 7;
}

// Undefined on a GPU: the lanes of a warp at different collectives, a lane gone while the rest shuffle, a barrier
// that some threads reach at another line or never.
__global__ void divergent_shuffle(long long* out) {
  int v = lane_id();
  if (lane_id() < 16) v = __shfl_sync(kFull, v, 0);
  out[thread_id()] = __shfl_sync(kFull, v, 1);
}
__global__ void shuffle_after_lanes_returned(long long* out) {
  if (lane_id() >= 16) return;
  out[thread_id()] = __shfl_sync(kFull, lane_id(), 0);
}
__global__ void divergent_barrier(long long* out) {
  if (threadIdx.x < 32)
    __syncthreads();
  else
    __syncthreads();
  out[thread_id()] = 0;
}
__global__ void barrier_after_return(long long* out) {
  if (threadIdx.x == 0) return;
  __syncthreads();
  out[thread_id()] = 0;
}
__global__ void partial_mask(long long* out) { out[thread_id()] = __shfl_sync(0x0000ffffu, lane_id(), 0); }

}  // namespace

std::string selftest(const std::string& name, int blocks, int threads, std::vector<long long>* out) {
  using Kernel = void (*)(long long*);
  static const std::map<std::string, Kernel> kernels = {
      {"collectives", collectives},
      {"barrier_and", barrier_and},
      {"shared_with_barrier", [](long long* out) { shared_write_then_read(out, true); }},
      {"shared_without_barrier", [](long long* out) { shared_write_then_read(out, false); }},
      {"shared_uninitialised", shared_uninitialised},
      {"shared_overwritten_with_barrier", [](long long* out) { shared_read_then_overwritten(out, true); }},
      {"shared_overwritten_without_barrier", [](long long* out) { shared_read_then_overwritten(out, false); }},
      {"divergent_shuffle", divergent_shuffle},
      {"shuffle_after_lanes_returned", shuffle_after_lanes_returned},
      {"divergent_barrier", divergent_barrier},
      {"barrier_after_return", barrier_after_return},
      {"partial_mask", partial_mask},
      {"blocks_store_one_word", blocks_store_one_word},
  };
  using CountingKernel = void (*)(long long*, int*);
  static const std::map<std::string, CountingKernel> counting_kernels = {
      {"block_order", block_order},
      {"blocks_sum_then_last_adds", blocks_sum_then_last_adds},
  };
  const size_t n = size_t(blocks) * size_t(threads);
  out->assign(std::max<size_t>(n * 4, 1), -7);
  long long* data = out->data();
  const auto counting = counting_kernels.find(name);
  if (counting != counting_kernels.end()) {
    int counter = 0;
    const CountingKernel kernel = counting->second;
    return launch(dim3(blocks), dim3(threads), 16, [&] { kernel(data, &counter); });
  }
  const auto it = kernels.find(name);
  if (it == kernels.end()) return "no selftest kernel named " + name;
  const Kernel kernel = it->second;
  return launch(dim3(blocks), dim3(threads), 16, [&] { kernel(data); });
}

}  // namespace simt
