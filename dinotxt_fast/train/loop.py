"""The LiT training loop: frozen backbone, trainable vision head + text tower, symmetric InfoNCE on the global batch.

Speed by construction: the backbone runs without autograd state (in bf16 on CUDA) or is skipped entirely with a
feature cache; text batches are truncated to the longest EOT inside the text tower; the image embedding uses the
fused pooling (head ln_final folded in); the loss is the fused contrastive op over the global batch. Everything goes
through `dinotxt_fast.ops`, so the fastest available kernels are used with no change here.

A run (`_Run`) goes through named steps, in this order: setup (process group, device, precision, run folder),
the model and its optimizer, resuming from a checkpoint, the loader and the evaluator, the random state, then per
step the update (`_Run.update`), logging, evaluation and checkpointing, and finally the summary. The multi-process
pieces (DDP/FSDP wrapping, full state dicts, the step's collectives) are in `distributed.py`.
"""
from __future__ import annotations

import functools
import math
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from .. import ops
from ..inference.zeroshot import autocast
from ..models._state import StateDictError
from ..models.dinotxt import DinoTxt, create_model
from . import checkpoint as ckpt
from .config import EMBEDDED_PREFIX, PRECISION_DTYPES, ConfigError, TrainConfig, save_config
from .distributed import (
    agree_on_step, average_gradients, full_model_state, full_state, gather_objects, load_full_state,
    setup_distributed, wrap_trainable,
)
from .metrics import MetricsWriter, last_logged, plot_curves


MODEL_DIR = "model"  # <out>/model: the trained model as a model folder (dinotxt-fast CMD --model <out>/model)


class TrainingStopped(RuntimeError):
    """The run stopped early (non-finite loss); the message names the step and the last good checkpoint."""


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


# ------------------------------------------------------------------------------------------------- the run
def _resolve_precision(cfg: TrainConfig, device: torch.device) -> str:
    if cfg.precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return cfg.precision


def build_model(cfg: TrainConfig, device: torch.device, precision: str) -> DinoTxt:
    model_cfg = cfg.model_config()
    overrides = {k: v for k, v in model_cfg.to_dict().items()}
    model = create_model(cfg.preset, **overrides)
    if cfg.backbone_weights:
        try:
            model.load_official(backbone=cfg.backbone_path())
        except StateDictError as exc:
            if not cfg.backbone_weights.startswith(EMBEDDED_PREFIX):
                raise
            first = " ".join(line.strip() for line in str(exc).splitlines()[1:3])  # one line: the first mismatch
            raise ConfigError(f"backbone_weights={cfg.backbone_weights} does not fit this model ({first}): it is the "
                              "tiny config's backbone; set backbone_weights=null for a random one") from None
    model.backbone.requires_grad_(False)  # LiT: the backbone is frozen and runs without autograd state
    if not cfg.head_attention:  # why: TrainConfig.head_attention (the head broadcasts the caption to every patch)
        for block in model.head.blocks:
            block.attn.requires_grad_(False)
            block.ls1.requires_grad_(False)
    # Its weights stay fp32 and run under autocast like the rest: bf16 weights would double the backbone's error.
    return model.to(device)


def train(cfg: TrainConfig, out_dir, resume: Optional[str] = None, progress: bool = True) -> dict:
    """Run (or resume) training; returns a summary. Writes config.yaml, metrics.jsonl, checkpoints/, plots/ and,
    when the run completes, the model folder model/."""
    created = not Path(out_dir).exists() and os.environ.get("RANK", "0") == "0"  # rank 0 makes (and unmakes) it
    with ops.use_backend(cfg.backend):  # every op of the run (model, pooling, loss) uses this backend
        try:
            run = _Run(cfg, out_dir, resume, progress)
            run.build_trainable()
            run.resume()
            run.build_loader()
        except BaseException:
            # A run that failed to start (bad data spec, no device, Ctrl-C) leaves no folder holding only config.yaml.
            if created:
                shutil.rmtree(out_dir, ignore_errors=True)
            raise
        return run.loop()


class _Run:
    """The state of one run and its steps; `train` calls them in order (each relies on the ones before)."""

    def __init__(self, cfg: TrainConfig, out_dir, resume: Optional[str], progress: bool):
        """Setup: process group and device, precision, the run folder, the checkpoint to resume from (if any)."""
        self.cfg, self.progress = cfg, progress
        self.out_dir = Path(out_dir)
        self.d, self.device = setup_distributed(cfg.device)
        self.precision = _resolve_precision(cfg, self.device)
        if self.d.main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        self.ckpt_dir = self.out_dir / "checkpoints"
        self.resume_path = ckpt.find_checkpoint(resume, self.out_dir)
        self.resumed: Optional[dict] = None  # the checkpoint's state, once loaded
        self.start_step = 0
        self.global_batch = cfg.batch_size * self.d.world

    def build_trainable(self) -> None:
        """The model (frozen backbone), its trainable part wrapped for the ranks, the optimizer and lr schedule."""
        cfg, d, device = self.cfg, self.d, self.device
        torch.manual_seed(cfg.seed)  # identical initialisation on every rank
        self.model = build_model(cfg, device, self.precision)
        self.lit = LiTModule(self.model)
        _speedups(self.model, cfg)
        self.fsdp = cfg.fsdp_text and d.world > 1
        self.trainable, self.replicated = wrap_trainable(self.lit, self.model.text, d, device, self.fsdp)
        self.optimizer = torch.optim.AdamW(param_groups(self.lit, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas,
                                           eps=cfg.eps, fused=device.type == "cuda" and not self.fsdp,
                                           foreach=False if self.fsdp else None)  # foreach can't mix DTensors
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, functools.partial(lr_lambda, warmup=cfg.warmup_steps, total=cfg.steps))

    def resume(self) -> None:
        """Load the checkpoint's model, optimizer and schedule; then write config.yaml and start metrics.jsonl."""
        if self.resume_path is not None:
            state = self.resumed = ckpt.load_checkpoint(self.resume_path)
            try:
                load_full_state(self.lit, self.optimizer, state, self.fsdp)
            except RuntimeError as exc:
                raise ValueError(f"checkpoint {self.resume_path} was written for a different model than this "
                                 f"config describes: {exc}") from None
            self.scheduler.load_state_dict(state["scheduler"])
            self.start_step = state["step"]
        if self.d.main:  # only once the checkpoint (if any) is known to fit: a refused resume leaves the old config
            save_config(self.cfg, self.out_dir / "config.yaml")
        self.writer = MetricsWriter(self.out_dir, enabled=self.d.main)
        # Drop records past the starting step: those of a resumed run's lost steps, or all of a fresh run's
        # leftovers (an earlier attempt in this directory that died before its first checkpoint).
        self.writer.truncate_after(self.start_step)

    def build_loader(self) -> None:
        """The batches (images, or backbone tokens from the feature cache) from the starting step; the evaluator."""
        from .data import make_loader
        from .evaluate import Evaluator
        from .feature_cache import build_feature_cache, cached_loader

        cfg, d = self.cfg, self.d
        if cfg.feature_cache:
            cache = build_feature_cache(self.model, cfg, Path(cfg.feature_cache), self.device, self.precision, d,
                                        self.progress)
            self.loader = cached_loader(cache, global_batch=self.global_batch, rank=d.rank, world=d.world,
                                        seed=cfg.seed, start_step=self.start_step)
        else:
            self.loader = make_loader(cfg.data, global_batch=self.global_batch, rank=d.rank, world=d.world,
                                      seed=cfg.seed, start_step=self.start_step, num_workers=cfg.num_workers,
                                      context_length=self.model.config.context_length, image_size=cfg.image_size,
                                      train=True, crop_scale=cfg.crop_scale)
        self.skips = getattr(self.loader, "skips", None)
        if self.resumed is not None and self.skips is not None:
            self.skips.update(self.resumed.get("data", {}).get("skips", {}))  # cumulative across resumes
        # Every rank evaluates (the same set; only rank 0 writes): an FSDP-sharded text tower needs all ranks in its
        # forward, and no rank sits in a collective while rank 0 evaluates, whatever the collective timeout.
        self.evaluator = Evaluator(self.model, cfg, self.device, self.precision) if cfg.eval_data else None

    def seed_random_state(self) -> None:
        """The RNG is set last, just before the first step: building the evaluator or the feature cache may draw
        from it, and must not shift the drop-path draws."""
        d = self.d
        if self.resumed is None:
            torch.manual_seed(self.cfg.seed + d.rank)  # drop-path draws differ per rank, as with independent processes
            return
        rng = self.resumed["rng"] if isinstance(self.resumed["rng"], list) else [self.resumed["rng"]]
        if len(rng) != d.world:
            print(f"warning: {self.resume_path} was written by {len(rng)} process(es), resuming on {d.world}: the "
                  "data order continues exactly, the drop-path random draws do not", file=sys.stderr)
        ckpt.set_rng_state(rng[d.rank % len(rng)])
        if len(rng) != d.world:
            torch.manual_seed(torch.initial_seed() + d.rank)

    def update(self, data_iter, stop: _StopFlag, step: int, last_saved: Optional[Path]) -> tuple[float, float, bool]:
        """One optimizer step on the next batch: (mean loss over the ranks, its lr, whether any rank asked to stop).
        Raises TrainingStopped, before updating the weights, when the loss is not finite."""
        cfg, device = self.cfg, self.device
        # Loading must not move the global RNG that drop-path draws from (a DataLoader draws a seed from it when a
        # pass starts): otherwise a resumed run's draws would differ from an uninterrupted one's.
        with torch.random.fork_rng(devices=[]):
            images_or_tokens, ids = next(data_iter)
        images_or_tokens = images_or_tokens.to(device, non_blocking=True)
        ids = ids.to(device, non_blocking=True)
        with autocast(device, PRECISION_DTYPES[self.precision]):
            if cfg.feature_cache:
                tokens = images_or_tokens.float()  # stored as float16
            else:
                tokens = self.model.backbone_tokens(images_or_tokens)
            img, txt = self.trainable(tokens, ids)
        loss = ops.contrastive_loss(img, txt, self.lit.logit_scale, group=self.d.group)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.replicated:  # FSDP mode: average the replicated parameters' gradients
            average_gradients(self.replicated, self.d.world)
        loss_value, stop_requested = agree_on_step(loss, stop.signum is not None, self.d)
        if not math.isfinite(loss_value):
            raise TrainingStopped(
                f"loss became {loss_value} at step {step + 1}; stopped without updating the weights. "
                f"Last good checkpoint: {last_saved or 'none written yet'}")
        lr = self.scheduler.get_last_lr()[0]  # the lr of this update (scheduler.step() moves to the next)
        self.optimizer.step()
        self.scheduler.step()
        with torch.no_grad():  # the official clamp, to the configured bound
            self.lit.logit_scale.clamp_(0.0, cfg.max_logit_scale)
        return loss_value, lr, stop_requested

    def log_record(self, step: int, losses: list[float], lr: float, samples_per_s: float) -> dict:
        """The metrics.jsonl record of `step`: mean loss since the last record, scale, lr, throughput, skips."""
        recent = losses[-self.cfg.log_every:]
        record = {"step": step, "loss": sum(recent) / len(recent), "logit_scale": self.lit.logit_scale.item(),
                  "lr": lr, "samples_per_s": samples_per_s}
        if self.skips is not None and self.skips.total:
            record["skipped_samples"] = self.skips.total
        if self.device.type == "cuda":
            record["gpu_mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 1e9
        self.writer.write(record)
        return record

    def evaluate(self, step: int) -> None:
        self.writer.write({"step": step, **self.evaluator.run()})
        self.model.train()

    def checkpoint_state(self, step: int) -> dict:
        """Everything a resume needs; a collective (RNG states of all ranks, FSDP's full state): every rank enters."""
        rng = gather_objects(ckpt.rng_state(), self.d)
        model_state, optimizer_state = full_state(self.lit, self.optimizer, self.fsdp)
        state = {"model": model_state, "optimizer": optimizer_state, "scheduler": self.scheduler.state_dict(),
                 "step": step, "rng": rng, "config": self.cfg.to_dict(),
                 "data": {"step": step, "samples_seen": step * self.global_batch,
                          "skips": self.skips.as_dict() if self.skips else {}}}
        if not self.cfg.backbone_weights:  # a randomly initialised backbone is part of the run: keep it for export
            state["backbone"] = self.model.backbone.state_dict()
        return state

    def save(self, step: int) -> Optional[Path]:
        state = self.checkpoint_state(step)  # collective: every rank takes part
        if self.d.main:
            return ckpt.save_checkpoint(self.ckpt_dir, step, state, self.cfg.keep_checkpoints)
        return None

    def loop(self) -> dict:
        """The steps from the starting one to cfg.steps (or a stop signal); returns the summary."""
        cfg = self.cfg
        bar = None
        if self.d.main and self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.steps, initial=self.start_step, desc="train", dynamic_ncols=True, file=sys.stderr)
        step = self.start_step
        last_saved: Optional[Path] = self.resume_path
        losses: list[float] = []
        t_last, samples_since = time.perf_counter(), 0
        summary: dict = {"status": "completed"}
        self.model.train()
        data_iter = iter(self.loader)
        self.seed_random_state()
        try:
            with _StopFlag() as stop:
                while step < cfg.steps:
                    loss_value, lr, stop_requested = self.update(data_iter, stop, step, last_saved)
                    step += 1
                    losses.append(loss_value)
                    samples_since += self.global_batch
                    if step % cfg.log_every == 0 or step == cfg.steps:
                        now = time.perf_counter()
                        record = self.log_record(step, losses, lr, samples_since / max(now - t_last, 1e-9))
                        t_last, samples_since = now, 0
                        if bar is not None:
                            memory = {"mem": f"{record['gpu_mem_gb']:.1f}G"} if "gpu_mem_gb" in record else {}
                            bar.set_postfix(loss=f"{record['loss']:.3f}",
                                            logit_scale=f"{record['logit_scale']:.2f}",  # the log, as logged
                                            sps=f"{record['samples_per_s']:.0f}", **memory)
                    if self.evaluator is not None and (step % cfg.eval_every == 0 or step == cfg.steps):
                        self.evaluate(step)
                    if step % cfg.save_every == 0 or step == cfg.steps:
                        last_saved = self.save(step) or last_saved
                    if bar is not None:
                        bar.update(1)
                    if stop_requested:
                        if step % cfg.save_every != 0 and step != cfg.steps:
                            last_saved = self.save(step) or last_saved
                        summary = {"status": "interrupted", "signal": stop.signum}
                        break
        finally:
            if bar is not None:
                bar.close()
            self.writer.close()
        return self.summary(summary, step, losses, last_saved)

    def write_model_folder(self) -> Optional[Path]:
        """`<out>/model`: the whole trained model (backbone included) as a model folder, for `--model` and
        from_pretrained. With FSDP a collective (every rank enters); rank 0 writes."""
        from ..models.pretrained import save_pretrained

        state = None
        if self.fsdp:  # the text tower is sharded: gather its full tensors
            trainable = full_model_state(self.lit, fsdp=True)
            state = {**{f"backbone.{k}": v for k, v in self.model.backbone.state_dict().items()}, **trainable}
        if not self.d.main:
            return None
        return save_pretrained(self.model, self.out_dir / MODEL_DIR, state_dict=state)

    def summary(self, summary: dict, step: int, losses: list[float], last_saved: Optional[Path]) -> dict:
        """The run's outcome (status, last step and loss, last checkpoint) and, for a completed run, its model folder
        and plot."""
        if step == self.start_step and step >= self.cfg.steps:
            summary["nothing_to_do"] = True  # resumed a finished run: its numbers are those it logged
        final_loss = losses[-1] if losses else last_logged(self.writer.path, "loss")
        summary.update(step=step, final_loss=final_loss, checkpoint=str(last_saved) if last_saved else None)
        if summary["status"] == "completed":
            folder = self.write_model_folder()
            if folder is not None:
                summary["model"] = str(folder)
        if self.d.main and summary["status"] == "completed" and self.writer.path.exists():
            plot = plot_curves(self.writer.path, self.out_dir / "plots" / "curves.png")
            summary["plot"] = str(plot) if plot else None
        return summary


def load_trained_model(checkpoint_path, device: str = "cpu") -> DinoTxt:
    """The full model of a training checkpoint: its config's backbone (the weights file it names, or the copy
    stored in the checkpoint) plus the trained head, text tower and logit scale."""
    from .config import TrainConfig

    state = ckpt.load_checkpoint(Path(checkpoint_path))
    cfg = TrainConfig(**{**state["config"], "device": device})
    if cfg.backbone_weights and not Path(cfg.backbone_path()).exists():  # a file, or a transformers folder
        raise FileNotFoundError(f"{checkpoint_path} was trained on the backbone {cfg.backbone_weights}, "
                                "which is not there any more")
    model = build_model(cfg, torch.device(device), "fp32")
    if "backbone" in state:
        model.backbone.load_state_dict(state["backbone"])
    LiTModule(model).load_state_dict(state["model"])
    return model.eval()
