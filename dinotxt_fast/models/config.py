"""Model configuration and the named presets: the two official DINO.txt releases and the DINOv2 / DINOv3 backbone
families to train new text alignments on (docs/design.md, "The model")."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

BACKBONES = ("dinov2", "dinov3")
BACKBONE_FFNS = ("mlp", "swiglu")
# The official head's blocks use the block default ffn_ratio 4 whatever the backbone's FFN (dinov3/eval/text/
# vision_tower.py: SelfAttentionBlock(..., ffn_layer=SwiGLUFFN(align_to=64))).
HEAD_MLP_RATIO = 4


@dataclass
class DinoTxtConfig:
    """Every size of a DINO.txt model. Field names are part of the public API (docs/design.md, "Public API")."""

    backbone: str = "dinov2"            # "dinov2" | "dinov3"
    vision_dim: int = 1024
    vision_depth: int = 24
    vision_heads: int = 16
    vision_mlp_ratio: float = 4.0
    vision_ffn: str = "mlp"             # "mlp" (GELU) | "swiglu" (ViT-g/14, the DINOv3 "plus" models)
    vision_mlp_hidden: Optional[int] = None  # derived from vision_mlp_ratio (and vision_ffn) when None
    patch_size: int = 14
    num_register_tokens: int = 4        # DINOv2 registers / DINOv3 storage tokens
    pos_embed_grid: int = 37            # v2 only: the stored position-embedding grid side
    pos_embed_antialias: bool = True    # v2 only: antialiased bicubic resize (hub *_reg models); False: plain
    head_blocks: int = 2
    head_mlp_hidden: Optional[int] = None  # derived: 2/3 of 4 * vision_dim, rounded up to 64 (2752 for ViT-L)
    text_dim: int = 1280
    text_layers: int = 24
    text_heads: int = 20
    context_length: int = 77
    vocab_size: int = 49408
    embed_dim: int = 2048
    # Training-time and backbone details that the releases fix; overridable for experiments.
    head_drop_path: float = 0.3
    head_layerscale_init: float = 1e-5
    rope_base: float = 100.0            # v3 only

    def __post_init__(self) -> None:
        if self.backbone not in BACKBONES:
            raise ValueError(f"DinoTxtConfig.backbone must be one of {BACKBONES}, got {self.backbone!r}")
        for name in ("vision_dim", "vision_depth", "vision_heads", "patch_size", "head_blocks",
                     "text_dim", "text_layers", "text_heads", "context_length", "vocab_size", "embed_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"DinoTxtConfig.{name} must be a positive int, got {value!r}")
        if self.num_register_tokens < 0:
            raise ValueError(f"DinoTxtConfig.num_register_tokens must be >= 0, got {self.num_register_tokens}")
        if self.vision_dim % self.vision_heads:
            raise ValueError(f"vision_dim {self.vision_dim} is not divisible by vision_heads {self.vision_heads}")
        if self.text_dim % self.text_heads:
            raise ValueError(f"text_dim {self.text_dim} is not divisible by text_heads {self.text_heads}")
        if self.embed_dim != 2 * self.vision_dim:
            raise ValueError(f"embed_dim must be 2 * vision_dim (cls ; mean patch), got embed_dim={self.embed_dim}, "
                             f"vision_dim={self.vision_dim}")
        if self.vision_ffn not in BACKBONE_FFNS:
            raise ValueError(f"DinoTxtConfig.vision_ffn must be one of {BACKBONE_FFNS}, got {self.vision_ffn!r}")
        if not isinstance(self.pos_embed_antialias, bool):
            raise ValueError(f"DinoTxtConfig.pos_embed_antialias must be true or false, "
                             f"got {self.pos_embed_antialias!r}")
        if self.vision_mlp_hidden is None:
            gelu_width = int(self.vision_dim * self.vision_mlp_ratio)
            # SwiGLU keeps 2/3 of the width, rounded up to 8 (dinov2 SwiGLUFFNFused, dinov3 SwiGLUFFN align_to=8).
            self.vision_mlp_hidden = (gelu_width if self.vision_ffn == "mlp"
                                      else derive_swiglu_hidden(gelu_width, multiple=8))
        if self.head_mlp_hidden is None:
            self.head_mlp_hidden = derive_swiglu_hidden(HEAD_MLP_RATIO * self.vision_dim)
        for name in ("vision_mlp_hidden", "head_mlp_hidden"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"DinoTxtConfig.{name} must be a positive int, got {value!r}")
        if not 0.0 <= self.head_drop_path < 1.0:
            raise ValueError(f"head_drop_path must be in [0, 1), got {self.head_drop_path}")

    @property
    def vision_head_dim(self) -> int:
        return self.vision_dim // self.vision_heads

    @property
    def text_head_dim(self) -> int:
        return self.text_dim // self.text_heads

    @property
    def backbone_eps(self) -> float:
        return 1e-6 if self.backbone == "dinov2" else 1e-5

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def derive_swiglu_hidden(mlp_hidden: int, multiple: int = 64) -> int:
    """2/3 of a GELU MLP width, rounded up to a multiple (64: the head's 4096 -> 2752), with the official rounding."""
    hidden = int(mlp_hidden * 2 / 3)
    return hidden + (-hidden % multiple)


def _v2(dim: int, depth: int, heads: int, ffn: str = "mlp") -> dict:
    # facebookresearch/dinov2 hub *_reg models: patch 14, 518 px (37 x 37 position grid), 4 registers, mlp_ratio 4.
    return dict(backbone="dinov2", vision_dim=dim, vision_depth=depth, vision_heads=heads, vision_mlp_ratio=4.0,
                vision_ffn=ffn, patch_size=14, num_register_tokens=4, pos_embed_grid=37)


def _v3(dim: int, depth: int, heads: int, ratio: float = 4.0, ffn: str = "mlp") -> dict:
    # facebookresearch/dinov3 hub/backbones.py: patch 16, 4 storage tokens, RoPE base 100, qkv bias (key masked).
    return dict(backbone="dinov3", vision_dim=dim, vision_depth=depth, vision_heads=heads, vision_mlp_ratio=ratio,
                vision_ffn=ffn, patch_size=16, num_register_tokens=4, rope_base=100.0)


# The backbone sizes the official hubs publish; head width and embed_dim (2 * vision_dim) follow the backbone, the
# text tower is the official one (text_* fields override it).
PRESETS: dict[str, dict] = {
    "dinov2_vits14_reg4_dinotxt": _v2(384, 12, 6),
    "dinov2_vitb14_reg4_dinotxt": _v2(768, 12, 12),
    "dinov2_vitl14_reg4_dinotxt": _v2(1024, 24, 16),   # the official DINOv2 DINO.txt release
    "dinov2_vitg14_reg4_dinotxt": _v2(1536, 40, 24, ffn="swiglu"),
    "dinov3_vits16_dinotxt": _v3(384, 12, 6),
    "dinov3_vits16plus_dinotxt": _v3(384, 12, 6, ratio=6.0, ffn="swiglu"),
    "dinov3_vitb16_dinotxt": _v3(768, 12, 12),
    "dinov3_vitl16_dinotxt": _v3(1024, 24, 16),         # the official DINOv3 DINO.txt release
    "dinov3_vitl16plus_dinotxt": _v3(1024, 24, 16, ratio=6.0, ffn="swiglu"),
    "dinov3_vith16plus_dinotxt": _v3(1280, 32, 20, ratio=6.0, ffn="swiglu"),
}


def make_config(preset: str, **overrides) -> DinoTxtConfig:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; available: {sorted(PRESETS)}")
    fields = {f.name for f in dataclasses.fields(DinoTxtConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise TypeError(f"unknown DinoTxtConfig field(s) {unknown}; valid fields: {sorted(fields)}")
    kwargs = {**PRESETS[preset], **overrides}
    if "embed_dim" not in overrides:
        kwargs["embed_dim"] = 2 * kwargs["vision_dim"]
    return DinoTxtConfig(**kwargs)
