"""The trainer's data layer: dataset specs, skip accounting, deterministic distributed batching, loaders.

Dataset specs (`build_dataset`):
- "synthetic" / "synthetic:N": the embedded procedural set (`SyntheticShapes`, no download; default N 10000).
- a WebDataset shard list: "/d/shards-{0000..0099}.tar" (brace expansion), "/d/*.tar" (glob), a directory of
  .tar files, or remote URLs ("https://...", "pipe:..."). img2dataset layout: key.jpg|.jpeg|.png|.webp, key.txt
  (the caption; key.json's "caption" is used when there is no .txt).
- a .csv / .tsv file with a header naming an image column (filepath|image|path) and a caption column
  (caption|title|text); relative image paths are relative to the file's folder.
- "imagefolder:/path": class subfolders (class name = folder name, "_" -> " "), for evaluation.

Bad samples (missing or corrupt image, missing caption, unreadable tar entry) are skipped and counted per
reason in a `SkipCounter`, never fatal. In map-style sets (synthetic, CSV) a bad sample is replaced by the
next readable index so batches stay full and deterministic.

Determinism and resuming. Map-style sets are batched by `GlobalBatchSampler`: step s takes the global batch
[k*G, (k+1)*G) of a seeded permutation of epoch s // steps_per_epoch, and rank r gets the contiguous slice
[r*G/W, (r+1)*G/W) of it, so the ranks' batches concatenate to exactly the 1-process global batch. Every
sample's augmentation is seeded by (seed, epoch, index). Resuming from step k (`start_step=k`) therefore
reproduces exactly the batches of an uninterrupted run, for any number of ranks and workers.

WebDataset streams are split by shard: the shard list is shuffled per epoch (same order on every rank), rank
r takes every W-th shard, DataLoader worker w every n-th of those; samples pass a seeded shuffle buffer, and
augmentation is seeded by (seed, epoch, shard url + sample key). Resuming skips the samples already consumed
(each worker skips the raw samples of the batches it delivered) without decoding them. With the same world
size and num_workers that is exact when no sample was bad; otherwise it is approximate ordering-wise: each
bad sample skipped before the resume point shifts the resumed stream by one sample, and another worker or
rank count re-deals the shards. Shuffled streams are no i.i.d. guarantee either: the shuffle buffer only
mixes samples within `shuffle_buffer` of each other.
"""
from __future__ import annotations

import csv
import glob
import io
import itertools
import json
import logging
import math
import os
import random
import warnings
import zlib
from typing import Any, Callable, Iterator, Mapping, NamedTuple, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from ..inference.images import to_tensor
from ..models.tokenizer import DEFAULT_CONTEXT_LENGTH, tokenize
from .synthetic import SyntheticShapes
from .transforms import EvalTransform, FixedCropTransform, TrainTransform, derive_seed, sample_generator

logger = logging.getLogger(__name__)

FORMATS_HELP = (
    "'synthetic' or 'synthetic:N' (embedded procedural set); a WebDataset shard list "
    "('/d/shards-{0000..0099}.tar', '/d/*.tar', a directory of .tar files, or remote URLs); "
    "a .csv/.tsv file (columns filepath|image|path and caption|title|text); "
    "'imagefolder:/path' (class subfolders, for evaluation)"
)
DEFAULT_SYNTHETIC_SAMPLES = 10_000
DEFAULT_ZERO_SHOT_SAMPLES = 512
# open_clip's training crop for image-text pairs: captions describe the whole image, so crops stay large.
DEFAULT_CROP_SCALE = (0.9, 1.0)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm")
WDS_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
CSV_IMAGE_COLUMNS = ("filepath", "image", "path")
CSV_CAPTION_COLUMNS = ("caption", "title", "text")
# How many consecutive bad samples a map-style set may replace before the data is declared broken.
MAX_SUBSTITUTIONS = 100

# Tags that keep the seeded streams of different purposes apart (see `derive_seed`).
_PERMUTATION_TAG = 0x5045524D
_SHARD_ORDER_TAG = 0x53484152
_SHUFFLE_BUFFER_TAG = 0x42554646


# ----------------------------------------------------------------------------------------------- skips

class SkipSample(Exception):
    """A sample that cannot be used; `reason` is the SkipCounter key (e.g. "corrupt_image")."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


class SkipCounter:
    """Counts of skipped samples per reason: missing_file, corrupt_image, missing_image, missing_caption,
    tar_error. Loaders merge the counts of all their workers here; the training loop logs it."""

    def __init__(self, counts: Optional[Mapping[str, int]] = None):
        self.counts: dict[str, int] = {}
        if counts:
            self.update(counts)

    def add(self, reason: str, n: int = 1) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + int(n)

    def update(self, other: Union["SkipCounter", Mapping[str, int]]) -> None:
        items = other.counts if isinstance(other, SkipCounter) else other
        for reason, n in items.items():
            self.add(reason, n)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def as_dict(self) -> dict[str, int]:
        return dict(sorted(self.counts.items()))

    def __getitem__(self, reason: str) -> int:
        return self.counts.get(reason, 0)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, SkipCounter):
            return self.as_dict() == other.as_dict()
        if isinstance(other, Mapping):
            return self.as_dict() == dict(sorted(other.items()))
        return NotImplemented

    def __repr__(self) -> str:
        detail = ", ".join(f"{k}={v}" for k, v in self.as_dict().items())
        return f"SkipCounter({self.total} skipped{': ' + detail if detail else ''})"


def _merge_counts(target: dict[str, int], reason: str) -> None:
    target[reason] = target.get(reason, 0) + 1


# ------------------------------------------------------------------------------------------ image bytes

def _open_image(source: Union[str, bytes], name: str) -> Image.Image:
    """Fully decode an image (path or bytes) as RGB, or raise SkipSample naming what failed."""
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
            img.load()  # decode now: truncated data fails here rather than in the transform
            return img.convert("RGB")
    except FileNotFoundError:
        raise SkipSample("missing_file", name) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise SkipSample("corrupt_image", f"{name}: {e}") from None


def _clean_caption(caption: Any, name: str) -> str:
    text = caption.strip() if isinstance(caption, str) else ""
    if not text:
        raise SkipSample("missing_caption", name)
    return text


# -------------------------------------------------------------------------------------------- datasets

class CsvCaptions:
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
        # numpy string arrays, not lists of str: forked DataLoader workers then share the pages instead of
        # copying them on every refcount update.
        self.paths = np.array(paths)
        self.captions = np.array(captions)

    def __len__(self) -> int:
        return len(self.paths)

    def __repr__(self) -> str:
        return f"CsvCaptions({self.path!r}, {len(self)} samples)"

    def load(self, index: int) -> tuple[Image.Image, str]:
        path = str(self.paths[index])
        caption = _clean_caption(str(self.captions[index]), f"row {index + 1} of {self.path}")
        if not path:
            raise SkipSample("missing_file", f"row {index + 1} of {self.path} has no image path")
        return _open_image(path, path), caption


class ImageFolder:
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

    def __len__(self) -> int:
        return len(self.paths)

    def __repr__(self) -> str:
        return f"ImageFolder({self.root!r}, {len(self)} images, {len(self.class_names)} classes)"

    def load(self, index: int) -> tuple[Image.Image, int]:
        path = str(self.paths[index])
        try:
            image = _open_image(path, path)
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


def _synthetic_size(spec: str, num_samples: Optional[int]) -> int:
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
        return SyntheticShapes(_synthetic_size(spec, num_samples), image_size, seed, split)
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


# ------------------------------------------------------------------------------------------ batching

def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_ranks(global_batch: int, rank: int, world: int) -> int:
    """Validates the distributed batch geometry; returns the per-rank batch size."""
    _check_int("global_batch", global_batch, 1)
    _check_int("world", world, 1)
    _check_int("rank", rank, 0)
    if rank >= world:
        raise ValueError(f"rank {rank} out of range for world size {world}")
    if global_batch % world:
        raise ValueError(f"global_batch {global_batch} is not divisible by world size {world}")
    return global_batch // world


class GlobalBatchSampler:
    """Per-step index lists for one rank: its contiguous slice of the global batch of a seeded per-epoch
    permutation. Step s lives in epoch s // steps_per_epoch; the ranks' slices concatenate to the
    1-process global batch; starting at `start_step` reproduces an uninterrupted run exactly.

    `drop_last=True` drops each epoch's incomplete tail; `drop_last=False` completes the last global batch
    with the epoch's first indices (so every step is full). `shuffle=False` uses the identity order.
    `num_steps=None` iterates forever; otherwise iteration stops before step `num_steps`."""

    def __init__(self, n: int, global_batch: int, seed: int = 0, rank: int = 0, world: int = 1,
                 start_step: int = 0, drop_last: bool = True, *, shuffle: bool = True,
                 num_steps: Optional[int] = None):
        self.n = _check_int("n (dataset size)", n, 1)
        self.local_batch = _check_ranks(global_batch, rank, world)
        self.global_batch, self.rank, self.world = int(global_batch), int(rank), int(world)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.shuffle = bool(shuffle)
        self.step = _check_int("start_step", start_step, 0)
        self.num_steps = None if num_steps is None else _check_int("num_steps", num_steps, 0)
        if self.drop_last:
            if self.n < self.global_batch:
                raise ValueError(f"the dataset has {self.n} samples, fewer than one global batch of "
                                 f"{self.global_batch}: use a smaller batch or drop_last=False")
            self.steps_per_epoch = self.n // self.global_batch
        else:
            self.steps_per_epoch = math.ceil(self.n / self.global_batch)
        self._cached_epoch: Optional[int] = None
        self._cached_perm: Optional[torch.Tensor] = None

    def permutation(self, epoch: int) -> torch.Tensor:
        """The sample order of `epoch` (int64 [n]); a pure function of (seed, epoch)."""
        if epoch != self._cached_epoch:
            if self.shuffle:
                gen = torch.Generator().manual_seed(derive_seed(self.seed, _PERMUTATION_TAG, epoch))
                self._cached_perm = torch.randperm(self.n, generator=gen)
            else:
                self._cached_perm = torch.arange(self.n)
            self._cached_epoch = epoch
        return self._cached_perm

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def global_indices(self, step: int) -> list[int]:
        """All `global_batch` indices of `step`, in rank order."""
        epoch, k = divmod(step, self.steps_per_epoch)
        perm = self.permutation(epoch)
        start = k * self.global_batch
        batch = perm[start:start + self.global_batch]
        if len(batch) < self.global_batch:  # drop_last=False: complete the tail from the epoch's start
            batch = torch.cat([batch, perm[:self.global_batch - len(batch)]])
        return batch.tolist()

    def indices(self, step: int) -> list[int]:
        """This rank's `global_batch // world` indices of `step`."""
        lo = self.rank * self.local_batch
        return self.global_indices(step)[lo:lo + self.local_batch]

    def iter_with_epoch(self) -> Iterator[tuple[int, list[int]]]:
        """(epoch, indices) per step from `self.step` on; `self.step` follows what has been yielded."""
        while self.num_steps is None or self.step < self.num_steps:
            step = self.step
            out = (self.epoch_of(step), self.indices(step))
            self.step = step + 1
            yield out

    def __iter__(self) -> Iterator[list[int]]:
        for _, indices in self.iter_with_epoch():
            yield indices

    def __len__(self) -> int:
        if self.num_steps is None:
            raise TypeError("an endless GlobalBatchSampler (num_steps=None) has no length")
        return max(0, self.num_steps - self.step)

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step, "n": self.n, "global_batch": self.global_batch, "seed": self.seed}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        for key in ("n", "global_batch", "seed"):
            if key in state and int(state[key]) != getattr(self, key):
                raise ValueError(f"sampler state has {key}={state[key]} but this sampler has {key}="
                                 f"{getattr(self, key)}: resuming would not reproduce the run")
        if "step" not in state:
            raise KeyError("sampler state has no 'step'")
        self.step = _check_int("step", state["step"], 0)


class _EpochTaggedBatches:
    """Wraps a GlobalBatchSampler so each index carries its epoch: [(epoch, index), ...] per step, which the
    dataset needs to seed the sample's augmentation."""

    def __init__(self, sampler: GlobalBatchSampler):
        self.sampler = sampler

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for epoch, indices in self.sampler.iter_with_epoch():
            yield [(epoch, i) for i in indices]


class _SequentialBatches:
    """One ordered pass (train=False): each global batch of consecutive indices, this rank's slice of it
    (np.array_split over ranks, so the last, short global batch is shared as evenly as possible)."""

    def __init__(self, n: int, global_batch: int, rank: int, world: int, start_step: int):
        self.n, self.global_batch, self.rank, self.world = n, global_batch, rank, world
        self.step = start_step

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        while self.step * self.global_batch < self.n:
            lo = self.step * self.global_batch
            chunk = np.array_split(np.arange(lo, min(lo + self.global_batch, self.n)), self.world)[self.rank]
            self.step += 1
            if len(chunk):
                yield [(0, int(i)) for i in chunk]


class _MapCaptionSet(Dataset):
    """A caption dataset as training samples: key (epoch, index) -> (image [3,S,S], ids [L], skips dict).
    A bad sample is replaced by the next readable index, and the replacements are reported in `skips`."""

    def __init__(self, base: Any, transform: Callable, context_length: int, seed: int):
        self.base, self.transform, self.context_length, self.seed = base, transform, context_length, seed
        self.n = len(base)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        skipped: dict[str, int] = {}
        last_error = None
        for attempt in range(min(self.n, MAX_SUBSTITUTIONS)):
            j = (index + attempt) % self.n
            try:
                image, caption = self.base.load(j)
            except SkipSample as e:
                _merge_counts(skipped, e.reason)
                last_error = e
                logger.debug("skipping sample %d: %s", j, e)
                continue
            x = self.transform(image, sample_generator(self.seed, epoch, j))
            ids = tokenize([caption], context_length=self.context_length)[0]
            return x, ids, skipped
        raise ValueError(f"{min(self.n, MAX_SUBSTITUTIONS)} consecutive samples from index {index} of "
                           f"{self.base!r} are unusable (last: {last_error}); the dataset looks broken")


def _collate(batch):
    images = torch.stack([b[0] for b in batch])
    ids = torch.stack([b[1] for b in batch])
    skipped: dict[str, int] = {}
    for b in batch:
        for reason, n in b[2].items():
            skipped[reason] = skipped.get(reason, 0) + n
    return images, ids, skipped


# ----------------------------------------------------------------------------------------- webdataset

def _decode_wds_sample(raw: Mapping[str, Any]) -> tuple[Image.Image, str]:
    name = f"{raw.get('__url__', '?')}:{raw.get('__key__', '?')}"
    caption = None
    if "txt" in raw:
        caption = raw["txt"].decode("utf-8", errors="replace")
    elif "json" in raw:
        try:
            caption = json.loads(raw["json"]).get("caption")
        except (ValueError, AttributeError):
            caption = None
    caption = _clean_caption(caption, name)
    key = next((k for k in WDS_IMAGE_KEYS if k in raw), None)
    if key is None:
        raise SkipSample("missing_image", name)
    return _open_image(raw[key], name), caption


class _ShardStream(IterableDataset):
    """Batches (images, ids, skips dict) of one rank from a shard list; each DataLoader worker reads its own
    shards (see the module docstring for the split, the seeding and the resume rule)."""

    def __init__(self, source: ShardSource, *, transform: Callable, context_length: int, seed: int, rank: int,
                 world: int, local_batch: int, start_step: int, train: bool, shuffle_buffer: int):
        self.source, self.transform, self.context_length = source, transform, context_length
        self.seed, self.rank, self.world, self.local_batch = seed, rank, world, local_batch
        self.start_step, self.train, self.shuffle_buffer = start_step, train, shuffle_buffer

    def _raw_samples(self, worker: int, num_workers: int, skips: SkipCounter) -> Iterator[tuple[int, dict]]:
        import webdataset as wds
        from webdataset.tariterators import group_by_keys, tar_file_expander

        def handler(exn: Exception) -> bool:  # tar-level errors: count, warn, continue with the next entry
            skips.add("tar_error")
            warnings.warn(f"skipping unreadable tar data in {self.source.spec!r}: {exn}", RuntimeWarning)
            return True

        epochs = itertools.count() if self.train else [0]
        for epoch in epochs:
            urls = list(self.source.urls)
            if self.train:  # same order on every rank, so the rank slices are disjoint within an epoch
                random.Random(derive_seed(self.seed, _SHARD_ORDER_TAG, epoch)).shuffle(urls)
            mine = urls[self.rank::self.world][worker::num_workers]
            samples = group_by_keys(tar_file_expander(_open_shards(mine, handler), handler=handler), handler=handler)
            if self.train and self.shuffle_buffer > 1:
                rng = random.Random(derive_seed(self.seed, _SHUFFLE_BUFFER_TAG, epoch, self.rank, worker))
                samples = wds.shuffle(self.shuffle_buffer, initial=min(100, self.shuffle_buffer), rng=rng)(samples)
            count = 0
            for raw in samples:
                count += 1
                yield epoch, raw
            if count == 0:  # an endless loop over empty shards would hang the trainer
                raise ValueError(f"the shards of {self.source.spec!r} read by rank {self.rank}, worker {worker} "
                                   f"({', '.join(mine[:3])}{', ...' if len(mine) > 3 else ''}) hold no samples; "
                                   f"skipped: {skips}")

    def __iter__(self):
        info = get_worker_info()
        loader_worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # The DataLoader takes batches from its workers in turn, starting at worker 0 on every pass, so step s
        # comes from the worker with role s % num_workers; a resumed pass rotates the roles to keep that true.
        worker = (loader_worker + self.start_step) % num_workers
        delivered = len(range(worker, self.start_step, num_workers))  # batches this role handed out already
        skips = SkipCounter()
        samples = itertools.islice(self._raw_samples(worker, num_workers, skips), delivered * self.local_batch, None)
        images, ids = [], []
        reported = SkipCounter()
        good_in_epoch, current_epoch, whole_epoch = 0, None, False
        for epoch, raw in samples:
            if epoch != current_epoch:
                # Only an epoch seen from its start (not cut by the resume skip) proves the shards useless.
                if current_epoch is not None and whole_epoch and good_in_epoch == 0:
                    raise ValueError(f"a full pass over the shards of {self.source.spec!r} (rank {self.rank}, "
                                       f"worker {worker}) gave no usable sample; skipped: {skips}")
                whole_epoch = current_epoch is not None or delivered == 0
                current_epoch, good_in_epoch = epoch, 0
            try:
                image, caption = _decode_wds_sample(raw)
            except SkipSample as e:
                skips.add(e.reason)
                logger.debug("skipping %s", e)
                continue
            good_in_epoch += 1
            sample_id = zlib.crc32(f"{raw.get('__url__', '')}/{raw.get('__key__', '')}".encode())
            images.append(self.transform(image, sample_generator(self.seed, epoch, sample_id)))
            ids.append(tokenize([caption], context_length=self.context_length)[0])
            if len(images) == self.local_batch:
                yield torch.stack(images), torch.stack(ids), _take_new(skips, reported)
                images, ids = [], []
        if images:  # only reached for a single pass (train=False): the last, short batch
            yield torch.stack(images), torch.stack(ids), _take_new(skips, reported)
        elif skips.total > reported.total:
            # Report skips seen after the last batch with an empty batch (the loader drops empty batches).
            empty = torch.empty(0)
            yield empty, empty, _take_new(skips, reported)


def _open_shards(urls: Sequence[str], handler: Callable[[Exception], bool]) -> Iterator[dict]:
    """webdataset's url_opener, but each shard's file is closed once its samples have been read."""
    from webdataset import gopen

    for url in urls:
        try:
            stream = gopen(url)
        except Exception as exn:  # missing or unreadable shard: the handler counts it
            if handler(exn):
                continue
            raise
        try:
            yield dict(url=url, stream=stream)
        finally:
            stream.close()


def _take_new(skips: SkipCounter, reported: SkipCounter) -> dict[str, int]:
    """The counts added to `skips` since the last call (and marks them reported)."""
    new = {k: v - reported[k] for k, v in skips.counts.items() if v > reported[k]}
    reported.update(new)
    return new


# ---------------------------------------------------------------------------------------------- loader

class Loader:
    """Iterable of (images [B_local, 3, S, S], ids [B_local, L]) for one rank.

    `.skips` accumulates the skip counts of every worker; `.step` counts the batches handed out (from
    `start_step`), and `state_dict()` saves it: prefetching never makes it run ahead of the consumer.
    Training loaders are endless; `train=False` loaders make one ordered pass."""

    def __init__(self, dataloader: DataLoader, *, dataset: Any, skips: SkipCounter, start_step: int, local_batch: int,
                 global_batch: int, rank: int, world: int, sampler: Any = None, stream: Optional[_ShardStream] = None):
        self.dataloader, self.dataset, self.skips = dataloader, dataset, skips
        self.step, self.local_batch, self.global_batch = start_step, local_batch, global_batch
        self.rank, self.world = rank, world
        self._sampler, self._stream = sampler, stream

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # A new pass continues at the last consumed step, not where prefetching got to.
        if self._sampler is not None:
            self._sampler.step = self.step
        if self._stream is not None:
            self._stream.start_step = self.step
        for images, ids, skipped in self.dataloader:
            self.skips.update(skipped)
            if images.numel() == 0:
                continue
            self.step += 1
            yield images, ids

    def state_dict(self) -> dict:
        return {"step": self.step, "skips": self.skips.as_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if "step" not in state:
            raise KeyError("loader state has no 'step'")
        self.step = _check_int("step", state["step"], 0)
        self.skips = SkipCounter(state.get("skips", {}))

    def __repr__(self) -> str:
        return (f"Loader({self.dataset!r}, rank {self.rank}/{self.world}, batch {self.local_batch}/"
                f"{self.global_batch}, step {self.step})")


def make_loader(dataset_or_spec: Any, *, global_batch: int, rank: int = 0, world: int = 1, seed: int = 0,
                start_step: int = 0, num_workers: int = 0, context_length: int = DEFAULT_CONTEXT_LENGTH,
                image_size: int = 224, train: bool = True, transform: Optional[Callable] = None,
                crop_scale: Sequence[float] = DEFAULT_CROP_SCALE, shuffle_buffer: int = 1000,
                drop_last: bool = True) -> Loader:
    """A `Loader` of (images, token ids) batches of `global_batch // world` samples for `rank`.

    `dataset_or_spec`: a spec string (built with `build_dataset(spec, seed=seed, image_size=image_size)`),
    a map-style caption set (`len()` and `load(i) -> (PIL image, caption)`, raising `SkipSample` for bad
    samples) or a `ShardSource`. `train=True`: endless, shuffled, augmented with `transform` (default
    `TrainTransform(image_size, scale=crop_scale)`). `train=False`: one ordered pass with `transform`
    (default `FixedCropTransform(image_size)`, the feature cache's view). `drop_last` applies to map-style
    training sets (see GlobalBatchSampler). Pinned memory when CUDA is available; persistent workers for
    map-style sets when num_workers > 0."""
    local_batch = _check_ranks(global_batch, rank, world)
    _check_int("start_step", start_step, 0)
    _check_int("num_workers", num_workers, 0)
    _check_int("context_length", context_length, 2)
    _check_int("shuffle_buffer", shuffle_buffer, 0)
    dataset = (build_dataset(dataset_or_spec, seed=seed, image_size=image_size)
               if isinstance(dataset_or_spec, str) else dataset_or_spec)
    if transform is None:
        transform = TrainTransform(image_size, scale=crop_scale) if train else FixedCropTransform(image_size)
    skips = SkipCounter()
    pin = torch.cuda.is_available()
    common = dict(dataset=dataset, skips=skips, start_step=start_step, local_batch=local_batch,
                  global_batch=global_batch, rank=rank, world=world)

    if isinstance(dataset, ShardSource):
        shards_here = len(range(rank, len(dataset.urls), world))
        if shards_here == 0:
            raise ValueError(f"{dataset.spec!r} has {len(dataset.urls)} shards, fewer than the {world} ranks: "
                             "every rank needs at least one shard")
        if num_workers > shards_here:
            warnings.warn(f"rank {rank} has {shards_here} shards of {dataset.spec!r}: using {shards_here} "
                          f"DataLoader workers instead of {num_workers} (a worker reads whole shards)")
            num_workers = shards_here
        stream = _ShardStream(dataset, transform=transform, context_length=context_length, seed=seed, rank=rank,
                              world=world, local_batch=local_batch, start_step=start_step, train=train,
                              shuffle_buffer=shuffle_buffer)
        # Not persistent: a new pass re-creates the workers so they pick up the resume step.
        dataloader = DataLoader(stream, batch_size=None, num_workers=num_workers, pin_memory=pin)
        return Loader(dataloader, stream=stream, **common)

    if isinstance(dataset, ImageFolder):
        raise TypeError(f"{dataset!r} is a classification set, not image-caption pairs: use it for evaluation "
                        "(build_zero_shot_set); train on synthetic data, shards or a CSV")
    if not (hasattr(dataset, "load") and hasattr(dataset, "__len__")):
        raise TypeError(f"cannot load from {type(dataset).__name__}: give a spec string, a ShardSource or a "
                        "dataset with len() and load(i) -> (PIL image, caption)")
    if len(dataset) == 0:
        raise ValueError(f"dataset {dataset!r} is empty")
    samples = _MapCaptionSet(dataset, transform, context_length, seed)
    if train:
        sampler = GlobalBatchSampler(len(dataset), global_batch, seed, rank, world, start_step, drop_last)
        batches: Any = _EpochTaggedBatches(sampler)
    else:
        sampler = batches = _SequentialBatches(len(dataset), global_batch, rank, world, start_step)
    dataloader = DataLoader(samples, batch_sampler=batches, num_workers=num_workers, collate_fn=_collate,
                            pin_memory=pin, persistent_workers=num_workers > 0)
    return Loader(dataloader, sampler=sampler, **common)


# ------------------------------------------------------------------------------------------ eval sets

class _FolderImages:
    """Re-iterable batches of evaluation images from an ImageFolder, in folder order."""

    def __init__(self, folder: ImageFolder, transform: Callable, batch_size: int, num_workers: int):
        self.folder, self.transform, self.batch_size, self.num_workers = folder, transform, batch_size, num_workers

    def __len__(self) -> int:
        return math.ceil(len(self.folder) / self.batch_size)

    def __iter__(self) -> Iterator[torch.Tensor]:
        items = _IndexedImages(self.folder, self.transform)
        loader = DataLoader(items, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers,
                            pin_memory=torch.cuda.is_available())
        yield from loader


class _IndexedImages(Dataset):
    def __init__(self, folder: ImageFolder, transform: Callable):
        self.folder, self.transform = folder, transform

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, index: int) -> torch.Tensor:
        image, _ = self.folder.load(index)
        return self.transform(image)


class ZeroShotSet(NamedTuple):
    """images: float [N, 3, S, S] (synthetic) or a re-iterable of image batches in label order (folders);
    labels: int64 [N]; class_names; templates: prompt templates for the class names (None: the classifier's
    default, the 80 ImageNet templates)."""
    images: Union[torch.Tensor, _FolderImages]
    labels: torch.Tensor
    class_names: list[str]
    templates: Optional[tuple]

    def batches(self, batch_size: int = 64) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(images, labels) batches, whichever form `images` has (folders keep their own batch size)."""
        if isinstance(self.images, torch.Tensor):
            _check_int("batch_size", batch_size, 1)
            for lo in range(0, len(self.labels), batch_size):
                yield self.images[lo:lo + batch_size], self.labels[lo:lo + batch_size]
            return
        lo = 0
        for images in self.images:
            yield images, self.labels[lo:lo + len(images)]
            lo += len(images)


class SegmentationSet(NamedTuple):
    """images: float [N, 3, S, S] ImageNet-normalised; masks: int64 [N, S, S] (class index per pixel);
    class_names (index 0 "background"); templates: prompt templates for the class names."""
    images: torch.Tensor
    masks: torch.Tensor
    class_names: list[str]
    templates: tuple


def build_zero_shot_set(spec_or_none: Optional[str] = None, image_size: int = 224, *,
                        num_samples: int = DEFAULT_ZERO_SHOT_SAMPLES, seed: int = 0, label_set: str = "colour",
                        batch_size: int = 64, num_workers: int = 0) -> ZeroShotSet:
    """The zero-shot classification set: the embedded val split (None, "synthetic" or "synthetic:N";
    single-object images labelled by `label_set`) or an "imagefolder:/path" (EvalTransform, in batches)."""
    spec = "synthetic" if spec_or_none is None else spec_or_none.strip()
    if spec == "synthetic" or spec.startswith("synthetic:"):
        n = _synthetic_size(spec, None) if ":" in spec else num_samples
        _check_int("num_samples", n, 1)
        data = SyntheticShapes(n, image_size, seed, "val", label_set=label_set, max_objects=1)
        items = [data[i] for i in range(n)]
        # Generated at image_size: no resize or crop, which could cut the object.
        images = torch.stack([to_tensor(item["image"]) for item in items])
        labels = torch.tensor([item["label"] for item in items], dtype=torch.long)
        return ZeroShotSet(images, labels, list(data.class_names), tuple(data.templates))
    if spec.startswith("imagefolder:"):
        folder = build_dataset(spec)
        _check_int("batch_size", batch_size, 1)
        images = _FolderImages(folder, EvalTransform(image_size), batch_size, num_workers)
        return ZeroShotSet(images, folder.labels, list(folder.class_names), None)
    raise ValueError(f"zero-shot evaluation set must be None, 'synthetic', 'synthetic:N' or "
                     f"'imagefolder:/path', got {spec_or_none!r}")


def build_segmentation_set(num_images: int, image_size: int = 224, *, seed: int = 0) -> SegmentationSet:
    """`num_images` images of the embedded val split (1-3 objects) with their masks: class 0 is background,
    1 + c the colour c of `SyntheticShapes` (open-vocabulary segmentation by colour name)."""
    _check_int("num_images", num_images, 1)
    data = SyntheticShapes(num_images, image_size, seed, "val")
    items = [data[i] for i in range(num_images)]
    images = torch.stack([to_tensor(item["image"]) for item in items])
    masks = torch.stack([torch.from_numpy(item["mask"]) for item in items])
    return SegmentationSet(images, masks, list(data.segmentation_class_names), tuple(data.segmentation_templates))


__all__ = ["build_dataset", "make_loader", "Loader", "GlobalBatchSampler", "SkipCounter", "SkipSample",
           "CsvCaptions", "ImageFolder", "ShardSource", "ZeroShotSet", "SegmentationSet", "build_zero_shot_set",
           "build_segmentation_set", "FORMATS_HELP", "DEFAULT_CROP_SCALE"]
