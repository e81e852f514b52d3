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


def results_line(path: Path) -> Optional[str]:
    """The run's last evaluation next to its baselines, in percent, e.g. "zero-shot top-1 100.0% (chance 12.5%) ·
    mIoU 59.6% (all-background 9.1%, majority class 9.1%)"; None when no evaluation was logged."""
    if not Path(path).exists():
        return None
    records = read_metrics(path)
    last = {}
    for record in records:
        last.update({k: v for k, v in record.items() if k != "step"})
    parts = []
    for key, label in (("zero_shot_top1", "zero-shot top-1"), ("miou", "mIoU")):
        if key in last:
            known = [(name, last[k]) for k, name in BASELINES[key] if k in last]
            parts.append(f"{label} {100 * last[key]:.1f}%"
                         + (" (" + ", ".join(f"{name} {100 * v:.1f}%" for name, v in known) + ")" if known else ""))
    return " · ".join(parts) or None


# What guessing scores, per evaluation curve: (metrics.jsonl key of the value, legend label).
BASELINES = {
    "zero_shot_top1": (("zero_shot_chance", "chance"),),
    "miou": (("miou_baseline_background", "all-background"), ("miou_baseline_majority", "majority class")),
}


def baseline_lines(records: list[dict], key: str) -> list[tuple[str, float]]:
    """The (label, value) horizontal lines drawn under the curve of `key`: its baselines' last logged values;
    baselines of equal value share one line (on the embedded set the majority class is the background)."""
    lines: list[tuple[str, float]] = []
    for baseline_key, label in BASELINES.get(key, ()):
        values = [r[baseline_key] for r in records if baseline_key in r]
        if not values:
            continue
        same = [i for i, (_, v) in enumerate(lines) if v == values[-1]]
        if same:
            lines[same[0]] = (f"{lines[same[0]][0]} = {label}", values[-1])
        else:
            lines.append((label, values[-1]))
    return lines


def curves_figure(records: list[dict]):
    """The figure of `plot_curves` (one panel per logged curve; baselines dashed, with legend entries); None when
    there is nothing to plot."""
    import matplotlib.pyplot as plt

    panels = [("loss", "training loss"), ("logit_scale", "logit scale (log)"),
              ("zero_shot_top1", "zero-shot top-1"), ("miou", "segmentation mIoU")]
    panels = [(key, title) for key, title in panels if any(key in r for r in records)]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, (key, title) in zip(axes[0], panels):
        points = [(r["step"], r[key]) for r in records if key in r]
        ax.plot(*zip(*points), marker="o" if len(points) < 30 else None, label=title)
        lines = baseline_lines(records, key)
        for (label, value), colour in zip(lines, ("tab:gray", "tab:red")):
            ax.axhline(value, linestyle="--", color=colour, linewidth=1, label=label)
        if lines:
            ax.legend(fontsize="small")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_curves(metrics_path: Path, out_path: Path) -> Optional[Path]:
    """Loss, logit scale and evaluation curves (with their baselines) as one PNG; None when matplotlib is not
    installed or nothing was logged."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig = curves_figure(read_metrics(metrics_path))
    if fig is None:
        return None
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path
