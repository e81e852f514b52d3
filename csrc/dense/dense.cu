// Dense patch-text decoding kernels.
//
// patch_text_logits: row_inv_norm (one warp per patch / class row: 1 / max(|row|, eps)) then cosine_gemm, a tiled
//   fp32 SIMT GEMM of patch rows [B*h*w, D] with class rows [C, D] whose epilogue scales by both inverse norms and
//   writes [B, C, h, w] (the GEMM is small next to the backbone; fp32 products keep cosines exact to ~1e-7).
// upsample_argmax: one thread per output pixel, all classes in a loop: 4 bilinear taps per class, online argmax
//   and online softmax normaliser. No [B, C, H, W] tensor.
// slide_decode: window_lse (one thread per window-box pixel: log-sum-exp over classes of that window's
//   upsampled logits, C x smaller than the logits), then slide_decode_kernel (one thread per output pixel, classes
//   in register chunks): sum over the pixel's 4 canvas taps and the windows covering each tap of
//   exp(bilinear logit - lse) / (number of covering windows), weighted by the final bilinear weights; online argmax.
// Bilinear taps (align_corners=False) are computed exactly in integers: src = ((2 dst + 1) in - out) / (2 out),
// clamped at 0; the interpolation order (rows, then columns) is the reference's (F.interpolate may differ in the last bit).
#include "dense/dense.h"

#include <cuda_runtime.h>

#include <cmath>
#include <initializer_list>

#include "common/check.h"
#include "common/launch.h"
#include "pooling/vec.cuh"

namespace dinotxt_fast {
namespace dense {
namespace {

constexpr int kMaxSide = 32767;  // (2 * dst + 1) * in stays in int32
constexpr float kNormEps = 1e-12f;
constexpr int kThreads = 256;
constexpr int kNormWarps = 8;
constexpr int kDecodeThreads = 128;
constexpr int kChunk = 16;  // classes accumulated in registers per pass of slide_decode_kernel
constexpr int kTileM = 64, kTileC = 64, kTileK = 16;

struct Taps {
  int i0, i1;
  float frac;  // weight of i1
};

__device__ __forceinline__ Taps taps(int dst, int in, int out) {
  const int num = max((2 * dst + 1) * in - out, 0);
  const int den = 2 * out;
  const int i0 = num / den;
  const float frac = static_cast<float>(num - i0 * den) / static_cast<float>(den);
  const int clamped = min(i0, in - 1);
  return {clamped, min(clamped + 1, in - 1), frac};
}

template <typename T>
__device__ __forceinline__ float bilinear(const T* __restrict__ p, std::int64_t dy, std::int64_t dx, float fy,
                                          float fx) {
  const float v00 = to_float(p[0]), v10 = to_float(p[dy]), v01 = to_float(p[dx]), v11 = to_float(p[dy + dx]);
  return (v00 * (1.f - fy) + v10 * fy) * (1.f - fx) + (v01 * (1.f - fy) + v11 * fy) * fx;
}

// Rows are addressed as image (row / hw), then pixel (row % hw) = (y, x) with y = pixel / w; unit stride along D.
template <typename T>
__global__ void __launch_bounds__(kNormWarps * 32)
    row_inv_norm_kernel(const T* __restrict__ x, std::int64_t rows, std::int64_t hw, std::int64_t w,
                        std::int64_t stride_b, std::int64_t stride_h, std::int64_t stride_w, std::int64_t dim,
                        float* __restrict__ out) {
  const std::int64_t row = static_cast<std::int64_t>(blockIdx.x) * kNormWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;  // the whole warp leaves together
  const std::int64_t pixel = row % hw;
  const T* p = x + (row / hw) * stride_b + (pixel / w) * stride_h + (pixel % w) * stride_w;
  float sum = 0.f;
  for (std::int64_t k = lane; k < dim; k += 32) {
    const float v = to_float(p[k]);
    sum += v * v;
  }
  sum = warp_sum(sum);
  if (lane == 0) out[row] = 1.f / fmaxf(sqrtf(sum), kNormEps);
}

template <typename TA, typename TB>
__global__ void __launch_bounds__(256)
    cosine_gemm_kernel(const TA* __restrict__ a, std::int64_t stride_b, std::int64_t stride_h, std::int64_t stride_w,
                       const TB* __restrict__ t, std::int64_t t_stride_c, const float* __restrict__ inv_a,
                       const float* __restrict__ inv_t, float* __restrict__ out, std::int64_t rows, std::int64_t hw,
                       std::int64_t w, std::int64_t classes, std::int64_t dim) {
  __shared__ float a_tile[kTileK][kTileM + 4];
  __shared__ float t_tile[kTileK][kTileC + 4];
  const int tid = threadIdx.x;
  const int tx = tid % 16, ty = tid / 16;        // compute: rows tx + 16 i, classes ty + 16 j
  const int lk = tid % kTileK, lr = tid / kTileK;  // load: k offset lk of rows / classes lr + 16 i
  const std::int64_t m0 = static_cast<std::int64_t>(blockIdx.x) * kTileM;
  const std::int64_t c0 = static_cast<std::int64_t>(blockIdx.y) * kTileC;
  const TA* a_rows[4];
  const TB* t_rows[4];
  bool a_ok[4], t_ok[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const std::int64_t m = m0 + lr + 16 * i;
    const std::int64_t pixel = m % hw;
    a_ok[i] = m < rows;
    a_rows[i] = a_ok[i] ? a + (m / hw) * stride_b + (pixel / w) * stride_h + (pixel % w) * stride_w : a;
    const std::int64_t c = c0 + lr + 16 * i;
    t_ok[i] = c < classes;
    t_rows[i] = t_ok[i] ? t + c * t_stride_c : t;
  }
  float acc[4][4] = {};
  for (std::int64_t k0 = 0; k0 < dim; k0 += kTileK) {
    const std::int64_t k = k0 + lk;
    const bool k_ok = k < dim;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      a_tile[lk][lr + 16 * i] = a_ok[i] && k_ok ? to_float(a_rows[i][k]) : 0.f;
      t_tile[lk][lr + 16 * i] = t_ok[i] && k_ok ? to_float(t_rows[i][k]) : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kTileK; ++kk) {
      float av[4], tv[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        av[i] = a_tile[kk][tx + 16 * i];
        tv[i] = t_tile[kk][ty + 16 * i];
      }
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(av[i], tv[j], acc[i][j]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const std::int64_t m = m0 + tx + 16 * i;
    if (m >= rows) continue;
    const std::int64_t image = m / hw, pixel = m % hw;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const std::int64_t c = c0 + ty + 16 * j;
      if (c < classes) out[(image * classes + c) * hw + pixel] = acc[i][j] * inv_a[m] * inv_t[c];
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    upsample_argmax_kernel(const T* __restrict__ x, std::int64_t stride_b, std::int64_t stride_c,
                           std::int64_t stride_h, std::int64_t stride_w, int classes, int h, int w, int out_h,
                           int out_w, bool softmax, std::int64_t* __restrict__ labels, float* __restrict__ scores) {
  const std::int64_t p = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (p >= static_cast<std::int64_t>(out_h) * out_w) return;
  const std::int64_t b = blockIdx.y;
  const Taps ty = taps(static_cast<int>(p / out_w), h, out_h);
  const Taps tx = taps(static_cast<int>(p % out_w), w, out_w);
  const T* base = x + b * stride_b + ty.i0 * stride_h + tx.i0 * stride_w;
  const std::int64_t dy = (ty.i1 - ty.i0) * stride_h, dx = (tx.i1 - tx.i0) * stride_w;
  float best = -INFINITY, total = 0.f;  // total = sum_c exp(v_c - best)
  int label = 0;
  for (int c = 0; c < classes; ++c) {
    const float v = bilinear(base + c * stride_c, dy, dx, ty.frac, tx.frac);
    if (v > best) {  // strict: ties keep the lowest class, like torch.max
      if (softmax) total = total * expf(best - v) + 1.f;
      best = v;
      label = c;
    } else if (softmax) {
      total += expf(v - best);
    }
  }
  const std::int64_t o = b * out_h * out_w + p;
  labels[o] = label;
  scores[o] = softmax ? 1.f / total : best;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    window_lse_kernel(const T* __restrict__ x, std::int64_t stride_n, std::int64_t stride_c, std::int64_t stride_h,
                      std::int64_t stride_w, const int* __restrict__ table, int classes, int h, int w,
                      float* __restrict__ lse) {
  const int k = blockIdx.y;
  const int* box = table + 5 * k;
  const int y0 = box[0], x0 = box[1], bh = box[2] - y0, bw = box[3] - x0;
  const std::int64_t p = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (p >= static_cast<std::int64_t>(bh) * bw) return;
  const Taps ty = taps(static_cast<int>(p / bw), h, bh);
  const Taps tx = taps(static_cast<int>(p % bw), w, bw);
  const T* base = x + k * stride_n + ty.i0 * stride_h + tx.i0 * stride_w;
  const std::int64_t dy = (ty.i1 - ty.i0) * stride_h, dx = (tx.i1 - tx.i0) * stride_w;
  float best = -INFINITY, total = 0.f;
  for (int c = 0; c < classes; ++c) {
    const float v = bilinear(base + c * stride_c, dy, dx, ty.frac, tx.frac);
    if (v > best) {
      total = total * expf(best - v) + 1.f;
      best = v;
    } else {
      total += expf(v - best);
    }
  }
  lse[box[4] + p] = best + logf(total);
}

template <typename T, bool kSoftmax>
__global__ void __launch_bounds__(kDecodeThreads)
    slide_decode_kernel(const T* __restrict__ x, std::int64_t stride_n, std::int64_t stride_c, std::int64_t stride_h,
                        std::int64_t stride_w, const int* __restrict__ table, int n_windows,
                        const float* __restrict__ lse, int classes, int h, int w, int canvas_h, int canvas_w,
                        int out_h, int out_w, std::int64_t* __restrict__ labels, float* __restrict__ scores) {
  const std::int64_t p = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (p >= static_cast<std::int64_t>(out_h) * out_w) return;
  const Taps ty = taps(static_cast<int>(p / out_w), canvas_h, out_h);
  const Taps tx = taps(static_cast<int>(p % out_w), canvas_w, out_w);
  const int cy[2] = {ty.i0, ty.i1}, cx[2] = {tx.i0, tx.i1};
  const float wy[2] = {1.f - ty.frac, ty.frac}, wx[2] = {1.f - tx.frac, tx.frac};
  // A canvas pixel is the average over the windows covering it: count them per tap.
  int count[2][2] = {{0, 0}, {0, 0}};
  for (int k = 0; k < n_windows; ++k) {
    const int* box = table + 5 * k;
#pragma unroll
    for (int a = 0; a < 2; ++a)
#pragma unroll
      for (int b = 0; b < 2; ++b)
        count[a][b] += cy[a] >= box[0] && cy[a] < box[2] && cx[b] >= box[1] && cx[b] < box[3];
  }
  float coef[2][2];
#pragma unroll
  for (int a = 0; a < 2; ++a)
#pragma unroll
    for (int b = 0; b < 2; ++b) coef[a][b] = wy[a] * wx[b] / static_cast<float>(max(count[a][b], 1));
  float best = -INFINITY;
  int label = 0;
  for (int c0 = 0; c0 < classes; c0 += kChunk) {
    float acc[kChunk];
#pragma unroll
    for (int i = 0; i < kChunk; ++i) acc[i] = 0.f;
    for (int k = 0; k < n_windows; ++k) {
      const int* box = table + 5 * k;
      const int y0 = box[0], x0 = box[1], bh = box[2] - y0, bw = box[3] - x0;
      const T* window = x + k * stride_n + c0 * stride_c;
#pragma unroll
      for (int a = 0; a < 2; ++a) {
        const int ly = cy[a] - y0;
        if (ly < 0 || ly >= bh) continue;
        const Taps ry = taps(ly, h, bh);
#pragma unroll
        for (int b = 0; b < 2; ++b) {
          const int lx = cx[b] - x0;
          // zero-weight taps (all but one when the final resize is the identity) cost nothing
          if (coef[a][b] == 0.f || lx < 0 || lx >= bw) continue;
          const Taps rx = taps(lx, w, bw);
          const float shift = kSoftmax ? lse[box[4] + static_cast<std::int64_t>(ly) * bw + lx] : 0.f;
          const T* q = window + ry.i0 * stride_h + rx.i0 * stride_w;
          const std::int64_t dy = (ry.i1 - ry.i0) * stride_h, dx = (rx.i1 - rx.i0) * stride_w;
#pragma unroll
          for (int i = 0; i < kChunk; ++i) {
            if (c0 + i < classes) {
              const float v = bilinear(q + i * stride_c, dy, dx, ry.frac, rx.frac);
              acc[i] += coef[a][b] * (kSoftmax ? expf(v - shift) : v);
            }
          }
        }
      }
    }
#pragma unroll
    for (int i = 0; i < kChunk; ++i) {
      if (c0 + i < classes && acc[i] > best) {
        best = acc[i];
        label = c0 + i;
      }
    }
  }
  labels[p] = label;
  scores[p] = best;
}

void check_side(std::int64_t value, const char* name) {
  require(value >= 1 && value <= kMaxSide, "dense: ", name, " must be in [1, ", kMaxSide, "], got ", value);
}

void check_strides(std::initializer_list<std::int64_t> strides) {
  for (const std::int64_t s : strides) require(s >= 0, "dense: negative strides are not supported, got ", s);
}

}  // namespace

void patch_text_logits(std::uintptr_t patches, int patches_dtype, std::int64_t batch, std::int64_t height,
                       std::int64_t width, std::int64_t dim, std::int64_t p_stride_b, std::int64_t p_stride_h,
                       std::int64_t p_stride_w, std::uintptr_t text, int text_dtype, std::int64_t classes,
                       std::int64_t t_stride_c, std::uintptr_t inv_norms, std::uintptr_t out,
                       std::uintptr_t stream) {
  require_positive(batch, "batch");
  require_positive(height, "height");
  require_positive(width, "width");
  require_positive(dim, "dim");
  require_positive(classes, "classes");
  check_strides({p_stride_b, p_stride_h, p_stride_w, t_stride_c});
  const std::int64_t rows = batch * height * width;
  require(ceil_div<std::int64_t>(classes, kTileC) <= 65535, "dense: ", classes, " classes exceed the grid limit");
  const cudaStream_t s = as_stream(stream);
  float* inv_p = as_ptr<float>(inv_norms, "inv_norms");
  float* inv_t = inv_p + rows;
  float* o = as_ptr<float>(out, "out");
  with_dtype(patches_dtype, [&](auto pa) {
    using TA = typename decltype(pa)::type;
    const TA* a = as_ptr<const TA>(patches, "patches");
    row_inv_norm_kernel<TA><<<static_cast<unsigned>(ceil_div<std::int64_t>(rows, kNormWarps)), kNormWarps * 32, 0,
                              s>>>(a, rows, height * width, width, p_stride_b, p_stride_h, p_stride_w, dim, inv_p);
    DTF_CHECK_LAUNCH();
    with_dtype(text_dtype, [&](auto tb) {
      using TB = typename decltype(tb)::type;
      const TB* t = as_ptr<const TB>(text, "text");
      row_inv_norm_kernel<TB><<<static_cast<unsigned>(ceil_div<std::int64_t>(classes, kNormWarps)), kNormWarps * 32,
                                0, s>>>(t, classes, 1, 1, t_stride_c, 0, 0, dim, inv_t);
      DTF_CHECK_LAUNCH();
      const dim3 grid(static_cast<unsigned>(ceil_div<std::int64_t>(rows, kTileM)),
                      static_cast<unsigned>(ceil_div<std::int64_t>(classes, kTileC)));
      cosine_gemm_kernel<TA, TB><<<grid, 256, 0, s>>>(a, p_stride_b, p_stride_h, p_stride_w, t, t_stride_c, inv_p,
                                                      inv_t, o, rows, height * width, width, classes, dim);
      DTF_CHECK_LAUNCH();
    });
  });
}

void upsample_argmax(std::uintptr_t logits, int dtype, std::int64_t batch, std::int64_t classes, std::int64_t height,
                     std::int64_t width, std::int64_t stride_b, std::int64_t stride_c, std::int64_t stride_h,
                     std::int64_t stride_w, std::int64_t out_height, std::int64_t out_width, bool softmax,
                     std::uintptr_t labels, std::uintptr_t scores, std::uintptr_t stream) {
  require(batch >= 1 && batch <= 65535, "dense: batch must be in [1, 65535], got ", batch);
  require(classes >= 1 && classes <= 0x7fffffff, "dense: classes must be in [1, 2**31), got ", classes);
  check_side(height, "height");
  check_side(width, "width");
  check_side(out_height, "out_height");
  check_side(out_width, "out_width");
  check_strides({stride_b, stride_c, stride_h, stride_w});
  auto* l = as_ptr<std::int64_t>(labels, "labels");
  auto* sc = as_ptr<float>(scores, "scores");
  with_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const dim3 grid(static_cast<unsigned>(ceil_div<std::int64_t>(out_height * out_width, kThreads)),
                    static_cast<unsigned>(batch));
    upsample_argmax_kernel<T><<<grid, kThreads, 0, as_stream(stream)>>>(
        as_ptr<const T>(logits, "logits"), stride_b, stride_c, stride_h, stride_w, static_cast<int>(classes),
        static_cast<int>(height), static_cast<int>(width), static_cast<int>(out_height), static_cast<int>(out_width),
        softmax, l, sc);
    DTF_CHECK_LAUNCH();
  });
}

void slide_decode(std::uintptr_t logits, int dtype, std::int64_t windows, std::int64_t classes, std::int64_t height,
                  std::int64_t width, std::int64_t stride_n, std::int64_t stride_c, std::int64_t stride_h,
                  std::int64_t stride_w, std::uintptr_t table, std::int64_t max_area, std::uintptr_t lse,
                  std::int64_t canvas_height, std::int64_t canvas_width, std::int64_t out_height,
                  std::int64_t out_width, bool softmax, std::uintptr_t labels, std::uintptr_t scores,
                  std::uintptr_t stream) {
  require(windows >= 1 && windows <= 65535, "dense: windows must be in [1, 65535], got ", windows);
  require(classes >= 1 && classes <= 0x7fffffff, "dense: classes must be in [1, 2**31), got ", classes);
  check_side(height, "height");
  check_side(width, "width");
  check_side(canvas_height, "canvas_height");
  check_side(canvas_width, "canvas_width");
  check_side(out_height, "out_height");
  check_side(out_width, "out_width");
  check_strides({stride_n, stride_c, stride_h, stride_w});
  require(max_area >= 1 && max_area <= canvas_height * canvas_width, "dense: max_area ", max_area,
          " does not fit the canvas");
  const cudaStream_t s = as_stream(stream);
  const int* boxes = as_ptr<const int>(table, "table");
  float* lse_ptr = softmax ? as_ptr<float>(lse, "lse") : nullptr;
  auto* l = as_ptr<std::int64_t>(labels, "labels");
  auto* sc = as_ptr<float>(scores, "scores");
  with_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const T* x = as_ptr<const T>(logits, "logits");
    if (softmax) {
      const dim3 grid(static_cast<unsigned>(ceil_div<std::int64_t>(max_area, kThreads)),
                      static_cast<unsigned>(windows));
      window_lse_kernel<T><<<grid, kThreads, 0, s>>>(x, stride_n, stride_c, stride_h, stride_w, boxes,
                                                     static_cast<int>(classes), static_cast<int>(height),
                                                     static_cast<int>(width), lse_ptr);
      DTF_CHECK_LAUNCH();
    }
    const unsigned blocks = static_cast<unsigned>(ceil_div<std::int64_t>(out_height * out_width, kDecodeThreads));
    const int args[] = {static_cast<int>(windows), static_cast<int>(classes), static_cast<int>(height),
                        static_cast<int>(width), static_cast<int>(canvas_height), static_cast<int>(canvas_width),
                        static_cast<int>(out_height), static_cast<int>(out_width)};
    if (softmax) {
      slide_decode_kernel<T, true><<<blocks, kDecodeThreads, 0, s>>>(
          x, stride_n, stride_c, stride_h, stride_w, boxes, args[0], lse_ptr, args[1], args[2], args[3], args[4],
          args[5], args[6], args[7], l, sc);
    } else {
      slide_decode_kernel<T, false><<<blocks, kDecodeThreads, 0, s>>>(
          x, stride_n, stride_c, stride_h, stride_w, boxes, args[0], lse_ptr, args[1], args[2], args[3], args[4],
          args[5], args[6], args[7], l, sc);
    }
    DTF_CHECK_LAUNCH();
  });
}

}  // namespace dense
}  // namespace dinotxt_fast
