"""What the commands share: the usage error, the model arguments and loading, the compute device and dtype, class
names and image batches. A command that takes a model calls `add_model_args(parser)` and `load_model(args)`
(`check_weight_args(args)` first when it reads other inputs before loading the model). Models come from a model
folder (`--model DIR`, written by `export` or `save_pretrained`) or from local official weight files: nothing is
downloaded."""
from __future__ import annotations

import argparse
import os
from typing import Sequence

import torch

PROG = "dinotxt-fast"
DEFAULT_PRESET = "dinov2_vitl14_reg4_dinotxt"


class CLIError(Exception):
    """A usage problem reported as one line, without a traceback (exit code 2)."""


# ---------------------------------------------------------------------------------------------- model loading
def parse_override(text: str) -> tuple[str, object]:
    """KEY=VALUE with the value parsed as YAML, exactly like `train`'s overrides (one syntax for both)."""
    from ..train.config import ConfigError, parse_override as parse_config_override

    try:
        return parse_config_override(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_model_args(p: argparse.ArgumentParser) -> None:
    from ..models.config import PRESETS

    g = p.add_argument_group("model and weights (local files; nothing is downloaded)")
    g.add_argument("--model", metavar="DIR",
                   help="a model folder (config.json + model.safetensors, written by `dinotxt-fast export` or "
                        "save_pretrained): the one flag needed, instead of --preset and the weight files")
    g.add_argument("--preset", default=None, choices=sorted(PRESETS),
                   help=f"model preset of the official weight files (default: {DEFAULT_PRESET})")
    g.add_argument("--backbone", metavar="FILE",
                   help="backbone weights (DINOv2 or DINOv3 ViT: official, timm or transformers file, or a "
                        "transformers model folder)")
    g.add_argument("--vision-head", metavar="FILE", help="DINOv2 release: the vision head file")
    g.add_argument("--text-encoder", metavar="FILE", help="DINOv2 release: the text encoder file")
    g.add_argument("--weights", metavar="FILE", help="DINOv3 release: the vision head + text encoder file")
    g.add_argument("--override", metavar="KEY=VALUE", action="append", type=parse_override, default=[],
                   help="DinoTxtConfig field override, repeatable (e.g. --override vision_dim=64)")
    g.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    g.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="compute dtype via autocast (default: bfloat16 on CUDA, float32 on CPU)")
    g.add_argument("--backend", choices=("auto", "torch", "triton", "cuda"), default=None,
                   help="kernel backend for every op (default: auto, i.e. DINOTXT_FAST_BACKEND or the dispatch's "
                        "measured choice)")


def resolve_device(args) -> torch.device:
    name = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise CLIError(f"invalid --device {name!r}: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
    return device


def compute_autocast(args, device: torch.device):
    """--dtype as an autocast context (default bfloat16 on CUDA, float32 on CPU)."""
    from ..inference.zeroshot import autocast

    name = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    return autocast(device, getattr(torch, name))


_WEIGHT_FLAGS = ("backbone", "vision_head", "text_encoder", "weights")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def model_preset(args) -> str:
    """The preset of the official weight files (--preset, else the default); unused with --model, whose
    config.json names its own."""
    return args.preset or DEFAULT_PRESET


def _required_weights(preset: str) -> tuple[list[str], list[str]]:
    """(required, forbidden) weight options for a preset's release layout."""
    from ..models.config import PRESETS

    if PRESETS[preset]["backbone"] == "dinov2":
        return ["backbone", "vision_head", "text_encoder"], ["weights"]
    return ["backbone", "weights"], ["vision_head", "text_encoder"]


def one_line(exc: Exception) -> str:
    """A multi-line load error (a key listing per section) as one line: sections joined by '; ', items by ', '."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else type(exc).__name__
    for line in lines[1:]:
        new_section = line.endswith(":") or line.startswith("hint:")
        text += (" " if text.endswith(":") else "; " if new_section else ", ") + line
    return text


def _check_model_folder(args) -> dict[str, str]:
    """--model alone, and a complete model folder: config.json valid, model.safetensors' header listing exactly the
    model's tensors (read without loading them or building the model)."""
    from ..models._state import StateDictError
    from ..models.checkpoint import CheckpointError
    from ..models.pretrained import CONFIG_NAME, WEIGHTS_NAME, check_folder

    conflicting = [_flag(n) for n in _WEIGHT_FLAGS if getattr(args, n)]
    conflicting += ["--preset"] * bool(args.preset) + ["--override"] * bool(args.override)
    if conflicting:
        raise CLIError(f"--model {args.model} is the whole model (its config.json names the preset and every size): "
                       f"drop {', '.join(conflicting)}")
    try:
        folder = check_folder(args.model)
    except (FileNotFoundError, NotADirectoryError, CheckpointError, StateDictError) as exc:
        raise CLIError(f"--model: {one_line(exc)}") from None
    return {"config": os.fspath(folder / CONFIG_NAME), "model": os.fspath(folder / WEIGHTS_NAME)}


def check_weight_args(args) -> dict[str, str]:
    """{role: path} of the model's files, all given and valid enough to load, checked before any model is built
    (--model: the folder's config.json and model.safetensors; else the weight files the preset needs); a CLIError
    saying what is missing or wrong otherwise."""
    if getattr(args, "model", None):
        return _check_model_folder(args)
    preset = model_preset(args)
    required, forbidden = _required_weights(preset)
    missing = [_flag(n) for n in required if not getattr(args, n)]
    if missing:
        raise CLIError(f"model weights are required: give --model DIR (a model folder), or --preset {preset} with "
                       f"{' '.join(_flag(n) + ' FILE' for n in required)} (local files of the official release; "
                       f"nothing is downloaded); missing: {', '.join(missing)}")
    extra = [_flag(n) for n in forbidden if getattr(args, n)]
    if extra:
        raise CLIError(f"{', '.join(extra)} does not apply to --preset {preset}, which loads "
                       f"{' '.join(_flag(n) for n in required)}")
    for n in required:
        path = getattr(args, n)
        # a backbone may also be a transformers model folder (config.json + weights), checked by its loader
        found = os.path.exists(path) if n == "backbone" else os.path.isfile(path)
        if not found:
            raise CLIError(f"{_flag(n)} file not found: {path}")
        if os.path.isfile(path):
            check_weight_file(path, _flag(n))
    return {n: getattr(args, n) for n in required}


def check_weight_file(path: str, flag: str) -> None:
    """A weight file's container, checked without reading its tensors: a safetensors header that parses, or a
    PyTorch file (a zip archive whose directory is intact, or the legacy pickle format). Catches a truncated
    download or a wrong file in a second instead of after the model is built."""
    import zipfile

    if path.endswith(".safetensors"):
        from safetensors import safe_open

        try:
            with safe_open(path, framework="pt") as f:
                f.keys()
        except Exception as exc:  # safetensors raises its own SafetensorError
            raise CLIError(f"{flag} {path} is not a readable safetensors file (corrupt or truncated): {exc}") from None
        return
    with open(path, "rb") as f:
        legacy = f.read(1) == b"\x80"  # torch.save(..., _use_new_zipfile_serialization=False): a pickle
    if not (legacy or zipfile.is_zipfile(path)):
        raise CLIError(f"{flag} {path} is not a PyTorch weight file (.pth/.pt, a zip archive) or a .safetensors file: "
                       "corrupt, truncated or another kind of file")


def load_model(args):
    """(model in eval mode on the chosen device, device): from_pretrained(--model), or create_model(preset,
    **overrides) + load_official(<files>). Weights are float32; --dtype is the autocast compute dtype."""
    files = check_weight_args(args)
    device = resolve_device(args)
    if getattr(args, "model", None):
        from ..models.pretrained import from_pretrained

        # float32 storage like the official-files path (a no-op for the folders export writes): --dtype autocasts
        return from_pretrained(args.model, device=device, dtype=torch.float32), device
    from ..models.dinotxt import create_model

    try:
        model = create_model(model_preset(args), **dict(args.override))
    except TypeError as exc:  # an unknown DinoTxtConfig field in --override
        raise CLIError(f"--override: {exc}") from None
    model.load_official(**files)
    return model.to(device).eval(), device


# ------------------------------------------------------------------------------------------ classes and images
def add_class_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--classes", help="comma-separated class names")
    p.add_argument("--classes-file", metavar="FILE", help="class names, one per line")
    p.add_argument("--templates", choices=("imagenet", "simple", "none"), default="imagenet",
                   help="prompt templates averaged per class: the 80 CLIP ImageNet ones (default), the 7-prompt "
                        "subset, or none (the class name itself)")


def read_classes(args) -> list[str]:
    if args.classes and args.classes_file:
        raise CLIError("give either --classes or --classes-file, not both")
    if args.classes:
        names = [c.strip() for c in args.classes.split(",")]
    elif args.classes_file:
        try:
            with open(args.classes_file, encoding="utf-8") as f:
                names = [line.strip() for line in f]
        except OSError as exc:
            raise CLIError(f"cannot read --classes-file {args.classes_file}: {exc}") from None
    else:
        raise CLIError("give the class names with --classes a,b,c or --classes-file FILE (one per line)")
    names = [n for n in names if n]
    if not names:
        raise CLIError("the class list is empty")
    return names


def add_transform_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--resize", type=int, default=256, help="short side before the center crop (default 256)")
    p.add_argument("--crop", type=int, default=224, help="center crop size (default 224)")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default 32)")


def batches(items: Sequence, size: int):
    if size < 1:
        raise CLIError(f"--batch-size must be >= 1, got {size}")
    for start in range(0, len(items), size):
        yield items[start:start + size]


def check_image_files(paths: Sequence[str], what: str = "image") -> None:
    """Every image file exists and its header parses (PIL's verify), before any model is built: a typo or a
    corrupt file is reported in a second, not after the model has loaded. Decoding waits for the image's batch."""
    from PIL import Image, UnidentifiedImageError

    from ..inference.images import require_file

    for path in paths:
        require_file(path, what)
        try:
            with Image.open(path) as img:
                img.verify()
        except PermissionError:
            raise  # its message already names the file
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            raise ValueError(f"cannot read {what} file {path}: not a readable image or corrupt ({exc})") from None


def add_progress_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar (it is shown on stderr when stderr is a terminal)")


def progress(args, total: int, desc: str, unit: str):
    """A tqdm bar on stderr for a loop that may last (images, windows, prompts): shown on a terminal, off with
    --no-progress or when stderr is not a terminal (tqdm's disable=None)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True,
                disable=True if getattr(args, "no_progress", False) else None)


def image_batches(paths: Sequence[str], args):
    """(paths, images [B, 3, crop, crop]) chunks of --batch-size, with the official eval transform, under a
    progress bar counted in images."""
    from ..inference.images import load_classification_batch

    with progress(args, total=len(paths), desc="images", unit="image") as bar:
        for chunk in batches(list(paths), args.batch_size):
            yield chunk, load_classification_batch(chunk, resize_size=args.resize, crop_size=args.crop)
            bar.update(len(chunk))


def positive_int(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def short_side(text: str):
    """--short-side: a positive integer, or 'none' to keep the image's size."""
    if text.lower() == "none":
        return None
    try:
        return positive_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'none', got {text!r}") from None


def add_segmentation_protocol_args(p: argparse.ArgumentParser) -> None:
    """The knobs of the official segmentation protocol (docs/design.md, "Dense use"), shared by segment and eval."""
    p.add_argument("--mode", choices=("slide", "whole"), default="slide", help="sliding windows or whole image")
    p.add_argument("--short-side", type=short_side, default=512,
                   help="resize the short side to this before windowing, or 'none' (default 512)")
    p.add_argument("--window", type=positive_int, default=384, help="window size (default 384)")
    p.add_argument("--stride", type=positive_int, default=192, help="window stride (default 192)")
    p.add_argument("--features", choices=("head", "backbone"), default="head",
                   help="patch tokens of the vision head (default) or of the raw backbone")
