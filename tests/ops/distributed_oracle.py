"""The autograd composite the fused distributed contrastive loss is tested against (test-only): each rank's rows
against the all-gathered batch, both directions, through plain cross-entropies; the gather's backward sums every
rank's gradient (docs/design.md, "Distributed loss")."""
import torch
import torch.nn.functional as F

from dinotxt_fast.ops.planning import accumulation_dtype
from dinotxt_fast.ops.reference.common import normalized


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
    i, _ = normalized(img.to(acc), normalize)
    t, _ = normalized(txt.to(acc), normalize)
    all_i, all_t = _GatherRows.apply(i, group), _GatherRows.apply(t, group)
    scale = logit_scale.to(acc).reshape(()).exp()
    targets = torch.arange(img.shape[0], device=img.device) + dist.get_rank(group) * img.shape[0]
    image_to_text = F.cross_entropy(scale * (i @ all_t.T), targets)
    text_to_image = F.cross_entropy(scale * (t @ all_i.T), targets)
    return 0.5 * (image_to_text + text_to_image)
