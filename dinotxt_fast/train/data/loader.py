"""The training and feature-cache loaders: `make_loader` turns a spec, a map-style caption set or a shard list
into a `Loader` of (images, token ids) batches for one rank. In map-style sets a bad sample is replaced by the
next readable index so batches stay full and deterministic; the skips of every worker are counted in
`Loader.skips`."""
from __future__ import annotations

import logging
import warnings
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from ...models.tokenizer import DEFAULT_CONTEXT_LENGTH, tokenize
from ..transforms import FixedCropTransform, TrainTransform, sample_generator
from .sampler import EpochTaggedBatches, GlobalBatchSampler, SequentialBatches, check_int, check_ranks
from .shards import ShardStream
from .skips import SkipCounter, SkipSample
from .sources import ImageFolder, ShardSource, build_dataset

logger = logging.getLogger(__name__)

# open_clip's training crop for image-text pairs: captions describe the whole image, so crops stay large.
DEFAULT_CROP_SCALE = (0.9, 1.0)
# How many consecutive bad samples a map-style set may replace before the data is declared broken.
MAX_SUBSTITUTIONS = 100


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
                skipped[e.reason] = skipped.get(e.reason, 0) + 1
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


class Loader:
    """Iterable of (images [B_local, 3, S, S], ids [B_local, L]) for one rank.

    `.skips` accumulates the skip counts of every worker; `.step` counts the batches handed out (from
    `start_step`), and `state_dict()` saves it: prefetching never makes it run ahead of the consumer.
    Training loaders are endless; `train=False` loaders make one ordered pass."""

    def __init__(self, dataloader: DataLoader, *, dataset: Any, skips: SkipCounter, start_step: int, local_batch: int,
                 global_batch: int, rank: int, world: int, sampler: Any = None, stream: Optional[ShardStream] = None):
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
        self.step = check_int("step", state["step"], 0)
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
    local_batch = check_ranks(global_batch, rank, world)
    check_int("start_step", start_step, 0)
    check_int("num_workers", num_workers, 0)
    check_int("context_length", context_length, 2)
    check_int("shuffle_buffer", shuffle_buffer, 0)
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
        stream = ShardStream(dataset, transform=transform, context_length=context_length, seed=seed, rank=rank,
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
        batches: Any = EpochTaggedBatches(sampler)
    else:
        sampler = batches = SequentialBatches(len(dataset), global_batch, rank, world, start_step)
    dataloader = DataLoader(samples, batch_sampler=batches, num_workers=num_workers, collate_fn=_collate,
                            pin_memory=pin, persistent_workers=num_workers > 0)
    return Loader(dataloader, sampler=sampler, **common)
