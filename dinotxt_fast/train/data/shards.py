"""Streaming WebDataset shards (img2dataset layout) for one rank.

The shard list is shuffled per epoch (same order on every rank), rank r takes every W-th shard, DataLoader worker
w every n-th of those; samples pass a seeded shuffle buffer, and augmentation is seeded by (seed, epoch, shard
url + sample key). Resuming skips the samples already consumed (each worker skips the raw samples of the batches
it delivered) without decoding them. With the same world size and num_workers that is exact when no sample was
bad; otherwise it is approximate ordering-wise: each bad sample skipped before the resume point shifts the
resumed stream by one sample, and another worker or rank count re-deals the shards. Shuffled streams are no
i.i.d. guarantee either: the shuffle buffer only mixes samples within `shuffle_buffer` of each other.
"""
from __future__ import annotations

import itertools
import json
import logging
import random
import warnings
import zlib
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from ...models.tokenizer import tokenize
from ..transforms import derive_seed, sample_generator
from .skips import SkipCounter, SkipSample
from .sources import ShardSource, clean_caption, open_image

logger = logging.getLogger(__name__)

WDS_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
# Keep the seeded streams of the shard order and the shuffle buffer apart (see `derive_seed`).
_SHARD_ORDER_TAG = 0x53484152
_SHUFFLE_BUFFER_TAG = 0x42554646


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
    caption = clean_caption(caption, name)
    key = next((k for k in WDS_IMAGE_KEYS if k in raw), None)
    if key is None:
        raise SkipSample("missing_image", name)
    return open_image(raw[key], name), caption


class ShardStream(IterableDataset):
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
