"""Finding a benchmark's files in its standard layout, and the one-line errors that name what is wrong."""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


class DatasetError(ValueError):
    """A benchmark folder or file that is missing, unreadable or malformed; the message is one line naming it."""


@dataclass(frozen=True)
class LoadFailure:
    """What a dataset item returns instead of raising, so that an error met in a DataLoader worker reaches the
    caller as its own one-line message (a worker's exception would arrive wrapped in a traceback)."""

    message: str


def raise_failures(items: Sequence) -> None:
    """Raise the first LoadFailure of a collated batch as a DatasetError."""
    for item in items:
        if isinstance(item, LoadFailure):
            raise DatasetError(item.message)


def find_base(benchmark: str, root, candidates: Sequence[str], required: Sequence[str], layout: str) -> Path:
    """The first of root/<candidate> holding every `required` relative path; else a DatasetError naming the first
    required path missing under `root` and the expected layout."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetError(f"{benchmark}: root folder not found: {root}")
    bases = [root / c if c else root for c in candidates]
    for base in bases:
        if all((base / r).exists() for r in required):
            return base
    # Report against the most plausible base: the first one that holds anything required.
    base = next((b for b in bases if any((b / r).exists() for r in required)), bases[0])
    missing = next(r for r in required if not (base / r).exists())
    looked = ", ".join(str(b) for b in bases)
    raise DatasetError(f"{benchmark}: missing {base / missing} (looked in {looked}; expected layout: {layout})")


def list_images(folder: Path, suffixes: Sequence[str] = IMAGE_SUFFIXES, recursive: bool = False) -> list[Path]:
    """Image files in `folder` (sorted by path; suffix case-insensitive)."""
    walk = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in walk if p.suffix.lower() in suffixes and p.is_file())


def sub_folders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def read_lines(path, what: str) -> list[str]:
    """The non-empty lines of a text file (stripped); a DatasetError naming `what` and the file otherwise."""
    try:
        lines = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"cannot read {what} {path}: {exc}") from None
    lines = [line for line in lines if line]
    if not lines:
        raise DatasetError(f"{what} {path} is empty")
    return lines


def read_split_file(benchmark: str, path: Path) -> list[str]:
    """Image ids, one per line (ImageSets/.../<split>.txt)."""
    return read_lines(path, f"{benchmark}: split file")


def head_view(dataset, n, fields: Sequence[str]):
    """`dataset` limited to its first n items (all for None): a shallow copy whose list attributes `fields` keep
    their first n entries (e.g. for --limit)."""
    if n is None or n >= len(dataset):
        return dataset
    if n < 1:
        raise ValueError(f"limit must be >= 1, got {n}")
    view = copy.copy(dataset)
    for name in fields:
        setattr(view, name, getattr(dataset, name)[:n])
    return view


def check_exists(benchmark: str, path: Path, what: str) -> Path:
    if not os.path.isfile(path):
        raise DatasetError(f"{benchmark}: {what} not found: {path}")
    return path


__all__ = ["IMAGE_SUFFIXES", "DatasetError", "LoadFailure", "raise_failures", "find_base", "list_images",
           "sub_folders", "read_lines", "read_split_file", "head_view", "check_exists"]
