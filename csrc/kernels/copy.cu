#include <algorithm>
#include "../include/api.cuh"
#include "../include/exception.cuh"
#include "../include/launch.cuh"
#include "../include/ptx.cuh"

namespace moe_comm {
namespace {

// 16-byte vectorised grid-stride copy, kCopyUnroll loads in flight per thread like the intranode kernels'
// warp_copy16 (so the baseline is as good a copy as theirs); tail handled bytewise.
__global__ void sm_copy_kernel(uint8_t* __restrict__ dst, const uint8_t* __restrict__ src, size_t bytes) {
  const size_t n16 = bytes / 16;
  const int4* __restrict__ s = reinterpret_cast<const int4*>(src);
  int4* __restrict__ d = reinterpret_cast<int4*>(dst);
  const size_t stride = size_t(gridDim.x) * blockDim.x;
  size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x;
  for (; i + stride * (kCopyUnroll - 1) < n16; i += stride * kCopyUnroll) {
    int4 v[kCopyUnroll];
#pragma unroll
    for (int u = 0; u < kCopyUnroll; ++u) v[u] = s[i + stride * u];
#pragma unroll
    for (int u = 0; u < kCopyUnroll; ++u) d[i + stride * u] = v[u];
  }
  for (; i < n16; i += stride) d[i] = s[i];
  for (size_t i = n16 * 16 + size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < bytes; i += stride) dst[i] = src[i];
}

}  // namespace

void launch_sm_copy(void* dst, const void* src, size_t bytes, int num_sms, cudaStream_t stream) {
  MC_CHECK(num_sms >= 1, "num_sms must be >= 1");
  MC_CHECK((reinterpret_cast<uintptr_t>(dst) % 16) == 0 && (reinterpret_cast<uintptr_t>(src) % 16) == 0,
           "dst and src must be 16-byte aligned");
  if (bytes == 0) return;
  launch_kernel(sm_copy_kernel, num_sms, 512, 0, stream, static_cast<uint8_t*>(dst), static_cast<const uint8_t*>(src),
                bytes);
}

}  // namespace moe_comm
