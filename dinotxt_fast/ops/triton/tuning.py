"""Autotuning of the Triton kernels, and the switch that turns it off for correctness runs.

Every autotuned kernel here is declared with `autotune(name, configs, key, interpret=...)`, whose configuration list
starts with its known-good configuration (the first one its pruner keeps is the fixed one: compiled for sm_90 with
Triton 3.6 and 3.9 at the real shapes without spills and within shared memory, benchmarks/results/codegen/).

- `DINOTXT_FAST_AUTOTUNE=0`: every autotuned kernel runs that fixed configuration for the call's arguments, untimed.
  A GPU correctness run (benchmarks/gpu_prove.sh) then compiles about one kernel per shape family instead of every
  candidate, and its results do not depend on which candidate won a timing. On a GPU the switch is read when a
  kernel is tuned for a new autotune key (set it before the first call).
- Under Triton's CPU interpreter (TRITON_INTERPRET=1) each kernel runs one small configuration of its own, which
  exercises every code path at test shapes; with DINOTXT_FAST_AUTOTUNE=0 (read at import there) the interpreter runs
  the GPU's fixed configurations instead, so CPU tests can prove the configurations a GPU run will use
  (tests/ops/test_tuning.py).
- A kernel argument FIXED_CONFIG that is true fixes the configuration too (attention's deterministic mode).

`TUNED` lists every kernel declared here with its GPU configurations and its selection rule, for the tests and for
tools/triton_codegen.py.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import triton

ENV_VAR = "DINOTXT_FAST_AUTOTUNE"
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def autotune_enabled() -> bool:
    """False when DINOTXT_FAST_AUTOTUNE=0: every autotuned kernel runs its fixed configuration."""
    return os.environ.get(ENV_VAR, "1").strip() != "0"


@contextlib.contextmanager
def autotune_disabled() -> Iterator[None]:
    """DINOTXT_FAST_AUTOTUNE=0 inside the block (the selection rules read it when they run)."""
    saved = os.environ.get(ENV_VAR)
    os.environ[ENV_VAR] = "0"
    try:
        yield
    finally:
        if saved is None:
            del os.environ[ENV_VAR]
        else:
            os.environ[ENV_VAR] = saved


# Under the interpreter the GPU configurations run only with the switch off (decided at import, like the kernels).
RUN_GPU_CONFIGS = not INTERPRET or not autotune_enabled()

Prune = Callable[..., list]


@dataclass(frozen=True)
class Tuned:
    """One autotuned kernel: its GPU configurations and the rule that picks the ones to time (or the fixed one)."""
    name: str
    configs: tuple
    select: Prune  # select(configs, named_args, **kwargs) -> kept configurations, as Triton's early_config_prune

    def fixed(self, **args) -> triton.Config:
        """The configuration DINOTXT_FAST_AUTOTUNE=0 runs for these (named) kernel arguments."""
        with autotune_disabled():
            (config,) = self.select(list(self.configs), args)
        return config


TUNED: dict[str, Tuned] = {}


def _run_once(kernel_call, quantiles):
    """The interpreter's stand-in for timing (Triton 3.6 times even a single kept configuration): one call."""
    kernel_call()
    return [0.0] * len(quantiles)


def autotune(name: str, configs: list, key: list, *, interpret: triton.Config, prune: Optional[Prune] = None,
             **kwargs):
    """triton.autotune over `configs` (their known-good one first), pruned by `prune` (default: keep all) and fixed
    to the first kept one when autotuning is off; under the interpreter `[interpret]` unless the switch is off.
    `kwargs` go to triton.autotune (reset_to_zero, restore_value)."""
    if name in TUNED:
        raise ValueError(f"autotuned kernel {name!r} is declared twice")

    def select(candidates, named_args, **call_kwargs):
        kept = prune(candidates, named_args, **call_kwargs) if prune is not None else list(candidates)
        kept = kept or list(candidates[:1])
        if not autotune_enabled() or {**named_args, **call_kwargs}.get("FIXED_CONFIG"):
            return kept[:1]
        return kept

    TUNED[name] = Tuned(name, tuple(configs), select)
    run = list(configs) if RUN_GPU_CONFIGS else [interpret]
    if INTERPRET:
        kwargs["do_bench"] = _run_once
    return triton.autotune(configs=run, key=key, prune_configs_by={"early_config_prune": select}, **kwargs)
