"""The `dinotxt-fast` command line: info, encode, classify, segment, train, export.

Subcommands live in COMMANDS (name -> builder that adds its sub-parser and sets `handler`), so later commands
(train, bench, export) register with `register_command` without touching the others. Models are built from
local official weight files only: nothing is downloaded.
"""
from __future__ import annotations

import argparse
import colorsys
import contextlib
import json
import os
import platform
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

PROG = "dinotxt-fast"
DEFAULT_PRESET = "dinov2_vitl14_reg4_dinotxt"


class CLIError(Exception):
    """A usage problem reported as one line, without a traceback."""


COMMANDS: dict[str, Callable[[argparse._SubParsersAction], argparse.ArgumentParser]] = {}


def register_command(name: str):
    """Decorator: `builder(subparsers) -> parser` adds sub-command `name`; it must set_defaults(handler=fn)."""
    def wrap(builder):
        COMMANDS[name] = builder
        return builder
    return wrap


# --------------------------------------------------------------------------------------------------------- info
def _version() -> str:
    try:
        from .version import __version__
        return __version__
    except ImportError:
        try:
            from importlib.metadata import version
            return version("dinotxt-fast")
        except Exception:
            return "unknown"


def _extension_report() -> dict:
    """Whether the compiled `_C` extension loads, with its CUDA build info or the reason it does not."""
    try:
        from . import _ext
    except Exception as exc:  # a broken build must not break `info`, whose job is to report it
        return {"built": False, "reason": f"dinotxt_fast._ext cannot be imported: {type(exc).__name__}: {exc}"}
    report: dict = {}
    try:
        report["built"] = _ext.extension() is not None
    except Exception as exc:
        return {"built": False, "reason": f"{type(exc).__name__}: {exc}"}
    if report["built"]:
        try:
            report["cuda_info"] = _ext.cuda_info()
        except Exception as exc:
            report["cuda_info_error"] = f"{type(exc).__name__}: {exc}"
    else:
        try:
            report["reason"] = str(_ext.extension_error() or "not built")
        except Exception as exc:
            report["reason"] = f"{type(exc).__name__}: {exc}"
    return report


def _backends_report() -> dict:
    try:
        from .ops import backends
        return {name: {"available": bool(s["available"]), "reason": str(s.get("reason", "")),
                       "ops": list(s.get("ops", []))}
                for name, s in backends().items()}
    except Exception as exc:
        return {"error": {"available": False, "reason": f"dinotxt_fast.ops failed: {type(exc).__name__}: {exc}"}}


def collect_info() -> dict:
    """Everything `dinotxt-fast info` reports, as a JSON-serialisable dict."""
    try:
        import triton
        triton_version = triton.__version__
    except Exception as exc:
        triton_version = f"not available ({type(exc).__name__}: {exc})"
    devices = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            devices.append({"index": i, "name": props.name, "capability": f"{props.major}.{props.minor}",
                            "memory_gib": round(props.total_memory / 2**30, 1)})
    return {
        "dinotxt_fast": _version(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version,
        "cuda_available": torch.cuda.is_available(),
        "cuda_devices": devices,
        "extension": _extension_report(),
        "backends": _backends_report(),
        "measured_dispatch": _measured_report(),
    }


def _measured_report() -> dict:
    """How many measured per-shape dispatch entries ship with the package, and for which GPUs."""
    try:
        from .ops import dispatch
        entries = dispatch._measured_entries()
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
    return {"entries": len(entries), "gpus": sorted({e["gpu"] for e in entries})}


def _print_info(info: dict) -> None:
    rows = [("dinotxt-fast", info["dinotxt_fast"]), ("python", info["python"]), ("platform", info["platform"]),
            ("torch", f"{info['torch']} (CUDA {info['torch_cuda'] or 'none'})"), ("triton", info["triton"])]
    devices = info["cuda_devices"]
    rows.append(("CUDA devices", ", ".join(f"{d['index']}: {d['name']} (sm {d['capability']}, "
                                           f"{d['memory_gib']} GiB)" for d in devices) or "none"))
    ext = info["extension"]
    if ext.get("built"):
        detail = ext.get("cuda_info", ext.get("cuda_info_error", ""))
        rows.append(("_C extension", f"built {json.dumps(detail, default=str) if detail else ''}".strip()))
    else:
        rows.append(("_C extension", f"not built: {ext.get('reason', '')}"))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    measured = info["measured_dispatch"]
    print("auto dispatch: " + (measured["error"] if "error" in measured else
                               f"{measured['entries']} measured per-shape entries"
                               + (f" ({', '.join(measured['gpus'])})" if measured["gpus"] else
                                  " (none: auto keeps the reference until GPU benchmarks are measured)")))
    print("backends:")
    for name, status in info["backends"].items():
        state = "available" if status["available"] else "unavailable"
        print(f"  {name:<8} {state:<12} {status['reason']}")
        if status.get("ops"):
            print(f"  {'':<8} {'':<12} ops: {', '.join(status['ops'])}")


def _run_info(args) -> int:
    info = collect_info()
    if args.json:
        print(json.dumps(info, indent=2, default=str))
    else:
        _print_info(info)
    return 0


@register_command("info")
def _build_info(sub):
    p = sub.add_parser("info", help="versions, devices, compiled extension and kernel backends",
                       description="Report package, PyTorch/Triton/Python versions, CUDA devices, whether the "
                                   "compiled _C extension is built, and which kernel backends are available.")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(handler=_run_info)
    return p


# ---------------------------------------------------------------------------------------------- model loading
def _parse_override(text: str) -> tuple[str, object]:
    """KEY=VALUE with the value parsed as YAML, exactly like `train`'s overrides (one syntax for both)."""
    from .train.config import ConfigError, parse_override

    try:
        return parse_override(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_model_args(p: argparse.ArgumentParser) -> None:
    from .models.config import PRESETS

    g = p.add_argument_group("model and weights (local files of the official release; nothing is downloaded)")
    g.add_argument("--preset", default=DEFAULT_PRESET, choices=sorted(PRESETS),
                   help=f"model preset (default: {DEFAULT_PRESET})")
    g.add_argument("--backbone", metavar="FILE", help="backbone weights (DINOv2 or DINOv3 ViT)")
    g.add_argument("--vision-head", metavar="FILE", help="DINOv2 release: the vision head file")
    g.add_argument("--text-encoder", metavar="FILE", help="DINOv2 release: the text encoder file")
    g.add_argument("--weights", metavar="FILE", help="DINOv3 release: the vision head + text encoder file")
    g.add_argument("--override", metavar="KEY=VALUE", action="append", type=_parse_override, default=[],
                   help="DinoTxtConfig field override, repeatable (e.g. --override vision_dim=64)")
    g.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    g.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="compute dtype via autocast (default: bfloat16 on CUDA, float32 on CPU)")
    g.add_argument("--backend", choices=("auto", "torch", "triton", "cuda"), default=None,
                   help="kernel backend for every op (default: auto, i.e. DINOTXT_FAST_BACKEND or the dispatch's "
                        "measured choice)")


def _device(args) -> torch.device:
    name = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise CLIError(f"invalid --device {name!r}: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
    return device


def _autocast(args, device: torch.device):
    name = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    if name == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=getattr(torch, name))


def _required_weights(preset: str) -> tuple[list[str], list[str]]:
    """(required, forbidden) weight options for a preset's release layout."""
    from .models.config import PRESETS

    if PRESETS[preset]["backbone"] == "dinov2":
        return ["backbone", "vision_head", "text_encoder"], ["weights"]
    return ["backbone", "weights"], ["vision_head", "text_encoder"]


def check_weight_args(args) -> list[str]:
    """The weight options the preset needs, all given and existing; else a CLIError saying what is missing."""
    required, forbidden = _required_weights(args.preset)
    flag = lambda name: "--" + name.replace("_", "-")  # noqa: E731
    missing = [flag(n) for n in required if not getattr(args, n)]
    if missing:
        raise CLIError(f"model weights are required: --preset {args.preset} needs "
                       f"{' '.join(flag(n) + ' FILE' for n in required)} (local files of the official release; "
                       f"nothing is downloaded); missing: {', '.join(missing)}")
    extra = [flag(n) for n in forbidden if getattr(args, n)]
    if extra:
        raise CLIError(f"{', '.join(extra)} does not apply to --preset {args.preset}, which loads "
                       f"{' '.join(flag(n) for n in required)}")
    for n in required:
        path = getattr(args, n)
        if not os.path.isfile(path):
            raise CLIError(f"{flag(n)} file not found: {path}")
    return required


def load_model(args):
    """create_model(preset, **overrides) + load_official(<files>), in eval mode on the chosen device."""
    from .models.dinotxt import create_model

    required = check_weight_args(args)
    device = _device(args)
    try:
        model = create_model(args.preset, **dict(args.override))
    except TypeError as exc:  # an unknown DinoTxtConfig field in --override
        raise CLIError(f"--override: {exc}") from None
    model.load_official(**{n: getattr(args, n) for n in required})
    return model.to(device).eval(), device


# -------------------------------------------------------------------------------------------- shared helpers
def _read_classes(args) -> list[str]:
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


def _add_class_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--classes", help="comma-separated class names")
    p.add_argument("--classes-file", metavar="FILE", help="class names, one per line")
    p.add_argument("--templates", choices=("imagenet", "simple", "none"), default="imagenet",
                   help="prompt templates averaged per class: the 80 CLIP ImageNet ones (default), the 7-prompt "
                        "subset, or none (the class name itself)")


def _add_transform_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--resize", type=int, default=256, help="short side before the center crop (default 256)")
    p.add_argument("--crop", type=int, default=224, help="center crop size (default 224)")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default 32)")


def _batches(items: Sequence, size: int):
    if size < 1:
        raise CLIError(f"--batch-size must be >= 1, got {size}")
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _image_batches(paths: Sequence[str], args):
    from .inference.images import load_classification_batch

    for chunk in _batches(list(paths), args.batch_size):
        yield chunk, load_classification_batch(chunk, resize_size=args.resize, crop_size=args.crop)


# ------------------------------------------------------------------------------------------------------ encode
def _save_embeddings(path: Path, image: Optional[torch.Tensor], text: Optional[torch.Tensor],
                     image_paths: list[str], texts: list[str]) -> None:
    import numpy as np

    suffix = path.suffix.lower()  # checked by _run_encode before any work
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".npy":
        np.save(path, (image if image is not None else text).numpy())
    elif suffix == ".npz":
        arrays = {k: v.numpy() for k, v in (("image", image), ("text", text)) if v is not None}
        np.savez(path, **arrays)
    else:
        out: dict = {}
        if image is not None:
            out.update(image_embeddings=image, image_paths=image_paths)
        if text is not None:
            out.update(text_embeddings=text, texts=texts)
        torch.save(out, path)


def _run_encode(args) -> int:
    from .models.tokenizer import tokenize

    texts = list(args.text or [])
    if args.text_file:
        try:
            with open(args.text_file, encoding="utf-8") as f:
                texts += [line.rstrip("\n") for line in f if line.strip()]
        except OSError as exc:
            raise CLIError(f"cannot read --text-file {args.text_file}: {exc}") from None
    if not args.images and not texts:
        raise CLIError("nothing to encode: give image files and/or --text STRING / --text-file FILE")
    out = Path(args.out)
    if out.suffix.lower() not in (".npy", ".npz", ".pt"):
        raise CLIError(f"--out must end in .npy, .npz or .pt, got {out.name!r}")
    if out.suffix.lower() == ".npy" and args.images and texts:
        raise CLIError("a .npy file holds one array: use .npz or .pt to save image and text embeddings together")
    model, device = load_model(args)
    image_emb = text_emb = None
    with torch.no_grad(), _autocast(args, device):
        if args.images:
            parts = [model.encode_image(batch.to(device), normalize=args.normalize).float().cpu()
                     for _, batch in _image_batches(args.images, args)]
            image_emb = torch.cat(parts)
        if texts:
            parts = [model.encode_text(tokenize(chunk, context_length=model.config.context_length).to(device),
                                       normalize=args.normalize).float().cpu()
                     for chunk in _batches(texts, args.batch_size)]
            text_emb = torch.cat(parts)
    _save_embeddings(out, image_emb, text_emb, list(args.images), texts)
    what = [f"{len(e)} {k}" for k, e in (("image", image_emb), ("text", text_emb)) if e is not None]
    dim = (image_emb if image_emb is not None else text_emb).shape[1]
    print(f"wrote {' and '.join(what)} embeddings (dim {dim}{', normalized' if args.normalize else ''}) to {out}")
    return 0


@register_command("encode")
def _build_encode(sub):
    p = sub.add_parser("encode", help="image and/or text embeddings to .npy/.npz/.pt",
                       description="Encode image files (official eval transform: resize 256 bicubic, center crop "
                                   "224) and/or texts into DINO.txt embeddings.")
    p.add_argument("images", nargs="*", help="image files")
    p.add_argument("--text", action="append", help="a text to encode (repeatable)")
    p.add_argument("--text-file", metavar="FILE", help="texts to encode, one per line")
    p.add_argument("--out", "-o", required=True, help="output file: .npy (one kind), .npz or .pt")
    p.add_argument("--normalize", action="store_true", help="L2-normalise the embeddings")
    _add_transform_args(p)
    _add_model_args(p)
    p.set_defaults(handler=_run_encode)
    return p


# ---------------------------------------------------------------------------------------------------- classify
def _run_classify(args) -> int:
    from .inference.zeroshot import ZeroShotClassifier

    if args.top_k < 1:
        raise CLIError(f"--top-k must be >= 1, got {args.top_k}")
    names = _read_classes(args)
    model, device = load_model(args)
    results = []
    with _autocast(args, device):
        clf = ZeroShotClassifier(model, names, templates=args.templates)
        for paths, batch in _image_batches(args.images, args):
            probs, idx = clf.topk(batch.to(device), k=args.top_k)
            for path, p_row, i_row in zip(paths, probs.tolist(), idx.tolist()):
                results.append({"image": path, "top": [{"class": names[i], "probability": p}
                                                       for p, i in zip(p_row, i_row)]})
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    width = max(len(names[i]) for i in range(len(names)))
    for r in results:
        print(r["image"])
        for rank, t in enumerate(r["top"], 1):
            print(f"  {rank:>3}  {t['class']:<{width}}  {100 * t['probability']:6.2f}%")
    return 0


@register_command("classify")
def _build_classify(sub):
    p = sub.add_parser("classify", help="zero-shot classification of image files",
                       description="Zero-shot classification: top-k classes per image, prompts template-averaged.")
    p.add_argument("images", nargs="+", help="image files")
    _add_class_args(p)
    p.add_argument("--top-k", type=int, default=5, help="classes to show per image (default 5)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _add_transform_args(p)
    _add_model_args(p)
    p.set_defaults(handler=_run_classify)
    return p


# ----------------------------------------------------------------------------------------------------- segment
def palette(n: int) -> list[tuple[int, int, int]]:
    """n distinct, deterministic RGB colours (golden-ratio hue steps, alternating saturation and value)."""
    colours = []
    for i in range(n):
        h = (i * 0.618033988749895) % 1.0
        s = 0.9 if i % 2 == 0 else 0.6
        v = 0.95 if (i // 2) % 2 == 0 else 0.75
        colours.append(tuple(int(round(255 * c)) for c in colorsys.hsv_to_rgb(h, s, v)))
    return colours


def render_overlay(image, labels: torch.Tensor, names: Sequence[str], alpha: float = 0.5):
    """RGB PIL image blended with the colourised label map, plus a legend of the classes present (by area)."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFont

    lab = labels.cpu().numpy()
    colours = np.array(palette(len(names)), dtype=np.float32)
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    blended = ((1 - alpha) * base + alpha * colours[lab]).round().clip(0, 255).astype(np.uint8)
    overlay = Image.fromarray(blended)

    counts = np.bincount(lab.reshape(-1), minlength=len(names))
    present = [int(c) for c in np.argsort(-counts, kind="stable") if counts[c] > 0]
    # Legend text scales with the image so it stays readable on large photos.
    font_size = max(11, overlay.height // 40)
    try:
        font = ImageFont.load_default(size=font_size)
    except (TypeError, ImportError, OSError):  # Pillow < 10.1 or without FreeType: the fixed bitmap font
        font, font_size = ImageFont.load_default(), 11
    lines = [f"{names[c]} ({100.0 * counts[c] / lab.size:.1f}%)" for c in present]
    row_h, swatch, pad = int(font_size * 1.6), font_size, font_size // 2 + 4
    text_w = max(int(ImageDraw.Draw(overlay).textlength(t, font=font)) for t in lines)
    legend_w = pad + swatch + 6 + text_w + pad
    height = max(overlay.height, pad + row_h * len(lines) + pad)
    canvas = Image.new("RGB", (overlay.width + legend_w, height), (255, 255, 255))
    canvas.paste(overlay, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for row, (c, text) in enumerate(zip(present, lines)):
        y = pad + row * row_h
        x = overlay.width + pad
        draw.rectangle([x, y + 2, x + swatch, y + 2 + swatch], fill=tuple(int(v) for v in colours[c]),
                       outline=(0, 0, 0))
        draw.text((x + swatch + 6, y), text, fill=(0, 0, 0), font=font)
    return canvas


def _save_labels_png(labels: torch.Tensor, path: Path, num_classes: int) -> None:
    import numpy as np
    from PIL import Image

    array = labels.cpu().numpy().astype(np.uint8 if num_classes <= 256 else np.uint16)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _short_side(text: str):
    if text.lower() == "none":
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'none', got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'none', got {text!r}")
    return value


def _run_segment(args) -> int:
    from .inference.images import load_image, load_label_mask, to_tensor
    from .inference.segmentation import mean_iou, segment

    if not 0.0 <= args.alpha <= 1.0:
        raise CLIError(f"--alpha must be in [0, 1], got {args.alpha}")
    names = _read_classes(args)
    check_weight_args(args)
    pil = load_image(args.image)
    target = None
    if args.gt:
        target = load_label_mask(args.gt)
        if tuple(target.shape) != (pil.height, pil.width):
            raise CLIError(f"--gt mask {args.gt} is {target.shape[1]}x{target.shape[0]} but the image is "
                           f"{pil.width}x{pil.height}")
    out = Path(args.out) if args.out else Path(f"{Path(args.image).stem}_segmentation.png")
    if out.suffix.lower() != ".png":
        raise CLIError(f"--out must be a .png file, got {out.name!r}")
    model, device = load_model(args)
    with _autocast(args, device):
        labels = segment(model, [to_tensor(pil)], names, mode=args.mode, short_side=args.short_side,
                         window=args.window, stride=args.stride, features=args.features,
                         templates=args.templates, batch_size=args.batch_size)[0]
    out.parent.mkdir(parents=True, exist_ok=True)
    render_overlay(pil, labels, names, alpha=args.alpha).save(out)
    print(f"wrote {out} ({pil.width}x{pil.height}, {len(names)} classes, mode {args.mode})")
    if args.labels_out:
        _save_labels_png(labels, Path(args.labels_out), len(names))
        print(f"wrote {args.labels_out} (label indices)")
    if target is not None:
        miou, per_class = mean_iou(labels, target, len(names), ignore_index=args.ignore_index)
        print(f"mIoU: {100 * miou:.2f}")
        for c, iou in enumerate(per_class.tolist()):
            if iou == iou:  # not NaN: the class occurs in the prediction or the mask
                print(f"  {names[c]}: {100 * iou:.2f}")
    return 0


@register_command("segment")
def _build_segment(sub):
    p = sub.add_parser("segment", help="open-vocabulary segmentation of an image into a PNG overlay",
                       description="Segment an image with the official DINO.txt protocol (short side 512, 384 "
                                   "windows at stride 192) and write a colourised overlay with a legend.")
    p.add_argument("image", help="image file")
    _add_class_args(p)
    p.add_argument("--out", "-o", help="overlay PNG (default: <image stem>_segmentation.png)")
    p.add_argument("--labels-out", metavar="PNG", help="also write the raw label map (pixel = class index)")
    p.add_argument("--gt", metavar="MASK", help="ground-truth label PNG (pixel = class index): print the mIoU")
    p.add_argument("--ignore-index", type=int, default=255, help="label ignored in --gt (default 255)")
    p.add_argument("--mode", choices=("slide", "whole"), default="slide", help="sliding windows or whole image")
    p.add_argument("--short-side", type=_short_side, default=512,
                   help="resize the short side to this before windowing, or 'none' (default 512)")
    p.add_argument("--window", type=int, default=384, help="window size (default 384)")
    p.add_argument("--stride", type=int, default=192, help="window stride (default 192)")
    p.add_argument("--features", choices=("head", "backbone"), default="head",
                   help="patch tokens of the vision head (default) or of the raw backbone")
    p.add_argument("--alpha", type=float, default=0.5, help="overlay opacity in [0, 1] (default 0.5)")
    p.add_argument("--batch-size", type=int, default=16, help="windows per forward pass (default 16)")
    _add_model_args(p)
    p.set_defaults(handler=_run_segment)
    return p


# ------------------------------------------------------------------------------------------------------- train
DEFAULT_TRAIN_CONFIG = "tiny"


def _run_train(args) -> int:
    from .train import ConfigError, TrainingStopped, load_config, train
    from .train.checkpoint import find_checkpoint

    config = args.config or DEFAULT_TRAIN_CONFIG
    if args.resume is not None and "=" in args.resume and not Path(args.resume).exists():
        # `--resume steps=10`: argparse gave the optional CKPT value the first override
        args.overrides.insert(0, args.resume)
        args.resume = "auto"
    try:
        cfg = load_config(config, args.overrides, preset=args.preset, data=args.data, steps=args.steps,
                          device=args.device)
    except ConfigError as exc:
        raise CLIError(str(exc)) from None
    out = Path(args.out or Path("runs") / Path(config).stem)
    if args.resume is None and (out / "checkpoints" / "last.pt").exists():
        raise CLIError(f"{out} already holds a run: pass --resume to continue it, or --out for a new directory")
    try:
        find_checkpoint(args.resume, out)
    except FileNotFoundError as exc:
        raise CLIError(str(exc)) from None
    try:
        summary = train(cfg, out, resume=args.resume, progress=not args.no_progress)
    except TrainingStopped as exc:
        print(f"{PROG} train: stopped: {exc}", file=sys.stderr)
        return 1
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary))
        print(f"outputs in {out}: config.yaml, metrics.jsonl, checkpoints/, plots/")
    return 0 if summary["status"] == "completed" else 128 + summary.get("signal", 0)


@register_command("train")
def _build_train(sub):
    p = sub.add_parser(
        "train", help="train the vision head and text tower on a frozen backbone (LiT)",
        description="Train DINO.txt's vision head and text tower on a frozen backbone. With no arguments: a small "
                    "model on the embedded synthetic set (a few minutes on a CPU). `--config official` is the "
                    "paper's recipe. Multi-GPU / multi-node: launch with torchrun "
                    "(torchrun --nproc_per_node=8 -m dinotxt_fast.cli train ...).",
        epilog="Overrides are KEY=VALUE pairs of the config (YAML values), e.g. batch_size=128 lr=1e-3 "
               "model.vision_dim=64 feature_cache=/tmp/cache.")
    p.add_argument("--config", help=f"YAML file or built-in config name: official, tiny (default: "
                                    f"{DEFAULT_TRAIN_CONFIG})")
    p.add_argument("--preset", help="model preset (overrides the config's)")
    p.add_argument("--data", help="data spec: synthetic[:N], shards '/d/x-{000..099}.tar', a .csv/.tsv file")
    p.add_argument("--steps", type=int, help="number of optimizer steps")
    p.add_argument("--out", help="run directory (default: runs/<config name>)")
    p.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CKPT",
                   help="resume from CKPT, or from <out>/checkpoints/last.pt when no path is given")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), help="default: cuda when available")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs still go to metrics.jsonl)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    p.set_defaults(handler=_run_train)
    return p


def _run_export(args) -> int:
    from .train.loop import load_trained_model

    model = load_trained_model(args.checkpoint)
    files = model.export_official(args.out)
    for name in files:
        print(f"wrote {Path(args.out) / (name + '.pth')}")
    return 0


@register_command("export")
def _build_export(sub):
    p = sub.add_parser("export", help="write a training checkpoint as official release files",
                       description="Write the model of a training checkpoint in the official file layout (DINOv2 "
                                   "release: backbone, vision_head, text_encoder; DINOv3: backbone, weights), "
                                   "loadable by the official hub code and by `load_official`.")
    p.add_argument("checkpoint", help="a training checkpoint (e.g. runs/tiny/checkpoints/last.pt)")
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(handler=_run_export)
    return p


# -------------------------------------------------------------------------------------------------------- bench
def _benchmarks_root() -> Path:
    """The source checkout holding benchmarks/ (next to this package when installed editable, or the current
    folder): the suite and its baselines live in the repository, not in the wheel."""
    for root in (Path(__file__).resolve().parents[1], Path.cwd()):
        if (root / "benchmarks" / "harness.py").is_file():
            return root
    raise CLIError("the benchmark suite lives in the source repository (benchmarks/ next to dinotxt_fast/): run "
                   "this from a checkout (git clone ...; pip install -e .), or cd into one")


def _run_bench(bench_args: Sequence[str]) -> int:
    root = _benchmarks_root()
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    from benchmarks.__main__ import main as bench_main

    return bench_main(list(bench_args))


@register_command("bench")
def _build_bench(sub):
    p = sub.add_parser("bench", help="run the benchmark suite (attention, contrastive, dense, train, infer, all)",
                       description="Run the benchmark suite of a source checkout: each benchmark against its "
                                   "baselines in the same run, JSON results, then REPORT.md and plots. Arguments "
                                   "are those of `python -m benchmarks`: [attention|contrastive|dense|train|infer|"
                                   "all ...] [--device cuda|cpu] [--quick] [--out DIR] [--no-report].",
                       add_help=False)
    p.add_argument("bench_args", nargs=argparse.REMAINDER, help="arguments of python -m benchmarks (-h for them)")
    p.set_defaults(handler=lambda args: _run_bench(args.bench_args))
    return p


# -------------------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Fast DINO.txt: kernels, inference and training.")
    parser.add_argument("--version", action="version", version=f"{PROG} {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for builder in COMMANDS.values():
        builder(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:  # every argument, -h included, belongs to the suite's own parser
        try:
            return _run_bench(argv[1:])
        except CLIError as exc:
            print(f"{PROG} bench: error: {exc}", file=sys.stderr)
            return 2
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # `train` takes KEY=VALUE overrides anywhere on the line, also after options (argparse alone would stop
    # collecting positionals at the first option).
    if getattr(args, "command", None) == "train":
        args.overrides += [e for e in extra if "=" in e and not e.startswith("-")]
        extra = [e for e in extra if not ("=" in e and not e.startswith("-"))]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if getattr(args, "handler", None) is None:
        parser.print_help()
        return 2
    from .ops import use_backend

    try:
        with use_backend(getattr(args, "backend", None)):  # every op the command runs (model, decoding)
            return int(args.handler(args) or 0)
    except CLIError as exc:
        print(f"{PROG} {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as exc:  # unreadable/corrupt files, bad shapes or weights: one clear line
        print(f"{PROG} {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
