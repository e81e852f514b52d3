"""Semantic segmentation benchmarks in their standard on-disk layouts (as distributed, or as mmsegmentation's
converters write them), each mapped to class indices 0..C-1 with 255 = ignored:

| name        | layout under --root (the folder in brackets may be included or not)            | labels        |
| ----------- | ------------------------------------------------------------------------------ | ------------- |
| ade20k      | [ADEChallengeData2016/]{images,annotations}/<split: validation>/*.jpg / *.png   | 0 ignored, 1..150 -> 0..149 |
| cityscapes  | [cityscapes/]leftImg8bit/<split: val>/<city>/*_leftImg8bit.png and gtFine/<split>/<city>/*_gtFine_labelTrainIds.png (or *_gtFine_labelIds.png, mapped to the 19 train ids) | 19 classes |
| voc21/voc20 | [VOCdevkit/VOC2012/]JPEGImages, SegmentationClass (palette PNGs), ImageSets/Segmentation/<split: val>.txt | 255 ignored; VOC21 scores background (0), VOC20 ignores it and maps 1..20 -> 0..19 |
| context60/59| [VOCdevkit/VOC2010/]JPEGImages, SegmentationClassContext, ImageSets/SegmentationContext/<split: val>.txt (mmseg's pascal_context converter) | 0 = background; Context59 ignores it |
| coco-stuff  | [coco_stuff164k/]images/<split: val2017>/*.jpg and annotations/<split>/*_labelTrainIds.png | 0..170, 255 ignored |

An item is {"image": uint8 RGB [3, H, W], "target": int64 [H, W], "name": str} at the image's own size (`image_input`
makes the model input on the device: 4x less host memory and transfer than float); a file problem comes back as a
LoadFailure (see files.py) naming the file.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch

from .classnames import segmentation_class_names
from .files import DatasetError, LoadFailure, check_exists, find_base, head_view, list_images, read_split_file

IGNORE_INDEX = 255

# cityscapesScripts helpers/labels.py: label id 0..33 -> train id (255 = not evaluated).
CITYSCAPES_ID_TO_TRAIN_ID = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11,
                             25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}


def _lut(mapping: dict[int, int], size: int = 256) -> np.ndarray:
    """Raw annotation value -> class index / IGNORE_INDEX; -1 marks values that must not occur."""
    table = np.full(size, -1, dtype=np.int64)
    for raw, label in mapping.items():
        table[raw] = label
    return table


def _identity(num_classes: int) -> dict[int, int]:
    return {**{c: c for c in range(num_classes)}, IGNORE_INDEX: IGNORE_INDEX}


def _zero_ignored(num_classes: int) -> dict[int, int]:
    """mmseg's reduce_zero_label: 0 -> ignored, k -> k - 1 (and 255 stays ignored)."""
    return {0: IGNORE_INDEX, **{c + 1: c for c in range(num_classes)}, IGNORE_INDEX: IGNORE_INDEX}


@dataclass(frozen=True)
class SegmentationSample:
    image: Path
    annotation: Path
    encoding: str  # key of SegmentationDataset.encodings: how the annotation's values map to classes


class SegmentationDataset(torch.utils.data.Dataset):
    """Image/annotation pairs of one benchmark split; see the module docstring for the layouts."""

    def __init__(self, benchmark: str, root: Path, split: str, class_names: Sequence[str],
                 samples: Sequence[SegmentationSample], encodings: dict[str, tuple[np.ndarray, str]]):
        if not samples:
            raise DatasetError(f"{benchmark}: no images found for split {split!r} under {root}")
        self.benchmark, self.root, self.split = benchmark, root, split
        self.class_names = list(class_names)
        self.samples = list(samples)
        self.encodings = encodings  # name -> (lookup table, description of the valid values)
        self.ignore_index = IGNORE_INDEX

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.samples)

    def head(self, n: Optional[int]) -> "SegmentationDataset":
        """The first n samples (all for None), e.g. for --limit."""
        return head_view(self, n, ("samples",))

    def __getitem__(self, index: int) -> Union[dict, LoadFailure]:
        from ..inference.images import load_image, load_label_mask

        sample = self.samples[index]
        try:
            image = load_image(sample.image)
            raw = load_label_mask(sample.annotation).numpy()
        except (OSError, ValueError) as exc:
            return LoadFailure(f"{self.benchmark}: {exc}")
        if raw.shape != (image.height, image.width):
            return LoadFailure(f"{self.benchmark}: annotation {sample.annotation} is {raw.shape[1]}x{raw.shape[0]} "
                               f"but its image {sample.image} is {image.width}x{image.height}")
        table, valid = self.encodings[sample.encoding]
        bad = np.unique(raw[(raw < 0) | (raw >= len(table))])
        if not bad.size:
            target = table[raw]
            bad = np.unique(raw[target < 0])
        if bad.size:
            shown = ", ".join(str(v) for v in bad[:8]) + (", ..." if bad.size > 8 else "")
            return LoadFailure(f"{self.benchmark}: annotation {sample.annotation} has label value(s) {shown} "
                               f"outside the valid values ({valid})")
        rgb = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()
        return {"image": rgb, "target": torch.from_numpy(target), "name": sample.image.stem}


def image_input(image: torch.Tensor, device=None) -> torch.Tensor:
    """A dataset item's uint8 [3, H, W] image -> the ImageNet-normalised float32 [3, H, W] that `segment` takes, on
    `device` (the same values as inference.images.to_tensor)."""
    from ..inference.images import normalize_tensor

    return normalize_tensor(image.to(device, non_blocking=True).float().div_(255.0))


def _paired(benchmark: str, images: Sequence[Path], annotation_of, encoding: str = "default"):
    samples = []
    for image in images:
        annotation = annotation_of(image)
        if not annotation.is_file():
            raise DatasetError(f"{benchmark}: image {image} has no annotation {annotation}")
        samples.append(SegmentationSample(image, annotation, encoding))
    return samples


def _ade20k(root, split: str):
    base = find_base("ade20k", root, ["", "ADEChallengeData2016"],
                     [f"images/{split}", f"annotations/{split}"],
                     "ADEChallengeData2016/{images,annotations}/" + split)
    ann = base / "annotations" / split
    samples = _paired("ade20k", list_images(base / "images" / split, (".jpg", ".jpeg")),
                      lambda p: ann / (p.stem + ".png"))
    return base, samples, {"default": (_lut(_zero_ignored(150)), "0 = ignored, 1..150 = classes, 255 = ignored")}


def _cityscapes(root, split: str):
    base = find_base("cityscapes", root, ["", "cityscapes"], [f"leftImg8bit/{split}", f"gtFine/{split}"],
                     "cityscapes/{leftImg8bit,gtFine}/" + split + "/<city>/")
    suffix = "_leftImg8bit.png"
    samples = []
    for image in list_images(base / "leftImg8bit" / split, (".png",), recursive=True):
        if not image.name.endswith(suffix):
            continue
        stem = image.name[:-len(suffix)]
        ann_dir = base / "gtFine" / split / image.parent.name
        train_ids, label_ids = ann_dir / f"{stem}_gtFine_labelTrainIds.png", ann_dir / f"{stem}_gtFine_labelIds.png"
        if train_ids.is_file():
            samples.append(SegmentationSample(image, train_ids, "train_ids"))
        elif label_ids.is_file():
            samples.append(SegmentationSample(image, label_ids, "label_ids"))
        else:
            raise DatasetError(f"cityscapes: image {image} has no annotation {train_ids} (nor {label_ids.name})")
    label_ids = {i: CITYSCAPES_ID_TO_TRAIN_ID.get(i, IGNORE_INDEX) for i in range(34)}
    label_ids[IGNORE_INDEX] = IGNORE_INDEX
    return base, samples, {
        "train_ids": (_lut(_identity(19)), "train ids 0..18, 255 = ignored"),
        "label_ids": (_lut(label_ids), "label ids 0..33 (cityscapesScripts), 255 = ignored"),
    }


def _pascal(benchmark: str, root, split: str, year: str, ann_folder: str, split_folder: str, mapping, valid: str):
    base = find_base(benchmark, root, ["", f"VOC{year}", f"VOCdevkit/VOC{year}"],
                     ["JPEGImages", ann_folder, f"ImageSets/{split_folder}/{split}.txt"],
                     f"VOCdevkit/VOC{year}/{{JPEGImages,{ann_folder},ImageSets/{split_folder}/{split}.txt}}")
    ids = read_split_file(benchmark, base / "ImageSets" / split_folder / f"{split}.txt")
    images = [check_exists(benchmark, base / "JPEGImages" / f"{i}.jpg", f"image {i!r} of {split}.txt") for i in ids]
    samples = _paired(benchmark, images, lambda p: base / ann_folder / (p.stem + ".png"))
    return base, samples, {"default": (_lut(mapping), valid)}


def _coco_stuff(root, split: str):
    base = find_base("coco-stuff", root, ["", "coco_stuff164k"], [f"images/{split}", f"annotations/{split}"],
                     "coco_stuff164k/{images,annotations}/" + split + " (mmseg's coco_stuff164k converter)")
    ann = base / "annotations" / split
    samples = _paired("coco-stuff", list_images(base / "images" / split, (".jpg", ".jpeg", ".png")),
                      lambda p: ann / (p.stem + "_labelTrainIds.png"))
    return base, samples, {"default": (_lut(_identity(171)), "train ids 0..170, 255 = ignored")}


DEFAULT_SPLITS = {"ade20k": "validation", "cityscapes": "val", "voc20": "val", "voc21": "val", "context59": "val",
                  "context60": "val", "coco-stuff": "val2017"}
SEGMENTATION_DATASETS = tuple(DEFAULT_SPLITS)


def segmentation_dataset(name: str, root, split: Optional[str] = None,
                         class_names: Optional[Sequence[str]] = None) -> SegmentationDataset:
    """One of SEGMENTATION_DATASETS read from `root` in its standard layout (module docstring); `class_names`
    replaces the vendored names (same count, same order)."""
    if name not in DEFAULT_SPLITS:
        raise ValueError(f"unknown segmentation dataset {name!r}; choose from {', '.join(SEGMENTATION_DATASETS)}")
    split = split or DEFAULT_SPLITS[name]
    if name == "ade20k":
        base, samples, encodings = _ade20k(root, split)
    elif name == "cityscapes":
        base, samples, encodings = _cityscapes(root, split)
    elif name in ("voc20", "voc21"):
        mapping = _zero_ignored(20) if name == "voc20" else _identity(21)
        valid = "0 = background, 1..20 = classes, 255 = ignored (border)"
        base, samples, encodings = _pascal(name, root, split, "2012", "SegmentationClass", "Segmentation", mapping,
                                           valid)
    elif name in ("context59", "context60"):
        mapping = _zero_ignored(59) if name == "context59" else _identity(60)
        base, samples, encodings = _pascal(name, root, split, "2010", "SegmentationClassContext",
                                           "SegmentationContext", mapping, "0 = background, 1..59 = classes")
    else:
        base, samples, encodings = _coco_stuff(root, split)
    names = segmentation_class_names(name)
    if class_names is not None:
        if len(class_names) != len(names):
            raise ValueError(f"{name} has {len(names)} classes but {len(class_names)} class names were given")
        names = list(class_names)
    return SegmentationDataset(name, base, split, names, samples, encodings)


__all__ = ["SegmentationDataset", "SegmentationSample", "segmentation_dataset", "image_input", "SEGMENTATION_DATASETS",
           "DEFAULT_SPLITS", "IGNORE_INDEX", "CITYSCAPES_ID_TO_TRAIN_ID"]
