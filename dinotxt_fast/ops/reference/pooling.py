"""Reference patch pooling (the "torch" backend's patch_pool family): `[cls ; mean(patches)]` with the optional
LayerNorm and L2 normalisation, in bounded batch chunks; the backward recomputes the cheap forward."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..dispatch import add_kernels
from ..planning import NORM_EPS, accumulation_dtype
from . import common


def _batch_chunks(tokens) -> list:
    """Views of tokens [B, N, D] along the batch, each small enough that its fp32 temporaries stay bounded
    (common.CHUNK_ELEMENTS): the reference never upcasts a whole [1024, 261, 1024] batch at once."""
    per_sample = max(1, tokens.shape[1] * tokens.shape[2])
    return list(tokens.split(max(1, common.CHUNK_ELEMENTS // per_sample)))


def patch_pool_forward(tokens, num_registers: int, ln_weight, ln_bias, eps: float, normalize: bool):
    """[cls ; mean(patches)] of (optionally layer-normed) tokens [B, 1+R+P, D] -> [B, 2D] in tokens' dtype."""
    chunks = _batch_chunks(tokens)
    if len(chunks) > 1:
        return torch.cat([patch_pool_forward(c, num_registers, ln_weight, ln_bias, eps, normalize) for c in chunks])
    x = tokens.to(accumulation_dtype(tokens.dtype))
    if ln_weight is not None:
        x = F.layer_norm(x, x.shape[-1:], ln_weight.to(x.dtype), None if ln_bias is None else ln_bias.to(x.dtype), eps)
    pooled = torch.cat([x[:, 0], x[:, 1 + num_registers:].mean(1)], dim=-1)
    if normalize:
        pooled = F.normalize(pooled, dim=-1, eps=NORM_EPS)
    return pooled.to(tokens.dtype)


def patch_pool_backward(grad_out, tokens, num_registers: int, ln_weight, ln_bias, eps: float, normalize: bool):
    """(d_tokens, d_ln_weight | None, d_ln_bias | None); recomputes the cheap forward rather than storing it."""
    chunks = _batch_chunks(tokens)
    if len(chunks) > 1:  # per-sample independent; the LayerNorm parameter gradients add up over chunks
        parts = [patch_pool_backward(g, c, num_registers, ln_weight, ln_bias, eps, normalize)
                 for g, c in zip(grad_out.split([c.shape[0] for c in chunks]), chunks)]
        d_weight = None if ln_weight is None else torch.stack(
            [p[1].to(accumulation_dtype(tokens.dtype)) for p in parts]).sum(0).to(ln_weight.dtype)
        d_bias = None if ln_bias is None else torch.stack(
            [p[2].to(accumulation_dtype(tokens.dtype)) for p in parts]).sum(0).to(ln_bias.dtype)
        return torch.cat([p[0] for p in parts]), d_weight, d_bias
    acc = accumulation_dtype(tokens.dtype)
    x = tokens.to(acc)
    b, n, d = x.shape
    n_patches = n - 1 - num_registers
    if ln_weight is not None:
        mean = x.mean(-1, keepdim=True)
        rstd = torch.rsqrt(x.var(-1, unbiased=False, keepdim=True) + eps)
        xhat = (x - mean) * rstd
        y = xhat * ln_weight.to(acc) + (0 if ln_bias is None else ln_bias.to(acc))
    else:
        y = x
    g = grad_out.to(acc)
    if normalize:
        pooled = torch.cat([y[:, 0], y[:, 1 + num_registers:].mean(1)], dim=-1)
        norm = pooled.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS)
        g = common.normalize_backward(g, pooled / norm, norm)
    dy = torch.zeros_like(x)
    dy[:, 0] = g[:, :d]
    dy[:, 1 + num_registers:] = (g[:, d:] / n_patches)[:, None, :]
    if ln_weight is None:
        return dy.to(tokens.dtype), None, None
    d_weight = (dy * xhat).sum((0, 1)).to(ln_weight.dtype)
    d_bias = None if ln_bias is None else dy.sum((0, 1)).to(ln_bias.dtype)
    dxhat = dy * ln_weight.to(acc)
    dx = rstd * (dxhat - dxhat.mean(-1, keepdim=True) - xhat * (dxhat * xhat).mean(-1, keepdim=True))
    return dx.to(tokens.dtype), d_weight, d_bias


add_kernels("torch", "patch_pool",
            {"patch_pool_forward": patch_pool_forward, "patch_pool_backward": patch_pool_backward})
