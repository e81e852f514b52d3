"""Bad samples: `SkipSample`, raised for a sample that cannot be used, and `SkipCounter`, the per-reason counts
(missing_file, corrupt_image, missing_image, missing_caption, tar_error). Bad samples are skipped and counted,
never fatal."""
from __future__ import annotations

from typing import Mapping, Optional, Union


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
