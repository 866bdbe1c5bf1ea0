// Per-token FP8 (e4m3) cast with one float32 scale per 128 channels: scale = max(amax, 1e-4) / 448 and
// x_fp8 = x / scale, rounded to nearest (bit-exact with moe_comm.fp8.per_token_cast_to_fp8).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <algorithm>
#include "../include/exception.cuh"
#include "../include/launch.cuh"
#include "../include/intranode.cuh"
#include "../include/ptx.cuh"

namespace moe_comm {
namespace {

constexpr int kThreads = 256;
constexpr int kBlock = kFp8Block;  // channels per scale

__device__ __forceinline__ float load_as_float(const void* x, int dtype, size_t i) {
  switch (dtype) {
    case kBFloat16: return __bfloat162float(static_cast<const __nv_bfloat16*>(x)[i]);
    case kFloat16: return __half2float(static_cast<const __half*>(x)[i]);
    default: return static_cast<const float*>(x)[i];
  }
}

// One warp per (token, 128-channel block); each lane handles 4 channels.
__global__ void per_token_cast_kernel(const void* x, int dtype, int num_tokens, int hidden, uint8_t* out,
                                      float* scales) {
  const int num_blocks = (hidden + kBlock - 1) / kBlock;
  const int lane = threadIdx.x % 32;
  const int64_t total = int64_t(num_tokens) * num_blocks;
  const int64_t stride = int64_t(gridDim.x) * (blockDim.x / 32);
  for (int64_t w = int64_t(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32; w < total; w += stride) {
    const int64_t t = w / num_blocks;
    const int b = int(w % num_blocks);
    float vals[4];
    float amax = 0.0f;
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const int c = b * kBlock + lane * 4 + k;
      vals[k] = c < hidden ? load_as_float(x, dtype, size_t(t) * hidden + c) : 0.0f;
      amax = fmaxf(amax, fabsf(vals[k]));
    }
#pragma unroll
    for (int off = 16; off > 0; off /= 2) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, off));
    const float scale = fp8_scale_of(amax);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const int c = b * kBlock + lane * 4 + k;
      if (c < hidden) out[size_t(t) * hidden + c] = fp8_e4m3_of(vals[k], scale);
    }
    if (lane == 0) scales[size_t(t) * num_blocks + b] = scale;
  }
}

}  // namespace

void launch_per_token_cast_fp8(const void* x, int dtype, int num_tokens, int hidden, void* out_fp8, float* out_scales,
                               int num_sms, cudaStream_t stream) {
  MC_CHECK(dtype == kBFloat16 || dtype == kFloat16 || dtype == kFloat32, "x: expected bf16, fp16 or fp32");
  MC_CHECK(num_tokens >= 0 && hidden > 0, "x: bad shape");
  MC_CHECK(num_sms >= 1, "num_sms must be >= 1");
  if (num_tokens == 0) return;
  MC_CHECK(x != nullptr && out_fp8 != nullptr && out_scales != nullptr, "x/out: null pointer");
  const int64_t warps = int64_t(num_tokens) * ((hidden + kBlock - 1) / kBlock);
  const int blocks = int(std::min<int64_t>(num_sms, (warps + kThreads / 32 - 1) / (kThreads / 32)));
  launch_kernel(per_token_cast_kernel, blocks, kThreads, 0, stream, x, dtype, num_tokens, hidden,
                static_cast<uint8_t*>(out_fp8), out_scales);
}

}  // namespace moe_comm
