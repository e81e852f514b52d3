// Fused attention forward for sm_80+ (FlashAttention-2 algorithm on mma.sync tensor cores). The contract is in
// attention.h; forward() validates the parameters before calling forward_sm80().
//
// One CTA per (query block of kBlockM rows, b * h). Each warp owns 16 query rows (one m16 tile) and, for every key
// tile of kBlockN keys, computes its 16 x kBlockN scores with mma.m16n8k16, updates the online softmax in fp32 (base 2:
// scores are pre-multiplied by scale * log2(e)) and accumulates P V with P kept in registers.
//
// Pipeline (K and V double-buffered in shared memory, cp.async groups committed in the order Q, K0, V0, K1, V1, ...):
//   iteration t: wait K_t; barrier; issue K_{t+1}, V_{t+1} into the other stage; S = Q K_t^T; softmax;
//                wait V_t; barrier; O += P V_t.
// The first barrier also guarantees that every warp has finished tile t-1, whose stage the new loads overwrite.
//
// Shared memory rows are Dh * 2 bytes split into 16-byte chunks; chunk c of row r is stored at chunk position
// c ^ (r & 7) (XOR swizzle). The 8 row addresses of one ldmatrix 8x8 matrix always come from 8 consecutive rows, so
// they land in 8 different 16-byte bank groups: no bank conflicts, for cp.async writes, ldmatrix reads and the
// epilogue alike.
//
// Odd lengths: rows past the end (queries >= Nq, keys >= the visible key count) are zero-filled by cp.async's
// src-size operand (no global read), so the 5 extra tokens of N = 4101 cost one partially filled key tile whose
// missing keys are masked to -inf. Masks are only evaluated on the tiles that need them (the last partial tile, the
// causal diagonal); key tiles that no query of the block can see are never loaded. In the last query block, warps
// whose 16 rows all lie past Nq only help with the loads and barriers; so do warps whose rows precede every key of a
// causal diagonal tile.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "attention/attention.h"
#include "attention/fragment.cuh"
#include "common/check.h"
#include "common/launch.h"

namespace dinotxt_fast {
namespace attention {
namespace {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kNegInf = -__builtin_huge_valf();

// Tile shapes per head dim (not tuned on a GPU yet). Dh = 64: 128 queries x 64 keys, 8 warps, 48 KB of shared
// memory, <= 128 registers so that two CTAs share an SM. Dh = 128: 64 queries x 64 keys, 4 warps (the fp32 output
// tile alone takes 64 registers per thread), 80 KB of shared memory: two CTAs per SM on A100 / H100 (one on sm_86/89,
// whose SMs have 100 KB).
template <int kHeadDim>
struct Tiles;
template <>
struct Tiles<64> {
  static constexpr int kWarps = 8, kBlockN = 64, kMinBlocksPerSm = 2;
};
template <>
struct Tiles<128> {
  static constexpr int kWarps = 4, kBlockN = 64, kMinBlocksPerSm = 2;
};

template <int kHeadDim>
struct Config {
  static constexpr int kWarps = Tiles<kHeadDim>::kWarps;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kBlockM = kWarps * 16;  // one m16 tile per warp
  static constexpr int kBlockN = Tiles<kHeadDim>::kBlockN;
  static constexpr int kMinBlocksPerSm = Tiles<kHeadDim>::kMinBlocksPerSm;
  static constexpr int kChunks = kHeadDim / 8;  // 16-byte chunks per row
  static constexpr int kRowBytes = kHeadDim * 2;
  static constexpr int kQBytes = kBlockM * kRowBytes;
  static constexpr int kKvBytes = kBlockN * kRowBytes;  // one stage of K or V
  // [Q][K stage 0][K stage 1][V stage 0][V stage 1]; the epilogue reuses each warp's own Q rows to stage O.
  static constexpr int kSmemBytes = kQBytes + 4 * kKvBytes;
  static_assert(kHeadDim % 64 == 0 && kBlockN % 16 == 0, "mma tiling");
  static_assert((kBlockM * kChunks) % kThreads == 0 && (kBlockN * kChunks) % kThreads == 0, "copy tiling");
  static_assert((16 * kChunks) % 32 == 0, "epilogue tiling");
};

struct KernelArgs {
  const void* q;
  const void* k;
  const void* v;
  void* o;
  float* lse;
  const int* lengths;  // nullptr: every key is visible
  std::int64_t q_sb, q_sn, q_sh, k_sb, k_sn, k_sh, v_sb, v_sn, v_sh, o_sb, o_sn, o_sh;  // in elements
  int heads, seq_q, seq_k, batch_heads;
  float scale_log2;  // scale * log2(e)
};

// ------------------------------------------------------------------------------------------- PTX wrappers
__device__ __forceinline__ std::uint32_t smem_address(const void* p) {
  return static_cast<std::uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global -> shared copy; src_bytes = 0 reads nothing and writes 16 zero bytes.
__device__ __forceinline__ void cp_async_16(std::uint32_t dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
// Waits until at most kPending of this thread's committed groups are still in flight.
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

// Four 8x8 b16 matrices; lanes 8i..8i+7 give the row addresses of matrix i, and register i receives matrix i:
// lane l holds its row l / 4, columns 2 (l % 4) and 2 (l % 4) + 1 (lower column in the low half).
__device__ __forceinline__ void ldmatrix_x4(std::uint32_t (&r)[4], std::uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");  // orders it against the epilogue's plain stores to the same rows
}
// Same with each matrix transposed: lane l holds rows 2 (l % 4) and 2 (l % 4) + 1 of column l / 4.
__device__ __forceinline__ void ldmatrix_x4_trans(std::uint32_t (&r)[4], std::uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
}

// D (16x8 fp32) += A (16x16) B (16x8). With g = lane / 4 and t = lane % 4 (PTX ISA, mma.m16n8k16 fragments):
//   A: a[0] = (row g, cols 2t, 2t+1), a[1] = (row g+8, cols 2t, 2t+1), a[2] = (row g, cols 2t+8, 2t+9),
//      a[3] = (row g+8, cols 2t+8, 2t+9);
//   B: b[0] = (rows 2t, 2t+1, col g), b[1] = (rows 2t+8, 2t+9, col g);
//   C/D: d[0], d[1] = (row g, cols 2t, 2t+1), d[2], d[3] = (row g+8, cols 2t, 2t+1).
template <typename T>
__device__ __forceinline__ void mma_16x8x16(float (&d)[4], const std::uint32_t (&a)[4], std::uint32_t b0,
                                            std::uint32_t b1);
template <>
__device__ __forceinline__ void mma_16x8x16<__half>(float (&d)[4], const std::uint32_t (&a)[4], std::uint32_t b0,
                                                    std::uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma_16x8x16<__nv_bfloat16>(float (&d)[4], const std::uint32_t (&a)[4],
                                                           std::uint32_t b0, std::uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Byte offset of 16-byte chunk `chunk` of row `row` in a swizzled tile (see the file comment).
template <int kHeadDim>
__device__ __forceinline__ std::uint32_t swizzle(int row, int chunk) {
  return static_cast<std::uint32_t>(row * Config<kHeadDim>::kRowBytes + ((chunk ^ (row & 7)) << 4));
}

// Starts copying rows [row0, row0 + kRows) of a [rows, Dh] slab with row stride `stride_n` into a swizzled tile.
// Thread `tid` copies chunk tid % kChunks of rows tid / kChunks + i * kRowStep: consecutive threads read
// consecutive 16 bytes of a row, and since kRowStep is a multiple of 8 the swizzled chunk is the same for all i
// (the shared address advances by a constant). Rows >= n_valid are zero-filled without reading global memory
// (their source address is row 0 of the slab, which exists: callers only load when n_valid >= 1).
template <typename T, int kHeadDim, int kRows>
__device__ __forceinline__ void load_tile(std::uint32_t dst, const T* src, std::int64_t stride_n, int row0,
                                          int n_valid, int tid) {
  using C = Config<kHeadDim>;
  constexpr int kRowStep = C::kThreads / C::kChunks;
  static_assert(C::kThreads % C::kChunks == 0 && kRowStep % 8 == 0, "copy tiling");
  const int r = tid / C::kChunks, c = tid % C::kChunks;
  const std::uint32_t d = dst + swizzle<kHeadDim>(r, c);
  const T* fallback = src + c * 8;
  const T* p = fallback + static_cast<std::int64_t>(row0 + r) * stride_n;
  const std::int64_t step = static_cast<std::int64_t>(kRowStep) * stride_n;
#pragma unroll
  for (int i = 0; i < kRows / kRowStep; ++i) {
    const bool valid = row0 + r + i * kRowStep < n_valid;
    cp_async_16(d + i * kRowStep * C::kRowBytes, valid ? p : fallback, valid ? 16 : 0);
    p += step;
  }
}

// Per-CTA state of the key loop.
template <typename T, int kHeadDim>
struct KeyLoop {
  const T* k;
  const T* v;
  std::int64_t k_sn, v_sn;
  std::uint32_t k_smem, v_smem;  // stage 0; stage s is at + s * kKvBytes
  int kv_len;                    // visible keys: min(Nk, lengths[b])
  int n_tiles;                   // key tiles to process
  int row0;                      // first query row of this warp (absolute)
  int tid, lane;
  bool active;                   // this warp holds at least one query row < Nq
  float scale_log2;
};

// One key tile: S = Q K^T, masks (kMask), online softmax, O += P V. Every thread calls it (loads and barriers);
// warps without valid rows, or whose rows see no key of a causal tile, skip the arithmetic.
template <typename T, int kHeadDim, bool kCausal, bool kMask>
__device__ __forceinline__ void key_tile(const KeyLoop<T, kHeadDim>& s, int t,
                                         const std::uint32_t (&qf)[kHeadDim / 16][4],
                                         float (&acc)[kHeadDim / 8][4], float (&m)[2], float (&l)[2]) {
  using C = Config<kHeadDim>;
  constexpr int kN = C::kBlockN;
  const int stage = t & 1, n0 = t * kN;
  const std::uint32_t k_tile = s.k_smem + stage * C::kKvBytes;
  const std::uint32_t v_tile = s.v_smem + stage * C::kKvBytes;

  cp_async_wait<1>();  // K_t has landed (V_t may still be in flight)
  __syncthreads();     // ... for every thread's copies; and every warp is done with tile t - 1
  if (t + 1 < s.n_tiles) {
    load_tile<T, kHeadDim, kN>(s.k_smem + (stage ^ 1) * C::kKvBytes, s.k, s.k_sn, n0 + kN, s.kv_len, s.tid);
  }
  cp_async_commit();
  if (t + 1 < s.n_tiles) {
    load_tile<T, kHeadDim, kN>(s.v_smem + (stage ^ 1) * C::kKvBytes, s.v, s.v_sn, n0 + kN, s.kv_len, s.tid);
  }
  cp_async_commit();  // (empty groups on the last tile keep the wait counts uniform)

  // Causal: a warp whose last row precedes the tile's first key sees nothing in it.
  const bool work = s.active && !(kCausal && kMask && n0 > s.row0 + 15);
  const int g = s.lane >> 2, tq = s.lane & 3;
  // p: the tile's probabilities as A fragments of P V (16 rows x kN keys -> kN / 16 k-steps of 4 registers).
  std::uint32_t p[kN / 16][4];
  if (work) {
    float sc[kN / 8][4];
#pragma unroll
    for (int j = 0; j < kN / 8; ++j) sc[j][0] = sc[j][1] = sc[j][2] = sc[j][3] = 0.f;
#pragma unroll
    for (int ks = 0; ks < kHeadDim / 16; ++ks) {
#pragma unroll
      for (int np = 0; np < kN / 16; ++np) {
        // K rows are keys (the mma's n), columns are Dh (its k): a non-transposed 8x8 matrix is a B fragment.
        // Matrices: 0 = keys np*16 + 0..7 x Dh ks*16 + 0..7, 1 = same keys x Dh + 8..15, 2 / 3 = keys + 8..15.
        const int key = np * 16 + (s.lane & 7) + ((s.lane >> 4) << 3);
        const int chunk = ks * 2 + ((s.lane >> 3) & 1);
        std::uint32_t kf[4];
        ldmatrix_x4(kf, k_tile + swizzle<kHeadDim>(key, chunk));
        mma_16x8x16<T>(sc[2 * np], qf[ks], kf[0], kf[1]);
        mma_16x8x16<T>(sc[2 * np + 1], qf[ks], kf[2], kf[3]);
      }
    }
    // sc[j][e]: row row0 + g + 8 (e >> 1), key n0 + 8 j + 2 tq + (e & 1). Row r sees the keys below
    // limit[r] = min(kv_len, row + 1) (causal) or kv_len; compared as 8 j + (e & 1) < limit[r] - n0 - 2 tq.
    int limit[2];
    if constexpr (kMask) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        limit[r] = (kCausal ? min(s.kv_len, s.row0 + g + 8 * r + 1) : s.kv_len) - n0 - 2 * tq;
      }
    }
    float mx[2] = {m[0], m[1]};
#pragma unroll
    for (int j = 0; j < kN / 8; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float x = sc[j][e] * s.scale_log2;
        if constexpr (kMask) {
          if (8 * j + (e & 1) >= limit[e >> 1]) x = kNegInf;
        }
        sc[j][e] = x;
        mx[e >> 1] = fmaxf(mx[e >> 1], x);
      }
    }
    float alpha[2], base[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      // A row is spread over the 4 threads of a quad (same g).
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
      // A row that has seen no visible key yet keeps m = -inf; subtract 0 then, so exp2 gives 0, not NaN.
      base[r] = mx[r] == kNegInf ? 0.f : mx[r];
      alpha[r] = fast_exp2(m[r] - base[r]);
      m[r] = mx[r];
    }
    float rowsum[2] = {0.f, 0.f};
#pragma unroll
    for (int j = 0; j < kN / 8; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        sc[j][e] = fast_exp2(sc[j][e] - base[e >> 1]);
        rowsum[e >> 1] += sc[j][e];
      }
    }
    // l stays a per-thread partial sum (alpha is uniform over the quad); the epilogue adds the quad's partials.
    l[0] = l[0] * alpha[0] + rowsum[0];
    l[1] = l[1] * alpha[1] + rowsum[1];
#pragma unroll
    for (int j = 0; j < kHeadDim / 8; ++j) {
      acc[j][0] *= alpha[0];
      acc[j][1] *= alpha[0];
      acc[j][2] *= alpha[1];
      acc[j][3] *= alpha[1];
    }
    // C fragment -> A fragment: k-step kk of P V covers keys 16 kk .. 16 kk + 15 = score tiles 2 kk and 2 kk + 1;
    // a[0] = (row g, keys 2tq, 2tq+1) = sc[2kk][0..1], a[1] = (row g+8, same keys) = sc[2kk][2..3],
    // a[2] = (row g, keys 2tq+8, 2tq+9) = sc[2kk+1][0..1], a[3] = sc[2kk+1][2..3].
#pragma unroll
    for (int kk = 0; kk < kN / 16; ++kk) {
      p[kk][0] = pack2<T>(sc[2 * kk][0], sc[2 * kk][1]);
      p[kk][1] = pack2<T>(sc[2 * kk][2], sc[2 * kk][3]);
      p[kk][2] = pack2<T>(sc[2 * kk + 1][0], sc[2 * kk + 1][1]);
      p[kk][3] = pack2<T>(sc[2 * kk + 1][2], sc[2 * kk + 1][3]);
    }
  }

  cp_async_wait<2>();  // V_t has landed (K_{t+1}, V_{t+1} may be in flight)
  __syncthreads();
  if (work) {
#pragma unroll
    for (int kk = 0; kk < kN / 16; ++kk) {
#pragma unroll
      for (int dp = 0; dp < kHeadDim / 16; ++dp) {
        // V rows are keys (the mma's k), columns are Dh (its n): the transposed 8x8 matrix is a B fragment.
        // Matrices: 0 = keys kk*16 + 0..7 x Dh dp*16 + 0..7, 1 = keys + 8..15 (same Dh), 2 / 3 = Dh + 8..15.
        const int key = kk * 16 + (s.lane & 15);
        const int chunk = dp * 2 + (s.lane >> 4);
        std::uint32_t vf[4];
        ldmatrix_x4_trans(vf, v_tile + swizzle<kHeadDim>(key, chunk));
        mma_16x8x16<T>(acc[2 * dp], p[kk], vf[0], vf[1]);
        mma_16x8x16<T>(acc[2 * dp + 1], p[kk], vf[2], vf[3]);
      }
    }
  }
}

template <typename T, int kHeadDim, bool kCausal>
__global__ void __launch_bounds__(Config<kHeadDim>::kThreads, Config<kHeadDim>::kMinBlocksPerSm)
    attention_fwd_sm80_kernel(const KernelArgs a) {
  using C = Config<kHeadDim>;
  extern __shared__ __align__(128) unsigned char smem[];
  // B * H is folded over grid y and z (each limited to 65535); the last z slice may overhang.
  const std::int64_t bh64 = static_cast<std::int64_t>(blockIdx.z) * gridDim.y + blockIdx.y;
  if (bh64 >= a.batch_heads) return;
  const int bh = static_cast<int>(bh64);
  const int b = bh / a.heads, h = bh % a.heads;
  const int tid = static_cast<int>(threadIdx.x), warp = tid >> 5, lane = tid & 31;
  const int m0 = static_cast<int>(blockIdx.x) * C::kBlockM;

  int kv_len = a.seq_k;
  if (a.lengths != nullptr) kv_len = min(max(a.lengths[b], 0), a.seq_k);
  // Keys [0, kv_hi) are visible to some row of the block; keys [0, n_free * kBlockN) to all of them.
  const int kv_hi = kCausal ? min(kv_len, m0 + C::kBlockM) : kv_len;
  const int visible_to_all = kCausal ? min(kv_len, m0 + 1) : kv_len;
  const int n_tiles = (kv_hi + C::kBlockN - 1) / C::kBlockN;
  const int n_free = visible_to_all / C::kBlockN;

  const T* q = static_cast<const T*>(a.q) + b * a.q_sb + h * a.q_sh;
  KeyLoop<T, kHeadDim> s;
  s.k = static_cast<const T*>(a.k) + b * a.k_sb + h * a.k_sh;
  s.v = static_cast<const T*>(a.v) + b * a.v_sb + h * a.v_sh;
  s.k_sn = a.k_sn;
  s.v_sn = a.v_sn;
  const std::uint32_t q_smem = smem_address(smem);
  s.k_smem = q_smem + C::kQBytes;
  s.v_smem = s.k_smem + 2 * C::kKvBytes;
  s.kv_len = kv_len;
  s.n_tiles = n_tiles;
  s.row0 = m0 + warp * 16;
  s.tid = tid;
  s.lane = lane;
  s.active = s.row0 < a.seq_q;
  s.scale_log2 = a.scale_log2;

  float acc[kHeadDim / 8][4];
#pragma unroll
  for (int j = 0; j < kHeadDim / 8; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
  float m[2] = {kNegInf, kNegInf}, l[2] = {0.f, 0.f};

  if (n_tiles > 0) {  // else no key is visible: o = 0, lse = -inf, nothing to load
    load_tile<T, kHeadDim, C::kBlockM>(q_smem, q, a.q_sn, m0, a.seq_q, tid);
    cp_async_commit();
    load_tile<T, kHeadDim, C::kBlockN>(s.k_smem, s.k, s.k_sn, 0, kv_len, tid);
    cp_async_commit();
    load_tile<T, kHeadDim, C::kBlockN>(s.v_smem, s.v, s.v_sn, 0, kv_len, tid);
    cp_async_commit();
    cp_async_wait<2>();  // Q has landed
    __syncthreads();
    // Q stays in registers as A fragments: k-step ks covers Dh ks*16 .. ks*16 + 15 of the warp's 16 rows;
    // matrices 0..3 = (rows 0..7, cols 0..7), (rows 8..15, cols 0..7), (rows 0..7, cols 8..15), (rows 8..15, 8..15).
    std::uint32_t qf[kHeadDim / 16][4];
    if (s.active) {
#pragma unroll
      for (int ks = 0; ks < kHeadDim / 16; ++ks) {
        ldmatrix_x4(qf[ks], q_smem + swizzle<kHeadDim>(warp * 16 + (lane & 15), ks * 2 + (lane >> 4)));
      }
    }
    int t = 0;
    for (; t < n_free; ++t) key_tile<T, kHeadDim, kCausal, false>(s, t, qf, acc, m, l);
    for (; t < n_tiles; ++t) key_tile<T, kHeadDim, kCausal, true>(s, t, qf, acc, m, l);
    cp_async_wait<0>();
  }
  if (!s.active) return;

  // Epilogue. The quad's partial row sums -> l; o = acc / l; lse = (m + log2 l) ln 2 (natural log of the scaled
  // scores' sum of exponentials); a row without any visible key has l = 0: o = 0, lse = -inf.
  const int g = lane >> 2, tq = lane & 3;
  float inv[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
    inv[r] = l[r] > 0.f ? 1.f / l[r] : 0.f;
    const int row = s.row0 + g + 8 * r;
    if (tq == 0 && row < a.seq_q) {
      a.lse[static_cast<std::int64_t>(bh) * a.seq_q + row] = l[r] > 0.f ? (m[r] + log2f(l[r])) * kLn2 : kNegInf;
    }
  }
  // Stage the warp's 16 x Dh output tile in its own Q rows (only this warp ever read them), then write whole
  // 16-byte chunks of rows < Nq.
  unsigned char* o_smem = smem + warp * 16 * C::kRowBytes;
#pragma unroll
  for (int j = 0; j < kHeadDim / 8; ++j) {
    *reinterpret_cast<std::uint32_t*>(o_smem + swizzle<kHeadDim>(g, j) + tq * 4) =
        pack2<T>(acc[j][0] * inv[0], acc[j][1] * inv[0]);
    *reinterpret_cast<std::uint32_t*>(o_smem + swizzle<kHeadDim>(g + 8, j) + tq * 4) =
        pack2<T>(acc[j][2] * inv[1], acc[j][3] * inv[1]);
  }
  __syncwarp();
  T* o = static_cast<T*>(a.o) + b * a.o_sb + h * a.o_sh;
#pragma unroll
  for (int i = 0; i < 16 * C::kChunks / 32; ++i) {
    const int idx = lane + i * 32;
    const int r = idx / C::kChunks, c = idx % C::kChunks;
    const int row = s.row0 + r;
    if (row < a.seq_q) {
      *reinterpret_cast<uint4*>(o + static_cast<std::int64_t>(row) * a.o_sn + c * 8) =
          *reinterpret_cast<const uint4*>(o_smem + swizzle<kHeadDim>(r, c));
    }
  }
}

template <typename T, int kHeadDim, bool kCausal>
void launch(const KernelArgs& args, std::int64_t batch_heads, std::int64_t seq_q, cudaStream_t stream) {
  using C = Config<kHeadDim>;
  auto kernel = attention_fwd_sm80_kernel<T, kHeadDim, kCausal>;
  if (C::kSmemBytes > 48 * 1024) {
    DTF_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, C::kSmemBytes));
  }
  const std::int64_t grid_y = batch_heads < 65535 ? batch_heads : 65535;
  const dim3 grid(static_cast<unsigned>(ceil_div<std::int64_t>(seq_q, C::kBlockM)), static_cast<unsigned>(grid_y),
                  static_cast<unsigned>(ceil_div<std::int64_t>(batch_heads, grid_y)));
  kernel<<<grid, C::kThreads, C::kSmemBytes, stream>>>(args);
}

template <typename T, int kHeadDim>
void launch_causal(const FwdParams& p, const KernelArgs& args, cudaStream_t stream) {
  if (p.causal) {
    launch<T, kHeadDim, true>(args, p.batch * p.heads, p.seq_q, stream);
  } else {
    launch<T, kHeadDim, false>(args, p.batch * p.heads, p.seq_q, stream);
  }
}

template <typename T>
void launch_head_dim(const FwdParams& p, const KernelArgs& args, cudaStream_t stream) {
  if (p.head_dim == 64) {
    launch_causal<T, 64>(p, args, stream);
  } else {
    launch_causal<T, 128>(p, args, stream);
  }
}

}  // namespace

// Parameters were validated by forward(): dtype and head dim supported, sizes within int32 and grid limits,
// 16-byte aligned addresses and row strides. Launch errors are checked by the caller.
void forward_sm80(const FwdParams& p, std::uintptr_t stream) {
  KernelArgs args;
  args.q = reinterpret_cast<const void*>(p.q);
  args.k = reinterpret_cast<const void*>(p.k);
  args.v = reinterpret_cast<const void*>(p.v);
  args.o = reinterpret_cast<void*>(p.o);
  args.lse = reinterpret_cast<float*>(p.lse);
  args.lengths = p.lengths != 0 ? reinterpret_cast<const int*>(p.lengths) : nullptr;
  args.q_sb = p.q_stride_b, args.q_sn = p.q_stride_n, args.q_sh = p.q_stride_h;
  args.k_sb = p.k_stride_b, args.k_sn = p.k_stride_n, args.k_sh = p.k_stride_h;
  args.v_sb = p.v_stride_b, args.v_sn = p.v_stride_n, args.v_sh = p.v_stride_h;
  args.o_sb = p.o_stride_b, args.o_sn = p.o_stride_n, args.o_sh = p.o_stride_h;
  args.heads = static_cast<int>(p.heads);
  args.seq_q = static_cast<int>(p.seq_q);
  args.seq_k = static_cast<int>(p.seq_k);
  args.batch_heads = static_cast<int>(p.batch * p.heads);
  args.scale_log2 = p.scale * kLog2e;
  const cudaStream_t s = as_stream(stream);
  if (p.dtype == kFloat16) {
    launch_head_dim<__half>(p, args, s);
  } else {
    launch_head_dim<__nv_bfloat16>(p, args, s);
  }
}

}  // namespace attention
}  // namespace dinotxt_fast
