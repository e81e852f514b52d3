"""The evaluation sets of the trainer: zero-shot classification (the embedded val split or an image folder) and
open-vocabulary segmentation (the embedded val split with its masks, and the baselines its masks give)."""
from __future__ import annotations

import math
from typing import Callable, Iterator, NamedTuple, Optional, Union

import torch
from torch.utils.data import DataLoader, Dataset

from ...inference import mean_iou
from ...inference.images import to_tensor
from ..synthetic import SyntheticShapes
from ..transforms import EvalTransform
from .sampler import check_int
from .sources import ImageFolder, build_dataset, synthetic_size

DEFAULT_ZERO_SHOT_SAMPLES = 512


class _FolderImages:
    """Re-iterable batches of evaluation images from an ImageFolder, in folder order."""

    def __init__(self, folder: ImageFolder, transform: Callable, batch_size: int, num_workers: int):
        self.folder, self.transform, self.batch_size, self.num_workers = folder, transform, batch_size, num_workers

    def __len__(self) -> int:
        return math.ceil(len(self.folder) / self.batch_size)

    def __iter__(self) -> Iterator[torch.Tensor]:
        items = _IndexedImages(self.folder, self.transform)
        loader = DataLoader(items, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers,
                            pin_memory=torch.cuda.is_available())
        yield from loader


class _IndexedImages(Dataset):
    def __init__(self, folder: ImageFolder, transform: Callable):
        self.folder, self.transform = folder, transform

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, index: int) -> torch.Tensor:
        image, _ = self.folder.load(index)
        return self.transform(image)


class ZeroShotSet(NamedTuple):
    """images: float [N, 3, S, S] (synthetic) or a re-iterable of image batches in label order (folders);
    labels: int64 [N]; class_names; templates: prompt templates for the class names (None: the classifier's
    default, the 80 ImageNet templates)."""
    images: Union[torch.Tensor, _FolderImages]
    labels: torch.Tensor
    class_names: list[str]
    templates: Optional[tuple]

    def batches(self, batch_size: int = 64) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(images, labels) batches, whichever form `images` has (folders keep their own batch size)."""
        if isinstance(self.images, torch.Tensor):
            check_int("batch_size", batch_size, 1)
            for lo in range(0, len(self.labels), batch_size):
                yield self.images[lo:lo + batch_size], self.labels[lo:lo + batch_size]
            return
        lo = 0
        for images in self.images:
            yield images, self.labels[lo:lo + len(images)]
            lo += len(images)


class SegmentationSet(NamedTuple):
    """images: float [N, 3, S, S] ImageNet-normalised; masks: int64 [N, S, S] (class index per pixel);
    class_names (index 0 "background"); templates: prompt templates for the class names."""
    images: torch.Tensor
    masks: torch.Tensor
    class_names: list[str]
    templates: tuple


def build_zero_shot_set(spec_or_none: Optional[str] = None, image_size: int = 224, *,
                        num_samples: int = DEFAULT_ZERO_SHOT_SAMPLES, seed: int = 0, label_set: str = "colour",
                        batch_size: int = 64, num_workers: int = 0) -> ZeroShotSet:
    """The zero-shot classification set: the embedded val split (None, "synthetic" or "synthetic:N";
    single-object images labelled by `label_set`) or an "imagefolder:/path" (EvalTransform, in batches)."""
    spec = "synthetic" if spec_or_none is None else spec_or_none.strip()
    if spec == "synthetic" or spec.startswith("synthetic:"):
        n = synthetic_size(spec, None) if ":" in spec else num_samples
        check_int("num_samples", n, 1)
        data = SyntheticShapes(n, image_size, seed, "val", label_set=label_set, max_objects=1)
        items = [data[i] for i in range(n)]
        # Generated at image_size: no resize or crop, which could cut the object.
        images = torch.stack([to_tensor(item["image"]) for item in items])
        labels = torch.tensor([item["label"] for item in items], dtype=torch.long)
        return ZeroShotSet(images, labels, list(data.class_names), tuple(data.templates))
    if spec.startswith("imagefolder:"):
        folder = build_dataset(spec)
        check_int("batch_size", batch_size, 1)
        images = _FolderImages(folder, EvalTransform(image_size), batch_size, num_workers)
        return ZeroShotSet(images, folder.labels, list(folder.class_names), None)
    raise ValueError(f"zero-shot evaluation set must be None, 'synthetic', 'synthetic:N' or "
                     f"'imagefolder:/path', got {spec_or_none!r}")


def build_segmentation_set(num_images: int, image_size: int = 224, *, seed: int = 0) -> SegmentationSet:
    """`num_images` images of the embedded val split (1-3 objects, never an object-free one) with their masks:
    class 0 is background, 1 + c the colour c of `SyntheticShapes` (open-vocabulary segmentation by colour name).
    The same (num_images, image_size, seed) give the same set everywhere."""
    check_int("num_images", num_images, 1)
    data = SyntheticShapes(num_images, image_size, seed, "val")
    items = [data[i] for i in range(num_images)]
    images = torch.stack([to_tensor(item["image"]) for item in items])
    masks = torch.stack([torch.from_numpy(item["mask"]) for item in items])
    return SegmentationSet(images, masks, list(data.segmentation_class_names), tuple(data.segmentation_templates))


def segmentation_baselines(masks: torch.Tensor, num_classes: int) -> dict[str, float]:
    """The mIoU of two label maps that look at no image: every pixel "background" (class 0), and every pixel the
    most frequent class of `masks` (int64 [N, H, W]); a model must beat both to have learned anything."""
    majority = int(torch.bincount(masks.reshape(-1), minlength=num_classes).argmax())
    return {"miou_baseline_background": mean_iou(torch.zeros_like(masks), masks, num_classes)[0],
            "miou_baseline_majority": mean_iou(torch.full_like(masks, majority), masks, num_classes)[0]}
