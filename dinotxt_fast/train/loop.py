"""The LiT training loop: frozen backbone, trainable vision head + text tower, symmetric InfoNCE on the global batch.

Speed by construction: the backbone runs without autograd state (in bf16 on CUDA) or is skipped entirely with a
feature cache; text batches are truncated to the longest EOT inside the text tower; the image embedding uses the
fused pooling (head ln_final folded in); the loss is the fused contrastive op over the global batch. Everything goes
through `dinotxt_fast.ops`, so the fastest available kernels are used with no change here.
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from .. import ops
from ..models.dinotxt import DinoTxt, create_model
from . import checkpoint as ckpt
from .config import TrainConfig, save_config
from .metrics import MetricsWriter, plot_curves


class TrainingStopped(RuntimeError):
    """The run stopped early (non-finite loss); the message names the step and the last good checkpoint."""


# ----------------------------------------------------------------------------------------------- distributed
@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def group(self):
        return dist.group.WORLD if self.world > 1 else None


def setup_distributed(device: str) -> tuple[Dist, torch.device]:
    """torchrun sets RANK / WORLD_SIZE / LOCAL_RANK (multi-node too); NCCL on CUDA, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda requested but no CUDA device is available")
    d = Dist(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))
    if device == "cuda":
        torch.cuda.set_device(d.local_rank)
        dev = torch.device("cuda", d.local_rank)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
    return d, dev


# ---------------------------------------------------------------------------------------------------- model
class LiTModule(nn.Module):
    """The trainable part (vision head, text tower, logit scale) as one module, so DDP/FSDP wrap exactly it.

    Takes backbone tokens (computed without autograd, or read from the feature cache) and token ids."""

    def __init__(self, model: DinoTxt):
        super().__init__()
        self.head, self.text, self.logit_scale = model.head, model.text, model.logit_scale
        self.num_registers = model.config.num_register_tokens

    def forward(self, tokens: torch.Tensor, ids: torch.Tensor):
        head_tokens = self.head(tokens, final_norm=False)
        ln = self.head.ln_final
        img = ops.patch_pool(head_tokens, num_registers=self.num_registers, ln_weight=ln.weight, ln_bias=ln.bias,
                             eps=ln.eps)
        # fp32 out: under CUDA autocast the text projection is bf16 while the pooled image vector is fp32; the
        # loss accumulates in fp32 anyway and these are [B, E] vectors.
        return img.float(), self.text(ids).float()


def param_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """Decay only matrices: no decay for parameters with fewer than 2 dims (biases, norms, LayerScale, the logit
    scale), as in the official recipe."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 and not name.endswith(".bias") else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_lambda(step: int, warmup: int, total: int) -> float:
    """Linear warm-up to the peak, then cosine to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def _speedups(model: DinoTxt, cfg: TrainConfig) -> None:
    """Per-block torch.compile and activation checkpointing, applied in place (state-dict keys unchanged)."""
    blocks = list(model.head.blocks) + list(model.text.backbone.blocks)
    for block in blocks:
        if cfg.activation_checkpointing:
            plain = block.forward
            block.forward = functools.partial(torch.utils.checkpoint.checkpoint, plain, use_reentrant=False)
        if cfg.compile:
            block.compile()


def _trainable_state(lit: LiTModule, optimizer, fsdp: bool) -> tuple[dict, dict]:
    """Full (unsharded) model and optimizer state; with FSDP a collective that every rank must enter."""
    if not fsdp:
        return lit.state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    return get_state_dict(lit, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _load_trainable_state(lit: LiTModule, optimizer, state: dict, fsdp: bool) -> None:
    if not fsdp:
        lit.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    set_state_dict(lit, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=StateDictOptions(full_state_dict=True))


# --------------------------------------------------------------------------------------------------- signals
class _StopFlag:
    """SIGTERM/SIGINT end the run after the current step with a final checkpoint."""

    def __init__(self):
        self.signum: Optional[int] = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


# ------------------------------------------------------------------------------------------------- the loop
def _autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _resolve_precision(cfg: TrainConfig, device: torch.device) -> str:
    if cfg.precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return cfg.precision


def build_model(cfg: TrainConfig, device: torch.device, precision: str) -> DinoTxt:
    model_cfg = cfg.model_config()
    overrides = {k: v for k, v in model_cfg.to_dict().items()}
    model = create_model(cfg.preset, **overrides)
    if cfg.backbone_weights:
        model.load_official(backbone=cfg.backbone_weights)
    model.backbone.requires_grad_(False)  # LiT: the backbone is frozen and runs without autograd state
    # Its weights stay fp32 and run under autocast like the rest: bf16 weights would double the backbone's error.
    return model.to(device)


def train(cfg: TrainConfig, out_dir, resume: Optional[str] = None, progress: bool = True) -> dict:
    """Run (or resume) training; returns a summary. Writes config.yaml, metrics.jsonl, checkpoints/, plots/."""
    with ops.use_backend(cfg.backend):  # every op of the run (model, pooling, loss) uses this backend
        return _train(cfg, out_dir, resume, progress)


def _train(cfg: TrainConfig, out_dir, resume: Optional[str], progress: bool) -> dict:
    from .data import make_loader
    from .evaluate import Evaluator
    from .feature_cache import build_feature_cache, cached_loader

    out_dir = Path(out_dir)
    d, device = setup_distributed(cfg.device)
    precision = _resolve_precision(cfg, device)
    if d.main:
        out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_dir = out_dir / "checkpoints"
    resume_path = ckpt.find_checkpoint(resume, out_dir)

    torch.manual_seed(cfg.seed)  # identical initialisation on every rank
    model = build_model(cfg, device, precision)
    lit = LiTModule(model)
    _speedups(model, cfg)
    trainable = lit
    fsdp = cfg.fsdp_text and d.world > 1
    replicated: list[nn.Parameter] = []
    if fsdp:
        # FSDP2 shards the text tower (its blocks, then the rest of it); the small head and the logit scale stay
        # replicated, their gradients averaged by hand after each backward (DDP can't wrap a module that holds
        # FSDP-sharded submodules, and FSDP2 can't shard the 0-d logit scale).
        from torch.distributed.fsdp import fully_shard

        for block in model.text.backbone.blocks:
            fully_shard(block)
        fully_shard(model.text)
        replicated = [p for name, p in lit.named_parameters() if p.requires_grad and not name.startswith("text.")]
    elif d.world > 1:
        trainable = nn.parallel.DistributedDataParallel(lit, device_ids=[device.index] if device.type == "cuda"
                                                        else None)
    optimizer = torch.optim.AdamW(param_groups(lit, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                                  fused=device.type == "cuda" and not fsdp,
                                  foreach=False if fsdp else None)  # foreach can't mix DTensors and tensors
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, functools.partial(lr_lambda, warmup=cfg.warmup_steps, total=cfg.steps))

    start_step = 0
    if resume_path is not None:
        state = ckpt.load_checkpoint(resume_path)
        try:
            _load_trainable_state(lit, optimizer, state, fsdp)
        except RuntimeError as exc:
            raise ValueError(f"checkpoint {resume_path} was written for a different model than this config "
                             f"describes: {exc}") from None
        scheduler.load_state_dict(state["scheduler"])
        start_step = state["step"]
    if d.main:  # only once the checkpoint (if any) is known to fit: a refused resume leaves the old config intact
        save_config(cfg, out_dir / "config.yaml")

    writer = MetricsWriter(out_dir, enabled=d.main)
    # Drop records past the starting step: those of a resumed run's lost steps, or all of a fresh run's
    # leftovers (an earlier attempt in this directory that died before its first checkpoint).
    writer.truncate_after(start_step)
    context_length = model.config.context_length
    global_batch = cfg.batch_size * d.world
    if cfg.feature_cache:
        cache = build_feature_cache(model, cfg, Path(cfg.feature_cache), device, precision, d, progress)
        loader = cached_loader(cache, global_batch=global_batch, rank=d.rank, world=d.world, seed=cfg.seed,
                               start_step=start_step)
    else:
        loader = make_loader(cfg.data, global_batch=global_batch, rank=d.rank, world=d.world, seed=cfg.seed,
                             start_step=start_step, num_workers=cfg.num_workers, context_length=context_length,
                             image_size=cfg.image_size, train=True, crop_scale=cfg.crop_scale)
    if resume_path is not None and getattr(loader, "skips", None) is not None:
        loader.skips.update(state.get("data", {}).get("skips", {}))  # counts stay cumulative across resumes
    # Every rank evaluates (the same set; only rank 0 writes): an FSDP-sharded text tower needs all ranks in its
    # forward, and no rank sits in a collective while rank 0 evaluates, whatever the collective timeout.
    evaluator = Evaluator(model, cfg, device, precision) if cfg.eval_data else None

    def checkpoint_state(step: int) -> dict:
        rng = ckpt.rng_state()
        if d.world > 1:
            gathered = [None] * d.world
            dist.all_gather_object(gathered, rng)
            rng = gathered
        model_state, optimizer_state = _trainable_state(lit, optimizer, fsdp)
        state = {"model": model_state, "optimizer": optimizer_state, "scheduler": scheduler.state_dict(), "step": step, "rng": rng, "config": cfg.to_dict(),
                 "data": {"step": step, "samples_seen": step * global_batch,
                          "skips": loader.skips.as_dict() if getattr(loader, "skips", None) else {}}}
        if not cfg.backbone_weights:  # a randomly initialised backbone is part of the run: keep it for export
            state["backbone"] = model.backbone.state_dict()
        return state

    def save(step: int) -> Optional[Path]:
        state = checkpoint_state(step)  # collective: every rank takes part
        if d.main:
            return ckpt.save_checkpoint(ckpt_dir, step, state, cfg.keep_checkpoints)
        return None

    bar = None
    if d.main and progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=start_step, desc="train", dynamic_ncols=True, file=sys.stderr)
    step = start_step
    last_saved: Optional[Path] = resume_path
    losses: list[float] = []
    t_last, samples_since = time.perf_counter(), 0
    summary: dict = {"status": "completed"}
    model.train()
    data_iter = iter(loader)
    # The RNG is set last, just before the first step: building the evaluator or the feature cache may draw from
    # it, and must not shift the drop-path draws.
    if resume_path is not None:
        rng = state["rng"] if isinstance(state["rng"], list) else [state["rng"]]
        if len(rng) != d.world:
            print(f"warning: {resume_path} was written by {len(rng)} process(es), resuming on {d.world}: the data "
                  "order continues exactly, the drop-path random draws do not", file=sys.stderr)
        ckpt.set_rng_state(rng[d.rank % len(rng)])
        if len(rng) != d.world:
            torch.manual_seed(torch.initial_seed() + d.rank)
    else:
        torch.manual_seed(cfg.seed + d.rank)  # drop-path draws differ per rank, as with independent processes
    try:
        with _StopFlag() as stop:
            while step < cfg.steps:
                # Loading must not move the global RNG that drop-path draws from (a DataLoader draws a seed from
                # it when a pass starts): otherwise a resumed run's draws would differ from an uninterrupted one's.
                with torch.random.fork_rng(devices=[]):
                    images_or_tokens, ids = next(data_iter)
                images_or_tokens = images_or_tokens.to(device, non_blocking=True)
                ids = ids.to(device, non_blocking=True)
                with _autocast(device, precision):
                    if cfg.feature_cache:
                        tokens = images_or_tokens.float()  # stored as float16
                    else:
                        tokens = model.backbone_tokens(images_or_tokens)
                    img, txt = trainable(tokens, ids)
                loss = ops.contrastive_loss(img, txt, lit.logit_scale, group=d.group)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if replicated:  # FSDP mode: average the replicated parameters' gradients in one collective
                    grads = [p.grad for p in replicated]
                    flat = torch.cat([g.reshape(-1) for g in grads])
                    dist.all_reduce(flat)
                    flat /= d.world
                    for g, new in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
                        g.copy_(new)
                # One small all-reduce carries the mean loss and any rank's stop signal, so that all ranks stop
                # (for a non-finite loss or SIGTERM) at the same step and no collective is left waiting.
                status = torch.stack([loss.detach().float(), torch.tensor(float(stop.signum is not None),
                                                                          device=loss.device)])
                if d.world > 1:
                    dist.all_reduce(status)
                    status[0] /= d.world
                loss_value, stop_requested = status[0].item(), bool(status[1].item())
                if not math.isfinite(loss_value):
                    raise TrainingStopped(
                        f"loss became {loss_value} at step {step + 1}; stopped without updating the weights. "
                        f"Last good checkpoint: {last_saved or 'none written yet'}")
                lr = scheduler.get_last_lr()[0]  # the lr of this update (scheduler.step() moves to the next)
                optimizer.step()
                scheduler.step()
                with torch.no_grad():  # the official clamp, to the configured bound
                    lit.logit_scale.clamp_(0.0, cfg.max_logit_scale)
                step += 1
                losses.append(loss_value)
                samples_since += global_batch
                if step % cfg.log_every == 0 or step == cfg.steps:
                    now = time.perf_counter()
                    record = {"step": step, "loss": sum(losses[-cfg.log_every:]) / len(losses[-cfg.log_every:]),
                              "logit_scale": lit.logit_scale.item(), "lr": lr,
                              "samples_per_s": samples_since / max(now - t_last, 1e-9)}
                    skips = getattr(loader, "skips", None)
                    if skips is not None and skips.total:
                        record["skipped_samples"] = skips.total
                    if device.type == "cuda":
                        record["gpu_mem_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
                    t_last, samples_since = now, 0
                    writer.write(record)
                    if bar is not None:
                        bar.set_postfix(loss=f"{record['loss']:.3f}", scale=f"{math.exp(record['logit_scale']):.1f}",
                                        sps=f"{record['samples_per_s']:.0f}",
                                        **({"mem": f"{record['gpu_mem_gb']:.1f}G"} if "gpu_mem_gb" in record else {}))
                if evaluator is not None and (step % cfg.eval_every == 0 or step == cfg.steps):
                    writer.write({"step": step, **evaluator.run()})
                    model.train()
                if step % cfg.save_every == 0 or step == cfg.steps:
                    last_saved = save(step) or last_saved
                if bar is not None:
                    bar.update(1)
                if stop_requested:
                    if step % cfg.save_every != 0 and step != cfg.steps:
                        last_saved = save(step) or last_saved
                    summary = {"status": "interrupted", "signal": stop.signum}
                    break
    finally:
        if bar is not None:
            bar.close()
        writer.close()
    summary.update(step=step, final_loss=losses[-1] if losses else None,
                   checkpoint=str(last_saved) if last_saved else None)
    if d.main and summary["status"] == "completed" and writer.path.exists():
        plot = plot_curves(writer.path, out_dir / "plots" / "curves.png")
        summary["plot"] = str(plot) if plot else None
    return summary


def load_trained_model(checkpoint_path, device: str = "cpu") -> DinoTxt:
    """The full model of a training checkpoint: its config's backbone (the weights file it names, or the copy
    stored in the checkpoint) plus the trained head, text tower and logit scale."""
    from .config import TrainConfig

    state = ckpt.load_checkpoint(Path(checkpoint_path))
    cfg = TrainConfig(**{**state["config"], "device": device})
    if cfg.backbone_weights and not Path(cfg.backbone_weights).is_file():
        raise FileNotFoundError(f"{checkpoint_path} was trained on the backbone file {cfg.backbone_weights}, "
                                "which is not there any more")
    model = build_model(cfg, torch.device(device), "fp32")
    if "backbone" in state:
        model.backbone.load_state_dict(state["backbone"])
    LiTModule(model).load_state_dict(state["model"])
    return model.eval()
