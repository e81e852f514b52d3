"""Functional ops of dinotxt-fast: autograd-capable, backend-dispatched, registered as `torch.ops.dinotxt_fast.*`.

Every op takes `backend=` ("torch", "triton", "cuda" or None for auto; see dispatch.py). Inputs are validated
here, once, with errors that name the argument, its shape, dtype or device.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

from . import library, reference  # library declares the op families, then the torch backend registers them
from .dispatch import ENV_VAR, Backend, add_kernels, backends, register_backend, resolve, use_backend

__all__ = [
    "attention", "patch_pool", "contrastive_loss", "patch_text_logits", "upsample_argmax", "slide_decode",
    "backends", "use_backend", "register_backend", "add_kernels", "Backend", "ENV_VAR",
]

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _import_kernel_backends() -> None:
    """Import the kernel backend packages (each declares its probe; its family modules register their kernels):
    Triton when it is installed, the CUDA kernels of the compiled extension (registered only where dinotxt_fast._C
    has them)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        pass
    else:
        from . import triton as _triton_kernels  # noqa: F401
    from . import cuda  # noqa: F401  (after triton: its attention backward is the Triton one, found by dispatch)


def _check(op: str, name: str, t: Tensor, ndim: int, layout: str, dtypes=_FLOATS) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{op}: {name} must be {layout}, got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        raise TypeError(f"{op}: {name} has dtype {t.dtype}; supported: {[str(d) for d in dtypes]}")


def _same(op: str, **tensors: Tensor) -> None:
    (first_name, first), *rest = tensors.items()
    for name, t in rest:
        if t.device != first.device:
            raise ValueError(f"{op}: {name} is on {t.device} but {first_name} is on {first.device}")
        if t.dtype != first.dtype:
            raise TypeError(f"{op}: {name} has dtype {t.dtype} but {first_name} has {first.dtype}")


def attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False, scale: Optional[float] = None,
              lengths: Optional[Tensor] = None, backend: Optional[str] = None) -> Tensor:
    """Softmax attention on [B, N, H, Dh] tensors (strided views of a fused qkv projection are fine) -> [B, N, H, Dh].

    `scale` defaults to 1/sqrt(Dh); `causal` masks keys after the query (top-left aligned, needs Nq == Nk).
    `lengths` (int32/int64 [B]) masks the keys at positions >= lengths[b] of sequence b, for every query (with
    `causal`: the padding after each text's EOT); kernels skip those keys. Values beyond Nk mask nothing; a query
    that sees no key (lengths[b] <= 0) gets a zero output and zero gradients."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check("attention", name, t, 4, "[B, N, H, Dh]")
    _same("attention", q=q, k=k, v=v)
    if q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2] or q.shape[3] != k.shape[3] or k.shape[:3] != v.shape[:3]:
        raise ValueError(f"attention: incompatible shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} "
                         "(need q [B,Nq,H,Dh], k [B,Nk,H,Dh], v [B,Nk,H,Dv])")
    if causal and q.shape[1] != k.shape[1]:
        raise ValueError(f"attention: causal attention needs as many queries as keys, got {q.shape[1]} and "
                         f"{k.shape[1]}")
    if min(q.shape[1], k.shape[1]) == 0 or min(q.shape[3], v.shape[3]) == 0:
        raise ValueError(f"attention: empty sequence or head dim (q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)})")
    if lengths is not None:
        if not isinstance(lengths, Tensor) or lengths.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"attention: lengths must be an int32/int64 tensor [B], got "
                            f"{getattr(lengths, 'dtype', type(lengths).__name__)}")
        if lengths.shape != (q.shape[0],):
            raise ValueError(f"attention: lengths must have shape [B] = ({q.shape[0]},), got {tuple(lengths.shape)}")
        if lengths.device != q.device:
            raise ValueError(f"attention: lengths is on {lengths.device} but q is on {q.device}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    name = resolve("attention", backend, q, causal=causal, head_dim=q.shape[-1], value_dim=v.shape[-1],
                   lengths=lengths is not None, batch_heads=q.shape[0] * q.shape[2], seq=q.shape[1], grad=grad)
    if name == "torch" and not grad and reference.attention.sdpa_forward_applies(q):
        # Inference on the torch backend needs no log-sum-exp: PyTorch's own fused SDPA kernels, not the chunked
        # fp32 reference (which exists to return the lse the backward reads, and as the float64 oracle).
        return reference.attention.attention_forward_sdpa(q, k, v, bool(causal), scale, lengths)
    return library.attention_fwd(q, k, v, bool(causal), scale, lengths, name)[0]


def patch_pool(tokens: Tensor, *, num_registers: int, ln_weight: Optional[Tensor] = None,
               ln_bias: Optional[Tensor] = None, eps: float = 1e-5, normalize: bool = False,
               backend: Optional[str] = None) -> Tensor:
    """`[cls ; mean(patches)]` of tokens [B, 1+R+P, D] -> [B, 2D], registers excluded.

    With `ln_weight` (and optionally `ln_bias`) a LayerNorm over D is applied to the tokens first (fused: the
    normalised tokens are never written); `normalize` L2-normalises the 2D vector as one."""
    _check("patch_pool", "tokens", tokens, 3, "[B, 1+R+P, D]")
    if not isinstance(num_registers, int) or num_registers < 0:
        raise ValueError(f"patch_pool: num_registers must be an int >= 0, got {num_registers!r}")
    if tokens.shape[1] < 2 + num_registers:
        raise ValueError(f"patch_pool: tokens {tuple(tokens.shape)} hold no patch after cls and {num_registers} "
                         "registers")
    if ln_weight is None and ln_bias is not None:
        raise ValueError("patch_pool: ln_bias given without ln_weight")
    for name, t in (("ln_weight", ln_weight), ("ln_bias", ln_bias)):
        if t is not None:
            _check("patch_pool", name, t, 1, "[D]")
            if t.shape[0] != tokens.shape[2] or t.device != tokens.device:
                raise ValueError(f"patch_pool: {name} has shape {tuple(t.shape)} on {t.device}; expected "
                                 f"({tokens.shape[2]},) on {tokens.device}")
    name = resolve("patch_pool", backend, tokens, dim=tokens.shape[2])
    return library.patch_pool_fwd(tokens, num_registers, ln_weight, ln_bias, float(eps), bool(normalize), name)


def contrastive_loss(img: Tensor, txt: Tensor, logit_scale: Tensor, *, normalize: bool = True, group=None,
                     backend: Optional[str] = None) -> Tensor:
    """Symmetric InfoNCE `0.5 * (CE(s, diag) + CE(s^T, diag))` with `s = exp(logit_scale) * img @ txt^T`.

    img, txt [B_local, E]; logit_scale is the LOG of the scale (0-d or 1-element tensor). Never forms the B x B
    logits (tiled kernels with online log-sum-exps; see contrastive_tiles.py). With a process `group` (every rank
    passing the same [B_local, E]), returns this rank's share of the global-batch loss: its rows against the
    all-gathered texts, column log-sum-exps merged over ranks, text gradients reduce-scattered (averaging gradients
    over ranks reproduces the single-process step; docs/design.md, "Distributed loss"). Returns a 0-d fp32 tensor
    (fp64 for fp64 inputs)."""
    _check("contrastive_loss", "img", img, 2, "[B, E]")
    _check("contrastive_loss", "txt", txt, 2, "[B, E]")
    _same("contrastive_loss", img=img, txt=txt)
    if img.shape != txt.shape or img.numel() == 0:
        raise ValueError(f"contrastive_loss: img {tuple(img.shape)} and txt {tuple(txt.shape)} must be the same "
                         "non-empty [B, E]")
    if not isinstance(logit_scale, Tensor) or logit_scale.numel() != 1:
        raise ValueError("contrastive_loss: logit_scale must be a 0-d or 1-element tensor (the log of the scale)")
    if logit_scale.device != img.device:
        raise ValueError(f"contrastive_loss: logit_scale is on {logit_scale.device} but img is on {img.device}")
    world = 1
    if group is not None:
        import torch.distributed as dist

        world = dist.get_world_size(group)
    name = resolve("contrastive_loss", backend, img, b_global=img.shape[0] * world, dim=img.shape[1],
                   grad=torch.is_grad_enabled() and (img.requires_grad or txt.requires_grad))
    if world > 1:
        _check_same_shape_on_ranks(img, group)
        return library.contrastive_distributed(img, txt, logit_scale, bool(normalize), group, name)
    return library.contrastive_fwd(img, txt, logit_scale, bool(normalize), name)[0]


_CHECKED_SHAPES: set = set()


def _check_same_shape_on_ranks(img: Tensor, group) -> None:
    """Every rank must pass the same [B_local, E] (the all-gathers assume it; NCCL would hang or read garbage
    otherwise). Checked with one tiny collective the first time a (group, shape) is seen."""
    import torch.distributed as dist

    key = (id(group), tuple(img.shape))
    if key in _CHECKED_SHAPES or torch.compiler.is_compiling():
        return
    mine = [img.shape[0], -img.shape[0], img.shape[1], -img.shape[1]]
    both = torch.tensor(mine, device=img.device)
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
    b_max, b_min, e_max, e_min = both.tolist()
    if b_max != -b_min or e_max != -e_min:
        raise ValueError(f"contrastive_loss: every rank of the group must pass the same [B_local, E]; this rank has "
                         f"{tuple(img.shape)}, the ranks span B_local {-b_min}..{b_max}, E {-e_min}..{e_max}")
    _CHECKED_SHAPES.add(key)


def patch_text_logits(patches: Tensor, text: Tensor, *, backend: Optional[str] = None) -> Tensor:
    """Cosine similarity of patch features [B, h, w, D] with class features [C, D] -> [B, C, h, w] (fp32)."""
    _check("patch_text_logits", "patches", patches, 4, "[B, h, w, D]")
    _check("patch_text_logits", "text", text, 2, "[C, D]")
    if patches.shape[-1] != text.shape[-1] or patches.device != text.device:
        raise ValueError(f"patch_text_logits: patches {tuple(patches.shape)} on {patches.device} and text "
                         f"{tuple(text.shape)} on {text.device} must share D and device")
    name = resolve("patch_text_logits", backend, patches, num_classes=text.shape[0])
    return library.patch_text_logits(patches, text, name)


def _size(op: str, name: str, size: Sequence[int]) -> list[int]:
    size = [int(s) for s in size]
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"{op}: {name} must be (H, W) with H, W >= 1, got {size}")
    return size


def upsample_argmax(logits: Tensor, size: Sequence[int], *, softmax: bool = False, return_scores: bool = False,
                    backend: Optional[str] = None):
    """argmax over classes of `logits` [B, C, h, w] bilinearly resized (align_corners=False) to `size` -> labels
    [B, H, W] int64 (and the winning value, a probability with `softmax`), without a [B, C, H, W] tensor."""
    _check("upsample_argmax", "logits", logits, 4, "[B, C, h, w]")
    size = _size("upsample_argmax", "size", size)
    name = resolve("upsample_argmax", backend, logits, num_classes=logits.shape[1])
    labels, scores = library.upsample_argmax(logits, size, bool(softmax), name)
    return (labels, scores) if return_scores else labels


def slide_decode(window_logits: Tensor, boxes, canvas_size: Sequence[int], size: Sequence[int], *,
                 softmax: bool = True, return_scores: bool = False, backend: Optional[str] = None):
    """Decode sliding-window logits [Nw, C, h, w] placed at `boxes` [Nw, 4] (y0, x0, y1, x1) on a canvas of
    `canvas_size` into labels [H, W] at `size`: per window bilinear upsampling to its box, softmax over classes
    (when `softmax`), overlap averaging, bilinear resize to `size`, argmax. Never allocates [C, H, W] at full size."""
    _check("slide_decode", "window_logits", window_logits, 4, "[Nw, C, h, w]")
    boxes = torch.as_tensor(boxes, dtype=torch.int64)
    canvas = _size("slide_decode", "canvas_size", canvas_size)
    size = _size("slide_decode", "size", size)
    if boxes.shape != (window_logits.shape[0], 4):
        raise ValueError(f"slide_decode: boxes must be [{window_logits.shape[0]}, 4] (one (y0, x0, y1, x1) per "
                         f"window), got {tuple(boxes.shape)}")
    if boxes.numel() and (bool((boxes[:, :2] < 0).any()) or bool((boxes[:, 2] > canvas[0]).any())
                          or bool((boxes[:, 3] > canvas[1]).any()) or bool((boxes[:, 2:] <= boxes[:, :2]).any())):
        raise ValueError(f"slide_decode: boxes {boxes.tolist()} must be non-empty and inside the canvas {canvas}")
    name = resolve("slide_decode", backend, window_logits, num_classes=window_logits.shape[1])
    labels, scores = library.slide_decode(window_logits, boxes, canvas, size, bool(softmax), name)
    return (labels, scores) if return_scores else labels


_import_kernel_backends()
