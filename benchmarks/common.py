"""What every benchmark script shares: the environment record and the timer."""
from __future__ import annotations

import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parents[1]


def _run(cmd) -> Optional[str]:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20, cwd=ROOT).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def library_version(module: str) -> Optional[str]:
    """The version of an optional library, None when it does not import."""
    try:
        return getattr(__import__(module), "__version__", "unknown")
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return None


def environment(device) -> dict:
    """Machine, versions, git commit and kernel backends: saved with every result file."""
    import torch

    import dinotxt_fast
    from dinotxt_fast import _ext, ops

    device = torch.device(device)
    env = {"python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
           "triton": library_version("triton"), "dinotxt_fast": dinotxt_fast.__version__,
           "cuda_runtime_torch": torch.version.cuda, "git_commit": _run(["git", "rev-parse", "HEAD"]),
           "git_dirty": bool(_run(["git", "status", "--porcelain", "--untracked-files=no"])),
           "device": str(device), "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
           "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "backends": ops.backends(),
           "extension": _ext.cuda_info() if _ext.extension() is not None else _ext.extension_error()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, sm_count=props.multi_processor_count,
                   gpu_memory_gb=round(props.total_memory / 2**30, 1),
                   compute_capability=f"{props.major}.{props.minor}", cudnn=torch.backends.cudnn.version(),
                   driver=_run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]))
    else:
        env["cpu"] = platform.processor() or platform.machine()
    return env


def time_ms(fn: Callable[[], object], device, quick: bool) -> tuple[float, float, float]:
    """(median, 20%, 80%) of fn's time in ms: CUDA events through triton.testing.do_bench on a GPU (warm-up
    included), a few perf_counter repeats on the CPU (smoke runs only)."""
    if str(device).startswith("cuda"):
        from triton.testing import do_bench

        median, q20, q80 = do_bench(fn, warmup=10 if quick else 25, rep=50 if quick else 200,
                                    quantiles=[0.5, 0.2, 0.8])
        return median, q20, q80
    fn()
    times = []
    for _ in range(3 if quick else 10):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    return statistics.median(times), times[int(0.2 * (len(times) - 1))], times[int(0.8 * (len(times) - 1))]
