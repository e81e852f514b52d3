"""Attention benchmark: dinotxt-fast's Triton kernels against every attention implementation available, on the
shapes DINO.txt runs (ViT-L/14 + 4 registers at 224/448/896 px: N = 261/1029/4101, 16 heads of 64; the text tower:
causal N = 77, 20 heads of 64) and a few standard ones.

    python benchmarks/attention.py                       # every case, CUDA, bf16
    python benchmarks/attention.py --quick               # fewer cases and repetitions
    python benchmarks/attention.py --list                # print the cases and exit
    python benchmarks/attention.py --device cpu --quick  # smoke run: tiny shapes, torch + the Triton interpreter

Per case and per pass (fwd, bwd, fwd+bwd) it times: ours (Triton; the backward in its default atomic-dQ mode and in
the deterministic mode), every SDPA backend (flash, efficient, cuDNN, math where it fits in memory) selected with
torch.nn.attention.sdpa_kernel, xFormers' memory_efficient_attention and FlashAttention (4 / 3 / 2) when importable.
All take views of one fused qkv tensor [B, N, 3, H, Dh], as the models produce them. Reported: median and 20/80 %
quantiles (triton.testing.do_bench on CUDA), effective TFLOP/s (4*B*H*N^2*Dh, halved when causal; backward 2.5x,
fwd+bwd 3.5x), peak memory above the inputs, and the ratio of the best baseline's time to ours. The text case with
caption lengths gives ours per-sequence lengths (keys past each EOT masked and skipped), while the baselines compute
the full causal attention the official model runs: the pooled text embeddings are identical either way.
Results go to benchmarks/results/attention-<device>-<time>.json with the environment (GPU, driver, CUDA, torch,
triton, library versions, git commit).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
PASSES = ("fwd", "bwd", "fwd+bwd")
FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}


@dataclass(frozen=True)
class Case:
    name: str
    batch: int
    seq: int
    heads: int
    head_dim: int
    causal: bool = False
    lengths: bool = False  # ours gets random per-sequence caption lengths (keys past them masked)

    def flops(self, pass_: str) -> float:
        fwd = 4.0 * self.batch * self.heads * self.seq * self.seq * self.head_dim
        return fwd * (0.5 if self.causal else 1.0) * FLOP_FACTOR[pass_]


CASES = [
    Case("vit-l/14 224px", 256, 261, 16, 64),
    Case("vit-l/14 448px", 64, 1029, 16, 64),
    Case("vit-l/14 896px", 16, 4101, 16, 64),
    Case("text causal", 1024, 77, 20, 64, causal=True),
    Case("text causal, caption lengths", 1024, 77, 20, 64, causal=True, lengths=True),
    Case("standard N=2048 Dh=128", 8, 2048, 16, 128),
    Case("standard N=2048 Dh=128 causal", 8, 2048, 16, 128, causal=True),
    Case("standard N=4096 Dh=64 causal", 4, 4096, 32, 64, causal=True),
]
QUICK_CASES = [
    Case("vit-l/14 224px", 64, 261, 16, 64),
    Case("vit-l/14 448px", 16, 1029, 16, 64),
    Case("text causal", 256, 77, 20, 64, causal=True),
    Case("text causal, caption lengths", 256, 77, 20, 64, causal=True, lengths=True),
]
CPU_CASES = [  # smoke run under the Triton interpreter: tiny, fp32
    Case("tiny vit", 2, 21, 2, 32),
    Case("tiny text, caption lengths", 2, 13, 2, 32, causal=True, lengths=True),
]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cuda: the real benchmark; cpu: a smoke run of tiny shapes under the Triton interpreter")
    parser.add_argument("--quick", action="store_true", help="fewer cases and repetitions")
    parser.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None,
                        help="input dtype (default bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--cases", default=None,
                        help="comma-separated substrings: run only the cases whose name contains one of them")
    parser.add_argument("--passes", default=",".join(PASSES), help=f"comma-separated subset of {PASSES}")
    parser.add_argument("--list", action="store_true", help="print the cases and exit")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="results directory")
    args = parser.parse_args(argv)
    args.passes = [p for p in args.passes.split(",") if p]
    unknown = sorted(set(args.passes) - set(PASSES))
    if unknown:
        parser.error(f"unknown passes {unknown}; choose from {PASSES}")
    return args


def select_cases(args) -> list[Case]:
    cases = CPU_CASES if args.device == "cpu" else (QUICK_CASES if args.quick else CASES)
    if args.cases:
        wanted = [w.strip() for w in args.cases.split(",") if w.strip()]
        cases = [c for c in cases if any(w in c.name for w in wanted)]
    return cases


# ----------------------------------------------------------------------------------------------- environment
# -------------------------------------------------------------------------------------------- implementations
def implementations(torch, F, ops, device) -> dict[str, Callable]:
    """name -> fn(q, k, v, causal, lengths) on [B, N, H, Dh] views; baselines ignore lengths (see the docstring)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def ours(q, k, v, causal, lengths):
        return ops.attention(q, k, v, causal=causal, lengths=lengths, backend="triton")

    # The same op; run_case wraps its steps in torch.use_deterministic_algorithms(True) (separate dQ pass).
    impls = {"ours (triton)": ours, "ours (triton, deterministic bwd)": ours}

    def sdpa(backend):
        def run(q, k, v, causal, lengths):
            with sdpa_kernel([backend]):
                out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                     is_causal=causal)
            return out.transpose(1, 2)
        return run

    backends = [("math", SDPBackend.MATH)]
    if device.type == "cuda":
        backends = [("flash", SDPBackend.FLASH_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION),
                    ("cudnn", SDPBackend.CUDNN_ATTENTION)] + backends
    for name, backend in backends:
        impls[f"sdpa {name}"] = sdpa(backend)
    if device.type == "cuda":
        impls.update(_optional_libraries())
    return impls


def _optional_libraries() -> dict[str, Callable]:
    impls = {}
    try:
        import xformers.ops as xops

        def xformers_attention(q, k, v, causal, lengths):
            return xops.memory_efficient_attention(q, k, v, attn_bias=xops.LowerTriangularMask() if causal else None)

        impls["xformers memory_efficient_attention"] = xformers_attention
    except Exception:  # noqa: BLE001 - not installed or not built for this GPU
        pass
    for label, module, attr in (("flash-attn 4", "flash_attn.cute.interface", "flash_attn_func"),
                                ("flash-attn 3", "flash_attn_interface", "flash_attn_func"),
                                ("flash-attn 2", "flash_attn", "flash_attn_func")):
        try:
            fn = getattr(__import__(module, fromlist=[attr]), attr)
        except Exception:  # noqa: BLE001
            continue

        def flash(q, k, v, causal, lengths, fn=fn):
            out = fn(q, k, v, causal=causal)
            return out[0] if isinstance(out, tuple) else out

        impls[label] = flash
    return impls


# ------------------------------------------------------------------------------------------------------ timing
def peak_memory(torch, device, fn) -> Optional[float]:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def math_fits(torch, device, case: Case, dtype) -> bool:
    """The math backend materialises [B, H, N, N] scores a few times: run it only when that fits comfortably."""
    if device.type != "cuda":
        return True
    scores = case.batch * case.heads * case.seq * case.seq * 4  # fp32 softmax
    free, _ = torch.cuda.mem_get_info(device)
    return 4 * scores < 0.8 * free


def run_case(torch, device, dtype, case: Case, impls, passes, measure) -> list[dict]:
    gen = torch.Generator(device=device).manual_seed(0)
    qkv = torch.randn(case.batch, case.seq, 3, case.heads, case.head_dim, device=device, dtype=dtype, generator=gen)
    qkv.requires_grad_(True)
    q, k, v = qkv.unbind(2)
    grad_out = torch.randn(case.batch, case.seq, case.heads, case.head_dim, device=device, dtype=dtype, generator=gen)
    lengths = None
    if case.lengths:  # caption-like token counts, SOT and EOT included
        lengths = torch.randint(8, case.seq + 1, (case.batch,), device=device, generator=gen)
    rows, reference_out = [], None
    for name, fn in impls.items():
        if name == "sdpa math" and not math_fits(torch, device, case, dtype):
            rows.append(dict(case=asdict(case), impl=name, skipped="the math backend's scores do not fit in memory"))
            continue
        lens = lengths if name.startswith("ours") else None

        def call(fn=fn, lens=lens):
            return fn(q, k, v, case.causal, lens)

        try:
            out = call()
        except Exception as error:  # noqa: BLE001 - an unsupported backend/shape is a result, not a crash
            rows.append(dict(case=asdict(case), impl=name, skipped=f"{type(error).__name__}: {str(error)[:300]}"))
            continue
        check = None
        if lens is None:
            if reference_out is None:
                reference_out = out.detach().float()
            else:
                check = (out.detach().float() - reference_out).abs().max().item()
        del out
        steps = {
            "fwd": call,
            "bwd": _backward_step(torch, call, (q, k, v), grad_out),
            "fwd+bwd": lambda call=call: torch.autograd.grad(call(), (q, k, v), grad_out),
        }
        for pass_ in passes:
            if pass_ == "fwd" and "deterministic" in name:
                continue  # identical to the plain forward
            step = _deterministic(torch, steps[pass_]) if "deterministic" in name else steps[pass_]
            with torch.no_grad() if pass_ == "fwd" else contextlib.nullcontext():
                median, q20, q80 = measure(step)
                mem = peak_memory(torch, device, step)
            rows.append(dict(case=asdict(case), impl=name, pass_=pass_, median_ms=median, q20_ms=q20, q80_ms=q80,
                             tflops=case.flops(pass_) / (median * 1e-3) / 1e12, peak_memory_mib=mem,
                             max_abs_diff_vs_first=check))
        print(f"  {name:40s} " + "  ".join(f"{r['pass_']}: {r['median_ms']:.3f} ms ({r['tflops']:.1f} TFLOP/s)"
                                         for r in rows if r["impl"] == name and "pass_" in r), flush=True)
    return rows


def _backward_step(torch, call, inputs, grad_out):
    """Time the backward alone: one forward builds the graph once, each step re-runs the backward through it."""
    state = {}

    def step():
        if "out" not in state:
            state["out"] = call()
        return torch.autograd.grad(state["out"], inputs, grad_out, retain_graph=True)

    return step


def _deterministic(torch, step):
    """The step with torch.use_deterministic_algorithms(True): our backward then computes dQ in a separate pass."""
    def run():
        torch.use_deterministic_algorithms(True)
        try:
            return step()
        finally:
            torch.use_deterministic_algorithms(False)
    return run


def add_ratios(rows: list[dict]) -> None:
    """ratio_vs_best_baseline = (best baseline median) / (our median), per case and pass."""
    timed = [r for r in rows if "median_ms" in r]
    for r in timed:
        if not r["impl"].startswith("ours"):
            continue
        base = [b for b in timed if b["case"] == r["case"] and b["pass_"] == r["pass_"]
                and not b["impl"].startswith("ours")]
        if base:
            best = min(base, key=lambda b: b["median_ms"])
            r["best_baseline"] = best["impl"]
            r["ratio_vs_best_baseline"] = best["median_ms"] / r["median_ms"]


def main(argv=None) -> int:
    args = parse_args(argv)
    cases = select_cases(args)
    if args.list:
        for case in cases:
            print(f"{case.name}: B={case.batch} N={case.seq} H={case.heads} Dh={case.head_dim} "
                  f"causal={case.causal} lengths={case.lengths}")
        return 0
    if args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are imported
    sys.path.insert(0, str(ROOT))
    from benchmarks.harness import environment, library_version, time_ms
    import torch
    import torch.nn.functional as F

    from dinotxt_fast import ops

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run with --device cpu for the smoke run", file=sys.stderr)
        return 2
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[
        args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    impls = implementations(torch, F, ops, device)
    quick = args.quick or device.type == "cpu"

    def measure(fn):
        return time_ms(fn, device, quick)

    env = {**environment(device), "xformers": library_version("xformers"), "flash_attn": library_version("flash_attn")}
    print(f"attention benchmark on {env.get('gpu', 'cpu')} ({dtype}); implementations: {list(impls)}", flush=True)
    rows = []
    for case in cases:
        print(f"{case.name}: B={case.batch} N={case.seq} H={case.heads} Dh={case.head_dim} causal={case.causal}",
              flush=True)
        rows += run_case(torch, device, dtype, case, impls, args.passes, measure)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    add_ratios(rows)
    for r in rows:
        if "ratio_vs_best_baseline" in r:
            print(f"{r['case']['name']:32s} {r['impl']:34s} {r['pass_']:8s} {r['ratio_vs_best_baseline']:.2f}x "
                  f"vs {r['best_baseline']}")
    tag = "cpu-smoke" if device.type == "cpu" else env["gpu"].replace(" ", "_")
    out = Path(args.out) / f"attention-{tag}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "attention", "dtype": str(dtype), "quick": args.quick,
                               "environment": env, "flops": "4*B*H*N^2*Dh (x0.5 causal); bwd x2.5, fwd+bwd x3.5",
                               "max_abs_diff_vs_first": "max |o - o of the first implementation run without lengths|",
                               "results": rows}, indent=1, default=_json_default))
    print(f"wrote {out}")
    return 0


def _json_default(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


if __name__ == "__main__":
    sys.exit(main())
