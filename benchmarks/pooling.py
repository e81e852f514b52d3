"""Patch pooling, forward and backward: dinotxt-fast's kernels against eager PyTorch and torch.compile.

    python benchmarks/pooling.py                        # CUDA, bf16: B = 1024 and 16, N = 261, D = 1024
    python benchmarks/pooling.py --quick                # CUDA, the target shape only (B = 1024)
    python benchmarks/pooling.py --device cpu --quick   # smoke run: tiny fp32 shapes, torch + the Triton interpreter
    python benchmarks/pooling.py --list                 # print the cases and exit

The vision head's pooling, [cls ; mean(patches)] over the tokens after the registers, plain or with the fused
LayerNorm and L2 normalisation of the trainer path ("+LN+L2" cases). Ours (Triton, CUDA) against eager PyTorch,
torch.compile of the same function and the package's torch backend, as GB/s over the bytes that must move, so every
row also shows its fraction of the copy bandwidth measured first (target: >= 85 %, forward and backward). Forward is
ops.patch_pool; backward is the registered patch_pool_bwd op alone for ours and the torch backend, autograd through
a recorded graph for the eager baselines. Timing, ceilings, rotation of inputs bigger than L2 and the JSON record
come from benchmarks/harness.py; results go to benchmarks/results/pooling-<machine>-<time>.json.
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
    Benchmark, Rotation, Run, backend_problem, error_text, first_call, free_cache, max_abs_diff, peak_memory_mib,
    print_row, result, time_ms)

EPS = 1e-5
EAGER = "eager"
KERNEL_BACKENDS = ("triton", "cuda")
TARGET = ("ours >= 85 % of the measured copy bandwidth (fraction_of_copy_bandwidth), forward and backward, at B=1024, "
          "N=261, D=1024 (H100, bf16)")


@dataclass(frozen=True)
class Case:
    name: str
    batch: int
    registers: int
    patches: int
    dim: int
    ln: bool  # fused LayerNorm and L2 normalisation (the trainer path) or the plain [cls ; mean] pool

    @property
    def tokens(self) -> int:
        return 1 + self.registers + self.patches


def cases(args) -> list[Case]:
    if args.device == "cpu":
        return [Case(f"tiny pool{' +LN+L2' if ln else ''}", 2, 4, 20, 32, ln) for ln in (False, True)]
    batches = (1024,) if args.quick else (1024, 16)
    return [Case(f"official B={b} N=261 D=1024{' +LN+L2' if ln else ''}", b, 4, 256, 1024, ln)
            for b in batches for ln in (False, True)]


def add_arguments(parser) -> None:
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline (always skipped "
                        "on CPU)")


def compile_problem(case: Case, device: torch.device, quick: bool, no_compile: bool) -> Optional[str]:
    """Why the torch.compile baseline does not run on `case`, or None."""
    if device.type != "cuda":
        return "not run: a CPU smoke run"
    if no_compile:
        return "not run: --no-compile"
    if quick and not case.ln:  # two compiles (forward, forward+backward graph) of tens of seconds each per case
        return "not run with --quick (compile time): the +LN+L2 case of the same shape has it"
    return None


def eager_pool(tokens, registers: int, weight, bias, normalize: bool):
    x = F.layer_norm(tokens, tokens.shape[-1:], weight, bias, EPS) if weight is not None else tokens
    pooled = torch.cat([x[:, 0], x[:, 1 + registers:].mean(1)], dim=-1)
    return F.normalize(pooled, dim=-1) if normalize else pooled


def implementations(device: torch.device, compile_skip: Optional[str]) -> list[tuple[str, Optional[str], object]]:
    """(impl name, backend or None, eager function or a skip reason) in order; the first is the reference.
    `compile_skip`: why the torch.compile baseline does not run, None when it does."""
    impls: list[tuple[str, Optional[str], object]] = [(EAGER, None, eager_pool)]
    impls.append(("torch.compile", None, compile_skip or torch.compile(eager_pool)))
    impls.append(("torch backend (reference op)", "torch", None))
    for name in KERNEL_BACKENDS:
        impls.append((f"ours ({name})", name, backend_problem(name, ("patch_pool",), device)))
    return impls


def setup(run: Run) -> torch.dtype:
    return torch.bfloat16 if run.device.type == "cuda" else torch.float32  # the interpreter cannot do bf16 dots


def run_case(run: Run, case: Case) -> list[dict]:
    """Every implementation's fwd and bwd rows; `run.budget()` gives a reason once the time budget is used up."""
    device, dtype, rows = run.device, run.state, []
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
    compile_skip = compile_problem(case, device, run.args.quick, run.args.no_compile)
    for impl, backend, fn in implementations(device, compile_skip):
        skip = fn if isinstance(fn, str) else run.budget()
        if skip is not None:
            for pass_ in ("fwd", "bwd"):
                rows.append(result(case.name, impl, pass_=pass_, shape=shape, skipped=skip))
                print_row(rows[-1])
            continue
        for pass_, (call, inputs) in pass_calls(backend, fn, case, make, check, rot, device).items():
            try:
                with torch.no_grad():  # autograd.grad still differentiates the graphs recorded by with_graph
                    checked, rotation = inputs()
                    out, first_s = first_call(lambda: call(*checked), device)
                    timing = time_ms(lambda: call(*rotation.next()), device, run.quick)
                    peak = peak_memory_mib(lambda: call(*checked), device)
                reference.setdefault(pass_, out)
                rows.append(result(case.name, impl, timing, pass_=pass_, shape=shape, bytes_moved=work[pass_],
                                   items=b, item_name="images", peak_memory=peak, ceilings=run.ceilings,
                                   max_abs_diff=max_abs_diff(out, reference[pass_]), backend=backend,
                                   first_call_s=first_s))
            except Exception as exc:  # noqa: BLE001 - one failing implementation must not abort the run
                rows.append(result(case.name, impl, pass_=pass_, shape=shape, skipped=error_text(exc)))
            print_row(rows[-1])
            checked = rotation = out = None  # free the recorded graphs before the next implementation
            free_cache(device)
    return rows


def pass_calls(backend: Optional[str], fn, case: Case, make, check, rot: Rotation, device: torch.device):
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


def settings(run: Run, case_list: list[Case]) -> dict:
    return {"dtype": str(run.state).replace("torch.", ""), "torch_compile": run.device.type == "cuda"
            and not run.args.no_compile, "cases": [asdict(c) for c in case_list]}


NOTES = {
    "targets": TARGET,
    "bytes_moved": "fwd: tokens [B, N, D] read once + [B, 2D] written; bwd: [B, 2D] read + d_tokens [B, N, D] "
                   "written, + tokens read again with the LayerNorm. items = images pooled per call",
    "baselines": "eager: F.layer_norm + cat(cls, mean) + F.normalize in the input dtype, backward by autograd on a "
                 "recorded graph (retain_graph); torch.compile: the same function compiled; torch backend: the "
                 "package's fp32 reference op. Ours fwd is ops.patch_pool, bwd the registered patch_pool_bwd op. "
                 "With --quick on CUDA torch.compile runs on the +LN+L2 case only (each case costs two compiles)",
    "max_abs_diff": "the largest difference of the output (fwd) or of d_tokens (bwd) against the first (eager) row's",
    "ratios": "speedup_vs_best_baseline / memory_ratio_vs_best_baseline (add_ratios)",
    "first_call_s": "wall time of each row's first call, synchronised: mostly JIT compilation (torch.compile, "
                    "Triton) and autotuning; never part of a timing",
    "budget": "with --budget-s (the GPU suite's time limit), implementations not started in time give skipped rows "
              "saying so",
}

BENCHMARK = Benchmark("pooling", __doc__, cases, run_case, describe=lambda case: str(asdict(case)),
                      arguments=add_arguments, setup=setup, settings=settings, notes=NOTES,
                      quick_help="the target shape only and fewer repetitions")
main = BENCHMARK.main

if __name__ == "__main__":
    sys.exit(main())
