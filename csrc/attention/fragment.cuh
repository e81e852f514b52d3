// Register-level helpers shared by the attention kernels (mma.sync and wgmma paths).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

namespace dinotxt_fast {
namespace attention {

// The 16-bit element type of a kernel instantiated on `kBf16`.
template <bool kBf16>
using Element = std::conditional_t<kBf16, __nv_bfloat16, __half>;

// 2^x on the special-function unit; exp2(-inf) = 0.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// Two floats -> one register of two 16-bit values, `lo` in the low half (the lower column of a fragment pair: the
// element order of an .f16x2 / .bf16x2 fragment register).
template <typename T>
__device__ __forceinline__ std::uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ std::uint32_t pack2<__half>(float lo, float hi) {
  const __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const std::uint32_t*>(&h);
}
template <>
__device__ __forceinline__ std::uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const std::uint32_t*>(&h);
}

}  // namespace attention
}  // namespace dinotxt_fast
