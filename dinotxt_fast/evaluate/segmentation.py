"""Open-vocabulary semantic segmentation on a benchmark: the official DINO.txt protocol over a whole dataset, one
confusion matrix on the device, mmsegmentation's mIoU (docs/design.md, "Dense use").

Per image: `inference.segment` (short side `short_side` bicubic, `window` windows every `stride` pixels on the mmseg
grid, each stretched to a patch multiple, per-window softmax of the patch-text cosines, overlap average, bilinear to
the label size, argmax; "whole" mode: one window, no softmax), decoded by the fused ops without a full-resolution
[C, H, W] map. The class vectors follow the official notebook: for every prompt (class name in each template), the
second half of the text embedding (the half aligned with patch tokens), L2-normalised; their mean over templates,
L2-normalised.

Background (VOC21, Context60): class 0 is "background", a class like the others (its prompts are the templates
filled with "background"). With `background_threshold` t, a pixel whose winning score (its averaged softmax
probability in "slide" mode, its cosine in "whole" mode) is below t becomes background too.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import nn

from .files import raise_failures
from .metrics import ConfusionMatrix
from .runtime import Meter, describe_model, keyed_by_name, make_loader, templates_label
from .segmentation_data import SegmentationDataset, image_input

Predictor = Callable[[list], list]  # images (ImageNet-normalised [3, H, W] on the device) -> label maps [H, W]


def model_predictor(model: nn.Module, class_names: Sequence[str], *, mode: str = "slide", short_side=512,
                    window: int = 384, stride: int = 192, features: str = "head", templates=None,
                    batch_size: int = 16, background_threshold: Optional[float] = None,
                    backend: Optional[str] = None) -> Predictor:
    """A Predictor running `inference.segment` with the class vectors of `inference.dense_text_embeddings`, made
    once for the whole dataset."""
    from ..inference.segmentation import dense_text_embeddings, segment

    text = dense_text_embeddings(model, class_names, templates)

    def predict(images: list) -> list:
        labels, scores = segment(model, images, text, mode=mode, short_side=short_side, window=window,
                                 stride=stride, features=features, return_scores=True, batch_size=batch_size,
                                 backend=backend)
        if background_threshold is not None:
            labels = [torch.where(s < background_threshold, torch.zeros_like(lab), lab)
                      for lab, s in zip(labels, scores)]
        return labels

    return predict


def evaluate_segmentation(model: Optional[nn.Module], dataset: SegmentationDataset, *, mode: str = "slide",
                          short_side: Optional[int] = 512, window: int = 384, stride: int = 192,
                          features: str = "head", templates=None, batch_size: int = 16,
                          limit: Optional[int] = None, num_workers: Optional[int] = None,
                          background_threshold: Optional[float] = None, backend: Optional[str] = None,
                          dtype: Optional[torch.dtype] = None, device=None, progress: Optional[bool] = None,
                          predictor: Optional[Predictor] = None, model_info: Optional[dict] = None) -> dict:
    """Segment every image of `dataset` (the first `limit`) and score it; returns the result dict (JSON keys:
    task, dataset, split, num_images, num_classes, miou, pixel_accuracy, mean_accuracy, per_class_iou, protocol,
    images_per_s, seconds, peak_memory_mb, peak_memory_kind, device, model). Metrics are fractions in [0, 1].

    `batch_size` windows go through the model per forward pass, and as many images are loaded per step
    (`num_workers` DataLoader workers decode them). `dtype` (e.g. torch.bfloat16) runs the model under autocast.
    `predictor` replaces the model (tests, other models): images on the device -> label maps."""
    from ..inference.zeroshot import autocast, inference_mode, model_device, model_dtype

    if background_threshold is not None and dataset.class_names[0] != "background":
        raise ValueError(f"background_threshold needs a dataset whose class 0 is background (voc21, context60), "
                         f"not {dataset.benchmark}")
    if predictor is None and model is None:
        raise ValueError("give a model or a predictor")
    if device is None:
        device = model_device(model) if model is not None else torch.device("cpu")
    device = torch.device(device)
    data = dataset.head(limit)
    custom = predictor is not None
    compute_dtype = dtype or (model_dtype(model) if model is not None else torch.float32)
    with inference_mode(model) if model is not None else torch.no_grad(), autocast(device, dtype):
        if predictor is None:
            predictor = model_predictor(model, data.class_names, mode=mode, short_side=short_side, window=window,
                                        stride=stride, features=features, templates=templates,
                                        batch_size=batch_size, background_threshold=background_threshold,
                                        backend=backend)
        confusion = ConfusionMatrix(data.num_classes, device=device, ignore_index=data.ignore_index)
        meter = Meter(len(data), f"{data.benchmark} {data.split}", device, progress)
        try:
            for batch in make_loader(data, batch_size, num_workers, device):
                raise_failures(batch)
                images = [image_input(item["image"], device) for item in batch]
                for labels, item in zip(predictor(images), batch):
                    confusion.update(labels, item["target"].to(device, non_blocking=True))
                meter.update(len(batch))
        finally:
            timing = meter.close()
    scores = confusion.scores()
    return {
        "task": "segmentation", "dataset": data.benchmark, "split": data.split, "root": str(data.root),
        "num_images": len(data), "num_classes": data.num_classes,
        "miou": scores["miou"], "pixel_accuracy": scores["pixel_accuracy"],
        "mean_accuracy": scores["mean_accuracy"],
        "per_class_iou": keyed_by_name(data.class_names, scores["per_class_iou"]),
        "protocol": {
            "mode": mode, "short_side": short_side, "short_side_resize": "bicubic, antialiased",
            "window": window if mode == "slide" else None, "stride": stride if mode == "slide" else None,
            "window_softmax": mode == "slide", "stretch_to_patch_multiple": "bicubic",
            "features": features, "templates": templates_label(templates),
            "class_vectors": "mean over templates of the L2-normalised second half of the text embedding",
            "label_resize": "bilinear (align_corners=False) to the label size, then argmax",
            "ignore_index": data.ignore_index, "background_threshold": background_threshold,
            "metric": "mIoU over classes with a non-empty union, one confusion matrix (mmseg IoUMetric)",
            "batch_size": batch_size, "dtype": str(compute_dtype).replace("torch.", ""),
            "backend": backend or "auto", "predictor": "custom" if custom else "model",
        },
        **timing, "device": str(device),
        "model": model_info if model_info is not None else (describe_model(model) if model is not None else None),
    }


__all__ = ["evaluate_segmentation", "model_predictor", "Predictor"]
