"""Deterministic distributed batching of map-style sets (synthetic, CSV).

Step s takes the global batch [k*G, (k+1)*G) of a seeded permutation of epoch s // steps_per_epoch, and rank r
gets the contiguous slice [r*G/W, (r+1)*G/W) of it, so the ranks' batches concatenate to exactly the 1-process
global batch. Every sample's augmentation is seeded by (seed, epoch, index). Resuming from step k
(`start_step=k`) therefore reproduces exactly the batches of an uninterrupted run, for any number of ranks and
workers.
"""
from __future__ import annotations

import math
from typing import Any, Iterator, Mapping, Optional

import numpy as np
import torch

from ..transforms import derive_seed

# Keeps the permutation's seeded stream apart from the other purposes' (see `derive_seed`).
_PERMUTATION_TAG = 0x5045524D


def check_int(name: str, value: Any, minimum: int) -> int:
    """`value` as an int when it is an integer (not a bool) >= minimum; else a ValueError naming `name`. The batch
    geometry checks of every loader and evaluation set."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_ranks(global_batch: int, rank: int, world: int) -> int:
    """Validates the distributed batch geometry; returns the per-rank batch size."""
    check_int("global_batch", global_batch, 1)
    check_int("world", world, 1)
    check_int("rank", rank, 0)
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
        self.n = check_int("n (dataset size)", n, 1)
        self.local_batch = check_ranks(global_batch, rank, world)
        self.global_batch, self.rank, self.world = int(global_batch), int(rank), int(world)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.shuffle = bool(shuffle)
        self.step = check_int("start_step", start_step, 0)
        self.num_steps = None if num_steps is None else check_int("num_steps", num_steps, 0)
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
        self.step = check_int("step", state["step"], 0)


class EpochTaggedBatches:
    """Wraps a GlobalBatchSampler so each index carries its epoch: [(epoch, index), ...] per step, which the
    dataset needs to seed the sample's augmentation."""

    def __init__(self, sampler: GlobalBatchSampler):
        self.sampler = sampler

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for epoch, indices in self.sampler.iter_with_epoch():
            yield [(epoch, i) for i in indices]


class SequentialBatches:
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
