"""CUDA patch pooling (dinotxt_fast._C.pool_*), same contract as reference/pooling.py's patch_pool_forward /
patch_pool_backward; the row split heuristic is planning.row_splits, shared with the Triton kernels."""
from __future__ import annotations

import torch

from ... import _ext
from ..dispatch import add_kernels
from ..planning import DTYPE_CODES, cdiv, pooling_supports, row_splits
from . import require_extension

MAX_DIM = 1536  # a token row lives in the registers of one warp
_SUM_ROWS = 256
# Every output and workspace is allocated through this, so that tests can poison them (NaN / -1).
_empty = torch.empty


def _extension():
    return require_extension("pooling")


def _check(tokens: torch.Tensor) -> torch.Tensor:
    if tokens.device.type != "cuda":
        raise ValueError(f"patch_pool (cuda): tokens must be a CUDA tensor, got one on {tokens.device}")
    if tokens.dtype not in DTYPE_CODES:
        raise TypeError(f"patch_pool (cuda): tokens must be float32, float16 or bfloat16, got {tokens.dtype}")
    if tokens.shape[2] > MAX_DIM:
        raise ValueError(f"patch_pool (cuda): D must be <= {MAX_DIM}, got {tokens.shape[2]}")
    # The kernels read rows with unit stride along D (any batch / token strides).
    return tokens if tokens.stride(2) == 1 else tokens.contiguous()


def _fp32_copy(t):
    """A fresh (so 16-byte aligned) contiguous fp32 copy of a LayerNorm parameter, or None."""
    if t is None:
        return None
    return _empty(t.shape, dtype=torch.float32, device=t.device).copy_(t)


def _ptr(t) -> int:
    return 0 if t is None else t.data_ptr()


def sum_rows(ext, part: torch.Tensor) -> torch.Tensor:
    """Column sums of an fp32 [n, m] matrix in a fixed order (deterministic) -> fp32 [m]."""
    stream = _ext.current_stream_ptr(part.device)
    while part.shape[0] > 1:
        n, m = part.shape
        chunks = cdiv(n, _SUM_ROWS)
        out = _empty(chunks, m, dtype=torch.float32, device=part.device)
        ext.pool_column_sum(part.data_ptr(), n, m, _SUM_ROWS, out.data_ptr(), stream)
        part = out
    return part[0]


def patch_pool_forward(tokens, num_registers: int, ln_weight, ln_bias, eps: float, normalize: bool):
    ext = _extension()
    x = _check(tokens)
    b, n, d = x.shape
    splits, per = row_splits(b, n - 1 - num_registers, x.device)
    part = _empty(b * splits, d, dtype=torch.float32, device=x.device)
    out = _empty(b, 2 * d, dtype=x.dtype, device=x.device)
    weight, bias = _fp32_copy(ln_weight), _fp32_copy(ln_bias)
    ext.pool_forward(x.data_ptr(), DTYPE_CODES[x.dtype], b, n, d, x.stride(0), x.stride(1), num_registers,
                     _ptr(weight), _ptr(bias), float(eps), bool(normalize), part.data_ptr(), splits, per,
                     out.data_ptr(), _ext.current_stream_ptr(x.device))
    return out


def patch_pool_backward(grad_out, tokens, num_registers: int, ln_weight, ln_bias, eps: float, normalize: bool):
    ext = _extension()
    x = _check(tokens)
    b, n, d = x.shape
    if grad_out.shape != (b, 2 * d) or grad_out.device != x.device:
        raise ValueError(f"patch_pool (cuda): grad_out must be [{b}, {2 * d}] on {x.device}, got "
                         f"{tuple(grad_out.shape)} on {grad_out.device}")
    grad_out = grad_out.to(x.dtype)
    device = x.device
    fwd_splits, fwd_per = row_splits(b, n - 1 - num_registers, device)
    partial = _empty(b * fwd_splits if normalize else 1, d, dtype=torch.float32, device=device)
    gvec = _empty(b, 2 * d, dtype=torch.float32, device=device)
    splits, per = row_splits(b, n, device)
    has_ln = ln_weight is not None
    ln_part = _empty(b * splits if has_ln else 1, 2 * d, dtype=torch.float32, device=device)
    d_tokens = _empty(b, n, d, dtype=x.dtype, device=device)
    weight, bias = _fp32_copy(ln_weight), _fp32_copy(ln_bias)
    ext.pool_backward(grad_out.data_ptr(), grad_out.stride(0), grad_out.stride(1), x.data_ptr(), DTYPE_CODES[x.dtype],
                      b, n, d, x.stride(0), x.stride(1), num_registers, _ptr(weight), _ptr(bias), float(eps),
                      bool(normalize), partial.data_ptr(), fwd_splits, fwd_per, gvec.data_ptr(), splits, per,
                      ln_part.data_ptr(), d_tokens.data_ptr(), _ext.current_stream_ptr(device))
    if not has_ln:
        return d_tokens, None, None
    sums = sum_rows(ext, ln_part)
    # copies: the two gradients must not alias one buffer (a torch.library rule)
    d_bias = sums[d:].to(ln_bias.dtype, copy=True) if ln_bias is not None else None
    return d_tokens, sums[:d].to(ln_weight.dtype, copy=True), d_bias


_C = _ext.extension()
if _C is not None and hasattr(_C, "pool_forward"):
    add_kernels("cuda", "patch_pool",
                {"patch_pool_forward": patch_pool_forward, "patch_pool_backward": patch_pool_backward},
                supports=pooling_supports("CUDA", MAX_DIM))
