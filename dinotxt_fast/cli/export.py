"""`dinotxt-fast export`: a training checkpoint or a model folder as a model folder plus the official release files,
or as ONNX image and text encoders."""
from __future__ import annotations

from pathlib import Path

from .common import CLIError, positive_int

FORMATS = ("folder", "onnx")


def add_parser(sub):
    p = sub.add_parser("export", help="write a trained model as a model folder + official files, or as ONNX",
                       description="Write the model of a training checkpoint (or of a model folder). --format folder "
                                   "(default): the model folder (config.json + model.safetensors, loaded by "
                                   "`--model DIR` and dinotxt_fast.from_pretrained) and, beside it, the official "
                                   "file layout (DINOv2 release: backbone, vision_head, text_encoder; DINOv3: "
                                   "backbone, weights), loadable by the official hub code and by `load_official`. "
                                   "--format onnx: image_encoder.onnx and text_encoder.onnx, checked with "
                                   "onnxruntime (pip install 'dinotxt-fast[onnx]').")
    p.add_argument("source", metavar="CKPT_OR_DIR",
                   help="a training checkpoint (e.g. runs/tiny/checkpoints/last.pt) or a model folder")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--format", choices=FORMATS, default="folder", help="what to write (default: folder)")
    p.add_argument("--image-size", type=positive_int, metavar="N",
                   help="onnx: side of the example image traced (default 16 patches; the graph takes any multiple "
                        "of the patch size)")
    p.add_argument("--no-check", action="store_true", help="onnx: skip the onnxruntime comparison")
    return p


def _load(source: str):
    """The model of a model folder (a directory, or its config.json / model.safetensors) or of a training checkpoint."""
    from ..models.pretrained import CONFIG_NAME, WEIGHTS_NAME, from_pretrained
    from ..train.loop import load_trained_model

    path = Path(source)
    if path.is_dir() or path.name in (CONFIG_NAME, WEIGHTS_NAME):
        return from_pretrained(path)
    return load_trained_model(path)


def run(args) -> int:
    if args.format != "onnx" and (args.image_size is not None or args.no_check):
        raise CLIError("--image-size and --no-check apply to --format onnx")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {out} exists and is not a directory")
    model = _load(args.source)
    if args.format == "onnx":
        return _export_onnx(model, out, args)
    files = model.export_official(out)
    model.save_pretrained(out)
    from ..models.pretrained import CONFIG_NAME, WEIGHTS_NAME

    for path in [out / f"{name}.pth" for name in files] + [out / CONFIG_NAME, out / WEIGHTS_NAME]:
        print(f"wrote {path}")
    print(f"load it with --model {out} (or dinotxt_fast.from_pretrained({str(out)!r}))")
    return 0


def _export_onnx(model, out: Path, args) -> int:
    from ..models.onnx_export import CHECK_RTOL, export_onnx

    try:  # float32: onnxruntime's CPU kernels (a no-op for the models the trainer writes)
        files = export_onnx(model.float(), out, image_size=args.image_size, check=not args.no_check)
    except ImportError as exc:  # onnx / onnxscript / onnxruntime missing: say which extra to install
        text = str(exc).replace("check=False", "--no-check")
        hint = "" if "dinotxt-fast[onnx]" in text else " (pip install 'dinotxt-fast[onnx]')"
        raise CLIError(f"{text}{hint}") from None
    print(f"wrote {files['image_encoder']}")
    print(f"wrote {files['text_encoder']}")
    errors = files.get("max_relative_error")
    if errors:
        worst = max(errors, key=errors.get)
        print(f"onnxruntime check passed: max relative error {errors[worst]:.2e} ({worst}; tolerance {CHECK_RTOL:g})")
    return 0
