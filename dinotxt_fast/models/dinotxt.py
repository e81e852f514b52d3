"""The DINO.txt model: frozen ViT backbone + trainable vision head + text tower, and official checkpoint I/O."""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from . import checkpoint as ckpt
from ._state import LoadReport, StateDictError, check_state_dict
from .config import DinoTxtConfig, make_config
from .foreign import (BackboneSource, describe_backbone, infer_backbone_fields, load_backbone_state, matching_preset,
                      read_backbone)
from .head import VisionHead
from .layouts import detect_layout, official_layout
from .text import TextTower
from .vit import build_backbone

INIT_LOGIT_SCALE = math.log(1 / 0.07)
MAX_LOGIT_SCALE = math.log(100.0)

_RELEASE_FILES = {"dinov2": ("backbone", "vision_head", "text_encoder"), "dinov3": ("backbone", "weights")}


class DinoTxt(nn.Module):
    """DINO.txt (arXiv 2412.16334). Attributes: `backbone` (frozen ViT), `head` (VisionHead), `text`
    (TextTower), `logit_scale` (0-d parameter, the log of the contrastive temperature's inverse)."""

    def __init__(self, config: DinoTxtConfig, preset: Optional[str] = None):
        super().__init__()
        self.config = config
        self.preset = preset  # the preset it was made from (create_model), kept by save_pretrained
        self.load_report: dict[str, LoadReport] = {}  # what the last load_official call loaded, per file
        self.backbone = build_backbone(config)
        self.head = VisionHead(config)
        self.text = TextTower(config)
        self.logit_scale = nn.Parameter(torch.tensor(INIT_LOGIT_SCALE))
        self.backbone.requires_grad_(False)
        self.backbone.eval()

    # -- state ---------------------------------------------------------------------------------------------

    @property
    def backbone_frozen(self) -> bool:
        """True when no backbone parameter requires grad: the backbone then runs under torch.no_grad."""
        return not any(p.requires_grad for p in self.backbone.parameters())

    def train(self, mode: bool = True) -> "DinoTxt":
        super().train(mode)
        if self.backbone_frozen:
            self.backbone.eval()  # a frozen backbone is a fixed feature extractor, in training too
        return self

    def clamp_logit_scale(self) -> None:
        """Clamp the logit scale to [0, ln 100], as the official recipe does after every optimizer step."""
        with torch.no_grad():
            self.logit_scale.clamp_(0.0, MAX_LOGIT_SCALE)

    def num_params(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    # -- forward paths -------------------------------------------------------------------------------------

    def backbone_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Backbone tokens after its final norm, [B, 1 + R + P, D]; no autograd graph when frozen.
        The backbone checks the images (shape, floating dtype, device, size a multiple of the patch)."""
        if self.backbone_frozen:
            # no_grad rather than inference_mode: the head saves these tokens for its own backward.
            with torch.no_grad():
                return self.backbone(images)
        return self.backbone(images)

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """images [B, 3, H, W] -> [B, 2 * vision_dim]: cat(head cls, mean of head patches), normalised as one
        vector when asked. The head's ln_final is fused into the pooling (the normalised tokens of every
        patch are never materialised)."""
        head_tokens = self.head(self.backbone_tokens(images), final_norm=False)
        ln = self.head.ln_final
        return ops.patch_pool(head_tokens, num_registers=self.config.num_register_tokens, ln_weight=ln.weight,
                              ln_bias=ln.bias, eps=ln.eps, normalize=normalize)

    def encode_text(self, ids: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Token ids [B, L] (int64, L <= context_length) -> [B, embed_dim]."""
        out = self.text(ids)
        return F.normalize(out, dim=-1) if normalize else out

    def image_tokens(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (cls [B, D], head_patches [B, P, D], backbone_patches [B, P, D]); head values after ln_final,
        backbone values after its final norm, registers excluded, patches in row-major grid order."""
        tokens = self.backbone_tokens(images)
        head_tokens = self.head(tokens)
        first_patch = 1 + self.config.num_register_tokens
        return head_tokens[:, 0], head_tokens[:, first_patch:], tokens[:, first_patch:]

    def forward(self, images: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (image embeddings, text embeddings, logit_scale), unnormalised: what
        ops.contrastive_loss(img, txt, logit_scale) takes."""
        return self.encode_image(images), self.encode_text(ids), self.logit_scale

    # -- official checkpoints ------------------------------------------------------------------------------

    def load_official(self, backbone=None, vision_head=None, text_encoder=None, weights=None,
                      strict: bool = True) -> "DinoTxt":
        """Load official release files (paths: .pth/.pt via torch.load, .safetensors; or state dicts).

        DINOv2 release: `backbone`, `vision_head`, `text_encoder`. DINOv3 release: `backbone` and `weights`
        (the single file with visual_model.head.*, text_model.*, logit_scale). Parts left out keep their
        current values. Every file is read and checked before anything is loaded, so a failed call leaves
        the model unchanged. `strict=False` tolerates missing and unexpected keys, never shape mismatches, and
        refuses a file of which no key matches. A vision head saved with `blocks.*` keys (our / the v3 naming) is
        accepted for `block_list.*`. `backbone` may also be in the timm or Hugging Face transformers layout (a
        file, a transformers model folder, or a state dict; models/foreign.py), detected and converted.
        `self.load_report` then maps each given name to its LoadReport (detected layout, loaded / missing /
        unexpected / filled keys in the file's names).
        """
        kind = self.config.backbone
        given = {"backbone": backbone, "vision_head": vision_head, "text_encoder": text_encoder,
                 "weights": weights}
        given = {name: src for name, src in given.items() if src is not None}
        if not given:
            raise ValueError(f"load_official needs at least one file; the {kind} release has "
                             f"{', '.join(_RELEASE_FILES[kind])}")
        wrong = [name for name in given if name not in _RELEASE_FILES[kind]]
        if wrong:
            other = "dinov3" if kind == "dinov2" else "dinov2"
            raise ValueError(f"{', '.join(w + '=' for w in wrong)} belong to the {other} release, but this is a "
                             f"{kind} model, whose release files are {', '.join(_RELEASE_FILES[kind])}")

        sources = {name: (read_backbone(src) if name == "backbone" else
                          BackboneSource(ckpt.load_state_dict(src, name=name), ckpt.describe(src)))
                   for name, src in given.items()}
        reports: dict[str, LoadReport] = {}
        staged = []  # (module, state dict in its layout): all checked before anything is loaded
        new_logit_scale = None
        backbone_src = sources.get("backbone")
        # Files are checked in their own key layout, so errors name the keys as they are in the file.
        if "vision_head" in sources:
            head_sd, origin = sources["vision_head"].state_dict, sources["vision_head"].origin
            if not any(k.startswith(ckpt.V2_HEAD_LIST) for k in head_sd):
                head_sd = ckpt.head_to_v2(head_sd)
            reports["vision_head"] = _check_dict(ckpt.head_to_v2(self.head.state_dict()), head_sd, "vision_head",
                                                 origin, strict, "official DINOv2 DINO.txt vision head")
            staged.append((self.head, ckpt.head_from_v2(head_sd)))
        if "text_encoder" in sources:
            text_sd, origin = sources["text_encoder"].state_dict, sources["text_encoder"].origin
            reports["text_encoder"] = _check_dict(self.text.state_dict(), text_sd, "text_encoder", origin, strict,
                                                  "official DINO.txt text encoder")
            staged.append((self.text, text_sd))
        if "weights" in sources:
            full, origin = sources["weights"].state_dict, sources["weights"].origin
            parts = ckpt.split_v3_weights(full)
            if parts["backbone"]:
                if backbone_src is not None:
                    raise ValueError(f"weights ({origin}) holds backbone entries "
                                     f"(visual_model.backbone.*) and backbone= was given too: pass one of them")
                backbone_src = BackboneSource(parts["backbone"], f"{origin}, visual_model.backbone.*")
            reports["weights"] = self._check_v3_weights(full, parts, origin, strict)
            staged += [(self.head, parts["head"]), (self.text, parts["text"])]
            new_logit_scale = parts["logit_scale"]

        if backbone_src is not None:
            reports["backbone"] = self._load_backbone(backbone_src, strict)
        for module, sd in staged:
            module.load_state_dict(sd, strict=False)  # already checked, with the caller's strictness
        if new_logit_scale is not None:
            with torch.no_grad():
                self.logit_scale.copy_(new_logit_scale)
        self.load_report = reports
        return self

    def _check_v3_weights(self, full: dict, parts: dict, origin: str, strict: bool) -> LoadReport:
        # Check the file against the full expected v3 layout so errors name the keys as they are in the file.
        expected = ckpt.join_v3_weights(self.head.state_dict(), self.text.state_dict(), self.logit_scale)
        given = {k: v for k, v in full.items() if not k.startswith(ckpt.V3_BACKBONE_PREFIX)}
        if ckpt.LOGIT_SCALE in given:
            given[ckpt.LOGIT_SCALE] = parts["logit_scale"].reshape(1)  # accept 0-d as well as [1]
        return _check_dict(expected, given, "weights", origin, strict, "official DINOv3 DINO.txt weights")

    def _load_backbone(self, src: BackboneSource, strict: bool) -> LoadReport:
        kind, sd, origin = self.config.backbone, src.state_dict, src.origin
        layout = detect_layout(sd)
        if layout is not None and layout.family != kind:
            preset = _preset_for(sd, layout) or ("dinov3_vitl16_dinotxt" if layout.family == "dinov3"
                                                 else "dinov2_vitl14_reg4_dinotxt")
            raise ValueError(f"backbone ({origin}) is a {layout.family} backbone but this model's backbone is {kind} "
                             f"(layout: {layout.title}); create a matching model, e.g. create_model({preset!r})")
        if layout is None:
            guess = ckpt.guess_part(sd)
            if guess is not None:
                raise ValueError(f"backbone ({origin}) does not look like a {kind} backbone: it looks like {guess[1]}")
            layout = official_layout(kind)  # checked as the official layout: the error lists every key
        try:
            return load_backbone_state(self.backbone, sd, layout, strict=strict, what=f"backbone ({origin})",
                                       hf_config=src.hf_config, hf_config_path=src.hf_config_path)
        except StateDictError as exc:
            fields = _fields_or_none(sd, layout, src.hf_config)
            hint = f"\n  the file holds {describe_backbone(fields)}" if fields else ""
            raise StateDictError(f"{exc}{hint}") from None

    def save_pretrained(self, directory: Union[str, os.PathLike]) -> Path:
        """Write the model folder: config.json (preset, every DinoTxtConfig field, logit scale) and model.safetensors
        (every tensor, in its dtype); `dinotxt_fast.from_pretrained(directory)` rebuilds the model exactly."""
        from .pretrained import save_pretrained  # pretrained.py builds DinoTxt models: imported here, not at the top

        return save_pretrained(self, directory)

    def export_official(self, out_dir: Optional[Union[str, os.PathLike]] = None) -> dict[str, dict]:
        """The official release layout: dinov2 {"backbone", "vision_head", "text_encoder"}, dinov3
        {"backbone", "weights"}; CPU copies. With `out_dir`, also writes `<name>.pth` files there atomically."""
        head = _cpu_copy(self.head.state_dict())
        text = _cpu_copy(self.text.state_dict())
        parts = {"backbone": _cpu_copy(self.backbone.official_state_dict())}
        if self.config.backbone == "dinov2":
            parts["vision_head"] = ckpt.head_to_v2(head)
            parts["text_encoder"] = text
        else:
            parts["weights"] = ckpt.join_v3_weights(head, text, self.logit_scale.detach().to("cpu", copy=True))
        if out_dir is not None:
            for name, sd in parts.items():
                ckpt.save_state_dict(sd, Path(out_dir) / f"{name}.pth")
        return parts


def _cpu_copy(sd: dict) -> dict:
    return {k: v.detach().to("cpu", copy=True) for k, v in sd.items()}


def _check_dict(expected: dict, sd: dict, name: str, origin: str, strict: bool, layout: str) -> LoadReport:
    try:
        report = check_state_dict({k: v.shape for k, v in expected.items()}, sd, strict=strict,
                                  what=f"{name} ({origin})")
    except StateDictError as exc:
        guess = ckpt.guess_part(sd)
        if guess is None or guess[0] == name:
            raise
        raise StateDictError(f"{exc}\n  this looks like {guess[1]}, not the {name} file") from None
    report.layout = layout
    return report


def _fields_or_none(sd: dict, layout, hf_config) -> Optional[dict]:
    try:
        return infer_backbone_fields(sd, layout, hf_config)
    except (StateDictError, KeyError, AttributeError, IndexError):
        return None  # too broken to describe; the error itself lists the keys


def _preset_for(sd: dict, layout) -> Optional[str]:
    fields = _fields_or_none(sd, layout, None)
    return matching_preset(fields) if fields else None


def create_model(preset: str = "dinov2_vitl14_reg4_dinotxt", **overrides) -> DinoTxt:
    """A randomly initialised DinoTxt for a preset, with DinoTxtConfig field overrides (tiny models for tests)."""
    return DinoTxt(make_config(preset, **overrides), preset=preset)
