"""The `torch.library` registration of every op: `torch.ops.dinotxt_fast.*`, and each op family's kernel names.

Each op takes the backend name as its last argument and runs that backend's kernel, so `torch.compile` sees one
opaque node per op (no graph break) and the backward is a registered op too. Fake (meta) implementations give
shapes and dtypes; outputs are always contiguous, whatever the strides of the inputs. Every family declares the
kernels a backend provides for it (dispatch.declare_family) here, next to the custom ops that call them
(docs/design.md, "Op families").
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import dispatch
from .planning import accumulation_dtype

NAMESPACE = "dinotxt_fast"


def _run(backend: str, kernel: str, *args):
    """Run a backend's kernel with autocast off and the first argument's CUDA device current: Triton and the _C
    wrappers launch on the current device and its stream, which must be the device the tensors live on."""
    fn = dispatch.get_kernel(backend, kernel)
    # Autocast stays outside: a kernel computes in the dtypes it is given (and declares in its fake).
    with torch.autocast(args[0].device.type, enabled=False):
        if args[0].is_cuda:
            with torch.cuda.device(args[0].device):
                return fn(*args)
        return fn(*args)


def _empty(shape, like: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
    return torch.empty(shape, dtype=dtype or like.dtype, device=like.device)


# --------------------------------------------------------------------------------------------------- attention
dispatch.declare_family("attention", ("attention_forward", "attention_backward"),
                        match_keys=(("head_dim", "causal"), "seq"))


@torch.library.custom_op(f"{NAMESPACE}::attention_fwd", mutates_args=())
def attention_fwd(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float, lengths: Optional[Tensor],
                  backend: str) -> tuple[Tensor, Tensor]:
    """(o, lse); `lengths` (int [B] or None) masks the keys at positions >= lengths[b]."""
    return _run(backend, "attention_forward", q, k, v, causal, scale, lengths)


@attention_fwd.register_fake
def _(q, k, v, causal, scale, lengths, backend):
    b, n, h, _ = q.shape
    return _empty((b, n, h, v.shape[-1]), q), _empty((b, h, n), q, accumulation_dtype(q.dtype))


@torch.library.custom_op(f"{NAMESPACE}::attention_bwd", mutates_args=())
def attention_bwd(grad_o: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, causal: bool, scale: float,
                  lengths: Optional[Tensor], backend: str) -> tuple[Tensor, Tensor, Tensor]:
    return _run(backend, "attention_backward", grad_o, q, k, v, o, lse, causal, scale, lengths)


@attention_bwd.register_fake
def _(grad_o, q, k, v, o, lse, causal, scale, lengths, backend):
    return _empty(q.shape, q), _empty(k.shape, k), _empty(v.shape, v)


def _attention_setup(ctx, inputs, output):
    q, k, v, causal, scale, lengths, backend = inputs
    o, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, o, lse, lengths)
    ctx.causal, ctx.scale, ctx.backend = causal, scale, backend


def _attention_backward(ctx, grad_o, grad_lse):
    q, k, v, o, lse, lengths = ctx.saved_tensors
    dq, dk, dv = attention_bwd(grad_o, q, k, v, o, lse, ctx.causal, ctx.scale, lengths, ctx.backend)
    return dq, dk, dv, None, None, None, None


attention_fwd.register_autograd(_attention_backward, setup_context=_attention_setup)


# ------------------------------------------------------------------------------------------------ patch pooling
dispatch.declare_family("patch_pool", ("patch_pool_forward", "patch_pool_backward"))


@torch.library.custom_op(f"{NAMESPACE}::patch_pool_fwd", mutates_args=())
def patch_pool_fwd(tokens: Tensor, num_registers: int, ln_weight: Optional[Tensor], ln_bias: Optional[Tensor],
                   eps: float, normalize: bool, backend: str) -> Tensor:
    return _run(backend, "patch_pool_forward", tokens, num_registers, ln_weight, ln_bias, eps, normalize)


@patch_pool_fwd.register_fake
def _(tokens, num_registers, ln_weight, ln_bias, eps, normalize, backend):
    return _empty((tokens.shape[0], 2 * tokens.shape[2]), tokens)


@torch.library.custom_op(f"{NAMESPACE}::patch_pool_bwd", mutates_args=())
def patch_pool_bwd(grad_out: Tensor, tokens: Tensor, num_registers: int, ln_weight: Optional[Tensor],
                   ln_bias: Optional[Tensor], eps: float, normalize: bool,
                   backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """(d_tokens, d_ln_weight, d_ln_bias); the last two are empty when there is no LayerNorm weight / bias."""
    grads = _run(backend, "patch_pool_backward", grad_out, tokens, num_registers, ln_weight, ln_bias, eps, normalize)
    return tuple(g if g is not None else tokens.new_empty(0) for g in grads)


@patch_pool_bwd.register_fake
def _(grad_out, tokens, num_registers, ln_weight, ln_bias, eps, normalize, backend):
    # the LayerNorm gradients come in the parameters' own dtype (fp32 parameters with bf16 tokens under autocast)
    param = lambda t: _empty(t.shape, t) if t is not None else _empty((0,), tokens)  # noqa: E731
    return _empty(tokens.shape, tokens), param(ln_weight), param(ln_bias)


def _patch_pool_setup(ctx, inputs, output):
    tokens, num_registers, ln_weight, ln_bias, eps, normalize, backend = inputs
    ctx.save_for_backward(tokens, ln_weight, ln_bias)
    ctx.args = (num_registers, eps, normalize, backend)


def _patch_pool_backward(ctx, grad_out):
    tokens, ln_weight, ln_bias = ctx.saved_tensors
    num_registers, eps, normalize, backend = ctx.args
    d_tokens, d_weight, d_bias = patch_pool_bwd(grad_out, tokens, num_registers, ln_weight, ln_bias, eps, normalize,
                                                backend)
    return (d_tokens, None, d_weight if ln_weight is not None else None, d_bias if ln_bias is not None else None,
            None, None, None)


patch_pool_fwd.register_autograd(_patch_pool_backward, setup_context=_patch_pool_setup)


# --------------------------------------------------------------------------------------------- contrastive loss
# partial_*: local rows against all columns (the distributed path); see contrastive_tiles.py.
dispatch.declare_family("contrastive_loss", ("contrastive_forward", "contrastive_backward",
                                             "contrastive_partial_forward", "contrastive_partial_backward"),
                        match_keys=(("dim",), "b_global"))


@torch.library.custom_op(f"{NAMESPACE}::contrastive_fwd", mutates_args=())
def contrastive_fwd(img: Tensor, txt: Tensor, logit_scale: Tensor, normalize: bool,
                    backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, lse_rows [B], lse_cols [B]): the row and column log-sum-exps (float64) are what the backward needs."""
    return _run(backend, "contrastive_forward", img, txt, logit_scale, normalize)


@contrastive_fwd.register_fake
def _(img, txt, logit_scale, normalize, backend):
    b, lse = img.shape[0], torch.float64
    return _empty((), img, accumulation_dtype(img.dtype)), _empty((b,), img, lse), _empty((b,), img, lse)


@torch.library.custom_op(f"{NAMESPACE}::contrastive_bwd", mutates_args=())
def contrastive_bwd(grad_loss: Tensor, img: Tensor, txt: Tensor, logit_scale: Tensor, lse_rows: Tensor,
                    lse_cols: Tensor, normalize: bool, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    return _run(backend, "contrastive_backward", grad_loss, img, txt, logit_scale, lse_rows, lse_cols, normalize)


@contrastive_bwd.register_fake
def _(grad_loss, img, txt, logit_scale, lse_rows, lse_cols, normalize, backend):
    return _empty(img.shape, img), _empty(txt.shape, txt), _empty(logit_scale.shape, logit_scale)


def _contrastive_setup(ctx, inputs, output):
    img, txt, logit_scale, normalize, backend = inputs
    _, lse_rows, lse_cols = output
    ctx.mark_non_differentiable(lse_rows, lse_cols)
    ctx.save_for_backward(img, txt, logit_scale, lse_rows, lse_cols)
    ctx.normalize, ctx.backend = normalize, backend


def _contrastive_backward(ctx, grad_loss, grad_lse_rows, grad_lse_cols):
    img, txt, logit_scale, lse_rows, lse_cols = ctx.saved_tensors
    d_img, d_txt, d_scale = contrastive_bwd(grad_loss, img, txt, logit_scale, lse_rows, lse_cols, ctx.normalize,
                                            ctx.backend)
    return d_img, d_txt, d_scale, None, None


contrastive_fwd.register_autograd(_contrastive_backward, setup_context=_contrastive_setup)


@torch.library.custom_op(f"{NAMESPACE}::contrastive_partial_fwd", mutates_args=())
def contrastive_partial_fwd(img: Tensor, txt: Tensor, logit_scale: Tensor, normalize: bool, diag_offset: int,
                            backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """(lse_rows [M], partial lse_cols [N] (float64), diag [M]) of rows img [M, E] against columns txt [N, E]."""
    return _run(backend, "contrastive_partial_forward", img, txt, logit_scale, normalize, diag_offset)


@contrastive_partial_fwd.register_fake
def _(img, txt, logit_scale, normalize, diag_offset, backend):
    lse = torch.float64
    return (_empty((img.shape[0],), img, lse), _empty((txt.shape[0],), img, lse),
            _empty((img.shape[0],), img, accumulation_dtype(img.dtype)))


@torch.library.custom_op(f"{NAMESPACE}::contrastive_partial_bwd", mutates_args=())
def contrastive_partial_bwd(img: Tensor, txt: Tensor, logit_scale: Tensor, lse_rows: Tensor, lse_cols: Tensor,
                            row_coef: Tensor, col_coef: Tensor, normalize: bool, diag_offset: int,
                            backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """(d_img [M, E], g_txt [N, E] w.r.t. the normalised columns (fp32/fp64), d_logit_scale)."""
    return _run(backend, "contrastive_partial_backward", img, txt, logit_scale, lse_rows, lse_cols, row_coef,
                col_coef, normalize, diag_offset)


@contrastive_partial_bwd.register_fake
def _(img, txt, logit_scale, lse_rows, lse_cols, row_coef, col_coef, normalize, diag_offset, backend):
    return (_empty(img.shape, img), _empty(txt.shape, img, accumulation_dtype(img.dtype)),
            _empty(logit_scale.shape, logit_scale))


def _has_reduce_scatter(group, tensor: Tensor) -> bool:
    """NCCL has reduce_scatter; gloo (CPU tensors) does not."""
    import torch.distributed as dist

    return tensor.is_cuda and "nccl" in str(dist.get_backend(group)).lower()


class ContrastiveDistributed(torch.autograd.Function):
    """This rank's share of the global-batch loss through the partial kernels (docs/design.md, "Distributed loss").

    Forward: all-gather the texts (no autograd), local images against all texts -> row log-sum-exps (complete) and
    partial column log-sum-exps, merged over ranks by one all-gather of [B_global] per rank. Backward: the local
    rows' dS against all columns gives d_img (complete) and every column's share of d_txt, summed onto its owner by
    a reduce-scatter (all_reduce + slice on gloo). d_logit_scale is this rank's rows' sum of dS * s, so that its
    mean over ranks (DDP) is the global gradient. The upstream gradients of all ranks are gathered (a [world]
    all-gather), so ranks may scale their losses differently."""

    @staticmethod
    def forward(ctx, img, txt, logit_scale, normalize, group, backend):
        import torch.distributed as dist

        world, rank = dist.get_world_size(group), dist.get_rank(group)
        b = img.shape[0]
        txt_all = txt.new_empty((world * b, txt.shape[1]))
        dist.all_gather_into_tensor(txt_all, txt.contiguous(), group=group)
        lse_rows, lse_cols_part, diag = contrastive_partial_fwd(img, txt_all, logit_scale, normalize, rank * b, backend)
        parts = lse_cols_part.new_empty((world * world * b,))
        dist.all_gather_into_tensor(parts, lse_cols_part, group=group)
        lse_cols = torch.logsumexp(parts.view(world, world * b), dim=0)
        own = lse_cols[rank * b:(rank + 1) * b]
        loss = (0.5 * ((lse_rows - diag).mean() + (own - diag).mean())).to(diag.dtype)
        ctx.save_for_backward(img, txt, txt_all, logit_scale, lse_rows, lse_cols)
        ctx.normalize, ctx.group, ctx.backend = normalize, group, backend
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        import torch.distributed as dist

        from .reference.contrastive import contrastive_normalize_backward

        img, txt, txt_all, logit_scale, lse_rows, lse_cols = ctx.saved_tensors
        group = ctx.group
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        b = img.shape[0]
        acc = accumulation_dtype(img.dtype)
        grads = img.new_empty((world,), dtype=acc)
        dist.all_gather_into_tensor(grads, grad_loss.detach().to(acc).reshape(1).contiguous(), group=group)
        row_coef = (grads[rank] * (0.5 / b)).expand(b).contiguous()
        col_coef = (grads * (0.5 / b)).repeat_interleave(b)
        d_img, g_txt_all, d_scale = contrastive_partial_bwd(img, txt_all, logit_scale, lse_rows, lse_cols, row_coef,
                                                            col_coef, ctx.normalize, rank * b, ctx.backend)
        if _has_reduce_scatter(group, g_txt_all):
            g_txt = g_txt_all.new_empty((b, g_txt_all.shape[1]))
            dist.reduce_scatter_tensor(g_txt, g_txt_all, group=group)
        else:  # gloo has no reduce_scatter
            dist.all_reduce(g_txt_all, group=group)
            g_txt = g_txt_all[rank * b:(rank + 1) * b]
        d_txt = contrastive_normalize_backward(g_txt, txt, ctx.normalize)
        return d_img, d_txt, d_scale, None, None, None


def contrastive_distributed(img: Tensor, txt: Tensor, logit_scale: Tensor, normalize: bool, group,
                            backend: str) -> Tensor:
    return ContrastiveDistributed.apply(img, txt, logit_scale, normalize, group, backend)


# -------------------------------------------------------------------------------- dense decode (inference only)
# One kernel each, named as its op.
dispatch.declare_family("patch_text_logits", ("patch_text_logits",))
dispatch.declare_family("upsample_argmax", ("upsample_argmax",))
dispatch.declare_family("slide_decode", ("slide_decode",))


@torch.library.custom_op(f"{NAMESPACE}::patch_text_logits", mutates_args=())
def patch_text_logits(patches: Tensor, text: Tensor, backend: str) -> Tensor:
    return _run(backend, "patch_text_logits", patches, text)


@patch_text_logits.register_fake
def _(patches, text, backend):
    b, h, w, _ = patches.shape
    return _empty((b, text.shape[0], h, w), patches, accumulation_dtype(patches.dtype))


@torch.library.custom_op(f"{NAMESPACE}::upsample_argmax", mutates_args=())
def upsample_argmax(logits: Tensor, size: list[int], softmax: bool, backend: str) -> tuple[Tensor, Tensor]:
    return _run(backend, "upsample_argmax", logits, size, softmax)


@upsample_argmax.register_fake
def _(logits, size, softmax, backend):
    shape = (logits.shape[0], size[0], size[1])
    return _empty(shape, logits, torch.int64), _empty(shape, logits, accumulation_dtype(logits.dtype))


@torch.library.custom_op(f"{NAMESPACE}::slide_decode", mutates_args=())
def slide_decode(window_logits: Tensor, boxes: Tensor, canvas_size: list[int], size: list[int], softmax: bool,
                 backend: str) -> tuple[Tensor, Tensor]:
    return _run(backend, "slide_decode", window_logits, boxes, canvas_size, size, softmax)


@slide_decode.register_fake
def _(window_logits, boxes, canvas_size, size, softmax, backend):
    shape = (size[0], size[1])
    return (_empty(shape, window_logits, torch.int64),
            _empty(shape, window_logits, accumulation_dtype(window_logits.dtype)))
