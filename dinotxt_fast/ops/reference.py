"""PyTorch reference implementations of every op: the "torch" backend and the oracle the kernels are tested against.

They run anywhere (CPU, CUDA, float64), compute in float32 (float64 for float64 inputs) and keep memory bounded by
working in chunks, so that the reference path is usable on real shapes, not only in tests. Each op family has a
forward returning what its backward needs and a backward taking exactly that: the contract the Triton and CUDA
backends implement too.
"""
from __future__ import annotations

import math
from typing import Optional, Protocol

import torch
import torch.nn.functional as F

# Elements of one chunk of attention scores or of upsampled logits (64 Mi floats = 256 MB in fp32).
_CHUNK_ELEMENTS = 1 << 26


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------------------------------- attention
def _causal_mask(rows: torch.Tensor, n_keys: int, device) -> torch.Tensor:
    """True where a query row may attend to a key (top-left aligned: row i sees keys <= i)."""
    return torch.arange(n_keys, device=device)[None, :] <= rows[:, None]


def _query_chunk(b: int, h: int, n_q: int, n_k: int) -> int:
    return max(1, min(n_q, _CHUNK_ELEMENTS // max(1, b * h * n_k)))


def _masked_scores(qf, kf, rows: slice, causal: bool, scale: float, lengths):
    """Scaled scores [B,H,rows,Nk] of the query rows `rows`, -inf where the causal mask or `lengths` hide a key."""
    n_k = kf.shape[2]
    s = torch.matmul(qf[:, :, rows], kf.transpose(-1, -2)) * scale
    if causal:
        mask = _causal_mask(torch.arange(rows.start, rows.stop, device=qf.device), n_k, qf.device)
        s = s.masked_fill(~mask, float("-inf"))
    if lengths is not None:
        hidden = torch.arange(n_k, device=qf.device)[None, :] >= lengths.to(qf.device, torch.int64)[:, None]
        s = s.masked_fill(hidden[:, None, None, :], float("-inf"))
    return s


def _finite_lse(lse):
    """lse with the -inf of rows that see no key replaced by 0, so exp(s - lse) is exp(-inf) = 0 there, not NaN."""
    return torch.where(lse == float("-inf"), torch.zeros_like(lse), lse)


def attention_forward(q, k, v, causal: bool, scale: float, lengths=None):
    """o [B,N,H,Dh] (q's dtype, contiguous) and the log-sum-exp of the scaled scores, lse [B,H,N] (fp32/fp64).

    `lengths` (int [B] or None): keys at positions >= lengths[b] are masked for every query of sequence b. A row
    that sees no key at all (lengths[b] <= 0) gets o = 0, lse = -inf and zero gradients."""
    acc = accumulation_dtype(q.dtype)
    b, n_q, h, _ = q.shape
    n_k = k.shape[1]
    qf, kf, vf = (t.transpose(1, 2).to(acc).contiguous() for t in (q, k, v))  # [B,H,N,Dh]
    o = torch.empty(b, h, n_q, v.shape[-1], dtype=acc, device=q.device)
    lse = torch.empty(b, h, n_q, dtype=acc, device=q.device)
    step = _query_chunk(b, h, n_q, n_k)
    for start in range(0, n_q, step):
        rows = slice(start, min(start + step, n_q))
        s = _masked_scores(qf, kf, rows, causal, scale, lengths)
        lse_chunk = torch.logsumexp(s, dim=-1)
        o[:, :, rows] = torch.matmul(torch.exp(s - _finite_lse(lse_chunk)[..., None]), vf)
        lse[:, :, rows] = lse_chunk
    return o.transpose(1, 2).to(q.dtype).contiguous(), lse


def sdpa_forward_applies(q) -> bool:
    """Whether the torch backend answers a gradient-free attention call with PyTorch's fused SDPA kernels: on CUDA
    (flash / memory-efficient / cuDNN). On a CPU the chunked reference stays (it is the float64 test oracle)."""
    return q.is_cuda


def attention_forward_sdpa(q, k, v, causal: bool, scale: float, lengths=None):
    """o [B,N,H,Dh] in q's dtype (contiguous) by torch.nn.functional.scaled_dot_product_attention, the same result
    as attention_forward's o (no lse): `lengths` become a key mask; rows that see no key get o = 0, not NaN."""
    n_q, n_k = q.shape[1], k.shape[1]
    mask = None
    if lengths is not None:
        lengths = lengths.to(q.device, torch.int64)
        mask = (torch.arange(n_k, device=q.device)[None, :] < lengths[:, None])[:, None, None, :]  # [B,1,1,Nk]
        if causal:
            mask = mask & _causal_mask(torch.arange(n_q, device=q.device), n_k, q.device)
    with torch.autocast(q.device.type, enabled=False):  # o in q's dtype, like every backend
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                           is_causal=causal and mask is None, scale=scale).transpose(1, 2)
    if lengths is not None:
        o = o.masked_fill((lengths <= 0)[:, None, None, None], 0.0)
    return o.contiguous()


def attention_backward(grad_o, q, k, v, o, lse, causal: bool, scale: float, lengths=None):
    """dq, dk, dv (inputs' dtypes, contiguous) from the forward's o and lse (FlashAttention-2 formulas)."""
    acc = accumulation_dtype(q.dtype)
    b, n_q, h, _ = q.shape
    n_k = k.shape[1]
    qf, kf, vf, of, dof = (t.transpose(1, 2).to(acc).contiguous() for t in (q, k, v, o, grad_o))
    delta = (dof * of).sum(-1)  # [B,H,N]: rowsum(dO * O) = rowsum(P * dP)
    dq = torch.empty_like(qf)
    dk = torch.zeros_like(kf)
    dv = torch.zeros_like(vf)
    lse = _finite_lse(lse.to(acc))
    step = _query_chunk(b, h, n_q, n_k)
    for start in range(0, n_q, step):
        rows = slice(start, min(start + step, n_q))
        s = _masked_scores(qf, kf, rows, causal, scale, lengths)
        p = torch.exp(s - lse[:, :, rows, None])
        dv += torch.matmul(p.transpose(-1, -2), dof[:, :, rows])
        dp = torch.matmul(dof[:, :, rows], vf.transpose(-1, -2))
        ds = p * (dp - delta[:, :, rows, None]) * scale
        dq[:, :, rows] = torch.matmul(ds, kf)
        dk += torch.matmul(ds.transpose(-1, -2), qf[:, :, rows])
    back = lambda t, like: t.transpose(1, 2).to(like.dtype).contiguous()  # noqa: E731
    return back(dq, q), back(dk, k), back(dv, v)


# ------------------------------------------------------------------------------------------------ patch pooling
_NORM_EPS = 1e-12  # F.normalize's clamp of the norm


def _normalize_backward(grad, y, norm):
    """Gradient of y = x / max(||x||, eps) w.r.t. x, given the output y, its gradient and the clamped norms [B, 1]."""
    return torch.where(norm > _NORM_EPS, (grad - y * (grad * y).sum(-1, keepdim=True)) / norm, grad / norm)


def _batch_chunks(tokens) -> list:
    """Views of tokens [B, N, D] along the batch, each small enough that its fp32 temporaries stay bounded
    (_CHUNK_ELEMENTS): the reference never upcasts a whole [1024, 261, 1024] batch at once."""
    per_sample = max(1, tokens.shape[1] * tokens.shape[2])
    return list(tokens.split(max(1, _CHUNK_ELEMENTS // per_sample)))


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
        pooled = F.normalize(pooled, dim=-1, eps=_NORM_EPS)
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
        norm = pooled.norm(dim=-1, keepdim=True).clamp_min(_NORM_EPS)
        g = _normalize_backward(g, pooled / norm, norm)
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


# --------------------------------------------------------------------------------------------- contrastive loss
# Every backend computes the loss from a pair of "partial" kernels: rows (images) against columns (texts), tile by
# tile, never holding the [rows, columns] logits. s_ij = exp(logit_scale) * <img_i, txt_j> (of the L2-normalised
# rows with `normalize`); the positive of row i is column i + diag_offset.
#   partial forward  -> lse_rows [M] (over all N columns), lse_cols [N] (over these M rows only: the distributed
#                       path merges the ranks' values), both float64, and diag [M] = s_{i, i+offset} in fp32 (fp64
#                       for fp64 inputs). The log-sum-exps are float64 because the backward takes exp(s - lse) for
#                       s ~ lse ~ exp(logit_scale) = 14..100, where an fp32 lse would be off by ~1e-6 absolute: that
#                       alone is a 1e-5 relative error on dS = P - 1 of a confident positive. Kernels split it into
#                       fp32 hi + lo and subtract hi first (exactly, for s near lse).
#   partial backward -> d_img [M, E] (img's dtype), g_txt [N, E] (fp32/fp64: the gradient with respect to the
#                       NORMALISED columns, so that the ranks' shares can be summed before the normalisation's
#                       backward), d_logit_scale; for
#                       dS_ij = row_coef_i (P_row_ij - d_ij) + col_coef_j (P_col_ij - d_ij),
#                       P_row = exp(s - lse_rows), P_col = exp(s - lse_cols), d_ij = [j == i + offset].
# The single-process loss is the pair with M = N, offset 0 and row_coef = col_coef = grad / (2B).
#
# The partial kernels of every backend share one host driver (tiled_partial_forward / tiled_partial_backward) over
# a backend's tile primitives (`ContrastiveTiles`):
# - forward: a grid of (row chunk, column chunk) programs; each loops over its tiles, keeps the rows' (max, sum of
#   exp(s - max)) online and merges the columns' into a per-row-chunk scratch row; a float64 merge over the chunks
#   finishes both log-sum-exps.
# - backward: columns in panels of bounded size: one kernel recomputes the panel's logits and writes dS (scaled by
#   the inverse norms and 1/kappa so that it fits fp16) to a [M, panel] buffer, then two GEMMs accumulate
#   d_img += dS @ txt_panel and write g_txt[panel] = dS^T @ img. Deterministic: no atomics, fixed reduction orders.
def _normalized(x, normalize: bool):
    """(x / max(||x||, eps), clamped norms [B, 1]) or (x, None)."""
    if not normalize:
        return x, None
    norm = x.norm(dim=-1, keepdim=True).clamp_min(_NORM_EPS)
    return x / norm, norm


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class ContrastiveTiles(Protocol):
    """Tile primitives of one backend; see tiled_partial_forward / tiled_partial_backward for how they compose.

    inv_* / norm_*: per-row 1 / max(||x||, eps) and max(||x||, eps) (ones without normalisation), accumulation dtype.
    Chunks must be multiples of the backend's tile sizes; panels a multiple of the column chunk."""

    def chunks(self, m: int, n: int) -> tuple[int, int]:
        ...

    def panel_columns(self, m: int, n: int, col_chunk: int, dtype: torch.dtype) -> int:
        ...

    def ds_dtype(self, dtype: torch.dtype) -> torch.dtype:
        ...

    def row_norms(self, x, normalize: bool):
        """-> (inv [R], norm [R])."""
        ...

    def forward_tiles(self, img, txt, inv_i, inv_t, logit_scale, offset, row_chunk, col_chunk, row_max, row_sum,
                      col_max, col_sum, diag):
        """Fill row_max / row_sum [n_col_chunks, M] (each row's max and sum of exp(s - max) over one column chunk),
        col_max / col_sum [n_row_chunks, N] (the same for each column over one row chunk) and diag [M]."""
        ...

    def ds_tiles(self, img, txt, inv_i, inv_t, logit_scale, lse_rows, lse_cols, row_coef, col_coef, inv_kappa, offset,
                 col_begin, col_end, row_chunk, col_chunk, ds, ds_dot_s):
        """For columns [col_begin, col_end): ds[:, j - col_begin] = dS_ij inv_i_i inv_t_j inv_kappa (ds.dtype) and
        ds_dot_s[row chunk, column chunk] = sum of dS_ij s_ij over the chunk pair (global column chunk index);
        lse_rows / lse_cols are float64."""
        ...

    def gemm(self, a, b, c, alpha, row_scale, accumulate: bool):
        """c (+)= alpha * row_scale[:, None] * (a @ b); c in the accumulation dtype; a and b may be strided views."""
        ...

    def normalize_backward(self, g, x, normalize: bool):
        """Gradient w.r.t. x (x's dtype) of x / max(||x||, eps), given g = the gradient w.r.t. that; g.to(x.dtype)
        without normalisation."""
        ...


def _check_partial(img, txt, diag_offset: int) -> None:
    if not 0 <= diag_offset <= txt.shape[0] - img.shape[0]:
        raise ValueError(f"contrastive partial kernels: diag_offset {diag_offset} must place the positives of the "
                         f"{img.shape[0]} rows inside the {txt.shape[0]} columns")


def merge_lse(maxes, sums):
    """log(sum_k sums[k] * exp(maxes[k])) over dim 0, in float64. Every entry has a finite max in every chunk."""
    maxes = maxes.to(torch.float64)
    top = maxes.max(dim=0).values
    return top + (sums.to(torch.float64) * torch.exp(maxes - top)).sum(dim=0).log()


def split_lse(lse, dtype: torch.dtype):
    """(hi, lo) in `dtype` with hi + lo = lse (float64): exp(s - lse) is then computed as exp((s - hi) - lo)."""
    hi = lse.to(dtype)
    return hi, (lse - hi.to(torch.float64)).to(dtype)


def tiled_partial_forward(tiles: ContrastiveTiles, img, txt, logit_scale, normalize: bool, diag_offset: int):
    """The partial forward (see above) of any backend, from its tile primitives."""
    _check_partial(img, txt, diag_offset)
    m, n = img.shape[0], txt.shape[0]
    acc = accumulation_dtype(img.dtype)
    inv_i, _ = tiles.row_norms(img, normalize)
    inv_t, _ = tiles.row_norms(txt, normalize)
    row_chunk, col_chunk = tiles.chunks(m, n)
    row_max = img.new_empty((_cdiv(n, col_chunk), m), dtype=acc)
    row_sum = torch.empty_like(row_max)
    col_max = img.new_empty((_cdiv(m, row_chunk), n), dtype=acc)
    col_sum = torch.empty_like(col_max)
    diag = img.new_empty((m,), dtype=acc)
    tiles.forward_tiles(img, txt, inv_i, inv_t, logit_scale, diag_offset, row_chunk, col_chunk, row_max, row_sum,
                        col_max, col_sum, diag)
    return merge_lse(row_max, row_sum), merge_lse(col_max, col_sum), diag


def tiled_partial_backward(tiles: ContrastiveTiles, img, txt, logit_scale, lse_rows, lse_cols, row_coef, col_coef,
                           normalize: bool, diag_offset: int):
    """The partial backward (see above) of any backend, from its tile primitives."""
    _check_partial(img, txt, diag_offset)
    m, n = img.shape[0], txt.shape[0]
    acc = accumulation_dtype(img.dtype)
    inv_i, norm_i = tiles.row_norms(img, normalize)
    inv_t, norm_t = tiles.row_norms(txt, normalize)
    row_coef, col_coef = row_coef.to(acc).contiguous(), col_coef.to(acc).contiguous()
    # dS is stored as dS * inv_i * inv_t / kappa, at most 2 in magnitude: no fp16 overflow, and no underflow from
    # the 1 / 2B of big batches (only rows whose norms are orders of magnitude above the batch's smallest reach
    # fp16's subnormals). The GEMMs multiply kappa back (alpha) with the norms (row scales).
    kappa = (torch.maximum(row_coef.abs().max(), col_coef.abs().max()) * inv_i.max() * inv_t.max()).reshape(1)
    kappa = torch.where(kappa > 0, kappa, torch.ones_like(kappa))
    alpha = logit_scale.detach().to(acc).reshape(1).exp() * kappa
    row_chunk, col_chunk = tiles.chunks(m, n)
    panel = min(tiles.panel_columns(m, n, col_chunk, tiles.ds_dtype(img.dtype)), _cdiv(n, col_chunk) * col_chunk)
    ds = img.new_empty((m, min(panel, n)), dtype=tiles.ds_dtype(img.dtype))
    ds_dot_s = img.new_empty((_cdiv(m, row_chunk), _cdiv(n, col_chunk)), dtype=acc)
    g_img = img.new_empty(img.shape, dtype=acc)
    g_txt = img.new_empty(txt.shape, dtype=acc)
    for begin in range(0, n, panel):
        end = min(begin + panel, n)
        ds_panel = ds[:, :end - begin]
        tiles.ds_tiles(img, txt, inv_i, inv_t, logit_scale, lse_rows, lse_cols, row_coef, col_coef, 1.0 / kappa,
                       diag_offset, begin, end, row_chunk, col_chunk, ds_panel, ds_dot_s)
        tiles.gemm(ds_panel, txt[begin:end], g_img, alpha, norm_i, accumulate=begin > 0)
        tiles.gemm(ds_panel.T, img, g_txt[begin:end], alpha, norm_t[begin:end], accumulate=False)
    d_img = tiles.normalize_backward(g_img, img, normalize)
    d_scale = ds_dot_s.sum().reshape(logit_scale.shape).to(logit_scale.dtype)
    return d_img, g_txt, d_scale


def single_forward(partial_forward, img, txt, logit_scale, normalize: bool):
    """The single-process op contract (loss, lse_rows, lse_cols) from a backend's partial forward."""
    lse_rows, lse_cols, diag = partial_forward(img, txt, logit_scale, normalize, 0)
    loss = 0.5 * ((lse_rows - diag).mean() + (lse_cols - diag).mean())
    return loss.to(diag.dtype), lse_rows, lse_cols


def single_backward(partial_backward, normalize_backward, grad_loss, img, txt, logit_scale, lse_rows, lse_cols,
                    normalize: bool):
    """(d_img, d_txt, d_logit_scale) of the single-process loss: dS = g / (2B) * (P_row + P_col - 2I)."""
    b = img.shape[0]
    coef = (grad_loss.detach().to(accumulation_dtype(img.dtype)).reshape(1) * (0.5 / b)).expand(b).contiguous()
    d_img, g_txt, d_scale = partial_backward(img, txt, logit_scale, lse_rows, lse_cols, coef, coef, normalize, 0)
    return d_img, normalize_backward(g_txt, txt, normalize), d_scale


def contrastive_normalize_backward(g, x, normalize: bool):
    """d/dx of x / max(||x||, eps) applied to g (the gradient w.r.t. the normalised rows) -> x's dtype."""
    if not normalize:
        return g.to(x.dtype)
    acc = accumulation_dtype(x.dtype)
    y, norm = _normalized(x.to(acc), True)
    return _normalize_backward(g.to(acc), y, norm).to(x.dtype)


class TorchTiles(ContrastiveTiles):
    """The tile primitives in PyTorch: chunks of up to _CHUNK_ELEMENTS logits, computed in fp32 (fp64 for fp64)."""

    def chunks(self, m, n):
        return m, max(1, min(n, _CHUNK_ELEMENTS // max(1, m)))

    def panel_columns(self, m, n, col_chunk, dtype):
        return col_chunk

    def ds_dtype(self, dtype):
        return accumulation_dtype(dtype)

    def row_norms(self, x, normalize):
        acc = accumulation_dtype(x.dtype)
        if not normalize:
            ones = torch.ones(x.shape[0], dtype=acc, device=x.device)
            return ones, ones
        norm = torch.linalg.vector_norm(x.to(acc), dim=1).clamp_min(_NORM_EPS)
        return 1.0 / norm, norm

    @staticmethod
    def _logits(img, txt, inv_i, inv_t, logit_scale, rows: slice, cols: slice):
        acc = inv_i.dtype
        scaled = img[rows].to(acc) * (inv_i[rows] * logit_scale.detach().to(acc).reshape(()).exp())[:, None]
        return scaled @ (txt[cols].to(acc) * inv_t[cols, None]).T

    @staticmethod
    def _diagonal(rows: slice, cols: slice, offset: int, device):
        """(i, j) local indices of the positives (i, i + offset) inside the block rows x cols."""
        i = torch.arange(rows.start, rows.stop, device=device)
        inside = (i + offset >= cols.start) & (i + offset < cols.stop)
        return i[inside] - rows.start, i[inside] + offset - cols.start

    def forward_tiles(self, img, txt, inv_i, inv_t, logit_scale, offset, row_chunk, col_chunk, row_max, row_sum,
                      col_max, col_sum, diag):
        m, n = img.shape[0], txt.shape[0]
        for a, r0 in enumerate(range(0, m, row_chunk)):
            rows = slice(r0, min(r0 + row_chunk, m))
            for b, c0 in enumerate(range(0, n, col_chunk)):
                cols = slice(c0, min(c0 + col_chunk, n))
                s = self._logits(img, txt, inv_i, inv_t, logit_scale, rows, cols)
                top = s.max(dim=1).values
                row_max[b, rows], row_sum[b, rows] = top, torch.exp(s - top[:, None]).sum(dim=1)
                top = s.max(dim=0).values
                col_max[a, cols], col_sum[a, cols] = top, torch.exp(s - top).sum(dim=0)
                i, j = self._diagonal(rows, cols, offset, s.device)
                diag[i + r0] = s[i, j]

    def ds_tiles(self, img, txt, inv_i, inv_t, logit_scale, lse_rows, lse_cols, row_coef, col_coef, inv_kappa, offset,
                 col_begin, col_end, row_chunk, col_chunk, ds, ds_dot_s):
        m = img.shape[0]
        (row_hi, row_lo), (col_hi, col_lo) = split_lse(lse_rows, inv_i.dtype), split_lse(lse_cols, inv_i.dtype)
        for a, r0 in enumerate(range(0, m, row_chunk)):
            rows = slice(r0, min(r0 + row_chunk, m))
            for c0 in range(col_begin, col_end, col_chunk):
                cols = slice(c0, min(c0 + col_chunk, col_end))
                s = self._logits(img, txt, inv_i, inv_t, logit_scale, rows, cols)
                d = (row_coef[rows, None] * torch.exp((s - row_hi[rows, None]) - row_lo[rows, None])
                     + col_coef[None, cols] * torch.exp((s - col_hi[None, cols]) - col_lo[None, cols]))
                i, j = self._diagonal(rows, cols, offset, s.device)
                d[i, j] -= row_coef[i + r0] + col_coef[j + c0]
                ds_dot_s[a, c0 // col_chunk] = (d * s).sum()
                ds[rows, c0 - col_begin:cols.stop - col_begin] = d * inv_i[rows, None] * inv_t[None, cols] * inv_kappa

    def gemm(self, a, b, c, alpha, row_scale, accumulate):
        out = (a.to(c.dtype) @ b.to(c.dtype)) * (alpha * row_scale[:, None])
        if accumulate:
            c += out
        else:
            c.copy_(out)

    def normalize_backward(self, g, x, normalize):
        return contrastive_normalize_backward(g, x, normalize)


TORCH_TILES = TorchTiles()


# Why the Triton and CUDA tiles refuse fp16 (the reference tiles store dS in fp32 and take it).
TILED_FP16_REASON = ("fp16 is not taken: the backward stores dS pre-scaled by the batch's largest inverse norms, "
                     "and one near-zero feature row would underflow every other row's dS in fp16's range; use bf16 "
                     "or fp32")


def tiled_dtype_problem(kernels: str, dtype: torch.dtype) -> Optional[str]:
    """Why the `kernels` ("Triton", "CUDA") contrastive tiles cannot take `dtype` (they take bf16 and fp32), or None:
    the dispatch's supports check of both kernel backends."""
    if dtype == torch.float16:
        return f"the {kernels} contrastive kernels: {TILED_FP16_REASON}"
    if dtype not in (torch.bfloat16, torch.float32):
        return (f"the {kernels} contrastive kernels take float32 or bfloat16, got {dtype} "
                "(use backend='torch' for float64)")
    return None


def tiled_kernels(tiles: ContrastiveTiles) -> dict:
    """The contrastive family's four kernels (dispatch.KERNELS["contrastive_loss"]) for a backend that provides
    the tile primitives: every backend shares this host driver, only the tiles differ."""

    def contrastive_partial_forward(img, txt, logit_scale, normalize: bool, diag_offset: int):
        """(lse_rows [M], partial lse_cols [N] (float64), diag [M]) of rows img [M, E] against columns txt [N, E]."""
        return tiled_partial_forward(tiles, img, txt, logit_scale, normalize, diag_offset)

    def contrastive_partial_backward(img, txt, logit_scale, lse_rows, lse_cols, row_coef, col_coef, normalize: bool,
                                     diag_offset: int):
        """(d_img [M, E], g_txt [N, E] w.r.t. the normalised columns, d_logit_scale); see the section comment."""
        return tiled_partial_backward(tiles, img, txt, logit_scale, lse_rows, lse_cols, row_coef, col_coef,
                                      normalize, diag_offset)

    def contrastive_forward(img, txt, logit_scale, normalize: bool):
        """Symmetric InfoNCE: (loss 0-d, lse_rows [B], lse_cols [B]) in fp32 (fp64 for fp64 inputs)."""
        return single_forward(contrastive_partial_forward, img, txt, logit_scale, normalize)

    def contrastive_backward(grad_loss, img, txt, logit_scale, lse_rows, lse_cols, normalize: bool):
        """(d_img, d_txt, d_logit_scale): dLogits = g / (2B) * (softmax_rows + softmax_cols - 2I)."""
        return single_backward(contrastive_partial_backward, tiles.normalize_backward, grad_loss, img, txt,
                               logit_scale, lse_rows, lse_cols, normalize)

    return {"contrastive_forward": contrastive_forward, "contrastive_backward": contrastive_backward,
            "contrastive_partial_forward": contrastive_partial_forward,
            "contrastive_partial_backward": contrastive_partial_backward}


CONTRASTIVE_KERNELS = tiled_kernels(TORCH_TILES)
contrastive_forward = CONTRASTIVE_KERNELS["contrastive_forward"]
contrastive_backward = CONTRASTIVE_KERNELS["contrastive_backward"]
contrastive_partial_forward = CONTRASTIVE_KERNELS["contrastive_partial_forward"]
contrastive_partial_backward = CONTRASTIVE_KERNELS["contrastive_partial_backward"]


class _GatherRows(torch.autograd.Function):
    """All-gather along dim 0 whose backward sums every rank's gradient and keeps this rank's rows."""

    @staticmethod
    def forward(ctx, x, group):
        import torch.distributed as dist

        world = dist.get_world_size(group)
        out = x.new_empty((world * x.shape[0], *x.shape[1:]))
        dist.all_gather_into_tensor(out, x.contiguous(), group=group)
        ctx.group, ctx.rows = group, x.shape[0]
        return out

    @staticmethod
    def backward(ctx, grad):
        import torch.distributed as dist

        # all_reduce + slice rather than reduce_scatter: the reference must run on gloo too.
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        rank = dist.get_rank(ctx.group)
        return grad[rank * ctx.rows:(rank + 1) * ctx.rows], None


def contrastive_loss_distributed(img, txt, logit_scale, normalize: bool, group):
    """This rank's share of the global loss: its rows against the gathered batch, both directions.

    The gather's backward sums every rank's terms into the local gradients, so averaging parameter gradients over
    ranks (DDP) reproduces the single-process step on the global batch."""
    import torch.distributed as dist

    acc = accumulation_dtype(img.dtype)
    i, _ = _normalized(img.to(acc), normalize)
    t, _ = _normalized(txt.to(acc), normalize)
    all_i, all_t = _GatherRows.apply(i, group), _GatherRows.apply(t, group)
    scale = logit_scale.to(acc).reshape(()).exp()
    targets = torch.arange(img.shape[0], device=img.device) + dist.get_rank(group) * img.shape[0]
    image_to_text = F.cross_entropy(scale * (i @ all_t.T), targets)
    text_to_image = F.cross_entropy(scale * (t @ all_i.T), targets)
    return 0.5 * (image_to_text + text_to_image)


# ------------------------------------------------------------------------------------------------- dense decode
def patch_text_logits(patches, text):
    """Cosine similarity of every patch [B,h,w,D] with every class [C,D] -> [B,C,h,w] (fp32, fp64 for fp64)."""
    acc = accumulation_dtype(patches.dtype)
    p = F.normalize(patches.to(acc), dim=-1)
    t = F.normalize(text.to(acc), dim=-1)
    return torch.einsum("bhwd,cd->bchw", p, t).contiguous()


def _source_index(out_size: int, in_size: int, device, dtype):
    """Bilinear (align_corners=False) taps along one axis, as F.interpolate computes them: (i0, i1, w1)."""
    scale = in_size / out_size
    src = ((torch.arange(out_size, device=device, dtype=torch.float64) + 0.5) * scale - 0.5).clamp_min(0)
    i0 = src.floor().long().clamp_max(in_size - 1)
    i1 = (i0 + 1).clamp_max(in_size - 1)
    return i0, i1, (src - i0).to(dtype)


def _bilinear_rows(x, out_h: int, out_w: int, rows: torch.Tensor):
    """Rows `rows` of F.interpolate(x [..., h, w], (out_h, out_w), "bilinear", align_corners=False)."""
    y0, y1, wy = (t[rows] for t in _source_index(out_h, x.shape[-2], x.device, x.dtype))
    x0, x1, wx = _source_index(out_w, x.shape[-1], x.device, x.dtype)
    wy = wy[:, None]
    top = x[..., y0, :] * (1 - wy) + x[..., y1, :] * wy
    return top[..., x0] * (1 - wx) + top[..., x1] * wx


def _row_chunks(n_rows: int, elements_per_row: int):
    step = max(1, _CHUNK_ELEMENTS // max(1, elements_per_row))
    for start in range(0, n_rows, step):
        yield start, min(start + step, n_rows)


def upsample_argmax(logits, size, softmax: bool):
    """Labels [B,H,W] int64 and winning scores [B,H,W] of bilinearly upsampled logits [B,C,h,w].

    Works on bands of output rows, so no [B,C,H,W] tensor is ever allocated."""
    b, c, _, _ = logits.shape
    out_h, out_w = size
    x = logits.to(accumulation_dtype(logits.dtype))
    labels = torch.empty(b, out_h, out_w, dtype=torch.int64, device=logits.device)
    scores = torch.empty(b, out_h, out_w, dtype=x.dtype, device=logits.device)
    for start, stop in _row_chunks(out_h, b * c * out_w):
        band = _bilinear_rows(x, out_h, out_w, torch.arange(start, stop, device=x.device))
        if softmax:
            band = band.softmax(dim=1)
        scores[:, start:stop], labels[:, start:stop] = band.max(dim=1)
    return labels, scores


def _canvas_rows(window_logits, boxes, canvas_w: int, rows: torch.Tensor, softmax: bool):
    """Window-averaged (softmaxed) logits of canvas rows `rows` -> [C, len(rows), canvas_w]."""
    c = window_logits.shape[1]
    acc = torch.zeros(c, rows.numel(), canvas_w, dtype=window_logits.dtype, device=window_logits.device)
    count = torch.zeros(rows.numel(), canvas_w, dtype=window_logits.dtype, device=window_logits.device)
    for logits, (y0, x0, y1, x1) in zip(window_logits, boxes.tolist()):
        inside = (rows >= y0) & (rows < y1)
        if not bool(inside.any()):
            continue
        band = _bilinear_rows(logits, y1 - y0, x1 - x0, rows[inside] - y0)
        if softmax:
            band = band.softmax(dim=0)
        acc[:, inside, x0:x1] += band
        count[inside, x0:x1] += 1
    if bool((count == 0).any()):
        raise ValueError("slide_decode: the window boxes do not cover the whole canvas")
    return acc / count


def slide_decode(window_logits, boxes, canvas_size, size, softmax: bool):
    """The sliding-window protocol without a full-resolution [C,H,W] map: labels [H,W] int64 and scores [H,W].

    Each window's logits [Nw,C,h,w] are upsampled to its box (y0, x0, y1, x1) on the canvas, softmaxed over classes
    when asked, averaged where windows overlap, then bilinearly resized to `size`. Output rows are produced in bands:
    each band needs only the canvas rows its bilinear taps touch."""
    canvas_h, canvas_w = canvas_size
    out_h, out_w = size
    x = window_logits.to(accumulation_dtype(window_logits.dtype))
    c = x.shape[1]
    y0_all, y1_all, wy_all = _source_index(out_h, canvas_h, x.device, x.dtype)
    x0, x1, wx = _source_index(out_w, canvas_w, x.device, x.dtype)
    labels = torch.empty(out_h, out_w, dtype=torch.int64, device=x.device)
    scores = torch.empty(out_h, out_w, dtype=x.dtype, device=x.device)
    for start, stop in _row_chunks(out_h, 2 * c * max(canvas_w, out_w)):
        y0, y1, wy = y0_all[start:stop], y1_all[start:stop], wy_all[start:stop, None]
        needed, where = torch.unique(torch.cat([y0, y1]), return_inverse=True)
        canvas = _canvas_rows(x, boxes, canvas_w, needed, softmax)  # [C, len(needed), Wc]
        n = stop - start
        band = canvas[:, where[:n]] * (1 - wy) + canvas[:, where[n:]] * wy
        band = band[..., x0] * (1 - wx) + band[..., x1] * wx
        scores[start:stop], labels[start:stop] = band.max(dim=0)
    return labels, scores


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)


__all__ = [
    "attention_forward", "attention_backward", "patch_pool_forward", "patch_pool_backward",
    "contrastive_forward", "contrastive_backward", "contrastive_partial_forward", "contrastive_partial_backward",
    "contrastive_normalize_backward", "contrastive_loss_distributed", "patch_text_logits", "upsample_argmax",
    "slide_decode", "default_scale",
]
