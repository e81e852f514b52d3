// Tile primitives of the fused contrastive (InfoNCE) loss; dinotxt_fast/ops/cuda/contrastive.py composes them the
// way reference.tiled_partial_forward / tiled_partial_backward describe (chunked forward with online log-sum-exps
// of rows and columns, backward through a bounded dS panel and two GEMMs). Matrices are row-major with unit stride
// along the feature dimension unless strides say otherwise; statistics and accumulators are fp32.
#pragma once

#include <cstdint>
#include <string>

namespace dinotxt_fast {
namespace contrastive {

enum class DType { kFloat32, kFloat16, kBFloat16 };

// "float32" | "float16" | "bfloat16" -> DType; anything else throws ValueError.
DType parse_dtype(const std::string& name);

// Rows and columns are processed in tiles of this size; chunks passed below must be multiples of it.
constexpr int kTile = 64;

// inv[r] = 1 / max(||x_r||, 1e-12), norm[r] = max(||x_r||, 1e-12).
void row_norms(DType dtype, std::uintptr_t x, std::int64_t rows, std::int64_t dim, std::int64_t stride_x,
               std::uintptr_t inv, std::uintptr_t norm, std::uintptr_t stream);

// s_ij = exp(log_scale) * inv_i[i] * inv_t[j] * <img_i, txt_j>. Grid of (row chunk, column chunk) blocks:
// row_max / row_sum [n_col_chunks, m] = each row's max and sum of exp(s - max) over one column chunk; col_max /
// col_sum [n_row_chunks, n] = the same for each column over one row chunk; diag[i] = s_{i, i + offset}.
void forward_tiles(DType dtype, std::uintptr_t img, std::uintptr_t txt, std::uintptr_t inv_i, std::uintptr_t inv_t,
                   std::uintptr_t log_scale, std::uintptr_t row_max, std::uintptr_t row_sum, std::uintptr_t col_max,
                   std::uintptr_t col_sum, std::uintptr_t diag, std::int64_t m, std::int64_t n, std::int64_t dim,
                   std::int64_t offset, std::int64_t stride_img, std::int64_t stride_txt, std::int64_t row_chunk,
                   std::int64_t col_chunk, std::uintptr_t stream);

// For columns [col_begin, col_end): dS_ij = row_coef_i (exp(s_ij - lse_rows_i) - [j == i + offset])
//   + col_coef_j (exp(s_ij - lse_cols_j) - [j == i + offset]);
// ds[i, j - col_begin] = dS_ij * inv_i * inv_t * inv_kappa (in dtype); ds_dot_s[row chunk * stride_ds_dot_s + the
// panel's column chunk] = sum of dS_ij * s_ij over the chunk pair (fixed order: deterministic; ds_dot_s points at
// the panel's first column chunk). lse_rows / lse_cols are float64 (split into fp32 hi + lo, so that s - lse keeps
// fp32 precision where s is close to lse).
void ds_tiles(DType dtype, std::uintptr_t img, std::uintptr_t txt, std::uintptr_t inv_i, std::uintptr_t inv_t,
              std::uintptr_t log_scale, std::uintptr_t lse_rows, std::uintptr_t lse_cols, std::uintptr_t row_coef,
              std::uintptr_t col_coef, std::uintptr_t inv_kappa, std::uintptr_t ds, std::uintptr_t ds_dot_s,
              std::int64_t m, std::int64_t n, std::int64_t dim, std::int64_t offset, std::int64_t stride_img,
              std::int64_t stride_txt, std::int64_t stride_ds, std::int64_t col_begin, std::int64_t col_end,
              std::int64_t row_chunk, std::int64_t col_chunk, std::int64_t stride_ds_dot_s, std::uintptr_t stream);

// c[m, n] (+)= alpha * row_scale[i] * (a @ b): a [m, k] and b [k, n] in dtype with any strides, c fp32 with row
// stride ldc and unit column stride, alpha a device scalar.
void gemm(DType dtype, std::uintptr_t a, std::uintptr_t b, std::uintptr_t c, std::uintptr_t alpha,
          std::uintptr_t row_scale, std::int64_t m, std::int64_t n, std::int64_t k, std::int64_t stride_am,
          std::int64_t stride_ak, std::int64_t stride_bk, std::int64_t stride_bn, std::int64_t ldc, bool accumulate,
          std::uintptr_t stream);

// out = d/dx (x / max(||x||, 1e-12)) applied to g (fp32 [rows, dim]), in dtype; g cast to dtype without normalize.
void normalize_backward(DType dtype, std::uintptr_t g, std::uintptr_t x, std::uintptr_t out, std::int64_t rows,
                        std::int64_t dim, std::int64_t stride_g, std::int64_t stride_x, std::int64_t stride_out,
                        bool normalize, std::uintptr_t stream);

}  // namespace contrastive
}  // namespace dinotxt_fast
