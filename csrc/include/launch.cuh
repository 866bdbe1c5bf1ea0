// Kernel launches. Every launch in csrc/ goes through launch_kernel, which checks it: with nvcc a triple-chevron
// launch and cudaGetLastError; with -DMOE_COMM_SIMT the same kernel on CPU fibers (csrc/simt/simt.h), whose
// errors (divergent collectives, deadlocked blocks) throw like a failed launch.
#pragma once
#include <cuda_runtime.h>
#include <utility>
#include "exception.cuh"
#include "ptx.cuh"

namespace moe_comm {

template <typename... Params, typename... Args>
void launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem_bytes, cudaStream_t stream,
                   Args&&... args) {
#if defined(__CUDACC__)
  kernel<<<grid, block, smem_bytes, stream>>>(std::forward<Args>(args)...);
  MC_LAUNCH_CHECK();
#elif defined(MOE_COMM_SIMT)
  (void)stream;  // a simt launch completes before it returns
  const std::string error = ::simt::launch(grid, block, smem_bytes, [&] { kernel(args...); });
  MC_CHECK(error.empty(), "simt launch failed: " + error);
#else
  static_assert(sizeof...(Params) < 0, "launch_kernel is for translation units that compile device code");
#endif
}

}  // namespace moe_comm

// The block's dynamic shared memory (the launch's smem_bytes), as `type name[]`.
#if defined(__CUDACC__)
#define MC_DYNAMIC_SHARED(type, name) extern __shared__ type name[]
#else
#define MC_DYNAMIC_SHARED(type, name) type* name = static_cast<type*>(::simt::dynamic_shared())
#endif
