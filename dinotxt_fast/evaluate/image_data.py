"""Zero-shot classification and retrieval benchmarks in their standard layouts.

- imagenet: ImageNet-1k in its class-folder layout, <root>/[<split: val>/]n01440764/*.JPEG; the classifier covers
  all 1000 classes (CLIP class names, index = position of the wnid in sorted order).
- imagenet-a, imagenet-r: <root>/[imagenet-a|imagenet-r/]<wnid>/*.jpg; the classifier covers their 200 classes.
- imagefolder: <root>/[<split>/]<class>/*: one folder per class, sorted; the folder name (underscores as spaces) is
  the class name unless names are given (one per folder, in sorted folder order).
- coco, flickr30k retrieval: Andrej Karpathy's split file (dataset_coco.json / dataset_flickr30k.json, in <root>
  unless given) and the images under <root> (COCO: <root>/<filepath>/<filename>, e.g. val2014/COCO_val2014_*.jpg;
  Flickr30k: <root>/[flickr30k-images/]<filename>); the first `captions_per_image` (5) captions of each image.

Images are preprocessed with `inference.images.classification_transform` (short side `resize`, bicubic, centre
crop `crop`); `preprocess(resize, crop)` returns the dataset with other sizes.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from .classnames import imagenet_classes, imagenet_subset_wnids
from .files import DatasetError, LoadFailure, find_base, head_view, list_images, sub_folders

class _Images(torch.utils.data.Dataset):
    """Image files -> {"image": [3, crop, crop], "index": i, **extra(i)} (or a LoadFailure naming the file)."""

    benchmark: str
    paths: list[Path]
    resize, crop = 256, 224

    def __len__(self) -> int:
        return len(self.paths)

    def preprocess(self, resize: int, crop: int):
        if crop > resize:
            raise ValueError(f"crop ({crop}) must not exceed resize ({resize})")
        view = copy.copy(self)
        view.resize, view.crop = resize, crop
        return view

    def _extra(self, index: int) -> dict:
        return {}

    def __getitem__(self, index: int) -> Union[dict, LoadFailure]:
        from ..inference.images import classification_transform, load_image

        try:
            image = classification_transform(load_image(self.paths[index]), resize_size=self.resize,
                                             crop_size=self.crop)
        except (OSError, ValueError) as exc:
            return LoadFailure(f"{self.benchmark}: {exc}")
        return {"image": image, "index": index, **self._extra(index)}


class ClassificationDataset(_Images):
    """Labelled images of a zero-shot benchmark; `class_names[label]` names each image's class."""

    def __init__(self, benchmark: str, root: Path, class_names: Sequence[str], paths: Sequence[Path],
                 labels: Sequence[int]):
        if not paths:
            raise DatasetError(f"{benchmark}: no images found under {root}")
        self.benchmark, self.root, self.class_names = benchmark, root, list(class_names)
        self.paths, self.labels = list(paths), list(labels)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def head(self, n: Optional[int]) -> "ClassificationDataset":
        return head_view(self, n, ("paths", "labels"))

    def _extra(self, index: int) -> dict:
        return {"label": self.labels[index]}


def _class_folders(benchmark: str, folder: Path, hint: str) -> list[Path]:
    folders = sub_folders(folder)
    if not folders:
        raise DatasetError(f"{benchmark}: no class folders in {folder} (expected {hint})")
    return folders


def _gather(folders: Sequence[Path], labels: Sequence[int]) -> tuple[list[Path], list[int]]:
    paths, out = [], []
    for folder, label in zip(folders, labels):
        files = list_images(folder)
        paths += files
        out += [label] * len(files)
    return paths, out


def imagenet_dataset(root, split: str = "val", variant: str = "imagenet") -> ClassificationDataset:
    """ImageNet-1k (`variant="imagenet"`, folder <root>/<split> or <root> itself) or its 200-class ImageNet-A /
    ImageNet-R sets (`variant="imagenet-a"|"imagenet-r"`, <root> or <root>/<variant>); see the module docstring."""
    wnids, names = imagenet_classes()
    if variant == "imagenet":
        hint = "the class-folder layout val/n01440764/*.JPEG (e.g. after the usual valprep.sh)"
        base = find_base(variant, root, [split, ""], [""], hint)
        classes, kept = names, wnids
    elif variant in ("imagenet-a", "imagenet-r"):
        hint = f"the {variant} release layout <wnid>/*.jpg"
        base = find_base(variant, root, [variant, ""], [""], hint)
        kept = imagenet_subset_wnids(variant)
        classes = [names[wnids.index(w)] for w in kept]
    else:
        raise ValueError(f"unknown ImageNet variant {variant!r}; choose from imagenet, imagenet-a, imagenet-r")
    index = {w: i for i, w in enumerate(kept)}
    folders = _class_folders(variant, base, hint)
    for folder in folders:
        if folder.name not in index:
            what = "an ImageNet-1k class (wnid)" if variant == "imagenet" else f"one of the 200 {variant} classes"
            raise DatasetError(f"{variant}: folder {folder} is not {what}; expected {hint}")
    paths, labels = _gather(folders, [index[f.name] for f in folders])
    return ClassificationDataset(variant, base, classes, paths, labels)


def imagefolder_dataset(root, split: Optional[str] = None,
                        class_names: Optional[Sequence[str]] = None) -> ClassificationDataset:
    """Any <root>/[<split>/]<class>/* folder tree; class names from the folder names or `class_names`."""
    base = find_base("imagefolder", root, [split] if split else [""], [""], "<root>/<class>/<image>")
    folders = _class_folders("imagefolder", base, "one folder of images per class")
    if class_names is None:
        names = [f.name.replace("_", " ") for f in folders]
    elif len(class_names) != len(folders):
        raise DatasetError(f"imagefolder: {len(class_names)} class names for {len(folders)} class folders in {base} "
                           f"(give one name per folder, in sorted folder order)")
    else:
        names = list(class_names)
    paths, labels = _gather(folders, range(len(folders)))
    return ClassificationDataset("imagefolder", base, names, paths, labels)


class RetrievalDataset(_Images):
    """Images and their captions; `texts` lists every caption, `text_to_image[t]` the image of caption t."""

    def __init__(self, benchmark: str, root: Path, paths: Sequence[Path], captions: Sequence[Sequence[str]]):
        if not paths:
            raise DatasetError(f"{benchmark}: no images in the chosen split under {root}")
        self.benchmark, self.root = benchmark, root
        self.paths, self.captions = list(paths), [list(c) for c in captions]

    def head(self, n: Optional[int]) -> "RetrievalDataset":
        return head_view(self, n, ("paths", "captions"))

    @property
    def texts(self) -> list[str]:
        return [c for caps in self.captions for c in caps]

    @property
    def text_to_image(self) -> torch.Tensor:
        return torch.tensor([i for i, caps in enumerate(self.captions) for _ in caps], dtype=torch.int64)


KARPATHY_FILES = {"coco": "dataset_coco.json", "flickr30k": "dataset_flickr30k.json"}


def _image_path(name: str, root: Path, entry: dict) -> Path:
    if name == "coco":
        candidates = [root / entry.get("filepath", "") / entry["filename"], root / entry["filename"]]
    else:
        candidates = [root / entry["filename"], root / "flickr30k-images" / entry["filename"]]
    for path in candidates:
        if path.is_file():
            return path
    raise DatasetError(f"{name}: image not found: {candidates[0]}")


def karpathy_dataset(name: str, root, split: str = "test", annotations=None,
                     captions_per_image: int = 5) -> RetrievalDataset:
    """COCO / Flickr30k image-text retrieval on Karpathy's split (module docstring)."""
    if name not in KARPATHY_FILES:
        raise ValueError(f"unknown retrieval dataset {name!r}; choose from {', '.join(KARPATHY_FILES)}")
    if captions_per_image < 1:
        raise ValueError(f"captions_per_image must be >= 1, got {captions_per_image}")
    root = find_base(name, root, [""], [""], "the image folder")
    ann = Path(annotations).expanduser() if annotations else root / KARPATHY_FILES[name]
    if not ann.is_file():
        raise DatasetError(f"{name}: Karpathy split file not found: {ann} (give it with annotations=/--annotations)")
    try:
        data = json.loads(ann.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetError(f"{name}: cannot read {ann}: {exc}") from None
    entries = data.get("images") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise DatasetError(f"{name}: {ann} has no 'images' list (not a Karpathy split file)")
    paths, captions = [], []
    for k, entry in enumerate(entries):
        if not isinstance(entry, dict) or not {"split", "filename", "sentences"} <= set(entry):
            raise DatasetError(f"{name}: {ann} images[{k}] lacks 'split', 'filename' or 'sentences'")
        if entry["split"] != split:
            continue
        raw = [s.get("raw", "").strip() for s in entry["sentences"] if isinstance(s, dict)]
        raw = [r for r in raw if r]
        if len(raw) < captions_per_image:
            raise DatasetError(f"{name}: {ann} images[{k}] ({entry['filename']}) has {len(raw)} captions, fewer than "
                               f"{captions_per_image}")
        paths.append(_image_path(name, root, entry))
        captions.append(raw[:captions_per_image])
    return RetrievalDataset(name, root, paths, captions)


ZEROSHOT_DATASETS = ("imagenet", "imagenet-a", "imagenet-r", "imagefolder")
RETRIEVAL_DATASETS = tuple(KARPATHY_FILES)

__all__ = ["ClassificationDataset", "RetrievalDataset", "imagenet_dataset", "imagefolder_dataset",
           "karpathy_dataset", "ZEROSHOT_DATASETS", "RETRIEVAL_DATASETS", "KARPATHY_FILES"]
