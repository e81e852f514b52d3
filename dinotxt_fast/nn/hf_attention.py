"""dinotxt-fast's fused attention inside Hugging Face transformers models.

transformers' attention modules (Dinov2, Dinov2WithRegisters, DINOv3ViT, CLIP, ...) project q, k, v themselves,
apply their own RoPE, then call the function that `config._attn_implementation` names in `AttentionInterface`. That is
transformers' extension point, and the one used here: `dinotxt_fast.ops.attention` is registered there under the name
"dinotxt_fast" (with sdpa's mask function in `AttentionMaskInterface`, so a causal text model with no padding passes
no mask), and `patch_hf(model)` selects it with `model.set_attn_implementation`. Modules keep their classes,
parameters and state-dict keys; `unpatch_hf` selects the previous implementation again.

Calls the fused kernel does not compute are passed to transformers' own sdpa function unchanged: an explicit
attention mask (padding), attention dropout while training, grouped key/value heads, a causal call with more keys
than queries, sliding windows, soft-capping, attention sinks.
"""
from __future__ import annotations

import inspect
import sys
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from .. import ops

__all__ = ["ATTENTION_NAME", "HFPatch", "attention_forward", "is_hf_model", "is_routed", "patch_hf", "unpatch_hf"]

ATTENTION_NAME = "dinotxt_fast"
_BACKEND_ATTR = "_dinotxt_fast_backend"      # on each attention module: the ops backend it asked for
_PREVIOUS_ATTR = "_dinotxt_fast_previous"    # on the patched model: the implementation to restore
# Keyword arguments of an attention call that change its arithmetic beyond what ops.attention computes.
_UNSUPPORTED_KWARGS = ("sliding_window", "softcap", "s_aux", "sinks", "position_bias")


def _sdpa(*args, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(*args, **kwargs)


def _fallback_reason(query, key, value, attention_mask, dropout: float, causal: bool, kwargs: dict) -> Optional[str]:
    if attention_mask is not None:
        return "an attention mask"
    if dropout > 0:
        return "attention dropout"
    if key.shape[1] != query.shape[1] or value.shape[1] != query.shape[1]:
        return "grouped key/value heads"
    if causal and key.shape[2] != query.shape[2]:
        return "causal attention with a key cache"
    if any(kwargs.get(name) is not None for name in _UNSUPPORTED_KWARGS):
        return "a sliding window, soft-capping or attention sinks"
    return None


def attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: Optional[torch.Tensor], dropout: float = 0.0, scaling: Optional[float] = None,
                      is_causal: Optional[bool] = None, **kwargs):
    """transformers' attention-function signature: query/key/value [B, H, N, Dh] -> ([B, N, H, Dh], None).

    Causality is decided as transformers' sdpa function decides it (the call's `is_causal`, else the module's, and
    never for a single query), so a patched model computes what it computed with sdpa."""
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    causal = bool(causal) and query.shape[2] > 1
    if _fallback_reason(query, key, value, attention_mask, dropout, causal, kwargs) is not None:
        return _sdpa(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                     is_causal=is_causal, **kwargs)
    # [B, H, N, Dh] -> [B, N, H, Dh] views: ops.attention reads strided inputs.
    out = ops.attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), causal=causal,
                        scale=scaling, backend=getattr(module, _BACKEND_ATTR, None))
    return out, None


def is_hf_model(module: nn.Module) -> bool:
    """True for a transformers PreTrainedModel (without importing transformers when nothing has)."""
    transformers = sys.modules.get("transformers")
    return transformers is not None and isinstance(module, transformers.PreTrainedModel)


def is_routed(module: nn.Module) -> bool:
    """True for an attention module that `patch_hf` routed to ops.attention (and `unpatch_hf` has not restored)."""
    return hasattr(module, _BACKEND_ATTR)


def register() -> None:
    """Register the attention and mask functions under ATTENTION_NAME (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION_NAME, attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


_USES_INTERFACE: dict = {}


def _uses_interface(cls: type) -> bool:
    """Whether a module class's source file dispatches attention through ALL_ATTENTION_FUNCTIONS."""
    name = cls.__module__
    if name not in _USES_INTERFACE:
        try:
            _USES_INTERFACE[name] = "ALL_ATTENTION_FUNCTIONS" in inspect.getsource(sys.modules[name])
        except (KeyError, OSError, TypeError):
            _USES_INTERFACE[name] = False
    return _USES_INTERFACE[name]


def _attention_modules(model: nn.Module):
    """(name, module) of the attention modules: classes named *Attention* that hold a transformers config."""
    from transformers import PretrainedConfig

    for name, module in model.named_modules():
        if "Attention" in type(module).__name__ and isinstance(getattr(module, "config", None), PretrainedConfig):
            yield name, module


@dataclass
class HFPatch:
    """What `patch_hf` did: `patched` maps each attention module now running ops.attention to itself (it keeps its
    class and parameters), `left_alone` maps the others to the reason, `previous` is the implementation replaced."""

    patched: dict = field(default_factory=dict)
    left_alone: dict = field(default_factory=dict)
    previous: Optional[str] = None


def _set_implementation(model: nn.Module, name: Optional[str]) -> None:
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(name)
    else:  # transformers < 4.53: the config attribute is the switch
        model.config._attn_implementation = name


def patch_hf(model: nn.Module, *, backend: Optional[str] = None) -> HFPatch:
    """Route every attention module of a transformers model that uses the AttentionInterface to ops.attention (see
    the module docstring); report the attention modules left alone with the reason."""
    if not is_hf_model(model):
        raise TypeError(f"patch_hf takes a transformers PreTrainedModel, got {type(model).__name__}")
    register()
    result = HFPatch(previous=getattr(model.config, "_attn_implementation", None))
    candidates = list(_attention_modules(model))
    if not any(_uses_interface(type(m)) for _, m in candidates):
        result.left_alone = {n: _no_interface(m) for n, m in candidates}
        return result  # nothing to route: leave the model's implementation as it is
    if result.previous != ATTENTION_NAME:
        setattr(model, _PREVIOUS_ATTR, result.previous)
    _set_implementation(model, ATTENTION_NAME)
    for name, module in candidates:
        if not _uses_interface(type(module)):
            result.left_alone[name] = _no_interface(module)
        elif getattr(module.config, "_attn_implementation", None) != ATTENTION_NAME:
            result.left_alone[name] = (f"its config kept attn_implementation="
                                       f"{module.config._attn_implementation!r} (a sub-model that cannot switch)")
        else:
            setattr(module, _BACKEND_ATTR, backend)
            result.patched[name] = module
    return result


def _no_interface(module: nn.Module) -> str:
    return (f"{type(module).__name__} computes attention itself ({type(module).__module__} does not use "
            "transformers' AttentionInterface; transformers >= 4.48 does for most models)")


def unpatch_hf(model: nn.Module) -> None:
    """Select the implementation `patch_hf` replaced (default sdpa) and forget the backends it set."""
    if not is_hf_model(model):
        raise TypeError(f"unpatch_hf takes a transformers PreTrainedModel, got {type(model).__name__}")
    previous = getattr(model, _PREVIOUS_ATTR, None)
    if getattr(model.config, "_attn_implementation", None) == ATTENTION_NAME:
        _set_implementation(model, previous or "sdpa")
    for _, module in _attention_modules(model):
        if hasattr(module, _BACKEND_ATTR):
            delattr(module, _BACKEND_ATTR)
    if hasattr(model, _PREVIOUS_ATTR):
        delattr(model, _PREVIOUS_ATTR)
