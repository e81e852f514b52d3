"""`dinotxt-fast train`: LiT training of the vision head and text tower on a frozen backbone (one process or
torchrun ranks). KEY=VALUE config overrides may stand anywhere on the line (`take_overrides`)."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from .common import PROG, CLIError

DEFAULT_CONFIG = "tiny"


def add_parser(sub):
    p = sub.add_parser(
        "train", help="train the vision head and text tower on a frozen backbone (LiT)",
        description="Train DINO.txt's vision head and text tower on a frozen backbone. With no arguments: a small "
                    "model on the embedded synthetic set (a few minutes on a CPU). `--config official` is the "
                    "paper's recipe. Multi-GPU / multi-node: launch with torchrun "
                    "(torchrun --nproc_per_node=8 -m dinotxt_fast.cli train ...).",
        epilog="Overrides are KEY=VALUE pairs of the config (YAML values), e.g. batch_size=128 lr=1e-3 "
               "model.vision_dim=64 feature_cache=/tmp/cache.")
    p.add_argument("--config", help=f"YAML file or built-in config name: official, tiny (default: "
                                    f"{DEFAULT_CONFIG})")
    p.add_argument("--preset", help="model preset (overrides the config's)")
    p.add_argument("--data", help="data spec: synthetic[:N], shards '/d/x-{000..099}.tar', a .csv/.tsv file")
    p.add_argument("--steps", type=int, help="number of optimizer steps")
    p.add_argument("--out", help="run directory (default: runs/<config name>)")
    p.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CKPT",
                   help="resume from CKPT, or from <out>/checkpoints/last.pt when no path is given")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), help="default: cuda when available")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs still go to metrics.jsonl)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    return p


def take_overrides(args, extra: list[str]) -> list[str]:
    """Moves the KEY=VALUE overrides among the arguments argparse left over (those after an option: argparse stops
    collecting positionals there) into `args.overrides`; returns the rest."""
    is_override = lambda e: "=" in e and not e.startswith("-")  # noqa: E731
    args.overrides += [e for e in extra if is_override(e)]
    return [e for e in extra if not is_override(e)]


def run(args) -> int:
    from ..train import ConfigError, TrainingStopped, load_config, train
    from ..train.checkpoint import find_checkpoint
    from ..train.metrics import results_line

    config = args.config or DEFAULT_CONFIG
    if args.resume is not None and "=" in args.resume and not Path(args.resume).exists():
        # `--resume steps=10`: argparse gave the optional CKPT value the first override
        args.overrides.insert(0, args.resume)
        args.resume = "auto"
    try:
        cfg = load_config(config, args.overrides, preset=args.preset, data=args.data, steps=args.steps,
                          device=args.device)
    except ConfigError as exc:
        raise CLIError(str(exc)) from None
    if cfg.device == "cuda":
        import torch

        if not torch.cuda.is_available():  # the same line as the other commands' --device check
            raise CLIError("--device cuda: CUDA is not available on this machine (use --device cpu)")
    out = Path(args.out or Path("runs") / Path(config).stem)
    if args.resume is None and (out / "checkpoints" / "last.pt").exists():
        raise CLIError(f"{out} already holds a run: pass --resume to continue it, or --out for a new directory")
    try:
        find_checkpoint(args.resume, out)
    except FileNotFoundError as exc:
        raise CLIError(str(exc)) from None
    try:
        summary = train(cfg, out, resume=args.resume, progress=not args.no_progress)
    except TrainingStopped as exc:
        print(f"{PROG} train: stopped: {exc}", file=sys.stderr)
        return 1
    if int(os.environ.get("RANK", "0")) == 0:
        if summary.get("nothing_to_do"):
            print(f"nothing to do: {out} already finished step {summary['step']} of {cfg.steps}; "
                  f"{final_loss(summary)}")
        print(json.dumps(summary))
        print(f"outputs in {out}: config.yaml, metrics.jsonl, checkpoints/, plots/"
              + (", model/" if "model" in summary else ""))
        if "model" in summary:
            print(f"the trained model: {summary['model']} (use it with --model {summary['model']}, e.g. "
                  f"{PROG} classify IMAGE --classes a,b --model {summary['model']})")
        results = results_line(out / "metrics.jsonl")
        if results and summary["status"] == "completed":  # the last thing printed: what the run achieved
            print(results)
        if summary["status"] == "interrupted":
            print(f"{PROG} train: interrupted at step {summary['step']} (checkpoint {summary['checkpoint']}); "
                  "run the same command with --resume to continue", file=sys.stderr)
    return 0 if summary["status"] == "completed" else 128 + summary.get("signal", 0)


def final_loss(summary: dict) -> str:
    return f"final loss {summary['final_loss']:.4f}" if summary.get("final_loss") is not None else "no loss logged"
