"""Periodic evaluation during training: zero-shot top-1 and open-vocabulary segmentation mIoU, each next to what
guessing gives (chance; the all-background and majority-class label maps), so a curve says whether it learned."""
from __future__ import annotations

import torch

from ..inference import ZeroShotClassifier, mean_iou, segment
from ..inference.zeroshot import autocast
from .config import PRECISION_DTYPES, TrainConfig
from .data.eval_sets import build_segmentation_set, build_zero_shot_set, segmentation_baselines


class Evaluator:
    """Zero-shot classification on the embedded val split or an `imagefolder:` set; segmentation mIoU on the
    embedded set (its masks name colours, so it only runs when the training data is the embedded set too).

    Segmentation protocol: the images are resized to `cfg.segmentation_short_side()` (2 x image_size by default)
    and decoded with `mode="slide"` in windows of the training size (stride half a window) when that is larger than
    a window, else `mode="whole"`."""

    def __init__(self, model, cfg: TrainConfig, device: torch.device, precision: str):
        self.model, self.device = model, device
        self.autocast = autocast(device, PRECISION_DTYPES[precision])
        self.zero_shot = build_zero_shot_set(cfg.eval_data, cfg.image_size, num_samples=cfg.eval_samples,
                                             seed=cfg.seed, num_workers=min(cfg.num_workers, 4))
        synthetic = (cfg.eval_data or "").startswith("synthetic")
        self.segmentation = (build_segmentation_set(cfg.seg_eval_images, cfg.image_size, seed=cfg.seed)
                             if synthetic and cfg.seg_eval_images > 0 else None)
        short_side, window = cfg.segmentation_short_side(), cfg.image_size
        self.seg_protocol = dict(short_side=short_side, mode="slide" if short_side > window else "whole",
                                 window=window, stride=max(1, window // 2))
        self.baselines = (segmentation_baselines(self.segmentation.masks, len(self.segmentation.class_names))
                          if self.segmentation is not None else {})

    @torch.no_grad()
    def run(self) -> dict:
        self.model.eval()
        zs = self.zero_shot
        with self.autocast:
            classifier = ZeroShotClassifier(self.model, zs.class_names, templates=zs.templates, progress=False)
            correct = total = 0
            for images, labels in zs.batches(128):
                pred = classifier(images.to(self.device)).argmax(-1).cpu()
                correct += int((pred == labels).sum())
                total += len(labels)
            out = {"zero_shot_top1": correct / total, "num_classes": len(zs.class_names),
                   "zero_shot_chance": 1 / len(zs.class_names)}
            if self.segmentation is not None:
                seg = self.segmentation
                labels = segment(self.model, seg.images.to(self.device), seg.class_names, templates=seg.templates,
                                 **self.seg_protocol)
                out["miou"], _ = mean_iou(labels.cpu(), seg.masks, len(seg.class_names))
                out.update(self.baselines)
        return out
