// Python bindings of the fused attention forward (see attention/attention.h for the contract).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <cstdint>

#include "attention/attention.h"

namespace py = pybind11;
using std::int64_t;
using std::uintptr_t;
using Strides = std::array<int64_t, 3>;  // (batch, token, head) strides in elements

void bind_attention(py::module_& m) {
  namespace at = dinotxt_fast::attention;
  m.def(
      "attention_forward",
      [](uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t o, uintptr_t lse, uintptr_t lengths, int dtype,
         int64_t batch, int64_t seq_q, int64_t seq_k, int64_t heads, int64_t head_dim, const Strides& q_strides,
         const Strides& k_strides, const Strides& v_strides, const Strides& o_strides, bool causal, float scale,
         int path, uintptr_t stream) {
        at::FwdParams p{};
        p.q = q, p.k = k, p.v = v, p.o = o, p.lse = lse, p.lengths = lengths;
        p.dtype = dtype;
        p.batch = batch, p.seq_q = seq_q, p.seq_k = seq_k, p.heads = heads, p.head_dim = head_dim;
        p.q_stride_b = q_strides[0], p.q_stride_n = q_strides[1], p.q_stride_h = q_strides[2];
        p.k_stride_b = k_strides[0], p.k_stride_n = k_strides[1], p.k_stride_h = k_strides[2];
        p.v_stride_b = v_strides[0], p.v_stride_n = v_strides[1], p.v_stride_h = v_strides[2];
        p.o_stride_b = o_strides[0], p.o_stride_n = o_strides[1], p.o_stride_h = o_strides[2];
        p.causal = causal;
        p.scale = scale;
        py::gil_scoped_release release;
        return static_cast<int>(at::forward(p, static_cast<at::Path>(path), stream));
      },
      py::arg("q"), py::arg("k"), py::arg("v"), py::arg("o"), py::arg("lse"), py::arg("lengths"), py::arg("dtype"),
      py::arg("batch"), py::arg("seq_q"), py::arg("seq_k"), py::arg("heads"), py::arg("head_dim"),
      py::arg("q_strides"), py::arg("k_strides"), py::arg("v_strides"), py::arg("o_strides"), py::arg("causal"),
      py::arg("scale"), py::arg("path"), py::arg("stream"),
      "Fused attention forward: q, k, v, o [B, N, H, Dh] (device addresses, (batch, token, head) strides in "
      "elements, unit stride along Dh), lse fp32 [B, H, Nq] contiguous, lengths int32 [B] or 0; dtype 1 = float16, "
      "2 = bfloat16; path 0 = auto, 1 = sm80 (mma.sync), 2 = sm90 (wgmma + TMA). Returns the path that ran (1 or 2).");
  m.def("attention_sm90_compiled", &at::sm90_compiled,
        "True when the Hopper (sm_90a) attention kernel is compiled into this module.");
}
