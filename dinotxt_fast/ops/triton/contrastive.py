"""Fused two-sided contrastive (InfoNCE) loss in Triton, without the B x B logits.

Implements the tile primitives that contrastive_tiles.tiled_partial_forward / tiled_partial_backward compose into
the "partial" kernels (local rows against all columns; see contrastive_tiles.py for the contract):

- forward: one pass over (row chunk, column chunk) programs. Each program loops over its BLOCK_M x BLOCK_N tiles
  (s = exp(logit_scale) * inv_i * inv_j * <img_i, txt_j>, fp32 accumulation, the L2 norms folded in as per-row
  scales so no normalised copy is written), keeps each row's log-sum-exp online (max + rescaled sum) and merges each
  column's (max, sum) into a scratch row owned by its row chunk; it also picks up the diagonal. Row and column
  log-sum-exps are finished in float64 over the (few) chunks.
- backward: for a panel of columns, one kernel recomputes every tile once and writes
  dS * inv_i * inv_j / kappa (dS = row_coef (softmax_row - I) + col_coef (softmax_col - I)) in the input dtype, plus
  one fp32 partial of sum(dS * s) (the logit-scale gradient) per chunk pair (the chunk pairs cut into parts when
  there are too few to fill the GPU: planning.ds_parts); two GEMMs then give d_img += dS @ txt
  and g_txt = dS^T @ img for the panel. The panel buffer is bounded (PANEL_BYTES), never B x B; d_img's feature
  dimension (2048 in DINO.txt) is far too wide to accumulate on chip the way FlashAttention keeps dK/dV, which is
  why the backward goes through this bounded buffer rather than one kernel.
- the normalisation's backward is one row kernel.

Deterministic: no atomics; every reduction has a fixed order. bf16 / fp32 inputs (fp32 uses IEEE fp32 dot
products, not TF32). Under TRITON_INTERPRET=1 one small configuration runs on CPU tensors (tests). Compiled for
sm_90 and run under the CPU interpreter only: none of these kernels has run on a GPU yet.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..contrastive_tiles import KernelTiles, tiled_dtype_problem, tiled_kernels, unit_norms
from ..dispatch import add_kernels
from ..planning import NORM_EPS, ds_parts, fill_target, fold_ds_partials
from .tuning import RUN_GPU_CONFIGS, autotune

_NORM_EPS = tl.constexpr(NORM_EPS)  # F.normalize's clamp of the norm


# ----------------------------------------------------------------------------------------------- configurations
def _config(block_m, block_n, block_k, warps, stages):
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k}, num_warps=warps,
                         num_stages=stages)


# Candidates per operand width (2: bf16, 4: fp32, whose IEEE products run on the CUDA cores), the fixed (known-good)
# one first (ops/triton/tuning.py); each compiles for sm_90 at the real shapes (B = 1024 and 32768 columns, E = 2048)
# within shared memory and without register spills with Triton 3.6 and 3.9 (benchmarks/results/codegen/). The dS
# tile holds two exponentials per element besides the product: only 64 x 64 tiles per 4 warps fit in registers.
# Under the interpreter one small configuration: 32 x 32 tiles in chunks of 64 still exercise every masked,
# multi-tile and multi-chunk path at test shapes (B = 129 = 4 * 32 + 1).
# (64, 128, 64, 4, 3) and (128, 128, 64, 8, 3) are clean with Triton 3.6 but spill with 3.9 (28-44 spill stores at
# 255 registers): left out, so that every kept 16-bit candidate is clean with both.
_FORWARD_CONFIGS = {2: [_config(64, 64, 32, 4, 4), _config(64, 64, 64, 4, 3), _config(128, 64, 64, 4, 3)],
                    4: [_config(64, 64, 32, 4, 4), _config(128, 128, 32, 8, 4)]}
_DS_CONFIGS = {2: [_config(64, 64, 64, 4, 3), _config(64, 64, 32, 4, 4), _config(64, 64, 64, 8, 3),
                   _config(128, 64, 64, 8, 3), _config(64, 128, 64, 8, 3)],
               4: [_config(64, 64, 64, 4, 3), _config(64, 64, 32, 4, 4), _config(64, 64, 64, 8, 3)]}
_GEMM_CONFIGS = {2: [_config(64, 64, 64, 4, 3), _config(128, 128, 64, 8, 3), _config(128, 256, 64, 8, 3),
                     _config(128, 128, 32, 4, 4), _config(64, 128, 64, 4, 4), _config(128, 64, 64, 4, 4)],
                 4: [_config(64, 64, 64, 4, 3), _config(64, 128, 64, 4, 4), _config(128, 64, 64, 4, 4)]}
_INTERPRET_CONFIG = _config(32, 32, 32, 4, 1)


def _by_width(table: dict, operand: str):
    """A pruner keeping the candidates of the call's operand width (the element size of argument `operand`)."""
    def prune(configs, named_args, **kwargs):
        return table[{**named_args, **kwargs}[operand].element_size()]
    return prune


def _candidates(table: dict) -> list:
    return list({str(c): c for configs in table.values() for c in configs}.values())


# Row and column chunks are multiples of this (so of every BLOCK_M / BLOCK_N that runs).
CHUNK_UNIT = 256 if RUN_GPU_CONFIGS else 64
# dS panel launches cut chunk pairs into parts of whole multiples of this many rows / columns (planning.ds_parts).
PART_UNIT = CHUNK_UNIT // 2
# About this many (row chunk, column chunk) programs for big problems: enough to fill any GPU several times while
# keeping the column-statistics scratch ([row chunks, N]) and row partials ([column chunks, M]) small.
TARGET_PROGRAMS = 1024
# Bytes of the backward's dS panel buffer [M, panel columns].
PANEL_BYTES = 64 << 20


# ---------------------------------------------------------------------------------------------------- kernels
@triton.jit
def _dot_tile(a_ptr, b_ptr, rows, cols, row_ok, col_ok, K, stride_a, stride_b, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """fp32 [BLOCK_M, BLOCK_N] tile of a[rows] @ b[cols]^T, both row-major with unit stride along K."""
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    a_rows = a_ptr + rows.to(tl.int64)[:, None] * stride_a
    b_cols = b_ptr + cols.to(tl.int64)[None, :] * stride_b
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        a = tl.load(a_rows + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_cols + ks[:, None], mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    return acc


@triton.jit
def _row_norms_kernel(x_ptr, inv_ptr, norm_ptr, R, E, stride_x, BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    sumsq = tl.zeros([BLOCK_R], dtype=tl.float32)
    for e0 in range(0, E, BLOCK_E):
        es = e0 + tl.arange(0, BLOCK_E)
        x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * stride_x + es[None, :],
                    mask=row_ok[:, None] & (es < E)[None, :], other=0.0).to(tl.float32)
        sumsq += tl.sum(x * x, axis=1)
    norm = tl.maximum(tl.sqrt_rn(sumsq), _NORM_EPS)
    tl.store(norm_ptr + rows, norm, mask=row_ok)
    tl.store(inv_ptr + rows, tl.div_rn(1.0, norm), mask=row_ok)


@autotune("contrastive._forward_kernel", _candidates(_FORWARD_CONFIGS), key=["M", "N", "E"],
          interpret=_INTERPRET_CONFIG, prune=_by_width(_FORWARD_CONFIGS, "img_ptr"))
@triton.jit
def _forward_kernel(img_ptr, txt_ptr, inv_i_ptr, inv_t_ptr, scale_ptr, row_max_ptr, row_sum_ptr, col_max_ptr,
                    col_sum_ptr, diag_ptr, M, N, E, offset, stride_img, stride_txt, row_chunk, col_chunk,
                    INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr):
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    scale = tl.exp(tl.load(scale_ptr))
    r_begin = pid_r * row_chunk
    r_end = tl.minimum(r_begin + row_chunk, M)
    c_begin = pid_c * col_chunk
    c_end = tl.minimum(c_begin + col_chunk, N)
    for r0 in range(r_begin, r_end, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        row_ok = rows < r_end
        row_scale = tl.load(inv_i_ptr + rows, mask=row_ok, other=0.0) * scale
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        d_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        for c0 in range(c_begin, c_end, BLOCK_N):
            cols = c0 + tl.arange(0, BLOCK_N)
            col_ok = cols < c_end
            s = _dot_tile(img_ptr, txt_ptr, rows, cols, row_ok, col_ok, E, stride_img, stride_txt, BLOCK_M, BLOCK_N,
                          BLOCK_K, INPUT_PRECISION)
            s = s * row_scale[:, None] * tl.load(inv_t_ptr + cols, mask=col_ok, other=0.0)[None, :]
            ok = row_ok[:, None] & col_ok[None, :]
            s = tl.where(ok, s, float("-inf"))
            d_i += tl.sum(tl.where(ok & (cols[None, :] == rows[:, None] + offset), s, 0.0), axis=1)
            # Rows: online log-sum-exp. Every tile holds a valid column, so valid rows get a finite max.
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
            l_i = l_i * tl.exp(m_i - m_ref) + tl.sum(tl.exp(s - m_ref[:, None]), axis=1)
            m_i = m_new
            # Columns: merge into this row chunk's running (max, sum); the first row tile starts it.
            c_max = tl.max(s, axis=0)
            c_ref = tl.where(c_max == float("-inf"), 0.0, c_max)
            c_sum = tl.sum(tl.exp(s - c_ref[None, :]), axis=0)
            stats = pid_r.to(tl.int64) * N + cols
            old_max = tl.load(col_max_ptr + stats, mask=col_ok, other=float("-inf"))
            old_sum = tl.load(col_sum_ptr + stats, mask=col_ok, other=0.0)
            old_max = tl.where(r0 > r_begin, old_max, float("-inf"))  # nothing to merge with yet
            old_sum = tl.where(r0 > r_begin, old_sum, 0.0)
            new_max = tl.maximum(old_max, c_max)
            new_ref = tl.where(new_max == float("-inf"), 0.0, new_max)
            new_sum = old_sum * tl.exp(old_max - new_ref) + c_sum * tl.exp(c_max - new_ref)
            tl.store(col_max_ptr + stats, new_max, mask=col_ok)
            tl.store(col_sum_ptr + stats, new_sum, mask=col_ok)
            # The next row tile reads these values back, possibly from other threads of this program.
            tl.debug_barrier()
        tl.store(row_max_ptr + pid_c.to(tl.int64) * M + rows, m_i, mask=row_ok)
        tl.store(row_sum_ptr + pid_c.to(tl.int64) * M + rows, l_i, mask=row_ok)
        diag_col = rows + offset
        tl.store(diag_ptr + rows, d_i, mask=row_ok & (diag_col >= c_begin) & (diag_col < c_end))


@autotune("contrastive._ds_kernel", _candidates(_DS_CONFIGS), key=["M", "N", "E"], interpret=_INTERPRET_CONFIG,
          prune=_by_width(_DS_CONFIGS, "img_ptr"))
@triton.jit
def _ds_kernel(img_ptr, txt_ptr, inv_i_ptr, inv_t_ptr, scale_ptr, lse_rows_ptr, lse_cols_ptr, row_coef_ptr,
               col_coef_ptr, inv_kappa_ptr, ds_ptr, ds_dot_s_ptr, M, N, E, offset, stride_img, stride_txt, stride_ds,
               col_begin, col_end, row_chunk, col_chunk, stride_ds_dot_s, INPUT_PRECISION: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    scale = tl.exp(tl.load(scale_ptr))
    inv_kappa = tl.load(inv_kappa_ptr)
    r_begin = pid_r * row_chunk
    r_end = tl.minimum(r_begin + row_chunk, M)
    c_begin = col_begin + pid_c * col_chunk
    c_end = tl.minimum(c_begin + col_chunk, col_end)
    ds_dot_s = 0.0
    for r0 in range(r_begin, r_end, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        row_ok = rows < r_end
        inv_r = tl.load(inv_i_ptr + rows, mask=row_ok, other=0.0)
        lse_r = tl.load(lse_rows_ptr + rows, mask=row_ok, other=0.0)  # float64: split into fp32 hi + lo
        hi_r = lse_r.to(tl.float32)
        lo_r = (lse_r - hi_r.to(tl.float64)).to(tl.float32)
        coef_r = tl.load(row_coef_ptr + rows, mask=row_ok, other=0.0)
        for c0 in range(c_begin, c_end, BLOCK_N):
            cols = c0 + tl.arange(0, BLOCK_N)
            col_ok = cols < c_end
            inv_c = tl.load(inv_t_ptr + cols, mask=col_ok, other=0.0)
            lse_c = tl.load(lse_cols_ptr + cols, mask=col_ok, other=0.0)
            hi_c = lse_c.to(tl.float32)
            lo_c = (lse_c - hi_c.to(tl.float64)).to(tl.float32)
            coef_c = tl.load(col_coef_ptr + cols, mask=col_ok, other=0.0)
            s = _dot_tile(img_ptr, txt_ptr, rows, cols, row_ok, col_ok, E, stride_img, stride_txt, BLOCK_M, BLOCK_N,
                          BLOCK_K, INPUT_PRECISION)
            s = s * (inv_r * scale)[:, None] * inv_c[None, :]
            positive = tl.where(cols[None, :] == rows[:, None] + offset, 1.0, 0.0)
            # s - hi is exact where it matters (s close to the log-sum-exp): no fp32 rounding of lse ~ 14..100.
            ds = (coef_r[:, None] * (tl.exp((s - hi_r[:, None]) - lo_r[:, None]) - positive)
                  + coef_c[None, :] * (tl.exp((s - hi_c[None, :]) - lo_c[None, :]) - positive))
            ok = row_ok[:, None] & col_ok[None, :]
            ds = tl.where(ok, ds, 0.0)
            ds_dot_s += tl.sum(tl.sum(ds * s, axis=1), axis=0)
            out = ds * (inv_r[:, None] * inv_c[None, :] * inv_kappa)
            tl.store(ds_ptr + rows.to(tl.int64)[:, None] * stride_ds + (cols - col_begin)[None, :],
                     out.to(ds_ptr.dtype.element_ty), mask=ok)
    tl.store(ds_dot_s_ptr + pid_r * stride_ds_dot_s + pid_c, ds_dot_s)  # the caller points it at this panel


# ACCUMULATE is in the key: a tile tuned on a plain write is not reused for a read-modify-write (another code path).
@autotune("contrastive._gemm_kernel", _candidates(_GEMM_CONFIGS), key=["M", "N", "K", "ACCUMULATE"],
          interpret=_INTERPRET_CONFIG, prune=_by_width(_GEMM_CONFIGS, "a_ptr"), restore_value=["c_ptr"])
@triton.jit
def _gemm_kernel(a_ptr, b_ptr, c_ptr, alpha_ptr, row_scale_ptr, M, N, K, stride_am, stride_ak, stride_bk, stride_bn,
                 stride_cm, ACCUMULATE: tl.constexpr, INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """c (+)= alpha * row_scale[:, None] * (a @ b); fp32 c, any strides of a and b."""
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    # Grouped order: GROUP_M row blocks share the same column blocks of b while they are in L2.
    width = GROUP_M * grid_n
    first_m = (pid // width) * GROUP_M
    group_m = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % group_m
    pid_n = (pid % width) // group_m
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    a_rows = a_ptr + rows.to(tl.int64)[:, None] * stride_am
    b_cols = b_ptr + cols.to(tl.int64)[None, :] * stride_bn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        a = tl.load(a_rows + ks.to(tl.int64)[None, :] * stride_ak, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_cols + ks.to(tl.int64)[:, None] * stride_bk, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    acc = acc * (tl.load(alpha_ptr) * tl.load(row_scale_ptr + rows, mask=row_ok, other=0.0))[:, None]
    c_ptrs = c_ptr + rows.to(tl.int64)[:, None] * stride_cm + cols[None, :]
    ok = row_ok[:, None] & col_ok[None, :]
    if ACCUMULATE:
        acc += tl.load(c_ptrs, mask=ok, other=0.0)
    tl.store(c_ptrs, acc, mask=ok)


@triton.jit
def _normalize_backward_kernel(g_ptr, x_ptr, out_ptr, E, stride_g, stride_x, stride_out, NORMALIZE: tl.constexpr,
                               BLOCK_E: tl.constexpr):
    """out = d/dx(x / max(||x||, eps)) applied to g, one row per program; g cast to x's dtype without NORMALIZE."""
    row = tl.program_id(0).to(tl.int64)
    g_row = g_ptr + row * stride_g
    x_row = x_ptr + row * stride_x
    out_row = out_ptr + row * stride_out
    if NORMALIZE:
        sumsq = tl.zeros([BLOCK_E], dtype=tl.float32)
        gx = tl.zeros([BLOCK_E], dtype=tl.float32)
        for e0 in range(0, E, BLOCK_E):
            es = e0 + tl.arange(0, BLOCK_E)
            x = tl.load(x_row + es, mask=es < E, other=0.0).to(tl.float32)
            g = tl.load(g_row + es, mask=es < E, other=0.0)
            sumsq += x * x
            gx += g * x
        norm = tl.sqrt_rn(tl.sum(sumsq, axis=0))
        clamped = tl.maximum(norm, _NORM_EPS)
        # dx = (g - y <g, y>) / n with y = x / n; a clamped norm (zero vector) passes g / n through.
        coef = tl.where(norm > _NORM_EPS, tl.div_rn(tl.sum(gx, axis=0), clamped * clamped), 0.0)
        inv = tl.div_rn(1.0, clamped)
        for e0 in range(0, E, BLOCK_E):
            es = e0 + tl.arange(0, BLOCK_E)
            x = tl.load(x_row + es, mask=es < E, other=0.0).to(tl.float32)
            g = tl.load(g_row + es, mask=es < E, other=0.0)
            tl.store(out_row + es, ((g - x * coef) * inv).to(out_ptr.dtype.element_ty), mask=es < E)
    else:
        for e0 in range(0, E, BLOCK_E):
            es = e0 + tl.arange(0, BLOCK_E)
            g = tl.load(g_row + es, mask=es < E, other=0.0)
            tl.store(out_row + es, g.to(out_ptr.dtype.element_ty), mask=es < E)


# ------------------------------------------------------------------------------------------------ primitives
# Every buffer a kernel here fills completely is allocated through this, so that tests can poison it (NaN).
_empty = torch.empty


def _unit_stride(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # (tf32 only matters for fp32 operands)


def _float64(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float64).contiguous()


def _log_scale(logit_scale: torch.Tensor) -> torch.Tensor:
    return logit_scale.detach().reshape(1).to(torch.float32)


class TritonTiles(KernelTiles):
    def row_norms(self, x, normalize):
        if not normalize:
            return unit_norms(x)
        x = _unit_stride(x)
        rows, e = x.shape
        inv = _empty(rows, dtype=torch.float32, device=x.device)
        norm = _empty(rows, dtype=torch.float32, device=x.device)
        block_r = 16
        _row_norms_kernel[(triton.cdiv(rows, block_r),)](x, inv, norm, rows, e, x.stride(0), BLOCK_R=block_r,
                                                         BLOCK_E=min(256, triton.next_power_of_2(e)))
        return inv, norm

    def forward_tiles(self, img, txt, inv_i, inv_t, logit_scale, offset, row_chunk, col_chunk, row_max, row_sum,
                      col_max, col_sum, diag):
        img, txt = _unit_stride(img), _unit_stride(txt)
        (m, e), n = img.shape, txt.shape[0]
        grid = (triton.cdiv(m, row_chunk), triton.cdiv(n, col_chunk))
        _forward_kernel[grid](img, txt, inv_i, inv_t, _log_scale(logit_scale), row_max, row_sum, col_max, col_sum,
                              diag, m, n, e, offset, img.stride(0), txt.stride(0), row_chunk, col_chunk,
                              INPUT_PRECISION=_precision(img.dtype))

    def ds_tiles(self, img, txt, inv_i, inv_t, logit_scale, lse_rows, lse_cols, row_coef, col_coef, inv_kappa, offset,
                 col_begin, col_end, row_chunk, col_chunk, ds, ds_dot_s):
        img, txt = _unit_stride(img), _unit_stride(txt)
        (m, e), n = img.shape, txt.shape[0]
        row_chunks, panel_chunks = triton.cdiv(m, row_chunk), triton.cdiv(col_end - col_begin, col_chunk)
        # Enough programs to fill the GPU: each chunk pair cut into parts, their partial sums folded per chunk after.
        row_parts, col_parts = ds_parts(row_chunks, panel_chunks, row_chunk, col_chunk, PART_UNIT,
                                        fill_target(img.device))
        first, split = col_begin // col_chunk, row_parts * col_parts > 1
        partials = torch.zeros(row_chunks * row_parts, panel_chunks * col_parts, dtype=torch.float32,
                               device=img.device) if split else ds_dot_s[:, first:]
        rows, cols = row_chunk // row_parts, col_chunk // col_parts
        grid = (triton.cdiv(m, rows), triton.cdiv(col_end - col_begin, cols))
        _ds_kernel[grid](img, txt, inv_i, inv_t, _log_scale(logit_scale), _float64(lse_rows), _float64(lse_cols),
                         row_coef, col_coef, inv_kappa.to(torch.float32), ds, partials, m, n, e, offset,
                         img.stride(0), txt.stride(0), ds.stride(0), col_begin, col_end, rows, cols,
                         partials.stride(0), INPUT_PRECISION=_precision(img.dtype))
        if split:
            fold_ds_partials(partials, ds_dot_s, first, row_parts, col_parts)

    def gemm(self, a, b, c, alpha, row_scale, accumulate):
        m, k = a.shape
        n = b.shape[1]
        if b.dtype != a.dtype:
            raise TypeError(f"contrastive gemm: operands have dtypes {a.dtype} and {b.dtype}")
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
        _gemm_kernel[grid](a, b, c, alpha.to(torch.float32), row_scale.contiguous(), m, n, k, a.stride(0),
                           a.stride(1), b.stride(0), b.stride(1), c.stride(0), ACCUMULATE=accumulate,
                           INPUT_PRECISION=_precision(a.dtype), GROUP_M=8)

    def normalize_backward(self, g, x, normalize):
        g, x = _unit_stride(g), _unit_stride(x)
        out = _empty(x.shape, dtype=x.dtype, device=x.device)
        rows, e = x.shape
        if rows:
            _normalize_backward_kernel[(rows,)](g, x, out, e, g.stride(0), x.stride(0), out.stride(0),
                                                NORMALIZE=bool(normalize),
                                                BLOCK_E=min(1024, triton.next_power_of_2(e)))
        return out


TILES = TritonTiles(CHUNK_UNIT, TARGET_PROGRAMS, PANEL_BYTES)


# ------------------------------------------------------------------------------------------- op kernels (contract)
KERNELS = tiled_kernels(TILES)


def _supports(tensor: torch.Tensor, info: dict):
    return tiled_dtype_problem("Triton", tensor.dtype)


add_kernels("triton", "contrastive_loss", KERNELS, supports=_supports)
