"""Strict state-dict checking with one readable error (shared by every loader in `dinotxt_fast.models`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch

# Long key lists are cut in the message; the counts are always exact.
_MAX_LISTED = 12


class StateDictError(ValueError):
    """A state dict does not have the expected keys or shapes (the message lists every problem)."""


@dataclass
class LoadReport:
    """What a load took from a checkpoint, with keys named as they are in the file.

    `loaded_keys`: the file's keys that were used; `missing_keys`: expected keys the file lacks (non-strict loads
    keep the current values there); `unexpected_keys`: the file's keys nothing uses; `filled_keys`: official keys
    the file's layout does not carry, set to their defined values (e.g. the unused mask token); `layout`: the
    detected layout ("official DINOv2 backbone", "timm ...", "Hugging Face transformers ...")."""

    missing_keys: list[str]
    unexpected_keys: list[str]
    loaded_keys: list[str] = field(default_factory=list)
    filled_keys: list[str] = field(default_factory=list)
    layout: str = ""
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = [f"{len(self.loaded_keys)} tensors loaded"]
        for name, keys in (("missing", self.missing_keys), ("unexpected", self.unexpected_keys),
                           ("filled", self.filled_keys)):
            if keys:
                parts.append(f"{len(keys)} {name}")
        head = f"{self.layout}: " if self.layout else ""
        return head + ", ".join(parts) + "".join(f"; {note}" for note in self.notes)


def _listing(title: str, items: Sequence[str]) -> str:
    shown = "\n".join(f"    {item}" for item in items[:_MAX_LISTED])
    more = f"\n    ... and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
    return f"  {title} ({len(items)}):\n{shown}{more}"


def _prefix_hint(expected: Sequence[str], given: Sequence[str]) -> str:
    """Spot the usual cause of a total mismatch: every given key carries (or lacks) one extra prefix."""
    if not expected or not given:
        return ""
    probe = expected[0]
    for key in given:
        if key.endswith("." + probe):
            prefix = key[: -len(probe)]
            if sum(k.startswith(prefix) for k in given) >= len(given) // 2:
                return f"\n  hint: the given keys look prefixed with {prefix!r}; strip it before loading."
    probe = given[0]
    for key in expected:
        if key.endswith("." + probe):
            return f"\n  hint: the given keys lack the prefix {key[: -len(probe)]!r}."
    return ""


def check_state_dict(
    expected: Mapping[str, Sequence[int]],
    given: Mapping[str, object],
    *,
    strict: bool = True,
    what: str = "state dict",
) -> LoadReport:
    """Compare `given` (name -> tensor) against `expected` (name -> shape).

    Raises `StateDictError` listing missing keys, unexpected keys and shape mismatches together (missing and
    unexpected keys only when `strict`; a wrong shape or a non-tensor value always), and, when not `strict`, when
    no given key is expected at all (a non-strict load would otherwise "succeed" loading nothing). Returns the
    loaded, missing and unexpected keys so that a non-strict caller can report them.
    """
    if not isinstance(given, Mapping):
        raise StateDictError(f"{what}: expected a mapping of parameter names to tensors, got {type(given).__name__}")
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    problems = []
    for key, shape in expected.items():
        if key not in given:
            continue
        value = given[key]
        if not isinstance(value, torch.Tensor):
            problems.append(f"{key}: expected a tensor, got {type(value).__name__}")
        elif tuple(value.shape) != tuple(shape):
            problems.append(f"{key}: expected shape {tuple(shape)}, got {tuple(value.shape)}")
    sections = []
    if strict and missing:
        sections.append(_listing("missing keys", missing))
    if strict and unexpected:
        sections.append(_listing("unexpected keys", unexpected))
    if problems:
        sections.append(_listing("shape/type mismatches", problems))
    loaded = [k for k in given if k in expected]
    if not strict and expected and not loaded and not problems:
        sections += [_listing("expected keys", list(expected)), _listing("given keys", [str(k) for k in given])]
        hint = _prefix_hint(list(expected), [str(k) for k in given])
        raise StateDictError(f"{what}: none of its {len(given)} keys matches the model (strict=False loads what "
                             "matches, and nothing does):\n" + "\n".join(sections) + hint)
    if sections:
        hint = _prefix_hint(list(expected), [str(k) for k in given]) if strict and missing and unexpected else ""
        raise StateDictError(f"{what} does not match the model:\n" + "\n".join(sections) + hint)
    return LoadReport(missing, unexpected, loaded)
