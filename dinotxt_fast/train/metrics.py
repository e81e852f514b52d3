"""Run outputs: metrics as JSONL (and TensorBoard when installed), curves plotted at the end (matplotlib)."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional


class MetricsWriter:
    """Appends one JSON object per log/eval step to `metrics.jsonl`; mirrors scalars to TensorBoard if present."""

    def __init__(self, out_dir: Path, enabled: bool = True):
        self.enabled = enabled
        self.path = out_dir / "metrics.jsonl"
        self._tb = None
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(out_dir / "tensorboard"))
        except ImportError:  # tensorboard is optional
            self._tb = None

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(key, value, record["step"])

    def truncate_after(self, step: int) -> None:
        """On resume, drop records past the checkpoint's step so the file reads as one uninterrupted run."""
        if not (self.enabled and self.path.exists()):
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:  # a line torn by a crash mid-write
                continue
            if isinstance(record, dict) and record.get("step", math.inf) <= step:
                kept.append(line)
        self.path.write_text("".join(line + "\n" for line in kept))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def last_logged(path: Path, key: str):
    """The last value of `key` in a metrics.jsonl file, None when the file or the key is absent."""
    if not Path(path).exists():
        return None
    values = [r[key] for r in read_metrics(path) if key in r]
    return values[-1] if values else None


def plot_curves(metrics_path: Path, out_path: Path) -> Optional[Path]:
    """Loss, logit scale and evaluation curves as one PNG; None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    records = read_metrics(metrics_path)
    panels = [("loss", "training loss"), ("logit_scale", "logit scale (log)"),
              ("zero_shot_top1", "zero-shot top-1"), ("miou", "segmentation mIoU")]
    panels = [(key, title) for key, title in panels if any(key in r for r in records)]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, (key, title) in zip(axes[0], panels):
        points = [(r["step"], r[key]) for r in records if key in r]
        ax.plot(*zip(*points), marker="o" if len(points) < 30 else None)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path
