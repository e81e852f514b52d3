"""`ContrastiveLoss`: DINO.txt's symmetric InfoNCE over the global batch with its learnable, clamped logit scale."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from .. import ops

INIT_LOGIT_SCALE = math.log(1 / 0.07)
MAX_LOGIT_SCALE = math.log(100.0)


class ContrastiveLoss(nn.Module):
    """`0.5 * (CE(s, diag) + CE(s^T, diag))` with `s = exp(logit_scale) * img_n @ txt_n^T`, through the fused
    `ops.contrastive_loss` (no B x B logits).

    Owns `logit_scale` (0-d parameter, the LOG of the scale; initialised to ln(1/0.07), the official key name).
    Call `clamp_()` after every optimizer step, as the official recipe does: it clamps the log-scale to
    [min_logit_scale, max_logit_scale] = [0, ln 100] by default. With a process `group`, each rank returns its share
    of the global-batch loss (docs/design.md, "Distributed loss"): wrap the model in DDP (or average gradients) as
    usual."""

    def __init__(self, init_logit_scale: float = INIT_LOGIT_SCALE, *, normalize: bool = True,
                 min_logit_scale: float = 0.0, max_logit_scale: float = MAX_LOGIT_SCALE):
        super().__init__()
        if not min_logit_scale <= max_logit_scale:
            raise ValueError(f"ContrastiveLoss: min_logit_scale {min_logit_scale} > max_logit_scale {max_logit_scale}")
        self.logit_scale = nn.Parameter(torch.tensor(float(init_logit_scale)))
        self.normalize = normalize
        self.min_logit_scale = float(min_logit_scale)
        self.max_logit_scale = float(max_logit_scale)

    def clamp_(self) -> "ContrastiveLoss":
        """Clamp the log-scale in place to [min_logit_scale, max_logit_scale]; returns self."""
        with torch.no_grad():
            self.logit_scale.clamp_(self.min_logit_scale, self.max_logit_scale)
        return self

    def forward(self, img: Tensor, txt: Tensor, group=None, backend: Optional[str] = None) -> Tensor:
        """img, txt [B_local, E] (paired rows) -> 0-d fp32 loss (this rank's share with a process group)."""
        return ops.contrastive_loss(img, txt, self.logit_scale, normalize=self.normalize, group=group,
                                    backend=backend)

    def extra_repr(self) -> str:
        return (f"normalize={self.normalize}, logit_scale in [{self.min_logit_scale:.4g}, "
                f"{self.max_logit_scale:.4g}]")
