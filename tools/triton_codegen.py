#!/usr/bin/env python3
"""Codegen audit of the Triton kernels: compile every kept autotune configuration of every kernel for sm_90 at the
real DINO.txt shapes, without a GPU, and write a table (kernel, configuration, dtype, shared memory, registers,
spills, compile time: wall and CPU seconds, the latter the cost on any machine) as JSON.

    python tools/triton_codegen.py --out benchmarks/results/codegen/triton-3.9.0-sm90.json
    PYTHONPATH=/path/to/triton36 python tools/triton_codegen.py --out .../triton-3.6.0-sm90.json   # another Triton
    python tools/triton_codegen.py --subset ci --check                                          # what CI runs

How: each case calls the Triton backend's host wrappers (ops/triton/<family>.py) on CPU tensors of a real shape with
every kernel object swapped for a recorder, so the launches (arguments, strides, constexprs) are exactly what the
wrappers pass. Each recorded launch is expanded as the autotuner would expand it: its configurations, pruned by the
kernel's own `early_config_prune` for those arguments, then its heuristics; its arguments are specialised the way
Triton's launcher does (16-divisibility of integers and pointers, integers equal to 1 as constants). Every distinct
compilation is run once with `triton.compile(..., target=GPUTarget("cuda", 90, 32))` in a pool of worker processes
(fresh cache; ptxas -v's report parsed for registers and spills), each with a time limit. Nothing is launched.

"fixed" marks the configuration that DINOTXT_FAST_AUTOTUNE=0 runs (ops/triton/tuning.py): the one every GPU
correctness run (benchmarks/gpu_prove.sh) compiles. `--check` exits 1 when a configuration needs more than the
227 KB of shared memory an sm_90 block may have, or when a kept bf16/fp16 configuration spills registers, unless
EXCEPTIONS below justifies it.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import multiprocessing
import os
import platform
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

REPO = Path(__file__).resolve().parents[1]
SMEM_LIMIT = 227 * 1024  # bytes of shared memory one block may use on sm_90 (cudaFuncAttributeMaxDynamicSharedMemory)
TARGET = ("cuda", 90, 32)
LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")
# (kernel, dtype) -> why a kept configuration of it may spill; `--check` accepts those spills (none at present).
EXCEPTIONS: dict[tuple[str, str], str] = {}


# ------------------------------------------------------------------------------------------------- launches
@dataclass
class Launch:
    """One kernel launch a host wrapper made: the module-level kernel object and its call arguments."""
    module: str
    name: str
    kernel: object
    args: tuple
    kwargs: dict
    case: str
    dtype: str


class _Recorder:
    """Stands in for a kernel object: `kernel[grid](...)` records the launch instead of running it."""

    def __init__(self, module: str, name: str, kernel, sink: list, context: dict):
        self.module, self.name, self.kernel, self.sink, self.context = module, name, kernel, sink, context

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.sink.append(Launch(self.module, self.name, self.kernel, args, dict(kwargs), **self.context))
        return launch


def _is_kernel(obj) -> bool:
    from triton.runtime.jit import KernelInterface

    return isinstance(obj, KernelInterface)


@contextlib.contextmanager
def recording(modules, sink: list, context: dict):
    """Every kernel object of `modules` records its launches into `sink` inside the block."""
    saved = []
    for module in modules:
        for name, obj in list(vars(module).items()):
            if _is_kernel(obj):
                saved.append((module, name, obj))
                setattr(module, name, _Recorder(module.__name__, name, obj, sink, context))
    try:
        yield
    finally:
        for module, name, obj in saved:
            setattr(module, name, obj)


@contextlib.contextmanager
def gpu_like_planning(sm_count: int = 132):
    """Host planning as on an H100/H200 (132 SMs) although the tensors are on the CPU: the pooling row splits and
    anything else that reads the SM count."""
    import torch

    from dinotxt_fast.ops import planning

    class _Props:
        multi_processor_count = sm_count

    saved_props, saved_splits = torch.cuda.get_device_properties, planning.row_splits
    torch.cuda.get_device_properties = lambda *a, **k: _Props()
    gpu = torch.device("cuda")

    def row_splits(batch, rows, device):
        return saved_splits(batch, rows, gpu)

    patched = []
    for module in list(sys.modules.values()):
        if getattr(module, "__name__", "").startswith("dinotxt_fast.ops.triton") and \
                getattr(module, "row_splits", None) is saved_splits:
            patched.append(module)
            module.row_splits = row_splits
    try:
        yield
    finally:
        torch.cuda.get_device_properties = saved_props
        for module in patched:
            module.row_splits = saved_splits


# ---------------------------------------------------------------------------------------------------- cases
@dataclass
class Case:
    name: str
    family: str
    dtypes: tuple
    run: Callable  # run(dtype): calls the host wrappers once
    subsets: tuple = ("all",)


def _attention_cases():
    import torch

    from dinotxt_fast.ops.triton import attention as A

    def vit(b, n, h, d, fused=False):
        def run(dtype):
            if fused:
                q, k, v = torch.empty(b, n, 3, h, d, dtype=dtype).unbind(2)
            else:
                q, k, v = (torch.empty(b, n, h, d, dtype=dtype) for _ in range(3))
            _attention_passes(A, q, k, v, False, None)
        return run

    def text(b, n, h, d):
        def run(dtype):
            q, k, v = torch.empty(b, n, 3, h, d, dtype=dtype).unbind(2)
            _attention_passes(A, q, k, v, True, torch.full((b,), n, dtype=torch.int64))
        return run

    dtypes = ("bfloat16", "float16", "float32")
    return [
        Case("attention vit-224 N=261 H=16 Dh=64", "attention", dtypes, vit(2, 261, 16, 64), ("all", "ci")),
        Case("attention vit-448 N=1029 H=16 Dh=64 fused qkv", "attention", dtypes, vit(1, 1029, 16, 64, True)),
        Case("attention vit-896 N=4101 H=16 Dh=64", "attention", dtypes, vit(1, 4101, 16, 64)),
        Case("attention text N=77 H=20 Dh=64 causal lengths", "attention", dtypes, text(4, 77, 20, 64),
             ("all", "ci")),
        Case("attention N=261 H=8 Dh=128", "attention", dtypes, vit(2, 261, 8, 128), ("all", "ci")),
        Case("attention N=77 H=8 Dh=128 causal lengths", "attention", dtypes, text(4, 77, 8, 128)),
    ]


def _attention_passes(A, q, k, v, causal, lengths):
    """Forward, then the backward in the default (atomic dQ) and the deterministic mode."""
    import torch

    o, lse = A.attention_forward(q, k, v, causal, 0.125, lengths)
    o = torch.empty(q.shape[:-1] + v.shape[-1:], dtype=q.dtype)
    lse = torch.empty(q.shape[0], q.shape[2], q.shape[1], dtype=torch.float32)
    go = torch.empty_like(o)
    A.attention_backward(go, q, k, v, o, lse, causal, 0.125, lengths)
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        A.attention_backward(go, q, k, v, o, lse, causal, 0.125, lengths)
    finally:
        torch.use_deterministic_algorithms(deterministic)


def _pooling_cases():
    import torch

    from dinotxt_fast.ops.triton import pooling as P

    def run_pool(b, patches, d):
        def run(dtype):
            tokens = torch.empty(b, 1 + 4 + patches, d, dtype=dtype)
            w, bias = torch.empty(d, dtype=dtype), torch.empty(d, dtype=dtype)
            for ln in (False, True):
                for normalize in (False, True):
                    args = (w, bias) if ln else (None, None)
                    P.patch_pool_forward(tokens, 4, *args, 1e-6, normalize)
                    grad = torch.empty(b, 2 * d, dtype=dtype)
                    P.patch_pool_backward(grad, tokens, 4, *args, 1e-6, normalize)
        return run

    dtypes = ("bfloat16", "float16", "float32")
    return [Case("patch_pool B=256 224px P=256 D=1024", "patch_pool", dtypes, run_pool(256, 256, 1024),
                 ("all", "ci")),
            Case("patch_pool B=4 448px P=1024 D=1024", "patch_pool", dtypes, run_pool(4, 1024, 1024)),
            Case("patch_pool B=3 (tail batch) 224px D=1024", "patch_pool", dtypes, run_pool(3, 256, 1024))]


def _contrastive_cases():
    import torch

    from dinotxt_fast.ops.triton import contrastive as C

    def single(b, e):
        def run(dtype):
            img, txt = torch.empty(b, e, dtype=dtype).normal_(), torch.empty(b, e, dtype=dtype).normal_()
            scale = torch.tensor(2.6)
            for normalize in (True,):
                loss, lse_r, lse_c = C.KERNELS["contrastive_forward"](img, txt, scale, normalize)
                C.KERNELS["contrastive_backward"](torch.tensor(1.0), img, txt, scale, lse_r, lse_c, normalize)
        return run

    def partial(m, n, e):
        def run(dtype):
            img, txt = torch.empty(m, e, dtype=dtype).normal_(), torch.empty(n, e, dtype=dtype).normal_()
            scale = torch.tensor(2.6)
            lse_r, lse_c, _ = C.KERNELS["contrastive_partial_forward"](img, txt, scale, True, 0)
            coef = torch.full((m,), 1e-4)
            C.KERNELS["contrastive_partial_backward"](img, txt, scale, lse_r, lse_c, coef, torch.full((n,), 1e-4),
                                                      True, 0)
        return run

    dtypes = ("bfloat16", "float32")
    return [Case("contrastive B=1024 E=2048", "contrastive_loss", dtypes, single(1024, 2048), ("all", "ci")),
            Case("contrastive partial M=1024 N=32768 E=2048", "contrastive_loss", dtypes,
                 partial(1024, 32768, 2048))]


def _dense_cases():
    import torch

    from dinotxt_fast.inference.segmentation import sliding_window_boxes
    from dinotxt_fast.ops.triton import dense as D

    def logits(dtype):
        patches, text = torch.empty(2, 28, 28, 1024, dtype=dtype), torch.empty(150, 1024, dtype=dtype)
        D.patch_text_logits(patches, text)

    def upsample(dtype):
        x = torch.empty(1, 150, 32, 32, dtype=dtype)
        for softmax in (False, True):
            D.upsample_argmax(x, (512, 683), softmax)

    def slide(dtype):
        boxes = sliding_window_boxes(512, 683, 384, 192)
        x = torch.empty(boxes.shape[0], 150, 28, 28, dtype=dtype)
        for softmax in (False, True):
            D.slide_decode(x, boxes, (512, 683), (512, 683), softmax)

    dtypes = ("bfloat16", "float16", "float32")
    return [Case("patch_text_logits B=2 28x28 D=1024 C=150", "dense", dtypes, logits, ("all", "ci")),
            Case("upsample_argmax C=150 32x32 -> 512x683", "dense", dtypes, upsample, ("all", "ci")),
            Case("slide_decode C=150 6 windows 28x28 -> 512x683", "dense", dtypes, slide, ("all", "ci"))]


def all_cases() -> list[Case]:
    return _attention_cases() + _pooling_cases() + _contrastive_cases() + _dense_cases()


def record(cases, dtypes) -> list[Launch]:
    """Every launch the cases make, in order."""
    import torch

    from dinotxt_fast.ops import triton as backend

    modules = [m for name, m in sorted(sys.modules.items())
               if name.startswith(backend.__name__ + ".") and m is not None]
    launches: list[Launch] = []
    with gpu_like_planning():
        for case in cases:
            for dtype in case.dtypes:
                if dtype not in dtypes:
                    continue
                with recording(modules, launches, {"case": case.name, "dtype": dtype}):
                    case.run(getattr(torch, dtype))
    return launches


# ------------------------------------------------------------------------------------------------ expansion
def _chain(kernel):
    """(autotuner or None, [heuristics, outer first], the JIT function) of a kernel object."""
    from triton.runtime.autotuner import Autotuner, Heuristics

    tuner, heuristics = None, []
    while isinstance(kernel, (Autotuner, Heuristics)):
        if isinstance(kernel, Autotuner):
            tuner = kernel
        else:
            heuristics.append(kernel)
        kernel = kernel.fn
    return tuner, heuristics, kernel


def _fixed_flags(kernel, configs, named, kwargs) -> list[bool]:
    """For each kept configuration: is it the one DINOTXT_FAST_AUTOTUNE=0 runs?"""
    try:
        from dinotxt_fast.ops.triton import tuning
    except ImportError:  # code from before the switch existed
        return [False] * len(configs)
    tuner = _chain(kernel)[0]
    if tuner is None:
        return [True] * len(configs)
    with tuning.autotune_disabled():
        chosen = tuner.early_config_prune(tuner.configs, named, **kwargs) if tuner.early_config_prune \
            else tuner.configs[:1]
    return [any(c is f for f in chosen) for c in configs]


@dataclass
class Job:
    """One distinct compilation."""
    module: str
    name: str  # the module attribute launched
    kernel: str  # the launched kernel's name (two launches may run one JIT function: _bwd_kv_kernel, _bwd_q_kernel)
    signature: dict
    constexprs: dict
    attrs: dict  # argument index -> specialisation key ("D": divisible by 16)
    options: dict
    config: str
    dtype: str
    specialisation: str
    fixed: bool
    cases: list = field(default_factory=list)

    def key(self):
        return (self.module, self.kernel, json.dumps(self.signature, sort_keys=True),
                json.dumps(self.constexprs, sort_keys=True, default=str), json.dumps(self.attrs, sort_keys=True),
                json.dumps(self.options, sort_keys=True))


def _config_label(kwargs: dict, options: dict) -> str:
    items = [f"{k}={v}" for k, v in kwargs.items()]
    items.append(f"w{options.get('num_warps', 4)}")
    if "num_stages" in options:
        items.append(f"s{options['num_stages']}")
    return " ".join(items)


def expand(launch: Launch) -> list[Job]:
    """The compilations one launch needs: one per configuration the autotuner keeps for its arguments."""
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.runtime.jit import native_specialize_impl

    tuner, heuristics, jit = _chain(launch.kernel)
    named = dict(zip(jit.arg_names, launch.args))
    kwargs = {k: v for k, v in launch.kwargs.items() if k not in LAUNCH_OPTIONS}
    launch_options = {k: v for k, v in launch.kwargs.items() if k in LAUNCH_OPTIONS and v is not None}
    if tuner is not None:
        configs = list(tuner.configs)
        if tuner.early_config_prune:
            configs = tuner.early_config_prune(configs, named, **kwargs)
        fixed = _fixed_flags(launch.kernel, configs, named, kwargs)
    else:
        configs, fixed = [None], [True]
    jobs = []
    for config, is_fixed in zip(configs, fixed):
        values = {**named, **kwargs}
        options = dict(launch_options)
        tuned = {}
        if config is not None:
            tuned = dict(config.kwargs)
            values.update(tuned)
            options.update({k: getattr(config, k) for k in LAUNCH_OPTIONS if getattr(config, k, None) is not None})
        for heuristic in heuristics:
            for name, rule in heuristic.values.items():
                values[name] = rule(values)
        options.setdefault("num_warps", 4)
        signature, constexprs, attrs = {}, {}, {}
        for index, param in enumerate(jit.params):
            value = values.get(param.name, param.default)
            if param.is_constexpr:
                signature[param.name], constexprs[param.name] = "constexpr", value
                continue
            ty, spec = native_specialize_impl(CUDABackend, value, param.is_const, not param.do_not_specialize,
                                              not param.do_not_specialize_on_alignment)
            signature[param.name] = ty
            if ty == "constexpr":
                constexprs[param.name] = value
            elif isinstance(spec, str) and spec:
                attrs[str(index)] = spec
        shown = {k: v for k, v in constexprs.items() if k not in tuned and k.isupper()}
        jobs.append(Job(launch.module, launch.name, launch.name, signature, constexprs, attrs, options,
                        _config_label(tuned, options), launch.dtype,
                        " ".join(f"{k}={v}" for k, v in shown.items()), is_fixed, [launch.case]))
    return jobs


def plan(launches: list[Launch]) -> list[Job]:
    """The distinct compilations of all launches (a job seen again only gains the case's name)."""
    jobs: dict = {}
    for launch in launches:
        for job in expand(launch):
            seen = jobs.get(job.key())
            if seen is None:
                jobs[job.key()] = job
            else:
                seen.fixed = seen.fixed or job.fixed
                if job.cases[0] not in seen.cases:
                    seen.cases.append(job.cases[0])
    return list(jobs.values())


# ------------------------------------------------------------------------------------------------- compiling
_REGISTERS = re.compile(r"Used (\d+) registers")
_SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def compile_job(job: dict) -> dict:
    """Compile one job (in a worker process) and read back shared memory, registers and spills."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.compiler import ASTSource
    import importlib

    jit = _chain(getattr(importlib.import_module(job["module"]), job["name"]))[2]
    attrs = {(int(i),): CUDABackend.parse_attr(spec) for i, spec in job["attrs"].items()}
    source = ASTSource(fn=jit, signature=job["signature"], constexprs=job["constexprs"], attrs=attrs)
    log = io.StringIO()
    start, cpu_start = time.perf_counter(), _cpu_seconds()
    with contextlib.redirect_stdout(log):  # ptxas -v's report (TRITON_DUMP_PTXAS_LOG=1) is printed
        compiled = triton.compile(source, target=GPUTarget(*TARGET), options=job["options"])
    seconds, cpu = time.perf_counter() - start, _cpu_seconds() - cpu_start
    text = log.getvalue()
    regs, spills = _REGISTERS.search(text), _SPILLS.search(text)
    if regs is None or spills is None:
        raise RuntimeError(f"no ptxas -v report for {job['kernel']}: {text[-500:]!r}")
    stack, stores, loads = map(int, spills.groups())
    return {"shared_bytes": int(compiled.metadata.shared), "registers": int(regs.group(1)), "spill_stores": stores,
            "spill_loads": loads, "stack_bytes": stack, "compile_s": round(seconds, 2), "compile_cpu_s": round(cpu, 2)}


def _cpu_seconds() -> float:
    """CPU seconds of this process and its finished children (ptxas): a compile's cost on a busy machine."""
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _worker(conn):
    while True:
        job = conn.recv()
        if job is None:
            return
        try:
            conn.send(("ok", compile_job(job)))
        except Exception as error:  # noqa: BLE001 - recorded in the table as the job's error
            lines = str(error).strip().splitlines()
            conn.send(("error", f"{type(error).__name__}: {lines[-1][:300] if lines else ''}"))


def run_jobs(jobs: list[Job], workers: int, timeout_s: float, progress=print) -> list[dict]:
    """Compile every job in `workers` processes, each compilation stopped after `timeout_s` (its process replaced)."""
    from multiprocessing.connection import wait

    context = multiprocessing.get_context("fork")
    results: list[Optional[dict]] = [None] * len(jobs)
    pending = list(range(len(jobs)))[::-1]
    busy: dict = {}  # connection -> (process, job index, start)
    idle: list = []

    def spawn():
        parent, child = context.Pipe()
        process = context.Process(target=_worker, args=(child,), daemon=True)
        process.start()
        child.close()
        return parent, process

    procs = [spawn() for _ in range(max(1, min(workers, len(jobs))))]
    idle = list(procs)
    done = 0
    while pending or busy:
        while idle and pending:
            conn, process = idle.pop()
            index = pending.pop()
            conn.send(vars(jobs[index]))
            busy[conn] = (process, index, time.monotonic())
        ready = wait(list(busy), timeout=5)
        now = time.monotonic()
        for conn in ready:
            process, index, start = busy.pop(conn)
            try:
                status, value = conn.recv()
            except EOFError:
                status, value = "error", "the worker process died"
            results[index] = value if status == "ok" else {"error": value, "compile_s": round(now - start, 2)}
            done += 1
            progress(_progress_line(done, len(jobs), jobs[index], results[index]))
            if status == "ok" or process.is_alive():
                idle.append((conn, process))
            else:
                idle.append(spawn())
        for conn, (process, index, start) in list(busy.items()):
            if now - start > timeout_s:
                process.kill()
                process.join()
                busy.pop(conn)
                results[index] = {"error": f"compile stopped after {timeout_s:g} s", "compile_s": round(now - start, 2)}
                done += 1
                progress(_progress_line(done, len(jobs), jobs[index], results[index]))
                idle.append(spawn())
    for conn, process in idle:
        conn.send(None)
        process.join(timeout=10)
    return results


def _progress_line(done, total, job, result) -> str:
    if "error" in result:
        what = f"ERROR {result['error']}"
    else:
        what = (f"smem {result['shared_bytes']:6d} regs {result['registers']:3d} spills "
                f"{result['spill_stores']}/{result['spill_loads']}")
    return (f"[{done}/{total}] {job.kernel} {job.dtype} {job.config} | {what} ({result['compile_s']} s, "
            f"{result.get('compile_cpu_s', '-')} CPU-s)")


# -------------------------------------------------------------------------------------------------- the table
def problems(rows: list[dict]) -> list[str]:
    """What `--check` fails on: shared memory over the limit anywhere, or a spill in a kept bf16/fp16
    configuration that EXCEPTIONS does not justify; a compilation that failed or timed out."""
    found = []
    for row in rows:
        label = f"{row['kernel']} [{row['dtype']}] {row['config']} {row['specialisation']}".strip()
        if "error" in row:
            found.append(f"{label}: {row['error']}")
            continue
        if row["shared_bytes"] > SMEM_LIMIT:
            found.append(f"{label}: {row['shared_bytes']} bytes of shared memory > {SMEM_LIMIT}")
        if row["dtype"] in ("bfloat16", "float16") and (row["spill_stores"] or row["spill_loads"]) and \
                (row["kernel"], row["dtype"]) not in EXCEPTIONS:
            found.append(f"{label}: spills {row['spill_stores']} / {row['spill_loads']} bytes")
    return found


def summary(rows: list[dict]) -> dict:
    """Per kernel and dtype: configurations, the largest registers and shared memory, how many spill."""
    out: dict = {}
    for row in rows:
        entry = out.setdefault(f"{row['kernel']} [{row['dtype']}]", {
            "configurations": 0, "max_registers": 0, "max_shared_bytes": 0, "spilling": 0, "over_shared_limit": 0,
            "errors": 0, "compile_s": 0.0, "compile_cpu_s": 0.0, "fixed_clean": True})
        entry["configurations"] += 1
        entry["compile_s"] = round(entry["compile_s"] + row.get("compile_s", 0.0), 2)
        entry["compile_cpu_s"] = round(entry["compile_cpu_s"] + row.get("compile_cpu_s", 0.0), 2)
        if "error" in row:
            entry["errors"] += 1
            continue
        entry["max_registers"] = max(entry["max_registers"], row["registers"])
        entry["max_shared_bytes"] = max(entry["max_shared_bytes"], row["shared_bytes"])
        spills = bool(row["spill_stores"] or row["spill_loads"])
        entry["spilling"] += spills
        entry["over_shared_limit"] += row["shared_bytes"] > SMEM_LIMIT
        if row["fixed"] and (spills or row["shared_bytes"] > SMEM_LIMIT):
            entry["fixed_clean"] = False
    return out


def _merged(path: Path, new: dict, kernels: set) -> dict:
    """The table at `path` with its rows of `kernels` replaced by `new`'s (the other rows and settings kept)."""
    old = json.loads(path.read_text())
    if old["triton"] != new["triton"]:
        raise SystemExit(f"{path} is a Triton {old['triton']} table, this is Triton {new['triton']}")
    rows = [row for row in old["rows"] if row["kernel"] not in kernels] + new["rows"]
    return {**old, "rows": rows, "summary": summary(rows),
            "compile_cpu_s": round(sum(r.get("compile_cpu_s", 0.0) for r in rows), 1),
            "merged": old.get("merged", []) + [{"kernels": sorted(kernels), "wall_s": new["wall_s"]}]}


def _ptxas_version() -> Optional[str]:
    import subprocess

    from triton.backends.nvidia.compiler import get_ptxas

    try:
        tool = get_ptxas(f"sm_{TARGET[1]}") if get_ptxas.__code__.co_argcount else get_ptxas()
        text = subprocess.run([tool.path, "--version"], capture_output=True, text=True).stdout
        return text.strip().splitlines()[-1]
    except Exception:  # noqa: BLE001 - informational only
        return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--out", help="JSON file to write (default: print the summary only)")
    parser.add_argument("--subset", choices=("all", "ci"), default="all",
                        help="ci: what CI compiles: one shape per code path, every kept bf16 configuration and the "
                             "fixed fp16 ones (fp16 compiles to the same code as bf16 but for the conversions)")
    parser.add_argument("--dtypes", default=None,
                        help="comma-separated dtypes (default: all; ci: bfloat16,float16)")
    parser.add_argument("--kernels", default=None, help="comma-separated kernel names to compile (default: all)")
    parser.add_argument("--cases", default=None,
                        help="comma-separated parts of case names: only the cases that contain one (default: all)")
    parser.add_argument("--fixed-only", action="store_true",
                        help="only the configurations DINOTXT_FAST_AUTOTUNE=0 runs")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="worker processes")
    parser.add_argument("--timeout-s", type=float, default=600.0, help="time limit of one compilation")
    parser.add_argument("--merge-into", default=None, metavar="TABLE",
                        help="replace the rows of the compiled kernels in an existing table (same Triton) with the "
                             "new ones and rewrite it (with --kernels: after a change to those kernels only)")
    parser.add_argument("--list", action="store_true", help="list the compilations and exit")
    parser.add_argument("--check", action="store_true",
                        help="exit 1 on shared memory > 227 KB, or a spill in a kept bf16/fp16 configuration")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("unset TRITON_INTERPRET: the audit compiles the GPU configurations")
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    os.environ["TRITON_ALWAYS_COMPILE"] = "1"
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="triton-codegen-")
    sys.path.insert(0, str(REPO))
    import triton

    dtypes = tuple(args.dtypes.split(",")) if args.dtypes else (
        ("bfloat16", "float16") if args.subset == "ci" else ("bfloat16", "float16", "float32"))
    cases = [c for c in all_cases() if args.subset in c.subsets
             and (not args.cases or any(part in c.name for part in args.cases.split(",")))]
    start = time.perf_counter()
    jobs = plan(record(cases, dtypes))
    if args.kernels:
        wanted = set(args.kernels.split(","))
        unknown = wanted - {j.kernel for j in jobs}
        if unknown:
            parser.error(f"--kernels: no such kernel in the planned cases: {', '.join(sorted(unknown))} (see --list)")
        jobs = [j for j in jobs if j.kernel in wanted]
    if args.fixed_only:
        jobs = [j for j in jobs if j.fixed]
    if args.subset == "ci":
        jobs = [j for j in jobs if j.dtype == "bfloat16" or j.fixed]
    print(f"triton {triton.__version__}: {len(jobs)} compilations ({sum(j.fixed for j in jobs)} fixed) from "
          f"{len(cases)} cases, planned in {time.perf_counter() - start:.1f} s", flush=True)
    if args.list:
        for job in jobs:
            print(f"{job.kernel:24s} {job.dtype:9s} {'fixed ' if job.fixed else '      '}{job.config} | "
                  f"{job.specialisation}")
        return 0
    results = run_jobs(jobs, args.jobs, args.timeout_s, progress=lambda line: print(line, flush=True))
    rows = []
    for job, result in zip(jobs, results):
        rows.append({"kernel": job.kernel, "dtype": job.dtype, "config": job.config, "fixed": job.fixed,
                     "specialisation": job.specialisation, "cases": job.cases, **result})
    wall = time.perf_counter() - start
    record_ = {"triton": triton.__version__, "target": f"{TARGET[0]} sm_{TARGET[1]}", "ptxas": _ptxas_version(),
               "shared_limit_bytes": SMEM_LIMIT, "subset": args.subset, "dtypes": list(dtypes),
               "machine": f"{os.cpu_count()}-core {platform.machine()} CPU, no GPU", "jobs": args.jobs,
               "wall_s": round(wall, 1), "compile_cpu_s": round(sum(r.get("compile_cpu_s", 0.0) for r in rows), 1),
               "cases": [c.name for c in cases],
               "exceptions": {f"{k} [{d}]": why for (k, d), why in EXCEPTIONS.items()},
               "summary": summary(rows), "rows": rows}
    if args.merge_into:
        record_ = _merged(Path(args.merge_into), record_, {job.kernel for job in jobs})
        args.out = args.out or args.merge_into
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(record_, indent=1) + "\n")
        print(f"wrote {args.out}")
    for name, entry in record_["summary"].items():
        print(f"{name:36s} {entry['configurations']:3d} configs, regs <= {entry['max_registers']:3d}, smem <= "
              f"{entry['max_shared_bytes']:6d}, {entry['spilling']} spilling, {entry['over_shared_limit']} over "
              f"227 KB, {entry['errors']} errors, {entry['compile_cpu_s']:.0f} CPU-s")
    print(f"total {wall:.0f} s wall on {os.cpu_count()} cores, {args.jobs} workers; {record_['compile_cpu_s']:.0f} "
          "CPU-s of compiling")
    found = problems(record_["rows"])
    if args.check and found:
        print(f"{len(found)} problem(s):\n  " + "\n  ".join(found), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
