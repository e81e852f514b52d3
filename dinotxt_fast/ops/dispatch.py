"""Backend registry and selection.

An op family (attention, patch_pool, ...) is a named tuple of kernel names, declared once by library.py next to its
custom ops (`declare_family`). A backend is a named set of kernels, plus an availability probe and optional
per-family support checks (dtype, head dim, shape): each backend package declares itself (`declare_backend`) and its
family modules plug their kernels in with `add_kernels`. The registered custom ops (library.py) look their kernel up
here by the backend name they were called with, so the choice is made once, in Python, before the op is traced.

Selection (`resolve`): an explicit `backend=` argument wins, then the innermost `use_backend(...)` block, then the
DINOTXT_FAST_BACKEND environment variable, then "auto": CPU tensors always get "torch"; CUDA tensors get the backend
that measured fastest for this GPU model and the nearest benchmarked shape (measured_dispatch.json, generated from GPU
benchmark results by `python -m benchmarks.report --update-dispatch`), else the first backend in AUTO_ORDER that is
registered, available and supports the call (docs/design.md, "Dispatch").
"""
from __future__ import annotations

import contextlib
import contextvars
import json
import math
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable, Optional

import torch

ENV_VAR = "DINOTXT_FAST_BACKEND"
KNOWN_BACKENDS = ("torch", "triton", "cuda")

# Op family -> the kernels a backend provides for it (the first one is required, the rest come with it); filled by
# declare_family.
FAMILIES: dict[str, tuple[str, ...]] = {}

# Fallback preference for backend=None on CUDA tensors, per family, when measured_dispatch.json has no entry for this
# GPU and call (backends not registered are skipped). A kernel backend enters it only once GPU benchmarks have
# measured it fastest for that family on every shape. None has been measured yet, so auto keeps the reference; opt in
# to the kernels with backend="triton" / "cuda" or DINOTXT_FAST_BACKEND.
AUTO_ORDER: dict[str, tuple[str, ...]] = {}

# Per family with benchmarked shapes: call-info keys that must equal the benchmarked case's, and the size key
# matched to the nearest case (by log ratio). benchmarks/report.py writes the same keys into each entry's "shape".
MATCH_KEYS: dict[str, tuple[tuple[str, ...], Optional[str]]] = {}


def declare_family(family: str, kernels: tuple[str, ...],
                   match_keys: Optional[tuple[tuple[str, ...], Optional[str]]] = None) -> None:
    """Declare op family `family` and the names of its kernels (forward first); `match_keys` as in MATCH_KEYS when
    the family has benchmarked shapes the auto choice can match."""
    FAMILIES[family] = tuple(kernels)
    AUTO_ORDER.setdefault(family, ("torch",))
    if match_keys is not None:
        MATCH_KEYS[family] = match_keys


@dataclass
class Backend:
    name: str
    kernels: dict[str, Callable]
    # () -> (usable, reason): e.g. (False, "no CUDA device"); checked lazily and cached.
    probe: Callable[[], tuple[bool, str]] = lambda: (True, "")
    # family -> (example tensor, call info) -> None if supported, else the reason it is not.
    supports: dict[str, Callable[[torch.Tensor, dict], Optional[str]]] = field(default_factory=dict)
    _status: Optional[tuple[bool, str]] = field(default=None, repr=False)

    def status(self) -> tuple[bool, str]:
        if self._status is None:
            self._status = self.probe()
        return self._status

    def families(self) -> list[str]:
        return [family for family, names in FAMILIES.items() if names[0] in self.kernels]

    def unsupported(self, family: str, tensor: torch.Tensor, info: dict) -> Optional[str]:
        check = self.supports.get(family)
        return None if check is None else check(tensor, info)


_REGISTRY: dict[str, Backend] = {}


def _check_whole_families(name: str, kernels: dict) -> None:
    for family, names in FAMILIES.items():
        present = [n for n in names if n in kernels]
        if present and len(present) != len(names):
            raise ValueError(f"backend {name!r} registers {present} for {family!r} but not all of {names}")


def register_backend(backend: Backend) -> None:
    """Add (or replace) a backend. Kernel families must come whole: forward and backward together."""
    _check_whole_families(backend.name, backend.kernels)
    _REGISTRY[backend.name] = backend


def declare_backend(name: str, probe: Callable[[], tuple[bool, str]]) -> None:
    """Declare backend `name` with its availability probe (before its families add their kernels); a backend
    declared again keeps its kernels and takes the new probe."""
    backend = _REGISTRY.get(name)
    if backend is None:
        _REGISTRY[name] = Backend(name, {}, probe)
    else:
        backend.probe, backend._status = probe, None


def add_kernels(name: str, family: str, kernels: dict[str, Callable],
                supports: Optional[Callable[[torch.Tensor, dict], Optional[str]]] = None,
                probe: Optional[Callable[[], tuple[bool, str]]] = None) -> None:
    """Register one family's kernels with backend `name` (created on first use), so that each kernel module
    plugs itself in without knowing the others."""
    if family not in FAMILIES:
        raise ValueError(f"backend {name!r}: unknown op family {family!r}; declared: {sorted(FAMILIES)}")
    if set(kernels) != set(FAMILIES[family]):
        raise ValueError(f"backend {name!r}: family {family!r} needs exactly the kernels {FAMILIES[family]}, "
                         f"got {sorted(kernels)}")
    if probe is not None or name not in _REGISTRY:
        declare_backend(name, probe or (lambda: (True, "")))
    backend = _REGISTRY[name]
    backend.kernels.update(kernels)
    if supports is not None:
        backend.supports[family] = supports


def get_kernel(backend: str, kernel: str) -> Callable:
    try:
        return _REGISTRY[backend].kernels[kernel]
    except KeyError:
        raise ValueError(f"backend {backend!r} has no kernel {kernel!r}") from None


def registered() -> dict[str, Backend]:
    return dict(_REGISTRY)


def _device_problem(name: str, tensor: torch.Tensor) -> Optional[str]:
    if tensor.device.type == "cuda" or name == "torch":
        return None
    if name == "triton" and os.environ.get("TRITON_INTERPRET") == "1":
        return None  # Triton's CPU interpreter: slow, for tests
    hint = " (set TRITON_INTERPRET=1 to run Triton kernels on CPU under the interpreter)" if name == "triton" else ""
    return f"backend {name!r} needs CUDA tensors, got a tensor on {tensor.device}{hint}"


def _problem(name: str, family: str, tensor: torch.Tensor, info: dict) -> Optional[str]:
    backend = _REGISTRY.get(name)
    if backend is None or (name in KNOWN_BACKENDS and not backend.kernels):  # declared, but nothing to register
        if name in KNOWN_BACKENDS:
            return f"backend {name!r} has no kernels in this build"
        return f"unknown backend {name!r}; choose from {sorted(set(KNOWN_BACKENDS) | set(_REGISTRY))} or None (auto)"
    if family not in backend.families():
        return f"backend {name!r} has no {family} kernel; it provides {backend.families()}"
    usable, reason = backend.status()
    if not usable:
        return f"backend {name!r} is unavailable: {reason}"
    return _device_problem(name, tensor) or backend.unsupported(family, tensor, info)


# ------------------------------------------------------------------------------------ measured per-shape choice
MEASURED_FILE = Path(__file__).with_name("measured_dispatch.json")


@lru_cache(maxsize=None)
def _measured_entries() -> tuple:
    """The measured table; an unreadable file is an error (it ships with the package), an absent one means none."""
    if not MEASURED_FILE.exists():
        return ()
    try:
        entries = json.loads(MEASURED_FILE.read_text())["entries"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise RuntimeError(f"{MEASURED_FILE} is corrupt ({error}); regenerate it with "
                           "`python -m benchmarks.report --update-dispatch`") from None
    return tuple(entries)


@lru_cache(maxsize=None)
def _gpu_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def measured_choice(family: str, tensor: torch.Tensor, info: dict, gpu: Optional[str] = None) -> Optional[str]:
    """The backend measured fastest on this GPU model for the nearest benchmarked shape of `family`, or None.

    Entries match on the GPU name, the dtype, training vs inference (`grad`: forward+backward timings vs forward
    alone) and the family's exact keys; among those the size key picks the nearest case."""
    if family not in MATCH_KEYS or tensor.device.type != "cuda" and gpu is None:
        return None
    entries = _measured_entries()
    if not entries:
        return None
    gpu = gpu or _gpu_name(tensor.device.index if tensor.device.index is not None else torch.cuda.current_device())
    exact, size_key = MATCH_KEYS[family]
    grad = bool(info.get("grad", torch.is_grad_enabled() and tensor.requires_grad))
    dtype = str(tensor.dtype).replace("torch.", "")
    candidates = [e for e in entries if e["gpu"] == gpu and e["family"] == family and e.get("grad") == grad
                  and e.get("dtype") in (dtype, None) and all(e["shape"].get(k) == info.get(k) for k in exact)]
    if not candidates:
        return None
    if size_key is None or info.get(size_key) is None:
        return candidates[0]["backend"]
    size = max(1, int(info[size_key]))
    return min(candidates, key=lambda e: abs(math.log(size / max(1, e["shape"][size_key]))))["backend"]


# The backend chosen by the innermost `use_backend` block of this thread / task (None: not inside one).
_SCOPED_BACKEND: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("dinotxt_fast_backend", default=None)


@contextlib.contextmanager
def use_backend(name: Optional[str]):
    """Run every op called inside the block (model forward, pooling, loss) on backend `name` ("torch", "triton",
    "cuda"), unless a call passes its own `backend=`; None or "auto" restores the default choice (DINOTXT_FAST_BACKEND,
    else automatic) inside the block. Scoped to the block and to the calling thread or asyncio task, unlike the
    environment variable it takes precedence over. A torch.compile'd graph keeps the backends chosen when it was
    traced."""
    if name is not None and name != "auto" and name not in KNOWN_BACKENDS and name not in _REGISTRY:
        raise ValueError(f"use_backend: unknown backend {name!r}; choose from "
                         f"{sorted(set(KNOWN_BACKENDS) | set(_REGISTRY))}, 'auto' or None")
    token = _SCOPED_BACKEND.set(None if name == "auto" else name)
    try:
        yield
    finally:
        _SCOPED_BACKEND.reset(token)


@torch.compiler.assume_constant_result  # read while tracing: the choice is fixed in the compiled graph
def _scoped_backend() -> Optional[str]:
    return _SCOPED_BACKEND.get()


def resolve(family: str, backend: Optional[str], tensor: torch.Tensor, **info) -> str:
    """The backend name to run `family` with for this call; a clear ValueError when an explicit choice can't run."""
    requested = backend or _scoped_backend() or os.environ.get(ENV_VAR) or "auto"
    if requested != "auto":
        problem = _problem(requested, family, tensor, info)
        if problem is not None:
            raise ValueError(f"{family}: {problem}")
        return requested
    if tensor.device.type != "cuda":
        return "torch"
    measured = measured_choice(family, tensor, info)
    if measured is not None and _problem(measured, family, tensor, info) is None:
        return measured
    for name in AUTO_ORDER[family]:
        if _problem(name, family, tensor, info) is None:
            return name
    return "torch"


def backends() -> dict[str, dict]:
    """What each backend can run here and, when it can't, why."""
    report = {}
    for name in sorted(set(KNOWN_BACKENDS) | set(_REGISTRY)):
        backend = _REGISTRY.get(name)
        if backend is None or not backend.kernels:
            report[name] = {"available": False, "reason": "no kernels for this backend in this build", "ops": []}
            continue
        usable, reason = backend.status()
        report[name] = {"available": usable, "reason": reason, "ops": backend.families()}
    return report
