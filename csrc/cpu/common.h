// Shared helpers of moe_comm._cpu's kernels (csrc/cpu/): argument errors, raw pointers, threading.
#pragma once

#include <algorithm>
#include <cstdint>
#include <exception>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace moe_comm::cpu {

// The x86 builds carry AVX-512 and AVX2 versions of the loops, picked at load time; others are compiled once.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(__SANITIZE_ADDRESS__)
#define MC_VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define MC_VECTOR_CLONES
#endif

// pybind11 turns std::invalid_argument into a Python ValueError; messages start with the argument's name.
[[noreturn]] inline void fail(const std::string& message) { throw std::invalid_argument(message); }

inline void require_pointer(uint64_t address, const char* name) {
  if (address == 0) fail(std::string(name) + ": null pointer");
}

template <typename T> T* as_pointer(uint64_t address) { return reinterpret_cast<T*>(static_cast<uintptr_t>(address)); }

// Runs fn(i0, i1) over [0, num_items) split evenly over up to num_threads threads (the caller's thread
// included), using only as many threads as `bytes` of memory traffic pay for: a thread costs about as much
// to start as moving 128 KiB.
template <typename Fn> void parallel_for(int64_t num_items, int64_t bytes, int num_threads, const Fn& fn) {
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>({int64_t(num_threads), num_items, bytes >> 17}));
  if (threads == 1) {
    fn(int64_t(0), num_items);
    return;
  }
  const auto first = [&](int64_t part) { return num_items * part / threads; };
  std::vector<std::thread> pool;
  int64_t started = 1;
  try {
    pool.reserve(size_t(threads - 1));
    for (; started < threads; ++started) pool.emplace_back(fn, first(started), first(started + 1));
  } catch (const std::exception&) {
    // No more threads to be had (std::system_error, std::bad_alloc): this thread does the parts left over.
  }
  for (int64_t part = started; part < threads; ++part) fn(first(part), first(part + 1));
  fn(int64_t(0), first(1));
  for (auto& thread : pool) thread.join();
}

// Entry points (bound in module.cpp); each checks its arguments before touching memory.
void bag_sum(uint64_t rows, int dtype, int64_t num_rows, int64_t hidden, uint64_t element_row, int64_t num_elements,
             uint64_t bag_end, int64_t num_tokens, uint64_t bias0, uint64_t bias1, uint64_t out, int num_threads);
void localize_topk(uint64_t global_ids, int64_t ids_row_stride, uint64_t weights, int64_t weights_row_stride,
                   int64_t num_rows, int64_t num_topk, int64_t first_expert, int64_t num_local_experts,
                   uint64_t local_ids, uint64_t local_weights, uint64_t counts);

}  // namespace moe_comm::cpu
