"""`dinotxt-fast classify`: zero-shot top-k classes per image file, as a table or JSON."""
from __future__ import annotations

import json

from .common import (
    CLIError, add_class_args, add_model_args, add_progress_arg, add_transform_args, check_image_files,
    check_weight_args, compute_autocast, image_batches, load_model, read_classes,
)


def add_parser(sub):
    p = sub.add_parser("classify", help="zero-shot classification of image files",
                       description="Zero-shot classification: top-k classes per image, prompts template-averaged.")
    p.add_argument("images", nargs="+", help="image files")
    add_class_args(p)
    p.add_argument("--top-k", type=int, default=5, help="classes to show per image (default 5)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_progress_arg(p)
    add_transform_args(p)
    add_model_args(p)
    return p


def run(args) -> int:
    from ..inference.zeroshot import ZeroShotClassifier

    if args.top_k < 1:
        raise CLIError(f"--top-k must be >= 1, got {args.top_k}")
    names = read_classes(args)
    check_weight_args(args)  # every input file checked before the model is built
    check_image_files(args.images)
    model, device = load_model(args)
    results = []
    with compute_autocast(args, device):
        clf = ZeroShotClassifier(model, names, templates=args.templates,
                                 progress=False if args.no_progress else None)
        for paths, batch in image_batches(args.images, args):
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
