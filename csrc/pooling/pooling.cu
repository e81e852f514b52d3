// Patch pooling kernels: [cls ; mean(patches)] of tokens [B, 1+R+P, D], optional fused LayerNorm (statistics
// per token, affine applied to the pooled vectors since mean(xhat * w + b) = mean(xhat) * w + b) and L2
// normalisation of the 2D vector.
//
// Forward:  pool_partial   one warp per token row; block (b, s) sums the (normalised) patch rows of split s of
//                          image b into fp32 partial column sums (splits keep the GPU busy when B is small);
//           pool_finalize  one block per image: cls row, sum of partials / P, affine, L2 norm, output cast.
// Backward: pool_finalize  in gradient mode: grad_out -> gradient of the pre-normalisation vector (the pooled
//                          vector is recomputed only when normalising), patch half divided by P;
//           pool_backward  one warp per row writes every token's gradient (registers: exactly zero) and
//                          per-block partial sums of d_weight / d_bias; column_sum adds them in a fixed order.
#include "pooling/pooling.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <type_traits>

#include "common/check.h"
#include "common/launch.h"
#include "pooling/vec.cuh"

namespace dinotxt_fast {
namespace pooling {
namespace {

constexpr int kWarps = 4;  // row kernels: 4 warps per block, each on one token row at a time
constexpr int kFinalizeThreads = 256;
constexpr int kSumThreads = 256;
constexpr float kNormEps = 1e-12f;  // F.normalize's clamp of the norm
constexpr std::int64_t kMaxDim = 1536;

// Lane `lane` owns chunks j = 0..K-1 of V consecutive columns starting at (j * 32 + lane) * V; V > 1 needs
// D % V == 0 so that a chunk is either wholly inside the row or wholly outside.
template <typename T, int V, int K>
__device__ __forceinline__ void load_row(const T* row, std::int64_t dim, int lane, float (&v)[K][V], bool (&ok)[K]) {
#pragma unroll
  for (int j = 0; j < K; ++j) {
    const std::int64_t col = static_cast<std::int64_t>(j * 32 + lane) * V;
    ok[j] = col < dim;
    if (ok[j]) {
      load_pack<T, V>(row + col, v[j]);
    } else {
#pragma unroll
      for (int i = 0; i < V; ++i) v[j][i] = 0.f;
    }
  }
}

template <typename T, int V, int K>
__device__ __forceinline__ void store_row(T* row, std::int64_t dim, int lane, const float (&v)[K][V]) {
#pragma unroll
  for (int j = 0; j < K; ++j) {
    const std::int64_t col = static_cast<std::int64_t>(j * 32 + lane) * V;
    if (col < dim) store_pack<T, V>(row + col, v[j]);
  }
}

// In place: v <- (v - mean) * rstd on valid columns, 0 elsewhere; returns rstd. Invalid entries must be 0.
template <int V, int K>
__device__ __forceinline__ float layer_norm_row(float (&v)[K][V], const bool (&ok)[K], std::int64_t dim, float eps) {
  float s = 0.f;
#pragma unroll
  for (int j = 0; j < K; ++j)
#pragma unroll
    for (int i = 0; i < V; ++i) s += v[j][i];
  const float mean = warp_sum(s) / static_cast<float>(dim);
  float q = 0.f;
#pragma unroll
  for (int j = 0; j < K; ++j)
#pragma unroll
    for (int i = 0; i < V; ++i) {
      const float d = ok[j] ? v[j][i] - mean : 0.f;
      q += d * d;
    }
  const float rstd = rsqrtf(warp_sum(q) / static_cast<float>(dim) + eps);
#pragma unroll
  for (int j = 0; j < K; ++j)
#pragma unroll
    for (int i = 0; i < V; ++i) v[j][i] = ok[j] ? (v[j][i] - mean) * rstd : 0.f;
  return rstd;
}

template <typename T, int V, int K, bool kLN>
__global__ void __launch_bounds__(kWarps * 32)
    pool_partial_kernel(const T* __restrict__ x, std::int64_t stride_b, std::int64_t stride_n, std::int64_t first_row,
                        std::int64_t n_rows, std::int64_t rows_per_split, std::int64_t dim, float eps,
                        float* __restrict__ partial) {
  extern __shared__ float warp_sums[];  // [kWarps][dim]
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const std::int64_t b = blockIdx.x, split = blockIdx.y;
  const std::int64_t begin = split * rows_per_split;
  const std::int64_t end = min(begin + rows_per_split, n_rows);
  const T* base = x + b * stride_b + first_row * stride_n;
  float acc[K][V];
#pragma unroll
  for (int j = 0; j < K; ++j)
#pragma unroll
    for (int i = 0; i < V; ++i) acc[j][i] = 0.f;
  for (std::int64_t r = begin + warp; r < end; r += kWarps) {
    float v[K][V];
    bool ok[K];
    load_row<T, V, K>(base + r * stride_n, dim, lane, v, ok);
    if constexpr (kLN) layer_norm_row<V, K>(v, ok, dim, eps);
#pragma unroll
    for (int j = 0; j < K; ++j)
#pragma unroll
      for (int i = 0; i < V; ++i) acc[j][i] += v[j][i];
  }
#pragma unroll
  for (int j = 0; j < K; ++j) {
    const std::int64_t col = static_cast<std::int64_t>(j * 32 + lane) * V;
    if (col < dim)
#pragma unroll
      for (int i = 0; i < V; ++i) warp_sums[warp * dim + col + i] = acc[j][i];
  }
  __syncthreads();
  float* out = partial + (b * gridDim.y + split) * dim;
  for (std::int64_t c = threadIdx.x; c < dim; c += blockDim.x) {
    float total = 0.f;
    for (int w = 0; w < kWarps; ++w) total += warp_sums[w * dim + c];
    out[c] = total;
  }
}

template <typename T>
__global__ void __launch_bounds__(kFinalizeThreads)
    pool_finalize_kernel(const T* __restrict__ x, std::int64_t stride_b, const float* __restrict__ partial,
                         std::int64_t n_splits, const float* __restrict__ weight, const float* __restrict__ bias,
                         const T* __restrict__ grad, std::int64_t g_stride_b, std::int64_t g_stride_d,
                         void* __restrict__ out, std::int64_t dim, std::int64_t n_patches, float eps, bool normalize,
                         bool grad_mode) {
  extern __shared__ float pooled[];  // [2][dim]: the cls half and the patch half
  __shared__ float scratch[32];
  float* cls = pooled;
  float* patch = pooled + dim;
  const std::int64_t b = blockIdx.x;
  const float inv_dim = 1.f / static_cast<float>(dim);
  // Each thread only ever touches its own columns c, so the loops below need no barriers between them.
  float norm = 0.f, clamped = 1.f;
  if (normalize || !grad_mode) {
    float sum = 0.f;
    for (std::int64_t c = threadIdx.x; c < dim; c += blockDim.x) {
      const float v = to_float(x[b * stride_b + c]);
      cls[c] = v;
      sum += v;
      float total = 0.f;
      for (std::int64_t s = 0; s < n_splits; ++s) total += partial[(b * n_splits + s) * dim + c];
      patch[c] = total / static_cast<float>(n_patches);
    }
    if (weight != nullptr) {
      const float mean = block_sum(sum, scratch) * inv_dim;
      float q = 0.f;
      for (std::int64_t c = threadIdx.x; c < dim; c += blockDim.x) q += (cls[c] - mean) * (cls[c] - mean);
      const float rstd = 1.f / sqrtf(block_sum(q, scratch) * inv_dim + eps);
      for (std::int64_t c = threadIdx.x; c < dim; c += blockDim.x) {
        const float shift = bias != nullptr ? bias[c] : 0.f;
        cls[c] = (cls[c] - mean) * rstd * weight[c] + shift;
        patch[c] = patch[c] * weight[c] + shift;
      }
    }
    if (normalize) {
      float q = 0.f;
      for (std::int64_t c = threadIdx.x; c < dim; c += blockDim.x) q += cls[c] * cls[c] + patch[c] * patch[c];
      norm = sqrtf(block_sum(q, scratch));
      clamped = fmaxf(norm, kNormEps);
      for (std::int64_t c = threadIdx.x; c < dim; c += blockDim.x) {
        cls[c] /= clamped;
        patch[c] /= clamped;
      }
    }
  }
  if (!grad_mode) {
    T* o = static_cast<T*>(out) + b * 2 * dim;
    for (std::int64_t c = threadIdx.x; c < dim; c += blockDim.x) {
      o[c] = from_float<T>(cls[c]);
      o[dim + c] = from_float<T>(patch[c]);
    }
    return;
  }
  const T* g = grad + b * g_stride_b;
  float dot = 0.f;
  if (normalize) {
    for (std::int64_t c = threadIdx.x; c < dim; c += blockDim.x)
      dot += to_float(g[c * g_stride_d]) * cls[c] + to_float(g[(dim + c) * g_stride_d]) * patch[c];
    dot = block_sum(dot, scratch);
  }
  // d/dx of x / max(|x|, eps) with cls, patch the normalised halves: (g - y (g . y)) / |x|, or g / eps.
  const float keep = normalize && norm > kNormEps ? 1.f : 0.f;
  float* o = static_cast<float*>(out) + b * 2 * dim;
  for (std::int64_t c = threadIdx.x; c < dim; c += blockDim.x) {
    float g_cls = to_float(g[c * g_stride_d]);
    float g_patch = to_float(g[(dim + c) * g_stride_d]);
    if (normalize) {
      g_cls = (g_cls - keep * cls[c] * dot) / clamped;
      g_patch = (g_patch - keep * patch[c] * dot) / clamped;
    }
    o[c] = g_cls;
    o[dim + c] = g_patch / static_cast<float>(n_patches);
  }
}

template <typename T, int V, int K, bool kLN>
__global__ void __launch_bounds__(kWarps * 32)
    pool_backward_kernel(const T* __restrict__ x, std::int64_t stride_b, std::int64_t stride_n,
                         const float* __restrict__ gvec, const float* __restrict__ weight, T* __restrict__ dx,
                         float* __restrict__ ln_partial, std::int64_t n_tokens, std::int64_t num_registers,
                         std::int64_t rows_per_split, std::int64_t dim, float eps) {
  // kLN: [kWarps][dim] per-warp sums of the patch rows' xhat, then [2][dim] the cls row's d_weight/d_bias terms.
  extern __shared__ float smem[];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const std::int64_t b = blockIdx.x, split = blockIdx.y;
  const std::int64_t begin = split * rows_per_split;
  const std::int64_t end = min(begin + rows_per_split, n_tokens);
  const float* g_cls = gvec + b * 2 * dim;
  const float* g_patch = g_cls + dim;  // already divided by the number of patches
  const T* xb = x + b * stride_b;
  T* dxb = dx + b * n_tokens * dim;
  const float inv_dim = 1.f / static_cast<float>(dim);
  float* cls_terms = smem + kWarps * dim;
  if constexpr (kLN) {
    for (std::int64_t c = threadIdx.x; c < 2 * dim; c += blockDim.x) cls_terms[c] = 0.f;
    __syncthreads();
  }
  // Every patch row has the same dy = g_patch, so dxhat = dy * w and its mean are computed once.
  float u[K][V];
#pragma unroll
  for (int j = 0; j < K; ++j) {
    const std::int64_t col = static_cast<std::int64_t>(j * 32 + lane) * V;
    float w[V];
    if (col < dim) {
      load_pack<float, V>(g_patch + col, u[j]);
      if constexpr (kLN) {
        load_pack<float, V>(weight + col, w);
#pragma unroll
        for (int i = 0; i < V; ++i) u[j][i] *= w[i];
      }
    } else {
#pragma unroll
      for (int i = 0; i < V; ++i) u[j][i] = 0.f;
    }
  }
  float u_mean = 0.f;
  if constexpr (kLN) {
    float s = 0.f;
#pragma unroll
    for (int j = 0; j < K; ++j)
#pragma unroll
      for (int i = 0; i < V; ++i) s += u[j][i];
    u_mean = warp_sum(s) * inv_dim;
  }
  float acc[K][V];  // sum of the patch rows' xhat (kLN)
#pragma unroll
  for (int j = 0; j < K; ++j)
#pragma unroll
    for (int i = 0; i < V; ++i) acc[j][i] = 0.f;

  for (std::int64_t r = begin + warp; r < end; r += kWarps) {
    T* out_row = dxb + r * dim;
    if (r > num_registers) {  // a patch
      if constexpr (kLN) {
        float v[K][V];
        bool ok[K];
        load_row<T, V, K>(xb + r * stride_n, dim, lane, v, ok);
        const float rstd = layer_norm_row<V, K>(v, ok, dim, eps);
        float s = 0.f;
#pragma unroll
        for (int j = 0; j < K; ++j)
#pragma unroll
          for (int i = 0; i < V; ++i) s += u[j][i] * v[j][i];
        const float uv_mean = warp_sum(s) * inv_dim;
#pragma unroll
        for (int j = 0; j < K; ++j)
#pragma unroll
          for (int i = 0; i < V; ++i) {
            acc[j][i] += v[j][i];
            v[j][i] = rstd * (u[j][i] - u_mean - v[j][i] * uv_mean);
          }
        store_row<T, V, K>(out_row, dim, lane, v);
      } else {
        store_row<T, V, K>(out_row, dim, lane, u);
      }
    } else if (r == 0) {  // the cls token
      float dy[K][V];
#pragma unroll
      for (int j = 0; j < K; ++j) {
        const std::int64_t col = static_cast<std::int64_t>(j * 32 + lane) * V;
        if (col < dim) {
          load_pack<float, V>(g_cls + col, dy[j]);
        } else {
#pragma unroll
          for (int i = 0; i < V; ++i) dy[j][i] = 0.f;
        }
      }
      if constexpr (kLN) {
        float v[K][V];
        bool ok[K];
        load_row<T, V, K>(xb, dim, lane, v, ok);
        const float rstd = layer_norm_row<V, K>(v, ok, dim, eps);
        float s1 = 0.f, s2 = 0.f;
#pragma unroll
        for (int j = 0; j < K; ++j) {
          const std::int64_t col = static_cast<std::int64_t>(j * 32 + lane) * V;
          if (!ok[j]) continue;
          float w[V];
          load_pack<float, V>(weight + col, w);
#pragma unroll
          for (int i = 0; i < V; ++i) {
            cls_terms[col + i] = dy[j][i] * v[j][i];
            cls_terms[dim + col + i] = dy[j][i];
            dy[j][i] *= w[i];
            s1 += dy[j][i];
            s2 += dy[j][i] * v[j][i];
          }
        }
        const float a = warp_sum(s1) * inv_dim, c = warp_sum(s2) * inv_dim;
#pragma unroll
        for (int j = 0; j < K; ++j)
#pragma unroll
          for (int i = 0; i < V; ++i) dy[j][i] = rstd * (dy[j][i] - a - v[j][i] * c);
      }
      store_row<T, V, K>(out_row, dim, lane, dy);
    } else {  // a register token: no gradient
      float zero[K][V] = {};
      store_row<T, V, K>(out_row, dim, lane, zero);
    }
  }
  if constexpr (kLN) {
#pragma unroll
    for (int j = 0; j < K; ++j) {
      const std::int64_t col = static_cast<std::int64_t>(j * 32 + lane) * V;
      if (col < dim)
#pragma unroll
        for (int i = 0; i < V; ++i) smem[warp * dim + col + i] = acc[j][i];
    }
    __syncthreads();
    // d_weight = g_patch * sum(xhat over patches) + cls term; d_bias = (#patch rows) * g_patch + cls term.
    const std::int64_t patch_rows = max(static_cast<std::int64_t>(0), end - max(begin, num_registers + 1));
    float* out = ln_partial + (b * gridDim.y + split) * 2 * dim;
    for (std::int64_t c = threadIdx.x; c < dim; c += blockDim.x) {
      float total = 0.f;
      for (int w = 0; w < kWarps; ++w) total += smem[w * dim + c];
      out[c] = g_patch[c] * total + cls_terms[c];
      out[dim + c] = g_patch[c] * static_cast<float>(patch_rows) + cls_terms[dim + c];
    }
  }
}

__global__ void __launch_bounds__(kSumThreads)
    column_sum_kernel(const float* __restrict__ part, std::int64_t rows, std::int64_t cols,
                      std::int64_t rows_per_chunk, float* __restrict__ out) {
  const std::int64_t c = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= cols) return;
  const std::int64_t begin = blockIdx.y * rows_per_chunk;
  const std::int64_t end = min(begin + rows_per_chunk, rows);
  float total = 0.f;
  for (std::int64_t r = begin; r < end; ++r) total += part[r * cols + c];
  out[blockIdx.y * cols + c] = total;
}

// ------------------------------------------------------------------------------------------- host dispatch
template <int N>
using Int = std::integral_constant<int, N>;

// (V, K) of the row kernels: packs of 4 when every row start is 4-element aligned, else scalars.
template <typename F>
void with_row_shape(std::int64_t dim, bool packed, F&& f) {
  if (!packed) return f(Int<1>{}, Int<48>{});
  if (dim <= 512) return f(Int<4>{}, Int<4>{});
  if (dim <= 1024) return f(Int<4>{}, Int<8>{});
  f(Int<4>{}, Int<12>{});
}

template <typename T>
bool rows_packable(const Tokens& x) {
  return x.dim % 4 == 0 && x.stride_n % 4 == 0 && x.stride_b % 4 == 0 && x.ptr % (4 * sizeof(T)) == 0;
}

void check_tokens(const Tokens& x, std::int64_t num_registers) {
  require_positive(x.batch, "batch");
  require_positive(x.dim, "dim");
  require(x.dim <= kMaxDim, "pooling: the CUDA kernels keep a token row in registers: D must be <= ", kMaxDim,
          ", got ", x.dim);
  require(num_registers >= 0 && x.tokens >= num_registers + 2, "pooling: ", x.tokens, " tokens hold no patch after ",
          "cls and ", num_registers, " registers");
  require(x.batch <= 0x7fffffff, "pooling: batch ", x.batch, " exceeds the grid limit");
  require(x.stride_b >= 0 && x.stride_n >= 0, "pooling: negative token strides");
}

void check_splits(std::int64_t splits, std::int64_t rows_per_split, std::int64_t rows) {
  require(splits >= 1 && splits <= 65535, "pooling: splits must be in [1, 65535], got ", splits);
  require(rows_per_split >= 1 && splits * rows_per_split >= rows && (splits - 1) * rows_per_split < rows,
          "pooling: ", splits, " splits of ", rows_per_split, " rows do not partition ", rows, " rows");
}

void launch_partial(const Tokens& x, std::int64_t num_registers, bool has_ln, float eps, float* partial,
                    std::int64_t splits, std::int64_t rows_per_split, cudaStream_t stream) {
  const std::int64_t n_patches = x.tokens - 1 - num_registers;
  check_splits(splits, rows_per_split, n_patches);
  with_dtype(x.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const T* tokens = as_ptr<const T>(x.ptr, "tokens");
    with_row_shape(x.dim, rows_packable<T>(x), [&](auto v, auto k) {
      constexpr int V = decltype(v)::value, K = decltype(k)::value;
      const dim3 grid(static_cast<unsigned>(x.batch), static_cast<unsigned>(splits));
      const size_t smem = kWarps * x.dim * sizeof(float);
      if (has_ln) {
        pool_partial_kernel<T, V, K, true><<<grid, kWarps * 32, smem, stream>>>(
            tokens, x.stride_b, x.stride_n, 1 + num_registers, n_patches, rows_per_split, x.dim, eps, partial);
      } else {
        pool_partial_kernel<T, V, K, false><<<grid, kWarps * 32, smem, stream>>>(
            tokens, x.stride_b, x.stride_n, 1 + num_registers, n_patches, rows_per_split, x.dim, eps, partial);
      }
      DTF_CHECK_LAUNCH();
    });
  });
}

void launch_finalize(const Tokens& x, std::int64_t num_registers, const float* weight, const float* bias, float eps,
                     bool normalize, const float* partial, std::int64_t splits, std::uintptr_t grad,
                     std::int64_t g_stride_b, std::int64_t g_stride_d, void* out, bool grad_mode,
                     cudaStream_t stream) {
  with_dtype(x.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const T* g = grad_mode ? as_ptr<const T>(grad, "grad_out") : nullptr;
    const size_t smem = 2 * x.dim * sizeof(float);
    pool_finalize_kernel<T><<<static_cast<unsigned>(x.batch), kFinalizeThreads, smem, stream>>>(
        reinterpret_cast<const T*>(x.ptr), x.stride_b, partial, splits, weight, bias, g, g_stride_b, g_stride_d, out,
        x.dim, x.tokens - 1 - num_registers, eps, normalize, grad_mode);
    DTF_CHECK_LAUNCH();
  });
}

}  // namespace

void forward(const Tokens& x, std::int64_t num_registers, std::uintptr_t ln_weight, std::uintptr_t ln_bias, float eps,
             bool normalize, std::uintptr_t partial, std::int64_t splits, std::int64_t rows_per_split,
             std::uintptr_t out, std::uintptr_t stream) {
  check_tokens(x, num_registers);
  require(ln_weight != 0 || ln_bias == 0, "pooling: ln_bias given without ln_weight");
  const cudaStream_t s = as_stream(stream);
  float* part = as_ptr<float>(partial, "partial");
  const float* weight = ln_weight != 0 ? as_ptr<const float>(ln_weight, "ln_weight", 16) : nullptr;
  const float* bias = ln_bias != 0 ? as_ptr<const float>(ln_bias, "ln_bias") : nullptr;
  launch_partial(x, num_registers, weight != nullptr, eps, part, splits, rows_per_split, s);
  launch_finalize(x, num_registers, weight, bias, eps, normalize, part, splits, 0, 0, 0,
                  reinterpret_cast<void*>(as_ptr<char>(out, "out")), false, s);
}

void backward(std::uintptr_t grad_out, std::int64_t g_stride_b, std::int64_t g_stride_d, const Tokens& x,
              std::int64_t num_registers, std::uintptr_t ln_weight, std::uintptr_t ln_bias, float eps, bool normalize,
              std::uintptr_t partial, std::int64_t fwd_splits, std::int64_t fwd_rows_per_split, std::uintptr_t gvec,
              std::int64_t splits, std::int64_t rows_per_split, std::uintptr_t ln_partial, std::uintptr_t d_tokens,
              std::uintptr_t stream) {
  check_tokens(x, num_registers);
  require(ln_weight != 0 || ln_bias == 0, "pooling: ln_bias given without ln_weight");
  check_splits(splits, rows_per_split, x.tokens);
  const cudaStream_t s = as_stream(stream);
  const bool has_ln = ln_weight != 0;
  // 16-byte alignment: the row kernels read weight and gvec in packs of 4 floats.
  const float* weight = has_ln ? as_ptr<const float>(ln_weight, "ln_weight", 16) : nullptr;
  const float* bias = ln_bias != 0 ? as_ptr<const float>(ln_bias, "ln_bias") : nullptr;
  float* g = as_ptr<float>(gvec, "gvec", 16);
  float* part = nullptr;
  if (normalize) {
    part = as_ptr<float>(partial, "partial");
    launch_partial(x, num_registers, has_ln, eps, part, fwd_splits, fwd_rows_per_split, s);
  }
  launch_finalize(x, num_registers, weight, bias, eps, normalize, part, fwd_splits, grad_out, g_stride_b, g_stride_d,
                  g, true, s);
  float* ln_part = has_ln ? as_ptr<float>(ln_partial, "ln_partial") : nullptr;
  with_dtype(x.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const T* tokens = as_ptr<const T>(x.ptr, "tokens");
    T* dx = as_ptr<T>(d_tokens, "d_tokens", 16);
    with_row_shape(x.dim, rows_packable<T>(x), [&](auto v, auto k) {
      constexpr int V = decltype(v)::value, K = decltype(k)::value;
      const dim3 grid(static_cast<unsigned>(x.batch), static_cast<unsigned>(splits));
      if (has_ln) {
        const size_t smem = (kWarps + 2) * x.dim * sizeof(float);
        pool_backward_kernel<T, V, K, true><<<grid, kWarps * 32, smem, s>>>(
            tokens, x.stride_b, x.stride_n, g, weight, dx, ln_part, x.tokens, num_registers, rows_per_split, x.dim,
            eps);
      } else {
        pool_backward_kernel<T, V, K, false><<<grid, kWarps * 32, 0, s>>>(
            tokens, x.stride_b, x.stride_n, g, weight, dx, ln_part, x.tokens, num_registers, rows_per_split, x.dim,
            eps);
      }
      DTF_CHECK_LAUNCH();
    });
  });
}

void column_sum(std::uintptr_t part, std::int64_t rows, std::int64_t cols, std::int64_t rows_per_chunk,
                std::uintptr_t out, std::uintptr_t stream) {
  require_positive(rows, "rows");
  require_positive(cols, "cols");
  require_positive(rows_per_chunk, "rows_per_chunk");
  const std::int64_t chunks = ceil_div(rows, rows_per_chunk);
  require(chunks <= 65535, "pooling: column_sum over ", chunks, " chunks exceeds the grid limit");
  const dim3 grid(static_cast<unsigned>(ceil_div<std::int64_t>(cols, kSumThreads)), static_cast<unsigned>(chunks));
  column_sum_kernel<<<grid, kSumThreads, 0, as_stream(stream)>>>(as_ptr<const float>(part, "part"), rows, cols,
                                                                  rows_per_chunk, as_ptr<float>(out, "out"));
  DTF_CHECK_LAUNCH();
}

}  // namespace pooling
}  // namespace dinotxt_fast
