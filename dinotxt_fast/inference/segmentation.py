"""Open-vocabulary semantic segmentation with a DinoTxt model, and the mIoU metric.

The protocol is the official DINO.txt one (the DINOv3 dino.txt segmentation notebook, on the mmseg sliding-window
inference of `EncoderDecoder.slide_inference`; docs/design.md, "Dense use"):

1. resize each image so its short side is `short_side` (bicubic; the long side is int(short_side * long / short),
   as torchvision's Resize(int) computes it);
2. cut the resized canvas into `window` x `window` crops every `stride` pixels on the mmseg grid (the last window
   of a row/column is moved back to end at the border; a canvas smaller than the window is one crop);
3. stretch each crop bicubically to the next multiple of the patch size (384 -> 392 at patch 14), encode it and
   take its patch tokens (the vision head's by default, the raw backbone's with features="backbone");
4. cosine of every L2-normalised patch with each class's vector: the second half of each prompt's text embedding
   (the half aligned with patch tokens), L2-normalised, averaged over the templates, normalised -> window logits
   [C, h, w];
5. upsample each window's logits bilinearly (align_corners=False) to the window's own box size, softmax over
   classes, sum over windows and divide by the per-pixel window count, resize bilinearly to the input image's
   own size, argmax.

"whole" mode encodes the whole resized canvas as one window and skips the softmax. Steps 4-5 run in
`ops.patch_text_logits` and `ops.slide_decode`, which never build a full-resolution [C, H, W] map.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from .templates import Template
from .zeroshot import build_text_classifier, check_class_names, inference_mode, model_device, model_dtype

ImagesArg = Union[torch.Tensor, Sequence[torch.Tensor]]
ClassesArg = Union[Sequence[str], torch.Tensor]

MODES = ("slide", "whole")
FEATURES = ("head", "backbone")


def sliding_window_boxes(height: int, width: int, window: int, stride: int) -> torch.Tensor:
    """The mmseg slide grid on a height x width canvas: LongTensor [N, 4] of rows (y0, x0, y1, x1), row-major.

    Every box is min(window, height) x min(window, width); together they cover the canvas when stride <= window."""
    if window < 1 or stride < 1:
        raise ValueError(f"window and stride must be >= 1, got window={window}, stride={stride}")
    h_grids = max(height - window + stride - 1, 0) // stride + 1
    w_grids = max(width - window + stride - 1, 0) // stride + 1
    boxes = []
    for i in range(h_grids):
        for j in range(w_grids):
            y1, x1 = min(i * stride + window, height), min(j * stride + window, width)
            boxes.append((max(y1 - window, 0), max(x1 - window, 0), y1, x1))
    return torch.tensor(boxes, dtype=torch.int64)


def short_side_size(height: int, width: int, short_side: Optional[int]) -> tuple[int, int]:
    """(H', W') with min(H', W') = short_side and the aspect ratio kept (torchvision's rounding)."""
    if short_side is None:
        return height, width
    if height <= width:
        return short_side, int(short_side * width / height)
    return int(short_side * height / width), short_side


def _ceil_to(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _check_images(images: ImagesArg) -> tuple[list[torch.Tensor], bool]:
    """-> (list of [3, H, W] images, whether the input was one batched tensor)."""
    if isinstance(images, torch.Tensor):
        if images.dim() != 4:
            hint = " (add a batch dimension: images[None])" if images.dim() == 3 else ""
            raise ValueError(f"images must be [B, 3, H, W] or a list of [3, H, W], got shape "
                             f"{tuple(images.shape)}{hint}")
        items, batched = list(images), True
        if not items:
            raise ValueError("images is an empty batch")
    elif isinstance(images, (list, tuple)):
        items, batched = list(images), False
        if not items:
            raise ValueError("images is an empty list")
    else:
        raise TypeError(f"images must be a tensor [B, 3, H, W] or a list of [3, H, W] tensors, "
                        f"got {type(images).__name__}")
    for i, img in enumerate(items):
        where = f"images[{i}]"
        if not isinstance(img, torch.Tensor):
            raise TypeError(f"{where} must be a tensor [3, H, W], got {type(img).__name__}")
        if img.dim() != 3 or img.shape[0] != 3:
            raise ValueError(f"{where} must be [3, H, W] (RGB, channels first), got shape {tuple(img.shape)}")
        if img.shape[1] < 1 or img.shape[2] < 1:
            raise ValueError(f"{where} is empty: shape {tuple(img.shape)}")
        if not img.is_floating_point():
            raise TypeError(f"{where} must be a floating-point ImageNet-normalised image, got {img.dtype}")
    return items, batched


class _PatchAlignedText(nn.Module):
    """The model seen through the half of its text embedding that patch tokens are compared with, so that
    `build_text_classifier` averages each prompt's normalised half (the official notebook's recipe) rather than
    halving the average of the full embeddings."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model, self.config = model, model.config
        self.train(model.training)  # inference_mode() restores the wrapper's flag, hence the model's, to what it was

    def encode_text(self, ids: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return self.model.encode_text(ids)[:, self.config.vision_dim:]


def dense_text_embeddings(model: nn.Module, classes: ClassesArg, templates=None) -> torch.Tensor:
    """The per-class vectors patch tokens are compared with -> [C, vision_dim], rows L2-normalised (float32; float64
    for a float64 tensor). From class names: per prompt the second half of its text embedding (dims vision_dim:),
    L2-normalised, averaged over the templates and normalised again (the official recipe). From a tensor: [C,
    vision_dim] class vectors as they are, or [C, embed_dim] full text embeddings, whose second half is taken."""
    cfg = model.config
    if not isinstance(classes, torch.Tensor):
        return build_text_classifier(_PatchAlignedText(model), check_class_names(classes), templates)
    if classes.dim() != 2 or classes.shape[0] < 1 or classes.shape[1] not in (cfg.embed_dim, cfg.vision_dim):
        raise ValueError(f"a class tensor must be [C >= 1, embed_dim={cfg.embed_dim}] full text embeddings or [C, "
                         f"vision_dim={cfg.vision_dim}] patch-aligned halves, got shape {tuple(classes.shape)}")
    if not classes.is_floating_point():
        raise TypeError(f"the class tensor must be floating point, got {classes.dtype}")
    text = classes.to(model_device(model))
    text = text if text.dtype == torch.float64 else text.float()
    return F.normalize(text[:, -cfg.vision_dim:], dim=-1)


def _resize(x: torch.Tensor, size: tuple[int, int], antialias: bool) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=antialias)


def _crop(canvas: torch.Tensor, box: Sequence[int]) -> torch.Tensor:
    y0, x0, y1, x1 = box
    return canvas[:, y0:y1, x0:x1]


def segment(model: nn.Module, images: ImagesArg, classes: ClassesArg, mode: str = "slide", *,
            short_side: Optional[int] = 512, window: int = 384, stride: int = 192, features: str = "head",
            templates: Union[None, str, Sequence[Template]] = None, return_scores: bool = False,
            batch_size: int = 16, backend: Optional[str] = None, max_canvas_pixels: Optional[int] = None,
            progress: Optional[bool] = False):
    """Per-pixel class labels for ImageNet-normalised images (see the module docstring for the protocol).

    images: [B, 3, H, W] float, or a list of [3, H, W] of different sizes. classes: class names (prompts are
    template-averaged, `templates` as in ZeroShotClassifier), a [C, embed_dim] tensor of full text embeddings or a
    [C, vision_dim] tensor of patch-aligned class vectors (dense_text_embeddings).
    Returns labels [B, H, W] int64 (a list of [H, W] for a list input) at each input's own size, on the input's
    device; with return_scores, (labels, scores) where a score is the winning class's averaged softmax
    probability ("slide") or its cosine similarity ("whole"). Windows are encoded `batch_size` at a time.
    `backend` selects the kernels of the decoding ops (ops.patch_text_logits, ops.slide_decode): "torch",
    "triton", "cuda" or None (auto). `max_canvas_pixels` refuses (ValueError) an image whose resized canvas is larger,
    before any work; `progress` shows a bar over the windows (None: only on a terminal).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if features not in FEATURES:
        raise ValueError(f"features must be one of {FEATURES}, got {features!r}")
    if short_side is not None and (not isinstance(short_side, int) or short_side < 1):
        raise ValueError(f"short_side must be a positive int or None, got {short_side!r}")
    if mode == "slide" and not (isinstance(window, int) and isinstance(stride, int) and 1 <= stride <= window):
        raise ValueError(f"need integers 1 <= stride <= window so windows cover the image, got window={window!r}, "
                         f"stride={stride!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    items, batched = _check_images(images)
    for i, img in enumerate(items):
        canvas_h, canvas_w = short_side_size(img.shape[1], img.shape[2], short_side)
        if max_canvas_pixels is not None and canvas_h * canvas_w > max_canvas_pixels:
            raise ValueError(f"images[{i}] ({img.shape[2]}x{img.shape[1]}) would be resized to a "
                             f"{canvas_w}x{canvas_h} canvas ({canvas_h * canvas_w} pixels), more than "
                             f"max_canvas_pixels={max_canvas_pixels}")
    patch = model.config.patch_size
    device, dtype = model_device(model), model_dtype(model)

    with inference_mode(model):
        text = dense_text_embeddings(model, classes, templates)

        # Resized canvases and their windows; resizing runs in fp32 (fp64 for fp64 input) whatever the model dtype.
        canvases, boxes = [], []
        for img in items:
            x = img.to(device)
            x = x if x.dtype == torch.float64 else x.float()
            size = short_side_size(x.shape[1], x.shape[2], short_side)
            # antialias=True is what PIL and torchvision's Resize do, so a downscale matches the official
            # PIL-side preprocessing (for an upscale it is PIL's bicubic kernel).
            canvas = _resize(x[None], size, antialias=True)[0]
            canvases.append(canvas)
            if mode == "slide":
                boxes.append(sliding_window_boxes(size[0], size[1], window, stride))
            else:
                boxes.append(torch.tensor([[0, 0, size[0], size[1]]], dtype=torch.int64))

        # Windows of equal box size (all of one image; all of a batch tensor) are encoded together.
        box_lists = [b.tolist() for b in boxes]
        groups: dict[tuple[int, int], list[tuple[int, int]]] = {}
        for i, image_boxes in enumerate(box_lists):
            for k, (y0, x0, y1, x1) in enumerate(image_boxes):
                groups.setdefault((y1 - y0, x1 - x0), []).append((i, k))
        window_logits: list[list[Optional[torch.Tensor]]] = [[None] * len(b) for b in boxes]
        from tqdm.auto import tqdm

        with tqdm(total=sum(len(b) for b in box_lists), desc="windows", unit="window",
                  disable=(not progress) if progress is not None else None) as bar:
            for (box_h, box_w), jobs in groups.items():
                stretched = (_ceil_to(box_h, patch), _ceil_to(box_w, patch))
                grid = (stretched[0] // patch, stretched[1] // patch)
                for start in range(0, len(jobs), batch_size):
                    chunk = jobs[start:start + batch_size]
                    crops = torch.stack([_crop(canvases[i], box_lists[i][k]) for i, k in chunk])
                    # Plain bicubic stretch by a few percent to a patch multiple (F.interpolate, align_corners=False)
                    crops = _resize(crops, stretched, antialias=False).to(dtype)
                    if features == "head":
                        tokens = model.image_tokens(crops)[1]
                    else:  # the raw backbone tokens: no need to run the vision head
                        tokens = model.backbone_tokens(crops)[:, 1 + model.config.num_register_tokens:]
                    logits = ops.patch_text_logits(tokens.reshape(len(chunk), grid[0], grid[1], -1), text,
                                                   backend=backend)
                    for (i, k), lg in zip(chunk, logits):
                        window_logits[i][k] = lg
                    bar.update(len(chunk))

        labels, scores = [], []
        for img, canvas, image_boxes, logits in zip(items, canvases, boxes, window_logits):
            lab, score = ops.slide_decode(torch.stack(logits), image_boxes,  # boxes stay on the host: no syncs
                                          canvas_size=tuple(canvas.shape[-2:]), size=tuple(img.shape[-2:]),
                                          softmax=(mode == "slide"), return_scores=True, backend=backend)
            labels.append(lab.to(img.device))
            scores.append(score.to(img.device))

    if batched:
        labels, scores = torch.stack(labels), torch.stack(scores)
    return (labels, scores) if return_scores else labels


def mean_iou(pred: Union[torch.Tensor, Sequence[torch.Tensor]], target: Union[torch.Tensor, Sequence[torch.Tensor]],
             num_classes: int, ignore_index: Optional[int] = 255) -> tuple[float, torch.Tensor]:
    """Dataset mIoU, mmseg's definition: per-class IoU = sum of intersections / sum of unions over all pixels of all
    images whose target is not `ignore_index`; classes absent from both prediction and target get NaN and are left
    out of the mean. pred/target: integer label maps of equal shape (or equal-length lists of them).
    Returns (miou as a float, per-class IoU float64 [num_classes])."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    preds = [pred] if isinstance(pred, torch.Tensor) else list(pred)
    targets = [target] if isinstance(target, torch.Tensor) else list(target)
    if len(preds) != len(targets):
        raise ValueError(f"got {len(preds)} predictions but {len(targets)} targets")
    inter = torch.zeros(num_classes, dtype=torch.float64)
    area_pred = torch.zeros(num_classes, dtype=torch.float64)
    area_target = torch.zeros(num_classes, dtype=torch.float64)
    for n, (p, t) in enumerate(zip(preds, targets)):
        if p.shape != t.shape:
            raise ValueError(f"prediction {n} has shape {tuple(p.shape)} but its target has {tuple(t.shape)}")
        if p.is_floating_point() or t.is_floating_point():
            raise TypeError(f"labels must be integer tensors, got {p.dtype} and {t.dtype} (pair {n})")
        p, t = p.reshape(-1).long().cpu(), t.reshape(-1).long().cpu()
        if ignore_index is not None:
            keep = t != ignore_index
            p, t = p[keep], t[keep]
        for name, v in (("target", t), ("prediction", p)):
            if v.numel() and (int(v.min()) < 0 or int(v.max()) >= num_classes):
                raise ValueError(f"{name} {n} has labels outside [0, {num_classes}) (ignore_index={ignore_index}): "
                                 f"min {int(v.min())}, max {int(v.max())}")
        inter += torch.bincount(t[p == t], minlength=num_classes).double()
        area_pred += torch.bincount(p, minlength=num_classes).double()
        area_target += torch.bincount(t, minlength=num_classes).double()
    union = area_pred + area_target - inter
    iou = torch.where(union > 0, inter / union.clamp_min(1), torch.full_like(union, float("nan")))
    present = ~iou.isnan()
    miou = float(iou[present].mean()) if bool(present.any()) else float("nan")
    return miou, iou


__all__ = ["segment", "mean_iou", "sliding_window_boxes", "short_side_size", "dense_text_embeddings"]
