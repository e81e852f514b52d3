"""Tiny benchmarks written on the fly in each standard on-disk layout, with the ground truth the evaluation must
read back (class indices, 255 = ignored), computed here independently of the package's label mappings."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

# Images of different sizes and orientations: landscape, portrait, square.
SIZES = [(40, 56), (56, 40), (48, 48)]


def voc_palette() -> list[int]:
    """The Pascal VOC colour map (bit-interleaved class index), as the VOC PNGs carry it."""
    palette = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette += [r, g, b]
    return palette


def save_rgb(path: Path, h: int, w: int, rng) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)


def save_mask(path: Path, raw: np.ndarray, palette: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(raw.astype(np.uint8))
    if palette:
        img.putpalette(voc_palette())  # an "L" image becomes "P" with the same indices
    img.save(path)


def _raw(rng, h, w, values, border=False):
    raw = rng.choice(np.asarray(values), size=(h, w)).astype(np.int64)
    if border:  # VOC's 255 object borders
        raw[0, :] = 255
        raw[:, -1] = 255
    return raw


def ade20k(root: Path, rng) -> list[np.ndarray]:
    """ADEChallengeData2016/{images,annotations}/validation; raw 0 ignored, 1..150 -> 0..149."""
    base = root / "ADEChallengeData2016"
    targets = []
    for i, (h, w) in enumerate(SIZES):
        name = f"ADE_val_{i + 1:08d}"
        save_rgb(base / "images" / "validation" / f"{name}.jpg", h, w, rng)
        raw = _raw(rng, h, w, [0, 1, 2, 3, 150])
        save_mask(base / "annotations" / "validation" / f"{name}.png", raw)
        targets.append(np.where(raw == 0, 255, raw - 1))
    return targets


# cityscapesScripts labels.py, written out here a second time on purpose (label id -> train id).
_CITYSCAPES = {0: 255, 1: 255, 4: 255, 7: 0, 8: 1, 11: 2, 17: 5, 21: 8, 23: 10, 24: 11, 26: 13, 33: 18}


def cityscapes(root: Path, rng) -> list[np.ndarray]:
    """leftImg8bit/val/<city>/ + gtFine/val/<city>/: one city with *_labelIds.png, one with *_labelTrainIds.png."""
    base = root / "cityscapes"
    targets = []
    plan = [("aachen", "labelIds"), ("aachen", "labelIds"), ("bremen", "labelTrainIds")]
    for i, ((h, w), (city, kind)) in enumerate(zip(SIZES, plan)):
        stem = f"{city}_{i:06d}_000019"
        save_rgb(base / "leftImg8bit" / "val" / city / f"{stem}_leftImg8bit.png", h, w, rng)
        if kind == "labelIds":
            raw = _raw(rng, h, w, list(_CITYSCAPES))
            target = np.vectorize(_CITYSCAPES.get)(raw)
        else:
            raw = _raw(rng, h, w, [0, 1, 5, 18, 255])
            target = raw
        save_mask(base / "gtFine" / "val" / city / f"{stem}_gtFine_{kind}.png", raw)
        targets.append(target)
    return targets


def _pascal(base: Path, rng, prefix: str, ann_folder: str, split_folder: str, values, background: bool,
            border: bool, palette: bool) -> list[np.ndarray]:
    ids, targets = [], []
    for i, (h, w) in enumerate(SIZES):
        image_id = f"{prefix}_{i:06d}"
        ids.append(image_id)
        save_rgb(base / "JPEGImages" / f"{image_id}.jpg", h, w, rng)
        raw = _raw(rng, h, w, values, border=border)
        save_mask(base / ann_folder / f"{image_id}.png", raw, palette=palette)
        targets.append(raw if background else np.where((raw == 0) | (raw == 255), 255, raw - 1))
    split = base / "ImageSets" / split_folder / "val.txt"
    split.parent.mkdir(parents=True, exist_ok=True)
    split.write_text("\n".join(ids) + "\n")
    return targets


def voc(root: Path, rng, background: bool) -> list[np.ndarray]:
    """VOCdevkit/VOC2012 with palette PNGs and 255 borders; VOC21 keeps 0 (background), VOC20 ignores it."""
    return _pascal(root / "VOCdevkit" / "VOC2012", rng, "2007", "SegmentationClass", "Segmentation",
                   [0, 1, 7, 15, 20], background, border=True, palette=True)


def context(root: Path, rng, background: bool) -> list[np.ndarray]:
    """VOCdevkit/VOC2010 in mmseg's pascal_context layout (SegmentationClassContext, labels 0..59)."""
    return _pascal(root / "VOCdevkit" / "VOC2010", rng, "2008", "SegmentationClassContext", "SegmentationContext",
                   [0, 1, 30, 59], background, border=False, palette=False)


def coco_stuff(root: Path, rng) -> list[np.ndarray]:
    """coco_stuff164k/{images,annotations}/val2017, *_labelTrainIds.png with 0..170 and 255."""
    base = root / "coco_stuff164k"
    targets = []
    for i, (h, w) in enumerate(SIZES):
        stem = f"{i + 139:012d}"
        save_rgb(base / "images" / "val2017" / f"{stem}.jpg", h, w, rng)
        raw = _raw(rng, h, w, [0, 40, 170, 255])
        save_mask(base / "annotations" / "val2017" / f"{stem}_labelTrainIds.png", raw)
        targets.append(raw)
    return targets


def write_segmentation(name: str, root: Path, seed: int = 0) -> list[np.ndarray]:
    """Write benchmark `name` under `root`; returns the expected targets in dataset order."""
    rng = np.random.default_rng(seed)
    if name == "ade20k":
        return ade20k(root, rng)
    if name == "cityscapes":
        return cityscapes(root, rng)
    if name in ("voc20", "voc21"):
        return voc(root, rng, background=name == "voc21")
    if name in ("context59", "context60"):
        return context(root, rng, background=name == "context60")
    return coco_stuff(root, rng)


def class_folders(root: Path, folders: list[str], per_class: int = 2, seed: int = 0, suffix: str = ".JPEG"):
    """<root>/<folder>/<k><suffix> images of different sizes; returns [(path, folder)] in sorted order."""
    rng = np.random.default_rng(seed)
    out = []
    for folder in sorted(folders):
        for k in range(per_class):
            h, w = SIZES[k % len(SIZES)]
            path = root / folder / f"{folder}_{k}{suffix}"
            save_rgb(path, h * 2, w * 2, rng)
            out.append((path, folder))
    return out


def karpathy(root: Path, name: str, seed: int = 0, num_images: int = 4, captions: int = 5) -> Path:
    """A Karpathy split file with `num_images` test images (+ one train image) and their images."""
    rng = np.random.default_rng(seed)
    words = ["dog", "cat", "car", "tree", "boat", "bird", "house", "road"]
    entries = []
    for i in range(num_images + 1):
        split = "test" if i < num_images else "train"
        if name == "coco":
            entry = {"filepath": "val2014", "filename": f"COCO_val2014_{i:012d}.jpg"}
            image = root / "val2014" / entry["filename"]
        else:
            entry = {"filename": f"{1000 + i}.jpg"}
            image = root / "flickr30k-images" / entry["filename"]
        save_rgb(image, *SIZES[i % len(SIZES)], rng)
        sentences = [{"raw": f"a photo of a {words[(i + j) % len(words)]} number {j}.", "tokens": []}
                     for j in range(captions + (i % 2))]  # some images have more than 5 captions
        entries.append({**entry, "split": split, "sentences": sentences, "imgid": i})
    path = root / f"dataset_{name}.json"
    path.write_text(json.dumps({"images": entries, "dataset": name}))
    return path
