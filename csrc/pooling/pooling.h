// Patch pooling launchers ([cls ; mean(patches)] with optional fused LayerNorm and L2 normalisation).
// Host-only declarations: addresses and the stream are integers (see common/launch.h). Tensors are
// [B, N, D] tokens with unit stride along D; LayerNorm weight/bias and all workspaces are fp32.
#pragma once

#include <cstdint>

namespace dinotxt_fast {
namespace pooling {

struct Tokens {
  std::uintptr_t ptr;
  int dtype;  // DType (pooling/vec.cuh)
  std::int64_t batch, tokens, dim, stride_b, stride_n;
};

// partial: fp32 [batch * splits, dim] workspace; out: [batch, 2 * dim] in the tokens' dtype.
void forward(const Tokens& x, std::int64_t num_registers, std::uintptr_t ln_weight, std::uintptr_t ln_bias,
             float eps, bool normalize, std::uintptr_t partial, std::int64_t splits, std::int64_t rows_per_split,
             std::uintptr_t out, std::uintptr_t stream);

// grad_out: [batch, 2 * dim] in the tokens' dtype with strides (g_stride_b, g_stride_d). When `normalize`,
// `partial` (fp32 [batch * fwd_splits, dim]) is recomputed here. gvec: fp32 [batch, 2 * dim] workspace.
// d_tokens: contiguous [batch, tokens, dim] in the tokens' dtype. With LayerNorm, ln_partial (fp32
// [batch * splits, 2 * dim]) receives per-block partial sums of [d_weight ; d_bias], to be added by
// column_sum in a fixed order.
void backward(std::uintptr_t grad_out, std::int64_t g_stride_b, std::int64_t g_stride_d, const Tokens& x,
              std::int64_t num_registers, std::uintptr_t ln_weight, std::uintptr_t ln_bias, float eps,
              bool normalize, std::uintptr_t partial, std::int64_t fwd_splits, std::int64_t fwd_rows_per_split,
              std::uintptr_t gvec, std::int64_t splits, std::int64_t rows_per_split, std::uintptr_t ln_partial,
              std::uintptr_t d_tokens, std::uintptr_t stream);

// out[s, :] = sum of rows [s * rows_per_chunk, (s + 1) * rows_per_chunk) of part [rows, cols] (fp32).
void column_sum(std::uintptr_t part, std::int64_t rows, std::int64_t cols, std::int64_t rows_per_chunk,
                std::uintptr_t out, std::uintptr_t stream);

}  // namespace pooling
}  // namespace dinotxt_fast
