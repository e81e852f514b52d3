// Python bindings of the patch pooling launchers (see pooling/pooling.h for the contracts).
#include <pybind11/pybind11.h>

#include <cstdint>

#include "pooling/pooling.h"

namespace py = pybind11;
using std::int64_t;
using std::uintptr_t;

void bind_pooling(py::module_& m) {
  namespace pl = dinotxt_fast::pooling;
  m.def(
      "pool_forward",
      [](uintptr_t tokens, int dtype, int64_t batch, int64_t n_tokens, int64_t dim, int64_t stride_b,
         int64_t stride_n, int64_t num_registers, uintptr_t ln_weight, uintptr_t ln_bias, float eps, bool normalize,
         uintptr_t partial, int64_t splits, int64_t rows_per_split, uintptr_t out, uintptr_t stream) {
        const pl::Tokens x{tokens, dtype, batch, n_tokens, dim, stride_b, stride_n};
        py::gil_scoped_release release;
        pl::forward(x, num_registers, ln_weight, ln_bias, eps, normalize, partial, splits, rows_per_split, out,
                    stream);
      },
      py::arg("tokens"), py::arg("dtype"), py::arg("batch"), py::arg("n_tokens"), py::arg("dim"),
      py::arg("stride_b"), py::arg("stride_n"), py::arg("num_registers"), py::arg("ln_weight"), py::arg("ln_bias"),
      py::arg("eps"), py::arg("normalize"), py::arg("partial"), py::arg("splits"), py::arg("rows_per_split"),
      py::arg("out"), py::arg("stream"),
      "[cls ; mean(patches)] of tokens [B, N, D] (unit stride along D) into out [B, 2D]; fp32 LayerNorm "
      "weight/bias addresses or 0; partial: fp32 [B * splits, D] workspace.");
  m.def(
      "pool_backward",
      [](uintptr_t grad_out, int64_t g_stride_b, int64_t g_stride_d, uintptr_t tokens, int dtype, int64_t batch,
         int64_t n_tokens, int64_t dim, int64_t stride_b, int64_t stride_n, int64_t num_registers,
         uintptr_t ln_weight, uintptr_t ln_bias, float eps, bool normalize, uintptr_t partial, int64_t fwd_splits,
         int64_t fwd_rows_per_split, uintptr_t gvec, int64_t splits, int64_t rows_per_split, uintptr_t ln_partial,
         uintptr_t d_tokens, uintptr_t stream) {
        const pl::Tokens x{tokens, dtype, batch, n_tokens, dim, stride_b, stride_n};
        py::gil_scoped_release release;
        pl::backward(grad_out, g_stride_b, g_stride_d, x, num_registers, ln_weight, ln_bias, eps, normalize, partial,
                     fwd_splits, fwd_rows_per_split, gvec, splits, rows_per_split, ln_partial, d_tokens, stream);
      },
      py::arg("grad_out"), py::arg("g_stride_b"), py::arg("g_stride_d"), py::arg("tokens"), py::arg("dtype"),
      py::arg("batch"), py::arg("n_tokens"), py::arg("dim"), py::arg("stride_b"), py::arg("stride_n"),
      py::arg("num_registers"), py::arg("ln_weight"), py::arg("ln_bias"), py::arg("eps"), py::arg("normalize"),
      py::arg("partial"), py::arg("fwd_splits"), py::arg("fwd_rows_per_split"), py::arg("gvec"), py::arg("splits"),
      py::arg("rows_per_split"), py::arg("ln_partial"), py::arg("d_tokens"), py::arg("stream"),
      "Gradient of pool_forward: d_tokens [B, N, D] (contiguous) and, with LayerNorm, per-block partial sums of "
      "[d_weight ; d_bias] in ln_partial (fp32 [B * splits, 2D]) for pool_column_sum.");
  m.def(
      "pool_column_sum",
      [](uintptr_t part, int64_t rows, int64_t cols, int64_t rows_per_chunk, uintptr_t out, uintptr_t stream) {
        py::gil_scoped_release release;
        pl::column_sum(part, rows, cols, rows_per_chunk, out, stream);
      },
      py::arg("part"), py::arg("rows"), py::arg("cols"), py::arg("rows_per_chunk"), py::arg("out"),
      py::arg("stream"),
      "out[s] = sum of rows [s * rows_per_chunk, ...) of an fp32 [rows, cols] matrix, in a fixed order.");
}
