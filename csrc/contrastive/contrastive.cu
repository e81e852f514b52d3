// Fused contrastive-loss tile kernels (see contrastive.h). One 128-thread block computes 64 x 64 logit tiles:
// bf16/fp16 through WMMA tensor-core fragments (fp32 accumulation), fp32 with plain FMAs (exact fp32, no TF32);
// the tile lands in shared memory and the epilogues (online log-sum-exps, dS) read it from there.
#include "contrastive/contrastive.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cmath>
#include <type_traits>

#include "common/check.h"
#include "common/launch.h"

namespace dinotxt_fast {
namespace contrastive {
namespace {

constexpr int kThreads = 128;
constexpr int kLdc = kTile + 4;  // fp32 tile row stride: a multiple of 4 (WMMA store), 16-byte aligned rows
constexpr float kNormEps = 1e-12f;
constexpr float kNegInf = -INFINITY;

template <typename T>
struct Traits;
template <>
struct Traits<float> {
  static constexpr int kBK = 16;
  static constexpr int kLd = kBK + 1;  // odd stride: conflict-free column reads in the FMA loop
};
template <>
struct Traits<__half> {
  static constexpr int kBK = 32;
  static constexpr int kLd = kBK + 8;  // WMMA needs a multiple of 8 elements; +8 staggers the banks
};
template <>
struct Traits<__nv_bfloat16> {
  static constexpr int kBK = 32;
  static constexpr int kLd = kBK + 8;
};

template <typename T>
__device__ __forceinline__ float to_float(T v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else if constexpr (std::is_same_v<T, __half>) {
    return __half2float(v);
  } else {
    return __bfloat162float(v);
  }
}

template <typename T>
__device__ __forceinline__ T from_float(float v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else if constexpr (std::is_same_v<T, __half>) {
    return __float2half_rn(v);
  } else {
    return __float2bfloat16_rn(v);
  }
}

template <typename T>
struct TileSmem {
  alignas(32) T a[kTile * Traits<T>::kLd];
  alignas(32) T b[kTile * Traits<T>::kLd];
  alignas(32) float c[kTile * kLdc];
};

// A [kTile x kBK] slab of a matrix into shared memory as [row][k], zero-padded outside (rows, depth). Consecutive
// threads read consecutive addresses along whichever of the two strides is 1; with `vec` (checked on the host:
// 16-byte aligned base, the other stride a multiple of 16 bytes) 16 bytes at a time.
template <typename T>
__device__ void load_slab(T* dst, const T* src, std::int64_t row0, std::int64_t rows, std::int64_t k0,
                          std::int64_t depth, std::int64_t stride_row, std::int64_t stride_k, bool vec) {
  constexpr int kBK = Traits<T>::kBK;
  constexpr int kLd = Traits<T>::kLd;
  constexpr int kVec = 16 / sizeof(T);
  const bool k_fastest = stride_k == 1;
  if (vec) {
    // Vectors of kVec elements along the unit-stride dimension (k, or rows).
    constexpr int kVecs = kTile * kBK / kVec;
    for (int idx = threadIdx.x; idx < kVecs; idx += kThreads) {
      const int r = k_fastest ? idx / (kBK / kVec) : (idx % (kTile / kVec)) * kVec;
      const int k = k_fastest ? (idx % (kBK / kVec)) * kVec : idx / (kTile / kVec);
      const std::int64_t gr = row0 + r;
      const std::int64_t gk = k0 + k;
      const int step = k_fastest ? 1 : kLd;  // shared-memory distance between the vector's elements
      T* out = dst + r * kLd + k;
      const bool whole = k_fastest ? (gr < rows && gk + kVec <= depth) : (gk < depth && gr + kVec <= rows);
      if (whole) {
        const uint4 packed = *reinterpret_cast<const uint4*>(src + gr * stride_row + gk * stride_k);
        const T* values = reinterpret_cast<const T*>(&packed);
#pragma unroll
        for (int v = 0; v < kVec; ++v) out[v * step] = values[v];
      } else {
        for (int v = 0; v < kVec; ++v) {
          const std::int64_t er = k_fastest ? gr : gr + v;
          const std::int64_t ek = k_fastest ? gk + v : gk;
          out[v * step] = (er < rows && ek < depth) ? src[er * stride_row + ek * stride_k] : from_float<T>(0.0f);
        }
      }
    }
    return;
  }
  for (int idx = threadIdx.x; idx < kTile * kBK; idx += kThreads) {
    const int r = k_fastest ? idx / kBK : idx % kTile;
    const int k = k_fastest ? idx % kBK : idx / kTile;
    const std::int64_t gr = row0 + r;
    const std::int64_t gk = k0 + k;
    dst[r * kLd + k] = (gr < rows && gk < depth) ? src[gr * stride_row + gk * stride_k] : from_float<T>(0.0f);
  }
}

// fp32: each thread owns an 8 x 4 block of the 64 x 64 tile, rows ty + 8i and columns tx + 16j.
struct MmaFma {
  float acc[8][4];
  __device__ void zero() {
#pragma unroll
    for (int i = 0; i < 8; ++i) {
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[i][j] = 0.0f;
    }
  }
  __device__ void step(const float* sa, const float* sb) {
    constexpr int kBK = Traits<float>::kBK;
    constexpr int kLd = Traits<float>::kLd;
    const int ty = threadIdx.x / 16;
    const int tx = threadIdx.x % 16;
#pragma unroll
    for (int k = 0; k < kBK; ++k) {
      float a[8];
      float b[4];
#pragma unroll
      for (int i = 0; i < 8; ++i) a[i] = sa[(ty + 8 * i) * kLd + k];
#pragma unroll
      for (int j = 0; j < 4; ++j) b[j] = sb[(tx + 16 * j) * kLd + k];
#pragma unroll
      for (int i = 0; i < 8; ++i) {
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
      }
    }
  }
  __device__ void store(float* sc) const {
    const int ty = threadIdx.x / 16;
    const int tx = threadIdx.x % 16;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
#pragma unroll
      for (int j = 0; j < 4; ++j) sc[(ty + 8 * i) * kLdc + tx + 16 * j] = acc[i][j];
    }
  }
};

// bf16 / fp16: warp w owns the 32 x 32 quarter (w / 2, w % 2) as 2 x 2 WMMA 16x16x16 fragments.
template <typename T>
struct MmaWmma {
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> acc[2][2];
  __device__ void zero() {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
#pragma unroll
      for (int j = 0; j < 2; ++j) nvcuda::wmma::fill_fragment(acc[i][j], 0.0f);
    }
  }
  __device__ void step(const T* sa, const T* sb) {
    using namespace nvcuda;
    constexpr int kBK = Traits<T>::kBK;
    constexpr int kLd = Traits<T>::kLd;
    const int warp = threadIdx.x / 32;
    const int wr = (warp / 2) * 32;
    const int wc = (warp % 2) * 32;
#pragma unroll
    for (int kk = 0; kk < kBK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa[2];
      // b is stored [column][k]: that is B = b^T in column-major order.
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(fa[i], sa + (wr + 16 * i) * kLd + kk, kLd);
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(fb[j], sb + (wc + 16 * j) * kLd + kk, kLd);
#pragma unroll
      for (int i = 0; i < 2; ++i) {
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
      }
    }
  }
  __device__ void store(float* sc) const {
    const int warp = threadIdx.x / 32;
    const int wr = (warp / 2) * 32;
    const int wc = (warp % 2) * 32;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        nvcuda::wmma::store_matrix_sync(sc + (wr + 16 * i) * kLdc + wc + 16 * j, acc[i][j], kLdc,
                                        nvcuda::wmma::mem_row_major);
      }
    }
  }
};

template <typename T>
using Mma = std::conditional_t<std::is_same_v<T, float>, MmaFma, MmaWmma<T>>;

// sm.c[i][j] = sum_k a[a_row0 + i, k] * b[b_row0 + j, k] (zero outside the valid rows), synchronised on return.
// A matrix operand: base, row and k strides, and whether it can be read 16 bytes at a time.
template <typename T>
struct Operand {
  const T* ptr;
  std::int64_t stride_row;
  std::int64_t stride_k;
  bool vec;
};

template <typename T>
__device__ void compute_tile(TileSmem<T>& sm, Operand<T> a, std::int64_t a_row0, std::int64_t a_rows, Operand<T> b,
                             std::int64_t b_row0, std::int64_t b_rows, std::int64_t depth) {
  constexpr int kBK = Traits<T>::kBK;
  Mma<T> mma;
  mma.zero();
  for (std::int64_t k0 = 0; k0 < depth; k0 += kBK) {
    __syncthreads();  // the previous slab (or the previous tile's epilogue) is done with shared memory
    load_slab(sm.a, a.ptr, a_row0, a_rows, k0, depth, a.stride_row, a.stride_k, a.vec);
    load_slab(sm.b, b.ptr, b_row0, b_rows, k0, depth, b.stride_row, b.stride_k, b.vec);
    __syncthreads();
    mma.step(sm.a, sm.b);
  }
  __syncthreads();
  mma.store(sm.c);
  __syncthreads();
}

// Sum over the block in a fixed order (deterministic); every thread gets the result.
__device__ float block_sum(float v, float* scratch) {
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  const int warps = blockDim.x / 32;
  __syncthreads();  // scratch may still be read by a previous call
  if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = v;
  __syncthreads();
  float total = 0.0f;
  for (int w = 0; w < warps; ++w) total += scratch[w];
  return total;
}

// exp(s - lse) for a float64 lse split into fp32 hi + lo: s - hi is exact when s is close to lse (~14..100), where
// an fp32 lse alone would cost ~1e-6 absolute, a 1e-5 relative error on dS = P - 1 of a confident positive.
__device__ __forceinline__ float exp_minus(float s, double lse) {
  const float hi = static_cast<float>(lse);
  const float lo = static_cast<float>(lse - static_cast<double>(hi));
  return expf((s - hi) - lo);
}

// Scale the raw dot products of sm.c into logits; -inf outside the valid rows and columns.
template <typename T>
__device__ void scale_tile(TileSmem<T>& sm, const float* inv_i, const float* inv_t, float scale, std::int64_t r0,
                           std::int64_t r_end, std::int64_t c0, std::int64_t c_end) {
  for (int idx = threadIdx.x; idx < kTile * kTile; idx += kThreads) {
    const int i = idx / kTile;
    const int j = idx % kTile;
    const std::int64_t r = r0 + i;
    const std::int64_t c = c0 + j;
    float& v = sm.c[i * kLdc + j];
    v = (r < r_end && c < c_end) ? v * (inv_i[r] * scale) * inv_t[c] : kNegInf;
  }
  __syncthreads();
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(Operand<T> img, Operand<T> txt, const float* inv_i, const float* inv_t, const float* log_scale,
                   float* row_max, float* row_sum, float* col_max, float* col_sum, float* diag, std::int64_t m,
                   std::int64_t n, std::int64_t dim, std::int64_t offset, std::int64_t row_chunk,
                   std::int64_t col_chunk) {
  __shared__ TileSmem<T> sm;
  const float scale = expf(*log_scale);
  const std::int64_t r_begin = blockIdx.x * row_chunk;
  const std::int64_t r_end = r_begin + row_chunk < m ? r_begin + row_chunk : m;
  const std::int64_t c_begin = blockIdx.y * col_chunk;
  const std::int64_t c_end = c_begin + col_chunk < n ? c_begin + col_chunk : n;
  const int t = threadIdx.x;
  for (std::int64_t r0 = r_begin; r0 < r_end; r0 += kTile) {
    // Threads 64..127 own one row each for the whole column loop: its online (max, sum) and its diagonal.
    const int own_row = t - kTile;
    const std::int64_t row = r0 + own_row;
    float m_run = kNegInf;
    float l_run = 0.0f;
    float d_val = 0.0f;
    bool has_diag = false;
    for (std::int64_t c0 = c_begin; c0 < c_end; c0 += kTile) {
      compute_tile(sm, img, r0, r_end, txt, c0, c_end, dim);
      scale_tile(sm, inv_i, inv_t, scale, r0, r_end, c0, c_end);
      if (t < kTile) {
        // Threads 0..63: column c0 + t, merged into this row chunk's running (max, sum) in global memory, which
        // only this thread of this block ever touches.
        const std::int64_t col = c0 + t;
        if (col < c_end) {
          float mx = kNegInf;
          for (int i = 0; i < kTile; ++i) mx = fmaxf(mx, sm.c[i * kLdc + t]);
          float sum = 0.0f;
          for (int i = 0; i < kTile; ++i) sum += expf(sm.c[i * kLdc + t] - mx);  // exp(-inf) = 0 for padding
          const std::int64_t at = static_cast<std::int64_t>(blockIdx.x) * n + col;
          if (r0 > r_begin) {
            const float old_max = col_max[at];
            const float new_max = fmaxf(old_max, mx);
            sum = col_sum[at] * expf(old_max - new_max) + sum * expf(mx - new_max);
            mx = new_max;
          }
          col_max[at] = mx;
          col_sum[at] = sum;
        }
      } else if (row < r_end) {
        // Rows, in a skewed order so that the 32 rows of a warp hit 32 different banks.
        float mx = kNegInf;
        for (int jj = 0; jj < kTile; ++jj) mx = fmaxf(mx, sm.c[own_row * kLdc + (jj + own_row) % kTile]);
        const float new_max = fmaxf(m_run, mx);  // finite: every tile holds a valid column
        float sum = 0.0f;
        for (int jj = 0; jj < kTile; ++jj) sum += expf(sm.c[own_row * kLdc + (jj + own_row) % kTile] - new_max);
        l_run = l_run * expf(m_run - new_max) + sum;
        m_run = new_max;
        const std::int64_t diag_col = row + offset;
        if (diag_col >= c0 && diag_col < c0 + kTile && diag_col < c_end) {
          d_val = sm.c[own_row * kLdc + (diag_col - c0)];
          has_diag = true;
        }
      }
    }
    if (t >= kTile && row < r_end) {
      const std::int64_t at = static_cast<std::int64_t>(blockIdx.y) * m + row;
      row_max[at] = m_run;
      row_sum[at] = l_run;
      if (has_diag) diag[row] = d_val;
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    ds_kernel(Operand<T> img, Operand<T> txt, const float* inv_i, const float* inv_t, const float* log_scale,
              const double* lse_rows, const double* lse_cols, const float* row_coef, const float* col_coef,
              const float* inv_kappa, T* ds, float* ds_dot_s, std::int64_t m, std::int64_t dim, std::int64_t offset,
              std::int64_t stride_ds, std::int64_t col_begin, std::int64_t col_end, std::int64_t row_chunk,
              std::int64_t col_chunk, std::int64_t stride_ds_dot_s) {
  __shared__ TileSmem<T> sm;
  __shared__ float scratch[kThreads / 32];
  const float scale = expf(*log_scale);
  const float ik = *inv_kappa;
  const std::int64_t r_begin = blockIdx.x * row_chunk;
  const std::int64_t r_end = r_begin + row_chunk < m ? r_begin + row_chunk : m;
  const std::int64_t c_begin = col_begin + blockIdx.y * col_chunk;
  const std::int64_t c_end = c_begin + col_chunk < col_end ? c_begin + col_chunk : col_end;
  float dot = 0.0f;
  for (std::int64_t r0 = r_begin; r0 < r_end; r0 += kTile) {
    for (std::int64_t c0 = c_begin; c0 < c_end; c0 += kTile) {
      compute_tile(sm, img, r0, r_end, txt, c0, c_end, dim);
      for (int idx = threadIdx.x; idx < kTile * kTile; idx += kThreads) {
        const std::int64_t r = r0 + idx / kTile;
        const std::int64_t c = c0 + idx % kTile;
        if (r >= r_end || c >= c_end) continue;
        const float s = sm.c[(idx / kTile) * kLdc + idx % kTile] * (inv_i[r] * scale) * inv_t[c];
        const float positive = (c == r + offset) ? 1.0f : 0.0f;
        const float d = row_coef[r] * (exp_minus(s, lse_rows[r]) - positive) +
                        col_coef[c] * (exp_minus(s, lse_cols[c]) - positive);
        dot += d * s;
        ds[r * stride_ds + (c - col_begin)] = from_float<T>(d * (inv_i[r] * inv_t[c] * ik));
      }
    }
  }
  const float total = block_sum(dot, scratch);
  if (threadIdx.x == 0) {
    ds_dot_s[static_cast<std::int64_t>(blockIdx.x) * stride_ds_dot_s + blockIdx.y] = total;  // this panel's chunks
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    gemm_kernel(Operand<T> a, Operand<T> b, float* c, const float* alpha, const float* row_scale, std::int64_t m,
                std::int64_t n, std::int64_t k, std::int64_t ldc, bool accumulate) {
  __shared__ TileSmem<T> sm;
  const std::int64_t row0 = static_cast<std::int64_t>(blockIdx.y) * kTile;
  const std::int64_t col0 = static_cast<std::int64_t>(blockIdx.x) * kTile;
  compute_tile(sm, a, row0, m, b, col0, n, k);
  const float al = *alpha;
  for (int idx = threadIdx.x; idx < kTile * kTile; idx += kThreads) {
    const std::int64_t r = row0 + idx / kTile;
    const std::int64_t col = col0 + idx % kTile;
    if (r >= m || col >= n) continue;
    float v = sm.c[(idx / kTile) * kLdc + idx % kTile] * (al * row_scale[r]);
    if (accumulate) v += c[r * ldc + col];
    c[r * ldc + col] = v;
  }
}

constexpr int kRowThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kRowThreads)
    row_norms_kernel(const T* x, float* inv, float* norm, std::int64_t dim, std::int64_t stride_x) {
  __shared__ float scratch[kRowThreads / 32];
  const T* row = x + static_cast<std::int64_t>(blockIdx.x) * stride_x;
  float sumsq = 0.0f;
  for (std::int64_t e = threadIdx.x; e < dim; e += kRowThreads) {
    const float v = to_float(row[e]);
    sumsq = fmaf(v, v, sumsq);
  }
  const float n = fmaxf(sqrtf(block_sum(sumsq, scratch)), kNormEps);
  if (threadIdx.x == 0) {
    norm[blockIdx.x] = n;
    inv[blockIdx.x] = 1.0f / n;
  }
}

template <typename T>
__global__ void __launch_bounds__(kRowThreads)
    normalize_backward_kernel(const float* g, const T* x, T* out, std::int64_t dim, std::int64_t stride_g,
                              std::int64_t stride_x, std::int64_t stride_out, bool normalize) {
  __shared__ float scratch[kRowThreads / 32];
  const float* g_row = g + static_cast<std::int64_t>(blockIdx.x) * stride_g;
  const T* x_row = x + static_cast<std::int64_t>(blockIdx.x) * stride_x;
  T* out_row = out + static_cast<std::int64_t>(blockIdx.x) * stride_out;
  if (!normalize) {
    for (std::int64_t e = threadIdx.x; e < dim; e += kRowThreads) out_row[e] = from_float<T>(g_row[e]);
    return;
  }
  float sumsq = 0.0f;
  float gx = 0.0f;
  for (std::int64_t e = threadIdx.x; e < dim; e += kRowThreads) {
    const float v = to_float(x_row[e]);
    sumsq = fmaf(v, v, sumsq);
    gx = fmaf(g_row[e], v, gx);
  }
  const float norm = sqrtf(block_sum(sumsq, scratch));
  const float dot = block_sum(gx, scratch);
  const float clamped = fmaxf(norm, kNormEps);
  // dx = (g - y <g, y>) / n with y = x / n; a clamped norm (zero vector) passes g / n through.
  const float coef = norm > kNormEps ? dot / (clamped * clamped) : 0.0f;
  const float inv = 1.0f / clamped;
  for (std::int64_t e = threadIdx.x; e < dim; e += kRowThreads) {
    out_row[e] = from_float<T>((g_row[e] - to_float(x_row[e]) * coef) * inv);
  }
}

// An operand descriptor, with 16-byte loads when the unit-stride dimension allows them.
template <typename T>
Operand<T> operand(std::uintptr_t address, const char* name, std::int64_t stride_row, std::int64_t stride_k) {
  constexpr std::int64_t kVec = 16 / sizeof(T);
  const bool vec = address % 16 == 0 && ((stride_k == 1 && stride_row % kVec == 0) ||
                                         (stride_row == 1 && stride_k % kVec == 0));
  return Operand<T>{as_ptr<const T>(address, name), stride_row, stride_k, vec};
}

template <typename F>
void dispatch(DType dtype, F&& launch) {
  switch (dtype) {
    case DType::kFloat32:
      launch(float{});
      break;
    case DType::kFloat16:
      launch(__half{});
      break;
    case DType::kBFloat16:
      launch(__nv_bfloat16{});
      break;
  }
}

void require_chunks(std::int64_t row_chunk, std::int64_t col_chunk) {
  require(row_chunk > 0 && row_chunk % kTile == 0, "row_chunk must be a positive multiple of ", kTile, ", got ",
          row_chunk);
  require(col_chunk > 0 && col_chunk % kTile == 0, "col_chunk must be a positive multiple of ", kTile, ", got ",
          col_chunk);
}

dim3 chunk_grid(std::int64_t rows, std::int64_t cols, std::int64_t row_chunk, std::int64_t col_chunk) {
  const std::int64_t gx = ceil_div(rows, row_chunk);
  const std::int64_t gy = ceil_div(cols, col_chunk);
  require(gx < (1ll << 31) && gy <= 65535, "too many chunks: ", gx, " x ", gy, " (grid limits 2^31-1 x 65535)");
  return dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy));
}

}  // namespace

DType parse_dtype(const std::string& name) {
  if (name == "float32") return DType::kFloat32;
  if (name == "float16") return DType::kFloat16;
  if (name == "bfloat16") return DType::kBFloat16;
  throw_invalid_argument("contrastive kernels take float32, float16 or bfloat16, got ", name);
}

void row_norms(DType dtype, std::uintptr_t x, std::int64_t rows, std::int64_t dim, std::int64_t stride_x,
               std::uintptr_t inv, std::uintptr_t norm, std::uintptr_t stream) {
  require_positive(rows, "rows");
  require_positive(dim, "dim");
  require(rows < (1ll << 31), "rows must be < 2^31, got ", rows);
  require(stride_x >= dim, "stride_x (", stride_x, ") must be >= dim (", dim, ")");
  dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    row_norms_kernel<T><<<static_cast<unsigned>(rows), kRowThreads, 0, as_stream(stream)>>>(
        as_ptr<const T>(x, "x"), as_ptr<float>(inv, "inv"), as_ptr<float>(norm, "norm"), dim, stride_x);
  });
  DTF_CHECK_LAUNCH();
}

void forward_tiles(DType dtype, std::uintptr_t img, std::uintptr_t txt, std::uintptr_t inv_i, std::uintptr_t inv_t,
                   std::uintptr_t log_scale, std::uintptr_t row_max, std::uintptr_t row_sum, std::uintptr_t col_max,
                   std::uintptr_t col_sum, std::uintptr_t diag, std::int64_t m, std::int64_t n, std::int64_t dim,
                   std::int64_t offset, std::int64_t stride_img, std::int64_t stride_txt, std::int64_t row_chunk,
                   std::int64_t col_chunk, std::uintptr_t stream) {
  require_positive(m, "m");
  require_positive(n, "n");
  require_positive(dim, "dim");
  require(offset >= 0 && offset + m <= n, "offset ", offset, " must place the ", m, " diagonal columns inside ", n);
  require(stride_img >= dim && stride_txt >= dim, "row strides (", stride_img, ", ", stride_txt,
          ") must be >= dim (", dim, ")");
  require_chunks(row_chunk, col_chunk);
  const dim3 grid = chunk_grid(m, n, row_chunk, col_chunk);
  dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    forward_kernel<T><<<grid, kThreads, 0, as_stream(stream)>>>(
        operand<T>(img, "img", stride_img, 1), operand<T>(txt, "txt", stride_txt, 1),
        as_ptr<const float>(inv_i, "inv_i"), as_ptr<const float>(inv_t, "inv_t"),
        as_ptr<const float>(log_scale, "log_scale"), as_ptr<float>(row_max, "row_max"),
        as_ptr<float>(row_sum, "row_sum"), as_ptr<float>(col_max, "col_max"), as_ptr<float>(col_sum, "col_sum"),
        as_ptr<float>(diag, "diag"), m, n, dim, offset, row_chunk, col_chunk);
  });
  DTF_CHECK_LAUNCH();
}

void ds_tiles(DType dtype, std::uintptr_t img, std::uintptr_t txt, std::uintptr_t inv_i, std::uintptr_t inv_t,
              std::uintptr_t log_scale, std::uintptr_t lse_rows, std::uintptr_t lse_cols, std::uintptr_t row_coef,
              std::uintptr_t col_coef, std::uintptr_t inv_kappa, std::uintptr_t ds, std::uintptr_t ds_dot_s,
              std::int64_t m, std::int64_t n, std::int64_t dim, std::int64_t offset, std::int64_t stride_img,
              std::int64_t stride_txt, std::int64_t stride_ds, std::int64_t col_begin, std::int64_t col_end,
              std::int64_t row_chunk, std::int64_t col_chunk, std::int64_t stride_ds_dot_s, std::uintptr_t stream) {
  require_positive(m, "m");
  require_positive(n, "n");
  require_positive(dim, "dim");
  require(offset >= 0 && offset + m <= n, "offset ", offset, " must place the ", m, " diagonal columns inside ", n);
  require(0 <= col_begin && col_begin < col_end && col_end <= n, "column panel [", col_begin, ", ", col_end,
          ") must be a non-empty part of [0, ", n, ")");
  require_chunks(row_chunk, col_chunk);
  require(col_begin % col_chunk == 0, "col_begin ", col_begin, " must be a multiple of col_chunk ", col_chunk);
  require(stride_ds_dot_s >= ceil_div(col_end - col_begin, col_chunk), "stride_ds_dot_s ", stride_ds_dot_s,
          " is smaller than the panel's ", ceil_div(col_end - col_begin, col_chunk), " column chunks");
  require(stride_ds >= col_end - col_begin, "stride_ds ", stride_ds, " is smaller than the panel");
  const dim3 grid = chunk_grid(m, col_end - col_begin, row_chunk, col_chunk);
  dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    ds_kernel<T><<<grid, kThreads, 0, as_stream(stream)>>>(
        operand<T>(img, "img", stride_img, 1), operand<T>(txt, "txt", stride_txt, 1),
        as_ptr<const float>(inv_i, "inv_i"), as_ptr<const float>(inv_t, "inv_t"),
        as_ptr<const float>(log_scale, "log_scale"), as_ptr<const double>(lse_rows, "lse_rows"),
        as_ptr<const double>(lse_cols, "lse_cols"), as_ptr<const float>(row_coef, "row_coef"),
        as_ptr<const float>(col_coef, "col_coef"), as_ptr<const float>(inv_kappa, "inv_kappa"), as_ptr<T>(ds, "ds"),
        as_ptr<float>(ds_dot_s, "ds_dot_s"), m, dim, offset, stride_ds, col_begin, col_end, row_chunk, col_chunk,
        stride_ds_dot_s);
  });
  DTF_CHECK_LAUNCH();
}

void gemm(DType dtype, std::uintptr_t a, std::uintptr_t b, std::uintptr_t c, std::uintptr_t alpha,
          std::uintptr_t row_scale, std::int64_t m, std::int64_t n, std::int64_t k, std::int64_t stride_am,
          std::int64_t stride_ak, std::int64_t stride_bk, std::int64_t stride_bn, std::int64_t ldc, bool accumulate,
          std::uintptr_t stream) {
  require_positive(m, "m");
  require_positive(n, "n");
  require_positive(k, "k");
  require(ldc >= n, "ldc (", ldc, ") must be >= n (", n, ")");
  const std::int64_t gx = ceil_div<std::int64_t>(n, kTile);
  const std::int64_t gy = ceil_div<std::int64_t>(m, kTile);
  require(gx < (1ll << 31) && gy <= 65535, "gemm too large: ", m, " x ", n);
  const dim3 grid(static_cast<unsigned>(gx), static_cast<unsigned>(gy));
  dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    // b[k, n] is read as the tile's "rows" n: row stride stride_bn, k stride stride_bk.
    gemm_kernel<T><<<grid, kThreads, 0, as_stream(stream)>>>(
        operand<T>(a, "a", stride_am, stride_ak), operand<T>(b, "b", stride_bn, stride_bk), as_ptr<float>(c, "c"),
        as_ptr<const float>(alpha, "alpha"), as_ptr<const float>(row_scale, "row_scale"), m, n, k, ldc, accumulate);
  });
  DTF_CHECK_LAUNCH();
}

void normalize_backward(DType dtype, std::uintptr_t g, std::uintptr_t x, std::uintptr_t out, std::int64_t rows,
                        std::int64_t dim, std::int64_t stride_g, std::int64_t stride_x, std::int64_t stride_out,
                        bool normalize, std::uintptr_t stream) {
  require_positive(rows, "rows");
  require_positive(dim, "dim");
  require(rows < (1ll << 31), "rows must be < 2^31, got ", rows);
  require(stride_g >= dim && stride_x >= dim && stride_out >= dim, "row strides must be >= dim (", dim, ")");
  dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    normalize_backward_kernel<T><<<static_cast<unsigned>(rows), kRowThreads, 0, as_stream(stream)>>>(
        as_ptr<const float>(g, "g"), as_ptr<const T>(x, "x"), as_ptr<T>(out, "out"), dim, stride_g, stride_x,
        stride_out, normalize);
  });
  DTF_CHECK_LAUNCH();
}

}  // namespace contrastive
}  // namespace dinotxt_fast
