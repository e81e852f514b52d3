"""Where samples come from: dataset specs and the sets they name (`build_dataset`).

- "synthetic" / "synthetic:N": the embedded procedural set (`SyntheticShapes`, no download; default N 10000).
- a WebDataset shard list: "/d/shards-{0000..0099}.tar" (brace expansion), "/d/*.tar" (glob), a directory of
  .tar files, or remote URLs ("https://...", "pipe:..."). img2dataset layout: key.jpg|.jpeg|.png|.webp, key.txt
  (the caption; key.json's "caption" is used when there is no .txt). Streamed by `shards.py`.
- a .csv / .tsv file with a header naming an image column (filepath|image|path) and a caption column
  (caption|title|text); relative image paths are relative to the file's folder.
- "imagefolder:/path": class subfolders (class name = folder name, "_" -> " "), for evaluation.

A bad sample (missing or corrupt image, missing caption) raises `SkipSample` naming the reason.
"""
from __future__ import annotations

import csv
import glob
import io
import itertools
import os
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..synthetic import SyntheticShapes
from .skips import SkipSample

FORMATS_HELP = (
    "'synthetic' or 'synthetic:N' (embedded procedural set); a WebDataset shard list "
    "('/d/shards-{0000..0099}.tar', '/d/*.tar', a directory of .tar files, or remote URLs); "
    "a .csv/.tsv file (columns filepath|image|path and caption|title|text); "
    "'imagefolder:/path' (class subfolders, for evaluation)"
)
DEFAULT_SYNTHETIC_SAMPLES = 10_000
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm")
CSV_IMAGE_COLUMNS = ("filepath", "image", "path")
CSV_CAPTION_COLUMNS = ("caption", "title", "text")


def open_image(source: Union[str, bytes], name: str) -> Image.Image:
    """Fully decode an image (path or bytes) as RGB, or raise SkipSample naming what failed."""
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
            img.load()  # decode now: truncated data fails here rather than in the transform
            return img.convert("RGB")
    except FileNotFoundError:
        raise SkipSample("missing_file", name) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise SkipSample("corrupt_image", f"{name}: {e}") from None


def clean_caption(caption: Any, name: str) -> str:
    text = caption.strip() if isinstance(caption, str) else ""
    if not text:
        raise SkipSample("missing_caption", name)
    return text


class _ListedImages:
    """A set of image files listed up front: `paths` is a numpy string array, not a list of str, so that forked
    DataLoader workers share its pages instead of copying them on every refcount update."""

    paths: np.ndarray

    def __len__(self) -> int:
        return len(self.paths)


class CsvCaptions(_ListedImages):
    """Image-caption pairs listed in a .csv/.tsv file; `load(i)` -> (PIL image, caption) or SkipSample."""

    def __init__(self, path: str, num_samples: Optional[int] = None):
        self.path = os.path.abspath(path)
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"caption file not found: {path}")
        delimiter = "\t" if self.path.lower().endswith(".tsv") else ","
        root = os.path.dirname(self.path)
        with open(self.path, newline="", encoding="utf-8") as f:
            reader = csv.reader(f, delimiter=delimiter)
            header = next(reader, None)
            if header is None:
                raise ValueError(f"caption file {path} is empty: expected a header row and samples")
            columns = {name.strip().lower(): k for k, name in enumerate(header)}
            image_col = next((columns[c] for c in CSV_IMAGE_COLUMNS if c in columns), None)
            caption_col = next((columns[c] for c in CSV_CAPTION_COLUMNS if c in columns), None)
            if image_col is None or caption_col is None:
                raise ValueError(f"caption file {path} needs an image column ({'|'.join(CSV_IMAGE_COLUMNS)}) and a "
                                 f"caption column ({'|'.join(CSV_CAPTION_COLUMNS)}); its header is {header}")
            paths, captions = [], []
            for row in itertools.islice(reader, num_samples):
                if not row:
                    continue
                image = row[image_col] if image_col < len(row) else ""
                paths.append(os.path.join(root, image) if image else "")
                captions.append(row[caption_col] if caption_col < len(row) else "")
        if not paths:
            raise ValueError(f"caption file {path} has a header but no samples")
        self.paths = np.array(paths)
        self.captions = np.array(captions)  # numpy too, for the same reason as `paths`

    def __repr__(self) -> str:
        return f"CsvCaptions({self.path!r}, {len(self)} samples)"

    def load(self, index: int) -> tuple[Image.Image, str]:
        path = str(self.paths[index])
        caption = clean_caption(str(self.captions[index]), f"row {index + 1} of {self.path}")
        if not path:
            raise SkipSample("missing_file", f"row {index + 1} of {self.path} has no image path")
        return open_image(path, path), caption


class ImageFolder(_ListedImages):
    """Class subfolders of images (`root/<class>/**/<image>`), for evaluation; class names from folder names
    with "_" -> " ". `load(i)` -> (PIL image, label); unreadable images raise (evaluation data must be clean)."""

    def __init__(self, root: str):
        self.root = os.path.abspath(root)
        if not os.path.exists(self.root):
            raise FileNotFoundError(f"imagefolder path not found: {root}")
        if not os.path.isdir(self.root):
            raise NotADirectoryError(f"imagefolder path is not a directory: {root}")
        folders = sorted(d.name for d in os.scandir(self.root) if d.is_dir() and not d.name.startswith("."))
        if not folders:
            raise ValueError(f"imagefolder {root} has no class subfolders (expected {root}/<class name>/<images>)")
        self.folders = folders
        self.class_names = [name.replace("_", " ") for name in folders]
        paths, labels = [], []
        for label, folder in enumerate(folders):
            for dirpath, dirnames, filenames in os.walk(os.path.join(self.root, folder)):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                for name in sorted(filenames):
                    if name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith("."):
                        paths.append(os.path.join(dirpath, name))
                        labels.append(label)
        if not paths:
            raise ValueError(f"imagefolder {root} has {len(folders)} class folders but no images "
                             f"({', '.join(IMAGE_EXTENSIONS)})")
        self.paths = np.array(paths)
        self.labels = torch.tensor(labels, dtype=torch.long)

    def __repr__(self) -> str:
        return f"ImageFolder({self.root!r}, {len(self)} images, {len(self.class_names)} classes)"

    def load(self, index: int) -> tuple[Image.Image, int]:
        path = str(self.paths[index])
        try:
            image = open_image(path, path)
        except SkipSample as e:
            raise ValueError(f"evaluation image unreadable ({e})") from None
        return image, int(self.labels[index])


class ShardSource:
    """A WebDataset shard list (img2dataset layout); iterated by `make_loader`."""

    def __init__(self, spec: str, urls: Sequence[str]):
        self.spec = spec
        self.urls = list(urls)

    def __len__(self) -> int:
        """The number of shards (the number of samples is unknown until read)."""
        return len(self.urls)

    def __repr__(self) -> str:
        return f"ShardSource({self.spec!r}, {len(self.urls)} shards)"


def _is_remote(url: str) -> bool:
    return "://" in url or url.startswith("pipe:")


def _is_tar(url: str) -> bool:
    return url.lower().endswith((".tar", ".tar.gz", ".tgz"))


def _expand_shards(spec: str) -> list[str]:
    """Shard urls of a spec, or [] if the spec is not a shard list; raises when it is one but nothing exists."""
    import braceexpand  # a dependency of webdataset (the `train` extra)

    if os.path.isdir(spec):
        urls = sorted(p for p in glob.glob(os.path.join(spec, "*")) if _is_tar(p))
        if not urls:
            raise FileNotFoundError(f"no .tar shards in directory {spec!r}; for class subfolders use "
                                    f"'imagefolder:{spec}'. Formats: {FORMATS_HELP}")
        return urls
    urls = [u for part in spec.split("::") for u in braceexpand.braceexpand(part)]
    if not urls or not all(_is_tar(u) for u in urls):
        return []
    local: list[str] = []
    for url in urls:
        if _is_remote(url):
            local.append(url)
        elif any(c in url for c in "*?["):
            local.extend(sorted(glob.glob(url)))
        else:
            local.append(url)
    missing = [u for u in local if not _is_remote(u) and not os.path.isfile(u)]
    if not local:
        raise FileNotFoundError(f"no shards matched {spec!r}")
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise FileNotFoundError(f"{len(missing)} of {len(local)} shards of {spec!r} not found: "
                                f"{', '.join(missing[:3])}{more}")
    return local


def synthetic_size(spec: str, num_samples: Optional[int]) -> int:
    _, _, count = spec.partition(":")
    if count:
        if not count.isdigit() or int(count) < 1:
            raise ValueError(f"bad dataset spec {spec!r}: 'synthetic:N' needs a positive integer N")
        if num_samples is not None and num_samples != int(count):
            raise ValueError(f"dataset spec {spec!r} and num_samples={num_samples} disagree")
        return int(count)
    return DEFAULT_SYNTHETIC_SAMPLES if num_samples is None else num_samples


def build_dataset(spec: str = "synthetic", *, split: str = "train", seed: int = 0, image_size: int = 224,
                  num_samples: Optional[int] = None):
    """The dataset named by `spec` (see the module docstring for the formats).

    Returns a map-style caption set (`SyntheticShapes` or `CsvCaptions`: `len()` and `load(i) -> (image,
    caption)`), a `ShardSource` or an `ImageFolder`. `split` and `image_size` select the synthetic split and
    resolution; `num_samples` caps synthetic and CSV sets (it does not apply to shards or folders)."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"dataset spec must be a non-empty string; formats: {FORMATS_HELP}")
    spec = spec.strip()
    if num_samples is not None and (isinstance(num_samples, bool) or not isinstance(num_samples, int)
                                    or num_samples < 1):
        raise ValueError(f"num_samples must be a positive integer or None, got {num_samples!r}")
    if spec == "synthetic" or spec.startswith("synthetic:"):
        return SyntheticShapes(synthetic_size(spec, num_samples), image_size, seed, split)
    if spec.startswith("imagefolder:"):
        if num_samples is not None:
            raise ValueError(f"num_samples does not apply to {spec!r}: an image folder is used whole")
        path = spec[len("imagefolder:"):]
        if not path:
            raise ValueError("bad dataset spec 'imagefolder:': give a path, e.g. 'imagefolder:/data/val'")
        return ImageFolder(path)
    if spec.lower().endswith((".csv", ".tsv")):
        if not os.path.isfile(spec):
            raise FileNotFoundError(f"caption file not found: {spec!r}")
        return CsvCaptions(spec, num_samples)
    urls = _expand_shards(spec)
    if urls:
        if num_samples is not None:
            raise ValueError(f"num_samples does not apply to the shard list {spec!r}: streams have no fixed size")
        return ShardSource(spec, urls)
    if not _is_remote(spec) and not os.path.exists(spec) and (os.sep in spec or os.path.splitext(spec)[1]):
        raise FileNotFoundError(f"dataset not found: {spec!r} (no such file or directory); formats: {FORMATS_HELP}")
    raise ValueError(f"unknown dataset spec {spec!r}; formats: {FORMATS_HELP}")
