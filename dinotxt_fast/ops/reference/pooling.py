"""Reference patch pooling (the "torch" backend's patch_pool family): `[cls ; mean(patches)]` with the optional
LayerNorm and L2 normalisation, in bounded batch chunks; the backward recomputes the cheap forward.

The LayerNorm's affine part is applied once, to the mean: mean_p(w * xhat_p + b) = w * mean_p(xhat_p) + b, with
xhat from torch.native_layer_norm (unit weight), which also gives the statistics the backward needs. The backward is
closed-form (every patch receives the same upstream gradient g_mean / P), so it never materialises a per-token
upstream gradient, and writes d_tokens directly. Small problems (the embedded trainer's 64x65x64) are dominated by
the per-op cost (~2 us an op on a CPU), so the cls token and the mean travel together as one [B, 2, D] tensor (the
[B, 2D] output's own layout) and a batch that fits one chunk is computed in place, without a copy."""
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
    """One chunk in the accumulation dtype: the tokens [B, N, D] normalised without the affine part (xhat) when there
    is a LayerNorm, with their rstd [B, N, 1], and the mean of the patch tokens [B, D]."""

    def __init__(self, tokens, num_registers: int, ln_weight, ln_bias, eps: float):
        self.acc = accumulation_dtype(tokens.dtype)
        x = tokens.to(self.acc).contiguous()  # one layout: strided and contiguous tokens give the same bits
        self.weight = None if ln_weight is None else ln_weight.to(self.acc)
        self.bias = None if ln_bias is None else ln_bias.to(self.acc)
        self.first_patch = 1 + num_registers
        if self.weight is not None:
            # A unit weight and zero bias rather than None: ATen's CPU LayerNorm without them takes a path about
            # twice as slow (measured: 64x65x64 fp32, 1 thread), and x * 1 + 0 is xhat exactly.
            ones = x.new_ones(x.shape[-1:])
            x, _, self.rstd = torch.native_layer_norm(x, x.shape[-1:], ones, torch.zeros_like(ones), eps)
        self.xhat = x
        # sum then divide: Tensor.mean over the strided token dim measured 3x slower than sum (64x65x64, 1 thread)
        self.mean_patch = x[:, self.first_patch:].sum(1).div_(x.shape[1] - self.first_patch)

    def pooled(self):
        """[B, 2, D]: (cls, mean of the patches), affine part applied; viewed as [B, 2D] it is the output."""
        both = torch.stack([self.xhat[:, 0], self.mean_patch], 1)
        if self.weight is None:
            return both
        return both.mul_(self.weight) if self.bias is None else torch.addcmul(self.bias, both, self.weight)


def _pool_chunk(tokens, num_registers: int, ln_weight, ln_bias, eps: float, normalize: bool):
    pooled = _Pooled(tokens, num_registers, ln_weight, ln_bias, eps).pooled().view(tokens.shape[0], -1)
    return F.normalize(pooled, dim=-1, eps=NORM_EPS) if normalize else pooled


def patch_pool_forward(tokens, num_registers: int, ln_weight, ln_bias, eps: float, normalize: bool):
    """[cls ; mean(patches)] of (optionally layer-normed) tokens [B, 1+R+P, D] -> [B, 2D] in tokens' dtype."""
    chunks = _batch_chunks(tokens)
    if len(chunks) == 1:
        return _pool_chunk(tokens, num_registers, ln_weight, ln_bias, eps, normalize).to(tokens.dtype)
    out = tokens.new_empty((tokens.shape[0], 2 * tokens.shape[2]))
    start = 0
    for chunk in chunks:
        out[start:start + chunk.shape[0]] = _pool_chunk(chunk, num_registers, ln_weight, ln_bias, eps, normalize)
        start += chunk.shape[0]
    return out


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
    b, d, first = tokens.shape[0], tokens.shape[2], pool.first_patch
    n_patches = tokens.shape[1] - first
    g = grad_out.to(pool.acc)
    if normalize:
        pooled = pool.pooled().view(b, -1)
        norm = pooled.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS)
        g = common.normalize_backward(g, pooled / norm, norm)
    g = g.reshape(b, 2, d)  # (g_cls, g_mean) per sample
    if num_registers:
        dx[:, 1:first] = 0
    if pool.weight is None:
        dx[:, 0] = g[:, 0]
        dx[:, first:] = (g[:, 1] / n_patches)[:, None, :]
        return
    # d xhat is v = g_cls * w for the cls token and the same u = g_mean * w / P for every patch: with t = v or u,
    # dx = rstd (t - mean(t) - xhat c), c = mean_d(t * xhat); the patches' c is one batched matrix product.
    t = g * pool.weight
    t[:, 1].div_(n_patches)
    centred = t - t.mean(-1, keepdim=True)
    xhat, rstd = pool.xhat, pool.rstd
    cls_c = (t[:, 0] * xhat[:, 0]).mean(-1, keepdim=True)
    torch.addcmul(centred[:, 0], xhat[:, 0], cls_c, value=-1, out=dx[:, 0]).mul_(rstd[:, 0])
    patches, patch_rstd = xhat[:, first:], rstd[:, first:]
    # rstd * c * D as [B, 1, P] (u^T xhat^T: measured 2x faster on a CPU than xhat u's [B, P, 1]), viewed [B, P, 1]
    coef = torch.bmm(t[:, 1, None, :], patches.transpose(1, 2)).transpose(1, 2).mul_(patch_rstd)
    out = torch.mul(patch_rstd, centred[:, 1, None, :], out=dx[:, first:])
    out.addcmul_(patches, coef, value=-1.0 / d)
    d_weight += (g * torch.stack([xhat[:, 0], pool.mean_patch], 1)).sum((0, 1))
    if d_bias is not None:
        d_bias += g.sum((0, 1))


add_kernels("torch", "patch_pool",
            {"patch_pool_forward": patch_pool_forward, "patch_pool_backward": patch_pool_backward})
