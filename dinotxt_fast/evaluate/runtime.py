"""What every evaluation run shares: data loading, the progress bar, wall time and peak memory, and the
description of the model (preset, config, weight files with their sha256) that goes into the result."""
from __future__ import annotations

import hashlib
import os
import resource
import time
from pathlib import Path
from typing import Mapping, Optional, Sequence

import torch


def default_workers() -> int:
    """DataLoader workers for image decoding: one per spare core, at most 8."""
    return min(8, max(0, (os.cpu_count() or 1) - 1))


def make_loader(dataset, batch_size: int, num_workers: Optional[int], device: torch.device, collate=list):
    """A sequential DataLoader; items stay a list (collate=list) so images of different sizes and LoadFailures
    pass through unchanged."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    workers = default_workers() if num_workers is None else num_workers
    # One batch ahead per worker bounds the decoded images held on the host (Cityscapes: 6 MB each).
    ahead = {"prefetch_factor": 1} if workers > 0 else {}
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                                       collate_fn=collate, pin_memory=device.type == "cuda", **ahead)


class Meter:
    """A progress bar over `total` images (tqdm shows images/s and the ETA), the run's wall time and the peak
    memory: CUDA's max_memory_allocated for a CUDA device (reset at the start), else the process's peak RSS."""

    def __init__(self, total: int, desc: str, device: torch.device, progress: Optional[bool] = None):
        from tqdm.auto import tqdm

        self.device = device
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        # progress None: a bar only on a terminal (tqdm's disable=None).
        self.bar = tqdm(total=total, desc=desc, unit="img", disable=None if progress is None else not progress,
                        dynamic_ncols=True)
        self.count = 0
        self.start = time.perf_counter()

    def update(self, n: int) -> None:
        self.count += n
        self.bar.update(n)

    def close(self) -> dict:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - self.start
        self.bar.close()
        if self.device.type == "cuda":
            peak, kind = torch.cuda.max_memory_allocated(self.device) / 2**20, "cuda_max_allocated"
        else:
            peak, kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process_peak_rss"
        return {"images_per_s": self.count / seconds if seconds > 0 else None, "seconds": seconds,
                "peak_memory_mb": round(peak, 1), "peak_memory_kind": kind}


def sha256_file(path, chunk: int = 1 << 23) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def describe_model(model, preset: Optional[str] = None, files: Optional[Mapping[str, str]] = None) -> dict:
    """{"preset", "config", "files": {role: {"path", "sha256"}}, "dtype", "device"} for a result's "model" key.
    `files` maps a role (backbone, vision_head, text_encoder, weights, ...) to the weight file it was loaded from."""
    from ..inference.zeroshot import model_device, model_dtype

    config = getattr(model, "config", None)
    return {
        "preset": preset,
        "config": config.to_dict() if hasattr(config, "to_dict") else None,
        "files": {role: {"path": str(Path(p).resolve()), "sha256": sha256_file(p)}
                  for role, p in (files or {}).items() if p},
        "dtype": str(model_dtype(model)).replace("torch.", ""),
        "device": str(model_device(model)),
    }


def keyed_by_name(names: Sequence[str], values: Sequence) -> dict:
    """{class name: value} in class-index order; a name that occurs twice (ImageNet's "missile", "sunglasses")
    gets its index appended, e.g. "missile [744]", so no entry is lost."""
    seen: dict[str, int] = {}
    for name in names:
        seen[name] = seen.get(name, 0) + 1
    return {(f"{name} [{i}]" if seen[name] > 1 else name): v for i, (name, v) in enumerate(zip(names, values))}


def templates_label(templates) -> str:
    """How a result records the prompt templates: a set name, or "custom (N)"."""
    if templates is None:
        return "imagenet"
    if isinstance(templates, str):
        return templates
    return f"custom ({len(templates)})"


__all__ = ["default_workers", "make_loader", "Meter", "sha256_file", "describe_model", "keyed_by_name",
           "templates_label"]
