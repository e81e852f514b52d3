"""Checkpoint files: reading, atomic writing, and the key layouts of the official DINO.txt releases.

Our modules use the official parameter names, so only three things need mapping:
- the v2 vision-head file names its block list `block_list` (v3 and our VisionHead say `blocks`);
- the v3 release is one file with full prefixes: `visual_model.head.*`, `text_model.*`, `logit_scale`;
- the official `logit_scale` is a 1-element tensor, ours is 0-d.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Optional, Union

import torch

from .._files import atomic_write
from .layouts import detect_layout

StateDict = dict[str, torch.Tensor]
Source = Union[str, os.PathLike, Mapping]

# Wrappers that training scripts put around a state dict, tried in this order.
_WRAPPER_KEYS = ("state_dict", "model", "module")
# Prefixes that wrap every key: DistributedDataParallel and torch.compile.
_STRIPPED_PREFIXES = ("module.", "_orig_mod.")
# The weights of a Hugging Face style model folder, in the order they are looked for.
FOLDER_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                  "pytorch_model.bin.index.json")

V2_HEAD_LIST = "block_list."
HEAD_LIST = "blocks."
V3_HEAD_PREFIX = "visual_model.head."
V3_BACKBONE_PREFIX = "visual_model.backbone."
V3_TEXT_PREFIX = "text_model."
LOGIT_SCALE = "logit_scale"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not hold what it should (corrupt file, wrong content)."""


def describe(source: Source) -> str:
    """How an error message names a checkpoint source."""
    if isinstance(source, Mapping):
        return "the given state dict"
    return f"file {os.fspath(source)!r}"


def load_state_dict(source: Source, *, name: str = "checkpoint") -> StateDict:
    """Read a state dict from a path (.pth/.pt/.bin via torch.load, .safetensors; a model folder holding one of
    FOLDER_WEIGHTS, sharded ones with their index) or take a mapping as is.

    Nested wrappers ({"model": ...}, {"state_dict": ...}) and DDP / torch.compile key prefixes are removed.
    `name` says which checkpoint it is in error messages ("backbone", "vision_head", ...).
    """
    if isinstance(source, Mapping):
        return _unwrap(source, f"{name} ({describe(source)})")
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"{name} must be a path or a state dict (a mapping of names to tensors), "
                        f"got {type(source).__name__}")
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"{name} checkpoint not found: {os.fspath(path)!r}")
    if path.is_dir():
        path = folder_weights(path, name)
    if not path.is_file():
        raise CheckpointError(f"{name} checkpoint {os.fspath(path)!r} is not a file")
    if path.name.endswith(".index.json"):
        return _read_shards(path, name)
    return _read_file(path, name)


def folder_weights(folder: Path, name: str = "checkpoint") -> Path:
    """The weights file of a model folder (FOLDER_WEIGHTS, first found), or a CheckpointError naming the folder."""
    for candidate in FOLDER_WEIGHTS:
        if (folder / candidate).is_file():
            return folder / candidate
    raise CheckpointError(f"{name} checkpoint {os.fspath(folder)!r} is a folder without {', '.join(FOLDER_WEIGHTS)} "
                          "(not a file)")


def read_json(path: Path, what: str) -> dict:
    """A JSON object from `path`, or a CheckpointError naming the file and the problem."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {what} {os.fspath(path)!r} (corrupt or not JSON): {exc}") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{what} {os.fspath(path)!r} holds a JSON {type(value).__name__}, not an object")
    return value


def _read_shards(index: Path, name: str) -> StateDict:
    weight_map = read_json(index, f"{name} shard index").get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{name} shard index {os.fspath(index)!r} has no weight_map")
    out: StateDict = {}
    for shard in sorted(set(weight_map.values())):
        shard_path = index.parent / shard
        if not shard_path.is_file():
            raise CheckpointError(f"{name} shard {os.fspath(shard_path)!r} named by {index.name} is missing")
        out.update(_read_file(shard_path, name))
    return out


def _read_file(path: Path, name: str) -> StateDict:
    if path.suffix == ".safetensors":
        obj = _read_safetensors(path, name)
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # pickle, zip and tensor-storage errors all mean the same thing here
            raise CheckpointError(f"cannot read {name} checkpoint {os.fspath(path)!r} (corrupt, truncated or "
                                  f"not a PyTorch weights file): {type(exc).__name__}: {exc}") from exc
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{name} checkpoint {os.fspath(path)!r} holds a {type(obj).__name__}, "
                              f"not a state dict")
    return _unwrap(obj, f"{name} checkpoint {os.fspath(path)!r}")


def _read_safetensors(path: Path, name: str) -> StateDict:
    try:
        from safetensors.torch import load_file
    except ImportError as exc:
        raise ImportError(f"reading {os.fspath(path)!r} needs the 'safetensors' package "
                          f"(pip install safetensors)") from exc
    try:
        return load_file(os.fspath(path), device="cpu")
    except Exception as exc:
        raise CheckpointError(f"cannot read {name} checkpoint {os.fspath(path)!r} (corrupt or not a "
                              f"safetensors file): {type(exc).__name__}: {exc}") from exc


def _unwrap(obj: Mapping, origin: str, depth: int = 0) -> StateDict:
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return _strip_prefixes({str(k): v for k, v in obj.items()})
    if depth < 3:
        for key in _WRAPPER_KEYS:
            if isinstance(obj.get(key), Mapping):
                return _unwrap(obj[key], origin, depth + 1)
    if not obj:
        raise CheckpointError(f"{origin} is empty")
    bad = sorted(str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor))
    raise CheckpointError(f"{origin} is not a state dict: entries {_short(bad)} are not tensors "
                          f"(and there is no {'/'.join(_WRAPPER_KEYS)} entry holding one)")


def _strip_prefixes(sd: StateDict) -> StateDict:
    for prefix in _STRIPPED_PREFIXES:
        if all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def save_state_dict(state_dict: Mapping[str, torch.Tensor], path: Union[str, os.PathLike],
                    metadata: Optional[dict] = None) -> Path:
    """Write a state dict atomically (temporary file in the same folder, fsync, os.replace).

    `.safetensors` paths are written with safetensors (with `metadata`, str -> str), anything else with torch.save.
    """
    def write(f) -> None:
        if Path(path).suffix == ".safetensors":
            from safetensors.torch import save
            # safetensors refuses views and shared storage: give it plain contiguous copies.
            f.write(save({k: v.detach().contiguous().clone() for k, v in state_dict.items()}, metadata=metadata))
        else:
            torch.save(dict(state_dict), f)

    return atomic_write(path, write)


# ---------------------------------------------------------------------------------------------------------
# Official layouts <-> ours


def head_from_v2(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """v2 vision-head file (`block_list.*`, `ln_final.*`) -> our VisionHead keys (`blocks.*`, `ln_final.*`)."""
    return {(HEAD_LIST + k[len(V2_HEAD_LIST):] if k.startswith(V2_HEAD_LIST) else k): v for k, v in sd.items()}


def head_to_v2(sd: Mapping[str, torch.Tensor]) -> StateDict:
    return {(V2_HEAD_LIST + k[len(HEAD_LIST):] if k.startswith(HEAD_LIST) else k): v for k, v in sd.items()}


def split_v3_weights(sd: Mapping[str, torch.Tensor]) -> dict:
    """Split the v3 single file into {"head", "text", "backbone", "logit_scale", "unexpected"}.

    "backbone" holds `visual_model.backbone.*` entries (absent from the release file, present in a full
    model state dict), "logit_scale" the 0-d value or None, "unexpected" every key with another prefix.
    """
    parts: dict = {"head": {}, "text": {}, "backbone": {}, "logit_scale": None, "unexpected": []}
    for key, value in sd.items():
        if key.startswith(V3_HEAD_PREFIX):
            parts["head"][key[len(V3_HEAD_PREFIX):]] = value
        elif key.startswith(V3_TEXT_PREFIX):
            parts["text"][key[len(V3_TEXT_PREFIX):]] = value
        elif key.startswith(V3_BACKBONE_PREFIX):
            parts["backbone"][key[len(V3_BACKBONE_PREFIX):]] = value
        elif key == LOGIT_SCALE:
            if value.numel() != 1:
                raise CheckpointError(f"logit_scale must hold one value, got shape {tuple(value.shape)}")
            parts["logit_scale"] = value.reshape(())
        else:
            parts["unexpected"].append(key)
    return parts


def join_v3_weights(head: Mapping[str, torch.Tensor], text: Mapping[str, torch.Tensor],
                    logit_scale: torch.Tensor) -> StateDict:
    """Our head/text state dicts and the 0-d logit scale -> the v3 release file layout."""
    out = {V3_HEAD_PREFIX + k: v for k, v in head.items()}
    out.update({V3_TEXT_PREFIX + k: v for k, v in text.items()})
    out[LOGIT_SCALE] = logit_scale.detach().reshape(1)  # the official parameter is torch.ones(1) * value
    return out


def guess_part(sd: Mapping[str, torch.Tensor]) -> Optional[tuple[str, str]]:
    """Which official file a state dict looks like, for error messages: (load_official argument name,
    description), or None when it looks like none of them."""
    keys = set(sd)
    if any(k.startswith((V3_HEAD_PREFIX, V3_TEXT_PREFIX)) for k in keys):
        return "weights", "the DINOv3 DINO.txt weights file (visual_model.head.*, text_model.*)"
    if any(k.startswith(V2_HEAD_LIST) for k in keys):
        return "vision_head", "the DINOv2 DINO.txt vision head file (block_list.*)"
    if "backbone.token_embedding.weight" in keys or "head.linear_projection.weight" in keys:
        return "text_encoder", "a DINO.txt text encoder file (backbone.token_embedding, head.linear_projection)"
    kind = backbone_kind(sd)
    if kind is not None:
        return "backbone", f"a {'DINOv2' if kind == 'dinov2' else 'DINOv3'} backbone"
    return None


def backbone_kind(sd: Mapping[str, torch.Tensor]) -> Optional[str]:
    """"dinov2", "dinov3" or None: the family of a backbone state dict in any layout of models/layouts.py."""
    layout = detect_layout(sd)
    return None if layout is None else layout.family


def _short(keys: list, limit: int = 20) -> str:
    shown = ", ".join(keys[:limit])
    return f"[{shown}{', ... (%d more)' % (len(keys) - limit) if len(keys) > limit else ''}]"
