// Python bindings of the contrastive-loss tile primitives (see contrastive.h); the wrapper
// dinotxt_fast/ops/cuda/contrastive.py checks shapes, dtypes, devices and strides before calling them.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "contrastive/contrastive.h"

namespace py = pybind11;

namespace {

namespace ct = dinotxt_fast::contrastive;
using u = std::uintptr_t;
using i64 = std::int64_t;

}  // namespace

void bind_contrastive(py::module_& m) {
  m.attr("contrastive_tile") = ct::kTile;
  m.def(
      "contrastive_row_norms",
      [](const std::string& dtype, u x, i64 rows, i64 dim, i64 stride_x, u inv, u norm, u stream) {
        ct::row_norms(ct::parse_dtype(dtype), x, rows, dim, stride_x, inv, norm, stream);
      },
      py::arg("dtype"), py::arg("x"), py::arg("rows"), py::arg("dim"), py::arg("stride_x"), py::arg("inv"),
      py::arg("norm"), py::arg("stream"), "inv, norm [rows] fp32 = 1 / max(||x||, eps), max(||x||, eps)");
  m.def(
      "contrastive_forward_tiles",
      [](const std::string& dtype, u img, u txt, u inv_i, u inv_t, u log_scale, u row_max, u row_sum, u col_max,
         u col_sum, u diag, i64 m, i64 n, i64 dim, i64 offset, i64 stride_img, i64 stride_txt, i64 row_chunk,
         i64 col_chunk, u stream) {
        ct::forward_tiles(ct::parse_dtype(dtype), img, txt, inv_i, inv_t, log_scale, row_max, row_sum, col_max,
                          col_sum, diag, m, n, dim, offset, stride_img, stride_txt, row_chunk, col_chunk, stream);
      },
      py::arg("dtype"), py::arg("img"), py::arg("txt"), py::arg("inv_i"), py::arg("inv_t"), py::arg("log_scale"),
      py::arg("row_max"), py::arg("row_sum"), py::arg("col_max"), py::arg("col_sum"), py::arg("diag"), py::arg("m"),
      py::arg("n"), py::arg("dim"), py::arg("offset"), py::arg("stride_img"), py::arg("stride_txt"),
      py::arg("row_chunk"), py::arg("col_chunk"), py::arg("stream"),
      "Chunked forward: per-chunk (max, sum of exp) of rows and columns, the diagonal");
  m.def(
      "contrastive_ds_tiles",
      [](const std::string& dtype, u img, u txt, u inv_i, u inv_t, u log_scale, u lse_rows, u lse_cols, u row_coef,
         u col_coef, u inv_kappa, u ds, u ds_dot_s, i64 m, i64 n, i64 dim, i64 offset, i64 stride_img, i64 stride_txt,
         i64 stride_ds, i64 col_begin, i64 col_end, i64 row_chunk, i64 col_chunk, i64 stride_ds_dot_s, u stream) {
        ct::ds_tiles(ct::parse_dtype(dtype), img, txt, inv_i, inv_t, log_scale, lse_rows, lse_cols, row_coef, col_coef,
                     inv_kappa, ds, ds_dot_s, m, n, dim, offset, stride_img, stride_txt, stride_ds, col_begin, col_end,
                     row_chunk, col_chunk, stride_ds_dot_s, stream);
      },
      py::arg("dtype"), py::arg("img"), py::arg("txt"), py::arg("inv_i"), py::arg("inv_t"), py::arg("log_scale"),
      py::arg("lse_rows"), py::arg("lse_cols"), py::arg("row_coef"), py::arg("col_coef"), py::arg("inv_kappa"),
      py::arg("ds"), py::arg("ds_dot_s"), py::arg("m"), py::arg("n"), py::arg("dim"), py::arg("offset"),
      py::arg("stride_img"), py::arg("stride_txt"), py::arg("stride_ds"), py::arg("col_begin"), py::arg("col_end"),
      py::arg("row_chunk"), py::arg("col_chunk"), py::arg("stride_ds_dot_s"), py::arg("stream"),
      "Backward: the scaled dS of a column panel and per-chunk sums of dS * s (float64 log-sum-exps)");
  m.def(
      "contrastive_gemm",
      [](const std::string& dtype, u a, u b, u c, u alpha, u row_scale, i64 m, i64 n, i64 k, i64 stride_am,
         i64 stride_ak, i64 stride_bk, i64 stride_bn, i64 ldc, bool accumulate, u stream) {
        ct::gemm(ct::parse_dtype(dtype), a, b, c, alpha, row_scale, m, n, k, stride_am, stride_ak, stride_bk,
                 stride_bn, ldc, accumulate, stream);
      },
      py::arg("dtype"), py::arg("a"), py::arg("b"), py::arg("c"), py::arg("alpha"), py::arg("row_scale"),
      py::arg("m"), py::arg("n"), py::arg("k"), py::arg("stride_am"), py::arg("stride_ak"), py::arg("stride_bk"),
      py::arg("stride_bn"), py::arg("ldc"), py::arg("accumulate"), py::arg("stream"),
      "c (+)= alpha * row_scale[:, None] * (a @ b), fp32 c");
  m.def(
      "contrastive_normalize_backward",
      [](const std::string& dtype, u g, u x, u out, i64 rows, i64 dim, i64 stride_g, i64 stride_x, i64 stride_out,
         bool normalize, u stream) {
        ct::normalize_backward(ct::parse_dtype(dtype), g, x, out, rows, dim, stride_g, stride_x, stride_out, normalize,
                               stream);
      },
      py::arg("dtype"), py::arg("g"), py::arg("x"), py::arg("out"), py::arg("rows"), py::arg("dim"),
      py::arg("stride_g"), py::arg("stride_x"), py::arg("stride_out"), py::arg("normalize"), py::arg("stream"),
      "Gradient through x / max(||x||, eps) (or a cast without normalize)");
}
