"""`dinotxt-fast segment`: open-vocabulary segmentation of an image into a PNG overlay (and label map, mIoU)."""
from __future__ import annotations

from pathlib import Path

from .common import (
    CLIError, add_class_args, add_model_args, add_segmentation_protocol_args, check_weight_args, compute_autocast,
    load_model, read_classes,
)


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
    model, device = load_model(args)
    with compute_autocast(args, device):
        labels = segment(model, [to_tensor(pil)], names, mode=args.mode, short_side=args.short_side,
                         window=args.window, stride=args.stride, features=args.features,
                         templates=args.templates, batch_size=args.batch_size)[0]
    out.parent.mkdir(parents=True, exist_ok=True)
    render_overlay(pil, labels, names, alpha=args.alpha).save(out)
    print(f"wrote {out} ({pil.width}x{pil.height}, {len(names)} classes, mode {args.mode})")
    if args.labels_out:
        save_label_png(labels, Path(args.labels_out), len(names))
        print(f"wrote {args.labels_out} (label indices)")
    if target is not None:
        miou, per_class = mean_iou(labels, target, len(names), ignore_index=args.ignore_index)
        print(f"mIoU: {100 * miou:.2f}")
        for c, iou in enumerate(per_class.tolist()):
            if iou == iou:  # not NaN: the class occurs in the prediction or the mask
                print(f"  {names[c]}: {100 * iou:.2f}")
    return 0
