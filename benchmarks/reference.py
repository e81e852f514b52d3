"""The torch backend against naive PyTorch: every op family's "torch" implementation (the default path of every user
until GPU benchmarks pick kernels, and the oracle of the kernels) and dtf.segment, each against the naive PyTorch
expression of the same computation, time and peak memory in one run.

    python -m benchmarks reference --device cpu                  # the whole table, 1 and 2 threads
    python benchmarks/reference.py --device cpu --case upsample  # cases whose name contains "upsample"
    python benchmarks/reference.py --device cpu --threads 1 --reps 5 --list

Every (case, implementation, thread count) runs in a fresh Python subprocess, so that no case's allocations, caches
or allocator state count in another's numbers. In it: the inputs (and the model, for segment) are built, one warm-up
call is made (its output is what the rows' agreement columns compare), then
- peak memory: on a CPU, the peak resident set size of the process during one more call over its resident set size
  just before it (Linux: VmHWM reset to the current RSS through /proc/self/clear_refs, after malloc_trim(0) has
  returned what the warm-up freed; elsewhere ru_maxrss, which cannot be reset). RSS rather than tracemalloc, which
  sees only Python's allocator and none of the tensors' memory; on CUDA, torch.cuda.max_memory_allocated over
  memory_allocated;
- time: the median and 20/80 % quantiles of --reps calls (at least 5), perf_counter (CUDA synchronised).
The thread count is torch.set_num_threads in the subprocess (the issue's numbers are one thread); every row records
it and the load average (os.getloadavg) before and after its subprocess: on a shared machine, compare ratios of one
run, not absolute times across runs. Results go to benchmarks/results/cpu/reference-<machine>-<time>.json on a CPU.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from benchmarks.harness import (  # noqa: E402
    RESULTS_DIR, Benchmark, Run, add_ratios_against, error_text, max_abs_diff, print_row, recording_backends, result)

NAIVE = "naive PyTorch"
OURS = "ours (torch backend)"
MIN_REPS = 5


# ---------------------------------------------------------------------------------------------------- cases
@dataclass(frozen=True)
class Case:
    """One computation: `setup(device)` builds its inputs; `naive(state)` and `ours(state)` compute it (the same
    outputs: a tuple of tensors); `naive_expression` says what the baseline is. Targets: ours at least
    `min_speedup` x naive's speed and at most 1 / `min_memory_ratio` of its peak memory."""
    name: str
    family: str
    setup: Callable
    naive: Callable
    ours: Callable
    naive_expression: str
    min_speedup: float = 1.0
    min_memory_ratio: Optional[float] = 1.0  # None: no memory target (allocations far below RSS's resolution)
    shape: dict = field(default_factory=dict)
    compare: str = "values"  # "labels": (labels, scores) pixel agreement; "values": max relative difference


def _seeded(make):
    def setup(device):
        gen = torch.Generator().manual_seed(0)
        return make(gen, device)
    return setup


def _randn(gen, device, *shape, scale=1.0, grad=False):
    t = (torch.randn(*shape, generator=gen) * scale).to(device)
    return t.requires_grad_(True) if grad else t


# --- dense decoding
ADE = dict(classes=150, image=(512, 683), window=384, stride=192, patch=14)


def _slide_inputs(image, gen, device):
    from dinotxt_fast.inference.segmentation import short_side_size, sliding_window_boxes

    canvas = short_side_size(*image, 512)
    boxes = sliding_window_boxes(*canvas, ADE["window"], ADE["stride"])
    grid = -(-ADE["window"] // ADE["patch"])
    # cosines of random directions, scaled to the spread of real patch-text cosines
    logits = _randn(gen, device, len(boxes), ADE["classes"], grid, grid, scale=0.1)
    return {"logits": logits, "boxes": boxes, "box_list": boxes.tolist(), "canvas": canvas, "image": image}


def _eager_upsample(state, softmax):
    full = F.interpolate(state["logits"], size=state["size"], mode="bilinear", align_corners=False)
    scores, labels = (full.softmax(1) if softmax else full).max(1)
    return labels, scores


def _eager_slide(state):
    from benchmarks.dense import eager_slide

    return eager_slide(state["logits"], state["box_list"], state["canvas"], state["image"], with_scores=True)


def _ours_upsample(state, softmax):
    from dinotxt_fast import ops

    return ops.upsample_argmax(state["logits"], state["size"], softmax=softmax, return_scores=True, backend="torch")


def _ours_slide(state):
    from dinotxt_fast import ops

    return ops.slide_decode(state["logits"], state["boxes"], state["canvas"], state["image"], softmax=True,
                            return_scores=True, backend="torch")


def _patch_text_inputs(gen, device):
    return {"patches": _randn(gen, device, 6, 28, 28, 1024), "text": _randn(gen, device, 150, 1024)}


def _eager_patch_text(state):
    return (torch.einsum("bhwd,cd->bchw", F.normalize(state["patches"], dim=-1), F.normalize(state["text"], dim=-1)),)


def _ours_patch_text(state):
    from dinotxt_fast import ops

    return (ops.patch_text_logits(state["patches"], state["text"], backend="torch"),)


# --- segment
def _segment_inputs(gen, device):
    from benchmarks.infer import TINY_MODEL, SegmentCase, build_model

    model = build_model("dinov2_vitl14_reg4_dinotxt", TINY_MODEL, torch.device(device), torch.float32)
    images = _randn(gen, device, 1, 3, *ADE["image"])
    classes = _randn(gen, device, ADE["classes"], model.config.embed_dim)
    case = SegmentCase("ade20k-like", 1, ADE["image"], ADE["classes"], 512, ADE["window"], ADE["stride"])
    return {"model": model, "images": images, "classes": classes, "case": case}


def _notebook_segment(state):
    from benchmarks.infer import reference_segment

    return reference_segment(state["model"], state["images"], state["classes"], state["case"], return_scores=True)


def _ours_segment(state):
    import dinotxt_fast as dtf

    case = state["case"]
    return dtf.segment(state["model"], state["images"], state["classes"], mode="slide", short_side=case.short_side,
                       window=case.window, stride=case.stride, batch_size=case.batch_size, return_scores=True,
                       backend="torch")


# --- contrastive loss
def _contrastive_inputs(batch, dim):
    def make(gen, device):
        return {"img": _randn(gen, device, batch, dim, grad=True), "txt": _randn(gen, device, batch, dim, grad=True),
                "scale": torch.tensor(2.6592, device=device, requires_grad=True)}
    return make


def _naive_contrastive(state):
    img, txt, scale = state["img"], state["txt"], state["scale"]
    i, t = F.normalize(img, dim=-1), F.normalize(txt, dim=-1)
    logits = scale.exp() * i @ t.T
    target = torch.arange(img.shape[0], device=img.device)
    loss = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
    return (loss.detach(), *torch.autograd.grad(loss, (img, txt, scale)))


def _ours_contrastive(state):
    from dinotxt_fast import ops

    img, txt, scale = state["img"], state["txt"], state["scale"]
    loss = ops.contrastive_loss(img, txt, scale, backend="torch")
    return (loss.detach(), *torch.autograd.grad(loss, (img, txt, scale)))


# --- attention
def _attention_inputs(batch, seq, heads, dim, grad, causal=False, lengths=False):
    def make(gen, device):
        qkv = _randn(gen, device, batch, seq, 3, heads, dim, grad=grad)
        state = {"qkv": qkv, "causal": causal, "lengths": None, "grad": grad,
                 "grad_out": _randn(gen, device, batch, seq, heads, dim) if grad else None}
        if lengths:  # text: keys after each caption's EOT hidden
            state["lengths"] = torch.randint(8, seq + 1, (batch,), generator=gen).to(device)
        return state
    return make


def _explicit_attention(q, k, v, causal, lengths):
    """softmax(q k^T / sqrt(d)) v on [B, N, H, D], the masks as -inf: the naive expression (SDPA's math path)."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    n = s.shape[-1]
    if causal:
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    if lengths is not None:
        hidden = torch.arange(n, device=s.device)[None, :] >= lengths[:, None]
        s = s.masked_fill(hidden[:, None, None, :], float("-inf"))
    return (s.softmax(-1) @ v).transpose(1, 2)


def _attention_call(state, attend):
    q, k, v = state["qkv"].unbind(2)
    if not state["grad"]:
        with torch.no_grad():
            return (attend(q, k, v, state["causal"], state["lengths"]),)
    out = attend(q, k, v, state["causal"], state["lengths"])
    return (out.detach(), torch.autograd.grad(out, state["qkv"], state["grad_out"])[0])


def _naive_attention(state):
    return _attention_call(state, _explicit_attention)


def _ours_attention(state):
    from dinotxt_fast import ops

    return _attention_call(state, lambda q, k, v, causal, lengths: ops.attention(
        q, k, v, causal=causal, lengths=lengths, backend="torch"))


# --- patch pooling
def _pool_inputs(batch, grad, tokens=261, dim=1024, registers=4):
    def make(gen, device):
        return {"tokens": _randn(gen, device, batch, tokens, dim, grad=grad),
                "weight": (1 + _randn(gen, device, dim, scale=0.1)).requires_grad_(grad),
                "bias": _randn(gen, device, dim, scale=0.1, grad=grad),
                "grad_out": _randn(gen, device, batch, 2 * dim) if grad else None, "grad": grad,
                "registers": registers}
    return make


def _pool_call(state, pool):
    leaves = (state["tokens"], state["weight"], state["bias"])
    if not state["grad"]:
        with torch.no_grad():
            return (pool(*leaves),)
    out = pool(*leaves)
    return (out.detach(), *torch.autograd.grad(out, leaves, state["grad_out"]))


def _naive_pool(state):
    from benchmarks.pooling import eager_pool

    return _pool_call(state, lambda tokens, weight, bias: eager_pool(tokens, state["registers"], weight, bias, False))


def _ours_pool(state):
    from dinotxt_fast import ops

    return _pool_call(state, lambda tokens, weight, bias: ops.patch_pool(
        tokens, num_registers=state["registers"], ln_weight=weight, ln_bias=bias, backend="torch"))


def _upsample_case(softmax: bool) -> Case:
    def make(gen, device):
        return {"logits": _randn(gen, device, 1, ADE["classes"], 37, 49, scale=0.1), "size": ADE["image"]}
    what = "softmax=True (its score is the winning probability)" if softmax else "softmax=False (whole mode)"
    return Case(f"upsample_argmax 150x37x49 -> 512x683 {'softmax' if softmax else 'logits'}", "upsample_argmax",
                _seeded(make), lambda s: _eager_upsample(s, softmax), lambda s: _ours_upsample(s, softmax),
                "F.interpolate(bilinear)" + (".softmax(1)" if softmax else "") + ".max(1)", 2.0, 5.0,
                {"logits": [1, 150, 37, 49], "size": [512, 683], "softmax": softmax, "note": what}, "labels")


CASES: tuple[Case, ...] = (
    _upsample_case(True),
    _upsample_case(False),
    Case("slide_decode ADE20K grid 6x150x28x28 -> 512x683", "slide_decode",
         _seeded(lambda gen, device: _slide_inputs((512, 683), gen, device)), _eager_slide, _ours_slide,
         "mmseg slide_inference: per window F.interpolate + softmax(0) summed on a [C, H, W] canvas, / count, "
         "F.interpolate to the image, max(0)", 2.0, 5.0,
         {"windows": 6, "classes": 150, "window_logits": [28, 28], "canvas": [512, 683], "size": [512, 683]},
         "labels"),
    Case("slide_decode ADE20K grid 6x150x28x28 -> 480x640", "slide_decode",
         _seeded(lambda gen, device: _slide_inputs((480, 640), gen, device)), _eager_slide, _ours_slide,
         "mmseg slide_inference (as above) with a real final resize: a 480x640 image on its 512x682 canvas", 1.0,
         1.0, {"windows": 6, "classes": 150, "window_logits": [28, 28], "canvas": [512, 682], "size": [480, 640]},
         "labels"),
    Case("segment slide tiny model 150 classes 512x683", "segment", _seeded(_segment_inputs), _notebook_segment,
         _ours_segment, "the notebook-style protocol (benchmarks/infer.py reference_segment: the same encoder and "
         "cosine logits, then the full-resolution mmseg decode)", 1.5, 3.0,
         {"model": "tiny dinov2_vitl14_reg4_dinotxt (vision_dim 64, depth 2)", "image": [512, 683], "classes": 150,
          "windows": 6}, "labels"),
    Case("patch_text_logits 6x28x28x1024 . 150x1024", "patch_text_logits", _seeded(_patch_text_inputs),
         _eager_patch_text, _ours_patch_text, "einsum('bhwd,cd->bchw', F.normalize(patches), F.normalize(text))",
         shape={"patches": [6, 28, 28, 1024], "text": [150, 1024]}),
    Case("contrastive_loss fwd+bwd B=8192 E=512", "contrastive_loss", _seeded(_contrastive_inputs(8192, 512)),
         _naive_contrastive, _ours_contrastive, "F.normalize, exp(s) * i @ t.T, F.cross_entropy both ways, autograd",
         0.5, 20.0, {"batch": 8192, "dim": 512, "dtype": "float32"}),
    Case("contrastive_loss fwd+bwd B=1024 E=2048", "contrastive_loss", _seeded(_contrastive_inputs(1024, 2048)),
         _naive_contrastive, _ours_contrastive, "as above", 0.5, 1.0, {"batch": 1024, "dim": 2048}),
    Case("attention fwd+bwd ViT-L/14 224px 8x261x16x64", "attention",
         _seeded(_attention_inputs(8, 261, 16, 64, grad=True)), _naive_attention, _ours_attention,
         "softmax(q k^T / sqrt(d)) v with autograd (SDPA's math path)",
         shape={"batch": 8, "tokens": 261, "heads": 16, "head_dim": 64, "grad": True}),
    Case("attention fwd+bwd text causal 32x77x20x64 lengths", "attention",
         _seeded(_attention_inputs(32, 77, 20, 64, grad=True, causal=True, lengths=True)), _naive_attention,
         _ours_attention, "the same with the causal and key-length masks as -inf",
         shape={"batch": 32, "tokens": 77, "heads": 20, "head_dim": 64, "causal": True, "lengths": True}),
    Case("attention fwd segmentation windows 6x789x16x64", "attention",
         _seeded(_attention_inputs(6, 789, 16, 64, grad=False)), _naive_attention, _ours_attention,
         "softmax(q k^T / sqrt(d)) v under no_grad",
         shape={"batch": 6, "tokens": 789, "heads": 16, "head_dim": 64, "grad": False}),
    Case("patch_pool +LN fwd+bwd 32x261x1024", "patch_pool", _seeded(_pool_inputs(32, grad=True)), _naive_pool,
         _ours_pool, "F.layer_norm, cat(x[:, 0], x[:, 5:].mean(1)), autograd", shape={"tokens": [32, 261, 1024]}),
    Case("patch_pool +LN fwd 64x261x1024", "patch_pool", _seeded(_pool_inputs(64, grad=False)), _naive_pool,
         _ours_pool, "the same under no_grad", shape={"tokens": [64, 261, 1024]}),
    # The embedded main job's shapes (`dinotxt-fast train` defaults: the tiny config, batch 64, embed dim 128,
    # vision 64 + 1 tokens of width 64 in 4 heads, text 32 tokens): per-op overhead, not arithmetic, is the cost
    # here, and the torch backend must still not be slower than the naive expression. Their allocations (tens of
    # KiB) are below what RSS resolves, so they carry no memory target.
    Case("contrastive_loss fwd+bwd B=64 E=128 (main job)", "contrastive_loss", _seeded(_contrastive_inputs(64, 128)),
         _naive_contrastive, _ours_contrastive, "as above", 1.0, None, {"batch": 64, "dim": 128}),
    Case("patch_pool +LN fwd+bwd 64x65x64 (main job)", "patch_pool",
         _seeded(_pool_inputs(64, grad=True, tokens=65, dim=64, registers=0)), _naive_pool, _ours_pool,
         "F.layer_norm, cat(x[:, 0], x[:, 1:].mean(1)), autograd", 1.0, None, {"tokens": [64, 65, 64], "registers": 0}),
    Case("attention fwd+bwd vision 64x65x4x16 (main job)", "attention",
         _seeded(_attention_inputs(64, 65, 4, 16, grad=True)), _naive_attention, _ours_attention,
         "softmax(q k^T / sqrt(d)) v with autograd (SDPA's math path)", 1.0, None,
         {"batch": 64, "tokens": 65, "heads": 4, "head_dim": 16, "grad": True}),
    Case("attention fwd+bwd text causal 64x32x4x16 lengths (main job)", "attention",
         _seeded(_attention_inputs(64, 32, 4, 16, grad=True, causal=True, lengths=True)), _naive_attention,
         _ours_attention, "the same with the causal and key-length masks as -inf", 1.0, None,
         {"batch": 64, "tokens": 32, "heads": 4, "head_dim": 16, "causal": True, "lengths": True}),
)
BY_NAME = {case.name: case for case in CASES}


# ------------------------------------------------------------------------------------------- the subprocess
def _status_kib(key: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        return True
    except OSError:
        return False


def _malloc_trim() -> None:
    """Return the memory glibc keeps after frees to the system, so the next call's peak counts from real use."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _sync(device) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def _peak_memory_mib(fn, device) -> tuple[Optional[float], str]:
    """(peak memory of one call of fn over the memory before it, MiB; how it was measured)."""
    gc.collect()
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = fn()
        torch.cuda.synchronize()
        del out
        return (torch.cuda.max_memory_allocated() - base) / 2**20, "torch.cuda.max_memory_allocated"
    _malloc_trim()
    base = _status_kib("VmRSS")
    if base is not None and _reset_peak_rss():
        out = fn()
        peak = _status_kib("VmHWM")
        del out
        return (peak - base) / 1024, "VmHWM over VmRSS (clear_refs reset, after malloc_trim)"
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = fn()
    del out
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024, "ru_maxrss (no reset: a lower bound)"


def worker(case_name: str, impl: str, threads: int, reps: int, device: str, save: str) -> dict:
    """Runs in the subprocess: one implementation of one case; writes its warm-up output to `save`."""
    torch.set_num_threads(threads)
    case = BY_NAME[case_name]
    state = case.setup(device)
    fn = (lambda: case.ours(state)) if impl == OURS else (lambda: case.naive(state))
    load_start = os.getloadavg()
    start = time.perf_counter()
    with recording_backends() as used:
        out = fn()
    _sync(device)
    first_s = time.perf_counter() - start
    torch.save([t.detach().cpu() if isinstance(t, torch.Tensor) else t for t in out], save)
    del out
    peak, method = _peak_memory_mib(fn, device)
    times = []
    for _ in range(max(MIN_REPS, reps)):
        start = time.perf_counter()
        out = fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
        del out
    times.sort()
    return {"median_ms": statistics.median(times), "q20_ms": times[int(0.2 * (len(times) - 1))],
            "q80_ms": times[int(0.8 * (len(times) - 1))], "times_ms": times, "peak_memory_mib": peak,
            "memory_method": method, "first_call_s": first_s, "threads": torch.get_num_threads(),
            "loadavg_start": list(load_start), "loadavg_end": list(os.getloadavg()), "backends_used": used}


def _worker_main(argv) -> int:
    parser = argparse.ArgumentParser(description="one (case, implementation, threads) of benchmarks/reference.py")
    parser.add_argument("--worker", required=True, metavar="CASE")
    parser.add_argument("--impl", choices=(NAIVE, OURS), required=True)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--reps", type=int, required=True)
    parser.add_argument("--device", required=True)
    parser.add_argument("--save", required=True)
    args = parser.parse_args(argv)
    print(json.dumps(worker(args.worker, args.impl, args.threads, args.reps, args.device, args.save)), flush=True)
    return 0


def _run_worker(case: Case, impl: str, threads: int, reps: int, device: str, save: str, timeout_s: float) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", case.name, "--impl", impl, "--threads",
           str(threads), "--reps", str(reps), "--device", device, "--save", save]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, cwd=ROOT, env=env)
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines()
        raise RuntimeError(f"worker exited with {done.returncode}: {lines[-1] if lines else 'no output'}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------- comparing
def _agreement(case: Case, ours: list, naive: list) -> dict:
    if case.compare == "labels":
        return {"pixel_agreement": float((ours[0] == naive[0]).double().mean()),
                "max_abs_diff": max_abs_diff(ours[1], naive[1])}
    rel = [max_abs_diff(a, b) / max(float(b.double().abs().max()), 1e-30) for a, b in zip(ours, naive)]
    return {"max_rel_diff": max(rel)}


# ------------------------------------------------------------------------------------------------------ driver
def add_arguments(parser) -> None:
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts, each a pass of every case "
                        "(default 1,2: the issue's numbers are one thread)")
    parser.add_argument("--reps", type=int, default=7, help=f"timed calls per row (at least {MIN_REPS})")
    parser.add_argument("--case", action="append", default=[], metavar="TEXT",
                        help="only the cases whose name contains TEXT (repeatable)")
    parser.add_argument("--timeout-s", type=float, default=900.0, help="limit of one row's subprocess")


def check_arguments(parser, args) -> None:
    try:
        args.threads = [int(t) for t in args.threads.split(",") if t.strip()]
    except ValueError:
        parser.error(f"--threads must be comma-separated integers, got {args.threads!r}")
    if not args.threads or min(args.threads) < 1:
        parser.error(f"--threads needs thread counts >= 1, got {args.threads}")
    if args.reps < MIN_REPS:
        parser.error(f"--reps must be at least {MIN_REPS} (the median of at least {MIN_REPS} calls), got {args.reps}")
    if args.quick:
        args.threads = args.threads[:1]
        args.reps = MIN_REPS
    if args.device == "cpu" and Path(args.out) == RESULTS_DIR:
        args.out = str(RESULTS_DIR / "cpu")


def select_cases(args) -> list[Case]:
    return [case for case in CASES if not args.case or any(text in case.name for text in args.case)]


def run_case(run: Run, case: Case) -> list[dict]:
    rows = []
    for threads in run.args.threads:
        pass_ = f"{threads} thread{'s' if threads > 1 else ''}"
        outputs = {}
        for impl in (NAIVE, OURS):
            skip = run.budget()
            if skip is not None:
                rows.append(result(case.name, impl, pass_=pass_, shape=case.shape, skipped=skip))
                print_row(rows[-1])
                continue
            load_before = list(os.getloadavg())
            with tempfile.TemporaryDirectory() as tmp:
                save = os.path.join(tmp, "out.pt")
                try:
                    got = _run_worker(case, impl, threads, run.args.reps, str(run.device), save, run.args.timeout_s)
                    outputs[impl] = torch.load(save)
                except Exception as exc:  # noqa: BLE001 - one failing row must not abort the run
                    rows.append(result(case.name, impl, pass_=pass_, shape=case.shape, skipped=error_text(exc),
                                       threads=threads, loadavg_before=load_before))
                    print_row(rows[-1])
                    continue
            timing = (got.pop("median_ms"), got.pop("q20_ms"), got.pop("q80_ms"))
            peak = got.pop("peak_memory_mib")
            extra = {"expression": case.naive_expression} if impl == NAIVE else {}
            if impl == OURS and NAIVE in outputs:
                extra.update(_agreement(case, outputs[OURS], outputs[NAIVE]))
            rows.append(result(case.name, impl, timing, pass_=pass_, shape=case.shape, peak_memory=peak,
                               family=case.family, loadavg_before=load_before, **got, **extra))
            print_row(rows[-1])
    return rows


def add_targets(rows: list[dict]) -> None:
    """target / target_met on our rows: at least the case's speedup and memory ratio against the naive row."""
    for row in rows:
        case = BY_NAME.get(row["case"])
        if case is None or row["impl"] != OURS or "speedup_vs_naive" not in row:
            continue
        row["target"] = {"min_speedup_vs_naive": case.min_speedup, "min_memory_ratio_vs_naive": case.min_memory_ratio}
        memory = row.get("memory_ratio_vs_naive")
        memory_met = case.min_memory_ratio is None or (memory is not None and memory >= case.min_memory_ratio)
        row["target_met"] = bool(row["speedup_vs_naive"] >= case.min_speedup and memory_met)


def settings(run: Run, case_list: list[Case]) -> dict:
    return {"threads": run.args.threads, "reps": run.args.reps, "loadavg_at_start": list(os.getloadavg()),
            "cpu_count": os.cpu_count(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "cases": {case.name: {"family": case.family, "naive": case.naive_expression, **case.shape}
                      for case in case_list}}


NOTES = {
    "targets": "issue #19 (this CPU, ratios of one run): upsample_argmax and slide_decode at the ADE20K shapes >= 2x "
               "faster than naive and <= 1/5 of its peak memory; segment (slide, 150 classes, 512x683, tiny model) "
               ">= 1.5x and <= 1/3; contrastive_loss fwd+bwd B=8192 E=512 fp32 <= 1/20 of the naive memory and "
               "<= 2x its time; the embedded main job's shapes (cases '(main job)'): not slower than naive, no memory target "
               "(their allocations are below RSS's resolution); every other case: not slower and not heavier than "
               "naive (row field target_met)",
    "isolation": "each row is one fresh subprocess: inputs built, one warm-up call (its output is compared), one "
                 "call measured for memory, --reps calls timed",
    "peak_memory_mib": "CPU: peak RSS of the measured call over the RSS before it (VmHWM reset through "
                       "/proc/self/clear_refs after malloc_trim(0), else ru_maxrss); CUDA: max_memory_allocated over "
                       "memory_allocated. The inputs (and segment's model) are in the baseline, the outputs are not",
    "threads": "torch.set_num_threads (and OMP/MKL_NUM_THREADS) in the subprocess; each thread count is a pass. "
               "The primary measurement is 1 thread (the issue's). With more threads than idle cores (a load "
               "average above cpu_count), OpenMP's default spin-waiting at the end of every parallel op costs a "
               "scheduler slice whenever a partner thread is descheduled, which penalises the banded ops (many "
               "cache-sized ops) far more than the naive ones (few huge ops); settings.omp_wait_policy records "
               "OMP_WAIT_POLICY (PASSIVE removes the effect)",
    "loadavg": "os.getloadavg() before each row's subprocess (loadavg_before) and at the start and end of its "
               "measurement (loadavg_start / loadavg_end): a shared machine slows both rows of a pair alike, so "
               "ratios are the result, absolute times are not",
    "agreement": "ours against the naive row's warm-up output: pixel_agreement of labels and max_abs_diff of the "
                 "winning score (dense cases, segment), else max_rel_diff over every output (loss, gradients)",
}

BENCHMARK = Benchmark("reference", __doc__, select_cases, run_case, describe=lambda case: case.name,
                      arguments=add_arguments, check=check_arguments,
                      ratios=(lambda rows: add_ratios_against(rows, NAIVE, "naive"), add_targets),
                      settings=settings, notes=NOTES, quick_help="the first --threads count only and 5 repetitions")


main = BENCHMARK.main

if __name__ == "__main__":  # the driver, or one row's subprocess (run_case starts this file with --worker)
    sys.exit(_worker_main(sys.argv[1:]) if "--worker" in sys.argv[1:] else main())
