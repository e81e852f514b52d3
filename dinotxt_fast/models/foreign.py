"""Backbone weights from where users keep them: official files, timm state dicts, Hugging Face transformers files or
model folders, converted strictly with the per-key error report of the official loader (docs/design.md, "The model").

    backbone, report = load_backbone("path/to/dinov2-base")   # a transformers folder: config.json + model.safetensors
    print(report.summary())   # "Hugging Face transformers Dinov2Model: 223 tensors loaded"
    model.load_official(backbone="path/to/dinov2-base")        # the same conversion, into a DinoTxt model

The key rules of each layout are in models/layouts.py; this module reads the files, checks what a transformers
config.json says against the model, and infers a backbone config from the weights for `load_backbone`.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional

import torch
from torch import Tensor

from . import checkpoint as ckpt
from ._state import LoadReport, StateDictError, check_state_dict
from .config import PRESETS, DinoTxtConfig, make_config
from .layouts import Layout, detect_layout, expected_keys, layout_rules, to_official

__all__ = ["BackboneSource", "read_backbone", "load_backbone", "load_backbone_state", "infer_backbone_fields",
           "matching_preset"]

# transformers model_type -> family
HF_MODEL_TYPES = {"dinov2": "dinov2", "dinov2_with_registers": "dinov2", "dinov3_vit": "dinov3"}
# Every DINOv2 / DINOv3 release uses 64-wide heads; the head count is not in the weights' shapes.
RELEASE_HEAD_DIM = 64
_FIELDS_COMPARED = ("backbone", "vision_dim", "vision_depth", "vision_heads", "vision_ffn", "vision_mlp_hidden",
                    "patch_size", "num_register_tokens")


@dataclass
class BackboneSource:
    """A backbone state dict with where it came from and, for a transformers folder or file, its config.json."""

    state_dict: dict
    origin: str
    hf_config: Optional[dict] = None
    hf_config_path: Optional[Path] = None


def read_backbone(source, name: str = "backbone") -> BackboneSource:
    """Read a backbone from a file, a model folder (config.json + model.safetensors / pytorch_model.bin, sharded ones
    too) or a state dict. A transformers config.json beside the weights is kept for load_backbone_state's checks."""
    sd = ckpt.load_state_dict(source, name=name)
    origin = ckpt.describe(source)
    if isinstance(source, Mapping):
        return BackboneSource(sd, origin)
    path = Path(source)
    config_path = (path if path.is_dir() else path.parent) / "config.json"
    layout = detect_layout(sd)
    if layout is None or layout.source != "hf" or not config_path.is_file():
        return BackboneSource(sd, origin)
    return BackboneSource(sd, origin, ckpt.read_json(config_path, "transformers config"), config_path)


def check_hf_config(hf: dict, path: Optional[Path], layout: Layout, config: DinoTxtConfig) -> list:
    """Refuse a transformers config.json that describes other arithmetic than `config` computes (one line naming the
    file and the fields); return notes on differences that only matter at other input sizes."""
    where = f"transformers config {os.fspath(path)!r}" if path is not None else "the transformers config"
    model_type = hf.get("model_type")
    if HF_MODEL_TYPES.get(model_type) != layout.family:
        raise ckpt.CheckpointError(f"{where} has model_type {model_type!r}, but the weights are a {layout.family} "
                                   f"backbone (expected one of {sorted(HF_MODEL_TYPES)})")
    problems = []
    eps = hf.get("layer_norm_eps")
    if eps is not None and not math.isclose(eps, config.backbone_eps, rel_tol=1e-9):
        problems.append(f"layer_norm_eps={eps} (a {layout.family} backbone uses {config.backbone_eps})")
    heads = hf.get("num_attention_heads")
    if heads is not None and heads != config.vision_heads:
        problems.append(f"num_attention_heads={heads} (this model has vision_heads={config.vision_heads})")
    act = hf.get("hidden_act", "gelu")
    gated = config.vision_ffn == "swiglu"
    # transformers' DINOv2 SwiGLU is always silu; its GELU MLP and DINOv3's MLPs follow hidden_act.
    wanted = "silu" if gated else "gelu"
    if act != wanted and not (layout.family == "dinov2" and gated):
        problems.append(f"hidden_act={act!r} (this {config.vision_ffn} FFN computes {wanted})")
    if layout.family == "dinov3":
        theta = hf.get("rope_theta", config.rope_base)
        if not math.isclose(theta, config.rope_base):
            problems.append(f"rope_theta={theta} (this model has rope_base={config.rope_base})")
    if problems:
        raise ckpt.CheckpointError(f"{where} describes a backbone this model does not compute: {'; '.join(problems)}")
    if model_type == "dinov2" and config.pos_embed_antialias:
        return ["transformers' Dinov2Model resizes position embeddings without antialiasing, this model with it "
                "(pos_embed_antialias=True): outputs agree at the stored grid only"]
    return []


def load_backbone_state(backbone, sd: Mapping[str, Tensor], layout: Optional[Layout] = None, *, strict: bool = True,
                        what: str = "backbone", hf_config: Optional[dict] = None,
                        hf_config_path: Optional[Path] = None) -> LoadReport:
    """Load a backbone state dict of any known layout into `backbone` (DinoV2Backbone / DinoV3Backbone).

    The file is checked in its own key names (missing, unexpected, wrong shapes: one error listing them all; with
    `strict=False` only shapes, and a file of which nothing matches), converted to the official layout, and loaded
    through the official loader (DINOv3 key-bias masks folded, RoPE periods checked). Returns the report."""
    layout = layout or detect_layout(sd)
    family = backbone.config.backbone
    if layout is None:
        raise StateDictError(f"{what} is not a DINOv2 / DINOv3 backbone in a layout dinotxt-fast knows (official, "
                             f"timm, Hugging Face transformers); its first keys: {sorted(sd)[:6]}")
    if layout.family != family:
        raise ValueError(f"{what} is a {layout.family} backbone ({layout.title}) but this backbone is {family}")
    notes = []
    if hf_config is not None and layout.source == "hf":
        notes = check_hf_config(hf_config, hf_config_path, layout, backbone.config)
    if layout.source == "official" and family == "dinov2" and backbone.num_register_tokens == 0:
        notes.append("the official hub models without registers resize position embeddings with a 0.1 offset; "
                     "this backbone resizes to the exact grid")
    rules = layout_rules(layout, backbone)
    report = check_state_dict(expected_keys(rules, backbone.official_state_dict()), sd, strict=strict,
                              what=f"{what} in the {layout.title} layout")
    converted, filled = to_official(rules, sd)
    backbone.load_official_state_dict(converted, strict=False)
    report.layout, report.filled_keys, report.notes = layout.title, filled, notes
    return report


# ------------------------------------------------------------------------------------------ config inference
def _block_prefix(layout: Layout) -> str:
    if layout.source == "hf":
        return r"encoder\.layer\." if layout.family == "dinov2" else r"(?:model\.)?layer\."
    return r"blocks\."


def _first(sd: Mapping[str, Tensor], *keys: str) -> Optional[Tensor]:
    return next((sd[k] for k in keys if k in sd), None)


def _mlp(sd: Mapping[str, Tensor], layout: Layout, block: str) -> tuple:
    """(vision_ffn, hidden width) from block 0's projections."""
    fc1, fc2 = sd.get(block + "mlp.fc1.weight"), sd.get(block + "mlp.fc2.weight")
    if layout.source == "timm" and fc1 is not None and fc2 is not None and fc1.shape[0] == 2 * fc2.shape[1]:
        return "swiglu", fc2.shape[1]  # timm packs ViT-g's two SwiGLU halves into fc1
    for name, ffn, halves in (("w12", "swiglu", 2), ("weights_in", "swiglu", 2), ("w1", "swiglu", 1),
                              ("gate_proj", "swiglu", 1), ("fc1_g", "swiglu", 1), ("fc1", "mlp", 1),
                              ("up_proj", "mlp", 1)):
        weight = sd.get(f"{block}mlp.{name}.weight")
        if weight is not None:
            return ffn, weight.shape[0] // halves
    raise StateDictError(f"no MLP projection found in {block}* ({layout.title})")


def infer_backbone_fields(sd: Mapping[str, Tensor], layout: Optional[Layout] = None,
                          hf_config: Optional[dict] = None) -> dict:
    """The DinoTxtConfig backbone fields of a backbone state dict, from its shapes (and a transformers config.json
    for the head count; otherwise 64-wide heads, as in every release, or the DINOv3 RoPE periods' length)."""
    layout = layout or detect_layout(sd)
    if layout is None:
        raise StateDictError(f"not a DINOv2 / DINOv3 backbone state dict; first keys: {sorted(sd)[:6]}")
    hf = layout.source == "hf"
    cls = _first(sd, "embeddings.cls_token", "cls_token")
    patch = _first(sd, "embeddings.patch_embeddings.projection.weight", "embeddings.patch_embeddings.weight",
                   "patch_embed.proj.weight")
    if cls is None or patch is None:
        raise StateDictError(f"{layout.title} state dict without a cls token or patch embedding")
    dim = cls.shape[-1]
    pattern = re.compile("^" + _block_prefix(layout) + r"(\d+)\.")
    depths = [int(m.group(1)) for m in map(pattern.match, sd) if m]
    if not depths:
        raise StateDictError(f"{layout.title} state dict without transformer blocks")
    first_key = next(k for k in sd if (m := pattern.match(k)) and m.group(1) == "0")
    block = first_key[: pattern.match(first_key).end()]  # "blocks.0.", "encoder.layer.0.", ...
    ffn, hidden = _mlp(sd, layout, block)
    registers = _first(sd, "embeddings.register_tokens", "register_tokens", "storage_tokens", "reg_token")
    periods = sd.get("rope_embed.periods")
    if hf and hf_config and "num_attention_heads" in hf_config:
        heads = int(hf_config["num_attention_heads"])
    elif periods is not None:
        heads = dim // (4 * periods.numel())
    else:
        heads = max(1, dim // RELEASE_HEAD_DIM)
    fields = dict(backbone=layout.family, vision_dim=dim, vision_depth=max(depths) + 1, vision_heads=heads,
                  vision_ffn=ffn, vision_mlp_hidden=int(hidden),
                  vision_mlp_ratio=round(hidden * (1.5 if ffn == "swiglu" else 1.0) / dim, 4),
                  patch_size=patch.shape[-1], num_register_tokens=0 if registers is None else registers.shape[1])
    if layout.family == "dinov2":
        pos = _first(sd, "embeddings.position_embeddings", "pos_embed")
        cells = pos.shape[1] - (0 if "registers" in layout.options else 1)
        grid = math.isqrt(cells)
        if grid * grid != cells:
            raise StateDictError(f"{layout.title}: position embedding of {pos.shape[1]} rows is no square grid")
        # transformers' Dinov2Model and the official hub models without registers resize without antialiasing.
        plain = (hf and "embeddings.register_tokens" not in sd) or (layout.source == "official" and registers is None)
        fields.update(pos_embed_grid=grid, pos_embed_antialias=not plain)
    elif hf and hf_config and "rope_theta" in hf_config:
        fields["rope_base"] = float(hf_config["rope_theta"])
    return fields


def matching_preset(fields: Mapping) -> Optional[str]:
    """The preset whose backbone has exactly these fields, or None."""
    for name in PRESETS:
        config = make_config(name)
        if all(getattr(config, k) == fields.get(k) for k in _FIELDS_COMPARED) and (
                config.backbone == "dinov3" or config.pos_embed_grid == fields.get("pos_embed_grid")):
            return name
    return None


def describe_backbone(fields: Mapping) -> str:
    """One phrase for a hint: "a dinov2 backbone with vision_dim=768, vision_depth=12, ... (preset ...)"."""
    shown = ", ".join(f"{k}={fields[k]}" for k in _FIELDS_COMPARED[1:] if k in fields)
    preset = matching_preset(fields)
    return f"a {fields['backbone']} backbone with {shown}" + (f" (preset {preset!r})" if preset else "")


def load_backbone(source, *, strict: bool = True, **fields) -> tuple:
    """Build a DINOv2 / DINOv3 backbone from a checkpoint of any known layout, its config inferred from the weights
    (and a transformers config.json), without building a random model first when `strict`. -> (backbone, report).

    `fields` override inferred DinoTxtConfig fields, for what the weights do not say: `vision_heads` of a state dict
    without a config.json whose heads are not 64 wide, `rope_base`, `pos_embed_antialias`."""
    from .vit import build_backbone

    src = read_backbone(source)
    layout = detect_layout(src.state_dict)
    inferred = infer_backbone_fields(src.state_dict, layout, src.hf_config)
    try:
        config = DinoTxtConfig(**{**inferred, "embed_dim": 2 * inferred["vision_dim"], **fields})
    except TypeError as exc:
        raise TypeError(f"load_backbone: {exc}") from None
    if strict:  # every tensor comes from the file or a fill: no random init worth computing
        with torch.device("meta"):
            backbone = build_backbone(config)
        backbone.to_empty(device="cpu")
    else:
        backbone = build_backbone(config)
    report = load_backbone_state(backbone, src.state_dict, layout, strict=strict, what=f"backbone ({src.origin})",
                                 hf_config=src.hf_config, hf_config_path=src.hf_config_path)
    return backbone.eval(), report
