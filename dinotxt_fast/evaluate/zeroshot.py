"""Zero-shot classification on a benchmark (ImageNet-1k, ImageNet-A/-R, any image folder): the CLIP recipe
(`inference.ZeroShotClassifier`: prompts of every template, normalised, averaged, normalised; cosine with the
normalised full 2048-d image embedding), top-1 / top-5 accuracy and per-class accuracy.

Preprocessing defaults to each release's: DINOv2 dino.txt: short side 256 (bicubic) -> centre crop 224 (the
dinov2 `make_classification_eval_transform`); DINOv3 dino.txt: short side 512 -> centre crop 512.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .files import raise_failures
from .image_data import ClassificationDataset
from .metrics import topk_hits
from .runtime import Meter, describe_model, keyed_by_name, make_loader, templates_label

RELEASE_PREPROCESSING = {"dinov2": (256, 224), "dinov3": (512, 512)}


def default_preprocessing(model: nn.Module) -> tuple[int, int]:
    """(resize, crop) of the model's release (module docstring)."""
    return RELEASE_PREPROCESSING.get(getattr(model.config, "backbone", "dinov2"), RELEASE_PREPROCESSING["dinov2"])


def stack_images(batch: list) -> torch.Tensor:
    raise_failures(batch)
    return torch.stack([item["image"] for item in batch])


def evaluate_zeroshot(model: nn.Module, dataset: ClassificationDataset, *, templates=None,
                      resize: Optional[int] = None, crop: Optional[int] = None, batch_size: int = 64,
                      limit: Optional[int] = None, num_workers: Optional[int] = None,
                      dtype: Optional[torch.dtype] = None, progress: Optional[bool] = None,
                      model_info: Optional[dict] = None) -> dict:
    """Classify every image of `dataset` (the first `limit`) among all of its classes; returns the result dict
    (JSON keys: task, dataset, num_images, num_classes, top1, top5, mean_per_class_accuracy, per_class_accuracy
    (class name -> fraction, None for a class without images), preprocessing, templates, images_per_s, seconds,
    peak_memory_mb, peak_memory_kind, device, model)."""
    from ..inference.zeroshot import ZeroShotClassifier, autocast, inference_mode, model_device

    device = model_device(model)
    default_resize, default_crop = default_preprocessing(model)
    resize, crop = resize or default_resize, crop or default_crop
    data = dataset.head(limit).preprocess(resize, crop)
    c = data.num_classes
    correct = {1: torch.zeros((), dtype=torch.int64, device=device),
               5: torch.zeros((), dtype=torch.int64, device=device)}
    per_class_total = torch.zeros(c, dtype=torch.int64, device=device)
    per_class_correct = torch.zeros(c, dtype=torch.int64, device=device)
    with inference_mode(model), autocast(device, dtype):
        classifier = ZeroShotClassifier(model, data.class_names, templates, progress=False)
        meter = Meter(len(data), data.benchmark, device, progress)
        try:
            for batch in make_loader(data, batch_size, num_workers, device, collate=list):
                images = stack_images(batch).to(device, non_blocking=True)
                labels = torch.tensor([item["label"] for item in batch], device=device)
                hits = topk_hits(classifier(images), labels, (1, 5))
                for k in correct:
                    correct[k] += hits[k].sum()
                per_class_total += torch.bincount(labels, minlength=c)
                per_class_correct += torch.bincount(labels[hits[1]], minlength=c)
                meter.update(len(batch))
        finally:
            timing = meter.close()
    n = len(data)
    totals, rights = per_class_total.tolist(), per_class_correct.tolist()
    per_class = [r / t if t else None for r, t in zip(rights, totals)]
    present = [a for a in per_class if a is not None]
    return {
        "task": "zeroshot", "dataset": data.benchmark, "root": str(data.root), "num_images": n, "num_classes": c,
        "top1": int(correct[1]) / n, "top5": int(correct[5]) / n,
        "mean_per_class_accuracy": sum(present) / len(present),
        "per_class_accuracy": keyed_by_name(data.class_names, per_class),
        "preprocessing": {"resize": resize, "crop": crop, "interpolation": "bicubic (PIL)",
                          "normalize": "ImageNet mean/std"},
        "templates": templates_label(templates), "batch_size": batch_size,
        "dtype": str(dtype).replace("torch.", "") if dtype else "float32",
        **timing, "device": str(device),
        "model": model_info if model_info is not None else describe_model(model),
    }


__all__ = ["evaluate_zeroshot", "default_preprocessing", "RELEASE_PREPROCESSING"]
