"""Class names of the standard benchmarks, vendored as data files next to this module (each file's header says
where its list comes from). Lines starting with '#' are comments; every other line is one class, in label order."""
from __future__ import annotations

import functools
from importlib import resources

# benchmark -> (file, first line kept): VOC20 / Context59 are VOC21 / Context60 without background (line 0).
SEGMENTATION_CLASSES = {
    "ade20k": ("ade20k.txt", 0),
    "cityscapes": ("cityscapes.txt", 0),
    "voc20": ("voc.txt", 1),
    "voc21": ("voc.txt", 0),
    "context59": ("pascal_context.txt", 1),
    "context60": ("pascal_context.txt", 0),
    "coco-stuff": ("coco_stuff.txt", 0),
}


@functools.lru_cache(maxsize=None)
def _lines(filename: str) -> tuple[str, ...]:
    text = resources.files(__name__).joinpath(filename).read_text(encoding="utf-8")
    return tuple(line for line in text.splitlines() if line and not line.startswith("#"))


def segmentation_class_names(dataset: str) -> list[str]:
    """The class names of a segmentation benchmark (SEGMENTATION_CLASSES keys), in label order."""
    if dataset not in SEGMENTATION_CLASSES:
        raise ValueError(f"unknown segmentation benchmark {dataset!r}; known: {sorted(SEGMENTATION_CLASSES)}")
    filename, first = SEGMENTATION_CLASSES[dataset]
    return list(_lines(filename)[first:])


def imagenet_classes() -> tuple[list[str], list[str]]:
    """(wnids, CLIP class names) of ImageNet-1k, both in class-index order (the wnids sorted)."""
    rows = [line.split("\t") for line in _lines("imagenet.tsv")]
    return [r[0] for r in rows], [r[1] for r in rows]


def imagenet_subset_wnids(subset: str) -> list[str]:
    """The 200 class folders (wnids, ImageNet-1k order) of "imagenet-a" or "imagenet-r"."""
    files = {"imagenet-a": "imagenet_a.txt", "imagenet-r": "imagenet_r.txt"}
    if subset not in files:
        raise ValueError(f"unknown ImageNet subset {subset!r}; known: {sorted(files)}")
    return list(_lines(files[subset]))


__all__ = ["SEGMENTATION_CLASSES", "segmentation_class_names", "imagenet_classes", "imagenet_subset_wnids"]
