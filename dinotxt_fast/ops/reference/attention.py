"""Reference attention (the "torch" backend's attention family).

- CPU tensors in fp32 / bf16 / fp16: PyTorch's own flash-attention kernels for the CPU
  (aten::_scaled_dot_product_flash_attention_for_cpu and its backward), whose contract is this family's: the forward
  returns the log-sum-exp its backward reads. They are blocked (memory linear in N) and fused, so training and
  inference on a CPU run at SDPA speed, not at the speed of an explicit softmax.
- float64 (the tests' oracle), CUDA tensors, and head dims the CPU kernels do not take (Dv != Dh): a chunked
  forward in fp32 (fp64 for fp64) returning the log-sum-exp, and the FlashAttention-2 backward formulas, over chunks
  of whole heads (or of query rows for long sequences) of at most common.chunk_elements scores.
- gradient-free calls on CUDA: PyTorch's fused SDPA (attention_forward_sdpa; ops.attention decides).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..dispatch import add_kernels
from ..planning import accumulation_dtype
from . import common

_CPU_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_CPU_FLASH_BACKWARD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)


def _causal_mask(rows: torch.Tensor, n_keys: int, device) -> torch.Tensor:
    """True where a query row may attend to a key (top-left aligned: row i sees keys <= i)."""
    return torch.arange(n_keys, device=device)[None, :] <= rows[:, None]


def _finite_lse(lse):
    """lse with the -inf of rows that see no key replaced by 0, so exp(s - lse) is exp(-inf) = 0 there, not NaN."""
    return torch.where(lse == float("-inf"), torch.zeros_like(lse), lse)


# ------------------------------------------------------------------------------------- CPU: PyTorch's kernels
def _cpu_flash_applies(q, v) -> bool:
    return (_CPU_FLASH is not None and q.device.type == "cpu" and q.dtype != torch.float64
            and q.shape[-1] == v.shape[-1])


def _key_bias(lengths, n_k: int, like) -> torch.Tensor | None:
    """Additive key mask [B, 1, 1, Nk] in like's dtype (0 where visible, -inf at positions >= lengths[b])."""
    if lengths is None:
        return None
    hidden = torch.arange(n_k, device=like.device)[None, :] >= lengths.to(like.device, torch.int64)[:, None]
    return torch.zeros(hidden.shape, dtype=like.dtype, device=like.device).masked_fill_(hidden, float("-inf"))[
        :, None, None, :]


def _heads_first(*tensors):
    """[B, N, H, D] -> [B, H, N, D] views (the CPU kernels read any strides)."""
    return tuple(t.transpose(1, 2) for t in tensors)


def _flash_forward(q, k, v, causal: bool, scale: float, lengths):
    o, lse = _CPU_FLASH(*_heads_first(q, k, v), 0.0, causal, attn_mask=_key_bias(lengths, k.shape[1], q), scale=scale)
    lse = lse.contiguous()
    if lengths is not None:  # sequences that see no key: o is already 0; their lse is -inf by this family's contract
        lse.masked_fill_((lengths.to(lse.device) <= 0)[:, None, None], float("-inf"))
    return o.transpose(1, 2).contiguous(), lse


def _flash_backward(grad_o, q, k, v, o, lse, causal: bool, scale: float, lengths):
    grads = _CPU_FLASH_BACKWARD(*_heads_first(grad_o, q, k, v, o), _finite_lse(lse), 0.0, causal,
                                attn_mask=_key_bias(lengths, k.shape[1], q), scale=scale)
    return tuple(g.transpose(1, 2).to(t.dtype).contiguous() for g, t in zip(grads, (q, k, v)))


# ------------------------------------------------------------------------------- chunked (float64, CUDA)
def _chunks(bh: int, n_q: int, n_k: int, device):
    """(heads, query rows) per chunk of the [B*H, Nq, Nk] scores: whole heads while one fits the budget."""
    budget = common.chunk_elements(device)
    if n_q * n_k <= budget:
        return min(bh, budget // (n_q * n_k)), n_q
    return 1, max(1, budget // n_k)


class _Chunked:
    """q, k, v as [B*H, N, D] in the accumulation dtype, and the masks of one chunk of heads and query rows."""

    def __init__(self, q, k, v, causal: bool, scale: float, lengths):
        self.acc = accumulation_dtype(q.dtype)
        self.b, self.n_q, self.h, _ = q.shape
        self.n_k = k.shape[1]
        self.q, self.k, self.v = (self.flat(t) for t in (q, k, v))
        self.causal, self.scale = causal, scale
        self.lengths = None if lengths is None else lengths.to(q.device, torch.int64)

    def flat(self, t):
        return t.transpose(1, 2).reshape(self.b * self.h, t.shape[1], t.shape[3]).to(self.acc)

    def unflat(self, t, like):
        return t.view(self.b, self.h, t.shape[1], t.shape[2]).transpose(1, 2).to(like.dtype).contiguous()

    def pieces(self):
        heads, rows = _chunks(self.b * self.h, self.n_q, self.n_k, self.q.device)
        for j in range(0, self.b * self.h, heads):
            for r in range(0, self.n_q, rows):
                yield slice(j, min(j + heads, self.b * self.h)), slice(r, min(r + rows, self.n_q))

    def scores(self, heads: slice, rows: slice):
        """Scaled scores [heads, rows, Nk], -inf where the causal mask or `lengths` hide a key."""
        s = torch.matmul(self.q[heads, rows], self.k[heads].transpose(-1, -2)).mul_(self.scale)
        device = s.device
        if self.causal:
            s.masked_fill_(~_causal_mask(torch.arange(rows.start, rows.stop, device=device), self.n_k, device),
                           float("-inf"))
        if self.lengths is not None:
            batch = torch.arange(heads.start, heads.stop, device=device) // self.h
            hidden = torch.arange(self.n_k, device=device)[None, :] >= self.lengths[batch][:, None]
            s.masked_fill_(hidden[:, None, :], float("-inf"))
        return s


def _chunked_forward(q, k, v, causal: bool, scale: float, lengths):
    x = _Chunked(q, k, v, causal, scale, lengths)
    o = torch.empty(x.b * x.h, x.n_q, v.shape[-1], dtype=x.acc, device=q.device)
    lse = torch.empty(x.b * x.h, x.n_q, dtype=x.acc, device=q.device)
    for heads, rows in x.pieces():
        p = x.scores(heads, rows)
        top = p.amax(-1, keepdim=True)
        top.masked_fill_(top == float("-inf"), 0.0)  # rows that see no key: p = exp(-inf) = 0, total 0
        total = p.sub_(top).exp_().sum(-1, keepdim=True)
        lse[heads, rows] = (top + total.log()).squeeze(-1)  # -inf for rows that see no key
        o[heads, rows] = torch.matmul(p, x.v[heads]).div_(total.masked_fill_(total == 0, 1.0))
    return x.unflat(o, q), lse.view(x.b, x.h, x.n_q)


def _chunked_backward(grad_o, q, k, v, o, lse, causal: bool, scale: float, lengths):
    x = _Chunked(q, k, v, causal, scale, lengths)
    do, of = x.flat(grad_o), x.flat(o)
    delta = (do * of).sum(-1)  # [B*H, N]: rowsum(dO * O) = rowsum(P * dP)
    lse = _finite_lse(lse.to(x.acc)).reshape(x.b * x.h, x.n_q)
    dq = torch.empty_like(x.q)
    dk = torch.zeros_like(x.k)
    dv = torch.zeros_like(x.v)
    for heads, rows in x.pieces():
        p = x.scores(heads, rows).sub_(lse[heads, rows, None]).exp_()
        dv[heads] += torch.matmul(p.transpose(-1, -2), do[heads, rows])
        ds = torch.matmul(do[heads, rows], x.v[heads].transpose(-1, -2)).sub_(delta[heads, rows, None]).mul_(p)
        dq[heads, rows] = torch.matmul(ds, x.k[heads]).mul_(scale)
        dk[heads] += torch.matmul(ds.transpose(-1, -2), x.q[heads, rows]).mul_(scale)
    return x.unflat(dq, q), x.unflat(dk, k), x.unflat(dv, v)


# ----------------------------------------------------------------------------------------------- the kernels
def attention_forward(q, k, v, causal: bool, scale: float, lengths=None):
    """o [B,N,H,Dh] (q's dtype, contiguous) and the log-sum-exp of the scaled scores, lse [B,H,N] (fp32/fp64).

    `lengths` (int [B] or None): keys at positions >= lengths[b] are masked for every query of sequence b. A row
    that sees no key at all (lengths[b] <= 0) gets o = 0, lse = -inf and zero gradients."""
    if _cpu_flash_applies(q, v):
        return _flash_forward(q, k, v, causal, scale, lengths)
    return _chunked_forward(q, k, v, causal, scale, lengths)


def sdpa_forward_applies(q) -> bool:
    """Whether the torch backend answers a gradient-free attention call with PyTorch's fused SDPA kernels: on CUDA
    (flash / memory-efficient / cuDNN). On a CPU attention_forward already runs PyTorch's CPU flash kernels (the
    chunked path stays for float64, the test oracle)."""
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
    if _cpu_flash_applies(q, v):
        return _flash_backward(grad_o, q, k, v, o, lse, causal, scale, lengths)
    return _chunked_backward(grad_o, q, k, v, o, lse, causal, scale, lengths)


add_kernels("torch", "attention", {"attention_forward": attention_forward, "attention_backward": attention_backward})
