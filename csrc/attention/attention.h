// Fused attention forward (FlashAttention-2 style) for dense inference and the frozen backbone.
//
// Contract (same as dinotxt_fast.ops.reference.attention_forward):
//   o[b, i, h, :] = sum_j softmax_j(scale * q[b, i, h, :] . k[b, j, h, :]) v[b, j, h, :]
//   lse[b, h, i]  = natural-log log-sum-exp over j of the scaled scores (fp32), the value the Triton backward reads.
// Masks: causal is top-left aligned (query i sees keys j <= i); with `lengths` (int32 [B] or 0) keys j >= lengths[b]
// are hidden for every query of sequence b. A query row that sees no key gets o = 0 and lse = -inf.
// Layout: q, k, v, o are [B, N, H, Dh] with any batch/token/head strides (in elements) and unit stride along Dh
// (strided views of a fused qkv work); lse is contiguous fp32 [B, H, Nq]. Dh in {64, 128}, fp16 or bf16, any N >= 1.
#pragma once

#include <cstdint>

namespace dinotxt_fast {
namespace attention {

enum DType : int { kFloat16 = 1, kBFloat16 = 2 };  // the codes dinotxt_fast.ops.cuda uses for every family

struct FwdParams {
  std::uintptr_t q, k, v, o, lse, lengths;  // device addresses; lengths may be 0 (no key masking)
  int dtype;                                // DType
  std::int64_t batch, seq_q, seq_k, heads, head_dim;
  std::int64_t q_stride_b, q_stride_n, q_stride_h;
  std::int64_t k_stride_b, k_stride_n, k_stride_h;
  std::int64_t v_stride_b, v_stride_n, v_stride_h;
  std::int64_t o_stride_b, o_stride_n, o_stride_h;
  bool causal;
  float scale;
};

// Which implementation runs: kAuto picks the Hopper path on a compute-capability-9.0 device when the module was
// compiled for sm_90a, else the mma.sync path.
enum Path : int { kAuto = 0, kSm80 = 1, kSm90 = 2 };

// Validates the parameters (throws std::invalid_argument naming the problem), launches on `stream` (a cudaStream_t
// as an integer) and checks the launch (throws std::runtime_error with the shape on failure). Returns the path run.
Path forward(const FwdParams& p, Path path, std::uintptr_t stream);

// The two implementations (called by forward() after validation).
void forward_sm80(const FwdParams& p, std::uintptr_t stream);  // attention_fwd_sm80.cu: mma.sync, sm_80+
void forward_sm90(const FwdParams& p, std::uintptr_t stream);  // attention_fwd_sm90.cu: wgmma + TMA, sm_90a
// True when attention_fwd_sm90.cu was compiled with sm_90a code in this module (a build flag, not a device query).
bool sm90_compiled();

}  // namespace attention
}  // namespace dinotxt_fast
