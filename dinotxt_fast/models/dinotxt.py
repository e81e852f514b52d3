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
from ._state import StateDictError, check_state_dict
from .config import DinoTxtConfig, make_config
from .head import VisionHead
from .text import TextTower
from .vit import build_backbone

INIT_LOGIT_SCALE = math.log(1 / 0.07)
MAX_LOGIT_SCALE = math.log(100.0)

_RELEASE_FILES = {"dinov2": ("backbone", "vision_head", "text_encoder"), "dinov3": ("backbone", "weights")}


class DinoTxt(nn.Module):
    """DINO.txt (arXiv 2412.16334). Attributes: `backbone` (frozen ViT), `head` (VisionHead), `text`
    (TextTower), `logit_scale` (0-d parameter, the log of the contrastive temperature's inverse)."""

    def __init__(self, config: DinoTxtConfig):
        super().__init__()
        self.config = config
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
        the model unchanged. `strict=False` tolerates missing and unexpected keys, never shape mismatches.
        A vision head saved with `blocks.*` keys (our / the v3 naming) is accepted for `block_list.*`.
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

        states = {name: ckpt.load_state_dict(src, name=name) for name, src in given.items()}
        origins = {name: ckpt.describe(src) for name, src in given.items()}
        staged = []  # (module, state dict in its layout): all checked before anything is loaded
        new_logit_scale = None
        backbone_sd, backbone_origin = states.get("backbone"), origins.get("backbone")
        # Files are checked in their own key layout, so errors name the keys as they are in the file.
        if "vision_head" in states:
            head_sd = states["vision_head"]
            if not any(k.startswith(ckpt.V2_HEAD_LIST) for k in head_sd):
                head_sd = ckpt.head_to_v2(head_sd)
            _check_dict(ckpt.head_to_v2(self.head.state_dict()), head_sd, "vision_head", origins["vision_head"],
                        strict)
            staged.append((self.head, ckpt.head_from_v2(head_sd)))
        if "text_encoder" in states:
            _check_dict(self.text.state_dict(), states["text_encoder"], "text_encoder", origins["text_encoder"],
                        strict)
            staged.append((self.text, states["text_encoder"]))
        if "weights" in states:
            parts = ckpt.split_v3_weights(states["weights"])
            if parts["backbone"]:
                if backbone_sd is not None:
                    raise ValueError(f"weights ({origins['weights']}) holds backbone entries "
                                     f"(visual_model.backbone.*) and backbone= was given too: pass one of them")
                backbone_sd = parts["backbone"]
                backbone_origin = f"{origins['weights']}, visual_model.backbone.*"
            self._check_v3_weights(states["weights"], parts, origins["weights"], strict)
            staged += [(self.head, parts["head"]), (self.text, parts["text"])]
            new_logit_scale = parts["logit_scale"]

        if backbone_sd is not None:
            self._load_backbone(backbone_sd, backbone_origin, strict)
        for module, sd in staged:
            module.load_state_dict(sd, strict=False)  # already checked, with the caller's strictness
        if new_logit_scale is not None:
            with torch.no_grad():
                self.logit_scale.copy_(new_logit_scale)
        return self

    def _check_v3_weights(self, full: dict, parts: dict, origin: str, strict: bool) -> None:
        # Check the file against the full expected v3 layout so errors name the keys as they are in the file.
        expected = ckpt.join_v3_weights(self.head.state_dict(), self.text.state_dict(), self.logit_scale)
        given = {k: v for k, v in full.items() if not k.startswith(ckpt.V3_BACKBONE_PREFIX)}
        if ckpt.LOGIT_SCALE in given:
            given[ckpt.LOGIT_SCALE] = parts["logit_scale"].reshape(1)  # accept 0-d as well as [1]
        _check_dict(expected, given, "weights", origin, strict)

    def _load_backbone(self, sd: dict, origin: str, strict: bool) -> None:
        kind = self.config.backbone
        found = ckpt.backbone_kind(sd)
        if found is not None and found != kind:
            preset = "dinov3_vitl16_dinotxt" if found == "dinov3" else "dinov2_vitl14_reg4_dinotxt"
            raise ValueError(f"backbone ({origin}) is a {found} backbone but this model's backbone is {kind}; "
                             f"create a matching model, e.g. create_model({preset!r})")
        if found is None:
            guess = ckpt.guess_part(sd)
            if guess is not None:
                raise ValueError(f"backbone ({origin}) does not look like a {kind} backbone: it looks like {guess[1]}")
        try:
            self.backbone.load_official_state_dict(sd, strict=strict)
        except StateDictError as exc:
            raise StateDictError(f"backbone ({origin}): {exc}") from None

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


def _check_dict(expected: dict, sd: dict, name: str, origin: str, strict: bool) -> None:
    try:
        check_state_dict({k: v.shape for k, v in expected.items()}, sd, strict=strict, what=f"{name} ({origin})")
    except StateDictError as exc:
        guess = ckpt.guess_part(sd)
        if guess is None or guess[0] == name:
            raise
        raise StateDictError(f"{exc}\n  this looks like {guess[1]}, not the {name} file") from None


def create_model(preset: str = "dinov2_vitl14_reg4_dinotxt", **overrides) -> DinoTxt:
    """A randomly initialised DinoTxt for a preset, with DinoTxtConfig field overrides (tiny models for tests)."""
    return DinoTxt(make_config(preset, **overrides))
