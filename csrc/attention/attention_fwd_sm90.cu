// Fused attention forward, Hopper path (sm_90a): a FlashAttention-3-style warp-specialised kernel.
//
// One CTA of 384 threads computes 128 query rows of one (batch, head):
//   warpgroup 0 (producer): one thread issues the TMA loads (Q once, then K and V tiles of 128 keys into a ring of
//     kStages shared-memory stages, each completing on an mbarrier); the warpgroup gives registers away (setmaxnreg).
//   warpgroups 1, 2 (consumers): 64 query rows each. S = Q K^T with wgmma (both operands from shared memory), online
//     softmax in fp32 registers (exp2, scale * log2(e) folded in), P converted to fp16/bf16 in registers and used as
//     the register A operand of O += P V (V from shared memory, MN-major). The next tile's Q K^T is issued before the
//     previous tile's P V so that the softmax overlaps a tensor-core GEMM. Stages go back to the producer through an
//     "empty" mbarrier once P V has read them.
// Key tiles run from the last to the first, so that the tiles needing masks (keys past the length, the causal
// diagonal) come first and the rest of the loop runs mask-free. TMA zero-fills rows past N (odd N needs no padding);
// with `lengths`, the V rows of keys in [length, N) of that first tile are zeroed in shared memory (0 * NaN = NaN).
//
// Shared-memory layouts (all derived from the PTX ISA, "Asynchronous Warpgroup Level Matrix Shared Memory Layout",
// and the TMA 128B swizzle; every tile base is 1024-byte aligned, the period of the 128B swizzle):
//   A [rows x Dh] tile of Q, K or V is stored as Dh/64 column blocks; block c holds columns [64c, 64c+64) of every
//   row as [rows][64] elements, 128 bytes per row, the 16-byte chunks of row r permuted as chunk ^ (r % 8) (what TMA
//   writes with CU_TENSOR_MAP_SWIZZLE_128B and what wgmma reads with swizzle mode 1, "128B").
//   - Q and K are K-major operands (the reduction dim Dh contiguous): one wgmma k-step (16 elements = 32 bytes) starts
//     at block (k / 4) plus 32 * (k % 4) bytes; 8-row swizzle atoms are 1024 bytes apart (SBO = 1024); LBO is unused
//     for swizzled K-major layouts (encoded as 1).
//   - V is the B operand of P V with N = Dh contiguous, i.e. MN-major (imm-trans-b = 1): a k-step (16 keys) starts at
//     row 16k (2048 bytes per step); the two 8-key halves are SBO = 1024 bytes apart; the next 64 columns of N (Dh =
//     128) are LBO = one column block = kBN * 128 bytes further.
// Register layouts (PTX ISA "Matrix Fragments for wgmma.mma_async.m64nNk16"): thread t of a consumer warpgroup, warp
// w = (t / 32) % 4, lane l, holds accumulator element d[i] at row 16w + l/4 + 8*((i/2)%2), column 8*(i/4) + 2*(l%4)
// + i%2. The A fragment of a 64x16 k-step has the same layout as a 64x16 accumulator, so the P fragment of keys
// [16k, 16k+16) is {pack(d[8k], d[8k+1]), pack(d[8k+2], d[8k+3]), pack(d[8k+4], d[8k+5]), pack(d[8k+6], d[8k+7])}.
#include "attention/attention.h"
#include "attention/fragment.cuh"

#include <cuda.h>          // CUtensorMap and the cuTensorMapEncodeTiled enums (types only: libcuda is not linked)
#include <cudaTypedefs.h>  // PFN_cuTensorMapEncodeTiled
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "common/check.h"
#include "common/launch.h"

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define DTF_SM90_DEVICE 1
#else
#define DTF_SM90_DEVICE 0
#endif

namespace dinotxt_fast {
namespace attention {
namespace {

constexpr int kBM = 128;            // query rows per CTA: two consumer warpgroups of 64 rows
constexpr int kBN = 128;            // keys per K/V tile
constexpr int kThreads = 384;       // warpgroup 0 produces, warpgroups 1 and 2 consume
constexpr int kRowBytes = 128;      // one row of a 64-column block: 64 fp16/bf16 = one 128B-swizzle row
constexpr int kBlockCols = 64;      // columns per column block (TMA box width: 128 bytes, the 128B-swizzle limit)
constexpr int kAtomBytes = 1024;    // 8 rows x 128 bytes: the 128B-swizzle period (SBO of every operand)

// Shared-memory plan for one head dimension. Byte offsets from a 1024-byte aligned base.
template <int kDh>
struct Smem {
  // A stage (K and V of one tile) is freed only after its P V, which runs one tile behind S = Q K^T: the consumers
  // hold two stages at a time, so with 2 stages the producer could start tile it+1 only when it is already needed
  // (the whole TMA latency exposed every tile). 3 stages keep one tile in flight; for Dh = 128 that is 225 KB.
  static constexpr int kStages = 3;
  static constexpr int kColBlocks = kDh / kBlockCols;
  static constexpr int kQBytes = kBM * kDh * 2;
  static constexpr int kTileBytes = kBN * kDh * 2;  // one K or one V tile
  static constexpr int kQ = 0;
  static constexpr int kK = kQ + kQBytes;
  static constexpr int kV = kK + kStages * kTileBytes;
  static constexpr int kBars = kV + kStages * kTileBytes;
  // mbarriers: Q full, then per stage K full, V full, stage empty.
  static constexpr int kNumBars = 1 + 3 * kStages;
  static constexpr int kBytes = kBars + kNumBars * 8 + kAtomBytes;  // + slack to align the dynamic base
  static_assert(kColBlocks * kBlockCols == kDh && kBlockCols * 2 == kRowBytes, "head dim must be whole 128B rows");
  static_assert(kQBytes % kAtomBytes == 0 && kTileBytes % kAtomBytes == 0, "tiles must keep 1024-byte alignment");
  static_assert(kBytes <= 227 * 1024, "shared memory per CTA exceeds the sm_90 limit");
};

struct Args {
  void* o;
  float* lse;
  const int* lengths;  // nullptr: no key masking
  int seq_q, seq_k, heads;
  int m_blocks;  // query tiles per (batch, head)
  std::int64_t o_stride_b, o_stride_n, o_stride_h;  // elements
  float scale_log2;                                 // scale * log2(e)
};

#if DTF_SM90_DEVICE

constexpr int kConsumerWarps = 8;   // arrivals that free a K/V stage (lane 0 of every consumer warp)
constexpr int kProducerRegs = 24;   // setmaxnreg: 128 * 24 + 256 * 240 = 64512 <= 65536 registers
constexpr int kConsumerRegs = 240;
constexpr float kLn2 = 0.69314718055994530942f;

__device__ __forceinline__ std::uint32_t smem_u32(const void* p) {
  return static_cast<std::uint32_t>(__cvta_generic_to_shared(p));
}

// ---- mbarriers and TMA ------------------------------------------------------------------------------------------

__device__ __forceinline__ void mbar_init(std::uint32_t bar, std::uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(count) : "memory");
}

// Arrives once and announces `bytes` of TMA traffic that must land before the phase completes.
__device__ __forceinline__ void mbar_arrive_expect_tx(std::uint32_t bar, std::uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes) : "memory");
}

__device__ __forceinline__ void mbar_arrive(std::uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(bar) : "memory");
}

__device__ __forceinline__ bool mbar_try_wait(std::uint32_t bar, std::uint32_t parity) {
  std::uint32_t done;
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
      "selp.u32 %0, 1, 0, p;\n"
      "}\n"
      : "=r"(done)
      : "r"(bar), "r"(parity)
      : "memory");
  return done != 0;
}

// Waits until the phase of parity `parity` has completed (a fresh barrier counts parity 1 as completed).
__device__ __forceinline__ void mbar_wait(std::uint32_t bar, std::uint32_t parity) {
  while (!mbar_try_wait(bar, parity)) {
  }
}

// Failed tries after which the producer's wait is a protocol fault (a lost TMA transaction, a missing arrive), not a
// slow consumer: each failed try_wait first suspends the thread for up to a system-dependent time (about a
// microsecond), so this is seconds, while a legitimate wait lasts one tile's compute (microseconds).
constexpr std::uint32_t kWaitTries = 1u << 24;

// mbar_wait for the producer thread, bounded: past kWaitTries failed tries it traps, which aborts the whole launch
// (an error, so the test fails) instead of hanging the process. The consumers' waits stay unbounded (no counter in
// their register-tight loop): a consumer stuck on a full barrier never frees its stage, and the producer, which waits
// for every stage to come back (produce: the ring, then the drain), times out and traps for it.
__device__ __forceinline__ void mbar_wait_bounded(std::uint32_t bar, std::uint32_t parity) {
  std::uint32_t tries = 0;
  while (!mbar_try_wait(bar, parity)) {
    if (++tries == kWaitTries) __trap();
  }
}

// One box of a 4-D tensor map (coordinates innermost first: dh, token, head, batch) into shared memory; out-of-range
// rows are zero-filled and still count towards the barrier's transaction bytes.
__device__ __forceinline__ void tma_load_4d(std::uint32_t dst, const CUtensorMap* map, std::uint32_t bar, int c0,
                                            int c1, int c2, int c3) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4, %5}], "
      "[%6];" ::"r"(dst),
      "l"(reinterpret_cast<std::uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(bar)
      : "memory");
}

__device__ __forceinline__ void tma_prefetch_map(const CUtensorMap* map) {
  asm volatile("prefetch.tensormap [%0];" ::"l"(reinterpret_cast<std::uint64_t>(map)) : "memory");
}

__device__ __forceinline__ void named_barrier_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(threads) : "memory");
}

// Named barriers (0 is __syncthreads): 1 + w for consumer warpgroup w alone, kBarConsumers for both.
constexpr int kBarConsumers = 3;

// ---- wgmma ------------------------------------------------------------------------------------------------------

// Descriptor address fields hold (shared address & 0x3FFFF) >> 4 (bits 0-13); LBO bits 16-29, SBO bits 32-45 (both
// in 16-byte units); base offset bits 49-51 = 0 (tile bases are 1024-byte aligned); swizzle bits 62-63: 1 = 128B.
__device__ __forceinline__ std::uint64_t desc_field(std::uint32_t bytes) { return (bytes & 0x3FFFF) >> 4; }

// K-major operand (Q as A, K as B of S = Q K^T).
__device__ __forceinline__ std::uint64_t desc_k_major(std::uint32_t addr) {
  return desc_field(addr) | (std::uint64_t{1} << 16) | (desc_field(kAtomBytes) << 32) | (std::uint64_t{1} << 62);
}

// MN-major operand (V as B of O = P V): LBO steps 64 columns of N, SBO steps 8 rows of K.
__device__ __forceinline__ std::uint64_t desc_mn_major(std::uint32_t addr, std::uint32_t lbo_bytes) {
  return desc_field(addr) | (desc_field(lbo_bytes) << 16) | (desc_field(kAtomBytes) << 32) |
         (std::uint64_t{1} << 62);
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
template <int kPending>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(kPending) : "memory");
}

// Pins registers read or written by in-flight wgmma to this point of the program, so the compiler neither reads an
// accumulator before its wait_group nor moves a write of an operand past the wgmma.fence that publishes it.
template <int kN>
__device__ __forceinline__ void fence_regs(float (&r)[kN]) {
#pragma unroll
  for (int i = 0; i < kN; ++i) asm volatile("" : "+f"(r[i])::"memory");
}
template <int kK>
__device__ __forceinline__ void fence_regs(std::uint32_t (&r)[kK][4]) {
#pragma unroll
  for (int k = 0; k < kK; ++k) {
#pragma unroll
    for (int j = 0; j < 4; ++j) asm volatile("" : "+r"(r[k][j])::"memory");
  }
}

#define DTF_ACC8(d, i)                                                                                            \
  "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), "+f"(d[i + 6]), \
      "+f"(d[i + 7])
#define DTF_ACC32(d) DTF_ACC8(d, 0), DTF_ACC8(d, 8), DTF_ACC8(d, 16), DTF_ACC8(d, 24)
#define DTF_ACC64(d) DTF_ACC32(d), DTF_ACC8(d, 32), DTF_ACC8(d, 40), DTF_ACC8(d, 48), DTF_ACC8(d, 56)
#define DTF_REGS32                                                                                         \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, " \
  "%22, %23, %24, %25, %26, %27, %28, %29, %30, %31}"
#define DTF_REGS64                                                                                            \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, " \
  "%23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, "   \
  "%44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}"

// D[64x128] (+)= A[64x16] B[16x128], A and B K-major in shared memory; scale_d = 0 overwrites D.
#define DTF_WGMMA_SS_N128(TY)                                                                    \
  asm volatile(                                                                                  \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"                                               \
      "wgmma.mma_async.sync.aligned.m64n128k16.f32." TY "." TY " " DTF_REGS64                    \
      ", %64, %65, p, 1, 1, 0, 0;\n}\n"                                                          \
      : DTF_ACC64(d)                                                                             \
      : "l"(desc_a), "l"(desc_b), "r"(scale_d))

template <bool kBf16>
__device__ __forceinline__ void wgmma_ss_n128(float (&d)[64], std::uint64_t desc_a, std::uint64_t desc_b,
                                              int scale_d) {
  if constexpr (kBf16) {
    DTF_WGMMA_SS_N128("bf16");
  } else {
    DTF_WGMMA_SS_N128("f16");
  }
}

// D[64xN] += A[64x16] B[16xN], A from registers, B MN-major in shared memory (imm-trans-b = 1).
#define DTF_WGMMA_RS_N64(TY)                                                                     \
  asm volatile(                                                                                  \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"                                               \
      "wgmma.mma_async.sync.aligned.m64n64k16.f32." TY "." TY " " DTF_REGS32                     \
      ", {%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n"                                            \
      : DTF_ACC32(d)                                                                             \
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(scale_d))
#define DTF_WGMMA_RS_N128(TY)                                                                    \
  asm volatile(                                                                                  \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"                                               \
      "wgmma.mma_async.sync.aligned.m64n128k16.f32." TY "." TY " " DTF_REGS64                    \
      ", {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"                                            \
      : DTF_ACC64(d)                                                                             \
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(scale_d))

template <bool kBf16, int kN>
__device__ __forceinline__ void wgmma_rs(float (&d)[kN / 2], const std::uint32_t (&a)[4], std::uint64_t desc_b,
                                         int scale_d) {
  static_assert(kN == 64 || kN == 128, "P V supports head dims 64 and 128");
  if constexpr (kN == 64) {
    if constexpr (kBf16) {
      DTF_WGMMA_RS_N64("bf16");
    } else {
      DTF_WGMMA_RS_N64("f16");
    }
  } else {
    if constexpr (kBf16) {
      DTF_WGMMA_RS_N128("bf16");
    } else {
      DTF_WGMMA_RS_N128("f16");
    }
  }
}

#undef DTF_WGMMA_SS_N128
#undef DTF_WGMMA_RS_N64
#undef DTF_WGMMA_RS_N128
#undef DTF_REGS32
#undef DTF_REGS64
#undef DTF_ACC8
#undef DTF_ACC32
#undef DTF_ACC64

// S[64 x kBN] = Q[64 x kDh] K[kBN x kDh]^T: kDh/16 k-steps through the column blocks of both tiles.
template <bool kBf16, int kDh>
__device__ __forceinline__ void gemm_qk(float (&s)[64], std::uint32_t q_addr, std::uint32_t k_addr) {
#pragma unroll
  for (int k = 0; k < kDh / 16; ++k) {
    const std::uint32_t q_off = (k / 4) * (kBM * kRowBytes) + (k % 4) * 32;
    const std::uint32_t k_off = (k / 4) * (kBN * kRowBytes) + (k % 4) * 32;
    wgmma_ss_n128<kBf16>(s, desc_k_major(q_addr + q_off), desc_k_major(k_addr + k_off), k > 0 ? 1 : 0);
  }
}

// O[64 x kDh] += P[64 x kBN] V[kBN x kDh]: kBN/16 k-steps of 16 keys (16 rows = 2048 bytes of each column block).
template <bool kBf16, int kDh>
__device__ __forceinline__ void gemm_pv(float (&o)[kDh / 2], const std::uint32_t (&p)[kBN / 16][4],
                                        std::uint32_t v_addr) {
#pragma unroll
  for (int k = 0; k < kBN / 16; ++k) {
    wgmma_rs<kBf16, kDh>(o, p[k], desc_mn_major(v_addr + k * 16 * kRowBytes, kBN * kRowBytes), 1);
  }
}

// ---- softmax ----------------------------------------------------------------------------------------------------

// Folds one S tile into the running row maxima m (log2 units) and turns it into P = exp2(scale_log2 * S - m) in
// place. The thread holds rows row0 and row0 + 8 (accumulator elements with (i/2)%2 = 0 and 1); the 4 threads of a
// quad share those rows, so maxima are combined with two xor-shuffles. Returns the per-row rescale exp2(m_old -
// m_new) of the earlier O and l, and the thread's partial row sums of P. Rows that see no key yet keep m = -inf and
// produce P = 0 (the exponent base is then 0, never -inf - -inf).
// kPositiveScale: the maximum is taken on raw scores (exact: scaling by a positive number preserves the order and
// rounds monotonically) and the scale folds into one FFMA per element; otherwise S is scaled first.
template <bool kCausal, bool kPositiveScale>
__device__ __forceinline__ void softmax_tile(float (&s)[64], float (&m)[2], float (&alpha)[2], float (&sum)[2],
                                             float scale_log2, bool masked, int key0, int kv_len, int row0) {
  if constexpr (!kPositiveScale) {
#pragma unroll
    for (int i = 0; i < 64; ++i) s[i] *= scale_log2;
  }
  if (masked) {
    const int col0 = key0 + 2 * (threadIdx.x & 3);
#pragma unroll
    for (int i = 0; i < 64; ++i) {
      const int key = col0 + 8 * (i / 4) + (i % 2);
      const int row = row0 + 8 * ((i / 2) % 2);
      if (key >= kv_len || (kCausal && key > row)) s[i] = -INFINITY;
    }
  }
  float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
  for (int i = 0; i < 64; ++i) mx[(i / 2) % 2] = fmaxf(mx[(i / 2) % 2], s[i]);
  float base[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
    mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
    if constexpr (kPositiveScale) mx[r] *= scale_log2;
    mx[r] = fmaxf(mx[r], m[r]);
    base[r] = mx[r] == -INFINITY ? 0.f : mx[r];
    alpha[r] = fast_exp2(m[r] - base[r]);
    m[r] = mx[r];
    sum[r] = 0.f;
  }
#pragma unroll
  for (int i = 0; i < 64; ++i) {
    s[i] = fast_exp2(kPositiveScale ? fmaf(s[i], scale_log2, -base[(i / 2) % 2]) : s[i] - base[(i / 2) % 2]);
    sum[(i / 2) % 2] += s[i];
  }
}

template <bool kCausal>
__device__ __forceinline__ void softmax(float (&s)[64], float (&m)[2], float (&alpha)[2], float (&sum)[2],
                                        float scale_log2, bool masked, int key0, int kv_len, int row0) {
  if (scale_log2 > 0.f) {
    softmax_tile<kCausal, true>(s, m, alpha, sum, scale_log2, masked, key0, kv_len, row0);
  } else {  // scale <= 0 (degenerate, but part of the contract): scale first, so the maximum is of scaled scores
    softmax_tile<kCausal, false>(s, m, alpha, sum, scale_log2, masked, key0, kv_len, row0);
  }
}

// P (fp32, accumulator layout) -> the A fragments of the kBN/16 k-steps of P V.
template <bool kBf16>
__device__ __forceinline__ void convert_p(const float (&s)[64], std::uint32_t (&p)[kBN / 16][4]) {
#pragma unroll
  for (int k = 0; k < kBN / 16; ++k) {
#pragma unroll
    for (int j = 0; j < 4; ++j) p[k][j] = pack2<Element<kBf16>>(s[8 * k + 2 * j], s[8 * k + 2 * j + 1]);
  }
}

// ---- the two roles ----------------------------------------------------------------------------------------------

template <int kDh>
struct Bars {
  std::uint32_t base;
  __device__ std::uint32_t q_full() const { return base; }
  __device__ std::uint32_t k_full(int s) const { return base + 8 * (1 + s); }
  __device__ std::uint32_t v_full(int s) const { return base + 8 * (1 + Smem<kDh>::kStages + s); }
  __device__ std::uint32_t empty(int s) const { return base + 8 * (1 + 2 * Smem<kDh>::kStages + s); }
};

// Key tile `it` of the loop (tiles run from the last one down) uses stage it % kStages, on its (it / kStages)-th
// turn: phase parity (it / kStages) & 1 for the full barriers, the opposite parity for the empty barrier.
template <int kDh>
__device__ __forceinline__ void produce(const CUtensorMap* tmap_q, const CUtensorMap* tmap_k,
                                        const CUtensorMap* tmap_v, std::uint32_t sbase, Bars<kDh> bars, int m0,
                                        int h, int b, int n_blocks) {
  using S = Smem<kDh>;
  tma_prefetch_map(tmap_q);
  tma_prefetch_map(tmap_k);
  tma_prefetch_map(tmap_v);
  mbar_arrive_expect_tx(bars.q_full(), S::kQBytes);
#pragma unroll
  for (int c = 0; c < S::kColBlocks; ++c) {
    tma_load_4d(sbase + S::kQ + c * kBM * kRowBytes, tmap_q, bars.q_full(), c * kBlockCols, m0, h, b);
  }
  for (int it = 0; it < n_blocks; ++it) {
    const int stage = it % S::kStages;
    const std::uint32_t phase = (it / S::kStages) & 1;
    const int key0 = (n_blocks - 1 - it) * kBN;
    mbar_wait_bounded(bars.empty(stage), phase ^ 1);
    mbar_arrive_expect_tx(bars.k_full(stage), S::kTileBytes);
#pragma unroll
    for (int c = 0; c < S::kColBlocks; ++c) {
      tma_load_4d(sbase + S::kK + stage * S::kTileBytes + c * kBN * kRowBytes, tmap_k, bars.k_full(stage),
                  c * kBlockCols, key0, h, b);
    }
    mbar_arrive_expect_tx(bars.v_full(stage), S::kTileBytes);
#pragma unroll
    for (int c = 0; c < S::kColBlocks; ++c) {
      tma_load_4d(sbase + S::kV + stage * S::kTileBytes + c * kBN * kRowBytes, tmap_v, bars.v_full(stage),
                  c * kBlockCols, key0, h, b);
    }
  }
  // Drain: wait until the consumers have freed the stages of the last kStages tiles (the release of tile `it`
  // completes phase it / kStages of its empty barrier). Nothing waits on this; it only bounds the consumers' last
  // waits (see mbar_wait_bounded).
  for (int it = n_blocks > S::kStages ? n_blocks - S::kStages : 0; it < n_blocks; ++it) {
    mbar_wait_bounded(bars.empty(it % S::kStages), (it / S::kStages) & 1);
  }
}

// With `lengths`, keys in [kv_len, Nk) are real memory that TMA loads (only keys >= Nk are zero-filled). Their
// probabilities are 0, but 0 * NaN = NaN in the tensor cores, so the V rows of those keys in the first tile of the
// loop (the only tile that holds any) are zeroed before any P V reads them. Both consumer warpgroups share the work
// and then meet at a named barrier; the writes are ordinary stores read next by wgmma (the async proxy), hence the
// proxy fence in every writing thread before the barrier.
template <int kDh>
__device__ __forceinline__ void zero_masked_v_rows(std::uint8_t* v_tile, int first_row) {
  constexpr int kChunksPerRow = Smem<kDh>::kColBlocks * (kRowBytes / 16);
  const int chunks = (kBN - first_row) * kChunksPerRow;
  for (int q = static_cast<int>(threadIdx.x) - 128; q < chunks; q += 256) {
    const int row = first_row + q / kChunksPerRow;
    const int c = q % kChunksPerRow;  // whole 128-byte rows are zeroed, so the swizzle does not matter
    *reinterpret_cast<uint4*>(v_tile + (c / 8) * kBN * kRowBytes + row * kRowBytes + (c % 8) * 16) =
        make_uint4(0, 0, 0, 0);
  }
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
  named_barrier_sync(kBarConsumers, 256);
}

// Frees a K/V stage once this warp's P V of it has completed.
__device__ __forceinline__ void release_stage(std::uint32_t bar) {
  __syncwarp();
  if ((threadIdx.x & 31) == 0) mbar_arrive(bar);
}

template <typename T, int kDh, bool kCausal>
__device__ __forceinline__ void consume(std::uint8_t* smem, std::uint32_t sbase, Bars<kDh> bars, const Args& args,
                                        int m0, int h, int b, int kv_len, int n_blocks) {
  using S = Smem<kDh>;
  constexpr bool kBf16 = std::is_same_v<T, __nv_bfloat16>;
  const int cw = static_cast<int>(threadIdx.x) / 128 - 1;  // consumer warpgroup 0 or 1
  const int warp = (threadIdx.x / 32) % 4;
  const int lane = threadIdx.x % 32;
  const int m0w = m0 + 64 * cw;                      // first query row of this warpgroup
  const int row0 = m0w + 16 * warp + lane / 4;       // this thread's rows: row0 and row0 + 8
  const std::uint32_t q_addr = sbase + S::kQ + cw * 64 * kRowBytes;
  // Keys [kv_len, min(Nk, tile end)) of the loop's first tile (the last key tile, stage 0) are loaded but masked.
  const int last_key0 = (n_blocks - 1) * kBN;
  const bool zero_v = n_blocks > 0 && args.lengths != nullptr && kv_len < args.seq_k && kv_len < last_key0 + kBN;

  if (m0w >= args.seq_q) {
    // No valid row (the tail of the last query tile): keep pace with the ring, freeing each stage once it is full.
    for (int it = 0; it < n_blocks; ++it) {
      mbar_wait(bars.v_full(it % S::kStages), (it / S::kStages) & 1);
      if (it == 0 && zero_v) zero_masked_v_rows<kDh>(smem + S::kV, kv_len - last_key0);
      release_stage(bars.empty(it % S::kStages));
    }
    return;
  }

  float o[kDh / 2];
  float s[64];
  std::uint32_t p[kBN / 16][4];
#pragma unroll
  for (int i = 0; i < kDh / 2; ++i) o[i] = 0.f;
#pragma unroll
  for (int i = 0; i < 64; ++i) s[i] = 0.f;
  float m[2] = {-INFINITY, -INFINITY};
  float l[2] = {0.f, 0.f};  // partial row sums of this thread's columns; reduced over the quad at the end

  if (n_blocks > 0) {
    // Tile 0: S, softmax, P.
    {
      const int key0 = last_key0;
      if (zero_v) {
        mbar_wait(bars.v_full(0), 0);
        zero_masked_v_rows<kDh>(smem + S::kV, kv_len - last_key0);
      }
      mbar_wait(bars.q_full(), 0);
      mbar_wait(bars.k_full(0), 0);
      fence_regs(s);
      wgmma_fence();
      gemm_qk<kBf16, kDh>(s, q_addr, sbase + S::kK);
      wgmma_commit();
      wgmma_wait<0>();
      fence_regs(s);
      const bool masked = key0 + kBN > kv_len || (kCausal && key0 + kBN - 1 > m0w);
      float alpha[2];
      softmax<kCausal>(s, m, alpha, l, args.scale_log2, masked, key0, kv_len, row0);
      convert_p<kBf16>(s, p);
    }
    // Tile it: issue S_it = Q K_it^T, then O += P_{it-1} V_{it-1}; the softmax of S_it runs while P V is in flight.
    for (int it = 1; it < n_blocks; ++it) {
      const int stage = it % S::kStages;
      const int prev = (it - 1) % S::kStages;
      const int key0 = (n_blocks - 1 - it) * kBN;
      mbar_wait(bars.k_full(stage), (it / S::kStages) & 1);
      // V_{it-1} landed with (or soon after) K_{it-1}; waiting here keeps the two GEMMs back to back, with no
      // branch between the wgmma.fence and the P V issue.
      mbar_wait(bars.v_full(prev), ((it - 1) / S::kStages) & 1);
      fence_regs(s);
      fence_regs(o);
      fence_regs(p);
      wgmma_fence();
      gemm_qk<kBf16, kDh>(s, q_addr, sbase + S::kK + stage * S::kTileBytes);
      wgmma_commit();
      gemm_pv<kBf16, kDh>(o, p, sbase + S::kV + prev * S::kTileBytes);
      wgmma_commit();
      wgmma_wait<1>();  // S_it done (groups complete in order); P V may still run
      fence_regs(s);
      const bool masked = key0 + kBN > kv_len || (kCausal && key0 + kBN - 1 > m0w);
      float alpha[2], sum[2];
      softmax<kCausal>(s, m, alpha, sum, args.scale_log2, masked, key0, kv_len, row0);
      wgmma_wait<0>();
      fence_regs(o);
      fence_regs(p);
      release_stage(bars.empty(prev));
#pragma unroll
      for (int i = 0; i < kDh / 2; ++i) o[i] *= alpha[(i / 2) % 2];
      l[0] = l[0] * alpha[0] + sum[0];
      l[1] = l[1] * alpha[1] + sum[1];
      convert_p<kBf16>(s, p);
    }
    // Last P V.
    const int last = (n_blocks - 1) % S::kStages;
    mbar_wait(bars.v_full(last), ((n_blocks - 1) / S::kStages) & 1);
    fence_regs(o);
    fence_regs(p);
    wgmma_fence();
    gemm_pv<kBf16, kDh>(o, p, sbase + S::kV + last * S::kTileBytes);
    wgmma_commit();
    wgmma_wait<0>();
    fence_regs(o);
    fence_regs(p);
    release_stage(bars.empty(last));
  }

  // Epilogue. Full row sums, then lse = ln(sum_j exp(scale * s_j)) = (m + log2 l) * ln 2 in natural-log units.
  float inv[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
    inv[r] = l[r] > 0.f ? 1.f / l[r] : 0.f;  // l = 0 only for rows that see no key: o = 0, lse = -inf
    const int row = row0 + 8 * r;
    if ((lane & 3) == 0 && row < args.seq_q) {
      const std::int64_t bh = static_cast<std::int64_t>(b) * args.heads + h;
      args.lse[bh * args.seq_q + row] = l[r] > 0.f ? (m[r] + log2f(l[r])) * kLn2 : -INFINITY;
    }
  }

  // O / l goes through this warpgroup's own Q rows (no longer read: every wgmma has completed, and the barrier below
  // waits for the warpgroup's other warps), in the same swizzled layout so that both the 4-byte fragment writes and
  // the 16-byte row reads below are free of bank conflicts; then 16-byte stores of whole rows to global memory.
  std::uint8_t* stage_o = smem + S::kQ + cw * 64 * kRowBytes;
  named_barrier_sync(1 + cw, 128);
#pragma unroll
  for (int i = 0; i < kDh / 2; i += 2) {
    const int r = 16 * warp + lane / 4 + 8 * ((i / 2) % 2);  // row within the warpgroup's 64
    const int col = 8 * (i / 4) + 2 * (lane & 3);
    const int chunk = ((col % kBlockCols) / 8) ^ (r % 8);
    const int offset = (col / kBlockCols) * kBM * kRowBytes + r * kRowBytes + chunk * 16 + (col % 8) * 2;
    const float scale = inv[(i / 2) % 2];
    *reinterpret_cast<std::uint32_t*>(stage_o + offset) = pack2<Element<kBf16>>(o[i] * scale, o[i + 1] * scale);
  }
  named_barrier_sync(1 + cw, 128);
  constexpr int kChunksPerRow = kDh / 8;  // 16-byte chunks
  T* out = static_cast<T*>(args.o);
  for (int q = threadIdx.x % 128; q < 64 * kChunksPerRow; q += 128) {
    const int r = q / kChunksPerRow;
    const int ch = q % kChunksPerRow;
    const int row = m0w + r;
    if (row >= args.seq_q) break;  // rows only grow with q
    const int offset = (ch / 8) * kBM * kRowBytes + r * kRowBytes + ((ch % 8) ^ (r % 8)) * 16;
    const std::int64_t dst = static_cast<std::int64_t>(b) * args.o_stride_b +
                             static_cast<std::int64_t>(row) * args.o_stride_n +
                             static_cast<std::int64_t>(h) * args.o_stride_h + ch * 8;
    *reinterpret_cast<uint4*>(out + dst) = *reinterpret_cast<const uint4*>(stage_o + offset);
  }
}

#endif  // DTF_SM90_DEVICE

template <typename T, int kDh, bool kCausal>
__global__ void __launch_bounds__(kThreads, 1)
    attention_fwd_sm90_kernel(const __grid_constant__ CUtensorMap tmap_q, const __grid_constant__ CUtensorMap tmap_k,
                              const __grid_constant__ CUtensorMap tmap_v, const Args args) {
#if DTF_SM90_DEVICE
  using S = Smem<kDh>;
  extern __shared__ std::uint8_t smem_raw[];
  // TMA 128B swizzle and the wgmma descriptors assume 1024-byte aligned tiles. The base is aligned by offsetting
  // smem_raw itself (not through an integer cast), so the compiler keeps it in the shared window: the V zeroing and
  // the epilogue's staging then use STS/LDS, not generic ST/LD.
  std::uint8_t* smem = smem_raw + ((kAtomBytes - (smem_u32(smem_raw) & (kAtomBytes - 1))) & (kAtomBytes - 1));
  const std::uint32_t sbase = smem_u32(smem);
  const Bars<kDh> bars{sbase + S::kBars};

  // Grid: (batch * heads * query tiles), the tiles of one (batch, head) adjacent so that they share K/V in L2.
  // Causal: within a (batch, head) the longest query tiles (most keys) start first.
  const int tile = static_cast<int>(blockIdx.x % static_cast<unsigned>(args.m_blocks));
  const int bh = static_cast<int>(blockIdx.x / static_cast<unsigned>(args.m_blocks));
  const int m_block = kCausal ? args.m_blocks - 1 - tile : tile;
  const int h = bh % args.heads;
  const int b = bh / args.heads;
  const int m0 = m_block * kBM;
  int kv_len = args.seq_k;
  if (args.lengths != nullptr) kv_len = min(kv_len, max(__ldg(args.lengths + b), 0));
  const int n_end = kCausal ? min(kv_len, m0 + kBM) : kv_len;  // keys any row of this tile can see
  const int n_blocks = n_end > 0 ? (n_end + kBN - 1) / kBN : 0;

  if (threadIdx.x == 0) {
    mbar_init(bars.q_full(), 1);
#pragma unroll
    for (int s = 0; s < S::kStages; ++s) {
      mbar_init(bars.k_full(s), 1);
      mbar_init(bars.v_full(s), 1);
      mbar_init(bars.empty(s), kConsumerWarps);
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();

  if (threadIdx.x < 128) {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" ::"n"(kProducerRegs));
    if (threadIdx.x == 0 && n_blocks > 0) produce<kDh>(&tmap_q, &tmap_k, &tmap_v, sbase, bars, m0, h, b, n_blocks);
  } else {
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" ::"n"(kConsumerRegs));
    consume<T, kDh, kCausal>(smem, sbase, bars, args, m0, h, b, kv_len, n_blocks);
  }
#else
  __trap();  // this module's sm_80 (or other non-sm_90a) code: forward_sm90 never launches it there
#endif
}

// ---- host -----------------------------------------------------------------------------------------------------------

// True when a comma-separated CMake architecture list ("80,90a", "90a-real") has an sm_90a entry.
constexpr bool archs_have_sm90a(const char* archs) {
  const char* t = archs;
  while (true) {
    while (*t == ' ') ++t;
    if (t[0] == '9' && t[1] == '0' && t[2] == 'a' && (t[3] == ',' || t[3] == '-' || t[3] == ' ' || t[3] == '\0')) {
      return true;
    }
    while (*t != ',' && *t != '\0') ++t;
    if (*t == '\0') return false;
    ++t;
  }
}
static_assert(archs_have_sm90a("80,90a") && archs_have_sm90a("90a-real") && !archs_have_sm90a("80,90") &&
                  !archs_have_sm90a("80,100a") && !archs_have_sm90a(""),
              "archs_have_sm90a");

// cuTensorMapEncodeTiled through the runtime's driver entry point (the module links the static cudart, not libcuda).
PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  static const PFN_cuTensorMapEncodeTiled_v12000 encode = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult status = cudaDriverEntryPointSymbolNotFound;
#if CUDART_VERSION >= 12050
    DTF_CUDA_CHECK(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &status));
#else
    DTF_CUDA_CHECK(cudaGetDriverEntryPoint("cuTensorMapEncodeTiled", &fn, cudaEnableDefault, &status));
#endif
    if (status != cudaDriverEntryPointSuccess || fn == nullptr) {
      throw std::runtime_error("attention (sm90): the CUDA driver does not provide cuTensorMapEncodeTiled");
    }
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
  }();
  return encode;
}

// A [B, N, H, Dh] tensor as a 4-D TMA map (dims innermost first: Dh, N, H, B) with boxes of 64 x `box_rows` x 1 x 1
// and 128B swizzle. TMA needs a 16-byte aligned base and byte strides that are positive multiples of 16 (the stride
// of a size-1 dim is never used, so any such value stands in for it).
CUtensorMap make_tensor_map(const char* name, std::uintptr_t address, int dtype, std::int64_t head_dim,
                            std::int64_t seq, std::int64_t heads, std::int64_t batch, std::int64_t stride_n,
                            std::int64_t stride_h, std::int64_t stride_b, int box_rows) {
  void* base = as_ptr<void>(address, name, 16);
  const std::int64_t sizes[3] = {seq, heads, batch};
  const std::int64_t strides[3] = {stride_n, stride_h, stride_b};
  const char* dims[3] = {"token", "head", "batch"};
  cuuint64_t global_dim[4] = {static_cast<cuuint64_t>(head_dim), 0, 0, 0};
  cuuint64_t global_stride[3];
  for (int i = 0; i < 3; ++i) {
    global_dim[i + 1] = static_cast<cuuint64_t>(sizes[i]);
    const std::int64_t bytes = sizes[i] == 1 ? head_dim * 2 : strides[i] * 2;
    require(bytes > 0 && bytes % 16 == 0 && bytes < (std::int64_t{1} << 40), "attention (sm90): ", name, " ",
            dims[i], " stride (", strides[i], " elements) must be a positive multiple of 8 elements (16 bytes) for "
            "TMA; broadcast (stride 0) inputs need the sm80 path or a contiguous copy");
    global_stride[i] = static_cast<cuuint64_t>(bytes);
  }
  const cuuint32_t box[4] = {static_cast<cuuint32_t>(kBlockCols), static_cast<cuuint32_t>(box_rows), 1, 1};
  const cuuint32_t element_stride[4] = {1, 1, 1, 1};
  CUtensorMap map;
  const CUresult result = tensor_map_encoder()(
      &map, dtype == kBFloat16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16, 4, base,
      global_dim, global_stride, box, element_stride, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
      CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (result != CUDA_SUCCESS) {
    throw std::runtime_error(std::string("attention (sm90): cuTensorMapEncodeTiled failed for ") + name +
                             " (CUresult " + std::to_string(static_cast<int>(result)) + ") with shape [" +
                             std::to_string(batch) + ", " + std::to_string(seq) + ", " + std::to_string(heads) +
                             ", " + std::to_string(head_dim) + "], strides [" + std::to_string(stride_b) + ", " +
                             std::to_string(stride_n) + ", " + std::to_string(stride_h) + ", 1]");
  }
  return map;
}

template <typename T, int kDh, bool kCausal>
void launch(const FwdParams& p, cudaStream_t stream) {
  using S = Smem<kDh>;
  const std::int64_t m_blocks = ceil_div<std::int64_t>(p.seq_q, kBM);
  const std::int64_t ctas = m_blocks * p.batch * p.heads;
  require(ctas <= INT32_MAX, "attention (sm90): ", ctas, " CTAs (query tiles * batch * heads) exceed the grid limit");
  const CUtensorMap tmap_q = make_tensor_map("q", p.q, p.dtype, kDh, p.seq_q, p.heads, p.batch, p.q_stride_n,
                                             p.q_stride_h, p.q_stride_b, kBM);
  const CUtensorMap tmap_k = make_tensor_map("k", p.k, p.dtype, kDh, p.seq_k, p.heads, p.batch, p.k_stride_n,
                                             p.k_stride_h, p.k_stride_b, kBN);
  const CUtensorMap tmap_v = make_tensor_map("v", p.v, p.dtype, kDh, p.seq_k, p.heads, p.batch, p.v_stride_n,
                                             p.v_stride_h, p.v_stride_b, kBN);
  Args args;
  args.o = as_ptr<void>(p.o, "o", 16);
  args.lse = as_ptr<float>(p.lse, "lse");
  args.lengths = p.lengths != 0 ? as_ptr<const int>(p.lengths, "lengths") : nullptr;
  args.seq_q = static_cast<int>(p.seq_q);
  args.seq_k = static_cast<int>(p.seq_k);
  args.heads = static_cast<int>(p.heads);
  args.m_blocks = static_cast<int>(m_blocks);
  args.o_stride_b = p.o_stride_b;
  args.o_stride_n = p.o_stride_n;
  args.o_stride_h = p.o_stride_h;
  args.scale_log2 = p.scale * 1.4426950408889634f;

  auto kernel = attention_fwd_sm90_kernel<T, kDh, kCausal>;
  DTF_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, S::kBytes));
  kernel<<<static_cast<unsigned>(ctas), kThreads, S::kBytes, stream>>>(tmap_q, tmap_k, tmap_v, args);
  // forward() checks the launch and reports the shape.
}

template <typename T, int kDh>
void dispatch_causal(const FwdParams& p, cudaStream_t stream) {
  if (p.causal) {
    launch<T, kDh, true>(p, stream);
  } else {
    launch<T, kDh, false>(p, stream);
  }
}

template <typename T>
void dispatch_head_dim(const FwdParams& p, cudaStream_t stream) {
  if (p.head_dim == 64) {
    dispatch_causal<T, 64>(p, stream);
  } else {
    dispatch_causal<T, 128>(p, stream);
  }
}

}  // namespace

bool sm90_compiled() {
#ifdef DINOTXT_FAST_CUDA_ARCHS
  return archs_have_sm90a(DINOTXT_FAST_CUDA_ARCHS);
#else
  return false;
#endif
}

void forward_sm90(const FwdParams& p, std::uintptr_t stream) {
  if (!sm90_compiled()) {
    throw std::runtime_error("attention (sm90): this module was built without sm_90a code (DINOTXT_FAST_CUDA_ARCHS)");
  }
  // forward() validated the parameters (dtype, head dim, sizes, 16-byte aligned bases and strides of o) and the
  // device; what is left here is specific to this path (TMA strides, the grid size).
  require(p.dtype == kFloat16 || p.dtype == kBFloat16, "attention (sm90): dtype code ", p.dtype,
          " is neither float16 nor bfloat16");
  require(p.head_dim == 64 || p.head_dim == 128, "attention (sm90): head_dim must be 64 or 128, got ", p.head_dim);
  require(p.seq_q <= INT32_MAX - kBM && p.seq_k <= INT32_MAX - kBN,
          "attention (sm90): sequence lengths too long for int32 tile coordinates: Nq=", p.seq_q, " Nk=", p.seq_k);
  const cudaStream_t s = as_stream(stream);
  if (p.dtype == kBFloat16) {
    dispatch_head_dim<__nv_bfloat16>(p, s);
  } else {
    dispatch_head_dim<__half>(p, s);
  }
}

}  // namespace attention
}  // namespace dinotxt_fast
