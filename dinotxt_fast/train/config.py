"""Training configuration: YAML files plus `key=value` command-line overrides, validated and saved with every run."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Optional

import torch
import yaml

from ..models.config import PRESETS, DinoTxtConfig

# Backbones shipped in the package (dinotxt_fast/train/weights/), named in a config as `embedded:<name>`.
# "tiny": the tiny config's backbone, self-supervised on the embedded images by tools/pretrain_tiny_backbone.py.
EMBEDDED_PREFIX = "embedded:"
EMBEDDED_BACKBONES = {"tiny": "tiny_backbone.safetensors"}

# The autocast dtype of each resolved `precision` ("auto" resolves to one of these; None: no autocast).
PRECISION_DTYPES = {"bf16": torch.bfloat16, "fp32": None}


class ConfigError(ValueError):
    """A configuration file or override that can't be used; the message names the key and the problem."""


@dataclass
class TrainConfig:
    # model
    preset: str = "dinov2_vitl14_reg4_dinotxt"
    model: dict = field(default_factory=dict)          # DinoTxtConfig overrides, e.g. {vision_dim: 64}
    backbone_weights: Optional[str] = None             # backbone file (official/timm/transformers), HF folder or
                                                       # embedded:<name> (EMBEDDED_BACKBONES); None: random
    # false: the head's blocks keep their attention (and its LayerScale) at init and train their MLPs only. With a
    # trainable attention the image-level loss makes the head broadcast the caption into every patch: background
    # patches predicted the image's main colour 0.927 of the time (chance 0.125), 0.123 with it frozen (issue #13).
    head_attention: bool = True
    # data
    data: str = "synthetic"                            # "synthetic[:N]", shard pattern "a-{000..099}.tar", .csv/.tsv
    image_size: int = 224
    crop_scale: tuple = (0.08, 1.0)                    # RandomResizedCrop area range (the official recipe's)
    num_workers: int = 8
    # optimisation (the official DINO.txt recipe)
    batch_size: int = 256                              # per process
    steps: int = 50_000
    warmup_steps: int = 2_000
    lr: float = 7e-4
    betas: tuple = (0.9, 0.99)
    eps: float = 1e-8
    weight_decay: float = 1e-4
    drop_path: float = 0.3                             # batch-subset drop-path in the vision head
    max_logit_scale: float = math.log(100.0)           # the log-scale is clamped to [0, this] after every step
    precision: str = "auto"                            # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32
    # speed
    compile: bool = False                              # torch.compile each trainable block
    activation_checkpointing: bool = False
    feature_cache: Optional[str] = None                # directory: precompute frozen backbone tokens once
    fsdp_text: bool = False                            # shard the text tower with FSDP2 (multi-GPU)
    backend: Optional[str] = None                      # ops backend for the run (torch|triton|cuda); None: auto
    # observability and checkpoints
    log_every: int = 10
    eval_every: int = 1000
    eval_data: Optional[str] = "synthetic"             # "synthetic" or "imagefolder:/path"; None disables
    eval_samples: int = 512
    seg_eval_images: int = 64                          # val-split images (fixed by `seed`) of the mIoU evaluation
    seg_short_side: Optional[int] = None               # their short side for segmentation; None: 2 x image_size
    save_every: int = 1000
    keep_checkpoints: int = 2
    seed: int = 0
    device: str = "auto"                               # auto | cpu | cuda

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        self.crop_scale = tuple(self.crop_scale)
        if len(self.crop_scale) != 2 or not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise ConfigError(f"crop_scale: need [low, high] with 0 < low <= high <= 1, got {list(self.crop_scale)}")
        if self.preset not in PRESETS:
            raise ConfigError(f"preset: unknown {self.preset!r}; available: {sorted(PRESETS)}")
        model_fields = {f.name for f in dataclasses.fields(DinoTxtConfig)}
        unknown = sorted(set(self.model) - model_fields)
        if unknown:
            raise ConfigError(f"model: unknown DinoTxtConfig field(s) {unknown}; valid: {sorted(model_fields)}")
        positive = ("image_size", "batch_size", "steps", "log_every", "eval_every", "save_every", "keep_checkpoints")
        for name in positive:
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be a positive integer, got {getattr(self, name)!r}")
        if self.warmup_steps < 0 or self.num_workers < 0:
            raise ConfigError("warmup_steps and num_workers must be >= 0")
        if not (self.lr > 0 and self.eps > 0 and self.weight_decay >= 0):
            raise ConfigError(f"lr, eps must be > 0 and weight_decay >= 0 (got {self.lr}, {self.eps}, "
                              f"{self.weight_decay})")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"betas: need two values in [0, 1), got {self.betas}")
        if not self.max_logit_scale >= 0:
            raise ConfigError(f"max_logit_scale: must be >= 0 (the log of the largest scale), "
                              f"got {self.max_logit_scale}")
        if not 0 <= self.drop_path < 1:
            raise ConfigError(f"drop_path: must be in [0, 1), got {self.drop_path}")
        if self.backbone_weights is not None and self.backbone_weights.startswith(EMBEDDED_PREFIX):
            name = self.backbone_weights[len(EMBEDDED_PREFIX):]
            if name not in EMBEDDED_BACKBONES:
                raise ConfigError(f"backbone_weights: no embedded backbone {name!r}; embedded ones: "
                                  f"{', '.join(EMBEDDED_PREFIX + n for n in sorted(EMBEDDED_BACKBONES))}")
        if isinstance(self.seg_eval_images, bool) or not isinstance(self.seg_eval_images, int) \
                or self.seg_eval_images < 0:
            raise ConfigError(f"seg_eval_images: must be an integer >= 0 (0: no segmentation evaluation), "
                              f"got {self.seg_eval_images!r}")
        if self.seg_short_side is not None and (isinstance(self.seg_short_side, bool)
                                                or not isinstance(self.seg_short_side, int) or self.seg_short_side < 1):
            raise ConfigError(f"seg_short_side: must be a positive integer or null (2 x image_size), "
                              f"got {self.seg_short_side!r}")
        if self.backend not in (None, "auto", "torch", "triton", "cuda"):
            raise ConfigError(f"backend: must be one of torch, triton, cuda or null (auto), got {self.backend!r}")
        for name, choices in (("precision", ("auto", *PRECISION_DTYPES)), ("device", ("auto", "cpu", "cuda"))):
            if getattr(self, name) not in choices:
                raise ConfigError(f"{name}: must be one of {choices}, got {getattr(self, name)!r}")

    def backbone_path(self) -> Optional[str]:
        """The backbone file or folder `backbone_weights` names (an `embedded:` name resolved inside the package);
        None for a random backbone."""
        if self.backbone_weights is None or not self.backbone_weights.startswith(EMBEDDED_PREFIX):
            return self.backbone_weights
        name = EMBEDDED_BACKBONES[self.backbone_weights[len(EMBEDDED_PREFIX):]]
        return str(resources.files("dinotxt_fast.train").joinpath("weights", name))

    def segmentation_short_side(self) -> int:
        """The short side of the segmentation evaluation's images: seg_short_side, or twice the training size (the
        official protocol evaluates at 512 a model trained at 224; measured here: 0.50 -> 0.60 mIoU, issue #13)."""
        return self.seg_short_side or 2 * self.image_size

    def model_config(self) -> DinoTxtConfig:
        from ..models.config import make_config

        return make_config(self.preset, **{"head_drop_path": self.drop_path, **self.model})

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["betas"] = list(self.betas)
        out["crop_scale"] = list(self.crop_scale)
        return out


def _fields() -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(TrainConfig)}


def builtin_configs() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("dinotxt_fast.train").joinpath("configs").iterdir()
                  if p.name.endswith(".yaml"))


def _read_yaml(source: str) -> dict:
    """A YAML file path, or the name of a built-in config ("official", "tiny")."""
    path = Path(source)
    if not path.exists() and source in builtin_configs():
        text = resources.files("dinotxt_fast.train").joinpath("configs", f"{source}.yaml").read_text()
        origin = f"built-in config {source!r}"
    elif path.is_file():
        text, origin = path.read_text(), str(path)
    else:
        raise ConfigError(f"config {source!r}: no such file and not a built-in config ({builtin_configs()})")
    try:
        values = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{origin}: invalid YAML: {exc}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{origin}: expected a mapping of keys to values, got {type(values).__name__}")
    return values


def parse_override(text: str) -> tuple[str, Any]:
    """`key=value` (value parsed as YAML: numbers, booleans, lists, null); dotted keys reach into `model.`."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _merge(values: dict, key: str, value: Any) -> None:
    head, _, rest = key.partition(".")
    if head not in _fields():
        raise ConfigError(f"unknown config key {key!r}; valid keys: {sorted(_fields())}")
    if rest:
        if head != "model":
            raise ConfigError(f"{key!r}: only model.<field> takes a dotted key")
        values.setdefault("model", {})[rest] = value
    else:
        values[head] = value


def load_config(config: Optional[str] = None, overrides: Optional[list[str]] = None, **values: Any) -> TrainConfig:
    """Resolve a TrainConfig: built-in defaults < config file < keyword values < `key=value` overrides."""
    merged: dict = {}
    if config is not None:
        for key, value in _read_yaml(config).items():
            if key == "model" and isinstance(value, dict):
                for k, v in value.items():
                    _merge(merged, f"model.{k}", v)
            else:
                _merge(merged, key, value)
    for key, value in values.items():
        if value is not None:
            _merge(merged, key, value)
    for text in overrides or []:
        _merge(merged, *parse_override(text))
    defaults = TrainConfig()
    fields = _fields()
    for name, value in list(merged.items()):
        default = getattr(defaults, name)
        if isinstance(default, bool) or default is None or name == "model":
            continue
        if value is None and "Optional" in str(fields[name].type):  # e.g. eval_data=null disables evaluation
            continue
        if isinstance(default, float) and isinstance(value, (int, str)) and not isinstance(value, bool):
            try:  # YAML 1.1 reads "7e-4" as a string
                merged[name] = value = float(value)
            except ValueError:
                pass
        if isinstance(default, (int, float, str)) and (not isinstance(value, type(default)) or isinstance(value, bool)):
            raise ConfigError(f"{name}: expected {type(default).__name__}, got {value!r}")
    for name in ("compile", "activation_checkpointing", "fsdp_text", "head_attention"):
        if name in merged and not isinstance(merged[name], bool):
            raise ConfigError(f"{name}: expected true or false, got {merged[name]!r}")
    try:
        cfg = TrainConfig(**merged)
    except TypeError as exc:
        raise ConfigError(str(exc)) from None
    try:  # validate the model overrides now, not at step 0
        cfg.model_config()
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"model: {exc}") from None
    return cfg


def save_config(cfg: TrainConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
