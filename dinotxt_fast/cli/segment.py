"""`dinotxt-fast segment`: open-vocabulary segmentation of an image into a PNG overlay (and label map, mIoU)."""
from __future__ import annotations

import math
from pathlib import Path

from .common import (
    CLIError, add_class_args, add_model_args, add_progress_arg, add_segmentation_protocol_args, check_weight_args,
    compute_autocast, load_model, positive_float, read_classes,
)

DEFAULT_MAX_CANVAS = 16.0  # megapixels: a 4:1 panorama at short side 512 is 1 MP, a 24 MP photo at full size is not


def add_parser(sub):
    p = sub.add_parser("segment", help="open-vocabulary segmentation of an image into a PNG overlay",
                       description="Segment an image with the official DINO.txt protocol (short side 512, 384 "
                                   "windows at stride 192) and write a colourised overlay with a legend.")
    p.add_argument("image", help="image file")
    add_class_args(p)
    p.add_argument("--out", "-o", help="overlay PNG (default: <image stem>_segmentation.png)")
    p.add_argument("--labels-out", metavar="PNG", help="also write the raw label map (pixel = class index)")
    p.add_argument("--gt", metavar="MASK", help="ground-truth label PNG (pixel = class index): print the mIoU")
    p.add_argument("--ignore-index", type=int, default=255, help="label ignored in --gt (default 255)")
    add_segmentation_protocol_args(p)
    p.add_argument("--alpha", type=float, default=0.5, help="overlay opacity in [0, 1] (default 0.5)")
    p.add_argument("--batch-size", type=int, default=16, help="windows per forward pass (default 16)")
    p.add_argument("--max-canvas", type=positive_float, default=DEFAULT_MAX_CANVAS, metavar="MPIX",
                   help="refuse an image whose resized canvas (after --short-side) exceeds this many megapixels "
                        f"(default {DEFAULT_MAX_CANVAS:g}): an extreme aspect ratio or --short-side none on a large "
                        "photo means thousands of windows")
    add_progress_arg(p)
    add_model_args(p)
    return p


def run(args) -> int:
    from ..inference.images import load_image, load_label_mask, to_tensor
    from ..inference.overlay import render_overlay, save_label_png
    from ..inference.segmentation import mean_iou, segment

    if not 0.0 <= args.alpha <= 1.0:
        raise CLIError(f"--alpha must be in [0, 1], got {args.alpha}")
    names = read_classes(args)
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
    max_pixels = check_canvas(args, pil.width, pil.height)
    model, device = load_model(args)
    with compute_autocast(args, device):
        labels = segment(model, [to_tensor(pil)], names, mode=args.mode, short_side=args.short_side,
                         window=args.window, stride=args.stride, features=args.features,
                         templates=args.templates, batch_size=args.batch_size, max_canvas_pixels=max_pixels,
                         progress=False if args.no_progress else None)[0]
    out.parent.mkdir(parents=True, exist_ok=True)
    render_overlay(pil, labels, names, alpha=args.alpha).save(out)
    print(f"wrote {out} ({pil.width}x{pil.height}, {len(names)} classes, mode {args.mode})")
    if args.labels_out:
        save_label_png(labels, Path(args.labels_out), len(names))
        print(f"wrote {args.labels_out} (label indices)")
    if target is not None:
        miou, per_class = mean_iou(labels, target, len(names), ignore_index=args.ignore_index)
        print(f"mIoU: {100 * miou:.2f}%")
        for c, iou in enumerate(per_class.tolist()):
            if iou == iou:  # not NaN: the class occurs in the prediction or the mask
                print(f"  {names[c]}: {100 * iou:.2f}%")
    return 0


def check_canvas(args, width: int, height: int) -> int:
    """The --max-canvas limit in pixels, after refusing (before the model is built) an image whose resized canvas
    exceeds it; the message gives the canvas, its window count and the option that allows it."""
    from ..inference.segmentation import short_side_size, sliding_window_boxes

    limit = int(args.max_canvas * 1e6)
    canvas_h, canvas_w = short_side_size(height, width, args.short_side)
    if canvas_h * canvas_w <= limit:
        return limit
    megapixels = canvas_h * canvas_w / 1e6
    windows = (f", {len(sliding_window_boxes(canvas_h, canvas_w, args.window, args.stride))} windows of "
               f"{args.window} px" if args.mode == "slide" else ", encoded as one window")
    raise CLIError(f"{args.image} ({width}x{height}) would be resized to a {canvas_w}x{canvas_h} canvas "
                   f"({megapixels:.1f} megapixels{windows}), above --max-canvas {args.max_canvas:g}: pass "
                   f"--max-canvas {math.ceil(megapixels * 10) / 10:g} to segment it anyway, or a smaller --short-side")
