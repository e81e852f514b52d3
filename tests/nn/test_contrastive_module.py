"""`dinotxt_fast.nn.ContrastiveLoss`: its learnable, clamped logit scale and its forward through
ops.contrastive_loss on the torch and Triton backends."""
import math

import pytest
import torch

from dinotxt_fast.nn import ContrastiveLoss

from ..ops.backends import needs_triton
from ..ops.oracles import features, oracle


@needs_triton
def test_contrastive_loss_module_scale_clamp_and_forward():
    module = ContrastiveLoss()
    assert module.logit_scale.shape == () and module.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    assert list(module.state_dict()) == ["logit_scale"]
    with torch.no_grad():
        module.logit_scale.fill_(9.0)
    assert module.clamp_() is module and module.logit_scale.item() == pytest.approx(math.log(100))
    with torch.no_grad():
        module.logit_scale.fill_(-3.0)
    assert module.clamp_().logit_scale.item() == 0.0
    with torch.no_grad():
        module.logit_scale.fill_(2.0)
    img, txt = features(9, 16)
    img, txt = img.float().requires_grad_(True), txt.float()
    loss = module(img, txt)
    torch.testing.assert_close(loss, oracle(img.double(), txt.double(), torch.tensor(2.0, dtype=torch.float64),
                                            True).float(), rtol=1e-5, atol=1e-6)
    loss.backward()
    assert module.logit_scale.grad is not None and img.grad is not None
    torch.testing.assert_close(module(img, txt, backend="triton"), loss, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="min_logit_scale"):
        ContrastiveLoss(min_logit_scale=1.0, max_logit_scale=0.5)
