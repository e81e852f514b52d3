"""`patch_model`: swap dinotxt-fast's fused attention into existing (e.g. official DINOv2 / DINOv3 / DINO.txt, or
Hugging Face transformers) models.

Two mechanisms, chosen per sub-tree:
- Hugging Face transformers models (any `PreTrainedModel` inside `module`, `module` itself included: Dinov2Model,
  Dinov2WithRegistersModel, DINOv3ViTModel, CLIPTextModel, ...) are switched to our attention through transformers'
  own `AttentionInterface` (nn/hf_attention.py): their modules keep classes, parameters and state-dict keys.
- Everywhere else attention modules are recognised by duck typing, not by class: a fused `qkv` Linear (out = 3 *
  in), a `proj` Linear, an integer `num_heads`, optionally `scale`, dropout children, and a forward taking `x` plus
  only arguments we understand (`attn_bias`, `attn_mask`, `rope`, `is_causal`). Each one is replaced in its parent by
  a `FusedSelfAttention` that shares its `qkv` and `proj` modules, so parameters, state-dict keys and optimizer state
  are untouched. Calls the fused path can't reproduce exactly (an attention bias or mask, attention dropout while
  training) go to the original module's own forward.

What looks like attention but is not patched (a `qkv` Linear with extra parameterised children, an unknown forward
argument, `nn.MultiheadAttention`, a transformers attention class that computes its softmax itself) is reported with
the reason: in the returned mapping's `left_alone` and as one logged warning.
"""
from __future__ import annotations

import inspect
import logging
from typing import Optional

from torch import Tensor, nn

from .. import ops

__all__ = ["FusedSelfAttention", "PatchResult", "attention_refusal", "is_attention_module", "patch_model",
           "unpatch_model"]

_log = logging.getLogger(__name__)

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


def attention_refusal(module: nn.Module) -> Optional[str]:
    """Why FusedSelfAttention cannot replace `module` exactly (see the module docstring), or None when it can."""
    from ..models.layers import Attention as _OurAttention

    if isinstance(module, (FusedSelfAttention, _OurAttention)):
        return "already dinotxt-fast's fused attention"
    if isinstance(module, nn.MultiheadAttention):
        return ("torch.nn.MultiheadAttention (packed in_proj, forward(query, key, value, ...)) is not replaced: "
                "only self-attention modules with qkv and proj Linears are")
    qkv, proj, heads = getattr(module, "qkv", None), getattr(module, "proj", None), getattr(module, "num_heads", None)
    if not isinstance(qkv, nn.Linear):
        return "no fused qkv Linear"
    if not (isinstance(proj, nn.Linear) and isinstance(heads, int) and heads > 0):
        return "needs a proj Linear and an integer num_heads beside its qkv Linear"
    dim = qkv.in_features
    if qkv.out_features != 3 * dim or dim % heads or proj.in_features != dim:
        return (f"qkv is {qkv.in_features} -> {qkv.out_features}, proj takes {proj.in_features}, {heads} heads: "
                "not a self-attention of one width")
    if any(True for _ in module.parameters(recurse=False)) or any(True for _ in module.buffers(recurse=False)):
        return "holds parameters or buffers of its own, whose effect the fused path would drop"
    for name, child in module.named_children():
        if name in ("qkv", "proj"):
            continue
        if name in _DROPOUTS and isinstance(child, (nn.Dropout, nn.Identity)):
            continue
        if name in _IDENTITIES and isinstance(child, nn.Identity):
            continue
        return f"has a child {name!r} ({type(child).__name__}) whose effect the fused path would drop"
    scale = getattr(module, "scale", None)
    if scale is not None and not isinstance(scale, (int, float)):
        return f"its scale is a {type(scale).__name__}, not a number"
    if _forward_params(module) is None:
        return f"its forward takes arguments other than x, {', '.join(_KNOWN_ARGS)}"
    return None


def is_attention_module(module: nn.Module) -> bool:
    """True for a self-attention module that FusedSelfAttention reproduces exactly (see the module docstring)."""
    return attention_refusal(module) is None


def _looks_like_attention(module: nn.Module) -> bool:
    """Worth a line in the left-alone report: a qkv Linear or nn.MultiheadAttention that is not ours already."""
    from ..models.layers import Attention as _OurAttention

    if isinstance(module, (FusedSelfAttention, _OurAttention)):
        return False
    return isinstance(module, nn.MultiheadAttention) or isinstance(getattr(module, "qkv", None), nn.Linear)


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
        refusal = attention_refusal(original)
        if refusal is not None:
            raise ValueError(f"{type(original).__name__} is not an attention module FusedSelfAttention can replace: "
                             f"{refusal} (it needs qkv and proj Linears, num_heads, and a forward(x, [attn_bias, "
                             "attn_mask, rope, is_causal]))")
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


class PatchResult(dict):
    """What `patch_model` did: as a dict, {qualified name: module} of every attention module now running the fused
    kernel (a replaced module's original; for a transformers model, its attention module itself, which stays in
    place). `left_alone` maps the attention-like modules it did not patch to the reason."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.left_alone: dict[str, str] = {}


def _prefixed(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else prefix or name


def _hf_models(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """The outermost transformers PreTrainedModels inside `module` (itself included)."""
    from . import hf_attention

    found: list[tuple[str, nn.Module]] = []
    for name, m in module.named_modules():
        if hf_attention.is_hf_model(m) and not any(name == n or name.startswith(n + ".") for n, _ in found if n):
            found.append((name, m))
            if not name:
                break  # `module` itself: everything inside is in its sub-tree
    return found


def patch_model(module: nn.Module, *, backend: Optional[str] = None) -> PatchResult:
    """Run dinotxt-fast's fused attention in every attention module inside `module`, in place (module docstring):
    transformers models through their AttentionInterface, other attention modules (see `is_attention_module`)
    replaced by a FusedSelfAttention.

    Returns a PatchResult: {qualified name: module} of what now runs the fused kernel ({} when nothing did; a model
    already patched is left as it is), with `.left_alone` {name: reason} of the attention-like modules it did not
    patch (also logged as one warning). Pass it to `unpatch_model` to undo the patch. Parameters are shared, so
    state dicts and optimizers are unaffected."""
    from . import hf_attention

    if not isinstance(module, nn.Module):
        raise TypeError(f"patch_model takes a torch.nn.Module, got {type(module).__name__}")
    if is_attention_module(module):
        raise ValueError("patch_model replaces the attention modules inside `module`, and `module` is one itself: "
                         "use FusedSelfAttention(module) instead")
    result = PatchResult()
    hf_roots = _hf_models(module)
    for root, hf_model in hf_roots:
        if getattr(hf_model.config, "_attn_implementation", None) == hf_attention.ATTENTION_NAME:
            continue  # already routed to our attention (patched before)
        hf = hf_attention.patch_hf(hf_model, backend=backend)
        result.update({_prefixed(root, name): m for name, m in hf.patched.items()})
        result.left_alone.update({_prefixed(root, name): why for name, why in hf.left_alone.items()})
    inside_hf = lambda name: any(not root or name == root or name.startswith(root + ".")  # noqa: E731
                                 for root, _ in hf_roots)
    for name, m in list(module.named_modules()):
        if not name or inside_hf(name):
            continue
        refusal = attention_refusal(m)
        if refusal is None:
            parent_name, _, child = name.rpartition(".")
            parent = module.get_submodule(parent_name) if parent_name else module
            setattr(parent, child, FusedSelfAttention(m, backend=backend))
            result[name] = m
        elif _looks_like_attention(m) and not any(name.startswith(done + ".") for done in result):
            result.left_alone[name] = refusal
    if result.left_alone:
        _log.warning("patch_model left %d attention module(s) alone:\n%s", len(result.left_alone),
                     "\n".join(f"  {name}: {why}" for name, why in result.left_alone.items()))
    return result


def _enclosing_hf_model(module: nn.Module, name: str) -> Optional[nn.Module]:
    """The outermost transformers model on the path from `module` to its sub-module `name`, if any."""
    from . import hf_attention

    parts = name.split(".")
    for depth in range(len(parts)):
        candidate = module.get_submodule(".".join(parts[:depth]))
        if hf_attention.is_hf_model(candidate):
            return candidate
    return None


def unpatch_model(module: nn.Module, replaced: dict[str, nn.Module]) -> None:
    """Undo `patch_model`: put back the modules it replaced, switch the transformers models it routed back to the
    attention implementation they had."""
    from . import hf_attention

    hf_models: list[nn.Module] = []
    for name, original in replaced.items():
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        current = getattr(parent, child, None)
        if current is original and hf_attention.is_routed(original):
            hf_model = _enclosing_hf_model(module, name)
            if hf_model is not None and not any(hf_model is m for m in hf_models):
                hf_models.append(hf_model)
            continue
        if not isinstance(current, FusedSelfAttention) or current.original is not original:
            raise ValueError(f"unpatch_model: {name!r} is not the FusedSelfAttention that patch_model put there")
        setattr(parent, child, original)
    for hf_model in hf_models:
        hf_attention.unpatch_hf(hf_model)
