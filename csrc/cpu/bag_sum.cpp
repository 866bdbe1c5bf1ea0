// moe_comm._cpu, combine's reduction on CPU ranks (moe_comm/cpu_kernels.py).
//
// bag_sum: out[t] = round(0 + rows[e_0] + rows[e_1] + ... + bias0[t] + bias1[t]) for the bag of row indices
// e_i of token t, accumulated in float32 (float64 for float64 rows), added in bag order, rounded once to
// nearest even: the sums of the portable backend's reference reduction, in one pass that reads each row once
// and writes each output once. It exists because PyTorch has no such op for bf16/fp16 rows on the CPU: its
// embedding_bag rounds ties away from zero (fbgemm) or runs at a third of memory speed (ATen).
//
// Shapes: N rows of H elements, T tokens, E bag elements; element_row [E] int64 in [0, N); bag_end [T] int64,
// non-decreasing, bag_end[T-1] = E.
#include <algorithm>
#include <cstring>

#include "common.h"

namespace moe_comm::cpu {
namespace {

// Same codes as the CUDA kernels' DType (csrc/include/intranode.cuh).
enum DType : int { kBFloat16 = 0, kFloat16 = 1, kFloat32 = 2, kFloat64 = 3 };

inline uint32_t bits_of(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float float_of(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

struct BFloat16 {
  uint16_t bits;
};
struct Float16 {
  uint16_t bits;
};

template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

inline float to_acc(BFloat16 x) { return float_of(uint32_t(x.bits) << 16); }

// The conversions are written without branches (each case computed, then selected) so that the loops
// over a row vectorise, and without float32 subnormals so that they hold under flush-to-zero modes.

// Exact: every fp16 value is a float32 value.
inline float to_acc(Float16 x) {
  const uint32_t h = x.bits;
  const uint32_t sign = (h & 0x8000u) << 16;
  const uint32_t exponent = h & 0x7c00u;
  // Normal, inf and NaN: move exponent and mantissa up 13 bits and rebias the exponent (15 -> 127); the
  // all-ones exponent (inf, NaN) needs twice the bias to reach 255.
  const uint32_t shifted = (h & 0x7fffu) << 13;
  const uint32_t normal = shifted + (exponent == 0x7c00u ? 0x70000000u : 0x38000000u);
  // Zero and subnormals, mantissa * 2^-24: read the mantissa as that of 2^-14 (1 + mantissa / 1024), then
  // take 2^-14 away; both operands and the result are normal float32 numbers (or zero), the result exact.
  const uint32_t subnormal = bits_of(float_of(shifted + 0x38800000u) - float_of(0x38800000u));
  return float_of(sign | (exponent == 0 ? subnormal : normal));
}
inline float to_acc(float x) { return x; }
inline double to_acc(double x) { return x; }

template <typename T> T from_acc(typename Acc<T>::type x);

// Round to nearest even on the 16 bits dropped; NaN becomes the canonical quiet NaN.
template <> inline BFloat16 from_acc<BFloat16>(float x) {
  const uint32_t u = bits_of(x);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return {uint16_t((u & 0x7fffffffu) > 0x7f800000u ? 0x7fc0u : rounded)};
}

template <> inline Float16 from_acc<Float16>(float x) {
  const uint32_t u = bits_of(x);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t a = u & 0x7fffffffu;
  // A normal fp16 (|x| >= 2^-14): nearest even at bit 13, exponent rebiased from 127 to 15.
  const uint32_t normal = (a + 0xfffu + ((a >> 13) & 1u) - 0x38000000u) >> 13;
  // Below: the value in units of 2^-24 is mantissa_with_one / 2^(126 - exponent), rounded to nearest even
  // by the same add-then-shift; the shift is kept in [1, 31] (lanes where it would leave that range are not
  // selected, or round to zero at 31, float32 subnormals included). A carry into the smallest normal is the
  // right answer.
  const uint32_t exponent = a >> 23;
  const uint32_t shift = exponent >= 95u ? 126u - std::min(exponent, 125u) : 31u;
  const uint32_t mantissa = (a & 0x7fffffu) | 0x800000u;
  const uint32_t subnormal = (mantissa + (1u << (shift - 1u)) - 1u + ((mantissa >> shift) & 1u)) >> shift;
  uint32_t magnitude = a >= 0x38800000u ? normal : subnormal;
  magnitude = a >= 0x477ff000u ? 0x7c00u : magnitude;  // >= 65520 rounds to infinity
  magnitude = a > 0x7f800000u ? 0x7e00u : magnitude;   // NaN
  return {uint16_t(sign | magnitude)};
}
template <> inline float from_acc<float>(float x) { return x; }
template <> inline double from_acc<double>(double x) { return x; }

// Elements of a row summed at a time: the accumulator stays in L1 while a token's rows stream through.
constexpr int64_t kTile = 512;

template <typename T, typename AccT>
inline void add_row(AccT* __restrict acc, const T* __restrict row, int64_t n) {
  for (int64_t c = 0; c < n; ++c) acc[c] += to_acc(row[c]);
}

template <typename T>
MC_VECTOR_CLONES void bag_sum_tokens(const T* rows, int64_t hidden, const int64_t* element_row, const int64_t* bag_end,
                                     const typename Acc<T>::type* bias0, const typename Acc<T>::type* bias1,
                                     T* out, int64_t t0, int64_t t1) {
  using AccT = typename Acc<T>::type;
  alignas(64) AccT acc[kTile];
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t e0 = t == 0 ? 0 : bag_end[t - 1];
    const int64_t e1 = bag_end[t];
    for (int64_t c0 = 0; c0 < hidden; c0 += kTile) {
      const int64_t n = std::min(kTile, hidden - c0);
      for (int64_t c = 0; c < n; ++c) acc[c] = AccT(0);
      // One row at a time; built with -fno-loop-unroll-and-jam, which would scalarise these adds (setup.py).
      for (int64_t e = e0; e < e1; ++e) add_row(acc, rows + element_row[e] * hidden + c0, n);
      if (bias0 != nullptr) add_row(acc, bias0 + t * hidden + c0, n);
      if (bias1 != nullptr) add_row(acc, bias1 + t * hidden + c0, n);
      T* __restrict o = out + t * hidden + c0;
      for (int64_t c = 0; c < n; ++c) o[c] = from_acc<T>(acc[c]);
    }
  }
}

}  // namespace

// Checks the bags against the rows (a bad index is an error naming the argument, never a stray read), then
// sums them, the tokens split evenly over up to `num_threads` threads.
void bag_sum(uint64_t rows_address, int dtype, int64_t num_rows, int64_t hidden, uint64_t element_row_address,
             int64_t num_elements, uint64_t bag_end_address, int64_t num_tokens, uint64_t bias0_address,
             uint64_t bias1_address, uint64_t out_address, int num_threads) {
  if (dtype < kBFloat16 || dtype > kFloat64) fail("dtype: unsupported code " + std::to_string(dtype));
  if (num_rows < 0 || hidden < 0 || num_elements < 0 || num_tokens < 0) fail("sizes must be >= 0");
  if (num_tokens == 0 || hidden == 0) return;
  require_pointer(bag_end_address, "bag_end");
  require_pointer(out_address, "out");
  if (num_elements > 0) {
    require_pointer(element_row_address, "element_row");
    require_pointer(rows_address, "rows");
  }
  const auto* element_row = as_pointer<const int64_t>(element_row_address);
  const auto* bag_end = as_pointer<const int64_t>(bag_end_address);
  int64_t previous = 0;
  for (int64_t t = 0; t < num_tokens; ++t) {
    if (bag_end[t] < previous || bag_end[t] > num_elements)
      fail("bag_end: not a non-decreasing sequence within [0, " + std::to_string(num_elements) + "] at token " +
           std::to_string(t));
    previous = bag_end[t];
  }
  if (previous != num_elements) fail("bag_end: the last bag ends at " + std::to_string(previous) + ", not at " +
                                     std::to_string(num_elements));
  for (int64_t e = 0; e < num_elements; ++e)
    if (element_row[e] < 0 || element_row[e] >= num_rows)
      fail("element_row: index " + std::to_string(element_row[e]) + " at " + std::to_string(e) + " is outside [0, " +
           std::to_string(num_rows) + ")");

  const auto run = [&](auto tag, int64_t t0, int64_t t1) {
    using T = decltype(tag);
    using AccT = typename Acc<T>::type;
    bag_sum_tokens<T>(as_pointer<const T>(rows_address), hidden, element_row, bag_end,
                      as_pointer<const AccT>(bias0_address), as_pointer<const AccT>(bias1_address),
                      as_pointer<T>(out_address), t0, t1);
  };
  const auto run_range = [&](int64_t t0, int64_t t1) {
    switch (dtype) {
      case kBFloat16: run(BFloat16{}, t0, t1); break;
      case kFloat16: run(Float16{}, t0, t1); break;
      case kFloat32: run(float{}, t0, t1); break;
      default: run(double{}, t0, t1); break;
    }
  };
  const int64_t element_bytes = dtype == kFloat64 ? 8 : dtype == kFloat32 ? 4 : 2;
  parallel_for(num_tokens, (num_elements + num_tokens) * hidden * element_bytes, num_threads, run_range);
}

}  // namespace moe_comm::cpu
