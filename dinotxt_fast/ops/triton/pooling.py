"""Triton patch pooling: `[cls ; mean(patches)]` of tokens [B, 1+R+P, D], with an optional fused LayerNorm and an
optional L2 normalisation of the pooled 2D vector; forward and backward, same contract as reference/pooling.py.

Forward, two launches:
  `_pool_partial`   program (b, s) reads split s of image b's patch rows once, layer-norms them in registers without
                    the affine (mean(xhat * w + bias) = mean(xhat) * w + bias) and writes their fp32 column sum;
  `_pool_finalize`  per image: the cls row, sum(partials) / P, the affine, the L2 norm, the output cast.
Splitting the patch rows keeps the GPU busy when B is small, and fixed partial sums keep the result deterministic.

Backward: `_pool_finalize` in gradient mode turns grad_out into the gradient of the pre-normalisation pooled vector
(only then does it need the pooled vector, recomputed with `_pool_partial`), with the patch half already divided
by P; `_pool_backward` writes every token's gradient in one pass (registers get exactly zero) plus per-program
partial sums of d_ln_weight / d_ln_bias, which `_column_sum` adds in a fixed order.

Compiled for sm_90 and run under the CPU interpreter only: none of these kernels has run on a GPU yet.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..dispatch import add_kernels
from ..planning import NORM_EPS, pooling_supports, row_splits
from .tuning import autotune

_NORM_EPS = tl.constexpr(NORM_EPS)
# Every output and workspace is allocated through this, so that tests can poison them (NaN / -1).
_empty = torch.empty
MAX_DIM = 4096  # one row of D (padded to a power of two) lives in registers
# Elements of one [BLOCK_N, BLOCK_D] fp32 tile per thread: the forward keeps two such tiles live, the backward
# about seven; beyond these budgets ptxas spills (checked on sm_90 cubins).
_FWD_PER_THREAD, _BWD_PER_THREAD = 32, 16


def _configs(block_ns, warps):
    """Candidates in order of preference (the first the pruner keeps for a D is the fixed one, ops/triton/tuning.py);
    each kept one compiles for sm_90 at D = 1024 without spills with Triton 3.6 and 3.9
    (benchmarks/results/codegen/)."""
    return [triton.Config({"BLOCK_N": n}, num_warps=w) for n in block_ns for w in warps]


_INTERPRET_CONFIG = triton.Config({"BLOCK_N": 16}, num_warps=1)  # autotuning under the interpreter is pointless


def _prune(per_thread):
    def prune(configs, named_args, **kwargs):
        block_d = kwargs.get("BLOCK_D", named_args.get("BLOCK_D"))
        # at most `per_thread` elements per thread, and at least 2 (fewer wastes the extra warps)
        fits = lambda c: 2 <= c.kwargs["BLOCK_N"] * block_d / (32 * c.num_warps) <= per_thread  # noqa: E731
        kept = [c for c in configs if fits(c)]
        return kept or [min(configs, key=lambda c: (c.kwargs["BLOCK_N"], -c.num_warps))]
    return prune


@triton.jit
def _layer_norm_tile(x, mask, D, eps):
    """(xhat, rstd) of the rows of an fp32 [BLOCK_N, BLOCK_D] tile; masked entries of xhat are 0."""
    mean = tl.sum(x, axis=1) / D
    xc = tl.where(mask, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / D + eps)
    return xc * rstd[:, None], rstd


# Keyed on the image's patch rows, not on the rows per split: those change with the batch (planning.row_splits), and a
# tail batch would re-run the autotuner.
@autotune("pooling._pool_partial", _configs((4, 2, 8, 16), (4, 8, 16)), key=["D", "n_rows", "HAS_LN"],
          interpret=_INTERPRET_CONFIG, prune=_prune(_FWD_PER_THREAD))
@triton.jit
def _pool_partial(x_ptr, stride_b, stride_n, stride_d, part_ptr, first_row, n_rows, rows_per_split, D, eps,
                  HAS_LN: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    b = tl.program_id(0)
    s = tl.program_id(1)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < D
    begin = s * rows_per_split
    end = tl.minimum(begin + rows_per_split, n_rows)
    base = x_ptr + b.to(tl.int64) * stride_b + first_row * stride_n
    acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for r in range(begin, end, BLOCK_N):
        rows = r + tl.arange(0, BLOCK_N)
        mask = (rows < end)[:, None] & col_ok[None, :]
        x = tl.load(base + rows[:, None] * stride_n + cols[None, :] * stride_d, mask=mask, other=0.0).to(tl.float32)
        if HAS_LN:
            x, _ = _layer_norm_tile(x, mask, D, eps)
        acc += x
    tl.store(part_ptr + (b * tl.num_programs(1) + s) * D + cols, tl.sum(acc, axis=0), mask=col_ok)


@triton.jit
def _pool_finalize(x_ptr, stride_b, stride_d, part_ptr, n_splits, w_ptr, bias_ptr, g_ptr, g_stride_b, g_stride_d,
                   out_ptr, D, n_patches, eps, HAS_LN: tl.constexpr, HAS_BIAS: tl.constexpr,
                   NORMALIZE: tl.constexpr, GRAD: tl.constexpr, BLOCK_D: tl.constexpr):
    """Forward (GRAD=False): out[b] = [cls ; mean] (normalised) in out's dtype.
    Backward (GRAD=True): out[b] = fp32 gradient w.r.t. [cls ; sum(patches)] of the pre-normalisation vector,
    i.e. the normalisation's backward applied to grad_out, patch half divided by P."""
    b = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    ok = cols < D
    row = out_ptr + b.to(tl.int64) * 2 * D
    if NORMALIZE or not GRAD:  # the pooled vector itself
        cls = tl.load(x_ptr + b.to(tl.int64) * stride_b + cols * stride_d, mask=ok, other=0.0).to(tl.float32)
        total = tl.zeros([BLOCK_D], dtype=tl.float32)
        for s in range(n_splits):
            total += tl.load(part_ptr + (b * n_splits + s) * D + cols, mask=ok, other=0.0)
        patch = total / n_patches
        if HAS_LN:
            mean = tl.sum(cls, axis=0) / D
            xc = tl.where(ok, cls - mean, 0.0)
            cls = xc / tl.sqrt(tl.sum(xc * xc, axis=0) / D + eps)
            w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
            cls = cls * w
            patch = patch * w
            if HAS_BIAS:
                bias = tl.load(bias_ptr + cols, mask=ok, other=0.0).to(tl.float32)
                cls += bias
                patch += bias
        if NORMALIZE:
            norm = tl.sqrt(tl.sum(cls * cls, axis=0) + tl.sum(patch * patch, axis=0))
            clamped = tl.maximum(norm, _NORM_EPS)
            cls = cls / clamped
            patch = patch / clamped
    if GRAD:
        g_row = g_ptr + b.to(tl.int64) * g_stride_b
        g_cls = tl.load(g_row + cols * g_stride_d, mask=ok, other=0.0).to(tl.float32)
        g_patch = tl.load(g_row + (D + cols) * g_stride_d, mask=ok, other=0.0).to(tl.float32)
        if NORMALIZE:  # d/dx of x / max(|x|, eps), with cls and patch now the normalised halves
            dot = tl.sum(g_cls * cls, axis=0) + tl.sum(g_patch * patch, axis=0)
            keep = (norm > _NORM_EPS).to(tl.float32)
            g_cls = (g_cls - keep * cls * dot) / clamped
            g_patch = (g_patch - keep * patch * dot) / clamped
        tl.store(row + cols, g_cls, mask=ok)
        tl.store(row + D + cols, g_patch / n_patches, mask=ok)
    else:
        tl.store(row + cols, cls.to(out_ptr.dtype.element_ty), mask=ok)
        tl.store(row + D + cols, patch.to(out_ptr.dtype.element_ty), mask=ok)


# No 16-warp candidates: 16 warps leave 128 registers a thread, and the backward's seven live tiles spill there.
@autotune("pooling._pool_backward", _configs((4, 2, 8), (4, 8)), key=["D", "n_tokens", "HAS_LN"],
          interpret=_INTERPRET_CONFIG, prune=_prune(_BWD_PER_THREAD))
@triton.jit
def _pool_backward(x_ptr, stride_b, stride_n, stride_d, g_ptr, w_ptr, dx_ptr, part_ptr, n_tokens, num_registers,
                   rows_per_split, D, eps, HAS_LN: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """d_tokens of rows [s * rows_per_split, ...) of image b; with LN also the partial sums of dy * xhat and dy
    (part[b * S + s] = [d_weight part ; d_bias part])."""
    b = tl.program_id(0)
    s = tl.program_id(1)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < D
    g_cls = tl.load(g_ptr + b.to(tl.int64) * 2 * D + cols, mask=col_ok, other=0.0)
    g_patch = tl.load(g_ptr + b.to(tl.int64) * 2 * D + D + cols, mask=col_ok, other=0.0)
    begin = s * rows_per_split
    end = tl.minimum(begin + rows_per_split, n_tokens)
    x_base = x_ptr + b.to(tl.int64) * stride_b
    dx_base = dx_ptr + b.to(tl.int64) * n_tokens * D
    if HAS_LN:
        w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        acc_w = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        acc_b = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for r in range(begin, end, BLOCK_N):
        rows = r + tl.arange(0, BLOCK_N)
        mask = (rows < end)[:, None] & col_ok[None, :]
        # cls row: the cls half of the gradient; registers: nothing; patches: the patch half (already / P)
        dy = tl.where((rows == 0)[:, None], g_cls[None, :],
                      tl.where((rows > num_registers)[:, None], g_patch[None, :], 0.0))
        dy = tl.where(mask, dy, 0.0)
        if HAS_LN:
            x = tl.load(x_base + rows[:, None] * stride_n + cols[None, :] * stride_d, mask=mask,
                        other=0.0).to(tl.float32)
            xhat, rstd = _layer_norm_tile(x, mask, D, eps)
            dxhat = dy * w[None, :]
            c1 = tl.sum(dxhat, axis=1) / D
            c2 = tl.sum(dxhat * xhat, axis=1) / D
            dx = rstd[:, None] * (dxhat - c1[:, None] - xhat * c2[:, None])
            acc_w += dy * xhat
            acc_b += dy
        else:
            dx = dy
        tl.store(dx_base + rows[:, None] * D + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)
    if HAS_LN:
        part = part_ptr + (b * tl.num_programs(1) + s) * 2 * D
        tl.store(part + cols, tl.sum(acc_w, axis=0), mask=col_ok)
        tl.store(part + D + cols, tl.sum(acc_b, axis=0), mask=col_ok)


@triton.jit
def _column_sum(part_ptr, n_rows, n_cols, rows_per_program, out_ptr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """out[s, :] = sum of rows [s * rows_per_program, ...) of part [n_rows, n_cols] (fp32, fixed order)."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    s = tl.program_id(1)
    col_ok = cols < n_cols
    begin = s * rows_per_program
    end = tl.minimum(begin + rows_per_program, n_rows)
    acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    for r in range(begin, end, BLOCK_R):
        rows = r + tl.arange(0, BLOCK_R)
        mask = (rows < end)[:, None] & col_ok[None, :]
        acc += tl.load(part_ptr + rows[:, None].to(tl.int64) * n_cols + cols[None, :], mask=mask, other=0.0)
    tl.store(out_ptr + s * n_cols + cols, tl.sum(acc, axis=0), mask=col_ok)


_SUM_ROWS, _SUM_BLOCK_R, _SUM_BLOCK_C = 128, 32, 128


def sum_rows(part: torch.Tensor) -> torch.Tensor:
    """Column sums of an fp32 [n, m] tensor in a fixed order (deterministic), as an fp32 [m]."""
    while part.shape[0] > 1:
        n, m = part.shape
        chunks = triton.cdiv(n, _SUM_ROWS)
        out = _empty(chunks, m, dtype=torch.float32, device=part.device)
        _column_sum[(triton.cdiv(m, _SUM_BLOCK_C), chunks)](part, n, m, _SUM_ROWS, out, BLOCK_R=_SUM_BLOCK_R,
                                                            BLOCK_C=_SUM_BLOCK_C)
        part = out
    return part[0]


def _finalize_warps(d: int) -> int:
    """About 8 elements of each of the finalize kernel's D-vectors per thread."""
    return max(4, min(16, triton.next_power_of_2(d) // 256))


def _pooled_partials(tokens, num_registers, has_ln, eps):
    b, n, d = tokens.shape
    n_patches = n - 1 - num_registers
    splits, per = row_splits(b, n_patches, tokens.device)
    part = _empty(b, splits, d, dtype=torch.float32, device=tokens.device)
    _pool_partial[(b, splits)](tokens, *tokens.stride(), part, 1 + num_registers, n_patches, per, d, eps,
                               HAS_LN=has_ln, BLOCK_D=triton.next_power_of_2(d))
    return part, splits


def patch_pool_forward(tokens, num_registers: int, ln_weight, ln_bias, eps: float, normalize: bool):
    b, n, d = tokens.shape
    # the kernels index the LayerNorm parameters densely (they are tiny: a copy only if they are strided views)
    ln_weight = ln_weight.contiguous() if ln_weight is not None else None
    ln_bias = ln_bias.contiguous() if ln_bias is not None else None
    has_ln = ln_weight is not None
    part, splits = _pooled_partials(tokens, num_registers, has_ln, eps)
    out = _empty(b, 2 * d, dtype=tokens.dtype, device=tokens.device)
    _pool_finalize[(b,)](tokens, tokens.stride(0), tokens.stride(2), part, splits,
                         ln_weight if has_ln else part, ln_bias if ln_bias is not None else part,
                         part, 0, 0, out, d, n - 1 - num_registers, eps, HAS_LN=has_ln, HAS_BIAS=ln_bias is not None,
                         NORMALIZE=normalize, GRAD=False, BLOCK_D=triton.next_power_of_2(d),
                         num_warps=_finalize_warps(d))
    return out


def patch_pool_backward(grad_out, tokens, num_registers: int, ln_weight, ln_bias, eps: float, normalize: bool):
    b, n, d = tokens.shape
    # the kernels index the LayerNorm parameters densely (they are tiny: a copy only if they are strided views)
    ln_weight = ln_weight.contiguous() if ln_weight is not None else None
    ln_bias = ln_bias.contiguous() if ln_bias is not None else None
    has_ln = ln_weight is not None
    block_d = triton.next_power_of_2(d)
    device = tokens.device
    if normalize:
        part, splits = _pooled_partials(tokens, num_registers, has_ln, eps)
    else:
        part, splits = _empty(1, dtype=torch.float32, device=device), 0
    g = _empty(b, 2 * d, dtype=torch.float32, device=device)
    _pool_finalize[(b,)](tokens, tokens.stride(0), tokens.stride(2), part, splits,
                         ln_weight if has_ln else g, ln_bias if ln_bias is not None else g,
                         grad_out, grad_out.stride(0), grad_out.stride(1), g, d, n - 1 - num_registers, eps,
                         HAS_LN=has_ln, HAS_BIAS=ln_bias is not None, NORMALIZE=normalize, GRAD=True,
                         BLOCK_D=block_d, num_warps=_finalize_warps(d))
    splits, per = row_splits(b, n, device)
    d_tokens = _empty(b, n, d, dtype=tokens.dtype, device=device)
    ln_part = _empty(b * splits if has_ln else 1, 2 * d, dtype=torch.float32, device=device)
    _pool_backward[(b, splits)](tokens, *tokens.stride(), g, ln_weight if has_ln else g, d_tokens, ln_part, n,
                                num_registers, per, d, eps, HAS_LN=has_ln, BLOCK_D=block_d)
    if not has_ln:
        return d_tokens, None, None
    sums = sum_rows(ln_part)
    # copies: the two gradients must not alias one buffer (a torch.library rule)
    d_bias = sums[d:].to(ln_bias.dtype, copy=True) if ln_bias is not None else None
    return d_tokens, sums[:d].to(ln_weight.dtype, copy=True), d_bias


add_kernels("triton", "patch_pool",
            {"patch_pool_forward": patch_pool_forward, "patch_pool_backward": patch_pool_backward},
            supports=pooling_supports("Triton", MAX_DIM))
