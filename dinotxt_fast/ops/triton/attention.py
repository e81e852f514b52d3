"""Fused attention in Triton: FlashAttention-2 forward and backward, tiled for DINO.txt's odd sequence lengths.

Inputs are [B, N, H, Dh] tensors with any strides (q, k, v may be views of one fused qkv projection: no copies).
Same contract as reference/attention.py's attention_forward / attention_backward: o [B, N, H, Dv] in q's dtype
(contiguous), lse [B, H, N] fp32 = the natural-log log-sum-exp of the scaled scores; a row that sees no key gets
o = 0, lse = -inf, zero gradients. `lengths` [B] (int32/int64) masks the keys at positions >= lengths[b]; their
blocks are skipped.

Tiling for odd N (261 = 256 + 5, 77, ...):
- query tiles: N // BLOCK_M full tiles without row masks, then the remainder in tiles of BLOCK_M_TAIL rows (the
  smallest power of two >= 16 that holds it), so the 5 prefix tokens of a ViT sequence cost a 16-row tile, not 128;
- key loop: full unmasked blocks of BLOCK_N, then blocks that need the causal mask, then the remainder in steps of
  BLOCK_N_TAIL with bounds masks;
- short sequences (N <= 128): configurations with small tiles that also loop over several (batch, head) pairs per
  program (PAIRS), so that B*H = 20480 text heads are not 20480 tiny programs.
- one grid axis of (tile, group of pairs) programs, the tiles of a group adjacent (they share its K/V in L2): B*H is
  not bounded by a grid axis' 65,535.
- the autotuning candidates depend on the operand width (fp32 runs IEEE products on the CUDA cores: its own small
  tiles), the padded head dim (64 or 128) and the sequence family; see _CANDIDATES and ops/triton/tuning.py (the
  fixed configuration of DINOTXT_FAST_AUTOTUNE=0 and deterministic mode).

Backward: a delta = rowsum(dO * O) pre-pass; one program per key block computes dK and dV; dQ comes either from a
separate pass over query blocks (deterministic: no atomics; used when torch.use_deterministic_algorithms(True)) or,
by default, from fp32 atomic adds (relaxed: they only accumulate) in the dK/dV pass (FlashAttention-2's choice:
fewer recomputed matmuls). Both passes are one kernel (`_bwd_kernel`, its DQ_PASS switch), autotuned separately.
Softmax runs in base 2 (exp2) on scores pre-multiplied by scale * log2(e); accumulation is fp32 everywhere.

Compiled for sm_90 and run under the CPU interpreter only: no configuration here has run on a GPU yet
(benchmarks/gpu_prove.sh is the first check; speed claims wait for benchmarks/gpu_suite.sh).
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from ..dispatch import add_kernels
from ..planning import LOG2E
from .tuning import autotune, autotune_enabled

_LOG2E = tl.constexpr(LOG2E)  # the kernels' softmax runs in base 2
MAX_HEAD_DIM = 128
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ----------------------------------------------------------------------------------------------- configurations
def _config(block_m, block_n, pairs, warps, stages):
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n, "PAIRS": pairs}, num_warps=warps,
                         num_stages=stages)


# A few hand-picked candidates per pass and problem class (each costs a compile of seconds while autotuning), keyed
# (operand bytes, padded head dim, sequence family); the first of each list is the fixed configuration
# (DINOTXT_FAST_AUTOTUNE=0, deterministic mode). Every candidate compiles for sm_90 at the real shapes within 227 KB
# of shared memory and, for fp16/bf16, without register spills, with Triton 3.6 and 3.9
# (benchmarks/results/codegen/). fp32 runs IEEE products on the CUDA cores, not tensor cores: its own small tiles,
# mostly 8 warps and one stage, the few that compile without spills (the 16-bit lists' tiles spill up to 134 KB in
# fp32 and need up to 393 KB of shared memory at Dh 128).
# Long sequences (ViT: 261, 1029, 4101): one (batch, head) pair per program, big tiles; short ones (text: <= 77;
# anything <= SHORT_N): small tiles, several (batch, head) pairs per program.
# Entries: (BLOCK_M, BLOCK_N, PAIRS, warps, stages).
SHORT_N = 128
_CANDIDATES = {
    "fwd": {
        (2, 64, "long"): ((128, 64, 1, 8, 3), (128, 64, 1, 4, 3), (128, 64, 1, 8, 4), (128, 128, 1, 8, 3),
                          (128, 32, 1, 4, 4), (64, 64, 1, 4, 3), (64, 64, 1, 4, 4), (64, 128, 1, 4, 2)),
        (2, 128, "long"): ((128, 64, 1, 8, 3), (128, 128, 1, 8, 3), (128, 32, 1, 4, 4), (64, 64, 1, 4, 3),
                           (64, 128, 1, 4, 2)),
        (2, 64, "short"): ((64, 64, 1, 4, 2), (16, 32, 4, 2, 2), (16, 64, 4, 2, 1), (32, 32, 2, 4, 2),
                           (32, 32, 4, 2, 1), (32, 64, 2, 4, 2), (64, 32, 1, 4, 2)),
        (2, 128, "short"): ((64, 64, 1, 4, 2), (16, 32, 4, 2, 2), (32, 32, 2, 4, 2), (64, 32, 1, 4, 2)),
        (4, 64, "long"): ((32, 32, 1, 4, 2), (64, 32, 1, 8, 1), (32, 32, 1, 4, 1)),
        (4, 128, "long"): ((32, 64, 1, 8, 1),),
        (4, 64, "short"): ((16, 32, 4, 2, 2), (32, 32, 1, 4, 1)),
        (4, 128, "short"): ((32, 64, 1, 8, 1),),
    },
    "bwd_kv": {
        (2, 64, "long"): ((64, 64, 1, 4, 2), (32, 64, 1, 4, 2), (32, 64, 1, 4, 3), (32, 128, 1, 8, 2),
                          (64, 64, 1, 8, 3), (64, 128, 1, 8, 2)),
        (2, 128, "long"): ((32, 64, 1, 8, 2), (64, 64, 1, 8, 2), (32, 128, 1, 8, 2)),
        (2, 64, "short"): ((32, 64, 1, 4, 2), (16, 32, 4, 2, 1), (32, 64, 2, 4, 1)),
        (2, 128, "short"): ((32, 64, 1, 8, 2), (32, 32, 1, 4, 2), (16, 64, 1, 4, 2)),
        (4, 64, "long"): ((32, 32, 1, 8, 1), (16, 32, 1, 4, 1), (32, 32, 1, 4, 1), (32, 16, 1, 4, 2)),
        (4, 128, "long"): ((16, 32, 1, 8, 2), (32, 16, 1, 4, 2)),
        (4, 64, "short"): ((16, 64, 1, 4, 2), (32, 32, 1, 8, 1), (16, 32, 1, 4, 1)),
        (4, 128, "short"): ((16, 32, 1, 8, 2),),
    },
    # The dQ pass runs only in deterministic mode, which always runs the fixed configuration: one entry each.
    "bwd_q": {
        (2, 64, "long"): ((64, 64, 1, 4, 2),),
        (2, 128, "long"): ((64, 64, 1, 4, 2),),
        (2, 64, "short"): ((64, 64, 1, 4, 2),),
        (2, 128, "short"): ((64, 64, 1, 4, 2),),
        (4, 64, "long"): ((32, 32, 1, 4, 2),),
        (4, 128, "long"): ((32, 32, 1, 4, 2),),
        (4, 64, "short"): ((32, 32, 1, 4, 2),),
        (4, 128, "short"): ((32, 32, 1, 4, 2),),
    },
}
_CONFIGS = {name: {key: [_config(*c) for c in entries] for key, entries in table.items()}
            for name, table in _CANDIDATES.items()}
# Under the CPU interpreter: one small configuration that still exercises every code path (full and tail tiles of
# queries and keys, causal blocks, several pairs per program).
_INTERPRET_CONFIG = _config(32, 32, 2, 4, 1)


def problem_class(args: dict) -> tuple[int, int, str]:
    """The candidate list of a call: (operand bytes, padded head dim 64 or 128, "long" or "short")."""
    width = 4 if args["Q"].element_size() == 4 else 2
    head = 64 if max(args["BLOCK_D"], args["BLOCK_DV"]) <= 64 else 128
    return width, head, "short" if max(args["N_Q"], args["N_K"]) <= SHORT_N else "long"


def _pruner(table):
    """The candidates of the call's problem class, with tiles no larger than the sequence needs."""
    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        family = table[problem_class(args)]
        cap = max(16, triton.next_power_of_2(max(args["N_Q"], args["N_K"])))
        return [c for c in family if c.kwargs["BLOCK_M"] <= cap and c.kwargs["BLOCK_N"] <= cap] or family[:1]
    return prune


def _autotune(name, pass_, reset_to_zero=None):
    table = _CONFIGS[pass_]
    # Keyed on power-of-two buckets of the lengths (not every N: the text tower sees up to 77 distinct lengths) and
    # of B*H (how many programs fill the GPU changes the best tile), head dims, masking mode, fixed-config
    # (deterministic) mode and, implicitly, the dtypes.
    union = list({str(c): c for family in table.values() for c in family}.values())
    return autotune(name, union,
                    key=["N_Q_BUCKET", "N_K_BUCKET", "BH_BUCKET", "HEAD_D", "HEAD_DV", "CAUSAL", "HAS_LENS",
                         "ATOMIC_DQ", "FIXED_CONFIG"],
                    interpret=_INTERPRET_CONFIG, prune=_pruner(table), reset_to_zero=reset_to_zero)


def _tail(n: int, block: int) -> int:
    """Tile size for the n % block rows left after the full tiles: a power of two >= 16 (tl.dot's minimum)."""
    rem = n % block
    return block if rem == 0 else min(block, max(16, triton.next_power_of_2(rem)))


def _num_tiles(n: int, block: int) -> int:
    return n // block + triton.cdiv(n % block, _tail(n, block))


_TAILS = triton.heuristics({
    "BLOCK_M_TAIL": lambda a: _tail(a["N_Q"], a["BLOCK_M"]),
    "BLOCK_N_TAIL": lambda a: _tail(a["N_K"], a["BLOCK_N"]),
})


# ------------------------------------------------------------------------------------------------ shared helpers
@triton.jit
def _load_tile(ptrs, rows, n_rows, cols, n_cols, CHECK_ROWS: tl.constexpr, CHECK_COLS: tl.constexpr):
    """Load a [rows, cols] tile (zeros outside), masking rows / columns only where the tile can overhang."""
    if CHECK_ROWS and CHECK_COLS:
        return tl.load(ptrs, mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols), other=0.0)
    elif CHECK_ROWS:
        return tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
    elif CHECK_COLS:
        return tl.load(ptrs, mask=cols[None, :] < n_cols, other=0.0)
    else:
        return tl.load(ptrs)


@triton.jit
def _kv_length(LENS, b, N_K, HAS_LENS: tl.constexpr):
    """Number of visible keys of sequence b: min(N_K, max(lengths[b], 0))."""
    if HAS_LENS:
        n = tl.load(LENS + b)  # clamp in the stored dtype (int64 lengths may exceed int32) before narrowing
        return tl.minimum(tl.maximum(n, 0), N_K).to(tl.int32)
    else:
        return N_K


@triton.jit
def _pair(Q, K, V, LENS, bh, H, N_K, sqb, sqh, skb, skh, svb, svh, HAS_LENS: tl.constexpr):
    """(b, h) of the (batch, head) pair bh as int64 (for the pointer arithmetic), its number of visible keys, and
    the pointers to the first row of that head in q, k and v."""
    b = bh // H
    h = bh % H
    kv_len = _kv_length(LENS, b, N_K, HAS_LENS)
    b = b.to(tl.int64)
    h = h.to(tl.int64)
    return b, h, kv_len, Q + b * sqb + h * sqh, K + b * skb + h * skh, V + b * svb + h * svh


@triton.jit
def _dim_offsets(BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    """Column offsets of a tile along the q/k head dim and along the v head dim."""
    return tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_DV)


@triton.jit
def _key_range(kv_len, start_m, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """The key blocks a query tile [start_m, start_m + BLOCK_M) visits: keys [0, n_free) are visible to every row of
    the tile (no mask), [n_free, n_masked) are full blocks that need the causal mask, [n_masked, hi) the remainder;
    nothing past hi is touched."""
    hi = kv_len
    free = kv_len
    if CAUSAL:
        hi = tl.minimum(kv_len, start_m + BLOCK_M)
        free = tl.minimum(kv_len, start_m + 1)
    n_free = free // BLOCK_N * BLOCK_N
    return n_free, n_free + (hi - n_free) // BLOCK_N * BLOCK_N, hi


@triton.jit
def _row_statistics(LSE, DELTA, rows, lse_row, N_Q, CHECK_ROWS: tl.constexpr):
    """(lse in base 2, delta) of query rows `rows`; rows past N_Q read 0 when CHECK_ROWS."""
    if CHECK_ROWS:
        lse2 = tl.load(LSE + lse_row + rows, mask=rows < N_Q, other=0.0) * _LOG2E
        delta = tl.load(DELTA + lse_row + rows, mask=rows < N_Q, other=0.0)
    else:
        lse2 = tl.load(LSE + lse_row + rows) * _LOG2E
        delta = tl.load(DELTA + lse_row + rows)
    return lse2, delta


# ------------------------------------------------------------------------------------------------------- forward
@triton.jit
def _fwd_block(acc, m_i, l_i, q, K, V, skn, skd, svn, svd, start_n, offs_m, offs_d, offs_dv, kv_len, qk_scale,
               HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
               BLOCK_N: tl.constexpr, CAUSAL_MASK: tl.constexpr, BOUNDS: tl.constexpr, DOT_PREC: tl.constexpr):
    offs_n = start_n + tl.arange(0, BLOCK_N)
    kt = _load_tile(K + offs_d[:, None] * skd + offs_n[None, :] * skn, offs_d, HEAD_D, offs_n, kv_len,
                    BLOCK_D != HEAD_D, BOUNDS)
    qk = tl.dot(q, kt, input_precision=DOT_PREC) * qk_scale  # [BLOCK_M, BLOCK_N], base-2 logits
    if BOUNDS:
        qk = tl.where(offs_n[None, :] < kv_len, qk, float("-inf"))
    if CAUSAL_MASK:
        qk = tl.where(offs_m[:, None] >= offs_n[None, :], qk, float("-inf"))
    # Every processed block holds key 0 or follows one that did, so m_new is finite for every row.
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(qk - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = _load_tile(V + offs_n[:, None] * svn + offs_dv[None, :] * svd, offs_n, kv_len, offs_dv, HEAD_DV,
                   BOUNDS, BLOCK_DV != HEAD_DV)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
    return acc, m_new, l_i


@triton.jit
def _fwd_tile(Q, K, V, O, LSE, start_m, kv_len, sqn, sqd, skn, skd, svn, svd, son, N_Q, lse_row, qk_scale,
              HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_N_TAIL: tl.constexpr, EVEN_M: tl.constexpr,
              CAUSAL: tl.constexpr, DOT_PREC: tl.constexpr):
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d, offs_dv = _dim_offsets(BLOCK_D, BLOCK_DV)
    q = _load_tile(Q + offs_m[:, None] * sqn + offs_d[None, :] * sqd, offs_m, N_Q, offs_d, HEAD_D,
                   not EVEN_M, BLOCK_D != HEAD_D)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    n_free, n_masked, hi = _key_range(kv_len, start_m, BLOCK_M, BLOCK_N, CAUSAL)
    for start_n in range(0, n_free, BLOCK_N):
        acc, m_i, l_i = _fwd_block(acc, m_i, l_i, q, K, V, skn, skd, svn, svd, start_n, offs_m, offs_d, offs_dv,
                                   kv_len, qk_scale, HEAD_D, HEAD_DV, BLOCK_D, BLOCK_DV, BLOCK_N, False, False,
                                   DOT_PREC)
    for start_n in range(n_free, n_masked, BLOCK_N):
        acc, m_i, l_i = _fwd_block(acc, m_i, l_i, q, K, V, skn, skd, svn, svd, start_n, offs_m, offs_d, offs_dv,
                                   kv_len, qk_scale, HEAD_D, HEAD_DV, BLOCK_D, BLOCK_DV, BLOCK_N, CAUSAL, False,
                                   DOT_PREC)
    for start_n in range(n_masked, hi, BLOCK_N_TAIL):
        acc, m_i, l_i = _fwd_block(acc, m_i, l_i, q, K, V, skn, skd, svn, svd, start_n, offs_m, offs_d, offs_dv,
                                   kv_len, qk_scale, HEAD_D, HEAD_DV, BLOCK_D, BLOCK_DV, BLOCK_N_TAIL, CAUSAL, True,
                                   DOT_PREC)
    # Rows that saw no key (kv_len == 0): o = 0 and lse = -inf instead of 0/0.
    seen = l_i > 0.0
    o = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) / _LOG2E, float("-inf"))
    o_ptrs = O + offs_m[:, None] * son + offs_dv[None, :]
    if EVEN_M and BLOCK_DV == HEAD_DV:
        tl.store(o_ptrs, o.to(O.dtype.element_ty))
        tl.store(LSE + lse_row + offs_m, lse)
    else:
        tl.store(o_ptrs, o.to(O.dtype.element_ty), mask=(offs_m[:, None] < N_Q) & (offs_dv[None, :] < HEAD_DV))
        tl.store(LSE + lse_row + offs_m, lse, mask=offs_m < N_Q)


@triton.jit
def _program(N, BLOCK: tl.constexpr, BLOCK_TAIL: tl.constexpr, PAIRS: tl.constexpr):
    """(tile, first (batch, head) pair) of this program. One grid axis, so that B*H may exceed 65,535; the tiles of
    one group of pairs are adjacent, so that programs running together share its K/V (or Q/dO) in L2."""
    n_full = N // BLOCK
    n_tiles = n_full + tl.cdiv(N - n_full * BLOCK, BLOCK_TAIL)
    pid = tl.program_id(0)
    return pid % n_tiles, (pid // n_tiles) * PAIRS


@_autotune("attention._fwd_kernel", "fwd")
@_TAILS
@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, LENS,
                sqb, sqn, sqh, sqd, skb, skn, skh, skd, svb, svn, svh, svd,
                H, N_Q, N_K, BH, qk_scale, N_Q_BUCKET, N_K_BUCKET, BH_BUCKET, FIXED_CONFIG,
                HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                CAUSAL: tl.constexpr, HAS_LENS: tl.constexpr, ATOMIC_DQ: tl.constexpr, DOT_PREC: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PAIRS: tl.constexpr,
                BLOCK_M_TAIL: tl.constexpr, BLOCK_N_TAIL: tl.constexpr):
    pid_m, first_bh = _program(N_Q, BLOCK_M, BLOCK_M_TAIL, PAIRS)
    n_full_m = N_Q // BLOCK_M
    son = H * HEAD_DV
    for i in range(PAIRS):
        bh = first_bh + i
        if bh < BH:
            b, h, kv_len, q_base, k_base, v_base = _pair(Q, K, V, LENS, bh, H, N_K, sqb, sqh, skb, skh, svb, svh,
                                                         HAS_LENS)
            o_base = O + (b * N_Q * H + h) * HEAD_DV
            lse_row = bh.to(tl.int64) * N_Q
            if pid_m < n_full_m:
                _fwd_tile(q_base, k_base, v_base, o_base, LSE, pid_m * BLOCK_M, kv_len, sqn, sqd, skn, skd, svn,
                          svd, son, N_Q, lse_row, qk_scale, HEAD_D, HEAD_DV, BLOCK_D, BLOCK_DV, BLOCK_M, BLOCK_N,
                          BLOCK_N_TAIL, True, CAUSAL, DOT_PREC)
            else:
                _fwd_tile(q_base, k_base, v_base, o_base, LSE, n_full_m * BLOCK_M + (pid_m - n_full_m) * BLOCK_M_TAIL,
                          kv_len, sqn, sqd, skn, skd, svn, svd, son, N_Q, lse_row, qk_scale, HEAD_D, HEAD_DV,
                          BLOCK_D, BLOCK_DV, BLOCK_M_TAIL, BLOCK_N, BLOCK_N_TAIL, False, CAUSAL, DOT_PREC)


# ------------------------------------------------------------------------------------------------------ backward
@triton.jit
def _delta_kernel(O, DO, DELTA, sob, son, soh, sod, sdb, sdn, sdh, sdd, H, N_Q,
                  HEAD_DV: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK: tl.constexpr):
    """delta[b, h, n] = sum_d dO * O (fp32): rowsum(P * dP) of the backward. B*H on grid axis 0 (axis 1 stops at
    65,535: a text batch of 3,277 x 20 heads would not launch)."""
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    rows = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask = (rows[:, None] < N_Q) & (offs_dv[None, :] < HEAD_DV)
    o = tl.load(O + b.to(tl.int64) * sob + h.to(tl.int64) * soh + rows[:, None] * son + offs_dv[None, :] * sod,
                mask=mask, other=0.0)
    do = tl.load(DO + b.to(tl.int64) * sdb + h.to(tl.int64) * sdh + rows[:, None] * sdn + offs_dv[None, :] * sdd,
                 mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + bh.to(tl.int64) * N_Q + rows, delta, mask=rows < N_Q)


@triton.jit
def _bwd_kv_block(dk, dv, k, v, Q, DO, LSE, DELTA, DQACC, start_m, offs_n, offs_d, offs_dv, kv_len, sqn, sqd, sdn,
                  sdd, sdqn, lse_row, N_Q, qk_scale, scale,
                  HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                  BLOCK_M: tl.constexpr, CAUSAL_MASK: tl.constexpr, CHECK_ROWS: tl.constexpr,
                  ATOMIC_DQ: tl.constexpr, DOT_PREC: tl.constexpr):
    """Add one query block's contribution to dK, dV of a key block (and, with ATOMIC_DQ, its dQ share)."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    q = _load_tile(Q + offs_m[:, None] * sqn + offs_d[None, :] * sqd, offs_m, N_Q, offs_d, HEAD_D,
                   CHECK_ROWS, BLOCK_D != HEAD_D)
    do = _load_tile(DO + offs_m[:, None] * sdn + offs_dv[None, :] * sdd, offs_m, N_Q, offs_dv, HEAD_DV,
                    CHECK_ROWS, BLOCK_DV != HEAD_DV).to(v.dtype)
    # Rows past N_Q load q = dO = 0, lse = delta = 0: their p is 1 but every product with dO or with
    # (dP - delta) = 0 vanishes.
    lse2, delta = _row_statistics(LSE, DELTA, offs_m, lse_row, N_Q, CHECK_ROWS)
    qkt = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * qk_scale  # [BLOCK_N, BLOCK_M]
    # Keys past kv_len (loaded as 0) must get p = 0 too: exp2(0 - lse2) overflows to inf for very negative lse
    # and inf * 0 would put NaN into dQ.
    pt = tl.where(offs_n[:, None] < kv_len, tl.exp2(qkt - lse2[None, :]), 0.0)
    if CAUSAL_MASK:
        pt = tl.where(offs_m[None, :] >= offs_n[:, None], pt, 0.0)
    dv += tl.dot(pt.to(v.dtype), do, input_precision=DOT_PREC)
    dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
    dst = pt * (dpt - delta[None, :])
    dk += tl.dot(dst.to(q.dtype), q, input_precision=DOT_PREC)
    if ATOMIC_DQ:
        dq = tl.dot(tl.trans(dst.to(k.dtype)), k, input_precision=DOT_PREC) * scale  # [BLOCK_M, BLOCK_D]
        # relaxed: the adds only accumulate, nothing is ordered by them (the kernel's end publishes the sums)
        tl.atomic_add(DQACC + offs_m[:, None] * sdqn + offs_d[None, :], dq,
                      mask=(offs_m[:, None] < N_Q) & (offs_d[None, :] < HEAD_D), sem="relaxed")
    return dk, dv


@triton.jit
def _bwd_kv_tile(Q, K, V, DO, DK, DV, LSE, DELTA, DQACC, start_n, kv_len, sqn, sqd, skn, skd, svn, svd, sdn, sdd,
                 sdkn, sdvn, sdqn, lse_row, N_Q, N_K, qk_scale, scale,
                 HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_M_TAIL: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                 ATOMIC_DQ: tl.constexpr, DOT_PREC: tl.constexpr):
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d, offs_dv = _dim_offsets(BLOCK_D, BLOCK_DV)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    if start_n < kv_len:  # key blocks past lengths[b] are skipped: zero gradients
        # Keys past kv_len load as 0, so they add nothing to dQ; their own dK, dV rows are zeroed at the store.
        k = tl.load(K + offs_n[:, None] * skn + offs_d[None, :] * skd,
                    mask=(offs_n[:, None] < kv_len) & (offs_d[None, :] < HEAD_D), other=0.0)
        v = tl.load(V + offs_n[:, None] * svn + offs_dv[None, :] * svd,
                    mask=(offs_n[:, None] < kv_len) & (offs_dv[None, :] < HEAD_DV), other=0.0)
        # Query rows: [start_n, diag_end) need the causal mask (causal only: earlier rows see none of these keys),
        # [diag_end, m_full) no mask, [m_full, N_Q) bounds masks.
        diag_end = 0
        if CAUSAL:
            diag_end = start_n + tl.cdiv(BLOCK_N, BLOCK_M) * BLOCK_M
            for start_m in range(start_n, diag_end, BLOCK_M):
                dk, dv = _bwd_kv_block(dk, dv, k, v, Q, DO, LSE, DELTA, DQACC, start_m, offs_n, offs_d, offs_dv,
                                       kv_len, sqn, sqd, sdn, sdd, sdqn, lse_row, N_Q, qk_scale, scale, HEAD_D, HEAD_DV,
                                       BLOCK_D, BLOCK_DV, BLOCK_M, True, True, ATOMIC_DQ, DOT_PREC)
        m_full = diag_end + tl.maximum(N_Q - diag_end, 0) // BLOCK_M * BLOCK_M
        for start_m in range(diag_end, m_full, BLOCK_M):
            dk, dv = _bwd_kv_block(dk, dv, k, v, Q, DO, LSE, DELTA, DQACC, start_m, offs_n, offs_d, offs_dv,
                                   kv_len, sqn, sqd, sdn, sdd, sdqn, lse_row, N_Q, qk_scale, scale, HEAD_D, HEAD_DV,
                                   BLOCK_D, BLOCK_DV, BLOCK_M, False, False, ATOMIC_DQ, DOT_PREC)
        for start_m in range(m_full, N_Q, BLOCK_M_TAIL):
            dk, dv = _bwd_kv_block(dk, dv, k, v, Q, DO, LSE, DELTA, DQACC, start_m, offs_n, offs_d, offs_dv,
                                   kv_len, sqn, sqd, sdn, sdd, sdqn, lse_row, N_Q, qk_scale, scale, HEAD_D, HEAD_DV,
                                   BLOCK_D, BLOCK_DV, BLOCK_M_TAIL, False, True, ATOMIC_DQ, DOT_PREC)
        dk = tl.where(offs_n[:, None] < kv_len, dk * scale, 0.0)
        dv = tl.where(offs_n[:, None] < kv_len, dv, 0.0)
    rows = offs_n[:, None] < N_K
    tl.store(DK + offs_n[:, None] * sdkn + offs_d[None, :], dk.to(DK.dtype.element_ty),
             mask=rows & (offs_d[None, :] < HEAD_D))
    tl.store(DV + offs_n[:, None] * sdvn + offs_dv[None, :], dv.to(DV.dtype.element_ty),
             mask=rows & (offs_dv[None, :] < HEAD_DV))


@triton.jit
def _bwd_q_block(dq, q, do, lse2, delta, K, V, skn, skd, svn, svd, start_n, offs_m, offs_d, offs_dv, kv_len,
                 qk_scale, HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_D: tl.constexpr,
                 BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL_MASK: tl.constexpr, BOUNDS: tl.constexpr,
                 DOT_PREC: tl.constexpr):
    offs_n = start_n + tl.arange(0, BLOCK_N)
    kt = _load_tile(K + offs_d[:, None] * skd + offs_n[None, :] * skn, offs_d, HEAD_D, offs_n, kv_len,
                    BLOCK_D != HEAD_D, BOUNDS)
    vt = _load_tile(V + offs_dv[:, None] * svd + offs_n[None, :] * svn, offs_dv, HEAD_DV, offs_n, kv_len,
                    BLOCK_DV != HEAD_DV, BOUNDS)
    qk = tl.dot(q, kt, input_precision=DOT_PREC) * qk_scale
    if BOUNDS:
        qk = tl.where(offs_n[None, :] < kv_len, qk, float("-inf"))
    if CAUSAL_MASK:
        qk = tl.where(offs_m[:, None] >= offs_n[None, :], qk, float("-inf"))
    p = tl.exp2(qk - lse2[:, None])
    dp = tl.dot(do, vt, input_precision=DOT_PREC)
    ds = p * (dp - delta[:, None])
    dq += tl.dot(ds.to(kt.dtype), tl.trans(kt), input_precision=DOT_PREC)
    return dq


@triton.jit
def _bwd_q_tile(Q, K, V, DO, DQ, LSE, DELTA, start_m, kv_len, sqn, sqd, skn, skd, svn, svd, sdn, sdd, sdqn, lse_row,
                N_Q, qk_scale, scale, HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_D: tl.constexpr,
                BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_N_TAIL: tl.constexpr,
                EVEN_M: tl.constexpr, CAUSAL: tl.constexpr, DOT_PREC: tl.constexpr):
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d, offs_dv = _dim_offsets(BLOCK_D, BLOCK_DV)
    q = _load_tile(Q + offs_m[:, None] * sqn + offs_d[None, :] * sqd, offs_m, N_Q, offs_d, HEAD_D,
                   not EVEN_M, BLOCK_D != HEAD_D)
    do = _load_tile(DO + offs_m[:, None] * sdn + offs_dv[None, :] * sdd, offs_m, N_Q, offs_dv, HEAD_DV,
                    not EVEN_M, BLOCK_DV != HEAD_DV).to(q.dtype)
    lse2, delta = _row_statistics(LSE, DELTA, offs_m, lse_row, N_Q, not EVEN_M)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    n_free, n_masked, hi = _key_range(kv_len, start_m, BLOCK_M, BLOCK_N, CAUSAL)
    for start_n in range(0, n_free, BLOCK_N):
        dq = _bwd_q_block(dq, q, do, lse2, delta, K, V, skn, skd, svn, svd, start_n, offs_m, offs_d, offs_dv,
                          kv_len, qk_scale, HEAD_D, HEAD_DV, BLOCK_D, BLOCK_DV, BLOCK_N, False, False, DOT_PREC)
    for start_n in range(n_free, n_masked, BLOCK_N):
        dq = _bwd_q_block(dq, q, do, lse2, delta, K, V, skn, skd, svn, svd, start_n, offs_m, offs_d, offs_dv,
                          kv_len, qk_scale, HEAD_D, HEAD_DV, BLOCK_D, BLOCK_DV, BLOCK_N, CAUSAL, False, DOT_PREC)
    for start_n in range(n_masked, hi, BLOCK_N_TAIL):
        dq = _bwd_q_block(dq, q, do, lse2, delta, K, V, skn, skd, svn, svd, start_n, offs_m, offs_d, offs_dv,
                          kv_len, qk_scale, HEAD_D, HEAD_DV, BLOCK_D, BLOCK_DV, BLOCK_N_TAIL, CAUSAL, True, DOT_PREC)
    dq_ptrs = DQ + offs_m[:, None] * sdqn + offs_d[None, :]
    dq = (dq * scale).to(DQ.dtype.element_ty)
    if EVEN_M and BLOCK_D == HEAD_D:
        tl.store(dq_ptrs, dq)
    else:
        tl.store(dq_ptrs, dq, mask=(offs_m[:, None] < N_Q) & (offs_d[None, :] < HEAD_D))


@triton.jit
def _bwd_kernel(Q, K, V, DO, DK, DV, DQ, LSE, DELTA, LENS,
                sqb, sqn, sqh, sqd, skb, skn, skh, skd, svb, svn, svh, svd, sdb, sdn, sdh, sdd,
                H, N_Q, N_K, BH, qk_scale, scale, N_Q_BUCKET, N_K_BUCKET, BH_BUCKET, FIXED_CONFIG,
                HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                CAUSAL: tl.constexpr, HAS_LENS: tl.constexpr, ATOMIC_DQ: tl.constexpr, DOT_PREC: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PAIRS: tl.constexpr,
                BLOCK_M_TAIL: tl.constexpr, BLOCK_N_TAIL: tl.constexpr, DQ_PASS: tl.constexpr):
    """One program per key block (DQ_PASS=False): dK and dV, plus dQ by fp32 atomic adds into DQ with ATOMIC_DQ;
    or one program per query block (DQ_PASS=True, deterministic mode): dQ. DK and DV are not touched then."""
    if DQ_PASS:
        pid, first_bh = _program(N_Q, BLOCK_M, BLOCK_M_TAIL, PAIRS)
    else:
        pid, first_bh = _program(N_K, BLOCK_N, BLOCK_N_TAIL, PAIRS)
    for i in range(PAIRS):
        bh = first_bh + i
        if bh < BH:
            b, h, kv_len, q_base, k_base, v_base = _pair(Q, K, V, LENS, bh, H, N_K, sqb, sqh, skb, skh, svb, svh,
                                                         HAS_LENS)
            do_base = DO + b * sdb + h * sdh
            dq_base = DQ + (b * N_Q * H + h) * HEAD_D
            lse_row = bh.to(tl.int64) * N_Q
            if DQ_PASS:
                n_full_m = N_Q // BLOCK_M
                if pid < n_full_m:
                    _bwd_q_tile(q_base, k_base, v_base, do_base, dq_base, LSE, DELTA, pid * BLOCK_M, kv_len, sqn,
                                sqd, skn, skd, svn, svd, sdn, sdd, H * HEAD_D, lse_row, N_Q, qk_scale, scale, HEAD_D,
                                HEAD_DV, BLOCK_D, BLOCK_DV, BLOCK_M, BLOCK_N, BLOCK_N_TAIL, True, CAUSAL, DOT_PREC)
                else:
                    _bwd_q_tile(q_base, k_base, v_base, do_base, dq_base, LSE, DELTA,
                                n_full_m * BLOCK_M + (pid - n_full_m) * BLOCK_M_TAIL, kv_len, sqn, sqd, skn, skd,
                                svn, svd, sdn, sdd, H * HEAD_D, lse_row, N_Q, qk_scale, scale, HEAD_D, HEAD_DV,
                                BLOCK_D, BLOCK_DV, BLOCK_M_TAIL, BLOCK_N, BLOCK_N_TAIL, False, CAUSAL, DOT_PREC)
            else:
                dk_base = DK + (b * N_K * H + h) * HEAD_D
                dv_base = DV + (b * N_K * H + h) * HEAD_DV
                n_full_n = N_K // BLOCK_N
                if pid < n_full_n:
                    _bwd_kv_tile(q_base, k_base, v_base, do_base, dk_base, dv_base, LSE, DELTA, dq_base,
                                 pid * BLOCK_N, kv_len, sqn, sqd, skn, skd, svn, svd, sdn, sdd, H * HEAD_D,
                                 H * HEAD_DV, H * HEAD_D, lse_row, N_Q, N_K, qk_scale, scale, HEAD_D, HEAD_DV,
                                 BLOCK_D, BLOCK_DV, BLOCK_M, BLOCK_M_TAIL, BLOCK_N, CAUSAL, ATOMIC_DQ, DOT_PREC)
                else:
                    _bwd_kv_tile(q_base, k_base, v_base, do_base, dk_base, dv_base, LSE, DELTA, dq_base,
                                 n_full_n * BLOCK_N + (pid - n_full_n) * BLOCK_N_TAIL, kv_len, sqn, sqd, skn, skd,
                                 svn, svd, sdn, sdd, H * HEAD_D, H * HEAD_DV, H * HEAD_D, lse_row, N_Q, N_K,
                                 qk_scale, scale, HEAD_D, HEAD_DV, BLOCK_D, BLOCK_DV, BLOCK_M, BLOCK_M_TAIL,
                                 BLOCK_N_TAIL, CAUSAL, ATOMIC_DQ, DOT_PREC)


# The two backward launches run the same kernel, each autotuned over its own tile configurations: the dK/dV pass
# (which zeroes the atomic dQ accumulator between timing runs) and the deterministic dQ pass.
_bwd_kv_kernel = _autotune("attention._bwd_kv_kernel", "bwd_kv", reset_to_zero=["DQ"])(_TAILS(_bwd_kernel))
_bwd_q_kernel = _autotune("attention._bwd_q_kernel", "bwd_q")(_TAILS(_bwd_kernel))


# ------------------------------------------------------------------------------------------------------ launchers
# Every output buffer (each element written by a kernel) is allocated through this, so that tests can poison it (NaN).
_empty = torch.empty


def _block_dim(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def _common(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, lengths: Optional[torch.Tensor],
            lse: torch.Tensor) -> tuple[dict, torch.Tensor]:
    """The kernels' shape and mode arguments, and the lengths pointer (lse as a never-read dummy without lengths)."""
    b, n_q, h, d = q.shape
    n_k, dv = k.shape[1], v.shape[-1]
    return dict(
        H=h, N_Q=n_q, N_K=n_k, BH=b * h,
        N_Q_BUCKET=triton.next_power_of_2(n_q), N_K_BUCKET=triton.next_power_of_2(n_k),
        BH_BUCKET=triton.next_power_of_2(b * h), FIXED_CONFIG=int(deterministic_backward() or not autotune_enabled()),
        HEAD_D=d, HEAD_DV=dv, BLOCK_D=_block_dim(d), BLOCK_DV=_block_dim(dv),
        CAUSAL=bool(causal), HAS_LENS=lengths is not None,
        # fp32 inputs get true fp32 products (not TF32) to meet the ~1e-5 fp32 tolerance.
        DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32",
    ), (lengths.contiguous() if lengths is not None else lse)  # the kernels index lengths densely


def _grid(n_tiles_of, n_q_or_k: int, bh: int):
    """One axis: every tile of every group of PAIRS (batch, head) pairs (see _program)."""
    return lambda meta: (_num_tiles(n_q_or_k, meta[n_tiles_of]) * triton.cdiv(bh, meta["PAIRS"]),)


def attention_forward(q, k, v, causal: bool, scale: float, lengths=None):
    """o [B,N,H,Dv] (q's dtype, contiguous) and lse [B,H,N] fp32 (natural log of the scaled scores' sum-exp)."""
    b, n_q, h, _ = q.shape
    o = _empty(b, n_q, h, v.shape[-1], dtype=q.dtype, device=q.device)
    lse = _empty(b, h, n_q, dtype=torch.float32, device=q.device)
    meta, lens = _common(q, k, v, causal, lengths, lse)
    _fwd_kernel[_grid("BLOCK_M", n_q, b * h)](
        q, k, v, o, lse, lens, *q.stride(), *k.stride(), *v.stride(), qk_scale=scale * LOG2E, ATOMIC_DQ=False,
        **meta)
    return o, lse


def deterministic_backward() -> bool:
    """PyTorch's deterministic mode: the backward computes dQ in a separate pass, without atomics, and every kernel
    runs a fixed (untimed) configuration, so results are bitwise reproducible across processes."""
    return torch.are_deterministic_algorithms_enabled()


def attention_backward(grad_o, q, k, v, o, lse, causal: bool, scale: float, lengths=None):
    """dq, dk, dv (inputs' dtypes, contiguous) from the forward's o and lse."""
    b, n_q, h, d = q.shape
    n_k, dv_dim = k.shape[1], v.shape[-1]
    lse = lse.contiguous()
    delta = _empty(b, h, n_q, dtype=torch.float32, device=q.device)
    block = 64 if dv_dim <= 64 else 32
    _delta_kernel[(b * h, triton.cdiv(n_q, block))](o, grad_o, delta, *o.stride(), *grad_o.stride(), h, n_q,
                                                    HEAD_DV=dv_dim, BLOCK_DV=_block_dim(dv_dim), BLOCK=block)
    dk = _empty(b, n_k, h, d, dtype=k.dtype, device=q.device)
    dv = _empty(b, n_k, h, dv_dim, dtype=v.dtype, device=q.device)
    meta, lens = _common(q, k, v, causal, lengths, lse)
    strides = (*q.stride(), *k.stride(), *v.stride(), *grad_o.stride())
    atomic = not deterministic_backward()
    if atomic:
        dq = torch.zeros(b, n_q, h, d, dtype=torch.float32, device=q.device)  # fp32 accumulator
    else:
        dq = _empty(b, n_q, h, d, dtype=q.dtype, device=q.device)
    _bwd_kv_kernel[_grid("BLOCK_N", n_k, b * h)](
        q, k, v, grad_o, dk, dv, dq, lse, delta, lens, *strides, qk_scale=scale * LOG2E, scale=scale,
        ATOMIC_DQ=atomic, DQ_PASS=False, **meta)
    if atomic:
        return dq.to(q.dtype), dk, dv
    _bwd_q_kernel[_grid("BLOCK_M", n_q, b * h)](
        q, k, v, grad_o, dk, dv, dq, lse, delta, lens, *strides, qk_scale=scale * LOG2E, scale=scale,
        ATOMIC_DQ=False, DQ_PASS=True, **meta)
    return dq, dk, dv


def supports(tensor: torch.Tensor, info: dict) -> Optional[str]:
    """None when these kernels can run the call, else why not (dispatch then errors or falls back)."""
    if tensor.dtype not in _SUPPORTED_DTYPES:
        return f"the Triton attention kernels take fp16, bf16 or fp32, got {tensor.dtype}"
    if _INTERPRET and tensor.dtype == torch.bfloat16 and tensor.device.type == "cpu":
        return "Triton's CPU interpreter miscomputes tl.dot on bf16 operands; use fp16 or fp32 there"
    programs = info.get("batch_heads", 1) * triton.cdiv(info.get("seq", 1), 16)
    if programs >= 2 ** 31:
        return (f"the Triton attention kernels launch B*H times the query tiles on one grid axis (< 2**31 programs), "
                f"got B*H={info.get('batch_heads')} and N={info.get('seq')}")
    for name in ("head_dim", "value_dim"):
        dim = info.get(name)
        if dim is not None and not 1 <= dim <= MAX_HEAD_DIM:
            return f"the Triton attention kernels take head dims 1..{MAX_HEAD_DIM}, got {name}={dim}"
    return None


add_kernels("triton", "attention", {"attention_forward": attention_forward,
                                    "attention_backward": attention_backward}, supports=supports)
