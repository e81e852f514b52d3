// Python bindings of the dense decoding launchers (see dense/dense.h for the contracts).
#include <pybind11/pybind11.h>

#include <cstdint>

#include "dense/dense.h"

namespace py = pybind11;
using std::int64_t;
using std::uintptr_t;

void bind_dense(py::module_& m) {
  namespace dn = dinotxt_fast::dense;
  m.def(
      "dense_patch_text_logits",
      [](uintptr_t patches, int patches_dtype, int64_t batch, int64_t height, int64_t width, int64_t dim,
         int64_t p_stride_b, int64_t p_stride_h, int64_t p_stride_w, uintptr_t text, int text_dtype, int64_t classes,
         int64_t t_stride_c, uintptr_t inv_norms, uintptr_t out, uintptr_t stream) {
        py::gil_scoped_release release;
        dn::patch_text_logits(patches, patches_dtype, batch, height, width, dim, p_stride_b, p_stride_h, p_stride_w,
                              text, text_dtype, classes, t_stride_c, inv_norms, out, stream);
      },
      py::arg("patches"), py::arg("patches_dtype"), py::arg("batch"), py::arg("height"), py::arg("width"),
      py::arg("dim"), py::arg("p_stride_b"), py::arg("p_stride_h"), py::arg("p_stride_w"), py::arg("text"),
      py::arg("text_dtype"), py::arg("classes"), py::arg("t_stride_c"), py::arg("inv_norms"), py::arg("out"),
      py::arg("stream"),
      "Cosine logits [B, C, h, w] (fp32) of patches [B, h, w, D] and text [C, D] (unit stride along D); "
      "inv_norms: fp32 workspace of B*h*w + C floats.");
  m.def(
      "dense_upsample_argmax",
      [](uintptr_t logits, int dtype, int64_t batch, int64_t classes, int64_t height, int64_t width, int64_t stride_b,
         int64_t stride_c, int64_t stride_h, int64_t stride_w, int64_t out_height, int64_t out_width, bool softmax,
         uintptr_t labels, uintptr_t scores, uintptr_t stream) {
        py::gil_scoped_release release;
        dn::upsample_argmax(logits, dtype, batch, classes, height, width, stride_b, stride_c, stride_h, stride_w,
                            out_height, out_width, softmax, labels, scores, stream);
      },
      py::arg("logits"), py::arg("dtype"), py::arg("batch"), py::arg("classes"), py::arg("height"), py::arg("width"),
      py::arg("stride_b"), py::arg("stride_c"), py::arg("stride_h"), py::arg("stride_w"), py::arg("out_height"),
      py::arg("out_width"), py::arg("softmax"), py::arg("labels"), py::arg("scores"), py::arg("stream"),
      "Labels [B, H, W] int64 and winning scores [B, H, W] fp32 of bilinearly resized logits [B, C, h, w].");
  m.def(
      "dense_slide_decode",
      [](uintptr_t logits, int dtype, int64_t windows, int64_t classes, int64_t height, int64_t width,
         int64_t stride_n, int64_t stride_c, int64_t stride_h, int64_t stride_w, uintptr_t table, int64_t max_area,
         uintptr_t lse, int64_t canvas_height, int64_t canvas_width, int64_t out_height, int64_t out_width,
         bool softmax, uintptr_t labels, uintptr_t scores, uintptr_t stream) {
        py::gil_scoped_release release;
        dn::slide_decode(logits, dtype, windows, classes, height, width, stride_n, stride_c, stride_h, stride_w, table,
                         max_area, lse, canvas_height, canvas_width, out_height, out_width, softmax, labels, scores,
                         stream);
      },
      py::arg("logits"), py::arg("dtype"), py::arg("windows"), py::arg("classes"), py::arg("height"),
      py::arg("width"), py::arg("stride_n"), py::arg("stride_c"), py::arg("stride_h"), py::arg("stride_w"),
      py::arg("table"), py::arg("max_area"), py::arg("lse"), py::arg("canvas_height"), py::arg("canvas_width"),
      py::arg("out_height"), py::arg("out_width"), py::arg("softmax"), py::arg("labels"), py::arg("scores"),
      py::arg("stream"),
      "Sliding-window decode: labels [H, W] int64 and scores [H, W] fp32 of window logits [Nw, C, h, w] placed by "
      "an int32 [Nw, 5] table (y0, x0, y1, x1, lse offset); lse: fp32 workspace of the total box area.");
}
