"""The model folder: `model.save_pretrained(DIR)` writes config.json and model.safetensors, `from_pretrained(DIR)`
rebuilds the model from them exactly (docs/design.md, "Public API").

config.json holds the format, the preset the model was made from, every DinoTxtConfig field and the logit scale;
model.safetensors every tensor of `model.state_dict()` in its own dtype. Loading builds the model on the meta device
from config.json (no random weights are computed) and assigns the stored tensors, so nothing of full size exists
before the file has been checked key by key.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Optional, Union

import torch

from .._files import atomic_write
from ..version import __version__
from . import checkpoint as ckpt
from ._state import check_state_dict
from .config import DinoTxtConfig
from .dinotxt import DinoTxt

FORMAT = "dinotxt-fast"
FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"

PathLike = Union[str, os.PathLike]


def save_pretrained(model: DinoTxt, directory: PathLike, state_dict: Optional[dict] = None) -> Path:
    """Write `directory`/config.json and `directory`/model.safetensors (both atomically, the weights first, so a
    folder with a config.json is complete). `state_dict`: the tensors to write instead of `model.state_dict()`, with
    the same keys (the trainer's full state gathered from FSDP shards). Returns the folder."""
    if not isinstance(model, DinoTxt):
        raise TypeError(f"save_pretrained takes a DinoTxt model, got {type(model).__name__}")
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"save_pretrained: {os.fspath(directory)!r} exists and is not a folder")
    own = model.state_dict()
    if state_dict is not None and state_dict.keys() != own.keys():
        diff = sorted(set(state_dict) ^ set(own))
        raise ValueError(f"save_pretrained: state_dict does not have the model's keys (differing: {diff[:8]}"
                         f"{' ...' if len(diff) > 8 else ''})")
    weights = {k: v.detach().to("cpu") for k, v in (own if state_dict is None else state_dict).items()}
    ckpt.save_state_dict(weights, directory / WEIGHTS_NAME,
                         metadata={"format": "pt", "producer": f"{FORMAT} {__version__}"})
    dtypes = sorted({str(v.dtype).removeprefix("torch.") for v in weights.values()})
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "dinotxt_fast_version": __version__,
        "preset": getattr(model, "preset", None),
        "config": model.config.to_dict(),
        "logit_scale": float(weights["logit_scale"]),
        "dtype": dtypes[0] if len(dtypes) == 1 else dtypes,
    }
    text = json.dumps(config, indent=2) + "\n"
    atomic_write(directory / CONFIG_NAME, lambda f: f.write(text.encode("utf-8")))
    return directory


def _folder(directory: PathLike) -> Path:
    path = Path(directory)
    if path.is_file() and path.name in (CONFIG_NAME, WEIGHTS_NAME):
        path = path.parent  # the folder's config.json or model.safetensors given instead of the folder
    if not path.exists():
        raise FileNotFoundError(f"model folder not found: {os.fspath(path)!r}")
    if not path.is_dir():
        raise NotADirectoryError(f"{os.fspath(path)!r} is not a model folder (one written by save_pretrained holds "
                                 f"{CONFIG_NAME} and {WEIGHTS_NAME})")
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (path / name).is_file():
            raise FileNotFoundError(f"model folder {os.fspath(path)!r} has no {name} (save_pretrained writes "
                                    f"{CONFIG_NAME} and {WEIGHTS_NAME})")
    return path


def read_config(directory: PathLike) -> tuple:
    """(DinoTxtConfig, preset, config.json contents) of a model folder, with one-line errors naming the file."""
    path = _folder(directory) / CONFIG_NAME
    data = ckpt.read_json(path, "model config")
    if data.get("format") != FORMAT:
        if "model_type" in data:
            raise ckpt.CheckpointError(
                f"{os.fspath(path)!r} is a Hugging Face transformers config (model_type {data['model_type']!r}), "
                "not a dinotxt-fast model folder: load such weights as a backbone, with "
                "model.load_official(backbone=FOLDER) or dinotxt_fast.load_backbone(FOLDER)")
        raise ckpt.CheckpointError(f"{os.fspath(path)!r} is not a dinotxt-fast model config (no \"format\": "
                                   f"\"{FORMAT}\" entry)")
    version = data.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ckpt.CheckpointError(f"{os.fspath(path)!r} has format_version {version!r}; this dinotxt-fast "
                                   f"({__version__}) reads format_version <= {FORMAT_VERSION}")
    fields = data.get("config")
    if not isinstance(fields, dict):
        raise ckpt.CheckpointError(f"{os.fspath(path)!r} has no \"config\" object of DinoTxtConfig fields")
    known = {f.name for f in dataclasses.fields(DinoTxtConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ckpt.CheckpointError(f"{os.fspath(path)!r}: unknown DinoTxtConfig field(s) {unknown} (written by a "
                                   f"newer dinotxt-fast?); known fields: {sorted(known)}")
    try:
        config = DinoTxtConfig(**fields)  # fields a file leaves out keep their defaults (folders of older versions)
    except (TypeError, ValueError) as exc:
        raise ckpt.CheckpointError(f"{os.fspath(path)!r}: invalid config: {exc}") from None
    preset = data.get("preset")
    return config, preset if isinstance(preset, str) else None, data


def _expected_shapes(config: DinoTxtConfig, preset: Optional[str]) -> dict:
    with torch.device("meta"):  # shapes only: no tensor of the model's size is computed
        return {k: tuple(v.shape) for k, v in DinoTxt(config, preset=preset).state_dict().items()}


def check_folder(directory: PathLike) -> Path:
    """Check a model folder without loading its tensors or building the model: config.json as `read_config` checks
    it, model.safetensors readable with a header listing exactly the model's tensors in their shapes. Returns the
    folder; raises FileNotFoundError / NotADirectoryError / CheckpointError / StateDictError naming the file."""
    from safetensors import safe_open

    folder = _folder(directory)
    config, preset, _ = read_config(folder)
    weights_path = folder / WEIGHTS_NAME
    try:
        with safe_open(os.fspath(weights_path), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own SafetensorError for a corrupt or truncated file
        raise ckpt.CheckpointError(f"cannot read model weights {os.fspath(weights_path)!r} (corrupt, truncated or "
                                   f"not a safetensors file): {type(exc).__name__}: {exc}") from None
    given = {k: torch.empty(shape, device="meta") for k, shape in shapes.items()}
    check_state_dict(_expected_shapes(config, preset), given, strict=True,
                     what=f"model weights {os.fspath(weights_path)!r}")
    return folder


def from_pretrained(directory: PathLike, *, device: Union[str, torch.device, None] = None,
                    dtype: Optional[torch.dtype] = None) -> DinoTxt:
    """The DinoTxt model saved in `directory` by `save_pretrained`, in eval mode, on `device` (default CPU), its
    tensors in their stored dtype unless `dtype` is given."""
    folder = _folder(directory)
    config, preset, data = read_config(folder)
    with torch.device("meta"):
        model = DinoTxt(config, preset=preset)
    weights_path = folder / WEIGHTS_NAME
    weights = ckpt.load_state_dict(weights_path, name="model weights")
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    check_state_dict(expected, weights, strict=True, what=f"model weights {os.fspath(weights_path)!r}")
    model.load_state_dict(weights, strict=True, assign=True)
    stored, held = data.get("logit_scale"), float(model.logit_scale.detach())
    if isinstance(stored, (int, float)) and not math.isclose(held, stored, rel_tol=1e-6, abs_tol=1e-7):
        raise ckpt.CheckpointError(f"{os.fspath(folder)!r}: config.json says logit_scale={stored} but "
                                   f"{WEIGHTS_NAME} holds {held}: the two files do not belong together")
    model.backbone.clear_cache()
    if device is not None or dtype is not None:
        model = model.to(device=device, dtype=dtype)
    return model.eval()
