"""Transformer building blocks shared by the ViT backbones, the vision head and the text tower.

Parameter names follow the official DINOv2 / DINOv3 / DINO.txt modules so their checkpoints load by name.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Callable, Iterator, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Imported as a module and looked up at call time, so a later change of the dispatch is picked up.
from dinotxt_fast import ops

__all__ = [
    "Attention",
    "LayerScale",
    "Mlp",
    "SwiGLUFFN",
    "SwiGLUFFNFused",
    "apply_rope",
    "drop_add_residual_stochastic_depth",
    "is_traceable",
    "traceable",
]

_TRACEABLE = contextvars.ContextVar("dinotxt_fast_traceable", default=False)


@contextlib.contextmanager
def traceable() -> Iterator[None]:
    """Run the models with plain PyTorch operations only, for torch.export and the ONNX exporter.

    dinotxt_fast.ops' fused kernels are torch.library custom ops, opaque to an exporter. In this mode attention runs
    F.scaled_dot_product_attention, position tables are computed in the graph instead of cached, and the text
    tower runs all positions without its host-synced truncation: the same model, to fp32 rounding."""
    token = _TRACEABLE.set(True)
    try:
        yield
    finally:
        _TRACEABLE.reset(token)


@torch.compiler.assume_constant_result  # read while torch.compile traces: a constant of the compiled graph
def is_traceable() -> bool:
    """True inside `traceable()`."""
    return _TRACEABLE.get()


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = False, lengths: Optional[Tensor] = None) -> Tensor:
    """ops.attention's semantics on [B, N, H, Dh] tensors with F.scaled_dot_product_attention (traceable)."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    mask = None
    if lengths is not None:
        keys = torch.arange(k.shape[2], device=k.device)
        mask = (keys[None, :] < lengths[:, None])[:, None, None, :]  # [B, 1, 1, Nk]
        if causal:
            mask = mask & torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None)
    return o.transpose(1, 2)


def _rotate_half(x: Tensor) -> Tensor:
    # [x0 x1 x2 x3 x4 x5] -> [-x3 -x4 -x5 x0 x1 x2], as in dinov3/layers/attention.py
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(q: Tensor, k: Tensor, rope: Tuple[Tensor, Tensor]) -> Tuple[Tensor, Tensor]:
    """Rotate the LAST P tokens of q and k ([B, N, H, Dh]) by `rope` = (sin, cos), each [P, Dh].

    Tokens before them (cls, registers) are left as they are. The rotation runs in the dtype of the tables
    and the result is cast back, with the same operations (and so the same rounding) as the official DINOv3
    `SelfAttention.apply_rope`.
    """
    sin, cos = rope
    n, p = q.shape[1], sin.shape[0]
    if sin.shape != cos.shape or sin.dim() != 2 or sin.shape[1] != q.shape[-1] or p > n:
        raise ValueError(f"rope tables must be (sin, cos) of shape [P<={n}, {q.shape[-1]}], got "
                         f"{tuple(sin.shape)} and {tuple(cos.shape)}")
    prefix = n - p
    sin, cos = sin[:, None, :], cos[:, None, :]  # broadcast over heads

    def rotate(x: Tensor) -> Tensor:
        x32 = x.to(sin.dtype)
        rotated = (x32[:, prefix:] * cos) + (_rotate_half(x32[:, prefix:]) * sin)
        return torch.cat((x32[:, :prefix], rotated), dim=1).to(x.dtype)

    return rotate(q), rotate(k)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection, computed by `dinotxt_fast.ops.attention`.

    `mask_k_bias` (DINOv3): the qkv bias has a key third that is always zero. Official checkpoints store it
    with a `bias_mask` buffer; the backbone loader folds that mask into the bias, so no mask exists here.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, proj_bias: bool = True,
                 causal: bool = False, mask_k_bias: bool = False) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"attention dim {dim} is not divisible by num_heads {num_heads}")
        if mask_k_bias and not qkv_bias:
            raise ValueError("mask_k_bias=True needs qkv_bias=True (it masks the key third of that bias)")
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.causal = causal
        self.mask_k_bias = mask_k_bias
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        if mask_k_bias:
            with torch.no_grad():
                self.qkv.bias[dim:2 * dim].zero_()

    def _qkv(self, x: Tensor) -> Tensor:
        bias = self.qkv.bias
        if self.mask_k_bias and bias.requires_grad and torch.is_grad_enabled():
            # Training: keep the key third out of the graph so it gets no gradient and stays zero.
            d = self.dim
            bias = torch.cat((bias[:d], torch.zeros_like(bias[d:2 * d]), bias[2 * d:]))
            return F.linear(x, self.qkv.weight, bias)
        return self.qkv(x)

    def forward(self, x: Tensor, rope: Optional[Tuple[Tensor, Tensor]] = None,
                lengths: Optional[Tensor] = None) -> Tensor:
        """`lengths` (int [B], optional): keys at positions >= lengths[b] are masked (see ops.attention)."""
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"Attention expects tokens [B, N, {self.dim}], got shape {tuple(x.shape)}")
        b, n, c = x.shape
        qkv = self._qkv(x).view(b, n, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.unbind(2)  # strided views [B, N, H, Dh], no copies
        if rope is not None:
            q, k = apply_rope(q, k, rope)
        if is_traceable():
            o = sdpa_attention(q, k, v, self.causal, lengths)
        else:
            # lengths only when given, so stand-ins for ops.attention with the older signature keep working
            extra = {} if lengths is None else {"lengths": lengths}
            o = ops.attention(q, k, v, causal=self.causal, **extra)
        return self.proj(o.reshape(b, n, c))


class LayerScale(nn.Module):
    def __init__(self, dim: int, init_values: float = 1e-5) -> None:
        super().__init__()
        self.init_values = init_values
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def reset_parameters(self) -> None:
        nn.init.constant_(self.gamma, self.init_values)

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


def init_vit_weights(module: nn.Module) -> None:
    """timm's ViT init, which the official DINOv2/DINOv3 backbones and the DINO.txt head use: truncated normal
    (std 0.02) Linear weights, zero biases, default LayerNorm, LayerScale at its init value."""
    for sub in module.modules():
        if isinstance(sub, nn.Linear):
            nn.init.trunc_normal_(sub.weight, std=0.02)
            if sub.bias is not None:
                nn.init.zeros_(sub.bias)
        elif isinstance(sub, (nn.LayerNorm, LayerScale)):
            sub.reset_parameters()


class Mlp(nn.Module):
    """fc1 -> exact-erf GELU -> fc2."""

    def __init__(self, dim: int, hidden: int, bias: bool = True) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=bias)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SwiGLUFFN(nn.Module):
    """w3(silu(w1 x) * w2 x), with three separate projections (the DINO.txt head's key layout)."""

    def __init__(self, dim: int, hidden: int, bias: bool = True) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=bias)
        self.w2 = nn.Linear(dim, hidden, bias=bias)
        self.w3 = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.w3(F.silu(self.w1(x)) * self.w2(x))


class SwiGLUFFNFused(nn.Module):
    """w3(silu(x1) * x2) with [x1, x2] = w12 x: one projection for both halves (the DINOv2 ViT-g/14 key layout,
    dinov2/layers/swiglu_ffn.py)."""

    def __init__(self, dim: int, hidden: int, bias: bool = True) -> None:
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden, bias=bias)
        self.w3 = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        x1, x2 = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(x1) * x2)


def drop_path(x: Tensor, drop_prob: float) -> Tensor:
    """Per-sample stochastic depth (timm / dinov2/layers/drop_path.py): each sample's residual is kept with
    probability 1 - p and rescaled by 1 / (1 - p); same random draws as the official function (training only)."""
    keep_prob = 1.0 - drop_prob
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep_prob)
    return x * mask.div_(keep_prob) if keep_prob > 0.0 else x * mask


def drop_add_residual_stochastic_depth(x: Tensor, residual_fn: Callable[[Tensor], Tensor],
                                       sample_drop_ratio: float) -> Tensor:
    """DINOv2 "batch subset" drop-path: x + residual_fn(x) on a random subset of the samples only.

    The residual of max(int(B * (1 - r)), 1) randomly chosen samples is added with weight B / subset, the
    other samples pass unchanged; same random draws and arithmetic as dinov2/layers/block.py.
    """
    b = x.shape[0]
    sample_subset_size = max(int(b * (1 - sample_drop_ratio)), 1)
    brange = torch.randperm(b, device=x.device)[:sample_subset_size]
    residual = residual_fn(x[brange])
    residual_scale_factor = b / sample_subset_size
    x_plus_residual = torch.index_add(x.flatten(1), 0, brange, residual.flatten(1).to(dtype=x.dtype),
                                      alpha=residual_scale_factor)
    return x_plus_residual.view_as(x)
