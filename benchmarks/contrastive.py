"""Contrastive loss, forward + backward: dinotxt-fast's fused kernels against the usual ways of computing it.

    python benchmarks/contrastive.py                   # CUDA, bf16, E = 2048: 4096x4096, 4096x32768, 65536x65536
    python benchmarks/contrastive.py --quick           # the two 4096-row cases, fewer reps (sized for ~1.5 min)
    python benchmarks/contrastive.py --device cpu --quick   # smoke run: tiny shapes, torch + Triton interpreter

A case is B_local x B_global: one rank's rows against the global batch. With B_local < B_global the other ranks'
columns are simulated on one GPU (no communication is timed; every method does one rank's work):
- naive: the plain B_global x B_global loss (F.cross_entropy both ways on the full logits; what every rank computes
  without open_clip's local_loss), bf16 matmul, fp32 cross-entropy;
- open_clip_local: open_clip's local_loss: local rows against the gathered features, both directions
  ([B_local, B_global] logits twice), gathered features with gradients;
- official_ring: the official DINO.txt trainer's memory-efficient ring loss (dinov3/eval/text/clip_loss.py)
  re-expressed in plain PyTorch: fp32 features, [B_local, B_local] blocks per ring step, recomputed in the backward;
- inf_cl: Inf-CL's `cal_inf_loss` both ways (single-GPU path), when the `inf_cl` package is importable;
- ours_<backend> (rows "ours (<backend>)"): dinotxt_fast (torch / triton / cuda): the single-process op when
  B_local = B_global, else the partial kernels of the distributed op (local rows against all columns) plus the
  local normalisation backward.
Effective TFLOP/s count 8 * B_local * B_global * E for every method (two GEMMs forward-and-recompute, two for the
gradients); the naive method's own work, B_global x B_global, is in work_flops / work_tflops. Through
benchmarks/harness.py: median and 20/80 % quantiles, fraction of the measured matmul ceiling, peak memory above the
inputs and the extra memory beyond one rank's own gradients, the gradients' max |difference| against the first
method computing the same quantity, and the speedup over the best (and each) baseline measured in the same run.
A method that fails (out of memory, missing library) gives a skipped row; the run goes on.
JSON: benchmarks/results/contrastive-*.json.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from benchmarks.harness import (  # noqa: E402
    Benchmark, Rotation, Run, backend_problem, error_text, free_cache, is_ours, peak_memory_mib, print_row, result,
    time_ms)

FULL_CASES = ["4096x4096", "4096x32768", "65536x65536"]
QUICK_CASES = ["4096x4096", "4096x32768"]
CPU_CASES = ["48x48", "32x96"]
METHODS = ["naive", "open_clip_local", "official_ring", "inf_cl", "ours_torch", "ours_triton", "ours_cuda"]
LOGIT_SCALE = 2.659  # ln(1 / 0.07), the initial value

TARGETS = [  # issue #4 (H100, bf16, E = 2048), for the report's target-vs-measured table
    {"issue": 4, "case": "4096x32768", "impl": "ours (triton)", "metric": "extra_memory_mib", "op": "<=",
     "target": 0.2 * 1024, "note": "<= 0.2 GB extra (Inf-CL's table: 0.18 GB; open_clip 2.27 GB)"},
    {"issue": 4, "case": "4096x32768", "impl": "ours (cuda)", "metric": "extra_memory_mib", "op": "<=",
     "target": 0.2 * 1024, "note": "<= 0.2 GB extra"},
    {"issue": 4, "case": "65536x65536", "impl": "ours (cuda)", "metric": "runs", "op": "==", "target": True,
     "note": "a 65536 batch on one GPU"},
    {"issue": 4, "case": "*", "impl": "ours (cuda)", "metric": "tflops", "op": ">=", "target": 450,
     "note": "forward+backward >= 450 effective TFLOP/s"},
    {"issue": 4, "case": "*", "impl": "ours (cuda)", "metric": "speedup_vs_best_baseline", "op": ">", "target": 1.0,
     "note": "faster than every baseline measured in the same run"},
    {"issue": 4, "case": "*", "impl": "ours (triton)", "metric": "tflops", "op": ">=", "target": 450,
     "note": "forward+backward >= 450 effective TFLOP/s"},
    {"issue": 4, "case": "*", "impl": "ours (triton)", "metric": "speedup_vs_best_baseline", "op": ">",
     "target": 1.0, "note": "faster than every baseline measured in the same run"},
]
NOTES = {
    "flops": "8 * B_local * B_global * E for every method (logits GEMM, its recomputation, two gradient GEMMs): the "
             "common work of one rank. work_flops / work_tflops (naive only): the same count over what it actually "
             "computes, B_global x B_global, since every rank of the naive loss builds the whole matrix.",
    "items": "none (a loss has no natural item count)",
    "memory": "peak_memory_mib: peak allocated during one forward+backward above what was allocated before it "
              "(the inputs), including the gradients it returns; extra_memory_mib: that minus one rank's own "
              "gradients (d_img and d_txt, [B_local, E] in the input dtype): what the loss needs beyond its inputs "
              "and outputs (ours keeps fp32 [B_global, E] text gradients to reduce-scatter: they count as extra); "
              "gradient_mib: the bytes of the gradients the method returns.",
    "max_abs_diff": "max |g - g_ref| over the returned gradients against checked_against, the first method computing "
                    "the same quantity on the same inputs (max_rel_diff: divided by max |g_ref| per tensor). At "
                    "B_local = B_global every method returns (d_img, d_txt, d_logit_scale) of the same loss; at "
                    "B_local < B_global the baselines each simulate one rank differently, so only ours (torch / "
                    "triton / cuda: the same partial computation) are compared, against ours (torch).",
    "speedups": "speedup_vs_best_baseline = best baseline median / ours (same case, this run); "
                "speedup_vs_each_baseline: the same per baseline; memory_ratio_vs_best_baseline = its peak / ours.",
    "simulation": "B_local < B_global: one GPU holds the gathered features; no collective is timed; ours uses its "
                  "local partial column log-sum-exps where the distributed op would merge them over ranks "
                  "(same work).",
    "baselines": {
        "naive": "F.normalize, bf16 logits = exp(s) * i @ t.T over B_global x B_global, fp32 F.cross_entropy both "
                 "ways, autograd",
        "open_clip_local": "open_clip's local_loss: [B_local, B_global] logits both directions against the "
                           "gathered features (with gradients), fp32 cross-entropy, autograd",
        "official_ring": "the official DINO.txt ring loss in plain PyTorch: fp32 features, [B_local, B_local] "
                         "blocks per ring step, recomputed in a custom backward (the other ranks' column terms are "
                         "not simulated)",
        "inf_cl": "Inf-CL cal_inf_loss both ways on fp32 normalised features (its single-GPU path); the logit scale "
                  "multiplies the query rows before the call (what cal_inf_loss does with `scale=`, whose gradient "
                  "path all-reduces and needs a process group)",
    },
    "first_call_s": "wall time of each method's first forward+backward on the case, synchronised: mostly JIT "
                    "compilation and autotuning; never part of a timing",
    "budget": "with --budget-s (the GPU suite's time limit), methods not started in time give skipped rows saying so",
    "targets": TARGETS,
}


@dataclass(frozen=True)
class Case:
    b_local: int  # one rank's rows
    b_global: int  # the global batch: its columns

    @property
    def name(self) -> str:
        return f"{self.b_local}x{self.b_global}"


def add_arguments(parser) -> None:
    parser.add_argument("--cases", nargs="+", metavar="BLxBG",
                        help=f"cases (default {FULL_CASES}; --quick {QUICK_CASES}; cpu {CPU_CASES})")
    parser.add_argument("--dim", type=int, default=None, help="feature dim E (default 2048; 32 on cpu)")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None,
                        help="feature dtype (default bfloat16; float32 on cpu: the interpreter cannot do bf16 dots)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=METHODS)


def check_arguments(parser, args) -> None:
    cpu = args.device == "cpu"
    try:
        args.cases = [parse_case(c) for c in (args.cases or (CPU_CASES if cpu else QUICK_CASES if args.quick
                                                             else FULL_CASES))]
    except ValueError as error:
        parser.error(str(error))
    args.dim = args.dim or (32 if cpu else 2048)
    if args.dim < 1:
        parser.error(f"--dim must be positive, got {args.dim}")
    args.dtype = args.dtype or ("float32" if cpu else "bfloat16")


def parse_case(text: str) -> Case:
    try:
        local, total = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"bad case {text!r}: expected B_LOCALxB_GLOBAL, e.g. 4096x32768") from None
    if local < 1 or total % local:
        raise ValueError(f"bad case {text!r}: B_global must be a positive multiple of B_local")
    return Case(local, total)


def impl_name(method: str) -> str:
    """The row name: ours_<backend> -> "ours (<backend>)" (the harness's convention), baselines as they are."""
    return f"ours ({method[len('ours_'):]})" if method.startswith("ours_") else method


# -------------------------------------------------------------------------------------------------- methods
def make_methods(torch, F, ops, library, normalize_backward):
    """name -> fn(img_all, txt_all, logit_scale, b_local) returning the gradients of one rank's work.
    `normalize_backward(g, x, normalize)`: the reference's backward of the local L2 normalisation."""

    def naive(img_all, txt_all, scale, b_local):
        leaves = [img_all.detach().requires_grad_(True), txt_all.detach().requires_grad_(True),
                  scale.detach().requires_grad_(True)]
        i, t = F.normalize(leaves[0], dim=-1), F.normalize(leaves[1], dim=-1)
        logits = (leaves[2].exp().to(i.dtype) * i @ t.T).float()
        target = torch.arange(i.shape[0], device=i.device)
        loss = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
        return torch.autograd.grad(loss, leaves)

    def open_clip_local(img_all, txt_all, scale, b_local):
        leaves = [img_all.detach().requires_grad_(True), txt_all.detach().requires_grad_(True),
                  scale.detach().requires_grad_(True)]
        i_all, t_all = F.normalize(leaves[0], dim=-1), F.normalize(leaves[1], dim=-1)
        s = leaves[2].exp().to(i_all.dtype)
        per_image = (s * i_all[:b_local] @ t_all.T).float()
        per_text = (s * t_all[:b_local] @ i_all.T).float()
        target = torch.arange(b_local, device=i_all.device)  # rank 0: its rows are the first ones
        loss = 0.5 * (F.cross_entropy(per_image, target) + F.cross_entropy(per_text, target))
        return torch.autograd.grad(loss, leaves)

    class RingLoss(torch.autograd.Function):
        """The official ring loss's computation for one rank, the ring's chunks arriving as slices of txt_all."""

        @staticmethod
        def forward(ctx, img, txt_all, scale, b_local):
            chunks = txt_all.shape[0] // b_local
            img_lse = torch.empty(chunks, b_local, device=img.device)
            txt_lse = torch.empty(chunks, b_local, device=img.device)
            positives = None
            for k in range(chunks):
                logits = scale * (img @ txt_all[k * b_local:(k + 1) * b_local].T)
                if k == 0:
                    positives = torch.diag(logits)
                torch.logsumexp(logits, dim=1, out=img_lse[k])
                torch.logsumexp(logits, dim=0, out=txt_lse[k])
            img_lse, txt_lse = img_lse.logsumexp(0), txt_lse[0]  # (the other ranks' column terms are not simulated)
            ctx.save_for_backward(img, txt_all, scale, img_lse, txt_lse)
            ctx.b_local = b_local
            return -(2 * positives - img_lse - txt_lse).mean() / 2

        @staticmethod
        def backward(ctx, grad):
            img, txt_all, scale, img_lse, txt_lse = ctx.saved_tensors
            b = ctx.b_local
            grad = grad / (2 * b)
            d_img, d_scale = torch.zeros_like(img), torch.zeros_like(scale)
            d_txt = torch.empty_like(txt_all)
            for k in range(txt_all.shape[0] // b):
                chunk = txt_all[k * b:(k + 1) * b]
                raw = img @ chunk.T
                logits = scale * raw
                g = (logits - img_lse[:, None]).exp() + (logits - txt_lse[None, :]).exp()
                if k == 0:
                    g.diagonal().sub_(2)
                d_scale += (raw * g).sum()
                g = g * scale
                d_img.addmm_(g, chunk)
                d_txt[k * b:(k + 1) * b] = g.T @ img
            return grad * d_img, grad * d_txt, grad * d_scale, None

    def official_ring(img_all, txt_all, scale, b_local):
        leaves = [img_all[:b_local].detach().requires_grad_(True), txt_all.detach().requires_grad_(True),
                  scale.detach().requires_grad_(True)]
        i, t = F.normalize(leaves[0], dim=-1), F.normalize(leaves[1], dim=-1)
        loss = RingLoss.apply(i.float(), t.float(), leaves[2].exp().float(), b_local)  # as the official call
        return torch.autograd.grad(loss, leaves)

    def inf_cl(img_all, txt_all, scale, b_local):
        from inf_cl import cal_inf_loss

        leaves = [img_all.detach().requires_grad_(True), txt_all.detach().requires_grad_(True),
                  scale.detach().requires_grad_(True)]
        i_all, t_all = F.normalize(leaves[0].float(), dim=-1), F.normalize(leaves[1].float(), dim=-1)
        labels = torch.arange(b_local, device=i_all.device)
        s = leaves[2].exp()
        # The scale multiplies the query rows here, as cal_inf_loss does with its `scale`: passed to it, the scale goes
        # through its GradientGather, whose backward all-reduces and fails without a process group (one GPU).
        loss = 0.5 * (cal_inf_loss(s * i_all[:b_local], t_all, labels=labels)
                      + cal_inf_loss(s * t_all[:b_local], i_all, labels=labels))
        return torch.autograd.grad(loss, leaves)

    def ours(backend):
        def run(img_all, txt_all, scale, b_local):
            if b_local == img_all.shape[0]:
                leaves = [img_all.detach().requires_grad_(True), txt_all.detach().requires_grad_(True),
                          scale.detach().requires_grad_(True)]
                return torch.autograd.grad(ops.contrastive_loss(*leaves, backend=backend), leaves)
            # One rank of the distributed op: its rows against all texts (the gathered ones), without the
            # collectives: the column log-sum-exps would be merged over ranks, the text gradients reduce-scattered.
            img = img_all[:b_local]
            lse_r, lse_c, _ = library.contrastive_partial_fwd(img, txt_all, scale, True, 0, backend)
            coef_r = torch.full((b_local,), 0.5 / b_local, device=img.device)
            coef_c = torch.full((txt_all.shape[0],), 0.5 / b_local, device=img.device)
            d_img, g_txt, d_scale = library.contrastive_partial_bwd(img, txt_all, scale, lse_r, lse_c, coef_r, coef_c,
                                                                    True, 0, backend)
            d_txt = normalize_backward(g_txt[:b_local], txt_all[:b_local], True)
            return d_img, d_txt, g_txt, d_scale
        return run

    return {"naive": naive, "open_clip_local": open_clip_local, "official_ring": official_ring, "inf_cl": inf_cl,
            "ours_torch": ours("torch"), "ours_triton": ours("triton"), "ours_cuda": ours("cuda")}


def unavailable(name, device) -> Optional[str]:
    """Why method `name` cannot run here, or None."""
    if name == "inf_cl":
        if device != "cuda":
            return "Inf-CL runs on CUDA only"
        try:
            import inf_cl  # noqa: F401
        except Exception as error:  # noqa: BLE001 - missing, or built for another torch/GPU
            return f"inf_cl is not importable ({type(error).__name__}: {error})"
    if name.startswith("ours_"):
        return backend_problem(name[len("ours_"):], ("contrastive_loss",), device)
    return None


def comparable(method: str, b_local: int, b_global: int) -> Optional[str]:
    """Which quantity a method's gradients are (methods with the same key are compared), None when no other method
    computes the same (the baselines' different one-rank simulations at b_local < b_global)."""
    if b_local == b_global:
        return "full loss: (d_img, d_txt, d_logit_scale)"
    return "rank-0 partial: (d_img, d_txt local, g_txt all, d_logit_scale)" if method.startswith("ours_") else None


def grad_diffs(grads, ref) -> dict:
    if len(grads) != len(ref):
        raise ValueError(f"{len(grads)} gradients against {len(ref)} of the reference")
    abs_diff = rel_diff = 0.0
    for g, r in zip(grads, ref):
        if g.shape != r.shape:
            raise ValueError(f"gradient of shape {tuple(g.shape)} against {tuple(r.shape)} of the reference")
        diff = (g.detach().double() - r.double()).abs().max().item()
        abs_diff = max(abs_diff, diff)
        rel_diff = max(rel_diff, diff / max(r.double().abs().max().item(), 1e-30))
    return {"max_abs_diff": abs_diff, "max_rel_diff": rel_diff}


# ---------------------------------------------------------------------------------------------------- running
def setup(run: Run) -> tuple[dict, object]:
    """(the methods, the feature dtype)."""
    import torch
    import torch.nn.functional as F

    from dinotxt_fast import ops
    from dinotxt_fast.ops import library
    from dinotxt_fast.ops.reference.contrastive import contrastive_normalize_backward

    return make_methods(torch, F, ops, library, contrastive_normalize_backward), getattr(torch, run.args.dtype)


def run_case(run: Run, case: Case) -> list[dict]:
    """One row per method; `run.budget()` gives a reason once the time budget is used up."""
    import torch

    (methods, dtype), device, dim = run.state, run.args.device, run.args.dim
    b_local, b_global = case.b_local, case.b_global
    generator = torch.Generator(device=device).manual_seed(0)

    def make_inputs():
        img_all = torch.randn(b_global, dim, device=device, generator=generator, dtype=dtype)
        txt_all = 0.6 * img_all + torch.randn(b_global, dim, device=device, generator=generator, dtype=dtype)
        return img_all, txt_all, torch.tensor(LOGIT_SCALE, device=device)

    rotation = Rotation(make_inputs, device)
    shape = {"b_local": b_local, "b_global": b_global, "dim": dim, "dtype": str(dtype).replace("torch.", ""),
             "input_sets": len(rotation)}
    flops = 8 * b_local * b_global * dim
    own_grad_mib = 2 * b_local * dim * torch.empty((), dtype=dtype).element_size() / 2**20
    references, rows = {}, []
    for name in run.args.methods:
        label = impl_name(name)
        reason = unavailable(name, device) or run.budget()
        if reason is not None:
            rows.append(result(case.name, label, pass_="fwd+bwd", shape=shape, skipped=reason, method=name))
            print_row(rows[-1])
            continue
        method = methods[name]
        try:
            fields = {"method": name}
            start = time.perf_counter()
            grads = method(*rotation.sets[0], b_local)  # compiles / autotunes outside the measurement
            if device == "cuda":
                torch.cuda.synchronize()
            fields["first_call_s"] = round(time.perf_counter() - start, 3)  # mostly compiles and autotuning
            fields["gradient_mib"] = sum(g.numel() * g.element_size() for g in grads) / 2**20
            key = comparable(name, b_local, b_global)
            if key is not None and key in references:
                fields.update(checked_against=references[key][0], **grad_diffs(grads, references[key][1]))
            elif key is not None:
                references[key] = (label, [g.detach() for g in grads])
                fields["reference_for_max_abs_diff"] = True
            else:
                fields["not_checked"] = "no other method simulates one rank this way (checked at B_local = B_global)"
            del grads
            timing = time_ms(lambda: method(*rotation.next(), b_local), device, run.quick)  # noqa: B023
            peak = peak_memory_mib(lambda: method(*rotation.sets[0], b_local), device)  # noqa: B023
            if peak is not None:
                fields["extra_memory_mib"] = peak - own_grad_mib
            if name == "naive" and b_local != b_global:  # every rank of the naive loss computes the whole batch
                fields["work_flops"] = 8 * b_global * b_global * dim
                fields["work_tflops"] = fields["work_flops"] / (timing[0] * 1e-3) / 1e12
            rows.append(result(case.name, label, timing, pass_="fwd+bwd", shape=shape, flops=flops, peak_memory=peak,
                               ceilings=run.ceilings, **fields))
        except Exception as error:  # noqa: BLE001 - out of memory or a failing library: a result, not a crash
            rows.append(result(case.name, label, pass_="fwd+bwd", shape=shape, method=name, skipped=error_text(error)))
        free_cache(device)
        print_row(rows[-1])
    return rows


def add_each_baseline(rows: list[dict]) -> None:
    """speedup_vs_each_baseline on our rows: {baseline: its median / ours} (the target: faster than every one)."""
    timed = [r for r in rows if "median_ms" in r]
    for r in timed:
        if is_ours(r):
            r["speedup_vs_each_baseline"] = {b["impl"]: b["median_ms"] / r["median_ms"] for b in timed
                                             if b["case"] == r["case"] and not is_ours(b)}


def settings(run: Run, cases: list[Case]) -> dict:
    import torch

    return {"dim": run.args.dim, "dtype": run.args.dtype, "methods": run.args.methods,
            "cases": [c.name for c in cases], "allow_tf32_matmul": torch.backends.cuda.matmul.allow_tf32}


BENCHMARK = Benchmark("contrastive", __doc__, lambda args: args.cases, run_case, arguments=add_arguments,
                      check=check_arguments, setup=setup, ratios=(add_each_baseline,), settings=settings, notes=NOTES,
                      setup_pass="fwd+bwd", quick_help="fewer repetitions and cases (GPU), tiny shapes (CPU)")
main = BENCHMARK.main

if __name__ == "__main__":
    sys.exit(main())
