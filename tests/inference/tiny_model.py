"""The tiny DINO.txt model of the inference and CLI tests (random weights, a 64-wide head that matters)."""
import torch

from dinotxt_fast.models.dinotxt import create_model

TINY = dict(vision_dim=64, vision_depth=2, vision_heads=4, pos_embed_grid=4, text_dim=64, text_layers=2,
            text_heads=4)


def make_tiny(dtype=torch.float32):
    torch.manual_seed(0)
    model = create_model("dinov2_vitl14_reg4_dinotxt", **TINY)
    # LayerScale starts at 1e-5, which makes head tokens ~= backbone tokens; make the head matter.
    with torch.no_grad():
        for name, p in model.head.named_parameters():
            if name.endswith("gamma"):
                p.fill_(0.5)
    return model.to(dtype).eval()
