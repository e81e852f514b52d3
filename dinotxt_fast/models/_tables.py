"""Small caches of derived tensors (resized position embeddings, RoPE tables) keyed on the values they derive from."""
from __future__ import annotations

from collections import OrderedDict
from typing import Hashable, Optional

import torch
from torch import Tensor

_CACHE_SIZE = 16  # grid sizes kept per cache (segmentation uses one or two; varied sizes must not leak memory)


def tensor_state(t: Tensor) -> Optional[tuple]:
    """What identifies the current values of `t`: storage, in-place-mutation counter, device, dtype.

    None for inference tensors, which have no version counter (they are then never cached)."""
    if t.is_inference():
        return None
    return (t.data_ptr(), t._version, t.device, t.dtype)


class TableCache:
    """Small LRU cache of derived tensors (resized position embeddings, RoPE tables)."""

    def __init__(self) -> None:
        self._entries: "OrderedDict[Hashable, object]" = OrderedDict()

    def clear(self) -> None:
        self._entries.clear()

    def get(self, key: Hashable):
        value = self._entries.get(key)
        if value is None:
            return None
        # Tables made under inference_mode cannot be saved for backward outside of it: rebuild those.
        if not torch.is_inference_mode_enabled() and any(t.is_inference() for t in _tensors(value)):
            return None
        self._entries.move_to_end(key)
        return value

    def put(self, key: Hashable, value) -> None:
        self._entries[key] = value
        self._entries.move_to_end(key)
        while len(self._entries) > _CACHE_SIZE:
            self._entries.popitem(last=False)


def _tensors(value):
    return value if isinstance(value, tuple) else (value,)
