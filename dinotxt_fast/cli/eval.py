"""`dinotxt-fast eval {segmentation,zeroshot,retrieval}`: a benchmark in its standard layout -> one JSON file
(--out), a Markdown table beside it and a console summary (dinotxt_fast.evaluate does the work)."""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from .common import (CLIError, add_model_args, add_segmentation_protocol_args, check_weight_args, load_model,
                     model_preset, positive_int)


def _common(p: argparse.ArgumentParser, datasets, batch_size: int) -> None:
    p.add_argument("--dataset", required=True, choices=datasets, help="benchmark")
    p.add_argument("--root", required=True, metavar="DIR", help="the benchmark's folder, in its standard layout")
    p.add_argument("--split", help="split folder / file name (default: the benchmark's validation or test split)")
    p.add_argument("--limit", type=positive_int, metavar="N", help="evaluate the first N images only")
    p.add_argument("--batch-size", type=positive_int, default=batch_size,
                   help=f"images (segmentation: windows) per forward pass (default {batch_size})")
    p.add_argument("--workers", type=int, metavar="N", help="image-decoding workers (default: cores - 1, at most 8)")
    p.add_argument("--out", "-o", metavar="FILE.json", help="result file (default: <dataset>_<task>.json)")
    p.add_argument("--markdown", metavar="FILE.md", help="Markdown table (default: the --out path with .md)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_model_args(p)


def _templates(p: argparse.ArgumentParser) -> None:
    p.add_argument("--templates", choices=("imagenet", "simple", "none"), default="imagenet",
                   help="prompt templates averaged per class: the 80 CLIP ones (default), the 7-prompt subset, "
                        "or none (the class name itself)")


def _preprocessing(p: argparse.ArgumentParser) -> None:
    p.add_argument("--resize", type=positive_int, help="short side before the centre crop (default: the release's: "
                                                    "256 for DINOv2 dino.txt, 512 for DINOv3)")
    p.add_argument("--crop", type=positive_int, help="centre crop (default: 224 for DINOv2 dino.txt, 512 for DINOv3)")


def add_parser(sub):
    from ..evaluate import RETRIEVAL_DATASETS, SEGMENTATION_DATASETS, ZEROSHOT_DATASETS

    p = sub.add_parser("eval", help="reproduce the paper's benchmarks (segmentation, zero-shot, retrieval)",
                       description="Evaluate on a standard benchmark read in its standard on-disk layout; write one "
                                   "JSON file (metrics as fractions), a Markdown table and a console summary.")
    tasks = p.add_subparsers(dest="task", metavar="TASK", required=True)

    seg = tasks.add_parser("segmentation", help="open-vocabulary segmentation mIoU (official slide protocol)",
                           description="mIoU over one confusion matrix (mmsegmentation's definition). Layouts: "
                                       "ADEChallengeData2016, cityscapes (leftImg8bit + gtFine), VOCdevkit/VOC2012, "
                                       "VOCdevkit/VOC2010 (SegmentationClassContext), coco_stuff164k.")
    _common(seg, SEGMENTATION_DATASETS, 16)
    seg.add_argument("--classes-file", metavar="FILE", help="class names replacing the vendored ones, one per line")
    _templates(seg)
    add_segmentation_protocol_args(seg)
    seg.add_argument("--background-threshold", type=float, metavar="T",
                     help="voc21 / context60: pixels whose winning score is below T become background")

    zs = tasks.add_parser("zeroshot", help="zero-shot classification top-1 / top-5",
                          description="ImageNet-1k val in its class-folder layout (val/n01440764/*.JPEG), the "
                                      "200-class ImageNet-A / ImageNet-R, or any folder of class folders.")
    _common(zs, ZEROSHOT_DATASETS, 64)
    zs.add_argument("--classes-file", metavar="FILE",
                    help="imagefolder: class names, one per class folder in sorted folder order")
    _templates(zs)
    _preprocessing(zs)

    ret = tasks.add_parser("retrieval", help="image-text retrieval recall@1/5/10 (Karpathy split)",
                           description="COCO / Flickr30k: --root holds the images (COCO: val2014/...; Flickr30k: "
                                       "flickr30k-images/...) and, unless --annotations, the Karpathy split file.")
    _common(ret, RETRIEVAL_DATASETS, 64)
    ret.add_argument("--annotations", metavar="FILE", help="dataset_coco.json / dataset_flickr30k.json")
    ret.add_argument("--captions-per-image", type=positive_int, default=5, help="captions kept per image (default 5)")
    _preprocessing(ret)
    return p


def _class_names(path):
    from ..evaluate.files import read_lines

    return None if path is None else read_lines(path, "--classes-file")


def _dataset(args):
    from .. import evaluate as ev

    if args.task == "segmentation":
        return ev.segmentation_dataset(args.dataset, args.root, args.split, class_names=_class_names(args.classes_file))
    if args.task == "zeroshot":
        return ev.zeroshot_dataset(args.dataset, args.root, args.split or "val", _class_names(args.classes_file))
    return ev.karpathy_dataset(args.dataset, args.root, args.split or "test", annotations=args.annotations,
                               captions_per_image=args.captions_per_image)


def run(args) -> int:
    from .. import evaluate as ev

    if args.workers is not None and args.workers < 0:
        raise CLIError(f"--workers must be >= 0, got {args.workers}")
    out = Path(args.out or f"{args.dataset}_{args.task}.json")
    if out.suffix.lower() != ".json":
        raise CLIError(f"--out must be a .json file, got {out.name!r}")
    files = check_weight_args(args)  # every weight file (or the model folder) checked before anything is built
    dataset = _dataset(args)  # layout problems surface before the model is loaded
    model, device = load_model(args)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    preset = getattr(model, "preset", None) if args.model else model_preset(args)
    info = ev.describe_model(model, preset=preset, files=files)  # sha256 of each file
    shared = dict(batch_size=args.batch_size, limit=args.limit, num_workers=args.workers, dtype=dtype,
                  progress=False if args.no_progress else None, model_info=info)
    if args.task == "segmentation":
        result = ev.evaluate_segmentation(
            model, dataset, mode=args.mode, short_side=args.short_side, window=args.window, stride=args.stride,
            features=args.features, templates=args.templates, background_threshold=args.background_threshold,
            backend=None if args.backend in (None, "auto") else args.backend, **shared)
    elif args.task == "zeroshot":
        result = ev.evaluate_zeroshot(model, dataset, templates=args.templates, resize=args.resize, crop=args.crop,
                                      **shared)
    else:
        result = ev.evaluate_retrieval(model, dataset, resize=args.resize, crop=args.crop, **shared)
    json_path, md_path = ev.write_report(result, out, args.markdown)
    print(ev.summary(result))
    print(f"wrote {json_path} and {md_path}")
    return 0
