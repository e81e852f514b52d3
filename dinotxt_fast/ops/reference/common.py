"""What the reference families share: the chunk budget that bounds their temporaries, and the L2 normalisation
(x / max(||x||, eps), as F.normalize) with its backward."""
from __future__ import annotations

import torch

from ..planning import NORM_EPS

# Elements of one chunk of attention scores, upsampled logits or contrastive logits (64 Mi floats = 256 MB in fp32).
# Read at call time (as common.CHUNK_ELEMENTS), so that tests can shrink it to exercise the chunked paths.
CHUNK_ELEMENTS = 1 << 26


def normalized(x: torch.Tensor, normalize: bool):
    """(x / max(||x||, eps), clamped norms [B, 1]) or (x, None)."""
    if not normalize:
        return x, None
    norm = x.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS)
    return x / norm, norm


def normalize_backward(grad: torch.Tensor, y: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """Gradient of y = x / max(||x||, eps) w.r.t. x, given the output y, its gradient and the clamped norms [B, 1]."""
    return torch.where(norm > NORM_EPS, (grad - y * (grad * y).sum(-1, keepdim=True)) / norm, grad / norm)
