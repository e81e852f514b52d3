"""Dense hot paths: patch pooling and open-vocabulary decoding, our kernels against eager PyTorch (and torch.compile).

    python benchmarks/dense.py                        # CUDA, every case
    python benchmarks/dense.py --quick                # CUDA, the target shapes only (pooling B=1024, ADE20K)
    python benchmarks/dense.py --device cpu --quick   # smoke run: tiny fp32 shapes, torch + the Triton interpreter
    python benchmarks/dense.py --list                 # print the cases and exit

Parts (--parts, comma-separated):
  pool     patch_pool forward and backward: ours (Triton, CUDA) against eager PyTorch, torch.compile of the same
           function and the package's torch backend, as GB/s over the bytes that must move, so every row also shows
           its fraction of the copy bandwidth measured first (target: >= 85 %, forward and backward).
  decode   upsample_argmax ("whole" pass) and slide_decode (the official sliding protocol, "slide" pass): time, peak
           memory and pixel agreement against the eager interpolate + softmax + argmax path that materialises the
           full-resolution [C, H, W] map, for ADE20K-like (150 classes, 512x683), Cityscapes-like (19 classes,
           1024x2048 from a 512x1024 canvas) and 1000 classes (target: >= 5x faster, >= 20x less memory, >= 99.99 %
           pixel agreement).
End-to-end segmentation (dtf.segment on the official model) is benchmarks/infer.py. Timing, ceilings, rotation of
inputs bigger than L2 and the JSON record come from benchmarks/harness.py; results go to
benchmarks/results/dense-<machine>-<time>.json.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from benchmarks.harness import (  # noqa: E402
    RESULTS_DIR, add_budget_argument, add_ratios, budget_check, environment, error_text, first_call, free_cache,
    is_ours, measure_ceilings, peak_memory_mib, print_row, result, Rotation, time_ms, write_results)

EPS = 1e-5
PARTS = ("pool", "decode")
EAGER_POOL = "eager"
EAGER_DECODE = "eager interpolate+softmax+argmax"
KERNEL_BACKENDS = ("triton", "cuda")
TARGETS = {
    "pool": "ours >= 85 % of the measured copy bandwidth (fraction_of_copy_bandwidth), forward and backward, "
            "at B=1024, N=261, D=1024 (H100, bf16)",
    "decode": "ours >= 5x faster (speedup_vs_eager) and >= 20x less peak memory (memory_ratio_vs_eager) than the "
              "eager interpolate+softmax+argmax path, with >= 99.99 % pixel agreement, ADE20K-like C=150, 512x683 "
              "(H100)",
}


# ---------------------------------------------------------------------------------------------------- cases
@dataclass(frozen=True)
class PoolCase:
    name: str
    batch: int
    registers: int
    patches: int
    dim: int
    ln: bool  # fused LayerNorm and L2 normalisation (the trainer path) or the plain [cls ; mean] pool

    @property
    def tokens(self) -> int:
        return 1 + self.registers + self.patches


@dataclass(frozen=True)
class DecodeCase:
    name: str
    classes: int
    image: tuple[int, int]
    short_side: Optional[int]
    window: int
    stride: int
    patch: int


def pool_cases(device: str, quick: bool) -> list[PoolCase]:
    if device == "cpu":
        return [PoolCase(f"tiny pool{' +LN+L2' if ln else ''}", 2, 4, 20, 32, ln) for ln in (False, True)]
    batches = (1024,) if quick else (1024, 16)
    return [PoolCase(f"official B={b} N=261 D=1024{' +LN+L2' if ln else ''}", b, 4, 256, 1024, ln)
            for b in batches for ln in (False, True)]


def decode_cases(device: str, quick: bool) -> list[DecodeCase]:
    if device == "cpu":
        return [DecodeCase("tiny C=5 40x55", 5, (40, 55), None, 28, 14, 14)]
    cases = [DecodeCase("ade20k C=150 512x683", 150, (512, 683), 512, 384, 192, 14),
             DecodeCase("cityscapes C=19 1024x2048", 19, (1024, 2048), 512, 384, 192, 14),
             DecodeCase("1000-class 512x683", 1000, (512, 683), 512, 384, 192, 14)]
    return cases[:1] if quick else cases


# ------------------------------------------------------------------------------------------------ helpers
def backend_problem(name: str, family: str, device: torch.device) -> Optional[str]:
    """Why backend `name` cannot run `family` on `device` here, or None when it can."""
    from dinotxt_fast import ops

    report = ops.backends().get(name)
    if report is None or not report["available"]:
        return f"backend {name!r} unavailable: {report['reason'] if report else 'not registered'}"
    if family not in report["ops"]:
        return f"backend {name!r} has no {family} kernel"
    if name == "cuda" and device.type != "cuda":
        return "the CUDA backend needs a CUDA device"
    return None


def compile_problem(case: PoolCase, device: torch.device, quick: bool, no_compile: bool) -> Optional[str]:
    """Why the torch.compile pooling baseline does not run on `case`, or None."""
    if device.type != "cuda":
        return "not run: a CPU smoke run"
    if no_compile:
        return "not run: --no-compile"
    if quick and not case.ln:  # two compiles (forward, forward+backward graph) of tens of seconds each per case
        return "not run with --quick (compile time): the +LN+L2 case of the same shape has it"
    return None


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0


def add_ratio_vs(rows: list[dict], baseline: str) -> None:
    """speedup_vs_eager / memory_ratio_vs_eager on our rows: the targets are stated against the eager path, which
    need not be the fastest baseline that add_ratios picks."""
    timed = {(r["case"], r["pass"]): r for r in rows if r["impl"] == baseline and "median_ms" in r}
    for r in rows:
        base = timed.get((r["case"], r["pass"]))
        if not is_ours(r) or "median_ms" not in r or base is None:
            continue
        r["speedup_vs_eager"] = base["median_ms"] / r["median_ms"]
        if base.get("peak_memory_mib") and r.get("peak_memory_mib"):
            r["memory_ratio_vs_eager"] = base["peak_memory_mib"] / r["peak_memory_mib"]


# ---------------------------------------------------------------------------------------------------- pooling
def eager_pool(tokens, registers: int, weight, bias, normalize: bool):
    x = F.layer_norm(tokens, tokens.shape[-1:], weight, bias, EPS) if weight is not None else tokens
    pooled = torch.cat([x[:, 0], x[:, 1 + registers:].mean(1)], dim=-1)
    return F.normalize(pooled, dim=-1) if normalize else pooled


def pool_implementations(device: torch.device, compile_skip: Optional[str]) -> list[tuple[str, Optional[str], object]]:
    """(impl name, backend or None, eager function or a skip reason) in order; the first is the reference.
    `compile_skip`: why the torch.compile baseline does not run, None when it does."""
    impls: list[tuple[str, Optional[str], object]] = [(EAGER_POOL, None, eager_pool)]
    impls.append(("torch.compile", None, compile_skip or torch.compile(eager_pool)))
    impls.append(("torch backend (reference op)", "torch", None))
    for name in KERNEL_BACKENDS:
        impls.append((f"ours ({name})", name, backend_problem(name, "patch_pool", device)))
    return impls


def run_pool(case: PoolCase, device: torch.device, dtype: torch.dtype, quick: bool, compile_skip: Optional[str],
             ceilings: dict, rows: list[dict], budget: Callable[[], Optional[str]] = lambda: None) -> None:
    """Every pooling implementation's fwd and bwd rows; `budget()` returns a reason once the time budget is used up."""
    b, r, n, d, ln = case.batch, case.registers, case.tokens, case.dim, case.ln
    size = torch.empty((), dtype=dtype).element_size()
    # Forward: tokens read once, [B, 2D] written. Backward: [B, 2D] read, d_tokens written, and with the LayerNorm
    # the tokens read again (its gradient needs them).
    work = {"fwd": (b * n * d + b * 2 * d) * size, "bwd": (b * n * d * (2 if ln else 1) + b * 2 * d) * size}
    shape = {"batch": b, "tokens": n, "registers": r, "dim": d, "layernorm": ln, "normalize": ln,
             "dtype": str(dtype).replace("torch.", "")}

    def make(requires_grad: bool = False):
        tokens = torch.randn(b, n, d, device=device, dtype=dtype, requires_grad=requires_grad)
        weight = torch.randn(d, device=device, dtype=dtype, requires_grad=requires_grad) if ln else None
        bias = torch.randn(d, device=device, dtype=dtype, requires_grad=requires_grad) if ln else None
        return tokens, weight, bias, torch.randn(b, 2 * d, device=device, dtype=dtype)

    check = make(requires_grad=True)  # one fixed input set every implementation is checked on
    rot = Rotation(make, device)
    reference: dict[str, torch.Tensor] = {}
    for impl, backend, fn in pool_implementations(device, compile_skip):
        skip = fn if isinstance(fn, str) else budget()
        if skip is not None:
            for pass_ in ("fwd", "bwd"):
                rows.append(result(case.name, impl, pass_=pass_, shape=shape, skipped=skip))
                print_row(rows[-1])
            continue
        for pass_, (call, inputs) in pool_calls(backend, fn, case, make, check, rot, device).items():
            try:
                with torch.no_grad():  # autograd.grad still differentiates the graphs recorded by with_graph
                    checked, rotation = inputs()
                    out, first_s = first_call(lambda: call(*checked), device)
                    timing = time_ms(lambda: call(*rotation.next()), device, quick)
                    peak = peak_memory_mib(lambda: call(*checked), device)
                reference.setdefault(pass_, out)
                rows.append(result(case.name, impl, timing, pass_=pass_, shape=shape, bytes_moved=work[pass_],
                                   items=b, item_name="images", peak_memory=peak, ceilings=ceilings,
                                   max_abs_diff=max_abs_diff(out, reference[pass_]), backend=backend,
                                   first_call_s=first_s))
            except Exception as exc:  # noqa: BLE001 - one failing implementation must not abort the run
                rows.append(result(case.name, impl, pass_=pass_, shape=shape, skipped=error_text(exc)))
            print_row(rows[-1])
            checked = rotation = out = None  # free the recorded graphs before the next implementation
            free_cache(device)


def pool_calls(backend: Optional[str], fn, case: PoolCase, make, check, rot: Rotation, device: torch.device):
    """{pass: (call(tokens, weight, bias, grad[, graph]) -> output or d_tokens, () -> (checked inputs, Rotation))}.

    Ours and the torch backend: ops.patch_pool forward, the registered patch_pool_bwd op alone backward, both on the
    shared rotation. Autograd baselines: backward replays one graph recorded per rotated input set (retain_graph),
    built only when that pass runs."""
    from dinotxt_fast import ops

    r, ln = case.registers, case.ln
    if backend is not None:
        def forward(tokens, weight, bias, grad):
            return ops.patch_pool(tokens, num_registers=r, ln_weight=weight, ln_bias=bias, eps=EPS, normalize=ln,
                                  backend=backend)

        def backward(tokens, weight, bias, grad):
            return torch.ops.dinotxt_fast.patch_pool_bwd(grad, tokens, r, weight, bias, EPS, ln, backend)[0]

        return {"fwd": (forward, lambda: (check, rot)), "bwd": (backward, lambda: (check, rot))}

    def forward(tokens, weight, bias, grad):
        return fn(tokens, r, weight, bias, ln)

    def with_graph(inputs):
        tokens, weight, bias, grad = inputs
        with torch.enable_grad():
            return tokens, weight, bias, grad, fn(tokens, r, weight, bias, ln)

    def backward(tokens, weight, bias, grad, graph):  # every input's gradient, as the op computes them
        leaves = [t for t in (tokens, weight, bias) if t is not None]
        return torch.autograd.grad(graph, leaves, grad, retain_graph=True)[0]

    def graphs():
        return with_graph(check), Rotation(lambda: with_graph(make(requires_grad=True)), device)

    return {"fwd": (forward, lambda: (check, rot)), "bwd": (backward, graphs)}


# ----------------------------------------------------------------------------------------------------- decode
def eager_upsample(logits, size, with_scores: bool = False):
    """What public codebases do: the full-resolution map, softmax, argmax."""
    full = F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=False).softmax(1)
    if with_scores:
        scores, labels = full.max(1)
        return labels, scores
    return full.argmax(1)


def eager_slide(window_logits, boxes: list, canvas, size, with_scores: bool = False):
    """mmseg's slide_inference: a [C, H', W'] canvas of summed window softmaxes, divided by the window count,
    resized to the image, argmax."""
    c = window_logits.shape[1]
    acc = torch.zeros(c, *canvas, device=window_logits.device)
    count = torch.zeros(canvas, device=window_logits.device)
    for logits, (y0, x0, y1, x1) in zip(window_logits, boxes):
        up = F.interpolate(logits[None].float(), size=(y1 - y0, x1 - x0), mode="bilinear", align_corners=False)[0]
        acc[:, y0:y1, x0:x1] += up.softmax(0)
        count[y0:y1, x0:x1] += 1
    full = F.interpolate((acc / count)[None], size=size, mode="bilinear", align_corners=False)[0]
    if with_scores:
        scores, labels = full.max(0)
        return labels, scores
    return full.argmax(0)


def decode_inputs(case: DecodeCase, device: torch.device):
    from dinotxt_fast.inference.segmentation import short_side_size, sliding_window_boxes

    canvas = short_side_size(*case.image, case.short_side)
    boxes = sliding_window_boxes(*canvas, case.window, case.stride)
    grid = (-(-min(case.window, canvas[0]) // case.patch), -(-min(case.window, canvas[1]) // case.patch))
    whole_grid = (-(-canvas[0] // case.patch), -(-canvas[1] // case.patch))

    def make_windows():  # cosines of random directions, scaled to the spread of real patch-text cosines
        return (torch.randn(len(boxes), case.classes, *grid, device=device) * 0.1,)

    def make_whole():
        return (torch.randn(1, case.classes, *whole_grid, device=device) * 0.1,)

    return canvas, boxes, grid, whole_grid, make_windows, make_whole


def run_decode(case: DecodeCase, device: torch.device, quick: bool, ceilings: dict, rows: list[dict],
               budget: Callable[[], Optional[str]] = lambda: None) -> None:
    """Every decode implementation's whole and slide rows; `budget()` returns a reason once the budget is used up."""
    from dinotxt_fast import ops

    canvas, boxes, grid, whole_grid, make_windows, make_whole = decode_inputs(case, device)
    box_list = boxes.tolist()
    label_bytes = case.image[0] * case.image[1] * 8  # int64 labels written
    for pass_, op, make, low_res in (("whole", "upsample_argmax", make_whole, whole_grid),
                                     ("slide", "slide_decode", make_windows, grid)):
        windows = len(box_list) if pass_ == "slide" else 1
        shape = {"classes": case.classes, "image": list(case.image), "canvas": list(canvas), "windows": windows,
                 "window_grid": list(low_res), "full_map_mib": case.classes * case.image[0] * case.image[1] * 4 / 2**20}
        if pass_ == "whole":
            def eager(logits, with_scores=False):
                return eager_upsample(logits, case.image, with_scores)

            def ours(name):
                return lambda logits, with_scores=False: ops.upsample_argmax(
                    logits, case.image, softmax=True, return_scores=with_scores, backend=name)
        else:
            def eager(logits, with_scores=False):
                return eager_slide(logits, box_list, canvas, case.image, with_scores)

            def ours(name):
                return lambda logits, with_scores=False: ops.slide_decode(
                    logits, boxes, canvas, case.image, softmax=True, return_scores=with_scores, backend=name)

        check = make()
        rot = Rotation(make, device)
        bytes_moved = check[0].numel() * check[0].element_size() + label_bytes
        impls: list[tuple[str, object]] = [(EAGER_DECODE, eager), ("torch backend (chunked reference)", ours("torch"))]
        for name in KERNEL_BACKENDS:
            impls.append((f"ours ({name})", backend_problem(name, op, device) or ours(name)))
        ref_labels = ref_scores = None
        for impl, fn in impls:
            skip = fn if isinstance(fn, str) else budget()
            if skip is not None:
                rows.append(result(case.name, impl, pass_=pass_, shape=shape, skipped=skip))
                print_row(rows[-1])
                continue
            try:
                (labels, scores), first_s = first_call(lambda: fn(*check, with_scores=True), device)
                if ref_labels is None:
                    ref_labels, ref_scores = labels, scores
                timing = time_ms(lambda: fn(*rot.next()), device, quick)
                peak = peak_memory_mib(lambda: fn(*check), device)
                rows.append(result(case.name, impl, timing, pass_=pass_, shape=shape, bytes_moved=bytes_moved,
                                   items=1, item_name="images", peak_memory=peak, ceilings=ceilings,
                                   pixel_agreement=float((labels == ref_labels).double().mean()),
                                   max_abs_diff=max_abs_diff(scores, ref_scores), first_call_s=first_s))
            except Exception as exc:  # noqa: BLE001 - one failing implementation must not abort the run
                rows.append(result(case.name, impl, pass_=pass_, shape=shape, skipped=error_text(exc)))
            print_row(rows[-1])


# ------------------------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cuda", "cpu"))
    parser.add_argument("--quick", action="store_true", help="the target shapes only and fewer repetitions")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {PARTS}")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile pooling baseline "
                        "(always skipped on CPU)")
    parser.add_argument("--list", action="store_true", help="print the cases and exit")
    parser.add_argument("--out", default=str(RESULTS_DIR), help="results directory")
    add_budget_argument(parser)
    args = parser.parse_args(argv)
    args.parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(args.parts) - set(PARTS))
    if unknown:
        parser.error(f"unknown parts {unknown}; choose from {PARTS}")
    return parser, args


def main(argv=None) -> int:
    parser, args = parse_args(argv)
    # From the start: the suite's hard limit counts the setup (environment, ceilings) too.
    budget = budget_check(args.budget_s)
    cases: dict[str, list] = {"pool": pool_cases(args.device, args.quick) if "pool" in args.parts else [],
                              "decode": decode_cases(args.device, args.quick) if "decode" in args.parts else []}
    if args.list:
        for part, part_cases in cases.items():
            for case in part_cases:
                print(part, asdict(case))
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but no CUDA device is available (use --device cpu --quick for a smoke run)")
    if args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the Triton kernels are imported

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # the interpreter cannot do bf16 dots
    env = environment(device)
    ceilings = measure_ceilings(device, args.quick)
    use_compile = device.type == "cuda" and not args.no_compile
    torch.manual_seed(0)
    rows: list[dict] = []

    run: list[tuple[str, Callable[[], None]]] = []
    for case in cases["pool"]:
        compile_skip = compile_problem(case, device, args.quick, args.no_compile)
        run.append((case.name, lambda case=case, skip=compile_skip: run_pool(case, device, dtype, args.quick, skip,
                                                                             ceilings, rows, budget)))
    for case in cases["decode"]:
        run.append((case.name, lambda case=case: run_decode(case, device, args.quick, ceilings, rows, budget)))
    for name, fn in run:
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - e.g. its inputs do not fit: the other cases still run
            rows.append(result(name, "(case setup)", skipped=error_text(exc)))
            print_row(rows[-1])
        free_cache(device)
    add_ratios(rows)
    add_ratio_vs(rows, EAGER_DECODE)
    write_results("dense", rows, env, ceilings, args.out,
                  settings={"device": args.device, "quick": args.quick, "parts": args.parts,
                            "pool_dtype": str(dtype).replace("torch.", ""), "decode_logits_dtype": "float32",
                            "torch_compile": use_compile, "budget_s": args.budget_s,
                            "cases": {part: [asdict(c) for c in part_cases] for part, part_cases in cases.items()}},
                  notes={
                      "targets": TARGETS,
                      "pool bytes_moved": "fwd: tokens [B, N, D] read once + [B, 2D] written; bwd: [B, 2D] read + "
                                          "d_tokens [B, N, D] written, + tokens read again with the LayerNorm. "
                                          "items = images pooled per call",
                      "pool baselines": "eager: F.layer_norm + cat(cls, mean) + F.normalize in the input dtype, "
                                        "backward by autograd on a recorded graph (retain_graph); torch.compile: "
                                        "the same function compiled; torch backend: the package's fp32 reference "
                                        "op. Ours fwd is ops.patch_pool, bwd the registered patch_pool_bwd op. "
                                        "With --quick on CUDA torch.compile runs on the +LN+L2 case only (each "
                                        "case costs two compiles)",
                      "decode bytes_moved": "the low-resolution logits read + int64 labels written (a floor: the "
                                            "kernels also gather overlapping taps)",
                      "decode baselines": "eager: F.interpolate to full resolution + softmax + argmax (per window "
                                          "then averaged on the canvas for slide, as mmseg slide_inference); torch "
                                          "backend: the package's banded reference (no [C, H, W] map)",
                      "pixel_agreement / max_abs_diff": "labels equal to the first (eager) row's, and the largest "
                                                        "difference of the winning softmax probability",
                      "ratios": "speedup_vs_best_baseline / memory_ratio_vs_best_baseline (add_ratios) and "
                                "speedup_vs_eager / memory_ratio_vs_eager (the decode targets' baseline)",
                      "segment": "end-to-end dtf.segment images/s is benchmarks/infer.py",
                      "first_call_s": "wall time of each row's first call, synchronised: mostly JIT compilation "
                                      "(torch.compile, Triton) and autotuning; never part of a timing",
                      "budget": "with --budget-s (the GPU suite's time limit), implementations not started in time "
                                "give skipped rows saying so",
                  })
    return 0


if __name__ == "__main__":
    sys.exit(main())
