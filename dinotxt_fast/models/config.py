"""Model configuration and the named presets of the official releases."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

BACKBONES = ("dinov2", "dinov3")


@dataclass
class DinoTxtConfig:
    """Every size of a DINO.txt model. Field names are part of the public API (DESIGN.md section 3)."""

    backbone: str = "dinov2"            # "dinov2" | "dinov3"
    vision_dim: int = 1024
    vision_depth: int = 24
    vision_heads: int = 16
    vision_mlp_ratio: float = 4.0
    patch_size: int = 14
    num_register_tokens: int = 4        # DINOv2 registers / DINOv3 storage tokens
    pos_embed_grid: int = 37            # v2 only: the stored position-embedding grid side
    head_blocks: int = 2
    head_mlp_hidden: Optional[int] = None  # derived: 2/3 of the backbone MLP width, rounded up to 64
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
        if self.head_mlp_hidden is None:
            self.head_mlp_hidden = derive_swiglu_hidden(int(self.vision_dim * self.vision_mlp_ratio))
        if not 0.0 <= self.head_drop_path < 1.0:
            raise ValueError(f"head_drop_path must be in [0, 1), got {self.head_drop_path}")

    @property
    def vision_head_dim(self) -> int:
        return self.vision_dim // self.vision_heads

    @property
    def text_head_dim(self) -> int:
        return self.text_dim // self.text_heads

    @property
    def vision_mlp_hidden(self) -> int:
        return int(self.vision_dim * self.vision_mlp_ratio)

    @property
    def backbone_eps(self) -> float:
        return 1e-6 if self.backbone == "dinov2" else 1e-5

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def derive_swiglu_hidden(mlp_hidden: int, multiple: int = 64) -> int:
    """2/3 of a GELU MLP width, rounded up to a multiple of 64 (4096 -> 2752), with the official rounding."""
    hidden = int(mlp_hidden * 2 / 3)
    return hidden + (-hidden % multiple)


PRESETS: dict[str, dict] = {
    "dinov2_vitl14_reg4_dinotxt": dict(backbone="dinov2", patch_size=14, num_register_tokens=4, pos_embed_grid=37),
    "dinov3_vitl16_dinotxt": dict(backbone="dinov3", patch_size=16, num_register_tokens=4),
}


def make_config(preset: str, **overrides) -> DinoTxtConfig:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; available: {sorted(PRESETS)}")
    fields = {f.name for f in dataclasses.fields(DinoTxtConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise TypeError(f"unknown DinoTxtConfig field(s) {unknown}; valid fields: {sorted(fields)}")
    kwargs = {**PRESETS[preset], **overrides}
    if "vision_dim" in overrides and "embed_dim" not in overrides:
        kwargs["embed_dim"] = 2 * kwargs["vision_dim"]
    return DinoTxtConfig(**kwargs)
