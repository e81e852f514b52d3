"""The one benchmark harness every script in benchmarks/ uses.

- `Benchmark(...)`: what a script declares (its cases, how to run one, its own flags, settings and notes);
  `Benchmark.main(argv)` is the shared driver: the common flags (--device, --quick, --out, --budget-s, --list), the
  environment and ceilings, the case loop with a skipped row for a case that fails to set up, the ratios, the JSON.
- `environment(device)`: machine, driver, CUDA, torch, triton, baseline-library versions, git commit, kernel backends.
- `measure_ceilings(device)`: what this machine can do at best, measured first: dense matmul TFLOP/s (bf16 on a GPU,
  fp32 on a CPU) and device-to-device copy GB/s (bytes read + written). Every result is also a fraction of these.
- `Rotation`: several copies of a case's inputs, together bigger than twice the L2 cache, cycled through by the timed
  function so that no timed call finds its inputs in L2 from the previous one.
- `time_ms(fn)`: median and 20/80 % quantiles: CUDA events through `triton.testing.do_bench` on a GPU (warm-up
  included), perf_counter repeats on a CPU (smoke runs).
- `peak_memory_mib(fn)`: the peak allocated during one call above what was allocated before it.
- `backend_problem(...)`, `recording_backends()`, `attention_through_sdpa()`: which backend can run, which ran, and
  the eager baselines' attention.
- `result(...)`: one JSON row; `add_ratios(rows)`: best baseline / ours per case and pass; `write_results(...)`: the
  JSON file `<benchmark>-<machine>-<time>.json` that `benchmarks/report.py` turns into tables and plots.

Row convention: `impl` names starting with "ours" are dinotxt-fast; every other timed row is a baseline.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "benchmarks" / "results"
SCHEMA = 2  # bump when the row layout changes; report.py reads this
OPTIONAL_LIBRARIES = ("xformers", "flash_attn", "inf_cl", "open_clip")


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
           "extension": _ext.cuda_info() if _ext.extension() is not None else _ext.extension_error(),
           "libraries": {name: library_version(name) for name in OPTIONAL_LIBRARIES}}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, sm_count=props.multi_processor_count,
                   gpu_memory_gb=round(props.total_memory / 2**30, 1),
                   l2_cache_mb=round(getattr(props, "L2_cache_size", 0) / 2**20, 1),
                   compute_capability=f"{props.major}.{props.minor}", cudnn=torch.backends.cudnn.version(),
                   driver=_run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]))
    else:
        env["cpu"] = _cpu_model() or platform.processor() or platform.machine()
        env["cpu_count"] = os.cpu_count()
    return env


def _cpu_model() -> Optional[str]:
    """The CPU's model name (Linux /proc/cpuinfo), None elsewhere."""
    try:
        with open("/proc/cpuinfo") as info:
            return next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), None)
    except OSError:
        return None


def machine_tag(env: dict) -> str:
    """A short file-name-safe machine name: the GPU's, or cpu-<model>-<n>cores."""
    name = env.get("gpu") or "-".join(["cpu", *([env["cpu"], f"{env['cpu_count']}cores"] if env.get("cpu") else [])])
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


# ------------------------------------------------------------------------------------------------------- timing
def is_cuda(device) -> bool:
    return str(device).startswith("cuda")


def synchronize(device) -> None:
    if is_cuda(device):
        import torch

        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device, quick: bool) -> tuple[float, float, float]:
    """(median, 20 %, 80 %) of fn's time in ms."""
    if is_cuda(device):
        import torch
        from triton.testing import do_bench

        # do_bench sizes its repeat count from a time budget (ms); a slow call (a training step) would get one
        # sample, so the budget grows to at least `min_reps` calls of the estimated duration.
        min_reps = 5 if quick else 10
        fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        budget = max(40 if quick else 150, 1.2 * min_reps * start.elapsed_time(end))
        median, q20, q80 = do_bench(fn, warmup=10 if quick else 25, rep=budget, quantiles=[0.5, 0.2, 0.8])
        return median, q20, q80
    fn()
    times = []
    for _ in range(3 if quick else 10):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    return statistics.median(times), times[int(0.2 * (len(times) - 1))], times[int(0.8 * (len(times) - 1))]


def peak_memory_mib(fn: Callable[[], object], device) -> Optional[float]:
    """Peak memory allocated during one call of fn above what was allocated before it (None on a CPU)."""
    if not is_cuda(device):
        return None
    import torch

    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = fn()
    torch.cuda.synchronize(device)
    del out
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def free_cache(device) -> None:
    """Release cached CUDA blocks between implementations. A CUDA error here means a kernel left the context
    unusable: it is not raised, so that every later row records the error as its skip reason and the results are
    still written."""
    gc.collect()  # optimizer states and autograd graphs held in reference cycles
    if is_cuda(device):
        import torch

        try:
            torch.cuda.empty_cache()
        except RuntimeError:
            pass


def error_text(error: BaseException) -> str:
    """A skipped row's reason: the exception's type and the first line of its message."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:300] if lines else ''}"


def first_call(fn: Callable[[], object], device):
    """(fn(), its synchronised wall time in s): a first call's JIT compilation and autotuning, recorded per row as
    first_call_s so that a run shows where its time went."""
    start = time.perf_counter()
    out = fn()
    synchronize(device)
    return out, round(time.perf_counter() - start, 3)


def _positive_seconds(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def add_budget_argument(parser) -> None:
    parser.add_argument("--budget-s", type=_positive_seconds, default=None,
                        help="time limit in seconds: implementations not started by then give skipped rows (the "
                             "GPU suite passes its share of the device's time limit; default: none)")


def budget_check(budget_s: Optional[float]) -> Callable[[], Optional[str]]:
    """A function giving the skip reason once `budget_s` seconds (None: no limit) have passed since this call."""
    deadline = None if budget_s is None else time.monotonic() + budget_s

    def check() -> Optional[str]:
        if deadline is not None and time.monotonic() > deadline:
            return f"not run: the time budget (--budget-s {budget_s:g}) was used up"
        return None

    return check


def l2_bytes(device) -> int:
    if not is_cuda(device):
        return 32 * 2**20  # a typical last-level cache; CPU runs are smoke runs anyway
    import torch

    return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 50 * 2**20)


def tensor_bytes(obj) -> int:
    """Bytes of every tensor in a (nested) tuple/list/dict."""
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


class Rotation:
    """Copies of one case's inputs, together at least twice the L2 cache (at most `max_copies`): `next()` returns
    them in turn, so a timed call never reads inputs the previous call left in L2.

        inputs = Rotation(lambda: make_inputs(case), device)
        time_ms(lambda: fn(*inputs.next()), device, quick)
    """

    def __init__(self, make: Callable[[], Sequence], device, max_copies: int = 8):
        first = make()
        per_set = max(tensor_bytes(first), 1)
        copies = min(max_copies, max(1, math.ceil(2 * l2_bytes(device) / per_set)))
        self.sets = [first] + [make() for _ in range(copies - 1)]
        self.bytes_per_set = per_set
        self._i = 0

    def __len__(self) -> int:
        return len(self.sets)

    def next(self):
        self._i = (self._i + 1) % len(self.sets)
        return self.sets[self._i]


# ----------------------------------------------------------------------------------------------------- ceilings
_CEILINGS: dict[str, dict] = {}


def measure_ceilings(device, quick: bool = False) -> dict:
    """Dense matmul TFLOP/s and copy GB/s on this device, measured once per process (a few seconds on a GPU): the
    suite runs every benchmark in one process, so they all share one measurement."""
    import torch

    device = torch.device(device)
    if str(device) not in _CEILINGS:
        _CEILINGS[str(device)] = _measure_ceilings(torch, device, quick)
        print("ceilings: " + ", ".join(f"{k}={v:.1f}" for k, v in _CEILINGS[str(device)].items()
                                       if isinstance(v, float)), flush=True)
    return _CEILINGS[str(device)]


def _measure_ceilings(torch, device, quick: bool) -> dict:
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    n = 8192 if cuda else 512
    mm_ms = _matmul_ms(torch, n, dtype, device, quick)
    numel = (1 << 28 if cuda else 1 << 24)  # 512 MiB of fp16 on a GPU (>> L2), 64 MiB of fp32 on a CPU
    copy_ms, moved = _copy_ms(torch, numel, torch.float16 if cuda else torch.float32, device, quick)
    if cuda:
        torch.cuda.empty_cache()
    return {"matmul_tflops": 2 * n**3 / (mm_ms * 1e-3) / 1e12, "matmul_dtype": str(dtype).replace("torch.", ""),
            "matmul_shape": [n, n, n], "copy_gbps": moved / (copy_ms * 1e-3) / 1e9,
            "copy_bytes": moved, "note": "copy counts bytes read + written"}


def _matmul_ms(torch, n: int, dtype, device, quick: bool) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return time_ms(lambda: torch.mm(a, b), device, quick)[0]


def _copy_ms(torch, numel: int, dtype, device, quick: bool) -> tuple[float, int]:
    """(median ms of one device-to-device copy, bytes it reads + writes)."""
    src = torch.empty(numel, device=device, dtype=dtype).uniform_()
    dst = torch.empty_like(src)
    return time_ms(lambda: dst.copy_(src), device, quick)[0], 2 * src.numel() * src.element_size()


# ------------------------------------------------------------------------------------------- dispatch helpers
def sdpa_attention(q, k, v, *, causal=False, scale=None, lengths=None, backend=None):
    """dinotxt_fast.ops.attention's signature on torch's SDPA: the eager baselines' attention. `lengths` (key
    padding after each text's EOT) is ignored: the causal, EOT-pooled text tower never reads those keys, so the
    embeddings are the same (images never pass lengths)."""
    import torch.nn.functional as F

    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal,
                                         scale=scale)
    return out.transpose(1, 2)


@contextlib.contextmanager
def attention_through_sdpa() -> Iterator[None]:
    """Every dinotxt_fast.ops.attention call made inside runs `sdpa_attention` instead (the model's attention
    modules look ops.attention up at call time): the eager baselines' model. Restored on exit."""
    from dinotxt_fast import ops

    saved = ops.attention
    ops.attention = sdpa_attention
    try:
        yield
    finally:
        ops.attention = saved


def backend_problem(name: str, families: Sequence[str], device) -> Optional[str]:
    """Why backend `name` cannot run every op family of `families` on `device` here, or None when it can."""
    from dinotxt_fast import ops

    report = ops.backends().get(name)
    if report is None:
        return f"backend {name!r} is not registered"
    if not report["available"]:
        return f"backend {name!r} is unavailable: {report['reason']}"
    missing = [family for family in families if family not in report["ops"]]
    if missing:
        return (f"backend {name!r} has no {', '.join(missing)} kernel (it provides "
                f"{', '.join(report['ops']) or 'none'})")
    if name == "cuda" and not is_cuda(device):
        return "the CUDA backend needs a CUDA device"
    return None


@contextlib.contextmanager
def recording_backends() -> Iterator[dict]:
    """Yields {op family: [backends it resolved to]} filled by the op calls made inside: the evidence of what a run
    really ran, fallbacks included. `resolve` is wrapped wherever the ops may look it up at call time (the
    dinotxt_fast.ops namespace and its dispatch module)."""
    from dinotxt_fast import ops
    from dinotxt_fast.ops import dispatch

    used: dict[str, list[str]] = {}
    original = dispatch.resolve
    holders = [module for module in (ops, dispatch) if getattr(module, "resolve", None) is original]

    def recording(family, backend, tensor, **info):
        name = original(family, backend, tensor, **info)
        if name not in used.setdefault(family, []):
            used[family].append(name)
        return name

    for module in holders:
        module.resolve = recording
    try:
        yield used
    finally:
        for module in holders:
            module.resolve = original


# ------------------------------------------------------------------------------------------------------ results
def result(case: str, impl: str, timing: Optional[tuple] = None, *, pass_: Optional[str] = None,
           shape: Optional[dict] = None, flops: Optional[float] = None, bytes_moved: Optional[float] = None,
           items: Optional[float] = None, item_name: Optional[str] = None, peak_memory: Optional[float] = None,
           ceilings: Optional[dict] = None, skipped: Optional[str] = None, **extra) -> dict:
    """One result row. `timing` is time_ms's tuple; `flops`/`bytes_moved`/`items` are the work of one call, from
    which TFLOP/s, GB/s and items/s (e.g. images/s) are derived, plus the fraction of the measured ceilings."""
    row = {"case": case, "impl": impl, "pass": pass_, "shape": shape or {}}
    if skipped is not None or timing is None:
        row["skipped"] = skipped or "not timed"
        return {**row, **extra}
    median, q20, q80 = timing
    row.update(median_ms=median, q20_ms=q20, q80_ms=q80, peak_memory_mib=peak_memory)
    seconds = median * 1e-3
    if flops:
        row["tflops"] = flops / seconds / 1e12
        if ceilings and ceilings.get("matmul_tflops"):
            row["fraction_of_matmul_peak"] = row["tflops"] / ceilings["matmul_tflops"]
    if bytes_moved:
        row["gbps"] = bytes_moved / seconds / 1e9
        if ceilings and ceilings.get("copy_gbps"):
            row["fraction_of_copy_bandwidth"] = row["gbps"] / ceilings["copy_gbps"]
    if items:
        row[f"{item_name or 'items'}_per_s"] = items / seconds
    row.update(extra)
    return row


def is_ours(row: dict) -> bool:
    return row["impl"].startswith("ours")


def add_ratios(rows: list[dict]) -> None:
    """For each of our timed rows: the best baseline of the same case and pass, its time / ours (speedup, >1 is
    faster) and its peak memory / ours (memory saving), both measured in this run."""
    timed = [r for r in rows if "median_ms" in r]
    for r in timed:
        if not is_ours(r):
            continue
        base = [b for b in timed if b["case"] == r["case"] and b["pass"] == r["pass"] and not is_ours(b)]
        if not base:
            continue
        best = min(base, key=lambda b: b["median_ms"])
        r["best_baseline"] = best["impl"]
        r["speedup_vs_best_baseline"] = best["median_ms"] / r["median_ms"]
        if best.get("peak_memory_mib") and r.get("peak_memory_mib"):
            r["memory_ratio_vs_best_baseline"] = best["peak_memory_mib"] / r["peak_memory_mib"]


def add_ratios_against(rows: list[dict], baseline: str, label: str) -> None:
    """speedup_vs_<label> / memory_ratio_vs_<label> on our timed rows: against the row of implementation `baseline`
    of the same case and pass, the baseline a target is stated against (not necessarily the fastest one, which
    add_ratios picks)."""
    base = {(r["case"], r["pass"]): r for r in rows if r["impl"] == baseline and "median_ms" in r}
    for r in rows:
        ref = base.get((r["case"], r["pass"]))
        if ref is None or not is_ours(r) or "median_ms" not in r:
            continue
        r[f"speedup_vs_{label}"] = ref["median_ms"] / r["median_ms"]
        if ref.get("peak_memory_mib") and r.get("peak_memory_mib"):
            r[f"memory_ratio_vs_{label}"] = ref["peak_memory_mib"] / r["peak_memory_mib"]


def max_abs_diff(a, b) -> float:
    """The largest |a - b| of two tensors of one shape, in float64 (0 when empty)."""
    return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0


def print_row(row: dict) -> None:
    """One line per row while a benchmark runs."""
    head = f"  {row['case'][:34]:34s} {row['impl'][:34]:34s} {(row.get('pass') or '')[:8]:8s}"
    if "skipped" in row:
        print(f"{head} skipped: {row['skipped'][:120]}", flush=True)
        return
    parts = [f"{row['median_ms']:9.3f} ms"]
    for key, unit in (("tflops", "TFLOP/s"), ("gbps", "GB/s")):
        if key in row:
            parts.append(f"{row[key]:7.1f} {unit}")
    parts += [f"{row[k]:.1f} {k[:-6]}/s" for k in row if k.endswith("_per_s")]
    if row.get("peak_memory_mib") is not None:
        parts.append(f"{row['peak_memory_mib']:.0f} MiB")
    print(f"{head} " + "  ".join(parts), flush=True)


def _finite(value):
    """JSON has no NaN/inf: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def write_results(benchmark: str, rows: list[dict], env: dict, ceilings: Optional[dict], out_dir, *,
                  settings: Optional[dict] = None, notes: Optional[dict] = None, path: Optional[Path] = None,
                  progress: Optional[dict] = None, quiet: bool = False) -> Path:
    """Write one run's JSON: benchmark name, environment, ceilings, settings (dtype, quick...), notes (how the work
    of a case is counted), the rows and, from the driver, its progress (complete, cases done), to `path` (default: a
    new `<benchmark>-<machine>-<time>.json` in out_dir; replaced atomically). Returns the path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = path or out_dir / f"{benchmark}-{machine_tag(env)}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    record = {"benchmark": benchmark, "schema": SCHEMA, "environment": env, "ceilings": ceilings,
              "settings": settings or {}, "notes": notes or {}, "results": rows}
    if progress is not None:
        record["progress"] = progress
    partial = path.with_name(path.name + ".tmp")
    partial.write_text(json.dumps(_finite(record), indent=1, default=str) + "\n")
    partial.replace(path)  # a process stopped mid-write leaves the previous complete file
    if not quiet:
        print(f"wrote {path}", flush=True)
    return path


def print_speedups(rows: list[dict]) -> None:
    """The run's closing lines: each of our rows against the best baseline of its case and pass."""
    for r in rows:
        if "speedup_vs_best_baseline" in r:
            memory = r.get("memory_ratio_vs_best_baseline")
            print(f"  {r['case'][:34]:34s} {r['impl'][:34]:34s} {(r.get('pass') or '')[:8]:8s} "
                  f"{r['speedup_vs_best_baseline']:.2f}x vs {r['best_baseline']}"
                  + (f", memory {memory:.2f}x" if memory else ""), flush=True)


# ------------------------------------------------------------------------------------------------------- driver
@dataclass
class Run:
    """One run of a benchmark, as the driver hands it to the script's functions."""
    args: argparse.Namespace
    device: Any  # torch.device
    quick: bool  # fewer repetitions: --quick, or any CPU run (a smoke run)
    env: dict
    ceilings: dict
    budget: Callable[[], Optional[str]]  # the skip reason once --budget-s has passed, else None
    state: Any = None  # what the script's setup() returned (its implementations, a model...)


@dataclass(frozen=True)
class Benchmark:
    """What a benchmark script declares; `main` does the rest, the same way for every script: the common flags
    (--device, --quick, --out, --budget-s, --list), the environment and the measured ceilings, the case loop (a case
    whose setup fails gives a "(case setup)" skipped row and the others still run), the ratios and the JSON record.

    - `cases(args)`: the cases this run measures; `describe(case)`: its line in --list and in the progress output;
    - `run_case(run, case)`: the case's rows (harness.result), one per implementation and pass;
    - `arguments(parser)`: the script's own flags; `check(parser, args)`: validates and completes them (parser.error
      on a bad one), after --device is resolved and TRITON_INTERPRET set for a CPU run;
    - `setup(run)`: what every case shares (implementations, a model), kept in run.state;
    - `ratios`: functions adding the script's own ratio fields to the rows, after add_ratios;
    - `settings(run, cases)` and `notes`: recorded in the JSON (device, quick and budget_s are added)."""
    name: str  # the JSON file's prefix and the suite's name for it (benchmarks.BENCHMARKS)
    doc: str  # the script's docstring: --help's description (first paragraph) and epilog
    cases: Callable[[argparse.Namespace], list]
    run_case: Callable[[Run, Any], list]
    describe: Callable[[Any], str] = lambda case: case.name
    arguments: Callable[[argparse.ArgumentParser], None] = lambda parser: None
    check: Callable[[argparse.ArgumentParser, argparse.Namespace], None] = lambda parser, args: None
    setup: Callable[[Run], Any] = lambda run: None
    ratios: tuple = ()
    settings: Callable[[Run, list], dict] = lambda run, cases: {}
    notes: dict = field(default_factory=dict)
    setup_pass: Optional[str] = None  # the pass of a "(case setup)" row
    quick_help: str = "fewer cases and repetitions"

    def parser(self) -> argparse.ArgumentParser:
        parser = argparse.ArgumentParser(description=self.doc.split("\n\n")[0],
                                         formatter_class=argparse.RawDescriptionHelpFormatter, epilog=self.doc)
        parser.add_argument("--device", choices=("cuda", "cpu"), default=None,
                            help="cuda: the real benchmark (default when a GPU is present); cpu: a smoke run of tiny "
                                 "shapes, Triton through its interpreter")
        parser.add_argument("--quick", action="store_true", help=self.quick_help)
        parser.add_argument("--list", action="store_true", help="print the cases and exit")
        parser.add_argument("--out", default=str(RESULTS_DIR), help="results directory")
        add_budget_argument(parser)
        self.arguments(parser)
        return parser

    def parse_args(self, argv=None) -> argparse.Namespace:
        parser = self.parser()
        args = parser.parse_args(argv)
        if args.device is None:
            import torch

            args.device = "cuda" if torch.cuda.is_available() else "cpu"
        if args.device == "cpu":
            os.environ.setdefault("TRITON_INTERPRET", "1")  # before check() or the run imports the Triton kernels
        self.check(parser, args)
        return args

    def main(self, argv=None) -> int:
        args = self.parse_args(argv)
        budget = budget_check(args.budget_s)  # from the start: the suite's hard limit counts the setup too
        cases = self.cases(args)
        if args.list:
            for case in cases:
                print(self.describe(case))
            return 0
        import torch

        if args.device == "cuda" and not torch.cuda.is_available():
            print(f"{self.name}: --device cuda but no CUDA device is available (--device cpu --quick is the smoke "
                  "run)", file=sys.stderr)
            return 2
        device = torch.device(args.device)
        quick = args.quick or device.type == "cpu"
        env = environment(device)
        ceilings = measure_ceilings(device, quick)
        run = Run(args, device, quick, env, ceilings, budget)
        torch.manual_seed(0)  # inputs drawn from the global generator are the same every run
        run.state = self.setup(run)
        rows: list[dict] = []
        path = None
        for done, case in enumerate(cases, 1):
            print(self.describe(case), flush=True)
            try:
                rows += self.run_case(run, case)
            except Exception as error:  # noqa: BLE001 - e.g. its inputs do not fit: the other cases still run
                rows.append(result(case.name, "(case setup)", pass_=self.setup_pass, skipped=error_text(error)))
                print_row(rows[-1])
            free_cache(device)
            # The JSON so far after every case: a run stopped at its time limit (the GPU suite's hard limit of its
            # share) keeps the cases it finished; the last write, below, marks the record complete.
            path = self._write(run, cases, rows, path, complete=False, cases_done=done)
        settings = self._settings(run, cases)  # it may read run.state
        run.state = None  # the implementations or the model, before the results are written
        free_cache(device)
        self._write(run, cases, rows, path, complete=True, cases_done=len(cases), settings=settings)
        print_speedups(rows)
        return 0

    def _settings(self, run: Run, cases: list) -> dict:
        return {"device": run.args.device, "quick": run.args.quick, "budget_s": run.args.budget_s,
                **self.settings(run, cases)}

    def _write(self, run: Run, cases: list, rows: list[dict], path: Optional[Path], *, complete: bool,
               cases_done: int, settings: Optional[dict] = None) -> Path:
        """The record of the rows so far (ratios added; each call recomputes them) at `path` (None: a new file)."""
        add_ratios(rows)
        for add in self.ratios:
            add(rows)
        settings = settings if settings is not None else self._settings(run, cases)
        return write_results(self.name, rows, run.env, run.ceilings, run.args.out, settings=settings,
                             notes=self.notes, path=path, quiet=not complete,
                             progress={"complete": complete, "cases_done": cases_done, "cases": len(cases)})
