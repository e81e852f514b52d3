"""An embedded, procedurally generated captioned image set with segmentation masks: no download needed.

Each image shows 1-3 coloured shapes on a muted background. The first object is the *main* one: large
and, in multi-object images, the only large one; the others are small distractors. Objects never overlap
(their bounding boxes are disjoint), so every object named in the caption is visible and owns its pixels
in the mask. Everything is a pure function of (seed, split, index): `SyntheticShapes(...)[i]` is the same
on every machine, in every process, every time.

Vocabulary: 8 colours x 6 shapes x 3 textures (plain, striped, dotted; the stripes and dots are a darker
shade of the object's own colour, so a pixel's colour class is the object's), on plain, gradient or noisy
backgrounds of low saturation and mid brightness, which no object colour resembles (white and black
objects included).

Captions name every object, main first, from several templates: "a photo of a large striped red circle
and a small blue star on a noisy background.", "a green triangle.", ...; one object name in five is the
generic "shape", the word of the colour prompts.

Evaluation label sets (`label_set=`):
- "colour" (the default): the main object's colour, 8 classes, prompts like "a photo of a red shape.".
  Chosen because colour is what a tiny model trained for minutes on a 2-core CPU learns well above chance
  (1/8): it is visible at any resolution, in any crop, and is named in every caption.
- "shape": the main object's shape, 6 classes; harder at low resolution.
- "colour_shape": both, 48 classes ("red circle").
Segmentation: `segmentation_class_names` = background + the 8 colours; mask value 0 is background and
1 + colour index marks an object's pixels.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import numpy as np
from PIL import Image, ImageDraw

COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
COLOUR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (215, 25, 30), "green": (30, 165, 45), "blue": (30, 70, 215), "yellow": (240, 215, 25),
    "purple": (135, 45, 175), "orange": (245, 135, 15), "white": (245, 245, 245), "black": (15, 15, 15),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "diamond")
TEXTURES: tuple[str, ...] = ("plain", "striped", "dotted")
BACKGROUNDS: tuple[str, ...] = ("plain", "gradient", "noisy")

LABEL_SETS: dict[str, tuple[str, ...]] = {
    "colour": COLOURS,
    "shape": SHAPES,
    "colour_shape": tuple(f"{c} {s}" for c in COLOURS for s in SHAPES),
}
SEGMENTATION_CLASS_NAMES: tuple[str, ...] = ("background",) + COLOURS

# Disjoint random streams for the two splits (the split tag is part of every sample's seed).
_SPLIT_TAGS = {"train": 0, "val": 1}

# Object sizes as fractions of the image side (bounding-box side).
_MAIN_SIZE = (0.45, 0.65)
_SMALL_SIZE = (0.16, 0.26)
_MIN_OBJECT_PX = 6
# Probability of 1, 2, 3 objects for each `max_objects`.
_OBJECT_COUNT_P = {1: [1.0], 2: [0.6, 0.4], 3: [0.5, 0.3, 0.2]}
# Texture shade: a darker version of the colour; white and black get greys far from the muted backgrounds.
_SHADE_FACTOR = 0.6
_SHADE_OVERRIDE = {"white": 195, "black": 60}
_MIN_IMAGE_SIZE = 16
_GENERIC_NOUN_P = 0.2

_CAPTION_TEMPLATES: tuple[str, ...] = (
    "{objects}.",
    "a photo of {objects}.",
    "a picture of {objects}.",
    "an image of {objects}.",
    "a drawing of {objects}.",
    "{objects} on a {background} background.",
    "a photo of {objects} on a {background} background.",
    "there is {objects} in the picture.",
)


def with_article(phrase: str) -> str:
    """'a red circle', 'an orange star'."""
    return ("an " if phrase[:1] in "aeiou" else "a ") + phrase


def _colour_prompt(name: str) -> str:
    return f"a photo of {with_article(name)} shape."


def _colour_prompt_short(name: str) -> str:
    return f"{with_article(name)} shape."


def _object_prompt(name: str) -> str:
    return f"a photo of {with_article(name)}."


def _object_prompt_short(name: str) -> str:
    return f"{with_article(name)}."


def _segmentation_prompt(name: str) -> str:
    return "the background." if name == "background" else f"{with_article(name)} shape."


# Zero-shot prompt templates per label set: callables so that articles agree ("an orange shape").
ZERO_SHOT_TEMPLATES: dict[str, tuple[Callable[[str], str], ...]] = {
    "colour": (_colour_prompt, _colour_prompt_short),
    "shape": (_object_prompt, _object_prompt_short),
    "colour_shape": (_object_prompt, _object_prompt_short),
}
SEGMENTATION_TEMPLATES: tuple[Callable[[str], str], ...] = (_segmentation_prompt,)

# Captions of the object-free training images (the background alone). Without them no caption ever shows a
# background by itself, so the segmentation prompt "the background." had no target and won on 5% of the patches
# although 84% are background (issue #13). Image-level captions only: no mask is used in training.
BACKGROUND_CAPTIONS: tuple[str, ...] = (
    "a {background} background.", "an empty {background} background.", "a photo of a {background} background.",
    "a picture of an empty {background} background.", "only a {background} background.",
    "a {background} background with no shape.",
)
# Share of the train split's samples that show no object (the val split, hence every evaluation set, has none).
DEFAULT_BACKGROUND_SHARE = 0.1


def _shape_polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """Vertices of `shape` centred at (cx, cy) inside a box of half-side r (circle is drawn separately)."""
    def ring(radii: list[float], start: float) -> list[tuple[float, float]]:
        n = len(radii)
        return [(cx + rad * math.cos(start + 2 * math.pi * k / n), cy + rad * math.sin(start + 2 * math.pi * k / n))
                for k, rad in enumerate(radii)]

    if shape == "square":  # axis-aligned, so it is never confused with the diamond
        s = 0.85 * r
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if shape == "diamond":  # a rhombus taller than wide
        return [(cx, cy - r), (cx + 0.7 * r, cy), (cx, cy + r), (cx - 0.7 * r, cy)]
    if shape == "triangle":
        return ring([r] * 3, angle)
    if shape == "star":
        return ring([r, 0.45 * r] * 5, angle)
    if shape == "cross":  # a plus sign with arms a third of the size thick
        a, t = 0.95 * r, 0.33 * r
        return [(cx - t, cy - a), (cx + t, cy - a), (cx + t, cy - t), (cx + a, cy - t), (cx + a, cy + t),
                (cx + t, cy + t), (cx + t, cy + a), (cx - t, cy + a), (cx - t, cy + t), (cx - a, cy + t),
                (cx - a, cy - t), (cx - t, cy - t)]
    raise ValueError(f"unknown shape {shape!r}")


def _background(rng: np.random.Generator, size: int, kind: str) -> np.ndarray:
    """Muted (low-saturation, mid-brightness) background, uint8 [S, S, 3]."""
    def muted() -> np.ndarray:
        return rng.integers(95, 166) + rng.integers(-18, 19, size=3)

    if kind == "plain":
        return np.full((size, size, 3), muted(), dtype=np.uint8)
    if kind == "gradient":
        a, b = muted().astype(np.float32), muted().astype(np.float32)
        theta = rng.uniform(0, 2 * math.pi)
        coords = np.linspace(-0.5, 0.5, size, dtype=np.float32)
        # t in [0, 1] along direction theta (|cos| + |sin| <= sqrt 2, hence the clip).
        t = np.clip(np.float32(math.cos(theta)) * coords[None, :] + np.float32(math.sin(theta)) * coords[:, None]
                    + np.float32(0.5), 0.0, 1.0)
        # A 256-entry colour ramp indexed by t is ~2x faster than blending all [S, S, 3] floats.
        ramp = (a + np.linspace(0.0, 1.0, 256, dtype=np.float32)[:, None] * (b - a)).astype(np.uint8)
        return ramp[(t * np.float32(255)).astype(np.uint8)]
    if kind == "noisy":
        # uint8 throughout: base in [77, 183] and noise in [-28, 28] cannot leave [0, 255].
        noise = rng.integers(0, 57, size=(size, size, 1), dtype=np.uint8)
        return (muted() - 28).astype(np.uint8) + noise
    raise ValueError(f"unknown background {kind!r}")


class SyntheticShapes:
    """Procedural captioned shapes with masks; `ds[i]` is a pure function of (seed, split, i).

    `ds[i]` -> dict(image=PIL RGB image [S x S], caption=str, mask=int64 ndarray [S, S] (0 background,
    1 + colour index on object pixels), label=int (class of the main object in `label_set`),
    labels=dict(colour=..., shape=..., colour_shape=...), objects=list of (colour, shape, texture) main first).
    `max_objects=1` gives single-object images (used for the zero-shot set: an unambiguous label).
    `background_share` of the samples show the background alone, with a background caption, an all-zero mask,
    label -1 and no objects (default: DEFAULT_BACKGROUND_SHARE on the train split, 0 on val); which samples is
    drawn from its own stream, so every other sample is the same as with `background_share=0`.
    """

    def __init__(self, num_samples: int, image_size: int = 224, seed: int = 0, split: str = "train",
                 label_set: str = "colour", max_objects: int = 3, background_share: Optional[float] = None):
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < _MIN_IMAGE_SIZE:
            raise ValueError(f"image_size must be an integer >= {_MIN_IMAGE_SIZE}, got {image_size!r}")
        if split not in _SPLIT_TAGS:
            raise ValueError(f"split must be one of {sorted(_SPLIT_TAGS)}, got {split!r}")
        if label_set not in LABEL_SETS:
            raise ValueError(f"label_set must be one of {sorted(LABEL_SETS)}, got {label_set!r}")
        if max_objects not in (1, 2, 3):
            raise ValueError(f"max_objects must be 1, 2 or 3, got {max_objects!r}")
        self.num_samples = num_samples
        self.image_size = image_size
        self.seed = int(seed)
        self.split = split
        self.label_set = label_set
        self.max_objects = max_objects
        if background_share is None:
            background_share = DEFAULT_BACKGROUND_SHARE if split == "train" else 0.0
        if isinstance(background_share, bool) or not 0.0 <= background_share < 1.0:
            raise ValueError(f"background_share must be a number in [0, 1), got {background_share!r}")
        self.background_share = float(background_share)
        self.class_names: list[str] = list(LABEL_SETS[label_set])
        self.templates = ZERO_SHOT_TEMPLATES[label_set]
        self.segmentation_class_names: list[str] = list(SEGMENTATION_CLASS_NAMES)
        self.segmentation_templates = SEGMENTATION_TEMPLATES
        self._yy, self._xx = np.mgrid[0:image_size, 0:image_size]

    def __len__(self) -> int:
        return self.num_samples

    def __repr__(self) -> str:
        return (f"SyntheticShapes(num_samples={self.num_samples}, image_size={self.image_size}, seed={self.seed}, "
                f"split={self.split!r}, label_set={self.label_set!r}, max_objects={self.max_objects}, "
                f"background_share={self.background_share})")

    def _check_index(self, index: int) -> int:
        if not isinstance(index, (int, np.integer)) or isinstance(index, bool):
            raise TypeError(f"index must be an integer, got {type(index).__name__}")
        if not -self.num_samples <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} synthetic samples")
        return int(index) % self.num_samples

    def load(self, index: int) -> tuple[Image.Image, str]:
        """(image, caption) of sample `index` (the interface of the data layer's caption datasets)."""
        item = self[index]
        return item["image"], item["caption"]

    def __getitem__(self, index: int) -> dict:
        index = self._check_index(index)
        if self.background_share > 0:
            pick = np.random.default_rng([self.seed & 0xFFFF_FFFF_FFFF_FFFF, _SPLIT_TAGS[self.split], index, 1])
            if pick.random() < self.background_share:
                return self._background_only(pick)
        rng = np.random.default_rng([self.seed & 0xFFFF_FFFF_FFFF_FFFF, _SPLIT_TAGS[self.split], index])
        size = self.image_size
        n_objects = 1 + int(rng.choice(self.max_objects, p=_OBJECT_COUNT_P[self.max_objects]))
        background = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
        pixels = _background(rng, size, background)
        mask = np.zeros((size, size), dtype=np.int64)

        objects = []
        boxes: list[tuple[int, int, int, int]] = []
        for k in range(n_objects):
            lo, hi = _MAIN_SIZE if k == 0 else _SMALL_SIZE
            side = max(_MIN_OBJECT_PX, int(round(rng.uniform(lo, hi) * size)))
            box = self._place(rng, side, boxes)
            if box is None:  # no free room for this distractor: the image simply has fewer objects
                break
            boxes.append(box)
            colour = COLOURS[rng.integers(len(COLOURS))]
            shape = SHAPES[rng.integers(len(SHAPES))]
            texture = TEXTURES[rng.integers(len(TEXTURES))] if rng.random() < 0.5 else "plain"
            self._draw(rng, pixels, mask, box, colour, shape, texture)
            objects.append((colour, shape, texture))

        colour, shape, _ = objects[0]
        labels = {"colour": COLOURS.index(colour), "shape": SHAPES.index(shape),
                  "colour_shape": COLOURS.index(colour) * len(SHAPES) + SHAPES.index(shape)}
        return dict(image=Image.fromarray(pixels, "RGB"), caption=self._caption(rng, objects, background),
                    mask=mask, label=labels[self.label_set], labels=labels, objects=objects)

    def _background_only(self, rng: np.random.Generator) -> dict:
        kind = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
        pixels = _background(rng, self.image_size, kind)
        caption = BACKGROUND_CAPTIONS[rng.integers(len(BACKGROUND_CAPTIONS))].format(background=kind)
        return dict(image=Image.fromarray(pixels, "RGB"), caption=caption,
                    mask=np.zeros((self.image_size, self.image_size), dtype=np.int64), label=-1,
                    labels={name: -1 for name in LABEL_SETS}, objects=[])

    def _place(self, rng: np.random.Generator, side: int,
               boxes: list[tuple[int, int, int, int]]) -> Optional[tuple[int, int, int, int]]:
        """A box (x0, y0, x1, y1) of `side` inside the image, disjoint from `boxes` (20 tries)."""
        size = self.image_size
        margin = 1
        for _ in range(20):
            x0 = int(rng.integers(margin, size - side - margin + 1))
            y0 = int(rng.integers(margin, size - side - margin + 1))
            box = (x0, y0, x0 + side, y0 + side)
            if all(box[2] <= b[0] or b[2] <= box[0] or box[3] <= b[1] or b[3] <= box[1] for b in boxes):
                return box
        return None

    def _draw(self, rng: np.random.Generator, pixels: np.ndarray, mask: np.ndarray, box: tuple[int, int, int, int],
              colour: str, shape: str, texture: str) -> None:
        x0, y0, x1, y1 = box
        side = x1 - x0
        # Draw the shape's footprint in box-local coordinates; the same footprint paints pixels and mask.
        footprint = Image.new("L", (side, side), 0)
        draw = ImageDraw.Draw(footprint)
        r = (side - 1) / 2
        if shape == "circle":
            draw.ellipse((0, 0, side - 1, side - 1), fill=255)
        else:
            draw.polygon(_shape_polygon(shape, r, r, r, rng.uniform(0, 2 * math.pi)), fill=255)
        inside = np.asarray(footprint) > 0

        rgb = np.clip(np.array(COLOUR_RGB[colour]) + rng.integers(-12, 13, size=3), 0, 255)
        patch = pixels[y0:y1, x0:x1]
        patch[inside] = rgb
        if texture != "plain":
            shade = np.full(3, _SHADE_OVERRIDE[colour]) if colour in _SHADE_OVERRIDE else rgb * _SHADE_FACTOR
            yy, xx = self._yy[:side, :side], self._xx[:side, :side]
            period = max(4, side // 5)
            if texture == "striped":
                theta = rng.uniform(0, math.pi)
                phase = (xx * math.cos(theta) + yy * math.sin(theta)) % period
                pattern = phase < period / 2
            else:  # dotted
                dy, dx = yy % period - period / 2, xx % period - period / 2
                pattern = dx * dx + dy * dy <= (period * 0.3) ** 2
            patch[inside & pattern] = shade.astype(np.uint8)
        mask[y0:y1, x0:x1][inside] = 1 + COLOURS.index(colour)

    @staticmethod
    def _caption(rng: np.random.Generator, objects: list[tuple[str, str, str]], background: str) -> str:
        phrases = []
        for k, (colour, shape, texture) in enumerate(objects):
            words = []
            if len(objects) > 1:
                words.append(("large", "big")[rng.integers(2)] if k == 0 else "small")
            if texture != "plain":
                words.append(texture)
            # Sometimes just "shape": the word the colour prompts use ("a photo of a red shape.").
            words += [colour, shape if rng.random() >= _GENERIC_NOUN_P else "shape"]
            phrases.append(with_article(" ".join(words)))
        if len(phrases) == 1:
            text = phrases[0]
        else:
            text = ", ".join(phrases[:-1]) + " and " + phrases[-1]
        template = _CAPTION_TEMPLATES[rng.integers(len(_CAPTION_TEMPLATES))]
        return template.format(objects=text, background=background)


__all__ = ["SyntheticShapes", "COLOURS", "COLOUR_RGB", "SHAPES", "TEXTURES", "BACKGROUNDS", "LABEL_SETS",
           "SEGMENTATION_CLASS_NAMES", "ZERO_SHOT_TEMPLATES", "SEGMENTATION_TEMPLATES", "BACKGROUND_CAPTIONS",
           "DEFAULT_BACKGROUND_SHARE", "with_article"]
