"""Benchmark metrics: the segmentation confusion matrix and its scores, top-k accuracy, retrieval recall@K.

Segmentation follows mmsegmentation's IoUMetric (and torchmetrics' MulticlassJaccardIndex(average="macro"), which
the official DINOv3 dino.txt notebook uses): one confusion matrix over every pixel of every image whose target is
not the ignore index; IoU_c = TP_c / (TP_c + FP_c + FN_c); mIoU = mean IoU over the classes whose union
TP + FP + FN is non-empty (a class neither present nor predicted anywhere is left out, and reported as None).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch


class ConfusionMatrix:
    """An int64 [C, C] confusion matrix (rows: target class, columns: predicted class) accumulated on `device`.

    update() takes integer label maps of one shape; pixels whose target is `ignore_index` are skipped. Targets
    must be in [0, C) (the datasets check this per file); a prediction outside [0, C) is a bug and raises."""

    def __init__(self, num_classes: int, device=None, ignore_index: Optional[int] = 255):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        if pred.shape != target.shape:
            raise ValueError(f"prediction shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
        if pred.is_floating_point() or target.is_floating_point():
            raise TypeError(f"labels must be integer tensors, got {pred.dtype} and {target.dtype}")
        device = self.matrix.device
        pred = pred.reshape(-1).to(device=device, dtype=torch.int64)
        target = target.reshape(-1).to(device=device, dtype=torch.int64)
        if self.ignore_index is not None:
            keep = target != self.ignore_index
            pred, target = pred[keep], target[keep]
        c = self.num_classes
        if pred.numel():  # one host sync per update: the range of both maps
            lo, hi = torch.stack([torch.minimum(pred.min(), target.min()),
                                  torch.maximum(pred.max(), target.max())]).tolist()
            if lo < 0 or hi >= c:
                raise ValueError(f"labels outside [0, {c}) (ignore_index={self.ignore_index}): targets "
                                 f"{int(target.min())}..{int(target.max())}, predictions "
                                 f"{int(pred.min())}..{int(pred.max())}")
        self.matrix += torch.bincount(target * c + pred, minlength=c * c).view(c, c)

    def scores(self) -> dict:
        """{"miou", "pixel_accuracy", "mean_accuracy", "per_class_iou"} as floats in [0, 1] (per_class_iou: a
        list with None for classes whose union is empty; NaN metrics when no pixel was counted)."""
        return segmentation_scores(self.matrix)


def segmentation_scores(confusion: torch.Tensor) -> dict:
    """Scores of an integer [C, C] confusion matrix (rows: target, columns: prediction), computed in float64.

    pixel_accuracy = sum(TP) / counted pixels (mmseg aAcc); mean_accuracy = mean over classes present in the
    target of TP / target pixels (mmseg mAcc)."""
    if confusion.dim() != 2 or confusion.shape[0] != confusion.shape[1]:
        raise ValueError(f"confusion must be a square [C, C] matrix, got shape {tuple(confusion.shape)}")
    m = confusion.double().cpu()
    tp = m.diagonal()
    target_area, pred_area = m.sum(1), m.sum(0)
    union = target_area + pred_area - tp
    iou = torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, math.nan))
    acc = torch.where(target_area > 0, tp / target_area.clamp_min(1), torch.full_like(tp, math.nan))
    total = float(m.sum())
    return {
        "miou": _nanmean(iou),
        "pixel_accuracy": float(tp.sum()) / total if total else math.nan,
        "mean_accuracy": _nanmean(acc),
        "per_class_iou": [None if math.isnan(v) else v for v in iou.tolist()],
    }


def _nanmean(values: torch.Tensor) -> float:
    present = ~values.isnan()
    return float(values[present].mean()) if bool(present.any()) else math.nan


def topk_hits(logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, torch.Tensor]:
    """k -> bool [B]: whether labels[i] is among the k highest logits of row i (k capped at the class count)."""
    if logits.dim() != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"need logits [B, C] and labels [B], got {tuple(logits.shape)} and {tuple(labels.shape)}")
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hit = top == labels.to(top.device)[:, None]
    return {k: hit[:, :k].any(dim=1) for k in ks}


def retrieval_recall(image_emb: torch.Tensor, text_emb: torch.Tensor, text_to_image: torch.Tensor,
                     ks: Sequence[int] = (1, 5, 10), chunk: int = 1024) -> dict[str, dict[str, float]]:
    """Image->text and text->image recall@K of L2-normalised embeddings (cosine similarity).

    image_emb [N, E], text_emb [T, E], text_to_image [T] (the image of each text). An image counts as retrieved at
    K when any of its texts is among its K most similar texts; a text when its image is among its K most similar
    images. Similarities are computed `chunk` rows at a time, never as one [N, T] matrix."""
    n, t = image_emb.shape[0], text_emb.shape[0]
    if text_to_image.shape != (t,):
        raise ValueError(f"text_to_image must be [{t}], got {tuple(text_to_image.shape)}")
    owner = text_to_image.to(image_emb.device)
    kmax = max(ks)
    i2t = {k: 0 for k in ks}
    for start in range(0, n, chunk):
        sims = image_emb[start:start + chunk] @ text_emb.T
        top = sims.topk(min(kmax, t), dim=1).indices  # [b, kmax] text indices
        ids = torch.arange(start, start + sims.shape[0], device=sims.device)[:, None]
        hit = owner[top] == ids
        for k in ks:
            i2t[k] += int(hit[:, :k].any(dim=1).sum())
    t2i = {k: 0 for k in ks}
    for start in range(0, t, chunk):
        sims = text_emb[start:start + chunk] @ image_emb.T
        top = sims.topk(min(kmax, n), dim=1).indices
        hit = top == owner[start:start + chunk, None]
        for k in ks:
            t2i[k] += int(hit[:, :k].any(dim=1).sum())
    return {"image_to_text": {f"R@{k}": i2t[k] / n for k in ks},
            "text_to_image": {f"R@{k}": t2i[k] / t for k in ks}}


__all__ = ["ConfusionMatrix", "segmentation_scores", "topk_hits", "retrieval_recall"]
