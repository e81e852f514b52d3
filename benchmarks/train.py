"""Training-step benchmark: the official configuration's full optimizer step, dinotxt-fast's trainer against the same
step written the plain way in eager PyTorch.

    python benchmarks/train.py                           # official config (ViT-L/14-reg4 + head + text), 256/GPU
    python benchmarks/train.py --quick                   # one caption-length case, fewer repetitions
    python benchmarks/train.py --device cpu --quick      # smoke run: the tiny config, torch + the Triton interpreter

One timed call is one full training step on one batch already on the device: forward, backward, optimizer step,
scheduler step and logit-scale clamp. Implementations (all on the same model, initial weights, optimizer, batch and
precision policy: fp32 weights, bf16 autocast on CUDA, fp32 on CPU):
- "eager reference" (baseline): attention through torch's scaled_dot_product_attention, the head's ln_final applied
  to every token then cls / patch-mean pooling, the text tower on all context positions (no truncation), the naive
  B x B contrastive loss (F.cross_entropy both ways on the full logits);
- "ours (auto)": the step of `dinotxt-fast train` (dinotxt_fast.train.loop.train): frozen backbone without autograd
  state, LiTModule (text truncated to the longest EOT, keys after each EOT masked, fused LN + pooling), the fused
  contrastive loss; every op through the dispatch with the backend that auto picks (recorded per op family);
- "ours (triton)" / "ours (cuda)": the same step with every op forced to that backend (the trainer's `backend=`
  key), so a kernel's speedup shows even while auto still picks the reference; a skipped row says why a backend
  cannot run the step here.
Before timing, each implementation runs one step on the same batch with the same random draws (the head's
batch-subset drop-path) from the same initial weights: the row records that step's loss, its |difference| to the
eager reference's (`max_abs_diff`) and the gradient norms of the head, the text tower and the logit scale with their
largest relative difference to the reference's (`grad_max_rel_diff`).
"""
from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from benchmarks.harness import (  # noqa: E402
    Benchmark, Rotation, Run, attention_through_sdpa, backend_problem, error_text, free_cache, peak_memory_mib,
    print_row, recording_backends, result, time_ms)

PASS = "step"  # forward + backward + optimizer step
OP_FAMILIES = ("attention", "patch_pool", "contrastive_loss")  # the ops one training step calls
REFERENCE = "eager reference"
SOT, EOT = 49406, 49407


@dataclass(frozen=True)
class Case:
    name: str
    caption_tokens: tuple[int, int]  # words between SOT and EOT, drawn uniformly per caption (inclusive)


CUDA_CASES = [
    Case("captions 5-30 tokens", (5, 30)),   # typical alt-text lengths: truncation to the longest EOT pays
    Case("captions 5-75 tokens", (5, 75)),   # a batch that reaches the full context: little left to truncate
]
QUICK_CASES = CUDA_CASES[:1]
CPU_CASES = [Case("tiny, captions 3-20 tokens", (3, 20))]


def add_arguments(parser) -> None:
    parser.add_argument("--config", default=None,
                        help="built-in training config name or YAML file (default: official on CUDA, tiny on CPU)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="per-GPU batch (default: the config's on CUDA, 4 on CPU)")
    parser.add_argument("--image-size", type=int, default=None,
                        help="image side in pixels (default: the config's on CUDA, 32 on CPU)")
    parser.add_argument("--precision", choices=("bf16", "fp32"), default=None,
                        help="bf16 autocast or fp32 for every implementation (default: the config's on CUDA, fp32 on "
                             "CPU)")


def check_arguments(parser, args) -> None:
    if args.batch_size is not None and args.batch_size < 2:
        parser.error(f"--batch-size must be >= 2 (a contrastive batch), got {args.batch_size}")
    if args.image_size is not None and args.image_size < 1:
        parser.error(f"--image-size must be positive, got {args.image_size}")
    args.config = args.config or ("tiny" if args.device == "cpu" else "official")


def cases(args) -> list[Case]:
    return CPU_CASES if args.device == "cpu" else (QUICK_CASES if args.quick else CUDA_CASES)


# ------------------------------------------------------------------------------------------------------ inputs
def make_batch_factory(torch, batch: int, image_size: int, context_length: int, case: Case, device, seed: int):
    """() -> (images [B, 3, S, S] fp32, ids [B, L] int64) on the device; every call draws a new batch. Ids are
    SOT, random word ids, EOT, then zero padding, as the tokenizer lays them out."""
    lo, hi = case.caption_tokens
    hi = min(hi, context_length - 2)
    if not 1 <= lo <= hi:
        raise ValueError(f"case {case.name!r}: caption lengths {case.caption_tokens} do not fit the context length "
                         f"{context_length}")
    counter = [seed]

    def make():
        gen = torch.Generator(device=device).manual_seed(counter[0])
        counter[0] += 1
        images = torch.randn(batch, 3, image_size, image_size, device=device, generator=gen)
        words = torch.randint(lo, hi + 1, (batch,), device=device, generator=gen)
        positions = torch.arange(context_length, device=device)[None, :]
        ids = torch.randint(1, 49000, (batch, context_length), device=device, generator=gen)
        ids = torch.where(positions <= words[:, None], ids, torch.zeros_like(ids))
        ids[:, 0] = SOT
        ids.scatter_(1, (words + 1)[:, None], EOT)
        return images, ids

    return make


def step_flops(mcfg, batch: int, image_size: int, drop_path: float) -> float:
    """Matmul FLOPs of one training step as the eager reference defines the work: backbone forward, head and text
    tower forward + backward (3x forward) on all context positions, the B x B loss. Batch-subset drop-path runs each
    head branch on max(int(B (1 - rate)), 1) samples. Causal attention counts half. Elementwise work is not counted."""
    def block(tokens: int, dim: int, linear_macs_per_token: int, causal: bool = False) -> float:
        attention = 4 * tokens * tokens * dim * (0.5 if causal else 1.0)
        return 2 * tokens * linear_macs_per_token + attention

    d, patches = mcfg.vision_dim, (image_size // mcfg.patch_size) ** 2
    n = 1 + mcfg.num_register_tokens + patches
    backbone = 2 * patches * 3 * mcfg.patch_size ** 2 * d
    backbone += mcfg.vision_depth * block(n, d, 4 * d * d + 2 * d * mcfg.vision_mlp_hidden)
    subset = max(int(batch * (1 - drop_path)), 1)
    head_attn = block(n, d, 4 * d * d)  # qkv + proj, and the attention itself
    head_ffn = 2 * n * 3 * d * mcfg.head_mlp_hidden  # SwiGLU: w1, w2, w3
    head = 3 * mcfg.head_blocks * subset * (head_attn + head_ffn)
    t, dt = mcfg.context_length, mcfg.text_dim
    text = 3 * (mcfg.text_layers * block(t, dt, 4 * dt * dt + 8 * dt * dt, causal=True) + 2 * dt * mcfg.embed_dim)
    loss = 3 * 2 * batch * batch * mcfg.embed_dim
    return batch * (backbone + text) + head + loss


# ------------------------------------------------------------------------------------------------------- steps
class Bench:
    """One model (the official/tiny DinoTxt as the trainer builds it) shared by every implementation, its initial
    trainable state, and the step factories."""

    def __init__(self, torch, cfg, device, precision: str):
        from dinotxt_fast.train.loop import LiTModule, build_model

        self.torch, self.cfg, self.device, self.precision = torch, cfg, device, precision
        torch.manual_seed(cfg.seed)
        with device:  # parameters are created (and initialised) on the device: much faster on a GPU
            self.model = build_model(cfg, device, precision)
        self.lit = LiTModule(self.model)
        # Kept in host memory, so the resident device memory of every row is the model's and the optimizer's only.
        self.initial = {k: v.detach().to("cpu", copy=True) for k, v in self.lit.state_dict().items()}

    def autocast(self):
        if self.precision == "bf16":
            return self.torch.autocast(self.device.type, dtype=self.torch.bfloat16)
        return contextlib.nullcontext()

    def fresh_optimizer(self):
        """Initial weights back, a new AdamW + schedule exactly as dinotxt_fast.train.loop.train builds them."""
        import functools

        from dinotxt_fast.train.loop import lr_lambda, param_groups

        torch, cfg = self.torch, self.cfg
        self.lit.load_state_dict(self.initial)
        self.lit.zero_grad(set_to_none=True)
        self.model.train()
        optimizer = torch.optim.AdamW(param_groups(self.lit, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas,
                                      eps=cfg.eps, fused=self.device.type == "cuda")
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, functools.partial(lr_lambda, warmup=cfg.warmup_steps, total=cfg.steps))
        return optimizer, scheduler

    def _finish(self, loss, optimizer, scheduler) -> float:
        """The trainer's tail of a step: backward, finite-loss check (one host sync), update, schedule, clamp."""
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        value = loss.detach().float().item()
        if not math.isfinite(value):
            raise FloatingPointError(f"the loss is {value}: the step's output is wrong")
        optimizer.step()
        scheduler.step()
        with self.torch.no_grad():
            self.lit.logit_scale.clamp_(0.0, self.cfg.max_logit_scale)
        return value

    def ours(self, backend: Optional[str]) -> Callable:
        """The step of `dinotxt-fast train` (loop.train, one process), every op on `backend` (None: auto)."""
        from dinotxt_fast import ops

        optimizer, scheduler = self.fresh_optimizer()
        model, lit = self.model, self.lit

        def step(images, ids):
            with ops.use_backend(backend):
                with self.autocast():
                    tokens = model.backbone_tokens(images)
                    img, txt = lit(tokens, ids)
                loss = ops.contrastive_loss(img, txt, lit.logit_scale)
                return self._finish(loss, optimizer, scheduler)

        return step

    def eager(self) -> Callable:
        """The same model and optimizer written the plain way (see the module docstring)."""
        torch = self.torch
        F = torch.nn.functional

        optimizer, scheduler = self.fresh_optimizer()
        model, lit = self.model, self.lit
        first_patch = 1 + model.config.num_register_tokens

        def naive_loss(img, txt, logit_scale):
            img, txt = F.normalize(img.float(), dim=-1), F.normalize(txt.float(), dim=-1)
            logits = logit_scale.exp() * img @ txt.T
            target = torch.arange(img.shape[0], device=img.device)
            return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))

        def step(images, ids):
            with attention_through_sdpa(), self.autocast():
                with torch.no_grad():
                    tokens = model.backbone(images)
                head = model.head(tokens)  # ln_final on every token
                img = torch.cat([head[:, 0], head[:, first_patch:].mean(1)], dim=-1)
                txt = model.text(ids, truncate=False)
                loss = naive_loss(img, txt, lit.logit_scale)
            return self._finish(loss, optimizer, scheduler)

        return step

    def grad_norms(self) -> dict:
        """Gradient norms left by the last step (zero_grad runs at the start of the next one)."""
        out = {}
        for name, module in (("head", self.lit.head), ("text", self.lit.text)):
            grads = [p.grad.float().norm() for p in module.parameters() if p.grad is not None]
            out[name] = self.torch.stack(grads).norm().item() if grads else 0.0
        grad = self.lit.logit_scale.grad
        out["logit_scale"] = abs(grad.item()) if grad is not None else 0.0
        return out


# ------------------------------------------------------------------------------------------------------- cases
def setup(run: Run) -> Bench:
    """The model, its optimizer's configuration and the precision policy every implementation shares."""
    import torch

    from dinotxt_fast.train.config import load_config

    args, device, cpu = run.args, run.device, run.device.type == "cpu"
    # CPU smoke runs: a tiny batch of tiny images (the Triton interpreter takes seconds per step even so), in fp32
    # (the interpreter's bf16 dots are wrong); CUDA keeps the config's sizes and precision policy. The head's attention
    # trains, as in the paper's step that step_flops counts (the tiny config freezes it: issue #13).
    cfg = load_config(args.config, device=device.type, batch_size=args.batch_size or (4 if cpu else None),
                      image_size=args.image_size or (32 if cpu else None),
                      precision=args.precision or ("fp32" if cpu else None), head_attention=True)
    precision = cfg.precision if cfg.precision != "auto" else ("fp32" if cpu else "bf16")
    print(f"train benchmark on {run.env.get('gpu', run.env.get('cpu', 'cpu'))}: config {args.config}, batch "
          f"{cfg.batch_size}, {precision}", flush=True)
    return Bench(torch, cfg, device, precision)


def run_case(run: Run, case: Case) -> list[dict]:
    """One row per implementation; `run.budget()` gives a reason once the time budget is used up."""
    import torch

    bench, device = run.state, run.device
    cfg, mcfg = bench.cfg, bench.model.config
    make = make_batch_factory(torch, cfg.batch_size, cfg.image_size, mcfg.context_length, case, device, cfg.seed)
    inputs = Rotation(make, device)
    shape = {"config": run.args.config, "batch": cfg.batch_size, "image_size": cfg.image_size,
             "patch_size": mcfg.patch_size, "vision": f"{mcfg.vision_depth}x{mcfg.vision_dim}",
             "head_blocks": mcfg.head_blocks, "text": f"{mcfg.text_layers}x{mcfg.text_dim}",
             "context_length": mcfg.context_length, "caption_tokens": list(case.caption_tokens),
             "precision": bench.precision, "drop_path": mcfg.head_drop_path, "input_copies": len(inputs)}
    work = dict(flops=step_flops(mcfg, cfg.batch_size, cfg.image_size, mcfg.head_drop_path),
                items=cfg.batch_size, item_name="samples", ceilings=run.ceilings, shape=shape, pass_=PASS)
    impls: list[tuple[str, Optional[str]]] = [(REFERENCE, None), ("ours (auto)", "auto"), ("ours (triton)", "triton"),
                                               ("ours (cuda)", "cuda")]
    rows, reference = [], None
    for impl, backend in impls:
        problem = run.budget()
        if problem is None and backend not in (None, "auto"):
            problem = backend_problem(backend, OP_FAMILIES, device)
        if problem is not None:
            rows.append(result(case.name, impl, skipped=problem, shape=shape, pass_=PASS))
            print_row(rows[-1])
            continue
        try:
            row = run_impl(torch, bench, case.name, impl, backend, inputs, device, run.quick, work, reference)
        except Exception as error:  # noqa: BLE001 - a failing implementation is a result, not a crash
            row = result(case.name, impl, skipped=error_text(error), shape=shape, pass_=PASS)
        rows.append(row)
        print_row(row)
        if impl == REFERENCE and "skipped" not in row:
            reference = row
        free_cache(device)
    return rows


def run_impl(torch, bench: Bench, case: str, impl: str, backend: Optional[str], inputs: Rotation, device,
             quick: bool, work: dict, reference: Optional[dict]) -> dict:
    """The check step, then the timed steps and the peak memory of one implementation: one result row."""
    step = bench.eager() if backend is None else bench.ours(None if backend == "auto" else backend)
    # The check step: first batch, same drop-path draws, initial weights; it also warms up (and autotunes).
    torch.manual_seed(bench.cfg.seed)
    start = time.perf_counter()
    with recording_backends() as used:
        loss = step(*inputs.sets[0])  # synchronised: the step reads the loss back
    first_s = round(time.perf_counter() - start, 3)  # mostly JIT compiles and autotuning
    grads = bench.grad_norms()
    extra = {"loss": loss, "grad_norms": grads, "first_call_s": first_s}
    if backend is not None:
        extra["backends_used"] = used
    if reference is not None:
        extra["max_abs_diff"] = abs(loss - reference["loss"])
        extra["grad_max_rel_diff"] = max(abs(grads[k] - g) / max(abs(g), 1e-12)
                                         for k, g in reference["grad_norms"].items())
    calls = [0]

    def timed():
        calls[0] += 1
        return step(*inputs.next())

    timing = time_ms(timed, device, quick)
    extra["timed_calls"] = calls[0]  # time_ms's calls, warm-up included (do_bench: ms budgets, not repeat counts)
    resident = torch.cuda.memory_allocated(device) / 2**20 if device.type == "cuda" else None
    peak = peak_memory_mib(lambda: step(*inputs.next()), device)
    return result(case, impl, timing, peak_memory=peak, resident_mib=resident, **work, **extra)


# -------------------------------------------------------------------------------------------------------- main
def settings(run: Run, case_list: list[Case]) -> dict:
    bench = run.state
    cfg, cuda = bench.cfg, run.device.type == "cuda"
    return {"config": run.args.config, "preset": cfg.preset, "batch_size": cfg.batch_size,
            "image_size": cfg.image_size, "precision": bench.precision,
            "optimizer": f"AdamW lr {cfg.lr} betas {list(cfg.betas)} eps {cfg.eps} wd {cfg.weight_decay}"
                         f"{' fused' if cuda else ''}, warm-up {cfg.warmup_steps} + cosine",
            "trainable_params": sum(p.numel() for p in bench.lit.parameters() if p.requires_grad),
            "backbone_params": sum(p.numel() for p in bench.model.backbone.parameters()),
            "model": bench.model.config.to_dict(), "cases": [c.name for c in case_list]}


NOTES = {
    "timed call": "one full training step on a batch already on the device: forward, backward, AdamW step, "
                  "LR schedule step, logit-scale clamp, and the trainer's one host sync for the finite-loss "
                  "check; data loading is not included",
    "flops": "matmul FLOPs of the eager reference's step (backbone forward; head and text tower forward + "
             "backward as 3x forward on all context positions; batch-subset drop-path shrinks the head; causal "
             "attention counts half; the B x B loss), the same number for every row, so TFLOP/s ratios are "
             "speed ratios and fraction_of_matmul_peak is the model-FLOPs utilisation",
    "items": "samples (image-caption pairs) per step",
    "peak_memory_mib": "peak allocated during one step above what was allocated before it; resident_mib is "
                       "that base: model, optimizer state, the previous step's gradients and the input batches",
    "eager reference": "same model, weights, optimizer and precision: SDPA attention, ln_final on every head "
                       "token then cls/patch-mean pooling, untruncated text, naive B x B loss",
    "ours": "the step of dinotxt_fast.train.loop.train: backbone without autograd state, LiTModule (text "
            "truncated to the longest EOT, keys after each EOT masked, fused LN + pooling), fused contrastive "
            "loss; 'ours (auto)' lets the dispatch choose (backends_used), '(triton)'/'(cuda)' force one "
            "backend for every op, as the trainer's backend= key does",
    "check": "loss and gradient norms of one step from the initial weights on the same batch with the same "
             "drop-path draws; max_abs_diff = |loss - reference loss|, grad_max_rel_diff = largest relative "
             "difference of the head/text/logit-scale gradient norms",
    "timed_calls": "calls of the step made by time_ms, warm-up included (harness.time_ms guarantees at least 5 "
                   "timed repeats with --quick, 10 without, however long a step takes)",
    "first_call_s": "wall time of each implementation's check step, its first: mostly JIT compilation and "
                    "autotuning; never part of a timing",
    "budget": "with --budget-s (the GPU suite's time limit), implementations not started in time give skipped "
              "rows saying so",
    "inputs": "random images and token ids (SOT, random words, EOT, zero padding) with caption lengths drawn "
              "uniformly in the case's range; input_copies rotate so no step reads the previous one's from L2",
}

BENCHMARK = Benchmark("train", __doc__, cases, run_case, arguments=add_arguments, check=check_arguments, setup=setup,
                      settings=settings, notes=NOTES, setup_pass=PASS, quick_help="one case and fewer repetitions")
main = BENCHMARK.main

if __name__ == "__main__":
    sys.exit(main())
