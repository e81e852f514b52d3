"""Training checkpoints: written atomically (temp file + fsync + rename), resumed exactly."""
from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .._files import atomic_write

_NAME = re.compile(r"^step_(\d+)\.pt$")


def rng_state() -> dict:
    # numpy's key array travels as a tensor so that checkpoints load with torch.load(weights_only=True)
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    numpy_state = (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss)
    state = {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate()}
    if torch.cuda.is_available():  # this process's device only: a resume may see a different set of GPUs
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def atomic_save(obj, path: Path) -> None:
    """torch.save `obj` to `path` atomically (see _files.atomic_write): never a truncated checkpoint."""
    atomic_write(path, lambda f: torch.save(obj, f))


def _atomic_link(source: Path, target: Path) -> None:
    """Point `target` at `source`'s content without writing it twice: a hard link renamed into place (a copy
    where the filesystem has no hard links)."""
    tmp = target.with_name(f".{target.name}.link.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:
        shutil.copyfile(source, tmp)
    os.replace(tmp, target)


def save_checkpoint(directory: Path, step: int, state: dict, keep: int) -> Path:
    """Write `step_<N>.pt`, point `last.pt` at it (a copy, atomically), prune to the newest `keep`."""
    path = directory / f"step_{step:08d}.pt"
    atomic_save(state, path)
    _atomic_link(path, directory / "last.pt")
    steps = sorted((int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.match(p.name)))
    for _, old in steps[:-keep]:
        old.unlink(missing_ok=True)
    return path


def find_checkpoint(resume: Optional[str], out_dir: Path) -> Optional[Path]:
    """`--resume` with no value (or "auto") means `<out>/checkpoints/last.pt` when it exists."""
    if resume is None:
        return None
    if resume in ("", "auto", "last"):
        last = out_dir / "checkpoints" / "last.pt"
        if not last.exists():
            raise FileNotFoundError(f"--resume: no checkpoint to resume from at {last}")
        return last
    path = Path(resume)
    if path.is_dir():
        path = path / "last.pt" if (path / "last.pt").exists() else path / "checkpoints" / "last.pt"
    if not path.is_file():
        raise FileNotFoundError(f"--resume: checkpoint {resume} not found")
    return path


def load_checkpoint(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file
        raise ValueError(f"checkpoint {path} is unreadable or corrupt: {exc}") from None
    missing = {"model", "optimizer", "scheduler", "step", "rng", "config"} - set(state)
    if missing:
        raise ValueError(f"checkpoint {path} is not a dinotxt-fast training checkpoint (missing {sorted(missing)})")
    return state
