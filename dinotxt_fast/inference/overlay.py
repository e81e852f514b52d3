"""Pictures of a segmentation: a colourised overlay with a legend, and the raw label map as a PNG."""
from __future__ import annotations

import colorsys
import re
from pathlib import Path
from typing import Sequence

import torch


def palette(n: int) -> list[tuple[int, int, int]]:
    """n distinct, deterministic RGB colours (golden-ratio hue steps, alternating saturation and value)."""
    colours = []
    for i in range(n):
        h = (i * 0.618033988749895) % 1.0
        s = 0.9 if i % 2 == 0 else 0.6
        v = 0.95 if (i // 2) % 2 == 0 else 0.75
        colours.append(tuple(int(round(255 * c)) for c in colorsys.hsv_to_rgb(h, s, v)))
    return colours


def class_colours(names: Sequence[str]) -> list[tuple[int, int, int]]:
    """One RGB colour per class: a class named after a colour (an HTML/CSS colour name such as "blue", "dark green"
    or "light-grey") is painted in that colour, so a picture of the labels never shows "blue" in red; every other
    class takes the palette colour of its index."""
    from PIL import ImageColor

    colours = palette(len(names))
    for i, name in enumerate(names):
        key = re.sub(r"[\s_-]+", "", name.lower())
        if key in ImageColor.colormap:
            colours[i] = ImageColor.getrgb(key)[:3]
    return colours


def render_overlay(image, labels: torch.Tensor, names: Sequence[str], alpha: float = 0.5):
    """RGB PIL image blended with the colourised label map (`class_colours`), plus a legend of the classes present
    (by area)."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFont

    lab = labels.cpu().numpy()
    colours = np.array(class_colours(names), dtype=np.float32)
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    blended = ((1 - alpha) * base + alpha * colours[lab]).round().clip(0, 255).astype(np.uint8)
    overlay = Image.fromarray(blended)

    counts = np.bincount(lab.reshape(-1), minlength=len(names))
    present = [int(c) for c in np.argsort(-counts, kind="stable") if counts[c] > 0]
    # Legend text scales with the image so it stays readable on large photos.
    font_size = max(11, overlay.height // 40)
    try:
        font = ImageFont.load_default(size=font_size)
    except (TypeError, ImportError, OSError):  # Pillow < 10.1 or without FreeType: the fixed bitmap font
        font, font_size = ImageFont.load_default(), 11
    lines = [f"{names[c]} ({100.0 * counts[c] / lab.size:.1f}%)" for c in present]
    row_h, swatch, pad = int(font_size * 1.6), font_size, font_size // 2 + 4
    text_w = max(int(ImageDraw.Draw(overlay).textlength(t, font=font)) for t in lines)
    legend_w = pad + swatch + 6 + text_w + pad
    height = max(overlay.height, pad + row_h * len(lines) + pad)
    canvas = Image.new("RGB", (overlay.width + legend_w, height), (255, 255, 255))
    canvas.paste(overlay, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for row, (c, text) in enumerate(zip(present, lines)):
        y = pad + row * row_h
        x = overlay.width + pad
        draw.rectangle([x, y + 2, x + swatch, y + 2 + swatch], fill=tuple(int(v) for v in colours[c]),
                       outline=(0, 0, 0))
        draw.text((x + swatch + 6, y), text, fill=(0, 0, 0), font=font)
    return canvas


def save_label_png(labels: torch.Tensor, path: Path, num_classes: int) -> None:
    """The label map as a PNG whose pixels are class indices (8-bit up to 256 classes, else 16-bit)."""
    import numpy as np
    from PIL import Image

    array = labels.cpu().numpy().astype(np.uint8 if num_classes <= 256 else np.uint16)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
