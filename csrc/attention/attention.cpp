// attention::forward(): validation, choice between the mma.sync (sm80) and Hopper (sm90) kernels, launch check.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <sstream>
#include <string>

#include "attention/attention.h"
#include "common/check.h"
#include "common/launch.h"

namespace dinotxt_fast {
namespace attention {
namespace {

// Row indices are int32 in the kernels, including a query or key tile's overhang past the end.
constexpr std::int64_t kMaxSeq = std::numeric_limits<std::int32_t>::max() - 1024;
constexpr std::int64_t kMaxBatchHeads = std::numeric_limits<std::int32_t>::max();  // b * h as int32; grid y * z
constexpr std::int64_t kVectorElems = 8;  // 16-byte loads and stores of 2-byte elements

const char* dtype_name(int dtype) { return dtype == kFloat16 ? "float16" : "bfloat16"; }
const char* path_name(Path path) { return path == kSm90 ? "sm90" : "sm80"; }

std::string describe(const FwdParams& p, Path path) {
  std::ostringstream out;
  out << "B=" << p.batch << ", Nq=" << p.seq_q << ", Nk=" << p.seq_k << ", H=" << p.heads << ", Dh=" << p.head_dim
      << ", " << dtype_name(p.dtype) << (p.causal ? ", causal" : "") << (p.lengths != 0 ? ", lengths" : "")
      << ", path " << path_name(path);
  return out.str();
}

// Strides in elements of a [B, N, H, Dh] operand: non-negative, and 16-byte multiples along every dimension that
// has more than one index (a size-1 dimension's stride is never used).
void check_strides(const char* name, std::int64_t stride_b, std::int64_t stride_n, std::int64_t stride_h,
                   std::int64_t batch, std::int64_t seq, std::int64_t heads) {
  const std::int64_t strides[3] = {stride_b, stride_n, stride_h};
  const std::int64_t sizes[3] = {batch, seq, heads};
  const char* dims[3] = {"batch", "token", "head"};
  for (int i = 0; i < 3; ++i) {
    require(strides[i] >= 0, "attention: ", name, " has a negative ", dims[i], " stride (", strides[i], ")");
    require(sizes[i] == 1 || strides[i] % kVectorElems == 0, "attention: ", name, "'s ", dims[i], " stride ",
            strides[i], " is not a multiple of ", kVectorElems,
            " elements (the kernels move 16-byte vectors; pass a contiguous copy)");
  }
}

void validate(const FwdParams& p) {
  require(p.dtype == kFloat16 || p.dtype == kBFloat16, "attention: dtype code must be ", int(kFloat16),
          " (float16) or ", int(kBFloat16), " (bfloat16), got ", p.dtype);
  require(p.head_dim == 64 || p.head_dim == 128, "attention: head dim must be 64 or 128, got ", p.head_dim);
  require_positive(p.batch, "attention: batch");
  require_positive(p.seq_q, "attention: query length");
  require_positive(p.seq_k, "attention: key length");
  require_positive(p.heads, "attention: heads");
  require(p.seq_q <= kMaxSeq && p.seq_k <= kMaxSeq, "attention: sequence lengths must be <= ", kMaxSeq, ", got Nq=",
          p.seq_q, ", Nk=", p.seq_k);
  require(p.heads <= kMaxBatchHeads / p.batch, "attention: B * H = ", p.batch, " * ", p.heads, " exceeds ",
          kMaxBatchHeads);
  require(!p.causal || p.seq_q == p.seq_k, "attention: causal attention needs Nq == Nk, got Nq=", p.seq_q,
          ", Nk=", p.seq_k);
  require(std::isfinite(p.scale), "attention: scale must be finite, got ", p.scale);
  as_ptr<const char>(p.q, "attention: q", 16);
  as_ptr<const char>(p.k, "attention: k", 16);
  as_ptr<const char>(p.v, "attention: v", 16);
  as_ptr<char>(p.o, "attention: o", 16);
  as_ptr<float>(p.lse, "attention: lse");
  if (p.lengths != 0) as_ptr<const std::int32_t>(p.lengths, "attention: lengths");
  check_strides("q", p.q_stride_b, p.q_stride_n, p.q_stride_h, p.batch, p.seq_q, p.heads);
  check_strides("k", p.k_stride_b, p.k_stride_n, p.k_stride_h, p.batch, p.seq_k, p.heads);
  check_strides("v", p.v_stride_b, p.v_stride_n, p.v_stride_h, p.batch, p.seq_k, p.heads);
  check_strides("o", p.o_stride_b, p.o_stride_n, p.o_stride_h, p.batch, p.seq_q, p.heads);
}

Path choose_path(Path requested) {
  require(requested == kAuto || requested == kSm80 || requested == kSm90,
          "attention: path must be 0 (auto), 1 (sm80) or 2 (sm90), got ", int(requested));
  int device = 0, major = 0, minor = 0;
  DTF_CUDA_CHECK(cudaGetDevice(&device));
  DTF_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  DTF_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
  require(major >= 8, "attention: the CUDA kernels need compute capability >= 8.0; device ", device, " is ", major,
          ".", minor);
  const bool hopper = major == 9 && minor == 0;
  if (requested == kSm90) {
    require(sm90_compiled(), "attention: the sm90 path is not in this build (compile with sm_90a in "
            "DINOTXT_FAST_CUDA_ARCHS)");
    require(hopper, "attention: the sm90 path (wgmma + TMA) needs a compute capability 9.0 device; device ", device,
            " is ", major, ".", minor);
    return kSm90;
  }
  if (requested == kSm80) return kSm80;
  return hopper && sm90_compiled() ? kSm90 : kSm80;
}

// TMA (the sm90 path) needs every stride of a dimension with more than one index to be positive (validate() already
// made them 16-byte multiples): broadcast (stride-0) operands can't be described.
bool tma_strides(std::int64_t stride_b, std::int64_t stride_n, std::int64_t stride_h, std::int64_t batch,
                 std::int64_t seq, std::int64_t heads) {
  return (batch == 1 || stride_b > 0) && (seq == 1 || stride_n > 0) && (heads == 1 || stride_h > 0);
}

// kAuto on a Hopper build and device: shapes the sm90 kernel cannot take run on the sm80 kernel instead of failing:
// broadcast operands, and more CTAs (query tiles of 128 rows * B * H) than its flat grid holds.
Path auto_path(const FwdParams& p, Path chosen) {
  if (chosen != kSm90) return chosen;
  const bool strides_ok = tma_strides(p.q_stride_b, p.q_stride_n, p.q_stride_h, p.batch, p.seq_q, p.heads) &&
                          tma_strides(p.k_stride_b, p.k_stride_n, p.k_stride_h, p.batch, p.seq_k, p.heads) &&
                          tma_strides(p.v_stride_b, p.v_stride_n, p.v_stride_h, p.batch, p.seq_k, p.heads);
  const bool grid_ok = ceil_div<std::int64_t>(p.seq_q, 128) <= std::numeric_limits<std::int32_t>::max() /
                                                                  (p.batch * p.heads);
  return strides_ok && grid_ok ? kSm90 : kSm80;
}

}  // namespace

Path forward(const FwdParams& p, Path path, std::uintptr_t stream) {
  validate(p);
  const Path run = path == kAuto ? auto_path(p, choose_path(path)) : choose_path(path);
  try {
    if (run == kSm90) {
      forward_sm90(p, stream);
    } else {
      forward_sm80(p, stream);
    }
  } catch (const CudaError& error) {  // e.g. a failed cudaFuncSetAttribute: say which call it was
    throw CudaError(error.code(), "attention forward (" + describe(p, run) + "): " + error.what());
  }
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    throw CudaError(err, "attention forward (" + describe(p, run) + ") failed to launch: " + cudaGetErrorName(err) +
                             " (" + cudaGetErrorString(err) + ")");
  }
  return run;
}

}  // namespace attention
}  // namespace dinotxt_fast
