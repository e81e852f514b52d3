"""Image files -> ImageNet-normalised float tensors, with PIL only (no torchvision needed).

`classification_transform` reproduces the evaluation transform of the official DINO.txt examples
(dinov2 `make_classification_eval_transform`: resize the short side to 256 with PIL bicubic, center-crop 224,
to [0, 1], normalise with the ImageNet mean and std). Segmentation takes images at their own size:
`segment()` does its own short-side resize.
"""
from __future__ import annotations

import os
from typing import Sequence, Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

PathLike = Union[str, os.PathLike]


def require_file(path: PathLike, what: str = "image") -> str:
    """path as a str, once it names an existing file (errors say what was expected and name the path)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what} file not found: {path}")
    if os.path.isdir(path):
        raise IsADirectoryError(f"expected an {what} file, got a directory: {path}")
    return path


def load_image(path: PathLike) -> Image.Image:
    """Open and fully decode an image file as RGB; errors name the file."""
    path = require_file(path)
    try:
        with Image.open(path) as img:
            img.load()  # decode now: truncated files fail here, not later
            return img.convert("RGB")
    except PermissionError:
        raise  # its message already names the file; it is not a corrupt image
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise ValueError(f"cannot read image file {path}: not a readable image or corrupt ({e})") from e


def to_tensor(img: Image.Image, *, normalize: bool = True) -> torch.Tensor:
    """RGB PIL image -> float32 [3, H, W]: in [0, 1], then ImageNet-normalised when `normalize`."""
    if img.mode != "RGB":
        img = img.convert("RGB")
    x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255.0)
    return normalize_tensor(x) if normalize else x


def normalize_tensor(x: torch.Tensor) -> torch.Tensor:
    """[..., 3, H, W] in [0, 1] -> ImageNet-normalised."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype, device=x.device)[:, None, None]
    std = torch.tensor(IMAGENET_STD, dtype=x.dtype, device=x.device)[:, None, None]
    return (x - mean) / std


def denormalize(x: torch.Tensor) -> torch.Tensor:
    """ImageNet-normalised [..., 3, H, W] -> [0, 1] (clamped), e.g. to draw an overlay."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype, device=x.device)[:, None, None]
    std = torch.tensor(IMAGENET_STD, dtype=x.dtype, device=x.device)[:, None, None]
    return (x * std + mean).clamp_(0.0, 1.0)


def resize_short_side(img: Image.Image, size: int) -> Image.Image:
    """Resize (PIL bicubic, antialiased) so the short side is `size`, as torchvision's Resize(int) does:
    the long side becomes int(size * long / short)."""
    if size < 1:
        raise ValueError(f"resize size must be positive, got {size}")
    w, h = img.size
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    if (new_w, new_h) == (w, h):
        return img
    return img.resize((new_w, new_h), Image.BICUBIC)


def center_crop(img: Image.Image, size: int) -> Image.Image:
    """Center crop of size x size with torchvision's rounding of the offsets."""
    w, h = img.size
    if size > w or size > h:
        raise ValueError(f"center crop {size} is larger than the image ({w}x{h}); resize first")
    top = int(round((h - size) / 2.0))
    left = int(round((w - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def classification_transform(img: Image.Image, *, resize_size: int = 256, crop_size: int = 224) -> torch.Tensor:
    """The official DINO.txt eval transform: short side -> 256 (bicubic), center crop 224, ImageNet-normalised."""
    if crop_size > resize_size:
        raise ValueError(f"crop_size ({crop_size}) must not exceed resize_size ({resize_size})")
    return to_tensor(center_crop(resize_short_side(img, resize_size), crop_size))


def load_classification_batch(paths: Sequence[PathLike], *, resize_size: int = 256,
                              crop_size: int = 224) -> torch.Tensor:
    """Image files -> [B, 3, crop, crop] with `classification_transform`."""
    if len(paths) == 0:
        raise ValueError("no image files given")
    return torch.stack([classification_transform(load_image(p), resize_size=resize_size, crop_size=crop_size)
                        for p in paths])


def load_image_tensor(path: PathLike) -> torch.Tensor:
    """An image file at its own size -> ImageNet-normalised float32 [3, H, W] (input for `segment`)."""
    return to_tensor(load_image(path))


def load_label_mask(path: PathLike) -> torch.Tensor:
    """A label PNG (palette 'P', 'L', 'I;16' or 'I' mode; pixel value = class index) -> int64 [H, W].

    RGB masks are refused: their colours are not class indices."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"mask file not found: {path}")
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode not in ("P", "L", "I;16", "I"):
                raise ValueError(f"mask {path} has mode {img.mode!r}; expected a single-channel label image "
                                 f"(P, L, I;16 or I) whose pixel values are class indices")
            array = np.array(img, dtype=np.int64)
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"cannot read mask file {path}: not a readable image or corrupt ({e})") from e
    return torch.from_numpy(array)


__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "load_image", "to_tensor", "normalize_tensor", "denormalize",
           "resize_short_side", "center_crop", "classification_transform", "load_classification_batch",
           "load_image_tensor", "load_label_mask"]
