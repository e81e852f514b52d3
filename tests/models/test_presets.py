"""Backbone presets of the DINOv2 / DINOv3 families (dinotxt_fast/models/config.py).

The sizes are the published ones: facebookresearch/dinov2 hub/backbones.py + models/vision_transformer.py (vit_small
.. vit_giant2, 4 registers, ViT-g's SwiGLUFFNFused) and facebookresearch/dinov3 hub/backbones.py (embed_dim, depth,
heads, ffn_ratio, ffn_layer, 4 storage tokens); parameter counts as published (DINOv3 README; the DINOv2 checkpoints'
model cards, 22.1M / 86.6M / 304M / 1.14B, the README's rounder numbers being those of 224 px models). Full-size
models are built on the meta device, so these checks cost no memory.
"""
import pytest
import torch

from dinotxt_fast.models.config import PRESETS, derive_swiglu_hidden, make_config
from dinotxt_fast.models.dinotxt import DinoTxt, create_model
from dinotxt_fast.models.foreign import infer_backbone_fields, matching_preset
from dinotxt_fast import cli
from dinotxt_fast.models.pretrained import from_pretrained
from dinotxt_fast.train import load_config

# preset: (dim, depth, heads, ffn, backbone MLP hidden, patch, published backbone parameters in millions or None)
PUBLISHED = {
    "dinov2_vits14_reg4_dinotxt": (384, 12, 6, "mlp", 1536, 14, 22.1),
    "dinov2_vitb14_reg4_dinotxt": (768, 12, 12, "mlp", 3072, 14, 86.6),
    "dinov2_vitl14_reg4_dinotxt": (1024, 24, 16, "mlp", 4096, 14, 304),
    "dinov2_vitg14_reg4_dinotxt": (1536, 40, 24, "swiglu", 4096, 14, 1140),
    "dinov3_vits16_dinotxt": (384, 12, 6, "mlp", 1536, 16, 21),
    "dinov3_vits16plus_dinotxt": (384, 12, 6, "swiglu", 1536, 16, 29),
    "dinov3_vitb16_dinotxt": (768, 12, 12, "mlp", 3072, 16, 86),
    "dinov3_vitl16_dinotxt": (1024, 24, 16, "mlp", 4096, 16, 300),
    "dinov3_vitl16plus_dinotxt": (1024, 24, 16, "swiglu", 4096, 16, None),
    "dinov3_vith16plus_dinotxt": (1280, 32, 20, "swiglu", 5120, 16, 840),
}
TINY = dict(vision_dim=32, vision_depth=1, vision_heads=2, pos_embed_grid=4, head_blocks=1, text_dim=32,
            text_layers=1, text_heads=2, context_length=77)


def _meta_model(name: str) -> DinoTxt:
    with torch.device("meta"):
        return DinoTxt(make_config(name), preset=name)


def test_every_family_member_has_a_preset():
    assert sorted(PRESETS) == sorted(PUBLISHED)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_presets_have_the_published_backbones(name):
    dim, depth, heads, ffn, hidden, patch, millions = PUBLISHED[name]
    config = make_config(name)
    assert (config.vision_dim, config.vision_depth, config.vision_heads, config.vision_ffn,
            config.vision_mlp_hidden, config.patch_size, config.num_register_tokens) == (dim, depth, heads, ffn,
                                                                                     hidden, patch, 4)
    model = _meta_model(name)
    if millions is not None:
        count = sum(p.numel() for p in model.backbone.parameters()) / 1e6
        assert abs(count - millions) / millions < 0.05, f"{name}: {count:.1f}M parameters, published {millions}M"
    # The head follows the backbone (the official head: the backbone's width and heads, SwiGLU of 2/3 * 4 * dim
    # rounded up to 64); the embedding is [cls ; mean patch]; the text tower is the official one.
    assert config.head_mlp_hidden == derive_swiglu_hidden(4 * dim) and config.embed_dim == 2 * dim
    assert model.head.blocks[0].attn.num_heads == heads and model.head.ln_final.normalized_shape == (dim,)
    assert (config.text_dim, config.text_layers, config.text_heads) == (1280, 24, 20)
    assert model.text.head.linear_projection.out_features == 2 * dim
    # The weights' shapes describe the preset again (what load_backbone infers from a checkpoint).
    assert matching_preset(infer_backbone_fields(model.backbone.official_state_dict())) == name


@pytest.mark.parametrize("name, shapes", [
    ("dinov2_vitg14_reg4_dinotxt", {"mlp.w12.weight": (8192, 1536), "mlp.w12.bias": (8192,),
                                    "mlp.w3.weight": (1536, 4096), "mlp.w3.bias": (1536,)}),
    ("dinov3_vith16plus_dinotxt", {"mlp.w1.weight": (5120, 1280), "mlp.w2.weight": (5120, 1280),
                                   "mlp.w3.weight": (1280, 5120), "mlp.w3.bias": (1280,)}),
    ("dinov3_vits16plus_dinotxt", {"mlp.w1.weight": (1536, 384), "mlp.w2.bias": (1536,),
                                   "mlp.w3.weight": (384, 1536)}),
])
def test_swiglu_backbones_have_the_official_key_layout(name, shapes):
    """dinov2 SwiGLUFFNFused (w12 = both halves, w3) and dinov3 SwiGLUFFN (w1, w2, w3, align_to=8)."""
    sd = _meta_model(name).backbone.official_state_dict()
    mlp = {k[len("blocks.0."):]: tuple(v.shape) for k, v in sd.items() if k.startswith("blocks.0.mlp.")}
    assert {k: mlp[k] for k in shapes} == shapes
    assert not any(".fc1." in k for k in mlp)


def test_overrides_keep_the_derived_sizes_consistent():
    config = make_config("dinov3_vith16plus_dinotxt", vision_dim=64, vision_heads=4)
    assert config.vision_mlp_hidden == derive_swiglu_hidden(6 * 64, multiple=8) == 256
    assert config.embed_dim == 128 and config.head_mlp_hidden == 192
    assert make_config("dinov2_vitg14_reg4_dinotxt", vision_mlp_hidden=40).vision_mlp_hidden == 40
    with pytest.raises(ValueError, match="vision_ffn must be one of"):
        make_config("dinov2_vitl14_reg4_dinotxt", vision_ffn="geglu")


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_every_preset_runs_tiny(name):
    model = create_model(name, **TINY).eval()
    assert model.preset == name
    p = model.config.patch_size
    ids = torch.zeros(2, 77, dtype=torch.long)
    ids[:, 0], ids[0, 1], ids[1, 5] = 49406, 49407, 49407
    with torch.no_grad():
        image, text = model.encode_image(torch.randn(2, 3, 3 * p, 4 * p)), model.encode_text(ids)
    assert image.shape == text.shape == (2, 64) and image.isfinite().all() and text.isfinite().all()


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_the_trainer_takes_the_presets(name, tmp_path):
    """`dinotxt-fast train --preset NAME` with the tiny config's overrides (patch 8 on 32 px images), through the
    command line; the model folder it writes is of that preset."""
    out = tmp_path / "run"
    code = cli.main(["train", "--preset", name, "--out", str(out), "--no-progress", "batch_size=4", "steps=1",
                     "model.vision_dim=32", "model.text_dim=32", "image_size=32", "data=synthetic:8",
                     "eval_data=null", "log_every=1", "device=cpu", "num_workers=0", "backbone_weights=null"])
    assert code == 0  # 0: the run completed
    cfg = load_config(str(out / "config.yaml"))
    assert cfg.preset == name and cfg.model_config().vision_ffn == PUBLISHED[name][3]
    folder = from_pretrained(out / "model")
    assert folder.preset == name and folder.config == cfg.model_config()
