"""Feature-cache mode: the frozen backbone's tokens for one fixed crop per sample, computed once and memory-mapped.

With a frozen backbone, the backbone forward is most of a LiT step's compute and its output never changes for a
given crop. The cache trades augmentation (one fixed centre crop per sample) for skipping it: training then runs
only the head and the text tower. Files in the cache directory: tokens.npy (float16 [N, T, D]), ids.npy (int32
[N, L]) and meta.json (what the cache was built from; a mismatch rebuilds it, never silently reuses it).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.distributed as dist

from ..inference.zeroshot import autocast
from .config import PRECISION_DTYPES, TrainConfig
from .data import GlobalBatchSampler, ShardSource, build_dataset, make_loader


class FeatureCache:
    def __init__(self, directory: Path):
        self.directory = directory
        self.tokens = np.load(directory / "tokens.npy", mmap_mode="r")
        self.ids = np.load(directory / "ids.npy", mmap_mode="r")

    def __len__(self) -> int:
        return self.tokens.shape[0]


def _fingerprint(model, cfg: TrainConfig, precision: str) -> dict:
    backbone = model.backbone.state_dict()
    # A cheap content signature of the backbone weights: sums of a few tensors, enough to tell two models apart.
    signature = [float(t.double().sum()) for t in list(backbone.values())[:8]]
    c = model.config
    # Every field that changes the backbone's tokens (or the stored ids' width).
    vision = {name: getattr(c, name) for name in ("backbone", "vision_dim", "vision_depth", "vision_heads",
                                                 "vision_mlp_ratio", "vision_ffn", "vision_mlp_hidden",
                                                 "patch_size", "num_register_tokens", "pos_embed_grid",
                                                 "pos_embed_antialias", "rope_base", "context_length")}
    return {"data": cfg.data, "image_size": cfg.image_size, "seed": cfg.seed, "vision": vision,
            "precision": precision, "backbone_weights": cfg.backbone_weights, "backbone_signature": signature,
            "format": 2}  # 2: the embedded train split holds object-free images (synthetic.background_share)


def build_feature_cache(model, cfg: TrainConfig, directory: Path, device: torch.device, precision: str, d,
                        progress: bool = True) -> FeatureCache:
    """Build the cache unless a complete one for the same inputs exists. Every rank encodes its own contiguous
    share of the samples into the shared memory-mapped files (the directory must be on a filesystem all ranks see)."""
    directory.mkdir(parents=True, exist_ok=True)
    meta_path = directory / "meta.json"
    fingerprint = _fingerprint(model, cfg, precision)
    current = json.loads(meta_path.read_text()) if meta_path.exists() else None
    if current is None or current.get("fingerprint") != fingerprint or not current.get("complete"):
        _build(model, cfg, directory, device, precision, fingerprint, progress, d)
    return FeatureCache(directory)


class _Rows:
    """Samples [lo, hi) of a map-style caption set, for one rank's share of the cache."""

    def __init__(self, dataset, lo: int, hi: int):
        self.dataset, self.lo, self.hi = dataset, lo, hi

    def __len__(self) -> int:
        return self.hi - self.lo

    def load(self, index: int):
        return self.dataset.load(self.lo + index)


def _build(model, cfg, directory: Path, device, precision, fingerprint: dict, progress: bool, d) -> None:
    dataset = build_dataset(cfg.data, seed=cfg.seed, image_size=cfg.image_size)
    if isinstance(dataset, ShardSource):
        raise ValueError(f"feature_cache needs a dataset of known size (synthetic or CSV/TSV), not the shard "
                         f"stream {cfg.data!r}")
    n = len(dataset)
    patch = model.config.patch_size
    if cfg.image_size % patch:
        raise ValueError(f"image_size {cfg.image_size} is not a multiple of the patch size {patch}")
    t = 1 + model.config.num_register_tokens + (cfg.image_size // patch) ** 2
    dim, length = model.config.vision_dim, model.config.context_length
    if d.main:
        size = n * t * dim * 2 + n * length * 4
        print(f"feature cache: {n} samples x {t} tokens x {dim} dims (float16) + token ids = {size / 1e9:.2f} GB "
              f"-> {directory}", flush=True)
        (directory / "meta.json").write_text(json.dumps({"fingerprint": fingerprint, "complete": False}))
        np.lib.format.open_memmap(directory / "tokens.npy", mode="w+", dtype=np.float16, shape=(n, t, dim))
        np.lib.format.open_memmap(directory / "ids.npy", mode="w+", dtype=np.int32, shape=(n, length))
    if d.world > 1:
        dist.barrier()  # the files exist before any rank opens them
    tokens = np.load(directory / "tokens.npy", mmap_mode="r+")
    ids = np.load(directory / "ids.npy", mmap_mode="r+")
    lo, hi = n * d.rank // d.world, n * (d.rank + 1) // d.world
    if hi > lo:
        loader = make_loader(_Rows(dataset, lo, hi), global_batch=min(cfg.batch_size, hi - lo), seed=cfg.seed,
                             train=False, num_workers=cfg.num_workers, context_length=length,
                             image_size=cfg.image_size)
        bar = None
        if progress and d.main:
            from tqdm.auto import tqdm

            bar = tqdm(total=hi - lo, desc=f"feature cache (rank 0 of {d.world})", unit="img")
        row = lo
        with torch.no_grad(), autocast(device, PRECISION_DTYPES[precision]):
            for images, batch_ids in loader:
                out = model.backbone_tokens(images.to(device))
                tokens[row:row + len(out)] = out.to(torch.float16).cpu().numpy()
                ids[row:row + len(out)] = batch_ids.numpy().astype(np.int32)
                row += len(out)
                if bar is not None:
                    bar.update(len(out))
        if bar is not None:
            bar.close()
        if row != hi:
            raise RuntimeError(f"feature cache: expected samples {lo}..{hi - 1}, the loader gave {row - lo}")
    tokens.flush()
    ids.flush()
    del tokens, ids
    if d.world > 1:
        dist.barrier()  # every rank's share is written
    if d.main:
        tmp = directory / "meta.json.tmp"
        tmp.write_text(json.dumps({"fingerprint": fingerprint, "complete": True, "samples": n}))
        os.replace(tmp, directory / "meta.json")
    if d.world > 1:
        dist.barrier()  # nobody reads the cache before it is marked complete


class CachedLoader:
    """(tokens [B_local, T, D] float16, ids [B_local, L] int64) batches, batched like the image loader
    (GlobalBatchSampler: deterministic, resumable, rank slices of the global batch)."""

    def __init__(self, cache: FeatureCache, *, global_batch: int, rank: int, world: int, seed: int, start_step: int):
        self.cache = cache
        self.sampler = GlobalBatchSampler(len(cache), global_batch, seed, rank, world, start_step)
        self.skips = None

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # float16 as stored (half the bytes to copy; the trainer converts on the device), pinned for async copies
        pin = torch.cuda.is_available()
        for indices in self.sampler:
            tokens = torch.from_numpy(self.cache.tokens[indices])
            ids = torch.from_numpy(self.cache.ids[indices].astype(np.int64))
            yield (tokens.pin_memory(), ids.pin_memory()) if pin else (tokens, ids)


def cached_loader(cache: FeatureCache, *, global_batch: int, rank: int, world: int, seed: int,
                  start_step: int) -> CachedLoader:
    return CachedLoader(cache, global_batch=global_batch, rank=rank, world=world, seed=seed, start_step=start_step)
