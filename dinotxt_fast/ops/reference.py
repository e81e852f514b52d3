"""PyTorch reference implementations of every op: the "torch" backend and the oracle the kernels are tested against.

They run anywhere (CPU, CUDA, float64), compute in float32 (float64 for float64 inputs) and keep memory bounded by
working in chunks, so that the reference path is usable on real shapes, not only in tests. Each op family has a
forward returning what its backward needs and a backward taking exactly that: the contract the Triton and CUDA
backends implement too.
"""
from __future__ import annotations

import math
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


def attention_forward(q, k, v, causal: bool, scale: float):
    """o [B,N,H,Dh] (q's dtype, contiguous) and the log-sum-exp of the scaled scores, lse [B,H,N] (fp32/fp64)."""
    acc = accumulation_dtype(q.dtype)
    b, n_q, h, _ = q.shape
    n_k = k.shape[1]
    qf, kf, vf = (t.transpose(1, 2).to(acc) for t in (q, k, v))  # [B,H,N,Dh]
    o = torch.empty(b, h, n_q, v.shape[-1], dtype=acc, device=q.device)
    lse = torch.empty(b, h, n_q, dtype=acc, device=q.device)
    step = _query_chunk(b, h, n_q, n_k)
    for start in range(0, n_q, step):
        rows = slice(start, min(start + step, n_q))
        s = torch.matmul(qf[:, :, rows], kf.transpose(-1, -2)) * scale
        if causal:
            mask = _causal_mask(torch.arange(rows.start, rows.stop, device=q.device), n_k, q.device)
            s = s.masked_fill(~mask, float("-inf"))
        lse_chunk = torch.logsumexp(s, dim=-1)
        o[:, :, rows] = torch.matmul(torch.exp(s - lse_chunk[..., None]), vf)
        lse[:, :, rows] = lse_chunk
    return o.transpose(1, 2).to(q.dtype).contiguous(), lse


def attention_backward(grad_o, q, k, v, o, lse, causal: bool, scale: float):
    """dq, dk, dv (inputs' dtypes, contiguous) from the forward's o and lse (FlashAttention-2 formulas)."""
    acc = accumulation_dtype(q.dtype)
    b, n_q, h, _ = q.shape
    n_k = k.shape[1]
    qf, kf, vf, of, dof = (t.transpose(1, 2).to(acc) for t in (q, k, v, o, grad_o))
    delta = (dof * of).sum(-1)  # [B,H,N]: rowsum(dO * O) = rowsum(P * dP)
    dq = torch.empty_like(qf)
    dk = torch.zeros_like(kf)
    dv = torch.zeros_like(vf)
    lse = lse.to(acc)
    step = _query_chunk(b, h, n_q, n_k)
    for start in range(0, n_q, step):
        rows = slice(start, min(start + step, n_q))
        s = torch.matmul(qf[:, :, rows], kf.transpose(-1, -2)) * scale
        if causal:
            mask = _causal_mask(torch.arange(rows.start, rows.stop, device=q.device), n_k, q.device)
            s = s.masked_fill(~mask, float("-inf"))
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


def patch_pool_forward(tokens, num_registers: int, ln_weight, ln_bias, eps: float, normalize: bool):
    """[cls ; mean(patches)] of (optionally layer-normed) tokens [B, 1+R+P, D] -> [B, 2D] in tokens' dtype."""
    x = tokens.to(accumulation_dtype(tokens.dtype))
    if ln_weight is not None:
        x = F.layer_norm(x, x.shape[-1:], ln_weight.to(x.dtype), None if ln_bias is None else ln_bias.to(x.dtype), eps)
    pooled = torch.cat([x[:, 0], x[:, 1 + num_registers:].mean(1)], dim=-1)
    if normalize:
        pooled = F.normalize(pooled, dim=-1, eps=_NORM_EPS)
    return pooled.to(tokens.dtype)


def patch_pool_backward(grad_out, tokens, num_registers: int, ln_weight, ln_bias, eps: float, normalize: bool):
    """(d_tokens, d_ln_weight | None, d_ln_bias | None); recomputes the cheap forward rather than storing it."""
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
def _normalized(x, normalize: bool):
    """(x / max(||x||, eps), clamped norms [B, 1]) or (x, None)."""
    if not normalize:
        return x, None
    norm = x.norm(dim=-1, keepdim=True).clamp_min(_NORM_EPS)
    return x / norm, norm


def contrastive_forward(img, txt, logit_scale, normalize: bool):
    """Symmetric InfoNCE: (loss 0-d, lse_rows [B], lse_cols [B]) in fp32 (fp64 for fp64 inputs)."""
    acc = accumulation_dtype(img.dtype)
    i, _ = _normalized(img.to(acc), normalize)
    t, _ = _normalized(txt.to(acc), normalize)
    logits = logit_scale.to(acc).reshape(()).exp() * (i @ t.T)
    diag = logits.diagonal()
    lse_rows = torch.logsumexp(logits, dim=1)
    lse_cols = torch.logsumexp(logits, dim=0)
    loss = 0.5 * ((lse_rows - diag).mean() + (lse_cols - diag).mean())
    return loss, lse_rows, lse_cols


def contrastive_backward(grad_loss, img, txt, logit_scale, lse_rows, lse_cols, normalize: bool):
    """(d_img, d_txt, d_logit_scale): dLogits = g / (2B) * (softmax_rows + softmax_cols - 2I)."""
    acc = accumulation_dtype(img.dtype)
    i, i_norm = _normalized(img.to(acc), normalize)
    t, t_norm = _normalized(txt.to(acc), normalize)
    scale = logit_scale.to(acc).reshape(()).exp()
    logits = scale * (i @ t.T)
    b = img.shape[0]
    d_logits = torch.exp(logits - lse_rows.to(acc)[:, None]) + torch.exp(logits - lse_cols.to(acc)[None, :])
    d_logits.diagonal().sub_(2.0)
    d_logits *= grad_loss.to(acc) * 0.5 / b
    d_scale = (d_logits * logits).sum()
    d_i = scale * (d_logits @ t)
    d_t = scale * (d_logits.T @ i)
    if normalize:
        d_i, d_t = _normalize_backward(d_i, i, i_norm), _normalize_backward(d_t, t, t_norm)
    return d_i.to(img.dtype), d_t.to(txt.dtype), d_scale.reshape(logit_scale.shape).to(logit_scale.dtype)


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
    "contrastive_forward", "contrastive_backward", "contrastive_loss_distributed", "patch_text_logits",
    "upsample_argmax", "slide_decode", "default_scale",
]
