"""Contrastive loss, forward + backward: dinotxt-fast's fused kernels against the usual ways of computing it.

    python benchmarks/contrastive.py                   # CUDA, bf16, E = 2048: 4096x4096, 4096x32768, 65536x65536
    python benchmarks/contrastive.py --quick           # fewer repetitions, the two 4096-row cases
    python benchmarks/contrastive.py --device cpu --quick   # smoke run: tiny shapes, torch + Triton interpreter

A case is B_local x B_global: one rank's rows against the global batch. With B_local < B_global the other ranks'
columns are simulated on one GPU (no communication is timed; every method does exactly one rank's work):
- naive: the plain B_global x B_global loss (F.cross_entropy both ways on the full logits; what every rank computes
  without open_clip's local_loss), bf16 matmul, fp32 cross-entropy;
- open_clip_local: open_clip's local_loss: local rows against the gathered features, both directions
  ([B_local, B_global] logits twice), gathered features with gradients;
- official_ring: the official DINO.txt trainer's memory-efficient ring loss (dinov3/eval/text/clip_loss.py)
  re-expressed in plain PyTorch: fp32 features, [B_local, B_local] blocks per ring step, recomputed in the backward;
- inf_cl: Inf-CL's `cal_inf_loss` both ways (single-GPU path), when the `inf_cl` package is importable;
- ours_<backend>: dinotxt_fast (torch / triton / cuda): the single-process op when B_local = B_global, else the
  partial kernels of the distributed op (local rows against all columns) plus the local normalisation backward.
Effective TFLOP/s count 8 * B_local * B_global * E for every method (two GEMMs forward-and-recompute, two for the
gradients). Times: median and 20/80 % quantiles of triton.testing.do_bench (CUDA) or perf_counter (CPU). Memory:
peak allocated during one forward + backward beyond what was allocated before it (inputs), and the bytes of the
gradients it returns. Results go to benchmarks/results/contrastive-<device>-<time>.json with the environment.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.harness import environment, time_ms  # noqa: E402
FULL_CASES = ["4096x4096", "4096x32768", "65536x65536"]
QUICK_CASES = ["4096x4096", "4096x32768"]
CPU_CASES = ["48x48", "32x96"]
METHODS = ["naive", "open_clip_local", "official_ring", "inf_cl", "ours_torch", "ours_triton", "ours_cuda"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--quick", action="store_true", help="fewer repetitions and cases (GPU), tiny shapes (CPU)")
    p.add_argument("--cases", nargs="+", metavar="BLxBG", help=f"cases (default {FULL_CASES}; --quick {QUICK_CASES}; "
                                                               f"cpu {CPU_CASES})")
    p.add_argument("--dim", type=int, default=None, help="feature dim E (default 2048; 32 on cpu)")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None,
                   help="feature dtype (default bfloat16; float32 on cpu: the interpreter cannot do bf16 dots)")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=METHODS)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="results directory")
    args = p.parse_args(argv)
    cpu = args.device == "cpu"
    args.cases = [parse_case(c) for c in (args.cases or (CPU_CASES if cpu else QUICK_CASES if args.quick
                                                         else FULL_CASES))]
    args.dim = args.dim or (32 if cpu else 2048)
    args.dtype = args.dtype or ("float32" if cpu else "bfloat16")
    return args


def parse_case(text: str) -> tuple[int, int]:
    try:
        local, total = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise SystemExit(f"bad case {text!r}: expected B_LOCALxB_GLOBAL, e.g. 4096x32768") from None
    if local < 1 or total % local:
        raise SystemExit(f"bad case {text!r}: B_global must be a positive multiple of B_local")
    return local, total


# -------------------------------------------------------------------------------------------------- methods
def make_methods(torch, F, ops, library, reference):
    """name -> fn(img_all, txt_all, logit_scale, b_local) returning the gradients of one rank's work."""

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
        loss = 0.5 * (cal_inf_loss(i_all[:b_local], t_all, labels=labels, scale=s)
                      + cal_inf_loss(t_all[:b_local], i_all, labels=labels, scale=s))
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
            d_txt = reference.contrastive_normalize_backward(g_txt[:b_local], txt_all[:b_local], True)
            return d_img, d_txt, g_txt, d_scale
        return run

    return {"naive": naive, "open_clip_local": open_clip_local, "official_ring": official_ring, "inf_cl": inf_cl,
            "ours_torch": ours("torch"), "ours_triton": ours("triton"), "ours_cuda": ours("cuda")}


def unavailable(name, ops, device) -> str | None:
    """Why method `name` cannot run here, or None."""
    if name == "inf_cl":
        if device != "cuda":
            return "Inf-CL runs on CUDA only"
        try:
            import inf_cl  # noqa: F401
        except ImportError as error:
            return f"inf_cl is not importable ({error})"
    if name.startswith("ours_"):
        report = ops.backends()[name[len("ours_"):]]
        if not report["available"] or "contrastive_loss" not in report["ops"]:
            return report["reason"] or "no contrastive kernels in this backend"
        if device == "cpu" and name == "ours_cuda":
            return "CUDA kernels need a GPU"
    return None


# -------------------------------------------------------------------------------------------------- timing
def measure(torch, fn, device, quick):
    """(median, p20, p80) in ms, peak extra bytes (None on CPU), bytes of the returned gradients."""
    grads = fn()  # compile / autotune outside the measurement
    out_bytes = sum(g.numel() * g.element_size() for g in grads)
    del grads
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
        return time_ms(fn, device, quick), peak, out_bytes
    return time_ms(fn, device, quick), None, out_bytes


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: the Triton kernels run interpreted
    import torch
    import torch.nn.functional as F

    from dinotxt_fast import ops
    from dinotxt_fast.ops import library, reference

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --device cpu --quick for the smoke mode")
    device = args.device
    dtype = getattr(torch, args.dtype)
    methods = make_methods(torch, F, ops, library, reference)
    results = []
    for b_local, b_global in args.cases:
        g = torch.Generator(device=device).manual_seed(0)
        img_all = torch.randn(b_global, args.dim, device=device, generator=g, dtype=dtype)
        txt_all = (0.6 * img_all + torch.randn(b_global, args.dim, device=device, generator=g, dtype=dtype))
        scale = torch.tensor(2.659, device=device)  # ln(1 / 0.07)
        flops = 8 * b_local * b_global * args.dim
        for name in args.methods:
            row = {"case": f"{b_local}x{b_global}", "b_local": b_local, "b_global": b_global, "dim": args.dim,
                   "dtype": args.dtype, "method": name}
            reason = unavailable(name, ops, device)
            if reason is not None:
                row.update(status="skipped", reason=reason)
            else:
                try:
                    run = methods[name]
                    (median, p20, p80), peak, out_bytes = measure(
                        torch, lambda: run(img_all, txt_all, scale, b_local), device, args.quick)  # noqa: B023
                    row.update(status="ok", median_ms=median, p20_ms=p20, p80_ms=p80,
                               tflops_effective=flops / (median * 1e-3) / 1e12, peak_extra_bytes=peak,
                               gradient_bytes=out_bytes)
                except torch.cuda.OutOfMemoryError as error:
                    row.update(status="oom", reason=str(error).split("\n")[0])
                    torch.cuda.empty_cache()
            results.append(row)
            shown = (f"{row['median_ms']:9.3f} ms  {row['tflops_effective']:8.2f} TFLOP/s"
                     + (f"  peak +{row['peak_extra_bytes'] / 2 ** 20:8.1f} MiB" if row.get("peak_extra_bytes")
                        is not None else "") if row["status"] == "ok" else f"{row['status']}: {row.get('reason')}")
            print(f"{row['case']:>12} {name:>16}  {shown}", flush=True)
    # Speed-ups of each of our methods over each baseline measured in this run, per case.
    speedups = {}
    for row in results:
        if row["status"] != "ok" or not row["method"].startswith("ours_"):
            continue
        for base in results:
            if base["case"] == row["case"] and base["status"] == "ok" and not base["method"].startswith("ours_"):
                speedups.setdefault(row["case"], {})[f"{row['method']}/{base['method']}"] = (
                    base["median_ms"] / row["median_ms"])
    report = {"benchmark": "contrastive", "environment": {**environment(device),
                                                              "allow_tf32_matmul": torch.backends.cuda.matmul.allow_tf32},
              "settings": {"quick": args.quick, "dim": args.dim, "dtype": args.dtype,
                           "flops_counted": "8 * b_local * b_global * dim"},
              "results": results, "speedups": speedups}
    out = Path(args.out) / f"contrastive-{device}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
