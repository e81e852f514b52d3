"""What the reference families share: the chunk budgets that bound their temporaries, and the L2 normalisation
(x / max(||x||, eps), as F.normalize) with its backward."""
from __future__ import annotations

import torch

from ..planning import NORM_EPS

# Elements of one chunk of attention scores, upsampled logits or contrastive logits (64 Mi floats = 256 MB in fp32).
# Read at call time (as common.CHUNK_ELEMENTS), so that tests can shrink it to exercise the chunked paths.
CHUNK_ELEMENTS = 1 << 26

# Elements of one chunk per CPU thread (4 MB of fp32 each): every family's chunk (a band of dense decoding, a block
# of attention scores, a tile of contrastive logits) is reread by a handful of passes (max, exp, sum, matmuls), so on
# a CPU each thread's share stays small enough for its caches, and large enough that the per-op overhead (~10 us a
# call, and the threads' synchronisation at the end of each op) is a few percent of its work; on a GPU, where every
# op is a kernel launch, a chunk may take CHUNK_ELEMENTS. Read at call time.
CPU_CHUNK_ELEMENTS = 1 << 20


def chunk_elements(device) -> int:
    """Elements of one chunk of a reference family's work on `device` (never more than CHUNK_ELEMENTS)."""
    if torch.device(device).type == "cpu":
        return min(CHUNK_ELEMENTS, CPU_CHUNK_ELEMENTS * torch.get_num_threads())
    return CHUNK_ELEMENTS


def normalized(x: torch.Tensor, normalize: bool):
    """(x / max(||x||, eps), clamped norms [B, 1]) or (x, None)."""
    if not normalize:
        return x, None
    norm = x.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS)
    return x / norm, norm


def normalize_backward(grad: torch.Tensor, y: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """Gradient of y = x / max(||x||, eps) w.r.t. x, given the output y, its gradient and the clamped norms [B, 1]."""
    return torch.where(norm > NORM_EPS, (grad - y * (grad * y).sum(-1, keepdim=True)) / norm, grad / norm)
