"""Training-step throughput: dinotxt-fast's LiT step against the same step written in eager PyTorch.

    python benchmarks/train_step.py                      # official config (ViT-L/14-reg4 + head + text), CUDA
    python benchmarks/train_step.py --config tiny --device cpu --steps 3   # smoke run

"ours": frozen backbone in bf16 without autograd state, text truncated to the longest EOT, fused pooling and the
fused contrastive loss, all through `dinotxt_fast.ops` (auto backend). "eager": the same model and optimizer with
attention through torch's scaled_dot_product_attention, the naive B x B loss, no text truncation, the backbone in
fp32 weights under autocast. Both use bf16 autocast on CUDA. Results (median step time, samples/s, peak memory)
go to benchmarks/results/train_step-<device>-<time>.json together with the environment.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.harness import environment  # noqa: E402

from dinotxt_fast import ops  # noqa: E402
from dinotxt_fast.train.config import load_config  # noqa: E402
from dinotxt_fast.train.loop import LiTModule, build_model, param_groups  # noqa: E402


def sdpa_attention(q, k, v, *, causal=False, scale=None, lengths=None, backend=None):
    # `lengths` (key padding after EOT) changes nothing for the causal, EOT-pooled text tower: ignoring it is exact.
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal,
                                         scale=scale)
    return out.transpose(1, 2)


def naive_loss(img, txt, logit_scale):
    img, txt = F.normalize(img.float(), dim=-1), F.normalize(txt.float(), dim=-1)
    logits = logit_scale.exp() * img @ txt.T
    target = torch.arange(img.shape[0], device=img.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


@contextlib.contextmanager
def eager_attention():
    """The eager baseline: every attention call of the model goes through SDPA instead of the ops dispatch."""
    saved = ops.attention
    ops.attention = sdpa_attention
    try:
        yield
    finally:
        ops.attention = saved


def make_step(variant: str, cfg, device, precision):
    model = build_model(cfg, device, precision if variant == "ours" else "fp32")
    lit = LiTModule(model)
    opt = torch.optim.AdamW(param_groups(lit, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas)
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    R = model.config.num_register_tokens

    def ours(images, ids):
        with amp:
            tokens = model.backbone_tokens(images.to(next(model.backbone.parameters()).dtype))
            img, txt = lit(tokens, ids)
        loss = ops.contrastive_loss(img, txt, lit.logit_scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        model.clamp_logit_scale()

    def eager(images, ids):
        with eager_attention(), amp:
            tokens = model.backbone(images)
            head = model.head(tokens)
            img = torch.cat([head[:, 0], head[:, 1 + R:].mean(1)], dim=-1)
            txt = model.text(ids, truncate=False)
            loss = naive_loss(img, txt, lit.logit_scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        model.clamp_logit_scale()

    model.train()
    return ours if variant == "ours" else eager


def measure(step, images, ids, warmup: int, steps: int, device) -> dict:
    for _ in range(warmup):
        step(images, ids)
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    for _ in range(steps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step(images, ids)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            step(images, ids)
            times.append(time.perf_counter() - t0)
    times.sort()
    median = statistics.median(times)
    return {"median_s": median, "q20_s": times[int(0.2 * (len(times) - 1))], "q80_s": times[int(0.8 * (len(times) - 1))],
            "samples_per_s": images.shape[0] / median,
            "peak_memory_gb": torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else None}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="official", help="built-in config name or YAML file")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=None, help="per-GPU batch (default: the config's)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    cfg = load_config(args.config, device=device.type, **({"batch_size": args.batch_size} if args.batch_size else {}))
    precision = "bf16" if device.type == "cuda" else "fp32"
    mcfg = cfg.model_config()
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(cfg.batch_size, 3, cfg.image_size, cfg.image_size, generator=gen).to(device)
    # realistic captions: 10-30 tokens, then EOT and padding
    lengths = torch.randint(10, min(30, mcfg.context_length - 2), (cfg.batch_size,), generator=gen)
    ids = torch.zeros(cfg.batch_size, mcfg.context_length, dtype=torch.long)
    for row, n in enumerate(lengths.tolist()):
        ids[row, 0] = 49406
        ids[row, 1:n + 1] = torch.randint(1, 49000, (n,), generator=gen)
        ids[row, n + 1] = 49407
    ids = ids.to(device)
    results = {}
    for variant in ("eager", "ours"):
        torch.manual_seed(0)
        step = make_step(variant, cfg, device, precision)
        results[variant] = measure(step, images, ids, args.warmup, args.steps, device)
        del step
        if device.type == "cuda":
            torch.cuda.empty_cache()
        print(f"{variant:>6}: {results[variant]['samples_per_s']:.1f} samples/s, median step "
              f"{results[variant]['median_s'] * 1e3:.1f} ms, peak memory {results[variant]['peak_memory_gb']} GB")
    speedup = results["ours"]["samples_per_s"] / results["eager"]["samples_per_s"]
    print(f"speedup ours / eager: {speedup:.2f}x")
    record = {"benchmark": "train_step", "config": args.config, "batch_size": cfg.batch_size,
              "image_size": cfg.image_size, "precision": precision, "results": results, "speedup": speedup,
              "environment": environment(device), "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"train_step-{device.type}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(record, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
