"""Image transforms for training and evaluation, with PIL + torch only (no torchvision).

Every random choice comes from a generator passed to the call, never from global RNG state, so a sample's
augmentation is a pure function of what seeded that generator. The data layer seeds one generator per
(seed, epoch, sample index) with `sample_generator`: a 1-process run, an N-process run and a resumed run
therefore see identical crops, whatever the number of DataLoader workers.

- `TrainTransform`: torchvision's RandomResizedCrop (same `get_params` algorithm: 10 attempts, then a
  centre-crop fallback), PIL bicubic resize, random horizontal flip, ImageNet normalisation.
- `EvalTransform`: resize the short side (bicubic), centre crop, normalise (the official protocol:
  short side 256 for a 224 crop).
- `FixedCropTransform`: the deterministic view cached by the feature cache: short side resized to the crop
  size, centre crop (the largest central square), no flip.

All three take `(img, generator=None)` and return float32 [3, S, S].
"""
from __future__ import annotations

import math
import random
from typing import Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image

from ..inference.images import center_crop, resize_short_side, to_tensor

Generator = Union[torch.Generator, random.Random]

# The official eval resize for a 224 crop (dinov2 `make_classification_eval_transform`): short side 256.
EVAL_RESIZE_RATIO = 256 / 224


def derive_seed(*parts: int) -> int:
    """A well-mixed 64-bit seed from integers (e.g. seed, epoch, index) via numpy's SeedSequence.

    Adjacent inputs give unrelated streams, unlike `seed + epoch`; negative parts are taken modulo 2**64."""
    words = [int(p) & 0xFFFF_FFFF_FFFF_FFFF for p in parts]
    return int(np.random.SeedSequence(words).generate_state(1, dtype=np.uint64)[0])


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """The torch.Generator that drives the augmentation of sample `index` in `epoch` of a run seeded `seed`."""
    return torch.Generator().manual_seed(derive_seed(seed, epoch, index))


def _check_size(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _check_range(name: str, value: Sequence[float]) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair (min, max) of numbers, got {value!r}") from None
    if not 0 < lo <= hi:
        raise ValueError(f"{name} must satisfy 0 < min <= max, got {value!r}")
    return lo, hi


def _uniform(gen: Generator, lo: float, hi: float) -> float:
    if isinstance(gen, random.Random):
        return gen.uniform(lo, hi)
    return torch.empty(1).uniform_(lo, hi, generator=gen).item()


def _randint(gen: Generator, lo: int, hi: int) -> int:
    """Uniform integer in [lo, hi) (torch.randint's convention)."""
    if isinstance(gen, random.Random):
        return gen.randrange(lo, hi)
    return int(torch.randint(lo, hi, (1,), generator=gen).item())


def _rand(gen: Generator) -> float:
    if isinstance(gen, random.Random):
        return gen.random()
    return torch.rand(1, generator=gen).item()


def _check_generator(gen: object) -> Generator:
    if not isinstance(gen, (torch.Generator, random.Random)):
        raise TypeError("TrainTransform needs its randomness passed per call: give a torch.Generator or "
                        f"random.Random (e.g. sample_generator(seed, epoch, index)), got {type(gen).__name__}")
    return gen


def random_resized_crop_params(width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float],
                               gen: Generator) -> tuple[int, int, int, int]:
    """torchvision's `RandomResizedCrop.get_params`: (top, left, height, width) of the crop box."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * _uniform(gen, scale[0], scale[1])
        aspect_ratio = math.exp(_uniform(gen, log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            top = _randint(gen, 0, height - h + 1)
            left = _randint(gen, 0, width - w + 1)
            return top, left, h, w
    # Fallback: the largest central crop whose aspect ratio is within `ratio`.
    in_ratio = width / height
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _as_rgb(img: Image.Image) -> Image.Image:
    if not isinstance(img, Image.Image):
        raise TypeError(f"expected a PIL image, got {type(img).__name__}")
    if img.width < 1 or img.height < 1:
        raise ValueError(f"image has no pixels: size {img.width}x{img.height}")
    return img if img.mode == "RGB" else img.convert("RGB")


class TrainTransform:
    """RandomResizedCrop (bicubic) + horizontal flip + ImageNet normalisation -> float32 [3, S, S].

    `transform(img, generator)`: all randomness comes from `generator` (torch.Generator or random.Random)."""

    def __init__(self, image_size: int = 224, scale: Sequence[float] = (0.08, 1.0),
                 ratio: Sequence[float] = (3 / 4, 4 / 3), hflip: float = 0.5):
        self.image_size = _check_size("image_size", image_size)
        self.scale = _check_range("scale", scale)
        self.ratio = _check_range("ratio", ratio)
        if not 0.0 <= float(hflip) <= 1.0:
            raise ValueError(f"hflip is a probability in [0, 1], got {hflip!r}")
        self.hflip = float(hflip)

    def __call__(self, img: Image.Image, generator: Optional[Generator] = None) -> torch.Tensor:
        gen = _check_generator(generator)
        img = _as_rgb(img)
        top, left, h, w = random_resized_crop_params(img.width, img.height, self.scale, self.ratio, gen)
        size = self.image_size
        img = img.crop((left, top, left + w, top + h)).resize((size, size), Image.BICUBIC)
        # Always draw the flip coin so the generator's stream does not depend on hflip's value.
        if _rand(gen) < self.hflip:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        return to_tensor(img)

    def __repr__(self) -> str:
        return (f"TrainTransform(image_size={self.image_size}, scale={self.scale}, ratio={self.ratio}, "
                f"hflip={self.hflip})")


class EvalTransform:
    """Resize the short side to `resize_size` (bicubic), centre crop `image_size`, normalise.

    `resize_size=None` keeps the official 256:224 ratio (256 for a 224 crop)."""

    def __init__(self, image_size: int = 224, resize_size: Optional[int] = None):
        self.image_size = _check_size("image_size", image_size)
        if resize_size is None:
            resize_size = int(round(self.image_size * EVAL_RESIZE_RATIO))
        self.resize_size = _check_size("resize_size", resize_size)
        if self.resize_size < self.image_size:
            raise ValueError(f"resize_size ({self.resize_size}) must be >= image_size ({self.image_size}): "
                             "the centre crop must fit in the resized image")

    def __call__(self, img: Image.Image, generator: Optional[Generator] = None) -> torch.Tensor:
        img = resize_short_side(_as_rgb(img), self.resize_size)
        return to_tensor(center_crop(img, self.image_size))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(image_size={self.image_size}, resize_size={self.resize_size})"


class FixedCropTransform(EvalTransform):
    """The deterministic training view for the feature cache: short side -> `image_size` (bicubic), then the
    central square; no flip. It keeps as much of the image as a square crop can, so captions stay valid."""

    def __init__(self, image_size: int = 224):
        super().__init__(image_size, resize_size=image_size)

    def __repr__(self) -> str:
        return f"FixedCropTransform(image_size={self.image_size})"


__all__ = ["TrainTransform", "EvalTransform", "FixedCropTransform", "random_resized_crop_params",
           "derive_seed", "sample_generator", "EVAL_RESIZE_RATIO"]
