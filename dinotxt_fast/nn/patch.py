"""`patch_model`: swap dinotxt-fast's fused attention into existing (e.g. official DINOv2 / DINOv3 / DINO.txt) models.

Attention modules are recognised by duck typing, not by class: a fused `qkv` Linear (out = 3 * in), a `proj` Linear,
an integer `num_heads`, optionally `scale`, dropout children, and a forward taking `x` plus only arguments we
understand (`attn_bias`, `attn_mask`, `rope`, `is_causal`). Each one is replaced in its parent by a
`FusedSelfAttention` that shares its `qkv` and `proj` modules, so parameters, state-dict keys and optimizer state
are untouched. Calls the fused path can't reproduce exactly (an attention bias or mask, attention dropout while
training) go to the original module's own forward.
"""
from __future__ import annotations

import inspect
from typing import Optional

from torch import Tensor, nn

from .. import ops

__all__ = ["FusedSelfAttention", "patch_model", "unpatch_model"]

# Children an attention module may have besides qkv and proj (norms only as identities: we don't apply them).
_DROPOUTS = ("attn_drop", "proj_drop")
_IDENTITIES = ("q_norm", "k_norm", "norm")
# forward() arguments after x that we understand.
_KNOWN_ARGS = ("attn_bias", "attn_mask", "rope", "is_causal")


def _forward_params(module: nn.Module) -> Optional[list[inspect.Parameter]]:
    """forward's parameters after x, or None if the signature is not one we understand."""
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    if not params or params[0].kind not in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD):
        return None
    rest = params[1:]
    if any(p.name not in _KNOWN_ARGS or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in rest):
        return None
    return rest


def is_attention_module(module: nn.Module) -> bool:
    """True for a self-attention module that FusedSelfAttention reproduces exactly (see the module docstring)."""
    from ..models.layers import Attention as _OurAttention

    if isinstance(module, (FusedSelfAttention, _OurAttention)):
        return False  # already ours
    qkv, proj, heads = getattr(module, "qkv", None), getattr(module, "proj", None), getattr(module, "num_heads", None)
    if not (isinstance(qkv, nn.Linear) and isinstance(proj, nn.Linear) and isinstance(heads, int) and heads > 0):
        return False
    dim = qkv.in_features
    if qkv.out_features != 3 * dim or dim % heads or proj.in_features != dim:
        return False
    if any(True for _ in module.parameters(recurse=False)) or any(True for _ in module.buffers(recurse=False)):
        return False
    for name, child in module.named_children():
        if name in ("qkv", "proj"):
            continue
        if name in _DROPOUTS and isinstance(child, (nn.Dropout, nn.Identity)):
            continue
        if name in _IDENTITIES and isinstance(child, nn.Identity):
            continue
        return False
    scale = getattr(module, "scale", None)
    if scale is not None and not isinstance(scale, (int, float)):
        return False
    return _forward_params(module) is not None


def _dropout_p(module: nn.Module, name: str) -> float:
    drop = getattr(module, name, 0.0)
    if isinstance(drop, nn.Dropout):
        return float(drop.p)
    return float(drop) if isinstance(drop, (int, float)) else 0.0


class FusedSelfAttention(nn.Module):
    """Runs a foreign attention module with `dinotxt_fast.ops.attention`, sharing its qkv and proj modules.

    Same call signature as the module it wraps (x plus any of attn_bias, attn_mask, rope, is_causal), same state-dict
    keys. `original` (not a child module, so not in the state dict) handles what the fused path does not."""

    def __init__(self, original: nn.Module, backend: Optional[str] = None) -> None:
        if not is_attention_module(original):
            raise ValueError(f"{type(original).__name__} is not an attention module FusedSelfAttention can replace "
                             "(needs qkv and proj Linears, num_heads, and a forward(x, [attn_bias, attn_mask, rope, "
                             "is_causal]))")
        super().__init__()
        self.qkv = original.qkv
        self.proj = original.proj
        for name in _DROPOUTS:
            child = getattr(original, name, None)
            if isinstance(child, nn.Module):
                setattr(self, name, child)  # shared, so train()/eval() reach it
        self.num_heads = original.num_heads
        self.head_dim = original.qkv.in_features // original.num_heads
        scale = getattr(original, "scale", None)
        self.scale = None if scale is None else float(scale)
        self.attn_drop_p = _dropout_p(original, "attn_drop")
        params = _forward_params(original)
        self.arg_names = tuple(p.name for p in params)
        self.defaults = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
        self.backend = backend
        self.__dict__["original"] = original  # plain attribute: no duplicate parameters or state-dict keys

    def extra_repr(self) -> str:
        return (f"{type(self.original).__name__}, dim={self.qkv.in_features}, num_heads={self.num_heads}, "
                f"causal_default={bool(self.defaults.get('is_causal', False))}, backend={self.backend}")

    def _fallback(self, x: Tensor, *args, **kwargs) -> Tensor:
        self.original.train(self.training)
        return self.original(x, *args, **kwargs)

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        if len(args) > len(self.arg_names) or any(name not in self.arg_names for name in kwargs):
            return self._fallback(x, *args, **kwargs)  # let the original raise its own error
        call = {**self.defaults, **dict(zip(self.arg_names, args)), **kwargs}
        if (call.get("attn_bias") is not None or call.get("attn_mask") is not None
                or (self.training and self.attn_drop_p > 0) or x.dim() != 3):
            return self._fallback(x, *args, **kwargs)
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim).unbind(2)  # [B, N, H, Dh] views
        rope = call.get("rope")
        if rope is not None:
            if not hasattr(self.original, "apply_rope"):
                return self._fallback(x, *args, **kwargs)
            # The module's own rotation, on its [B, H, N, Dh] layout, for identical rounding.
            q, k = self.original.apply_rope(q.transpose(1, 2), k.transpose(1, 2), rope)
            q, k = q.transpose(1, 2), k.transpose(1, 2)
        o = ops.attention(q, k, v, causal=bool(call.get("is_causal", False)), scale=self.scale, backend=self.backend)
        out = self.proj(o.reshape(b, n, c))
        drop = getattr(self, "proj_drop", None)
        return drop(out) if drop is not None else out

    def forward_list(self, x_list, attn_bias=None, rope_list=None):
        """DINOv3's list API (blocks call it on training's drop-path branch): one forward per tensor."""
        if attn_bias is not None:
            return self.original.forward_list(x_list, attn_bias=attn_bias, rope_list=rope_list)
        rope_list = rope_list if rope_list is not None else [None] * len(x_list)
        return [self(x, rope=rope) if rope is not None else self(x) for x, rope in zip(x_list, rope_list)]


def patch_model(module: nn.Module, *, backend: Optional[str] = None) -> dict[str, nn.Module]:
    """Replace every attention module inside `module` (see `is_attention_module`) by a FusedSelfAttention, in place.

    Returns {qualified name: the original module} of what was replaced ({} when nothing matched); pass it to
    `unpatch_model` to restore them. Parameters are shared, so state dicts and optimizers are unaffected."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"patch_model takes a torch.nn.Module, got {type(module).__name__}")
    if is_attention_module(module):
        raise ValueError("patch_model replaces the attention modules inside `module`, and `module` is one itself: "
                         "use FusedSelfAttention(module) instead")
    targets = [(name, m) for name, m in module.named_modules() if name and is_attention_module(m)]
    replaced = {}
    for name, original in targets:
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, child, FusedSelfAttention(original, backend=backend))
        replaced[name] = original
    return replaced


def unpatch_model(module: nn.Module, replaced: dict[str, nn.Module]) -> None:
    """Put back the modules that `patch_model` returned."""
    for name, original in replaced.items():
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        current = getattr(parent, child, None)
        if not isinstance(current, FusedSelfAttention) or current.original is not original:
            raise ValueError(f"unpatch_model: {name!r} is not the FusedSelfAttention that patch_model put there")
        setattr(parent, child, original)
