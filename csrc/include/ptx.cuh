// Memory-ordering primitives (system scope: peers may be other GPUs through NVLink/IPC mappings).
#pragma once
#include <cstdint>

namespace moe_comm {

#ifdef __CUDACC__
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

#endif  // __CUDACC__

// Error record written to host-mapped memory when a bounded wait expires.
struct TimeoutRecord {
  int flag;      // 0 = none, 1 = timeout
  int rank;
  int peer;
  int phase;
  long long expected;
  long long observed;
};

#ifdef __CUDACC__
// Spin until *p >= expected or `timeout_cycles` elapse; on expiry fill `err` (first writer wins) and return false.
__device__ __forceinline__ bool wait_geq(const int* p, int expected, long long timeout_cycles, TimeoutRecord* err,
                                         int rank, int peer, int phase) {
  const long long start = clock64();
  int v;
  while ((v = ld_acquire_sys(p)) < expected) {
    if (clock64() - start > timeout_cycles) {
      if (err != nullptr && atomicCAS(&err->flag, 0, 1) == 0) {
        err->rank = rank;
        err->peer = peer;
        err->phase = phase;
        err->expected = expected;
        err->observed = v;
        __threadfence_system();
      }
      return false;
    }
  }
  return true;
}
#endif  // __CUDACC__

}  // namespace moe_comm
