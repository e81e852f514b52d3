// Helpers shared by the pooling and dense kernels: dtype codes and host dispatch on them, fp32 <-> storage-type
// conversions, packed (vectorised) loads/stores of V consecutive elements, warp and block sums.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common/launch.h"

namespace dinotxt_fast {

// Storage dtypes as the Python wrappers encode them.
enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// V elements moved as one aligned access (8 or 16 bytes for V = 4), which the caller guarantees is aligned.
template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

template <typename T, int V>
__device__ __forceinline__ void load_pack(const T* p, float (&out)[V]) {
  const Pack<T, V> pack = *reinterpret_cast<const Pack<T, V>*>(p);
#pragma unroll
  for (int i = 0; i < V; ++i) out[i] = to_float(pack.v[i]);
}

template <typename T, int V>
__device__ __forceinline__ void store_pack(T* p, const float (&in)[V]) {
  Pack<T, V> pack;
#pragma unroll
  for (int i = 0; i < V; ++i) pack.v[i] = from_float<T>(in[i]);
  *reinterpret_cast<Pack<T, V>*>(p) = pack;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Host side: calls f(TypeTag<T>{}) with the storage type of a dtype code.
template <typename T>
struct TypeTag {
  using type = T;
};

template <typename F>
void with_dtype(int dtype, F&& f) {
  switch (dtype) {
    case kFloat32: f(TypeTag<float>{}); break;
    case kFloat16: f(TypeTag<__half>{}); break;
    case kBFloat16: f(TypeTag<__nv_bfloat16>{}); break;
    default: throw_invalid_argument("unsupported dtype code ", dtype, " (0 float32, 1 float16, 2 bfloat16)");
  }
}

// Sum over the block, returned to every thread; the same fixed order in every thread (deterministic).
// `scratch` holds one float per warp; the leading barrier lets consecutive calls reuse it.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  v = warp_sum(v);
  __syncthreads();
  if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = v;
  __syncthreads();
  float total = 0.f;
  for (int w = 0; w < static_cast<int>(blockDim.x / 32); ++w) total += scratch[w];
  return total;
}

}  // namespace dinotxt_fast
