"""Open-vocabulary decoding: our fused kernels against the eager interpolate + softmax + argmax path.

    python benchmarks/dense.py                        # CUDA, every case
    python benchmarks/dense.py --quick                # CUDA, the target case only (ADE20K-like)
    python benchmarks/dense.py --device cpu --quick   # smoke run: tiny fp32 shapes, torch + the Triton interpreter
    python benchmarks/dense.py --list                 # print the cases and exit

upsample_argmax ("whole" pass) and slide_decode (the official sliding protocol, "slide" pass): time, peak memory and
pixel agreement against the eager interpolate + softmax + argmax path that materialises the full-resolution
[C, H, W] map, for ADE20K-like (150 classes, 512x683), Cityscapes-like (19 classes, 1024x2048 from a 512x1024 canvas)
and 1000 classes (target: >= 5x faster, >= 20x less memory, >= 99.99 % pixel agreement). The patch pooling benchmark
is benchmarks/pooling.py, end-to-end segmentation (dtf.segment on the official model) benchmarks/infer.py. Timing,
ceilings, rotation of inputs bigger than L2 and the JSON record come from benchmarks/harness.py; results go to
benchmarks/results/dense-<machine>-<time>.json.
"""
from __future__ import annotations

import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from benchmarks.harness import (  # noqa: E402
    Benchmark, Rotation, Run, add_ratios_against, backend_problem, error_text, first_call, max_abs_diff,
    peak_memory_mib, print_row, result, time_ms)

EAGER = "eager interpolate+softmax+argmax"
KERNEL_BACKENDS = ("triton", "cuda")
TARGET = ("ours >= 5x faster (speedup_vs_eager) and >= 20x less peak memory (memory_ratio_vs_eager) than the eager "
          "interpolate+softmax+argmax path, with >= 99.99 % pixel agreement, ADE20K-like C=150, 512x683 (H100)")


# ---------------------------------------------------------------------------------------------------- cases
@dataclass(frozen=True)
class Case:
    name: str
    classes: int
    image: tuple[int, int]
    short_side: Optional[int]
    window: int
    stride: int
    patch: int


def cases(args) -> list[Case]:
    if args.device == "cpu":
        return [Case("tiny C=5 40x55", 5, (40, 55), None, 28, 14, 14)]
    every = [Case("ade20k C=150 512x683", 150, (512, 683), 512, 384, 192, 14),
             Case("cityscapes C=19 1024x2048", 19, (1024, 2048), 512, 384, 192, 14),
             Case("1000-class 512x683", 1000, (512, 683), 512, 384, 192, 14)]
    return every[:1] if args.quick else every


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


def decode_inputs(case: Case, device: torch.device):
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


def run_case(run: Run, case: Case) -> list[dict]:
    """Every implementation's whole and slide rows; `run.budget()` gives a reason once the budget is used up."""
    from dinotxt_fast import ops

    device, rows = run.device, []
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
        impls: list[tuple[str, object]] = [(EAGER, eager), ("torch backend (chunked reference)", ours("torch"))]
        for name in KERNEL_BACKENDS:
            impls.append((f"ours ({name})", backend_problem(name, (op,), device) or ours(name)))
        ref_labels = ref_scores = None
        for impl, fn in impls:
            skip = fn if isinstance(fn, str) else run.budget()
            if skip is not None:
                rows.append(result(case.name, impl, pass_=pass_, shape=shape, skipped=skip))
                print_row(rows[-1])
                continue
            try:
                (labels, scores), first_s = first_call(lambda: fn(*check, with_scores=True), device)
                if ref_labels is None:
                    ref_labels, ref_scores = labels, scores
                timing = time_ms(lambda: fn(*rot.next()), device, run.quick)
                peak = peak_memory_mib(lambda: fn(*check), device)
                rows.append(result(case.name, impl, timing, pass_=pass_, shape=shape, bytes_moved=bytes_moved,
                                   items=1, item_name="images", peak_memory=peak, ceilings=run.ceilings,
                                   pixel_agreement=float((labels == ref_labels).double().mean()),
                                   max_abs_diff=max_abs_diff(scores, ref_scores), first_call_s=first_s))
            except Exception as exc:  # noqa: BLE001 - one failing implementation must not abort the run
                rows.append(result(case.name, impl, pass_=pass_, shape=shape, skipped=error_text(exc)))
            print_row(rows[-1])
    return rows


def settings(run: Run, case_list: list[Case]) -> dict:
    return {"logits_dtype": "float32", "cases": [asdict(c) for c in case_list]}


NOTES = {
    "targets": TARGET,
    "bytes_moved": "the low-resolution logits read + int64 labels written (a floor: the kernels also gather "
                   "overlapping taps)",
    "baselines": "eager: F.interpolate to full resolution + softmax + argmax (per window then averaged on the canvas "
                 "for slide, as mmseg slide_inference); torch backend: the package's banded reference (no [C, H, W] "
                 "map)",
    "pixel_agreement / max_abs_diff": "labels equal to the first (eager) row's, and the largest difference of the "
                                      "winning softmax probability",
    "ratios": "speedup_vs_best_baseline / memory_ratio_vs_best_baseline (add_ratios) and speedup_vs_eager / "
              "memory_ratio_vs_eager (the targets' baseline)",
    "pooling": "patch pooling is benchmarks/pooling.py",
    "segment": "end-to-end dtf.segment images/s is benchmarks/infer.py",
    "first_call_s": "wall time of each row's first call, synchronised: mostly JIT compilation (Triton) and "
                    "autotuning; never part of a timing",
    "budget": "with --budget-s (the GPU suite's time limit), implementations not started in time give skipped rows "
              "saying so",
}

BENCHMARK = Benchmark("dense", __doc__, cases, run_case, describe=lambda case: str(asdict(case)),
                      ratios=(lambda rows: add_ratios_against(rows, EAGER, "eager"),), settings=settings, notes=NOTES,
                      quick_help="the target case only and fewer repetitions")
main = BENCHMARK.main

if __name__ == "__main__":
    sys.exit(main())
