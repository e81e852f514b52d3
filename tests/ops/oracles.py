"""Plain-autograd oracles and inputs shared by the contrastive tests (tests/ops, tests/nn)."""
import torch
import torch.nn.functional as F


def oracle(img, txt, logit_scale, normalize):
    """Plain-autograd symmetric InfoNCE (in the inputs' dtype)."""
    if normalize:
        img, txt = F.normalize(img, dim=-1), F.normalize(txt, dim=-1)
    s = logit_scale.exp() * img @ txt.T
    target = torch.arange(img.shape[0], device=img.device)
    return 0.5 * (F.cross_entropy(s, target) + F.cross_entropy(s.T, target))


def features(b, e, *, device="cpu", scale=1.0):
    g = torch.Generator(device=device).manual_seed(1000 * b + e)
    img = torch.randn(b, e, dtype=torch.float64, generator=g, device=device) * scale
    # Correlated pairs, as after some training: the positives stand out, the softmax is not uniform.
    txt = 0.6 * img + torch.randn(b, e, dtype=torch.float64, generator=g, device=device) * scale
    return img, txt
