"""Reference attention (the "torch" backend's attention family): a chunked fp32 (fp64) forward that returns the
log-sum-exp its backward reads, the FlashAttention-2 backward formulas, and PyTorch's fused SDPA for gradient-free
calls on CUDA."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..dispatch import add_kernels
from ..planning import accumulation_dtype
from . import common


def _causal_mask(rows: torch.Tensor, n_keys: int, device) -> torch.Tensor:
    """True where a query row may attend to a key (top-left aligned: row i sees keys <= i)."""
    return torch.arange(n_keys, device=device)[None, :] <= rows[:, None]


def _query_chunk(b: int, h: int, n_q: int, n_k: int) -> int:
    return max(1, min(n_q, common.CHUNK_ELEMENTS // max(1, b * h * n_k)))


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


add_kernels("torch", "attention", {"attention_forward": attention_forward, "attention_backward": attention_backward})
