"""Reference patch pooling (the "torch" backend's patch_pool family): `[cls ; mean(patches)]` with the optional
LayerNorm and L2 normalisation, in bounded batch chunks; the backward recomputes the cheap forward.

The LayerNorm's affine part is applied once, to the mean: mean_p(w * xhat_p + b) = w * mean_p(xhat_p) + b, with
xhat from torch.native_layer_norm (no weight), which also gives the statistics the backward needs. The backward is
closed-form (every patch receives the same upstream gradient g_mean / P), so it never materialises a per-token
upstream gradient, and writes d_tokens directly."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..dispatch import add_kernels
from ..planning import NORM_EPS, accumulation_dtype
from . import common


def _batch_chunks(tokens) -> list:
    """Views of tokens [B, N, D] along the batch, each small enough that its fp32 temporaries stay bounded
    (common.chunk_elements): the reference never upcasts a whole [1024, 261, 1024] batch at once."""
    per_sample = max(1, tokens.shape[1] * tokens.shape[2])
    return list(tokens.split(max(1, common.chunk_elements(tokens.device) // per_sample)))


class _Pooled:
    """One chunk in the accumulation dtype: the cls token and the patch tokens [B, P, D], normalised (without the
    affine part: xhat) when there is a LayerNorm, with their statistics mean / rstd [B, P, 1]."""

    def __init__(self, tokens, num_registers: int, ln_weight, ln_bias, eps: float):
        self.acc = accumulation_dtype(tokens.dtype)
        x = tokens.to(self.acc).contiguous()  # one layout: strided and contiguous tokens give the same bits
        self.weight = None if ln_weight is None else ln_weight.to(self.acc)
        self.bias = None if ln_bias is None else ln_bias.to(self.acc)
        patches = slice(1 + num_registers, None)
        if self.weight is not None:
            x, mean, rstd = torch.native_layer_norm(x, x.shape[-1:], None, None, eps)
            self.mean, self.rstd = mean[:, patches], rstd[:, patches]
            self.cls_rstd = rstd[:, 0]
        self.cls, self.patches = x[:, 0], x[:, patches]
        self.mean_patch = self.patches.mean(1)

    def pooled(self):
        if self.weight is None:
            return torch.cat([self.cls, self.mean_patch], dim=-1)
        bias = 0 if self.bias is None else self.bias
        return torch.cat([self.cls * self.weight + bias, self.mean_patch * self.weight + bias], dim=-1)


def patch_pool_forward(tokens, num_registers: int, ln_weight, ln_bias, eps: float, normalize: bool):
    """[cls ; mean(patches)] of (optionally layer-normed) tokens [B, 1+R+P, D] -> [B, 2D] in tokens' dtype."""
    out = tokens.new_empty((tokens.shape[0], 2 * tokens.shape[2]))
    start = 0
    for chunk in _batch_chunks(tokens):
        pooled = _Pooled(chunk, num_registers, ln_weight, ln_bias, eps).pooled()
        if normalize:
            pooled = F.normalize(pooled, dim=-1, eps=NORM_EPS)
        out[start:start + chunk.shape[0]] = pooled
        start += chunk.shape[0]
    return out


def _layer_norm_backward(dxhat, xhat, rstd):
    """d x of xhat = LayerNorm(x) (no affine part) over the last dim, given d xhat, per row."""
    return rstd * (dxhat - dxhat.mean(-1, keepdim=True) - xhat * (dxhat * xhat).mean(-1, keepdim=True))


def patch_pool_backward(grad_out, tokens, num_registers: int, ln_weight, ln_bias, eps: float, normalize: bool):
    """(d_tokens, d_ln_weight | None, d_ln_bias | None); recomputes the cheap forward rather than storing it, chunk by
    chunk of the batch (per-sample independent; the LayerNorm parameter gradients add up over chunks)."""
    acc = accumulation_dtype(tokens.dtype)
    d_tokens = torch.empty(tokens.shape, dtype=acc, device=tokens.device)
    d_weight = None if ln_weight is None else torch.zeros(ln_weight.shape, dtype=acc, device=tokens.device)
    d_bias = None if ln_bias is None else torch.zeros(ln_bias.shape, dtype=acc, device=tokens.device)
    start = 0
    for chunk in _batch_chunks(tokens):
        rows = slice(start, start + chunk.shape[0])
        _backward_chunk(grad_out[rows], chunk, num_registers, ln_weight, ln_bias, eps, normalize, d_tokens[rows],
                        d_weight, d_bias)
        start = rows.stop
    return (d_tokens.to(tokens.dtype), None if d_weight is None else d_weight.to(ln_weight.dtype),
            None if d_bias is None else d_bias.to(ln_bias.dtype))


def _backward_chunk(grad_out, tokens, num_registers: int, ln_weight, ln_bias, eps: float, normalize: bool, dx,
                    d_weight, d_bias) -> None:
    """One chunk: dx <- d tokens; d_weight / d_bias (when present) += the chunk's LayerNorm parameter gradients."""
    pool = _Pooled(tokens, num_registers, ln_weight, ln_bias, eps)
    d, n_patches = tokens.shape[2], pool.patches.shape[1]
    g = grad_out.to(pool.acc)
    if normalize:
        pooled = pool.pooled()
        norm = pooled.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS)
        g = common.normalize_backward(g, pooled / norm, norm)
    g_cls, g_mean = g[:, :d], g[:, d:]
    dx[:, 1:1 + num_registers] = 0
    if pool.weight is None:
        dx[:, 0] = g_cls
        dx[:, 1 + num_registers:] = (g_mean / n_patches)[:, None, :]
        return
    dx[:, 0] = _layer_norm_backward(g_cls * pool.weight, pool.cls, pool.cls_rstd)
    # Every patch's d xhat is the same u = g_mean * w / P: dx_p = rstd_p (u - mean(u) - xhat_p c_p) with
    # c_p = mean_d(u * xhat_p), one batched matrix product.
    u = g_mean * pool.weight / n_patches
    c = torch.bmm(pool.patches, u[:, :, None]) / d  # [B, P, 1]
    out = torch.mul(pool.patches, -pool.rstd * c, out=dx[:, 1 + num_registers:])
    out.addcmul_(pool.rstd, (u - u.mean(-1, keepdim=True))[:, None, :])
    d_weight += (g_cls * pool.cls).sum(0) + (g_mean * pool.mean_patch).sum(0)
    if d_bias is not None:
        d_bias += (g_cls + g_mean).sum(0)


add_kernels("torch", "patch_pool",
            {"patch_pool_forward": patch_pool_forward, "patch_pool_backward": patch_pool_backward})
